"""Property tests for sklearn_maf._nn.made: degrees, masks and the MADE's dependency structure."""

import pytest
import torch

from sklearn_maf._nn.made import MADE, MaskedLinear, hidden_degrees, input_degrees

DTYPE = torch.float64
ORDER_KINDS = ["natural", "reversed", "random-1", "random-2"]


def _order(kind, n_features):
    """A variable order of ``n_features`` features.

    Parameters
    ----------
    kind : {"natural", "reversed", "random-<seed>"}
        Which order; random orders are drawn from a seeded local generator.
    n_features : int
        Number of features.

    Returns
    -------
    order : torch.LongTensor of shape (n_features,)
        ``order[k]`` is the feature that comes ``k``-th.
    """
    if kind == "natural":
        return torch.arange(n_features)
    if kind == "reversed":
        return torch.arange(n_features).flip(0)
    seed = int(kind.split("-")[1])
    return torch.randperm(n_features, generator=torch.Generator().manual_seed(seed))


def _make_every_path_count(made, generator):
    """Overwrite the MADE's parameters so that no allowed path is switched off.

    Every weight, masked entries included, gets a random value, so only the masks
    can keep an input from an output. Hidden weights and biases are positive and
    the inputs used with this helper lie in (0, 1), so every ReLU is active and
    every tanh has a positive slope: a Jacobian entry is then zero only where the
    masks allow no path.
    """
    with torch.no_grad():
        for layer in made.layers[:-1]:
            layer.weight.uniform_(0.5, 1.0, generator=generator)
            layer.bias.uniform_(0.0, 0.5, generator=generator)
        out = made.layers[-1]
        magnitude = torch.empty_like(out.weight).uniform_(0.5, 1.0, generator=generator)
        sign = torch.randint(0, 2, out.weight.shape, generator=generator, dtype=DTYPE) * 2 - 1
        out.weight.copy_(magnitude * sign)


def _block_jacobians(made, x, context=None, wrt="x"):
    """Per-row Jacobians of every output block, with respect to ``x`` or the context.

    Returns
    -------
    jacobians : list of torch.Tensor of shape (n_samples, n_features, n_wrt)
        One per output block; rows of a MADE are independent, so the Jacobian
        of the row sums is the per-row Jacobian.
    """
    jacobians = []
    for block in range(made.n_params):
        if wrt == "x":
            jac = torch.autograd.functional.jacobian(lambda x: made(x, context)[block].sum(0), x)
        else:
            jac = torch.autograd.functional.jacobian(lambda c: made(x, c)[block].sum(0), context)
        jacobians.append(jac.permute(1, 0, 2))
    return jacobians


@pytest.mark.parametrize("order_kind", ORDER_KINDS)
@pytest.mark.parametrize("n_features", [1, 2, 3, 5])
def test_input_degrees_are_positions_in_the_order(n_features, order_kind):
    order = _order(order_kind, n_features)
    degrees = input_degrees(order)
    assert degrees.dtype == torch.long
    assert torch.equal(degrees[order], torch.arange(1, n_features + 1))
    assert torch.equal(torch.argsort(degrees), order)


@pytest.mark.parametrize("hidden_units", [1, 2, 4, 7])
@pytest.mark.parametrize("n_features", [1, 2, 3, 5])
def test_hidden_degrees_cycle_through_the_conditioning_degrees(n_features, hidden_units):
    degrees = hidden_degrees(n_features, hidden_units)
    assert degrees.shape == (hidden_units,)
    if n_features == 1:
        assert torch.equal(degrees, torch.zeros(hidden_units, dtype=torch.long))
        return
    assert degrees.min() >= 1 and degrees.max() <= n_features - 1
    counts = torch.bincount(degrees, minlength=n_features)[1:]
    if hidden_units >= n_features - 1:
        assert (counts >= 1).all(), "a degree is missing although there are enough units"
    assert counts.max() - counts.min() <= 1, "units are not spread evenly over the degrees"


