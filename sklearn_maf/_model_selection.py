"""Model selection at fit time: the base density and the tail cut.

The ECME fit of a multivariate t (for ``base="elliptical-t"``, ``"fitted-t"``
and ``"auto"``), the rule by which ``base="auto"`` picks a base, the name of a
fitted flow's base, and the tail cut that ``tail_cut="auto"`` picks on held-out
rows.
"""

import numpy as np
import torch
from scipy import optimize, special

from ._nn import EllipticalT, MADEMoG, StandardNormal, StudentT, Whiten, reused_buffers
from ._nn.flow import power_tails

# candidates of tail_cut="auto", besides None (the plain normal)
_TAIL_CUTS = (2.0, 2.5, 3.0, 4.0)


# The degrees of freedom that _multivariate_t searches, and its cost: ECME
# on at most this many rows (evenly spaced), at most this many iterations
# (light tails converge in a few dozen; heavy ones take them all).
_MVT_DF_RANGE = (0.5, 1e4)
_MVT_MAX_ROWS = 20_000
_MVT_MAX_ITER = 100
# base="auto" takes a t base only where the t fitted by ECME has fewer degrees of
# freedom than this: a t with 7 has an excess kurtosis of 2, heavy tails by any measure
# (benchmarks/RESULTS.md, "The fitted t base and base='auto'", for the data sets' dfs).
_AUTO_T_BELOW_DF = 7.0
# ... and the fitted t base where every feature's own ECME df is within this factor of
# the whole's, as in a multivariate t, whose every feature is a t with the same df.
_AUTO_ELLIPTICAL_RATIO = 1.2


def _multivariate_t(Z, weight, tol=1e-8):
    """``(loc, scatter, df)`` of a multivariate t fitted to the rows ``Z`` (weighted); df >= 1.05.

    ECME (Liu & Rubin, 1995): EM steps for the location and scatter, the
    degrees of freedom maximising the observed likelihood in between. Where
    the rows are lighter-tailed than any t, the df ends at the top of
    ``_MVT_DF_RANGE``, nearly a normal (and the scatter nearly the
    covariance); the floor of 1.05 keeps the base's mean (``df > 1``). On
    more than ``_MVT_MAX_ROWS`` rows, evenly spaced ones. ``Z`` is
    standardised (unit variance per feature).
    """
    Z, weight = Z[weight > 0], weight[weight > 0]
    step = -(-Z.shape[0] // _MVT_MAX_ROWS)
    Z, weight = Z[::step], weight[::step] / weight[::step].sum()
    n_features = Z.shape[1]
    # Z is standardised: a ridge of 1e-4 (of unit variances) keeps the scatter positive
    # definite and the likelihood bounded where the rows do not span every direction, so
    # that ECME converges to one point (weighted rows and repeated rows agree), and a
    # whitening by the scatter (base="fitted-t") magnifies such directions 100 times at most.
    ridge = 1e-4 * np.eye(n_features)
    mu = weight @ Z
    scatter = (weight[:, None] * (Z - mu)).T @ (Z - mu) + ridge
    df, previous = 10.0, -np.inf

    def log_density(df, radius2):
        # the rows' log-densities less the scatter's log-det term, which does not depend on df
        return (
            special.gammaln((df + n_features) / 2) - special.gammaln(df / 2)
            - n_features / 2 * np.log(df) - (df + n_features) / 2 * np.log1p(radius2 / df)
        )  # fmt: skip

    def squared_radii(centred, scatter):
        # |L^-1 z|^2, scatter = L L^T; one product with L^-1 is several times
        # faster than a triangular solve for many rows
        chol = np.linalg.cholesky(scatter)
        return np.square(centred @ np.linalg.inv(chol).T).sum(axis=1), chol

    # the squared radii under the current location and scatter: here, and at
    # the end of each iteration for the next one
    radius2, chol = squared_radii(Z - mu, scatter)
    for _ in range(_MVT_MAX_ITER):
        expected = (df + n_features) / (df + radius2)  # E[w | z] of the scale mixture
        mu = (weight * expected) @ Z / (weight @ expected)
        centred = Z - mu
        scatter = (weight * expected * centred.T) @ centred + ridge
        radius2, chol = squared_radii(centred, scatter)
        result = optimize.minimize_scalar(
            lambda log_df, radius2=radius2: -(weight @ log_density(np.exp(log_df), radius2)),
            bounds=np.log(_MVT_DF_RANGE), method="bounded",
        )  # fmt: skip
        df = float(np.exp(result.x))
        current = weight @ log_density(df, radius2) - np.log(np.diag(chol)).sum()
        if current - previous < tol:
            break
        previous = current
    return mu, scatter, max(df, 1.05)


def _auto_base(Z, weight, df):
    """What ``base="auto"`` takes for the standardised rows ``Z``, given their ECME ``df``.

    Light tails (``df`` at least ``_AUTO_T_BELOW_DF``): "gaussian". Heavy
    tails: "fitted-t" where the rows look like a multivariate t, whose every
    feature is a t with the same degrees of freedom as the whole (each
    feature's own ECME fit within ``_AUTO_ELLIPTICAL_RATIO`` of ``df``);
    otherwise "elliptical-t" where every feature is heavy-tailed on its own,
    and "gaussian" where some feature is not (a t base would give that
    feature's direction tails it does not have).
    """
    if df >= _AUTO_T_BELOW_DF:
        return "gaussian"
    feature_dfs = np.array([_multivariate_t(Z[:, [feature]], weight)[2] for feature in range(Z.shape[1])])
    if np.all(np.abs(np.log(feature_dfs / df)) <= np.log(_AUTO_ELLIPTICAL_RATIO)):
        return "fitted-t"
    return "elliptical-t" if np.all(feature_dfs < _AUTO_T_BELOW_DF) else "gaussian"


def _base_name(module):
    """The ``base`` value that builds the flow's base density (``base_``, "auto" resolved)."""
    if isinstance(module.base, EllipticalT) and any(isinstance(t, Whiten) for t in module.transforms):
        return "fitted-t"
    names = {StandardNormal: "gaussian", MADEMoG: "mog", StudentT: "student-t", EllipticalT: "elliptical-t"}
    return names[type(module.base)]


@torch.no_grad()
def _choose_tail_cut(module, X, weight, context, chunk_size):
    """The cut of ``power_tails`` (or None) under which ``X`` has the highest mean log-likelihood.

    ``module`` is a fitted Gaussian-base flow in eval mode; the rows are mapped
    to its base space once, and each candidate only changes the last step.
    """
    module.tail_cut = None
    scores = torch.zeros(1 + len(_TAIL_CUTS), dtype=torch.float64)
    with reused_buffers():
        for start in range(0, X.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            u, logabsdet = module(X[rows], None if context is None else context[rows])
            log_probs = [module.base_log_prob(u) + logabsdet]
            for cut in _TAIL_CUTS:
                v, ld = power_tails(u, cut)
                log_probs.append(module.base_log_prob(v) + logabsdet + ld)
            log_probs = torch.stack(log_probs, dim=1)
            w = None if weight is None else weight[rows, None]
            scores += (log_probs if w is None else log_probs * w).sum(dim=0).cpu()
    best = int(torch.argmax(scores))  # the first of equals: no tails unless they score higher
    return None if best == 0 else _TAIL_CUTS[best - 1]
