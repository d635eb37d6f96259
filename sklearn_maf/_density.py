"""MAFDensity: a Masked Autoregressive Flow behind the scikit-learn density API."""

import copy
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils._tags import TransformerTags
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._nn import MAF
from ._training import train_flow

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Rows per chunk when scoring, transforming or sampling: bounds the memory of the
# hidden activations (about CHUNK_ELEMENTS * 8 bytes per layer) on any number of rows.
_CHUNK_ELEMENTS = 1 << 22


class MAFDensity(DensityMixin, BaseEstimator):
    """Density estimation with a Masked Autoregressive Flow.

    A MAF (Papamakarios, Pavlakou & Murray, 2017) models ``log p(x)`` as a
    stack of invertible autoregressive layers, each a MADE network that
    shifts and scales every feature given the features before it, over a
    standard-normal base density. It is trained by maximum likelihood, scores
    new rows in one parallel pass, and draws new rows.

    The first, fixed layer standardises each feature with its (weighted) mean
    and standard deviation on the training data, with its log-determinant, so
    raw features on any scale need no preprocessing and :meth:`score_samples`
    is a log-density in the units of ``X``.

    Parameters
    ----------
    n_layers : int, default=5
        Number of MAF layers (MADEs).
    hidden_units : int, default=100
        Width of each hidden layer of each MADE. Every input reaches every later
        output when ``hidden_units >= n_features - 1``.
    n_hidden_layers : int, default=2
        Number of hidden layers in each MADE.
    activation : {"relu", "tanh"}, default="relu"
        Non-linearity of the MADE hidden layers.
    batch_norm : bool, default=True
        Batch normalisation (with its log-determinant) after each MAF layer, as
        in the paper. Training uses batch statistics; the fitted model uses the
        exact statistics of the training split (never validation rows).
    order : {"reverse", "random"}, default="reverse"
        Variable order of the layers: alternating natural and reversed, as in
        the paper, or a random permutation per layer drawn from
        ``random_state``.
    alpha : float, default=1e-6
        L2 penalty on the weight matrices.
    batch_size : int, default=256
        Rows per mini-batch (capped at the number of training rows).
    learning_rate_init : float, default=1e-3
        Adam's learning rate.
    max_iter : int, default=200
        Maximum number of epochs.
    tol : float, default=1e-4
        Minimum improvement, in nats per row, of the validation log-likelihood
        (or, without early stopping, of the training loss) that resets the
        patience counter.
    n_iter_no_change : int, default=10
        Patience: epochs without an improvement of at least ``tol`` before
        training stops.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the rows, stop when their mean
        log-likelihood stops improving, and restore the best weights.
    validation_fraction : float, default=0.1
        Fraction of the rows held out for early stopping.
    precision : {"float32", "float64"}, default="float32"
        Floating-point precision of training. Scoring, transforming and sampling
        always run in float64, so results do not depend on how rows are batched.
    device : str, default="cpu"
        Torch device for training and inference, e.g. "cpu" or "cuda".
    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation, random orders, the validation split and
        batch shuffling, through a local ``torch.Generator``; torch's global
        random state is never used.
    verbose : bool, default=False
        Print the loss (and validation log-likelihood) after each epoch.
    warm_start : bool, default=False
        Continue training the fitted flow on the next call to :meth:`fit`; the
        standardisation stays the one fitted first.

    Attributes
    ----------
    module_ : sklearn_maf._nn.MAF
        The fitted flow, in float64 and eval mode.
    n_features_in_ : int
        Number of features seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`, when ``X`` has string
        feature names.
    loss_curve_ : list of float
        Mean training negative log-likelihood per epoch (nats per row), across
        warm starts.
    validation_scores_ : list of float or None
        Mean validation log-likelihood per epoch; None without early stopping.
    best_validation_score_ : float or None
        Best of ``validation_scores_``, whose weights were restored.
    best_loss_ : float
        Lowest training loss.
    n_iter_ : int
        Number of epochs run, across warm starts (``len(loss_curve_)``).

    See Also
    --------
    sklearn.neighbors.KernelDensity : Kernel density estimation.
    sklearn.mixture.GaussianMixture : Gaussian mixture density.

    Notes
    -----
    With one feature there is nothing to condition on, and each layer is an
    affine map with learned constants: a 1-D MAF is a Gaussian.

    A constant feature has no density; :meth:`fit` raises a ``ValueError`` that
    names it (remove it first, e.g. with
    :class:`~sklearn.feature_selection.VarianceThreshold`).

    References
    ----------
    G. Papamakarios, T. Pavlakou and I. Murray, "Masked Autoregressive Flow for
    Density Estimation", NeurIPS 2017, arXiv:1705.07057.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_maf import MAFDensity
    >>> X = np.random.RandomState(0).normal(size=(500, 2))
    >>> maf = MAFDensity(n_layers=2, hidden_units=16, max_iter=5, random_state=0)
    >>> maf = maf.fit(X)
    >>> maf.score_samples(X[:3]).shape
    (3,)
    >>> maf.sample(4, random_state=0).shape
    (4, 2)
    """

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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags = TransformerTags(preserves_dtype=["float64"])
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Fit the flow to ``X`` by maximum likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : None
            Ignored; present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights: each row's log-likelihood counts
            ``sample_weight`` times, in training, in the standardisation, in the
            batch-norm statistics and in the validation score.

        Returns
        -------
        self : MAFDensity
            The fitted estimator.
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
        return self

    def score_samples(self, X):
        """Log-density of each row of ``X``, in the units of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.

        Returns
        -------
        log_density : ndarray of shape (n_samples,), dtype float64
            ``log p(x)``; higher means more typical. Rows so extreme that the
            density underflows get ``-inf``, never NaN.
        """
        X = self._validate_fitted_input(X)
        log_density = self._map_rows(lambda x: self.module_.log_prob(x)[:, None], X, 1)[:, 0]
        return np.where(np.isnan(log_density), -np.inf, log_density)

    def score(self, X, y=None):
        """Total log-likelihood of ``X`` under the model.

        The sum, not the mean, as :meth:`sklearn.neighbors.KernelDensity.score`,
        so that model selection maximises held-out likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        log_likelihood : float
            ``sum(score_samples(X))``.
        """
        return float(np.sum(self.score_samples(X)))

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
        out = np.empty((n_samples, self.n_features_in_))
        with torch.no_grad():
            for start in range(0, n_samples, chunk):
                rows = min(chunk, n_samples - start)
                x = self.module_.sample(rows, generator=generator)
                out[start : start + rows] = x.cpu().numpy()
        return out

    def transform(self, X):
        """Map rows to the latent space, where the model is standard normal.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows in data space.

        Returns
        -------
        U : ndarray of shape (n_samples, n_features), dtype float64
            Latent coordinates; for data drawn from the model they are
            independent standard normals.
        """
        X = self._validate_fitted_input(X)
        return self._map_rows(lambda x: self.module_(x)[0], X, self.n_features_in_)

    def fit_transform(self, X, y=None, sample_weight=None):
        """Fit the flow to ``X``, then map ``X`` to the latent space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : None
            Ignored; present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            As in :meth:`fit`.

        Returns
        -------
        U : ndarray of shape (n_samples, n_features), dtype float64
            ``fit(X).transform(X)``.
        """
        return self.fit(X, y, sample_weight=sample_weight).transform(X)

    def inverse_transform(self, U):
        """Map latent coordinates back to data space.

        Parameters
        ----------
        U : array-like of shape (n_samples, n_features)
            Latent coordinates.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), dtype float64
            Rows in data space; ``inverse_transform(transform(X))`` returns ``X``.
        """
        U = self._validate_fitted_input(U)
        return self._map_rows(lambda u: self.module_.inverse(u)[0], U, self.n_features_in_)

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
    loc = np.average(X, axis=0, weights=weight)
    scale = np.sqrt(np.average((X - loc) ** 2, axis=0, weights=weight))
    constant = np.flatnonzero(scale <= 4 * np.finfo(np.float64).eps * np.abs(loc))
    if constant.size:
        raise ValueError(
            f"Feature(s) {constant.tolist()} are constant on the training rows: a "
            "constant feature has no density. Remove them first (e.g. with "
            "sklearn.feature_selection.VarianceThreshold)."
        )
    return loc, scale


def _check_weight_total(sample_weight, rows, name):
    if not sample_weight[rows].sum() > 0:
        raise ValueError(
            f"The sample weights of the {name} rows sum to zero; at least one "
            "row needs a positive weight."
        )


def _take(tensor, rows):
    return None if tensor is None else tensor[torch.as_tensor(rows, device=tensor.device)]
