"""Densities with exact log-densities, for benchmarking density estimators.

Each :class:`Density` draws rows with a ``numpy.random.Generator`` and scores
rows with its exact log-density, so the gap between a model and the truth,
``mean(log p_true(x) - log p_model(x))`` over held-out rows, is a Monte-Carlo
estimate of ``KL(p_true || p_model)``: 0 is the physical limit.

Every density's parameters are fixed (any random parameters come from a fixed
seed), so the same name always means the same distribution.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import gammaln, logsumexp

__all__ = ["DENSITIES", "Density"]


@dataclass(frozen=True)
class Density:
    """A named distribution: ``sample(n, rng) -> (n, dim)``, ``log_prob(X) -> (n,)``."""

    name: str
    family: str
    dim: int
    description: str
    sample: Callable
    log_prob: Callable


def _norm_logpdf(x, mean, std):
    return stats.norm.logpdf(x, loc=mean, scale=std)


# ------------------------------------------------------------------ curved


def _banana(x1_std=1.5, noise=0.5):
    def sample(n, rng):
        x1 = rng.normal(0.0, x1_std, n)
        x2 = rng.normal(x1**2 / 2, noise)
        return np.column_stack([x1, x2])

    def log_prob(X):
        return _norm_logpdf(X[:, 0], 0.0, x1_std) + _norm_logpdf(X[:, 1], X[:, 0] ** 2 / 2, noise)

    return Density(
        "banana-2d",
        "curved",
        2,
        f"x1 ~ N(0, {x1_std}^2), x2 | x1 ~ N(x1^2/2, {noise}^2)",
        sample,
        log_prob,
    )


def _sine_chain(dim=8, noise=0.3):
    def sample(n, rng):
        X = np.empty((n, dim))
        X[:, 0] = rng.normal(0.0, 1.0, n)
        for i in range(1, dim):
            X[:, i] = rng.normal(np.sin(2 * X[:, i - 1]), noise)
        return X

    def log_prob(X):
        out = _norm_logpdf(X[:, 0], 0.0, 1.0)
        return out + _norm_logpdf(X[:, 1:], np.sin(2 * X[:, :-1]), noise).sum(axis=1)

    return Density(
        f"sine-chain-{dim}d",
        "curved",
        dim,
        f"x1 ~ N(0, 1), x_i | x_(i-1) ~ N(sin(2 x_(i-1)), {noise}^2)",
        sample,
        log_prob,
    )


# ------------------------------------------------------------ heavy tails


def _student_t(dim, df=3.0, rho=0.7):
    """Multivariate t; scale matrix with correlations rho^|i-j| and scales 0.5 .. 3."""
    index = np.arange(dim)
    correlation = rho ** np.abs(index[:, None] - index[None, :])
    scales = np.geomspace(0.5, 3.0, dim)
    shape = correlation * np.outer(scales, scales)
    dist = stats.multivariate_t(loc=np.zeros(dim), shape=shape, df=df)

    def sample(n, rng):
        return dist.rvs(size=n, random_state=rng).reshape(n, dim)

    def log_prob(X):
        return np.atleast_1d(dist.logpdf(X))

    return Density(
        f"student-t-{dim}d",
        "heavy-tailed",
        dim,
        f"multivariate t, df={df:g}, correlations {rho}^|i-j|, scales 0.5..3",
        sample,
        log_prob,
    )


def _t_marginals(dim, df=3.0, rho=0.7):
    """Student-t marginals (scales 0.5 .. 3) joined by a Gaussian copula (correlations rho^|i-j|).

    Heavy-tailed but not elliptical, unlike the multivariate t: every feature
    has power-law tails of its own, so far rows lie near the axes rather than
    in every direction, and no scale mixture of Gaussians describes it.
    """
    index = np.arange(dim)
    correlation = rho ** np.abs(index[:, None] - index[None, :])
    scales = np.geomspace(0.5, 3.0, dim)
    copula = stats.multivariate_normal(mean=np.zeros(dim), cov=correlation)
    marginal = stats.t(df)

    def sample(n, rng):
        z = copula.rvs(size=n, random_state=rng).reshape(n, dim)
        # through the upper tail on both sides: no 1 - (1 - p) round-off far out
        return np.sign(z) * marginal.isf(stats.norm.sf(np.abs(z))) * scales

    def log_prob(X):
        y = np.asarray(X) / scales
        z = np.sign(y) * stats.norm.isf(marginal.sf(np.abs(y)))
        log_copula = np.atleast_1d(copula.logpdf(z)) - stats.norm.logpdf(z).sum(axis=1)
        return log_copula + (marginal.logpdf(y) - np.log(scales)).sum(axis=1)

    return Density(
        f"t-marginals-{dim}d",
        "heavy-tailed",
        dim,
        f"t marginals, df={df:g}, scales 0.5..3, Gaussian copula with correlations {rho}^|i-j|",
        sample,
        log_prob,
    )


# ------------------------------------------------------------ multi-modal


def _gaussian_mixture(name, description, means, covariances, weights=None):
    means = np.asarray(means, dtype=float)
    k, dim = means.shape
    weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=float)
    components = [stats.multivariate_normal(m, c) for m, c in zip(means, covariances)]
    cholesky = [np.linalg.cholesky(c) for c in covariances]

    def sample(n, rng):
        labels = rng.choice(k, size=n, p=weights)
        z = rng.standard_normal((n, dim))
        X = np.empty((n, dim))
        for j in range(k):
            rows = labels == j
            X[rows] = means[j] + z[rows] @ cholesky[j].T
        return X

    def log_prob(X):
        per_component = np.column_stack([c.logpdf(X) for c in components]).reshape(len(X), k)
        return logsumexp(per_component + np.log(weights), axis=1)

    return Density(name, "multi-modal", dim, description, sample, log_prob)


def _ring(n_modes=8, radius=4.0, std=0.4):
    angles = 2 * np.pi * np.arange(n_modes) / n_modes
    means = radius * np.column_stack([np.cos(angles), np.sin(angles)])
    covariances = [std**2 * np.eye(2)] * n_modes
    return _gaussian_mixture(
        f"ring-{n_modes}-2d",
        f"{n_modes} equal Gaussians (std {std}) on a circle of radius {radius}",
        means,
        covariances,
    )


def _random_mixture(dim=8, n_modes=5, spread=2.5, seed=1):
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, spread, (n_modes, dim))
    covariances = []
    for _ in range(n_modes):
        A = rng.normal(0.0, 1.0, (dim, dim)) / np.sqrt(dim)
        covariances.append(0.5 * (A @ A.T) + 0.1 * np.eye(dim))
    weights = rng.dirichlet(np.full(n_modes, 5.0))
    return _gaussian_mixture(
        f"mixture-{dim}d",
        f"{n_modes} Gaussians, random means N(0, {spread}^2), random full covariances",
        means,
        covariances,
        weights,
    )


# ---------------------------------------------------------------- funnel


def _funnel(dim=4, v_std=3.0):
    """Neal's funnel: v ~ N(0, v_std^2), x_j | v ~ N(0, exp(v)) for j = 2..dim."""

    def sample(n, rng):
        v = rng.normal(0.0, v_std, n)
        x = rng.normal(0.0, 1.0, (n, dim - 1)) * np.exp(v / 2)[:, None]
        return np.column_stack([v, x])

    def log_prob(X):
        v = X[:, 0]
        return _norm_logpdf(v, 0.0, v_std) + _norm_logpdf(X[:, 1:], 0.0, np.exp(v / 2)[:, None]).sum(axis=1)

    return Density(
        f"funnel-{dim}d",
        "funnel",
        dim,
        f"Neal's funnel: v ~ N(0, {v_std:g}^2), x_j | v ~ N(0, e^v), j = 1..{dim - 1}",
        sample,
        log_prob,
    )


