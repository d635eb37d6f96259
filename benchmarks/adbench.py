"""Outlier detection on ADBench: MAFOutlierDetector against 12 classical detectors.

Data: every tabular set of ADBench's "Classical" collection found in
``../shared/data/adbench`` (Han et al., "ADBench: Anomaly Detection
Benchmark", NeurIPS 2022; 43 of its 47 sets are stored there). ``np.load``
gives ``X`` and ``y``, ``y == 1`` an anomaly. Nothing is downloaded: without
the folder the real-data part says so and is skipped.

Protocol, ADBench's semi-supervised setting without labelled anomalies
(novelty detection): fit on a random 70% of the inliers, score the other 30%
of the inliers and every anomaly. Each seed draws its own split and seeds
every model. Sets of more than ``--max-rows`` rows (10,000) are first
subsampled, stratified by label with a fixed seed (at least 10 anomalies kept,
so that smtp's 0.03% still gives a usable ROC AUC), the same rows for every
seed and model.

Synthetic anomalies, ADBench's four types (section 3.3 of the paper),
generated on the real rows of scikit-learn's bundled sets (iris, wine,
breast cancer, diabetes, digits; all of them treated as inliers), min-max
scaled as ADBench does, one anomaly for every ten inliers:

- **local**: from a Gaussian mixture fitted to the inliers (components by BIC,
  1 to 5) with every covariance scaled by 5;
- **global**: uniform on each feature's range widened by 10% (ADBench's
  ``alpha = 1.1``);
- **dependency**: each feature drawn independently from a Gaussian kernel
  density of its own inlier values (Silverman's bandwidth): every marginal is
  right, the dependence between features is gone;
- **clustered**: from the mixture fitted for "local" with every mean scaled by
  5 (``alpha = 5``), covariances kept.

The split and the protocol are those of the real sets.

Detectors, each at its usual best use, ``random_state=seed`` where it has one.
"Scaled" means a ``StandardScaler`` fitted on the training rows comes first:
distances and kernels need features on one scale, ADBench min-max scales for
the same reason.

- ``MAFOutlierDetector()`` at its defaults (it chooses its own preprocessing);
- ``MAFDensity()`` at its defaults on the raw rows (``score_samples``);
- ``IsolationForest()`` on the raw rows (trees do not care about scale);
- ``LocalOutlierFactor(novelty=True)``, scaled;
- ``OneClassSVM()`` (``gamma="scale"``, ``nu=0.5``), scaled;
- ``GaussianMixture``, scaled, full covariances, ``reg_covar=1e-6``, the
  number of components (1, 2, 4 or 8) chosen by BIC on the training rows;
- ``KernelDensity()`` (Gaussian kernel, bandwidth 1 in units of each
  feature's standard deviation), scaled, evaluated exactly (``leaf_size``
  beyond the training rows: scikit-learn's tree pruning overstates
  log-densities in many dimensions, by 76 nats at 100 features);
- PyOD's ``KNN()`` (distance to the 5th neighbour), scaled; ``ECOD()``,
  ``COPOD()``, ``HBOS()`` (per-feature, scale-free); ``LODA()`` and
  ``CBLOF()`` (random projections and k-means: scaled).

``OneClassSVM`` and ``KernelDensity`` fit on a random subset of at most
``--max-kernel-rows`` training rows (10,000) when there are more (their cost
grows with the square of, or in proportion to, the training set); with the
default ``--max-rows`` this never happens. A detector that raises is recorded
with ROC AUC and average precision of a random ranking (0.5 and the anomaly
rate) and listed under the tables.

Reported: ROC AUC and average precision per set (mean over seeds), their
mean over sets, the average rank by ROC AUC (1 = best; ties share the mean
rank), the number of sets where each detector has the best ROC AUC (ties
count for all), and fit + score time: the total, and for the MAF detectors
the largest and median ratio, per set, to GaussianMixture's.

Usage::

    python benchmarks/adbench.py [--quick] [--jobs N] [--out FILE] [--cache FILE]
                                 [--datasets a,b] [--seeds N] [--parts real,synthetic]

``--quick`` runs one seed on at most 2,000 rows of the 12 smallest sets and
on the synthetic types of the three smallest bundled sets. ``--jobs`` runs
that many processes (one torch thread each). ``--cache`` keeps every finished
(set, seed) in a JSON-lines file and reuses it when the run restarts. Prints
Markdown; timings on a shared machine are indicative only.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs
from sklearn import datasets as sk_datasets
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from sklearn.svm import OneClassSVM

import sklearn_maf
from sklearn_maf import MAFDensity, MAFOutlierDetector

REPO = Path(__file__).resolve().parent.parent
DATA_CANDIDATES = [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
TRAIN_FRACTION = 0.7
MIN_ANOMALIES = 10
SYNTHETIC_SETS = ["iris", "wine", "breast_cancer", "diabetes", "digits"]
SYNTHETIC_TYPES = ["local", "global", "dependency", "clustered"]
SYNTHETIC_RATIO = 0.1  # anomalies per inlier
MAF_MODELS = ("MAFOutlierDetector", "MAFDensity")


# ------------------------------------------------------------------ detectors


def scaled(estimator):
    return make_pipeline(StandardScaler(), estimator)


class _PyOD:
    """A PyOD detector with scikit-learn's sign: ``score_samples`` higher = more typical."""

    def __init__(self, detector, scale):
        self.detector = detector
        self.scale = scale

    def fit(self, X):
        self.scaler = StandardScaler().fit(X) if self.scale else None
        self.detector.fit(self._prepare(X))
        return self

    def _prepare(self, X):
        return X if self.scaler is None else self.scaler.transform(X)

    def score_samples(self, X):
        return -self.detector.decision_function(self._prepare(X))


