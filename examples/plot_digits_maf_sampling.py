"""
=========================================
Sampling new hand-written digits with MAF
=========================================

The flow version of scikit-learn's kernel-density digits example: fit a
density to the 8x8 hand-written digits of :func:`~sklearn.datasets.load_digits`
in a PCA space, draw new points from it, and map them back to images.

Sampling from a :class:`~sklearn.neighbors.KernelDensity` picks a training
image and adds kernel noise, so its "new" digits are blurred copies of old
ones. :class:`~sklearn_maf.MAFDensity` learns a smooth density over the whole
space and its samples are new images; the second figure sets each beside its
nearest training image.
"""

# %%
# Dequantise, project and fit
# ---------------------------
#
# Pixel values are integers from 0 to 16. A continuous density can put
# unbounded mass on such values, so each pixel gets uniform noise in [0, 1)
# first ("dequantisation"): the model then describes images whose pixels
# spread over the same intervals. PCA keeps the 15 directions that carry most
# of the variance, where the density is learned.

import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neighbors import KernelDensity, NearestNeighbors

from sklearn_maf import MAFDensity

# SKLEARN_MAF_FAST=1 (set by the test suite) trades the quality of the
# pictures for speed: a smaller flow and a few epochs.
FAST = os.environ.get("SKLEARN_MAF_FAST", "") not in ("", "0")

digits = load_digits()
rng = np.random.RandomState(0)
X = digits.data + rng.uniform(size=digits.data.shape)
X_train, X_test = train_test_split(X, test_size=0.2, random_state=0)

pca = PCA(n_components=15, random_state=0).fit(X_train)
Z_train, Z_test = pca.transform(X_train), pca.transform(X_test)

if FAST:
    maf = MAFDensity(n_layers=2, hidden_units=16, max_iter=5, random_state=0)
else:
    maf = MAFDensity(n_layers=10, n_iter_no_change=30, random_state=0)
maf.fit(Z_train)

# %%
# For comparison, a kernel density in the same PCA space, with its bandwidth
# chosen by cross-validated likelihood as in scikit-learn's example. Both
# scores are log-densities of the 15 PCA coordinates, so they can be compared.
# With only 1,400 training images the kernel density scores about as well as
# the flow, or a little better: this is a small data set for a neural density
# model. The difference is in what their samples are.

bandwidths = np.logspace(-0.5, 1, 4 if FAST else 16)
search = GridSearchCV(KernelDensity(), {"bandwidth": bandwidths}, cv=3)
kde = search.fit(Z_train).best_estimator_
print(f"KernelDensity bandwidth: {kde.bandwidth:.2f}")
print("held-out log-likelihood per image (nats):")
print(f"  MAFDensity    {maf.score_samples(Z_test).mean():8.2f}")
print(f"  KernelDensity {kde.score_samples(Z_test).mean():8.2f}")

# %%
# New digits
# ----------
#
# Draw 44 points from the flow, map them back to pixel space with the inverse
# PCA, and clip them to the pixel range.

new_digits = pca.inverse_transform(maf.sample(44, random_state=0)).clip(0, 16)
real_digits = X_train[:44].clip(0, 16)


def show_grid(axes, images):
    for ax, image in zip(axes.ravel(), images):
        ax.imshow(
            image.reshape(8, 8),
            cmap=plt.cm.binary,
            vmin=0,
            vmax=16,
            interpolation="nearest",
        )
        ax.set_xticks([])
        ax.set_yticks([])


fig = plt.figure(figsize=(8, 7))
top, bottom = fig.subfigures(2, 1)
top.suptitle("Training digits (dequantised)")
bottom.suptitle("New digits drawn from the MAF")
show_grid(top.subplots(4, 11), real_digits)
show_grid(bottom.subplots(4, 11), new_digits)

# %%
# Are they copies?
# ----------------
#
# Each sampled digit (top row) beside the training digit closest to it in
# pixel space (bottom row): they share a style, not the pixels.

neighbours = NearestNeighbors(n_neighbors=1).fit(X_train)
nearest = X_train[
    neighbours.kneighbors(new_digits[:11], return_distance=False)[:, 0]
]

fig, axes = plt.subplots(2, 11, figsize=(8, 1.9))
show_grid(axes[:1], new_digits[:11])
show_grid(axes[1:], nearest.clip(0, 16))
axes[0, 0].set_ylabel("sample")
axes[1, 0].set_ylabel("nearest\ntraining", fontsize=9)

plt.show()
