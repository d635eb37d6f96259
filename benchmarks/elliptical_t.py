"""Multivariate t bases for MAFDensity, measured against the Gaussian base and GaussianMixture.

Written when ``MAFDensity()`` (then the Gaussian base) tied the BIC
GaussianMixture of ``quality.py`` on ``student-t-8d`` (a multivariate t,
df=3), to measure a MAF whose base is the standard multivariate t (identity
scatter, one degrees-of-freedom parameter) with the degrees of freedom
*started* at the value of a multivariate t fitted to the standardised
training rows by ECME (Liu & Rubin, 1995: EM for the location and scatter,
the degrees of freedom maximising the observed likelihood). What it found
is in the library now (``base="elliptical-t"``, ``"fitted-t"``, and the
default ``"auto"`` that chooses; benchmarks/RESULTS.md). Models:

- ``MAF``: ``MAFDensity()`` at its defaults (``base="auto"``);
- ``MAF-G``, ``MAF-ET``, ``MAF-FT``: ``MAFDensity`` with ``base="gaussian"``,
  ``"elliptical-t"`` (the library's version of ``ET``) or ``"fitted-t"``;
- the experiment's own models, whose base is swapped into the module that
  ``MAFDensity`` builds (with ``base="student-t"``, so that no Gaussian tails
  are added at scoring time) and which train by autograd (2-4x the
  library's fit times):

  - ``ET``: the elliptical t base, df started at the ECME value and learned;
  - ``ETW``: ``ET`` with the fixed first layer whitening by the ECME location
    and scatter (a full affine map) instead of standardising each feature;
  - ``ETWfix``: ``ETW`` with the df frozen at the ECME value;
  - ``ET30``: ``ET`` started at df = 30 (the earlier try);

- ``EMT``: the ECME multivariate t alone, no flow;
- ``GMM``: ``quality.fit_gmm``.

Every choice is made from the training rows (the ECME fit uses the training
split of the estimator only). Rows: ``quality.draw``'s for ``--data-seed 0``
(10,000 training, 5,000 test), fresh independent ones for other data seeds;
``--n-test`` sets the test rows.

Usage::

    python benchmarks/elliptical_t.py [--datasets student-t-8d,...] [--models MAF,MAF-G,ET,ETW,GMM]
        [--seeds 0 1 2] [--data-seed 0] [--n-test 5000] [--threads 1] [--out FILE]
"""

import argparse
import math
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from scipy import optimize, special
from sklearn.exceptions import ConvergenceWarning
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
from _densities import DENSITIES

from sklearn_maf import MAFDensity
from sklearn_maf._nn.distributions import _DF_RATE
from sklearn_maf._nn.preprocessing import Standardize

N_TRAIN, N_TEST = 10_000, 5_000
DF_RANGE = (0.5, 1e4)  # the ECME search; the base needs df > 1, so it starts at 1.05 or more


def mvt_log_density(Z, mu, scatter, df):
    """Log-density of a multivariate t at the rows of ``Z``, and their squared Mahalanobis radii."""
    d = Z.shape[1]
    chol = np.linalg.cholesky(scatter)
    radius2 = np.square(np.linalg.solve(chol, (Z - mu).T)).sum(axis=0)
    log_norm = special.gammaln((df + d) / 2) - special.gammaln(df / 2) - d / 2 * np.log(df * np.pi)
    return log_norm - np.log(np.diag(chol)).sum() - (df + d) / 2 * np.log1p(radius2 / df), radius2