class _BICMixture:
    """GaussianMixture on scaled rows, its number of components chosen by BIC."""

    def __init__(self, seed):
        self.seed = seed

    def fit(self, X):
        self.scaler = StandardScaler().fit(X)
        Z = self.scaler.transform(X)
        best = None
        for k in (1, 2, 4, 8):
            if k > Z.shape[0] // 2:
                break
            gmm = GaussianMixture(k, reg_covar=1e-6, random_state=self.seed).fit(Z)
            if best is None or gmm.bic(Z) < best.bic(Z):
                best = gmm
        self.gmm = best
        return self

    def score_samples(self, X):
        return self.gmm.score_samples(self.scaler.transform(X))


def pyod(name, seed):
    from pyod.models.cblof import CBLOF
    from pyod.models.copod import COPOD
    from pyod.models.ecod import ECOD
    from pyod.models.hbos import HBOS
    from pyod.models.knn import KNN
    from pyod.models.loda import LODA

    if name == "KNN":
        return _PyOD(KNN(), scale=True)
    if name == "ECOD":
        return _PyOD(ECOD(), scale=False)
    if name == "COPOD":
        return _PyOD(COPOD(), scale=False)
    if name == "HBOS":
        return _PyOD(HBOS(), scale=False)
    if name == "LODA":
        return _PyOD(LODA(random_state=seed), scale=True)
    if name == "CBLOF":
        return _PyOD(CBLOF(random_state=seed), scale=True)
    raise KeyError(name)


DETECTORS = {
    "MAFOutlierDetector": lambda seed: MAFOutlierDetector(random_state=seed),
    "MAFDensity": lambda seed: MAFDensity(random_state=seed),
    "IsolationForest": lambda seed: IsolationForest(random_state=seed),
    "LOF": lambda seed: scaled(LocalOutlierFactor(novelty=True)),
    "OneClassSVM": lambda seed: scaled(OneClassSVM()),
    "GaussianMixture": lambda seed: _BICMixture(seed),
    # leaf_size beyond the rows: one leaf, every kernel summed (the tree's pruning
    # overstates log-densities in many dimensions; see density_suite.KDE_LEAF_ROWS)
    "KernelDensity": lambda seed: scaled(KernelDensity(leaf_size=10**9)),
    **{name: (lambda seed, name=name: pyod(name, seed)) for name in ("KNN", "ECOD", "COPOD", "HBOS", "LODA", "CBLOF")},
}
KERNEL_MODELS = {"OneClassSVM", "KernelDensity"}


