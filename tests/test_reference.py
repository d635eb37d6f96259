"""The reference density mixed with the flow: its parts, its fit and the guarantee it gives."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf
from sklearn.datasets import load_iris, load_wine
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split

from sklearn_maf import MAFConditionalDensity, MAFDensity, _reference
from sklearn.neighbors import KernelDensity

from sklearn_maf._nn.mixture import GaussianKernelDensity, GaussianMixtureDensity, Mixture, to_fixed
from sklearn_maf._reference import (
    broad_gaussian,
    fit_reference,
    flow_and_reference_weights,
    gaussian_mixture,
    gaussian_mixtures_by_bic,
    kernel_bandwidth,
    ledoit_wolf,
    merged_mixtures,
    reference_mixture,
)


def _tiny(estimator=MAFDensity, **params):
    defaults = dict(n_layers=2, hidden_units=16, max_iter=20, precision="float64", random_state=0)
    return estimator(**{**defaults, **params})


def _random_mixture(rng, n_components=3, n_features=3):
    weights = rng.uniform(0.2, 1, n_components)
    means = rng.normal(scale=3, size=(n_components, n_features))
    factors = rng.normal(size=(n_components, n_features, n_features))
    covariances = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(n_features)
    return weights / weights.sum(), means, covariances


def test_gaussian_mixture_density_matches_scipy():
    rng = np.random.RandomState(0)
    weights, means, covariances = _random_mixture(rng)
    density = GaussianMixtureDensity(
        torch.as_tensor(weights), torch.as_tensor(means), torch.linalg.cholesky(torch.as_tensor(covariances))
    )
    z = rng.normal(scale=4, size=(50, 3))
    expected = logsumexp(
        [np.log(w) + multivariate_normal(m, c).logpdf(z) for w, m, c in zip(weights, means, covariances)], axis=0
    )
    np.testing.assert_allclose(density.log_prob(torch.as_tensor(z)).numpy(), expected, rtol=1e-12)


def test_gaussian_mixture_density_draws_its_components():
    rng = np.random.RandomState(1)
    weights, means, covariances = _random_mixture(rng, n_components=2, n_features=2)
    means[1] += 40  # far apart: each draw's component is plain
    density = GaussianMixtureDensity(
        torch.as_tensor(weights), torch.as_tensor(means), torch.linalg.cholesky(torch.as_tensor(covariances))
    )
    draws = density.sample(20_000, generator=torch.Generator().manual_seed(0)).numpy()
    second = draws[:, 0] > means[:, 0].mean()
    assert abs(second.mean() - weights[1]) < 0.015
    np.testing.assert_allclose(np.cov(draws[second].T), covariances[1], rtol=0.1, atol=0.05)
    # row by row: the first rows of a larger draw are the smaller draw
    small = density.sample(10, generator=torch.Generator().manual_seed(3))
    large = density.sample(30, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(small, large[:10], rtol=0, atol=0)


def test_kernel_density_matches_sklearn_and_integrates_to_one():
    rng = np.random.RandomState(0)
    points = rng.normal(size=(300, 2))
    density = GaussianKernelDensity(torch.as_tensor(points), torch.ones(300, dtype=torch.float64), 0.3)
    z = rng.normal(scale=2, size=(40, 2))
    expected = KernelDensity(bandwidth=0.3).fit(points).score_samples(z)
    np.testing.assert_allclose(density.log_prob(torch.as_tensor(z)).numpy(), expected, rtol=1e-10)
    # blocks of points give the same sums as one block
    big = torch.as_tensor(rng.normal(size=(5000, 2)))
    whole = density.log_prob(big)
    import sklearn_maf._nn.mixture as mixture_module

    old, mixture_module._KERNEL_BLOCK = mixture_module._KERNEL_BLOCK, 5000 * 7
    try:
        torch.testing.assert_close(density.log_prob(big), whole, rtol=1e-12, atol=1e-12)
    finally:
        mixture_module._KERNEL_BLOCK = old
    mixture = Mixture([density, GaussianMixtureDensity(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])], [0.4, 0.6])
    grid = torch.linspace(-9, 9, 361, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    mass = mixture.log_prob(torch.stack([xx.ravel(), yy.ravel()], dim=1)).exp().sum() * (grid[1] - grid[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-6)
    draws = mixture.sample(4000, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 2)
    np.testing.assert_allclose(draws.mean(dim=0).numpy(), 0.4 * points.mean(axis=0), atol=0.08)


def test_kernel_bandwidth_maximises_the_leave_one_out_likelihood():
    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(-2, 0.3, size=(150, 2)), rng.normal(2, 0.3, size=(150, 2))])
    bandwidth = kernel_bandwidth(Z, np.ones(300))[0]

    def leave_one_out(h):
        d2 = ((Z[:, None] - Z[None]) ** 2).sum(-1)
        kernel = np.exp(-d2 / (2 * h * h))
        np.fill_diagonal(kernel, 0.0)
        return np.mean(np.log(kernel.sum(axis=1) / 299 / (2 * np.pi * h * h)))

    # the search runs in float32 (half the time): its bandwidth is float64's to the search's 1%
    assert leave_one_out(bandwidth) >= max(leave_one_out(bandwidth * f) for f in (0.97, 1 / 0.97)) - 1e-9
    # a weight of 2 is the row twice
    repeated = np.repeat(Z[:40], 2, axis=0)
    assert kernel_bandwidth(Z[:40], np.full(40, 2.0))[0] == pytest.approx(kernel_bandwidth(repeated, np.ones(80))[0], rel=1e-5)


def test_gaussian_mixture_density_rejects_bad_parameters():
    with pytest.raises(ValueError, match="shapes"):
        GaussianMixtureDensity(torch.ones(2), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureDensity(torch.ones(1), torch.zeros(1, 2), -torch.eye(2)[None])


def test_ledoit_wolf_is_sklearns_and_counts_weights_as_repetitions():
    rng = np.random.RandomState(0)
    Z = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    mean, covariance = ledoit_wolf(Z, np.ones(40))
    np.testing.assert_allclose(mean, Z.mean(axis=0))
    np.testing.assert_allclose(covariance - 1e-6 * np.eye(6), sklearn_ledoit_wolf(Z)[0], rtol=1e-10, atol=1e-12)
    weight = rng.randint(1, 4, size=40).astype(float)
    repeated = np.repeat(Z, weight.astype(int), axis=0)
    for got, expected in zip(ledoit_wolf(Z, weight), ledoit_wolf(repeated, np.ones(len(repeated)))):
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_gaussian_mixture_reaches_sklearns_likelihood():
    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(loc, 1, size=(300, 2)) for loc in (-6, 0, 6)])
    weights, means, covariances, total = gaussian_mixture(Z, np.ones(len(Z)), 3, random_state=0)
    reference = GaussianMixture(3, random_state=0).fit(Z)
    assert total / len(Z) == pytest.approx(reference.score(Z), abs=1e-3)
    np.testing.assert_allclose(np.sort(means[:, 0]), np.sort(reference.means_[:, 0]), atol=1e-2)
    # one component: the weighted maximum-likelihood Gaussian, in closed form
    _, mean, covariance, _ = gaussian_mixture(Z, np.full(len(Z), 2.0), 1, random_state=0)
    np.testing.assert_allclose(mean[0], Z.mean(axis=0))
    np.testing.assert_allclose(covariance[0], np.cov(Z.T, bias=True) + 1e-6 * np.eye(2))


def test_bic_finds_the_components_and_respects_the_rows():
    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(loc, 0.5, size=(400, 2)) for loc in (-4, 0, 4)])
    weights, _, _ = gaussian_mixtures_by_bic(Z, np.ones(len(Z)), random_state=0)[0]
    assert weights.size == 3
    # two components in 5 dimensions need 12 rows: with 11 only one is tried,
    # even where two well-separated clusters would win on BIC
    Z = np.concatenate([rng.normal(-50, 1, size=(6, 5)), rng.normal(50, 1, size=(5, 5))])
    weights, _, _ = gaussian_mixtures_by_bic(Z, np.ones(11), random_state=0)[0]
    assert weights.size == 1
    weights, _, _ = gaussian_mixtures_by_bic(Z, np.full(11, 2.0), random_state=0)[0]
    assert weights.size >= 2
    # heavy weights on few rows: never more components than rows (k-means needs one each)
    weights, _, _ = gaussian_mixtures_by_bic(Z[:4], np.full(4, 100.0), random_state=0)[0]
    assert weights.size <= 4


def _clusters():
    """Rows of round clusters in 2-D (8, two of them 0.6 apart with spreads 0.4 and 0.74), and their number."""
    rng = np.random.RandomState(23)
    n_clusters = rng.randint(5, 10)
    Z = np.concatenate([
        rng.normal(rng.uniform(-6, 6, 2), rng.uniform(0.3, 1.0), size=(rng.randint(30, 120), 2))
        for _ in range(n_clusters)
    ])  # fmt: skip
    return Z, n_clusters


def test_bic_tries_every_number_of_components_the_rows_allow(monkeypatch):
    """EM's local optima make the BIC rise and fall again: from a single k-means start, on these
    clusters, it rises from 6 to 8 components and is lowest at 9. A search that stopped after two
    rises kept 6 (ALOI kept 7 where sklearn's GaussianMixture, trying all 10, found 10 better by 5
    nats a row)."""
    monkeypatch.setattr(_reference, "em_starts", lambda n_rows, n_features, max_starts: 1)
    Z, _ = _clusters()
    bic = []
    for k in range(1, 11):
        *_, log_likelihood = gaussian_mixture(Z, np.ones(len(Z)), k, random_state=0)
        bic.append(-2 * log_likelihood + (k * 6 - 1) * np.log(len(Z)))
    assert np.argmin(bic) == 8 and bic[6] > bic[5] and bic[7] > bic[6]  # the data are as described
    weights, _, _ = gaussian_mixtures_by_bic(Z, np.ones(len(Z)), random_state=0)[0]
    assert weights.size == 9
    # the best few, best first, each with the BIC its own fit had
    ranked = gaussian_mixtures_by_bic(Z, np.ones(len(Z)), random_state=0, n_best=3)
    sizes = [w.size for w, _, _ in ranked]
    assert sizes[0] == 9 and len(set(sizes)) == 3
    assert [bic[k - 1] for k in sizes] == sorted(bic)[:3]


def test_bic_search_keeps_the_best_of_several_starts(monkeypatch):
    """From one k-means start EM ends 72 nats below the best optimum at 7 components on these
    clusters, and BIC then picks 9; from ten starts side by side it finds the best of ten separate
    runs, and the search (seven starts on these rows) picks 7 or 8 (two of the 8 clusters overlap)."""
    Z, n_clusters = _clusters()
    weight = np.ones(len(Z))
    assert n_clusters == 8 and _reference.em_starts(len(Z), 2) == 7
    single = gaussian_mixture(Z, weight, 7, random_state=0)[3]
    separate = [gaussian_mixture(Z, weight, 7, random_state=seed) for seed in range(10)]
    weights, means, covariances, best = gaussian_mixture(Z, weight, 7, random_state=0, n_starts=10)
    assert best > single + 50
    # the batch is the separate runs, each until its own convergence or beyond (EM only climbs)
    assert best >= max(run[3] for run in separate) - 1e-6 * abs(best)
    np.testing.assert_allclose(weights.sum(), 1.0)
    total = logsumexp(
        [np.log(w) + multivariate_normal(m, c).logpdf(Z) for w, m, c in zip(weights, means, covariances)], axis=0
    ).sum()
    np.testing.assert_allclose(total, best, rtol=1e-3)  # the returned fit is the one scored
    assert gaussian_mixtures_by_bic(Z, weight, random_state=0)[0][0].size in (n_clusters - 1, n_clusters)
    # the starts depend on the rows of positive weight only, and never exceed the cap
    assert _reference.em_starts(40, 2) == _reference._MAX_STARTS
    assert _reference.em_starts(2_500, 2) == 2 and _reference.em_starts(3_000, 2) == 1
    assert _reference.em_starts(400, 1_000) == 5  # 2,000 search rows in 1,000 dimensions
    # (a budget of 2 starts on these rows, 1 if the rows of no weight counted)
    monkeypatch.setattr(_reference, "search_rows", lambda n_features: 2 * len(Z))
    padded = np.concatenate([Z, np.zeros((100, 2))])
    np.testing.assert_allclose(
        gaussian_mixtures_by_bic(padded, np.r_[weight, np.zeros(100)], random_state=0)[0][1],
        gaussian_mixtures_by_bic(Z, weight, random_state=0)[0][1],
    )


def test_merged_mixtures_is_the_weighted_sum_of_the_stacked_mixtures():
    """The stacked mixtures become one mixture part, so the model keeps its three parts."""
    rng = np.random.RandomState(0)
    broad, first, second = (GaussianMixtureDensity(*_torch_mixture(rng, k)) for k in (1, 2, 3))
    kernel = GaussianKernelDensity(torch.as_tensor(rng.normal(size=(10, 3))), torch.ones(10), 0.5)
    parts, weights = [broad, first, second, kernel], np.array([0.1, 0.3, 0.5, 0.1])
    merged, merged_weights = merged_mixtures(parts, weights)
    assert merged[0] is broad and merged[2] is kernel and merged[1].means.shape[0] == 5
    np.testing.assert_allclose(merged_weights, [0.1, 0.8, 0.1])
    z = torch.as_tensor(rng.normal(size=(20, 3)))
    with torch.no_grad():
        expected = np.logaddexp(np.log(0.3) + first.log_prob(z).numpy(), np.log(0.5) + second.log_prob(z).numpy())
        np.testing.assert_allclose(merged[1].log_prob(z).numpy(), expected - np.log(0.8), rtol=1e-12)
    # a mixture of no weight is left out
    merged, merged_weights = merged_mixtures(parts, np.array([0.1, 0.0, 0.8, 0.1]))
    assert merged[1].means.shape[0] == 3 and merged_weights[1] == 0.8
    # and one whose components' weights underflow (EM can drive a part's weight to the least double)
    merged, merged_weights = merged_mixtures(parts, np.array([0.1, 5e-324, 0.8, 0.1]))
    assert merged_weights[1] == pytest.approx(0.8)
    with torch.no_grad():
        np.testing.assert_allclose(merged[1].log_prob(z).numpy(), second.log_prob(z).numpy(), rtol=1e-12)


def _torch_mixture(rng, n_components):
    weights, means, covariances = _random_mixture(rng, n_components)
    return torch.as_tensor(weights), torch.as_tensor(means), torch.linalg.cholesky(torch.as_tensor(covariances))


def test_gaussian_parts_are_scored_leaving_each_row_out():
    """Each scored row counts under the part fitted without it (one M-step: exact for one
    Gaussian). In-sample scores less Akaike's correction favoured the mixtures of most
    components, and a component on a few rows scored them as spikes."""
    import sklearn_maf._reference as reference

    rng = np.random.RandomState(0)
    Z = rng.normal(size=(60, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]])
    single = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, np.ones(60), 1, random_state=0)))
    held = reference._leave_one_out(single, torch.as_tensor(Z), np.ones(60), 60.0, broad=False)
    for i in range(0, 60, 7):
        rest = np.ones(60)
        rest[i] = 0.0
        refitted = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, rest, 1, random_state=0)))
        with torch.no_grad():
            assert held[i] == pytest.approx(refitted.log_prob(torch.as_tensor(Z[i : i + 1])).item(), abs=1e-6)
    # the broad part: each of its Gaussians saw every row
    held = reference._leave_one_out(broad_gaussian(Z, np.ones(60)), torch.as_tensor(Z), np.ones(60), 60.0, broad=True)
    rest = np.r_[0.0, np.ones(59)]
    with torch.no_grad():
        refitted = broad_gaussian(Z, rest).log_prob(torch.as_tensor(Z[:1])).item()
    assert held[0] == pytest.approx(refitted, abs=0.2)  # Ledoit-Wolf's shrinkage moves a little too
    # a component on one far row: a spike in sample, an ordinary row held out
    Z = np.concatenate([rng.normal(size=(99, 2)), [[30.0, 30.0]]])
    spike = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, np.ones(100), 2, random_state=0)))
    assert spike.log_weights.exp().min() == pytest.approx(0.01)
    held = reference._leave_one_out(spike, torch.as_tensor(Z), np.ones(100), 100.0, broad=False)
    with torch.no_grad():
        in_sample = spike.log_prob(torch.as_tensor(Z)).numpy()
    assert in_sample[-1] > 0 and held[-1] < -1000  # scored by the other component alone
    assert 0 < np.mean(in_sample[:99] - held[:99]) < 0.1  # ordinary rows: about 6 parameters over 99 rows
    # a unit of weight 3 is one of three copies: the component keeps two, its weight
    # goes from 3/102 to 2/101 and its covariance (the ridge alone) scales by 3/2
    spike = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, np.r_[np.ones(99), 3.0], 2, random_state=0)))
    held = reference._leave_one_out(spike, torch.as_tensor(Z[-1:]), np.ones(1), 102.0, broad=False)
    with torch.no_grad():
        in_sample = spike.log_prob(torch.as_tensor(Z[-1:])).item()
    assert held[0] == pytest.approx(in_sample + np.log((2 / 101) / (3 / 102)) - np.log(1.5), abs=1e-6)


def _torch_mixture_from(fitted):
    weights, means, covariances, _ = fitted
    return torch.as_tensor(weights), torch.as_tensor(means), torch.linalg.cholesky(torch.as_tensor(covariances))


def _stack(log_densities, weight, floor):
    """The weights of two densities (the second floored) fitted on held-out rows alone."""
    return flow_and_reference_weights(
        log_densities[:, 0], log_densities[:, 1:], weight, np.empty((0, 1)), np.empty(0), floor
    )


def test_held_out_weights_recover_a_mixture_and_keep_the_floor():
    """Without training rows the EM is plain stacking on the held-out rows."""
    rng = np.random.RandomState(0)
    n = 20_000
    first = rng.uniform(size=n) < 0.3
    x = np.where(first, rng.normal(-1, 1, n), rng.normal(2, 0.5, n))
    log_densities = np.column_stack(
        [multivariate_normal(-1, 1).logpdf(x), multivariate_normal(2, 0.25).logpdf(x)]
    )
    weights = _stack(log_densities, np.ones(n), 0.0)
    np.testing.assert_allclose(weights, [0.3, 0.7], atol=0.01)
    weights = _stack(log_densities[first], np.ones(first.sum()), 0.05)
    assert weights[1] == pytest.approx(0.05)
    assert weights.sum() == pytest.approx(1.0)
    # row weights count as repetitions
    w = rng.randint(0, 3, size=n).astype(float)
    repeated = np.repeat(log_densities, w.astype(int), axis=0)
    np.testing.assert_allclose(
        _stack(log_densities, w, 1e-4),
        _stack(repeated, np.ones(len(repeated)), 1e-4),
        rtol=1e-9,
    )


def _gaussian_logpdf(X_train, X):
    return multivariate_normal(X_train.mean(axis=0), np.cov(X_train.T, bias=True)).logpdf(X)


@pytest.mark.parametrize(("load", "floor"), [(load_wine, -50), (load_iris, -50)])
def test_no_absurd_held_out_row_on_small_real_data(load, floor):
    """Issue 18: at the defaults a held-out wine row scored 48 million nats below a Gaussian."""
    X_train, X_test = train_test_split(load().data, test_size=0.2, random_state=0)
    model = MAFDensity(random_state=0).fit(X_train)
    scores = model.score_samples(X_test)
    assert (scores - _gaussian_logpdf(X_train, X_test)).min() > floor
    assert model.mixture_weights_.shape == (4,)
    assert model.mixture_weights_[1] >= model.min_reference_weight * (1 - 1e-9)
    assert model.mixture_weights_.sum() == pytest.approx(1.0)


def test_far_rows_cost_at_most_the_floor_against_the_broad_gaussian():
    """Every row scores at least log(min_reference_weight) plus its broad-Gaussian density."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(2000, 2)) @ np.array([[1.0, 0.6], [0.0, 0.8]])
    X[:, 1] += np.sin(2 * X[:, 0])
    model = _tiny(min_reference_weight=1e-3).fit(X)
    far = np.array([[1e3, -1e3], [-40.0, 55.0], [0.0, 1e4], [1e150, 1.0]])
    scores = model.score_samples(far)
    assert np.all(np.isfinite(scores))
    # n >> d: the Ledoit-Wolf Gaussian is the maximum-likelihood one, up to a tiny shrinkage
    bound = np.log(1e-3) + _gaussian_logpdf(X, far)
    assert np.all(scores >= bound - 1e-3 * np.abs(bound) - 1)


