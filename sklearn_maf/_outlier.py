"""MAFOutlierDetector: outlier and novelty detection with a Masked Autoregressive Flow."""

from numbers import Real

import numpy as np
from scipy.special import ndtr, ndtri
from sklearn.base import OutlierMixin, _fit_context, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight

from ._base import _BaseMAF, _row_groups, _UnconditionalMAF
from ._preprocessing import _constant_features, _weighted_moments

# MAFDensity's parameters that the detector does not take: its own preprocessing
# (dequantize, preprocessing="quantile") handles discrete and bounded features.
_NOT_PARAMETERS = {"bounds", "discrete_features"}

# What preprocessing="auto" chooses among. Standardising is not a third
# candidate: the flow's first layer standardises every feature already, so
# standardised rows give the same model as None.
_CANDIDATES = ("quantile", None)

# contamination="auto": the fraction of held-out rows scored below the threshold.
_AUTO_FRACTION = 0.01

# At most about twice this many knots per feature describe its marginal transform,
# so the fitted detector stays small on any number of rows (as QuantileTransformer's
# n_quantiles does).
_MAX_QUANTILES = 1000


class MAFOutlierDetector(OutlierMixin, _UnconditionalMAF):
    """Outlier and novelty detection with a Masked Autoregressive Flow.

    The detector learns the density of the training rows with a MAF
    (Papamakarios, Pavlakou & Murray, 2017) stacked with classical densities
    (``reference``), as :class:`~sklearn_maf.MAFDensity` does, and calls a row
    an outlier when its log-density is low. It follows :class:`~sklearn.ensemble.IsolationForest`
    and :class:`~sklearn.neighbors.LocalOutlierFactor` with ``novelty=True``:
    :meth:`score_samples` is higher for more typical rows,
    :meth:`decision_function` is ``score_samples - offset_`` (negative for
    outliers) and :meth:`predict` returns +1 for inliers and -1 for outliers,
    on the training rows (outlier detection) or on new rows (novelty
    detection).

    Before the flow, each feature is prepared in three steps, all fitted on the
    training rows:

    1. Features that take a single value on the training rows have no density
       and are not modelled by the flow (listed in ``constant_features_``).
       A new row with a different value there shows an event that ``n``
       training rows never showed, which Krichevsky and Trofimov's estimate
       gives the probability ``p = 1 / (2 n + 2)``: each such feature adds
       ``log(p)`` to the row's score (and each constant feature at its
       training value ``log(1 - p)``), whatever the size of the difference:
       with no spread on the training rows there is no scale to measure it
       on. :class:`~sklearn_maf.MAFDensity` raises on
       such features instead.
    2. ``dequantize=True`` spreads each training value uniformly over its
       *cell*, the interval that reaches halfway to the neighbouring observed
       values of the feature. Integer-valued and other discrete features, and
       values repeated many times, otherwise hand the flow point masses of
       unbounded density, which rank rows by how many of their values sit on
       such a spike instead of by how typical they are. Continuous features,
       whose cells are tiny, are left practically unchanged.
    3. ``preprocessing="quantile"`` maps each feature through its (weighted)
       empirical distribution function, linear between the cell boundaries, and
       the standard-normal quantile function, as
       :class:`~sklearn.preprocessing.QuantileTransformer` with
       ``output_distribution="normal"`` does; the smallest and largest training
       values map to about -5.2 and 5.2 (the normal quantiles of 1e-7), and
       values beyond the training range continue linearly, so rows further
       out keep scoring lower. The flow then learns the dependence between
       features on a common scale, and heavy tails and skew no longer dominate
       the score. :meth:`score_samples` is the log-density of the transformed
       row (not a density in the units of ``X``). With
       ``preprocessing=None`` the flow sees the features as they are (its
       first layer standardises them) and :meth:`score_samples` is a
       log-density in the units of ``X``.

    The default, ``preprocessing="auto"``, decides between the two for each
    data set, at fit time: it fits the model (the flow and its reference)
    behind each and compares the log-likelihoods that their densities of
    ``X`` give the held-out rows. It
    keeps the quantile map only where its mean is higher by more than two
    standard errors of the paired per-row differences, and raw coordinates
    otherwise: the map is itself fitted to the training rows (a knot per
    distinct value, up to about 2,000 per feature), raw coordinates need
    nothing fitted, and a difference within the noise of the held-out rows
    does not justify the extra model. A detector that ranks rows by a density is as good as that density, and
    held-out likelihood is the measure of a density that needs no labels. The
    quantile candidate's density of ``X`` is its model's density of the
    transformed row times the Jacobian of the map (the slopes of the
    empirical distribution functions over the normal density at the mapped
    values): without that factor the two likelihoods would be densities of
    different variables, and which one won would depend on the units of
    ``X``. The choice is stored as ``preprocessing_``, the two
    log-likelihoods as ``preprocessing_scores_``.

    Parameters
    ----------
    contamination : "auto" or float, default="auto"
        The proportion of outliers in the training data. A float in (0, 0.5]
        sets ``offset_`` so that :meth:`predict` flags at most that
        (weighted) fraction of the training rows: exactly that fraction when
        it is a whole number of rows and the scores are distinct. With
        "auto", ``offset_`` is the score below which 1% of held-out rows
        fall: the rows of the validation split when ``early_stopping=True``,
        scored by the model as it was before it saw them (the flow is not
        trained on them; the reference is scored as fitted before its refit
        to every row), so that about 1% of new rows from the training
        distribution are flagged (a threshold taken on rows the model has
        seen would flag more, since a flexible model scores its own training
        rows higher); the training rows when ``early_stopping=False``.
    preprocessing : {"auto", "quantile"} or None, default="auto"
        "quantile": map each feature to a standard normal through its
        empirical distribution before the flow (see above). None: model the
        features as they are (standardised rows would give the same model:
        the flow's first layer standardises). "auto": fit both and keep the
        quantile map where its held-out log-likelihood as a density of
        ``X``, log-Jacobian included, is higher than the raw flow's by more
        than two standard errors, raw coordinates otherwise (see above): on the
        validation rows, scored by the models from before they saw them (the
        training rows when ``early_stopping=False``). Both candidates use the same
        split and the same dequantization noise, from one seed drawn from
        ``random_state``; fitting takes about twice as long as with a fixed
        choice.
    dequantize : bool, default=True
        Spread each training value uniformly over its cell before the flow,
        with noise drawn from ``random_state`` (see above). Scoring uses the
        rows as they are. As the noise differs from row to row, a weight of 2
        is not the same as two copies of a row drawn with their own noise.
    n_layers : int, default=5
        Number of MAF layers (MADEs).
    hidden_units : int, default=100
        Width of each hidden layer of each MADE.
    n_hidden_layers : int, default=2
        Number of hidden layers in each MADE.
    activation : {"relu", "tanh"}, default="relu"
        Non-linearity of the MADE hidden layers.
    batch_norm : bool, default=True
        Batch normalisation (with its log-determinant) after each MAF layer.
        Not used with the fitted t base (``base="fitted-t"``, or where "auto"
        takes it).
    order : {"reverse", "random"}, default="reverse"
        Variable order of the layers: alternating natural and reversed, or a
        random permutation per layer drawn from ``random_state``.
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

        The default, "auto", lets the data decide here too: after the
        quantile map every marginal is normal and "auto" takes the Gaussian
        base; on raw features it takes a t base where they are heavy-tailed.
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
        A classical density mixed with the flow, as in
        :class:`~sklearn_maf.MAFDensity`: ``p = w_flow * p_flow + (1 - w_flow)
        * p_reference``, in the flow's coordinates (after the preprocessing).
        "gmm": a broad Gaussian, the three full-covariance Gaussian mixtures
        that BIC ranks best among 1 to 10 components (each from one k-means
        start, where :class:`~sklearn_maf.MAFDensity` keeps the best of up
        to ten) and a Gaussian kernel density, each weighted, with the flow,
        by EM on held-out likelihood (stacked density estimation);
        "gaussian": the broad Gaussian alone; None: the flow alone. The
        scores, and with ``preprocessing="auto"`` the choice of
        preprocessing, are those of the mixture: a detector
        that ranks rows by a density is as good as that density, and on small
        data the classical parts are the better density where the flow is
        not (``benchmarks/RESULTS.md``, "ADBench outlier detection"). The
        broad Gaussian ranks rows far from the training rows by their
        distance, where a flow alone can extrapolate arbitrarily.
    min_reference_weight : float in [0, 1), default=1e-4
        The least weight of the broad Gaussian (see
        :class:`~sklearn_maf.MAFDensity`). Ignored when ``reference`` is None.
    alpha : float, default=1e-6
        L2 penalty on the MADE weight matrices, applied as Adam weight decay.
    batch_size : int, default=256
        Rows per mini-batch (capped at the number of training rows); at least 2.
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
        Minimum improvement, in nats per row, of the validation log-likelihood
        (or, without early stopping, of the training loss) that resets the
        patience counter.
    n_iter_no_change : int, default=10
        Patience: epochs without an improvement of at least ``tol`` before
        training stops.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the rows, stop when their mean
        log-likelihood stops improving, and restore the best weights. The
        weights scored and kept are a moving average of the training steps'
        weights (:ref:`maf`, "Training"). The held-out rows also set
        ``offset_`` when ``contamination="auto"``.
    validation_fraction : float, default=0.1
        Fraction of the rows held out for early stopping. With
        ``dequantize=False``, copies of a row are held out or trained on
        together (see :class:`~sklearn_maf.MAFDensity`); with dequantization,
        repeated values are point masses of discrete features, whose rows
        repeat by nature, and rows are split one by one.
    precision : {"float32", "float64"}, default="float32"
        Floating-point precision of training; scoring always runs in float64.
    device : str, default="cpu"
        Torch device for training and inference, e.g. "cpu" or "cuda".
    random_state : int, RandomState instance or None, default=None
        Seeds weight initialisation, random orders, the validation split, batch
        shuffling and the dequantization noise; torch's global random state is
        never used.
    verbose : bool, default=False
        Print the loss (and validation log-likelihood) after each epoch.
    warm_start : bool, default=False
        Continue training the fitted flow on the next call to :meth:`fit`; the
        dropped features, the preprocessing chosen and the marginal transform
        stay those fitted first.

    Attributes
    ----------
    offset_ : float
        The threshold on :meth:`score_samples`: ``decision_function(X) =
        score_samples(X) - offset_``, negative for outliers.
    constant_features_ : ndarray of shape (n_constant_features,), dtype int
        Indices of the features that were constant on the training rows: not
        modelled by the flow; a value outside their training range adds
        ``log(1 / (2 n + 2))`` to the score on ``n`` training rows (step 1).
    module_ : sklearn_maf._nn.MAF
        The fitted flow, over the features that are not constant, in float64
        and eval mode.
    mixture_weights_ : ndarray of shape (1,), (2,) or (4,)
        The weights of the flow, the broad Gaussian and (``reference="gmm"``)
        the Gaussian mixtures and the kernel density (0 where it was left
        out); ``[1.0]`` for the flow alone.
    reference_ : sklearn_maf._nn.mixture.Mixture or None
        The reference parts kept, with their weights relative to each other,
        in the flow's coordinates; None for the flow alone.
    n_features_in_ : int
        Number of features seen during :term:`fit`, constant ones included.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during :term:`fit`, when ``X`` has string
        feature names.
    loss_curve_ : list of float
        Mean training negative log-likelihood per epoch (nats per row).
    validation_scores_ : list of float or None
        Mean validation log-likelihood per epoch; None without early stopping.
    best_validation_score_ : float or None
        Best of ``validation_scores_``, whose weights were restored.
    preprocessing_ : {"quantile"} or None
        The preprocessing of the fitted flow: ``preprocessing``, with "auto"
        resolved.
    preprocessing_scores_ : dict
        Mean held-out log-likelihood (nats per row, as a density of the
        dequantized ``X``, the quantile map's log-Jacobian included) of the
        flow behind each preprocessing that was fitted: both candidates with
        "auto", the one given otherwise. Rows are the validation split, or
        the training rows when ``early_stopping=False``.
    base_ : str
        The base of the fitted flow: ``base``, with "auto" resolved.
    tail_cut_ : float or None
        The cut of the fitted base's power-law tails (see ``tail_cut``); None
        for the plain normal, and for the other bases.
    best_loss_ : float
        Lowest training loss.
    n_iter_ : int
        Number of epochs run, across warm starts.

    See Also
    --------
    sklearn_maf.MAFDensity : The density estimator underneath.
    sklearn.ensemble.IsolationForest : Outlier detection with random trees.
    sklearn.neighbors.LocalOutlierFactor : Outlier detection by local density.
    sklearn.svm.OneClassSVM : Novelty detection with a kernel boundary.

    Notes
    -----
    :class:`~sklearn_maf.MAFDensity`'s ``bounds`` and ``discrete_features``
    are not parameters of the detector: ``dequantize`` handles discrete
    features (on any grid, not only integers) and the quantile preprocessing
    bounded ones.

    The features are dropped and transformed, and the noise is drawn, on the
    training split only (never on validation rows), after the split itself, so
    that with ``preprocessing=None``, ``dequantize=False`` and no constant
    feature the detector's :meth:`score_samples` equals that of a
    :class:`~sklearn_maf.MAFDensity` with the same parameters.

    References
    ----------
    G. Papamakarios, T. Pavlakou and I. Murray, "Masked Autoregressive Flow for
    Density Estimation", NeurIPS 2017, arXiv:1705.07057.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_maf import MAFOutlierDetector
    >>> rng = np.random.RandomState(0)
    >>> X = np.vstack([rng.normal(size=(300, 2)), [[6.0, 6.0], [-7.0, 5.0]]])
    >>> detector = MAFOutlierDetector(
    ...     n_layers=2, hidden_units=16, max_iter=20, contamination=0.01, random_state=0
    ... ).fit(X)
    >>> detector.score_samples(X[:3]).shape
    (3,)
    >>> detector.predict(X[-2:])
    array([-1, -1])
    """

    _parameter_constraints: dict = {
        **{
            name: constraint
            for name, constraint in _BaseMAF._parameter_constraints.items()
            if name not in _NOT_PARAMETERS
        },
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "preprocessing": [StrOptions({"auto", "quantile"}), None],
        "dequantize": ["boolean"],
    }

    # One k-means start for the reference mixtures' EM, where MAFDensity takes
    # up to ten: the starts raise the held-out likelihood, not the ranking of
    # rows (benchmarks/RESULTS.md, "ADBench outlier detection").
    _reference_starts = 1

    def __init__(
        self,
        *,
        contamination="auto",
        preprocessing="auto",
        dequantize=True,
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
        super().__init__(
            n_layers=n_layers,
            hidden_units=hidden_units,
            n_hidden_layers=n_hidden_layers,
            activation=activation,
            batch_norm=batch_norm,
            order=order,
            transformer=transformer,
            n_bins=n_bins,
            tail_bound=tail_bound,
            base=base,
            n_components=n_components,
            tail_cut=tail_cut,
            reference=reference,
            min_reference_weight=min_reference_weight,
            alpha=alpha,
            batch_size=batch_size,
            learning_rate=learning_rate,
            learning_rate_init=learning_rate_init,
            max_iter=max_iter,
            tol=tol,
            n_iter_no_change=n_iter_no_change,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            precision=precision,
            device=device,
            random_state=random_state,
            verbose=verbose,
            warm_start=warm_start,
        )
        self.contamination = contamination
        self.preprocessing = preprocessing
        self.dequantize = dequantize

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Fit the flow to ``X`` and set the threshold ``offset_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : None
            Ignored; present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights: each row counts ``sample_weight`` times, in
            training, in the marginal transform and in the quantile that sets
            ``offset_``.

        Returns
        -------
        self : MAFOutlierDetector
            The fitted estimator.
        """
        continuing = self.warm_start and hasattr(self, "module_")
        if self.preprocessing == "auto" and not continuing:
            return self._fit_auto(X, sample_weight)
        if not continuing:
            self.preprocessing_ = self.preprocessing
        held_out = self._fit_flow(X, sample_weight)
        self.preprocessing_scores_ = {self.preprocessing_: _weighted_mean(*held_out)}
        return self

    def _fit_flow(self, X, sample_weight):
        """Fit the flow behind ``preprocessing_`` and set ``offset_``.

        Returns the held-out rows' log-likelihoods as a density of ``X`` and
        their weights (see :meth:`_held_out_log_likelihood`).
        """
        train, validation = self._fit(X, sample_weight)
        X = self._validate_fitted_input(X)
        held_out_rows = train if validation is None else validation
        weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
        # the held-out rows scored by the model that has not seen them: with
        # the reference as it was before its refit to every row
        fitted, self.reference_ = self.reference_, self.__dict__.pop("_unrefitted")
        try:
            held_out = self._held_out_log_likelihood(X, held_out_rows, weight)
            held_out_scores = (
                self._validated_log_density(X[held_out_rows])
                if self.contamination == "auto"
                else None  # the threshold comes from the fitted model's scores of every row
            )
        finally:
            self.reference_ = fitted
            del self._dequantized
        if self.contamination == "auto":
            scores, rows, fraction = held_out_scores, held_out_rows, _AUTO_FRACTION
        else:
            scores, rows, fraction = self._validated_log_density(X), slice(None), self.contamination
        self.offset_ = _weighted_threshold(scores, weight[rows], fraction)
        return held_out

    def _duplicate_groups(self, X, context, continuing):
        # dequantize=True treats every repeated value as a point mass of a
        # discrete feature, whose rows repeat by nature: not grouped
        if self.dequantize:
            return None
        return _row_groups(X)

    def _fit_reference(self, X, weight, train, validation, context, seed, flow_correction=None):
        # the reference before its refit, for the held-out rows (see _fit_flow)
        self._unrefitted = super()._fit_reference(X, weight, train, validation, context, seed, flow_correction)

    def _fit_auto(self, X, sample_weight):
        """``preprocessing="auto"``: fit a flow behind each candidate and keep one.

        The candidates share one seed drawn from ``random_state``, hence the
        same validation rows and the same dequantization noise, so that their
        held-out log-likelihoods (as densities of ``X``) are paired. The
        quantile map is kept only where it is clearly better (see
        :func:`_clearly_better`): it is a model fitted to the training rows,
        with up to about ``2 * _MAX_QUANTILES`` knots per feature, where raw
        coordinates need nothing fitted, so a difference within the noise of
        the held-out rows does not justify it.
        """
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        fitted = []
        for choice in _CANDIDATES:
            candidate = clone(self).set_params(preprocessing=choice, random_state=seed, warm_start=False)
            unfitted = set(vars(candidate))
            candidate.preprocessing_ = choice
            held_out = candidate._fit_flow(X, sample_weight)
            fitted.append((candidate, set(vars(candidate)) - unfitted, held_out))
        (quantile, *_, held_out_quantile), (raw, *_, held_out_raw) = fitted
        best, state, _ = fitted[0] if _clearly_better(held_out_quantile, held_out_raw) else fitted[1]
        for key in [key for key in vars(self) if key.endswith("_") and not key.startswith("_")]:
            delattr(self, key)  # a refit leaves nothing of an earlier fit behind
        vars(self).update({key: getattr(best, key) for key in state})
        self.preprocessing_scores_ = {
            "quantile": _weighted_mean(*held_out_quantile),
            None: _weighted_mean(*held_out_raw),
        }
        return self

    def _held_out_log_likelihood(self, X, rows, sample_weight):
        """Log-likelihood, in the units of ``X``, of each (dequantized) row in ``rows``, and its weight.

        The log-Jacobian of the marginal transform is included, so that flows
        fitted behind different preprocessings are compared as densities of
        the same variable, and the log-probability of the constant features'
        values. ``X`` is the validated training data, every feature;
        ``sample_weight`` has a weight for every row of it.
        """
        dequantized = self._dequantized[rows]
        log_density = self._log_mass(self._model_log_prob, self._marginals.transform(dequantized))
        log_density += self._marginals.log_jacobian(dequantized) + self._constant_log_prob(X[rows])
        return log_density, sample_weight[rows]

    def score_samples(self, X):
        """Log-density of each row under the fitted model (flow and reference); higher is more typical.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.

        Returns
        -------
        scores : ndarray of shape (n_samples,), dtype float64
            The log-density of each row after the preprocessing (with
            ``preprocessing=None``, in the units of ``X``). Rows so extreme that
            the density underflows get ``-inf``, never NaN.
        """
        return self._log_density(X)

    def decision_function(self, X):
        """Shifted score: negative for outliers, positive for inliers.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.

        Returns
        -------
        decision : ndarray of shape (n_samples,), dtype float64
            ``score_samples(X) - offset_``.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """Label each row as an inlier (+1) or an outlier (-1).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to label.

        Returns
        -------
        labels : ndarray of shape (n_samples,), dtype int
            -1 where ``decision_function(X) < 0``, +1 elsewhere.
        """
        return np.where(self.decision_function(X) < 0, -1, 1)

    def sample(self, n_samples=1, random_state=None):
        """Draw rows from the fitted density, in the units of the training data.

        Parameters
        ----------
        n_samples : int, default=1
            Number of rows to draw.
        random_state : int, RandomState instance or None, default=None
            Seeds the draw; the same value gives the same rows.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), dtype float64
            The drawn rows, mapped back through the marginal transform, with
            the constant features at their training value. After
            dequantization the rows are continuous: discrete features take
            values anywhere in their cells.
        """
        Z = super().sample(n_samples, random_state)
        X = np.empty((Z.shape[0], self.n_features_in_))
        X[:, self.constant_features_] = self._constant_values
        X[:, self._modelled] = self._marginals.inverse_transform(Z)
        return X

    # ----------------------------------------------------------------- helpers

    def _flow_features(self, X, sample_weight, train, rng, continuing):
        """Drop constant features, dequantize and transform the others (the hook of ``_fit``)."""
        if not continuing:
            rows = train[sample_weight[train] > 0]
            loc, scale = _weighted_moments(X[rows], sample_weight[rows])
            # a single value is constant whatever the round-off of its mean
            # (a column summed with a stride can drift by many ulps)
            single = np.flatnonzero(np.all(X[rows] == X[rows[0]], axis=0))
            constant = np.union1d(_constant_features(loc, scale), single).astype(int)
            if constant.size == X.shape[1]:
                raise ValueError(
                    f"All {X.shape[1]} features are constant on the training rows: "
                    "there is no density to learn."
                )
            self.constant_features_ = constant
            self._constant_values = X[rows[0], constant]
            constant_values = X[np.ix_(rows, constant)]
            self._constant_range = (constant_values.min(axis=0), constant_values.max(axis=0))
            self._n_training_rows = float(sample_weight[rows].sum())
            self._modelled = np.setdiff1d(np.arange(X.shape[1]), constant)
            self._marginals = _Marginals(self.preprocessing_ == "quantile").fit(
                X[rows][:, self._modelled], sample_weight[rows]
            )
        X = X[:, self._modelled]
        if self.dequantize:
            X = _dequantize(X, X[train[sample_weight[train] > 0]], rng)
        self._dequantized = X  # for the held-out log-likelihood, deleted by fit
        return self._marginals.transform(X)

    def _log_density(self, X):
        return self._validated_log_density(self._validate_fitted_input(X))

    def _validated_log_density(self, X):
        """Log-density of validated rows ``X`` (every feature, constant ones included)."""
        modelled = self._log_mass(self._model_log_prob, self._marginals.transform(X[:, self._modelled]))
        return modelled + self._constant_log_prob(X)

    def _constant_log_prob(self, X):
        """Log-probability of each row's values on the constant features (see ``constant_features_``).

        A value outside the feature's training range is an event that the
        training rows never showed: Krichevsky and Trofimov's estimate gives it
        the probability ``1 / (2 n + 2)`` on ``n`` training rows (as the
        reference's least share, :mod:`sklearn_maf._reference`), and a value
        inside it the rest. The features count as independent of each other
        and of the modelled ones.
        """
        constant = X[:, self.constant_features_]
        low, high = self._constant_range
        unseen = ((constant < low) | (constant > high)).sum(axis=1)
        p = 1.0 / (2.0 * self._n_training_rows + 2.0)
        return unseen * np.log(p) + (constant.shape[1] - unseen) * np.log1p(-p)


class _Marginals:
    """Per-feature map to a standard normal through the empirical distribution.

    With ``gaussianize=False`` the map is the identity. Otherwise the
    distribution function of each feature is that of its training values
    spread over their cells (linear between the cell boundaries), shrunk
    towards 1/2 by 1e-7 so that it never reaches 0 or 1, and composed with the
    standard-normal quantile function; beyond the training range the map
    continues linearly with the slope of the straight line from the median to
    the end knot.
    """

    def __init__(self, gaussianize):
        self.gaussianize = gaussianize

    def fit(self, X, weight):
        if not self.gaussianize:
            return self
        self.knots, self.levels, self.slopes = [], [], []
        for column in X.T:
            boundaries, cumulative = _cells(column, weight)
            total = cumulative[-1]
            levels = (cumulative + 1e-7 * total) / (total * (1 + 2e-7))
            keep = _thin(levels)
            boundaries, levels = boundaries[keep], levels[keep]
            z = ndtri(levels)
            median = np.interp(0.5, levels, boundaries)
            self.knots.append(boundaries)
            self.levels.append(levels)
            self.slopes.append((-z[0] / (median - boundaries[0]), z[-1] / (boundaries[-1] - median)))
        return self

    def transform(self, X):
        if not self.gaussianize:
            return X
        Z = np.empty_like(X)
        for j, (knots, levels, (low, high)) in enumerate(zip(self.knots, self.levels, self.slopes)):
            x = X[:, j]
            z = ndtri(np.interp(x, knots, levels))
            z_low, z_high = ndtri(levels[0]), ndtri(levels[-1])
            z = np.where(x < knots[0], z_low + (x - knots[0]) * low, z)
            Z[:, j] = np.where(x > knots[-1], z_high + (x - knots[-1]) * high, z)
        return Z

    def log_jacobian(self, X):
        """``log |det dZ/dX|`` of :meth:`transform` for each row of ``X`` (0 for the identity).

        Inside the knots each feature's map is ``ndtri`` of a piecewise-linear
        distribution function, whose slope is the cell's mass over its width;
        beyond them the map is linear with its end slopes.
        """
        if not self.gaussianize:
            return np.zeros(X.shape[0])
        total = np.zeros(X.shape[0])
        for j, (knots, levels, (low, high)) in enumerate(zip(self.knots, self.levels, self.slopes)):
            x = X[:, j]
            cell = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, knots.size - 2)
            density = (levels[cell + 1] - levels[cell]) / (knots[cell + 1] - knots[cell])
            z = ndtri(np.interp(x, knots, levels))
            with np.errstate(divide="ignore"):  # an empty cell: density 0, log -inf
                inside = np.log(density) + 0.5 * z**2 + 0.5 * np.log(2 * np.pi)
            total += np.where(x < knots[0], np.log(low), np.where(x > knots[-1], np.log(high), inside))
        return total

    def inverse_transform(self, Z):
        if not self.gaussianize:
            return Z
        X = np.empty_like(Z)
        for j, (knots, levels, (low, high)) in enumerate(zip(self.knots, self.levels, self.slopes)):
            z = Z[:, j]
            x = np.interp(ndtr(z), levels, knots)
            z_low, z_high = ndtri(levels[0]), ndtri(levels[-1])
            x = np.where(z < z_low, knots[0] + (z - z_low) / low, x)
            X[:, j] = np.where(z > z_high, knots[-1] + (z - z_high) / high, x)
        return X


