"""The optimisation loop: shuffled mini-batches, Adam, early stopping, history.

Kept apart from the estimator so that fit -> epoch -> step are small functions
that work on tensors only; the estimator decides what data and which module
come in, and turns the returned history into fitted attributes.
"""

import copy
import gc
import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from sklearn.exceptions import ConvergenceWarning

from ._nn import backprop
from ._optimizer import (
    _FlatAdam,
    _GradientClip,
    _ParameterAverage,
    _scale_learning_rate,
    make_optimizer,
)

__all__ = ["TrainingConfig", "TrainingHistory", "mean_log_prob", "train_flow"]


@dataclass
class TrainingHistory:
    """What one call of :func:`train_flow` did, epoch by epoch."""

    loss_curve: list = field(default_factory=list)
    validation_scores: list = field(default_factory=list)
    best_loss: float = float("inf")
    best_validation_score: float = -float("inf")
    # per validation row: its score at the epoch the other rows would keep,
    # less its score at the epoch kept (_LeftOutChoice); None without validation
    validation_correction: object = field(default=None, compare=False)
    n_iter: int = 0
    n_steps: int = 0
    stopped_early: bool = False
    non_finite: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    """How :func:`train_flow` trains; the estimators make one from their parameters.

    Parameters
    ----------
    batch_size, learning_rate, alpha, max_iter, tol, n_iter_no_change
        As the estimators' ``batch_size``, ``learning_rate_init``, ``alpha``,
        ``max_iter``, ``tol`` and ``n_iter_no_change``.
    adaptive : bool, default=False
        Halve the learning rate each time :data:`ADAPTIVE_EPOCHS` consecutive
        epochs, of :data:`ADAPTIVE_STEPS` steps or more in all, go without an
        improvement of ``tol`` (the ``learning_rate="adaptive"`` schedule of
        the estimators).
    average : bool, default=False
        Keep an exponential moving average of the weights over the steps
        (:class:`~sklearn_maf._optimizer._ParameterAverage`) and make it the
        result: early stopping scores and restores averaged weights, and
        without validation rows the module ends with the average of the last
        steps. ``partial_fit`` trains the weights themselves, one epoch per
        call, and does not.
    verbose : bool, default=False
        Print one line per epoch.
    warn_not_converged : bool, default=True
        Warn with a ``ConvergenceWarning`` when ``max_iter`` epochs end without
        convergence; ``partial_fit`` runs one epoch on purpose and does not.
    """

    batch_size: int
    learning_rate: float
    alpha: float
    max_iter: int
    tol: float
    n_iter_no_change: int
    adaptive: bool = False
    average: bool = False
    verbose: bool = False
    warn_not_converged: bool = True


def _batches(n_rows, batch_size, generator, device=None, weight=None):
    """Shuffled index batches; a trailing batch of one row joins the one before.

    Batch normalisation must never see the statistics of a single row, and no
    row is left out of an epoch. With sample weights, the batches are drawn
    among the rows of positive weight only: a row of weight zero adds nothing
    to a loss, and a batch made only of such rows would have the loss 0 / 0.
    Where every weight is positive, the batches are those of unweighted data.
    """
    if weight is None or bool((weight > 0).all()):
        order = torch.randperm(n_rows, generator=generator)
    else:
        rows = torch.nonzero(weight > 0).flatten().cpu()
        order = rows[torch.randperm(rows.numel(), generator=generator)]
    batches = list(order.to(device).split(batch_size))
    if len(batches) > 1 and batches[-1].numel() == 1:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


def _weighted_mean(values, weight):
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum()


def _select(tensor, index):
    return None if tensor is None else tensor[index]


@torch.no_grad()
def row_log_prob(module, X, context=None, chunk_size=65536):
    """Log-density of each row of ``X`` in eval mode, in chunks, in float64."""
    was_training = module.training
    module.eval()
    log_prob = torch.cat(
        [
            module.log_prob(X[start : start + chunk_size], _select(context, slice(start, start + chunk_size))).double()
            for start in range(0, X.shape[0], chunk_size)
        ]
    )
    module.train(was_training)
    return log_prob