def test_rows_cost_at_most_the_floor_against_the_maximum_likelihood_gaussian_too():
    """Few rows per feature: Ledoit-Wolf shrinkage undercuts the plain Gaussian fit by tens of nats
    on some rows (musk in the density suite); the broad part's 1% share of that fit bounds those rows too."""
    rng = np.random.RandomState(0)
    loadings = 3 * rng.normal(size=(3, 30))

    def draw(n):  # three strong factors in 30 features, as correlated real data
        return rng.normal(size=(n, 3)) @ loadings + 0.3 * rng.normal(size=(n, 30))

    X, X_test = draw(80), draw(200)
    Z, Z_test = (X - X.mean(axis=0)) / X.std(axis=0), (X_test - X.mean(axis=0)) / X.std(axis=0)
    plain = _gaussian_logpdf(X, X_test)
    shrunk = multivariate_normal(Z.mean(axis=0), sklearn_ledoit_wolf(Z)[0]).logpdf(Z_test) - np.log(X.std(axis=0)).sum()
    assert (plain - shrunk).max() > 20  # the Ledoit-Wolf floor alone would allow rows 29 nats below
    for reference in ("gaussian", "gmm"):
        model = _tiny(max_iter=5, reference=reference).fit(X)
        assert np.all(model.score_samples(X_test) >= np.log(model.min_reference_weight * 0.01) + plain - 1e-6)