def _cells(values, weight):
    """Cell boundaries of the distinct values and the weight below each boundary.

    A value's cell reaches halfway to its neighbours; the outer cells are as
    wide on the outside as on the inside. Needs at least two distinct values.
    """
    distinct, index = np.unique(values, return_inverse=True)
    mass = np.bincount(index.ravel(), weights=weight, minlength=distinct.size)
    return _boundaries(distinct), np.concatenate([[0.0], np.cumsum(mass)])


def _boundaries(distinct):
    """Boundaries of the cells of increasing distinct values (at least two)."""
    gaps = np.diff(distinct)
    return np.concatenate(
        [[distinct[0] - gaps[0] / 2], distinct[:-1] + gaps / 2, [distinct[-1] + gaps[-1] / 2]]
    )


def _thin(levels):
    """Indices of at most about ``2 * _MAX_QUANTILES`` knots of an increasing CDF.

    Keeps, for each of ``_MAX_QUANTILES`` evenly spaced levels, both ends of
    the interval that holds it: a cell with a large mass stays exact.
    """
    if levels.size <= 2 * _MAX_QUANTILES:
        return np.arange(levels.size)
    upper = np.searchsorted(levels, np.linspace(levels[0], levels[-1], _MAX_QUANTILES))
    upper = np.clip(upper, 1, levels.size - 1)
    return np.unique(np.concatenate([[0, levels.size - 1], upper - 1, upper]))


