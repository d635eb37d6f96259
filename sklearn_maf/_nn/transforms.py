"""The learned transforms of a flow: the affine and spline MAF layers and batch normalisation.

Each class owns its mathematics: ``forward(x, context, weight) -> (u,
logabsdet)`` towards the base density (the autograd and scoring path),
``inverse(u, context) -> (x, logabsdet)`` back, and, where the hand-written
gradient of a training step is kept, ``backprop_state`` /
``forward_cached`` / ``backward`` (the protocol is described in
:mod:`.backprop`). A transform without ``backward`` is trained through
autograd.
"""

import math
from types import SimpleNamespace

import torch
from torch import nn

from . import _native
from .made import MADE

__all__ = [
    "AffineMADE",
    "BatchNorm",
    "SplineMADE",
    "affine_minus_log_scale",
    "power_tails",
    "power_tails_inverse",
    "soft_clamp",
]


def soft_clamp(x, bound):
    """Smoothly bound ``x`` to ``(-bound, bound)``; the identity near zero."""
    return bound * torch.tanh(x / bound)


def affine_minus_log_scale(raw, bound, constant=float):
    """``(-alpha, s)`` of the MAF layer: ``-alpha = -soft_clamp(raw, bound) = 2 bound s - bound``.

    ``s = sigmoid(-2 raw / bound)``, which the hand-written backward pass
    reuses (``d(-alpha) / d raw = -4 s (1 - s)``). The same function as
    :func:`soft_clamp`, written with a sigmoid: in float64 a sigmoid costs
    less than half a tanh on a CPU. The sign sits inside, so that neither
    ``exp(-alpha)`` nor the log-det needs a negation. ``constant`` turns each
    number into the operand used: in a training step a cached 0-d tensor of
    the batch's dtype, which a float32 operation reads without a conversion.
    The C passes (``_fused.c``: ``affine_forward``, ``affine_score``) compute
    the same function and are tested against this one.
    """
    s = torch.sigmoid(raw * constant(-2.0 / bound))
    return torch.add(constant(-bound), s, alpha=2.0 * bound), s


def power_tails(z, cut):
    """Per feature: the identity on ``[-cut, cut]``, power-law tails beyond; ``(u, logabsdet)``.

    ``u = sign(z) sqrt(c^2 + 2 c^2 log(|z| / c))`` for ``|z| > c``: continuous,
    with a continuous slope, at ``c``. A standard normal ``u`` gives ``z`` the
    normal density on ``[-c, c]`` and one that falls like ``|z| ** -(c^2 + 1)``
    (up to a slowly varying factor) beyond, with the normal's mass there.
    """
    c = float(cut)
    a = z.abs().clamp(min=c)
    root = torch.sqrt(c * c + 2 * c * c * torch.log(a / c))
    outside = z.abs() > c
    u = torch.where(outside, torch.sign(z) * root, z)
    logabsdet = torch.where(outside, 2 * math.log(c) - torch.log(a) - torch.log(root), 0.0)
    return u, logabsdet.sum(dim=-1)


def power_tails_inverse(u, cut):
    """The inverse of :func:`power_tails`: ``(z, logabsdet)`` of the map ``u -> z``."""
    c = float(cut)
    b = u.abs().clamp(min=c)
    z = torch.where(u.abs() > c, torch.sign(u) * c * torch.exp((b * b - c * c) / (2 * c * c)), u)
    return z, -power_tails(z, c)[1]


