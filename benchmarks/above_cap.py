"""Beyond the density suite's 20,000 training rows: MAFDensity against GaussianMixture on more rows.

The suite (``density_suite.py``) stops at 20,000 training rows, as the
classical reference's own row cap does. This script draws more rows of the
known densities of ``_densities.py``, fits ``MAFDensity(random_state=seed)``
and ``GaussianMixture`` (BIC over 1..10 components, as the suite fits it)
on the same rows, and prints each one's gap to the true density on 5,000
new rows (nats per row, 0 is the limit) with the paired difference and its
standard error, and their fit times. To compare two versions of the library,
run it with each on ``PYTHONPATH``.

Usage::

    python benchmarks/above_cap.py [--rows 33000] [--sets mixture-8d,ring-8-2d,student-t-8d] [--seeds 0]
"""

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _densities import DENSITIES  # noqa: E402
from _machine import cpu_model  # noqa: E402
from density_suite import fit_gmm, paired  # noqa: E402

import sklearn_maf  # noqa: E402
from sklearn_maf import MAFDensity  # noqa: E402

TEST_ROWS = 5_000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=33_000, help="training rows")
    parser.add_argument("--sets", default="mixture-8d,ring-8-2d,student-t-8d", help="densities of _densities.py")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"- command: `python benchmarks/above_cap.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"- sklearn_maf from {Path(sklearn_maf.__file__).parent}; date: {now}; CPU: {cpu_model()}\n")
    print("| density | rows | seed | MAF gap | GMM gap | MAF - GMM | MAF fit (s) | GMM fit (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.sets.split(","):
        density = DENSITIES[name]
        for seed in map(int, args.seeds.split(",")):
            X = density.sample(args.rows, np.random.default_rng([seed, 0]))
            X_test = density.sample(TEST_ROWS, np.random.default_rng([seed, 1]))
            truth = density.log_prob(X_test)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                start = time.perf_counter()
                maf = MAFDensity(random_state=seed).fit(X)
                t_maf = time.perf_counter() - start
                start = time.perf_counter()
                gmm, note, _ = fit_gmm(X, seed)
                t_gmm = time.perf_counter() - start
            maf_scores, gmm_scores = maf.score_samples(X_test), gmm(X_test)
            difference, se = paired(maf_scores, gmm_scores)
            print(
                f"| {name} | {args.rows:,} | {seed} | {np.mean(truth - maf_scores):.4f} | "
                f"{np.mean(truth - gmm_scores):.4f} ({note}) | {difference:+.4f} ± {se:.4f} | {t_maf:.1f} | {t_gmm:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
