"""What every MAF estimator shares: parameters, training, scoring and sampling.

The public estimators (one per module) add their own scikit-learn face on top:
:class:`~sklearn_maf.MAFDensity` a density estimator, and the outlier detector
a thresholded score. Parameters are declared once here; each estimator's
docstring documents them for its users.
"""

import copy
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from scipy import optimize, special
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._nn import MAF, Bounded, EllipticalT, MADEMoG, StandardNormal, StudentT, Whiten, reused_buffers
from ._nn.flow import power_tails
from ._streaming import StreamingState, chunk_key
from ._threads import limit_torch_threads, training_threads
from ._training import _cyclic_gc_paused, train_flow

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Rows per chunk when scoring, transforming or sampling: bounds the memory of the
# hidden activations (about CHUNK_ELEMENTS * 8 bytes per layer) on any number of
# rows. Small enough that a chunk's activations (2 MiB in float64) stay in the
# CPU caches: measured on 100 hidden units, scoring in chunks of 2,500 rows is
# about twice as fast as in chunks of 40,000, while the fixed cost per chunk
# (a few hundred small tensor operations) stays below 10% of the arithmetic.
# Measured again with feature-major products and reused buffers (200,000 x 8
# rows, 5 layers): 2**18 elements per chunk scored fastest of 2**17 to 2**20,
# 1.2x faster than 2**20, with a fixed cost of 0.8 ms in a 10 ms chunk.
_CHUNK_ELEMENTS = 1 << 18
# On a GPU a chunk is one batch of kernel launches, whose fixed cost dominates
# small chunks: 2**24 elements (128 MiB per float64 activation) keep it busy;
# measured on an H200, scoring 1,000,000 rows in chunks of 2**18 elements was
# 40 times slower than the peers' single pass.
_DEVICE_CHUNK_ELEMENTS = 1 << 24

# Quasi-random points per row that integrate the density over a dequantisation cell.
_DEQUANTIZATION_POINTS = 32
# candidates of tail_cut="auto", besides None (the plain normal)
_TAIL_CUTS = (2.0, 2.5, 3.0, 4.0)


