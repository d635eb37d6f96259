"""Property tests for sklearn_maf._nn.flow: bijections, log-determinants, sampling, batch norm."""

import io

import numpy as np
import pytest
import torch

from sklearn_maf._nn.flow import MAF
from sklearn_maf._nn.preprocessing import Bounded, Standardize, Whiten
from sklearn_maf._nn.transforms import AffineMADE, BatchNorm, power_tails, power_tails_inverse, soft_clamp
from sklearn_maf._nn.made import MADE, MaskedLinear, input_degrees

DTYPE = torch.float64
N_FEATURES = [1, 2, 3, 4, 5]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _randomise(flow, generator):
    """Move a flow away from the identity it is initialised close to.

    MADE output layers get weights of order one (their initial scale of 1e-2
    makes every MAF layer nearly the identity), and every batch norm gets
    random running statistics, ``log_gamma`` and ``beta``.
    """
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, MADE):
                module.layers[-1].weight.uniform_(-0.5, 0.5, generator=generator)
                module.layers[-1].bias.uniform_(-0.5, 0.5, generator=generator)
            elif isinstance(module, BatchNorm):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.log_gamma.uniform_(-0.5, 0.5, generator=generator)
                module.beta.normal_(generator=generator)


def _whitening(n_features, generator):
    """A random location and lower-triangular factor (positive diagonal) for :class:`Whiten`."""
    loc = torch.randn(n_features, generator=generator, dtype=DTYPE)
    chol = torch.tril(0.5 * torch.randn(n_features, n_features, generator=generator, dtype=DTYPE), -1)
    chol += torch.diag(torch.rand(n_features, generator=generator, dtype=DTYPE) + 0.5)
    return loc, chol


def _flow(n_features, *, order="reverse", batch_norm=True, n_layers=3, n_context=0, whiten=False, seed=0):
    """A small float64 MAF in eval mode, with random standardisation (and whitening) and parameters."""
    generator = _generator(seed)
    loc = torch.randn(n_features, generator=generator, dtype=DTYPE)
    scale = torch.rand(n_features, generator=generator, dtype=DTYPE) + 0.5
    flow = MAF(
        loc,
        scale,
        n_layers=n_layers,
        hidden_units=n_features + 2,
        n_hidden_layers=1,
        activation="tanh",
        batch_norm=batch_norm,
        order=order,
        n_context=n_context,
        whiten=_whitening(n_features, generator) if whiten else None,
        generator=generator,
        dtype=DTYPE,
    )
    _randomise(flow, generator)
    return flow.eval()


def _data(n_samples, n_features, seed=1):
    return 2 * torch.randn(n_samples, n_features, generator=_generator(seed), dtype=DTYPE) + 1


def _row_slogdets(function, x):
    """``log|det J|`` of a row-wise map at every row of ``x``, from the autograd Jacobian.

    Rows must not interact (eval mode), so the Jacobian of the row sums is the
    per-row Jacobian.
    """
    jac = torch.autograd.functional.jacobian(lambda rows: function(rows).sum(0), x)
    sign, logabsdet = torch.linalg.slogdet(jac.permute(1, 0, 2))
    assert (sign != 0).all(), "singular Jacobian"
    return logabsdet


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_maf_puts_batch_norm_only_between_maf_layers(n_layers, batch_norm):
    """Standardize first, then MAF layers with batch norm between them and none after the last."""
    flow = _flow(3, n_layers=n_layers, batch_norm=batch_norm)
    kinds = [type(transform) for transform in flow.transforms]
    middle = [BatchNorm, AffineMADE] if batch_norm else [AffineMADE]
    assert kinds == [Standardize, AffineMADE] + middle * (n_layers - 1)


@pytest.mark.parametrize("n_features", [1, 2, 5])
def test_reverse_order_alternates_between_natural_and_reversed(n_features):
    flow = _flow(n_features, n_layers=4, batch_norm=False)
    natural = torch.arange(n_features)
    orders = [t.order for t in flow.transforms if isinstance(t, AffineMADE)]
    for index, order in enumerate(orders):
        assert torch.equal(order, natural if index % 2 == 0 else natural.flip(0))


