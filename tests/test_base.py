"""Base densities: the standard normal and the paper's MADE MoG."""

import numpy as np
import pytest
import torch

from sklearn_maf import MAFDensity
from sklearn_maf._nn import MADEMoG, StandardNormal, input_degrees


def _mog(n_features, n_components=3, n_context=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    degrees = input_degrees(torch.arange(n_features).flip(0))
    base = MADEMoG(
        degrees, n_components, hidden_units=16, n_hidden_layers=1, n_context=n_context,
        generator=generator, dtype=torch.float64,
    )
    with torch.no_grad():  # make the mixture far from trivial
        for param in base.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.3)
    return base


def test_mog_density_integrates_to_one():
    base = _mog(2)
    grid = torch.linspace(-15, 15, 1501, dtype=torch.float64)
    with torch.no_grad():
        mass = base.log_prob(torch.cartesian_prod(grid, grid)).exp().sum() * (grid[1] - grid[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("context_value", [-1.0, 0.0, 2.0])
def test_conditional_mog_density_integrates_to_one(context_value):
    base = _mog(1, n_context=2)
    grid = torch.linspace(-30, 30, 20001, dtype=torch.float64)[:, None]
    context = torch.full((grid.shape[0], 2), context_value, dtype=torch.float64)
    with torch.no_grad():
        mass = base.log_prob(grid, context).exp().sum() * (grid[1, 0] - grid[0, 0])
    assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_mog_samples_follow_its_density():
    """Sample frequencies in boxes match the density integrated over the boxes."""
    base = _mog(2)
    generator = torch.Generator().manual_seed(1)
    like = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        samples = base.sample(200_000, generator=generator, like=like).numpy()
    edges = np.linspace(-4, 4, 9)
    counts, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=[edges, edges])
    fine = torch.linspace(-4, 4, 801, dtype=torch.float64)
    centres = (fine[:-1] + fine[1:]) / 2
    with torch.no_grad():
        density = base.log_prob(torch.cartesian_prod(centres, centres)).exp().reshape(800, 800)
    mass = (density * (fine[1] - fine[0]) ** 2).reshape(8, 100, 8, 100).sum(dim=(1, 3)).numpy()
    frequency = counts / len(samples)
    # binomial standard error of each frequency, 4 sigma
    error = 4 * np.sqrt(mass * (1 - mass) / len(samples)) + 1e-4
    assert np.all(np.abs(frequency - mass) < error)


def test_mog_conditional_structure_is_autoregressive():
    """The mixture parameters of feature i depend only on features of lower degree."""
    base = _mog(4)
    u = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    jacobian = torch.autograd.functional.jacobian(lambda v: torch.cat(base._mixture(v, None), -1).sum(0), u)
    # jacobian: (4 features, 3K, 3 rows, 4 inputs) -> dependence of feature i on input j
    dependence = jacobian.abs().sum(dim=(1, 2)) > 0
    degrees = base.made.degrees
    allowed = degrees[:, None] > degrees[None, :]
    assert torch.equal(dependence & ~allowed, torch.zeros_like(dependence))


def test_standard_normal_log_prob():
    u = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1)
    torch.testing.assert_close(StandardNormal(3).log_prob(u), expected)


def test_maf_mog_fits_a_multimodal_density_better(rng):
    """On well-separated modes the MoG base beats the Gaussian base at equal size."""
    centres = np.array([[-4, -4], [-4, 4], [4, -4], [4, 4]], dtype=float)
    X = centres[rng.randint(4, size=3000)] + 0.3 * rng.normal(size=(3000, 2))
    X_test = centres[rng.randint(4, size=1000)] + 0.3 * rng.normal(size=(1000, 2))
    params = dict(n_layers=2, hidden_units=32, max_iter=60, random_state=0)
    gaussian = MAFDensity(**params).fit(X).score_samples(X_test).mean()
    mog = MAFDensity(base="mog", n_components=5, **params).fit(X).score_samples(X_test).mean()
    assert mog > gaussian + 0.1
