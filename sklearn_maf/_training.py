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

from ._nn import _native, backprop

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
    """Adam with L2 ``alpha`` on the weights: :class:`_FlatAdam` where it can run, else fused.

    :class:`_FlatAdam` (CPU, float32 or float64, the C module built) also takes
    over the gradient clipping and the weight averaging of :func:`train_flow`;
    elsewhere :class:`_FusedAdam` runs one kernel per parameter group.
    """
    params = list(module.parameters())
    if params and _native.available(params[0]) and all(p.dtype == params[0].dtype for p in params):
        return _FlatAdam(module, learning_rate, alpha)
    return _adam(_parameter_groups(module, alpha), learning_rate)


class _FlatAdam:
    """Adam on one flat buffer of all the parameters, with clipping and averaging, in one C pass.

    A training step's optimizer work was five operations on lists of some
    thirty tensors each (the gradients' masks, the clipping norm and scale,
    fused Adam, the running average of the weights): about 0.17-0.26 ms of a
    2.4 ms step at the default sizes, most of it per-tensor overhead. Here the
    parameters are made views of one flat buffer (``flat_param``; the module's
    :class:`~torch.nn.Parameter` objects stay, their data moves) and their
    gradients views of another (``flat_grad``), and
    ``_fused.adam_step`` does everything in two passes over them: the
    gradient masked (the masked entries of the weights stay zero), clipped
    (:class:`_GradientClip`'s rule), the L2 term added (``alpha`` on the
    ``.weight`` matrices, as :func:`_parameter_groups`), torch's Adam step,
    and the averaged weights (:class:`_ParameterAverage`) moved. The same
    arithmetic as those, up to round-off (``tests/test_fused.py``).

    The parameters must stay where they were put: :meth:`step` checks it and
    raises if something replaced them (``module.to(...)`` with another dtype
    or device does).
    """

    def __init__(self, module, lr, alpha, betas=(0.9, 0.999), eps=1e-8):
        from ._nn.made import MaskedLinear

        named = list(module.named_parameters())
        self.params = [param for _, param in named]
        sizes = [param.numel() for param in self.params]
        like = self.params[0]
        with torch.no_grad():
            self.flat_param = torch.cat([param.detach().reshape(-1) for param in self.params])
        for param, view in zip(self.params, self.flat_param.split(sizes)):
            param.data = view.view_as(param)
        self.flat_grad = like.new_zeros(self.flat_param.numel())
        self.grad_views = [grad.view_as(param) for param, grad in zip(self.params, self.flat_grad.split(sizes))]
        for param, grad in zip(self.params, self.grad_views):
            param.grad = grad
        masks = {id(layer.weight): layer.mask for layer in module.modules() if isinstance(layer, MaskedLinear)}
        self.mask = torch.cat(
            [masks[id(param)].reshape(-1).to(like.dtype) if id(param) in masks else param.new_ones(param.numel())
             for param in self.params]
        )  # fmt: skip
        self.decay = torch.cat(
            [param.new_full((param.numel(),), alpha if name.endswith(".weight") else 0.0) for name, param in named]
        )
        self.exp_avg = torch.zeros_like(self.flat_param)
        self.exp_avg_sq = torch.zeros_like(self.flat_param)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = 0
        self.param_groups = [{"params": self.params}]
        self._addresses = [param.data_ptr() for param in self.params]

    def _check(self):
        if [param.data_ptr() for param in self.params] != self._addresses:
            raise RuntimeError(
                "The parameters were moved after their optimizer was made (e.g. by module.to()); "
                "make a new optimizer for them."
            )

    def zero_masked_weights(self):
        """Set the masked entries of the weights to zero (they are, unless someone set them)."""
        with torch.no_grad():
            self.flat_param.mul_(self.mask)

    def step(self, clip=None, averaged=None):
        """One step from the gradients in ``.grad``; ``clip`` and ``averaged`` as in :func:`_epoch`.

        A :class:`backprop.Backprop` given ``flat_grad`` writes the gradients into
        the flat buffer; other ``.grad`` tensors (autograd's, or another
        plan's) are copied into it first, and a parameter without one steps
        with a zero gradient (torch's Adam would leave it alone).
        """
        self._check()
        for param, view in zip(self.params, self.grad_views):
            if param.grad is not view:
                if param.grad is None:
                    view.zero_()
                else:
                    view.copy_(param.grad)
        self.steps += 1
        clip_first = clip is not None and clip.average is None
        if clip_first:
            clip.average = self.flat_grad.new_zeros(())
        flat_average = averaged is not None and averaged.flat is not None  # one made with this buffer
        _native.adam_step(
            self.flat_param, self.flat_grad, self.mask, self.decay, self.exp_avg, self.exp_avg_sq,
            step=self.steps, lr=self.lr, betas=self.betas, eps=self.eps,
            clip_average=None if clip is None else clip.average, clip_first=clip_first,
            clip_factor=CLIP_FACTOR if clip is None else clip.factor,
            clip_momentum=CLIP_MOMENTUM if clip is None else clip.momentum,
            average=averaged.flat if flat_average else None,
            average_weight=averaged.next_weight() if flat_average else 0.0,
        )  # fmt: skip
        if averaged is not None and averaged.flat is None:
            averaged.update()