def test_random_orders_come_from_the_generator():
    """Same seed, same orders and weights; another seed, other orders."""

    def orders(seed):
        flow = _flow(6, order="random", n_layers=3, seed=seed)
        return [t.order for t in flow.transforms if isinstance(t, AffineMADE)], flow

    first, flow = orders(0)
    second, same = orders(0)
    third, _ = orders(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(torch.sort(order).values, torch.arange(6)) for order in first)
    assert not all(torch.equal(a, b) for a, b in zip(first, third))
    for (name, tensor), other in zip(flow.state_dict().items(), same.state_dict().values()):
        assert torch.equal(tensor, other), name


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("n_context", [0, 2])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("order", ["reverse", "random"])
@pytest.mark.parametrize("n_features", N_FEATURES)
def test_inverse_inverts_forward(n_features, order, batch_norm, n_context, whiten):
    flow = _flow(n_features, order=order, batch_norm=batch_norm, n_context=n_context, whiten=whiten)
    x = _data(7, n_features)
    context = _data(7, n_context, seed=2) if n_context else None

    u, logabsdet = flow(x, context)
    x_back, inverse_logabsdet = flow.inverse(u, context)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=0, atol=1e-8)

    u = torch.randn(7, n_features, generator=_generator(3), dtype=DTYPE)
    x, inverse_logabsdet = flow.inverse(u, context)
    u_back, logabsdet = flow(x, context)
    torch.testing.assert_close(u_back, u, rtol=0, atol=1e-8)
    torch.testing.assert_close(logabsdet, -inverse_logabsdet, rtol=0, atol=1e-8)


@pytest.mark.parametrize("order", ["reverse", "random"])
@pytest.mark.parametrize("n_features", N_FEATURES)
def test_each_transform_logabsdet_matches_slogdet_of_its_jacobian(n_features, order):
    """Standardize, Whiten, AffineMADE and BatchNorm, both ways, at the inputs they get in the flow."""
    flow = _flow(n_features, order=order, batch_norm=True, whiten=True)
    x = _data(5, n_features)
    seen = set()
    for transform in flow.transforms:
        y, logabsdet = transform(x)
        torch.testing.assert_close(
            logabsdet, _row_slogdets(lambda r: transform(r)[0], x), rtol=1e-10, atol=1e-10
        )
        x_back, inverse_logabsdet = transform.inverse(y)
        # The inverse's log-det is checked as minus the forward Jacobian's at
        # the inverted point, which is exact for a bijection (the autograd
        # Jacobian of MADE.solve is tested in tests/test_fast_paths.py).
        torch.testing.assert_close(
            inverse_logabsdet,
            -_row_slogdets(lambda r: transform(r)[0], x_back),
            rtol=1e-10,
            atol=1e-10,
        )
        torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=0, atol=1e-10)
        seen.add(type(transform))
        x = y
    assert seen == {Standardize, Whiten, AffineMADE, BatchNorm}


@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("order", ["reverse", "random"])
@pytest.mark.parametrize("n_features", N_FEATURES)
def test_flow_logabsdet_and_log_prob_match_the_autograd_jacobian(n_features, order, batch_norm, whiten):
    """log p(x) = log N(f(x); 0, I) + log|det df/dx|, with the determinant from autograd."""
    flow = _flow(n_features, order=order, batch_norm=batch_norm, whiten=whiten)
    x = _data(6, n_features)
    u, logabsdet = flow(x)
    slogdet = _row_slogdets(lambda r: flow(r)[0], x)
    torch.testing.assert_close(logabsdet, slogdet, rtol=1e-10, atol=1e-10)
    x_back, inverse_logabsdet = flow.inverse(u)  # checked as above
    torch.testing.assert_close(
        inverse_logabsdet, -_row_slogdets(lambda r: flow(r)[0], x_back), rtol=1e-10, atol=1e-10
    )
    base = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(dim=-1)
    torch.testing.assert_close(flow.log_prob(x), base + slogdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flow.base_log_prob(u), base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_features", [1, 3, 6])
def test_whiten_maps_location_and_scatter_to_zero_and_identity_in_either_layout(n_features):
    loc, chol = _whitening(n_features, _generator(4))
    whiten = Whiten(loc, chol)
    z = torch.randn(1000, n_features, generator=_generator(6), dtype=DTYPE)
    x = loc + z @ chol.T  # location loc, scatter chol chol^T
    u, logabsdet = whiten(x)
    torch.testing.assert_close(u, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(logabsdet, -torch.logdet(chol).expand(len(x)), rtol=0, atol=1e-12)
    # rows laid out feature-major (as scoring gives them) come out feature-major, the same values
    with torch.no_grad():
        u_major, _ = whiten(x.t().contiguous().t())
    assert u_major.stride(0) == 1 or n_features == 1
    torch.testing.assert_close(u_major, u, rtol=1e-13, atol=1e-13)


def test_whiten_still_inverts_exactly_after_a_round_trip_through_float32():
    """A fit trains in float32 and scores in float64: the layer rounds its factor, not its inverse."""
    loc, chol = _whitening(4, _generator(5))
    whiten = Whiten(loc, chol).float().double()
    x = _data(50, 4)
    u, logabsdet = whiten(x)
    x_back, inverse_logabsdet = whiten.inverse(u)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-13)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=0, atol=0)
    torch.testing.assert_close(logabsdet, _row_slogdets(lambda r: whiten(r)[0], x[:5]).mean().expand(50),
                               rtol=0, atol=1e-12)  # fmt: skip


