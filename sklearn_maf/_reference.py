"""The classical reference density that the estimators mix with the flow (``reference``).

A flow extrapolates by its layers alone: far from the training rows, or on a
small data set whose validation split is a handful of rows, it can put almost
no density where a plain Gaussian puts plenty. The estimators therefore model

``p(x) = w_flow * p_flow(x) + (1 - w_flow) * p_reference(x)``

where ``p_reference`` is a mixture of classical densities in the coordinates
after the flow's fixed layers (bounds, standardisation, whitening), with their
log-determinant, so it lives on the same support as the flow. Its parts: a
broad part (the Ledoit-Wolf Gaussian, with a small share of the plain
maximum-likelihood Gaussian) and, for ``reference="gmm"``, the
``_STACKED_MIXTURES`` Gaussian mixtures that BIC ranks best and a Gaussian
kernel density whose bandwidth maximises the leave-one-out likelihood: the
classical answers. The weights
are fitted by EM to held-out likelihoods (stacked density estimation, Smyth
& Wolpert, 1999) so that each rests on as many rows as it can: the flow's on
the validation rows, the only rows it has not seen, each scored at the epoch
that early stopping keeps without it; the parts' weights among
themselves on those and on up to ``_KERNEL_QUERIES`` training rows, each
scored as if held out (leave-one-out: exactly for the kernel density, by one
M-step's downdate for the Gaussians, and for the mixtures the response of the
other rows' responsibilities over the EM iterations the fit took). The fitted
model holds the stacked mixtures as one mixture part. The combination is chosen by held-out
likelihood on every data set. The broad part keeps at least
``min_reference_weight``, which bounds every row's score from below by
``log(min_reference_weight)`` plus its score under the Ledoit-Wolf Gaussian,
and by ``log(min_reference_weight * _ML_SHARE)`` plus its score under the
maximum-likelihood one, at a cost of at most ``-log(1 -
min_reference_weight)`` nats per row. The parts together keep at least
``1 / (2 n + 2)`` on ``n`` held-out rows, which a handful of rows would
otherwise take from them by chance (:func:`flow_and_reference_weights`).
A kernel density
scores a row in a time that grows with its points, so it is kept only where
the held-out rows give it a weight of at least ``_MIN_KERNEL_WEIGHT``.

The fits work on float64 numpy arrays and return the parts as the torch
modules of :mod:`sklearn_maf._nn.mixture`, which hold each density's formula;
row weights count as repetitions (a weight of 2 is the row twice), as
everywhere in the estimators.
"""

import math

import numpy as np
import torch
from scipy import optimize
from sklearn.cluster import KMeans

from ._nn.mixture import GaussianKernelDensity, GaussianMixtureDensity, Mixture

__all__ = ["fit_reference", "flow_and_reference_weights", "merged_mixtures", "refit_reference", "reference_mixture"]

# Components the BIC search may try; the rows the parts are fitted on: evenly
# spaced ones beyond this, as the ECME fit of the t base does.
_MAX_COMPONENTS = 10
_MAX_ROWS = 20_000
# The final refit (refit_reference) takes more: the mixtures' error shrinks
# with every row, and GaussianMixture fits all of them (RESULTS.md, "Beyond
# 20,000 rows"). Its rows are bounded by the memory of an EM iteration
# instead: about three float64 arrays of K x n x D (each component's whitened
# rows and their squares, the M-step's weighted rows) within _REFIT_BYTES,
# and never fewer than _MAX_ROWS.
_REFIT_BYTES = 2**29
# The BIC search runs on at most this many rows, fewer where each EM
# iteration costs more than about _SEARCH_WORK multiply-adds per component
# (n D^2); the chosen mixture is then refitted on all rows. Together with the
# kernel density's caps below, the reference costs a few seconds at any size.
_SEARCH_ROWS = 5_000
_SEARCH_WORK = 50_000_000
# EM from a single k-means start ends in one of its local optima: which one
# is luck, and on a few hundred rows it moves the held-out likelihood by more
# than a nat per row. For each number of components the search runs EM from
# up to _MAX_STARTS k-means starts (k-means' classical n_init), side by side
# in one batch, and keeps the run of highest training likelihood: as many
# starts as make no more rows than the search takes on large data
# (search_rows), so it never costs more than one start there does: ten
# starts on a few hundred rows, one from a few thousand. (Biernacki, Celeux &
# Govaert's short runs, a few iterations from each start and the best
# continued, were measured: they misjudged the starts where components settle
# on a repeated value late; RESULTS.md, "Broad density suite".)
_MAX_STARTS = 10
_SEED_RANGE = 2**31 - 1
# Covariance ridge, in standardised units (unit variances), as
# sklearn.mixture.GaussianMixture's reg_covar.
_REG_COVAR = 1e-6
# The kernel density holds the rows the BIC search's parts are fitted to,
# at most _MAX_ROWS (evenly spaced beyond; the final refit's mixtures may
# take more): its scoring cost per row is proportional to them, but where
# it carries weight, 5,000 rows (evenly spaced) scored 0.04 to 1.2 nats per
# row below all of them, the bandwidth chosen on them too (RESULTS.md,
# "Broad density suite"). Its bandwidth is chosen on the leave-one-out
# likelihood of at most _KERNEL_QUERIES of them, between these multiples
# of Scott's factor.
_MAX_KERNEL_ROWS = _MAX_ROWS
_KERNEL_QUERIES = 500
_KERNEL_RANGE = (1e-2, 3.0)
# Share of the maximum-likelihood Gaussian in the broad part (the rest is
# the Ledoit-Wolf Gaussian): with min_reference_weight, it bounds every
# row's score from below by log(min_reference_weight * _ML_SHARE) plus its
# score under the plain Gaussian fit too, where shrinkage costs most (few
# rows per feature), at a cost of at most -log(1 - _ML_SHARE) nats per row.
_ML_SHARE = 0.01
# Least stacking weight for which the kernel density is kept: below it, its
# scoring cost (proportional to its rows) buys at most ~0.001 nats per row.
_MIN_KERNEL_WEIGHT = 1e-3
# The reference's least share of the stack, KT / (n + 2 KT) on n held-out
# rows: Krichevsky and Trofimov's estimate of a probability that n trials
# never showed (flow_and_reference_weights).
_KT = 0.5
# The BIC search's best mixtures that are stacked, each a part of its own:
# the BIC of neighbouring numbers of components differs by less than its
# noise on a few hundred rows (Cardiotocography: 2 components on 450 rows,
# 4 on 500), and the held-out weights take what each adds. More cost a refit
# each and let the weights chase noise (RESULTS.md, "Broad density suite").
_STACKED_MIXTURES = 3
# Multiply-adds, about half a second, that the leave-one-out's correction for the
# responsibilities' response may take per mixture (_responsibility_response).
_RESPONSE_WORK = 1e9


