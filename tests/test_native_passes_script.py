"""benchmarks/native_passes.py switches each C pass off through private names: they must still exist.

The script broke unnoticed when the optimizer moved to ``_optimizer.py``;
this runs each of its configurations on a tiny fit and checks that every one
gives the same model (the passes are the same arithmetic in C or in torch).
"""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf import MAFDensity


@pytest.fixture(scope="module")
def native_passes(load_benchmark):
    module = load_benchmark("native_passes")
    yield module
    module.configure()


@pytest.mark.parametrize(
    "switch", [{}, {"elementwise": False}, {"adam": False}, {"affine_score": False}, {"linear_relu": False}]
)
def test_each_configuration_fits_and_scores_the_same_model(native_passes, switch):
    X = np.random.RandomState(0).normal(size=(300, 3))
    params = dict(n_layers=2, hidden_units=8, max_iter=2, precision="float64", reference=None, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        native_passes.configure()
        expected = MAFDensity(**params).fit(X).score_samples(X)
        native_passes.configure(**switch)
        try:
            scores = MAFDensity(**params).fit(X).score_samples(X)
        finally:
            native_passes.configure()
    np.testing.assert_allclose(scores, expected, rtol=1e-7, atol=1e-7)