def mean_log_prob(module, X, weight=None, context=None, chunk_size=65536):
    """(Weighted) mean log-density of the rows of ``X`` in eval mode, in chunks."""
    log_prob = row_log_prob(module, X, context, chunk_size)
    return float(_weighted_mean(log_prob, None if weight is None else weight.double()))


class _LeftOutChoice:
    """Each validation row's score at the epoch that early stopping would keep without it.

    Early stopping keeps the epoch of best validation score, so that epoch's
    scores on the validation rows are optimistic: the more the epochs differ
    row by row, the more (the chosen one is the best of many on those rows).
    Scored at the epoch that the other rows choose (leave-one-out, one unit
    of a row's weight left out as everywhere in the estimators), a row is
    held out from the choice too, and the mean of these scores estimates the
    choice's score on new rows without that optimism. Updated epoch by
    epoch (each row's best total without it so far, and its score there), in
    memory proportional to the rows. An epoch where a row scores ``-inf``
    (its mean is ``-inf``) is kept for no row.
    """

    def __init__(self, weight, n_rows, device):
        self.weight = torch.ones(n_rows, dtype=torch.float64, device=device) if weight is None else weight.double()
        self.left_out = torch.clamp(self.weight, max=1.0)
        self.best_without = torch.full_like(self.weight, -math.inf)
        self.left_out_scores = torch.full_like(self.weight, -math.inf)
        self.chosen_scores = torch.full_like(self.weight, -math.inf)

    def update(self, log_prob, chosen):
        """Add one epoch's row scores ``log_prob``; ``chosen``: early stopping keeps this epoch for now."""
        if chosen:
            self.chosen_scores = log_prob
        counted = self.weight > 0
        if not bool(torch.isfinite(log_prob[counted]).all()):
            return
        values = torch.where(counted, log_prob, torch.zeros_like(log_prob))
        without = (self.weight * values).sum() - self.left_out * values
        better = without > self.best_without
        self.best_without = torch.where(better, without, self.best_without)
        self.left_out_scores = torch.where(better, log_prob, self.left_out_scores)

    def correction(self):
        """Each row's left-out score less its score at the chosen epoch (at most 0 on rows of positive weight)."""
        kept = torch.isfinite(self.left_out_scores) & torch.isfinite(self.chosen_scores)
        difference = torch.where(kept, self.left_out_scores - self.chosen_scores, torch.zeros_like(self.chosen_scores))
        return difference.cpu().numpy()


def _snapshot(module):
    """A copy of ``module``'s state dict: what early stopping restores, far cheaper than ``copy.deepcopy``."""
    state = module.state_dict()
    snapshot = type(state)((name, tensor.detach().clone()) for name, tensor in state.items())
    if hasattr(state, "_metadata"):
        snapshot._metadata = copy.deepcopy(state._metadata)
    return snapshot


# learning_rate="adaptive" halves the rate after ADAPTIVE_EPOCHS epochs in a row without an
# improvement, once they hold ADAPTIVE_STEPS steps: Adam at a constant rate keeps the weights
# moving around the optimum, a smaller rate lets them settle; the step count keeps small data
# sets, whose few-step epochs say little, at the constant rate (benchmarks/RESULTS.md).
ADAPTIVE_EPOCHS = 3
ADAPTIVE_STEPS = 100