class AffineMADE(nn.Module):
    """One MAF layer: ``u_i = (x_i - mu_i) * exp(-alpha_i)``.

    ``mu`` and ``alpha`` come from a :class:`MADE` of ``x`` in the order given
    by ``degrees``. The log-scale is ``alpha = soft_clamp(raw, log_scale_bound)``
    of the MADE's raw output in both directions (the density direction in the
    sigmoid form of :func:`affine_minus_log_scale`, the same function), so
    density and sampling always describe the same model.

    Parameters
    ----------
    degrees : torch.LongTensor of shape (n_features,)
        Degrees of the inputs (the variable order of this layer).
    log_scale_bound : float, default=5.0
        Bound on ``|alpha_i|``.
    **made_params
        Passed to :class:`MADE`.
    """

    def __init__(self, degrees, *, log_scale_bound=5.0, **made_params):
        super().__init__()
        self.made = MADE(degrees, n_params=2, **made_params)
        self.log_scale_bound = log_scale_bound
        self.register_buffer("order", torch.argsort(degrees))

    def forward(self, x, context=None, weight=None):
        shift, raw_log_scale = self.made(x, context)
        if not torch.is_grad_enabled() and _scores_in_c(x, shift, raw_log_scale):
            return _native.affine_score(x, shift, raw_log_scale, self.log_scale_bound)
        minus_log_scale, _ = affine_minus_log_scale(raw_log_scale, self.log_scale_bound)
        return (x - shift).mul_(torch.exp(minus_log_scale)), minus_log_scale.sum(dim=-1)

    def inverse(self, u, context=None):
        """Invert feature by feature, ``x_i = u_i * exp(alpha_i) + mu_i``.

        :meth:`MADE.solve` computes every hidden unit of the MADE once, as soon
        as the features it depends on are known, rather than running the whole
        network once per feature: about one forward pass of arithmetic instead
        of ``n_features``.
        """
        bound = self.log_scale_bound

        # alpha in its tanh form: torch's float64 sigmoid may round a number
        # differently in the vectorised body of a loop and in its remainder,
        # and a drawn row must not depend on how many are drawn with it
        def step(features, params):
            shift, raw_log_scale = params
            return u[:, features] * torch.exp(soft_clamp(raw_log_scale, bound)) + shift

        x, (_, raw_log_scale) = self.made.solve(step, u.shape[0], context, like=u)
        return x, soft_clamp(raw_log_scale, bound).sum(dim=-1)

    # ------------------------------------------------ hand-written training pass

    def backprop_state(self, setup):
        """The MADE and its state, and this layer's numbers as tensors of the batch's dtype."""
        # the MADE itself too: a submodule attribute costs a Module.__getattr__ call per access
        return SimpleNamespace(
            conditioner=self.made, made=self.made.backprop_state(setup), native=setup.native, constant=setup.constant
        )

    def forward_cached(self, state, x, batch, log_det):
        """``(u, cache)``; adds the log-det per row to ``log_det``."""
        out, made_cache = state.conditioner.forward_cached(state.made, x, batch.context)
        if state.native:
            factors = _native.affine_forward(out, x, self.log_scale_bound, log_det)
            return factors[0], (made_cache, factors)
        d = x.shape[1]
        shift, raw_log_scale = out[:, :d], out[:, d:]
        minus_log_scale, s = affine_minus_log_scale(raw_log_scale, self.log_scale_bound, state.constant)
        scale = torch.exp(minus_log_scale)
        u = (x - shift).mul_(scale)
        log_det.add_(minus_log_scale.sum(dim=-1))
        return u, (made_cache, (u, s, scale))

    def backward(self, state, cache, grad_u, batch, need_input_grad=True):
        """Write the layer's parameter gradients; return d loss / d (its input), or None."""
        made_cache, factors = cache
        share = batch.share
        if state.native:
            grad_out, grad_x = _native.affine_backward(factors, grad_u, share, state.made.bias_grads[-1])
            grad_below = state.conditioner.backward(
                state.made, made_cache, grad_out, need_input_grad, output_bias_done=True
            )
            return None if grad_below is None else grad_x.add_(grad_below)
        u, s, scale = factors
        n_rows, d = grad_u.shape
        # the output layer's gradient, shift block then log-scale block, as its layout
        grad_out = grad_u.new_empty((n_rows, 2 * d))
        grad_x = grad_u * scale
        torch.neg(grad_x, out=grad_out[:, :d])
        # u = (x - shift) exp(m), log-det = sum(m): d loss / d m = grad_u * u - share;
        # m = 2 bound s - bound, s = sigmoid(-2 raw / bound): d m / d raw = -4 s (1 - s)
        minus_grad_m = torch.addcmul(share, grad_u, u, value=-1.0)
        d_s = torch.addcmul(s, s, s, value=-1.0)
        torch.addcmul(state.constant(0.0), minus_grad_m, d_s, value=4.0, out=grad_out[:, d:])
        grad_below = state.conditioner.backward(state.made, made_cache, grad_out, need_input_grad)
        return None if grad_below is None else grad_x.add_(grad_below)


