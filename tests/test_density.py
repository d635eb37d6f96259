"""Behaviour of MAFDensity that users rely on, beyond scikit-learn's common checks."""

import pickle
import re
import warnings

import joblib
import numpy as np
import pytest
import torch
from scipy import sparse, stats
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_maf import MAFConditionalDensity, MAFDensity, MAFOutlierDetector
from sklearn_maf._base import _row_groups
from sklearn_maf._nn import BatchNorm, EllipticalT, StandardNormal, Whiten


def _small(**params):
    defaults = dict(n_layers=2, hidden_units=16, max_iter=20, random_state=0)
    return MAFDensity(**{**defaults, **params})


def _mixture(n, rng):
    """A two-component, correlated 2-D Gaussian mixture."""
    centres = np.array([[-2.0, 0.0], [2.0, 1.0]])
    component = rng.randint(2, size=n)
    noise = rng.normal(size=(n, 2)) @ np.array([[0.6, 0.0], [0.3, 0.5]])
    return centres[component] + noise


@pytest.fixture(scope="module")
def fitted_mixture():
    """A model of the 2-D mixture, shared by the tests that only read it."""
    rng = np.random.RandomState(0)
    X = _mixture(3000, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MAFDensity(n_layers=4, hidden_units=32, max_iter=60, random_state=0).fit(X)
    return model, _mixture(1000, rng)


def test_density_integrates_to_one(fitted_mixture):
    """The density in the units of X integrates to 1 over a grid that holds the data."""
    model, _ = fitted_mixture
    grid = np.linspace(-8.0, 8.0, 401)
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(model.score_samples(np.c_[xx.ravel(), yy.ravel()]))
    cell = (grid[1] - grid[0]) ** 2
    assert density.sum() * cell == pytest.approx(1.0, abs=0.01)


def _mmd_p_value(A, B, n_permutations, rng):
    """Permutation p-value of the Gaussian-kernel MMD between two samples."""
    Z = np.vstack([A, B])
    squared = ((Z[:, None, :] - Z[None, :, :]) ** 2).sum(-1)
    K = np.exp(-squared / np.median(squared[squared > 0]))
    n = len(A)

    def mmd(index):
        a, b = index[:n], index[n:]
        return K[np.ix_(a, a)].mean() + K[np.ix_(b, b)].mean() - 2 * K[np.ix_(a, b)].mean()

    observed = mmd(np.arange(len(Z)))
    null = [mmd(rng.permutation(len(Z))) for _ in range(n_permutations)]
    return (1 + np.sum(np.array(null) >= observed)) / (1 + n_permutations)


def test_samples_follow_the_model(fitted_mixture):
    """A two-sample test between sample() and held-out data does not reject."""
    model, X_test = fitted_mixture
    rng = np.random.RandomState(1)
    samples = model.sample(400, random_state=0)
    assert _mmd_p_value(samples, X_test[:400], 200, rng) > 0.01
    # The same test has power: samples shifted by half a standard deviation are rejected.
    assert _mmd_p_value(samples + [0.5, 0.0], X_test[:400], 200, rng) < 0.01


def test_transform_is_standard_normal_and_inverts(fitted_mixture):
    model, X_test = fitted_mixture
    U = model.transform(X_test)
    assert np.all(np.abs(U.mean(axis=0)) < 0.15)
    assert np.all(np.abs(U.std(axis=0) - 1) < 0.15)
    np.testing.assert_allclose(model.inverse_transform(U), X_test, atol=1e-8)


@pytest.mark.parametrize("c", [1e-3, 1e4])
def test_scaling_x_shifts_the_score_by_the_log_jacobian(c, rng):
    """Scaling X by c shifts the mean log-density by exactly -D log c."""
    X = _mixture(400, rng)
    base = _small(max_iter=5).fit(X)
    scaled = _small(max_iter=5).fit(c * X)
    shift = scaled.score_samples(c * X).mean() - base.score_samples(X).mean()
    assert shift == pytest.approx(-X.shape[1] * np.log(c), abs=1e-5)


def test_raw_features_on_wildly_different_scales(rng):
    """Features on scales 1e-3 .. 1e4 need no preprocessing by the user."""
    X = _mixture(600, rng)
    scales = np.array([1e-3, 1e4])
    raw = _small().fit(X * scales)
    reference = _small().fit(X)
    np.testing.assert_allclose(
        raw.score_samples(X * scales),
        reference.score_samples(X) - np.log(scales).sum(),
        atol=1e-3,
    )


def test_score_is_the_sum_of_score_samples(fitted_mixture):
    model, X_test = fitted_mixture
    assert model.score(X_test) == pytest.approx(model.score_samples(X_test).sum())


def test_same_random_state_gives_bit_identical_results(rng):
    X = _mixture(300, rng)
    first, second = _small(max_iter=3).fit(X), _small(max_iter=3).fit(X)
    np.testing.assert_array_equal(first.score_samples(X), second.score_samples(X))
    np.testing.assert_array_equal(first.sample(50, random_state=3), second.sample(50, random_state=3))
    assert not np.array_equal(first.sample(5, random_state=3), first.sample(5, random_state=4))


def test_sample_without_random_state_draws_fresh_rows(fitted_mixture):
    """Unlike GaussianMixture.sample, repeated calls do not repeat the same rows."""
    model, _ = fitted_mixture
    assert not np.array_equal(model.sample(5), model.sample(5))


def test_sampling_is_independent_of_chunking(fitted_mixture, monkeypatch):
    model, _ = fitted_mixture
    whole = model.sample(3000, random_state=0)
    monkeypatch.setattr(type(model), "_chunk_size", lambda self: 1000)
    np.testing.assert_array_equal(model.sample(3000, random_state=0), whole)


def test_scoring_is_independent_of_chunking(fitted_mixture, monkeypatch):
    model, X_test = fitted_mixture
    whole = model.score_samples(X_test)
    monkeypatch.setattr(type(model), "_chunk_size", lambda self: 7)
    np.testing.assert_allclose(model.score_samples(X_test), whole, rtol=0, atol=1e-12)


def test_pipeline_with_scaler(rng):
    X = _mixture(300, rng)
    pipeline = make_pipeline(StandardScaler(), _small(max_iter=3)).fit(X)
    scores = pipeline.score_samples(X)
    assert scores.shape == (300,) and np.all(np.isfinite(scores))


def test_grid_search_selects_by_held_out_likelihood(rng):
    X = _mixture(240, rng)
    grid = {"n_layers": [1, 3], "hidden_units": [16, 64]}
    cv = KFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(_small(max_iter=4), grid, cv=cv).fit(X)
    assert search.best_params_ == search.cv_results_["params"][
        int(np.argmax(search.cv_results_["mean_test_score"]))
    ]
    # The score GridSearchCV maximises is the held-out total log-likelihood.
    params = search.cv_results_["params"][0]
    manual = [
        clone(search.estimator).set_params(**params).fit(X[train]).score_samples(X[test]).sum()
        for train, test in cv.split(X)
    ]
    np.testing.assert_allclose(search.cv_results_["mean_test_score"][0], np.mean(manual))


@pytest.mark.parametrize(
    "round_trip",
    [
        clone,
        lambda model: pickle.loads(pickle.dumps(model)),
        lambda model: _joblib_round_trip(model),
    ],
    ids=["clone", "pickle", "joblib"],
)
def test_round_trips_give_identical_scores(round_trip, rng, tmp_path):
    X = _mixture(200, rng)
    model = _small(max_iter=3).fit(X)
    copy = round_trip(model)
    if not hasattr(copy, "module_"):  # clone gives an unfitted copy: fit it the same way
        copy.fit(X)
    np.testing.assert_array_equal(copy.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(copy.sample(10, random_state=0), model.sample(10, random_state=0))


def _joblib_round_trip(model):
    path = joblib.os.path.join(joblib.os.environ.get("TMPDIR", "/tmp"), f"maf-{id(model)}.joblib")
    joblib.dump(model, path)
    try:
        return joblib.load(path)
    finally:
        joblib.os.remove(path)


@pytest.mark.parametrize(
    "X, error, message",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 1.0]]), ValueError, "Input X contains NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0], [3.0, 1.0]]), ValueError, "Input X contains infinity"),
        (np.array([["a", "b"], ["c", "d"], ["e", "f"]], dtype=object), ValueError, "could not convert string to float"),
        (sparse.csr_matrix(np.eye(3)), TypeError, "Sparse data was passed"),
        (np.empty((0, 2)), ValueError, "0 sample"),
        (np.array([[1.0, 2.0]]), ValueError, "1 sample"),
        (np.array([1.0, 2.0, 3.0]), ValueError, "Expected 2D array"),
    ],
    ids=["nan", "inf", "strings", "sparse", "empty", "one-row", "1d"],
)
def test_bad_training_input_is_rejected(X, error, message):
    with pytest.raises(error, match=message):
        _small().fit(X)


