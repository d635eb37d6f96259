"""MAFConditionalDensity against conditional densities known in closed form."""

import inspect

import numpy as np
import pytest
from scipy import stats
from sklearn.model_selection import GridSearchCV, cross_validate

from sklearn_maf import MAFConditionalDensity


def _heteroscedastic(n, rng):
    """y | x ~ N(sin(2x), (0.1 + 0.2|x|)^2), x ~ U(-2, 2): exact log-density known."""
    X = rng.uniform(-2, 2, size=(n, 1))
    mean, scale = np.sin(2 * X[:, 0]), 0.1 + 0.2 * np.abs(X[:, 0])
    return X, mean + scale * rng.normal(size=n), stats.norm(mean, scale)


def _small(**params):
    defaults = dict(n_layers=2, hidden_units=16, max_iter=10, random_state=0)
    return MAFConditionalDensity(**{**defaults, **params})


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.RandomState(0)
    X, y, _ = _heteroscedastic(4000, rng)
    model = MAFConditionalDensity(n_layers=3, hidden_units=32, random_state=0).fit(X, y)
    X_test, y_test, truth = _heteroscedastic(2000, rng)
    return model, X_test, y_test, truth


def test_log_density_matches_the_closed_form(fitted):
    """Held-out log p(y|x) is within a few hundredths of a nat of the true conditional."""
    model, X_test, y_test, truth = fitted
    gap = truth.logpdf(y_test).mean() - model.score_samples(X_test, y_test).mean()
    assert abs(gap) < 0.05


def test_conditional_density_integrates_to_one(fitted):
    model, _, _, _ = fitted
    grid = np.linspace(-4, 4, 4001)
    for x in (-1.5, 0.0, 1.0):
        density = np.exp(model.score_samples(np.full((grid.size, 1), x), grid))
        assert density.sum() * (grid[1] - grid[0]) == pytest.approx(1.0, abs=0.01)


def test_predict_is_the_conditional_mean(fitted):
    model, X_test, _, truth = fitted
    prediction = model.predict(X_test[:300])
    assert prediction.shape == (300,)
    assert np.sqrt(np.mean((prediction - truth.mean()[:300]) ** 2)) < 0.05


def test_predict_is_deterministic_and_row_independent(fitted):
    model, X_test, _, _ = fitted
    whole = model.predict(X_test[:50], n_draws=32)
    np.testing.assert_allclose(model.predict(X_test[10:20], n_draws=32), whole[10:20], atol=1e-12)


def test_samples_follow_the_conditional(fitted):
    """sample() draws from the model's own conditional density, and that is near the truth.

    The draws are tested against the model's conditional CDF (its density
    integrated on a grid), which only sampling errors can fail; against the
    true N(sin 2, 0.3^2), 3,000 draws would also detect the model's own error
    of a few hundredths, which depends on the details of training.
    """
    model, _, _, _ = fitted
    X = np.full((3000, 1), 1.0)
    draws = model.sample(X, random_state=0)
    grid = np.linspace(-4, 4, 16001)
    density = np.exp(model.score_samples(np.full((grid.size, 1), 1.0), grid))
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    assert stats.kstest(draws, lambda y: np.interp(y, grid, cdf / cdf[-1])).pvalue > 0.01
    assert draws.mean() == pytest.approx(np.sin(2.0), abs=0.05)
    assert draws.std() == pytest.approx(0.3, rel=0.1)
    np.testing.assert_array_equal(model.sample(X[:5], random_state=1), model.sample(X[:5], random_state=1))


def test_two_dimensional_targets(rng):
    """y is (n, 2): shapes follow y, and the log-density is in the units of y."""
    X = rng.normal(size=(600, 2))
    Y = np.c_[X[:, 0] + 0.3 * rng.normal(size=600), X[:, 1] * 100 + 10 * rng.normal(size=600)]
    model = _small().fit(X, Y)
    assert model.n_targets_ == 2
    assert model.sample(X[:7], random_state=0).shape == (7, 2)
    assert model.predict(X[:7], n_draws=8).shape == (7, 2)
    scaled = _small().fit(X, Y / 100)
    shift = scaled.score_samples(X, Y / 100).mean() - model.score_samples(X, Y).mean()
    assert shift == pytest.approx(2 * np.log(100), abs=1e-4)


def test_grid_search_and_cross_validate(rng):
    X, y, _ = _heteroscedastic(300, rng)
    search = GridSearchCV(_small(max_iter=3), {"n_layers": [1, 2]}, cv=3).fit(X, y)
    assert search.best_params_["n_layers"] in (1, 2)
    scores = cross_validate(_small(max_iter=3), X, y, cv=3)["test_score"]
    assert scores.shape == (3,) and np.all(np.isfinite(scores))


def test_constant_context_feature_is_harmless(rng):
    X, y, _ = _heteroscedastic(300, rng)
    X = np.c_[X, np.ones(300)]
    model = _small(max_iter=3).fit(X, y)
    assert np.all(np.isfinite(model.score_samples(X, y)))


