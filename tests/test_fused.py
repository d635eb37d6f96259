"""The C passes of sklearn_maf._nn._fused: float32 accuracy and argument checks.

tests/test_backprop.py runs every gradient test (float64) with and without
them; here the float32 passes, whose exp is the module's own, are compared
with torch's operations.
"""

import math

import pytest
import torch

from sklearn_maf._nn import MAF, backprop

pytestmark = pytest.mark.skipif(
    backprop._fused is None, reason="sklearn_maf._nn._fused was not built (no C compiler at install)"
)


def _flow(dtype, **params):
    X = torch.randn(300, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    flow = MAF(
        X.mean(0), X.std(0), generator=torch.Generator().manual_seed(1), dtype=dtype,
        **{"n_layers": 5, "hidden_units": 32, "n_hidden_layers": 2, **params},
    )  # fmt: skip
    return X * 3 - 1, flow.train()


def _loss_and_grads(flow, X, weight, fused):
    loss = Plan(flow, fused=fused).loss_and_grad(X, weight)
    return float(loss), [param.grad.clone() for param in flow.parameters()]


Plan = backprop.Plan


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("weighted", [False, True])
def test_float32_step_matches_torch_operations(batch_norm, activation, weighted):
    X, flow = _flow(torch.float32, batch_norm=batch_norm, activation=activation)
    weight = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(2)) if weighted else None
    state = {name: value.clone() for name, value in flow.state_dict().items()}
    loss_torch, grads_torch = _loss_and_grads(flow, X, weight, fused=False)
    flow.load_state_dict(state)  # the batch norms' running averages, as before
    loss_fused, grads_fused = _loss_and_grads(flow, X, weight, fused=True)
    assert loss_fused == pytest.approx(loss_torch, rel=1e-5)
    # float32 round-off of sums over 300 rows: absolute, where a gradient is a near-cancelling sum
    for (name, _), fused, reference in zip(flow.named_parameters(), grads_fused, grads_torch):
        scale = float(reference.abs().max())
        torch.testing.assert_close(fused, reference, rtol=0, atol=1e-4 * scale + 1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_forward_over_the_whole_range(dtype):
    """The transform, its cached factors and log-det agree with torch's sigmoid and exp everywhere."""
    bound, n_rows, d = 5.0, 1001, 4
    raw = torch.linspace(-1e4, 1e4, n_rows * d, dtype=dtype)
    raw[: 2 * d] = torch.linspace(-50, 50, 2 * d, dtype=dtype)  # where the sigmoid is not saturated
    raw = raw.reshape(n_rows, d)
    shift = torch.randn(n_rows, d, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = torch.randn(n_rows, d, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out = torch.cat([shift, raw], dim=1)
    log_det = torch.full((n_rows,), 0.5, dtype=dtype)

    u, factors = backprop._Fused(x).affine_forward(out, x, bound, log_det)

    sigmoid = torch.sigmoid(raw * (-2.0 / bound))
    minus_log_scale = 2 * bound * sigmoid - bound
    scale = torch.exp(minus_log_scale)
    tight = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(factors[1], sigmoid, rtol=tight, atol=1e-30)
    torch.testing.assert_close(factors[2], scale, rtol=4 * tight, atol=0)
    torch.testing.assert_close(u, (x - shift) * scale, rtol=4 * tight, atol=tight)
    torch.testing.assert_close(log_det, 0.5 + minus_log_scale.sum(1), rtol=0, atol=100 * tight)


def test_non_finite_raw_log_scales_stay_in_their_bounds_or_nan():
    x = torch.zeros(1, 4)
    out = torch.tensor([[0.0, 0.0, 0.0, 0.0, -math.inf, math.inf, math.nan, 1e30]])
    u, factors = backprop._Fused(x).affine_forward(out, x, 5.0, torch.zeros(1))
    sigmoid = factors[1, 0]
    assert sigmoid[0] == 1 and 0 <= sigmoid[1] < 1e-37 and 0 <= sigmoid[3] < 1e-37
    assert math.isnan(sigmoid[2])
    torch.testing.assert_close(factors[2, 0, [0, 1, 3]], torch.tensor([math.exp(5), math.exp(-5), math.exp(-5)]))


def test_tensors_of_another_layout_are_refused():
    fused = backprop._Fused(torch.zeros(1))
    grad, hidden, bias_grad = torch.zeros(8, 3), torch.zeros(8, 3), torch.zeros(3)
    fused.activation_backward(grad, hidden, False, bias_grad)
    with pytest.raises(ValueError, match="contiguous torch.float32"):
        fused.activation_backward(torch.zeros(3, 8).t(), hidden, False, bias_grad)
    with pytest.raises(ValueError, match="got torch.float64"):
        fused.activation_backward(grad, hidden.double(), False, bias_grad)


def test_the_c_functions_check_their_arguments():
    module = backprop._fused
    with pytest.raises(TypeError, match="takes 7 arguments"):
        module.activation_backward(0, 1, 1)
    with pytest.raises(ValueError, match="dtype code"):
        module.activation_backward(2, 1, 1, False, 0, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        module.activation_backward(0, -1, 1, False, 0, 0, 0)
