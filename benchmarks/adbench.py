"""Outlier detection on ADBench: MAFOutlierDetector against scikit-learn's detectors.

Data: the continuous tabular sets of ADBench (Han et al., "ADBench: Anomaly
Detection Benchmark", NeurIPS 2022), read from ``../shared/data/adbench``
(``np.load`` gives ``X`` and ``y``, ``y == 1`` an anomaly). Nothing is
downloaded: without the folder the script says so and exits cleanly.

Settings, as in ADBench:

- **semi-supervised** (novelty detection): fit on a random 70% of the inliers,
  score the other 30% of the inliers and all the anomalies;
- **unsupervised** (outlier detection): fit on every row, anomalies included,
  and score every row.

Each seed draws its own split and seeds every model; tables give the mean over
seeds of ROC AUC and average precision (anomalies are the positive class,
ranked by minus the score).

Models, each at its defaults, ``random_state=seed`` where it has one:

- ``MAFOutlierDetector()``: ``score_samples`` (higher = more typical);
- ``IsolationForest()`` on the raw features (trees do not care about scale);
- ``LocalOutlierFactor(novelty=True)``, ``OneClassSVM()``, ``KernelDensity()``
  and ``GaussianMixture()``, each after a ``StandardScaler`` fitted on the
  training rows. ADBench min-max scales every set; standardising is the
  analogue that keeps the defaults meaningful (``KernelDensity``'s
  ``bandwidth=1.0`` and ``OneClassSVM``'s ``gamma="scale"`` are in units of the
  features). In the unsupervised setting LOF scores the training rows with
  ``negative_outlier_factor_`` (``novelty=False``), its score for the rows it
  was fitted on.
- ``OneClassSVM`` and ``KernelDensity`` fit on a random subset of at most
  ``--max-kernel-rows`` training rows (10,000) when there are more: their cost
  grows with the square of, or in proportion to, the training set. The table
  says where that happened.

Two more tables, semi-supervised:

- **discrete features and the MAF's preprocessing**: how many columns of each
  set are integer-valued, take few distinct values or hold a point mass, and
  the ROC AUC of ``MAFOutlierDetector`` with and without ``dequantize`` and
  ``preprocessing="quantile"``;
- **the "auto" threshold**: the fraction of held-out inliers and of anomalies
  that ``predict`` flags with ``contamination="auto"`` (1% of the validation
  split's scores), next to the same quantile taken on the training rows.

Usage::

    python benchmarks/adbench.py [--quick] [--out FILE] [--datasets a,b] [--seeds N]
                                 [--settings semi-supervised,unsupervised] [--no-ablation]

``--quick`` runs one seed on at most 3,000 rows of each set, without the
ablation. Prints Markdown; timings on a shared machine are indicative only.
"""

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

import sklearn_maf
from sklearn_maf import MAFOutlierDetector

DATASETS = [
    "22_magic.gamma",
    "23_mammography",
    "38_thyroid",
    "6_cardio",
    "31_satimage-2",
    "28_pendigits",
    "32_shuttle",
]
REPO = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
TRAIN_FRACTION = 0.7
AUTO_FRACTION = 0.01  # MAFOutlierDetector's contamination="auto" level

MAF_VARIANTS = {
    "quantile + dequantize (default)": dict(),
    "quantile": dict(dequantize=False),
    "dequantize": dict(preprocessing=None),
    "neither": dict(preprocessing=None, dequantize=False),
}


# ------------------------------------------------------------------ models


def maf(seed, **params):
    return MAFOutlierDetector(random_state=seed, **params)


def scaled(estimator):
    return make_pipeline(StandardScaler(), estimator)