# --------------------------------------------- families the defaults never saw
# Added after the defaults were chosen, to check them on data they were not
# tuned on: the classical family's own truth, skew, tails without moments,
# bounded and discontinuous supports, a thin curved shell.


def _gaussian(dim=8, rho=0.7):
    """One Gaussian: the truth of a one-component GaussianMixture, which BIC finds."""
    index = np.arange(dim)
    scales = np.geomspace(0.5, 3.0, dim)
    covariance = rho ** np.abs(index[:, None] - index[None, :]) * np.outer(scales, scales)
    dist = stats.multivariate_normal(mean=np.zeros(dim), cov=covariance)

    def sample(n, rng):
        return dist.rvs(size=n, random_state=rng).reshape(n, dim)

    def log_prob(X):
        return np.atleast_1d(dist.logpdf(X))

    return Density(
        f"gaussian-{dim}d", "gaussian", dim, f"one Gaussian, correlations {rho}^|i-j|, scales 0.5..3", sample, log_prob
    )


def _lognormal(dim=4, rho=0.6):
    """exp of a correlated Gaussian: skewed positive features with a long right tail."""
    index = np.arange(dim)
    normal = stats.multivariate_normal(mean=np.zeros(dim), cov=rho ** np.abs(index[:, None] - index[None, :]))

    def sample(n, rng):
        return np.exp(normal.rvs(size=n, random_state=rng).reshape(n, dim))

    def log_prob(X):
        log_x = np.log(X)
        return np.atleast_1d(normal.logpdf(log_x)) - log_x.sum(axis=1)

    return Density(
        f"lognormal-{dim}d", "skewed", dim, f"exp of a Gaussian with correlations {rho}^|i-j|", sample, log_prob
    )