def fit_mvt(Z, df=10.0, max_iter=500, tol=1e-8):
    """ECME for a multivariate t: ``(location, scatter, df)``."""
    n, d = Z.shape
    mu, scatter, previous = Z.mean(0), np.cov(Z.T), -np.inf
    for _ in range(max_iter):
        _, radius2 = mvt_log_density(Z, mu, scatter, df)
        weight = (df + d) / (df + radius2)
        mu = weight @ Z / weight.sum()
        centred = Z - mu
        scatter = (weight[:, None] * centred).T @ centred / n
        result = optimize.minimize_scalar(
            lambda log_df, mu=mu, scatter=scatter: -mvt_log_density(Z, mu, scatter, np.exp(log_df))[0].mean(),
            bounds=np.log(DF_RANGE), method="bounded",
        )  # fmt: skip
        df = float(np.exp(result.x))
        mean = mvt_log_density(Z, mu, scatter, df)[0].mean()
        if mean - previous < tol:
            break
        previous = mean
    return mu, scatter, df


class EllipticalT(nn.Module):
    """The standard multivariate t: identity scatter, ``df = 1 + exp(rate * raw_df)``."""

    def __init__(self, n_features, df, learn=True, dtype=torch.float64):
        super().__init__()
        self.n_features = self.n_noise = n_features
        raw = torch.tensor([math.log(max(df, 1.05) - 1) / _DF_RATE], dtype=dtype)
        if learn:  # named raw_df, not weight: no L2 penalty
            self.raw_df = nn.Parameter(raw)
        else:
            self.register_buffer("raw_df", raw)

    @property
    def df(self):
        return 1 + torch.exp(_DF_RATE * self.raw_df)

    def log_prob(self, u, context=None):
        d, df = u.shape[-1], self.df
        df64 = df.double()  # the normaliser in float64, as the library's StudentT base
        norm = torch.lgamma(0.5 * (df64 + d)) - torch.lgamma(0.5 * df64) - 0.5 * d * torch.log(math.pi * df64)
        return norm.to(u.dtype) - 0.5 * (df + d) * torch.log1p(u.square().sum(-1) / df)


class Whiten(nn.Module):
    """The fixed map ``x -> L^-1 (x - mu)``, ``scatter = L L^T``, with its log-det."""

    def __init__(self, mu, scatter, dtype=torch.float64):
        super().__init__()
        chol = np.linalg.cholesky(scatter)
        self.register_buffer("mu", torch.as_tensor(mu, dtype=dtype))
        self.register_buffer("inverse_t", torch.as_tensor(np.linalg.inv(chol).T.copy(), dtype=dtype))
        self.register_buffer("chol_t", torch.as_tensor(chol.T.copy(), dtype=dtype))
        self.register_buffer("log_det", torch.as_tensor(-np.log(np.diag(chol)).sum(), dtype=dtype))

    def forward(self, x, context=None, weight=None):
        return (x - self.mu) @ self.inverse_t, self.log_det.expand(x.shape[0])

    def inverse(self, y, context=None):
        return y @ self.chol_t + self.mu, (-self.log_det).expand(y.shape[0])


class EllipticalMAF(MAFDensity):
    """``MAFDensity(base="student-t")`` with the base (and maybe the first layer) swapped after it is built."""

    def __init__(self, *, whiten=False, learn_df=True, df_start=None, **params):
        super().__init__(base="student-t", **params)
        self.whiten, self.learn_df, self.df_start = whiten, learn_df, df_start

    def _build_module(self, X, sample_weight, generator, n_context=0):
        module = super()._build_module(X, sample_weight, generator, n_context)
        assert isinstance(module.transforms[0], Standardize)
        loc, scale = X.mean(0), X.std(0)
        mu, scatter, df = fit_mvt((X - loc) / scale)
        self.ecme_df_ = df
        module.base = EllipticalT(X.shape[1], self.df_start or df, learn=self.learn_df)
        if self.whiten:
            module.transforms[0] = Whiten(loc + scale * mu, scatter * np.outer(scale, scale))
        return module


VARIANTS = {
    "ET": {},
    "ETW": {"whiten": True},
    "ETWfix": {"whiten": True, "learn_df": False},
    "ET30": {"df_start": 30.0},
}