@pytest.mark.parametrize(
    "y, message",
    [
        (np.ones((10, 2)), "y has 2 targets, but MAFConditionalDensity is expecting 1"),
        (np.ones(9), "X and y have different numbers of rows: 10 and 9"),
        (np.r_[np.ones(9), np.nan], "Input y contains NaN"),
    ],
)
def test_bad_scoring_targets(fitted, y, message):
    model = fitted[0]
    with pytest.raises(ValueError, match=message):
        model.score_samples(np.zeros((10, 1)), y)


def test_fit_requires_y(rng):
    with pytest.raises(ValueError, match="requires y to be passed"):
        _small().fit(rng.normal(size=(20, 2)), None)


def test_scores_are_invariant_to_batching_and_row_order(fitted):
    """The two scikit-learn checks that call score_samples(X), done with (X, y)."""
    model, X_test, y_test, _ = fitted
    whole = model.score_samples(X_test[:40], y_test[:40])
    in_pieces = np.concatenate(
        [model.score_samples(X_test[i : min(i + 7, 40)], y_test[i : min(i + 7, 40)]) for i in range(0, 40, 7)]
    )
    np.testing.assert_allclose(in_pieces, whole, atol=1e-9)
    order = np.random.RandomState(0).permutation(40)
    np.testing.assert_allclose(model.score_samples(X_test[order], y_test[order]), whole[order], atol=1e-9)
    np.testing.assert_allclose(model.predict(X_test[order], n_draws=16), model.predict(X_test[:40], n_draws=16)[order], atol=1e-9)


def test_weighted_context_scaling_equals_repetition(rng):
    """The context's standardisation uses the sample weights (a bug the common checks caught)."""
    X, y, _ = _heteroscedastic(30, rng)
    weight = rng.randint(0, 4, size=30)
    params = dict(early_stopping=False, batch_size=1000, precision="float64", max_iter=3)
    weighted = _small(**params).fit(X, y, sample_weight=weight)
    repeated = _small(**params).fit(X.repeat(weight, axis=0), y.repeat(weight))
    np.testing.assert_allclose(weighted.context_mean_, repeated.context_mean_)
    np.testing.assert_allclose(weighted.score_samples(X, y), repeated.score_samples(X, y), atol=1e-9)


def test_predict_with_a_mog_base_is_the_mixture_mean(rng):
    """predict draws through the MoG base, not a standard normal (a bug caught by eye)."""
    X = rng.uniform(-1, 1, size=(3000, 1))
    branch = rng.randint(2, size=3000)
    y = np.where(branch, 2.0, -1.0) + 0.1 * rng.normal(size=3000)  # mean 0.5 whatever x
    model = _small(base="mog", n_components=3, max_iter=60, hidden_units=32).fit(X, y)
    np.testing.assert_allclose(model.predict(X[:20]), 0.5, atol=0.1)


def test_predict_with_a_student_t_base_is_the_conditional_mean(rng):
    """predict draws through the t base (scipy's quantile, on fixed QMC noise)."""
    X = rng.uniform(-1, 1, size=(3000, 1))
    y = 2 * X[:, 0] + 0.3 * rng.standard_t(3, size=3000)  # mean 2x: the noise has mean 0
    model = _small(base="student-t", max_iter=60, hidden_units=32).fit(X, y)
    assert model.module_.base.df.item() < 10  # it did learn heavy tails
    np.testing.assert_allclose(model.predict(X[:20]), 2 * X[:20, 0], atol=0.1)
    np.testing.assert_array_equal(model.predict(X[:20]), model.predict(X[:20]))


def test_auto_base_decides_on_the_targets(rng):
    """base="auto" fits its multivariate t to the targets, not to the context."""
    X = rng.standard_t(1.5, size=(2000, 2))  # heavy-tailed context throughout
    heavy = 0.5 * np.tanh(X[:, 0]) + 0.3 * rng.standard_t(2.5, size=2000)
    light = 0.5 * np.tanh(X[:, 0]) + 0.3 * rng.normal(size=2000)
    model = _small().fit(X, heavy)
    # one target: its t is trivially the whole's, so the fitted t (whitened, no batch norm)
    assert model.base_ == "fitted-t" and np.isfinite(model.score_samples(X[:50], heavy[:50])).all()
    assert _small().fit(X, light).base_ == "gaussian"


def test_the_conditional_estimator_has_only_conditional_methods():
    """p(y | x) inherits no unconditional plumbing: no partial_fit, no score or sample of X alone."""
    for name in ("partial_fit", "_partial_fit", "_fit", "_log_density", "_validate_fitted_input", "transform"):
        assert not hasattr(MAFConditionalDensity, name), name
    for method in ("sample", "score_samples", "score", "predict"):
        assert list(inspect.signature(getattr(MAFConditionalDensity, method)).parameters)[1] == "X"
