"""MAFDensity: a Masked Autoregressive Flow behind the scikit-learn density API."""

import numpy as np
from sklearn.base import DensityMixin, _fit_context
from sklearn.utils._tags import TransformerTags

from ._base import _UnconditionalMAF
from ._nn import EllipticalT, StudentT


class MAFDensity(DensityMixin, _UnconditionalMAF):
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
        exact statistics of the training split (never validation rows). Not
        used with the fitted t base (``base="fitted-t"``, or where "auto"
        takes it).
    order : {"reverse", "random"}, default="reverse"
        Variable order of the layers: alternating natural and reversed, as in
        the paper, or a random permutation per layer drawn from
        ``random_state``.
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
        ``tail_cut_`` (by :meth:`partial_fit`, on its sample of the rows
        streamed). A number:
        that cut, from the validation score on. None: the plain normal
        throughout. Ignored by the other bases.
    reference : {"gmm", "gaussian"} or None, default="gmm"
        A classical density mixed with the flow, ``p = w_flow * p_flow + (1 -
        w_flow) * p_reference``, in the coordinates after the fixed layers
        (``bounds``, the standardisation), so on the same support. "gmm": a
        broad Gaussian (Ledoit-Wolf covariance, with a 1% share of the plain
        maximum-likelihood Gaussian), the full-covariance Gaussian mixtures
        that BIC ranks best among 1 to 10 components (the best three, each
        weighted by the held-out rows, held as one mixture; each the best EM
        run from up to ten k-means starts on small data), and a Gaussian
        kernel density on up to 20,000 of the rows (evenly spaced beyond),
        with the bandwidth of highest leave-one-out likelihood (kept only
        where the validation rows give it a weight of at least 0.001: it
        scores a row in a time that grows with its rows); "gaussian": the
        broad Gaussian alone. The weights of the flow and of each part are
        fitted by EM on the validation rows (the training rows without early
        stopping), then the parts are refitted on all rows (stacked density
        estimation, Smyth & Wolpert, 1999); on ``n`` validation rows the
        parts together keep at least ``1 / (2 n + 2)`` of the weight, which a
        handful of rows would otherwise take from them by chance. So where
        the data are small or plainly Gaussian-mixture-like, the model keeps
        the classical answer, and where the flow is better it keeps the flow:
        the choice is made by held-out likelihood on each data set. None: the
        flow alone.
        ``partial_fit`` trains the flow alone (``reference_`` is None).
    min_reference_weight : float in [0, 1), default=1e-4
        The least weight of the broad Gaussian. Every row then scores at least
        ``log(min_reference_weight)`` (-9.2 nats at the default) plus its
        log-density under that Gaussian, and -13.8 nats at the default plus
        its log-density under the maximum-likelihood Gaussian, whatever the
        flow does far from the training rows, at a cost of at most ``-log(1 -
        min_reference_weight)`` nats per row. Ignored when ``reference`` is None.
    bounds : array-like of shape (n_features, 2), default=None
        Support ``(low, high)`` of each modelled feature, with ``-np.inf`` /
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
        Rows per mini-batch (capped at the number of training rows); at least
        2, so batch normalisation never sees the statistics of one row.
    learning_rate : {"adaptive", "constant"}, default="adaptive"
        Learning-rate schedule. "adaptive": start at ``learning_rate_init`` and
        halve the rate each time 3 consecutive epochs fail to improve the
        validation log-likelihood (or, without early stopping, the training
        loss) by ``tol``, so that the weights settle before training stops (as
        scikit-learn's MLP does for SGD, with its own constants). "constant":
        ``learning_rate_init`` throughout. :meth:`partial_fit` runs the same
        schedule on the training loss of each pass over its stream.
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
        weights (:ref:`maf`, "Training").
    validation_fraction : float, default=0.1
        Fraction of the rows held out for early stopping. Copies of a row
        (equal in every feature) are held out or trained on together, so that
        the held-out rows are rows the model has not seen; rows of features
        declared in ``discrete_features`` alone repeat by nature and are split
        one by one.
    precision : {"float32", "float64"}, default="float32"
        Floating-point precision of training (float32 matrix products are more
        than twice as fast on a CPU). Scoring, transforming and sampling always
        run in float64, so results do not depend on how rows are batched.
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
    discrete_features_ : ndarray of shape (n_features,), dtype bool
        Which modelled features are treated as integer-valued.
    loss_curve_ : list of float
        Mean training negative log-likelihood per epoch (nats per row), across
        warm starts.
    validation_scores_ : list of float or None
        Mean validation log-likelihood per epoch; None without early stopping.
    best_validation_score_ : float or None
        Best of ``validation_scores_``, whose weights were restored.
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
        Number of epochs run, across warm starts (``len(loss_curve_)``).

    See Also
    --------
    sklearn.neighbors.KernelDensity : Kernel density estimation.
    sklearn.mixture.GaussianMixture : Gaussian mixture density.

    Notes
    -----
    With one feature there is nothing to condition on, and each layer is an
    affine map with learned constants: a 1-D MAF with the Gaussian base is a
    Gaussian, and with the t base a location-scale Student t (which
    ``base="auto"`` takes for a heavy-tailed feature).

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
        self._fit(X, sample_weight)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, sample_weight=None):
        """Train for one epoch over ``X``, continuing from earlier calls.

        For data that arrive in chunks or do not fit in memory, as
        :meth:`sklearn.neural_network.MLPRegressor.partial_fit`: each call makes
        one pass of shuffled mini-batches over ``X`` and carries what
        :meth:`fit` keeps from epoch to epoch to the next call, so that
        streaming the same rows for the same number of passes gives the model
        of ``fit(X_all, max_iter=n_passes)`` with ``early_stopping=False``
        (exactly, when each call gets all the rows):

        - Adam's moments, the limit on the gradient norm, and the moving
          average of the weights, which is what the fitted flow holds;
        - the learning-rate schedule (``learning_rate="adaptive"``), run at the
          end of each pass on the pass's mean training loss. A call whose
          chunk (values, weights and shape) was already seen in the current
          pass starts the next pass, so chunks may come in any order;
          a stream that never repeats a chunk is one long pass, at
          ``learning_rate_init``;
        - a uniform sample (reservoir) of at most 10,000 rows of the first
          pass (of all the rows of a stream that never repeats), on which each
          call sets the fitted flow's batch-norm statistics and chooses its
          tails (``tail_cut="auto"``), as ``fit`` does on its training rows.
          This costs two passes of scoring over these rows per call, more
          than training a chunk of a few thousand rows: chunks of 100,000
          rows or more make it a small part. There is no validation split
          and no early stopping.

        The first call fixes the standardisation layer (and the base of
        ``base="auto"``) from its ``X``, so give it a representative chunk.
        The state travels with a pickle (a stream continues exactly after
        loading, also where Dask moves the estimator between workers);
        :meth:`fit` discards it and starts over (or, with
        ``warm_start=True``, continues the flow with a fresh optimizer), and
        a later ``partial_fit`` then starts a new stream from the fitted flow.
        The user guide's "Large data" page shows streams from disk through
        :class:`dask_ml.wrappers.Incremental`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A chunk of training data (at least 2 rows).
        y : None
            Ignored; present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the rows' log-likelihoods.

        Returns
        -------
        self : MAFDensity
            The updated estimator.
        """
        return self._partial_fit(X, sample_weight)

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
        return self._log_density(X)

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

    def transform(self, X):
        """Map rows to the latent space: the output of the last MAF layer.

        With ``base="gaussian"`` the model is standard normal there (after
        the fitted power-law tails of ``tail_cut_``, when there are any:
        the identity inside the cut). With
        ``base="student-t"`` the output of the last layer, independent t's
        under the model, is also mapped feature by feature through the t
        distribution function and the normal quantile, so that the latents are
        independent standard normals for this base too; with
        ``base="elliptical-t"`` or ``"fitted-t"``, a multivariate t under the model, its radius
        is mapped through its distribution function and the chi quantile,
        the direction kept, to the same effect. With ``base="mog"`` it
        is the MADE MoG base density, which is neither Gaussian nor independent
        across coordinates. Either way the map is the exact bijection that
        :meth:`inverse_transform` undoes. Discrete features enter at the middle
        of their dequantisation cell, ``k + 0.5``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows in data space.

        Returns
        -------
        U : ndarray of shape (n_samples, n_features), dtype float64
            Latent coordinates; for data drawn from a model with
            ``base="gaussian"``, ``"student-t"``, ``"elliptical-t"`` or
            ``"fitted-t"`` they are independent standard normals.
        """
        X = self._validate_fitted_input(X) + 0.5 * self.discrete_features_
        base = self.module_.base
        if isinstance(base, (StudentT, EllipticalT)):
            return self._map_rows(lambda x: base.normal_scores(self.module_(x)[0]), self.n_features_in_, X)
        return self._map_rows(lambda x: self.module_(x)[0], self.n_features_in_, X)

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

    def inverse_transform(self, X):
        """Map latent coordinates back to data space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Latent coordinates, as returned by :meth:`transform` (named ``X``
            as in scikit-learn's transformers, so it is not routed metadata).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features), dtype float64
            Rows in data space; ``inverse_transform(transform(X))`` returns ``X``.
            Discrete features are rounded down to their integer.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn_maf import MAFDensity
        >>> X = np.random.RandomState(0).normal(size=(200, 3))
        >>> maf = MAFDensity(n_layers=2, hidden_units=8, max_iter=3, random_state=0)
        >>> U = maf.fit(X).transform(X)
        >>> U.shape
        (200, 3)
        >>> bool(np.allclose(maf.inverse_transform(U), X))
        True
        """
        U = self._validate_fitted_input(X)
        base = self.module_.base
        if isinstance(base, (StudentT, EllipticalT)):
            U = self._map_rows(base.from_normal_scores, self.n_features_in_, U)
        X = self._map_rows(lambda u: self.module_.inverse(u)[0], self.n_features_in_, U)
        return self._floor_discrete(X)
