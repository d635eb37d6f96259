"""The fast paths give what the simple, slow way of computing the same thing gives.

Sampling inverts each MAF layer with :meth:`MADE.solve`, which computes every
hidden unit once instead of running the whole MADE once per feature; the
references here are that one-pass-per-feature loop, written out. Scoring runs
:meth:`MADE._forward_inference` (feature-major products over units sorted by
level, masked blocks skipped, buffers reused); its reference is the autograd
forward pass.
"""

import itertools

import numpy as np
import pytest
import torch

from sklearn_maf import MAFDensity
from sklearn_maf._nn import made as made_module
from sklearn_maf._nn.distributions import MADEMoG
from sklearn_maf._nn.transforms import AffineMADE, power_tails_inverse, soft_clamp
from sklearn_maf._nn.made import MADE, input_degrees, reused_buffers

DTYPE = torch.float64


def _order(n_features, kind, generator):
    if kind == "natural":
        return torch.arange(n_features)
    return torch.randperm(n_features, generator=generator)


def _scramble(made, generator):
    """Random weights everywhere, masked entries included: only the masks may cut paths."""
    with torch.no_grad():
        for layer in made.layers:
            layer.weight.normal_(generator=generator)
            layer.bias.normal_(generator=generator)


def _inverse_one_pass_per_feature(layer, u, context):
    x = torch.zeros_like(u)
    for _ in range(u.shape[-1]):
        shift, raw_log_scale = layer.made(x, context)
        log_scale = soft_clamp(raw_log_scale, layer.log_scale_bound)
        x = u * torch.exp(log_scale) + shift
    return x, log_scale.sum(dim=-1)


@pytest.mark.parametrize(
    "n_features, n_hidden_layers, hidden_units, n_context",
    list(itertools.product([1, 2, 6], [0, 1, 2], [2, 16], [0, 3])),
)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("order", ["natural", "random"])
def test_affine_inverse_equals_one_made_pass_per_feature(
    n_features, n_hidden_layers, hidden_units, n_context, activation, order
):
    generator = torch.Generator().manual_seed(n_features * 100 + hidden_units)
    layer = AffineMADE(
        input_degrees(_order(n_features, order, generator)),
        hidden_units=hidden_units,
        n_hidden_layers=n_hidden_layers,
        activation=activation,
        n_context=n_context,
        generator=generator,
        dtype=DTYPE,
    )
    _scramble(layer.made, generator)
    u = torch.randn(40, n_features, generator=generator, dtype=DTYPE)
    context = torch.randn(40, n_context, generator=generator, dtype=DTYPE) if n_context else None
    with torch.no_grad():
        expected, expected_logabsdet = _inverse_one_pass_per_feature(layer, u, context)
        x, logabsdet = layer.inverse(u, context)
        u_again, _ = layer(x, context)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logabsdet, expected_logabsdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u_again, u, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "n_features, n_hidden_layers, hidden_units, n_context",
    list(itertools.product([1, 2, 3, 8], [0, 1, 2, 3], [2, 16], [0, 3])),
)
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("order", ["natural", "random"])
def test_inference_pass_equals_the_autograd_pass(
    n_features, n_hidden_layers, hidden_units, n_context, activation, order
):
    """Masked entries hold random weights: skipping them must not change a thing."""
    generator = torch.Generator().manual_seed(n_features * 100 + hidden_units + n_context)
    made = MADE(
        input_degrees(_order(n_features, order, generator)),
        hidden_units,
        n_hidden_layers,
        activation=activation,
        n_context=n_context,
        generator=generator,
        dtype=DTYPE,
    )
    _scramble(made, generator)

    def inputs(n_rows):
        x = torch.randn(n_rows, n_features, generator=generator, dtype=DTYPE)
        return x, (torch.randn(n_rows, n_context, generator=generator, dtype=DTYPE) if n_context else None)

    def check(x, context):
        expected = made(x, context)  # autograd: one dense product per layer, masks applied
        with torch.no_grad():
            fast = made(x, context)
        assert len(fast) == len(expected) == 2
        for block, reference in zip(fast, expected):
            torch.testing.assert_close(block, reference.detach(), rtol=1e-12, atol=1e-12)

    batches = [inputs(n) for n in (37, 37, 5, 37)]
    check(*batches[0])
    # within one block, buffers reused across calls of one shape and of another
    with reused_buffers():
        for x, context in batches:
            check(x, context)
    with torch.inference_mode(), reused_buffers():
        first = [block.clone() for block in made(*batches[0])]
        made(*batches[2])  # overwrites the hidden buffers, not earlier results
        for block, again in zip(first, made(*batches[0])):
            torch.testing.assert_close(block, again, rtol=0, atol=0)

    if n_hidden_layers >= 2 and n_features >= 3 and hidden_units >= n_features:
        # the hidden-to-hidden layers are block lower-triangular in level order
        assert all(len(blocks) == 2 for _, blocks in made._inference_plan()[1:])