def train_flow(
    module, X, weight=None, context=None, validation=None, *, config, generator, optimizer=None, dequantize=None
):
    """Fit ``module`` (in place) by maximum likelihood with Adam.

    Parameters
    ----------
    module : torch.nn.Module
        A flow with ``log_prob(x, context, weight)``.
    X : torch.Tensor of shape (n_samples, n_features)
        Training rows, on the module's device and dtype.
    weight : torch.Tensor of shape (n_samples,), optional
        Sample weights; each batch loss is the weighted mean negative
        log-likelihood.
    context : torch.Tensor of shape (n_samples, n_context), optional
        Conditioning features, for a conditional flow.
    validation : tuple (X_val, weight_val, context_val), optional
        When given, training stops once the validation mean log-likelihood has
        not improved by ``config.tol`` for ``config.n_iter_no_change`` epochs,
        and the best weights are restored. Otherwise the training loss
        decides, as in scikit-learn's MLP.
    config : TrainingConfig
        How to train: batch size, learning rate and its schedule, penalty,
        stopping rule, averaging, output.
    generator : torch.Generator
        Source of the batch shuffling.
    optimizer : optional
        An optimizer of ``module`` to continue with (its moment estimates
        carry over, as in ``partial_fit``); by default a fresh one from
        :func:`~sklearn_maf._optimizer.make_optimizer`.
    dequantize : torch.Tensor of shape (n_features,), optional
        1 for integer-valued columns: each batch gets fresh uniform noise in
        ``[0, 1)`` on them (uniform dequantisation), drawn from ``generator``.

    Returns
    -------
    history : TrainingHistory
    """
    history = TrainingHistory()
    if optimizer is None:
        optimizer = make_optimizer(module, config.learning_rate, config.alpha)
    best_state = _snapshot(module)
    clip = _GradientClip()  # its running norm carries over from epoch to epoch
    averaged = _ParameterAverage(module, flat=getattr(optimizer, "flat_param", None)) if config.average else None
    if validation is not None:
        X_val, w_val, c_val = (*validation, None, None)[:3]
        w_val = None if w_val is None else w_val.double()  # the scores' dtype
        left_out = _LeftOutChoice(w_val, X_val.shape[0], X_val.device)
    no_improvement = 0
    stall_epochs = stall_steps = 0  # since the last improvement or halving of the rate
    module.train()

    for epoch in range(config.max_iter):
        start = time.perf_counter()
        if validation is None:
            # The weights after an epoch have not been scored yet; those it starts
            # from gave a finite loss on its first batch if its loss is finite.
            epoch_start_state = _snapshot(module)
        loss, n_steps = _epoch(
            module, optimizer, X, weight, context, config.batch_size, generator, dequantize, clip, averaged
        )
        history.n_steps += n_steps
        if not math.isfinite(loss):
            history.non_finite = True
            module.load_state_dict(best_state)
            warnings.warn(
                f"The training loss became non-finite in epoch {epoch + 1}; training "
                "stopped and the best weights so far were restored. Lower "
                "learning_rate_init, or raise alpha.",
                ConvergenceWarning,
            )
            break
        history.loss_curve.append(loss)
        history.n_iter = epoch + 1

        if validation is not None:
            with averaged.applied() if averaged is not None else nullcontext():
                rows = row_log_prob(module, X_val, c_val)
                score = float(_weighted_mean(rows, w_val))
                history.validation_scores.append(score)
                improved = score > history.best_validation_score + config.tol
                left_out.update(rows, chosen=score > history.best_validation_score)
                if score > history.best_validation_score:
                    history.best_validation_score = score
                    best_state = _snapshot(module)
        else:
            improved = loss < history.best_loss - config.tol
            best_state = epoch_start_state
        history.best_loss = min(history.best_loss, loss)
        no_improvement = 0 if improved else no_improvement + 1
        stall_epochs, stall_steps = (0, 0) if improved else (stall_epochs + 1, stall_steps + n_steps)
        if config.adaptive and stall_epochs >= ADAPTIVE_EPOCHS and stall_steps >= ADAPTIVE_STEPS:
            _scale_learning_rate(optimizer, 0.5)
            stall_epochs = stall_steps = 0

        if config.verbose:
            line = f"Epoch {epoch + 1}: loss {loss:.5f}"
            if validation is not None:
                line += f", validation log-likelihood {score:.5f}"
            print(f"{line}, {time.perf_counter() - start:.2f}s", flush=True)

        if no_improvement >= config.n_iter_no_change:
            history.stopped_early = True
            break

    if validation is not None:
        module.load_state_dict(best_state)
        history.validation_correction = left_out.correction()
    elif averaged is not None and not history.non_finite:
        averaged.apply()
    if config.warn_not_converged and not history.stopped_early and not history.non_finite:
        warnings.warn(
            f"Stochastic optimizer: maximum iterations ({config.max_iter}) reached and "
            "the optimization hasn't converged yet.",
            ConvergenceWarning,
        )
    module.eval()
    return history