def _dequantize(X, reference, rng):
    """Spread each value of ``X`` uniformly over its cell among the values of ``reference``.

    A value beyond the cells gets noise as wide as the outer cell, centred on
    it, so that it stays as far out as it was.
    """
    X = X.copy()
    for j in range(X.shape[1]):
        distinct = np.unique(reference[:, j])
        if distinct.size < 2:
            continue  # a feature found constant on later rows of a warm start
        boundaries = _boundaries(distinct)
        x = X[:, j]
        cell = np.clip(np.searchsorted(boundaries, x, side="right") - 1, 0, boundaries.size - 2)
        start, width = boundaries[cell], boundaries[cell + 1] - boundaries[cell]
        outside = (x < boundaries[0]) | (x >= boundaries[-1])
        start = np.where(outside, x - width / 2, start)
        X[:, j] = start + rng.uniform(size=x.shape[0]) * width
    return X


def _weighted_mean(values, weight):
    """Weighted mean of ``values``; -inf where a row of positive weight is -inf."""
    positive = weight > 0
    if np.any(np.isneginf(values[positive])):
        return -np.inf
    return float(np.average(values[positive], weights=weight[positive]))


def _clearly_better(held_out, reference, n_standard_errors=2.0):
    """Whether the per-row held-out log-likelihoods ``held_out`` beat ``reference`` beyond noise.

    Both are ``(log_likelihoods, weights)`` of the same rows. The mean of the
    paired differences must exceed ``n_standard_errors`` of its standard
    error; a row that only one of the two gives -inf decides by itself.
    """
    (a, weight), (b, _) = held_out, reference
    positive = weight > 0
    a, b, weight = a[positive], b[positive], weight[positive]
    a_inf, b_inf = np.isneginf(a), np.isneginf(b)
    if a_inf.any() or b_inf.any():
        return not a_inf.any()
    difference = a - b
    weight = weight / weight.sum()
    mean = np.sum(weight * difference)
    standard_error = np.sqrt(np.sum(weight**2 * (difference - mean) ** 2))
    return bool(mean > n_standard_errors * standard_error)


