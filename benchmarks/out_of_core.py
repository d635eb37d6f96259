"""Training on rows stored on disk, block by block, with ``dask_ml.wrappers.Incremental``.

Three phases, each in a fresh process so that each one's peak memory
(``ru_maxrss``) is its own:

1. ``write``: ``--n-rows`` x 10 rows of ``sine-chain-10d`` (``_densities.py``:
   curved, exact log-density), generated block by block (``--block-rows``
   rows each, every block from its own seed) into a zarr store (or, without
   zarr, a dask ``npy`` stack) under ``--path``;
2. ``stream``: ``Incremental(MAFDensity(...), shuffle_blocks=True)`` and
   ``--passes`` calls of its ``partial_fit`` on the on-disk array, with
   dask's synchronous scheduler (one block in memory at a time);
3. ``memory``: ``MAFDensity(...).fit`` in memory on the first
   ``--subsample`` rows, for as many row visits as the stream
   (``passes * n_rows / subsample`` epochs at most, with early stopping).

Both models are scored on 100,000 fresh rows; the report gives the mean
log-likelihood, the gap to the true density, wall time and peak memory.

Usage::

    python benchmarks/out_of_core.py --path /tmp/maf-rows [--n-rows 10000000] [--block-rows 250000]
        [--passes 1] [--subsample 1000000] [--batch-size 256] [--n-layers 5] [--hidden-units 100]
        [--phases write stream memory] [--out FILE]
"""

import argparse
import datetime
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _densities import _sine_chain  # noqa: E402
from _machine import cpu_model  # noqa: E402

DENSITY = _sine_chain(dim=10)
N_TEST = 100_000


def _rows(n_rows, seed):
    return DENSITY.sample(n_rows, np.random.default_rng(seed))


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open(path):
    import dask.array as da

    if (path / "zarr.json").exists() or (path / ".zarray").exists():
        return da.from_zarr(str(path))
    return da.from_npy_stack(str(path))


def _model(args):
    from sklearn_maf import MAFDensity

    return MAFDensity(
        n_layers=args.n_layers, hidden_units=args.hidden_units, batch_size=args.batch_size, random_state=0
    )


