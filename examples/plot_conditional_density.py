"""
======================================================
Conditional density estimation with a conditional MAF
======================================================

:class:`~sklearn_maf.MAFConditionalDensity` learns the whole conditional
distribution ``p(y | x)``, not only its mean: here the spread of ``y`` grows
with ``|x|`` and, for ``x > 0``, ``y`` splits into two branches, which no
regression model with Gaussian noise can describe.

The features ``x`` are fed, unmasked, into every MADE of the flow (section 3.4
of the MAF paper). With a single target every MAF layer is affine in ``y``, so
a Gaussian base could only give a Gaussian ``p(y | x)``; the MADE MoG base
(``base="mog"``, the paper's "MAF MoG") makes each conditional a mixture, which
captures the two branches. We plot the learned conditional density as an image, its
conditional mean from :meth:`~sklearn_maf.MAFConditionalDensity.predict`, and
slices ``p(y | x)`` at a few ``x`` against the true density.
"""

# %%
# Data with a heteroscedastic, partly bimodal conditional
# -------------------------------------------------------
import os

import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

from sklearn_maf import MAFConditionalDensity

FAST = bool(os.environ.get("SKLEARN_MAF_FAST"))
rng = np.random.RandomState(0)


def true_conditional(x):
    """Mixture weights, means and scales of y | x."""
    scale = 0.15 + 0.15 * np.abs(x)
    split = np.clip(x, 0, None)  # the two branches separate for x > 0
    means = np.stack([np.sin(2 * x) + split, np.sin(2 * x) - split], axis=-1)
    return np.array([0.5, 0.5]), means, scale[..., None] * np.ones(2)


def draw(n):
    x = rng.uniform(-2, 2, size=n)
    weights, means, scales = true_conditional(x)
    branch = rng.randint(2, size=n)
    y = means[np.arange(n), branch] + scales[np.arange(n), branch] * rng.normal(size=n)
    return x[:, None], y


X, y = draw(1000 if FAST else 8000)

# %%
# Fit the conditional flow
# ------------------------
model = MAFConditionalDensity(
    n_layers=2 if FAST else 5,
    hidden_units=32 if FAST else 64,
    base="mog",
    n_components=5,
    max_iter=10 if FAST else 300,
    random_state=0,
).fit(X, y)
X_test, y_test = draw(2000)
print(f"held-out mean log p(y|x): {model.score_samples(X_test, y_test).mean():.3f} nats")

# %%
# The learned conditional density, its mean, and slices
# -----------------------------------------------------
xs = np.linspace(-2, 2, 60 if FAST else 120)
ys = np.linspace(-4, 4, 80 if FAST else 160)
xx, yy = np.meshgrid(xs, ys)
density = np.exp(model.score_samples(xx.reshape(-1, 1), yy.ravel())).reshape(yy.shape)

fig, (ax_map, ax_slices) = plt.subplots(1, 2, figsize=(11, 4.5))
ax_map.pcolormesh(xx, yy, density, shading="auto", cmap="viridis")
ax_map.scatter(X[:400, 0], y[:400], s=2, c="white", alpha=0.4, label="training rows")
ax_map.plot(xs, model.predict(xs[:, None]), c="tab:red", lw=2, label="predict: E[y | x]")
ax_map.set(xlabel="x", ylabel="y", title="learned p(y | x)")
ax_map.legend(loc="lower left")

for x0, colour in zip([-1.5, 0.0, 1.5], ["tab:blue", "tab:orange", "tab:green"]):
    learned = np.exp(model.score_samples(np.full((ys.size, 1), x0), ys))
    weights, means, scales = true_conditional(np.array(x0))
    truth = sum(w * stats.norm(m, s).pdf(ys) for w, m, s in zip(weights, means, scales))
    ax_slices.plot(ys, learned, c=colour, label=f"MAF, x = {x0}")
    ax_slices.plot(ys, truth, c=colour, ls="--", label=f"true, x = {x0}")
ax_slices.set(xlabel="y", ylabel="density", title="slices p(y | x)")
ax_slices.legend(fontsize=8)
fig.tight_layout()
plt.show()
