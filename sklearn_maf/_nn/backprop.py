"""The training loss of a MAF and its gradient, by hand-written back-propagation.

A training step of a MAF at the usual sizes (a few hundred rows, hidden layers
of about a hundred units) is not limited by arithmetic but by the number of
tensor operations: autograd records about 400 of them per step for five MAF
layers (views, transposes, detaches and mask products included) and walks its
graph back, at a few microseconds each. Here the forward pass keeps only what
the backward pass needs, and the backward pass is written out layer by layer:
about half as many operations, no graph, the same gradients up to round-off
(``tests/test_backprop.py`` compares them with autograd's for every layer type).

The output layer of each MADE is computed as two products, one per block of
its weight (shift, log-scale), so that both blocks are contiguous tensors
rather than strided halves of one: element-wise operations on strided blocks
cost several times as much on a CPU. The soft clamp of the log-scale is
written with a sigmoid, ``bound * tanh(y / bound) = bound * (2 sigmoid(2 y / bound) - 1)``,
the same function (torch's CPU ``tanh`` is several times slower than ``sigmoid``).

The gradient of a masked weight is that of ``weight * mask``: the product
with the input, then with the mask. The mask product is left to the caller,
who can do it for all the layers in one operation (see :func:`masked_weights`).
A caller that has zeroed the masked entries of the weights (and masks every
gradient, which keeps them zero under Adam and an L2 penalty) can also skip
the masks in the forward pass, ``assume_masked=True``: ``weight`` then equals
``weight * mask`` exactly.

Only the common case has this path: a standard-normal base, no context, and
the layers :class:`Standardize`, :class:`Bounded`,
:class:`AffineMADE` and :class:`BatchNorm`. Everything else is differentiated
by autograd (:func:`supports` says which applies).
"""

import math

import torch
from torch.nn import functional as F

from .base import StandardNormal
from .bounds import Bounded

__all__ = ["loss_and_grad", "masked_weights", "supports"]

_LOG_2PI = math.log(2 * math.pi)


def supports(module, weight=None, context=None):
    """Whether :func:`loss_and_grad` can train ``module`` on this batch."""
    from .flow import MAF, AffineMADE, BatchNorm, Standardize  # flow imports this module

    if not isinstance(module, MAF) or context is not None:
        return False
    if type(module.base) is not StandardNormal:
        return False
    fixed = [type(t) in (Standardize, Bounded) for t in module.transforms]
    learned = [type(t) in (AffineMADE, BatchNorm) for t in module.transforms]
    # every layer known, and the fixed ones (no parameters) all before the learned ones
    return all(f or l for f, l in zip(fixed, learned)) and fixed == sorted(fixed, reverse=True)


def masked_weights(module):
    """``(weights, masks)``: every masked weight matrix of ``module`` and its mask."""
    from .made import MaskedLinear

    layers = [layer for layer in module.modules() if isinstance(layer, MaskedLinear)]
    return [layer.weight for layer in layers], [layer.mask for layer in layers]


def loss_and_grad(module, x, weight=None, assume_masked=False):
    """Mean negative log-likelihood of the rows ``x``; sets every parameter's ``.grad``.

    The same value and gradients as ``-module.log_prob(x, weight=weight)``
    averaged with the weights, followed by ``backward()``, for a module that
    :func:`supports` accepts, including the update of the batch-norm running
    averages in training mode (weighted moments when weights are given).
    Gradients of masked weights are *not* masked here (the caller masks them
    all at once). With ``assume_masked``, the masked entries of the weights
    must be zero (see the module docstring).

    Returns
    -------
    loss : torch.Tensor
        A 0-dimensional tensor, detached.
    """
    from .flow import AffineMADE, BatchNorm

    # each row's share of the mean: 1 / n, or its normalised weight (a column)
    share = 1.0 / x.shape[0] if weight is None else (weight / weight.sum()).unsqueeze(1)
    caches = []
    log_det = 0.0
    with torch.no_grad():
        transforms = list(module.transforms)
        learned = [t for t in transforms if isinstance(t, (AffineMADE, BatchNorm))]
        for transform in transforms[: len(transforms) - len(learned)]:
            x, ld = transform(x)  # fixed layers: no parameters, a log-det of x alone
            log_det = log_det + ld
        for transform in learned:
            if isinstance(transform, AffineMADE):
                x, ld, cache = _affine_forward(transform, x, assume_masked)
            else:
                x, ld, cache = _batch_norm_forward(transform, x, weight)
            caches.append(cache)
            log_det = log_det + ld
        base = -0.5 * (x.square().sum(dim=-1) + x.shape[-1] * _LOG_2PI)
        log_prob = base + log_det
        loss = -(log_prob.mean() if weight is None else log_prob.mul(share.squeeze(1)).sum())

        # d loss / d u for the base; each log-det term adds -share per row.
        grad = x * share
        for index in range(len(learned) - 1, -1, -1):
            if isinstance(learned[index], AffineMADE):
                # the first learned layer reads the data: no gradient to pass on
                grad = _affine_backward(learned[index], caches[index], grad, share, index > 0)
            else:
                grad = _batch_norm_backward(learned[index], caches[index], grad, share)
    return loss


