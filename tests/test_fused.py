"""The C passes of sklearn_maf._nn._fused: float32 accuracy and argument checks.

tests/test_backprop.py runs every gradient test (float64) with and without
them; here the float32 passes, whose exp is the module's own, are compared
with torch's operations.
"""

import math

import pytest
import torch

from sklearn_maf._nn import MAF, backprop
from sklearn_maf._nn.backprop import Plan

pytestmark = pytest.mark.skipif(
    backprop._fused is None, reason="sklearn_maf._nn._fused was not built (no C compiler at install)"
)


@pytest.fixture(params=["avx2", "baseline"])
def instructions(request):
    """The passes compiled for AVX2 and FMA (where the CPU has them), then the baseline's."""
    avx2 = request.param == "avx2"
    try:
        previous = backprop._fused.set_avx2(avx2)
    except ValueError as error:
        pytest.skip(str(error))
    yield request.param
    backprop._fused.set_avx2(previous)


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



@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("weighted", [False, True])
def test_float32_step_matches_torch_operations(batch_norm, activation, weighted, instructions):
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
def test_affine_forward_over_the_whole_range(dtype, instructions):
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


def test_non_finite_raw_log_scales_stay_in_their_bounds_or_nan(instructions):
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


def _flat_and_reference_steps(dtype, n_steps, clip, average):
    """The same gradients through _FlatAdam and through the list-based clip, fused Adam and averaging."""
    from sklearn_maf._training import (
        _FlatAdam, _GradientClip, _ParameterAverage, _adam, _parameter_groups,
    )  # fmt: skip

    _, flat_flow = _flow(dtype, batch_norm=True)
    _, reference_flow = _flow(dtype, batch_norm=True)
    plan = Plan(reference_flow, assume_masked=True, fused=False)
    plan.zero_masked_weights()
    flat = _FlatAdam(flat_flow, 1e-2, 1e-3)
    flat.zero_masked_weights()
    reference = _adam(_parameter_groups(reference_flow, 1e-3), 1e-2)
    clips = [_GradientClip() if clip else None for _ in range(2)]
    averages = [
        _ParameterAverage(flat_flow, flat=flat.flat_param) if average else None,
        _ParameterAverage(reference_flow) if average else None,
    ]
    noise = torch.Generator().manual_seed(3)
    for step in range(n_steps):
        # gradients of every size, one step 50 times the others (the clip acts)
        for a, b in zip(flat_flow.parameters(), reference_flow.parameters()):
            grad = torch.randn(a.shape, generator=noise, dtype=dtype) * (50.0 if step == 3 else 1.0)
            a.grad.copy_(grad)
            b.grad.copy_(grad)
        flat.step(clips[0], averages[0])
        plan.mask_gradients()
        if clips[1] is not None:
            clips[1](plan.flat_grad)
        reference.step()
        if averages[1] is not None:
            averages[1].update()
    return flat_flow, reference_flow, clips, averages


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_flat_adam_steps_like_masks_clipping_fused_adam_and_averaging(clip, average, instructions):
    flat_flow, reference_flow, clips, averages = _flat_and_reference_steps(torch.float64, 6, clip, average)
    for (name, a), b in zip(flat_flow.named_parameters(), reference_flow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    if clip:
        torch.testing.assert_close(clips[0].average, clips[1].average, rtol=1e-12, atol=0)
    if average:
        for a, b in zip(averages[0].average, averages[1].average):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    weights, masks = backprop.masked_weights(flat_flow)
    assert all(bool((w[m == 0] == 0).all()) for w, m in zip(weights, masks))


def test_flat_adam_in_float32_stays_close_to_the_list_based_steps(instructions):
    flat_flow, reference_flow, _, _ = _flat_and_reference_steps(torch.float32, 6, True, True)
    for (name, a), b in zip(flat_flow.named_parameters(), reference_flow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_flat_adam_refuses_parameters_moved_after_it_was_made():
    from sklearn_maf._training import _FlatAdam

    _, flow = _flow(torch.float32)
    optimizer = _FlatAdam(flow, 1e-3, 0.0)
    flow.double()
    with pytest.raises(RuntimeError, match="moved after their optimizer was made"):
        optimizer.step()


def test_flat_adam_takes_autograd_gradients_too():
    """Gradients that autograd puts in .grad (new tensors) are copied in, not ignored."""
    from sklearn_maf._training import _FlatAdam

    X, flow = _flow(torch.float64)
    optimizer = _FlatAdam(flow, 1e-2, 0.0)
    before = optimizer.flat_param.clone()
    for param in flow.parameters():
        param.grad = None
    (-flow.log_prob(X).mean()).backward()
    grads = torch.cat([param.grad.reshape(-1) for param in flow.parameters()])
    optimizer.step()
    torch.testing.assert_close(optimizer.flat_grad, grads * optimizer.mask)
    # a first Adam step moves a parameter by about the learning rate, whatever its
    # gradient's size (well above Adam's eps)
    moved = (optimizer.flat_param - before).abs()
    assert float(moved[(grads * optimizer.mask).abs() > 1e-6].min()) > 9e-3


def test_a_plan_writes_the_gradients_where_flat_adam_reads_them():
    """With the optimizer's flat buffer, the plan keeps its gradient views: nothing to copy per step."""
    from sklearn_maf._training import _FlatAdam

    X, flow = _flow(torch.float64)
    optimizer = _FlatAdam(flow, 1e-2, 0.0)
    views = [param.grad for param in flow.parameters()]
    plan = Plan(flow, assume_masked=True, flat_grad=optimizer.flat_grad)
    plan.loss_and_grad(X)
    assert all(param.grad is view for param, view in zip(flow.parameters(), views))
    assert float(optimizer.flat_grad.abs().sum()) > 0


def test_flat_adam_moves_an_average_made_without_its_buffer_too():
    """An average of copies of the parameters (not of the optimizer's buffer) is moved after the step."""
    from sklearn_maf._training import _FlatAdam, _ParameterAverage

    _, flow = _flow(torch.float64)
    optimizer = _FlatAdam(flow, 1e-2, 0.0)
    averaged = _ParameterAverage(flow)
    before = [average.clone() for average in averaged.average]
    grad = torch.randn(optimizer.flat_grad.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    optimizer.flat_grad.copy_(grad)
    optimizer.step(averaged=averaged)
    assert averaged.steps == 1
    weight = 1 - 2 / 11  # the first step's weight (the warm-up of _ParameterAverage)
    for average, start, param in zip(averaged.average, before, flow.parameters()):
        torch.testing.assert_close(average, torch.lerp(start, param.detach(), weight))