def test_bad_scoring_input_is_rejected(fitted_mixture):
    model, _ = fitted_mixture
    for method in (model.score_samples, model.score, model.transform, model.inverse_transform):
        with pytest.raises(ValueError, match="X has 3 features, but MAFDensity is expecting 2"):
            method(np.ones((4, 3)))
        with pytest.raises(ValueError, match="Input X contains NaN"):
            method(np.array([[0.0, np.nan]]))


@pytest.mark.parametrize(
    "n_samples, error, message",
    [
        (0, ValueError, "n_samples must be a positive int, got 0"),
        (-3, ValueError, "n_samples must be a positive int, got -3"),
        (2.5, TypeError, "n_samples must be a positive int, got 2.5"),
    ],
)
def test_bad_n_samples_is_rejected(fitted_mixture, n_samples, error, message):
    model, _ = fitted_mixture
    with pytest.raises(error, match=message):
        model.sample(n_samples)


def test_unfitted_model_raises():
    for method in ("score_samples", "transform", "inverse_transform"):
        with pytest.raises(NotFittedError):
            getattr(MAFDensity(), method)(np.ones((2, 2)))
    with pytest.raises(NotFittedError):
        MAFDensity().sample(2)


def test_constant_feature_raises_a_clear_error(rng):
    X = np.c_[rng.normal(size=50), np.full(50, 3.0), rng.normal(size=50)]
    with pytest.raises(ValueError, match=re.escape("Feature(s) [1] are constant")):
        _small().fit(X)