class _FusedAdam:
    """Adam as one fused kernel call per parameter group, with little else per step.

    The arithmetic is that of ``torch.optim.Adam(groups, lr, fused=True)``,
    L2 penalty ``weight_decay`` of each group included, and so are the results.
    That optimizer's ``step`` spends more time in Python (rebuilding
    per-parameter lists, profiling hooks, one step counter per parameter to
    increment) than its kernel takes at the sizes of a MADE; here the lists
    are built once, and the parameters of a group share one step counter for
    as long as they all get gradients (each has its own, as in torch, from
    the first step that skips one). Constructing any ``torch.optim`` optimizer
    also imports ``torch._dynamo``: seconds, once per process. Use
    :func:`_adam`, which falls back to ``torch.optim.Adam`` where torch has no
    fused kernel for the parameters' device and dtype.
    """

    def __init__(self, param_groups, lr, betas=(0.9, 0.999), eps=1e-8):
        self.param_groups = param_groups
        self.lr, self.betas, self.eps = lr, betas, eps
        self._state = []
        for group in param_groups:
            params = group["params"]
            shared = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params[:1]]
            self._state.append(
                dict(
                    exp_avgs=[torch.zeros_like(p) for p in params],
                    exp_avg_sqs=[torch.zeros_like(p) for p in params],
                    steps=shared * len(params),
                    shared=True,
                )
            )

    def step(self):
        for group, state in zip(self.param_groups, self._state):
            params = group["params"]
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs, steps = state["exp_avgs"], state["exp_avg_sqs"], state["steps"]
            if state["shared"] and all(grad is not None for grad in grads):
                if params:
                    steps[0] += 1
            else:
                if state["shared"]:  # from now on, one counter per parameter
                    steps = state["steps"] = [step.clone() for step in steps]
                    state["shared"] = False
                keep = [i for i, grad in enumerate(grads) if grad is not None]
                if not keep:
                    continue
                params, grads = [params[i] for i in keep], [grads[i] for i in keep]
                exp_avgs, exp_avg_sqs = [exp_avgs[i] for i in keep], [exp_avg_sqs[i] for i in keep]
                steps = [steps[i] for i in keep]
                torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=self.lr,
                beta1=self.betas[0],
                beta2=self.betas[1],
                weight_decay=group["weight_decay"],
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )


def _adam(param_groups, lr):
    """:class:`_FusedAdam` where torch has its kernel, else ``torch.optim.Adam``."""
    params = [p for group in param_groups for p in group["params"]]
    if params and _fused_adam_works(params[0].device, params[0].dtype):
        return _FusedAdam(param_groups, lr)
    return torch.optim.Adam(param_groups, lr=lr)


_FUSED_ADAM_WORKS = {}


def _fused_adam_works(device, dtype):
    """Whether ``torch._fused_adam_`` runs on ``device`` and ``dtype`` (checked once)."""
    key = (device.type, dtype)
    if key not in _FUSED_ADAM_WORKS:
        try:
            param = torch.ones(2, device=device, dtype=dtype)
            step = torch.ones((), device=device, dtype=torch.float32)
            zeros = [torch.zeros_like(param), torch.zeros_like(param)]
            torch._fused_adam_(
                [param], [torch.ones_like(param)], zeros[:1], zeros[1:], [], [step],
                lr=0.5, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                maximize=False,
            )  # fmt: skip
            # one Adam step of size lr from 1, against a gradient of 1, lands at 0.5
            _FUSED_ADAM_WORKS[key] = bool(torch.allclose(param, torch.full_like(param, 0.5)))
        except (AttributeError, NotImplementedError, RuntimeError):
            _FUSED_ADAM_WORKS[key] = False
    return _FUSED_ADAM_WORKS[key]


