"""The comparators of benchmarks/adbench.py score what they claim to."""

import numpy as np
from scipy import stats
from scipy.special import logsumexp


def test_kernel_density_comparator_is_exact_in_many_dimensions(load_benchmark):
    """Every kernel is summed: scikit-learn's tree pruning overstates log-densities by tens of
    nats at 100 features, which reorders the rows the detector ranks."""
    adbench = load_benchmark("adbench")
    rng = np.random.default_rng(0)
    X, X_test = rng.standard_normal((300, 100)), rng.standard_normal((20, 100))
    scores = adbench.DETECTORS["KernelDensity"](0).fit(X).score_samples(X_test)
    Z, Z_test = (X - X.mean(axis=0)) / X.std(axis=0), (X_test - X.mean(axis=0)) / X.std(axis=0)
    per_kernel = stats.norm.logpdf(Z_test[:, None, :], loc=Z[None, :, :]).sum(axis=2)
    np.testing.assert_allclose(scores, logsumexp(per_kernel, axis=1) - np.log(len(X)), rtol=0, atol=1e-6)