def phase_write(args):
    import dask.array as da

    start = time.perf_counter()
    block_rows = args.block_rows
    n_blocks = -(-args.n_rows // block_rows)
    chunks = tuple(min(block_rows, args.n_rows - i * block_rows) for i in range(n_blocks))
    # each block from a seed of its own: the same rows whatever the order of writing
    X = da.map_blocks(
        lambda block, block_info=None: _rows(block.shape[0], [1, block_info[0]["chunk-location"][0]]),
        da.zeros((args.n_rows, DENSITY.dim), chunks=(chunks, DENSITY.dim)),
        dtype=np.float64,
    )
    try:
        import zarr  # noqa: F401

        X.to_zarr(str(args.path), overwrite=True, compute=True)
        store = f"zarr {zarr.__version__}"
    except ImportError:
        da.to_npy_stack(str(args.path), X, axis=0)
        store = "dask npy stack"
    size = sum(f.stat().st_size for f in args.path.rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - start, "peak_mib": _peak_mib(), "bytes": size, "store": store}


def phase_stream(args):
    import dask
    from dask_ml.wrappers import Incremental
    from sklearn.exceptions import ConvergenceWarning

    warnings.simplefilter("ignore", ConvergenceWarning)
    X = _open(args.path)
    before = _peak_mib()
    incremental = Incremental(_model(args), shuffle_blocks=True, random_state=0)
    start = time.perf_counter()
    pass_seconds = []
    with dask.config.set(scheduler="synchronous"):
        for _ in range(args.passes):
            begin = time.perf_counter()
            incremental.partial_fit(X)
            pass_seconds.append(time.perf_counter() - begin)
    seconds = time.perf_counter() - start
    X_test = _rows(N_TEST, 2)
    score = incremental.estimator_.score_samples(X_test).mean()
    return {
        "seconds": seconds,
        "pass_seconds": pass_seconds,
        "peak_mib": _peak_mib(),
        "peak_before_mib": before,
        "score": float(score),
        "truth": float(DENSITY.log_prob(X_test).mean()),
        "blocks": len(X.chunks[0]),
        "block_rows": int(X.chunks[0][0]),
        "tail_cut": incremental.estimator_.tail_cut_,
    }


def phase_memory(args):
    from sklearn.exceptions import ConvergenceWarning

    warnings.simplefilter("ignore", ConvergenceWarning)
    X = np.asarray(_open(args.path)[: args.subsample].compute(scheduler="synchronous"))
    max_iter = max(1, round(args.passes * args.n_rows / args.subsample))
    model = _model(args).set_params(max_iter=max_iter)
    start = time.perf_counter()
    model.fit(X)
    seconds = time.perf_counter() - start
    X_test = _rows(N_TEST, 2)
    return {
        "seconds": seconds,
        "peak_mib": _peak_mib(),
        "score": float(model.score_samples(X_test).mean()),
        "truth": float(DENSITY.log_prob(X_test).mean()),
        "epochs": model.n_iter_,
        "max_iter": max_iter,
        "tail_cut": model.tail_cut_,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", type=Path, required=True, help="where the rows are written")
    parser.add_argument("--n-rows", type=int, default=10_000_000)
    parser.add_argument("--block-rows", type=int, default=250_000)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--subsample", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=5)
    parser.add_argument("--hidden-units", type=int, default=100)
    parser.add_argument("--phase", choices=["write", "stream", "memory"], help="run one phase here (internal)")
    parser.add_argument("--phases", nargs="+", default=["write", "stream", "memory"])
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    if args.phase:
        result = globals()[f"phase_{args.phase}"](args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    raw = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for phase in args.phases:
        output = subprocess.run(
            [sys.executable, __file__, *raw, "--phase", phase], check=True, capture_output=True, text=True
        ).stdout
        results[phase] = json.loads(output.rsplit("RESULT ", 1)[1])
        print(phase, results[phase], file=sys.stderr, flush=True)

    import torch

    import sklearn_maf

    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/out_of_core.py", *raw])
    lines = [
        f"- command: `{command}`; date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__}, "
        f"sklearn-maf {sklearn_maf.__version__}; load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- data: {DENSITY.name}, {args.n_rows:,} rows on disk in blocks of {args.block_rows:,}; "
        f"MAFDensity(n_layers={args.n_layers}, hidden_units={args.hidden_units}, batch_size={args.batch_size}, "
        "random_state=0), otherwise the defaults; "
        f"{N_TEST:,} held-out rows",
    ]
    if "write" in results:
        w = results["write"]
        lines.append(
            f"- write ({w['store']}): {w['bytes'] / 2**20:,.0f} MiB on disk in {w['seconds']:.0f} s, "
            f"peak memory {w['peak_mib']:.0f} MiB"
        )
    lines += ["", "| training | rows | held-out log-likelihood | gap to the truth | wall time (s) | peak memory (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    if "stream" in results:
        s = results["stream"]
        lines.append(
            f"| Incremental(MAFDensity()).partial_fit, {args.passes} pass(es) over {s['blocks']} blocks from disk "
            f"(synchronous scheduler) | {args.n_rows:,} | {s['score']:.4f} | {s['truth'] - s['score']:.4f} | "
            f"{s['seconds']:.0f} | {s['peak_mib']:.0f} (after imports: {s['peak_before_mib']:.0f}) |"
        )
    if "memory" in results:
        m = results["memory"]
        lines.append(
            f"| MAFDensity(max_iter={m['max_iter']}).fit in memory ({m['epochs']} epochs) | {args.subsample:,} | "
            f"{m['score']:.4f} | {m['truth'] - m['score']:.4f} | {m['seconds']:.0f} | {m['peak_mib']:.0f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
