"""The training loss of a flow and its gradient, by hand-written back-propagation.

A training step of a MAF at the usual sizes (a few hundred rows, hidden layers
of about a hundred units) is not limited by arithmetic but by the number of
tensor operations: autograd records about 400 of them per step for five MAF
layers (views, transposes, detaches and mask products included) and walks its
graph back, at a few microseconds each. Here each layer keeps only what its
backward pass needs, and the backward pass is written out layer by layer, in
the layer's own class: about half as many operations, no graph, the same
gradients up to round-off (``tests/test_backprop.py`` compares them with
autograd's for every layer and base).

:class:`Backprop` is a loop over the flow's layers. The fixed first layers
(``layer.fixed``: bounds, standardisation, whitening) run forward only, in
float64, and their output is cast to the learned layers' dtype. A learned
transform takes part through three methods:

``backprop_state(setup)``
    what it reuses from step to step (gradient buffers, weight views,
    constants), made once per :class:`Backprop`; ``setup`` is a
    :class:`Setup`;
``forward_cached(state, x, batch, log_det)``
    ``(y, cache)``, adding its log-det per row into ``log_det`` in place;
    ``batch`` is a :class:`Batch`;
``backward(state, cache, grad_y, batch, need_input_grad)``
    writes (not adds) its parameters' gradients into their ``.grad`` and
    returns d loss / d x (or None when not needed);

and the base distribution through ``backprop_state(setup)`` and
``loss_and_grad(state, u, log_det, batch)``: the mean of ``-log p(u) -
log_det`` over the batch and d loss / d u, its parameters' gradients written.
A layer or base without them is differentiated by autograd
(:class:`_AutogradTransform`, :class:`_AutogradBase`), so a new transform is
one class; writing its backward pass is an optimisation, tested against
autograd.

The gradient of a masked weight is that of ``weight * mask``: the product
with the input, then with the mask. The mask product is left to the caller,
who can do it for all the layers in one operation (see :func:`masked_weights`).
A caller that has zeroed the masked entries of the weights (and masks every
gradient, which keeps them zero under Adam and an L2 penalty) can also skip
the masks in the forward pass, ``assume_masked=True``: ``weight`` then equals
``weight * mask`` exactly.

On the CPU in float32 and float64 the element-wise work between the products
runs in C where the package was built with its optional module (through
:mod:`._native`): one pass per layer and direction instead of ten to twenty
torch operations (``benchmarks/RESULTS.md``). Without it (no C compiler at
install, or another device or dtype) the layers run the same arithmetic as
torch operations; ``tests/test_backprop.py`` checks both against autograd.
"""

from collections import namedtuple

import torch

from . import _native
from .made import MaskedLinear

__all__ = ["Backprop", "Batch", "Setup", "loss_and_grad", "masked_weights", "supports"]

#: What a layer's ``backprop_state`` may use: whether the C passes run, whether
#: the masked weights are known to be zero, and ``constant(value)``, a cached
#: 0-d tensor of the parameters' dtype and device.
Setup = namedtuple("Setup", ["native", "assume_masked", "constant"])

#: One batch as the layers see it: the context (or None), the sample weights
#: (or None), and each row's share of the mean, ``1 / n`` as a 0-d tensor or
#: the normalised weights as a column.
Batch = namedtuple("Batch", ["context", "weight", "share"])


def supports(module, weight=None, context=None):
    """Whether :class:`Backprop` can train ``module`` on this batch: a flow, given its context or none."""
    from .flow import MAF  # flow imports the layers, which import nothing from here at import time

    return isinstance(module, MAF) and (context is None) == (module.n_context == 0)


def masked_weights(module):
    """``(weights, masks)``: every masked weight matrix of ``module`` and its mask."""
    layers = [layer for layer in module.modules() if isinstance(layer, MaskedLinear)]
    return [layer.weight for layer in layers], [layer.mask for layer in layers]


