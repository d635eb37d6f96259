"""The training loss of a MAF and its gradient, by hand-written back-propagation.

A training step of a MAF at the usual sizes (a few hundred rows, hidden layers
of about a hundred units) is not limited by arithmetic but by the number of
tensor operations: autograd records about 400 of them per step for five MAF
layers (views, transposes, detaches and mask products included) and walks its
graph back, at a few microseconds each. Here the forward pass keeps only what
the backward pass needs, and the backward pass is written out layer by layer:
about half as many operations, no graph, the same gradients up to round-off
(``tests/test_backprop.py`` compares them with autograd's for every layer type).

The products are laid out as MKL runs them fastest at these sizes, which
for narrow operands is not the obvious way (float32, one thread, 256 rows,
100 hidden units, 8 features; measured for 2 to 64 features):

- the output layer is one product for both blocks (shift, log-scale), 2-3x
  faster than one product per block, although the element-wise work then
  reads the blocks as strided halves;
- the first layer's weight gradient is computed as ``(x.T @ grad).T`` and
  the gradient of its input as ``(W.T @ grad.T).T``: with a few features
  these are 2-4x faster than ``grad.T @ x`` and ``grad @ W``, and no slower
  with many.

Together they made a training step 6-10% faster. The soft clamp of the log-scale is
written with a sigmoid, ``bound * tanh(y / bound) = bound * (2 sigmoid(2 y / bound) - 1)``,
the same function (torch's CPU ``tanh`` is several times slower than ``sigmoid``).

The gradient of a masked weight is that of ``weight * mask``: the product
with the input, then with the mask. The mask product is left to the caller,
who can do it for all the layers in one operation (see :func:`masked_weights`).
A caller that has zeroed the masked entries of the weights (and masks every
gradient, which keeps them zero under Adam and an L2 penalty) can also skip
the masks in the forward pass, ``assume_masked=True``: ``weight`` then equals
``weight * mask`` exactly.

Every model the estimators build has this path: a standard-normal,
:class:`StudentT`, :class:`EllipticalT` or :class:`MADEMoG` base, with or
without a context, and the layers :class:`Standardize`, :class:`Whiten`,
:class:`Bounded`, :class:`AffineMADE` and :class:`BatchNorm`. Anything else
is differentiated by autograd (:func:`supports` says which applies). A
context enters each MADE's first layer beside the features, unmasked; it
gets no gradient (it is data).

On the CPU in float32 and float64, the element-wise work between the
products runs in C where the package was built with its optional module
``_fused`` (``setup.py``, reached through :mod:`._native`): one pass per layer and
direction instead of ten to twenty torch operations, about 15% off a step
(and the optimizer's step in C, :class:`_training._FlatAdam`, about 10% more).
Without it (no C compiler at install, or another device or dtype) the same
passes run as torch operations; ``tests/test_backprop.py`` checks both
against autograd.
"""

import math

import torch
from torch.nn import functional as F

from .base import _DF_RATE, _OFFSET_GAIN, EllipticalT, MADEMoG, StandardNormal, StudentT
from .bounds import Bounded
from . import _native
from .made import _ACTIVATIONS_INPLACE

__all__ = ["Plan", "loss_and_grad", "masked_weights", "supports"]

_LOG_2PI = math.log(2 * math.pi)


def supports(module, weight=None, context=None):
    """Whether :func:`loss_and_grad` can train ``module`` on this batch."""
    from .flow import MAF, AffineMADE, BatchNorm, Standardize, Whiten  # flow imports this module

    if not isinstance(module, MAF) or (context is None) != (module.n_context == 0):
        return False
    if type(module.base) not in (StandardNormal, StudentT, EllipticalT, MADEMoG):
        return False
    fixed = [type(t) in (Standardize, Whiten, Bounded) for t in module.transforms]
    learned = [type(t) in (AffineMADE, BatchNorm) for t in module.transforms]
    # every layer known, and the fixed ones (no parameters) all before the learned ones
    return all(f or l for f, l in zip(fixed, learned)) and fixed == sorted(fixed, reverse=True)


def masked_weights(module):
    """``(weights, masks)``: every masked weight matrix of ``module`` and its mask."""
    from .made import MaskedLinear

    layers = [layer for layer in module.modules() if isinstance(layer, MaskedLinear)]
    return [layer.weight for layer in layers], [layer.mask for layer in layers]