def test_soft_clamp_is_a_smooth_odd_bound_and_the_identity_near_zero():
    x = torch.tensor([-1e6, -50.0, -3.0, -1e-4, 0.0, 1e-4, 3.0, 50.0, 1e6], dtype=DTYPE)
    for bound in [0.5, 5.0]:
        y = soft_clamp(x, bound)
        assert (y.abs() <= bound).all()
        assert (y.diff() >= 0).all() and (y[2:-2].diff() > 0).all()
        assert y[0] == -bound and y[-1] == bound
        torch.testing.assert_close(soft_clamp(-x, bound), -y, rtol=0, atol=0)
        torch.testing.assert_close(y[3:6], x[3:6], rtol=1e-7, atol=0)


@pytest.mark.parametrize("log_scale_bound", [1.0, 5.0])
@pytest.mark.parametrize("order_kind", ["natural", "reversed", "random"])
@pytest.mark.parametrize("n_features", N_FEATURES)
def test_huge_log_scales_are_clamped_identically_in_both_directions(
    n_features, order_kind, log_scale_bound
):
    """Raw log-scales of order 1e4 still invert: both directions read the same clamp."""
    generator = _generator(0)
    order = {
        "natural": torch.arange(n_features),
        "reversed": torch.arange(n_features).flip(0),
        "random": torch.randperm(n_features, generator=generator),
    }[order_kind]
    layer = AffineMADE(
        input_degrees(order),
        log_scale_bound=log_scale_bound,
        hidden_units=n_features + 2,
        n_hidden_layers=1,
        activation="tanh",
        generator=generator,
        dtype=DTYPE,
    )
    out = layer.made.layers[-1]
    with torch.no_grad():
        out.weight.uniform_(-0.5, 0.5, generator=generator)
        out.bias.uniform_(-0.5, 0.5, generator=generator)
        out.weight[n_features:] *= 1e4
        out.bias[n_features:] *= 1e4
    x = _data(8, n_features)
    raw_log_scale = layer.made(x)[1]
    assert (raw_log_scale.abs() > 100 * log_scale_bound).any(), "the test does not reach the bound"

    u, logabsdet = layer(x)
    assert torch.isfinite(u).all()
    torch.testing.assert_close(
        logabsdet, -soft_clamp(raw_log_scale, log_scale_bound).sum(-1), rtol=0, atol=1e-12
    )
    assert (logabsdet.abs() <= n_features * log_scale_bound).all()
    x_back, inverse_logabsdet = layer.inverse(u)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("n_features", [1, 3, 5])
def test_sample_pushes_base_draws_from_the_generator_through_the_inverse(n_features, batch_norm):
    flow = _flow(n_features, batch_norm=batch_norm)
    first = flow.sample(6, generator=_generator(5))
    assert first.shape == (6, n_features) and first.dtype == DTYPE
    assert torch.equal(first, flow.sample(6, generator=_generator(5)))
    assert not torch.equal(first, flow.sample(6, generator=_generator(6)))
    noise = torch.rand(6, n_features, generator=_generator(5), dtype=DTYPE)
    u = torch.special.ndtri(noise)  # the standard-normal base draws through its quantiles
    assert torch.equal(first, flow.inverse(u)[0])