def loss_and_grad(module, x, weight=None, assume_masked=False, context=None):
    """Mean negative log-likelihood of the rows ``x``; sets every parameter's ``.grad``.

    The same value and gradients as ``-module.log_prob(x, context, weight)``
    averaged with the weights, followed by ``backward()``, for a module that
    :func:`supports` accepts, including the update of the batch-norm running
    averages in training mode (weighted moments when weights are given).
    Gradients of masked weights are *not* masked here (the caller masks them
    all at once). A training loop calls this many times on the same module:
    :class:`Backprop` does the per-module work once.

    Returns
    -------
    loss : torch.Tensor
        A 0-dimensional tensor, detached.
    """
    return Backprop(module, assume_masked).loss_and_grad(x, weight, context)


class Backprop:
    """:func:`loss_and_grad` of one flow, with each layer's reusable state gathered once.

    One step would otherwise spend about a hundred of its four hundred tensor
    operations on views (each weight's transpose, the blocks of each output
    layer) and on new gradient tensors. Adam updates the parameters in place,
    so views taken once stay views of the current weights; the gradients are
    written into buffers allocated here, which stay each parameter's
    ``.grad`` (views of one flat buffer, ``flat_grad``, which the caller may
    give: a :class:`_training._FlatAdam`'s). Build one per epoch (or whenever
    something else may have replaced a ``.grad``). With ``assume_masked``,
    the masked entries of the weights must be zero; a training loop zeroes
    them once and keeps them so with :meth:`mask_gradients` after each
    :meth:`loss_and_grad`. ``native`` chooses the element-wise passes: in C
    (True), as torch operations (False), or in C where
    :func:`_native.available` allows (None, the default); the gradients are
    the same up to round-off.
    """

    def __init__(self, module, assume_masked=False, native=None, flat_grad=None):
        transforms = list(module.transforms)
        n_fixed = module.n_fixed()
        self.fixed = transforms[:n_fixed]
        # Every gradient is a view of one flat buffer: what the whole gradient
        # needs (its norm, a scaling) is then one operation, not one per parameter.
        params = list(module.parameters())
        n_values = sum(param.numel() for param in params)
        if flat_grad is None:
            flat_grad = params[0].new_zeros(n_values)
        elif flat_grad.shape != (n_values,) or not flat_grad.is_contiguous():
            raise ValueError(f"flat_grad must be a contiguous tensor of shape ({n_values},)")
        self.flat_grad = flat_grad
        for param, grad in zip(params, self.flat_grad.split([param.numel() for param in params])):
            # a .grad that is already this view (a _FlatAdam's) stays the same tensor
            if param.grad is None or param.grad.data_ptr() != grad.data_ptr() or param.grad.shape != param.shape:
                param.grad = grad.view_as(param)
        self.dtype = params[0].dtype
        can_run = _native.available(params[0])
        if native and not can_run:
            raise ValueError(
                f"the C passes cannot run here: module _fused {'built' if _native.available() else 'missing'}, "
                f"parameters {params[0].dtype} on {params[0].device}"
            )
        self.native = can_run if native is None else bool(native)
        self._constant = _Constants(params[0]).get
        setup = Setup(self.native, assume_masked, self._constant)
        self.layers = [
            t if hasattr(t, "backward") else _AutogradTransform(t) for t in transforms[n_fixed:]
        ]  # fmt: skip
        self.states = [layer.backprop_state(setup) for layer in self.layers]
        self.base = module.base if hasattr(module.base, "loss_and_grad") else _AutogradBase(module.base)
        self.base_state = self.base.backprop_state(setup)
        self._weights, self._masks = masked_weights(module)
        self._weight_grads = [weight.grad for weight in self._weights]

    @torch.no_grad()
    def zero_masked_weights(self):
        """Set the masked entries of every weight to zero (they are, unless someone set them)."""
        if self._weights:  # a flow may have no MADE at all; _foreach refuses empty lists
            torch._foreach_mul_(self._weights, self._masks)

    def mask_gradients(self):
        """Multiply each masked weight's gradient by its mask, all in one operation.

        Adam then leaves the masked entries where they are, L2 penalty
        included: at zero, after :meth:`zero_masked_weights`.
        """
        if self._weight_grads:
            torch._foreach_mul_(self._weight_grads, self._masks)

    @torch.inference_mode()
    def loss_and_grad(self, x, weight=None, context=None):
        """As :func:`loss_and_grad` of the module.

        In inference mode, which skips autograd's dispatch entirely (no_grad
        still passes every operation through it): a sixth of the per-operation
        overhead of a step at five MAF layers. Everything
        it writes into (gradients, batch-norm running averages) was made
        outside, so stays a normal tensor; what it makes (the loss) is an
        inference tensor, for reading only.
        """
        # each row's share of the mean: 1 / n, or its normalised weight (a column)
        if weight is None:
            share = self._constant(1.0 / x.shape[0])
        else:
            share = (weight / weight.sum()).unsqueeze(1).to(self.dtype)
        batch = Batch(context, weight, share)
        log_det = None
        for transform in self.fixed:  # in float64: no parameters, a log-det of x alone
            x, ld = transform(x)
            log_det = ld if log_det is None else log_det + ld
        x = x.to(self.dtype)
        # the layers add their log-dets into one buffer
        log_det = x.new_zeros(x.shape[0]) if log_det is None else log_det.to(self.dtype, copy=True)
        caches = []
        for layer, state in zip(self.layers, self.states):
            x, cache = layer.forward_cached(state, x, batch, log_det)
            caches.append(cache)
        loss, grad = self.base.loss_and_grad(self.base_state, x, log_det, batch)
        # The first learned layer reads the data: no gradient to pass on.
        for index in range(len(self.layers) - 1, -1, -1):
            grad = self.layers[index].backward(self.states[index], caches[index], grad, batch, index > 0)
        return loss