def loss_and_grad(module, x, weight=None, assume_masked=False, context=None):
    """Mean negative log-likelihood of the rows ``x``; sets every parameter's ``.grad``.

    The same value and gradients as ``-module.log_prob(x, context, weight)``
    averaged with the weights, followed by ``backward()``, for a module that
    :func:`supports` accepts, including the update of the batch-norm running
    averages in training mode (weighted moments when weights are given).
    Gradients of masked weights are *not* masked here (the caller masks them
    all at once). With ``assume_masked``, the masked entries of the weights
    must be zero (see the module docstring). A training loop calls this many
    times on the same module: :class:`Plan` does the per-module work once.

    Returns
    -------
    loss : torch.Tensor
        A 0-dimensional tensor, detached.
    """
    return Plan(module, assume_masked).loss_and_grad(x, weight, context)


def fusable(like):
    """Whether the C passes of :mod:`._native` can run on tensors like ``like``."""
    return _native.available(like)


class Plan:
    """:func:`loss_and_grad` of one module, with its layers and parameter views gathered once.

    One step would otherwise spend about a hundred of its four hundred tensor
    operations on views (each weight's transpose, the shift and log-scale
    blocks of each output layer) and on new gradient tensors. Adam updates
    the parameters in place, so views taken once stay views of the current
    weights; the gradients are written into buffers allocated here, which
    stay each parameter's ``.grad`` (views of one flat buffer, ``flat_grad``,
    which the caller may give: a :class:`_training._FlatAdam`'s).
    Build a plan per epoch (or whenever
    something else may have replaced a ``.grad``). With ``assume_masked``,
    the masked entries of the weights must be zero; a training loop zeroes
    them once and keeps them so with :meth:`mask_gradients` after each
    :meth:`loss_and_grad`. ``fused`` chooses the element-wise passes: in C
    (True; see :class:`_Fused`), as torch operations (False), or in C where
    :func:`fusable` allows (None, the default); the gradients are the same up
    to round-off.
    """

    def __init__(self, module, assume_masked=False, fused=None, flat_grad=None):
        from .flow import AffineMADE, BatchNorm  # flow imports this module

        transforms = list(module.transforms)
        learned = [t for t in transforms if isinstance(t, (AffineMADE, BatchNorm))]
        self.fixed = transforms[: len(transforms) - len(learned)]
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
        self._constant = _Constants(params[0]).get
        # the element-wise passes in C where the module is built (see _Fused)
        can_fuse = fusable(params[0])
        if fused and not can_fuse:
            raise ValueError(
                f"the C passes cannot run here: module _fused {'built' if _native.available() else 'missing'}, "
                f"parameters {params[0].dtype} on {params[0].device}"
            )
        self.fused = _Fused() if (can_fuse if fused is None else fused) else None
        self.layers = [
            _Affine(t, assume_masked, self._constant, self.fused) if isinstance(t, AffineMADE)
            else _BatchNorm(t, self._constant, self.fused)
            for t in learned
        ]  # fmt: skip
        # the base: N(0, I), whose minus log-density is |u|^2 / 2 plus a constant,
        # or a layer of its own (forward and backward, as the flow's layers);
        # the MoG's constant is that of N(0, I) too (each component's)
        self.base = None
        if isinstance(module.base, StudentT):
            self.base = _StudentT(module.base, self._constant)
        elif isinstance(module.base, EllipticalT):
            self.base = _EllipticalT(module.base, self._constant)
        elif isinstance(module.base, MADEMoG):
            self.base = _MoG(module.base, assume_masked, self.fused)
        self._fixed_loss = None  # the t's normaliser depends on df: its layer adds it
        if not isinstance(module.base, (StudentT, EllipticalT)):
            self._fixed_loss = self._constant(0.5 * module.n_features * _LOG_2PI)
        self._weights, self._masks = masked_weights(module)
        self._weight_grads = [weight.grad for weight in self._weights]

    @torch.no_grad()
    def zero_masked_weights(self):
        """Set the masked entries of every weight to zero (they are, unless someone set them)."""
        torch._foreach_mul_(self._weights, self._masks)

    def mask_gradients(self):
        """Multiply each masked weight's gradient by its mask, all in one operation.

        Adam then leaves the masked entries where they are, L2 penalty
        included: at zero, after :meth:`zero_masked_weights`.
        """
        torch._foreach_mul_(self._weight_grads, self._masks)

    @torch.inference_mode()
    def loss_and_grad(self, x, weight=None, context=None):
        """As :func:`loss_and_grad` of the plan's module.

        In inference mode, which skips autograd's dispatch entirely (no_grad
        still passes every operation through it): about 0.2 ms less per step,
        of 1.2 ms of per-operation overhead, at five MAF layers. Everything
        it writes into (gradients, batch-norm running averages) was made
        outside, so stays a normal tensor; what it makes (the loss) is an
        inference tensor, for reading only.
        """
        # each row's share of the mean: 1 / n, or its normalised weight (a column)
        if weight is None:
            share = self._constant(1.0 / x.shape[0])
        else:
            share = (weight / weight.sum()).unsqueeze(1).to(x.dtype)
        log_det = None
        for transform in self.fixed:
            x, ld = transform(x)  # fixed layers: no parameters, a log-det of x alone
            log_det = ld if log_det is None else log_det + ld
        # the fused affine layers add their log-dets into one buffer instead
        fused_log_det = None if self.fused is None else x.new_zeros(x.shape[0])
        caches = []
        for layer in self.layers:
            x, ld, cache = layer.forward(x, weight, context, fused_log_det, share)
            caches.append(cache)
            if ld is not None:
                log_det = ld if log_det is None else log_det + ld
        if fused_log_det is not None:
            log_det = fused_log_det if log_det is None else fused_log_det.add_(log_det)
        # minus the log-density: that of the base (for N(0, I), |u|^2 / 2 less
        # its constant) minus the log-det
        # (mean() and square() would each convert a Python number on the way)
        if self.base is None and self.fused is not None:
            loss, grad = self.fused.gaussian_loss(x, log_det, share)
        else:
            if self.base is None:
                minus_log_base = x.mul(x).sum(dim=-1).mul_(self._constant(0.5))
            else:
                minus_log_base, base_cache = self.base.forward(x, context)
            minus_log_prob = torch.sub(minus_log_base, log_det)
            if weight is None:
                loss = minus_log_prob.sum().mul_(share)
            else:
                loss = minus_log_prob.mul_(share.squeeze(1)).sum()
            # d loss / d u for the base; each log-det term adds -share per row.
            grad = x * share if self.base is None else self.base.backward(base_cache, share)
        if self._fixed_loss is not None:
            loss = loss.add_(self._fixed_loss)

        # The first learned layer reads the data: no gradient to pass on.
        for index in range(len(self.layers) - 1, -1, -1):
            grad = self.layers[index].backward(caches[index], grad, share, index > 0)
        return loss