def _logsumexp_rows(a):
    """``log(sum(exp(a), axis=-1))``: scipy's ``logsumexp`` without its checks, which the EM loops call hundreds of times."""
    top = a.max(axis=-1)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - top[..., None]).sum(axis=-1)) + top


def ledoit_wolf(Z, weight):
    """Weighted mean and Ledoit-Wolf shrunk covariance of the rows ``Z``.

    The shrinkage towards ``trace(S) / D * I`` is Ledoit & Wolf's (2004)
    estimate, with the rows counted ``weight`` times; with unit weights it is
    :func:`sklearn.covariance.ledoit_wolf`'s. Positive definite on any data,
    also with fewer rows than features.
    """
    n = weight.sum()
    mean = weight @ Z / n
    centred = Z - mean
    S = (weight[:, None] * centred).T @ centred / n
    mu = np.trace(S) / S.shape[0]
    delta = np.sum((S - mu * np.eye(S.shape[0])) ** 2)
    beta = (weight @ np.sum(centred**2, axis=1) ** 2 - n * np.sum(S**2)) / n**2
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    covariance = (1 - shrinkage) * S + shrinkage * mu * np.eye(S.shape[0])
    return mean, covariance + _REG_COVAR * np.eye(S.shape[0])


def broad_gaussian(Z, weight):
    """The broad part: the Ledoit-Wolf Gaussian of the rows, and with weight ``_ML_SHARE`` their maximum-likelihood Gaussian.

    Both have the rows' mean; the second the sample covariance plus
    ``_REG_COVAR``. Its share makes the part's density at any row at least
    ``_ML_SHARE`` times the plain Gaussian fit's, and at least ``1 -
    _ML_SHARE`` times the shrunk one's.
    """
    mean, shrunk = ledoit_wolf(Z, weight)
    centred = Z - mean
    sample = (weight[:, None] * centred).T @ centred / weight.sum() + _REG_COVAR * np.eye(Z.shape[1])
    return _gaussians(np.array([1 - _ML_SHARE, _ML_SHARE]), np.stack([mean, mean]), np.stack([shrunk, sample]))


def _gaussians(weights, means, covariances):
    """The torch density of a Gaussian mixture given by numpy arrays."""
    covariances = torch.as_tensor(covariances)
    return GaussianMixtureDensity(torch.as_tensor(weights), torch.as_tensor(means), torch.linalg.cholesky(covariances))


def _component_log_prob(Z, means, covariances):
    """Log-density of each row under each (unweighted) component, shape (n, K)."""
    density = _gaussians(np.ones(means.shape[0]), means, covariances)
    with torch.no_grad():
        return density.component_log_prob(torch.as_tensor(Z), weighted=False).numpy()


def _weighted_gaussians(Z, weight, responsibilities):
    """M-step: weights, means and covariances of the components (rows counted ``weight`` times)."""
    mass = responsibilities * weight[:, None]
    totals = mass.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = mass.T @ Z / totals[:, None]
    covariances = np.empty((means.shape[0], Z.shape[1], Z.shape[1]))
    for k in range(means.shape[0]):
        centred = Z - means[k]
        covariances[k] = (mass[:, k, None] * centred).T @ centred / totals[k]
        covariances[k] += _REG_COVAR * np.eye(Z.shape[1])
    return totals / totals.sum(), means, covariances


