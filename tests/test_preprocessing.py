"""The fixed first layers run in float64 before the float32 part, in training and in scoring.

A feature whose offset is large against its spread, or whose values lie
beyond float32's range, is fitted as well as the same data unshifted and
unscaled (issue 18: "Exact preprocessing in float64").
"""

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf import MAFDensity
from sklearn_maf._preprocessing import _weighted_moments
from sklearn_maf._nn import MAF
from sklearn_maf._nn.preprocessing import Bounded, Standardize, Whiten


def _banana(n_rows, seed):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=n_rows)
    return np.c_[x, 0.5 * x**2 + 0.3 * rng.normal(size=n_rows)]


def _fit_and_score(X, X_test, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MAFDensity(n_layers=2, hidden_units=16, max_iter=8, random_state=0, **params).fit(X)
    return model, model.score_samples(X_test)


@pytest.mark.parametrize("offset", [1e7, 1e12])
def test_a_feature_offset_by_many_spreads_fits_as_well_as_unshifted_in_float32(offset):
    """The density is shift-invariant: the shifted fit must score the shifted rows as the plain fit does.

    Rounded to float32 before standardising, a feature at 1e7 spreads keeps a
    few bits of its variation and one at 1e12 none.
    """
    X, X_test = _banana(1000, 0), _banana(500, 1)
    shift = np.array([0.0, offset * X[:, 1].std()])
    _, plain = _fit_and_score(X, X_test)
    _, shifted = _fit_and_score(X + shift, X_test + shift)
    assert abs(shifted.mean() - plain.mean()) < 5e-3
    np.testing.assert_allclose(shifted, plain, atol=0.05)


def test_values_beyond_float32_range_get_finite_scores_in_float32_training():
    """Rows at 1e300 (float32's largest value is 3.4e38): the fit is the unscaled one, in the new units."""
    X, X_test = _banana(1000, 0), _banana(500, 1)
    _, plain = _fit_and_score(X, X_test)
    model, huge = _fit_and_score(X * 1e300, X_test * 1e300)
    assert np.all(np.isfinite(huge))
    np.testing.assert_allclose(huge + 2 * np.log(1e300), plain, atol=1e-3)
    assert np.all(np.isfinite(model.sample(20, random_state=0)))


def test_weighted_moments_do_not_overflow_at_any_finite_magnitude():
    rng = np.random.RandomState(0)
    Z, weight = rng.normal(size=(50, 3)), rng.uniform(size=50)
    loc, scale = _weighted_moments(Z, weight)
    for magnitude in (1e200, 1e300, 1e-300):
        huge_loc, huge_scale = _weighted_moments(Z * magnitude, weight)
        np.testing.assert_allclose(huge_loc, loc * magnitude, rtol=1e-12)
        np.testing.assert_allclose(huge_scale, scale * magnitude, rtol=1e-12)
    # exactly the plain formula where that does not overflow (the scaling is by powers of two)
    plain_loc = np.average(Z * 3.7, axis=0, weights=weight)
    plain_scale = np.sqrt(np.average((Z * 3.7 - plain_loc) ** 2, axis=0, weights=weight))
    np.testing.assert_array_equal(_weighted_moments(Z * 3.7, weight)[0], plain_loc)
    np.testing.assert_array_equal(_weighted_moments(Z * 3.7, weight)[1], plain_scale)


@pytest.mark.parametrize("layer", ["bounded", "standardize", "whiten"])
def test_fixed_layers_keep_float64_when_the_flow_changes_dtype(layer):
    loc = torch.tensor([1e7 + 0.125, -3.0], dtype=torch.float64)
    layers = {
        "bounded": lambda: Bounded(loc - 1.0, torch.tensor([float("inf"), 0.0], dtype=torch.float64)),
        "standardize": lambda: Standardize(loc, torch.tensor([0.5, 2.0], dtype=torch.float64)),
        "whiten": lambda: Whiten(loc, torch.tensor([[2.0, 0.0], [0.3, 0.5]], dtype=torch.float64)),
    }
    fixed = layers[layer]()
    before = {name: buffer.clone() for name, buffer in fixed.named_buffers()}
    fixed.to(torch.float32)
    fixed.half()
    for name, buffer in fixed.named_buffers():
        assert buffer.dtype == before[name].dtype
        assert torch.equal(buffer, before[name])


def test_a_float32_flow_standardises_in_float64_and_trains_its_learned_layers_in_float32():
    X = torch.tensor(_banana(200, 0), dtype=torch.float64) + torch.tensor([0.0, 1e7])
    flow = MAF(
        X.mean(0), X.std(0), n_layers=2, hidden_units=8, n_hidden_layers=1,
        generator=torch.Generator().manual_seed(0), dtype=torch.float64,
    ).to(torch.float32)  # fmt: skip
    assert flow.transforms[0].loc.dtype == torch.float64
    assert flow.transforms[1].made.layers[0].weight.dtype == torch.float32
    u, logabsdet = flow(X)
    assert u.dtype == torch.float32
    # the learned layers start near the identity: u is about the standardised rows, which
    # float32 standardisation would have rounded to multiples of about 0.5 spread
    standardised = (X - X.mean(0)) / X.std(0)
    assert float((u.detach().double() - standardised).abs().max()) < 0.1


def test_a_feature_that_only_validation_rows_vary_is_standardised_on_all_rows():
    """One row of 200 differs in the third feature; where early stopping's split puts it among
    the validation rows, the training rows alone have that feature constant. The fit used to raise
    ("constant on the training rows", as on mnist's inliers in the density suite); it now takes that
    feature's spread from all rows. A feature constant on every row still raises."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 3))
    X[:, 2] = 0.5
    X[7, 2] = 20.0
    params = dict(n_layers=2, hidden_units=16, max_iter=10, precision="float64", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MAFDensity(**params).fit(X)  # random_state=0 puts row 7 among the validation rows
    scores = model.score_samples(np.vstack([X, [[0.0, 0.0, 0.5], [0.0, 0.0, 20.0]]]))
    assert np.all(np.isfinite(scores))
    assert scores[-2] > scores[-1]
    X[7, 2] = 0.5
    with pytest.raises(ValueError, match=r"Feature\(s\) \[2\] are constant"):
        MAFDensity(**params).fit(X)
