"""Behaviour of MAFOutlierDetector beyond scikit-learn's common checks."""

import pickle
import re

import numpy as np
import pytest
from scipy import stats
from sklearn.base import clone

from sklearn_maf import MAFDensity, MAFOutlierDetector, _reference
from sklearn_maf._outlier import _clearly_better, _dequantize, _Marginals, _weighted_threshold


def _small(**params):
    defaults = dict(n_layers=2, hidden_units=16, max_iter=20, random_state=0)
    return MAFOutlierDetector(**{**defaults, **params})


def _blobs(n, rng):
    """Two correlated 2-D Gaussian clusters."""
    centres = np.array([[-2.0, 0.0], [2.0, 1.0]])
    noise = rng.normal(size=(n, 2)) @ np.array([[0.6, 0.0], [0.3, 0.5]])
    return centres[rng.randint(2, size=n)] + noise


@pytest.fixture(scope="module")
def fitted():
    """A detector of the two clusters, shared by the tests that only read it."""
    rng = np.random.RandomState(0)
    X = _blobs(600, rng)
    return _small(contamination=0.05).fit(X), X


@pytest.mark.parametrize("contamination", [0.01, 0.05, 0.1, 0.5])
def test_contamination_is_the_fraction_flagged_on_the_training_rows(contamination, rng):
    X = _blobs(400, rng)
    detector = _small(contamination=contamination).fit(X)
    assert np.sum(detector.predict(X) == -1) == round(contamination * 400)


def test_weighted_contamination_counts_weight_not_rows(rng):
    """With weights, the flagged rows hold at most, and about, `contamination` of the weight."""
    X = _blobs(400, rng)
    weight = rng.uniform(0.5, 3.0, size=400)
    detector = _small(contamination=0.1).fit(X, sample_weight=weight)
    flagged = detector.predict(X) == -1
    share = weight[flagged].sum() / weight.sum()
    assert 0.1 - weight.max() / weight.sum() < share <= 0.1
    # the threshold is a weighted quantile: the unweighted one differs
    unweighted = _small(contamination=0.1).fit(X)
    assert detector.offset_ != unweighted.offset_


def test_decision_function_is_score_samples_minus_offset(fitted):
    detector, X = fitted
    np.testing.assert_array_equal(detector.decision_function(X), detector.score_samples(X) - detector.offset_)


def test_predict_is_the_sign_of_the_decision_function(fitted):
    detector, X = fitted
    labels = detector.predict(X)
    assert labels.dtype.kind == "i" and set(np.unique(labels)) == {-1, 1}
    np.testing.assert_array_equal(labels == -1, detector.decision_function(X) < 0)


def test_fit_predict_equals_fit_then_predict(rng):
    X = _blobs(300, rng)
    np.testing.assert_array_equal(_small().fit_predict(X), _small().fit(X).predict(X))


def test_far_rows_are_outliers_and_typical_rows_are_not(rng):
    """Novelty detection: rows far from both clusters get -1, new rows from them get +1."""
    detector = _small(max_iter=60).fit(_blobs(1000, rng))
    far = np.array([[0.0, 8.0], [-9.0, -6.0], [10.0, 1.0], [0.0, -7.0]])
    assert np.all(detector.predict(far) == -1)
    # contamination="auto" flags about 1% of new rows from the training distribution
    assert np.mean(detector.predict(_blobs(2000, rng)) == -1) < 0.05


def test_without_preprocessing_the_valley_between_clusters_scores_low(rng):
    """preprocessing=None scores by the density in the units of X, valleys included.

    (The quantile preprocessing does not see a gap inside one feature's range:
    the point between the clusters sits at the middle of both marginals.)
    """
    detector = _small(preprocessing=None, n_layers=5, hidden_units=32, max_iter=200).fit(_blobs(600, rng))
    centre, between = detector.score_samples(np.array([[-2.0, 0.0], [0.0, 0.5]]))
    assert centre > between + 0.5


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(contamination=0.7), "The 'contamination' parameter"),
        (dict(contamination=0.0), "The 'contamination' parameter"),
        (dict(contamination="high"), "The 'contamination' parameter"),
        (dict(preprocessing="robust"), "The 'preprocessing' parameter"),
        (dict(dequantize="yes"), "The 'dequantize' parameter"),
        (dict(n_layers=0), "The 'n_layers' parameter"),
    ],
)
def test_bad_parameters_are_rejected(params, message, rng):
    with pytest.raises(ValueError, match=re.escape(message)):
        _small(**params).fit(_blobs(50, rng))