def test_sample_with_context_draws_one_row_per_context_row():
    flow = _flow(3, n_context=2)
    context = _data(4, 2, seed=2)
    x = flow.sample(4, context, generator=_generator(0))
    assert x.shape == (4, 3)
    u = torch.special.ndtri(torch.rand(4, 3, generator=_generator(0), dtype=DTYPE))
    torch.testing.assert_close(flow(x, context)[0], u, rtol=0, atol=1e-8)
    assert not torch.allclose(x, flow.sample(4, context + 1, generator=_generator(0)))


def _batch_norm_inputs(flow, x):
    """What reaches each batch-norm layer in one eval-mode pass of ``x`` through ``flow``."""
    seen = []
    hooks = [
        module.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        for module in flow.transforms
        if isinstance(module, BatchNorm)
    ]
    was_training = flow.training
    try:
        with torch.no_grad():
            flow.eval()(x)
    finally:
        flow.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n_features", [1, 3])
def test_set_batch_norm_statistics_gives_each_layer_the_moments_of_its_inputs(n_features, weighted):
    """Each batch norm gets the (weighted) moments of its eval-mode inputs, for any chunk size."""
    flow = _flow(n_features, n_layers=4).train()
    batch_norms = [t for t in flow.transforms if isinstance(t, BatchNorm)]
    x = _data(23, n_features)
    weight = torch.rand(23, generator=_generator(4), dtype=DTYPE) * 3 if weighted else None

    statistics = []
    for chunk_size in [4, 23, 1000]:
        with torch.no_grad():
            for batch_norm in batch_norms:
                batch_norm.running_mean.normal_(generator=_generator(chunk_size))
                batch_norm.running_var.uniform_(0.5, 2.0, generator=_generator(chunk_size))
        flow.set_batch_norm_statistics(x, weight=weight, chunk_size=chunk_size)
        assert flow.training and all(bn.training for bn in batch_norms)
        inputs = _batch_norm_inputs(flow, x)
        assert len(inputs) == len(batch_norms) == 3
        for batch_norm, seen in zip(batch_norms, inputs):
            seen = seen.numpy()
            w = None if weight is None else weight.numpy()
            mean = np.average(seen, axis=0, weights=w)
            var = np.average((seen - mean) ** 2, axis=0, weights=w)
            np.testing.assert_allclose(
                batch_norm.running_mean.numpy(), mean, rtol=1e-12, atol=1e-12
            )
            np.testing.assert_allclose(batch_norm.running_var.numpy(), var, rtol=1e-12, atol=1e-12)
        statistics.append(
            torch.cat([torch.cat([bn.running_mean, bn.running_var]) for bn in batch_norms])
        )
    for other in statistics[1:]:
        torch.testing.assert_close(other, statistics[0], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("order", ["reverse", "random"])
def test_state_dict_round_trip_gives_identical_log_prob(order, batch_norm):
    """Orders, masks and batch-norm statistics travel in the state dict, even to another seed."""
    flow = _flow(4, order=order, batch_norm=batch_norm, seed=0)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    other = _flow(4, order=order, batch_norm=batch_norm, seed=1)
    x = _data(9, 4)
    assert not torch.allclose(other.log_prob(x), flow.log_prob(x))

    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.log_prob(x), flow.log_prob(x))
    for layer, loaded in zip(flow.transforms, other.transforms):
        if isinstance(layer, AffineMADE):
            assert torch.equal(loaded.order, layer.order)
    assert torch.equal(
        other.sample(5, generator=_generator(2)), flow.sample(5, generator=_generator(2))
    )


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("order", ["reverse", "random"])
@pytest.mark.parametrize("n_features", [1, 2, 4])
def test_gradients_reach_every_parameter(n_features, order, batch_norm):
    """Every parameter gets a finite, non-zero gradient in training mode; masked weights none."""
    flow = _flow(n_features, order=order, batch_norm=batch_norm).train()
    x = _data(16, n_features)
    weight = torch.rand(16, generator=_generator(4), dtype=DTYPE)
    (-flow.log_prob(x, weight=weight).mean()).backward()
    for name, param in flow.named_parameters():
        grad = param.grad
        assert grad is not None and torch.isfinite(grad).all(), name
        owner = flow.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, MaskedLinear) and name.endswith(".weight"):
            allowed = owner.mask != 0
            assert (grad[~allowed] == 0).all(), f"{name}: gradient on a masked weight"
            assert not allowed.any() or (grad[allowed] != 0).any(), name
        else:
            assert (grad != 0).any(), name


