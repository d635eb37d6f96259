"""benchmarks/native_passes.py switches each C pass off through private names: they must still exist.

The script broke unnoticed when the optimizer moved to ``_optimizer.py``;
this runs each of its configurations on a tiny fit and checks that every one
gives the same model (the passes are the same arithmetic in C or in torch).
"""

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf import MAFDensity

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def native_passes():
    if not (BENCHMARKS / "native_passes.py").exists():
        pytest.skip("benchmarks/ is not part of this checkout")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("native_passes", BENCHMARKS / "native_passes.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
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