def _snapshot(module):
    """A copy of ``module``'s state dict (a tenth of ``copy.deepcopy``'s time, a few ms an epoch)."""
    state = module.state_dict()
    snapshot = type(state)((name, tensor.detach().clone()) for name, tensor in state.items())
    if hasattr(state, "_metadata"):
        snapshot._metadata = copy.deepcopy(state._metadata)
    return snapshot


# learning_rate="adaptive": the learning rate halves after ADAPTIVE_EPOCHS epochs
# in a row without an improvement, once they hold ADAPTIVE_STEPS steps.
# Measured on 20,000 x 8 rows of a Gaussian mixture (benchmarks/speed.py's
# data), against the constant rate at the default patience of 10: held-out
# log-likelihood -9.556 against -9.626 (halving after 2 epochs: -9.586; a
# patience of 20 at a constant rate: -9.540 in 1.3 times the epochs). Adam at a
# constant rate keeps the weights moving at about the learning rate per step,
# and the validation score jumps by 0.1-0.5 nats from epoch to epoch; a smaller
# rate lets them settle into the optimum.
# On small data sets an epoch is a handful of steps, and a few epochs without
# an improvement say little: halving the rate then stalled training early (600
# rows: 3 steps per epoch); the step count keeps the schedule to data sets with
# tens of steps per epoch (at batch 256: 10,000 rows and more halve after 3
# epochs, 5,000 rows after 6), and smaller ones train at the constant rate.
ADAPTIVE_EPOCHS = 3
ADAPTIVE_STEPS = 100


# Each step's gradient (all parameters together) is scaled down to at most
# CLIP_FACTOR times a running average of the recent steps' norms (updated with
# weight CLIP_MOMENTUM per step, from the clipped norms, so that a spike does
# not raise the limit). Adam moves every parameter by about the learning rate
# whatever the gradient's size, but a gradient far larger than the recent ones
# still makes its first moment jump, and all parameters then move together in
# that one direction: on the ring of 8 Gaussians (benchmarks/quality.py) such a
# step in epoch 7 threw the seed-0 fit from a training loss of 4.11 to 5.02,
# and early stopping ended it at a gap of 0.889 nats. Measured with
# MAFDensity() over four seeds of the ring: gaps 0.889/0.552/0.365/0.345 without
# clipping, 0.563/0.382/0.383/0.332 at 5 (0.503/0.348/0.298/0.308 at 3, with
# mixture-8d 0.280 -> 0.284; 0.505/0.344/0.324/0.301 at 2, with t-marginals-8d
# 0.217 -> 0.213 where 5 gives 0.194). At 5, the curved, Student-t, mixture and
# funnel sets fitted exactly as without: their gradients never reach the limit.
CLIP_FACTOR = 5.0
CLIP_MOMENTUM = 0.02


class _GradientClip:
    """Scale a step's gradients to at most :data:`CLIP_FACTOR` times the running norm of the steps before.

    Called with the gradients as one flat tensor (a :class:`backprop.Backprop`'s
    ``flat_grad``, a few operations per step) or as a list of tensors.
    Everything stays on the device: no step waits for a GPU to report the norm.
    """

    def __init__(self, factor=CLIP_FACTOR, momentum=CLIP_MOMENTUM):
        self.factor = factor
        self.momentum = momentum
        self.average = None

    def __call__(self, grads):
        flat = isinstance(grads, torch.Tensor)
        norm = torch.linalg.vector_norm(grads if flat else torch.stack(torch._foreach_norm(grads)))
        if self.average is None:
            self.average = norm.clone()
        limit = self.average * self.factor
        scale = torch.clamp(limit / norm.clamp(min=torch.finfo(norm.dtype).tiny), max=1.0)
        if flat:
            grads.mul_(scale)
        else:
            torch._foreach_mul_(grads, scale)
        self.average.lerp_(torch.minimum(norm, limit), self.momentum)