def test_reference_weights_rest_on_many_rows():
    """The parts' weights among themselves rest on the training rows too, scored as if held out:
    on Gaussian clusters the mixture takes nearly all of it, though 5 held-out rows would not say so."""
    import sklearn_maf._reference as reference

    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(loc, 1.0, size=(200, 3)) for loc in (-6, 0, 6)])
    parts, scores, score_weight = fit_reference(Z, np.ones(len(Z)), "gmm", random_state=0)
    stacked = 1 + reference._STACKED_MIXTURES
    assert [type(part).__name__ for part in parts] == ["GaussianMixtureDensity"] * stacked + ["GaussianKernelDensity"]
    assert scores.shape == (score_weight.size, stacked + 1)
    held = np.concatenate([rng.normal(loc, 1.0, size=(2, 3)) for loc in (-6, 6)])[:5]
    with torch.no_grad():
        classical = np.column_stack([part.log_prob(torch.as_tensor(held)).numpy() for part in parts])
    flow = classical[:, 1] - 5.0  # a poor flow
    weights = flow_and_reference_weights(flow, classical, np.ones(len(held)), scores, score_weight, 1e-3)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[1] >= 1e-3 * (1 - 1e-9)
    assert weights[0] < 0.05 and weights[2:-1].sum() > 0.8 and weights[-1] < 0.2
    # the same as one EM over everything when the flow has no held-out say
    parts, scores, score_weight = fit_reference(Z, np.ones(len(Z)), "gmm", random_state=0, kernel=False)
    assert [type(part).__name__ for part in parts] == ["GaussianMixtureDensity"] * stacked
    assert scores.shape == (score_weight.size, stacked)