def gaussian_mixture(
    Z, weight, n_components, random_state, max_iter=100, tol=1e-3, start=None, n_starts=1, return_n_iter=False
):
    """Weighted EM for a full-covariance Gaussian mixture, started from k-means or from ``start``.

    As :class:`sklearn.mixture.GaussianMixture` (``init_params="kmeans"``,
    ``reg_covar``, the same convergence test on the mean log-likelihood,
    ``n_init``), which takes no sample weights. ``n_starts`` runs start from
    k-means with seeds ``random_state``, ``random_state + 1``, ..., side by
    side as one mixture of ``n_starts * n_components`` components whose
    weights are normalised start by start (one E- and M-step for the runs not
    yet converged), and the run of highest likelihood is returned. ``start``,
    a fitted :class:`GaussianMixtureDensity` of ``n_components``, starts EM
    from its responsibilities instead (a fit on some of the rows continued
    on all). Returns ``(weights, means, covariances, log_likelihood)``, the
    last the weighted total over the rows, and with ``return_n_iter=True``
    the iterations (E- and M-steps) that the run returned took.
    """
    n, n_features = Z.shape
    if n_components == 1:
        responsibilities = np.ones((n, 1, 1))
    elif start is not None:
        responsibilities = _responsibilities(start, Z)[:, None, :]
    else:
        labels = [
            KMeans(n_components, n_init=1, random_state=(random_state + s) % _SEED_RANGE).fit(
                Z, sample_weight=weight
            ).labels_
            for s in range(n_starts)
        ]  # fmt: skip
        responsibilities = np.eye(n_components)[np.stack(labels, axis=1)]  # (n, starts, K)
    runs = np.arange(responsibilities.shape[1])  # those still running
    previous = np.full(runs.size, -np.inf)
    fits = [None] * runs.size
    for iteration in range(1, max_iter + 1):
        weights, means, covariances = _weighted_gaussians(Z, weight, responsibilities.reshape(n, -1))
        weights = weights.reshape(runs.size, n_components)
        weights /= weights.sum(axis=1, keepdims=True)
        log_prob = _component_log_prob(Z, means, covariances).reshape(n, runs.size, n_components) + np.log(weights)
        row_log_prob = _logsumexp_rows(log_prob)  # (n, runs)
        current = weight @ row_log_prob / weight.sum()
        means = means.reshape(runs.size, n_components, n_features)
        covariances = covariances.reshape(runs.size, n_components, n_features, n_features)
        for r, run in enumerate(runs):  # each run's latest fit, its last when it stops
            fits[run] = (weights[r], means[r], covariances[r], current[r] * weight.sum(), iteration)
        keep = ~(np.abs(current - previous) < tol)
        if n_components == 1 or not keep.any():
            break
        runs, previous = runs[keep], current[keep]
        responsibilities = np.exp(log_prob[:, keep] - row_log_prob[:, keep, None])
    best = max(fits, key=lambda fit: fit[3])
    return best if return_n_iter else best[:4]


def gaussian_mixtures_by_bic(Z, weight, random_state, n_best=1, max_starts=_MAX_STARTS, return_n_iter=False):
    """The ``n_best`` full-covariance Gaussian mixtures of 1 to 10 components with the lowest BIC, best first.

    A mixture of K components is tried only where the rows' total weight is
    at least ``K (D + 1)``: fewer rows per component than dimensions plus one
    leave a covariance with no information in some direction. Every such K
    is tried, as the classical estimator does: EM's local optima make the
    BIC rise and fall again with K, and a search that stopped at the first
    rises kept 7 components on ALOI's 20,000 rows where 10 were best. It
    runs on at most :func:`search_rows` rows (evenly spaced): EM costs ``K n
    D^2`` per iteration, the best of :func:`em_starts` runs (at most
    ``max_starts``) from k-means starts. Each mixture is ``(weights, means,
    covariances)``; ``return_n_iter=True`` also returns the EM iterations
    that each took, as a second list.
    """
    n, n_features = weight.sum(), Z.shape[1]
    per_component = n_features + n_features * (n_features + 1) / 2 + 1
    Z, weight, _ = thinned(Z, weight, search_rows(n_features))
    distinct = np.count_nonzero(weight > 0)  # k-means needs a row per component
    starts = em_starts(distinct, n_features, max_starts)
    fitted = []
    for n_components in range(1, _MAX_COMPONENTS + 1):
        if n_components > 1 and (n_components * (n_features + 1) > n or n_components > distinct):
            break
        *mixture, log_likelihood, n_iter = gaussian_mixture(
            Z, weight, n_components, random_state, n_starts=starts, return_n_iter=True
        )
        bic = -2 * log_likelihood + (n_components * per_component - 1) * np.log(n)
        fitted.append((bic, n_components, mixture, n_iter))
    fitted.sort(key=lambda item: item[:2])
    mixtures = [mixture for _, _, mixture, _ in fitted[:n_best]]
    return (mixtures, [n_iter for *_, n_iter in fitted[:n_best]]) if return_n_iter else mixtures


