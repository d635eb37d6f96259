"""Tests for sklearn_maf._model_selection: the ECME fit of a multivariate t."""

import numpy as np
import pytest
from scipy import stats

from sklearn_maf._model_selection import _multivariate_t


@pytest.mark.parametrize("df", [2.5, 8.0])
def test_multivariate_t_recovers_location_scatter_and_degrees_of_freedom(df):
    rng = np.random.default_rng(0)
    shape = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])
    Z = stats.multivariate_t(np.ones(3), shape, df=df).rvs(20_000, random_state=rng)
    loc, scatter, fitted_df = _multivariate_t(Z, np.ones(len(Z)))
    assert fitted_df == pytest.approx(df, rel=0.1)
    np.testing.assert_allclose(loc, np.ones(3), atol=0.03)
    np.testing.assert_allclose(scatter, shape, atol=0.06)
    Z = rng.normal(size=(5000, 3))
    _, scatter, fitted_df = _multivariate_t(Z, np.ones(5000))
    assert fitted_df > 100  # lighter than any t: a normal, the scatter its covariance
    np.testing.assert_allclose(scatter, np.cov(Z.T, bias=True), rtol=0.05, atol=0.01)


def test_multivariate_t_of_fewer_rows_than_features_is_finite():
    rng = np.random.default_rng(3)
    _, scatter, df = _multivariate_t(rng.normal(size=(3, 5)), np.ones(3))
    assert np.isfinite(df) and df >= 1.05
    assert np.all(np.linalg.eigvalsh(scatter) > 0)  # the ridge: Whiten needs its Cholesky factor


def test_multivariate_t_weights_are_repetitions():
    rng = np.random.default_rng(1)
    Z = stats.multivariate_t(np.zeros(2), np.eye(2), df=3.0).rvs(1000, random_state=rng)
    weight = rng.integers(0, 3, size=1000).astype(float)
    repeated = np.repeat(Z, weight.astype(int), axis=0)
    for weighted, plain in zip(_multivariate_t(Z, weight), _multivariate_t(repeated, np.ones(len(repeated)))):
        np.testing.assert_allclose(weighted, plain, rtol=1e-6, atol=1e-9)
