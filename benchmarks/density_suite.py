"""A broad held-out density benchmark: MAFDensity against GaussianMixture and KernelDensity.

Data (every set is used as tabular density data; nothing is downloaded):

- **adbench**: the inliers (``y == 0``) of every set in ``../shared/data/adbench``
  (skipped with a message when the folder is absent). Constant columns (over
  the set's inliers) are dropped; integer-valued columns are dequantised with
  U(0, 1) noise, one noisy copy per split that every model shares; a column
  constant on a split's training rows is dropped from that split for every
  model (the table says how many).
- **sklearn**: scikit-learn's bundled real sets: iris, wine, diabetes (raw
  units, ``scaled=False``, without its two-valued sex column), breast_cancer,
  digits; the same column rules (digits' pixels and diabetes' integer columns
  are dequantised).
- **generated**: the densities of ``_densities.py``, each with its exact
  log-density, so the table also gives each model's gap to the truth in nats;
  the last six (one Gaussian, lognormal, Cauchy, uniform, checkerboard, a
  thin shell) were added after the defaults were set, as families they were
  never tuned on.
- **sk-generated**: 6,000 rows from each of scikit-learn's sample generators
  (``random_state=0``), as a user's first try would be: ``make_classification`` (10 features, 3 informative, 2 redundant:
  exact linear combinations), ``make_regression`` (4 features and the
  target, noise 0.01: nearly collinear), ``make_swiss_roll``,
  ``make_s_curve``, ``make_circles``, ``make_moons`` (noise 0.05),
  ``make_blobs`` (4 centres of spreads 0.05 to 5), ``make_friedman1``'s
  features (uniform on a cube), ``make_gaussian_quantiles`` (8-D); treated
  as real sets (the same splits and column rules), no known density. (Most
  of these kinds, at other sizes and seeds, were swept for weaknesses; no
  setting of the library was chosen on them.)
- **stress**: 6,000 rows (``random_state=0``) of kinds that break density
  estimators, added after the defaults were set and never tuned on:
  scikit-learn's ``make_low_rank_matrix`` (10 features, effective rank 3),
  ``make_sparse_uncorrelated`` and ``make_friedman2``/``3`` (features and
  target), ``make_hastie_10_2``, ``make_biclusters``; half the rows one
  record, 1% of the rows scaled by 10,000, a binary column coded 0.3/0.7,
  correlated Poisson counts, a column of spread 1e-9, spreads from 1e-6 to
  1e6 with an offset of 3e9, a column the sum of two others to 1e-4, 30%
  exact zeros in a continuous column, cubed Cauchy draws, and 60 rows of 50
  correlated features. Treated as real sets (the same splits and column
  rules).

Splits: for a real set of n inlier rows, seed s shuffles the rows, takes
``min(round(0.2 n), 5,000)`` test rows, and the training rows are the first
``min(rest, 500)`` ("small") or ``min(rest, 20,000)`` ("large") of the rest
(and, with ``--sizes tiny``, the first 30: "tiny"),
so the small training set is part of the large one and both are scored on the
same test rows. A set with at most 500 rows left for training has one size
("small"). Generated sets draw (30,) 500 or 20,000 training rows and 5,000 test
rows per seed. Seed s is the split's seed, the dequantisation noise's and
every model's ``random_state``; the default seeds are 0, 1, 2.

Models, fitted on the same training rows:

- **MAF**: ``MAFDensity(random_state=seed, **params)``, ``params`` from
  ``--maf-params`` (JSON; default ``{}``, the defaults);
- **GMM**: ``GaussianMixture(covariance_type="full", random_state=seed)``
  (``n_init=1``, default ``reg_covar``) on standardised features, the number
  of components chosen by BIC over 1..10 (at most the number of training
  rows; a k whose fit fails is skipped);
- **KDE**: ``KernelDensity(kernel="gaussian", rtol=1e-6)`` on standardised
  features, with a leaf size beyond its rows so that every kernel is summed
  (``KDE_LEAF_ROWS``: the default tree overstates log-densities in many
  dimensions); the bandwidth by 3-fold ``GridSearchCV`` over Scott's rule times
  2^-6 .. 2^1 (15 values, half-octave steps) on at most 5,000 training rows,
  then rescaled from the search's fold size to the full training size by
  Scott's n^(-1/(d+4)) and refitted on every training row.

Standardising (training mean and standard deviation) is an affine map, so
its log-Jacobian ``-sum(log std)`` is added back: every score is a
log-density in the units of the data the set provides. The reference for
the worst row is one full-covariance Gaussian fitted to the training rows
(standardised, covariance + 1e-6 I, in the same units).

Columns per (set, size, seed): held-out mean log-likelihood of each model;
the paired differences MAF-GMM and MAF-KDE with their standard errors (std of
the per-row difference / sqrt(n_test)); each model's worst held-out row
against the Gaussian reference (min over rows of score - Gaussian score) and
its number of rows below the -50-nat floor; fit times (model selection
included); the fraction of test rows identical to a training row (ties make
the density ill-posed: a KDE or a GMM can put a spike on them).
A difference beyond +2 s.e. is a win for MAF, below -2 s.e. a loss,
otherwise a tie.

Cost (the caps above: 20,000 training rows, 5,000 test rows, 5,000 rows for
the KDE search): the full run is 342 (set, size, seed) runs (288 without
the sk-generated group, whose 54 take about six minutes); with
``--jobs 2`` the 288 took 28 minutes on 2 quiet cores (1,693 s at 9758c18). The
slowest runs are InternetAds (1,308
features; GMM's BIC sweep) and the 20,000-row sets' KDE searches. ``--quick`` (a few small real sets and
one generated set, seed 0, the small size) takes a few minutes on 2 cores.

Usage (from the repository root; ``PYTHONPATH=.`` measures this checkout)::

    PYTHONPATH=. python benchmarks/density_suite.py [--quick] [--sets a,b] [--seeds 0,1,2]
        [--sizes tiny,small,large] [--maf-params JSON] [--out FILE.csv|FILE.json]
        [--resume] [--report] [--jobs N] [--threads N]

``--sets`` takes set names (``45_wine``, ``sk-wine``, ``banana-2d``) or the
groups ``adbench``, ``sklearn``, ``generated``, ``sk-generated``, ``stress``. With ``--out`` every finished
(set, size, seed) is appended as it completes; ``--resume`` skips those
already in the file, so a long run can be done in pieces; ``--report`` only
prints the tables of the rows in the file. Fit times depend on
the machine's load; the header records it.
"""

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from joblib import Parallel, delayed
from scipy.linalg import cho_factor, solve_triangular
from sklearn import datasets as skdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _densities import DENSITIES  # noqa: E402
from _machine import cpu_model  # noqa: E402