def flow_and_reference_weights(flow, classical, weight, classical_rows, row_weight, floor, max_iter=5000, tol=1e-12):
    """Weights of the flow and of each classical part, from two sets of held-out scores.

    ``flow`` (n,) and ``classical`` (n, K) are log-densities of the held-out
    rows (of weights ``weight``), which the flow has not seen; the K parts
    are also scored on ``classical_rows`` (m, K), training rows scored as if
    held out (of weights ``row_weight``), which say nothing about the flow.
    EM for the composite likelihood in which the held-out rows come from
    ``w_flow p_flow + (1 - w_flow) sum_k v_k p_k`` and the training rows from
    ``sum_k v_k p_k``: the flow's weight rests on the held-out rows, the
    parts' weights among themselves on both. The first part (the broad
    Gaussian) keeps a weight of at least ``floor`` in the whole, and the
    parts together keep at least ``1 / (2 n + 2)`` (``_KT``), where ``n``
    is the held-out rows' total weight (weights count as repetitions), or
    their number where that is larger. Maximum likelihood gives the
    reference nothing but the floor whenever the held-out rows' mean ratio of
    its density to the flow's is at most 1, which on a few rows is chance
    (2 rows of a 15-row data set). That share is the estimate of a probability that
    ``n`` trials never showed that is asymptotically minimax under log loss
    (Krichevsky & Trofimov, 1981); it costs at most ``-log(1 - 1 / (2 n + 2))``
    nats per row. The flow's share has no such bound: it is the density
    that a few rows let overfit; with few held-out rows the parts rest on
    many more (the training rows scored as if held out). Its held-out scores
    are those of the epoch that early stopping keeps without the row (the
    estimators' ``flow`` argument, ``TrainingHistory.validation_correction``):
    the kept epoch is the best of many on those rows, and its own scores
    there are optimistic.
    Returns ``[w_flow, (1 - w_flow) v_1, ..., (1 - w_flow) v_K]``.
    """
    held = np.column_stack([flow, classical])
    held = np.where(np.isfinite(held), held, -np.inf)
    rows = np.where(np.isfinite(classical_rows), classical_rows, -np.inf)
    # a row of no weight, or that no density explains, says nothing about the weights
    explained = (held > -np.inf).any(axis=1) & (weight > 0)
    held, weight = held[explained], weight[explained]
    explained = (rows > -np.inf).any(axis=1) & (row_weight > 0)
    rows, row_weight = rows[explained], row_weight[explained]
    held_share = weight / weight.sum()
    # no training rows: plain stacking on the held-out rows
    row_share = row_weight / row_weight.sum() if row_weight.size else row_weight
    n_parts = classical.shape[1]

    def em_step(w):
        """EM's update of ``w`` and the composite log-likelihood at ``w``."""
        log_w = np.log(w, out=np.full_like(w, -np.inf), where=w > 0)
        log_v = log_w[1:] - np.log1p(-w[0])
        joint, inner = held + log_w, rows + log_v
        held_rows, train_rows = _logsumexp_rows(joint), _logsumexp_rows(inner)
        responsibility = held_share @ np.exp(joint - held_rows[:, None])
        parts = responsibility[1:] + row_share @ np.exp(inner - train_rows[:, None])
        updated = np.r_[responsibility[0], (1 - responsibility[0]) * parts / parts.sum()]
        return _with_floor(updated, 1, floor), held_share @ held_rows + row_share @ train_rows

    w = np.full(n_parts + 1, 1.0 / (n_parts + 1))
    previous = -np.inf
    for _ in range(max_iter):
        # SQUAREM (Varadhan & Roland, 2008): two EM steps, then a step along
        # their squared extrapolation where it stays a set of weights and
        # does not lower the likelihood. EM alone crawls where weights decay
        # towards zero (thousands of steps), the same fixed point
        first, current = em_step(w)
        if current - previous < tol:
            w = first
            break
        previous = current
        second, at_first = em_step(first)
        step, curve = first - w, second - 2 * first + w
        length = np.sqrt(step @ step / (curve @ curve)) if curve @ curve > 0 else 1.0
        while length > 1:
            extrapolated = w + 2 * length * step + length**2 * curve
            if np.all(extrapolated >= 0) and extrapolated[0] < 1:
                break
            length = (length + 1) / 2
        if length <= 1 + 1e-9:
            w = second
            continue
        candidate, at_candidate = em_step(_with_floor(extrapolated / extrapolated.sum(), 1, floor))
        w = candidate if at_candidate >= at_first else second
    # weights count as repetitions, but weights below one (importance weights
    # scaled to sum to one, say) do not make the evidence thinner than the rows
    least = _KT / (max(weight.sum(), weight.size) + 2 * _KT)
    if w[0] > 1 - least:
        w = _with_floor(np.r_[1 - least, least * w[1:] / w[1:].sum()], 1, floor)
    return w


def _with_floor(w, column, floor):
    """``w`` renormalised with ``w[column] >= floor``, the others scaled to the rest."""
    w = w / w.sum()
    if w[column] >= floor:
        return w
    others = np.delete(np.arange(w.size), column)
    rest = w[others].sum()
    out = np.empty_like(w)
    out[column] = floor
    out[others] = (1 - floor) * (w[others] / rest if rest > 0 else 1 / others.size)
    return out


