"""How fast MAFDensity trains, scores and samples, side by side with nflows and zuko.

Run::

    python -m pip install -e ".[bench]"       # nflows and zuko, the comparators
    python benchmarks/speed.py [--quick] [--out FILE] [--threads N] [--sections ...]

Everything runs in one process, with the same torch thread count for every
library, on rows drawn from one Gaussian mixture. Sections:

``same-architecture``
    The same flow in the three libraries: 5 MAF layers of a MADE with two
    hidden layers of 100 ReLU units, reversed orders, standard-normal base, no
    batch norm, batch 256, the same number of epochs of plain Adam
    (learning rate 1e-3). sklearn-maf runs through its public API
    (``MAFDensity(...).fit``, which includes input validation and setup), the
    comparators through the usual training loop. Seconds per training epoch,
    ``score_samples`` on 200,000 rows and ``sample`` of 20,000 rows, as ratios
    peer / ours (above 1: sklearn-maf is faster). sklearn-maf scores and samples
    in float64 (see the README, "Precision"); the comparators in float32, their
    default.
``matmul``
    This machine's float32 matrix-multiply rate, and the training FLOP rate of
    sklearn-maf as a fraction of it. An epoch costs about
    ``3 x 2 x (D*H + H*H + 2*D*H) x n_layers x n_rows`` floating-point operations
    (forward, and a backward pass of twice its cost). With ``same-architecture``
    in the run, the reference rate is the large product's measured between
    its training runs (one burst after each round of the libraries, the best
    of them), as the training time is the best of those runs: both rates
    then come from the same minutes of a machine whose speed drifts by 20-30%
    over minutes (in one run every library trained 20-30% slower than in
    the runs before, while the product measured after them ran at full
    speed: 0.31 of it, against 0.40 and 0.45 in those runs). The rate
    measured in this section alone is shown beside it.
``quality``
    Time to quality: ``MAFDensity()`` at its defaults against zuko's MAF
    (same architecture, same data, standardised) trained with early stopping on
    10% of the rows (patience 10 epochs) until it stops. Both are scored on
    held-out rows after every epoch (off the clock) to find when each first
    reaches zuko's final held-out log-likelihood. Each run is the same seeded
    computation; ``--quality-runs`` runs (3) are interleaved and the medians
    count, as one run of each was at the mercy of the machine's busy spells.
``scale``
    Fit (one epoch) and ``score_samples`` times as rows grow (10k to 1M) and as
    dimensions grow (2 to 64); ``sample`` as dimensions grow.
``memory``
    Peak memory of ``score_samples`` and ``sample`` on 1,000,000 x 10 rows: the
    resident-set growth during the call (sampled every millisecond) and the
    peak of numpy allocations (tracemalloc), beyond the input.
``defaults``
    Not run unless named: which ``batch_size``, ``learning_rate_init`` and
    ``n_iter_no_change`` reach a good held-out log-likelihood fastest.

Timings on a shared machine vary from run to run; each figure is the best of
``--repeats`` runs, interleaved between libraries so that a busy spell hits
all of them.
"""

import argparse
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
from importlib import metadata

import numpy as np
import torch
from _machine import cpu_model  # benchmarks/ is on sys.path when a script runs
from sklearn.exceptions import ConvergenceWarning

import sklearn_maf
from sklearn_maf import MAFDensity

try:
    import zuko
except ImportError:  # pragma: no cover - the bench extra is optional
    zuko = None
try:
    import nflows
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        ReversePermutation,
    )
except ImportError:  # pragma: no cover
    nflows = None

ALL_SECTIONS = ["same-architecture", "matmul", "quality", "scale", "memory"]
N_LAYERS, HIDDEN, BATCH = 5, 100, 256


# ----------------------------------------------------------------------------- data


def mixture(n_rows, n_features, seed=0, n_components=5):
    """Rows of a fixed Gaussian mixture with correlated, unequal components."""
    params = np.random.RandomState(1000 + n_features)
    means = params.normal(scale=3.0, size=(n_components, n_features))
    factors = params.normal(size=(n_components, n_features, n_features)) / np.sqrt(n_features)
    factors += 0.3 * np.eye(n_features)
    rng = np.random.RandomState(seed)
    component = rng.randint(n_components, size=n_rows)
    noise = rng.normal(size=(n_rows, n_features))
    return means[component] + np.einsum("nj,nij->ni", noise, factors[component])