def test_kernel_density_kept_only_with_held_out_weight():
    """Without early stopping the kernel density, which holds the training rows, has no say."""
    rng = np.random.RandomState(0)
    X = np.concatenate([rng.normal(-3, 0.2, size=(150, 2)), rng.normal(3, 0.2, size=(150, 2))])
    model = _tiny(early_stopping=False).fit(X)
    assert model.mixture_weights_[3] == 0.0
    assert not any(isinstance(part, GaussianKernelDensity) for part in model.reference_.parts)


def test_reference_none_is_the_flow_alone():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 3))
    model = _tiny(reference=None).fit(X)
    assert model.reference_ is None
    np.testing.assert_array_equal(model.mixture_weights_, [1.0])
    with torch.no_grad():
        flow = model.module_.log_prob(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(model.score_samples(X), flow, rtol=1e-12)


@pytest.mark.parametrize("reference", ["gaussian", "gmm"])
def test_scores_are_the_mixture_of_flow_and_reference(reference):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(400, 3)) ** 3
    model = _tiny(reference=reference, bounds=[[-np.inf, np.inf], [-30, np.inf], [-np.inf, np.inf]]).fit(X)
    weights = model.mixture_weights_
    assert weights.shape == ((2,) if reference == "gaussian" else (4,))
    assert weights.sum() == pytest.approx(1.0)
    x = torch.as_tensor(X[:50])
    with torch.no_grad():
        flow = model.module_.log_prob(x).numpy()
        z, logabsdet = to_fixed(model.module_, x)
        ref = (model.reference_.log_prob(z) + logabsdet).numpy()
    expected = np.logaddexp(np.log(weights[0]) + flow, np.log1p(-weights[0]) + ref)
    np.testing.assert_allclose(model.score_samples(X[:50]), expected, rtol=1e-12)


