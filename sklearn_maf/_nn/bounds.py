"""A fixed map from bounded features to the whole real line, with its log-det."""

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Bounded"]


class Bounded(nn.Module):
    """Per feature: logit on ``(low, high)``, log on a half-line, identity if unbounded.

    ``low`` and ``high`` hold ``-inf`` / ``+inf`` for an open side. With both
    finite, ``y = logit((x - low) / (high - low))``; with only ``low``,
    ``y = log(x - low)``; with only ``high``, ``y = -log(high - x)``. Inputs
    outside the bounds give NaN, which the estimator reports as a log-density
    of ``-inf`` (no mass there).
    """

    def __init__(self, low, high):
        super().__init__()
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