def _scores_in_c(x, shift, raw_log_scale):
    """Whether :func:`_native.affine_score` can run: float64 on a CPU, feature-major, the C module built.

    One C pass instead of seven torch operations per layer in scoring
    (``benchmarks/RESULTS.md``); each number is computed on its own, so a
    row's result does not depend on the rows scored with it.
    """
    if x.dtype != torch.float64 or not _native.available(x):
        return False
    n_rows = x.shape[0]
    # the blocks as MADE._forward_inference returns them: transposed views of
    # one contiguous (2 n_features, n_rows) product
    return (
        x.stride(0) == 1
        and shift.stride() == raw_log_scale.stride() == (1, n_rows)
        and shift.dtype == raw_log_scale.dtype == torch.float64
    )


class BatchNorm(nn.Module):
    """The paper's batch normalisation as a bijection with a log-determinant.

    ``y = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta``. In training mode
    ``m`` and ``v`` are the (optionally weighted) statistics of the batch and
    running averages are updated; in eval mode the stored statistics are used.
    :meth:`set_statistics` replaces the stored statistics with those of a whole
    data set, which is how a fitted flow gets training-split statistics.
    """

    def __init__(self, n_features, momentum=0.05, eps=1e-5, dtype=None):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(n_features, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(n_features, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(n_features, dtype=dtype))
        self.register_buffer("running_var", torch.ones(n_features, dtype=dtype))

    @staticmethod
    def weighted_moments(x, weight=None):
        """Mean and (biased) variance over rows, weighted when ``weight`` is given."""
        if weight is None:
            var, mean = torch.var_mean(x, dim=0, correction=0)  # one pass, not two
            return mean, var
        w = (weight / weight.sum()).unsqueeze(-1)
        mean = (w * x).sum(dim=0)
        return mean, (w * (x - mean) ** 2).sum(dim=0)

    def _statistics(self, x, weight):
        if not self.training:
            return self.running_mean, self.running_var
        mean, var = self.weighted_moments(x, weight)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        return mean, var

    def set_statistics(self, mean, var):
        with torch.no_grad():
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)

    def _log_scale(self, var_eps):
        """Log of the per-feature scale ``exp(log_gamma) / sqrt(var + eps)``, given ``var + eps``."""
        return torch.add(self.log_gamma, torch.log(var_eps), alpha=-0.5)

    def normalize(self, x, weight=None):
        """The map and the pieces its gradient reuses: ``(y, log_scale, x - mean, var + eps, scale)``.

        The log of the per-feature scale serves both the map and its log-det:
        fewer tensor operations per training step than computing them apart.
        """
        mean, var = self._statistics(x, weight)
        centred = x - mean
        var_eps = var + self.eps
        log_scale = self._log_scale(var_eps)
        scale = torch.exp(log_scale)
        return torch.addcmul(self.beta, centred, scale), log_scale, centred, var_eps, scale

    def forward(self, x, context=None, weight=None):
        y, log_scale, *_ = self.normalize(x, weight)
        return y, log_scale.sum().expand(x.shape[0])

    def inverse(self, y, context=None):
        mean, var = self.running_mean, self.running_var
        x = (y - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps) + mean
        return x, -self._log_scale(var + self.eps).sum().expand(y.shape[0])

    # ------------------------------------------------ hand-written training pass

    def backprop_state(self, setup):
        # the parameters and running averages change in place (Adam, lerp_): references stay valid
        return SimpleNamespace(
            native=setup.native, grad_log_gamma=self.log_gamma.grad, grad_beta=self.beta.grad, one=setup.constant(1.0),
            tensors=(self.log_gamma, self.beta, self.running_mean, self.running_var),
        )  # fmt: skip

    def forward_cached(self, state, x, batch, log_det):
        """Batch norm with (weighted) batch statistics, the running ones updated; adds the log-det."""
        if state.native:  # rows: y and x - mean; features: var + eps and the scale
            rows, features = _native.batch_norm_forward(
                x, batch.share, *state.tensors, self.momentum, self.eps, log_det
            )
            return rows[0], (rows, features)
        y, log_scale, centred, var_eps, scale = self.normalize(x, batch.weight)
        log_det.add_(log_scale.sum())
        return y, (centred, var_eps, scale)

    def backward(self, state, cache, grad_y, batch, need_input_grad=True):
        """Gradients of batch norm with batch statistics; d loss / d input.

        With each row's share ``p_i`` of the moments (``1 / n``, or its
        normalised weight): ``mean = sum p_i x_i`` and
        ``var = sum p_i (x_i - mean)^2``, so ``d loss / d x_i =
        s (grad_y_i - p_i sum_k grad_y_k) + 2 p_i (x_i - mean) d loss / d var``.
        """
        share = batch.share
        if state.native:
            rows, features = cache
            return _native.batch_norm_backward(
                rows, features, grad_y, share, state.grad_log_gamma, state.grad_beta, need_input_grad
            )
        centred, var_eps, scale = cache
        # y = beta + (x - mean) s, log s = log_gamma - log(var + eps) / 2, log-det = sum(log s)
        grad_log_scale = state.grad_log_gamma
        torch.sum(grad_y * centred, dim=0, out=grad_log_scale).mul_(scale).sub_(state.one)
        grad_sum = torch.sum(grad_y, dim=0, out=state.grad_beta)
        if not need_input_grad:
            return None
        grad_var = grad_log_scale / var_eps  # -2 d loss / d var
        grad_x = torch.sub(grad_y, share * grad_sum).mul_(scale)
        return grad_x.addcmul_(share * centred, grad_var, value=-1.0)