# The library's models: the defaults, and each base alone.
LIBRARY = {
    "MAF": {},
    "MAF-G": {"base": "gaussian"},
    "MAF-ET": {"base": "elliptical-t"},
    "MAF-FT": {"base": "fitted-t"},
}


def draw(density, data_seed, n_test=N_TEST):
    """``quality.draw``'s rows for data seed 0; fresh, independent rows for the others."""
    if data_seed == 0:
        return quality.draw(density, N_TRAIN, n_test)
    key = zlib.crc32(density.name.encode())
    rngs = [np.random.default_rng([key, part, data_seed]) for part in (0, 1)]
    return density.sample(N_TRAIN, rngs[0]), density.sample(n_test, rngs[1])


def fit(name, X, seed):
    """``(score_samples, note)`` of one model fitted to ``X``."""
    if name == "GMM":
        return quality.fit_gmm(X)
    if name == "EMT":
        loc, scale = X.mean(0), X.std(0)
        mu, scatter, df = fit_mvt((X - loc) / scale)
        score = lambda rows: mvt_log_density((rows - loc) / scale, mu, scatter, df)[0] - np.log(scale).sum()
        return score, f"df {df:.2f}"
    if name in LIBRARY:
        model = MAFDensity(random_state=seed, **LIBRARY[name])
    else:
        model = EllipticalMAF(random_state=seed, **VARIANTS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    note = f"{model.n_iter_} epochs"
    if name in LIBRARY:
        note += f"; {model.base_}" if name == "MAF" else ""
        if model.base_ in ("elliptical-t", "fitted-t"):
            note += f"; df -> {float(model.module_.base.df.detach()):.2f}"
    elif name != "MAF":
        note += f"; df {model.ecme_df_:.2f} (ECME) -> {float(model.module_.base.df.detach()):.2f}"
    return model.score_samples, note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="student-t-8d", help=f"comma-separated, of {','.join(DENSITIES)}")
    parser.add_argument(
        "--models", default="MAF,MAF-ET,ETW,GMM", help=f"comma-separated, of {','.join([*LIBRARY, *VARIANTS, 'EMT', 'GMM'])}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="random_state of the flows")
    parser.add_argument(
        "--data-seed", type=int, default=0, help="0: quality.draw's rows; another: fresh rows drawn from it"
    )
    parser.add_argument("--n-test", type=int, default=N_TEST, help=f"test rows (default {N_TEST:,})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    lines = [
        f"- command: `python benchmarks/elliptical_t.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"- rows: {N_TRAIN} training, {args.n_test} test per data set (data seed {args.data_seed})",
        "",
        f"| data set | seed | model | gap to truth (nats) | vs {models[0]} | vs GMM | fit (s) | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for dataset in args.datasets.split(","):
        density = DENSITIES[dataset]
        X_train, X_test = draw(density, args.data_seed, args.n_test)
        truth = density.log_prob(X_test)
        gmm = None
        for seed in args.seeds:
            scores = {}
            for name in models:
                if name == "GMM" and gmm is not None:  # GMM does not depend on the flows' seed
                    scores[name] = gmm
                    continue
                start = time.perf_counter()
                score_samples, note = fit(name, X_train, seed)
                scores[name] = (score_samples(X_test), note, time.perf_counter() - start)
                if name == "GMM":
                    gmm = scores[name]
            for name, (log_density, note, seconds) in scores.items():
                gap = truth - log_density
                cells = [f"{gap.mean():.4f} ± {gap.std(ddof=1) / math.sqrt(gap.size):.4f}"]
                for reference in (models[0], "GMM"):  # paired over the test rows; negative: better
                    if reference in scores and reference != name:
                        diff = scores[reference][0] - log_density
                        cells.append(f"{diff.mean():+.4f} ± {diff.std(ddof=1) / math.sqrt(diff.size):.4f}")
                    else:
                        cells.append("")
                line = f"| {dataset} | {seed} | {name} | " + " | ".join(cells) + f" | {seconds:.1f} | {note} |"
                lines.append(line)
                print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
