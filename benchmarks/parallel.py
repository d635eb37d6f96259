"""Parallel model selection: GridSearchCV with n_jobs=1, n_jobs=2 and on a Dask cluster.

One search (4 candidates, 3 folds, fixed ``random_state``) is run in several
configurations, side by side in one process:

- ``n_jobs=1``: the fits one after another in this process, torch at its own
  width (all cores);
- ``n_jobs=1, 1 thread``: the same within ``threadpool_limits(1)``, the
  baseline of pure process parallelism;
- ``n_jobs=2``: two loky workers; joblib gives each ``cpu_count() // 2`` threads
  and the estimator keeps torch within that;
- ``n_jobs=2, oversubscribed``: the same, but with joblib told to give each
  worker all the cores (``inner_max_num_threads=cpu_count()``), to show what the
  thread limit avoids;
- ``dask``: joblib's Dask backend on a ``LocalCluster`` of two worker processes
  with one thread each (cluster start-up not timed).

``--preset issue`` runs issue 21's search instead (20,000 x 6 rows, 30
epochs, ``refit=True`` as ``GridSearchCV``'s default) in the configurations
that matter there, each run ``--repeat`` times, interleaved (one of each per
round, so that a change in the machine's load hits them all alike):

- ``n_jobs=1``;
- ``n_jobs=2, fresh workers``: loky's workers shut down before each search,
  so it pays their start-up (the imports of scikit-learn and torch), as a
  user's first search in a session does;
- ``n_jobs=2, warm workers``: the workers of the previous search reused;
- ``n_jobs=2, threading``: joblib's threading backend (no processes: no
  start-up, no copies of the data; the training steps release the GIL in
  torch and in the C module).

A second table splits each search's wall time: until the first fit starts
(start-up), the fits and scorings themselves (per worker), the tail where one
worker waits for the other, and the refit of the best candidate on all rows.

Every configuration is run ``--repeat`` times after one warm-up run (which
starts the workers); the table gives the best wall-clock time, its ratio to
``n_jobs=1``, the torch threads each worker used, and whether the
``cv_results_`` scores are bit-identical to those of ``n_jobs=1``. The
searches do not refit the best candidate (``refit=False``): that last fit runs
in this process whatever ``n_jobs`` is. Timings are only meaningful on an
otherwise idle machine; the header records the load.

Usage::

    python benchmarks/parallel.py [--quick] [--out FILE] [--repeat N] [--n-samples N] [--no-dask]
    python benchmarks/parallel.py --preset issue [--repeat N] [--max-iter N] [--out FILE]
"""

import argparse
import datetime
import logging
import os
import platform
import shlex
import sys
import threading
import time
import warnings
from pathlib import Path

import joblib
import numpy as np
import sklearn
import threadpoolctl
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from sklearn_maf import MAFDensity
from sklearn_maf._threads import limit_torch_threads

GRID = {"n_layers": [2, 4], "hidden_units": [32, 64]}


def _data(n_samples, n_features=4, seed=0):
    """Curved data: each feature a noisy function of the one before."""
    rng = np.random.RandomState(seed)
    X = np.empty((n_samples, n_features))
    X[:, 0] = rng.normal(size=n_samples)
    for j in range(1, n_features):
        X[:, j] = np.sin(1.5 * X[:, j - 1]) + 0.3 * rng.normal(size=n_samples)
    return X


def _torch_threads(_=None):
    """The thread count a fit would use here (in a worker, under its limits)."""
    with limit_torch_threads() as n_threads:
        return n_threads


def _search(args, n_jobs):
    estimator = MAFDensity(
        max_iter=args.max_iter, early_stopping=False, batch_size=128, random_state=0
    )
    # refit=False: the final refit is one fit in this process whatever n_jobs is.
    return GridSearchCV(estimator, GRID, cv=3, n_jobs=n_jobs, refit=False)


def _scores(search):
    results = search.cv_results_
    return np.array([results[f"split{k}_test_score"] for k in range(3)])


def _time(args, X, n_jobs, parallel_config, limit=None):
    """Best wall time of ``--repeat`` searches after a warm-up; scores; threads."""
    with joblib.parallel_config(**parallel_config), threadpoolctl.threadpool_limits(limit):
        search = _search(args, n_jobs).fit(X)  # warm-up: starts workers, imports
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            search = _search(args, n_jobs).fit(X)
            times.append(time.perf_counter() - start)
        if n_jobs == 1:
            threads = [_torch_threads()]
        else:
            threads = joblib.Parallel(n_jobs=2)(joblib.delayed(_torch_threads)(i) for i in range(2))
    return min(times), _scores(search), sorted(set(threads))