def fit_score(name, seed, X_train, X_test, max_kernel_rows):
    """Fit detector ``name``; return (scores of X_test, seconds, note)."""
    note = ""
    if name in KERNEL_MODELS and X_train.shape[0] > max_kernel_rows:
        rows = np.random.RandomState(seed).choice(X_train.shape[0], max_kernel_rows, replace=False)
        X_train = X_train[rows]
        note = f"fit on {max_kernel_rows} rows"
    start = time.perf_counter()
    model = DETECTORS[name](seed).fit(X_train)
    scores = model.score_samples(X_test)
    elapsed = time.perf_counter() - start
    if name == "MAFOutlierDetector" and hasattr(model, "preprocessing_"):
        note = f"{model.preprocessing_}/{model.base_}"
    return scores, elapsed, note


def metrics(y, scores):
    # Anomalies are the positive class; a low score means anomalous. -inf
    # scores (underflow) rank as most anomalous, NaN as least.
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=np.inf, posinf=np.finfo(np.float64).max,
                           neginf=-np.finfo(np.float64).max)
    return roc_auc_score(y, -scores), average_precision_score(y, -scores)


# ------------------------------------------------------------------ data


def find_data(argument):
    candidates = [Path(argument)] if argument else DATA_CANDIDATES
    for path in candidates:
        if (path / "adbench").is_dir():
            return path / "adbench"
    return None


def real_names(folder):
    return sorted((p.stem for p in folder.glob("*.npz")), key=lambda s: int(s.split("_")[0]))


def load(folder, name, max_rows):
    data = np.load(folder / f"{name}.npz")
    X, y = data["X"].astype(np.float64), data["y"].astype(int).ravel()
    if max_rows and X.shape[0] > max_rows:
        # stratified: keep the anomaly rate, with at least MIN_ANOMALIES anomalies
        rng = np.random.RandomState(0)
        anomalies = np.flatnonzero(y == 1)
        n_anomalies = min(anomalies.size, max(MIN_ANOMALIES, round(max_rows * anomalies.size / y.size)))
        keep = np.concatenate([
            rng.choice(np.flatnonzero(y == 0), max_rows - n_anomalies, replace=False),
            rng.choice(anomalies, n_anomalies, replace=False),
        ])
        X, y = X[np.sort(keep)], y[np.sort(keep)]
    return X, y


def bundled(name):
    loader = getattr(sk_datasets, f"load_{name}")
    return loader(return_X_y=True)[0].astype(np.float64)


def synthetic_anomalies(X, kind, n, rng):
    """``n`` anomalies of ADBench's type ``kind`` for the (min-max scaled) inliers ``X``."""
    if kind == "global":
        low, high = X.min(axis=0), X.max(axis=0)
        centre, half = (low + high) / 2, (high - low) / 2
        return rng.uniform(centre - 1.1 * half, centre + 1.1 * half, size=(n, X.shape[1]))
    if kind == "dependency":
        # each feature from a Gaussian KDE of its own values, independently
        out = np.empty((n, X.shape[1]))
        for j, column in enumerate(X.T):
            spread = min(column.std(), scipy.stats.iqr(column) / 1.34) or column.std()
            bandwidth = 0.9 * spread * column.size ** -0.2
            out[:, j] = rng.choice(column, n) + bandwidth * rng.normal(size=n)
        return out
    seed = int(rng.randint(2**31 - 1))
    best = None
    for k in range(1, 6):
        gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(X)
        if best is None or gmm.bic(X) < best.bic(X):
            best = gmm
    if kind == "local":
        best.covariances_ = best.covariances_ * 5.0
    elif kind == "clustered":
        best.means_ = best.means_ * 5.0
    else:
        raise ValueError(f"unknown anomaly type {kind!r}")
    best.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(best.covariances_))
    return best.sample(n)[0][rng.permutation(n)]


def synthetic_set(name, kind, seed):
    X = MinMaxScaler().fit_transform(bundled(name))
    X = X[:, X.std(axis=0) > 0]
    rng = np.random.RandomState(1000 + seed)
    n = max(MIN_ANOMALIES, round(SYNTHETIC_RATIO * X.shape[0]))
    A = synthetic_anomalies(X, kind, n, rng)
    return np.vstack([X, A]), np.concatenate([np.zeros(X.shape[0], int), np.ones(n, int)])


def semi_supervised_split(y, seed):
    rng = np.random.RandomState(seed)
    inliers = rng.permutation(np.flatnonzero(y == 0))
    n_train = int(TRAIN_FRACTION * inliers.size)
    return inliers[:n_train], np.concatenate([inliers[n_train:], np.flatnonzero(y == 1)])