@pytest.mark.parametrize("scale", [1.0, 1e-2])
@pytest.mark.parametrize("shape", [(3, 4), (6, 2), (1, 1)])
def test_masked_linear_init_uses_only_the_given_generator(shape, scale):
    """Same generator seed, same weights; torch's global RNG does not move."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.6
    global_state = torch.random.get_rng_state()
    first = MaskedLinear(mask, torch.Generator().manual_seed(0), scale=scale, dtype=DTYPE)
    second = MaskedLinear(mask, torch.Generator().manual_seed(0), scale=scale, dtype=DTYPE)
    other = MaskedLinear(mask, torch.Generator().manual_seed(1), scale=scale, dtype=DTYPE)
    assert torch.equal(global_state, torch.random.get_rng_state())

    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert not torch.equal(first.bias, other.bias)
    assert first.weight.dtype == DTYPE and first.mask.dtype == DTYPE
    assert (first.weight[~mask] == 0).all()
    fan_in = mask.sum(dim=1, keepdim=True).clamp(min=1).to(DTYPE)
    assert (first.weight.abs() <= scale / fan_in.sqrt()).all()


def test_masked_linear_forward_multiplies_by_the_mask():
    """Masked weights are ignored in the forward pass even when they are not zero."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 3, generator=generator) < 0.5
    layer = MaskedLinear(mask, generator, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.normal_(generator=generator)
    x = torch.randn(5, 3, generator=generator, dtype=DTYPE)
    expected = x @ (layer.weight * mask).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("n_hidden_layers", [0, 1, 2])
@pytest.mark.parametrize("extra_units", [0, 3])
@pytest.mark.parametrize("order_kind", ORDER_KINDS)
@pytest.mark.parametrize("n_features", [1, 2, 3, 4, 5])
def test_made_jacobian_is_exactly_the_strict_lower_triangle_of_its_order(
    n_features, order_kind, extra_units, n_hidden_layers, activation
):
    """Output i depends on every input of lower degree, and on no other, in every block."""
    generator = torch.Generator().manual_seed(0)
    order = _order(order_kind, n_features)
    made = MADE(
        input_degrees(order),
        hidden_units=max(n_features - 1, 1) + extra_units,
        n_hidden_layers=n_hidden_layers,
        activation=activation,
        generator=generator,
        dtype=DTYPE,
    )
    _make_every_path_count(made, generator)
    x = torch.rand(3, n_features, generator=generator, dtype=DTYPE)
    outputs = made(x)
    assert len(outputs) == 2 and all(out.shape == (3, n_features) for out in outputs)

    strict_lower = torch.ones(n_features, n_features).tril(-1).bool()
    for jac in _block_jacobians(made, x):
        in_order = jac[:, order][:, :, order]
        assert (in_order[:, ~strict_lower] == 0).all(), (
            "an output sees an input of equal or higher degree"
        )
        assert (in_order[:, strict_lower] != 0).all(), "an allowed input does not reach its output"


@pytest.mark.parametrize("hidden_units", [1, 3, 5, 8])
@pytest.mark.parametrize("n_features", [1, 2, 3, 5])
def test_hidden_degrees_with_context_include_context_only_units(n_features, hidden_units):
    """With a context, degree-0 units exist: the first conditional's only path to the context."""
    degrees = hidden_degrees(n_features, hidden_units, n_context=2)
    assert degrees.min() == 0 and degrees.max() <= n_features - 1
    counts = torch.bincount(degrees, minlength=n_features)
    if hidden_units >= n_features:
        assert (counts >= 1).all()
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("n_hidden_layers", [0, 1, 2])
@pytest.mark.parametrize("extra_units", [0, 2])
@pytest.mark.parametrize("n_context", [1, 3])
@pytest.mark.parametrize("n_features", [1, 2, 3, 5])
def test_made_context_reaches_every_output(
    n_features, n_context, extra_units, n_hidden_layers, activation
):
    """Every conditional, the first in the order included, depends on every context feature."""
    generator = torch.Generator().manual_seed(0)
    order = _order("random-3", n_features)
    made = MADE(
        input_degrees(order),
        hidden_units=n_features + extra_units,
        n_hidden_layers=n_hidden_layers,
        activation=activation,
        n_context=n_context,
        generator=generator,
        dtype=DTYPE,
    )
    _make_every_path_count(made, generator)
    x = torch.rand(3, n_features, generator=generator, dtype=DTYPE)
    context = torch.rand(3, n_context, generator=generator, dtype=DTYPE)

    for jac in _block_jacobians(made, x, context, wrt="context"):
        assert (jac != 0).all(), "a context feature does not reach an output"
    strict_lower = torch.ones(n_features, n_features).tril(-1).bool()
    for jac in _block_jacobians(made, x, context, wrt="x"):
        in_order = jac[:, order][:, :, order]
        assert (in_order[:, ~strict_lower] == 0).all()
        assert (in_order[:, strict_lower] != 0).all()
