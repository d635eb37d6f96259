"""The C passes of sklearn_maf._nn._fused: float32 accuracy, scoring and argument checks.

tests/test_backprop.py runs every gradient test (float64) with and without
them; here the float32 passes, whose exp is the module's own, are compared
with torch's operations, and so is the float64 scoring pass (its exp is the
module's own too).
"""

import math

import pytest
import torch

from sklearn_maf._nn import MAF, _native, backprop
from sklearn_maf._nn import transforms as transforms_module
from sklearn_maf._nn import made as made_module
from sklearn_maf._nn.backprop import Backprop

pytestmark = pytest.mark.skipif(
    not _native.available(), reason="sklearn_maf._nn._fused was not built (no C compiler at install)"
)


@pytest.fixture(params=["avx2", "baseline"])
def instructions(request):
    """The passes compiled for AVX2 and FMA (where the CPU has them), then the baseline's."""
    avx2 = request.param == "avx2"
    try:
        previous = _native.set_avx2(avx2)
    except ValueError as error:
        pytest.skip(str(error))
    yield request.param
    _native.set_avx2(previous)


def _flow(dtype, **params):
    X = torch.randn(300, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    flow = MAF(
        X.mean(0), X.std(0), generator=torch.Generator().manual_seed(1), dtype=dtype,
        **{"n_layers": 5, "hidden_units": 32, "n_hidden_layers": 2, **params},
    )  # fmt: skip
    return X * 3 - 1, flow.train()


def _loss_and_grads(flow, X, weight, fused):
    loss = Backprop(flow, native=fused).loss_and_grad(X, weight)
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

    factors = _native.affine_forward(out, x, bound, log_det)
    u = factors[0]

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
    factors = _native.affine_forward(out, x, 5.0, torch.zeros(1))
    sigmoid = factors[1, 0]
    assert sigmoid[0] == 1 and 0 <= sigmoid[1] < 1e-37 and 0 <= sigmoid[3] < 1e-37
    assert math.isnan(sigmoid[2])
    torch.testing.assert_close(factors[2, 0, [0, 1, 3]], torch.tensor([math.exp(5), math.exp(-5), math.exp(-5)]))


def test_tensors_of_another_layout_are_refused():
    grad, hidden, bias_grad = torch.zeros(8, 3), torch.zeros(8, 3), torch.zeros(3)
    _native.activation_backward(grad, hidden, False, bias_grad)
    with pytest.raises(ValueError, match="grad must be a contiguous torch.float32"):
        _native.activation_backward(torch.zeros(3, 8).t(), hidden, False, bias_grad)
    with pytest.raises(ValueError, match="got torch.float64"):
        _native.activation_backward(grad, hidden.double(), False, bias_grad)


def _score_inputs(n_rows, n_features, raw):
    """Feature-major ``x``, and ``shift`` and ``raw`` as views of one product, as scoring lays them out."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_features, n_rows, generator=generator, dtype=torch.float64).t()
    out = torch.cat([torch.randn(n_features, n_rows, generator=generator, dtype=torch.float64), raw.t()])
    shift, raw = (block.t() for block in out.chunk(2))
    return x, shift, raw


def _affine_score_torch(x, shift, raw, bound):
    minus_log_scale = torch.sigmoid(raw * (-2.0 / bound)) * (2.0 * bound) - bound
    return (x - shift) * torch.exp(minus_log_scale), minus_log_scale.sum(dim=1)


def test_affine_score_matches_torch_operations_over_the_whole_range(instructions):
    bound, n_rows, d = 5.0, 1001, 4
    raw = torch.linspace(-1e4, 1e4, n_rows * d, dtype=torch.float64)
    raw[: 8 * d] = torch.linspace(-50, 50, 8 * d, dtype=torch.float64)  # where the sigmoid is not saturated
    x, shift, raw = _score_inputs(n_rows, d, raw.reshape(n_rows, d))
    assert transforms_module._scores_in_c(x, shift, raw)

    u, log_det = _native.affine_score(x, shift, raw, bound)

    u_torch, log_det_torch = _affine_score_torch(x, shift, raw, bound)
    torch.testing.assert_close(u, u_torch, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(log_det, log_det_torch, rtol=0, atol=1e-13)


def test_affine_score_exp_within_two_ulp_over_the_double_range(instructions):
    """With a bound of 700 the log-scale spans (-700, 700): exp(log_det) is the pass's own exp."""
    bound, n_rows = 700.0, 20_001
    raw = torch.linspace(-3000.0, 3000.0, n_rows, dtype=torch.float64)[:, None]
    x, shift, raw = _score_inputs(n_rows, 1, raw)
    x, shift = torch.ones_like(x), torch.zeros_like(shift)

    u, log_det = _native.affine_score(x, shift, raw, bound)

    assert float(log_det.min()) < -699 and float(log_det.max()) > 699
    reference = torch.exp(log_det)
    ulp = torch.nextafter(reference, torch.tensor(math.inf, dtype=torch.float64)) - reference
    assert float(((u[:, 0] - reference).abs() / ulp).max()) <= 2


def test_affine_score_of_non_finite_raw_log_scales_stays_in_its_bounds_or_nan(instructions):
    raw = torch.tensor([[-math.inf, math.inf, math.nan, 1e300]], dtype=torch.float64)
    x, shift, raw = _score_inputs(1, 4, raw)
    u, log_det = _native.affine_score(x, shift, raw, 5.0)
    u_torch, _ = _affine_score_torch(x, shift, raw, 5.0)
    assert torch.isnan(u[0, 2]) and torch.isnan(log_det[0])
    torch.testing.assert_close(u[0, [0, 1, 3]], u_torch[0, [0, 1, 3]], rtol=1e-15, atol=0)


def test_affine_score_of_a_row_does_not_depend_on_the_rows_scored_with_it(instructions):
    """Bit for bit: a row in a vector of the pass, or in its remainder, or alone."""
    bound, n_rows, d = 5.0, 37, 3
    raw = torch.randn(n_rows, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    x, shift, raw = _score_inputs(n_rows, d, raw)
    u, log_det = _native.affine_score(x, shift, raw, bound)
    for start, stop in [(0, 1), (5, 6), (36, 37), (1, 4), (3, 20), (2, 37)]:
        part = [tensor[start:stop].t().contiguous().t() for tensor in (x, shift, raw)]
        u_part, log_det_part = _native.affine_score(*part, bound)
        assert torch.equal(u_part, u[start:stop]) and torch.equal(log_det_part, log_det[start:stop])


@pytest.mark.parametrize("params", [{}, {"batch_norm": True, "activation": "tanh"}])
def test_scoring_with_the_c_pass_matches_torch_operations(params, monkeypatch):
    X, flow = _flow(torch.float64, **params)
    flow.eval()
    with torch.inference_mode():
        fused = flow.log_prob(X)
        monkeypatch.setattr(_native, "_fused", None)  # both scoring passes
        reference = flow.log_prob(X)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12)


def test_the_scoring_pass_runs_on_feature_major_float64_only():
    x, shift, raw = _score_inputs(5, 3, torch.zeros(5, 3, dtype=torch.float64))
    assert transforms_module._scores_in_c(x, shift, raw)
    assert not transforms_module._scores_in_c(x.contiguous(), shift, raw)  # rows, not features, contiguous
    assert not transforms_module._scores_in_c(x.float(), shift, raw)
    assert not transforms_module._scores_in_c(x, shift.contiguous(), raw)


def _linear_relu_score(weight, x):
    out = torch.empty(weight.shape[0], x.shape[1], dtype=torch.float64)
    return _native.linear_relu_score(weight, x, out)


@pytest.mark.parametrize("n_units, n_inputs, n_rows", [(100, 9, 2621), (103, 5, 37), (3, 17, 7), (8, 1, 8)])
def test_first_layer_in_c_matches_the_product_and_relu(n_units, n_inputs, n_rows, instructions):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n_units, n_inputs, generator=generator, dtype=torch.float64)
    x = torch.randn(n_inputs, n_rows, generator=generator, dtype=torch.float64)
    out = _linear_relu_score(weight, x)
    torch.testing.assert_close(out, torch.relu(weight @ x), rtol=1e-14, atol=1e-14)
    assert (out == 0).any() and (out > 0).any()