class _Fused:
    """The element-wise passes in C (:mod:`._native`), in the call shapes of the layers here."""

    @staticmethod
    def affine_forward(out, x, bound, log_det):
        factors = _native.affine_forward(out, x, bound, log_det)
        return factors[0], factors

    @staticmethod
    def affine_backward(factors, grad_u, share, bias_grad):
        return _native.affine_backward(factors, grad_u, share, bias_grad)

    @staticmethod
    def activation_backward(grad, hidden, tanh, bias_grad):
        return _native.activation_backward(grad, hidden, tanh, bias_grad)

    @staticmethod
    def batch_norm_forward(layer, x, share, log_det):
        rows, features = _native.batch_norm_forward(
            x, share, layer.log_gamma, layer.beta, layer.running_mean, layer.running_var, layer.momentum,
            layer.eps, log_det,
        )  # fmt: skip
        return rows[0], (rows, features)

    @staticmethod
    def batch_norm_backward(cache, grad_y, share, grad_log_gamma, grad_beta, need_input_grad):
        rows, features = cache
        return _native.batch_norm_backward(rows, features, grad_y, share, grad_log_gamma, grad_beta, need_input_grad)

    @staticmethod
    def gaussian_loss(u, log_det, share):
        return _native.gaussian_loss(u, log_det, share)