BASELINES = {
    "IsolationForest": lambda seed: IsolationForest(random_state=seed),
    "LOF": lambda seed: scaled(LocalOutlierFactor(novelty=True)),
    "OneClassSVM": lambda seed: scaled(OneClassSVM()),
    "KernelDensity": lambda seed: scaled(KernelDensity()),
    "GaussianMixture": lambda seed: scaled(GaussianMixture(random_state=seed)),
}
KERNEL_MODELS = {"OneClassSVM", "KernelDensity"}
# (data set, seed) -> (test scores, offset_, training scores) of the default
# MAFOutlierDetector in the semi-supervised setting, reused by the ablation
_DEFAULT_MAF = {}


def fit_score(name, seed, X_train, X_test, max_kernel_rows, unsupervised):
    """Fit model ``name`` and return (scores of X_test, seconds, note)."""
    start = time.perf_counter()
    note = ""
    if name == "MAFOutlierDetector":
        model = maf(seed).fit(X_train)
        scores = model.score_samples(X_test)
        if not unsupervised:  # kept for the "auto" threshold table
            note = (model.offset_, model.score_samples(X_train))
    elif name == "LOF" and unsupervised:
        lof = scaled(LocalOutlierFactor()).fit(X_train)
        scores = lof[-1].negative_outlier_factor_
    else:
        if name in KERNEL_MODELS and X_train.shape[0] > max_kernel_rows:
            rows = np.random.RandomState(seed).choice(X_train.shape[0], max_kernel_rows, replace=False)
            X_train = X_train[rows]
            note = f"fit on {max_kernel_rows} rows"
        model = BASELINES[name](seed).fit(X_train)
        scores = model.score_samples(X_test)
    return scores, time.perf_counter() - start, note


def semi_supervised_split(y, seed):
    rng = np.random.RandomState(seed)
    inliers = rng.permutation(np.flatnonzero(y == 0))
    n_train = int(TRAIN_FRACTION * inliers.size)
    return inliers[:n_train], np.concatenate([inliers[n_train:], np.flatnonzero(y == 1)])


def metrics(y, scores):
    # Anomalies are the positive class; a low score means anomalous. -inf
    # scores (underflow) rank as most anomalous.
    anomaly = -np.nan_to_num(scores, neginf=-np.finfo(np.float64).max)
    return roc_auc_score(y, anomaly), average_precision_score(y, anomaly)


# ------------------------------------------------------------------ data


def find_data(argument):
    candidates = [Path(argument)] if argument else DATA_CANDIDATES
    for path in candidates:
        if (path / "adbench").is_dir():
            return path / "adbench"
    return None


def load(folder, name, max_rows, seed=0):
    data = np.load(folder / f"{name}.npz")
    X, y = data["X"].astype(np.float64), data["y"].astype(int)
    if max_rows and X.shape[0] > max_rows:
        # stratified subsample: keep the anomaly rate
        rng = np.random.RandomState(seed)
        keep = np.concatenate(
            [
                rng.choice(np.flatnonzero(y == label), max(1, round(max_rows * np.mean(y == label))), replace=False)
                for label in (0, 1)
            ]
        )
        X, y = X[np.sort(keep)], y[np.sort(keep)]
    return X, y


def describe(X):
    """Counts of integer-valued, few-valued, point-mass and constant columns."""
    n = X.shape[0]
    integer = few = point_mass = constant = 0
    for column in X.T:
        values, counts = np.unique(column, return_counts=True)
        integer += bool(np.all(column == np.round(column)))
        few += values.size <= 20
        point_mass += counts.max() >= 0.1 * n
        constant += values.size == 1
    return integer, few, point_mass, constant


# ------------------------------------------------------------------ report