@pytest.mark.parametrize(
    "round_trip",
    [lambda model: pickle.loads(pickle.dumps(model)), clone],
    ids=["pickle", "clone"],
)
def test_round_trips_give_identical_results(round_trip, rng):
    X = np.c_[_blobs(200, rng), np.full(200, 4.0), rng.poisson(3, size=200)]
    detector = _small(contamination=0.1).fit(X)
    copy = round_trip(detector)
    if not hasattr(copy, "offset_"):  # clone gives an unfitted copy: fit it the same way
        copy.fit(X)
    assert copy.offset_ == detector.offset_
    np.testing.assert_array_equal(copy.constant_features_, detector.constant_features_)
    np.testing.assert_array_equal(copy.score_samples(X), detector.score_samples(X))
    np.testing.assert_array_equal(copy.predict(X), detector.predict(X))


def test_same_scores_as_mafdensity_without_preprocessing(rng, monkeypatch):
    """The detector shares the model of MAFDensity, not a copy of it: the one difference is that
    its reference mixtures run EM from one k-means start, where MAFDensity's take up to ten."""
    X = _blobs(300, rng)
    starts = []
    search = _reference.gaussian_mixtures_by_bic
    monkeypatch.setattr(
        _reference, "gaussian_mixtures_by_bic", lambda *args, **kw: starts.append(args[4]) or search(*args, **kw)
    )
    for reference in ("gmm", None):
        detector = _small(preprocessing=None, dequantize=False, reference=reference).fit(X)
        density = MAFDensity(n_layers=2, hidden_units=16, max_iter=20, random_state=0, reference=reference)
        density._reference_starts = 1
        density.fit(X)
        np.testing.assert_array_equal(detector.score_samples(X), density.score_samples(X))
        np.testing.assert_array_equal(detector.mixture_weights_, density.mixture_weights_)
    assert starts == [1, 1]
    MAFDensity(n_layers=2, hidden_units=16, max_iter=2, random_state=0).fit(X)
    assert starts[-1] == _reference._MAX_STARTS


def test_constant_features_are_not_modelled_and_an_unseen_value_costs_its_probability(rng):
    """Raw data with constant columns must not crash the detector (MAFDensity raises).

    A value never seen on a constant feature is an event of probability 1 / (2 n + 2)
    on n training rows, whatever its size; before, it was ignored, and ADBench's
    InternetAds, whose anomalies differ from the inliers mostly there, ranked at chance.
    """
    X = _blobs(300, rng)
    with_constants = np.c_[np.full(300, 7.0), X[:, 0], np.zeros(300), X[:, 1]]
    detector = _small(contamination=0.1).fit(with_constants)
    np.testing.assert_array_equal(detector.constant_features_, [0, 2])
    assert detector.n_features_in_ == 4 and detector.module_.n_features == 2
    reference = _small(contamination=0.1).fit(X)
    assert detector._n_training_rows == 270  # the validation split's 30 rows held out
    unseen = 1 / (2 * 270 + 2)
    seen = reference.score_samples(X) + 2 * np.log1p(-unseen)
    np.testing.assert_allclose(detector.score_samples(with_constants), seen, rtol=0, atol=1e-12)
    one_moved, both_moved = with_constants.copy(), with_constants.copy()
    one_moved[:, 2] = 1e-9
    both_moved[:, [0, 2]] = [100.0, -3.0]
    expected = seen + np.log(unseen) - np.log1p(-unseen)
    np.testing.assert_allclose(detector.score_samples(one_moved), expected, rtol=0, atol=1e-12)
    expected = seen + 2 * (np.log(unseen) - np.log1p(-unseen))
    np.testing.assert_allclose(detector.score_samples(both_moved), expected, rtol=0, atol=1e-12)
    samples = detector.sample(5, random_state=0)
    np.testing.assert_array_equal(samples[:, [0, 2]], [[7.0, 0.0]] * 5)
    with pytest.raises(ValueError, match="X has 2 features, but MAFOutlierDetector is expecting 4"):
        detector.score_samples(X)