def _cauchy(dim=3):
    """Independent Cauchy features: no mean, no variance."""
    marginal = stats.cauchy()

    def sample(n, rng):
        return marginal.rvs(size=(n, dim), random_state=rng)

    def log_prob(X):
        return marginal.logpdf(X).sum(axis=1)

    return Density(f"cauchy-{dim}d", "heavy-tailed", dim, "independent standard Cauchy features", sample, log_prob)


def _uniform(dim=6):
    """Uniform on the unit cube: flat, with a hard edge."""

    def sample(n, rng):
        return rng.uniform(size=(n, dim))

    def log_prob(X):
        return np.where(np.all((X >= 0) & (X <= 1), axis=1), 0.0, -np.inf)

    return Density(f"uniform-{dim}d", "bounded", dim, "uniform on the unit cube", sample, log_prob)


def _checkerboard(n_squares=4):
    """Uniform on the dark squares of an n x n board: density jumps to zero along every edge."""

    def dark(X):
        return (np.floor(X[:, 0]) + np.floor(X[:, 1])) % 2 == 0

    def sample(n, rng):
        X = rng.uniform(0.0, n_squares, size=(n, 2))
        light = ~dark(X)
        X[light, 0] = (X[light, 0] + 1.0) % n_squares  # the neighbouring square is dark
        return X

    def log_prob(X):
        inside = np.all((X >= 0) & (X <= n_squares), axis=1) & dark(X)
        return np.where(inside, -np.log(n_squares**2 / 2), -np.inf)

    return Density(
        "checkerboard-2d", "bounded", 2, f"uniform on the dark squares of a {n_squares}x{n_squares} board", sample, log_prob
    )


def _shell(dim=3, std=0.05):
    """A thin spherical shell: direction uniform, radius N(1, std^2) kept positive."""
    radius = stats.truncnorm(-1.0 / std, np.inf, loc=1.0, scale=std)
    log_area = np.log(2.0) + 0.5 * dim * np.log(np.pi) - gammaln(dim / 2)  # of the unit sphere

    def sample(n, rng):
        direction = rng.standard_normal((n, dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        return direction * radius.rvs(size=n, random_state=rng)[:, None]

    def log_prob(X):
        r = np.linalg.norm(X, axis=1)
        return radius.logpdf(r) - log_area - (dim - 1) * np.log(r)

    return Density(f"shell-{dim}d", "curved", dim, f"thin spherical shell, radius N(1, {std}^2)", sample, log_prob)


DENSITIES = {
    density.name: density
    for density in [
        _banana(),
        _sine_chain(),
        _student_t(2),
        _student_t(8),
        _t_marginals(8),
        _ring(),
        _random_mixture(),
        _funnel(),
        _gaussian(),
        _lognormal(),
        _cauchy(),
        _uniform(),
        _checkerboard(),
        _shell(),
    ]
}
