"""The fixed first layers of a flow: bounds, standardisation, whitening, all in float64.

Fitted once on the training rows and never trained, they are exact maps with
exact log-determinants. They run in float64 whatever the dtype of the learned
layers after them (``module.to(torch.float32)`` moves them between devices,
never to another dtype): a feature whose offset is large against its spread
(a timestamp, GPS degrees at metre scale) would lose its variation if it were
rounded to float32 before it is standardised, and values beyond float32's
range would become infinite. Their output is cast to the learned layers'
dtype by :class:`~.flow.MAF`.
"""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Bounded", "Standardize", "Whiten"]


class _Float64(nn.Module):
    """A parameter-free layer whose buffers stay float64 when the module changes dtype."""

    #: the flow runs the leading layers that say so before its learned ones, in float64
    fixed = True

    def _apply(self, fn, recurse=True):
        # Module.to / .float() / .half() convert every floating buffer through
        # fn; here only its device is taken (from an empty float64 probe)
        probe = next(self.buffers(), None)
        if probe is None:
            return self
        device = fn(torch.empty(0, dtype=torch.float64, device=probe.device)).device
        return super()._apply(lambda tensor: tensor.to(device), recurse)


def _feature_major(x):
    """``x`` with the same values, laid out column by column (a transposed contiguous tensor)."""
    return x.t().contiguous().t()


class Bounded(_Float64):
    """Per feature: logit on ``(low, high)``, log on a half-line, identity if unbounded.

    ``low`` and ``high`` hold ``-inf`` / ``+inf`` for an open side. With both
    finite, ``y = logit((x - low) / (high - low))``; with only ``low``,
    ``y = log(x - low)``; with only ``high``, ``y = -log(high - x)``. Inputs
    outside the bounds give NaN, which the estimator reports as a log-density
    of ``-inf`` (no mass there).
    """

    def __init__(self, low, high):
        super().__init__()
        low, high = low.to(torch.float64), high.to(torch.float64)
        self.register_buffer("low", low.clone())
        self.register_buffer("high", high.clone())
        finite_low, finite_high = torch.isfinite(low), torch.isfinite(high)
        self.register_buffer("both", finite_low & finite_high)
        self.register_buffer("only_low", finite_low & ~finite_high)
        self.register_buffer("only_high", ~finite_low & finite_high)
        # finite stand-ins, so that unused branches never produce inf * 0
        self.register_buffer("low0", torch.where(finite_low, low, torch.zeros_like(low)))
        self.register_buffer("width", torch.where(self.both, high - low, torch.ones_like(low)))
        self.register_buffer("high0", torch.where(finite_high, high, torch.zeros_like(high)))

    def forward(self, x, context=None, weight=None):
        z = (x - self.low0) / self.width
        log_z = torch.log(torch.where(self.both | self.only_low, z, torch.ones_like(z)))
        log_1mz = torch.log(torch.where(self.both, 1 - z, torch.ones_like(z)))
        log_gap = torch.log(torch.where(self.only_high, self.high0 - x, torch.ones_like(x)))
        y = torch.where(self.both, log_z - log_1mz, x)
        y = torch.where(self.only_low, log_z, y)
        y = torch.where(self.only_high, -log_gap, y)
        # d logit(z)/dx = 1 / (width z (1 - z)); d log(x - low)/dx = 1 / (x - low)
        logabsdet = -(torch.log(self.width) * self.both + log_z * (self.both | self.only_low))
        logabsdet = logabsdet - log_1mz - log_gap
        return y, logabsdet.sum(dim=-1)

    def inverse(self, y, context=None):
        from_logit = self.low0 + self.width * torch.sigmoid(y)
        x = torch.where(self.both, from_logit, y)
        x = torch.where(self.only_low, self.low0 + torch.exp(y), x)
        x = torch.where(self.only_high, self.high0 - torch.exp(-y), x)
        # log|dx/dy|: width sigmoid(y) sigmoid(-y), exp(y), exp(-y)
        both = torch.log(self.width) + F.logsigmoid(y) + F.logsigmoid(-y)
        logabsdet = torch.where(self.both, both, torch.zeros_like(y))
        logabsdet = torch.where(self.only_low, y, logabsdet)
        logabsdet = torch.where(self.only_high, -y, logabsdet)
        return x, logabsdet.sum(dim=-1)


class Standardize(_Float64):
    """Fixed per-feature affine map ``(x - loc) / scale``, with its log-det.

    The first layer of every flow: fitted once on the training data so that
    raw features on any scale reach the learned layers standardised, while
    log-densities stay in the units of the data.
    """

    def __init__(self, loc, scale):
        super().__init__()
        self.register_buffer("loc", loc.to(torch.float64).clone())
        self.register_buffer("scale", scale.to(torch.float64).clone())

    def _logabsdet(self, x):
        return (-torch.log(self.scale).sum()).expand(x.shape[0])

    def forward(self, x, context=None, weight=None):
        return (x - self.loc) / self.scale, self._logabsdet(x)

    def inverse(self, u, context=None):
        return u * self.scale + self.loc, -self._logabsdet(u)


class Whiten(_Float64):
    """Fixed affine map ``L^-1 (x - loc)``, ``L`` lower triangular, with its log-det.

    ``L`` is the Cholesky factor of a scatter matrix ``L L^T``: the map takes
    rows of location ``loc`` and that scatter to location 0 and scatter I. It
    is itself autoregressive (output ``i`` reads inputs ``1..i``), so the
    flow stays a MAF. Without autograd, rows in the feature-major layout
    (see :meth:`MAF.forward`) come out feature-major, as the next layer
    reads them fastest.

    Parameters
    ----------
    loc : torch.Tensor of shape (n_features,)
    chol : torch.Tensor of shape (n_features, n_features)
        Lower triangular with a positive diagonal.
    """

    def __init__(self, loc, chol):
        super().__init__()
        self.register_buffer("loc", loc.to(torch.float64).clone())
        self.register_buffer("chol", torch.tril(chol.to(torch.float64)))

    def _logabsdet(self, x):
        # from the factor itself, which may have been rounded (a model pickled from a float32 fit)
        return (-torch.log(torch.diagonal(self.chol)).sum()).expand(x.shape[0])

    def forward(self, x, context=None, weight=None):
        # a triangular solve rather than a product with a stored inverse: exactly
        # the inverse of ``inverse``'s product, whatever the factor's rounding
        u = torch.linalg.solve_triangular(self.chol.t(), x - self.loc, upper=True, left=False)
        # rows out as they came in: feature-major (scoring) or contiguous (training)
        u = _feature_major(u) if x.stride(0) == 1 else u.contiguous()
        return u, self._logabsdet(x)

    def inverse(self, u, context=None):
        return u @ self.chol.t() + self.loc, -self._logabsdet(u)