def test_unseen_constant_values_rank_rows_as_outliers(rng):
    """Outliers that differ from the inliers only on a feature constant in training are found."""
    X = np.c_[_blobs(400, rng), np.zeros(400)]
    new = np.c_[_blobs(200, rng), np.zeros(200)]
    new[:20, 2] = rng.choice([-1.0, 1.0], size=20)
    detector = _small(contamination=0.05, max_iter=5).fit(X)
    assert np.all(detector.score_samples(new[:20]) < detector.score_samples(new[20:]).min() + 5)
    np.testing.assert_array_equal(detector.predict(new[:20]), -1)
    # weights count as repetitions: n is their total on the training rows
    weighted = _small(contamination=0.05, max_iter=5).fit(X, sample_weight=np.full(400, 2.0))
    assert weighted._n_training_rows == 2 * detector._n_training_rows


def test_constant_on_the_training_split_only(rng):
    """A feature that varies only in rows held out for validation is dropped too."""
    X = np.c_[_blobs(100, rng), np.zeros(100)]
    X[0, 2] = 1.0

    class FirstRowHeldOut(MAFOutlierDetector):
        def _split(self, n_samples, rng, groups=None):
            return np.arange(1, n_samples), np.array([0])

    detector = FirstRowHeldOut(n_layers=2, hidden_units=8, max_iter=3, random_state=0).fit(X)
    np.testing.assert_array_equal(detector.constant_features_, [2])


def test_all_features_constant_is_a_clear_error():
    with pytest.raises(ValueError, match="All 2 features are constant on the training rows"):
        _small().fit(np.ones((20, 2)))


def test_dequantized_training_rows_have_no_ties(rng):
    """Integer-valued features reach the flow spread over their unit cells, without ties."""
    counts = rng.randint(0, 6, size=(500, 2)).astype(float)
    seen = []

    class Recording(MAFOutlierDetector):
        def _flow_features(self, *args):
            seen.append(super()._flow_features(*args))
            return seen[-1]

    Recording(preprocessing=None, n_layers=2, hidden_units=8, max_iter=2, random_state=0).fit(counts)
    flow_input = seen[-1]
    assert np.all(np.abs(flow_input - counts) <= 0.5)
    assert all(np.unique(column).size == 500 for column in flow_input.T)
    Recording(preprocessing=None, dequantize=False, n_layers=2, hidden_units=8, max_iter=2).fit(counts)
    np.testing.assert_array_equal(seen[-1], counts)


def test_dequantize_stays_in_the_cells(rng):
    integers = rng.poisson(4, size=(500, 1)).astype(float)
    continuous = rng.normal(size=(500, 1))
    X = np.c_[integers, continuous]
    noisy = _dequantize(X, X, np.random.RandomState(0))
    # integers spread over (k - 1/2, k + 1/2): a uniform within each cell
    assert np.all(np.abs(noisy[:, 0] - integers[:, 0]) <= 0.5)
    residual = noisy[:, 0] - integers[:, 0]
    assert stats.kstest(residual, stats.uniform(-0.5, 1).cdf).pvalue > 0.01
    # continuous values move by less than the gaps to their neighbours
    distinct = np.sort(continuous[:, 0])
    assert np.max(np.abs(noisy[:, 1] - continuous[:, 0])) <= np.max(np.diff(distinct))
    # values beyond the reference's cells stay as far out
    far = _dequantize(np.array([[40.0, 30.0]]), X, np.random.RandomState(0))
    np.testing.assert_allclose(far, [[40.0, 30.0]], atol=0.6)
    # the noise comes from the given random state alone
    np.testing.assert_array_equal(noisy, _dequantize(X, X, np.random.RandomState(0)))


def test_marginal_transform_is_standard_normal_monotone_and_invertible(rng):
    X = np.c_[rng.standard_cauchy(size=3000), rng.exponential(size=3000)]
    marginals = _Marginals(gaussianize=True).fit(X, np.ones(3000))
    Z = marginals.transform(X)
    for column in Z.T:
        assert stats.kstest(column, "norm").pvalue > 0.01
    grid = np.linspace(-1e4, 1e4, 20001)[:, None].repeat(2, axis=1)
    assert np.all(np.diff(marginals.transform(grid), axis=0) > 0)
    np.testing.assert_allclose(marginals.inverse_transform(marginals.transform(grid)), grid, atol=1e-6)