def _weighted_threshold(scores, weight, fraction):
    """A threshold that puts at most ``fraction`` of the weight strictly below it.

    The distinct scores are taken in increasing order while their cumulative
    weight stays within ``fraction`` of the total; the threshold lies halfway
    between the last score taken and the next one, never on a score, so that
    round-off cannot move a row across it. Rows of equal score (or repeated
    rows, whose scores may differ in the last bits) fall on the same side, and
    an integer weight acts as that many copies of the row.
    """
    positive = weight > 0
    distinct, mass = _merge_ties(scores[positive], weight[positive])
    cumulative = np.cumsum(mass)
    # a relative tolerance, so that 0.1 * 300 rows flags 30 despite round-off
    taken = int(np.searchsorted(cumulative, fraction * cumulative[-1] * (1 + 1e-12), side="right"))
    taken = min(taken, distinct.size - 1)
    above = distinct[taken]
    if taken == 0:
        below = distinct[0] - (distinct[1] - distinct[0] if distinct.size > 1 else 1.0)
    else:
        below = distinct[taken - 1]
    if not np.isfinite(below):
        return float(above - 1.0)
    return float((below + above) / 2)


def _merge_ties(values, weight, rtol=1e-9):
    """Distinct values, merging those equal up to ``rtol``, and the weight of each.

    A row scored twice, or two copies of a row, can differ in the last bits
    (the order of floating-point sums depends on the batch): they count as one.
    """
    order = np.argsort(values, kind="stable")
    values, weight = values[order], weight[order]
    with np.errstate(invalid="ignore"):  # -inf - -inf: NaN, not a new value
        gap = np.diff(values) > rtol * np.maximum(1.0, np.abs(values[1:]))
    new = np.concatenate([[True], gap])
    group = np.cumsum(new) - 1
    return values[new], np.bincount(group, weights=weight)