def test_extreme_finite_input_never_gives_nan(fitted_mixture):
    model, _ = fitted_mixture
    extreme = np.array([[1e300, -1e300], [1e-300, 0.0], [-1e150, 1e150]])
    scores = model.score_samples(extreme)
    assert not np.any(np.isnan(scores))
    assert np.isfinite(scores[1])


def test_one_feature_is_a_gaussian(rng):
    """With one feature every MAF layer is affine with constants: the fit is a Gaussian."""
    X = rng.standard_t(df=5, size=(500, 1)) * 3 + 1
    model = _small(
        base="gaussian", max_iter=200, n_iter_no_change=20, learning_rate_init=1e-2, tail_cut=None, reference=None
    ).fit(X)
    grid = np.linspace(-10, 10, 7)[:, None]
    # log-density is exactly quadratic in x: its second differences are constant
    second = np.diff(model.score_samples(grid), 2)
    np.testing.assert_allclose(second, second[0], rtol=1e-8)
    maximum_likelihood = stats.norm(X.mean(), X.std())
    assert model.score_samples(X).mean() == pytest.approx(maximum_likelihood.logpdf(X).mean(), abs=0.05)


def test_one_heavy_tailed_feature_is_a_student_t(rng):
    """base="auto" takes the fitted t for one heavy-tailed feature: every layer is affine,
    so the fit is a location-scale Student t with the learned degrees of freedom."""
    X = rng.standard_t(df=3, size=(2000, 1)) * 3 + 1
    model = _small(max_iter=50, reference=None).fit(X)
    assert model.base_ == "fitted-t"
    grid = np.linspace(-30, 30, 7)[:, None]
    with torch.no_grad():
        u = model.module_(torch.as_tensor(grid))[0].numpy()[:, 0]
    np.testing.assert_allclose(np.diff(u, 2), 0, atol=1e-9)  # u = a x + b
    slope = (u[-1] - u[0]) / (grid[-1, 0] - grid[0, 0])
    df = model.module_.base.df.item()
    expected = stats.t(df).logpdf(u) + np.log(abs(slope))
    np.testing.assert_allclose(model.score_samples(grid), expected, rtol=1e-10)
    assert 2.0 < df < 5.0


