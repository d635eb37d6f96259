"""The optimisation loop: shuffled mini-batches, Adam, early stopping, history.

Kept apart from the estimator so that fit -> epoch -> step are small functions
that work on tensors only; the estimator decides what data and which module
come in, and turns the returned history into fitted attributes.
"""

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from sklearn.exceptions import ConvergenceWarning

__all__ = ["TrainingHistory", "make_optimizer", "mean_log_prob", "train_flow"]


@dataclass
class TrainingHistory:
    """What one call of :func:`train_flow` did, epoch by epoch."""

    loss_curve: list = field(default_factory=list)
    validation_scores: list = field(default_factory=list)
    best_loss: float = float("inf")
    best_validation_score: float = -float("inf")
    n_iter: int = 0
    n_steps: int = 0
    stopped_early: bool = False
    non_finite: bool = False


def _batches(n_rows, batch_size, generator):
    """Shuffled index batches; a trailing batch of one row joins the one before.

    Batch normalisation must never see the statistics of a single row, and no
    row is left out of an epoch.
    """
    batches = list(torch.randperm(n_rows, generator=generator).split(batch_size))
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
def mean_log_prob(module, X, weight=None, context=None, chunk_size=65536):
    """(Weighted) mean log-density of the rows of ``X`` in eval mode, in chunks."""
    was_training = module.training
    module.eval()
    total = X.new_zeros((), dtype=torch.float64)
    for start in range(0, X.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        log_prob = module.log_prob(X[rows], _select(context, rows)).double()
        w = None if weight is None else weight[rows].double()
        total += log_prob.sum() if w is None else (log_prob * w).sum()
    module.train(was_training)
    denominator = X.shape[0] if weight is None else weight.double().sum()
    return float(total / denominator)


def _parameter_groups(module, alpha):
    """L2 penalty ``alpha`` on the weight matrices only, as MLPRegressor does."""
    decayed, other = [], []
    for name, param in module.named_parameters():
        (decayed if name.endswith(".weight") else other).append(param)
    return [
        {"params": decayed, "weight_decay": alpha},
        {"params": other, "weight_decay": 0.0},
    ]


def make_optimizer(module, learning_rate, alpha):
    """Adam (fused: one kernel for all parameters) with L2 ``alpha`` on the weights."""
    return torch.optim.Adam(_parameter_groups(module, alpha), lr=learning_rate, fused=True)


def _snapshot(module):
    return copy.deepcopy(module.state_dict())


def train_flow(
    module,
    X,
    weight=None,
    context=None,
    validation=None,
    *,
    batch_size,
    learning_rate,
    alpha,
    max_iter,
    tol,
    n_iter_no_change,
    generator,
    verbose=False,
    optimizer=None,
    warn_not_converged=True,
    dequantize=None,
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
        not improved by ``tol`` for ``n_iter_no_change`` epochs, and the best
        weights are restored. Otherwise the training loss decides, as in
        scikit-learn's MLP.
    batch_size, learning_rate, alpha, max_iter, tol, n_iter_no_change
        As in the estimator.
    generator : torch.Generator
        Source of the batch shuffling.
    verbose : bool
        Print one line per epoch.
    optimizer : torch.optim.Optimizer, optional
        An optimizer of ``module`` to continue with (its moment estimates
        carry over, as in ``partial_fit``); by default a fresh one from
        :func:`make_optimizer`.
    dequantize : torch.Tensor of shape (n_features,), optional
        1 for integer-valued columns: each batch gets fresh uniform noise in
        ``[0, 1)`` on them (uniform dequantisation), drawn from ``generator``.
    warn_not_converged : bool, default=True
        Warn with a ``ConvergenceWarning`` when ``max_iter`` epochs end without
        convergence; ``partial_fit`` runs one epoch on purpose and does not.

    Returns
    -------
    history : TrainingHistory
    """
    history = TrainingHistory()
    if optimizer is None:
        optimizer = make_optimizer(module, learning_rate, alpha)
    best_state = _snapshot(module)
    no_improvement = 0
    module.train()

    for epoch in range(max_iter):
        start = time.perf_counter()
        if validation is None:
            # The weights after an epoch have not been scored yet; those it starts
            # from gave a finite loss on its first batch if its loss is finite.
            epoch_start_state = _snapshot(module)
        loss, n_steps = _epoch(
            module, optimizer, X, weight, context, batch_size, generator, dequantize
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
            score = mean_log_prob(module, *validation)
            history.validation_scores.append(score)
            improved = score > history.best_validation_score + tol
            if score > history.best_validation_score:
                history.best_validation_score = score
                best_state = _snapshot(module)
        else:
            improved = loss < history.best_loss - tol
            best_state = epoch_start_state
        history.best_loss = min(history.best_loss, loss)
        no_improvement = 0 if improved else no_improvement + 1

        if verbose:
            line = f"Epoch {epoch + 1}: loss {loss:.5f}"
            if validation is not None:
                line += f", validation log-likelihood {score:.5f}"
            print(f"{line}, {time.perf_counter() - start:.2f}s", flush=True)

        if no_improvement >= n_iter_no_change:
            history.stopped_early = True
            break

    if validation is not None:
        module.load_state_dict(best_state)
    if warn_not_converged and not history.stopped_early and not history.non_finite:
        warnings.warn(
            f"Stochastic optimizer: maximum iterations ({max_iter}) reached and "
            "the optimization hasn't converged yet.",
            ConvergenceWarning,
        )
    module.eval()
    return history


def _epoch(module, optimizer, X, weight, context, batch_size, generator, dequantize=None):
    """One pass over shuffled batches: ``(mean batch loss, number of steps)``.

    Losses are summed on the device and read once per epoch, so that a GPU is
    not synchronised at every step; a non-finite loss shows in the result.
    """
    total = X.new_zeros((), dtype=torch.float64)
    count = 0.0
    batches = _batches(X.shape[0], batch_size, generator)
    for index in batches:
        index = index.to(X.device)
        batch_weight = _select(weight, index)
        x = X[index]
        if dequantize is not None:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + noise * dequantize
        loss = _step(module, optimizer, x, batch_weight, _select(context, index))
        size = index.numel() if weight is None else batch_weight.sum()
        total += loss.detach().double() * size
        count = count + size
    return float(total / count), len(batches)


def _step(module, optimizer, x, weight, context):
    """One Adam step on one batch; returns the batch loss."""
    loss = -_weighted_mean(module.log_prob(x, context, weight), weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss
