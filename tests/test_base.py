"""Base densities: the standard normal, the paper's MADE MoG, the Student t and the elliptical t."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy import special, stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf import MAFDensity
from sklearn_maf._nn import EllipticalT, MADEMoG, StandardNormal, StudentT, input_degrees
from sklearn_maf._nn.distributions import _DF_RATE, _OFFSET_GAIN
from sklearn_maf._optimizer import _parameter_groups


def _mog(n_features, n_components=3, n_context=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    degrees = input_degrees(torch.arange(n_features).flip(0))
    base = MADEMoG(
        degrees, n_components, hidden_units=16, n_hidden_layers=1, n_context=n_context,
        generator=generator, dtype=torch.float64,
    )
    with torch.no_grad():  # make the mixture far from trivial
        for param in base.made.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.3)
        # the offset enters the mixture times its gain: move the mixture by as much
        noise = torch.randn(base.offset.shape, generator=generator, dtype=torch.float64)
        base.offset.add_(noise * 0.3 / _OFFSET_GAIN)
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
    params = dict(n_layers=2, hidden_units=32, max_iter=60, random_state=0, reference=None)  # the flows alone
    gaussian = MAFDensity(**params).fit(X).score_samples(X_test).mean()
    mog = MAFDensity(base="mog", n_components=5, **params).fit(X).score_samples(X_test).mean()
    assert mog > gaussian + 0.1


def test_mog_starts_close_to_a_standard_normal():
    """The initial mixture is about N(0, 1) per feature, of components as wide as their spacing."""
    generator = torch.Generator().manual_seed(0)
    base = MADEMoG(
        input_degrees(torch.arange(2)), 10, hidden_units=8, n_hidden_layers=1,
        generator=generator, dtype=torch.float64,
    )
    u = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        log_weights, means, log_scales = base._mixture(u, None)
    weights = log_weights.exp()
    mean = (weights * means).sum(-1)
    variance = (weights * (log_scales.exp().square() + means.square())).sum(-1) - mean.square()
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=0.05, rtol=0)
    torch.testing.assert_close(variance, torch.ones_like(variance), atol=0.2, rtol=0)
    spacing = means[..., 1:] - means[..., :-1]
    torch.testing.assert_close(log_scales[..., 1:].exp(), spacing, atol=0.02, rtol=0)


def test_maf_mog_fits_a_ring_of_narrow_modes():
    """Guards issue #6: MAF MoG must resolve modes much narrower than the data.

    Eight Gaussians of std 0.4 on a circle of radius 4 are about 0.14 wide after
    standardisation. With the mixture components starting at unit width, and
    the first feature's mixture moving only through a bias that Adam moves by
    the learning rate per step, MAF MoG stayed 0.65 nats below the true
    held-out log-likelihood here; now about 0.22.
    """
    rng = np.random.RandomState(0)
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 4 * np.column_stack([np.cos(angles), np.sin(angles)])

    def draw(n):
        return centres[rng.randint(8, size=n)] + 0.4 * rng.normal(size=(n, 2))

    X, X_test = draw(2000), draw(1000)
    squared = ((X_test[:, None, :] - centres) ** 2).sum(-1)
    true = logsumexp(-squared / (2 * 0.16), axis=1) - np.log(8 * 2 * np.pi * 0.16)
    model = MAFDensity(base="mog", n_layers=2, hidden_units=32, random_state=0).fit(X)
    gap = np.mean(true - model.score_samples(X_test))
    assert gap < 0.35


def _student_t(df, dtype=torch.float64):
    """A :class:`StudentT` base with the given degrees of freedom per feature."""
    base = StudentT(len(df), dtype=dtype)
    with torch.no_grad():  # df = 1 + exp(_DF_RATE * raw_df)
        base.raw_df.copy_(torch.as_tensor(np.log(np.asarray(df) - 1) / _DF_RATE))
    return base


def test_student_t_starts_near_normal_and_sets_df():
    np.testing.assert_allclose(StudentT(3).df.detach().numpy(), 30.0)
    np.testing.assert_allclose(_student_t([1.5, 4.0, 80.0]).df.detach().numpy(), [1.5, 4.0, 80.0])


def test_student_t_log_prob_is_the_sum_of_t_log_densities():
    df = np.array([1.2, 3.0, 30.0])
    u = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    expected = stats.t.logpdf(u.numpy(), df).sum(axis=-1)
    np.testing.assert_allclose(_student_t(df).log_prob(u).detach().numpy(), expected, rtol=1e-12)


def test_student_t_log_prob_keeps_float32_accuracy_at_large_df():
    """The lgamma normaliser is a small difference of large numbers at large df.

    Computed in float32 it is off by about 4e-3 nats per feature at df = 1e5;
    the base computes it in float64 whatever the dtype of its input.
    """
    df = np.array([1e3, 1e5])
    u = torch.linspace(-3, 3, 7, dtype=torch.float32)[:, None].expand(7, 2)
    expected = stats.t.logpdf(u.double().numpy(), df).sum(axis=-1)
    log_prob = _student_t(df, dtype=torch.float32).log_prob(u)
    assert log_prob.dtype == torch.float32
    np.testing.assert_allclose(log_prob.detach().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_student_t_from_uniform_is_the_t_quantile(dtype):
    df = np.array([1.5, 5.0])
    noise = torch.rand(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = _student_t(df).from_uniform(noise.to(dtype))
    assert draws.dtype == dtype
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(draws.numpy(), stats.t.ppf(noise.to(dtype).double().numpy(), df), rtol=rtol)


def test_student_t_normal_scores_are_accurate_far_out_and_invert():
    """Scores come from the lower tail: far out, ``1 - stdtr`` would round to 0."""
    df = np.array([2.0])
    base = _student_t(df)
    u = torch.tensor([[-1e8], [-40.0], [-1.0], [0.0], [0.5], [40.0], [1e8]], dtype=torch.float64)
    z = base.normal_scores(u)
    expected = -np.sign(u.numpy()) * special.ndtri(stats.t.sf(np.abs(u.numpy()), df))
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-10)
    assert np.all(np.isfinite(z.numpy()))
    np.testing.assert_allclose(base.from_normal_scores(z).numpy(), u.numpy(), rtol=1e-8)


def test_student_t_df_gets_no_weight_decay():
    """alpha is an L2 penalty on weight matrices; it must not pull df anywhere."""
    base = StudentT(2)
    decayed, other = _parameter_groups(base, alpha=0.1)
    assert not decayed["params"] and other["params"][0] is base.raw_df
    assert other["weight_decay"] == 0.0


def _correlated_t(n, rng, df=3.0):
    """A 2-D multivariate t (df=3): heavy tails in every direction."""
    normal = rng.normal(size=(n, 2)) @ np.array([[1.0, 0.0], [0.6, 0.8]])
    return normal / np.sqrt(rng.chisquare(df, size=(n, 1)) / df)


@pytest.fixture(scope="module")
def fitted_t():
    """A student-t-base model of the 2-D t, shared by the tests that only read it."""
    rng = np.random.RandomState(0)
    X = _correlated_t(3000, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MAFDensity(
            base="student-t", n_layers=3, hidden_units=32, max_iter=100, random_state=0, reference=None
        ).fit(X)
    return model, _correlated_t(1000, rng)


def test_student_t_density_integrates_to_one(fitted_t):
    model, _ = fitted_t
    grid = np.linspace(-60.0, 60.0, 1201)
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(model.score_samples(np.c_[xx.ravel(), yy.ravel()]))
    assert density.sum() * (grid[1] - grid[0]) ** 2 == pytest.approx(1.0, abs=0.01)


def test_student_t_samples_follow_held_out_data(fitted_t):
    """Kolmogorov-Smirnov tests on three projections do not reject (Bonferroni)."""
    model, X_test = fitted_t
    samples = model.sample(1000, random_state=0)
    projections = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]).T
    p_values = [stats.ks_2samp(a, b).pvalue for a, b in zip((samples @ projections).T, (X_test @ projections).T)]
    assert min(p_values) > 0.01 / 3
    # The same tests have power: samples shifted by a third of a scale unit are rejected.
    shifted = (samples + [0.3, -0.3]) @ projections
    p_values = [stats.ks_2samp(a, b).pvalue for a, b in zip(shifted.T, (X_test @ projections).T)]
    assert min(p_values) < 0.01 / 3


def test_student_t_transform_gives_standard_normals_and_inverts(fitted_t):
    model, X_test = fitted_t
    U = model.transform(X_test)
    for column in U.T:
        assert stats.kstest(column, "norm").pvalue > 0.01
    np.testing.assert_allclose(model.inverse_transform(U), X_test, rtol=1e-8, atol=1e-8)


def test_student_t_model_pickles(fitted_t):
    model, X_test = fitted_t
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy.score_samples(X_test), model.score_samples(X_test))
    np.testing.assert_array_equal(copy.sample(10, random_state=0), model.sample(10, random_state=0))


def test_student_t_beats_the_gaussian_base_on_heavy_tails(fitted_t):
    """On the 2-D t the t base scores held-out rows better at equal size than the plain
    Gaussian base (no tails: with tail_cut="auto" the two are within 0.02 nats here)."""
    model, X_test = fitted_t
    rng = np.random.RandomState(0)
    X = _correlated_t(3000, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gaussian = MAFDensity(
            base="gaussian", n_layers=3, hidden_units=32, max_iter=100, tail_cut=None, random_state=0, reference=None
        )
        gaussian.fit(X)
    assert model.score_samples(X_test).mean() > gaussian.score_samples(X_test).mean() + 0.02


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_learned_df_follows_the_tails(precision, rng):
    """df falls to near 2 on a t with df=2 and stays large on Gaussian data."""
    params = dict(base="student-t", n_layers=2, hidden_units=16, max_iter=100, precision=precision, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        heavy = MAFDensity(**params).fit(rng.standard_t(2, size=(3000, 1)))
        normal = MAFDensity(**params).fit(rng.normal(size=(3000, 1)))
    assert 1.5 < heavy.module_.base.df.item() < 3.0
    assert normal.module_.base.df.item() > 15


# ------------------------------------------------------------ the elliptical t


def _elliptical_t(n_features, df, dtype=torch.float64):
    return EllipticalT(n_features, df_init=df, dtype=dtype)


@pytest.mark.parametrize("n_features", [1, 2, 5])
def test_elliptical_t_log_prob_is_the_multivariate_t_density(n_features):
    u = torch.randn(50, n_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    for df in (1.2, 3.0, 1e4):
        expected = stats.multivariate_t(np.zeros(n_features), np.eye(n_features), df=df).logpdf(u.numpy())
        log_prob = _elliptical_t(n_features, df).log_prob(u).detach().numpy()
        np.testing.assert_allclose(log_prob, np.atleast_1d(expected), rtol=1e-11)


def test_elliptical_t_sets_df_above_one_only():
    base = _elliptical_t(3, 30.0)
    np.testing.assert_allclose(base.df.detach().numpy(), [30.0])
    base.set_df(1.5)
    np.testing.assert_allclose(base.df.detach().numpy(), [1.5])
    with pytest.raises(ValueError, match="above 1"):
        base.set_df(1.0)


def test_elliptical_t_samples_have_its_radius_and_directions():
    """|u|^2 / D is F(D, df); the direction is uniform (the coordinates' signs balance)."""
    base = _elliptical_t(3, 2.5)
    u = base.sample(20_000, generator=torch.Generator().manual_seed(0), like=torch.zeros(1, dtype=torch.float64))
    assert u.shape == (20_000, 3)
    radius2 = u.square().sum(dim=1).numpy()
    assert stats.kstest(radius2 / 3, stats.f(3, 2.5).cdf).pvalue > 0.01
    assert np.all(np.abs((u.numpy() > 0).mean(axis=0) - 0.5) < 0.02)
    # the test has power: the radius of a t with df = 4 is rejected
    assert stats.kstest(radius2 / 3, stats.f(3, 4.0).cdf).pvalue < 1e-6


def test_elliptical_t_normal_scores_are_normal_invert_and_stay_finite_far_out():
    base = _elliptical_t(3, 2.0)
    u = base.sample(5000, generator=torch.Generator().manual_seed(1), like=torch.zeros(1, dtype=torch.float64))
    z = base.normal_scores(u)
    assert stats.kstest(z.square().sum(dim=1).numpy(), stats.chi2(3).cdf).pvalue > 0.01
    torch.testing.assert_close(base.from_normal_scores(z), u, rtol=1e-9, atol=1e-12)
    extreme = torch.tensor([[1e8, 0.0, 0.0], [0.0, -40.0, 0.0], [1e-9, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    z = base.normal_scores(extreme)
    assert torch.isfinite(z).all() and z[0, 0] > 8 and z[1, 1] < -3 and z[3].abs().sum() == 0
    torch.testing.assert_close(base.from_normal_scores(z), extreme, rtol=1e-8, atol=0)


@pytest.mark.parametrize("base", ["elliptical-t", "fitted-t"])
def test_multivariate_t_models_start_at_the_fitted_df_and_model_a_multivariate_t(base):
    """The fitted model of a 3-D t (df=3): df started where ECME puts it, a good density,
    standard-normal latents that invert, samples like held-out rows."""
    rng = np.random.default_rng(2)
    true = stats.multivariate_t(np.zeros(3), np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 1.0]]), df=3.0)
    X, X_test = true.rvs(3000, random_state=rng), true.rvs(2000, random_state=rng)
    params = dict(n_layers=2, hidden_units=16, random_state=0)
    model = MAFDensity(base=base, max_iter=1, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = float(model.fit(X).module_.base.df.detach())  # after one epoch: near ECME's start
        model.set_params(max_iter=200).fit(X)
        gaussian = MAFDensity(base="gaussian", max_iter=200, tail_cut=None, **params).fit(X)
    assert 2.0 < start < 4.5
    gap = true.logpdf(X_test).mean() - model.score_samples(X_test).mean()
    gap_gaussian = true.logpdf(X_test).mean() - gaussian.score_samples(X_test).mean()
    assert gap < 0.05 and gap < gap_gaussian
    U = model.transform(X_test)
    assert stats.kstest(U[:, 0], "norm").pvalue > 0.01
    np.testing.assert_allclose(model.inverse_transform(U), X_test, rtol=1e-8, atol=1e-8)
    samples = model.sample(2000, random_state=0)
    assert stats.ks_2samp(np.square(samples).sum(1), np.square(X_test).sum(1)).pvalue > 0.01
    if base == "fitted-t":  # the rows whitened by the fitted t, within the estimate's error
        standardize, whiten = model.module_.transforms[:2]
        scatter = whiten.chol @ whiten.chol.T * torch.outer(standardize.scale, standardize.scale)
        np.testing.assert_allclose(scatter.numpy(), true.shape, atol=0.1)
        assert gap < 0.02
