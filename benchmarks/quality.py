"""Quality at the defaults: MAFDensity against GaussianMixture and KernelDensity.

Every data set is drawn from a known density with an exact log-density (see
``_densities.py``), so besides the held-out log-likelihood the table reports the
gap to the truth, ``mean over test rows of (log p_true - log p_model)`` in nats:
a Monte-Carlo estimate of KL(p_true || p_model), 0 being the physical limit.

Models, each fitted on the same training rows:

- ``MAFDensity()`` at its defaults (``random_state=0``; ``base="auto"``:
  the multivariate t base on heavy-tailed rows, the Gaussian one elsewhere);
  "MAF-G", "MAF-MoG" and "MAF-t" fix the base (``base="gaussian"``, the
  default before ``"auto"``; ``base="mog"``; ``base="student-t"``);
  "MAF-spline" takes rational-quadratic spline layers (``transformer="spline"``);
- ``GaussianMixture``: full covariance, ``n_components`` chosen by BIC over
  1..10, ``n_init=3``;
- ``KernelDensity``: gaussian kernel on standardised data, bandwidth chosen by
  3-fold ``GridSearchCV`` over 11 values (``rtol=1e-6``); the log-determinant
  of the standardisation is added back so scores are log-densities in the
  units of the data.

The notes give each model's worst row, the largest per-row gap: on
heavy-tailed data one far row can dominate the mean gap of a model whose tails
are too light.

Fit time includes model selection (BIC sweep, cross-validation). Timings are
wall-clock (``time.perf_counter``) and only meaningful on an otherwise idle
machine; the header records the load average.

Test rows: 50,000 per data set by default. With 5,000, the standard error of
a paired difference against GMM on the multivariate t sets was about 0.010
nats (GMM's far rows), as large as the differences being measured.

Usage::

    python benchmarks/quality.py [--quick] [--out FILE] [--datasets a,b] [--models a,b]
        [--n-test N] [--threads N]
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _densities import DENSITIES
from _machine import cpu_model

from sklearn_maf import MAFDensity

GMM_COMPONENTS = range(1, 11)
GMM_N_INIT = 3
KDE_BANDWIDTHS = np.geomspace(0.02, 1.0, 11)  # in standardised units
KDE_CV = 3
# A relative tolerance of 1e-6 on each density changes log-densities by about 1e-6
# nats, and lets the tree prune: 2-D scoring gets several times faster.
KDE_RTOL = 1e-6


# ------------------------------------------------------------------ models


def fit_maf(X, **params):
    model = MAFDensity(random_state=0, **params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X)
    hit_max_iter = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    note = f"{model.n_iter_} epochs" + (" (max_iter reached)" if hit_max_iter else "")
    return model.score_samples, note


def fit_gmm(X):
    best, best_bic = None, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in GMM_COMPONENTS:
            gmm = GaussianMixture(k, covariance_type="full", n_init=GMM_N_INIT, random_state=0)
            bic = gmm.fit(X).bic(X)
            if bic < best_bic:
                best, best_bic = gmm, bic
    note = f"k={best.n_components}"
    if best.n_components == GMM_COMPONENTS[-1]:
        note += " (largest tried)"
    return best.score_samples, note


def fit_kde(X):
    loc, scale = X.mean(axis=0), X.std(axis=0)
    log_det = -np.log(scale).sum()
    search = GridSearchCV(
        KernelDensity(kernel="gaussian", rtol=KDE_RTOL), {"bandwidth": KDE_BANDWIDTHS}, cv=KDE_CV
    )
    search.fit((X - loc) / scale)
    kde = search.best_estimator_
    bandwidth = kde.bandwidth
    note = f"h={bandwidth:.3g}"
    if bandwidth in (KDE_BANDWIDTHS[0], KDE_BANDWIDTHS[-1]):
        note += " (edge of grid)"
    return (lambda Z: kde.score_samples((Z - loc) / scale) + log_det), note


def fit_maf_gaussian(X):
    """The Gaussian base, whatever the data (the default before ``base="auto"``)."""
    return fit_maf(X, base="gaussian")


def fit_maf_mog(X):
    """The paper's MAF MoG: a MADE MoG base under the MAF layers."""
    return fit_maf(X, base="mog", n_components=10)


def fit_maf_t(X):
    """Independent Student t's with learned degrees of freedom as the base."""
    return fit_maf(X, base="student-t")


def fit_maf_spline(X):
    """Rational-quadratic spline MAF layers (``transformer="spline"``), the defaults otherwise."""
    return fit_maf(X, transformer="spline")


MODELS = {
    "MAF": fit_maf,
    "MAF-G": fit_maf_gaussian,
    "MAF-MoG": fit_maf_mog,
    "MAF-t": fit_maf_t,
    "MAF-spline": fit_maf_spline,
    "GMM": fit_gmm,
    "KDE": fit_kde,
}
# The flows compared, each on its own line of the summary, with the better baseline.
FLOWS = ("MAF", "MAF-G", "MAF-MoG", "MAF-t", "MAF-spline")


# --------------------------------------------------------------- the bench


def draw(density, n_train, n_test):
    """Training and test rows from fixed, independent seeds per data set."""
    key = zlib.crc32(density.name.encode())
    X_train = density.sample(n_train, np.random.default_rng([key, 0]))
    X_test = density.sample(n_test, np.random.default_rng([key, 1]))
    return X_train, X_test