# The fitted weights are an exponential moving average of the weights after
# each step (Polyak averaging), with weight 1 - AVERAGE_DECAY per step, after a
# warm-up in which step t has weight 9 / (10 + t): Adam at a constant rate keeps
# the weights moving by about the learning rate per step, around the optimum
# rather than into it, and their recent average lies nearer to it. Early
# stopping scores and keeps the averaged weights. Measured with MAFDensity()
# on benchmarks/quality.py's sets (10,000 rows), seeds 0 to 2, gap to the true
# density in nats, without averaging -> 0.98 (0.99):
#   ring-8-2d      0.439/0.359/0.378 -> 0.385/0.333/0.311 (0.421/0.358/0.332)
#   mixture-8d     0.281/0.270/0.308 -> 0.247/0.232/0.271 (0.243/0.234/0.263)
#   sine-chain-8d  0.299/0.309/0.348 -> 0.279/0.301/0.304 (0.283/0.298/0.309)
# and on seed 0 banana, both Student t sets, t-marginals-8d and the funnel
# within 0.002 of before. On 1,000 rows (four steps per epoch) the ring gained
# 0.2-0.25 nats, the mixture 0.015-0.03, and the sine chain lost 0.04-0.05.
AVERAGE_DECAY = 0.98


class _ParameterAverage:
    """Exponential moving average of a module's parameters over the training steps.

    :meth:`update` after each step (one fused operation for all the
    parameters); :meth:`applied` puts the averages in the module for the
    duration of a block, e.g. to score them, and :meth:`apply` for good.
    """

    def __init__(self, module, decay=AVERAGE_DECAY, flat=None):
        self.params = list(module.parameters())
        # with a _FlatAdam, one flat copy of its buffer, which its step updates
        self.flat = None if flat is None else flat.detach().clone()
        if self.flat is None:
            self.average = [param.detach().clone() for param in self.params]
        else:
            self.average = [v.view_as(p) for p, v in zip(self.params, self.flat.split([p.numel() for p in self.params]))]
        self.decay = decay
        self.steps = 0

    def next_weight(self):
        """Count a step; the weight ``1 - decay`` with which it moves the averages."""
        self.steps += 1
        return 1.0 - min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.average, self.params, self.next_weight())

    @contextmanager
    def applied(self):
        with torch.no_grad():
            live = [param.detach().clone() for param in self.params]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)

    @torch.no_grad()
    def apply(self):
        torch._foreach_copy_(self.params, self.average)


def _scale_learning_rate(optimizer, factor):
    if isinstance(optimizer, (_FusedAdam, _FlatAdam)):
        optimizer.lr *= factor
    else:
        for group in optimizer.param_groups:
            group["lr"] *= factor


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
    adaptive=False,
    average=False,
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
    adaptive : bool, default=False
        Halve the learning rate each time :data:`ADAPTIVE_EPOCHS` consecutive
        epochs, of :data:`ADAPTIVE_STEPS` steps or more in all, go without an
        improvement of ``tol`` (the ``learning_rate="adaptive"`` schedule of
        the estimators).
    average : bool, default=False
        Keep an exponential moving average of the weights over the steps
        (decay :data:`AVERAGE_DECAY`) and make it the result: early stopping
        scores and restores averaged weights, and without validation rows
        the module ends with the average of the last steps. ``partial_fit``
        trains the weights themselves, one epoch per call, and does not.

    Returns
    -------
    history : TrainingHistory
    """
    history = TrainingHistory()
    if optimizer is None:
        optimizer = make_optimizer(module, learning_rate, alpha)
    best_state = _snapshot(module)
    clip = _GradientClip()  # its running norm carries over from epoch to epoch
    averaged = _ParameterAverage(module, flat=getattr(optimizer, "flat_param", None)) if average else None
    no_improvement = 0
    stall_epochs = stall_steps = 0  # since the last improvement or halving of the rate
    module.train()

    for epoch in range(max_iter):
        start = time.perf_counter()
        if validation is None:
            # The weights after an epoch have not been scored yet; those it starts
            # from gave a finite loss on its first batch if its loss is finite.
            epoch_start_state = _snapshot(module)
        loss, n_steps = _epoch(
            module, optimizer, X, weight, context, batch_size, generator, dequantize, clip, averaged
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
        stall_epochs, stall_steps = (0, 0) if improved else (stall_epochs + 1, stall_steps + n_steps)
        if adaptive and stall_epochs >= ADAPTIVE_EPOCHS and stall_steps >= ADAPTIVE_STEPS:
            _scale_learning_rate(optimizer, 0.5)
            stall_epochs = stall_steps = 0

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
    elif averaged is not None and not history.non_finite:
        averaged.apply()
    if warn_not_converged and not history.stopped_early and not history.non_finite:
        warnings.warn(
            f"Stochastic optimizer: maximum iterations ({max_iter}) reached and "
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
    small Python objects; the collector kept walking the whole heap of torch,
    scipy and scikit-learn objects in between (about 6% of the CPU time of
    training, 3% of scoring, sampled with perf). These loops make no reference
    cycles, so everything is still freed as it goes.
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