class _Constants:
    """0-dimensional tensors of given values, made once, in the dtype and device of ``like``.

    A Python number in a tensor operation becomes a float64 scalar tensor that
    is then converted to the operation's dtype: an extra copy that doubled the
    cost of an element-wise operation on a batch (about 4 microseconds, some
    sixty times a step). A tensor of the operation's dtype is used as it is.
    """

    def __init__(self, like):
        self.like = like
        self.values = {}

    def get(self, value):
        constant = self.values.get(value)
        if constant is None:
            constant = self.values[value] = self.like.new_tensor(value)
        return constant


class _MADE:
    """Forward and backward pass of one :class:`MADE`: its masked layers, up to the output product."""

    def __init__(self, made, assume_masked, fused=None):
        self.fused = fused
        self.tanh = made.activation == "tanh"
        self.linears = list(made.layers)
        # the gradient buffers the plan set, looked up once: reading a
        # module's parameter and then its .grad costs about 3 us per access
        self.weight_grads = [linear.weight.grad for linear in self.linears]
        self.bias_grads = [linear.bias.grad for linear in self.linears]
        self.activation = _ACTIVATIONS_INPLACE[made.activation]
        self.activation_backward = (
            _threshold_backward if made.activation == "relu" else _tanh_backward
        )
        self.n_features = made.n_features
        self.biases = [linear.bias for linear in self.linears]
        self.views = self._views([linear.weight for linear in self.linears]) if assume_masked else None

    @staticmethod
    def _views(weights):
        """The weights (for the backward pass) and their transposes (for the forward pass)."""
        return weights, [weight.t() for weight in weights]

    def forward(self, x, context=None):
        """``(out, cache)``: the output layer's product, all its blocks side by side."""
        if self.views is None:
            weights, transposed = self._views([l.weight * l.mask for l in self.linears])
        else:
            weights, transposed = self.views
        h = x if context is None else torch.cat([x, context], dim=1)  # the first layer's input
        hidden = [h]
        for bias, weight_t in zip(self.biases[:-1], transposed[:-1]):
            h = self.activation(torch.addmm(bias, h, weight_t))
            hidden.append(h)
        # one product for all the blocks (see the module docstring)
        return torch.addmm(self.biases[-1], h, transposed[-1]), (hidden, weights)

    def backward(self, cache, grad_out, need_input_grad=True, output_bias_done=False):
        """Write the parameter gradients, given d loss / d out; return d loss / d x, or None.

        With ``output_bias_done``, the caller has written the output layer's bias gradient.
        """
        hidden, weights = cache
        weight_grads, bias_grads = self.weight_grads, self.bias_grads
        torch.mm(grad_out.t(), hidden[-1], out=weight_grads[-1])
        if not output_bias_done:
            torch.sum(grad_out, dim=0, out=bias_grads[-1])
        if len(weights) == 1 and not need_input_grad:
            return None
        grad_below = grad_out.mm(weights[-1])
        for depth in range(len(weights) - 2, -1, -1):
            if self.fused is not None:  # with the bias gradient, in one pass
                grad_out = self.fused.activation_backward(
                    grad_below, hidden[depth + 1], self.tanh, bias_grads[depth]
                )
            else:
                grad_out = self.activation_backward(grad_below, hidden[depth + 1])
                torch.sum(grad_out, dim=0, out=bias_grads[depth])
            if depth > 0:
                torch.mm(grad_out.t(), hidden[depth], out=weight_grads[depth])
            else:  # the products with the data's few columns, transposed (module docstring)
                weight_grads[0].copy_(hidden[0].t().mm(grad_out).t())
            if depth == 0 and not need_input_grad:
                return None
            grad_below = grad_out.mm(weights[depth]) if depth > 0 else weights[0].t().mm(grad_out.t()).t()
        if grad_below.shape[1] != self.n_features:  # the first layer's input was the features, then the context
            grad_below = grad_below[:, : self.n_features]
        return grad_below