def test_samples_come_from_both_parts_and_respect_bounds():
    rng = np.random.RandomState(0)
    X = rng.gamma(2.0, size=(500, 2))
    model = _tiny(min_reference_weight=0.5, bounds=[[0, np.inf], [0, np.inf]]).fit(X)
    assert model.mixture_weights_[1] >= 0.5 - 1e-9
    draws = model.sample(4000, random_state=0)
    assert draws.shape == (4000, 2)
    assert np.all(draws > 0)
    np.testing.assert_array_equal(draws[:100], model.sample(100, random_state=0))
    # the draw's mean is the mixture's: a reference-heavy mixture still centres on the data
    np.testing.assert_allclose(draws.mean(axis=0), X.mean(axis=0), rtol=0.15)


def test_conditional_density_mixes_a_reference_too():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(600, 2))
    y = X @ [1.0, -2.0] + 0.3 * rng.normal(size=600)
    model = _tiny(MAFConditionalDensity, min_reference_weight=0.2).fit(X, y)
    assert model.mixture_weights_[1] >= 0.2 - 1e-9
    far = model.score_samples(X[:5], y[:5] + 1e4)
    assert np.all(np.isfinite(far))
    prediction = model.predict(X[:200], n_draws=64)
    # the mean of the mixture: at least 80% of it is the flow's conditional mean
    assert np.corrcoef(prediction, y[:200])[0, 1] > 0.7
    assert model.sample(X[:7], random_state=0).shape == (7,)


