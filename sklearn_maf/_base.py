"""What every MAF estimator shares: parameters, training, scoring and sampling.

The public estimators (one per module) add their own scikit-learn face on top:
:class:`~sklearn_maf.MAFDensity` a density estimator, and the outlier detector
a thresholded score. Parameters are declared once here; each estimator's
docstring documents them for its users.
"""

import copy
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._nn import MAF
from ._training import train_flow

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Rows per chunk when scoring, transforming or sampling: bounds the memory of the
# hidden activations (about CHUNK_ELEMENTS * 8 bytes per layer) on any number of rows.
_CHUNK_ELEMENTS = 1 << 22


class _BaseMAF(BaseEstimator):
    """Parameters, training, scoring and sampling of a Masked Autoregressive Flow."""

    _parameter_constraints: dict = {
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "hidden_units": [Interval(Integral, 1, None, closed="left")],
        "n_hidden_layers": [Interval(Integral, 0, None, closed="left")],
        "activation": [StrOptions({"relu", "tanh"})],
        "batch_norm": ["boolean"],
        "order": [StrOptions({"reverse", "random"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "learning_rate_init": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "precision": [StrOptions(set(_DTYPES))],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        *,
        n_layers=5,
        hidden_units=100,
        n_hidden_layers=2,
        activation="relu",
        batch_norm=True,
        order="reverse",
        alpha=1e-6,
        batch_size=256,
        learning_rate_init=1e-3,
        max_iter=200,
        tol=1e-4,
        n_iter_no_change=10,
        early_stopping=True,
        validation_fraction=0.1,
        precision="float32",
        device="cpu",
        random_state=None,
        verbose=False,
        warm_start=False,
    ):
        self.n_layers = n_layers
        self.hidden_units = hidden_units
        self.n_hidden_layers = n_hidden_layers
        self.activation = activation
        self.batch_norm = batch_norm
        self.order = order
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.precision = precision
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    def _fit(self, X, sample_weight):
        """Validate ``X``, train the flow and set the fitted attributes.

        Returns the indices of the training rows and of the validation rows
        (None without early stopping), for estimators that calibrate on them.
        """
        continuing = self.warm_start and hasattr(self, "module_")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2, reset=not continuing)
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        device = self._torch_device()
        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        train, validation = self._split(X.shape[0], rng)
        _check_weight_total(sample_weight, train, "training")
        if validation is not None:
            _check_weight_total(sample_weight, validation, "validation")
        X = self._flow_features(X, sample_weight, train, rng, continuing)

        if continuing:
            module = copy.deepcopy(self.module_)
        else:
            loc, scale = _weighted_loc_scale(X[train], sample_weight[train])
            module = self._build_module(loc, scale, generator)
        dtype = _DTYPES[self.precision]
        module = module.to(device=device, dtype=dtype)

        weighted = not np.all(sample_weight == 1)
        to_tensor = self._tensor_factory(dtype, device)
        weight = to_tensor(sample_weight) if weighted else None
        X_train, w_train = to_tensor(X[train]), _take(weight, train)
        validation_data = None
        if validation is not None:
            validation_data = (to_tensor(X[validation]), _take(weight, validation), None)

        history = train_flow(
            module,
            X_train,
            w_train,
            validation=validation_data,
            batch_size=min(self.batch_size, X_train.shape[0]),
            learning_rate=self.learning_rate_init,
            alpha=self.alpha,
            max_iter=self.max_iter,
            tol=self.tol,
            n_iter_no_change=self.n_iter_no_change,
            generator=generator,
            verbose=self.verbose,
        )

        module = module.to(torch.float64)
        to_double = self._tensor_factory(torch.float64, device)
        module.set_batch_norm_statistics(
            to_double(X[train]),
            weight=to_double(sample_weight[train]) if weighted else None,
            chunk_size=self._chunk_size(),
        )
        self.module_ = module.eval()
        self.loss_curve_ = (self.loss_curve_ if continuing else []) + history.loss_curve
        if validation is None:
            self.validation_scores_ = None
            self.best_validation_score_ = None
        else:
            previous = self.validation_scores_ if continuing and self.validation_scores_ else []
            self.validation_scores_ = previous + history.validation_scores
            self.best_validation_score_ = history.best_validation_score
        self.best_loss_ = min(self.loss_curve_) if self.loss_curve_ else float("inf")
        self.n_iter_ = len(self.loss_curve_)
        return train, validation

    def _flow_features(self, X, sample_weight, train, rng, continuing):
        """The matrix the flow is trained on: ``X`` itself here.

        The hook for estimators that preprocess their input (the outlier
        detector drops constant features and transforms the others); ``train``
        are the training rows and ``rng`` is the fit's random state.
        """
        return X

    def _log_density(self, X):
        """Validated ``X`` -> float64 log-densities; underflow gives -inf, never NaN."""
        X = self._validate_fitted_input(X)
        log_density = self._map_rows(lambda x: self.module_.log_prob(x)[:, None], X, 1)[:, 0]
        return np.where(np.isnan(log_density), -np.inf, log_density)

    def sample(self, n_samples=1, random_state=None):
        """Draw rows from the fitted density.

        Parameters
        ----------
        n_samples : int, default=1
            Number of rows to draw.
        random_state : int, RandomState instance or None, default=None
            Seeds the draw; the same value gives the same rows. None draws fresh
            rows on every call (from numpy's global random state, as
            :meth:`sklearn.neighbors.KernelDensity.sample` does).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), dtype float64
            The drawn rows, in the units of the training data.
        """
        check_is_fitted(self)
        if not isinstance(n_samples, Integral) or isinstance(n_samples, bool):
            raise TypeError(f"n_samples must be a positive int, got {n_samples!r}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples}")
        rng = check_random_state(random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        chunk = self._chunk_size()
        out = np.empty((n_samples, self.module_.n_features))
        with torch.no_grad():
            for start in range(0, n_samples, chunk):
                rows = min(chunk, n_samples - start)
                x = self.module_.sample(rows, generator=generator)
                out[start : start + rows] = x.cpu().numpy()
        return out

    # ----------------------------------------------------------------- helpers

    def _build_module(self, loc, scale, generator):
        return MAF(
            torch.as_tensor(loc),
            torch.as_tensor(scale),
            n_layers=self.n_layers,
            hidden_units=self.hidden_units,
            n_hidden_layers=self.n_hidden_layers,
            activation=self.activation,
            batch_norm=self.batch_norm,
            order=self.order,
            generator=generator,
            dtype=torch.float64,
        )

    def _split(self, n_samples, rng):
        """Indices of the training rows and of the validation rows (or None)."""
        if not self.early_stopping:
            return np.arange(n_samples), None
        n_validation = int(np.ceil(self.validation_fraction * n_samples))
        if n_samples - n_validation < 2:
            raise ValueError(
                f"n_samples={n_samples} is too few for early stopping with "
                f"validation_fraction={self.validation_fraction}: at least 2 training "
                "rows must remain. Pass more rows or set early_stopping=False."
            )
        permutation = rng.permutation(n_samples)
        return np.sort(permutation[n_validation:]), np.sort(permutation[:n_validation])

    def _torch_device(self):
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} was requested but CUDA is not available.")
        return device

    @staticmethod
    def _tensor_factory(dtype, device):
        return lambda array: torch.tensor(array, dtype=dtype, device=device)

    def _chunk_size(self):
        width = max(self.hidden_units, getattr(self, "n_features_in_", 1), 1)
        return max(1024, _CHUNK_ELEMENTS // width)

    def _validate_fitted_input(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    def _map_rows(self, function, X, n_outputs):
        """Apply a float64 torch ``function`` to ``X`` in chunks of rows; numpy out."""
        out = np.empty((X.shape[0], n_outputs))
        device = self.module_.transforms[0].loc.device
        chunk = self._chunk_size()
        with torch.no_grad():
            for start in range(0, X.shape[0], chunk):
                x = torch.tensor(X[start : start + chunk], dtype=torch.float64, device=device)
                out[start : start + chunk] = function(x).cpu().numpy()
        return out



def _weighted_loc_scale(X, weight):
    """Weighted per-feature mean and standard deviation; constant features raise."""
    loc, scale = _weighted_moments(X, weight)
    constant = _constant_features(loc, scale)
    if constant.size:
        raise ValueError(
            f"Feature(s) {constant.tolist()} are constant on the training rows: a "
            "constant feature has no density. Remove them first (e.g. with "
            "sklearn.feature_selection.VarianceThreshold)."
        )
    return loc, scale


def _weighted_moments(X, weight):
    """Weighted per-feature mean and standard deviation."""
    loc = np.average(X, axis=0, weights=weight)
    return loc, np.sqrt(np.average((X - loc) ** 2, axis=0, weights=weight))


def _constant_features(loc, scale):
    """Indices of the features whose spread is at the round-off level of their mean."""
    return np.flatnonzero(scale <= 4 * np.finfo(np.float64).eps * np.abs(loc))


def _check_weight_total(sample_weight, rows, name):
    if not sample_weight[rows].sum() > 0:
        raise ValueError(
            f"The sample weights of the {name} rows sum to zero; at least one "
            "row needs a positive weight."
        )


def _take(tensor, rows):
    return None if tensor is None else tensor[torch.as_tensor(rows, device=tensor.device)]
