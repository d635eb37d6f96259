"""
=====================================================
Training and validation curves, with early stopping
=====================================================

:class:`~sklearn_maf.MAFDensity` trains with Adam and, by default, holds out a
tenth of the rows to decide when to stop. After
:meth:`~sklearn_maf.MAFDensity.fit`, ``loss_curve_`` holds the mean training
negative log-likelihood of every epoch and ``validation_scores_`` the mean
log-likelihood of the held-out rows. This example draws both, shows where early
stopping kicked in and which weights it kept, and compares three learning
rates.
"""

# %%
# Data and a deliberately large model
# -----------------------------------
#
# A noisy Swiss roll in three dimensions, with only 1,000 rows: few enough that
# a flow with five layers of two 100-unit hidden layers can overfit them.
# ``n_iter_no_change=40`` gives early stopping enough patience for the
# overfitting to show on the curves.

import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_swiss_roll
from sklearn.model_selection import train_test_split

from sklearn_maf import MAFDensity

# SKLEARN_MAF_FAST=1 (set by the test suite) trades the quality of the
# pictures for speed: fewer rows, a smaller flow, a few epochs.
FAST = os.environ.get("SKLEARN_MAF_FAST", "") not in ("", "0")

X, _ = make_swiss_roll(400 if FAST else 1500, noise=0.5, random_state=0)
X_train, X_test = train_test_split(
    X, test_size=500 // (4 if FAST else 1), random_state=0
)

if FAST:
    params = dict(n_layers=2, hidden_units=16, max_iter=8, n_iter_no_change=3)
else:
    params = dict(
        n_layers=5, hidden_units=100, max_iter=400, n_iter_no_change=40
    )

maf = MAFDensity(random_state=0, **params).fit(X_train)
best_epoch = int(np.argmax(maf.validation_scores_)) + 1
test_score = maf.score_samples(X_test).mean()
print(f"epochs run: {maf.n_iter_}, best validation epoch: {best_epoch}")
print(f"best validation log-likelihood: {maf.best_validation_score_:.3f} nats")
print(f"held-out test log-likelihood:   {test_score:.3f} nats per row")

# %%
# The curves
# ----------
#
# The training loss keeps falling; the validation negative log-likelihood
# (minus ``validation_scores_``) falls, flattens and then drifts up as the flow
# starts to fit the noise of its training rows. Training stopped
# ``n_iter_no_change`` epochs after the best validation score, and the weights
# of that best epoch were restored: the fitted model is the one at the dashed
# line.
#
# The spikes of the validation curve come from batch normalisation: while the
# flow trains, the validation rows are scored with running averages of the
# batch statistics, which lag behind the weights after a large step. The
# fitted model uses the exact statistics of its training rows instead. Without
# batch normalisation (``batch_norm=False``) the validation curve is smoother.

epochs = np.arange(1, maf.n_iter_ + 1)
fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
ax.plot(epochs, maf.loss_curve_, label="training loss (loss_curve_)")
ax.plot(
    epochs,
    -np.asarray(maf.validation_scores_),
    label="validation NLL (-validation_scores_)",
)
ax.axvline(
    best_epoch,
    color="black",
    linestyle="--",
    linewidth=1,
    label=f"best epoch ({best_epoch}), weights restored",
)
ax.set_xlabel("epoch")
ax.set_ylabel("negative log-likelihood (nats per row)")
ax.set_title(f"MAFDensity on {len(X_train)} Swiss-roll rows")
low = min(np.min(maf.loss_curve_), -maf.best_validation_score_)
ax.set_ylim(low - 0.2, low + 2.5)
ax.legend()

# %%
# Learning rate
# -------------
#
# The same model with three values of ``learning_rate_init``, with early
# stopping and the default patience of 10 epochs. A high rate makes fast but
# noisy progress; a low one is smooth but slow, and with the default patience
# may stop before it reaches the best score. The legend gives the
# log-likelihood of the 500 test rows.

rates = [3e-3, 1e-3, 3e-4]
fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
for rate in rates:
    model = MAFDensity(
        learning_rate_init=rate,
        random_state=0,
        **dict(params, n_iter_no_change=3 if FAST else 10),
    ).fit(X_train)
    ax.plot(
        np.arange(1, model.n_iter_ + 1),
        -np.asarray(model.validation_scores_),
        label=f"learning_rate_init={rate:g}: test "
        f"{model.score_samples(X_test).mean():.2f} nats",
    )
ax.set_xlabel("epoch")
ax.set_ylabel("validation NLL (nats per row)")
ax.set_title("Validation curves for three learning rates")
ax.set_ylim(low - 0.2, low + 2.5)
ax.legend()

plt.show()