# ------------------------------------------------------------------ one unit of work


def run_unit(unit):
    """All detectors on one (part, set, seed); a dict of results per detector."""
    part, name, seed, folder, max_rows, max_kernel_rows, models = unit
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if part == "real":
        X, y = load(Path(folder), name, max_rows)
    else:
        data_name, kind = name.split(":")
        X, y = synthetic_set(data_name, kind, seed)
    train, test = semi_supervised_split(y, seed)
    out = {}
    for model in models:
        try:
            scores, elapsed, note = fit_score(model, seed, X[train], X[test], max_kernel_rows)
            auc, ap = metrics(y[test], scores)
            error = None
        except Exception as exc:  # recorded, ranked as a random detector
            auc, ap, elapsed, note = 0.5, float(np.mean(y[test])), float("nan"), ""
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            traceback.print_exc()
        out[model] = dict(auc=auc, ap=ap, seconds=elapsed, note=note, error=error)
    return dict(part=part, name=name, seed=seed, shape=list(X.shape), anomalies=int(y.sum()), results=out)


# ------------------------------------------------------------------ report


def machine_header(argv, jobs):
    cpu = cpu_model()
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except OSError:
        commit = "unknown"
    import pyod as pyod_module

    return [
        f"- command: `{shlex.join(argv)}`",
        f"- commit: {commit}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: nproc={os.cpu_count()}, CPU: {cpu}, load average at start: {load_avg}; "
        f"{jobs} process(es), one torch thread each",
        f"- versions: python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-learn {sklearn.__version__}, torch {torch.__version__}, pyod {pyod_module.__version__}, "
        f"sklearn-maf {sklearn_maf.__version__}",
    ]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def per_set(records, models, metric):
    """{set: {model: mean over seeds of metric}} in the order the sets were given."""
    values = {}
    for record in records:
        cell = values.setdefault(record["name"], {m: [] for m in models})
        for m in models:
            cell[m].append(record["results"][m][metric])
    return {name: {m: float(np.mean(v)) for m, v in cell.items()} for name, cell in values.items()}


def ranks(values, models):
    """Average rank by value (1 = highest; ties share the mean rank) over sets."""
    total = np.zeros(len(models))
    for cell in values.values():
        total += scipy.stats.rankdata([-cell[m] for m in models])
    return dict(zip(models, total / max(len(values), 1)))


def wins(values, models):
    count = dict.fromkeys(models, 0)
    for cell in values.values():
        best = max(cell[m] for m in models)
        for m in models:
            count[m] += cell[m] >= best - 1e-12
    return count


def summary(records, models):
    auc, ap = per_set(records, models, "auc"), per_set(records, models, "ap")
    rank, win = ranks(auc, models), wins(auc, models)
    # a detector that raised has no time: the sum is over the units it ran
    seconds = {m: float(np.nansum([r["results"][m]["seconds"] for r in records])) for m in models}
    return auc, ap, rank, win, seconds


def bold_best(cells):
    best = max(cells)
    return [f"**{c:.3f}**" if c >= best - 1e-12 else f"{c:.3f}" for c in cells]