class _Affine:
    """Forward and backward pass of one :class:`AffineMADE` layer."""

    def __init__(self, layer, assume_masked, constant, fused=None):
        self.fused = fused
        self.made = _MADE(layer.made, assume_masked, fused)
        self.bound = layer.log_scale_bound
        self.n_features = layer.made.n_features
        self.minus_two_over_bound = constant(-2.0 / self.bound)
        self.minus_bound = constant(-self.bound)
        self.zero = constant(0.0)

    def forward(self, x, weight=None, context=None, log_det=None, share=None):
        """``(u, log-det per row, cache)``; fused, the log-det is added to ``log_det`` (and None returned)."""
        out, made_cache = self.made.forward(x, context)
        if self.fused is not None:
            u, factors = self.fused.affine_forward(out, x, self.bound, log_det)
            return u, None, (made_cache, factors)
        shift, raw_log_scale = out[:, : self.n_features], out[:, self.n_features :]
        bound = self.bound
        # -alpha = bound * tanh(raw / -bound) = 2 bound * sigmoid(-2 raw / bound) - bound
        sigmoid = torch.sigmoid(raw_log_scale.mul_(self.minus_two_over_bound))
        minus_log_scale = torch.add(self.minus_bound, sigmoid, alpha=2.0 * bound)
        scale = torch.exp(minus_log_scale)
        u = (x - shift).mul_(scale)
        return u, minus_log_scale.sum(dim=-1), (made_cache, sigmoid, scale, u)

    def backward(self, cache, grad_u, share, need_input_grad=True):
        """Write the layer's parameter gradients; return d loss / d (its input), or None."""
        if self.fused is not None:
            made_cache, factors = cache
            grad_out, grad_x = self.fused.affine_backward(factors, grad_u, share, self.made.bias_grads[-1])
            grad_below = self.made.backward(made_cache, grad_out, need_input_grad, output_bias_done=True)
            return None if grad_below is None else grad_x.add_(grad_below)
        made_cache, sigmoid, scale, u = cache
        n_rows, d = grad_u.shape
        # the output layer's gradient, shift block then log-scale block, as its layout
        grad_out = grad_u.new_empty((n_rows, 2 * d))
        grad_x = grad_u * scale
        torch.neg(grad_x, out=grad_out[:, :d])
        # u = (x - shift) exp(m), log-det = sum(m): d loss / d m = grad_u * u - share;
        # m = 2 bound sigmoid(-2 raw / bound) - bound: d m / d raw = -4 sigmoid (1 - sigmoid)
        minus_grad_m = torch.addcmul(share, grad_u, u, value=-1.0)
        d_sigmoid = torch.addcmul(sigmoid, sigmoid, sigmoid, value=-1.0)
        torch.addcmul(self.zero, minus_grad_m, d_sigmoid, value=4.0, out=grad_out[:, d:])
        grad_below = self.made.backward(made_cache, grad_out, need_input_grad)
        return None if grad_below is None else grad_x.add_(grad_below)