def test_bounded_inverts_and_its_logabsdet_matches_autograd():
    """Logit, log and identity features in one layer, against slogdet of the Jacobian."""
    inf = float("inf")
    low = torch.tensor([0.0, -inf, 1.0, -inf], dtype=torch.float64)
    high = torch.tensor([2.0, 5.0, inf, inf], dtype=torch.float64)
    layer = Bounded(low, high)
    x = torch.tensor([[0.5, 3.0, 2.0, 7.0], [1.9, -4.0, 100.0, -3.0]], dtype=torch.float64)
    y, logabsdet = layer(x)
    x_back, inverse_logabsdet = layer.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet)
    torch.testing.assert_close(logabsdet, _row_slogdets(lambda r: layer(r)[0], x), rtol=1e-10, atol=1e-10)
    outside = layer(torch.tensor([[2.5, 6.0, 0.0, 0.0]], dtype=torch.float64))[0]
    assert torch.isnan(outside[0, :3]).all()


@pytest.mark.parametrize("cut", [1.5, 2.5, 4.0])
def test_power_tails_inverts_and_its_logabsdet_matches_autograd(cut):
    """The identity inside the cut, continuous with its slope at it, invertible beyond."""
    z = torch.tensor([[-50.0, -cut - 1e-3, 0.3], [cut + 1e-3, 1e4, -cut + 1e-3]], dtype=DTYPE)
    u, logabsdet = power_tails(z, cut)
    inside = z.abs() <= cut
    assert torch.equal(u[inside], z[inside])
    torch.testing.assert_close(u[~inside].sign(), z[~inside].sign())
    torch.testing.assert_close(u.abs()[z.abs() < cut + 1e-2], z.abs()[z.abs() < cut + 1e-2], atol=1e-6, rtol=0)
    torch.testing.assert_close(logabsdet, _row_slogdets(lambda r: power_tails(r, cut)[0], z), rtol=1e-10, atol=1e-10)
    z_back, inverse_logabsdet = power_tails_inverse(u, cut)
    torch.testing.assert_close(z_back, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet)


def test_power_tails_under_a_standard_normal_integrate_to_one():
    """A bijection of the real line: the normal's mass beyond the cut is only spread further out."""
    z = torch.linspace(-1e4, 1e4, 4_000_001, dtype=DTYPE)[:, None]
    u, logabsdet = power_tails(z, 2.0)
    log_density = -0.5 * u[:, 0] ** 2 - 0.5 * np.log(2 * np.pi) + logabsdet
    mass = torch.exp(log_density).sum() * (z[1, 0] - z[0, 0])
    assert float(mass) == pytest.approx(1.0, abs=1e-5)


def test_tail_cut_acts_in_eval_mode_only_and_only_beyond_the_cut():
    """Training mode is the plain Gaussian-base flow (the training loss); eval mode adds the tails."""
    flows = [_randomise_copy(tail_cut) for tail_cut in (None, 2.0)]
    x = torch.randn(200, 3, generator=_generator(1), dtype=DTYPE) * 3
    for flow in flows:
        flow.train()
    torch.testing.assert_close(flows[1].log_prob(x), flows[0].log_prob(x), rtol=0, atol=0)
    for flow in flows:
        flow.eval()
    u = flows[0](x)[0]
    inside = (u.abs() <= 2.0).all(dim=1)
    assert 0 < int(inside.sum()) < x.shape[0]
    plain, tailed = flows[0].log_prob(x), flows[1].log_prob(x)
    torch.testing.assert_close(tailed[inside], plain[inside], rtol=0, atol=0)
    assert (tailed[~inside] != plain[~inside]).all()
    torch.testing.assert_close(flows[1].inverse(flows[1](x)[0])[0], x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flows[1].inverse(flows[1](x)[0])[1], -flows[1](x)[1], rtol=1e-9, atol=1e-9)


def _randomise_copy(tail_cut):
    X = torch.randn(64, 3, generator=_generator(0), dtype=DTYPE)
    flow = MAF(
        X.mean(0), X.std(0), n_layers=3, hidden_units=8, n_hidden_layers=1,
        tail_cut=tail_cut, generator=_generator(0), dtype=DTYPE,
    )  # fmt: skip
    _randomise(flow, _generator(2))
    return flow