def report_part(records, models, title, out):
    auc, ap, rank, win, seconds = summary(records, models)
    seeds = sorted({r["seed"] for r in records})
    mean_auc = {m: np.mean([cell[m] for cell in auc.values()]) for m in models}
    mean_ap = {m: np.mean([cell[m] for cell in ap.values()]) for m in models}
    order = sorted(models, key=lambda m: rank[m])
    out(f"\n### {title}: summary over {len(auc)} sets, {len(seeds)} seed(s)\n")
    out("\n".join(table(
        ["detector", "mean ROC AUC", "mean AP", "average rank (ROC AUC)", "wins (ROC AUC)", "fit + score time (s)"],
        [[m, f"{mean_auc[m]:.3f}", f"{mean_ap[m]:.3f}", f"{rank[m]:.2f}", win[m], f"{seconds[m]:.0f}"] for m in order],
    )))
    comparators = [m for m in models if m not in MAF_MODELS]
    if "MAFOutlierDetector" in models and comparators:
        best_auc = max(comparators, key=lambda m: mean_auc[m])
        best_rank = min(comparators, key=lambda m: rank[m])
        out(
            f"\nMAFOutlierDetector: mean ROC AUC {mean_auc['MAFOutlierDetector']:.3f} against the best comparator's "
            f"{mean_auc[best_auc]:.3f} ({best_auc}), difference {mean_auc['MAFOutlierDetector'] - mean_auc[best_auc]:+.3f}; "
            f"average rank {rank['MAFOutlierDetector']:.2f} against {rank[best_rank]:.2f} ({best_rank})."
        )
    if "GaussianMixture" in models:
        for m in [m for m in MAF_MODELS if m in models]:
            ratio = {}
            for r in records:
                ratio.setdefault(r["name"], []).append(
                    r["results"][m]["seconds"] / max(r["results"]["GaussianMixture"]["seconds"], 1e-9))
            ratio = {name: float(np.nanmean(v)) for name, v in ratio.items() if not np.all(np.isnan(v))}
            worst = max(ratio, key=ratio.get)
            out(
                f"\n{m} fit + score time per set over GaussianMixture's (BIC over 4 sizes): median "
                f"{np.median(list(ratio.values())):.1f}x, largest {ratio[worst]:.1f}x ({worst}); "
                f"above 10x on {sum(v > 10 for v in ratio.values())} of {len(ratio)} sets."
            )
    return auc, ap, mean_auc


def report_real(records, models, out):
    auc, ap, _ = report_part(records, models, "ADBench, semi-supervised", out)
    shapes = {r["name"]: r for r in records}
    for metric, values in (("ROC AUC", auc), ("average precision", ap)):
        out(f"\n### ADBench, semi-supervised: {metric} per set, mean over seeds (best in bold)\n")
        rows = []
        for name, cell in values.items():
            r = shapes[name]
            rows.append([f"{name} ({r['shape'][0]}x{r['shape'][1]}, {r['anomalies']} anom.)"]
                        + bold_best([cell[m] for m in models]))
        out("\n".join(table(["data set"] + [short(m) for m in models], rows)))
    choices = {}
    for r in records:
        note = r["results"].get("MAFOutlierDetector", {}).get("note")
        if note:
            choices.setdefault(note, set()).add(r["name"])
    if choices:
        out("\nMAFOutlierDetector's choice (preprocessing_/base_), sets where some seed took it: " + "; ".join(
            f"{choice}: {len(names)}" for choice, names in sorted(choices.items())) + ".")


def report_synthetic(records, models, out):
    report_part(records, models, "Synthetic anomalies on scikit-learn's bundled sets", out)
    rows = []
    for kind in SYNTHETIC_TYPES:
        kind_records = [r for r in records if r["name"].endswith(":" + kind)]
        if not kind_records:
            continue
        auc = per_set(kind_records, models, "auc")
        rows.append([kind] + bold_best([np.mean([cell[m] for cell in auc.values()]) for m in models]))
    out("\n### Synthetic anomalies: mean ROC AUC per type over the bundled sets and seeds\n")
    out("\n".join(table(["type"] + [short(m) for m in models], rows)))
    rows = []
    for name, cell in per_set(records, models, "auc").items():
        rows.append([name] + bold_best([cell[m] for m in models]))
    out("\n### Synthetic anomalies: ROC AUC per set and type, mean over seeds\n")
    out("\n".join(table(["set:type"] + [short(m) for m in models], rows)))


def short(model):
    return {"MAFOutlierDetector": "MAF-OD", "MAFDensity": "MAF", "IsolationForest": "IForest",
            "OneClassSVM": "OCSVM", "GaussianMixture": "GMM", "KernelDensity": "KDE"}.get(model, model)


def errors(records, out):
    failed = {}
    for r in records:
        for m, res in r["results"].items():
            if res["error"]:
                failed.setdefault(m, []).append(f"{r['name']} seed {r['seed']} ({res['error']})")
    for m, where in failed.items():
        out(f"\n{m} raised (scored as a random ranking) on: " + "; ".join(where) + ".")


def progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed, the 12 smallest sets at most 2,000 rows, 3 bundled sets")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--cache", help="JSON-lines file of finished (set, seed) units, reused on restart")
    parser.add_argument("--datasets", help="comma-separated ADBench file stems (default: all found)")
    parser.add_argument("--synthetic-sets", default=",".join(SYNTHETIC_SETS))
    parser.add_argument("--models", default=",".join(DETECTORS), help="comma-separated detectors")
    parser.add_argument("--parts", default="real,synthetic", help="real, synthetic or both")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--data", help="folder holding adbench/ (default ../shared/data)")
    parser.add_argument("--max-rows", type=int, default=10_000)
    parser.add_argument("--max-kernel-rows", type=int, default=10_000)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in DETECTORS]
    if unknown:
        parser.error(f"unknown detectors {unknown}; known: {list(DETECTORS)}")
    seeds = range(1 if args.quick else args.seeds)
    parts = args.parts.split(",")
    max_rows = 2000 if args.quick else args.max_rows

    units = []
    folder = find_data(args.data)
    if "real" in parts:
        if folder is None:
            print("ADBench data not found (looked for adbench/ in "
                  + ", ".join(str(p) for p in ([args.data] if args.data else DATA_CANDIDATES))
                  + "); the real sets are skipped.")
        else:
            names = args.datasets.split(",") if args.datasets else real_names(folder)
            missing = [n for n in names if not (folder / f"{n}.npz").exists()]
            if missing:
                print(f"Missing from {folder}: {', '.join(missing)}; skipped.")
            names = [n for n in names if n not in missing]
            if args.quick and not args.datasets:
                sizes = {n: np.load(folder / f"{n}.npz")["X"].shape for n in names}
                names = sorted(names, key=lambda n: min(sizes[n][0], max_rows) * sizes[n][1])[:12]
                names = [n for n in real_names(folder) if n in names]
            units += [("real", n, s, str(folder), max_rows, args.max_kernel_rows, models) for s in seeds for n in names]
    if "synthetic" in parts:
        sets = args.synthetic_sets.split(",")[: 3 if args.quick else None]
        units += [("synthetic", f"{n}:{k}", s, None, max_rows, args.max_kernel_rows, models)
                  for s in seeds for n in sets for k in SYNTHETIC_TYPES]

    done = {}
    if args.cache and Path(args.cache).exists():
        for line in Path(args.cache).read_text().splitlines():
            record = json.loads(line)
            if all(m in record["results"] for m in models):
                done[record["part"], record["name"], record["seed"]] = record
    todo = [u for u in units if (u[0], u[1], u[2]) not in done]
    progress(f"{len(units)} units, {len(units) - len(todo)} cached, {len(todo)} to run on {args.jobs} process(es)")

    lines = []

    def out(text):
        print(text, flush=True)
        lines.append(text)

    out("## ADBench outlier detection\n")
    out("\n".join(machine_header(["python"] + sys.argv, args.jobs)))
    out(f"\nSets of more than {max_rows} rows subsampled (stratified, fixed seed, at least {MIN_ANOMALIES} anomalies)"
        + ("; --quick: one seed, the 12 smallest sets, 3 bundled sets." if args.quick else "."))

    # seed by seed (a run cut short leaves whole seeds), largest units first
    # within a seed, so that the processes finish together
    def cost(unit):
        if unit[0] != "real":
            return 0
        shape = np.load(Path(unit[3]) / f"{unit[1]}.npz", mmap_mode="r")["X"].shape
        return min(shape[0], unit[4]) * shape[1] ** 0.5

    todo.sort(key=lambda unit: (unit[2], -cost(unit)))
    start = time.perf_counter()
    if args.jobs > 1:
        pool = get_context("spawn").Pool(args.jobs)
        results = pool.imap_unordered(run_unit, todo)
    else:
        results = map(run_unit, todo)
    for record in results:
        done[record["part"], record["name"], record["seed"]] = record
        if args.cache:
            with open(args.cache, "a") as f:
                f.write(json.dumps(record) + "\n")
        progress(f"{record['part']} {record['name']} seed {record['seed']} done "
                 f"({len(done)}/{len(units)}, {time.perf_counter() - start:.0f} s)")
    if args.jobs > 1:
        pool.close()
    records = [done[u[0], u[1], u[2]] for u in units]
    out(f"\nWall time of the runs (without cached units): {time.perf_counter() - start:.0f} s.")
    real = [r for r in records if r["part"] == "real"]
    synthetic = [r for r in records if r["part"] == "synthetic"]
    if real:
        report_real(real, models, out)
    if synthetic:
        report_synthetic(synthetic, models, out)
    errors(records, out)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
