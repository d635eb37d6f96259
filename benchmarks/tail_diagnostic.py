"""Why MAFDensity's held-out gap on heavy-tailed data is fragile: the worst rows.

Fits MAFDensity (with any public parameters, e.g. ``--base student-t``) and
the BIC-selected GaussianMixture of ``quality.py`` on the same rows, then
prints, for the test rows the MAF scores worst: their gap to the truth,
their Mahalanobis radius under the true scale matrix (Student t data only)
and the log-scale each MAF layer applies there — a value at the bound (5 in
the library) means the soft clamp is binding.

Usage::

    python benchmarks/tail_diagnostic.py [--dataset student-t-8d] [--seed 0]
        [--base student-t] [--params JSON] [--threads 1]
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality
import tune_defaults
from _densities import DENSITIES

from sklearn_maf import MAFDensity
from sklearn_maf._nn.transforms import AffineMADE, soft_clamp


def robust(diff, k=10):
    return np.sort(diff)[:-k].mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="student-t-8d", choices=sorted(DENSITIES))
    parser.add_argument("--seed", type=int, default=0, help="tune_defaults.py draw and random_state")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--base", default="gaussian", choices=["gaussian", "student-t"])
    parser.add_argument("--params", default="{}", help="MAFDensity arguments as JSON")
    parser.add_argument("--no-gmm", action="store_true")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ConvergenceWarning)

    density = DENSITIES[args.dataset]
    X_train, X_test = tune_defaults.draw(density, args.rows, args.rows // 2, args.seed)
    true = density.log_prob(X_test)
    params = {"base": args.base, **json.loads(args.params)}
    maf = MAFDensity(random_state=args.seed, **params).fit(X_train)
    diff = true - maf.score_samples(X_test)
    print(
        f"MAF ({args.base} base, {params or 'defaults'}): "
        f"gap {diff.mean():.4f} ± {diff.std(ddof=1) / np.sqrt(diff.size):.4f}, "
        f"without the worst 10 rows {robust(diff):.4f}, {maf.n_iter_} epochs"
    )
    if not args.no_gmm:
        gmm_score, note = quality.fit_gmm(X_train)
        gmm_diff = true - gmm_score(X_test)
        print(
            f"GMM ({note}): gap {gmm_diff.mean():.4f} ± {gmm_diff.std(ddof=1) / np.sqrt(gmm_diff.size):.4f}, "
            f"without the worst 10 rows {robust(gmm_diff):.4f}, worst row {gmm_diff.max():.1f}"
        )

    worst = np.argsort(diff)[::-1][:5]
    radius = None
    if density.name.startswith("student-t"):
        dim = density.dim
        index = np.arange(dim)
        shape = 0.7 ** np.abs(index[:, None] - index[None, :]) * np.outer(*[np.geomspace(0.5, 3.0, dim)] * 2)
        precision = np.linalg.inv(shape)

        def radius(X):
            return np.sqrt(np.einsum("ij,jk,ik->i", X, precision, X))

        print(f"largest Mahalanobis radius among the training rows: {radius(X_train).max():.1f}")
    for row in worst:
        line = f"test row {row}: gap {diff[row]:.1f} nats"
        if radius is not None:
            line += f", Mahalanobis radius {radius(X_test[row : row + 1])[0]:.1f}"
        print(line)
        x = torch.tensor(X_test[row : row + 1], dtype=torch.float64)
        with torch.no_grad():
            for transform in maf.module_.transforms:
                if isinstance(transform, AffineMADE):
                    _, raw = transform.made(x)
                    log_scale = soft_clamp(raw, transform.log_scale_bound)
                    print("   layer log-scales", np.array2string(log_scale.numpy()[0], precision=2))
                x, _ = transform(x)
        print("   base point u", np.array2string(x.numpy()[0], precision=1))


if __name__ == "__main__":
    main()
