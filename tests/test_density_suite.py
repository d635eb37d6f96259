"""The helpers of benchmarks/density_suite.py: every density in the data's units, honest splits."""

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp


@pytest.fixture(scope="module")
def suite(load_benchmark):
    return load_benchmark("density_suite")


def _scaled_rows(n=300, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    return Z * np.array([50.0, 0.02, 3.0]) + np.array([1e3, -5.0, 0.0])


def _direct_kde(X, X_test, bandwidths):
    """The Gaussian kernel density of the rows ``X`` at ``X_test``, every kernel summed."""
    per_kernel = stats.norm.logpdf(X_test[:, None, :], loc=X[None, :, :], scale=bandwidths).sum(axis=2)
    return logsumexp(per_kernel, axis=1) - np.log(len(X))


def test_kde_score_matches_a_direct_sum_of_kernels_in_data_units(suite):
    """The standardised KDE plus its log-Jacobian is the KDE with bandwidth h * std per feature."""
    X = _scaled_rows()
    X_test = _scaled_rows(20, seed=1)
    score_samples, _, h = suite.fit_kde(X, seed=0)
    np.testing.assert_allclose(score_samples(X_test), _direct_kde(X, X_test, h * X.std(axis=0)), rtol=0, atol=1e-4)


def test_kde_is_exact_in_many_dimensions(suite):
    """Every kernel is summed: scikit-learn's tree pruning overstates log-densities by tens of nats at 100 features."""
    rng = np.random.default_rng(0)
    X, X_test = rng.standard_normal((400, 100)), rng.standard_normal((30, 100))
    score_samples, _, h = suite.fit_kde(X, seed=0)
    np.testing.assert_allclose(score_samples(X_test), _direct_kde(X, X_test, h * X.std(axis=0)), rtol=0, atol=1e-4)


def test_gaussian_reference_matches_scipy(suite):
    """The reference is the Gaussian with the training mean and (ridged) covariance, in data units."""
    X = _scaled_rows()
    X_test = _scaled_rows(50, seed=2)
    std = X.std(axis=0)
    correlation = np.cov(X / std, rowvar=False, bias=True) + suite.GAUSS_RIDGE * np.eye(3)
    expected = stats.multivariate_normal(X.mean(axis=0), correlation * np.outer(std, std)).logpdf(X_test)
    np.testing.assert_allclose(suite.GaussianReference(X).score_samples(X_test), expected, rtol=1e-10)


@pytest.mark.parametrize("model", ["gmm", "kde", "reference"])
def test_every_density_integrates_to_one_in_data_units(suite, model):
    """On a feature with std 40, a density left in standardised units would integrate to about 40."""
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(0.0, 40.0, 150), rng.normal(300.0, 20.0, 150)])[:, None]
    if model == "gmm":
        score_samples = suite.fit_gmm(X, seed=0)[0]
    elif model == "kde":
        score_samples = suite.fit_kde(X, seed=0)[0]
    else:
        score_samples = suite.GaussianReference(X).score_samples
    grid = np.linspace(-600.0, 900.0, 30_001)[:, None]
    integral = np.trapezoid(np.exp(score_samples(grid)), grid[:, 0])
    assert integral == pytest.approx(1.0, abs=1e-3)


def test_split_shares_test_rows_and_noise_across_sizes(suite):
    """Small training rows are part of the large ones, under the same test rows and noise."""
    rng = np.random.default_rng(4)
    n = 1_000
    X = np.column_stack([rng.normal(size=n), rng.integers(0, 5, n), np.full(n, 7.0), rng.normal(size=n)])
    dataset = suite.DataSet("fake", "adbench", load=lambda: X.copy())
    small_train, test_a, info = suite.split(dataset, 0, 500)
    large_train, test_b, _ = suite.split(dataset, 0, 800)
    assert info == {"n_rows": n, "dropped_constant": 1, "dropped_constant_train": 0, "dequantised": 1}
    assert test_a.shape == (200, 3) and large_train.shape == (800, 3)
    np.testing.assert_array_equal(test_a, test_b)
    np.testing.assert_array_equal(small_train, large_train[:500])
    # the integer column is dequantised by U(0, 1) noise, the others untouched
    noise = large_train[:, 1] - np.floor(large_train[:, 1])
    assert np.all((noise > 0) & (noise < 1)) and np.all(np.floor(large_train[:, 1]) <= 4)
    assert set(np.round(large_train[:, 0], 12)) <= set(np.round(X[:, 0], 12))
    other_seed = suite.split(dataset, 1, 500)[1]
    assert not np.array_equal(other_seed, test_a)


def test_sizes_of_a_small_set_is_one_size(suite):
    dataset = suite.DataSet("fake", "adbench", load=None)
    assert suite.sizes_of(dataset, 600, ["small", "large"]) == [("small", 480)]
    assert suite.sizes_of(dataset, 1_000, ["small", "large"]) == [("small", 500), ("large", 800)]
    assert suite.sizes_of(dataset, 300_000, ["large"]) == [("large", 20_000)]


