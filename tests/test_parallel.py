"""Model selection at scale: torch threads under joblib, n_jobs, Dask, compact pickles."""

import io
import os
import pickle
import threading

import joblib
import numpy as np
import pytest
import torch
from scipy.stats import randint
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.model_selection import GridSearchCV, HalvingGridSearchCV, RandomizedSearchCV
from threadpoolctl import threadpool_limits
from torch.overrides import TorchFunctionMode

from sklearn_maf import MAFDensity
import sklearn_maf._base
import sklearn_maf._training
from sklearn_maf._streaming import StreamingState
from sklearn_maf._threads import limit_torch_threads, thread_limit, training_threads

GRID = {"n_layers": [1, 2], "hidden_units": [4, 8]}
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _tiny(**params):
    defaults = dict(n_layers=1, hidden_units=8, max_iter=4, batch_size=64, random_state=0)
    return MAFDensity(**{**defaults, **params})


def _curved(n, seed=0):
    """A curved 2-D density: x normal, y = x**2 / 2 plus noise."""
    rng = np.random.RandomState(seed)
    x = rng.normal(size=n)
    return np.c_[x, 0.5 * x**2 + 0.2 * rng.normal(size=n)]


@pytest.fixture(scope="module")
def X():
    return _curved(240)


class _ThreadRecorder(TorchFunctionMode):
    """Records torch's intra-op thread count at every torch call in its block."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.add(torch.get_num_threads())
        return func(*args, **(kwargs or {}))


class _RecordingMAF(MAFDensity):
    """Stores in ``torch_threads_`` the most threads torch had during ``fit``.

    With ``raise_threads_to`` set (a class attribute, so that ``clone`` keeps
    the estimator's parameters), ``fit`` first raises torch's own count, as
    other code in a reused worker process may have done.
    """

    raise_threads_to = None

    def fit(self, X, y=None, sample_weight=None):
        previous = torch.get_num_threads()
        if self.raise_threads_to is not None:
            torch.set_num_threads(self.raise_threads_to)
        try:
            with _ThreadRecorder() as recorder:
                super().fit(X, y, sample_weight=sample_weight)
        finally:
            torch.set_num_threads(previous)
        self.torch_threads_ = max(recorder.seen)
        return self


class _RaisingRecordingMAF(_RecordingMAF):
    raise_threads_to = max(2, joblib.cpu_count())


def _threads_used(estimator, X, y=None):
    """A scorer that reports the thread count recorded during the fit."""
    return estimator.torch_threads_


@pytest.fixture
def no_thread_variables(monkeypatch):
    """No thread variable in the environment, as in a user's plain shell."""
    for name in _THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def two_torch_threads():
    """torch set to two intra-op threads for the test, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------- threads


def test_thread_limit_reads_threadpoolctl_and_the_environment(no_thread_variables, monkeypatch):
    with threadpool_limits(limits=3):
        assert thread_limit() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2,1")
        assert thread_limit() == 2
        monkeypatch.setenv("MKL_NUM_THREADS", "1")
        assert thread_limit() == 1
        monkeypatch.setenv("MKL_NUM_THREADS", "not a number")
        assert thread_limit() == 2
    with threadpool_limits(limits=1):
        assert thread_limit() == 1


def test_limit_torch_threads_lowers_and_restores(no_thread_variables, two_torch_threads):
    with threadpool_limits(limits=1):
        torch.set_num_threads(2)  # raised after the limit, as other code may do
        with limit_torch_threads() as n_threads:
            assert n_threads == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), limit_torch_threads():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2


def test_limit_torch_threads_never_raises_the_count(no_thread_variables, two_torch_threads):
    with threadpool_limits(limits=2):
        torch.set_num_threads(1)
        with limit_torch_threads() as n_threads:
            assert n_threads == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize("in_new_thread", [False, True])
def test_fit_follows_threadpool_limits(X, no_thread_variables, two_torch_threads, in_new_thread):
    """torch alone ignores threadpoolctl once set_num_threads was called, and in new threads.

    Guards the two cases where torch does not follow the limits by itself: a
    ``torch.set_num_threads`` call after ``threadpool_limits``, and a fit run
    in a thread other than the one that set the limit (OpenMP counts are per
    thread; a new thread starts at torch's own count).
    """
    model = _RecordingMAF(**_tiny().get_params())
    with threadpool_limits(limits=1):
        if in_new_thread:
            worker = threading.Thread(target=model.fit, args=(X,))
            worker.start()
            worker.join()
        else:
            torch.set_num_threads(2)
            model.fit(X)
            assert torch.get_num_threads() == 2
    assert model.torch_threads_ == 1


def test_single_fit_without_limits_uses_all_torch_threads(X, no_thread_variables, two_torch_threads):
    """Outside joblib, with no limit lower than torch's own, nothing is taken away.

    (Except from the training steps of small models, on purpose: see
    test_small_training_steps_run_on_one_thread.)
    """
    with threadpool_limits(limits=2):
        model = _RecordingMAF(**_tiny().get_params()).fit(X)
    assert model.torch_threads_ == 2
    assert torch.get_num_threads() == 2


def test_training_threads_grow_with_the_step():
    assert training_threads(256, 100, 8) == 1  # the defaults: 2.6 million multiply-adds
    assert training_threads(1024, 100, 8) == 5
    assert training_threads(256, 512, 8) == 33
    assert training_threads(64, 4, 300) == 1  # wide inputs count too
    assert training_threads(4096, 4, 300) == 2


@pytest.mark.parametrize("hidden_units, expected", [(8, 1), (512, 2)])
def test_small_training_steps_run_on_one_thread(
    X, no_thread_variables, two_torch_threads, monkeypatch, hidden_units, expected
):
    """Training a small flow runs on one thread (more are slower); larger ones use them all.

    The OpenMP and BLAS limits are lifted to 2 as well: an ``OMP_NUM_THREADS=1``
    in the environment at start-up sets the OpenMP runtime's limit to 1 for
    good, and the fit rightly keeps within it.
    """
    seen = []

    def recording(function):
        def recorded(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return function(*args, **kwargs)

        return recorded

    monkeypatch.setattr(sklearn_maf._base, "train_flow", recording(sklearn_maf._base.train_flow))
    monkeypatch.setattr(StreamingState, "train_chunk", recording(StreamingState.train_chunk))
    model = _tiny(hidden_units=hidden_units, max_iter=1)
    with threadpool_limits(limits=2):
        model.fit(X)
        model.partial_fit(X)
    assert seen == [expected, expected]
    assert torch.get_num_threads() == 2


def test_fits_in_threads_of_one_process_share_the_cores(X, no_thread_variables, two_torch_threads, monkeypatch):
    """Two fits at once in threads (joblib's threading backend) train on one thread each on two cores.

    Each thread starts at torch's full width (OpenMP counts are per thread),
    and nothing else limits it there: without the shared count, both fits
    trained a model large enough for two threads on two threads each. The
    share is taken when a thread enters the limit, so what is checked is the
    training epochs, which enter it once both fits are running (the work
    before and after them may run at the count a fit got while alone).
    """
    fresh = []
    probe = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    probe.start()
    probe.join()
    if (os.cpu_count() or 1) < 2 or fresh[0] < 2:
        # OMP_NUM_THREADS=1 at start-up gives every thread one torch thread for good
        pytest.skip("new threads start at one torch thread here")
    inside = threading.Barrier(2, timeout=60)
    epochs = {}
    epoch = sklearn_maf._training._epoch

    def recording_epoch(*args, **kwargs):
        epochs.setdefault(threading.get_ident(), []).append(torch.get_num_threads())
        return epoch(*args, **kwargs)

    monkeypatch.setattr(sklearn_maf._training, "_epoch", recording_epoch)

    class _WaitingMAF(MAFDensity):
        def _flow_features(self, X, *args):
            inside.wait()  # both threads are inside _train before training starts
            return X

    params = _tiny(hidden_units=512, max_iter=2).get_params()
    with threadpool_limits(limits=2):
        workers = [threading.Thread(target=_WaitingMAF(**params).fit, args=(X,)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        concurrent = sorted(max(counts) for counts in epochs.values())
        epochs.clear()
        MAFDensity(**params).fit(X)
    assert concurrent == [1, 1]
    assert max(max(counts) for counts in epochs.values()) == 2


# ---------------------------------------------------------- same scores, any n_jobs


def _log_likelihood(estimator, X, y=None):
    """The default scorer of a density estimator, spelled out for multi-metric searches."""
    return estimator.score(X)


def _recording_search(**params):
    """The 4-candidate, 3-fold search; each fit also scored by the torch threads it used."""
    return GridSearchCV(
        _RaisingRecordingMAF(**_tiny().get_params()),
        GRID,
        cv=3,
        scoring={"score": _log_likelihood, "threads": _threads_used},
        refit=False,
        **params,
    )


def _split_scores(search):
    results = search.cv_results_
    return {k: v for k, v in results.items() if k.startswith("split") and k.endswith("test_score")}


def _threads(search):
    return np.concatenate([search.cv_results_[f"split{k}_test_threads"] for k in range(3)])


@pytest.fixture(scope="module")
def sequential_search(X):
    return GridSearchCV(_tiny(), GRID, cv=3, n_jobs=1).fit(X)


def _assert_same_scores(search, reference):
    expected = _split_scores(reference)
    assert len(expected) == 3 and len(expected["split0_test_score"]) == 4
    assert np.all(np.isfinite(reference.cv_results_["mean_test_score"]))
    for key, value in _split_scores(search).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_n_jobs_gives_identical_cv_results_within_joblib_thread_limits(
    X, sequential_search, no_thread_variables
):
    """n_jobs=2 gives n_jobs=1's scores, each loky worker within cpu_count() // 2 threads.

    The workers raise torch's thread count first (as earlier code in a reused
    worker may), so the thread check fails unless fit follows the limit joblib
    sets in its workers.
    """
    search = _recording_search(n_jobs=2).fit(X)
    _assert_same_scores(search, sequential_search)
    assert np.all(_threads(search) <= max(1, joblib.cpu_count() // 2))


def test_randomized_search(X):
    search = RandomizedSearchCV(
        _tiny(),
        {"n_layers": [1, 2], "hidden_units": randint(4, 12)},
        n_iter=3,
        cv=2,
        random_state=0,
    ).fit(X)
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    assert 4 <= search.best_params_["hidden_units"] < 12
    assert search.best_estimator_.score_samples(X[:5]).shape == (5,)


def test_halving_search_over_max_iter(X):
    search = HalvingGridSearchCV(
        _tiny(),
        {"hidden_units": [4, 8, 12, 16]},
        resource="max_iter",
        min_resources=2,
        max_resources=8,
        factor=2,
        cv=2,
        random_state=0,
    ).fit(X)
    assert search.n_resources_ == [2, 4, 8]
    assert search.n_candidates_ == [4, 2, 1]
    assert search.best_params_["max_iter"] == 8
    assert search.best_estimator_.n_iter_ <= 8
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


def test_halving_search_over_n_samples(X):
    search = HalvingGridSearchCV(
        _tiny(), GRID, min_resources=60, factor=2, cv=2, random_state=0
    ).fit(X)
    assert search.n_resources_ == [60, 120, 240]
    assert search.n_candidates_ == [4, 2, 1]
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


# -------------------------------------------------------------------- pickles


def _state_dict_bytes(model):
    """The bytes of the fitted torch modules' tensors: the flow's and the reference's."""
    modules = [model.module_] + ([] if model.reference_ is None else [model.reference_])
    return sum(t.numel() * t.element_size() for module in modules for t in module.state_dict().values())


class _BytesCounter(pickle.Pickler):
    """A pickler that adds up the bytes of the tensors and arrays it writes."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensor_bytes = 0
        self.array_bytes = 0
        self._storages = set()

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self.tensor_bytes += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            self.array_bytes += obj.nbytes
        return None


def test_fitted_model_pickles_compactly():
    """The pickle holds the fitted modules' tensors and little else: no data, no optimizer state.

    Guards the size of what joblib and Dask ship between workers: it grows
    with the training rows only through the reference's kernel density,
    which holds at most _MAX_KERNEL_ROWS of them (and those as a copy, not as
    a view of all the rows, whose storage a pickle would write whole).
    """
    sizes = []
    for n_samples in [200, 20_000]:
        X = np.random.RandomState(n_samples).normal(size=(n_samples, 4))
        model = MAFDensity(n_layers=2, hidden_units=32, max_iter=2, random_state=0).fit(X)
        counter = _BytesCounter(io.BytesIO())
        counter.dump(model)
        data = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
        weights = _state_dict_bytes(model)
        assert counter.tensor_bytes == weights
        assert counter.array_bytes < 1024
        assert len(data) < 2 * weights + 16 * 1024
        restored = pickle.loads(data)
        np.testing.assert_array_equal(restored.score_samples(X[:5]), model.score_samples(X[:5]))
        kernel = [part for part in getattr(model.reference_, "parts", []) if hasattr(part, "points")]
        held = sum(t.numel() * t.element_size() for part in kernel for t in (part.points, part.log_weights))
        sizes.append(len(data) - held)
    assert abs(sizes[0] - sizes[1]) < 4 * 1024  # at most one more part's structure


# ----------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def dask_client():
    pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=True,
    ) as cluster, distributed.Client(cluster) as client:
        yield client


def test_dask_backend_gives_identical_cv_results(X, sequential_search, dask_client):
    """The search runs on a Dask cluster, with n_jobs=1's scores and one torch thread a worker."""
    search = _recording_search()
    with joblib.parallel_config(backend="dask"):
        search.fit(X)
    _assert_same_scores(search, sequential_search)
    np.testing.assert_array_equal(_threads(search), 1)


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_score_dask_array_chunk_by_chunk(X, scheduler, request):
    da = pytest.importorskip("dask.array")
    model = _tiny().fit(X)
    X_big = _curved(1000, seed=1)
    X_dask = da.from_array(X_big, chunks=(128, -1))
    log_density = da.map_blocks(model.score_samples, X_dask, drop_axis=1, dtype=np.float64)
    if scheduler == "distributed":
        request.getfixturevalue("dask_client")
        result = log_density.compute()
    else:
        result = log_density.compute(scheduler="threads")
    assert log_density.chunks == ((128,) * 7 + (104,),)
    # a chunk of 128 rows and one of 1,000 block their float64 products
    # differently: equal up to round-off (see the precision guide)
    np.testing.assert_allclose(result, model.score_samples(X_big), rtol=0, atol=1e-12)
