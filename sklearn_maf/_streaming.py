"""What ``partial_fit`` keeps between calls, so that a stream of chunks trains as ``fit`` does.

``fit`` sees all its rows at once; ``partial_fit`` sees one chunk per call and
must carry everything that ``fit`` keeps across epochs from one call to the
next: Adam's moments, the running gradient-norm limit, the moving average of
the weights, the learning-rate schedule, and the rows on which the fitted
model's batch-norm statistics and tails are chosen. :class:`StreamingState`
holds them; the estimator keeps one as ``_partial_state``.

A *pass* (an epoch of ``fit``) over a stream is recognised by its chunks: a
chunk seen before in the current pass (the same values, weights and shape)
starts the next pass. Chunks may come in any order in each pass, as
``dask_ml.wrappers.Incremental`` shuffles them; a stream that never repeats a
chunk is one long pass.
"""

import copy
import hashlib
import math

import numpy as np
import torch

from ._optimizer import _FlatAdam, _GradientClip, _ParameterAverage, _scale_learning_rate, make_optimizer
from ._training import ADAPTIVE_EPOCHS, ADAPTIVE_STEPS, _epoch

__all__ = ["RESERVOIR_ROWS", "Reservoir", "StreamingState", "chunk_key"]

# Rows of the uniform sample of the stream (a reservoir) on which each
# partial_fit call sets the fitted model's batch-norm statistics and chooses
# its tails, where fit uses all its training rows: means and variances from
# 10,000 rows are within 1% of a standard deviation of the exact ones; far
# fewer rows cost the streamed model measurably against fit's
# (benchmarks/RESULTS.md, "Streaming: partial_fit against fit").
RESERVOIR_ROWS = 10_000


