"""partial_fit against fit on the same rows for the same number of passes (issue 21).

The rows (``sine-chain-6d`` of ``_densities.py``, curved, with an exact
log-density) are cut into ``--chunks`` chunks; ``partial_fit`` streams them
``--passes`` times, in order and in a fresh random order each pass, and
``fit`` trains on all of them for ``--passes`` epochs, with and without early
stopping. Every model is scored on 20,000 held-out rows: the table gives the
mean log-likelihood per row, the gap to the true density, the difference to
``fit`` without early stopping (the same rows and epochs as the stream), and
the wall time. Side by side in one process, for each ``--seeds``.

Usage::

    python benchmarks/streaming.py [--n-rows 12000] [--chunks 6] [--passes 20] [--seeds 0 1 2] [--out FILE]
"""

import argparse
import datetime
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _densities import _sine_chain  # noqa: E402
from _machine import cpu_model  # noqa: E402

import sklearn_maf  # noqa: E402
from sklearn_maf import MAFDensity  # noqa: E402


def _stream(X, n_chunks, n_passes, seed, shuffle):
    model = MAFDensity(random_state=seed)
    chunks = np.array_split(X, n_chunks)
    rng = np.random.RandomState(seed)
    for _ in range(n_passes):
        for i in rng.permutation(n_chunks) if shuffle else range(n_chunks):
            model.partial_fit(chunks[i])
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-rows", type=int, default=12_000)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", ConvergenceWarning)
    density = _sine_chain(dim=6)

    configurations = [
        ("fit, early stopping", lambda X, s: MAFDensity(max_iter=args.passes, random_state=s).fit(X)),
        (
            "fit, no early stopping",
            lambda X, s: MAFDensity(max_iter=args.passes, early_stopping=False, random_state=s).fit(X),
        ),
        ("partial_fit, chunks in order", lambda X, s: _stream(X, args.chunks, args.passes, s, False)),
        ("partial_fit, chunks shuffled", lambda X, s: _stream(X, args.chunks, args.passes, s, True)),
    ]
    results = {name: [] for name, _ in configurations}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        X, X_test = density.sample(args.n_rows, rng), density.sample(20_000, rng)
        truth = density.log_prob(X_test).mean()
        for name, train in configurations:
            start = time.perf_counter()
            model = train(X, seed)
            seconds = time.perf_counter() - start
            score = model.score_samples(X_test).mean()
            results[name].append((score, truth - score, seconds, model.tail_cut_))
            print(f"seed {seed}, {name}: {score:.4f} (gap {truth - score:.4f}), {seconds:.1f} s", file=sys.stderr, flush=True)

    reference = np.array([r[0] for r in results["fit, no early stopping"]])
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/streaming.py", *(argv or sys.argv[1:])])
    lines = [
        f"- command: `{command}`; date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__}, "
        f"sklearn-maf {sklearn_maf.__version__}; load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- data: {density.name}, {args.n_rows} training rows in {args.chunks} chunks, {args.passes} passes "
        f"(fit: max_iter={args.passes}), 20,000 held-out rows; MAFDensity defaults; seeds {args.seeds}",
        "",
        "| configuration | held-out log-likelihood | gap to the truth | minus fit without early stopping | wall time (s) | tail_cut_ |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rows in results.items():
        scores = np.array([r[0] for r in rows])
        gaps = np.array([r[1] for r in rows])
        diff = scores - reference
        seconds = np.array([r[2] for r in rows])
        lines.append(
            f"| {name} | {scores.mean():.4f} | {gaps.mean():.4f} | {diff.mean():+.4f} "
            f"({', '.join(f'{d:+.4f}' for d in diff)}) | {seconds.mean():.1f} | "
            f"{', '.join(str(r[3]) for r in rows)} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