def test_marginal_transform_is_thinned_on_many_rows(rng, monkeypatch):
    """The fitted detector stays small: a few knots stand for many distinct values."""
    X = rng.normal(size=(5000, 1))
    monkeypatch.setattr("sklearn_maf._outlier._MAX_QUANTILES", 5000)
    exact = _Marginals(gaussianize=True).fit(X, np.ones(5000))
    monkeypatch.setattr("sklearn_maf._outlier._MAX_QUANTILES", 50)
    thinned = _Marginals(gaussianize=True).fit(X, np.ones(5000))
    assert exact.knots[0].size == 5001 and thinned.knots[0].size <= 102
    # exact at the knots it keeps, within 1/50 in probability in between
    np.testing.assert_allclose(thinned.transform(thinned.knots[0][:, None]), exact.transform(thinned.knots[0][:, None]))
    difference = stats.norm.cdf(thinned.transform(X)) - stats.norm.cdf(exact.transform(X))
    assert np.max(np.abs(difference)) < 1 / 50


def test_rows_further_out_score_lower(fitted):
    detector, _ = fitted
    scores = detector.score_samples(np.array([[0.0, 5.0], [0.0, 10.0], [0.0, 100.0], [0.0, 1e300]]))
    assert np.all(np.diff(scores) < 0)
    assert not np.any(np.isnan(scores))


def test_auto_threshold_comes_from_the_validation_rows(rng):
    """contamination="auto" takes the 1% quantile of held-out rows, not of training rows."""
    X = _blobs(400, rng)
    held_out = np.arange(0, 400, 4)

    class KnownSplit(MAFOutlierDetector):
        def _split(self, n_samples, rng, groups=None):
            return np.setdiff1d(np.arange(n_samples), held_out), held_out

    # the flow alone: the final model has not seen the held-out rows
    detector = KnownSplit(n_layers=2, hidden_units=16, max_iter=20, random_state=0, reference=None).fit(X)
    expected = _weighted_threshold(detector.score_samples(X[held_out]), np.ones(held_out.size), 0.01)
    assert detector.offset_ == expected
    no_validation = _small(early_stopping=False).fit(X)
    assert np.sum(no_validation.predict(X) == -1) == 4


def test_weighted_threshold_treats_weights_as_repetitions(rng):
    scores = rng.normal(size=30)
    weight = rng.randint(0, 4, size=30).astype(float)
    repeated = np.repeat(scores, weight.astype(int))
    # copies of a row may differ in the last bits: they still count as one value
    jitter = repeated * (1 + 1e-14 * rng.uniform(-1, 1, size=repeated.size))
    for fraction in (0.01, 0.1, 0.25, 0.5):
        threshold = _weighted_threshold(scores, weight, fraction)
        assert threshold == pytest.approx(_weighted_threshold(jitter, np.ones(repeated.size), fraction), rel=1e-12)
        assert threshold not in scores
        assert weight[scores < threshold].sum() <= fraction * weight.sum()


def test_weighted_threshold_edge_cases():
    # ties fall on the same side; nothing can be flagged when the lowest weighs too much
    assert _weighted_threshold(np.array([1.0, 1.0, 1.0, 5.0]), np.ones(4), 0.5) == -1.0
    # -inf scores (density underflow) give a finite threshold above them
    threshold = _weighted_threshold(np.array([-np.inf, 0.0, 1.0]), np.ones(3), 0.4)
    assert threshold == -1.0
    assert _weighted_threshold(np.array([2.0, 2.0]), np.ones(2), 0.1) == 1.5


def test_sample_is_in_the_units_of_the_data(rng):
    X = np.c_[rng.normal(loc=100.0, scale=10.0, size=2000), rng.exponential(scale=5.0, size=2000)]
    detector = _small(preprocessing="quantile", max_iter=40).fit(X)
    samples = detector.sample(2000, random_state=0)
    assert samples.shape == (2000, 2)
    np.testing.assert_allclose(samples.mean(axis=0), X.mean(axis=0), rtol=0.1)
    # not standard-normal scores (half of them negative): the exponential's rows stay at or
    # above 0 but for the rare draw of the broad Gaussian beyond the training range
    assert np.mean(samples[:, 1] < 0) < 0.01