def test_too_few_rows_for_early_stopping(rng):
    with pytest.raises(ValueError, match="n_samples=2 is too few for early stopping"):
        _small().fit(rng.normal(size=(2, 2)))
    _small(early_stopping=False).fit(rng.normal(size=(2, 2)))


@pytest.mark.parametrize("batch_size", [1000, 16])
def test_zero_weights_remove_rows(rng, batch_size):
    """Rows of zero weight have no influence: not on training, scaling or batch norm."""
    X = _mixture(100, rng)
    outliers = rng.normal(scale=50.0, size=(30, 2))
    params = dict(early_stopping=False, batch_size=batch_size, precision="float64", max_iter=5)
    with_zeros = _small(**params).fit(
        np.vstack([X, outliers]), sample_weight=np.r_[np.ones(100), np.zeros(30)]
    )
    # Mini-batches are drawn among the rows of positive weight, so they are the
    # batches of the data without those rows; only round-off may differ.
    np.testing.assert_allclose(with_zeros.score_samples(X), _small(**params).fit(X).score_samples(X), atol=1e-9)


def test_few_positive_weights_among_many_rows_train_a_model(rng):
    """Regression: mini-batches holding only zero-weight rows made the loss NaN in epoch 1,
    and fit returned the untrained flow with a warning to lower the learning rate."""
    X = _mixture(2000, rng)
    weight = np.zeros(2000)
    weight[rng.choice(2000, 40, replace=False)] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = _small(batch_size=16, max_iter=200, n_iter_no_change=5).fit(X, sample_weight=weight)
    assert model.n_iter_ > 5 and all(np.isfinite(model.loss_curve_))
    assert model.loss_curve_[-1] < model.loss_curve_[0]


def test_a_split_without_weight_is_rejected(rng):
    """One weighted row cannot feed both the training and the validation split."""
    weight = np.zeros(10)
    weight[3] = 1.0
    with pytest.raises(ValueError, match=r"sample weights of the (training|validation) rows sum to zero"):
        _small().fit(rng.normal(size=(10, 2)), sample_weight=weight)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_repeated_rows_do_not_reward_memorising_them():
    """Regression: rows entered four times each, copies split between training and validation.

    Every validation row then had copies in training: early stopping, the
    tails and the reference's weights all rewarded memorising the rows, and
    new rows scored 6 to 7 nats lower than under the fit with each row once
    at weight 4 (-13.0 against -5.8). The copies of a row now go to one side.
    """
    for seed in range(2):
        rng = np.random.default_rng(seed)
        rows = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 3))
        train, new = rows[:150], rows[150:]
        params = dict(n_layers=2, hidden_units=32, max_iter=60, random_state=0, precision="float64")
        repeated = MAFDensity(**params).fit(np.repeat(train, 4, axis=0))
        weighted = MAFDensity(**params).fit(train, sample_weight=np.full(150, 4.0))
        assert repeated.score_samples(new).mean() > weighted.score_samples(new).mean() - 1.0


def test_copies_of_a_row_go_to_one_side_of_the_split(rng):
    X = rng.normal(size=(60, 2))
    X = np.vstack([X, X[:20], X[:5]])  # 20 rows twice, 5 of them three times
    model = _small(validation_fraction=0.2)
    train, validation = model._split(X.shape[0], np.random.RandomState(0), groups=_row_groups(X))
    assert not {row.tobytes() for row in X[train]} & {row.tobytes() for row in X[validation]}
    assert np.union1d(train, validation).size == X.shape[0]
    assert 0 < validation.size <= np.ceil(0.2 * X.shape[0])
    # distinct rows: the permutation's split, as without groups
    distinct = rng.normal(size=(50, 2))
    split = model._split(50, np.random.RandomState(1), groups=_row_groups(distinct))
    for got, expected in zip(split, model._split(50, np.random.RandomState(1))):
        np.testing.assert_array_equal(got, expected)
    # a group larger than the validation share stays in training
    lumped = np.vstack([np.zeros((30, 2)), rng.normal(size=(20, 2))])
    train, validation = model._split(50, np.random.RandomState(2), groups=_row_groups(lumped))
    assert np.all(np.isin(np.arange(30), train)) and validation.size > 0


