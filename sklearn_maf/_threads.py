"""How many threads torch may use: never more than the limits already in force.

``GridSearchCV(MAFDensity(), grid, n_jobs=k)`` runs ``k`` fits at once. If each
fit also ran torch's intra-op thread pool at full width, ``k`` processes would
fight over the same cores (oversubscription), and ``n_jobs=2`` could be slower
than ``n_jobs=1``. Other libraries are kept in line by limits on their thread
pools, and torch should follow the same limits:

- joblib's loky backend starts its workers with ``OMP_NUM_THREADS`` (and the
  BLAS variables) set to ``cpu_count() // n_jobs`` (its ``inner_max_num_threads``),
  unless the user set them; Dask's nanny starts its workers with
  ``OMP_NUM_THREADS=1``;
- :func:`threadpoolctl.threadpool_limits` sets the OpenMP and BLAS pools of the
  running process.

torch reads ``OMP_NUM_THREADS`` once, when its pool starts, and so follows
joblib in a fresh worker on its own. It does not follow the limits in two
cases: once ``torch.set_num_threads`` has been called (by the user or by
other code in a reused worker), and in threads other than the one that
entered ``threadpool_limits`` (OpenMP's thread count is per thread; a Dask or
joblib thread starts at the full width). :func:`limit_torch_threads` closes
both: while it is active, torch runs with::

    min(torch.get_num_threads(), OMP_NUM_THREADS, MKL_NUM_THREADS,
        the thread count of every OpenMP and BLAS pool threadpoolctl sees
        from the calling thread)

threads, and the previous count is restored on exit. It only ever lowers the
count, so a fit outside joblib with no limit set still uses all of torch's
threads. The estimators wrap their training, scoring and sampling in it.

Fits and scorings that run at once in threads of one process (joblib's
threading backend, a Dask worker with several threads) share the cores: each
gets ``cpu_count() // (number running)`` threads at most, as joblib gives its
processes, where each thread would otherwise start at the full width and
oversubscribe the cores.

Training steps of small flows get a further cap, :func:`training_threads`:
at the default sizes a step's products are too small to share out, and a
second thread made training slower (and, with another process busy on the
machine, many times slower).

The thread count is not meant to change results: tests/test_parallel.py
checks that a search gives bit-identical ``cv_results_`` scores with
``n_jobs=1`` (torch at full width) and ``n_jobs=2`` (one thread per worker).
"""

import os
import threading
from contextlib import contextmanager

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["limit_torch_threads", "thread_limit", "training_threads"]

# Environment variables torch itself reads for its default thread count.
_ENV_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_controller = None
_controller_lock = threading.Lock()

# How many threads of this process are inside limit_torch_threads (each counted
# once however deeply it nests), and this thread's depth.
_running = 0
_running_lock = threading.Lock()
_depth = threading.local()


def _pools():
    """The thread pools threadpoolctl finds, scanned once per process.

    Scanning the loaded libraries is too slow to repeat on every call of
    ``score_samples``; the pools that matter (torch's OpenMP, numpy's and
    scipy's BLAS) are loaded by the time the first model is fitted.
    """
    global _controller
    with _controller_lock:
        if _controller is None:
            _controller = ThreadpoolController()
        return _controller.lib_controllers


def _env_limit(name):
    """Positive int of an ``OMP_NUM_THREADS``-like variable, or None.

    ``OMP_NUM_THREADS`` may list one count per nesting level ("4,2"); the
    first is the outer one, the only one torch uses.
    """
    value = os.environ.get(name, "").split(",")[0].strip()
    try:
        limit = int(value)
    except ValueError:
        return None
    return limit if limit > 0 else None


def thread_limit():
    """The smallest thread limit in force for the calling thread, or None.

    Returns
    -------
    limit : int or None
        The minimum of ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and the thread
        counts of the OpenMP and BLAS pools seen by threadpoolctl; None when
        none of them gives a positive count.
    """
    limits = [_env_limit(name) for name in _ENV_VARIABLES]
    limits += [pool.num_threads for pool in _pools()]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(limits) if limits else None


# Multiply-adds of a training step's largest matrix product per intra-op thread: a smaller
# share costs more in synchronisation than it saves (far more where another process keeps
# a core busy), and one thread runs the default sizes (benchmarks/results/speed.md).
MIN_MULTIPLY_ADDS_PER_THREAD = 2_000_000


def training_threads(batch_size, hidden_units, n_features):
    """How many intra-op threads a training step of this size can use well.

    Parameters
    ----------
    batch_size : int
        Rows per step.
    hidden_units, n_features : int
        Widths of the MADE's layers; the largest product of a step has
        ``batch_size * hidden_units * max(hidden_units, n_features)``
        multiply-adds.

    Returns
    -------
    n_threads : int
        At least 1; one per :data:`MIN_MULTIPLY_ADDS_PER_THREAD`.
    """
    work = batch_size * hidden_units * max(hidden_units, n_features)
    return max(1, work // MIN_MULTIPLY_ADDS_PER_THREAD)


@contextmanager
def limit_torch_threads(max_threads=None):
    """Run torch with no more intra-op threads than :func:`thread_limit`.

    Nor more than ``os.cpu_count()`` divided by the number of threads of
    this process inside this context at the time (a thread counts once,
    however deeply it nests the context).

    Also a decorator (``@limit_torch_threads()``). The previous count is
    restored on exit, also when the body raises. Nothing changes when the
    limit is not below ``torch.get_num_threads()``.

    Parameters
    ----------
    max_threads : int, optional
        A further limit, e.g. :func:`training_threads`.

    Yields
    ------
    n_threads : int
        The number of threads torch uses inside the block.
    """
    global _running
    depth = getattr(_depth, "value", 0)
    if depth == 0:
        with _running_lock:
            _running += 1
    _depth.value = depth + 1
    try:
        previous = torch.get_num_threads()
        limit = thread_limit()
        if max_threads is not None:
            limit = max_threads if limit is None else min(limit, max_threads)
        # threads of this process running fits at once share the cores
        share = max(1, (os.cpu_count() or 1) // max(1, _running))
        if share < previous:
            limit = share if limit is None else min(limit, share)
        if limit is None or limit >= previous:
            yield previous
            return
        torch.set_num_threads(limit)
        try:
            yield limit
        finally:
            torch.set_num_threads(previous)
    finally:
        _depth.value = depth
        if depth == 0:
            with _running_lock:
                _running -= 1
