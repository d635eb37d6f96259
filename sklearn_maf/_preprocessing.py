"""Input preparation: bounds, discrete features, weighted moments and standardisation.

Everything here works on float64 numpy arrays before any tensor exists; the
estimators call it from :mod:`sklearn_maf._base` at fit and score time.
"""

import numpy as np
import torch

# Quasi-random points per row that integrate the density over a dequantisation cell.
_DEQUANTIZATION_POINTS = 32


def _weighted_loc_scale(X, weight, X_all=None, weight_all=None):
    """Weighted per-feature mean and standard deviation; constant features raise.

    ``X_all`` (all the rows, of weights ``weight_all``, where ``X`` are the
    training rows of a split): a feature that is constant on ``X`` but not on
    ``X_all`` (its few other values all fell among the validation rows) takes
    its mean and spread from ``X_all``, so that the split alone cannot make a
    fit fail; only features constant on every row raise.
    """
    loc, scale = _weighted_moments(X, weight)
    constant = _constant_features(loc, scale)
    if constant.size and X_all is not None:
        loc_all, scale_all = _weighted_moments(X_all[:, constant], weight_all)
        varies = np.isin(constant, constant[_constant_features(loc_all, scale_all)], invert=True)
        loc[constant[varies]], scale[constant[varies]] = loc_all[varies], scale_all[varies]
        constant = constant[~varies]
    if constant.size:
        raise ValueError(
            f"Feature(s) {constant.tolist()} are constant on the training rows: a "
            "constant feature has no density. Remove them first (e.g. with "
            "sklearn.feature_selection.VarianceThreshold)."
        )
    return loc, scale


def _weighted_moments(X, weight):
    """Weighted per-feature mean and standard deviation, at any finite magnitude.

    Each feature is divided first by the power of two at or below its largest
    magnitude (exactly: the result is that of the plain formula wherever that
    does not overflow), since squares of values beyond 1e154 would.
    """
    size = np.ldexp(1.0, np.frexp(np.max(np.abs(X), axis=0))[1] - 1)
    Z = X / size
    loc = np.average(Z, axis=0, weights=weight)
    return loc * size, np.sqrt(np.average((Z - loc) ** 2, axis=0, weights=weight)) * size


def _constant_features(loc, scale):
    """Indices of the features whose spread is at the round-off level of their mean."""
    return np.flatnonzero(scale <= 4 * np.finfo(np.float64).eps * np.abs(loc))


def _check_weight_total(sample_weight, rows, name):
    if not sample_weight[rows].sum() > 0:
        raise ValueError(
            f"The sample weights of the {name} rows sum to zero; at least one "
            "row needs a positive weight."
        )


def _parse_bounds(bounds, n_features):
    """``bounds`` as two float64 arrays (low, high), or None when unbounded."""
    if bounds is None:
        return None
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.shape != (n_features, 2) or np.isnan(bounds).any():
        raise ValueError(
            "bounds must have shape (n_features, 2) = "
            f"({n_features}, 2) with no NaN, got shape {bounds.shape}."
        )
    low, high = bounds.T
    if np.any(low >= high):
        raise ValueError(
            f"bounds must have low < high for every feature; features "
            f"{np.flatnonzero(low >= high).tolist()} do not."
        )
    return low, high


def _check_within_bounds(bounds, X):
    """Raise unless every row of ``X`` lies strictly inside ``bounds`` (as given to the estimator)."""
    bounds = _parse_bounds(bounds, X.shape[1])
    if bounds is None:
        return
    outside = (X <= bounds[0]) | (X >= bounds[1])
    if outside.any():
        features = np.flatnonzero(outside.any(axis=0)).tolist()
        raise ValueError(
            f"{int(outside.any(axis=1).sum())} training rows lie on or outside the "
            f"open interval given by bounds, in features {features}."
        )


def _discrete_mask(discrete_features, X):
    """``discrete_features`` (None, "auto", indices or a mask) -> boolean mask."""
    n_features = X.shape[1]
    if discrete_features is None:
        return np.zeros(n_features, dtype=bool)
    if isinstance(discrete_features, str):  # "auto": columns that hold only integers
        return np.all(X == np.floor(X), axis=0)
    given = np.asarray(discrete_features)
    if given.dtype == bool:
        if given.shape != (n_features,):
            raise ValueError(
                f"A boolean discrete_features must have shape ({n_features},), got {given.shape}."
            )
        return given.copy()
    if given.ndim != 1 or not np.issubdtype(given.dtype, np.integer):
        raise ValueError("discrete_features must be 'auto', a boolean mask or integer indices.")
    if np.any((given < 0) | (given >= n_features)):
        raise ValueError(
            f"discrete_features indices must be in [0, {n_features}), got {given.tolist()}."
        )
    mask = np.zeros(n_features, dtype=bool)
    mask[given] = True
    return mask


def _sobol_points(n_points, n_dims):
    """Fixed scrambled-Sobol points in [0, 1)^n_dims, float64 (no global RNG)."""
    engine = torch.quasirandom.SobolEngine(n_dims, scramble=True, seed=0)
    return engine.draw(n_points, dtype=torch.float64).numpy()
