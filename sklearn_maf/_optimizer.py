"""The optimiser: Adam with L2 on the weights, gradient clipping and weight averaging.

Kept apart from the training loop (:mod:`sklearn_maf._training`), which only
asks :func:`make_optimizer` for an optimiser and calls its ``step``: on the CPU
:class:`_FlatAdam` does masking, clipping, Adam and averaging in one C pass;
elsewhere :class:`_FusedAdam` (or ``torch.optim.Adam``) steps, with
:class:`_GradientClip` and :class:`_ParameterAverage` around it.
"""

from contextlib import contextmanager

import torch

from ._nn import _native

__all__ = ["make_optimizer"]


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
    fused Adam, the running average of the weights), mostly per-tensor
    overhead at the default sizes (benchmarks/RESULTS.md, "Speed"). Here the
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
            if not params:  # a flow without weight matrices has an empty L2 group
                continue
            grads = [p.grad for p in params]
            exp_avgs, exp_avg_sqs, steps = state["exp_avgs"], state["exp_avg_sqs"], state["steps"]
            if state["shared"] and all(grad is not None for grad in grads):
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


# Each step's gradient is scaled down to at most CLIP_FACTOR times a running average of
# the recent steps' norms (moved by CLIP_MOMENTUM a step, from the clipped norms, so that a
# spike does not raise the limit): one outsized gradient makes Adam's first moment jump and
# every parameter move in its direction, which can undo a fit; at this factor ordinary
# gradients never reach the limit (benchmarks/RESULTS.md, "Quality at the defaults").
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


# The fitted weights are an exponential moving average of the weights after each step
# (Polyak averaging: weight 1 - AVERAGE_DECAY a step, after a warm-up in which step t has
# 9 / (10 + t)): Adam at a constant rate keeps the weights moving around the optimum, and
# their recent average lies nearer to it (benchmarks/RESULTS.md, "Quality at the defaults").
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