class _TimedMAF(MAFDensity):
    """Records when (``time.time()``) and in which thread (system-wide id) each fit ran."""

    def fit(self, X, y=None, sample_weight=None):
        start = time.time()
        super().fit(X, y, sample_weight=sample_weight)
        self.fit_span_ = (threading.get_native_id(), start, time.time())
        return self


def _timed_scoring():
    """Scorers that return the held-out total log-likelihood and the fit's span."""
    return {
        "score": lambda estimator, X, y=None: estimator.score(X),
        "worker": lambda estimator, X, y=None: estimator.fit_span_[0],
        "start": lambda estimator, X, y=None: estimator.fit_span_[1],
        # the last scorer: the fit and its scoring are done
        "scored": lambda estimator, X, y=None: time.time(),
    }


def _issue_search(n_jobs, max_iter):
    estimator = _TimedMAF(max_iter=max_iter, early_stopping=False, batch_size=128, random_state=0)
    return GridSearchCV(estimator, GRID, cv=3, n_jobs=n_jobs, scoring=_timed_scoring(), refit="score")


def _shutdown_workers():
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)


def _timeline(search, start, end):
    """``(start-up, busy per worker, tail wait, refit, other)`` of one search, in seconds."""
    results = search.cv_results_
    spans = [
        (results[f"split{k}_test_worker"][i], results[f"split{k}_test_start"][i], results[f"split{k}_test_scored"][i])
        for k in range(3)
        for i in range(len(results["params"]))
    ]
    workers = sorted({pid for pid, _, _ in spans})
    startup = min(s for _, s, _ in spans) - start
    busy = [sum(e - s for pid, s, e in spans if pid == w) for w in workers]
    last = [max(e for pid, _, e in spans if pid == w) for w in workers]
    tail = max(last) - min(last)
    refit = search.refit_time_
    other = (end - start) - startup - max(busy) - refit
    return startup, busy, tail, refit, other