def test_first_layer_in_c_of_a_row_does_not_depend_on_the_rows_computed_with_it(instructions):
    """Bit for bit, in the blocks of 4 units by 8 rows and in the remainders."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(103, 9, generator=generator, dtype=torch.float64)
    x = torch.randn(9, 45, generator=generator, dtype=torch.float64)
    out = _linear_relu_score(weight, x)
    for start, stop in [(0, 1), (7, 8), (44, 45), (3, 20), (1, 45)]:
        assert torch.equal(_linear_relu_score(weight, x[:, start:stop].contiguous()), out[:, start:stop])


def test_first_layer_in_c_keeps_nan(instructions):
    weight = torch.ones(4, 2, dtype=torch.float64)
    x = torch.tensor([[1.0] * 8, [-2.0] * 7 + [math.nan]], dtype=torch.float64)
    out = _linear_relu_score(weight, x)
    assert torch.isnan(out[:, 7]).all() and (out[:, :7] == 0).all()


def test_first_layer_runs_in_c_for_few_inputs_relu_and_float64_only():
    made = made_module.MADE(
        made_module.input_degrees(torch.arange(4)), 16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    below = torch.ones(5, 10, dtype=torch.float64)
    blocks = [(torch.ones(16, 5, dtype=torch.float64), 0, 16)]
    assert made._first_layer_in_c(below, blocks) == _native.avx2()
    assert not made._first_layer_in_c(below.float(), blocks)
    assert not made._first_layer_in_c(below, blocks * 2)
    wide = torch.ones(made_module._C_FIRST_LAYER_MAX_INPUTS + 1, 10, dtype=torch.float64)
    assert not made._first_layer_in_c(wide, [(torch.ones(16, wide.shape[0], dtype=torch.float64), 0, 16)])
    made.activation = "tanh"
    assert not made._first_layer_in_c(below, blocks)


def test_the_c_functions_check_their_arguments():
    module = _native._fused
    with pytest.raises(TypeError, match="takes 9 arguments"):
        module.affine_score(1, 2)
    with pytest.raises(TypeError, match="takes 8 arguments"):
        module.linear_relu_score(1, 2)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        module.activation_backward(0, 1, 1)
    with pytest.raises(ValueError, match="dtype code"):
        module.activation_backward(2, 1, 1, False, 0, 0, 0)
    with pytest.raises(ValueError, match="non-negative"):
        module.activation_backward(0, -1, 1, False, 0, 0, 0)


def _flat_and_reference_steps(dtype, n_steps, clip, average):
    """The same gradients through _FlatAdam and through the list-based clip, fused Adam and averaging."""
    from sklearn_maf._optimizer import (
        _FlatAdam, _GradientClip, _ParameterAverage, _adam, _parameter_groups,
    )  # fmt: skip

    _, flat_flow = _flow(dtype, batch_norm=True)
    _, reference_flow = _flow(dtype, batch_norm=True)
    plan = Backprop(reference_flow, assume_masked=True, native=False)
    plan.zero_masked_weights()
    flat = _FlatAdam(flat_flow, 1e-2, 1e-3)
    with torch.no_grad():  # the masked entries of the weights at zero, as the plan's
        flat.flat_param.mul_(flat.mask)
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
    from sklearn_maf._optimizer import _FlatAdam

    _, flow = _flow(torch.float32)
    optimizer = _FlatAdam(flow, 1e-3, 0.0)
    flow.double()
    with pytest.raises(RuntimeError, match="moved after their optimizer was made"):
        optimizer.step()


def test_flat_adam_takes_autograd_gradients_too():
    """Gradients that autograd puts in .grad (new tensors) are copied in, not ignored."""
    from sklearn_maf._optimizer import _FlatAdam

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
    from sklearn_maf._optimizer import _FlatAdam

    X, flow = _flow(torch.float64)
    optimizer = _FlatAdam(flow, 1e-2, 0.0)
    views = [param.grad for param in flow.parameters()]
    plan = Backprop(flow, assume_masked=True, flat_grad=optimizer.flat_grad)
    plan.loss_and_grad(X)
    assert all(param.grad is view for param, view in zip(flow.parameters(), views))
    assert float(optimizer.flat_grad.abs().sum()) > 0


def test_flat_adam_moves_an_average_made_without_its_buffer_too():
    """An average of copies of the parameters (not of the optimizer's buffer) is moved after the step."""
    from sklearn_maf._optimizer import _FlatAdam, _ParameterAverage

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


def _boundary_calls(dtype=torch.float64):
    """One valid call of every training pass through _native: ``{name: (function, kwargs)}``."""
    n, d = 6, 3
    z = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    share = torch.tensor(1.0 / n, dtype=dtype)
    return {
        "affine_forward": (_native.affine_forward, dict(out=z(n, 2 * d), x=z(n, d), bound=5.0, log_det=z(n))),
        "affine_backward": (
            _native.affine_backward, dict(factors=z(3, n, d), grad_u=z(n, d), share=share, bias_grad=z(2 * d))
        ),
        "activation_backward": (
            _native.activation_backward, dict(grad=z(n, 4), hidden=z(n, 4), tanh=False, bias_grad=z(4))
        ),
        "gaussian_loss": (_native.gaussian_loss, dict(u=z(n, d), log_det=z(n), share=z(n, 1) + 1.0 / n)),
        "batch_norm_forward": (
            _native.batch_norm_forward,
            dict(x=z(n, d), share=share, log_gamma=z(d), beta=z(d), running_mean=z(d), running_var=z(d) + 1,
                 momentum=0.1, eps=1e-5, log_det=z(n)),
        ),  # fmt: skip
        "batch_norm_backward": (
            _native.batch_norm_backward,
            dict(rows=z(2, n, d), features=z(2, d) + 1, grad_y=z(n, d), share=share, grad_log_gamma=z(d),
                 grad_beta=z(d)),
        ),  # fmt: skip
        "adam_step": (
            _native.adam_step,
            dict(param=z(10), grad=z(10), mask=z(10) + 1, decay=z(10), exp_avg=z(10), exp_avg_sq=z(10),
                 step=1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, clip_average=z(()), average=z(10)),
        ),  # fmt: skip
    }


@pytest.mark.parametrize("name", list(_boundary_calls()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_training_pass_refuses_a_wrong_tensor_before_c_runs(name, dtype):
    """Each tensor argument in turn: one row short, the other dtype, or a non-contiguous copy.

    None of these calls may reach C: the tensors they would write stay as they were.
    """
    function, kwargs = _boundary_calls(dtype)[name]
    function(**kwargs)  # the valid call runs
    other = torch.float64 if dtype == torch.float32 else torch.float32
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            continue
        wrong = [value.to(other)]
        if value.dim() >= 1:
            wrong.append(value[: value.shape[0] - 1] if value.shape[0] > 1 else torch.cat([value, value]))
        if value.dim() == 2 and value.shape[1] > 1:
            wrong.append(torch.cat([value, value], dim=1)[:, ::2])  # same values, strided
        for bad in wrong:
            calls = _boundary_calls(dtype)[name][1]
            before = {k: v.clone() for k, v in calls.items() if isinstance(v, torch.Tensor)}
            with pytest.raises(ValueError, match="must be a contiguous"):  # this tensor or one sized by it
                function(**{**calls, key: bad})
            for k, v in calls.items():
                if isinstance(v, torch.Tensor) and k != key:
                    assert torch.equal(v, before[k]), (key, k)


def test_scoring_passes_refuse_wrong_layouts_and_sizes():
    x, shift, raw = _score_inputs(5, 3, torch.zeros(5, 3, dtype=torch.float64))
    _native.affine_score(x, shift, raw, 5.0)
    with pytest.raises(ValueError, match="x must be a float64"):
        _native.affine_score(x.contiguous(), shift, raw, 5.0)  # rows, not features, contiguous
    with pytest.raises(ValueError, match="shift must be"):
        _native.affine_score(x, shift[:4], raw, 5.0)
    with pytest.raises(ValueError, match="raw_log_scale's columns"):
        _native.affine_score(x, shift, torch.zeros(3, 7, dtype=torch.float64)[:, :5].t(), 5.0)
    with pytest.raises(ValueError, match="float32"):
        _native.affine_score(x.float(), shift, raw, 5.0)
    weight, inputs = torch.ones(4, 2, dtype=torch.float64), torch.ones(2, 8, dtype=torch.float64)
    _native.linear_relu_score(weight, inputs, torch.empty(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be"):
        _native.linear_relu_score(weight, torch.ones(3, 8, dtype=torch.float64), torch.empty(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        _native.linear_relu_score(weight, inputs, torch.empty(4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        _native.linear_relu_score(weight, inputs, torch.empty(8, 4, dtype=torch.float64).t())
    with pytest.raises(ValueError, match="weight must be"):
        _native.linear_relu_score(weight.float(), inputs, torch.empty(4, 8, dtype=torch.float64))
