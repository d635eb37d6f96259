"""
=================================================================
2-D densities learned by MAF, KernelDensity and GaussianMixture
=================================================================

Three two-dimensional data sets with curved, multi-modal structure, each fitted
by :class:`~sklearn_maf.MAFDensity`, by
:class:`~sklearn.neighbors.KernelDensity` (bandwidth chosen by
cross-validation) and by :class:`~sklearn.mixture.GaussianMixture` (number of
components chosen by BIC). The contour plots show each learned density; the
titles give the mean log-likelihood of held-out rows, in nats per row (higher
is better).

All three return log-densities in the units of ``X``, so their held-out scores
can be compared directly.
"""

# %%
# Data
# ----
#
# Two interleaved half-moons, two concentric rings and a "banana": a Gaussian
# bent along a parabola. Each is split into training and held-out rows.

import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_circles, make_moons
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neighbors import KernelDensity

from sklearn_maf import MAFDensity

# SKLEARN_MAF_FAST=1 (set by the test suite) trades the quality of the
# pictures for speed: fewer rows, a smaller flow, a few epochs.
FAST = os.environ.get("SKLEARN_MAF_FAST", "") not in ("", "0")
N_SAMPLES = 400 if FAST else 3000


def banana(n_samples, random_state):
    rng = np.random.RandomState(random_state)
    x = rng.normal(size=n_samples)
    y = 0.5 * x**2 - 1 + 0.25 * rng.normal(size=n_samples)
    return np.column_stack([x, y])


datasets = {
    "two moons": make_moons(N_SAMPLES, noise=0.06, random_state=0)[0],
    "two rings": make_circles(
        N_SAMPLES, noise=0.05, factor=0.5, random_state=0
    )[0],
    "banana": banana(N_SAMPLES, random_state=0),
}

# %%
# The three estimators
# --------------------
#
# The flow gets settings for two dimensions: ten MAF layers (each one is a
# simple map, and a 2-D density needs many of them to bend), patience of 30
# epochs for early stopping, and no batch normalisation, which fitted these
# data better (try both on yours). The kernel density gets the bandwidth that
# maximises the cross-validated likelihood, and the mixture the number of
# components with the lowest BIC.

if FAST:
    maf_params = dict(n_layers=2, hidden_units=16, max_iter=5)
else:
    maf_params = dict(
        n_layers=10, batch_norm=False, n_iter_no_change=30, max_iter=500
    )


def fit_maf(X):
    return MAFDensity(random_state=0, **maf_params).fit(X)


def fit_kde(X):
    bandwidths = np.logspace(-2, 0, 5 if FAST else 20)
    search = GridSearchCV(KernelDensity(), {"bandwidth": bandwidths}, cv=3)
    return search.fit(X).best_estimator_


def fit_gmm(X):
    candidates = [
        GaussianMixture(k, n_init=2, random_state=0).fit(X)
        for k in range(1, 4 if FAST else 13)
    ]
    return min(candidates, key=lambda model: model.bic(X))


estimators = {
    "MAFDensity": fit_maf,
    "KernelDensity": fit_kde,
    "GaussianMixture": fit_gmm,
}

fitted = {}
for data_name, X in datasets.items():
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    for model_name, fit in estimators.items():
        model = fit(X_train)
        score = model.score_samples(X_test).mean()
        fitted[data_name, model_name] = model, score
        print(f"{data_name:>10}  {model_name:<16} held-out {score:7.3f} nats")
    weights = fitted[data_name, "MAFDensity"][0].mixture_weights_
    print(f"{'':>10}  MAFDensity weights: flow, broad Gaussian, mixture, kernel {weights.round(3)}")

# %%
# Learned densities
# -----------------
#
# The first column shows the training rows; the others the density that each
# estimator learned from them, on the same colour scale within a row.
#
# The kernel density follows the data but is bumpy where the rows are sparse
# (one bandwidth for everything); the mixture approximates each curve by a
# chain of ellipses; the flow bends its density along the data. The rings show
# what a flow finds hard: it is a smooth invertible map of a Gaussian, so it
# cannot cut a hole or separate two pieces cleanly, and it leaves thin bridges
# of density between them. There the fitted MAFDensity is mostly its
# classical reference (``reference="gmm"``, the default): its validation rows
# gave the kernel-density part most of the weight, so it matches the kernel
# density instead of losing to it (``mixture_weights_`` has the weights of
# the flow, the broad Gaussian, the mixture and the kernel density). In two
# dimensions a tuned kernel density is hard to beat; a flow is built for more
# features and more rows (see
# :ref:`sphx_glr_auto_examples_plot_digits_maf_sampling.py` for 15 dimensions).

resolution = 60 if FAST else 200
fig, axes = plt.subplots(
    len(datasets), len(estimators) + 1, figsize=(12, 8.4), layout="constrained"
)
for row, (data_name, X) in enumerate(datasets.items()):
    low, high = X.min(axis=0) - 0.4, X.max(axis=0) + 0.4
    xx, yy = np.meshgrid(
        np.linspace(low[0], high[0], resolution),
        np.linspace(low[1], high[1], resolution),
    )
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    densities = {
        model_name: np.exp(
            fitted[data_name, model_name][0].score_samples(grid)
        )
        for model_name in estimators
    }
    # The colour scale ends at the middle one of the three peak densities, so
    # that one sharp spike cannot wash out the other panels of its row.
    top = np.median([density.max() for density in densities.values()])
    levels = np.linspace(0, top, 15)

    ax = axes[row, 0]
    ax.scatter(X[:, 0], X[:, 1], s=2, color="black", alpha=0.4)
    ax.set_ylabel(data_name, fontsize=12)
    if row == 0:
        ax.set_title("training data")
    for column, model_name in enumerate(estimators, start=1):
        ax = axes[row, column]
        density = densities[model_name].reshape(xx.shape)
        ax.contourf(
            xx, yy, density, levels=levels, cmap="viridis", extend="max"
        )
        score = fitted[data_name, model_name][1]
        ax.set_title(f"{model_name}\nheld-out {score:.2f} nats")
    for ax in axes[row]:
        ax.set_xlim(low[0], high[0])
        ax.set_ylim(low[1], high[1])
        ax.set_xticks([])
        ax.set_yticks([])

plt.show()
