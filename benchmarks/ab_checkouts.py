"""Two checkouts of sklearn-maf side by side: CPU time of fit, score_samples and sample, interleaved.

Run::

    python benchmarks/ab_checkouts.py OLD_TREE NEW_TREE [--model same-architecture|batch-norm] [--rounds 7]

Each tree is a checkout whose C module is built (``python setup.py
build_ext --inplace``); its ``sklearn_maf`` package is copied to a temporary
directory under another name, so that both load in one process and take
turns, round after round (the order reversed every round), on
``benchmarks/speed.py``'s data: 20,000 x 8 rows (two epochs), 200,000 rows
scored, 20,000 drawn. Figures are CPU seconds (``time.process_time``), best
and median of the rounds, with new / old: on a shared machine the best of
interleaved runs is the least disturbed comparison available.
"""

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import mixture  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

MODELS = {
    "same-architecture": dict(batch_norm=False),
    "batch-norm": dict(batch_norm=True),
}


def load(tree, name, directory):
    """``tree``'s sklearn_maf package, imported as ``name``."""
    shutil.copytree(Path(tree) / "sklearn_maf", Path(directory) / name, ignore=shutil.ignore_patterns("__pycache__"))
    return importlib.import_module(name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--model", choices=list(MODELS), default="same-architecture")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    directory = tempfile.mkdtemp()
    sys.path.insert(0, directory)
    packages = {"old": load(args.old, "sklearn_maf_old", directory), "new": load(args.new, "sklearn_maf_new", directory)}
    X, X_score = mixture(20_000, 8), mixture(200_000, 8, seed=1)
    epochs = 2
    params = dict(n_layers=5, hidden_units=100, batch_size=256, early_stopping=False, tail_cut=None, base="gaussian",
                  max_iter=epochs, random_state=0, **MODELS[args.model])  # fmt: skip
    # the flow alone: a tree that has the classical reference (reference="gmm"
    # by default) leaves it out, so that both trees fit and score one model
    models = {
        name: package.MAFDensity(**params, **({"reference": None} if "reference" in package.MAFDensity().get_params() else {}))
        for name, package in packages.items()
    }
    tasks = {
        "fit, s per epoch": (lambda model: model.fit(X), epochs),
        "score_samples, 200,000 rows": (lambda model: model.score_samples(X_score), 1),
        "sample, 20,000 rows": (lambda model: model.sample(20_000, random_state=0), 1),
    }
    print(f"#### {args.model}: CPU seconds, best (median) of {args.rounds} interleaved rounds")
    print()
    print("| | old | new | new / old, best | new / old, median |")
    print("|---|---|---|---|---|")
    for task, (function, divide) in tasks.items():
        times = {name: [] for name in models}
        for index in range(args.rounds):
            for name in list(models) if index % 2 == 0 else list(models)[::-1]:
                start = time.process_time()
                function(models[name])
                times[name].append((time.process_time() - start) / divide)
        old, new = np.array(times["old"]), np.array(times["new"])
        print(f"| {task} | {old.min():.4f} ({np.median(old):.4f}) | {new.min():.4f} ({np.median(new):.4f}) | "
              f"{new.min() / old.min():.3f} | {np.median(new) / np.median(old):.3f} |", flush=True)  # fmt: skip
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
