"""MAFDensity on a GPU: against nflows and zuko on the same GPU, and against the CPU.

Run on a machine with CUDA::

    python -m pip install -e ".[bench]"
    python benchmarks/gpu.py [--quick] [--out FILE]

Sections, all in one process:

``same-architecture``
    ``benchmarks/speed.py``'s comparison (5 MAF layers, MADE 8 -> 100 -> 100
    -> 16, reversed orders, no batch norm, plain Adam, 20,000 x 8 rows of a
    Gaussian mixture) with every library on the GPU, at batch 256 (the
    benchmark's batch, where a step is a few hundred small kernel launches)
    and at batch 4,096. Seconds per epoch, ``score_samples`` on 1,000,000 rows
    and ``sample`` of 200,000 rows, as ratios peer / ours. sklearn-maf trains
    in float32 and scores and samples in float64 (its default precision);
    the comparators work in float32 throughout.
``cpu-vs-gpu``
    MAFDensity with ``device="cuda"`` against ``device="cpu"`` (all the
    machine's cores) on a larger problem: 200,000 x 16 rows, hidden layers of
    512 units, batch 4,096; one epoch of training, ``score_samples`` on
    1,000,000 rows and ``sample`` of 200,000 rows.

Each time is the best of ``--repeats`` runs (interleaved between libraries);
the estimators return numpy arrays, so their times include the transfer back
to the host, and the comparators' times end with ``torch.cuda.synchronize()``.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import (  # noqa: E402
    BATCH,
    Report,
    _no_grad,
    best_times,
    fit_quietly,
    header,
    mixture,
    ours,
    peers,
    ratio_table,
)


def synchronized(function):
    """``function`` followed by a device synchronisation, so its time is complete."""

    def run():
        result = function()
        torch.cuda.synchronize()
        return result

    return run


def train_peer(peer, X, epochs, batch_size):
    """The plain Adam loop of ``speed.py``, with the shuffling done on the GPU."""
    optimizer = torch.optim.Adam(peer.flow.parameters(), lr=1e-3, fused=True)
    generator = torch.Generator(device=X.device).manual_seed(0)
    peer.flow.train()
    for _ in range(epochs):
        for index in torch.randperm(X.shape[0], generator=generator, device=X.device).split(batch_size):
            loss = -peer.log_prob(X[index]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    peer.flow.eval()


def same_architecture(report, args):
    n_rows, n_features, epochs = 20_000, 8, args.epochs
    n_score, n_sample = args.score_rows, args.sample_rows
    X = mixture(n_rows, n_features)
    X_score = mixture(n_score, n_features, seed=1)
    X_gpu = torch.tensor(X, dtype=torch.float32, device="cuda")
    X_score_gpu = torch.tensor(X_score, dtype=torch.float32, device="cuda")
    for batch_size in (BATCH, 4096):
        report(f"## Same architecture on the GPU: {n_rows:,} x {n_features} rows, {epochs} epochs, batch {batch_size:,}")
        report()
        model = ours(max_iter=epochs, batch_size=batch_size, device="cuda")
        others = peers(n_features)
        for peer in others:
            peer.flow.to("cuda")
        train = {"sklearn-maf": lambda: fit_quietly(model, X)}
        for peer in others:
            train[peer.name] = synchronized(lambda peer=peer: train_peer(peer, X_gpu, epochs, batch_size))
        epoch_times = {name: t / epochs for name, t in best_times(train, args.repeats).items()}
        score = {"sklearn-maf": lambda: model.score_samples(X_score)}
        sample = {"sklearn-maf": lambda: model.sample(n_sample, random_state=0)}
        for peer in others:
            score[peer.name] = synchronized(lambda peer=peer: _no_grad(peer.log_prob, X_score_gpu))
            sample[peer.name] = synchronized(lambda peer=peer: _no_grad(peer.sample, n_sample))
        ratio_table(
            report,
            others,
            [
                ("training, s per epoch", epoch_times),
                (f"score_samples, {n_score:,} rows (s)", best_times(score, args.repeats)),
                (f"sample, {n_sample:,} rows (s)", best_times(sample, args.repeats)),
            ],
            digits=4,
        )


def cpu_vs_gpu(report, args):
    n_rows, n_features, hidden, batch_size = args.big_rows, 16, 512, 4096
    X = mixture(n_rows, n_features)
    X_score = mixture(args.score_rows, n_features, seed=1)
    report(
        f"## CPU ({torch.get_num_threads()} threads) against GPU: {n_rows:,} x {n_features} rows, "
        f"hidden layers of {hidden}, batch {batch_size:,}, one epoch"
    )
    report()
    models = {
        device: ours(max_iter=1, hidden_units=hidden, batch_size=batch_size, device=device)
        for device in ("cpu", "cuda")
    }
    rows = []
    for label, functions in (
        ("fit, one epoch (s)", {d: lambda m=m: fit_quietly(m, X) for d, m in models.items()}),
        (f"score_samples, {args.score_rows:,} rows (s)", {d: lambda m=m: m.score_samples(X_score) for d, m in models.items()}),
        (f"sample, {args.sample_rows:,} rows (s)", {d: lambda m=m: m.sample(args.sample_rows, random_state=0) for d, m in models.items()}),
    ):
        times = best_times(functions, args.repeats)
        rows.append([label, f"{times['cpu']:.3f}", f"{times['cuda']:.3f}", f"**{times['cpu'] / times['cuda']:.1f}x**"])
    report.table(["", "device='cpu'", "device='cuda'", "cpu / cuda"], rows)
    gpu, cpu = models["cuda"], models["cpu"]
    gap = np.max(np.abs(gpu.score_samples(X_score[:10_000]) - cpu.score_samples(X_score[:10_000])))
    report(f"(The two models are trained from the same seed on different devices; largest score difference on 10,000 rows: {gap:.2e} nats.)")
    report()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer rows")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available: this benchmark needs a GPU.")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.epochs = 2 if args.quick else 3
    args.score_rows = 100_000 if args.quick else 1_000_000
    args.sample_rows = 20_000 if args.quick else 200_000
    args.big_rows = 20_000 if args.quick else 200_000
    args.threads = None

    report = Report()
    header(report, args)
    report(f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    report()
    fit_quietly(ours(max_iter=1, device="cuda"), mixture(512, 8)).score_samples(mixture(512, 8))  # warm-up
    same_architecture(report, args)
    cpu_vs_gpu(report, args)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