import sklearn_maf  # noqa: E402
from sklearn_maf import MAFDensity  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ADBENCH_CANDIDATES = [REPO.parent / "shared" / "data" / "adbench", REPO / "shared" / "data" / "adbench"]

TINY, SMALL, LARGE = 30, 500, 20_000  # training rows of the sizes
SIZES = {"tiny": TINY, "small": SMALL, "large": LARGE}
TEST_FRACTION, TEST_CAP = 0.2, 5_000
GMM_COMPONENTS = range(1, 11)
KDE_SEARCH_ROWS = 5_000
KDE_CV = 3
KDE_GRID = 2.0 ** np.arange(-6.0, 1.01, 0.5)  # times Scott's rule
# A relative tolerance of 1e-6 moves log-densities by about 1e-6 nats and lets the tree prune.
KDE_RTOL = 1e-6
# Leaf size of the KDE's tree: at least the rows it holds, so that the tree is
# one leaf and every kernel is summed. With more nodes, scikit-learn 1.9's
# pruning overstates log-densities in many dimensions (by 3 nats at 30
# features, 1,000 at 1,308; scikit-learn issues 7492 and 27186), and the
# comparator scored densities that do not integrate to one.
KDE_LEAF_ROWS = 10**9
GAUSS_RIDGE = 1e-6  # added to the correlation matrix of the Gaussian reference
FLOOR = -50.0  # nats below the Gaussian reference that count as an absurd row
MODELS = ("maf", "gmm", "kde")


# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class DataSet:
    """A named set: ``load()`` gives the real rows, or ``density`` draws them."""

    name: str
    group: str
    load: object = None
    density: object = None


def _adbench_folder():
    return next((p for p in ADBENCH_CANDIDATES if p.is_dir()), None)


def _adbench_sets():
    folder = _adbench_folder()
    if folder is None:
        return []

    def loader(path):
        def load():
            data = np.load(path)
            return np.asarray(data["X"], dtype=np.float64)[np.asarray(data["y"]) == 0]

        return load

    paths = sorted(folder.glob("*.npz"), key=lambda p: (int(p.stem.split("_")[0]), p.stem))
    return [DataSet(p.stem, "adbench", load=loader(p)) for p in paths]


def _load_diabetes():
    X = skdata.load_diabetes(scaled=False).data
    return np.delete(X, 1, axis=1)  # column 1 is sex, two values


SKLEARN_SETS = [
    DataSet("sk-iris", "sklearn", load=lambda: skdata.load_iris().data),
    DataSet("sk-wine", "sklearn", load=lambda: skdata.load_wine().data),
    DataSet("sk-diabetes", "sklearn", load=_load_diabetes),
    DataSet("sk-breast_cancer", "sklearn", load=lambda: skdata.load_breast_cancer().data),
    DataSet("sk-digits", "sklearn", load=lambda: skdata.load_digits().data),
]
GENERATED_SETS = [DataSet(name, "generated", density=d) for name, d in DENSITIES.items()]
SK_GENERATED_ROWS = 6_000


