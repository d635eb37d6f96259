"""The rational-quadratic spline MAF layer (issue 20 item 4), tested as the affine layer is.

Its inverse, its log-determinant against autograd's Jacobian, the density
of a spline flow integrating to 1, sampling by the analytic inverse against
the one-pass-per-feature solution, and its training step, which has no
hand-written backward pass, against autograd.
"""

import itertools

import pytest
import torch

from sklearn_maf._nn import MAF, MADE, BatchNorm
from sklearn_maf._nn.backprop import Backprop, masked_weights
from sklearn_maf._nn.made import input_degrees
from sklearn_maf._nn.transforms import SplineMADE

DTYPE = torch.float64


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _randomise(module, seed, scale=1.0):
    """Weights of order one in every MADE output layer: the splines are far from the identity."""
    generator = _generator(seed)
    with torch.no_grad():
        for made in [m for m in module.modules() if isinstance(m, MADE)]:
            made.layers[-1].weight.uniform_(-scale, scale, generator=generator)
            made.layers[-1].bias.uniform_(-scale, scale, generator=generator)
        for norm in [m for m in module.modules() if isinstance(m, BatchNorm)]:
            norm.log_gamma.uniform_(-0.3, 0.3, generator=generator)
            norm.running_var.uniform_(0.5, 2.0, generator=generator)
    return module


def _layer(n_features, n_bins=5, tail_bound=3.0, n_context=0, order="natural", seed=0):
    generator = _generator(seed)
    order = torch.arange(n_features) if order == "natural" else torch.randperm(n_features, generator=generator)
    layer = SplineMADE(
        input_degrees(order), n_bins=n_bins, tail_bound=tail_bound, hidden_units=n_features + 4,
        n_hidden_layers=1, n_context=n_context, generator=generator, dtype=DTYPE,
    )  # fmt: skip
    return _randomise(layer, seed + 1)


def _flow(n_features, seed=0, **params):
    loc = torch.zeros(n_features, dtype=DTYPE)
    flow = MAF(
        loc, loc + 1.0, **{"n_layers": 2, "hidden_units": n_features + 3, "n_hidden_layers": 1, **params},
        transform="spline", transform_params={"n_bins": 4, "tail_bound": 2.5},
        generator=_generator(seed), dtype=DTYPE,
    )  # fmt: skip
    return _randomise(flow, seed + 1).eval()


def _row_slogdets(function, x):
    jac = torch.autograd.functional.jacobian(lambda rows: function(rows).sum(0), x)
    sign, logabsdet = torch.linalg.slogdet(jac.permute(1, 0, 2))
    assert (sign != 0).all()
    return logabsdet


def _inputs(n_rows, n_features, seed=2):
    # inside and outside the tail bound, a few exactly on knots' neighbourhoods
    return 2.5 * torch.randn(n_rows, n_features, generator=_generator(seed), dtype=DTYPE)


def test_a_new_spline_layer_is_the_identity():
    layer = SplineMADE(
        input_degrees(torch.arange(3)), hidden_units=6, n_hidden_layers=1, generator=_generator(0), dtype=DTYPE
    )
    with torch.no_grad():
        layer.made.layers[-1].weight.zero_()
        layer.made.layers[-1].bias.zero_()
    x = _inputs(40, 3)
    u, logabsdet = layer(x)
    torch.testing.assert_close(u, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logabsdet, torch.zeros(40, dtype=DTYPE), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "n_features, n_bins, n_context, order", list(itertools.product([1, 2, 5], [1, 3, 8], [0, 2], ["natural", "random"]))
)
def test_spline_inverse_inverts_forward_and_logabsdets_match_autograd(n_features, n_bins, n_context, order):
    layer = _layer(n_features, n_bins, n_context=n_context, order=order)
    x = _inputs(30, n_features)
    context = torch.randn(30, n_context, generator=_generator(3), dtype=DTYPE) if n_context else None
    u, logabsdet = layer(x, context)
    # one bin between the corners, slope 1 at both: the identity; more bins bend it
    assert (float((u - x).detach().abs().max()) > 0.1) == (n_bins > 1)
    torch.testing.assert_close(
        logabsdet, _row_slogdets(lambda r: layer(r, context)[0], x), rtol=1e-10, atol=1e-10
    )
    with torch.no_grad():
        x_back, inverse_logabsdet = layer.inverse(u, context)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-8, atol=1e-8)