def _run_issue(args):
    """Issue 21's search in four configurations, interleaved; two Markdown tables."""
    X = _data(20_000, n_features=6)
    configurations = [
        ("n_jobs=1", 1, "loky", False),
        ("n_jobs=2, fresh workers", 2, "loky", True),
        ("n_jobs=2, warm workers", 2, "loky", False),
        ("n_jobs=2, threading", 2, "threading", False),
    ]
    runs = {name: [] for name, *_ in configurations}
    for round_ in range(args.repeat):
        for name, n_jobs, backend, fresh in configurations:
            if fresh:
                _shutdown_workers()
            elif n_jobs == 2 and backend == "loky" and round_ == 0:
                joblib.Parallel(n_jobs=2)(joblib.delayed(_torch_threads)(i) for i in range(2))  # start them
            with joblib.parallel_config(backend=backend):
                start = time.time()
                search = _issue_search(n_jobs, args.max_iter).fit(X)
                end = time.time()
            runs[name].append((end - start, _scores(search), _timeline(search, start, end)))
            print(f"round {round_ + 1}, {name}: {end - start:.1f} s", file=sys.stderr, flush=True)
    reference = runs["n_jobs=1"]
    lines = [
        "| configuration | wall time (s), each round | median | speed-up vs n_jobs=1 (median of the rounds' ratios) | scores identical to n_jobs=1 |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for name, rows in runs.items():
        seconds = np.array([r[0] for r in rows])
        ratios = np.array([ref[0] for ref in reference]) / seconds
        identical = all(np.array_equal(r[1], ref[1]) for r, ref in zip(rows, reference))
        lines.append(
            f"| {name} | {', '.join(f'{t:.1f}' for t in seconds)} | {np.median(seconds):.1f} | "
            f"{np.median(ratios):.2f}x | {'yes' if identical else 'NO'} |"
        )
    lines += [
        "",
        "Where the wall time goes (medians over the rounds, seconds): start-up until the first fit "
        "starts; fits and their scoring per worker; the tail where one worker has finished and the "
        "other not; the refit of the best candidate on all rows (in this process); the rest "
        "(dispatch, results).",
        "",
        "| configuration | start-up | fits + scoring per worker | tail | refit | rest |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, rows in runs.items():
        timelines = [r[2] for r in rows]
        busy = np.median(np.array([sorted(t[1]) for t in timelines]), axis=0)
        lines.append(
            f"| {name} | {np.median([t[0] for t in timelines]):.1f} | {' + '.join(f'{b:.1f}' for b in busy)} | "
            f"{np.median([t[2] for t in timelines]):.1f} | {np.median([t[3] for t in timelines]):.1f} | "
            f"{np.median([t[4] for t in timelines]):.1f} |"
        )
    return X, lines


def _machine():
    cpu = cpu_model()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return cpu, load


def _versions():
    parts = [
        f"sklearn-maf {__import__('sklearn_maf').__version__}",
        f"torch {torch.__version__}",
        f"scikit-learn {sklearn.__version__}",
        f"joblib {joblib.__version__}",
        f"threadpoolctl {threadpoolctl.__version__}",
        f"numpy {np.__version__}",
    ]
    try:
        import dask
        import distributed

        parts += [f"dask {dask.__version__}", f"distributed {distributed.__version__}"]
    except ImportError:
        parts.append("dask not installed")
    return ", ".join(parts) + f", Python {platform.python_version()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 600 rows, 3 epochs, 1 repeat")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--repeat", type=int, help="timed runs per configuration (default 3; 1 with --quick)")
    parser.add_argument("--n-samples", type=int, help="rows of data (default 2000; 600 with --quick)")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask LocalCluster run")
    parser.add_argument("--preset", choices=["issue"], help="issue 21's search (see the module docstring)")
    parser.add_argument("--max-iter", type=int, help="epochs per fit with --preset issue (default 30; 3 with --quick)")
    args = parser.parse_args(argv)
    if args.preset == "issue":
        args.max_iter = args.max_iter or (3 if args.quick else 30)
        args.repeat = args.repeat or (1 if args.quick else 3)
        warnings.simplefilter("ignore", ConvergenceWarning)
        X, table = _run_issue(args)
        cpu, load = _machine()
        lines = [
            "### Issue 21's GridSearchCV (4 candidates x 3 folds, refit)",
            "",
            f"- command: `python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}`",
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: nproc={os.cpu_count()}, CPU: {cpu}, load average at the end: {load}",
            f"- versions: {_versions()}",
            (
                f"- data: {X.shape[0]} rows x {X.shape[1]} features; grid {GRID}; max_iter={args.max_iter}, "
                f"early_stopping=False, batch_size=128, refit=True; {args.repeat} rounds, interleaved"
            ),
            "",
            *table,
        ]
        report = "\n".join(lines) + "\n"
        print(report)
        if args.out:
            args.out.write_text(report)
        return
    n_samples = args.n_samples or (600 if args.quick else 2000)
    args.max_iter = 3 if args.quick else 10
    args.repeat = args.repeat or (1 if args.quick else 3)
    warnings.simplefilter("ignore", ConvergenceWarning)

    X = _data(n_samples)
    n_cpus = joblib.cpu_count()
    configurations = [
        ("n_jobs=1", 1, {}, None),
        ("n_jobs=1, 1 thread", 1, {}, 1),
        ("n_jobs=2", 2, {"backend": "loky"}, None),
        ("n_jobs=2, oversubscribed", 2, {"backend": "loky", "inner_max_num_threads": n_cpus}, None),
    ]
    results = []
    for name, n_jobs, config, limit in configurations:
        results.append((name, *_time(args, X, n_jobs, config, limit)))
        print(f"{name}: {results[-1][1]:.2f} s", file=sys.stderr, flush=True)

    cluster_note = ""
    if not args.no_dask:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            cluster_note = "Dask run skipped: dask.distributed is not installed (`pip install sklearn-maf[dask]`)."
        else:
            start = time.perf_counter()
            with LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            ) as cluster, Client(cluster):
                startup = time.perf_counter() - start
                results.append(("dask LocalCluster(2 workers x 1 thread)", *_time(args, X, 2, {"backend": "dask"})))
            cluster_note = f"Dask LocalCluster start-up (not in the table): {startup:.1f} s."
            print(f"dask: {results[-1][1]:.2f} s", file=sys.stderr, flush=True)

    reference_time, reference_scores = results[0][1], results[0][2]
    cpu, load = _machine()
    lines = [
        "## Parallel GridSearchCV (4 candidates x 3 folds)",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: nproc={os.cpu_count()} (joblib.cpu_count()={n_cpus}), CPU: {cpu}, load average: {load}",
        f"- versions: {_versions()}",
        (
            f"- data: {n_samples} rows x {X.shape[1]} features; grid {GRID}; "
            f"max_iter={args.max_iter}, early_stopping=False, batch_size=128, refit=False; "
            f"best of {args.repeat} after a warm-up run"
        ),
        "",
        "| configuration | wall time (s) | speed-up vs n_jobs=1 | torch threads per worker | scores identical to n_jobs=1 |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, seconds, scores, threads in results:
        identical = "yes" if np.array_equal(scores, reference_scores) else "NO"
        lines.append(
            f"| {name} | {seconds:.2f} | {reference_time / seconds:.2f}x | "
            f"{', '.join(map(str, threads))} | {identical} |"
        )
    if cluster_note:
        lines += ["", cluster_note]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