class _BaseMAF(BaseEstimator):
    """Parameters, training, scoring and sampling of a Masked Autoregressive Flow."""

    _parameter_constraints: dict = {
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "hidden_units": [Interval(Integral, 1, None, closed="left")],
        "n_hidden_layers": [Interval(Integral, 0, None, closed="left")],
        "activation": [StrOptions({"relu", "tanh"})],
        "batch_norm": ["boolean"],
        "order": [StrOptions({"reverse", "random"})],
        "base": [StrOptions({"auto", "gaussian", "mog", "student-t", "elliptical-t", "fitted-t"})],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "tail_cut": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither"), None],
        "bounds": ["array-like", None],
        "discrete_features": [StrOptions({"auto"}), "array-like", None],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "learning_rate": [StrOptions({"constant", "adaptive"})],
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
        base="auto",
        n_components=10,
        tail_cut="auto",
        bounds=None,
        discrete_features=None,
        alpha=1e-6,
        batch_size=256,
        learning_rate="adaptive",
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
        self.base = base
        self.n_components = n_components
        self.tail_cut = tail_cut
        self.bounds = bounds
        self.discrete_features = discrete_features
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
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

    def __getstate__(self):
        """Pickle the fitted flow on the CPU, so any machine can load it."""
        # A copy: BaseEstimator.__getstate__ may return the instance's own
        # __dict__, and pickling must not change the model being pickled.
        state = dict(super().__getstate__())
        # partial_fit's training state travels (on the CPU; see StreamingState),
        # so that a stream continues exactly where it stopped, also where Dask
        # moves the estimator between workers; fit leaves none behind.
        module = state.get("module_")
        if module is not None and _module_device(module).type != "cpu":
            state["module_"] = copy.deepcopy(module).cpu()
        return state

    def __setstate__(self, state):
        """Move the flow to ``device``; without CUDA, stay on the CPU with a warning."""
        super().__setstate__(state)
        module = self.__dict__.get("module_")
        if module is None:
            return
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"This {type(self).__name__} was fitted with device={self.device!r}, but "
                "CUDA is not available here: the model was loaded onto the CPU and "
                "device was set to 'cpu'.",
                UserWarning,
            )
            self.device = "cpu"
        self.module_ = module.to(torch.device(self.device))
        stream = self.__dict__.get("_partial_state")
        if stream is not None and _module_device(self.module_).type != "cpu":
            stream.to(_module_device(self.module_))

    def _fit(self, X, sample_weight):
        """Validate ``X``, train the flow and set the fitted attributes.

        Returns the indices of the training rows and of the validation rows
        (None without early stopping), for estimators that calibrate on them.
        """
        continuing = self.warm_start and hasattr(self, "module_")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2, reset=not continuing)
        return self._train(X, sample_weight, continuing=continuing)

    @limit_torch_threads()
    def _train(self, X, sample_weight, context=None, *, continuing=False):
        """Train the flow on validated rows ``X`` (given ``context``); set fitted attributes.

        ``X`` holds the modelled variables and ``context``, when given, the
        conditioning features, already validated and scaled by the caller.
        Returns the indices of the training rows and of the validation rows
        (None without early stopping).
        """
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        n_context = 0 if context is None else context.shape[1]
        device = self._torch_device()
        rng = check_random_state(self.random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        train, validation = self._split(X.shape[0], rng)
        _check_weight_total(sample_weight, train, "training")
        if validation is not None:
            _check_weight_total(sample_weight, validation, "validation")
        X = self._flow_features(X, sample_weight, train, rng, continuing)
        discrete = self._set_discrete_features(X, reset=not continuing)
        # One fixed dequantisation of the rows for the standardisation, the
        # validation score and the batch-norm statistics; training batches get
        # fresh noise every epoch.
        X_noisy = X + rng.uniform(size=X.shape) * discrete

        if continuing:
            module = copy.deepcopy(self.module_)
        else:
            module = self._build_module(X_noisy[train], sample_weight[train], generator, n_context)
        dtype = _DTYPES[self.precision]
        module = module.to(device=device, dtype=dtype)

        weighted = not np.all(sample_weight == 1)
        to_tensor = self._tensor_factory(dtype, device)
        weight = to_tensor(sample_weight) if weighted else None
        X_train, w_train = to_tensor(X[train]), _take(weight, train)
        c_train = None if context is None else to_tensor(context[train])
        validation_data = None
        if validation is not None:
            c_validation = None if context is None else to_tensor(context[validation])
            validation_data = (
                to_tensor(X_noisy[validation]), _take(weight, validation), c_validation
            )

        batch_size = min(self.batch_size, X_train.shape[0])
        with limit_torch_threads(self._training_threads(batch_size, X.shape[1] + n_context)):
            history = train_flow(
                module,
                X_train,
                w_train,
                c_train,
                validation=validation_data,
                batch_size=batch_size,
                learning_rate=self.learning_rate_init,
                alpha=self.alpha,
                max_iter=self.max_iter,
                tol=self.tol,
                n_iter_no_change=self.n_iter_no_change,
                generator=generator,
                verbose=self.verbose,
                dequantize=to_tensor(discrete) if discrete.any() else None,
                adaptive=self.learning_rate == "adaptive",
                average=True,
            )

        module = module.to(torch.float64)
        to_double = self._tensor_factory(torch.float64, device)
        module.set_batch_norm_statistics(
            to_double(X_noisy[train]),
            None if context is None else to_double(context[train]),
            weight=to_double(sample_weight[train]) if weighted else None,
            chunk_size=self._chunk_size(),
        )
        module.eval()
        if self.tail_cut == "auto" and isinstance(module.base, StandardNormal):
            # on the validation rows, or on the training rows without early stopping
            rows = train if validation is None else validation
            module.tail_cut = _choose_tail_cut(
                module,
                to_double(X_noisy[rows]),
                to_double(sample_weight[rows]) if weighted else None,
                None if context is None else to_double(context[rows]),
                self._chunk_size(),
            )
        self.module_ = module
        self.tail_cut_ = module.tail_cut
        self.base_ = _base_name(module)
        self.__dict__.pop("_partial_state", None)
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

    @limit_torch_threads()
    def _partial_fit(self, X, sample_weight):
        """One epoch over the chunk ``X``, continuing the training state of earlier calls.

        The state (:class:`~sklearn_maf._streaming.StreamingState`) holds what
        ``fit`` keeps across epochs: Adam, the gradient limit, the averaged
        weights, the learning-rate schedule (run at the end of each pass over
        the stream) and a uniform sample of the rows streamed, on which the
        fitted flow gets its batch-norm statistics and its tails.
        """
        first = not hasattr(self, "module_")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2, reset=first)
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        discrete = self._set_discrete_features(X, reset=first)
        _check_weight_total(sample_weight, slice(None), "partial_fit")
        device, dtype = self._torch_device(), _DTYPES[self.precision]
        stream = getattr(self, "_partial_state", None)
        if stream is None:
            rng = check_random_state(self.random_state)
            generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
            rng = np.random.RandomState(rng.randint(np.iinfo(np.int32).max))
            if first:
                noisy = X + rng.uniform(size=X.shape) * discrete
                module = self._build_module(noisy, sample_weight, generator)
            else:
                module = copy.deepcopy(self.module_)
            module = module.to(device=device, dtype=dtype).train()
            stream = StreamingState(
                module, self.learning_rate_init, self.alpha, generator, rng, X.shape[1]
            )

        to_tensor = self._tensor_factory(dtype, device)
        weighted = not np.all(sample_weight == 1)
        batch_size = min(self.batch_size, X.shape[0])
        with limit_torch_threads(self._training_threads(batch_size, X.shape[1])):
            loss = stream.train_chunk(
                to_tensor(X),
                to_tensor(sample_weight) if weighted else None,
                chunk_key(X, sample_weight),
                batch_size=batch_size,
                dequantize=to_tensor(discrete) if discrete.any() else None,
                adaptive=self.learning_rate == "adaptive",
                tol=self.tol,
            )
        if not np.isfinite(loss):
            if first:
                raise ValueError(
                    f"The training loss of partial_fit's first chunk is not finite ({loss}); "
                    "lower learning_rate_init, or check the chunk's values."
                )
            # the fitted flow stays that of the calls before; the next call
            # starts a fresh optimizer from it
            self.__dict__.pop("_partial_state", None)
            warnings.warn(
                "The training loss became non-finite in this partial_fit call; the "
                "model fitted by the calls before it was kept and the optimizer "
                "restarts at the next call. Lower learning_rate_init, or raise alpha.",
                ConvergenceWarning,
            )
            return self
        if stream.n_passes == 0:  # later passes repeat the rows the reservoir has sampled
            stream.reservoir.add(X + stream.random_state.uniform(size=X.shape) * discrete, sample_weight)

        # module_ is refreshed in place from the second call on (StreamingState.fitted_module)
        module = stream.fitted_module()
        to_double = self._tensor_factory(torch.float64, device)
        rows, weight = to_double(stream.reservoir.X), stream.reservoir.weight
        weight = None if np.all(weight == 1) else to_double(weight)
        module.set_batch_norm_statistics(rows, weight=weight, chunk_size=self._chunk_size())
        module.eval()
        if self.tail_cut == "auto" and isinstance(module.base, StandardNormal):
            module.tail_cut = _choose_tail_cut(module, rows, weight, None, self._chunk_size())
        self._partial_state = stream
        self.module_ = module
        self.tail_cut_ = module.tail_cut
        self.base_ = _base_name(module)
        self.loss_curve_ = (getattr(self, "loss_curve_", None) or []) + [loss]
        self.validation_scores_ = None
        self.best_validation_score_ = None
        self.best_loss_ = min(self.loss_curve_)
        self.n_iter_ = len(self.loss_curve_)
        return self

    def _training_threads(self, batch_size, n_inputs):
        """The cap on torch's threads while training on the CPU (None: no cap).

        At the default sizes one thread is faster than several: see
        :data:`sklearn_maf._threads.MIN_MULTIPLY_ADDS_PER_THREAD`.
        """
        if self._torch_device().type != "cpu":
            return None
        return training_threads(batch_size, self.hidden_units, n_inputs)

    def _log_density(self, X):
        """Validated ``X`` -> float64 log-densities; underflow gives -inf, never NaN."""
        X = self._validate_fitted_input(X)
        return self._log_mass(lambda x: self.module_.log_prob(x), X)

    def _log_mass(self, log_prob, X, *context):
        """Log-density of rows ``X`` (given ``context``), integrating out dequantisation.

        On integer-valued columns the model's density is over ``k + u`` with
        ``u`` in ``[0, 1)``; the log-probability of ``k`` is the log of the mean
        density over that unit cell, estimated with the same fixed quasi-random
        points for every row, so results do not depend on batching.
        """
        discrete = self.discrete_features_
        if not discrete.any():
            values = self._map_rows(lambda *t: log_prob(*t)[:, None], 1, X, *context)[:, 0]
            values[np.isnan(values)] = -np.inf  # in place: no second copy of the result
            return values
        points = _sobol_points(_DEQUANTIZATION_POINTS, int(discrete.sum()))
        offsets = np.zeros((_DEQUANTIZATION_POINTS, X.shape[1]))
        offsets[:, discrete] = points

        def integrated(x, *c):
            n = x.shape[0]
            shifted = (x[:, None, :] + torch.as_tensor(offsets, device=x.device)).reshape(-1, x.shape[1])
            repeated = [t.repeat_interleave(_DEQUANTIZATION_POINTS, dim=0) for t in c]
            values = log_prob(shifted, *repeated).reshape(n, _DEQUANTIZATION_POINTS)
            values = torch.nan_to_num(values, nan=-torch.inf)
            return (torch.logsumexp(values, dim=1) - np.log(_DEQUANTIZATION_POINTS))[:, None]

        rows = max(1, self._chunk_size() // _DEQUANTIZATION_POINTS)
        return self._map_rows(integrated, 1, X, *context, chunk=rows)[:, 0]

    def _set_discrete_features(self, X, reset):
        """Set ``discrete_features_`` at a first fit; check integer values; return a 0/1 mask."""
        if reset:
            self.discrete_features_ = _discrete_mask(self.discrete_features, X)
        discrete = self.discrete_features_
        if discrete.shape[0] != X.shape[1]:
            raise ValueError(
                f"discrete_features_ covers {discrete.shape[0]} features, X has {X.shape[1]}."
            )
        not_integer = discrete & ~np.all(X == np.floor(X), axis=0)
        if not_integer.any():
            raise ValueError(
                f"Features {np.flatnonzero(not_integer).tolist()} are declared discrete "
                "but hold non-integer values."
            )
        self._check_within_bounds(X)
        if discrete.any():  # the dequantised cell [k, k + 1) must lie inside the bounds too
            self._check_within_bounds(X + 0.999999 * discrete)
        return discrete.astype(np.float64)

    @limit_torch_threads()
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
        with torch.inference_mode(), _cyclic_gc_paused(), reused_buffers():
            for start in range(0, n_samples, chunk):
                rows = min(chunk, n_samples - start)
                x = self.module_.sample(rows, generator=generator)
                out[start : start + rows] = x.cpu().numpy()
        return self._floor_discrete(out)

    def _floor_discrete(self, X):
        """Map dequantised values back to integers on the discrete columns."""
        X[:, self.discrete_features_] = np.floor(X[:, self.discrete_features_])
        return X

    # ----------------------------------------------------------------- helpers

    def _build_module(self, X, sample_weight, generator, n_context=0):
        """A new flow whose fixed first layers are fitted to the training rows ``X``."""
        bounds = self._bounds(X.shape[1])
        Y = X
        if bounds is not None:
            Y = Bounded(*map(torch.as_tensor, bounds))(torch.as_tensor(X))[0].numpy()
        loc, scale = _weighted_loc_scale(Y, sample_weight)
        base, df, whiten = self.base, None, None
        if base in ("auto", "elliptical-t", "fitted-t"):
            Z = (Y - loc) / scale
            t_loc, scatter, df = _multivariate_t(Z, sample_weight)
            if base == "auto":
                base = _auto_base(Z, sample_weight, df)
            if base == "fitted-t":
                whiten = (torch.as_tensor(t_loc), torch.as_tensor(np.linalg.cholesky(scatter)))
        module = MAF(
            torch.as_tensor(loc),
            torch.as_tensor(scale),
            n_layers=self.n_layers,
            hidden_units=self.hidden_units,
            n_hidden_layers=self.n_hidden_layers,
            activation=self.activation,
            # batch statistics of heavy-tailed rows swing from batch to batch
            # (RESULTS.md, "The fitted t base"): none with the fitted t
            batch_norm=self.batch_norm and base != "fitted-t",
            order=self.order,
            n_context=n_context,
            base="elliptical-t" if base == "fitted-t" else base,
            n_components=self.n_components,
            tail_cut=None if self.tail_cut == "auto" else self.tail_cut,
            bounds=bounds,
            whiten=whiten,
            generator=generator,
            dtype=torch.float64,
        )
        if base in ("elliptical-t", "fitted-t"):
            module.base.set_df(df)
        return module

    def _bounds(self, n_features):
        """``bounds`` as two float64 arrays (low, high), or None when unbounded."""
        if self.bounds is None:
            return None
        bounds = np.asarray(self.bounds, dtype=np.float64)
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

    def _check_within_bounds(self, X):
        bounds = self._bounds(X.shape[1])
        if bounds is None:
            return
        outside = (X <= bounds[0]) | (X >= bounds[1])
        if outside.any():
            features = np.flatnonzero(outside.any(axis=0)).tolist()
            raise ValueError(
                f"{int(outside.any(axis=1).sum())} training rows lie on or outside the "
                f"open interval given by bounds, in features {features}."
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
        module = self.__dict__.get("module_")
        device = _module_device(module) if module is not None else self._torch_device()
        elements = _CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
        # Sampling chunk by chunk draws the same rows as one draw would: the
        # bases turn uniform noise, which torch draws number by number, into rows.
        return max(1024, elements // width)

    def _validate_fitted_input(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    @limit_torch_threads()
    def _map_rows(self, function, n_outputs, *arrays, chunk=None):
        """Apply a float64 torch ``function`` to chunks of rows of ``arrays``; numpy out.

        ``function`` receives one tensor per array, all for the same rows, and
        returns a tensor of shape (n_rows, n_outputs).
        """
        n_rows = arrays[0].shape[0]
        out = np.empty((n_rows, n_outputs))
        device = _module_device(self.module_)
        chunk = chunk or self._chunk_size()
        with torch.inference_mode(), _cyclic_gc_paused(), reused_buffers():
            for start in range(0, n_rows, chunk):
                tensors = [
                    torch.tensor(array[start : start + chunk], dtype=torch.float64, device=device)
                    for array in arrays
                ]
                out[start : start + chunk] = function(*tensors).cpu().numpy()
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


# The degrees of freedom that _multivariate_t searches, and its cost: ECME
# on at most this many rows (evenly spaced), at most this many iterations
# (light tails converge in a few dozen; heavy ones take them all).
_MVT_DF_RANGE = (0.5, 1e4)
_MVT_MAX_ROWS = 20_000
_MVT_MAX_ITER = 100
# base="auto" takes a t base only where the t fitted by ECME has fewer degrees
# of freedom than this (tails heavy), and only the elliptical one where every
# feature's own fit has fewer too. Over six draws each of the benchmark's data
# sets (benchmarks/RESULTS.md, "The fitted t base and base='auto'"), ECME gives
# 2.3-3.1 on the multivariate t's, 4.4-4.7 on the t marginals (every feature
# 2.8-3.2), where a t base is 0.01-0.17 nats better than the Gaussian one;
# 2.3-2.5 on the banana and 1.05 (its floor) on the funnel, which have a
# Gaussian feature (df 60-1e4) and where the elliptical t was 0.001-0.005
# worse; 10.0-10.6 on the sine chain and 1e4 on the Gaussian mixtures, where it
# is worse (the sine chain: 0.02-0.06). 7 lies between (a t with 7 degrees of
# freedom has an excess kurtosis of 2).
_AUTO_T_BELOW_DF = 7.0
# ... and the fitted t base where every feature's own ECME df is within this
# factor of the whole's: on the multivariate t sets they agree to 6%; on the
# t marginals (each feature a t with df 3, not jointly one) the whole's df is
# 1.5-1.6 times the features', on the banana and the funnel 48-9500 times.
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
    # Z is standardised: a ridge of 1e-4 (of unit variances) keeps the scatter
    # positive definite where the rows do not span every direction (fewer rows
    # than features) and the likelihood bounded there, so that ECME converges
    # to one point: with 1e-8, rows of weight 2 and the same rows repeated
    # stopped at different iterations on 15 rows x 30 features, 7e-3 apart.
    # It also bounds how much a whitening by this scatter (base="fitted-t")
    # magnifies directions the rows do not span: 100 times at most.
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
        # faster than solving for many rows (36 against 6 ms: 20,000 x 64)
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


def _module_device(module):
    return next(module.buffers()).device


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


def _take(tensor, rows):
    return None if tensor is None else tensor[torch.as_tensor(rows, device=tensor.device)]