def test_spline_is_the_identity_beyond_its_tail_bound_and_monotone_within():
    layer = _layer(1, n_bins=6, tail_bound=2.0)
    x = torch.linspace(-6, 6, 2001, dtype=DTYPE)[:, None]
    u, logabsdet = layer(x)
    outside = x.abs().squeeze(1) >= 2.0
    torch.testing.assert_close(u[outside], x[outside], rtol=0, atol=0)
    assert bool((logabsdet[outside] == 0).all())
    assert bool((u[1:] > u[:-1]).all())  # strictly increasing: a bijection
    assert float((u[~outside] - x[~outside]).detach().abs().max()) > 0.05


def test_sampling_by_the_analytic_inverse_equals_one_made_pass_per_feature():
    """MADE.solve's fast path (no autograd) against the differentiable one (a full pass per feature)."""
    layer = _layer(4, n_bins=5, n_context=2, order="random")
    u = _inputs(25, 4, seed=7)
    context = torch.randn(25, 2, generator=_generator(8), dtype=DTYPE)
    slow, slow_logabsdet = layer.inverse(u, context)  # autograd recording: one pass per feature
    with torch.no_grad():
        fast, fast_logabsdet = layer.inverse(u, context)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_logabsdet, slow_logabsdet.detach(), rtol=1e-10, atol=1e-10)


def test_a_spline_flow_density_integrates_to_one():
    """A 2-D flow of spline layers and batch norm: the density on a grid sums to 1."""
    flow = _flow(2, batch_norm=True)
    grid = torch.linspace(-12, 12, 601, dtype=DTYPE)
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        density = torch.exp(flow.log_prob(points))
    cell = float(grid[1] - grid[0]) ** 2
    assert float(density.sum()) * cell == pytest.approx(1.0, abs=2e-3)


def test_a_spline_flow_samples_by_its_inverse():
    flow = _flow(3)
    with torch.no_grad():
        x = flow.sample(50, generator=_generator(4))
        u, logabsdet = flow(x)
        x_back, inverse_logabsdet = flow.inverse(u)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("batch_norm, weighted, n_context", [(False, False, 0), (True, True, 0), (True, False, 2)])
def test_spline_flow_training_step_equals_autograd(batch_norm, weighted, n_context):
    """No hand-written backward pass: Backprop differentiates the spline layers through autograd."""
    flows = [_flow(3, batch_norm=batch_norm, n_context=n_context).train() for _ in range(2)]
    X = _inputs(64, 3, seed=5)
    generator = _generator(6)
    weight = torch.rand(64, generator=generator, dtype=DTYPE) + 0.2 if weighted else None
    context = torch.randn(64, n_context, generator=generator, dtype=DTYPE) if n_context else None
    log_prob = flows[0].log_prob(X, context, weight)
    loss = -(log_prob.mean() if weight is None else (log_prob * weight).sum() / weight.sum())
    loss.backward()
    backprop = Backprop(flows[1])
    assert any(type(layer).__name__ == "_AutogradTransform" for layer in backprop.layers)
    manual = backprop.loss_and_grad(X, weight, context)
    torch._foreach_mul_([w.grad for w in masked_weights(flows[1])[0]], masked_weights(flows[1])[1])
    torch.testing.assert_close(manual, loss.detach(), rtol=1e-12, atol=0)
    for (name, a), b in zip(flows[0].named_parameters(), flows[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_estimators_take_the_spline_transformer_by_parameter(rng):
    import numpy as np

    from sklearn_maf import MAFDensity

    X = rng.normal(size=(200, 2))
    model = MAFDensity(transformer="spline", n_bins=4, tail_bound=2.0, n_layers=2, hidden_units=8, max_iter=2,
                       random_state=0).fit(X)  # fmt: skip
    splines = [t for t in model.module_.transforms if isinstance(t, SplineMADE)]
    assert len(splines) == 2 and all(t.n_bins == 4 and t.tail_bound == 2.0 for t in splines)
    assert np.all(np.isfinite(model.score_samples(X)))
    np.testing.assert_allclose(model.inverse_transform(model.transform(X)), X, atol=1e-8)
    with pytest.raises(ValueError, match="n_bins"):
        MAFDensity(transformer="spline", n_bins=0).fit(X)
    with pytest.raises(ValueError, match="transformer"):
        MAFDensity(transformer="cubic").fit(X)
