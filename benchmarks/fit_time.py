"""Wall time of ``MAFDensity().fit`` at its defaults on 10,000 x 8 and 20,000 x 8 rows.

Issue 2 asks for 10,000 x 8 rows in under a minute on 2 cores, issue 3 for
20,000 x 8 in under 30 s. Every fit runs at the defaults (torch's own thread
count, all cores), one after another, on the 8-dimensional known densities
of ``_densities.py`` and on ``speed.py``'s Gaussian mixture. Only meaningful
on an otherwise idle machine; the header records the load.

Each fit is followed by the same fit with ``reference=None``: the flow's
training is identical (the reference is fitted after it, from its own seed),
so the ratio is what the classical reference (``reference="gmm"``, the
default) adds to the fit time.

Usage::

    python benchmarks/fit_time.py [--out FILE] [--rows 10000,20000]
"""

import argparse
import datetime
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _densities import DENSITIES  # noqa: E402
from speed import mixture  # noqa: E402

from sklearn_maf import MAFDensity  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--rows", default="10000,20000", help="comma-separated training sizes")
    args = parser.parse_args(argv)
    lines = [
        f"- command: `python benchmarks/fit_time.py {' '.join(argv or sys.argv[1:])}`; date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {os.cpu_count()} cores, torch {torch.__version__} at {torch.get_num_threads()} threads, "
        f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        "| data | rows | fit wall time (s) | epochs | with reference=None (s) | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sets = [(name, DENSITIES[name]) for name in ("sine-chain-8d", "student-t-8d", "mixture-8d")]
    for n_rows in (int(rows) for rows in args.rows.split(",")):
        for name, density in sets:
            X = density.sample(n_rows, np.random.default_rng(0))
            lines.append(_row(name, X))
            print(lines[-1], flush=True)
        lines.append(_row("speed.py mixture-8d", mixture(n_rows, 8)))
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


def _row(name, X):
    times = []
    for params in ({}, {"reference": None}):
        model = MAFDensity(random_state=0, **params)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X)
        times.append(time.perf_counter() - start)
    return (
        f"| {name} | {X.shape[0]:,} | {times[0]:.1f} | {model.n_iter_} | {times[1]:.1f} | "
        f"{times[0] / times[1]:.2f} |"
    )


if __name__ == "__main__":
    main()