def _regression():
    X, y = skdata.make_regression(SK_GENERATED_ROWS, 4, noise=0.01, random_state=0)
    return np.column_stack([X, y])


SK_GENERATED_SETS = [
    DataSet(name, "sk-generated", load=load)
    for name, load in {
        "make_classification": lambda: skdata.make_classification(
            SK_GENERATED_ROWS, 10, n_informative=3, n_redundant=2, random_state=0
        )[0],
        "make_regression": _regression,
        "make_swiss_roll": lambda: skdata.make_swiss_roll(SK_GENERATED_ROWS, noise=0.3, random_state=0)[0],
        "make_s_curve": lambda: skdata.make_s_curve(SK_GENERATED_ROWS, noise=0.05, random_state=0)[0],
        "make_circles": lambda: skdata.make_circles(SK_GENERATED_ROWS, noise=0.03, factor=0.5, random_state=0)[0],
        "make_moons": lambda: skdata.make_moons(SK_GENERATED_ROWS, noise=0.05, random_state=0)[0],
        "make_blobs": lambda: skdata.make_blobs(
            SK_GENERATED_ROWS, 3, centers=4, cluster_std=[0.05, 0.5, 2.0, 5.0], random_state=0
        )[0],
        "make_friedman1": lambda: skdata.make_friedman1(SK_GENERATED_ROWS, 5, random_state=0)[0],
        "make_gaussian_quantiles": lambda: skdata.make_gaussian_quantiles(
            n_samples=SK_GENERATED_ROWS, n_features=8, random_state=0
        )[0],
    }.items()
]
STRESS_ROWS = 6_000


def _stress_sets():
    """Data of kinds that break density estimators, made after the defaults were set."""
    rng = np.random.default_rng(0)
    n = STRESS_ROWS

    def with_target(make):
        return lambda: np.column_stack(make(n, random_state=0))

    def duplicated():  # half the rows one record: a point mass
        X = rng.normal(size=(n, 4))
        X[rng.random(n) < 0.5] = X[0]
        return X

    def contaminated():  # 1% of the rows scaled by 10,000
        X = rng.normal(size=(n, 4))
        X[rng.random(n) < 0.01] *= 1e4
        return X

    def two_valued():  # a binary column coded 0.3 / 0.7, which no integer rule catches
        Z = rng.normal(size=(n, 3))
        return np.column_stack([Z, np.where(Z[:, 0] + rng.normal(size=n) > 0, 0.7, 0.3)])

    def counts():  # correlated Poisson counts (dequantised as integers)
        rate = np.exp(rng.normal(size=(n, 1)) + [0.5, 1.0, 2.0])
        return rng.poisson(rate).astype(np.float64)

    def near_constant():  # a column of spread 1e-9 around 1
        return np.column_stack([rng.normal(size=(n, 3)), 1.0 + 1e-9 * rng.normal(size=n)])

    def mixed_scales():  # spreads 1e-6 to 1e6, one offset of 3e9
        return rng.normal(size=(n, 4)) * [1e-6, 1.0, 1e3, 1e6] + [0.0, 5.0, -1e4, 3e9]

    def collinear():  # a column the sum of two others, to 1e-4
        Z = rng.normal(size=(n, 3))
        return np.column_stack([Z, Z[:, 0] + Z[:, 1] + 1e-4 * rng.normal(size=n)])

    def zero_inflated():  # 30% exact zeros in a continuous column
        x = rng.normal(size=n)
        x[rng.random(n) < 0.3] = 0.0
        return np.column_stack([x, x + 0.5 * rng.normal(size=n)])

    def cauchy_cubed():  # tails far beyond Cauchy's
        return rng.standard_cauchy(size=(n, 2)) ** 3

    def wide():  # 60 rows of 50 correlated features: fewer rows than features
        return rng.normal(size=(60, 50)) @ (rng.normal(size=(50, 50)) / 7)

    loaders = {
        "low_rank_matrix": lambda: skdata.make_low_rank_matrix(n, 10, effective_rank=3, tail_strength=0.2, random_state=0),
        "sparse_uncorrelated": with_target(skdata.make_sparse_uncorrelated),
        "friedman2": with_target(skdata.make_friedman2),
        "friedman3": with_target(skdata.make_friedman3),
        "hastie_10_2": lambda: skdata.make_hastie_10_2(n, random_state=0)[0],
        "biclusters": lambda: skdata.make_biclusters((n, 8), 3, noise=1.0, random_state=0)[0],
        "half_duplicates": duplicated,
        "contaminated": contaminated,
        "two_valued_column": two_valued,
        "poisson_counts": counts,
        "near_constant_column": near_constant,
        "mixed_scales": mixed_scales,
        "collinear": collinear,
        "zero_inflated": zero_inflated,
        "cauchy_cubed": cauchy_cubed,
        "wide_60x50": wide,
    }
    cache = {}

    def once(name):  # the rng is shared: draw each set once, in a fixed order
        if not cache:
            cache.update({key: np.asarray(load(), dtype=np.float64) for key, load in loaders.items()})
        return cache[name]

    return [DataSet(name, "stress", load=lambda name=name: once(name)) for name in loaders]