def test_which_rows_count_as_copies(rng):
    X = np.array([[0.0, 1.0], [-0.0, 1.0], [0.0, 2.0]])
    groups = _row_groups(X)
    assert groups[0] == groups[1] != groups[2]
    integers = np.repeat(rng.randint(0, 3, size=(10, 2)).astype(float), 3, axis=0)
    # integer rows declared discrete repeat by nature; undeclared, they are copies
    assert MAFDensity(discrete_features="auto")._duplicate_groups(integers, None, False) is None
    assert MAFDensity()._duplicate_groups(integers, None, False) is not None
    # the same features under different contexts are different rows
    conditional = MAFConditionalDensity()
    same = np.ones((4, 2))
    groups = conditional._duplicate_groups(same, np.arange(4.0)[:, None], False)
    assert np.unique(groups).size == 4
    # the detector's dequantization treats repeats as point masses; without it they are copies
    assert MAFOutlierDetector()._duplicate_groups(integers, None, False) is None
    assert MAFOutlierDetector(dequantize=False)._duplicate_groups(integers, None, False) is not None


def test_training_history_and_early_stopping(rng):
    X = _mixture(400, rng)
    model = _small(max_iter=500, n_iter_no_change=3).fit(X)
    assert model.n_iter_ < 500
    assert len(model.loss_curve_) == len(model.validation_scores_) == model.n_iter_
    assert model.best_validation_score_ == max(model.validation_scores_)
    no_validation = _small(max_iter=3, early_stopping=False)
    with pytest.warns(ConvergenceWarning, match=r"maximum iterations \(3\) reached"):
        no_validation.fit(X)
    assert no_validation.validation_scores_ is None and no_validation.best_validation_score_ is None


def test_verbose_prints_each_epoch(rng, capsys):
    _small(max_iter=3, verbose=True).fit(_mixture(100, rng))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("Epoch 1: loss")
    assert "validation log-likelihood" in lines[0]


def test_non_finite_loss_leaves_a_working_model(rng):
    X = _mixture(200, rng)
    model = _small(learning_rate_init=1e6, max_iter=20, alpha=0.0)
    with pytest.warns(ConvergenceWarning, match="training loss became non-finite"):
        model.fit(X)
    assert np.all(np.isfinite(model.score_samples(X)))
    assert np.all(np.isfinite(model.sample(10, random_state=0)))


