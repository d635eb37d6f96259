"""partial_fit at fit's quality: the training state kept between calls, and streams from Dask."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf import MAFDensity
from sklearn_maf._streaming import Reservoir, StreamingState


def _tiny(**params):
    # the flows alone: fit mixes in a reference fitted on held-out rows, which partial_fit has not
    defaults = dict(n_layers=2, hidden_units=8, batch_size=64, precision="float64", random_state=0, reference=None)
    return MAFDensity(**{**defaults, **params})


def _curved(n, seed=0):
    """A curved 2-D density: x normal, y = x**2 / 2 plus noise."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=n)
    return np.c_[x, 0.5 * x**2 + 0.2 * rng.normal(size=n)]


def _stream(model, chunks, n_passes, shuffle_seed=None):
    rng = np.random.RandomState(shuffle_seed)
    for _ in range(n_passes):
        order = rng.permutation(len(chunks)) if shuffle_seed is not None else range(len(chunks))
        for i in order:
            model.partial_fit(chunks[i])
    return model


def test_partial_fit_over_all_rows_is_fit_without_early_stopping():
    """k calls on the whole data give fit(max_iter=k, early_stopping=False)'s model.

    Guards that partial_fit trains as fit does: the same Adam, gradient limit,
    weight averaging and schedule carried across calls, the batch-norm
    statistics and the tails chosen on the rows (the reservoir holds them all
    here). Before, partial_fit kept the last step's weights, the running
    batch-norm averages and no tails.
    """
    X = _curved(600)
    full = _tiny(max_iter=5, early_stopping=False).fit(X)
    streamed = _stream(_tiny(), [X], 5)
    assert streamed.loss_curve_ == full.loss_curve_
    assert streamed.tail_cut_ == full.tail_cut_
    np.testing.assert_allclose(streamed.score_samples(X), full.score_samples(X), rtol=0, atol=1e-10)


def test_partial_fit_over_chunks_comes_within_a_fiftieth_of_a_nat_of_fit():
    """Passes over shuffled chunks end as good as fit over the same rows, the same epochs.

    Guards the averaging across calls: at this high learning rate the last
    step's weights wander around the optimum, and partial_fit, which used to
    keep them, ended more than 0.02 nats per row below fit.
    """
    X, X_test = _curved(1200), _curved(2000, seed=1)
    params = dict(n_layers=2, hidden_units=16, batch_size=32, learning_rate_init=1e-2)
    full = _tiny(max_iter=6, early_stopping=False, **params).fit(X)
    streamed = _stream(_tiny(**params), np.array_split(X, 4), 6, shuffle_seed=0)
    assert streamed._partial_state.n_passes == 5  # the sixth ends when a seventh starts
    gap = full.score_samples(X_test).mean() - streamed.score_samples(X_test).mean()
    assert gap < 0.02


def test_passes_are_recognised_by_repeated_chunks_in_any_order():
    X = _curved(400)
    chunks = np.array_split(X, 4)
    model = _stream(_tiny(), chunks, 3, shuffle_seed=1)
    assert model._partial_state.n_passes == 2
    assert model.n_iter_ == 12
    # new rows only: one long pass
    fresh = _tiny()
    for seed in range(5):
        fresh.partial_fit(_curved(100, seed=seed + 10))
    assert fresh._partial_state.n_passes == 0
    # the same values with other weights are another chunk
    weighted = _tiny().partial_fit(chunks[0]).partial_fit(chunks[0], sample_weight=np.full(100, 2.0))
    assert weighted._partial_state.n_passes == 0


def test_adaptive_schedule_halves_the_rate_once_passes_stall():
    """learning_rate="adaptive" halves Adam's rate after passes without improvement.

    With tol huge, no pass improves on the best; the rate halves after
    ADAPTIVE_EPOCHS passes of ADAPTIVE_STEPS steps in all (here, 120 steps a pass).
    """
    X = _curved(2400)
    chunks = np.array_split(X, 4)
    constant = _stream(_tiny(batch_size=20, tol=1e3, learning_rate="constant"), chunks, 5)
    adaptive = _stream(_tiny(batch_size=20, tol=1e3), chunks, 5)
    assert constant._partial_state.optimizer.lr == pytest.approx(1e-3)
    # passes 2-4 stall (the first sets the best): the rate halves at the start of pass 5
    assert adaptive._partial_state.optimizer.lr == pytest.approx(5e-4)