def test_the_kernel_density_holds_at_most_its_cap_of_rows(monkeypatch):
    """Its scoring cost per row grows with its rows: past the cap it keeps evenly spaced ones."""
    import sklearn_maf._reference as reference

    monkeypatch.setattr(reference, "_MAX_KERNEL_ROWS", 100)
    rng = np.random.RandomState(0)
    Z = rng.normal(size=(450, 2))
    parts, scores, score_weight = fit_reference(Z, np.ones(450), "gmm", random_state=0)
    assert parts[-1].points.shape == (90, 2)  # every fifth row
    assert np.all(score_weight == 5.0)  # each counts for the rows it stands for
    refitted = reference.refit_reference(parts, np.concatenate([Z, Z[:50]]), np.ones(500), random_state=0)
    assert refitted[-1].points.shape == (100, 2)
    # Scott's rate for 100 rows where there were 90
    assert float(refitted[-1].bandwidth) == pytest.approx(float(parts[-1].bandwidth) * (100 / 90) ** (-1 / 6))


def test_the_kernel_density_holds_every_row_the_parts_are_fitted_to():
    """Kept to 5,000 evenly spaced rows, with its bandwidth chosen on them, it scored 0.04 nats per
    row below all 18,000 on a checkerboard and up to 1.2 on real sets where it carries weight."""
    rng = np.random.RandomState(0)
    Z = rng.uniform(size=(6000, 2))
    parts, scores, score_weight = fit_reference(Z, np.ones(6000), "gmm", random_state=0)
    kernel = parts[-1]
    assert isinstance(kernel, GaussianKernelDensity)
    np.testing.assert_array_equal(kernel.points.numpy(), Z)
    assert np.all(score_weight == 1.0)
    assert float(kernel.bandwidth) == kernel_bandwidth(Z, np.ones(6000))[0]


def test_thinned_rows_leave_out_all_the_weight_they_stand_for(monkeypatch):
    """A kept row of weight 5 stands for five rows elsewhere, not five copies of itself: leaving
    one unit out kept 4/5 of its own kernel in its score and drove the bandwidth to the search's
    lower end (0.0019 on ring-8-2d's 20,000 rows, held-out -46 nats where the BIC mixture scored -3)."""
    import sklearn_maf._reference as reference

    rng = np.random.RandomState(0)
    points = rng.normal(size=(300, 2))
    alone = kernel_bandwidth(points, np.ones(300))[0]
    # uniform weights and the same unit: the same leave-one-out likelihood
    assert kernel_bandwidth(points, np.full(300, 5.0), unit=5.0)[0] == pytest.approx(alone, rel=0.02)
    assert kernel_bandwidth(points, np.full(300, 5.0), unit=1.0)[0] < 0.5 * alone
    monkeypatch.setattr(reference, "_MAX_KERNEL_ROWS", 100)
    parts, _, _ = fit_reference(rng.normal(size=(500, 2)), np.ones(500), "gmm", random_state=0)
    assert parts[-1].points.shape == (100, 2)
    assert float(parts[-1].bandwidth) == pytest.approx(kernel_bandwidth(parts[-1].points.numpy(), np.ones(100))[0], rel=0.02)


def test_leave_one_out_keeps_kernels_far_below_the_rows_own():
    """In many dimensions the other rows' kernels are e^-100 times a row's own: subtracting its own
    from the full sum rounded them to nothing (-inf for every row), and the search then took the
    widest bandwidth it may (InternetAds, 1,308 features: 1,194 nats a row below where it should be)."""
    rng = np.random.RandomState(0)
    Z = rng.normal(size=(200, 400))
    bandwidth, queries, values = kernel_bandwidth(Z, np.ones(200))
    assert np.all(np.isfinite(values))
    scott = 200 ** (-1 / 404)
    assert bandwidth < 0.99 * 3.0 * scott  # not the search's upper end
    # the leave-one-out log-density computed directly at that bandwidth
    distance2 = ((Z[queries, None, :] - Z[None, :, :]) ** 2).sum(axis=-1)
    log_kernels = -distance2 / (2 * bandwidth**2)
    log_kernels[np.arange(queries.size), queries] = -np.inf
    direct = logsumexp(log_kernels, axis=1) - np.log(199) - 200 * np.log(2 * np.pi * bandwidth**2)
    np.testing.assert_allclose(values, direct, rtol=1e-9)

    def mean_leave_one_out(h):  # float64, where the exponents are in the hundreds
        log_k = -distance2 / (2 * h**2)
        log_k[np.arange(queries.size), queries] = -np.inf
        return np.mean(logsumexp(log_k, axis=1) - 200 * np.log(2 * np.pi * h**2))

    # the float32 search found float64's maximum, to its 1%
    assert mean_leave_one_out(bandwidth) >= max(mean_leave_one_out(bandwidth * f) for f in (0.97, 1 / 0.97))


