"""The estimators' shared plumbing: parameters, training, scoring and sampling.

:class:`_BaseMAF` holds what every estimator shares: the parameters (declared
once here; each estimator's docstring documents them for its users), pickling,
training a flow on prepared rows with an optional context, device and
chunking, and the dequantised log-mass. :class:`_UnconditionalMAF` adds what
only a density of ``X`` alone has: validation of ``X``, ``partial_fit`` and
``sample(n_samples)``. The public estimators (one per module) add their own
scikit-learn face on top: :class:`~sklearn_maf.MAFDensity` and the outlier
detector on :class:`_UnconditionalMAF`, :class:`~sklearn_maf.MAFConditionalDensity`,
a density of ``y`` given ``X``, on :class:`_BaseMAF`.
"""

import copy
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ._model_selection import _auto_base, _base_name, _choose_tail_cut, _multivariate_t
from ._nn import MAF, Bounded, StandardNormal, reused_buffers
from ._optimizer import make_optimizer
from ._persistence import checked_state, pickling_reduction, record_version
from ._preprocessing import (
    _DEQUANTIZATION_POINTS,
    _check_weight_total,
    _check_within_bounds,
    _discrete_mask,
    _parse_bounds,
    _sobol_points,
    _weighted_loc_scale,
)
from ._nn.mixture import from_fixed, to_fixed
from ._reference import (
    _MAX_STARTS,
    fit_reference,
    flow_and_reference_weights,
    merged_mixtures,
    refit_reference,
    reference_mixture,
)
from ._streaming import StreamingState, chunk_key
from ._threads import limit_torch_threads, training_threads
from ._training import TrainingConfig, _cyclic_gc_paused, train_flow

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Elements (rows x width) per chunk when scoring, transforming or sampling: the memory
# stays bounded on any number of rows, a chunk's activations stay in the CPU caches, and
# the fixed cost per chunk does not show (benchmarks/results/speed.md, "Chunk size").
_CHUNK_ELEMENTS = 1 << 18
# On a GPU each chunk is a batch of kernel launches with a fixed cost: large chunks
# (benchmarks/RESULTS.md, "On a GPU").
_DEVICE_CHUNK_ELEMENTS = 1 << 24


