"""Quick start: fit MAFDensity, compare it with KernelDensity and GaussianMixture, sample.

Run with ``python examples/quickstart.py``. Takes well under a minute on two cores.
"""

import time

import numpy as np
from sklearn.datasets import make_moons
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neighbors import KernelDensity
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_maf import MAFDensity


def curved_data(n_samples, random_state):
    """Two interleaved half-moons in 2-D plus a curved third coordinate."""
    X, _ = make_moons(n_samples, noise=0.08, random_state=random_state)
    rng = np.random.RandomState(random_state)
    z = np.sin(3 * X[:, :1]) + 0.1 * rng.normal(size=(n_samples, 1))
    return np.hstack([X, z])


def fit_kde(X):
    """KernelDensity on standardised data, bandwidth by 3-fold cross-validation."""
    search = GridSearchCV(
        make_pipeline(StandardScaler(), KernelDensity()),
        {"kerneldensity__bandwidth": np.logspace(-1.5, 0, 12)},
        cv=3,
    ).fit(X)
    pipeline = search.best_estimator_
    # The scaler changes units: add its log-Jacobian so scores are densities of X.
    log_jacobian = -np.log(pipeline[0].scale_).sum()
    return lambda Z: pipeline.score_samples(Z) + log_jacobian


def fit_gmm(X):
    """GaussianMixture with the number of components chosen by BIC."""
    models = [GaussianMixture(k, n_init=2, random_state=0).fit(X) for k in range(1, 11)]
    best = min(models, key=lambda model: model.bic(X))
    return best.score_samples


def main():
    X = curved_data(6000, random_state=0)
    X_train, X_test = train_test_split(X, test_size=0.3, random_state=0)

    rows = []
    for name, fit in [
        ("MAFDensity()", lambda X: MAFDensity(random_state=0).fit(X).score_samples),
        ("KernelDensity (CV bandwidth)", fit_kde),
        ("GaussianMixture (BIC)", fit_gmm),
    ]:
        start = time.perf_counter()
        score_samples = fit(X_train)
        seconds = time.perf_counter() - start
        rows.append((name, score_samples(X_test).mean(), seconds))

    print(f"Held-out mean log-likelihood on {len(X_test)} rows (higher is better):")
    for name, score, seconds in rows:
        print(f"  {name:<30} {score:8.3f} nats   fit {seconds:5.1f} s")

    maf = MAFDensity(random_state=0).fit(X_train)
    samples = maf.sample(5, random_state=0)
    print("\nFive rows drawn from the fitted MAF:")
    print(np.array2string(samples, precision=3, suppress_small=True))


if __name__ == "__main__":
    main()