STRESS_SETS = _stress_sets()
QUICK_SETS = [
    "sk-iris",
    "sk-wine",
    "sk-diabetes",
    "sk-breast_cancer",
    "sk-digits",
    "14_glass",
    "29_Pima",
    "39_vertebral",
    "6_cardio",
    "banana-2d",
    "gaussian-8d",  # GaussianMixture's own truth: where the stack pays for its weights
    "checkerboard-2d",  # hard edges: where a kernel density is the model to beat
]


GROUPS = ("adbench", "sklearn", "generated", "sk-generated", "stress")


def all_sets():
    return _adbench_sets() + SKLEARN_SETS + GENERATED_SETS + SK_GENERATED_SETS + STRESS_SETS


def column_rules(X):
    """Columns to keep (not constant) and, among those, the integer-valued ones."""
    # max > min, not std > 0: the std of a constant column can be round-off (1e-16), not 0.
    keep = np.ptp(X, axis=0) > 0
    integer = np.all(X[:, keep] == np.round(X[:, keep]), axis=0)
    return keep, integer


def n_test_rows(n):
    return int(min(round(TEST_FRACTION * n), TEST_CAP))


def sizes_of(dataset, n_rows, sizes):
    """The sizes (name, training rows) that this set has, of those asked for."""
    if dataset.density is not None:
        return [(s, SIZES[s]) for s in sizes]
    rest = n_rows - n_test_rows(n_rows)
    out = []
    for s in sizes:
        if s == "tiny" and rest > TINY:
            out.append((s, TINY))
        elif s == "small":
            out.append((s, min(rest, SMALL)))
        elif s == "large" and rest > SMALL:
            out.append((s, min(rest, LARGE)))
    return out


def split(dataset, seed, n_train):
    """(X_train, X_test, info) for one set, seed and training size.

    The test rows and the dequantisation noise depend on the set and the seed
    only, so every size and every model of a seed sees the same noisy rows.
    """
    key = zlib.crc32(dataset.name.encode())
    if dataset.density is not None:
        X_train = dataset.density.sample(n_train, np.random.default_rng([key, seed, 0]))
        X_test = dataset.density.sample(TEST_CAP, np.random.default_rng([key, seed, 1]))
        return X_train, X_test, {"n_rows": None, "dropped_constant": 0, "dropped_constant_train": 0, "dequantised": 0}
    X = dataset.load()
    keep, integer = column_rules(X)
    X = X[:, keep]
    n = X.shape[0]
    n_test = n_test_rows(n)
    rest = n - n_test
    rng = np.random.default_rng([key, seed])
    order = rng.permutation(n)[: n_test + min(rest, LARGE)]
    used = X[order]
    used[:, integer] += rng.uniform(0.0, 1.0, size=(used.shape[0], int(integer.sum())))
    X_test, X_train = used[:n_test], used[n_test : n_test + n_train]
    # A column constant on these training rows (a rare value elsewhere) has no
    # density to learn: every model would put a spike there. Dropped for all.
    varies = np.ptp(X_train, axis=0) > 0
    info = {
        "n_rows": n,
        "dropped_constant": int((~keep).sum()),
        "dropped_constant_train": int((~varies).sum()),
        "dequantised": int(integer[varies].sum()),
    }
    return X_train[:, varies], X_test[:, varies], info


def duplicate_fraction(X_train, X_test):
    """Fraction of test rows identical to some training row."""
    seen = {row.tobytes() for row in np.ascontiguousarray(X_train)}
    return float(np.mean([row.tobytes() in seen for row in np.ascontiguousarray(X_test)]))


# ------------------------------------------------------------------ models


def standardiser(X):
    """Training mean and std, and the log-Jacobian ``-sum(log std)`` of x -> (x - mean) / std."""
    loc, scale = X.mean(axis=0), X.std(axis=0)
    return loc, scale, -float(np.log(scale).sum())


class GaussianReference:
    """One full-covariance Gaussian fitted to the training rows, scored in their units."""

    def __init__(self, X):
        self.loc, self.scale, self.log_jacobian = standardiser(X)
        Z = (X - self.loc) / self.scale
        covariance = np.cov(Z, rowvar=False, bias=True).reshape(Z.shape[1], Z.shape[1])
        covariance += GAUSS_RIDGE * np.eye(Z.shape[1])
        self.cholesky = cho_factor(covariance, lower=True)[0]

    def score_samples(self, X):
        Z = (X - self.loc) / self.scale
        W = solve_triangular(self.cholesky, Z.T, lower=True, check_finite=False)
        d = Z.shape[1]
        log_det = np.log(np.diag(self.cholesky)).sum()
        return -0.5 * (W**2).sum(axis=0) - log_det - 0.5 * d * np.log(2 * np.pi) + self.log_jacobian