@pytest.mark.parametrize("n_rows", [1, 2, 50, 2000])
def test_the_reference_keeps_a_share_that_few_rows_cannot_take(n_rows):
    """Held-out rows that all favour the flow leave the parts 1 / (2 n + 2), the Krichevsky-Trofimov
    estimate of a probability that n trials never showed; rows that favour the parts leave them EM's weights.
    Row weights count as repetitions."""
    rng = np.random.RandomState(n_rows)
    parts = rng.normal(-3.0, 1.0, size=(n_rows, 2))
    flow = parts.max(axis=1) + 5.0
    for weight in (np.ones(n_rows), np.full(n_rows, 3.0)):
        weights = _stack(np.column_stack([flow, parts]), weight, 1e-4)
        assert 1 - weights[0] == pytest.approx(max(0.5 / (weight.sum() + 1), 1e-4))  # or the broad part's floor
        assert weights.sum() == pytest.approx(1.0) and weights[1] >= 1e-4 * (1 - 1e-9)
    # weights below one do not make the rows count for less than one each: scaled weights, the same share
    for scale in (1e-3, 0.5):
        weights = _stack(np.column_stack([flow, parts]), np.full(n_rows, scale), 1e-4)
        assert 1 - weights[0] == pytest.approx(max(0.5 / (n_rows + 1), 1e-4))
    # the flow has no such floor: where the parts explain every row, it gets what EM gives it
    weights = _stack(np.column_stack([parts.min(axis=1) - 5.0, parts]), np.ones(n_rows), 1e-4)
    assert weights[0] < 0.5 / (n_rows + 1)


def test_few_held_out_rows_do_not_give_the_flow_all_of_the_weight():
    """On 15 rows (2 held out) maximum likelihood gave the flow all of the weight on 5 of 8 seeds,
    and new rows fell up to 8.4 nats (2.1 on average) below the true density; now at most 2.5 (1.0)."""
    gaps, weights = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        X, X_test = rng.standard_normal((15, 5)), rng.standard_normal((2000, 5))
        model = MAFDensity(random_state=seed).fit(X)
        gaps.append(model.score_samples(X_test).mean() - multivariate_normal(np.zeros(5)).logpdf(X_test).mean())
        weights.append(model.mixture_weights_[0])
    assert max(weights) <= 1 - 1 / 6 + 1e-9
    assert np.mean(gaps) > -1.5 and min(gaps) > -4.0


def test_leave_one_out_follows_the_responsibilities_as_em_would():
    """Where components overlap, leaving a row out moves the other rows' responsibilities, and
    EM's parameters with them: one M-step's downdate misses that and was optimistic (it scored
    spurious extra components above the mixture that new rows prefer). With the response
    added, the leave-one-out is that of EM continued from the fit without the row."""
    import sklearn_maf._reference as reference

    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(size=(120, 2)), rng.normal(size=(80, 2)) * 0.7 + [1.5, 0.5]])
    weight = np.ones(len(Z))
    converged = dict(random_state=0, tol=1e-12, max_iter=5000)
    *fitted, _, n_iter = gaussian_mixture(Z, weight, 2, return_n_iter=True, **converged)
    mixture = GaussianMixtureDensity(*_torch_mixture_from((*fitted, None)))
    rows = np.arange(0, len(Z), 13)
    one_step = reference._leave_one_out(mixture, torch.as_tensor(Z[rows]), np.ones(rows.size), len(Z), broad=False)
    response = reference._responsibility_response(mixture, n_iter, Z, weight, Z[rows], np.ones(rows.size))
    exact = []
    for i in rows:
        rest = weight.copy()
        rest[i] = 0.0
        refitted = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, rest, 2, start=mixture, **converged)))
        with torch.no_grad():
            exact.append(refitted.log_prob(torch.as_tensor(Z[i : i + 1])).item())
    exact = np.array(exact)
    assert np.all(response <= 0)  # the other rows only ever follow the row's absence
    # a weight counts as repetitions: a row of weight 2 is the row twice
    def response_on(rows_fitted, row_weight):
        return reference._responsibility_response(mixture, n_iter, rows_fitted, row_weight, Z[rows], np.ones(rows.size))

    doubled = response_on(Z, np.r_[2.0, weight[1:]])
    np.testing.assert_allclose(doubled, response_on(np.r_[Z[:1], Z], np.r_[weight[:1], weight]), rtol=1e-10)
    missed = np.abs(one_step - exact)
    assert missed.mean() > 0.003  # overlapping components: the one-step alone is off
    assert np.abs(one_step + response - exact).mean() < 0.2 * missed.mean()


def test_the_response_is_nothing_for_one_component_and_skipped_beyond_its_cost():
    import sklearn_maf._reference as reference

    rng = np.random.RandomState(0)
    Z = rng.normal(size=(50, 3))
    single = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, np.ones(50), 1, random_state=0)))
    assert np.all(reference._responsibility_response(single, 1, Z, np.ones(50), Z[:5], np.ones(5)) == 0)
    Z = rng.normal(size=(400, 40))
    pair = GaussianMixtureDensity(*_torch_mixture_from(gaussian_mixture(Z, np.ones(400), 2, random_state=0)))
    assert reference._responsibility_response(pair, 5, Z, np.ones(400), Z[:5], np.ones(5)) is None  # P = 1721