# The smallest bin width, height and knot derivative of a spline (as fractions
# of the interval and as a slope): keeps every bin invertible and its
# log-derivative finite.
_MIN_BIN = 1e-3
_MIN_DERIVATIVE = 1e-3
# softplus(_DERIVATIVE_START) + _MIN_DERIVATIVE = 1: the raw derivatives start
# near zero (the MADE's small output weights), so every knot's slope starts at 1
# and, with equal bins, every spline layer starts at the identity.
_DERIVATIVE_START = math.log(math.expm1(1 - _MIN_DERIVATIVE))


class SplineMADE(nn.Module):
    """One autoregressive rational-quadratic spline layer (Durkan et al., "Neural Spline Flows", 2019).

    ``u_i = g(x_i; theta_i)``, where ``g`` is a monotone rational-quadratic
    spline of ``n_bins`` bins on ``[-tail_bound, tail_bound]`` and the identity
    outside (its slope 1 at both ends, so it is continuously differentiable),
    and ``theta_i`` (bin widths, heights and inner knot slopes) comes from a
    :class:`MADE` of the features before ``x_i``, as the shift and log-scale
    of :class:`AffineMADE` do. Sampling inverts each bin analytically (a
    quadratic's root), feature by feature through :meth:`MADE.solve`. The
    layer starts as the identity. It has no hand-written backward pass: a
    training step differentiates it through autograd (:mod:`.backprop`).

    Parameters
    ----------
    degrees : torch.LongTensor of shape (n_features,)
        Degrees of the inputs (the variable order of this layer).
    n_bins : int, default=8
        Bins of each spline.
    tail_bound : float, default=3.0
        The spline acts on ``[-tail_bound, tail_bound]`` (standardised units).
    log_scale_bound : float, optional
        Unused; accepted so that every transform takes the flow's arguments.
    **made_params
        Passed to :class:`MADE`.
    """

    def __init__(self, degrees, *, n_bins=8, tail_bound=3.0, log_scale_bound=None, **made_params):
        super().__init__()
        self.n_bins = n_bins
        self.tail_bound = float(tail_bound)
        self.made = MADE(degrees, n_params=3 * n_bins - 1, **made_params)
        self.register_buffer("order", torch.argsort(degrees))

    def _knots(self, params):
        """Knot positions and slopes from the MADE's output blocks: each (..., n_bins + 1)."""
        raw = torch.stack(params, dim=-1)
        k, bound = self.n_bins, self.tail_bound
        # the raw widths and heights are divided by sqrt(units) as Durkan et al. do, so
        # that their softmax does not saturate as the hidden layers widen
        norm = math.sqrt(self.made.layers[-1].weight.shape[1])
        widths, heights, slopes = raw[..., :k] / norm, raw[..., k : 2 * k] / norm, raw[..., 2 * k :]

        def positions(unnormalised):
            fractions = _MIN_BIN + (1 - _MIN_BIN * k) * torch.softmax(unnormalised, dim=-1)
            cumulative = torch.nn.functional.pad(torch.cumsum(fractions, dim=-1), (1, 0))
            knots = 2 * bound * cumulative - bound
            # the ends exactly at the bounds, whatever the round-off of the sums
            return torch.cat([torch.full_like(knots[..., :1], -bound), knots[..., 1:-1],
                              torch.full_like(knots[..., :1], bound)], dim=-1)  # fmt: skip

        inner = _MIN_DERIVATIVE + torch.nn.functional.softplus(slopes + _DERIVATIVE_START)
        ones = torch.ones_like(raw[..., :1])
        return positions(widths), positions(heights), torch.cat([ones, inner, ones], dim=-1)

    def _spline(self, x, params, inverse=False):
        """``(y, log|dy/dx| per number)`` of the spline (or its inverse) at ``x``, identity outside the bounds.

        ``log|dy/dx|`` is that of the map applied: for the inverse, minus the
        forward's at the result.
        """
        xs, ys, slopes = self._knots(params)
        bound = self.tail_bound
        inside = (x > -bound) & (x < bound)
        z = x.clamp(-bound, bound)
        # the bin of each number, among the knots of its own spline
        knots = ys if inverse else xs
        inner_knots = knots[..., 1:-1].contiguous()
        index = torch.searchsorted(inner_knots, z.unsqueeze(-1).contiguous()).clamp(max=self.n_bins - 1)

        def take(values, shift=0):
            return torch.gather(values, -1, index + shift).squeeze(-1)

        x_k, width = take(xs), take(xs, 1) - take(xs)
        y_k, height = take(ys), take(ys, 1) - take(ys)
        d_k, d_k1 = take(slopes), take(slopes, 1)
        delta = height / width
        if inverse:
            offset = z - y_k
            curvature = d_k1 + d_k - 2 * delta
            a = height * (delta - d_k) + offset * curvature
            b = height * d_k - offset * curvature
            c = -delta * offset
            # the root in [0, 1], in the form that does not cancel
            theta = (2 * c) / (-b - torch.sqrt((b * b - 4 * a * c).clamp(min=0)))
        else:
            theta = (z - x_k) / width
        one_minus = 1 - theta
        mixed = theta * one_minus
        denominator = delta + (d_k1 + d_k - 2 * delta) * mixed
        if inverse:
            y = theta * width + x_k
        else:
            y = y_k + height * (delta * theta * theta + d_k * mixed) / denominator
        log_derivative = (
            2 * torch.log(delta)
            + torch.log(d_k1 * theta * theta + 2 * delta * mixed + d_k * one_minus * one_minus)
            - 2 * torch.log(denominator)
        )
        if inverse:
            log_derivative = -log_derivative
        return torch.where(inside, y, x), torch.where(inside, log_derivative, torch.zeros_like(x))

    def forward(self, x, context=None, weight=None):
        u, log_derivative = self._spline(x, self.made(x, context))
        return u, log_derivative.sum(dim=-1)

    def inverse(self, u, context=None):
        """Invert feature by feature, each bin's quadratic solved for its root."""

        def step(features, params):
            return self._spline(u[:, features], params, inverse=True)[0]

        x, params = self.made.solve(step, u.shape[0], context, like=u)
        return x, -self._spline(x, params)[1].sum(dim=-1)