def fit_maf(X, seed, params):
    model = MAFDensity(random_state=seed, **params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X)
    capped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    note = f"{model.n_iter_} epochs" + (" (max_iter)" if capped else "")
    return model.score_samples, note


def fit_gmm(X, seed):
    loc, scale, log_jacobian = standardiser(X)
    Z = (X - loc) / scale
    best, best_bic, failed = None, np.inf, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for k in GMM_COMPONENTS:
            if k > Z.shape[0]:
                break
            gmm = GaussianMixture(k, covariance_type="full", random_state=seed)
            try:
                bic = gmm.fit(Z).bic(Z)
            except ValueError:  # an ill-defined covariance: this k has no fit
                failed.append(k)
                continue
            if bic < best_bic:
                best, best_bic = gmm, bic
    note = f"k={best.n_components}" + (" (largest)" if best.n_components == GMM_COMPONENTS[-1] else "")
    if failed:
        note += f"; k={','.join(map(str, failed))} failed"
    return (lambda Y: best.score_samples((Y - loc) / scale) + log_jacobian), note, best.n_components


def kde_bandwidth_grid(n, d):
    """Scott's rule for ``n`` standardised rows in ``d`` dimensions, times KDE_GRID."""
    return n ** (-1.0 / (d + 4)) * KDE_GRID


def fit_kde(X, seed):
    loc, scale, log_jacobian = standardiser(X)
    Z = (X - loc) / scale
    n, d = Z.shape
    rows = Z
    if n > KDE_SEARCH_ROWS:
        rows = Z[np.random.default_rng(seed).choice(n, KDE_SEARCH_ROWS, replace=False)]
    n_fold = len(rows) - len(rows) // KDE_CV  # rows each fold of the search fits on
    grid = kde_bandwidth_grid(n_fold, d)
    search = GridSearchCV(
        KernelDensity(kernel="gaussian", rtol=KDE_RTOL, leaf_size=KDE_LEAF_ROWS), {"bandwidth": grid}, cv=KDE_CV
    )
    search.fit(rows)
    h_search = search.best_params_["bandwidth"]
    h = h_search * (n / n_fold) ** (-1.0 / (d + 4))
    kde = KernelDensity(kernel="gaussian", bandwidth=h, rtol=KDE_RTOL, leaf_size=KDE_LEAF_ROWS).fit(Z)
    note = f"h={h:.3g}"
    if h_search in (grid[0], grid[-1]):
        note += " (edge of grid)"
    return (lambda Y: kde.score_samples((Y - loc) / scale) + log_jacobian), note, float(h)


# --------------------------------------------------------------- one unit


def paired(a, b):
    """Mean of the per-row difference a - b and its standard error."""
    diff = a - b
    if not np.all(np.isfinite(diff)):
        return float(np.mean(diff)), float("nan")
    se = diff.std(ddof=1) / np.sqrt(diff.size) if diff.size > 1 else float("nan")
    return float(diff.mean()), float(se)


def verdict(mean, se):
    if not np.isfinite(mean):
        return "loss" if mean < 0 or np.isnan(mean) else "win"
    if mean > 2 * se:
        return "win"
    if mean < -2 * se:
        return "loss"
    return "tie"


def run_unit(dataset, size, n_train, seed, maf_params, threads):
    """Fit the three models on one (set, size, seed) and return the row of the table."""
    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        X_train, X_test, info = split(dataset, seed, n_train)
        n, d = X_train.shape
        reference = GaussianReference(X_train).score_samples(X_test)
        record = {
            "set": dataset.name,
            "group": dataset.group,
            "size": size,
            "seed": seed,
            "n_train": n,
            "n_test": X_test.shape[0],
            "dim": d,
            "n_rows": info["n_rows"],
            "dropped_constant": info["dropped_constant"],
            "dropped_constant_train": info["dropped_constant_train"],
            "dequantised": info["dequantised"],
            "dup_test": duplicate_fraction(X_train, X_test),
            "ll_gauss": float(reference.mean()),
        }
        scores = {}
        fits = {
            "maf": lambda: fit_maf(X_train, seed, maf_params),
            "gmm": lambda: fit_gmm(X_train, seed),
            "kde": lambda: fit_kde(X_train, seed),
        }
        for name, fit in fits.items():
            start, out = time.perf_counter(), ()
            try:
                out = fit()
                record[f"t_{name}"] = time.perf_counter() - start
                log_p = np.asarray(out[0](X_test), dtype=np.float64)
                record[f"note_{name}"] = out[1]
            except Exception as error:  # a failed fit is a result: it scores -inf everywhere
                record[f"t_{name}"] = time.perf_counter() - start
                log_p = np.full(X_test.shape[0], -np.inf)
                record[f"note_{name}"] = f"failed: {type(error).__name__}: {error}"[:200]
            if len(out) > 2:
                record["gmm_k" if name == "gmm" else "kde_h"] = out[2]
            scores[name] = log_p
            excess = log_p - reference
            record[f"ll_{name}"] = float(log_p.mean())
            record[f"worst_{name}"] = float(np.min(excess))
            record[f"floor_{name}"] = int(np.sum(~(excess >= FLOOR)))
            record[f"nonfinite_{name}"] = int(np.sum(~np.isfinite(log_p)))
        for other in ("gmm", "kde"):
            mean, se = paired(scores["maf"], scores[other])
            record[f"maf_{other}"], record[f"se_maf_{other}"] = mean, se
            record[f"verdict_{other}"] = verdict(mean, se)
        if dataset.density is not None:
            truth = dataset.density.log_prob(X_test)
            record["ll_true"] = float(truth.mean())
            for name in MODELS:
                gap, se = paired(truth, scores[name])
                record[f"gap_{name}"], record[f"se_gap_{name}"] = gap, se
    return record


