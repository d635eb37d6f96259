"""
=========================================================
Successive halving over epochs: the grid's best, sooner
=========================================================

A grid search trains every candidate for the full budget of epochs, though
most of them are clearly worse after a few. Successive halving
(:class:`~sklearn.model_selection.HalvingRandomSearchCV`, here with
``resource="max_iter"``) trains all candidates for a few epochs, keeps the
best third, trains those three times longer, and so on: only the last
survivors get the full budget. This example runs both searches over the same
nine candidates of :class:`~sklearn_maf.MAFDensity` and compares their
choices and their times.

A candidate that only pulls ahead late can be dropped early: started at a
ninth of the budget (3 of 27 epochs), the search dropped the grid's best,
the deepest and widest flow, and chose a shallower one. Started at a third,
it keeps three candidates to the end, and finds the grid's best.
"""

# %%
# Data and candidates
# -------------------
#
# The three features of :ref:`sphx_glr_auto_examples_plot_grid_search.py`:
# two interleaved half-moons and a third coordinate that bends with the first.

import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_moons
from sklearn.exceptions import ConvergenceWarning
from sklearn.experimental import enable_halving_search_cv  # noqa: F401
from sklearn.model_selection import GridSearchCV, HalvingRandomSearchCV

from sklearn_maf import MAFDensity

# SKLEARN_MAF_FAST=1 (set by the test suite) trades the comparison for speed.
FAST = os.environ.get("SKLEARN_MAF_FAST", "") not in ("", "0")

n_samples = 300 if FAST else 1500
X, _ = make_moons(n_samples, noise=0.08, random_state=0)
rng = np.random.RandomState(0)
X = np.column_stack([X, np.sin(3 * X[:, 0]) + 0.1 * rng.normal(size=n_samples)])

grid = {"n_layers": [1, 2, 4], "hidden_units": [4, 16, 64]}
max_epochs = 3 if FAST else 27
# Every fit runs its full budget (no early stopping), so that a candidate's
# score at a budget is what that budget buys.
base = MAFDensity(
    batch_size=128, learning_rate_init=1e-2, early_stopping=False, max_iter=max_epochs, random_state=0
)
warnings.filterwarnings("ignore", category=ConvergenceWarning)


def mean_log_likelihood(estimator, X, y=None):
    """Held-out log-likelihood in nats per row."""
    return estimator.score_samples(X).mean()


# %%
# The grid search: nine candidates, each for the full budget
# ----------------------------------------------------------

start = time.perf_counter()
grid_search = GridSearchCV(base, grid, scoring=mean_log_likelihood, cv=3, n_jobs=-1).fit(X)
grid_seconds = time.perf_counter() - start
print(f"GridSearchCV: {grid_seconds:.1f} s, best {grid_search.best_params_}")

# %%
# Successive halving over epochs
# ------------------------------
#
# With every parameter given as a list, ``HalvingRandomSearchCV`` samples the
# candidates without replacement: ``n_candidates=9`` takes the whole grid.
# ``factor=3`` keeps a third of the candidates at each step and trains them
# three times longer: nine for 9 epochs, then the best three for 27. (On a
# cluster, ``dask_ml.model_selection.HyperbandSearchCV`` needs a ``y`` and
# ``partial_fit`` calls; the user guide's "Large data" page says what works.)

start = time.perf_counter()
halving = HalvingRandomSearchCV(
    base,
    grid,
    n_candidates=9,
    resource="max_iter",
    min_resources=max(1, max_epochs // 3),
    max_resources=max_epochs,
    factor=3,
    scoring=mean_log_likelihood,
    cv=3,
    n_jobs=-1,
    random_state=0,
).fit(X)
halving_seconds = time.perf_counter() - start
best = {key: halving.best_params_[key] for key in grid}
print(
    f"HalvingRandomSearchCV: {halving_seconds:.1f} s ({halving_seconds / grid_seconds:.0%} of the "
    f"grid's time), best {best} after {halving.best_params_['max_iter']} epochs; "
    f"the same as the grid's: {best == grid_search.best_params_}"
)

# %%
# What each search saw
# --------------------
#
# Left, the grid's held-out log-likelihood of every candidate after the full
# budget. Right, each candidate's score at each halving step: the weak ones
# show it after a few epochs and are dropped, and the survivor trains on.

results = halving.cv_results_
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
labels = [f"{p['n_layers']}x{p['hidden_units']}" for p in grid_search.cv_results_["params"]]
order = np.argsort(grid_search.cv_results_["mean_test_score"])
left.barh(np.array(labels)[order], grid_search.cv_results_["mean_test_score"][order])
left.set_xlabel("held-out log-likelihood (nats per row)")
left.set_title(f"GridSearchCV, {max_epochs} epochs each: {grid_seconds:.0f} s")
for candidate in {(p["n_layers"], p["hidden_units"]) for p in results["params"]}:
    rows = [
        i for i, p in enumerate(results["params"]) if (p["n_layers"], p["hidden_units"]) == candidate
    ]
    right.plot(
        [results["param_max_iter"][i] for i in rows],
        [results["mean_test_score"][i] for i in rows],
        marker="o",
        label=f"{candidate[0]}x{candidate[1]}",
    )
right.set_xscale("log")
right.set_xlabel("epochs (max_iter)")
right.set_ylabel("held-out log-likelihood (nats per row)")
right.set_title(f"HalvingRandomSearchCV: {halving_seconds:.0f} s")
right.legend(title="n_layers x hidden_units", fontsize="small")
plt.show()
