"""MAFConditionalDensity: p(y | X) with a conditional Masked Autoregressive Flow."""

from numbers import Integral

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_is_fitted,
    validate_data,
)

from ._base import _BaseMAF, _module_device
from ._nn.mixture import from_fixed
from ._preprocessing import _sobol_points, _weighted_moments


class MAFConditionalDensity(_BaseMAF):
    """Conditional density estimation ``p(y | X)`` with a Masked Autoregressive Flow.

    The flow models the targets ``y`` (one or more columns); the features ``X``
    are the *context*, fed unmasked into every MADE (the paper's section 3.4),
    so every shift and log-scale of every layer depends on the whole of ``X``.
    ``X`` is standardised with its training mean and standard deviation before
    it enters the networks (a constant feature is passed through unscaled); the
    targets get the same fixed standardisation layer, with its log-determinant,
    as :class:`MAFDensity`, so log-densities are in the units of ``y``.

    Parameters
    ----------
    n_layers : int, default=5
        Number of MAF layers (MADEs).
    hidden_units : int, default=100
        Width of each hidden layer of each MADE.
    n_hidden_layers : int, default=2
        Number of hidden layers in each MADE.
    activation : {"relu", "tanh"}, default="relu"
        Non-linearity of the MADE hidden layers.
    batch_norm : bool, default=True
        Batch normalisation between MAF layers, with training-split statistics
        in the fitted model. Not used with the fitted t base
        (``base="fitted-t"``, or where "auto" takes it).
    order : {"reverse", "random"}, default="reverse"
        Variable order of the target columns in successive layers.
    base : {"auto", "gaussian", "mog", "student-t", "elliptical-t", "fitted-t"}, default="auto"
        Base density under the MAF layers:

        - "gaussian": a standard normal (the paper's MAF);
        - "mog": the paper's "MAF MoG" base, a MADE whose every conditional
          is a mixture of ``n_components`` Gaussians, which suits strongly
          multi-modal data;
        - "student-t": independent Student t's with one learned degrees of
          freedom per feature (starting at 30, nearly normal; always above
          1), for heavy tails, where a Gaussian base can give rows beyond
          the training range log-densities far too low;
        - "elliptical-t": the multivariate Student t with one learned
          degrees of freedom, started at that of a multivariate t fitted to
          the standardised training rows by ECME (Liu & Rubin, 1995), which
          suits heavy tails;
        - "fitted-t": that fitted multivariate t itself: a fixed first
          layer whitens the rows by its location and scatter, the base's
          degrees of freedom start at its value, and the MAF layers model
          what it misses, without batch normalisation (``batch_norm`` is
          ignored); for heavy tails that are elliptical, as in a
          multivariate t;
        - "auto": "fitted-t" where the ECME fit has fewer than 7 degrees of
          freedom (heavy tails) and every feature's own fit agrees with it
          to 20% (as in a multivariate t, whose every feature is a t with
          the same degrees of freedom); "elliptical-t" where the tails are
          heavy otherwise and every feature's own fit has fewer than 7 too;
          "gaussian" elsewhere. The choice is stored as ``base_``
          (``benchmarks/RESULTS.md``, "The fitted t base and
          base='auto'").
    transformer : {"affine", "spline"}, default="affine"
        The map of each feature in a MAF layer, whose parameters the MADE
        computes from the features before it: "affine", the paper's ``u_i =
        (x_i - mu_i) exp(-alpha_i)``; "spline", a
        monotone rational-quadratic spline of ``x_i`` (Durkan et al., "Neural
        Spline Flows", 2019), which can bend one mode into several within a
        layer. Spline layers are trained through autograd,
        so an epoch takes longer.
    n_bins : int, default=8
        Bins of each spline; ignored by "affine".
    tail_bound : float, default=3.0
        Each spline acts on ``[-tail_bound, tail_bound]`` of its standardised
        input and is the identity beyond; ignored by "affine".
    n_components : int, default=10
        Mixture components per conditional of the MoG base; ignored by the
        other bases.
    tail_cut : "auto", float or None, default="auto"
        With the Gaussian base, the fitted model's base density is the
        standard normal on ``[-tail_cut, tail_cut]`` in every coordinate, with
        power-law tails beyond (density ``~ |u| ** -(tail_cut ** 2 + 1)``, and
        the normal's mass there): a row far outside the training range then
        scores tens of nats low rather than thousands, which on heavy-tailed
        data is most of a Gaussian-base flow's held-out loss. Training itself
        uses the plain normal. "auto": after training, whichever of 2, 2.5, 3,
        4 and None (no tails) gives the validation rows (the training rows
        without early stopping) the highest log-likelihood, stored as
        ``tail_cut_``; ``partial_fit`` keeps the plain normal. A number:
        that cut, from the validation score on. None: the plain normal
        throughout. Ignored by the other bases.
    reference : {"gmm", "gaussian"} or None, default="gmm"
        A classical density of the targets mixed with the flow, ``p(y | x) =
        w_flow * p_flow(y | x) + (1 - w_flow) * p_reference(y)``, in the
        coordinates after the fixed layers (``bounds``, the standardisation),
        so on the same support. "gmm": a broad Gaussian (Ledoit-Wolf
        covariance, with a 1% share of the plain maximum-likelihood
        Gaussian), the full-covariance Gaussian mixtures that BIC ranks best
        among 1 to 10 components (the best three, each weighted by the held-out
        rows, held as one mixture), and a Gaussian kernel density on up to
        20,000 of the rows (evenly spaced beyond) with the bandwidth of
        highest leave-one-out likelihood (kept only where the validation
        rows give it a weight of at least 0.001); "gaussian": the broad
        Gaussian alone. The
        weights are fitted by EM on the validation rows (the training rows
        without early stopping), then the parts are refitted on all rows
        (stacked density estimation, Smyth & Wolpert, 1999); on ``n``
        validation rows the parts together keep at least ``1 / (2 n + 2)``
        of the weight. The reference
        ignores ``X``: it is a floor under the flow, and where ``X`` tells
        much about ``y`` the flow keeps nearly all the weight. None: the flow
        alone.
    min_reference_weight : float in [0, 1), default=1e-4
        The least weight of the broad Gaussian. Every row then scores at least
        ``log(min_reference_weight)`` (-9.2 nats at the default) plus its
        log-density under that Gaussian, and -13.8 nats at the default plus
        its log-density under the maximum-likelihood Gaussian, whatever the
        flow does far from the training rows, at a cost of at most ``-log(1 -
        min_reference_weight)`` nats per row. Ignored when ``reference`` is None.
    bounds : array-like of shape (n_features, 2), default=None
        Support ``(low, high)`` of each modelled feature (of ``y``, for this
        estimator), with ``-np.inf`` /
        ``np.inf`` for an open side. A bounded feature goes through a fixed
        logit (both sides finite) or log (one side finite) layer, with its
        log-determinant, before the standardisation: the model puts no mass
        outside the bounds, :meth:`sample` stays inside them, and
        :meth:`score_samples` is still a density in the units of the data
        (``-inf`` for rows outside). Training rows must lie strictly inside.
    discrete_features : "auto", array-like of int or bool, default=None
        Integer-valued features (indices or a boolean mask; "auto": every
        feature whose training values are all integers). They are dequantised:
        training adds fresh uniform noise in ``[0, 1)`` to them at every epoch,
        :meth:`score_samples` returns the log of the *probability* of the
        integer values times the density of the continuous ones (the model's
        density integrated over each unit cell with 32 fixed quasi-random
        points per row), and :meth:`sample` returns integers there. Without
        this, a density fitted to integers piles up mass on them and its scores
        are not comparable with a continuous density's.
    alpha : float, default=1e-6
        L2 penalty on the MADE weight matrices, applied as Adam weight decay:
        each step adds ``alpha * W`` to the gradient of the mean per-row loss
        (scikit-learn's MLP divides its penalty by the batch size instead).
    batch_size : int, default=256
        Rows per mini-batch; at least 2, so batch normalisation never sees the
        statistics of one row.
    learning_rate : {"adaptive", "constant"}, default="adaptive"
        Learning-rate schedule. "adaptive": start at ``learning_rate_init`` and
        halve the rate each time 3 consecutive epochs fail to improve the
        validation log-likelihood (or, without early stopping, the training
        loss) by ``tol``, so that the weights settle before training stops (as
        scikit-learn's MLP does for SGD, with its own constants). "constant":
        ``learning_rate_init`` throughout. ``partial_fit`` always runs at
        ``learning_rate_init``.
    learning_rate_init : float, default=1e-3
        Adam's learning rate.
    max_iter : int, default=200
        Maximum number of epochs.
    tol : float, default=1e-4
        Minimum improvement in nats per row that resets the patience counter.
    n_iter_no_change : int, default=10
        Epochs without improvement before training stops.
    early_stopping : bool, default=True
        Stop on a validation split's mean conditional log-likelihood and restore
        the best weights. The weights scored and kept are a moving average of
        the training steps' weights (:ref:`maf`, "Training").
    validation_fraction : float, default=0.1
        Fraction of rows held out for early stopping. Copies of a row (equal
        in every feature and every context feature) are held out or trained
        on together, unless every feature is declared in ``discrete_features``.
    precision : {"float32", "float64"}, default="float32"
        Precision of training; scoring, prediction and sampling run in float64.
    device : str, default="cpu"
        Torch device, e.g. "cpu" or "cuda".
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, orders, the validation split and shuffling.
    verbose : bool, default=False
        Print progress after each epoch.
    warm_start : bool, default=False
        Continue training the fitted flow on the next call to :meth:`fit`.

    Attributes
    ----------
    module_ : sklearn_maf._nn.MAF
        The fitted conditional flow, in float64 and eval mode.
    n_features_in_ : int
        Number of context features seen during :term:`fit`.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of the context features, when ``X`` has string feature names.
    n_targets_ : int
        Number of target columns.
    context_mean_ : ndarray of shape (`n_features_in_`,)
        Weighted mean of each context feature on the data of the first fit.
    context_scale_ : ndarray of shape (`n_features_in_`,)
        Weighted standard deviation of each context feature (1 for a constant
        feature).
    discrete_features_ : ndarray of shape (n_features,), dtype bool
        Which modelled features are treated as integer-valued.
    loss_curve_ : list of float
        Mean training negative conditional log-likelihood per epoch.
    validation_scores_ : list of float or None
        Mean validation conditional log-likelihood per epoch.
    best_validation_score_ : float or None
        Best of ``validation_scores_``.
    base_ : str
        The base of the fitted flow: ``base``, with "auto" resolved.
    tail_cut_ : float or None
        The cut of the fitted base's power-law tails (see ``tail_cut``); None
        for the plain normal, and for the other bases.
    mixture_weights_ : ndarray of shape (1,), (2,) or (4,)
        The weights of the flow, the broad Gaussian and (``reference="gmm"``)
        the Gaussian mixture and the kernel density (0 where it was left
        out); ``[1.0]`` for the flow alone.
    reference_ : sklearn_maf._nn.mixture.Mixture or None
        The reference parts kept, with their weights relative to each other,
        in the coordinates after the flow's fixed layers; None for the flow
        alone.
    best_loss_ : float
        Lowest training loss.
    n_iter_ : int
        Number of epochs run, across warm starts.

    See Also
    --------
    MAFDensity : Unconditional density estimation.

    Notes
    -----
    :meth:`predict` returns the conditional mean ``E[y | x]``, estimated by
    turning the same ``n_draws`` scrambled-Sobol quasi-random points into draws
    of the base density (standard normal, MoG, Student t's or multivariate t) and through the
    inverse flow for every row, and averaging: the result is deterministic and
    does not depend on which other rows are predicted with it. With
    ``base="student-t"`` or ``"elliptical-t"`` the mean exists (every learned
    degrees of freedom is above 1), but where one falls to 2 or below the draws have no finite
    variance and the average converges slowly in ``n_draws``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_maf import MAFConditionalDensity
    >>> rng = np.random.RandomState(0)
    >>> X = rng.uniform(-2, 2, size=(500, 1))
    >>> y = np.sin(2 * X[:, 0]) + 0.1 * rng.normal(size=500)
    >>> model = MAFConditionalDensity(n_layers=2, hidden_units=16, max_iter=5,
    ...                               random_state=0).fit(X, y)
    >>> model.score_samples(X[:3], y[:3]).shape
    (3,)
    >>> model.sample(X[:4], random_state=0).shape
    (4,)
    >>> model.predict(X[:4]).shape
    (4,)
    """

    _fitted_attributes = _BaseMAF._fitted_attributes + ("n_targets_", "context_mean_", "context_scale_", "_y_1d")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the conditional flow by maximum likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Conditioning features (the context).
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Targets whose conditional density is learned.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of each row's log-likelihood.

        Returns
        -------
        self : MAFConditionalDensity
            The fitted estimator.
        """
        continuing = self.warm_start and hasattr(self, "module_")
        X, y = validate_data(
            self,
            X,
            y,
            dtype=np.float64,
            multi_output=True,
            y_numeric=True,
            ensure_min_samples=2,
            reset=not continuing,
        )
        Y = y.reshape(y.shape[0], -1)
        if continuing and Y.shape[1] != self.n_targets_:
            raise ValueError(
                f"y has {Y.shape[1]} targets, but {type(self).__name__} was fitted "
                f"with {self.n_targets_}; warm_start needs the same targets."
            )
        if not continuing:
            self.n_targets_ = Y.shape[1]
            self._y_1d = y.ndim == 1
            sample_weight = _check_sample_weight(
                sample_weight, X, dtype=np.float64, ensure_non_negative=True
            )
            self.context_mean_, scale = _weighted_moments(X, sample_weight)
            self.context_scale_ = np.where(scale > 0, scale, 1.0)
        self._train(Y, sample_weight, self._context(X), continuing=continuing)
        return self

    def score_samples(self, X, y):
        """Conditional log-density ``log p(y | x)`` of each row, in the units of ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Conditioning features.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Targets.

        Returns
        -------
        log_density : ndarray of shape (n_samples,), dtype float64
            ``log p(y | x)`` per row; underflow gives ``-inf``, never NaN.
        """
        C = self._validated_context(X)
        Y = check_array(y, dtype=np.float64, ensure_2d=False, input_name="y")
        Y = Y.reshape(Y.shape[0], -1)
        if Y.shape[0] != C.shape[0]:
            raise ValueError(
                f"X and y have different numbers of rows: {C.shape[0]} and {Y.shape[0]}."
            )
        if Y.shape[1] != self.n_targets_:
            raise ValueError(
                f"y has {Y.shape[1]} targets, but {type(self).__name__} is expecting "
                f"{self.n_targets_} targets as input."
            )
        return self._log_mass(self._model_log_prob, Y, C)

    def score(self, X, y, sample_weight=None):
        """Total conditional log-likelihood ``sum log p(y | x)``.

        The sum, as :meth:`MAFDensity.score`, so that model selection maximises
        held-out likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Conditioning features.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Targets.
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the rows in the sum.

        Returns
        -------
        log_likelihood : float
        """
        log_density = self.score_samples(X, y)
        if sample_weight is None:
            return float(log_density.sum())
        return float(np.dot(np.asarray(sample_weight, dtype=np.float64), log_density))

    def sample(self, X, random_state=None):
        """Draw one ``y`` from ``p(y | x)`` for each row of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Conditioning features.
        random_state : int, RandomState instance or None, default=None
            Seeds the draw; the same value gives the same draws.

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_targets)
            One draw per row, shaped like the ``y`` given to :meth:`fit`.
        """
        C = self._validated_context(X)
        rng = check_random_state(random_state)
        generator = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        draws = self._map_rows(
            lambda c: self._model_sample(c.shape[0], context=c, generator=generator),
            self.n_targets_,
            C,
        )
        return self._shape_like_y(self._floor_discrete(draws))

    @validate_params(
        {"n_draws": [Interval(Integral, 1, None, closed="left")]},
        prefer_skip_nested_validation=True,
    )
    def predict(self, X, n_draws=256):
        """Conditional mean ``E[y | x]`` of each row of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Conditioning features.
        n_draws : int, default=256
            Quasi-random base points averaged per row; the Monte Carlo error
            shrinks roughly as ``1 / n_draws``.

        Returns
        -------
        y_mean : ndarray of shape (n_samples,) or (n_samples, n_targets)
            Estimated conditional means, shaped like the ``y`` given to
            :meth:`fit`.
        """
        C = self._validated_context(X)
        base = self.module_.base
        noise = torch.as_tensor(_sobol_points(n_draws, base.n_noise))
        noise = noise.to(_module_device(self.module_))

        def conditional_mean(c):
            repeated = c.repeat_interleave(n_draws, dim=0)
            u = base.from_uniform(noise.repeat(c.shape[0], 1), repeated)
            y = self.module_.inverse(u, repeated)[0]
            return y.reshape(c.shape[0], n_draws, -1).mean(dim=1)

        rows = max(1, self._chunk_size() // n_draws)
        out = np.empty((C.shape[0], self.n_targets_))
        for start in range(0, C.shape[0], rows):
            out[start : start + rows] = self._map_rows(conditional_mean, self.n_targets_, C[start : start + rows])
        reference = self.__dict__.get("reference_")
        if reference is not None:  # the mixture's mean: the flow's and the reference's, weighted
            points = torch.as_tensor(_sobol_points(n_draws, reference.n_noise), device=noise.device)
            with torch.inference_mode():
                draws = from_fixed(self.module_, reference.from_uniform(points))
            flow_weight = self.mixture_weights_[0]
            out = flow_weight * out + (1 - flow_weight) * draws.mean(dim=0).cpu().numpy()
        return self._shape_like_y(out)

    # ----------------------------------------------------------------- helpers

    def _context(self, X):
        return (X - self.context_mean_) / self.context_scale_

    def _validated_context(self, X):
        check_is_fitted(self)
        return self._context(validate_data(self, X, dtype=np.float64, reset=False))

    def _shape_like_y(self, Y):
        return Y[:, 0] if self._y_1d else Y