def machine_header(argv):
    cpu = cpu_model()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"- command: `{shlex.join(argv)}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: nproc={os.cpu_count()}, CPU: {cpu}, load average at start: {load}",
        f"- threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- versions: python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-learn {sklearn.__version__}, torch {torch.__version__}, sklearn-maf {sklearn_maf.__version__}",
    ]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def metric_table(results, datasets, models, metric):
    """Rows: data sets then the mean; columns: models; bold the best of each row."""
    rows = []
    means = {model: [] for model in models}
    for name in datasets:
        values = {model: np.mean(results[name][model][metric]) for model in models}
        best = max(values.values())
        row = [name]
        for model in models:
            means[model].append(values[model])
            cell = f"{values[model]:.3f}"
            row.append(f"**{cell}**" if values[model] == best else cell)
        rows.append(row)
    mean = {model: np.mean(means[model]) for model in models}
    best = max(mean.values())
    rows.append(["**mean**"] + [f"**{mean[m]:.3f}**" if mean[m] == best else f"{mean[m]:.3f}" for m in models])
    return table(["data set"] + models, rows), mean


# ------------------------------------------------------------------ main


def run_setting(folder, datasets, seeds, args, unsupervised, out):
    models = ["MAFOutlierDetector"] + list(BASELINES)
    results, notes, seconds = {}, {}, {m: 0.0 for m in models}
    for name in datasets:
        X, y = load(folder, name, args.max_rows)
        results[name] = {m: {"auc": [], "ap": []} for m in models}
        for seed in seeds:
            if unsupervised:
                train, test = np.arange(X.shape[0]), np.arange(X.shape[0])
            else:
                train, test = semi_supervised_split(y, seed)
            for model in models:
                scores, elapsed, note = fit_score(
                    model, seed, X[train], X[test], args.max_kernel_rows, unsupervised
                )
                auc, ap = metrics(y[test], scores)
                results[name][model]["auc"].append(auc)
                results[name][model]["ap"].append(ap)
                seconds[model] += elapsed
                if model == "MAFOutlierDetector":
                    if note:
                        _DEFAULT_MAF[name, seed] = (scores, *note)
                elif note:
                    notes.setdefault(model, set()).add(f"{name}: {note}")
        progress(f"{'unsupervised' if unsupervised else 'semi-supervised'} {name} done")
    setting = "Unsupervised (fit on all rows, score all rows)" if unsupervised else (
        "Semi-supervised (fit on 70% of the inliers, score the rest and all anomalies)"
    )
    for metric, title in (("auc", "ROC AUC"), ("ap", "average precision")):
        lines, mean = metric_table(results, datasets, models, metric)
        out(f"\n### {setting}: {title}, mean over {len(seeds)} seed(s)\n")
        out("\n".join(lines))
        best_baseline = max(mean[m] for m in BASELINES)
        out(
            f"\nMAFOutlierDetector mean {title} {mean['MAFOutlierDetector']:.3f}; best baseline "
            f"{best_baseline:.3f}; difference {mean['MAFOutlierDetector'] - best_baseline:+.3f}."
        )
    total = sum(seconds.values())
    out("\nFit + score time over all sets and seeds (indicative): " + ", ".join(
        f"{m} {seconds[m]:.0f} s ({seconds[m] / seconds['IsolationForest']:.0f}x IsolationForest)" for m in models
    ) + f"; total {total:.0f} s.")
    for model, where in sorted(notes.items()):
        out(f"\n{model} subsampled: " + "; ".join(sorted(where)) + ".")