def test_reused_buffers_stay_within_the_block_and_the_thread(rng):
    """A block keeps a few buffers per shape; another thread gets its own."""
    import threading

    X = rng.normal(size=(400, 4))
    model = MAFDensity(n_layers=2, hidden_units=16, max_iter=2, random_state=0).fit(X)
    expected = model.score_samples(X)
    module = model.module_
    with torch.inference_mode(), reused_buffers():
        for start in range(0, 400, 100):
            module.log_prob(torch.as_tensor(X[start : start + 100]))
        held = dict(made_module._workspace.buffers)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(getattr(made_module._workspace, "buffers", None)))
        thread.start()
        thread.join()
    assert seen == [None]
    assert getattr(made_module._workspace, "buffers", None) is None
    # one input and two hidden buffers for the chunk's shape, and each MADE's weights
    assert sum(1 for key in held if key[0] != "weights") == 3
    assert sum(1 for key in held if key[0] == "weights") == 2

    results = {}

    def score(index):
        results[index] = model.score_samples(X[index::2])

    threads = [threading.Thread(target=score, args=(index,)) for index in range(2) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        np.testing.assert_allclose(results[index], expected[index::2], rtol=1e-12, atol=1e-12)


def _mog_sample_one_pass_per_feature(mog, n_samples, context, generator):
    shape = (n_samples, mog.n_features)
    both = torch.rand(n_samples, 2 * mog.n_features, generator=generator, dtype=DTYPE)
    noise = torch.special.ndtri(both[:, : mog.n_features])  # the layout of from_uniform
    uniform = both[:, mog.n_features :]
    u = torch.zeros(shape, dtype=DTYPE)
    for _ in range(mog.n_features):
        log_weights, means, log_scales = mog._mixture(u, context)
        cumulative = torch.cumsum(torch.exp(log_weights), dim=-1)
        choice = (uniform.unsqueeze(-1) > cumulative).sum(dim=-1, keepdim=True)
        choice = choice.clamp(max=mog.n_components - 1)
        mean = torch.gather(means, -1, choice).squeeze(-1)
        log_scale = torch.gather(log_scales, -1, choice).squeeze(-1)
        u = mean + torch.exp(log_scale) * noise
    return u


@pytest.mark.parametrize("n_features, n_context", [(1, 0), (4, 0), (4, 2)])
def test_mog_sample_equals_one_made_pass_per_feature(n_features, n_context):
    generator = torch.Generator().manual_seed(3)
    mog = MADEMoG(
        input_degrees(torch.arange(n_features).flip(0)),
        n_components=3,
        hidden_units=8,
        n_hidden_layers=2,
        n_context=n_context,
        generator=generator,
        dtype=DTYPE,
    )
    context = torch.randn(30, n_context, generator=generator, dtype=DTYPE) if n_context else None
    like = torch.zeros((), dtype=DTYPE)
    with torch.no_grad():
        sample = mog.sample(30, context, torch.Generator().manual_seed(0), like=like)
        expected = _mog_sample_one_pass_per_feature(mog, 30, context, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample, expected, rtol=1e-10, atol=1e-10)


def test_fitted_model_samples_are_the_inverse_of_transform(rng):
    """End to end, in float64: inverse_transform(transform(X)) == X and sampling agrees."""
    X = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    # the flow alone: with a reference mixed in, a drawn row may come from it
    model = MAFDensity(n_layers=3, hidden_units=12, max_iter=3, random_state=0, reference=None).fit(X)
    np.testing.assert_allclose(model.inverse_transform(model.transform(X)), X, atol=1e-9)
    generator = torch.Generator().manual_seed(int(np.random.RandomState(7).randint(np.iinfo(np.int32).max)))
    with torch.no_grad():
        u = torch.special.ndtri(torch.rand(64, 5, generator=generator, dtype=DTYPE))
        expected = u
        if model.module_.tail_cut is not None:  # the fitted base's power-law tails
            expected = power_tails_inverse(expected, model.module_.tail_cut)[0]
        for transform in reversed(model.module_.transforms):
            if isinstance(transform, AffineMADE):
                expected = _inverse_one_pass_per_feature(transform, expected, None)[0]
            else:
                expected = transform.inverse(expected)[0]
    np.testing.assert_allclose(model.sample(64, random_state=7), expected.numpy(), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adam_steps_like_torch_optim_adam(dtype):
    """Bit for bit, L2 groups included, also when a parameter misses a gradient."""
    from sklearn_maf._optimizer import _adam, _FusedAdam

    generator = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=generator, dtype=dtype)) for _ in range(4)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(params):
        return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]

    optimizer = _adam(groups(ours), 1e-2)
    assert isinstance(optimizer, _FusedAdam)
    reference = torch.optim.Adam(groups(theirs), lr=1e-2, fused=True)
    for step in range(12):
        for mine, other in zip(ours, theirs):
            mine.grad = torch.randn(5, 3, generator=generator, dtype=dtype)
            other.grad = mine.grad.clone()
        if step in (4, 7):
            ours[3].grad = theirs[3].grad = None
        optimizer.step()
        reference.step()
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, rtol=0, atol=0)


@pytest.mark.parametrize("enabled", [True, False])
def test_fit_leaves_the_garbage_collector_as_it_found_it(enabled, rng):
    import gc

    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        MAFDensity(n_layers=1, hidden_units=4, max_iter=2, random_state=0).fit(rng.normal(size=(50, 2)))
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("n_context", [0, 2])
def test_inverse_is_differentiable_and_agrees_with_the_fast_path(n_context):
    """With autograd recording, inverse runs out of place and still gives the same rows."""
    generator = torch.Generator().manual_seed(1)
    layer = AffineMADE(
        input_degrees(torch.randperm(4, generator=generator)),
        hidden_units=9,
        n_hidden_layers=2,
        n_context=n_context,
        generator=generator,
        dtype=DTYPE,
    )
    _scramble(layer.made, generator)
    u = torch.randn(10, 4, generator=generator, dtype=DTYPE, requires_grad=True)
    context = torch.randn(10, n_context, generator=generator, dtype=DTYPE) if n_context else None
    x, logabsdet = layer.inverse(u, context)
    (x.sum() + logabsdet.sum()).backward()
    assert u.grad is not None and layer.made.layers[0].weight.grad is not None
    with torch.no_grad():
        fast_x, fast_logabsdet = layer.inverse(u, context)
    torch.testing.assert_close(x, fast_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logabsdet, fast_logabsdet, rtol=1e-10, atol=1e-10)