# ------------------------------------------------------------------ output


def read_records(path):
    if not path.exists():
        return []
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: _parse(v) for k, v in row.items()} for row in rows]


def _parse(value):
    if value == "":
        return None
    if value.startswith("np.float64("):  # rows written before numpy scalars were converted
        value = value[len("np.float64(") : -1]
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def write_records(path, records):
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1, default=float) + "\n")
        return
    fields = []
    for record in records:
        fields += [k for k in record if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for record in records:
            writer.writerow({k: _format_cell(v) for k, v in record.items()})


def _format_cell(value):
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return value


def fmt(x, digits=2):
    """A number for the table: fixed point when moderate, else 3 significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if not math.isfinite(x):
        return "-inf" if x < 0 else "inf"
    if abs(x) >= 1e5:
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def by_set_and_size(records):
    """The records grouped by (set, size), in their order."""
    groups = {}
    for r in records:
        groups.setdefault((r["set"], r["size"]), []).append(r)
    return groups


def pooled_se(rows, key):
    """S.e. of the mean over seeds of independent paired differences, from each seed's s.e. (``key``)."""
    return math.sqrt(sum(r[key] ** 2 for r in rows)) / len(rows)


def per_set_summary(records):
    """One line per (set, size): means over seeds and the verdicts per seed."""
    groups = by_set_and_size(records)
    lines = [
        "| set | size | n_train x d | MAF | GMM | KDE | MAF-GMM | MAF-KDE | vs GMM W/T/L | vs KDE W/T/L "
        "| worst MAF row vs Gaussian | MAF fit (s) | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|:-:|:-:|---:|---:|---|",
    ]
    for (name, size), rows in groups.items():
        first = rows[0]

        def mean(key):
            return float(np.mean([r[key] for r in rows]))

        def wtl(other):
            v = [r[f"verdict_{other}"] for r in rows]
            return f"{v.count('win')}/{v.count('tie')}/{v.count('loss')}"

        notes = []
        if first["dropped_constant"]:
            notes.append(f"{first['dropped_constant']} constant cols dropped")
        if first.get("dropped_constant_train"):
            notes.append(f"{first['dropped_constant_train']} more constant on the training rows")
        if first["dequantised"]:
            notes.append(f"{first['dequantised']} cols dequantised")
        dup = mean("dup_test")
        if dup > 0:
            notes.append(f"{dup:.1%} test rows in train")
        if "ll_true" in first and first["ll_true"] is not None:
            notes.append(
                "gap to truth MAF/GMM/KDE "
                + "/".join(fmt(mean(f"gap_{m}"), 3) for m in MODELS)
                + f" (truth {fmt(mean('ll_true'))})"
            )
        floor = sum(int(r["floor_maf"]) for r in rows if not str(r["note_maf"]).startswith("failed"))
        if floor:
            notes.append(f"**{floor} MAF rows below the floor**")
        n_failed = sum(str(r["note_maf"]).startswith("failed") for r in rows)
        if n_failed:
            why = rows[0]["note_maf"] if n_failed == len(rows) else "see the CSV"
            notes.append(f"**MAF fit failed in {n_failed} run(s)**: {why}")
        lines.append(
            f"| {name} | {size} | {first['n_train']} x {first['dim']} | {fmt(mean('ll_maf'))} | "
            f"{fmt(mean('ll_gmm'))} | {fmt(mean('ll_kde'))} | "
            f"{fmt(mean('maf_gmm'))} ± {fmt(pooled_se(rows, 'se_maf_gmm'))} | "
            f"{fmt(mean('maf_kde'))} ± {fmt(pooled_se(rows, 'se_maf_kde'))} | {wtl('gmm')} | {wtl('kde')} | "
            f"{fmt(min(r['worst_maf'] for r in rows), 1)} | {fmt(mean('t_maf'), 1)} | {'; '.join(notes)} |"
        )
    return lines


def summary_line(records):
    counts = {}
    for other in ("gmm", "kde"):
        v = [r[f"verdict_{other}"] for r in records]
        counts[other] = f"{v.count('win')} / {v.count('tie')} / {v.count('loss')}"
    def failed(r, m):
        return str(r[f"note_{m}"]).startswith("failed")

    floor = {m: sum(int(r[f"floor_{m}"]) for r in records if not failed(r, m)) for m in MODELS}
    fitted = [r["worst_maf"] for r in records if not failed(r, "maf")]
    worst = min(fitted) if fitted else float("nan")
    n_sets = len({r["set"] for r in records})
    failures = {m: [r for r in records if failed(r, m)] for m in MODELS}
    failure_text = "; ".join(
        f"{m.upper()} failed to fit in {len(rows)} run(s) ({', '.join(sorted({r['set'] for r in rows}))})"
        for m, rows in failures.items()
        if rows
    )
    return (
        f"MAF wins / ties / losses over {len(records)} (set, size, seed) runs on {n_sets} sets: "
        f"against GMM {counts['gmm']}, against KDE {counts['kde']}; "
        f"held-out rows more than {-FLOOR:g} nats below the Gaussian reference, in the fitted runs: "
        f"MAF {floor['maf']}, GMM {floor['gmm']}, KDE {floor['kde']} "
        f"(MAF's worst row: {fmt(worst, 1)} nats)"
        + (f"; {failure_text} (scored -inf, a loss)." if failure_text else ".")
    )


def summary_by_group(records):
    """Wins / ties / losses of MAF per group of sets and size."""
    lines = [
        "| group | size | runs | vs GMM W/T/L | vs KDE W/T/L | MAF rows below the floor |",
        "|---|---|---:|:-:|:-:|---:|",
    ]
    keys = sorted({(r["group"], r["size"]) for r in records}, key=lambda k: (k[0], list(SIZES).index(k[1])))
    for group, size in keys:
        rows = [r for r in records if (r["group"], r["size"]) == (group, size)]
        cells = []
        for other in ("gmm", "kde"):
            v = [r[f"verdict_{other}"] for r in rows]
            cells.append(f"{v.count('win')}/{v.count('tie')}/{v.count('loss')}")
        floor = sum(int(r["floor_maf"]) for r in rows if not str(r["note_maf"]).startswith("failed"))
        lines.append(f"| {group} | {size} | {len(rows)} | {cells[0]} | {cells[1]} | {floor} |")
    return lines


def pooled_verdicts(records):
    """Verdicts per (set, size) on the mean over its seeds of the paired differences.

    With hundreds of runs, a per-run 2-standard-error rule calls about 2% of
    them a loss even where two models are equal; a loss that holds on the
    mean over the seeds (its standard error pooled from the seeds' own,
    independent splits) is one that repeats.
    """
    groups = by_set_and_size(records)
    return {
        other: {
            key: verdict(float(np.mean([r[f"maf_{other}"] for r in rows])), pooled_se(rows, f"se_maf_{other}"))
            for key, rows in groups.items()
        }
        for other in ("gmm", "kde")
    }


def pooled_line(records):
    verdicts = pooled_verdicts(records)
    counts = {
        other: "{} / {} / {}".format(*(list(v.values()).count(x) for x in ("win", "tie", "loss")))
        for other, v in verdicts.items()
    }
    lost = [
        f"{name} {size} vs {other.upper()}"
        for other, v in verdicts.items()
        for (name, size), x in v.items()
        if x == "loss"
    ]
    return (
        f"Over the seeds' mean per (set, size), {len(verdicts['gmm'])} pairs: against GMM {counts['gmm']}, "
        f"against KDE {counts['kde']}" + (f"; the losses: {', '.join(lost)}." if lost else "; no loss.")
    )


def losses(records):
    out = []
    for r in records:
        for other in ("gmm", "kde"):
            if r[f"verdict_{other}"] == "loss":
                out.append(
                    f"{r['set']} {r['size']} seed {r['seed']}: MAF-{other.upper()} "
                    f"{fmt(r[f'maf_{other}'])} ± {fmt(r[f'se_maf_{other}'])}"
                )
    return out


def header(argv, args):
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "sklearn_maf"], cwd=REPO, capture_output=True, text=True
        )
        commit += " (sklearn_maf modified)" if dirty.stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`",
        f"- commit: {commit}; sklearn_maf {sklearn_maf.__version__} from {Path(sklearn_maf.__file__).parent}",
        f"- MAF parameters: {json.dumps(args.maf_params)}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: nproc={os.cpu_count()}, CPU: {cpu_model()}; {args.jobs} job(s) x {args.threads} thread(s)",
        (
            f"- torch {torch.__version__}, scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}, Python {platform.python_version()}"
        ),
        f"- load average at start (1, 5, 15 min): {load}",
    ]


# ------------------------------------------------------------------ main


def select_sets(spec, quick):
    sets = {d.name: d for d in all_sets()}
    if spec is None:
        names = QUICK_SETS if quick else list(sets)
    else:
        names = []
        for item in spec.split(","):
            if item in GROUPS:
                names += [d.name for d in sets.values() if d.group == item]
            elif item in sets:
                names.append(item)
            else:
                raise SystemExit(
                    f"unknown set {item!r}; choose from the groups {', '.join(GROUPS)} or {list(sets)}"
                )
    if _adbench_folder() is None:
        print("../shared/data/adbench not found: the ADBench sets are skipped", flush=True)
    return [sets[n] for n in names if n in sets]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few small sets, seed 0, the small size")
    parser.add_argument("--sets", help=f"comma-separated set names or groups ({', '.join(GROUPS)})")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--sizes", help="comma-separated of tiny,small,large (default small,large; --quick: small)")
    parser.add_argument("--maf-params", type=json.loads, default={}, help="JSON keyword arguments of MAFDensity")
    parser.add_argument("--out", type=Path, help="write every row to this .csv or .json file")
    parser.add_argument("--resume", action="store_true", help="skip the runs already in --out")
    parser.add_argument("--report", action="store_true", help="run nothing: print the tables of the rows in --out")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads per job (default 1)")
    args = parser.parse_args(argv)

    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    sizes = (args.sizes or ("small" if args.quick else "small,large")).split(",")
    if set(sizes) - set(SIZES):
        parser.error(f"--sizes takes tiny, small and/or large, got {args.sizes!r}")
    sets = select_sets(args.sets, args.quick)

    if args.report and not args.out:
        parser.error("--report reads the rows of --out")
    done = read_records(args.out) if (args.out and (args.resume or args.report)) else []
    finished = {(r["set"], r["size"], int(r["seed"])) for r in done}
    units, cost = [], {}
    for dataset in sets:
        if dataset.density is not None:
            n_rows, dim = None, dataset.density.dim
        else:
            n_rows, dim = dataset.load().shape
        for size, n_train in sizes_of(dataset, n_rows, sizes):
            cost[dataset.name, size] = n_train * (dim + 10)
            units += [
                (dataset, size, n_train, seed)
                for seed in seeds
                if (dataset.name, size, seed) not in finished and not args.report
            ]
    # Seed by seed, the small size before the large, the cheaper sets first:
    # a run cut short covers as many sets as it can.
    units.sort(key=lambda u: (u[3], u[1] == "large", cost[u[0].name, u[1]]))

    lines = header(["python"] + (sys.argv if argv is None else ["benchmarks/density_suite.py", *argv]), args)
    print("\n".join(lines), flush=True)
    print(f"{len(units)} runs to do, {len(done)} already in {args.out}", flush=True)
    records = list(done)
    start = time.perf_counter()
    jobs = Parallel(n_jobs=args.jobs, return_as="generator_unordered")(
        delayed(run_unit)(dataset, size, n_train, seed, args.maf_params, args.threads)
        for dataset, size, n_train, seed in units
    )
    for record in jobs:
        records.append(record)
        print(
            f"{record['set']} {record['size']} seed {record['seed']} ({record['n_train']}x{record['dim']}): "
            f"MAF {fmt(record['ll_maf'])} GMM {fmt(record['ll_gmm'])} KDE {fmt(record['ll_kde'])}; "
            f"MAF-GMM {fmt(record['maf_gmm'])}±{fmt(record['se_maf_gmm'])} ({record['verdict_gmm']}), "
            f"MAF-KDE {fmt(record['maf_kde'])}±{fmt(record['se_maf_kde'])} ({record['verdict_kde']}); "
            f"worst MAF row {fmt(record['worst_maf'], 1)}; fit s MAF/GMM/KDE "
            f"{record['t_maf']:.1f}/{record['t_gmm']:.1f}/{record['t_kde']:.1f}",
            flush=True,
        )
        if args.out:
            write_records(args.out, records)
    elapsed = time.perf_counter() - start
    if not records:
        print("nothing to report")
        return
    order = {d.name: i for i, d in enumerate(all_sets())}
    records.sort(key=lambda r: (order.get(r["set"], len(order)), list(SIZES).index(r["size"]), int(r["seed"])))
    if args.out and not args.report:
        write_records(args.out, records)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    report = ["", *lines, f"- load average at end: {load}; this run {elapsed:.0f} s", ""]
    report += per_set_summary(records)
    report += ["", *summary_by_group(records), "", summary_line(records), "", pooled_line(records)]
    lost = losses(records)
    report += ["", f"Losses ({len(lost)}):" if lost else "Losses: none."] + [f"- {x}" for x in lost]
    print("\n".join(report))


if __name__ == "__main__":
    main()