# ----------------------------------------------------------------------------- peers


def zuko_flow(n_features):
    return zuko.flows.MAF(n_features, transforms=N_LAYERS, hidden_features=(HIDDEN, HIDDEN))


def nflows_flow(n_features):
    transforms = []
    for index in range(N_LAYERS):
        if index:
            transforms.append(ReversePermutation(n_features))
        # num_blocks=1 without residual blocks: D -> H -> H -> 2D, ReLU after
        # each hidden layer, as MAFDensity(n_hidden_layers=2).
        transforms.append(
            MaskedAffineAutoregressiveTransform(
                features=n_features,
                hidden_features=HIDDEN,
                num_blocks=1,
                use_residual_blocks=False,
                random_mask=False,
            )
        )
    return Flow(CompositeTransform(transforms), StandardNormal([n_features]))


class Peer:
    """A comparator: its flow, log-density and sampler in float32."""

    def __init__(self, name, n_features):
        self.name = name
        if name == "zuko":
            self.flow = zuko_flow(n_features)
            self.log_prob = lambda x: self.flow().log_prob(x)
            self.sample = lambda n: self.flow().sample((n,))
        else:
            self.flow = nflows_flow(n_features)
            self.log_prob = self.flow.log_prob
            self.sample = self.flow.sample

    def train(self, X, epochs, generator, batch_size=BATCH, learning_rate=1e-3, on_epoch=None):
        """The plain Adam loop; ``on_epoch(epoch)`` may return True to stop."""
        optimizer = torch.optim.Adam(self.flow.parameters(), lr=learning_rate, fused=True)
        self.flow.train()
        for epoch in range(epochs):
            for index in torch.randperm(X.shape[0], generator=generator).split(batch_size):
                loss = -self.log_prob(X[index]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if on_epoch is not None and on_epoch(epoch):
                break
        self.flow.eval()

    @torch.no_grad()
    def mean_log_prob(self, X, chunk=65536):
        return float(sum(self.log_prob(X[i : i + chunk]).double().sum() for i in range(0, len(X), chunk)) / len(X))


def peers(n_features):
    # nflows and zuko initialise from torch's global generator: seed it, so that
    # every run starts the comparators from the same weights.
    torch.manual_seed(0)
    names = [name for name, module in (("nflows", nflows), ("zuko", zuko)) if module is not None]
    return [Peer(name, n_features) for name in names]


def ours(**params):
    # the peers' model: the flow alone on a plain N(0, I) base, without the
    # power-law tails that tail_cut="auto" fits after training (one scoring
    # pass of the training rows, which a 5-epoch timing would otherwise spread
    # over its epochs) and without the classical reference mixed into it
    defaults = dict(
        n_layers=N_LAYERS,
        hidden_units=HIDDEN,
        n_hidden_layers=2,
        batch_norm=False,
        early_stopping=False,
        batch_size=BATCH,
        tail_cut=None,
        base="gaussian",  # the peers' base (the default, "auto", would fit a t first to decide)
        reference=None,
        random_state=0,
    )
    return MAFDensity(**{**defaults, **params})


# ----------------------------------------------------------------------------- timing


def clock(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def ratio_table(report, others, timings, digits):
    """One row per ``(label, {name: seconds})``: our time, then each peer's and peer / ours."""
    rows = []
    for label, times in timings:
        row = [label, f"{times['sklearn-maf']:.{digits}f}"]
        for peer in others:
            row += [f"{times[peer.name]:.{digits}f}", f"**{times[peer.name] / times['sklearn-maf']:.2f}x**"]
        rows.append(row)
    head = ["", "sklearn-maf"]
    for peer in others:
        head += [peer.name, f"{peer.name} / ours"]
    report.table(head, rows)


def best_times(functions, repeats):
    """Best (lowest) wall time of each named function, runs interleaved between them.

    The lowest of several runs is the one least disturbed by whatever else
    the machine was doing, as timeit recommends; interleaving spreads a busy
    spell over all the libraries.
    """
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(clock(function)[0])
    return {name: float(np.min(values)) for name, values in times.items()}


def matmul_rate(size, repeats=3, seconds=0.5):
    """float32 GEMM rate in GFLOP/s, the best of ``repeats`` runs."""
    a = torch.randn(size[0], size[1])
    b = torch.randn(size[1], size[2])
    flops = 2.0 * size[0] * size[1] * size[2]
    best = 0.0
    for _ in range(repeats):
        torch.mm(a, b)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            count += 1
        best = max(best, count * flops / (time.perf_counter() - start) / 1e9)
    return best


def epoch_flops(n_features, n_rows):
    D, H = n_features, HIDDEN
    return 3 * 2 * (D * H + H * H + 2 * D * H) * N_LAYERS * n_rows


# ----------------------------------------------------------------------------- report


class Report:
    def __init__(self):
        self.lines = []

    def __call__(self, line=""):
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header, rows):
        self("| " + " | ".join(header) + " |")
        self("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            self("| " + " | ".join(str(cell) for cell in row) + " |")
        self()


def git_revision():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def header(report, args):
    report("# sklearn-maf speed benchmark")
    report()
    report(f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1], *sys.argv])}`")
    report(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report(f"- machine: {cores} cores (nproc), {cpu_model()}, {platform.system()} {platform.release()}")
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        report(f"- load average at start: {load}")
    except OSError:
        pass
    report(f"- torch threads: {torch.get_num_threads()} for every library")
    versions = [f"python {platform.python_version()}"]
    for package in ("torch", "numpy", "scikit-learn", "nflows", "zuko"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    versions.append(f"sklearn-maf {sklearn_maf.__version__} ({git_revision()})")
    report(f"- versions: {', '.join(versions)}")
    report()


def warm_up(n_features=8):
    """Pay one-time costs (imports torch.optim pulls in, thread pools) off the clock."""
    X = mixture(512, n_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = ours(max_iter=1).fit(X)
    model.score_samples(X)
    model.sample(10, random_state=0)
    X32 = torch.tensor(X, dtype=torch.float32)
    for peer in peers(n_features):
        peer.train(X32, 1, torch.Generator().manual_seed(0))
        with torch.no_grad():
            peer.log_prob(X32)
            peer.sample(10)


# ----------------------------------------------------------------------------- sections


def fit_quietly(model, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X)


def same_architecture(report, args, results):
    n_rows, n_features = args.rows, 8
    epochs, repeats = args.epochs, args.repeats
    X = mixture(n_rows, n_features)
    X_score = mixture(200_000, n_features, seed=1)
    X32 = torch.tensor(X, dtype=torch.float32)
    X_score32 = torch.tensor(X_score, dtype=torch.float32)
    report(f"## Same architecture: {n_rows:,} x {n_features} rows, {epochs} epochs, batch {BATCH}")
    report()
    report(
        f"{N_LAYERS} MAF layers, MADE {n_features} -> {HIDDEN} -> {HIDDEN} -> {2 * n_features} "
        "(ReLU), reversed orders, N(0, I) base, no batch norm; Adam, learning rate 1e-3."
    )
    report()

    model = ours(max_iter=epochs)
    others = peers(n_features)
    train = {"sklearn-maf": lambda: fit_quietly(model, X)}
    for peer in others:
        train[peer.name] = lambda peer=peer: peer.train(X32, epochs, torch.Generator().manual_seed(0))
    # the large-GEMM rate, measured between the training runs (see ``matmul``)
    gemm_size, gemm_rates = (_large_gemm(args),) * 3, []
    train[GEMM] = lambda: gemm_rates.append(matmul_rate(gemm_size, repeats=1))
    epoch_times = {name: t / epochs for name, t in best_times(train, repeats).items() if name != GEMM}
    results["interleaved_gemm_rate"] = max(gemm_rates)

    score = {"sklearn-maf": lambda: model.score_samples(X_score)}
    sample = {"sklearn-maf": lambda: model.sample(20_000, random_state=0)}
    for peer in others:
        score[peer.name] = lambda peer=peer: _no_grad(peer.log_prob, X_score32)
        sample[peer.name] = lambda peer=peer: _no_grad(peer.sample, 20_000)
    score_times = best_times(score, repeats)
    sample_times = best_times(sample, repeats)

    ratio_table(
        report,
        others,
        [
            ("training, s per epoch", epoch_times),
            ("score_samples, 200,000 rows (s)", score_times),
            ("sample, 20,000 rows (s)", sample_times),
        ],
        digits=3,
    )
    results["epoch_seconds"] = epoch_times["sklearn-maf"]
    results["epoch_rows"], results["epoch_features"] = n_rows, n_features


def _no_grad(function, *args):
    with torch.no_grad():
        return function(*args)


GEMM = "large GEMM"


def _large_gemm(args):
    return 1024 if args.quick else 2048


def matmul(report, args, results):
    report("## Matrix-multiply rate and training efficiency")
    report()
    big = _large_gemm(args)
    alone = matmul_rate((big, big, big))
    rows = [[f"float32 {big} x {big} x {big}", f"{alone:.1f}", "1.00"]]
    peak = alone
    if "interleaved_gemm_rate" in results:
        # the reference: measured in the same minutes as the training runs
        peak = results["interleaved_gemm_rate"]
        rows = [
            [f"float32 {big} x {big} x {big}, between the training runs (the reference)", f"{peak:.1f}", "1.00"],
            [f"float32 {big} x {big} x {big}, in this section", f"{alone:.1f}", f"{alone / peak:.2f}"],
        ]
    shapes = [(BATCH, HIDDEN, HIDDEN), (HIDDEN, BATCH, HIDDEN)]
    for shape in shapes:
        rate = matmul_rate(shape)
        rows.append([f"float32 {shape[0]} x {shape[1]} x {shape[2]} (a training-step product)", f"{rate:.1f}", f"{rate / peak:.2f}"])
    if "epoch_seconds" in results:
        flops = epoch_flops(results["epoch_features"], results["epoch_rows"])
        achieved = flops / results["epoch_seconds"] / 1e9
        rows.append(
            [
                f"sklearn-maf training ({flops / 1e9:.2f} GFLOP per epoch)",
                f"{achieved:.1f}",
                f"**{achieved / peak:.2f}**",
            ]
        )
    report.table(["", "GFLOP/s", "fraction of the large-GEMM rate"], rows)


def quality(report, args, results):
    n_rows, n_features = args.rows, 8
    X = mixture(n_rows, n_features)
    X_test = mixture(20_000, n_features, seed=2)
    runs = args.quality_runs
    report(f"## Time to quality: {n_rows:,} x {n_features} rows, held-out log-likelihood on 20,000 rows")
    report()
    # Each run is the same computation (same seeds, same epochs): only the
    # machine's speed varies, so the runs are interleaved and their median counts.
    names = ["sklearn-maf MAFDensity()"] + (["zuko MAF, early stopping"] if zuko is not None else [])
    curves = {name: [] for name in names}
    for _ in range(runs):
        curves[names[0]].append(_time_to_quality_ours(MAFDensity(random_state=0), X, X_test))
        if zuko is not None:
            curves[names[1]].append(_time_to_quality_zuko(X, X_test, seed=0))
    target = curves[names[-1]][0]["final"]
    reach = {name: [_reach(curve, target) for curve in curves[name]] for name in names}
    rows = []
    for name in names:
        first = curves[name][0]
        totals = [curve["total"] for curve in curves[name]]
        rows.append(
            [
                name,
                _median_and_range(totals),
                str(first["epochs"]),
                f"{first['final']:.4f}",
                _median_and_range(reach[name]),
            ]
        )
    report.table(
        ["", "fit wall time (s)", "epochs", "held-out mean log-likelihood", "s to reach zuko's final"],
        rows,
    )
    if zuko is not None:
        zuko_totals = [curve["total"] for curve in curves[names[1]]]
        ours_totals = [curve["total"] for curve in curves[names[0]]]
        per_run = [z / r for z, r in zip(zuko_totals, reach[names[0]])]
        report(
            f"zuko wall time / sklearn-maf time to reach zuko's held-out log-likelihood: "
            f"**{np.median(zuko_totals) / np.median(reach[names[0]]):.2f}x** (medians of {runs} runs; "
            f"per run {', '.join(f'{ratio:.2f}x' for ratio in per_run)}); zuko wall time / "
            f"sklearn-maf whole fit: **{np.median(zuko_totals) / np.median(ours_totals):.2f}x**."
        )
        report()
    report(
        "Times are medians (and ranges) over the runs, each run the same seeded "
        "computation. Held-out scores during training are taken after every epoch, off the clock; "
        "sklearn-maf's are those of the float32 training model with running batch-norm "
        "averages, its final score that of the fitted float64 model (exact batch-norm "
        "statistics). When only the fitted model reaches the target, the whole fit counts."
    )
    report()


def _reach(curve, target):
    """Seconds until ``curve`` first scores ``target`` or more (the whole fit if only its end does)."""
    reach = next((t for t, ll in zip(curve["times"], curve["scores"]) if ll >= target), math.nan)
    if math.isnan(reach) and curve["final"] >= target:
        reach = curve["total"]  # reached by the fitted model only: the whole fit counts
    return reach


def _median_and_range(values):
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def _time_to_quality_ours(model, X, X_test):
    """Fit ``model``; after every epoch score X_test off the clock."""
    from sklearn_maf import _training

    X_test_tensor = {}
    times, scores = [], []
    paused = [0.0]
    start = time.perf_counter()
    original = _training.mean_log_prob

    def mean_log_prob(module, *validation):
        result = original(module, *validation)
        pause = time.perf_counter()
        if module not in X_test_tensor:
            X_test_tensor[module] = torch.tensor(X_test, dtype=next(module.parameters()).dtype)
        scores.append(original(module, X_test_tensor[module]))
        paused[0] += time.perf_counter() - pause
        times.append(time.perf_counter() - start - paused[0])
        return result

    _training.mean_log_prob = mean_log_prob
    try:
        fit_quietly(model, X)
    finally:
        _training.mean_log_prob = original
    total = time.perf_counter() - start - paused[0]
    return dict(times=times, scores=scores, total=total, epochs=model.n_iter_, final=model.score_samples(X_test).mean())


def _time_to_quality_zuko(X, X_test, seed, patience=10, max_epochs=500, validation_fraction=0.1):
    rng = np.random.RandomState(seed)
    permutation = rng.permutation(len(X))
    n_validation = int(math.ceil(validation_fraction * len(X)))
    train, validation = X[permutation[n_validation:]], X[permutation[:n_validation]]
    loc, scale = train.mean(axis=0), train.std(axis=0)
    log_jacobian = -np.log(scale).sum()
    as_tensor = lambda A: torch.tensor((A - loc) / scale, dtype=torch.float32)  # noqa: E731
    train_t, validation_t, test_t = as_tensor(train), as_tensor(validation), as_tensor(X_test)
    torch_rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # zuko initialises from torch's global generator
    peer = Peer("zuko", X.shape[1])
    state = dict(best=-math.inf, best_state=None, waited=0, epochs=0, paused=0.0)
    times, scores = [], []
    start = time.perf_counter()

    def on_epoch(epoch):
        pause = time.perf_counter()
        peer.flow.eval()
        scores.append(peer.mean_log_prob(test_t) + log_jacobian)
        peer.flow.train()
        state["paused"] += time.perf_counter() - pause
        score = peer.mean_log_prob(validation_t)  # on the clock: early stopping needs it
        state["epochs"] = epoch + 1
        if score > state["best"] + 1e-4:
            state["waited"] = 0
        else:
            state["waited"] += 1
        if score > state["best"]:
            state["best"] = score
            state["best_state"] = {k: v.clone() for k, v in peer.flow.state_dict().items()}
        times.append(time.perf_counter() - start - state["paused"])
        return state["waited"] >= patience

    peer.train(train_t, max_epochs, torch_rng, on_epoch=on_epoch)
    peer.flow.load_state_dict(state["best_state"])
    total = time.perf_counter() - start - state["paused"]
    final = peer.mean_log_prob(test_t) + log_jacobian
    return dict(times=times, scores=scores, total=total, epochs=state["epochs"], final=final)


def scale(report, args, results):
    report("## Scale")
    report()
    row_counts = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    rows = []
    for n_rows in row_counts:
        X = mixture(n_rows, 8)
        model = ours(max_iter=1)
        fit_time = clock(lambda: fit_quietly(model, X))[0]
        score_time = clock(lambda: model.score_samples(X))[0]
        rows.append([f"{n_rows:,}", f"{fit_time:.2f}", f"{fit_time / n_rows * 1e6:.1f}", f"{score_time:.2f}", f"{score_time / n_rows * 1e6:.2f}"])
    report("Rows (8 features; one epoch, batch 256, the same-architecture flow):")
    report()
    report.table(["rows", "fit 1 epoch (s)", "µs / row", "score_samples (s)", "µs / row"], rows)

    n_rows = 10_000 if args.quick else 20_000
    dims = [2, 8, 64] if args.quick else [2, 4, 8, 16, 32, 64]
    rows = []
    for n_features in dims:
        X = mixture(n_rows, n_features)
        model = ours(max_iter=1)
        fit_time = clock(lambda: fit_quietly(model, X))[0]
        score_time = clock(lambda: model.score_samples(X))[0]
        sample_time = clock(lambda: model.sample(n_rows, random_state=0))[0]
        rows.append(
            [
                str(n_features),
                f"{fit_time:.2f}",
                f"{score_time:.3f}",
                f"{sample_time:.3f}",
                f"{sample_time / score_time:.1f}",
            ]
        )
    report(f"Dimensions ({n_rows:,} rows; one epoch):")
    report()
    report.table(["features", "fit 1 epoch (s)", "score_samples (s)", f"sample {n_rows:,} (s)", "sample / score"], rows)


class _PeakRSS:
    """Highest resident set size seen while the block runs, sampled every millisecond."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self):
        return (self.peak - self.start) / 2**20


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(report, args, results):
    n_rows, n_features = 1_000_000, 10
    X = mixture(n_rows, n_features)
    model = fit_quietly(ours(max_iter=1), X[:20_000])
    report(f"## Memory: {n_rows:,} x {n_features} rows (input {X.nbytes / 2**20:.0f} MB, output of score_samples {n_rows * 8 / 2**20:.0f} MB)")
    report()
    rows = []
    model.score_samples(X[:10_000])  # first calls: allocator pools, off the record
    model.sample(10_000, random_state=0)
    for name, function in (
        ("score_samples", lambda: model.score_samples(X)),
        ("sample", lambda: model.sample(n_rows, random_state=0)),
    ):
        tracemalloc.start()
        with _PeakRSS() as rss:
            elapsed = clock(function)[0]
        _, numpy_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append([name, f"{elapsed:.2f}", f"{rss.growth_mb:.0f}", f"{numpy_peak / 2**20:.0f}"])
    report.table(["", "time (s)", "peak RSS growth (MB)", "peak numpy allocations (MB, tracemalloc)"], rows)
    report("Both include the result (8 MB for score_samples, 76 MB for sample).")
    report()


def defaults(report, args, results):
    """Which batch size, learning rate and patience reach a good model fastest."""
    n_features = 8
    X = mixture(args.rows, n_features)
    X_test = mixture(20_000, n_features, seed=2)
    report(f"## Defaults: {args.rows:,} x {n_features} rows, held-out log-likelihood on 20,000 rows")
    report()
    grid = [dict()]
    grid += [dict(batch_size=b) for b in (128, 512, 1024)]
    grid += [dict(learning_rate_init=lr) for lr in (3e-4, 3e-3, 1e-2)]
    grid += [dict(batch_size=512, learning_rate_init=3e-3), dict(batch_size=1024, learning_rate_init=3e-3)]
    grid += [dict(n_iter_no_change=p) for p in (5, 20)]
    grid += [dict(batch_norm=False)]
    rows = []
    for params in grid:
        scores, times, epochs = [], [], []
        for seed in range(args.seeds):
            model = MAFDensity(random_state=seed, **params)
            elapsed = clock(lambda: fit_quietly(model, X))[0]
            scores.append(model.score_samples(X_test).mean())
            times.append(elapsed)
            epochs.append(model.n_iter_)
        label = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        rows.append([label, f"{np.mean(times):.1f}", f"{np.mean(epochs):.0f}", f"{np.mean(scores):.4f}", f"{np.std(scores):.4f}"])
        print(f"  done: {' | '.join(rows[-1])}", file=sys.stderr, flush=True)
    report.table(["parameters", "fit (s)", "epochs", "held-out log-likelihood (mean)", "(std over seeds)"], rows)


SECTIONS = {
    "same-architecture": same_architecture,
    "matmul": matmul,
    "quality": quality,
    "scale": scale,
    "memory": memory,
    "defaults": defaults,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, epochs and sizes")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every library (default: torch's)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=ALL_SECTIONS)
    parser.add_argument("--repeats", type=int, default=None, help="runs per timing (the best counts)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs in the same-architecture timing")
    parser.add_argument("--rows", type=int, default=20_000, help="training rows")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting in the defaults section")
    parser.add_argument("--quality-runs", type=int, default=None, help="runs of the time-to-quality section (median)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.epochs = args.epochs or (2 if args.quick else 5)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.quality_runs = args.quality_runs or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)

    report = Report()
    header(report, args)
    warm_up()
    results = {}
    for name in [s for s in SECTIONS if s in args.sections]:
        SECTIONS[name](report, args, results)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(report.lines) + "\n")


if __name__ == "__main__":
    main()