def test_warm_start_keeps_the_preprocessing(rng):
    X = np.c_[_blobs(300, rng), np.full(300, 2.0)]
    detector = _small(max_iter=3, warm_start=True)
    detector.fit(X)
    marginals = detector._marginals
    detector.fit(X + [1.0, 0.0, 0.0])
    assert detector._marginals is marginals and detector.n_iter_ == 6
    np.testing.assert_array_equal(detector.constant_features_, [2])
    # a modelled feature that is constant on the new rows is no error either
    X[:, 0] = 1.0
    assert np.all(np.isfinite(detector.fit(X).score_samples(X)))


def _correlated_gaussian(n, rng):
    """Rows of a correlated 3-D Gaussian: a linear density, simplest in raw coordinates."""
    return rng.normal(size=(n, 3)) @ np.array([[1.0, 0.8, 0.0], [0.0, 0.6, 0.5], [0.0, 0.0, 0.7]])


def test_auto_takes_raw_coordinates_where_the_density_is_simplest_there(rng):
    """A Gaussian needs no marginal map: its quantile map only adds the empirical marginals' noise."""
    detector = _small().fit(_correlated_gaussian(1000, rng))
    assert detector.preprocessing_ is None
    assert set(detector.preprocessing_scores_) == {"quantile", None}
    assert detector.preprocessing_scores_[None] > detector.preprocessing_scores_["quantile"]
    assert not hasattr(detector, "_dequantized")  # no copy of the data stays behind


def test_auto_takes_the_quantile_map_for_strongly_skewed_features(rng):
    """Log-normal features with a Gaussian dependence: a Gaussian after the quantile map. For a
    flow alone (a small one here); with the classical reference the raw coordinates' kernel
    density and mixtures can be the better density, and the held-out rows decide."""
    X = np.exp(2.0 * _correlated_gaussian(1000, rng))
    detector = _small(reference=None).fit(X)
    assert detector.preprocessing_ == "quantile" and detector._marginals.gaussianize
    detector = _small().fit(X)
    scores = detector.preprocessing_scores_
    chosen = "quantile" if scores["quantile"] > scores[None] else None
    assert detector.preprocessing_ in (chosen, None)  # the map only where it is better


@pytest.mark.parametrize("unit", [1e-3, 1e3])
def test_auto_choice_does_not_depend_on_the_units(unit, rng):
    """The log-Jacobian of the quantile map makes the comparison fair.

    Without it the raw flow's log-likelihood would move by ``3 * log(unit)``
    with the units of X and the quantile flow's would not: at ``unit=1e3``
    (20.7 nats) the quantile map would win on Gaussian data.
    """
    X = _correlated_gaussian(1000, rng)
    reference = _small().fit(X)
    scaled = _small().fit(unit * X)
    assert reference.preprocessing_ is None and scaled.preprocessing_ is None
    gap = reference.preprocessing_scores_[None] - reference.preprocessing_scores_["quantile"]
    scaled_gap = scaled.preprocessing_scores_[None] - scaled.preprocessing_scores_["quantile"]
    assert abs(scaled_gap - gap) < 0.05
    np.testing.assert_allclose(
        scaled.preprocessing_scores_[None], reference.preprocessing_scores_[None] - 3 * np.log(unit), atol=0.05
    )


def test_explicit_preprocessing_is_kept(rng):
    X = _correlated_gaussian(300, rng)
    for choice in ("quantile", None):
        detector = _small(preprocessing=choice).fit(X)
        assert detector.preprocessing_ == choice and list(detector.preprocessing_scores_) == [choice]


def _mixed_gaussian(n, mixing, rng):
    """Rows of a correlated Gaussian: standard normals through ``mixing``, plus unit noise."""
    return rng.standard_normal((n, mixing.shape[0])) @ mixing + rng.standard_normal((n, mixing.shape[1]))


def test_auto_threshold_flags_about_one_percent_of_new_rows(rng):
    """With a reference, the held-out rows that set ``offset_`` are scored as new rows.

    The reference is refitted to every row, held-out ones included; scored by
    that model, the held-out rows score as training rows do, the threshold
    sits too high, and on 300 rows in 20 dimensions one seed flagged 73% of
    new rows from the training distribution.
    """
    mixing = rng.normal(size=(20, 20)) / 4
    fresh = _mixed_gaussian(20000, mixing, rng)
    flagged = []
    for seed in range(4):
        X = _mixed_gaussian(300, mixing, rng)
        detector = _small(random_state=seed).fit(X)
        assert detector.reference_ is not None
        flagged.append(np.mean(detector.predict(fresh) == -1))
    # the 1% quantile of 30 held-out rows is itself noisy
    assert np.mean(flagged) < 0.04, flagged