def _row_groups(rows):
    """An id per row, the same for rows equal in every column (-0.0 and 0.0 equal).

    Rows are compared as byte strings (finite values, -0.0 made 0.0): a
    quarter of the time of ``np.unique(axis=0)``, 0.6 s on a million rows of 10.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float64) + 0.0  # -0.0 + 0.0 is 0.0
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    return np.unique(as_bytes, return_inverse=True)[1]


class _BaseMAF(BaseEstimator):
    """Parameters, training and the scoring machinery of a Masked Autoregressive Flow."""

    _parameter_constraints: dict = {
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "hidden_units": [Interval(Integral, 1, None, closed="left")],
        "n_hidden_layers": [Interval(Integral, 0, None, closed="left")],
        "activation": [StrOptions({"relu", "tanh"})],
        "batch_norm": ["boolean"],
        "order": [StrOptions({"reverse", "random"})],
        "transformer": [StrOptions({"affine", "spline"})],
        "n_bins": [Interval(Integral, 1, None, closed="left")],
        "tail_bound": [Interval(Real, 0, None, closed="neither")],
        "base": [StrOptions({"auto", "gaussian", "mog", "student-t", "elliptical-t", "fitted-t"})],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "tail_cut": [StrOptions({"auto"}), Interval(Real, 0, None, closed="neither"), None],
        "reference": [StrOptions({"gmm", "gaussian"}), None],
        "min_reference_weight": [Interval(Real, 0, 1, closed="left")],
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
        transformer="affine",
        n_bins=8,
        tail_bound=3.0,
        base="auto",
        n_components=10,
        tail_cut="auto",
        reference="gmm",
        min_reference_weight=1e-4,
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
        self.transformer = transformer
        self.n_bins = n_bins
        self.tail_bound = tail_bound
        self.base = base
        self.n_components = n_components
        self.tail_cut = tail_cut
        self.reference = reference
        self.min_reference_weight = min_reference_weight
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

    # What scoring and sampling read after a fit; a pickle without one of them
    # cannot be used, and loading it says so (subclasses add their own).
    _fitted_attributes = ("module_", "n_features_in_", "discrete_features_", "base_", "tail_cut_")

    def __reduce_ex__(self, protocol):
        """Pickle through a function that checks the pickle before its state is read."""
        return pickling_reduction(self, super().__reduce_ex__(protocol))

    def __getstate__(self):
        """Pickle the fitted flow on the CPU, so any machine can load it, and record the version."""
        # A copy: BaseEstimator.__getstate__ may return the instance's own
        # __dict__, and pickling must not change the model being pickled.
        state = dict(super().__getstate__())
        # partial_fit's training state travels (on the CPU; see StreamingState),
        # so that a stream continues exactly where it stopped, also where Dask
        # moves the estimator between workers; fit leaves none behind.
        for name in ("module_", "reference_"):
            module = state.get(name)
            if module is not None and _module_device(module).type != "cpu":
                state[name] = copy.deepcopy(module).cpu()
        return record_version(state)

    def __setstate__(self, state):
        """Warn if another version pickled the model; move the flow to ``device``.

        Without CUDA, the flow stays on the CPU, with a warning. A fitted
        model that lacks a fitted attribute raises
        :class:`~sklearn_maf.exceptions.IncompatiblePickleError`.
        """
        state = checked_state(self, state)
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
        if self.__dict__.get("reference_") is not None:
            self.reference_ = self.reference_.to(torch.device(self.device))
        stream = self.__dict__.get("_partial_state")
        if stream is not None and _module_device(self.module_).type != "cpu":
            stream.to(_module_device(self.module_))

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
        seed = int(rng.randint(np.iinfo(np.int32).max))
        generator = torch.Generator().manual_seed(seed)
        train, validation = self._split(X.shape[0], rng, groups=self._duplicate_groups(X, context, continuing))
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
            module = self._build_module(
                X_noisy[train], sample_weight[train], generator, n_context, X_noisy, sample_weight
            )
        dtype = _DTYPES[self.precision]
        module = module.to(device=device, dtype=dtype)

        weighted = not np.all(sample_weight == 1)
        to_tensor = self._tensor_factory(dtype, device)
        weight = to_tensor(sample_weight) if weighted else None
        # rows in float64: the flow's fixed first layers standardise them exactly
        # and cast to the training dtype (a large offset survives, see _nn/preprocessing.py)
        to_rows = self._tensor_factory(torch.float64, device)
        X_train, w_train = to_rows(X[train]), _take(weight, train)
        c_train = None if context is None else to_tensor(context[train])
        validation_data = None
        if validation is not None:
            c_validation = None if context is None else to_tensor(context[validation])
            validation_data = (
                to_rows(X_noisy[validation]), _take(weight, validation), c_validation
            )

        batch_size = min(self.batch_size, X_train.shape[0])
        with limit_torch_threads(self._training_threads(batch_size, X.shape[1] + n_context)):
            history = train_flow(
                module,
                X_train,
                w_train,
                c_train,
                validation=validation_data,
                config=self._training_config(batch_size),
                generator=generator,
                dequantize=to_tensor(discrete) if discrete.any() else None,
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
        self._fit_reference(X_noisy, sample_weight, train, validation, context, seed, history.validation_correction)
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

    def _training_config(self, batch_size, *, one_epoch=False):
        """The estimator's training parameters as :func:`train_flow` takes them.

        ``one_epoch``: ``partial_fit``'s single pass, at ``learning_rate_init``
        throughout, on the weights themselves (no averaging), without a
        ``ConvergenceWarning``.
        """
        common = dict(
            batch_size=batch_size,
            learning_rate=self.learning_rate_init,
            alpha=self.alpha,
            tol=self.tol,
            n_iter_no_change=self.n_iter_no_change,
            verbose=self.verbose,
        )
        if one_epoch:
            return TrainingConfig(max_iter=1, warn_not_converged=False, **common)
        return TrainingConfig(
            max_iter=self.max_iter, adaptive=self.learning_rate == "adaptive", average=True, **common
        )

    def _training_threads(self, batch_size, n_inputs):
        """The cap on torch's threads while training on the CPU (None: no cap).

        At the default sizes one thread is faster than several: see
        :data:`sklearn_maf._threads.MIN_MULTIPLY_ADDS_PER_THREAD`.
        """
        if self._torch_device().type != "cpu":
            return None
        return training_threads(batch_size, self.hidden_units, n_inputs)

    # k-means starts of the reference mixtures' EM, at most (_reference.em_starts)
    _reference_starts = _MAX_STARTS

    def _reference_kind(self):
        """The ``reference`` this estimator mixes with its flow (None: the flow alone)."""
        return self.reference

    def _fit_reference(self, X, weight, train, validation, context, seed, flow_correction=None):
        """Fit the reference density and the mixture weights; set ``reference_`` and ``mixture_weights_``.

        The parts are fitted to the training rows in the coordinates after
        the flow's fixed layers, the weights by EM on the held-out rows (the
        training rows without early stopping, where the kernel density, which
        holds those rows, takes no part) and on training rows scored as if
        held out, and the parts are then fitted again to all rows (see :mod:`sklearn_maf._reference`). ``seed`` starts their
        k-means: the fit's own, drawn before anything that depends on the
        number of rows, so that rows of weight zero change nothing.
        ``flow_correction``, per held-out row, moves the flow's score there
        to the epoch that early stopping would have kept without that row
        (``TrainingHistory.validation_correction``): the flow's weight then
        rests on held-out scores of its epoch choice as well.

        Returns the reference as it was before that refit (None where the
        flow stands alone), with the same weights: the model that has not
        seen the held-out rows. Refitted, the parts hold those rows too (the
        kernel density has a kernel on each), and score them as training rows.
        """
        kind = self._reference_kind()
        if kind is None:
            self.reference_, self.mixture_weights_ = None, np.ones(1)
            return None
        n_features = X.shape[1]

        def fixed(rows):
            values = self._map_rows(
                lambda x: torch.column_stack(to_fixed(self.module_, x)), n_features + 1, X[rows]
            )
            return values[:, :-1], values[:, -1]

        # the kernel density holds the training rows: only held-out rows can give it weight
        parts, scores, score_weight = fit_reference(
            fixed(train)[0], weight[train], kind, seed, validation is not None, self._reference_starts
        )
        held = train if validation is None else validation
        Z_held, logabsdet = fixed(held)
        flow = self._map_rows(
            lambda x, *c: self.module_.log_prob(x, *c)[:, None], 1, X[held],
            *(() if context is None else (context[held],)),
        )[:, 0]  # fmt: skip
        if flow_correction is not None:
            flow = flow + flow_correction
        with torch.no_grad():
            classical = np.column_stack([part.log_prob(torch.as_tensor(Z_held)).numpy() for part in parts])
        weights = flow_and_reference_weights(
            flow, classical + logabsdet[:, None], weight[held], scores, score_weight, self.min_reference_weight
        )
        like = next(self.module_.buffers())
        unrefitted = reference_mixture(*merged_mixtures(parts, weights[1:]), like=like)
        parts = refit_reference(parts, fixed(np.arange(X.shape[0]))[0], weight, seed, weights[1:])
        parts, part_weights = merged_mixtures(parts, weights[1:])
        weights = np.r_[weights[0], part_weights]
        self.reference_ = reference_mixture(parts, weights[1:], like=like)
        if self.reference_ is None:
            self.mixture_weights_ = np.ones(1)
            return None
        # the weights of the parts kept, scaled to the reference's share; a
        # kernel density left out (no held-out rows) has weight 0
        kept = np.array([any(part is mine for mine in self.reference_.parts) for part in parts], dtype=float)
        reference_weights = weights[1:] * kept
        self.mixture_weights_ = np.r_[weights[0], (1 - weights[0]) * reference_weights / reference_weights.sum()]
        if kind == "gmm" and len(parts) == 2:
            self.mixture_weights_ = np.r_[self.mixture_weights_, 0.0]
        return unrefitted

    def _model_log_prob(self, x, context=None):
        """Log-density of rows ``x`` (tensors) under the fitted model: the flow and its reference."""
        log_prob = self.module_.log_prob(x, context)
        reference = self.__dict__.get("reference_")
        if reference is None:
            return log_prob
        z, logabsdet = to_fixed(self.module_, x)
        log_weights = torch.log(torch.tensor([self.mixture_weights_[0], 1 - self.mixture_weights_[0]]))
        return torch.logaddexp(
            torch.nan_to_num(log_prob, nan=-torch.inf) + float(log_weights[0]),
            reference.log_prob(z) + logabsdet + float(log_weights[1]),
        )

    def _model_sample(self, n_samples, context=None, generator=None):
        """``n_samples`` rows from the fitted model, each from its own uniforms of ``generator`` in turn.

        One uniform per row picks the flow or the reference, the next ones
        make that part's draw, so a draw in chunks is the same as in one go.
        """
        reference = self.__dict__.get("reference_")
        if reference is None:
            return self.module_.sample(n_samples, context, generator)
        flow = self.module_
        like = next(flow.buffers())
        base_noise = flow.base.n_noise
        noise = torch.rand(
            n_samples, 1 + max(base_noise, reference.n_noise), generator=generator, dtype=torch.float64
        ).to(like.device)
        from_flow = noise[:, 0] < float(self.mixture_weights_[0])
        out = torch.empty(n_samples, flow.n_features, dtype=like.dtype, device=like.device)
        if from_flow.any():
            rows = noise[from_flow, 1 : 1 + base_noise].to(like.dtype)
            c = None if context is None else context[from_flow]
            out[from_flow] = flow.inverse(flow.base.from_uniform(rows, c), c)[0]
        if not from_flow.all():
            rows = noise[~from_flow, 1 : 1 + reference.n_noise]
            out[~from_flow] = from_fixed(flow, reference.from_uniform(rows).to(like.dtype))
        return out

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
        _check_within_bounds(self.bounds, X)
        if discrete.any():  # the dequantised cell [k, k + 1) must lie inside the bounds too
            _check_within_bounds(self.bounds, X + 0.999999 * discrete)
        return discrete.astype(np.float64)

    def _floor_discrete(self, X):
        """Map dequantised values back to integers on the discrete columns."""
        X[:, self.discrete_features_] = np.floor(X[:, self.discrete_features_])
        return X

    # ----------------------------------------------------------------- helpers

    def _build_module(self, X, sample_weight, generator, n_context=0, X_all=None, weight_all=None):
        """A new flow whose fixed first layers are fitted to the training rows ``X``.

        ``X_all`` and ``weight_all``, all the rows of a split, standardise a
        feature that only the validation rows vary (see ``_weighted_loc_scale``).
        """
        bounds = _parse_bounds(self.bounds, X.shape[1])

        def bounded(rows):
            if bounds is None or rows is None:
                return rows
            return Bounded(*map(torch.as_tensor, bounds))(torch.as_tensor(rows))[0].numpy()

        Y = bounded(X)
        loc, scale = _weighted_loc_scale(Y, sample_weight, bounded(X_all), weight_all)
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
            transform=self.transformer,
            transform_params=(
                dict(n_bins=self.n_bins, tail_bound=self.tail_bound) if self.transformer == "spline" else None
            ),
            tail_cut=None if self.tail_cut == "auto" else self.tail_cut,
            bounds=bounds,
            whiten=whiten,
            generator=generator,
            dtype=torch.float64,
        )
        if base in ("elliptical-t", "fitted-t"):
            module.base.set_df(df)
        return module

    def _duplicate_groups(self, X, context, continuing):
        """Which rows are copies of one another (an id per row), or None where repeats are expected.

        A row of continuous values repeated exactly is, under a continuous
        density, one record entered several times (or resampled): held out
        while a copy trains, it would score as a training row does, and early
        stopping, the tails and the reference's weights would reward
        memorising it. Rows of integer values declared discrete
        (``discrete_features``) repeat by nature, and are not grouped.
        """
        discrete = self.discrete_features_ if continuing else _discrete_mask(self.discrete_features, X)
        if discrete.all():
            return None
        rows = X if context is None else np.column_stack([X, context])
        return _row_groups(rows)

    def _split(self, n_samples, rng, groups=None):
        """Indices of the training rows and of the validation rows (or None).

        Rows of one group (``groups``: an id per row, from
        :meth:`_duplicate_groups`) go to the same side: groups are taken in
        the order in which a random permutation of the rows meets them, as
        long as the validation rows stay within ``validation_fraction`` (a
        group larger than that stays in training), so that with no repeated
        rows the split is the permutation's.
        """
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
        if groups is None or groups.max() + 1 == n_samples:
            return np.sort(permutation[n_validation:]), np.sort(permutation[:n_validation])
        met = groups[permutation]
        _, first = np.unique(met, return_index=True)  # where the permutation first meets each group
        order = met[np.sort(first)]
        sizes = np.bincount(groups)[order]
        fits = sizes <= n_validation
        taken = order[fits][np.cumsum(sizes[fits]) <= n_validation]
        if taken.size == 0:  # every group is larger: the smallest one
            taken = order[[np.argmin(sizes)]]
        held = np.isin(groups, taken)
        if np.count_nonzero(~held) < 2:
            raise ValueError(
                "Early stopping needs validation rows that are not copies of training rows, "
                "and the rows hold too few distinct values for that; pass more distinct rows "
                "or set early_stopping=False."
            )
        return np.flatnonzero(~held), np.flatnonzero(held)

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


class _UnconditionalMAF(_BaseMAF):
    """A flow of the rows ``X`` alone: fit, partial fit, log-density and ``sample(n_samples)``.

    The base of :class:`~sklearn_maf.MAFDensity` and the outlier detector;
    :class:`~sklearn_maf.MAFConditionalDensity` models ``y`` given ``X`` and
    has its own versions of these, with the context.
    """

    def _fit(self, X, sample_weight):
        """Validate ``X``, train the flow and set the fitted attributes.

        Returns the indices of the training rows and of the validation rows
        (None without early stopping), for estimators that calibrate on them.
        """
        continuing = self.warm_start and hasattr(self, "module_")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2, reset=not continuing)
        return self._train(X, sample_weight, continuing=continuing)

    @limit_torch_threads()
    def _partial_fit(self, X, sample_weight):
        """One epoch over the chunk ``X``, continuing the training state of earlier calls.

        The state (:class:`~sklearn_maf._streaming.StreamingState`) holds what
        ``fit`` keeps across epochs: Adam, the gradient limit, the averaged
        weights, the learning-rate schedule (run at the end of each pass over
        the stream) and a uniform sample of the rows streamed, on which the
        fitted flow gets its batch-norm statistics and its tails. The fitted
        model is the flow alone (``reference_`` None): no rows are held out.
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
                self._tensor_factory(torch.float64, device)(X),  # float64: see _train
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
        self.reference_, self.mixture_weights_ = None, np.ones(1)
        self.loss_curve_ = (getattr(self, "loss_curve_", None) or []) + [loss]
        self.validation_scores_ = None
        self.best_validation_score_ = None
        self.best_loss_ = min(self.loss_curve_)
        self.n_iter_ = len(self.loss_curve_)
        return self

    def _validate_fitted_input(self, X):
        check_is_fitted(self)
        return validate_data(self, X, dtype=np.float64, reset=False)

    def _log_density(self, X):
        """Validated ``X`` -> float64 log-densities; underflow gives -inf, never NaN."""
        X = self._validate_fitted_input(X)
        return self._log_mass(self._model_log_prob, X)

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
                x = self._model_sample(rows, generator=generator)
                out[start : start + rows] = x.cpu().numpy()
        return self._floor_discrete(out)


def _module_device(module):
    return next(module.buffers()).device


def _take(tensor, rows):
    return None if tensor is None else tensor[torch.as_tensor(rows, device=tensor.device)]