def _threshold_backward(grad, output):
    """Gradient through a ReLU, given its output (positive exactly where its input is)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


def _tanh_backward(grad, output):
    """Gradient through tanh, given its output: ``grad * (1 - output^2)``."""
    return torch.ops.aten.tanh_backward(grad, output)


class _StudentT:
    """Minus the log-density of the :class:`StudentT` base, and its gradients.

    Per feature, with ``q = u^2 / df`` and ``h = (df + 1) / 2``:
    ``-log t(u; df) = h log(1 + q) - N(df)``, where ``N(df) = lgamma(h) -
    lgamma(df / 2) - log(pi df) / 2``. Its derivative in ``u`` is ``2 h u /
    (df (1 + q))``; in ``df``, ``log(1 + q) / 2 - h q / (df (1 + q)) - N'(df)``
    with ``N'(df) = (digamma(h) - digamma(df / 2) - 1 / df) / 2``; and ``df =
    1 + exp(_DF_RATE raw_df)``. ``N`` and ``N'`` are computed in float64,
    as :meth:`StudentT.log_prob` computes ``N``.
    """

    def __init__(self, base, constant):
        self.base = base
        self.grad_raw_df = base.raw_df.grad  # as in _MADE
        self.half = constant(0.5)
        self.log_pi = math.log(math.pi)

    def forward(self, u, context=None):
        """``(-log t(u) per row, cache)``."""
        df = self.base.df
        df64 = df.double()
        norm = torch.lgamma(0.5 * (df64 + 1)) - torch.lgamma(0.5 * df64)
        norm = norm - 0.5 * (torch.log(df64) + self.log_pi)
        h = torch.add(self.half, df, alpha=0.5)
        q = u.mul(u).div_(df)
        log1p_q = torch.log1p(q)
        rows = torch.mv(log1p_q, h).sub_(norm.sum().to(u.dtype))
        return rows, (u, df, df64, h, q, log1p_q)

    def backward(self, cache, share):
        """Write the gradient of ``raw_df``; return d loss / d u."""
        u, df, df64, h, q, log1p_q = cache
        inverse = q.add(1).mul_(df).reciprocal_()  # 1 / (df (1 + q))
        grad_u = (u * inverse).mul_(2 * h).mul_(share)
        norm_derivative = 0.5 * (torch.digamma(0.5 * (df64 + 1)) - torch.digamma(0.5 * df64) - 1 / df64)
        per_row = torch.addcmul(log1p_q.mul_(self.half), h * q, inverse, value=-1.0).mul_(share)
        grad_df = per_row.sum(dim=0).sub_(norm_derivative.to(df.dtype))
        torch.mul(grad_df, (df - 1).mul_(_DF_RATE), out=self.grad_raw_df)
        return grad_u


class _EllipticalT(_StudentT):
    """Minus the log-density of the :class:`EllipticalT` base, and its gradients.

    With ``s = |u|^2``, ``q = s / df`` and ``h = (df + D) / 2``: ``-log p(u) =
    h log(1 + q) - N(df)``, ``N(df) = lgamma(h) - lgamma(df / 2) - D log(pi
    df) / 2``. Its derivative in ``u`` is ``2 h u / (df (1 + q))``; in ``df``,
    ``log(1 + q) / 2 - h q / (df (1 + q)) - N'(df)`` with ``N'(df) =
    (digamma(h) - digamma(df / 2) - D / df) / 2``; and ``df = 1 +
    exp(_DF_RATE raw_df)``. ``N`` and ``N'`` in float64, as in :class:`_StudentT`,
    whose constructor it shares.
    """

    def forward(self, u, context=None):
        """``(-log p(u) per row, cache)``."""
        d, df = u.shape[1], self.base.df
        df64 = df.double()
        norm = torch.lgamma(0.5 * (df64 + d)) - torch.lgamma(0.5 * df64) - 0.5 * d * (torch.log(df64) + self.log_pi)
        h = torch.add(self.half * d, df, alpha=0.5)
        q = u.mul(u).sum(dim=1).div_(df)
        log1p_q = torch.log1p(q)
        rows = (log1p_q * h).sub_(norm.to(u.dtype))
        return rows, (u, df, df64, h, q, log1p_q)

    def backward(self, cache, share):
        """Write the gradient of ``raw_df``; return d loss / d u."""
        u, df, df64, h, q, log1p_q = cache
        d = u.shape[1]
        share = share.reshape(-1) if share.dim() else share  # per row, or one for all
        inverse = q.add(1).mul_(df).reciprocal_()  # 1 / (df (1 + q))
        grad_u = u * (inverse * (2 * h) * share)[:, None]
        norm_derivative = 0.5 * (torch.digamma(0.5 * (df64 + d)) - torch.digamma(0.5 * df64) - d / df64)
        per_row = (log1p_q.mul_(self.half) - h * q * inverse).mul_(share)
        grad_df = per_row.sum(dim=0, keepdim=True).sub_(norm_derivative.to(df.dtype))
        torch.mul(grad_df, (df - 1).mul_(_DF_RATE), out=self.grad_raw_df)
        return grad_u


class _MoG:
    """Minus the log-density of the :class:`MADEMoG` base (less its constant), and its gradients.

    Per row and feature ``i``, with the component log-weights ``w = log_softmax(logits)``,
    means ``m``, log-scales ``a = bound tanh(raw / bound)`` and ``z = (u_i - m) exp(-a)``:
    ``log p_i = logsumexp(w - z^2 / 2 - a) - log(2 pi) / 2``. With the responsibilities
    ``r = softmax(w - z^2 / 2 - a)``, the derivatives of ``-log p_i`` are ``softmax(logits) - r``
    in the logits, ``-r z exp(-a)`` in the means, ``-r (z^2 - 1) (1 - tanh^2)`` in ``raw``,
    and ``sum_k r z exp(-a)`` in ``u_i`` directly; ``u`` also feeds the base's MADE, whose
    backward pass adds the rest.
    """

    def __init__(self, base, assume_masked, fused=None):
        self.made = _MADE(base.made, assume_masked, fused)
        self.offset = base.offset
        self.grad_offset = base.offset.grad  # as in _MADE
        self.n_components = base.n_components
        self.bound = base.log_scale_bound

    def forward(self, u, context=None):
        """``(minus the log-density per row, less the constant, cache)``."""
        out, made_cache = self.made.forward(u, context)
        n_rows, d = u.shape
        # (rows, features, 3K), as MADEMoG._mixture_of lays it out
        raw = out.view(n_rows, -1, d).transpose(1, 2) + _OFFSET_GAIN * self.offset.t()
        logits, means, raw_log_scales = raw.split(self.n_components, dim=-1)
        tanh = torch.tanh(raw_log_scales / self.bound)
        log_scales = self.bound * tanh
        log_weights = F.log_softmax(logits, dim=-1)
        inverse_scales = torch.exp(-log_scales)
        z = (u.unsqueeze(-1) - means).mul_(inverse_scales)
        joint = log_weights - 0.5 * z * z - log_scales
        log_p = torch.logsumexp(joint, dim=-1)
        cache = (made_cache, tanh, log_weights, inverse_scales, z, joint, log_p)
        return log_p.sum(dim=-1).neg_(), cache

    def backward(self, cache, share):
        """Write the base's parameter gradients; return d loss / d u."""
        made_cache, tanh, log_weights, inverse_scales, z, joint, log_p = cache
        n_rows, d, _ = z.shape
        responsibility = torch.exp(joint - log_p.unsqueeze(-1))
        r_z_over_scale = responsibility * z * inverse_scales
        grad_raw = torch.cat(
            [
                torch.exp(log_weights) - responsibility,
                -r_z_over_scale,
                responsibility * (1 - z * z) * (1 - tanh * tanh),
            ],
            dim=-1,
        )
        grad_raw.mul_(share if share.dim() == 0 else share.unsqueeze(-1))
        torch.mul(grad_raw.sum(dim=0).t(), _OFFSET_GAIN, out=self.grad_offset)
        grad_out = grad_raw.transpose(1, 2).reshape(n_rows, -1)  # back to the MADE's output layout
        grad_u = r_z_over_scale.sum(dim=-1).mul_(share)
        return grad_u.add_(self.made.backward(made_cache, grad_out))