def _affine_forward(layer, x, assume_masked=False):
    """One MAF layer: ``(u, log-det per row, cache)``."""
    made = layer.made
    layers = list(made.layers)  # a list: slicing a ModuleList builds a new ModuleList
    if assume_masked:
        weights = [linear.weight for linear in layers]
    else:
        weights = [linear.weight * linear.mask for linear in layers]
    hidden = [x]
    h = x
    for linear, weight in zip(layers[:-1], weights):
        h = made._activation(torch.addmm(linear.bias, h, weight.t()))
        hidden.append(h)
    output, weight, d = layers[-1], weights[-1], x.shape[1]
    shift = torch.addmm(output.bias[:d], h, weight[:d].t())
    raw_log_scale = torch.addmm(output.bias[d:], h, weight[d:].t())
    bound = layer.log_scale_bound
    # -alpha = bound * tanh(raw / -bound) = 2 bound * sigmoid(-2 raw / bound) - bound
    sigmoid = torch.sigmoid(raw_log_scale.mul_(-2.0 / bound))
    minus_log_scale = (sigmoid * (2.0 * bound)).sub_(bound)
    scale = torch.exp(minus_log_scale)
    u = (x - shift).mul_(scale)
    return u, minus_log_scale.sum(dim=-1), (layers, hidden, weights, sigmoid, scale, u)


def _affine_backward(layer, cache, grad_u, share, need_input_grad=True):
    """Gradients of one MAF layer's parameters; returns d loss / d (its input) or None."""
    layers, hidden, weights, sigmoid, scale, u = cache
    # u = (x - shift) exp(m), log-det = sum(m): d loss / d m = grad_u * u - share;
    # m = 2 bound sigmoid(-2 raw / bound) - bound: d m / d raw = -4 sigmoid (1 - sigmoid)
    grad_m = torch.mul(grad_u, u).sub_(share)
    grad_raw = grad_m.mul_(torch.addcmul(sigmoid, sigmoid, sigmoid, value=-1.0).mul_(-4.0))
    grad_x = grad_u * scale
    grad_shift = -grad_x

    # the output layer, block by block (shift rows first, as in its layout)
    output, below, d = layers[-1], hidden[-1], grad_x.shape[1]
    weight_grad = torch.empty_like(output.weight)
    torch.mm(grad_shift.t(), below, out=weight_grad[:d])
    torch.mm(grad_raw.t(), below, out=weight_grad[d:])
    output.weight.grad = weight_grad
    output.bias.grad = torch.cat([grad_shift.sum(dim=0), grad_raw.sum(dim=0)])
    if len(layers) == 1 and not need_input_grad:
        return None
    weight = weights[-1]
    grad_below = torch.addmm(grad_shift.mm(weight[:d]), grad_raw, weight[d:])

    activation_backward = _threshold_backward if layer.made.activation == "relu" else _tanh_backward
    for depth in range(len(layers) - 2, -1, -1):
        grad_out = activation_backward(grad_below, hidden[depth + 1])
        linear, below = layers[depth], hidden[depth]
        linear.weight.grad = grad_out.t().mm(below)
        linear.bias.grad = grad_out.sum(dim=0)
        if depth == 0 and not need_input_grad:
            return None
        grad_below = grad_out.mm(weights[depth])
    return grad_x.add_(grad_below)


def _threshold_backward(grad, output):
    """Gradient through a ReLU, given its output (positive exactly where its input is)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


def _tanh_backward(grad, output):
    """Gradient through tanh, given its output: ``grad * (1 - output^2)``."""
    return torch.ops.aten.tanh_backward(grad, output)


def _batch_norm_forward(layer, x, weight):
    """Batch norm with (weighted) batch statistics; updates the running ones."""
    mean, var = layer._statistics(x, weight)  # the layer's own, running averages included
    centred = x - mean
    log_scale = layer.log_gamma - 0.5 * torch.log(var + layer.eps)
    scale = torch.exp(log_scale)
    y = torch.addcmul(layer.beta, centred, scale)
    return y, log_scale.sum().expand(x.shape[0]), (centred, var, scale)


def _batch_norm_backward(layer, cache, grad_y, share):
    """Gradients of batch norm in training mode (batch statistics); d loss / d input.

    With each row's share ``p_i`` of the moments (``1 / n``, or its normalised
    weight): ``mean = sum p_i x_i`` and ``var = sum p_i (x_i - mean)^2``, so
    ``d loss / d x_i = s (grad_y_i - p_i sum_k grad_y_k) + 2 p_i (x_i - mean) d loss / d var``.
    """
    centred, var, scale = cache
    # y = beta + (x - mean) s, log s = log_gamma - log(var + eps) / 2, log-det = sum(log s)
    grad_log_scale = (grad_y * centred).sum(dim=0).mul_(scale).sub_(1.0)
    layer.log_gamma.grad = grad_log_scale
    layer.beta.grad = grad_sum = grad_y.sum(dim=0)
    grad_var = grad_log_scale * (-1.0 / (var + layer.eps))  # 2 d loss / d var
    grad_x = torch.sub(grad_y, share * grad_sum).mul_(scale)
    return grad_x.addcmul_(share * centred, grad_var)