def refit_rows(n_features, n_components):
    """The rows the final refit of mixtures of at most ``n_components`` components takes (``_REFIT_BYTES``)."""
    return max(_MAX_ROWS, _REFIT_BYTES // (24 * max(n_components, 1) * n_features))


def em_starts(n_rows, n_features, max_starts=_MAX_STARTS):
    """How many k-means starts the BIC search runs on ``n_rows`` rows: as many as make :func:`search_rows` rows, at most ``max_starts``."""
    return int(np.clip(search_rows(n_features) // max(n_rows, 1), 1, max_starts))


def search_rows(n_features):
    """How many rows the BIC search fits on: ``_SEARCH_ROWS``, fewer where ``D^2`` makes each row costly."""
    return int(min(_SEARCH_ROWS, max(2_000, _SEARCH_WORK // n_features**2)))


def thinned(Z, weight, max_rows=_MAX_ROWS):
    """At most ``max_rows`` evenly spaced rows of ``Z``, their weights scaled to the same total, and that scale.

    Each row kept then stands for ``scale`` rows' worth of weight: the
    leave-one-out likelihood of a kernel density on such rows leaves out
    that much (see :func:`kernel_bandwidth`).
    """
    step = -(-Z.shape[0] // max_rows)
    if step == 1:
        return Z, weight, 1.0
    scale = weight.sum() / weight[::step].sum()
    return Z[::step], weight[::step] * scale, scale


def kernel_bandwidth(Z, weight, unit=1.0):
    """The bandwidth of a Gaussian kernel density on the rows ``Z`` that maximises the leave-one-out likelihood.

    Scored on at most ``_KERNEL_QUERIES`` evenly spaced rows against all rows;
    leaving a row out removes ``unit`` of its weight (all of it below that),
    so a weight of 2 is the row twice here too. ``unit`` is the weight of one
    row: 1, or where the rows were thinned the weight each kept row stands
    for (:func:`thinned`'s scale), since the rows it stands for are
    elsewhere, not at its place; leaving out less would leave part of the
    row's own kernel in its score and favour ever narrower kernels. Searched (bounded, on the log
    scale) between ``_KERNEL_RANGE`` times Scott's factor. Returns the
    bandwidth, the query rows and their leave-one-out log-densities at it.
    """
    n, n_features = weight.sum(), Z.shape[1]
    queries = _queries(Z)
    distance2 = np.maximum(
        np.sum(Z[queries] ** 2, axis=1)[:, None] + np.sum(Z**2, axis=1) - 2 * Z[queries] @ Z.T, 0
    )  # fmt: skip
    distance2[np.arange(queries.size), queries] = 0.0
    left_out = np.minimum(weight[queries], unit)
    share = weight[queries] / weight[queries].sum()
    # each query's weights with its own left out: the rest of its own weight
    # (none, mostly) at distance 0, the others' as they are. Summing without
    # it, rather than subtracting it from the full sum, keeps the others'
    # kernels where they are e^-100 times its own (many features, narrow
    # kernels), which the subtraction rounded to nothing.
    log_weight = np.log(weight, out=np.full_like(weight, -np.inf), where=weight > 0)
    own = weight[queries] - left_out
    log_weights = np.tile(log_weight, (queries.size, 1))
    log_weights[np.arange(queries.size), queries] = np.log(own, out=np.full_like(own, -np.inf), where=own > 0)

    terms = torch.as_tensor(distance2)
    log_weights = torch.as_tensor(log_weights)

    def leave_one_out(log_bandwidth, terms=terms, log_weights=log_weights):
        h2 = np.exp(2 * log_bandwidth)
        # torch's logsumexp: scipy's was most of the reference's fit time (RESULTS.md, "Fit time");
        # the exponents in one fused pass
        rest = torch.logsumexp(torch.add(log_weights, terms, alpha=-1 / (2 * h2)), dim=1).double().numpy()
        return rest - np.log(n - left_out) - 0.5 * n_features * np.log(2 * np.pi * h2)

    # the search compares bandwidths in float32, in half the time of float64
    # and to the same bandwidth within 1e-5; the scores returned are float64's
    single = {"terms": terms.float(), "log_weights": log_weights.float()}

    def loss(log_bandwidth):
        values = leave_one_out(log_bandwidth, **single)
        return -(share @ np.where(np.isfinite(values), values, -1e300))

    scott = n ** (-1.0 / (n_features + 4))
    bounds = np.log(np.array(_KERNEL_RANGE) * scott)
    # to 1% of the bandwidth: far finer than the likelihood can tell apart
    best = optimize.minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 0.01}).x
    return float(np.exp(best)), queries, leave_one_out(best)


def _queries(Z):
    """At most ``_KERNEL_QUERIES`` evenly spaced row indices of ``Z``."""
    return np.unique(np.linspace(0, Z.shape[0] - 1, min(_KERNEL_QUERIES, Z.shape[0])).astype(int))


def fit_reference(Z, weight, kind, random_state, kernel=True, max_starts=_MAX_STARTS):
    """The reference parts fitted to the rows ``Z``, and their scores on some of those rows as if held out.

    The parts, torch densities: the broad Gaussian, then (``kind="gmm"``) the
    ``_STACKED_MIXTURES`` mixtures that BIC ranks best, best first, and
    (``kernel=True``) the kernel density. The scores, on at most
    ``_KERNEL_QUERIES`` of the rows: the kernel density's leave-one-out
    log-density, each Gaussian part's leave-one-out log-density
    (:func:`_leave_one_out`; for the mixtures with the other rows'
    responsibilities' response, :func:`_responsibility_response`, where its
    cost allows it for all of them), so that the parts' weights among
    themselves can rest on many rows rather than on the few of a validation
    split: in-sample scores less Akaike's correction favoured the mixtures of
    most components, and scored a component on a single row as a spike. The
    kernel density
    holds at most ``_MAX_KERNEL_ROWS`` of the rows, evenly spaced.
    ``kernel=False`` (where no held-out rows could weigh it) leaves it out,
    with its bandwidth search; ``max_starts`` bounds the k-means starts of
    the mixtures' EM (:func:`em_starts`). Returns ``(parts, scores, score_weights)``,
    one score column per part.
    """
    keep = weight > 0
    Z, weight, scale = thinned(Z[keep], weight[keep])
    parts = [broad_gaussian(Z, weight)]
    if kind == "gmm":
        mixtures, n_iters = gaussian_mixtures_by_bic(
            Z, weight, random_state, _STACKED_MIXTURES, max_starts, return_n_iter=True
        )
        parts += [_gaussians(*mixture) for mixture in mixtures]
    points, point_weight, point_scale = thinned(Z, weight, _MAX_KERNEL_ROWS)
    queries = _queries(points)
    rows = torch.as_tensor(points[queries])
    # a kept row stands for scale * point_scale rows: all of them are left out (as for the kernel density)
    left_out = np.minimum(point_weight[queries], scale * point_scale)
    columns = [_leave_one_out(part, rows, left_out, weight.sum(), index == 0) for index, part in enumerate(parts)]
    if kind == "gmm":
        # on the rows the mixtures were fitted to; all or none, so that the columns compare alike
        search_Z, search_weight, _ = thinned(Z, weight, search_rows(Z.shape[1]))
        responses = [
            _responsibility_response(part, n_iter, search_Z, search_weight, points[queries], left_out)
            for part, n_iter in zip(parts[1:], n_iters)
        ]  # fmt: skip
        if all(response is not None for response in responses):
            columns[1:] = [column + response for column, response in zip(columns[1:], responses)]
    if kind == "gmm" and kernel:
        bandwidth, _, kernel_values = kernel_bandwidth(points, point_weight, scale * point_scale)
        parts.append(GaussianKernelDensity(torch.as_tensor(points), torch.as_tensor(point_weight), bandwidth))
        columns.append(kernel_values)
    return parts, np.column_stack(columns), point_weight[queries]


def _leave_one_out(part, rows, left_out, total, broad):
    """Log-density of each of ``rows`` under the Gaussian part with ``left_out`` of its weight removed from the fit.

    One M-step's leave-one-out, exact for the component parameters given the
    responsibilities: the row's share of each component's weight, mean and
    covariance is taken out (a rank-one downdate, evaluated through the
    Sherman-Morrison and matrix-determinant lemmas, so at the cost of
    scoring). ``total`` is the weight the part was fitted to. An EM
    mixture's components share the rows by their responsibilities; the broad
    part's (``broad=True``) each saw every row, with fixed shares. A
    component left with no weight drops out; the covariance ridge is kept
    as it was (its change is ``_REG_COVAR`` times the weight ratio's
    excess over one). Removing a unit of weight from a row of weight 3 is
    removing one of three copies, as everywhere in the estimators.
    """
    n_features = part.n_features
    left_out = torch.as_tensor(left_out, dtype=rows.dtype)
    with torch.no_grad():
        radius2 = part.squared_radii(rows)  # (n, K)
        log_norm = part.log_normalisers(rows.dtype)
        log_prob = log_norm - 0.5 * radius2
        weights = part.log_weights.exp()
        if broad:
            mass = torch.full_like(log_prob, float(total))
            removed = left_out[:, None].expand_as(log_prob)
            log_share = torch.log(weights).expand_as(log_prob)
        else:
            mass = (weights * total).expand_as(log_prob)
            removed = left_out[:, None] * torch.softmax(log_prob + part.log_weights, dim=1)
        remaining = mass - removed
        alive = remaining > 1e-12 * mass
        remaining = torch.where(alive, remaining, torch.ones_like(remaining))
        if not broad:
            log_share = torch.log(remaining) - torch.log(total - left_out)[:, None]
        ratio = mass / remaining  # the covariance's scale after the downdate
        leverage = torch.clamp(removed * radius2 / remaining, max=1 - 1e-12)
        log_held = (
            log_norm - 0.5 * n_features * torch.log(ratio) - 0.5 * torch.log1p(-leverage)
            - 0.5 * ratio * radius2 / (1 - leverage)
        )  # fmt: skip
        log_held = torch.where(alive, log_held + log_share, torch.full_like(log_held, -math.inf))
        return torch.logsumexp(log_held, dim=1).numpy()


def _responsibilities(part, Z):
    """Each row's responsibilities under the components of the mixture ``part``, shape (n, K)."""
    with torch.no_grad():
        return torch.softmax(part.component_log_prob(torch.as_tensor(Z)), dim=1).numpy()


def _complete_scores(part, Z):
    """Each row's complete-data scores under each component of ``part``, shape (K, n, P).

    The parameters, at the fit: the logits of the first K - 1 weights, and
    for each component a shift ``a`` of its mean and a symmetric ``S`` of
    its covariance in its own whitened coordinates ``u = L^-1 (z - mean)``
    (mean + L a, covariance L (I + S) L^T), ``S`` on an orthonormal basis of
    symmetric matrices (diagonal units, off-diagonal pairs over sqrt 2). In
    these the score of a row given component k is ``e_k - weights`` for the
    logits, ``u`` and ``(u u^T - I) / 2`` for component k's block, zero for
    the others.
    """
    n_components, n_features = part.means.shape
    with torch.no_grad():
        white = part.whitened(torch.as_tensor(Z)).numpy()
    upper = np.triu_indices(n_features, 1)
    block = np.concatenate(
        [white, (white**2 - 1) / 2, white[..., upper[0]] * white[..., upper[1]] / np.sqrt(2)], axis=2
    )  # fmt: skip
    size = block.shape[2]
    logits = np.eye(n_components)[:, :-1] - part.log_weights.exp().numpy()[:-1]
    scores = np.zeros((n_components, Z.shape[0], n_components - 1 + n_components * size))
    scores[..., : n_components - 1] = logits[:, None]
    for k in range(n_components):
        scores[k, :, n_components - 1 + k * size : n_components - 1 + (k + 1) * size] = block[k]
    return scores


def _inverse_sqrt(values, total):
    """``values ** -0.5``, 0 where a value is at most ``1e-12 total`` (no information there)."""
    values = np.asarray(values, dtype=float)
    informed = values > 1e-12 * total
    return np.where(informed, 1 / np.sqrt(np.where(informed, values, 1.0)), 0.0)


def _responsibility_response(part, n_iter, Z, weight, rows, left_out):
    """What :func:`_leave_one_out` leaves out: the response of the other rows' responsibilities, to first order.

    One M-step's downdate keeps every row's responsibilities; EM would then
    move them, and the parameters with them: by EM's rate matrix ``I_c^-1
    I_mis`` (Dempster, Laird & Rubin, 1977) each iteration, the complete-data
    information ``I_c`` and the missing information ``I_mis``, the summed
    conditional covariance of the rows' complete-data scores (Louis, 1982).
    Removing ``t`` of a row moves the one-step by ``t I_c^-1 g`` (``g`` its
    score); the ``n_iter`` iterations that the fit took carry that to ``t
    sum_{s < n_iter} (I_c^-1 I_mis)^s I_c^-1 g``, and the row's log-density
    falls by a further ``t h^T f(B) h``, ``h = I_c^-1/2 g``, ``B = I_c^-1/2
    I_mis I_c^-1/2`` (eigenvalues in [0, 1]: the fractions of missing
    information) and ``f(x) = x + ... + x^(n_iter - 1)``. Where components
    overlap, the one-step leave-one-out is optimistic by this much: it
    scored spurious extra components above the mixture that new rows prefer
    (RESULTS.md, "Broad density suite"). Counting the iterations the fit
    took, not EM's limit, is the leave-one-out of the fit as it was made, and
    stays finite in directions the rows do not determine (``B``'s
    eigenvalues of 1). ``I_mis`` is summed over the row-component pairs of
    responsibility strictly between 0 and 1, at most ``_RESPONSE_WORK / P^2``
    (evenly spaced rows, scaled to their weight); None where ``P^3``, its
    eigendecomposition, is above ``_RESPONSE_WORK``.
    """
    n_components, n_features = part.means.shape
    if n_components == 1:  # no responsibilities to move: the one-step is exact
        return np.zeros(rows.shape[0])
    n_parameters = n_components - 1 + n_components * (n_features + n_features * (n_features + 1) // 2)
    if n_parameters**3 > _RESPONSE_WORK:
        return None
    weights = part.log_weights.exp().numpy()
    responsibilities = _responsibilities(part, Z)
    total, counts = weight.sum(), weight @ responsibilities
    # a row's pair with a component whose responsibility is 0 or 1 adds nothing to I_mis;
    # the rows that have others, evenly spaced to at most _RESPONSE_WORK / P^2 pairs
    ambiguous = responsibilities * (1 - responsibilities) > 1e-12
    rows_used = np.flatnonzero(ambiguous.any(axis=1))
    step = max(int(np.ceil(ambiguous[rows_used].sum() * n_parameters**2 / _RESPONSE_WORK)), 1)
    row_weight = weight[rows_used]
    if step > 1:
        row_weight = row_weight[::step] * (row_weight.sum() / row_weight[::step].sum())
        rows_used = rows_used[::step]
    # I_c^-1/2: the logits' block N (diag(w) - w w^T) by its eigenvectors, each component's diagonal;
    # a direction with no complete-data information (a component of no weight) is left out
    values, vectors = np.linalg.eigh(total * (np.diag(weights) - np.outer(weights, weights))[:-1, :-1])
    logit_scale = vectors * _inverse_sqrt(values, total) @ vectors.T
    size = (n_parameters - n_components + 1) // n_components
    per_block = np.r_[np.ones(n_features), np.full(size - n_features, np.sqrt(2.0))]
    block_scale = np.concatenate([per_block * _inverse_sqrt(counts[k], total) for k in range(n_components)])

    def by_information(a):  # a @ I_c^-1/2
        return np.concatenate([a[..., : n_components - 1] @ logit_scale, a[..., n_components - 1 :] * block_scale], -1)

    scores, responsibilities = _complete_scores(part, Z[rows_used]), responsibilities[rows_used]
    observed = np.einsum("nk,knp->np", responsibilities, scores)
    deviations = np.sqrt(row_weight[:, None] * responsibilities).T[..., None] * (scores - observed[None])
    deviations = by_information(deviations[ambiguous[rows_used].T])
    fractions, directions = np.linalg.eigh(deviations.T @ deviations)
    fractions = np.clip(fractions, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        carried = np.where(fractions < 1 - 1e-12, (fractions - fractions**n_iter) / (1 - fractions), n_iter - 1.0)
    query_scores = np.einsum("nk,knp->np", _responsibilities(part, rows), _complete_scores(part, rows))
    projected = by_information(query_scores) @ directions
    return -left_out * (projected**2 @ carried)


def refit_reference(parts, Z, weight, random_state, part_weights=None):
    """``parts`` fitted again to the rows ``Z``.

    The same kinds with the same numbers of components, on up to
    :func:`refit_rows` rows (evenly spaced beyond), the mixture's EM
    started from its fit on fewer rows; the kernel density's
    bandwidth scaled by Scott's rate, ``growth ** (-1 / (D + 4))``, where
    ``growth`` is the ratio of its new rows to its old ones. A part whose
    stacking weight in ``part_weights`` is 0 is returned as it is: the stack
    leaves it out (:func:`merged_mixtures`, :func:`reference_mixture`), and
    the mixtures' EM is most of the refit's cost.
    """
    keep = weight > 0
    largest = max((p.means.shape[0] for p in parts[1:] if isinstance(p, GaussianMixtureDensity)), default=1)
    Z, weight, _ = thinned(Z[keep], weight[keep], refit_rows(Z.shape[1], largest))
    refitted = [broad_gaussian(Z, weight)]
    for index, part in enumerate(parts[1:], start=1):
        if part_weights is not None and part_weights[index] == 0:
            refitted.append(part)
        elif isinstance(part, GaussianKernelDensity):
            points, point_weight, _ = thinned(Z, weight, _MAX_KERNEL_ROWS)
            growth = points.shape[0] / part.points.shape[0]
            bandwidth = float(part.bandwidth) * growth ** (-1.0 / (Z.shape[1] + 4))
            refitted.append(GaussianKernelDensity(torch.as_tensor(points), torch.as_tensor(point_weight), bandwidth))
        else:
            mixture = gaussian_mixture(Z, weight, part.means.shape[0], random_state, start=part)[:3]
            refitted.append(_gaussians(*mixture))
    return refitted


def merged_mixtures(parts, weights):
    """``parts`` and ``weights`` with the stacked Gaussian mixtures (all but the first, broad, one) as one part.

    A weighted mixture of mixtures is a mixture: its components are theirs,
    with their weights times the mixture's. Mixtures of zero weight are left
    out; the merged part comes where the first of them was.
    """
    stacked = [i for i, part in enumerate(parts) if i > 0 and isinstance(part, GaussianMixtureDensity)]
    if len(stacked) < 2:
        return list(parts), np.asarray(weights, dtype=float)
    total = float(sum(weights[i] for i in stacked))
    kept = [i for i in stacked if weights[i] > 0]
    shares = [parts[i].log_weights.exp() * (weights[i] / total) for i in kept]
    # a stacking weight near the least double times a component's share underflows to 0
    positive = torch.cat(shares) > 0 if kept else torch.zeros(0, dtype=torch.bool)
    if not bool(positive.any()):  # no weight left: the best mixture stands for them, at weight `total`
        kept, shares = stacked[:1], [parts[stacked[0]].log_weights.exp()]
        positive = shares[0] > 0
    component_weights = torch.cat(shares)
    merged = GaussianMixtureDensity(
        component_weights[positive],
        torch.cat([parts[i].means for i in kept])[positive],
        torch.cat([parts[i].cholesky for i in kept])[positive],
    )
    first = stacked[0]
    out_parts = [merged if i == first else part for i, part in enumerate(parts) if i == first or i not in stacked]
    out_weights = [total if i == first else w for i, w in enumerate(weights) if i == first or i not in stacked]
    return out_parts, np.asarray(out_weights, dtype=float)


def reference_mixture(parts, weights, like):
    """The parts, weighted by their stacking ``weights``, as one :class:`Mixture` on ``like``'s device.

    Parts of zero weight are left out, and so is a kernel density of weight
    below ``_MIN_KERNEL_WEIGHT`` (see the module's docstring); None when
    nothing is left.
    """
    kept = [
        (part, w) for part, w in zip(parts, weights)
        if w > 0 and not (isinstance(part, GaussianKernelDensity) and w < _MIN_KERNEL_WEIGHT)
    ]  # fmt: skip
    if not kept:
        return None
    parts, weights = zip(*kept)
    return Mixture(list(parts), torch.as_tensor(weights)).to(like.device)