class _BatchNorm:
    """Forward and backward pass of one :class:`BatchNorm` layer in training mode."""

    def __init__(self, layer, constant, fused=None):
        self.layer = layer
        self.fused = fused
        self.grad_log_gamma, self.grad_beta = layer.log_gamma.grad, layer.beta.grad  # as in _MADE
        self.one = constant(1.0)

    def forward(self, x, weight=None, context=None, log_det=None, share=None):
        """Batch norm with (weighted) batch statistics; updates the running ones.

        Fused, the log-det is added to ``log_det`` (and None returned).
        """
        if self.fused is not None:
            y, cache = self.fused.batch_norm_forward(self.layer, x, share, log_det)
            return y, None, cache
        y, log_scale, centred, var_eps, scale = self.layer.normalize(x, weight)
        return y, log_scale.sum().expand(x.shape[0]), (centred, var_eps, scale)

    def backward(self, cache, grad_y, share, need_input_grad=True):
        """Gradients of batch norm with batch statistics; d loss / d input.

        With each row's share ``p_i`` of the moments (``1 / n``, or its
        normalised weight): ``mean = sum p_i x_i`` and
        ``var = sum p_i (x_i - mean)^2``, so ``d loss / d x_i =
        s (grad_y_i - p_i sum_k grad_y_k) + 2 p_i (x_i - mean) d loss / d var``.
        """
        if self.fused is not None:
            return self.fused.batch_norm_backward(
                cache, grad_y, share, self.grad_log_gamma, self.grad_beta, need_input_grad
            )
        centred, var_eps, scale = cache
        # y = beta + (x - mean) s, log s = log_gamma - log(var + eps) / 2, log-det = sum(log s)
        grad_log_scale = self.grad_log_gamma
        torch.sum(grad_y * centred, dim=0, out=grad_log_scale).mul_(scale).sub_(self.one)
        grad_sum = torch.sum(grad_y, dim=0, out=self.grad_beta)
        if not need_input_grad:
            return None
        grad_var = grad_log_scale / var_eps  # -2 d loss / d var
        grad_x = torch.sub(grad_y, share * grad_sum).mul_(scale)
        return grad_x.addcmul_(share * centred, grad_var, value=-1.0)