def chunk_key(X, sample_weight):
    """A fingerprint of a chunk: the same values, weights and shape give the same key."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(X.shape).encode())
    digest.update(np.ascontiguousarray(X).data)
    digest.update(np.ascontiguousarray(sample_weight).data)
    return digest.digest()


class Reservoir:
    """A uniform sample of at most ``capacity`` rows of a stream (Vitter's algorithm R).

    Every row streamed so far is in the sample with the same probability,
    ``capacity / n_seen``, whatever the chunk sizes; each row keeps its weight.
    """

    def __init__(self, capacity, n_features, random_state):
        self.capacity = capacity
        self.X = np.empty((0, n_features))
        self.weight = np.empty(0)
        self.n_seen = 0
        self.random_state = random_state

    def add(self, X, weight):
        n_rows = X.shape[0]
        free = min(self.capacity - self.X.shape[0], n_rows)
        if free > 0:
            self.X = np.concatenate([self.X, X[:free]])
            self.weight = np.concatenate([self.weight, weight[:free]])
        # row number t (0-based, over the whole stream) replaces slot j, drawn
        # uniformly from 0..t, when j falls in the sample
        seen = self.n_seen + np.arange(free, n_rows)
        slots = np.floor(self.random_state.uniform(size=seen.size) * (seen + 1)).astype(np.int64)
        rows = np.flatnonzero(slots < self.capacity) + free
        slots = slots[slots < self.capacity]
        # of rows that land in the same slot, the later one stays, as in the sequential algorithm
        _, last = np.unique(slots[::-1], return_index=True)
        keep = slots.size - 1 - last
        self.X[slots[keep]] = X[rows[keep]]
        self.weight[slots[keep]] = weight[rows[keep]]
        self.n_seen += n_rows


class StreamingState:
    """The training state that ``partial_fit`` carries from call to call.

    Parameters
    ----------
    module : MAF
        The flow being trained, in the training dtype and on its device; its
        parameters are the live (not averaged) weights.
    learning_rate, alpha : float
        Adam's initial rate and the L2 penalty.
    generator : torch.Generator
        Shuffles the batches and draws the dequantisation noise.
    random_state : numpy.random.RandomState
        Draws the reservoir and the dequantisation of its rows.
    n_features : int
        Columns of the rows streamed.

    Attributes
    ----------
    n_passes : int
        Passes completed (a chunk already seen in a pass starts the next one).
    """

    def __init__(self, module, learning_rate, alpha, generator, random_state, n_features):
        self.module = module
        self.learning_rate, self.alpha = learning_rate, alpha
        self.optimizer = make_optimizer(module, learning_rate, alpha)
        self.clip = _GradientClip()
        self.average = _ParameterAverage(module, flat=getattr(self.optimizer, "flat_param", None))
        self.generator = generator
        self.random_state = random_state
        self.reservoir = Reservoir(RESERVOIR_ROWS, n_features, random_state)
        self.n_passes = 0
        self._pass_keys = set()
        self._pass_loss = self._pass_weight = 0.0
        self._pass_steps = 0
        self._best_loss = math.inf
        self._stall_passes = self._stall_steps = 0
        self._fitted = None

    def train_chunk(self, X, weight, key, *, batch_size, dequantize, adaptive, tol):
        """One epoch of shuffled mini-batches over the chunk ``X``; its mean loss.

        ``key`` (from :func:`chunk_key`) tells whether the chunk starts a new
        pass; at the end of a pass the schedule of ``learning_rate="adaptive"``
        runs as in ``fit`` without early stopping, on the pass's mean training
        loss: the rate halves once :data:`ADAPTIVE_EPOCHS` passes of
        :data:`ADAPTIVE_STEPS` steps or more in all go without an improvement
        of ``tol``.
        """
        if key in self._pass_keys:
            self._end_pass(adaptive, tol)
        self._pass_keys.add(key)
        loss, n_steps = _epoch(
            self.module, self.optimizer, X, weight, None, batch_size, self.generator, dequantize,
            self.clip, self.average,
        )  # fmt: skip
        rows = float(X.shape[0] if weight is None else weight.sum())
        self._pass_loss += loss * rows
        self._pass_weight += rows
        self._pass_steps += n_steps
        return loss

    def _end_pass(self, adaptive, tol):
        loss = self._pass_loss / self._pass_weight
        improved = loss < self._best_loss - tol
        self._best_loss = min(self._best_loss, loss)
        if improved:
            self._stall_passes = self._stall_steps = 0
        else:
            self._stall_passes += 1
            self._stall_steps += self._pass_steps
        if adaptive and self._stall_passes >= ADAPTIVE_EPOCHS and self._stall_steps >= ADAPTIVE_STEPS:
            _scale_learning_rate(self.optimizer, 0.5)
            self._stall_passes = self._stall_steps = 0
        self.n_passes += 1
        self._pass_keys = set()
        self._pass_loss = self._pass_weight = 0.0
        self._pass_steps = 0

    def fitted_module(self):
        """The flow with the averaged weights, in float64 (the live ones stay in training).

        One copy, made at the first call and refreshed in place at each call
        after it: copying a whole flow (``copy.deepcopy``) cost more than
        training a chunk of a few thousand rows.
        """
        if self._fitted is None:
            self._fitted = copy.deepcopy(self.module).to(torch.float64)
        with torch.no_grad():
            for fitted, average in zip(self._fitted.parameters(), self.average.average):
                fitted.copy_(average)
        return self._fitted

    def __getstate__(self):
        """Pickle on the CPU, each tensor on its own, so the stream continues after loading.

        Dask's distributed scheduler moves the estimator between workers
        (``dask_ml.wrappers.Incremental`` trains one block per task, on the
        worker that holds it): the moments, the averaged weights and the
        reservoir travel with it. Adam's moments travel where the optimizer is
        the flat one (the CPU, with the C module built); elsewhere Adam
        restarts after loading.
        """
        state = self.__dict__.copy()
        state["_fitted"] = None  # the estimator's module_, pickled with it
        module = copy.deepcopy(self.module).cpu()
        for param in module.parameters():  # no longer views of the optimizer's flat buffer
            param.data = param.data.clone()
        state["module"] = module
        optimizer = self.optimizer
        if isinstance(optimizer, _FlatAdam):
            state["optimizer"] = {
                "exp_avg": optimizer.exp_avg.cpu().clone(),
                "exp_avg_sq": optimizer.exp_avg_sq.cpu().clone(),
                "steps": optimizer.steps,
            }
        else:
            state["optimizer"] = None
        state["lr"] = _learning_rate(optimizer)
        state["average"] = {
            "values": [value.detach().cpu().clone() for value in self.average.average],
            "steps": self.average.steps,
        }
        state["clip"] = None if self.clip.average is None else float(self.clip.average)
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        module = state["module"]
        self.optimizer = make_optimizer(module, self.learning_rate, self.alpha)
        saved = state["optimizer"]
        if saved is not None and isinstance(self.optimizer, _FlatAdam):
            self.optimizer.exp_avg.copy_(saved["exp_avg"])
            self.optimizer.exp_avg_sq.copy_(saved["exp_avg_sq"])
            self.optimizer.steps = saved["steps"]
        _scale_learning_rate(self.optimizer, state.pop("lr") / self.learning_rate)
        self.average = _ParameterAverage(module, flat=getattr(self.optimizer, "flat_param", None))
        with torch.no_grad():
            for value, saved_value in zip(self.average.average, state["average"]["values"]):
                value.copy_(saved_value)
        self.average.steps = state["average"]["steps"]
        self.clip = _GradientClip()
        if state["clip"] is not None:
            like = next(module.parameters())
            self.clip.average = torch.tensor(state["clip"], dtype=like.dtype, device=like.device)
        self.generator = torch.Generator()
        self.generator.set_state(state["generator"])

    def to(self, device):
        """Move the training state to ``device`` (after loading a pickle: it loads on the CPU)."""
        state = self.__getstate__()
        state["module"] = state["module"].to(device)
        self.__setstate__(state)
        return self


def _learning_rate(optimizer):
    """The current learning rate of an optimizer from :func:`make_optimizer`."""
    return optimizer.lr if hasattr(optimizer, "lr") else optimizer.param_groups[0]["lr"]