def test_a_pickled_stream_continues_exactly():
    """The training state travels in the pickle (Dask moves models between workers)."""
    X = _curved(400)
    chunks = np.array_split(X, 4)
    first, second = _tiny(), _tiny()
    _stream(first, chunks, 2)
    _stream(second, chunks, 2)
    loaded = pickle.loads(pickle.dumps(first))
    np.testing.assert_array_equal(loaded.score_samples(X), first.score_samples(X))
    _stream(loaded, chunks, 2)
    _stream(second, chunks, 2)
    np.testing.assert_array_equal(loaded.score_samples(X), second.score_samples(X))
    assert loaded._partial_state.n_passes == second._partial_state.n_passes == 3
    # pickling did not change the model pickled
    _stream(first, chunks, 2)
    np.testing.assert_array_equal(first.score_samples(X), second.score_samples(X))


def test_fit_discards_the_stream_state():
    X = _curved(200)
    model = _tiny().partial_fit(X)
    assert isinstance(model._partial_state, StreamingState)
    model.set_params(max_iter=2).fit(X)
    assert not hasattr(model, "_partial_state")


def test_non_finite_loss_keeps_the_last_model(monkeypatch):
    X = _curved(200)
    model = _tiny().partial_fit(X)
    before = model.score_samples(X)
    monkeypatch.setattr(StreamingState, "train_chunk", lambda self, *args, **kwargs: float("nan"))
    with pytest.warns(ConvergenceWarning, match="non-finite in this partial_fit call"):
        model.partial_fit(X)
    np.testing.assert_array_equal(model.score_samples(X), before)
    assert not hasattr(model, "_partial_state")
    monkeypatch.undo()
    model.partial_fit(X)  # continues with a fresh optimizer
    assert model.n_iter_ == 2


def test_reservoir_is_a_uniform_sample_of_the_stream():
    """Every row streamed is kept with probability capacity / n_seen, whatever the chunks."""
    n_rows, capacity, n_draws = 50, 10, 4000
    counts = np.zeros(n_rows)
    rows = np.arange(n_rows, dtype=np.float64)[:, None]
    for seed in range(n_draws):
        reservoir = Reservoir(capacity, 1, np.random.RandomState(seed))
        for chunk in np.array_split(rows, [3, 4, 20, 33]):
            reservoir.add(chunk, np.ones(chunk.shape[0]))
        assert reservoir.X.shape == (capacity, 1) and reservoir.n_seen == n_rows
        assert np.unique(reservoir.X).size == capacity
        counts[reservoir.X[:, 0].astype(int)] += 1
    expected = n_draws * capacity / n_rows  # 800; binomial sd 25
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - capacity / n_rows)))


# ----------------------------------------------------------------------- Dask


def test_incremental_trains_on_a_dask_array_from_disk(tmp_path):
    """dask_ml's Incremental streams the blocks of an on-disk array through partial_fit."""
    da = pytest.importorskip("dask.array")
    wrappers = pytest.importorskip("dask_ml.wrappers")
    X = _curved(1200)
    path = tmp_path / "rows.npy"
    np.save(path, X)
    X_disk = da.from_array(np.load(path, mmap_mode="r"), chunks=(300, -1))
    incremental = wrappers.Incremental(_tiny(), shuffle_blocks=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        for _ in range(3):
            incremental.partial_fit(X_disk)
    model = incremental.estimator_
    assert model.n_iter_ == 12
    assert model._partial_state.n_passes == 2
    assert model._partial_state.reservoir.n_seen == 1200  # the first pass: the distinct rows
    # dask_ml shuffles the blocks with a fresh RandomState(0) each pass: the
    # same blocks in the same order, from memory, give the same model
    order = list(range(4))
    np.random.RandomState(0).shuffle(order)
    blocks = np.array_split(X, 4)
    reference = _stream(_tiny(), [blocks[i] for i in order], 3)
    np.testing.assert_array_equal(model.score_samples(X), reference.score_samples(X))


def test_incremental_on_a_cluster_gives_the_local_model():
    """On a LocalCluster the model moves between workers with its training state.

    Each block trains in a task on the worker that holds the block; the
    estimator travels pickled, so the stream must continue exactly there.
    """
    da = pytest.importorskip("dask.array")
    wrappers = pytest.importorskip("dask_ml.wrappers")
    distributed = pytest.importorskip("distributed")
    X = _curved(800)
    X_dask = da.from_array(X, chunks=(200, -1))
    local = wrappers.Incremental(_tiny(), random_state=0)
    for _ in range(2):
        local.partial_fit(X_dask)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=True
    ) as cluster, distributed.Client(cluster):
        remote = wrappers.Incremental(_tiny(), random_state=0)
        for _ in range(2):
            remote.partial_fit(X_dask.persist())
    assert remote.estimator_._partial_state.n_passes == 1
    np.testing.assert_array_equal(remote.estimator_.score_samples(X), local.estimator_.score_samples(X))