@pytest.mark.parametrize(
    "mean, se, expected",
    [(0.5, 0.2, "win"), (0.3, 0.2, "tie"), (-0.3, 0.2, "tie"), (-0.5, 0.2, "loss"), (-np.inf, np.nan, "loss")],
)
def test_verdict_is_two_standard_errors(suite, mean, se, expected):
    assert suite.verdict(mean, se) == expected


@pytest.mark.parametrize("value", [0.0, -0.0827])
def test_split_drops_a_column_constant_on_the_training_rows(suite, value):
    """A rare value leaves a column constant on the training rows: no model could standardise it.

    With -0.0827 the std of 500 equal values is round-off (1e-17), not 0: it gave
    GMM and KDE a spike worth +36 nats per row on ADBench's cardio.
    """
    rng = np.random.default_rng(5)
    n = 1_000
    rare = np.full(n, value)
    assert value == 0.0 or np.full(500, value).std() > 0  # the round-off this test is about
    rare[0] = 1.5
    X = np.column_stack([rng.normal(size=n), rare])
    dataset = suite.DataSet("fake", "adbench", load=lambda: X.copy())
    dropped = []
    for seed in range(6):
        X_train, X_test, info = suite.split(dataset, seed, 500)
        assert X_train.shape[1] == X_test.shape[1] == 2 - info["dropped_constant_train"]
        assert np.all(X_train.std(axis=0) > 0)
        dropped.append(info["dropped_constant_train"])
    assert 0 < sum(dropped) < 6  # the rare row fell in the training rows of some seeds only


def test_sklearn_generators_are_a_group_of_their_own(suite):
    """scikit-learn's sample generators, as a user's first try: fixed rows, both sizes, no known density."""
    sets = suite.select_sets("sk-generated", quick=False)
    assert len(sets) == 9 and all(d.group == "sk-generated" and d.density is None for d in sets)
    for dataset in sets:
        X = dataset.load()
        assert X.shape[0] == suite.SK_GENERATED_ROWS and np.all(np.isfinite(X))
        np.testing.assert_array_equal(X, dataset.load())  # the same rows every time
        assert [size for size, _ in suite.sizes_of(dataset, X.shape[0], ["small", "large"])] == ["small", "large"]
    with pytest.raises(SystemExit, match="sk-generated"):
        suite.select_sets("no-such-set", quick=False)


def test_stress_sets_are_fixed_finite_and_what_they_say(suite):
    """The stress group: the same rows in every process and call, each set of the kind its name says."""
    sets = {d.name: d for d in suite.select_sets("stress", quick=False)}
    assert len(sets) == 16 and all(d.group == "stress" and d.density is None for d in sets.values())
    for name, dataset in sets.items():
        X = dataset.load()
        assert np.all(np.isfinite(X)) and X.shape[0] == (60 if name == "wide_60x50" else suite.STRESS_ROWS)
        np.testing.assert_array_equal(X, dataset.load())
    X = sets["half_duplicates"].load()
    assert np.mean(np.all(X == X[0], axis=1)) > 0.45
    assert set(np.unique(sets["two_valued_column"].load()[:, 3])) == {0.3, 0.7}
    assert np.ptp(sets["mixed_scales"].load()[:, 3]) > 1e6 and np.ptp(sets["mixed_scales"].load()[:, 0]) < 1e-4
    counts = sets["poisson_counts"].load()
    keep, integer = suite.column_rules(counts)
    assert keep.all() and integer.all()  # dequantised by the suite's rule
    assert sets["wide_60x50"].load().shape == (60, 50)
    # the rows do not depend on which set a process loads first
    fresh = suite._stress_sets()
    np.testing.assert_array_equal(fresh[-1].load(), sets["wide_60x50"].load())


@pytest.mark.parametrize(
    "name, box",
    [
        ("checkerboard-2d", [(0.5, 2.5), (0.2, 1.7)]),
        ("shell-3d", [(0.0, 1.2), (-0.5, 0.5), (-1.2, 0.3)]),
        ("cauchy-3d", [(-1.0, 2.0), (-3.0, 0.5), (0.0, 4.0)]),
        ("uniform-6d", [(0.1, 0.9)] * 3 + [(0.0, 0.5)] * 3),
        ("lognormal-4d", [(0.5, 2.0)] * 4),
        ("gaussian-8d", [(-1.0, 1.0)] * 8),
    ],
)
def test_a_new_density_draws_the_mass_its_log_density_gives_a_box(suite, name, box):
    """The sampler and the exact log-density agree: the share of draws in a box is the density integrated over it."""
    density = suite.DENSITIES[name]
    rng = np.random.default_rng(0)
    low, high = np.array(box).T
    drawn = density.sample(200_000, rng)
    share = np.mean(np.all((drawn >= low) & (drawn <= high), axis=1))
    uniform = rng.uniform(low, high, size=(400_000, len(box)))
    integral = np.prod(high - low) * np.mean(np.exp(density.log_prob(uniform)))
    assert share > 0.01
    assert integral == pytest.approx(share, rel=0.03)