def evaluate(density, n_train, n_test, models):
    X_train, X_test = draw(density, n_train, n_test)
    true = density.log_prob(X_test)
    rows = [{"model": "truth", "loglik": true.mean(), "gap": 0.0, "gap_se": 0.0, "per_row": true}]
    for name in models:
        start = time.perf_counter()
        score_samples, note = MODELS[name](X_train)
        fit_time = time.perf_counter() - start
        start = time.perf_counter()
        log_p = score_samples(X_test)
        score_time = time.perf_counter() - start
        n_bad = int(np.sum(~np.isfinite(log_p)))
        if n_bad:
            note += f"; {n_bad} non-finite test scores"
        finite = np.isfinite(log_p)
        diff = true[finite] - log_p[finite]
        note += f"; worst row {diff.max():.1f}"
        rows.append(
            {
                "model": name,
                "loglik": log_p.mean(),
                "gap": diff.mean(),
                "gap_se": diff.std(ddof=1) / np.sqrt(diff.size),
                "fit_time": fit_time,
                "score_time": score_time,
                "note": note,
                "per_row": log_p,
            }
        )
        print(f"  {name}: gap {diff.mean():.4f} nats, fit {fit_time:.1f}s, {note}", flush=True)
    return rows


def maf_versus_best(rows, flow="MAF"):
    """Paired difference (nats/row) between ``flow`` and the better of GMM and KDE."""
    by_model = {row["model"]: row for row in rows}
    others = [by_model[m] for m in ("GMM", "KDE") if m in by_model]
    if flow not in by_model or not others:
        return None
    best = max(others, key=lambda row: row["loglik"])
    diff = by_model[flow]["per_row"] - best["per_row"]
    diff = diff[np.isfinite(diff)]
    return best["model"], diff.mean(), diff.std(ddof=1) / np.sqrt(diff.size)


# ------------------------------------------------------------------ report


def machine_header(argv, n_train, n_test):
    cpu = cpu_model()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: nproc={os.cpu_count()}, CPU: {cpu}",
        (
            f"- torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}, Python {platform.python_version()}"
        ),
        f"- rows: {n_train} training, {n_test} test per data set",
        f"- load average at start (1, 5, 15 min): {load}",
    ]


def markdown_table(results):
    lines = [
        "| data set | model | test log-lik (nats/row) | gap to truth (nats) | fit time (s) | score time (s) | notes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for density, rows in results:
        for row in rows:
            if row["model"] == "truth":
                description = density.description.replace("|", "\\|")
                lines.append(f"| {density.name} | truth | {row['loglik']:.3f} | 0 | | | {description} |")
                continue
            lines.append(
                f"| {density.name} | {row['model']} | {row['loglik']:.3f} | "
                f"{row['gap']:.3f} ± {row['gap_se']:.3f} | {row['fit_time']:.1f} | "
                f"{row['score_time']:.2f} | {row['note']} |"
            )
    return lines


def summary(results, n_train):
    lines = [
        "",
        (
            "Each flow minus the better of GMM and KDE, paired over the test rows "
            "(nats/row, ± one standard error; positive means the flow is better):"
        ),
        "",
    ]
    for density, rows in results:
        for flow in FLOWS:
            comparison = maf_versus_best(rows, flow)
            if comparison is not None:
                other, mean, se = comparison
                verdict = f"{flow} better" if mean > 2 * se else f"{flow} worse" if mean < -2 * se else "tie"
                lines.append(
                    f"- {density.name} ({density.family}), {flow}: {mean:+.3f} ± {se:.3f} vs {other} — {verdict}"
                )
    eight_d = [
        (density.name, row["fit_time"])
        for density, rows in results
        for row in rows
        if row["model"] == "MAF" and density.dim == 8
    ]
    if eight_d:
        times = ", ".join(f"{name} {t:.1f} s" for name, t in eight_d)
        lines += [
            "",
            (
                f"MAFDensity() fit time on {n_train:,} x 8: {times} "
                "(requirement: under 60 s for 10,000 x 8 on 2 cores)."
            ),
        ]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2,000 training and 1,000 test rows")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--datasets", help=f"comma-separated subset of: {', '.join(DENSITIES)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--n-test", type=int, default=50_000, help="test rows per data set (default 50,000)")
    parser.add_argument(
        "--threads",
        type=int,
        help="limit torch and BLAS threads (default: the libraries' own choice); "
        "on a busy machine 1 can be much faster than oversubscribed cores",
    )
    args = parser.parse_args(argv)

    n_train, n_test = (2_000, 1_000) if args.quick else (10_000, args.n_test)
    names = args.datasets.split(",") if args.datasets else list(DENSITIES)
    unknown = set(names) - set(DENSITIES)
    if unknown:
        parser.error(f"unknown data sets {sorted(unknown)}; choose from {list(DENSITIES)}")
    models = args.models.split(",")
    if set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {list(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    header = machine_header(["python"] + sys.argv, n_train, n_test)
    results = []
    total = time.perf_counter()
    for name in names:
        print(f"{name} ...", flush=True)
        results.append((DENSITIES[name], evaluate(DENSITIES[name], n_train, n_test, models)))
    total = time.perf_counter() - total

    report = ["# sklearn-maf: quality at the defaults", "", *header]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report += [f"- load average at end: {load}; total run time {total:.0f} s", ""]
    report += markdown_table(results) + summary(results, n_train)
    text = "\n".join(report) + "\n"
    print()
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