def test_held_out_scores_are_those_of_rows_the_model_has_not_seen(rng):
    """``preprocessing_scores_`` estimates the density of new rows, reference included.

    The reference is refitted to every row after its weights are chosen; the
    held-out rows must be scored by the stack from before that refit (whose
    kernel density does not have a kernel on each of them), or they score as
    training rows do: on 150 rows in 20 dimensions, about three standard
    errors above new rows from the same distribution, in every seed.
    """
    mixing = rng.normal(size=(20, 20)) / 4
    fresh = _mixed_gaussian(4000, mixing, rng)
    gaps = []
    for seed in range(12):
        X = _mixed_gaussian(150, mixing, rng)
        detector = _small(preprocessing=None, random_state=seed, precision="float64").fit(X)
        assert detector.reference_ is not None
        scores = detector.score_samples(fresh)
        n_held_out = 15  # validation_fraction=0.1 of 150 rows
        gaps.append((detector.preprocessing_scores_[None] - scores.mean()) / (scores.std() / np.sqrt(n_held_out)))
    assert abs(np.mean(gaps)) < 1.2, gaps


def test_auto_refit_leaves_nothing_of_the_earlier_fit(rng):
    import pandas as pd

    X = _correlated_gaussian(300, rng)
    detector = _small().fit(pd.DataFrame(X, columns=["a", "b", "c"]))
    assert hasattr(detector, "feature_names_in_")
    detector.fit(X)
    assert not hasattr(detector, "feature_names_in_")


def test_log_jacobian_is_that_of_the_transform(rng):
    """The marginal map's log-derivative against finite differences, inside and beyond the knots."""
    X = np.c_[rng.exponential(size=200), rng.randint(0, 5, size=200).astype(float)]
    marginals = _Marginals(True).fit(X, np.ones(200))
    # points strictly inside cells (not on knots) and beyond the range
    inside = np.c_[rng.uniform(0.2, 2.0, size=50), rng.uniform(0.1, 3.9, size=50) // 1 + 0.3]
    beyond = np.array([[-3.0, -4.0], [25.0, 12.0]])
    for points in (inside, beyond):
        step = 1e-7
        numeric = sum(
            np.log((marginals.transform(points + step * e)[:, j] - marginals.transform(points - step * e)[:, j]) / (2 * step))
            for j, e in enumerate(np.eye(2))
        )
        np.testing.assert_allclose(marginals.log_jacobian(points), numeric, rtol=1e-5, atol=1e-5)
    assert np.all(_Marginals(False).fit(X, np.ones(200)).log_jacobian(inside) == 0)


def test_clearly_better_needs_more_than_noise(rng):
    """The quantile map is kept only when its held-out gain exceeds two standard errors."""
    ones = np.ones(400)
    reference = rng.normal(size=400)
    noise = reference + rng.normal(scale=1.0, size=400)  # gain 0 on average
    assert not _clearly_better((noise, ones), (reference, ones))
    assert _clearly_better((reference + 0.3 + rng.normal(scale=1.0, size=400), ones), (reference, ones))
    # weights: a zero-weight row does not count, even at -inf
    worse = reference.copy()
    worse[0] = -np.inf
    weight = ones.copy()
    weight[0] = 0.0
    assert _clearly_better((reference + 1.0, weight), (worse, weight))
    # a row that only the reference gives -inf decides, and the other way round
    assert _clearly_better((reference, ones), (worse, ones))
    assert not _clearly_better((worse, ones), (reference + 0.0, ones))


def test_a_single_value_is_constant_despite_the_round_off_of_its_mean(rng):
    """A repeated value whose strided mean drifts by ~100 ulps was not dropped, and the quantile map raised.

    (6_cardio of ADBench, seed 1: an IndexError in the marginal transform.)
    """
    X = np.c_[rng.normal(size=(1042, 2)), np.full(1042, -0.06140064449540183)]
    for preprocessing in ("quantile", None):
        detector = _small(preprocessing=preprocessing, max_iter=2).fit(X)
        np.testing.assert_array_equal(detector.constant_features_, [2])