class _Constants:
    """0-dimensional tensors of given values, made once, in the dtype and device of ``like``.

    A Python number in a tensor operation becomes a float64 scalar tensor that
    is then converted to the operation's dtype: an extra copy that doubled the
    cost of an element-wise operation on a batch, some sixty times a step. A
    tensor of the operation's dtype is used as it is.
    """

    def __init__(self, like):
        self.like = like
        self.values = {}

    def get(self, value):
        constant = self.values.get(value)
        if constant is None:
            constant = self.values[value] = self.like.new_tensor(value)
        return constant


def _normal_tensor(tensor):
    """``tensor`` as a normal tensor that autograd can record (a copy of an inference tensor)."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


class _AutogradTransform:
    """The hand-written protocol for a transform without one: its forward pass under autograd.

    :meth:`backward` runs autograd's backward pass from the layer's output
    and log-det, which adds into the parameters' ``.grad`` buffers (zeroed
    first, so that it writes as the hand-written layers do).
    """

    def __init__(self, layer):
        self.layer = layer

    def backprop_state(self, setup):
        return [param.grad for param in self.layer.parameters()]

    def forward_cached(self, state, x, batch, log_det):
        with torch.inference_mode(False), torch.enable_grad():
            x = _normal_tensor(x).requires_grad_(True)
            y, ld = self.layer(x, _normal_tensor(batch.context), _normal_tensor(batch.weight))
        log_det.add_(ld.detach())
        return y.detach(), (x, y, ld)

    def backward(self, state, cache, grad_y, batch, need_input_grad=True):
        x, y, ld = cache
        with torch.inference_mode(False):
            if state:
                torch._foreach_zero_(state)
            # the loss holds -share * log-det of each row
            grad_ld = (-batch.share).reshape(-1).expand(ld.shape).clone()
            outputs, grads = [y], [grad_y.clone()]
            if ld.requires_grad:  # a volume-preserving layer's log-det is a constant, outside the graph
                outputs.append(ld)
                grads.append(grad_ld)
            torch.autograd.backward(outputs, grads)
        return x.grad if need_input_grad else None


class _AutogradBase:
    """The hand-written protocol for a base distribution without one: its log-density under autograd."""

    def __init__(self, base):
        self.base = base

    def backprop_state(self, setup):
        return [param.grad for param in self.base.parameters()]

    def loss_and_grad(self, state, u, log_det, batch):
        with torch.inference_mode(False), torch.enable_grad():
            u = _normal_tensor(u).requires_grad_(True)
            share = _normal_tensor(batch.share)
            minus_log_prob = -self.base.log_prob(u, _normal_tensor(batch.context))
            rows = minus_log_prob - _normal_tensor(log_det)
            loss = rows.sum() * share if share.dim() == 0 else (rows * share.squeeze(1)).sum()
            if state:
                torch._foreach_zero_(state)
            loss.backward()
        return loss.detach(), u.grad