def run_ablation(folder, datasets, seeds, args, out):
    header = ["data set", "rows x cols", "integer-valued", "<= 20 values", "point mass >= 10%"]
    header += list(MAF_VARIANTS)
    rows, sums = [], {v: [] for v in MAF_VARIANTS}
    calibration = []
    for name in datasets:
        X, y = load(folder, name, args.max_rows)
        integer, few, point_mass, constant = describe(X)
        aucs = {v: [] for v in MAF_VARIANTS}
        flagged = {"validation": [], "training": []}
        for seed in seeds:
            train, test = semi_supervised_split(y, seed)
            for variant, params in MAF_VARIANTS.items():
                if not params and (name, seed) in _DEFAULT_MAF:
                    scores, offset, train_scores = _DEFAULT_MAF[name, seed]
                else:
                    model = maf(seed, **params).fit(X[train])
                    scores, offset = model.score_samples(X[test]), model.offset_
                    train_scores = model.score_samples(X[train])
                aucs[variant].append(metrics(y[test], scores)[0])
                if not params:
                    # the "auto" offset (validation split) against the same
                    # quantile of the training rows' scores
                    training_offset = np.quantile(train_scores, AUTO_FRACTION)
                    for key, offset in (("validation", offset), ("training", training_offset)):
                        out_flags = scores < offset
                        flagged[key].append((out_flags[y[test] == 0].mean(), out_flags[y[test] == 1].mean()))
        row = [name, f"{X.shape[0]} x {X.shape[1]}", integer, few, point_mass]
        for variant in MAF_VARIANTS:
            sums[variant].append(np.mean(aucs[variant]))
            row.append(f"{np.mean(aucs[variant]):.3f}")
        rows.append(row)
        calibration.append(
            [name]
            + [f"{100 * np.mean([f[i] for f in flagged[key]]):.1f}%" for key in ("validation", "training") for i in (0, 1)]
        )
        if constant:
            row[0] += f" ({constant} constant)"
        progress(f"ablation {name} done")
    rows.append(["**mean**", "", "", "", ""] + [f"{np.mean(sums[v]):.3f}" for v in MAF_VARIANTS])
    out(f"\n### Discrete features and MAFOutlierDetector's preprocessing: semi-supervised ROC AUC, mean over {len(seeds)} seed(s)\n")
    out("\n".join(table(header, rows)))
    out(
        f"\n### contamination=\"auto\": rows flagged by predict, semi-supervised, mean over {len(seeds)} seed(s)\n\n"
        f"Threshold = the {AUTO_FRACTION:.0%} quantile of the scores of the validation split (what \"auto\" does), "
        "or of the training rows; the target is to flag about "
        f"{AUTO_FRACTION:.0%} of new inliers.\n"
    )
    out("\n".join(table(
        ["data set", "inliers flagged (validation)", "anomalies flagged (validation)",
         "inliers flagged (training)", "anomalies flagged (training)"],
        calibration,
    )))


def progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, at most 3000 rows per set, no ablation")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated file stems")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--data", help="folder holding adbench/ (default ../shared/data)")
    parser.add_argument("--max-kernel-rows", type=int, default=10_000)
    parser.add_argument("--no-ablation", action="store_true", help="skip the preprocessing and threshold tables")
    parser.add_argument(
        "--settings", default="semi-supervised,unsupervised", help="which settings to run (comma-separated)"
    )
    args = parser.parse_args(argv)
    args.max_rows = 3000 if args.quick else None
    seeds = range(1 if args.quick else args.seeds)

    folder = find_data(args.data)
    if folder is None:
        print("ADBench data not found (looked for adbench/ in "
              + ", ".join(str(p) for p in ([args.data] if args.data else DATA_CANDIDATES))
              + "); nothing to benchmark.")
        return 0
    datasets = args.datasets.split(",")
    missing = [name for name in datasets if not (folder / f"{name}.npz").exists()]
    if missing:
        print(f"Missing from {folder}: {', '.join(missing)}; skipped.")
        datasets = [name for name in datasets if name not in missing]

    lines = []

    def out(text):
        print(text, flush=True)
        lines.append(text)

    out("## ADBench outlier detection: MAFOutlierDetector against scikit-learn's detectors\n")
    out("\n".join(machine_header(["python"] + sys.argv)))
    if args.max_rows:
        out(f"\n--quick: one seed; sets with more than {args.max_rows} rows are subsampled (stratified).")
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    settings = args.settings.split(",")
    if "semi-supervised" in settings:
        run_setting(folder, datasets, seeds, args, unsupervised=False, out=out)
    if "unsupervised" in settings:
        run_setting(folder, datasets, seeds, args, unsupervised=True, out=out)
    if not (args.quick or args.no_ablation):
        run_ablation(folder, datasets, seeds, args, out)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
