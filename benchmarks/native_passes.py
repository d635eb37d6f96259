"""Does each C pass pay for itself end to end? Training and scoring with each one switched off.

Run::

    python benchmarks/native_passes.py [--rounds 7] [--out FILE]

One process, one torch thread, ``benchmarks/speed.py``'s data (20,000 x 8 rows
of a Gaussian mixture; 200,000 rows scored) and same-architecture model
(5 MAF layers, MADEs of two hidden layers of 100 units, batch 256), with and
without batch norm. The variants run interleaved, round after round, and
each figure is CPU seconds (``time.process_time``, less sensitive than wall
time to other processes on a shared machine), best and median of the rounds.

The C passes are switched off through the private names that choose them
(this script measures the library's internals, which have no public switch):

- the training step's element-wise passes (affine layers, activations, batch
  norm, the Gaussian loss): ``Backprop(..., native=False)``, the same
  arithmetic as torch operations;
- the optimizer's ``adam_step``: torch's fused Adam per parameter group
  instead (``make_optimizer``'s fallback);
- scoring's ``affine_score`` and ``linear_relu_score``.
"""

import argparse
import sys
import time
import warnings

import numpy as np
import torch

from sklearn_maf import MAFDensity, _optimizer, _training
from sklearn_maf._nn import backprop, made, transforms

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speed import mixture  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

_DEFAULTS = backprop.Backprop.__init__.__defaults__
_MAKE_OPTIMIZER = _training.make_optimizer
_SCORES_IN_C, _FIRST_LAYER_IN_C = transforms._scores_in_c, made.MADE._first_layer_in_c


def configure(elementwise=True, adam=True, affine_score=True, linear_relu=True):
    """Switch the C passes on or off (all on: the library as installed)."""
    backprop.Backprop.__init__.__defaults__ = _DEFAULTS if elementwise else (False, False, None)
    _training.make_optimizer = _MAKE_OPTIMIZER if adam else (
        lambda module, lr, alpha: _optimizer._adam(_optimizer._parameter_groups(module, alpha), lr)
    )  # fmt: skip
    transforms._scores_in_c = _SCORES_IN_C if affine_score else (lambda *args: False)
    made.MADE._first_layer_in_c = _FIRST_LAYER_IN_C if linear_relu else (lambda *args: False)


def interleaved(function, variants, rounds):
    """CPU seconds of ``function()`` under each variant's configuration, the order reversed every round."""
    times = {name: [] for name in variants}
    for index in range(rounds):
        items = list(variants.items())
        for name, switches in items if index % 2 == 0 else items[::-1]:
            configure(**switches)
            start = time.process_time()
            function()
            times[name].append(time.process_time() - start)
    configure()
    return times


def table(report, title, times, divide=1.0):
    report(f"#### {title}")
    report()
    report("| variant | best | median | best / all C | median / all C |")
    report("|---|---|---|---|---|")
    best, median = min(times["all C"]) / divide, float(np.median(times["all C"])) / divide
    for name, values in times.items():
        values = np.array(values) / divide
        report(f"| {name} | {values.min():.4f} | {np.median(values):.4f} | "
               f"{values.min() / best:.3f} | {np.median(values) / median:.3f} |")  # fmt: skip
    report()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    lines = []

    def report(line=""):
        print(line, flush=True)
        lines.append(line)

    X, X_score = mixture(20_000, 8), mixture(200_000, 8, seed=1)
    epochs = 2
    model_params = dict(n_layers=5, hidden_units=100, batch_size=256, early_stopping=False, tail_cut=None,
                        base="gaussian", random_state=0)  # fmt: skip
    training = {
        "all C": {}, "no element-wise C": dict(elementwise=False), "no C Adam": dict(adam=False),
        "neither": dict(elementwise=False, adam=False),
    }  # fmt: skip
    for batch_norm in (False, True):
        model = MAFDensity(max_iter=epochs, batch_norm=batch_norm, **model_params)
        times = interleaved(lambda model=model: model.fit(X), training, args.rounds)
        table(report, f"Training, batch_norm={batch_norm}: CPU s per epoch, {args.rounds} rounds", times, epochs)
    model = MAFDensity(max_iter=1, batch_norm=False, **model_params).fit(X)
    scoring = {
        "all C": {}, "no affine_score": dict(affine_score=False), "no linear_relu_score": dict(linear_relu=False),
        "neither": dict(affine_score=False, linear_relu=False),
    }  # fmt: skip
    times = interleaved(lambda: model.score_samples(X_score), scoring, args.rounds)
    table(report, f"score_samples, 200,000 rows: CPU s, {args.rounds} rounds", times)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