def test_warm_start_continues_training(rng):
    X = _mixture(300, rng)
    model = _small(max_iter=3, warm_start=True, early_stopping=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
        loc = model.module_.transforms[0].loc.clone()
        first_curve = list(model.loss_curve_)
        model.fit(X + 10.0)
    assert model.n_iter_ == 6 and model.loss_curve_[:3] == first_curve
    # the standardisation is fixed at the first fit
    torch.testing.assert_close(model.module_.transforms[0].loc, loc)


def test_float32_and_float64_training_agree_roughly(rng):
    X = _mixture(500, rng)
    single = _small(precision="float32").fit(X).score_samples(X)
    double = _small(precision="float64").fit(X).score_samples(X)
    assert single.dtype == double.dtype == np.float64
    assert np.abs(single.mean() - double.mean()) < 0.1


def test_unavailable_cuda_is_a_clear_error(rng, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' was requested but CUDA is not available"):
        _small(device="cuda").fit(_mixture(50, rng))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_cpu(rng):
    X = _mixture(300, rng)
    cpu = _small(precision="float64", max_iter=3).fit(X)
    gpu = _small(precision="float64", max_iter=3, device="cuda").fit(X)
    np.testing.assert_allclose(gpu.score_samples(X), cpu.score_samples(X), atol=1e-6)


def test_model_fitted_on_cuda_unpickles_on_a_cpu_only_machine(rng, monkeypatch):
    """A GPU model loads onto the CPU with a warning where CUDA is absent (simulated)."""
    X = _mixture(100, rng)
    model = _small(max_iter=2).fit(X)
    model.device = "cuda"  # as if fitted on a GPU: the pickle always holds CPU tensors
    payload = pickle.dumps(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="CUDA is not available here: the model was loaded onto the CPU"):
        loaded = pickle.loads(payload)
    assert loaded.device == "cpu"
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_model_pickles_with_cpu_tensors_and_reloads_on_cuda(rng):
    X = _mixture(100, rng)
    model = _small(max_iter=2, device="cuda").fit(X)
    payload = pickle.dumps(model)
    assert next(model.module_.parameters()).device.type == "cuda"  # pickling left it there
    loaded = pickle.loads(payload)
    assert next(loaded.module_.parameters()).device.type == "cuda"
    np.testing.assert_array_equal(loaded.score_samples(X), model.score_samples(X))


def test_partial_fit_over_chunks_comes_close_to_a_full_fit(rng):
    """Many passes of partial_fit over chunks reach a full fit's held-out likelihood."""
    X, X_test = _mixture(3000, rng), _mixture(1000, rng)
    params = dict(n_layers=3, hidden_units=32, random_state=0, reference=None)  # the flows alone
    full = MAFDensity(max_iter=30, early_stopping=False, **params).fit(X)
    streamed = MAFDensity(**params)
    for _ in range(30):
        for chunk in np.array_split(X, 6):
            streamed.partial_fit(chunk)
    assert streamed.n_iter_ == 180
    gap = full.score_samples(X_test).mean() - streamed.score_samples(X_test).mean()
    assert gap < 0.05


def test_partial_fit_keeps_the_first_standardisation_and_checks_features(rng):
    X = _mixture(200, rng)
    model = _small().partial_fit(X[:100])
    loc = model.module_.transforms[0].loc.clone()
    model.partial_fit(X[100:] + 100.0)
    torch.testing.assert_close(model.module_.transforms[0].loc, loc)
    with pytest.raises(ValueError, match="X has 3 features, but MAFDensity is expecting 2"):
        model.partial_fit(np.ones((5, 3)))


def test_partial_fit_is_reproducible_and_pickling_leaves_the_stream_alone(rng):
    X = _mixture(200, rng)
    first, second = _small(), _small()
    for chunk in np.array_split(X, 4):
        first.partial_fit(chunk)
        second.partial_fit(chunk)
    np.testing.assert_array_equal(first.score_samples(X), second.score_samples(X))
    loaded = pickle.loads(pickle.dumps(first))
    np.testing.assert_array_equal(loaded.score_samples(X), first.score_samples(X))
    loaded.partial_fit(X)  # continues (tests/test_streaming.py: exactly)
    assert loaded.n_iter_ == first.n_iter_ + 1
    # Regression: pickling dropped the optimizer state of the model it pickled,
    # so that model's next partial_fit restarted Adam.
    first.partial_fit(X)
    second.partial_fit(X)
    np.testing.assert_array_equal(first.score_samples(X), second.score_samples(X))


def test_batch_of_one_row_is_rejected():
    """Batch norm must never train on the statistics of a single row."""
    with pytest.raises(ValueError, match="'batch_size' parameter of MAFDensity must be an int in the range \\[2, inf\\)"):
        _small(batch_size=1).fit(np.random.RandomState(0).normal(size=(20, 2)))


def test_bounded_features_keep_a_true_density(rng):
    """Logit / log layers: mass only inside the bounds, integrating to one there."""
    X = np.c_[rng.beta(2, 5, size=2000), rng.exponential(2.0, size=2000) + 1.0]
    bounds = [[0.0, 1.0], [1.0, np.inf]]
    model = _small(bounds=bounds, max_iter=60).fit(X)
    samples = model.sample(2000, random_state=0)
    assert np.all((samples[:, 0] > 0) & (samples[:, 0] < 1) & (samples[:, 1] > 1))
    assert model.score_samples(np.array([[1.5, 2.0], [0.5, 0.5]])).tolist() == [-np.inf, -np.inf]
    # integrates to one over the support: midpoint rule on (0, 1) x (1, 1 + 40)
    a = (np.arange(400) + 0.5) / 400
    b = 1 + (np.arange(2000) + 0.5) * 0.02
    grid = np.array(np.meshgrid(a, b)).reshape(2, -1).T
    mass = np.exp(model.score_samples(grid)).sum() * (1 / 400) * 0.02
    assert mass == pytest.approx(1.0, abs=0.02)
    # and beats the unbounded model on held-out rows near the edges
    X_test = np.c_[rng.beta(2, 5, size=1000), rng.exponential(2.0, size=1000) + 1.0]
    unbounded = _small(max_iter=60).fit(X)
    assert model.score_samples(X_test).mean() > unbounded.score_samples(X_test).mean()
    np.testing.assert_allclose(model.inverse_transform(model.transform(X_test)), X_test, rtol=1e-9)


@pytest.mark.parametrize(
    "bounds, X, message",
    [
        ([[0.0, 1.0]], np.c_[np.linspace(0.1, 0.9, 10), np.arange(10.0)], r"bounds must have shape \(n_features, 2\) = \(2, 2\)"),
        ([[1.0, 0.0], [-np.inf, np.inf]], np.c_[np.linspace(0.1, 0.9, 10), np.arange(10.0)], r"features \[0\] do not"),
        ([[0.0, 1.0], [-np.inf, np.inf]], np.c_[np.linspace(0.0, 0.9, 10), np.arange(10.0)], r"1 training rows lie on or outside .* features \[0\]"),
    ],
)
def test_bad_bounds_are_rejected(bounds, X, message):
    with pytest.raises(ValueError, match=message):
        _small(bounds=bounds).fit(X)


def test_discrete_features_give_probabilities_that_sum_to_one(rng):
    """Dequantised counts: P(k) over the integers sums to 1 and matches the true pmf."""
    counts = rng.poisson(4.0, size=3000)
    X = np.c_[counts, counts + rng.normal(size=3000)]
    model = _small(discrete_features="auto", max_iter=60, hidden_units=32).fit(X)
    np.testing.assert_array_equal(model.discrete_features_, [True, False])
    samples = model.sample(500, random_state=0)
    np.testing.assert_array_equal(samples[:, 0], np.floor(samples[:, 0]))
    # sum over k of the integral over the continuous feature of p(k, x)
    k = np.arange(0, 25)
    x = np.linspace(-10, 35, 901)
    grid = np.array(np.meshgrid(k, x, indexing="ij")).reshape(2, -1).T
    mass = np.exp(model.score_samples(grid)).sum() * (x[1] - x[0])
    assert mass == pytest.approx(1.0, abs=0.02)
    # the marginal of the counts is close to the true Poisson pmf (in nats per row)
    marginal = np.log(np.exp(model.score_samples(grid)).reshape(25, -1).sum(1) * (x[1] - x[0]))
    truth = stats.poisson(4.0).logpmf(counts).mean()
    assert truth - marginal[counts].mean() < 0.05


def test_discrete_scores_are_batch_independent(rng):
    X = np.c_[rng.poisson(3.0, size=300), rng.normal(size=300)]
    model = _small(discrete_features=[0], max_iter=3).fit(X)
    whole = model.score_samples(X)
    np.testing.assert_allclose(np.concatenate([model.score_samples(X[i : i + 7]) for i in range(0, 300, 7)]), whole, atol=1e-10)
    np.testing.assert_array_equal(model.inverse_transform(model.transform(X))[:, 0], X[:, 0])


@pytest.mark.parametrize(
    "discrete_features, message",
    [
        ([1], r"Features \[1\] are declared discrete but hold non-integer values"),
        ([5], r"discrete_features indices must be in \[0, 2\)"),
        (np.array([True]), r"A boolean discrete_features must have shape \(2,\)"),
    ],
)
def test_bad_discrete_features_are_rejected(rng, discrete_features, message):
    X = np.c_[rng.poisson(3.0, size=50), rng.normal(size=50)]
    with pytest.raises(ValueError, match=message):
        _small(discrete_features=discrete_features).fit(X)


def test_tail_cut_bounds_the_cost_of_rows_far_outside_the_training_range(rng):
    """Guards issue #2: a Gaussian-base flow scored a heavy-tailed test row beyond the
    training range thousands of nats below its true log-density; with the power-law
    tails beyond the cut the same fitted flow scores it tens of nats low, and rows whose
    base point is inside the cut keep their scores."""
    X = rng.standard_t(df=2, size=(1000, 2))
    # no validation score: identical training; the flows alone
    params = dict(early_stopping=False, max_iter=10, reference=None)
    plain = _small(base="gaussian", tail_cut=None, **params).fit(X)
    tailed = _small(base="gaussian", tail_cut=2.0, **params).fit(X)
    assert plain.tail_cut_ is None and tailed.tail_cut_ == tailed.module_.tail_cut == 2.0
    np.testing.assert_array_equal(plain.loss_curve_, tailed.loss_curve_)
    far = np.array([[1e3, -1e3], [5e3, 0.0]])
    assert np.all(tailed.score_samples(far) > plain.score_samples(far) + 100)
    assert np.all(tailed.score_samples(far) > -100)
    inside = np.all(np.abs(plain.transform(X)) <= 2.0, axis=1)
    np.testing.assert_allclose(tailed.score_samples(X[inside]), plain.score_samples(X[inside]), rtol=1e-12)


def test_auto_tail_cut_gives_heavy_tailed_data_tails_and_other_bases_none(rng):
    """"auto" picks a cut where the validation rows have heavy tails; only the Gaussian base has one."""
    X = rng.standard_t(df=1.5, size=(2000, 2))
    model = _small(base="gaussian").fit(X)
    assert model.tail_cut_ is not None  # heavy tails: some cut beats the plain normal
    assert _small(base="student-t").fit(X).tail_cut_ is None


def test_auto_base_takes_a_t_for_heavy_tails_the_fitted_t_where_they_are_elliptical(rng):
    """base="auto" decides by a multivariate t fitted by ECME, and by each feature's own:
    the fitted t for a multivariate t, the elliptical t where every feature is heavy-tailed
    but the rows are not jointly a t, the Gaussian base where some feature is light-tailed."""
    scatter = np.array([[1.0, 0.6, 0.2], [0.6, 1.0, 0.5], [0.2, 0.5, 1.0]])
    elliptical = stats.multivariate_t(np.zeros(3), scatter, df=3.0).rvs(3000, random_state=rng)
    # every feature a t with df 3, jointly not a t: a Gaussian copula
    copula = stats.norm.cdf(rng.multivariate_normal(np.zeros(3), scatter, size=3000))
    t_marginals = stats.t(3.0).ppf(copula)
    light = _mixture(3000, rng)

    model = _small(max_iter=5).fit(elliptical)
    assert model.base_ == "fitted-t" and isinstance(model.module_.base, EllipticalT)
    kinds = [type(transform) for transform in model.module_.transforms]
    assert Whiten in kinds and BatchNorm not in kinds  # whitened by the fitted t; no batch norm
    assert model.tail_cut_ is None  # the Gaussian base's tails: not for this base
    model = _small(max_iter=5).fit(t_marginals)
    assert model.base_ == "elliptical-t" and isinstance(model.module_.base, EllipticalT)
    kinds = [type(transform) for transform in model.module_.transforms]
    assert Whiten not in kinds and BatchNorm in kinds
    assert 2.0 < float(model.module_.base.df.detach()) < 6.0  # started at ECME's df (about 4.5)
    # heavy-tailed as a whole (ECME df about 2.4) but with a Gaussian feature: a banana
    x1 = rng.normal(scale=1.5, size=3000)
    banana = np.c_[x1, x1**2 / 2 + 0.5 * rng.normal(size=3000)]
    for X in (light, rng.normal(size=(2000, 4)), banana):
        model = _small(max_iter=5).fit(X)
        assert model.base_ == "gaussian" and isinstance(model.module_.base, StandardNormal)
    for base in ("gaussian", "mog", "student-t", "elliptical-t", "fitted-t"):  # an explicit base is kept
        X = light if base != "gaussian" else elliptical
        assert _small(base=base, max_iter=2, n_components=2).fit(X).base_ == base


def test_auto_base_is_resolved_once_and_kept_by_warm_start_and_partial_fit(rng):
    heavy = stats.multivariate_t(np.zeros(2), np.eye(2), df=2.5).rvs(1000, random_state=rng)
    light = rng.normal(size=(1000, 2))
    model = _small(max_iter=3, warm_start=True).fit(heavy)
    assert model.base_ == "fitted-t"
    assert model.fit(light).base_ == "fitted-t"  # the same flow, trained on
    partial = _small()
    assert partial.partial_fit(heavy).base_ == "fitted-t"
    assert partial.partial_fit(light).base_ == "fitted-t"
    assert clone(partial).partial_fit(light).base_ == "gaussian"