def test_stacking_weights_reach_the_maximum_of_the_composite_likelihood():
    """EM with SQUAREM's extrapolation ends where the likelihood is highest, also where some
    weights decay towards zero (EM alone took thousands of steps there)."""
    from scipy.optimize import minimize
    from scipy.special import softmax

    rng = np.random.default_rng(0)
    for _ in range(5):
        common = rng.normal(size=(400, 1)) * 2
        columns = common + rng.normal(size=(400, 5)) * [0.3, 0.5, 2.0, 1.0, 0.05]
        flow, classical, rows = columns[:150, 0], columns[:150, 1:], columns[150:, 1:]

        def composite(w):
            v = w[1:] / w[1:].sum()
            return logsumexp(np.c_[flow, classical] + np.log(w), axis=1).mean() + logsumexp(
                rows + np.log(v), axis=1
            ).mean()

        w = flow_and_reference_weights(flow, classical, np.ones(150), rows, np.ones(250), floor=0.0)
        best = minimize(lambda a: -composite(softmax(a)), np.zeros(5), method="BFGS", options={"gtol": 1e-10})
        assert composite(w) >= -best.fun - 1e-7


def test_parts_of_no_weight_are_not_refitted():
    """The stack leaves them out, so refitting them (most of the refit's cost) changes nothing."""
    import sklearn_maf._reference as reference

    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 4])
    parts, _, _ = fit_reference(Z, np.ones(400), "gmm", random_state=0)
    weights = np.r_[0.1, 0.9, np.zeros(len(parts) - 2)]  # the broad part and the BIC-best mixture
    Z_all = np.concatenate([Z, rng.normal(size=(100, 2))])
    lazy = reference.refit_reference(parts, Z_all, np.ones(500), 0, weights)
    full = reference.refit_reference(parts, Z_all, np.ones(500), 0)
    assert all(lazy[i] is parts[i] for i in range(2, len(parts)))
    assert lazy[1] is not parts[1]
    with torch.no_grad():
        scores = [reference_mixture(*merged_mixtures(refitted, weights), like=torch.zeros(1, dtype=torch.float64))
                  .log_prob(torch.as_tensor(Z_all)).numpy() for refitted in (lazy, full)]  # fmt: skip
    np.testing.assert_array_equal(*scores)


def test_the_flow_is_weighed_on_its_scores_at_the_epochs_chosen_without_each_row(monkeypatch):
    """The stack's flow column: the fitted flow's held-out scores plus its training's left-out correction."""
    import sklearn_maf._base as base
    import sklearn_maf._training as training

    seen, histories = {}, []
    weights, train_flow = base.flow_and_reference_weights, base.train_flow

    def spy_weights(flow, *args, **kwargs):
        seen["flow"] = flow
        return weights(flow, *args, **kwargs)

    def spy_train(*args, **kwargs):
        histories.append(train_flow(*args, **kwargs))
        return histories[-1]

    monkeypatch.setattr(base, "flow_and_reference_weights", spy_weights)
    monkeypatch.setattr(base, "train_flow", spy_train)
    X = np.random.default_rng(0).normal(size=(120, 2))
    model = _tiny(max_iter=15, learning_rate_init=0.05).fit(X)
    rng = np.random.RandomState(model.random_state)
    rng.randint(np.iinfo(np.int32).max)
    _, validation = model._split(len(X), rng)
    correction = histories[-1].validation_correction
    assert correction.shape == (validation.size,) and (correction <= 0).all() and (correction < 0).any()
    np.testing.assert_allclose(seen["flow"], model.module_.log_prob(torch.as_tensor(X[validation])).detach().numpy() + correction)
    assert training.TrainingHistory().validation_correction is None


def test_the_final_refit_takes_every_row_its_memory_bound_allows(monkeypatch):
    """Past _MAX_ROWS the mixtures are refitted on all rows up to refit_rows (every second of 33,000
    rows of an 8-D mixture lost up to 0.003 nats/row to GaussianMixture on all), never on fewer than _MAX_ROWS."""
    import sklearn_maf._reference as reference

    monkeypatch.setattr(reference, "_MAX_ROWS", 100)
    rng = np.random.RandomState(0)
    Z = np.concatenate([rng.normal(size=(225, 2)) - 3, rng.normal(size=(225, 2)) + 3])
    weight = np.ones(450)
    parts, _, _ = fit_reference(Z[::5], weight[::5], "gmm", random_state=0, kernel=False)
    mixture = next(i for i, p in enumerate(parts) if i > 0 and p.means.shape[0] == 2)
    monkeypatch.setattr(reference, "_REFIT_BYTES", 24 * 2 * 2 * 450)
    assert reference.refit_rows(2, 2) == 450 and reference.refit_rows(2, 3) == 300
    refitted = reference.refit_reference(parts[: mixture + 1], Z, weight, random_state=0)
    expected = reference.gaussian_mixture(Z, weight, 2, 0, start=parts[mixture])
    torch.testing.assert_close(refitted[mixture].means, torch.as_tensor(expected[1]))
    monkeypatch.setattr(reference, "_REFIT_BYTES", 1)
    assert reference.refit_rows(2, 2) == 100