def _epoch(
    module, optimizer, X, weight, context, batch_size, generator, dequantize=None, clip=None,
    averaged=None,
):
    """One pass over shuffled batches: ``(mean batch loss, number of steps)``.

    Losses stay on the device and are read once per epoch, so that a GPU is
    not synchronised at every step; a non-finite loss shows in the result.
    Each step costs a few dozen small tensor operations at the usual batch
    sizes, so the loop keeps its own per-step work to the minimum. ``clip``
    and ``averaged``, when given, are the fit's :class:`_GradientClip` and
    :class:`_ParameterAverage`.
    """
    params = [param for group in optimizer.param_groups for param in group["params"]]
    # Hand-written back-propagation where the model allows it (same gradients,
    # half the tensor operations). The masked entries of the weights are zeroed
    # once and their gradients masked after each step, which keeps them zero,
    # so the steps can skip the masks.
    plan = None
    if backprop.supports(module, weight, context):
        # a _FlatAdam's gradients are views of its flat buffer: the plan writes there
        plan = backprop.Backprop(module, assume_masked=True, flat_grad=getattr(optimizer, "flat_grad", None))
        plan.zero_masked_weights()
    losses, sizes = [], []
    batches = _batches(X.shape[0], batch_size, generator, X.device, weight)
    with _cyclic_gc_paused():
        for index in batches:
            batch_weight = _select(weight, index)
            x, batch_context = _select(X, index), _select(context, index)
            if dequantize is not None:
                noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                x = x + noise * dequantize
            losses.append(_step(module, optimizer, params, x, batch_weight, batch_context, plan, clip, averaged))
            sizes.append(index.numel() if weight is None else batch_weight.sum())
    losses = torch.stack(losses).double()
    if weight is None:
        sizes = torch.tensor(sizes, dtype=torch.float64, device=X.device)
    else:
        sizes = torch.stack(sizes).double()
    return float((losses * sizes).sum() / sizes.sum()), len(batches)


@contextmanager
def _cyclic_gc_paused():
    """Pause Python's cyclic garbage collector in a loop of tensor operations.

    A training step, or a chunk of scoring, creates and frees thousands of
    small Python objects, and the collector kept walking the whole heap of
    torch, scipy and scikit-learn objects in between. These loops make no
    reference cycles, so everything is still freed as it goes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _step(module, optimizer, params, x, weight, context, plan=None, clip=None, averaged=None):
    """One Adam step on one batch; returns the (detached) batch loss.

    ``plan``, when given, is the :class:`backprop.Backprop` of ``module``: the
    gradients then come from it (it writes every parameter's gradient), with
    each masked weight's gradient multiplied by its mask, which keeps the
    masked weights at zero. ``clip``, when given, is the fit's
    :class:`_GradientClip`, applied to the gradients before the step, and
    ``averaged`` its :class:`_ParameterAverage`, updated after it. A
    :class:`_FlatAdam` does the masks, the clipping and the averaging itself.
    """
    if isinstance(optimizer, _FlatAdam):
        if plan is not None:
            loss = plan.loss_and_grad(x, weight, context)
        else:
            loss = -_weighted_mean(module.log_prob(x, context, weight), weight)
            for param in params:
                param.grad = None
            loss.backward()
            loss = loss.detach()
        optimizer.step(clip, averaged)
        return loss
    if plan is not None:
        loss = plan.loss_and_grad(x, weight, context)
        plan.mask_gradients()
    else:
        loss = -_weighted_mean(module.log_prob(x, context, weight), weight)
        for param in params:  # optimizer.zero_grad(set_to_none=True), without its overhead
            param.grad = None
        loss.backward()
        loss = loss.detach()
    if clip is not None:
        clip(plan.flat_grad if plan is not None else [param.grad for param in params if param.grad is not None])
    optimizer.step()
    if averaged is not None:
        averaged.update()
    return loss
