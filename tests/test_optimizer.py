"""Tests for sklearn_maf._optimizer: weight-decay groups, gradient clipping, weight averaging."""

import pytest
import torch

from sklearn_maf._nn import MAF
from sklearn_maf._optimizer import _GradientClip, _ParameterAverage, _parameter_groups

DTYPE = torch.float64


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _flow(*, batch_norm=True, seed=0):
    """A small float64 2-D MAF: two MAF layers, one batch norm between them when asked."""
    return MAF(
        torch.zeros(2, dtype=DTYPE),
        torch.ones(2, dtype=DTYPE),
        n_layers=2,
        hidden_units=6,
        n_hidden_layers=1,
        batch_norm=batch_norm,
        generator=_generator(seed),
        dtype=DTYPE,
    )


def test_weight_decay_groups_hold_exactly_the_weight_matrices():
    module = _flow()
    decayed, other = _parameter_groups(module, 0.25)
    assert decayed["weight_decay"] == 0.25 and other["weight_decay"] == 0.0
    names = {id(param): name for name, param in module.named_parameters()}
    decayed_names = {names[id(param)] for param in decayed["params"]}
    other_names = {names[id(param)] for param in other["params"]}
    assert decayed_names == {name for name in names.values() if name.endswith(".weight")}
    assert decayed_names | other_names == set(names.values()) and not decayed_names & other_names
    assert any(name.endswith(".bias") for name in other_names)
    assert any(name.endswith(".log_gamma") for name in other_names)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_clip_scales_down_only_spikes_and_keeps_its_limit(dtype, flat):
    """Gradients near the running norm pass as they are; a spike is cut to factor x that norm."""
    clip = _GradientClip(factor=5.0, momentum=0.5)
    generator = _generator(0)

    def grads(scale):
        tensors = [torch.randn(4, 3, generator=generator, dtype=dtype) * scale, torch.full((3,), scale, dtype=dtype)]
        if not flat:
            return tensors
        buffer = torch.cat([t.flatten() for t in tensors])  # as a Backprop's flat_grad, with views of it
        return [buffer, buffer[:12].view(4, 3), buffer[12:]]

    def call(tensors):
        clip(tensors[0] if flat else tensors)
        return tensors[1:] if flat else tensors

    def norm(tensors):
        return float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors])))

    first = grads(1.0)
    before = [t.clone() for t in (first[1:] if flat else first)]
    first = call(first)  # the first step sets the running norm and passes unchanged
    for mine, original in zip(first, before):
        torch.testing.assert_close(mine, original, rtol=0, atol=0)
    average = float(clip.average)
    assert average == pytest.approx(norm(before), rel=1e-6)

    spike = grads(1e4)
    parts = spike[1:] if flat else spike
    direction = [t / norm(parts) for t in parts]
    spike = call(spike)
    assert norm(spike) == pytest.approx(5.0 * average, rel=1e-5)  # cut to the limit ...
    for mine, unit in zip(spike, direction):  # ... in the same direction
        torch.testing.assert_close(mine / norm(spike), unit, rtol=1e-5, atol=1e-6)
    # the running norm moved towards the limit, not towards the spike
    assert float(clip.average) == pytest.approx(0.5 * average + 0.5 * 5.0 * average, rel=1e-5)

    zeros = grads(0.0)
    zeros = call(zeros)  # a zero gradient stays zero: no 0 / 0
    assert all(bool((t == 0).all()) for t in zeros)


def test_parameter_average_is_a_moving_average_and_swaps_back():
    """Each update moves the average towards the weights by 1 - min(decay, (1 + t) / (10 + t))."""
    module = _flow(batch_norm=True)
    params = list(module.parameters())
    average = _ParameterAverage(module, decay=0.5)
    expected = [param.detach().clone() for param in params]
    for step in range(1, 13):
        with torch.no_grad():
            for param in params:
                param.add_(float(step))
        average.update()
        weight = 1 - min(0.5, (1 + step) / (10 + step))  # 9/11 on the first step, 1/2 from the 8th
        expected = [e + weight * (p.detach() - e) for e, p in zip(expected, params)]
    for mine, theirs in zip(average.average, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)

    live = [param.detach().clone() for param in params]
    with average.applied():  # the averages in the module for the block only
        for param, mine in zip(params, average.average):
            torch.testing.assert_close(param.detach(), mine, rtol=0, atol=0)
    for param, original in zip(params, live):
        torch.testing.assert_close(param.detach(), original, rtol=0, atol=0)
    average.apply()
    for param, mine in zip(params, average.average):
        torch.testing.assert_close(param.detach(), mine, rtol=0, atol=0)
