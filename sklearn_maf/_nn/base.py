"""Base densities under the flow: a standard normal, the paper's MADE MoG,
independent Student t's with learned degrees of freedom, or a multivariate
(elliptical) Student t.

Each has ``log_prob(u, context)`` for points ``u`` in the space where the last
MAF layer ends, and draws from uniform noise: ``from_uniform(noise, context)``
maps ``n_noise`` uniforms per row to a draw, so a sample is a deterministic
function of its noise (``sample`` draws the noise from a generator; quasi-Monte
Carlo averages pass fixed points instead).
"""

import math

import numpy as np
import torch
from scipy import special
from torch import nn
from torch.nn import functional as F

from .made import MADE

__all__ = ["EllipticalT", "MADEMoG", "StandardNormal", "StudentT"]

_LOG_2PI = math.log(2 * math.pi)
# Initial component means of the MADE MoG are evenly spaced in (-spread, spread).
_MEAN_SPREAD = 1.5
# Scale of the input-independent part of the MADE MoG's conditionals (see MADEMoG).
_OFFSET_GAIN = 10.0

# StudentT learns log(df - 1) / _DF_RATE. Adam moves every parameter by about
# its learning rate per step, whatever the parameter's scale; on the plain log
# scale, going from df = 30 to df = 2 (a log-distance of 3.4) took thousands of
# steps, more than a fit on a few thousand rows makes before early stopping, so
# the tails stayed nearly Gaussian. Scaled, it takes a few hundred.
_DF_RATE = 10.0


def _open_unit(uniform):
    """Keep uniforms strictly inside (0, 1), where the normal quantile is finite."""
    tiny = torch.finfo(uniform.dtype).eps / 2
    return uniform.clamp(tiny, 1 - tiny)


class _UniformNoiseBase(nn.Module):
    """Shared ``sample``: draw ``n_noise`` uniforms per row, then ``from_uniform``."""

    def sample(self, n_samples, context=None, generator=None, like=None):
        noise = torch.rand(n_samples, self.n_noise, generator=generator, dtype=like.dtype)
        return self.from_uniform(noise.to(like.device), context)


class StandardNormal(_UniformNoiseBase):
    """N(0, I) in ``n_features`` dimensions."""

    def __init__(self, n_features):
        super().__init__()
        self.n_features = n_features
        self.n_noise = n_features

    def log_prob(self, u, context=None):
        return -0.5 * (u.square().sum(dim=-1) + u.shape[-1] * _LOG_2PI)

    def from_uniform(self, noise, context=None):
        return torch.special.ndtri(_open_unit(noise))


class MADEMoG(_UniformNoiseBase):
    """MADE whose every conditional is a mixture of Gaussians (the paper's MADE MoG).

    ``p(u) = prod_i sum_k pi_ik N(u_i; m_ik, exp(a_ik)^2)``, where ``pi``, ``m``
    and ``a`` for feature ``i`` come from a MADE of the features before ``i``,
    plus a learned offset that does not depend on them (with the MADE's
    output bias, all there is to the first feature's mixture). The log-scales ``a`` are soft-clamped to
    ``(-bound, bound)``. The components start with evenly spaced means in
    ``(-1.5, 1.5)``, each as wide as the spacing.

    Parameters
    ----------
    degrees : torch.LongTensor of shape (n_features,)
        Degrees of the inputs (the variable order).
    n_components : int
        Components per conditional.
    log_scale_bound : float, default=5.0
        Bound on the log standard deviation of each component.
    **made_params
        Passed to :class:`MADE`.
    """

    def __init__(self, degrees, n_components, *, log_scale_bound=5.0, **made_params):
        super().__init__()
        self.n_features = degrees.numel()
        self.n_noise = 2 * self.n_features  # a normal and a component choice per feature
        self.n_components = n_components
        self.log_scale_bound = log_scale_bound
        self.made = MADE(degrees, n_params=3 * n_components, **made_params)
        # The mixture starts as K components at evenly spaced means, each as wide
        # as the spacing: together about N(0, 1) (what the standardised data and
        # the near-identity MAF layers deliver at first), yet each narrow enough to
        # settle on one mode. Components of unit width would have to shrink ~7x
        # before they could tell apart modes as narrow as those of a ring of
        # Gaussians (std ~0.14 after standardisation), which takes Adam hundreds
        # of epochs on a few thousand rows.
        if n_components > 1:
            means = torch.linspace(-_MEAN_SPREAD, _MEAN_SPREAD, n_components)
            log_scale = math.log(2 * _MEAN_SPREAD / (n_components - 1))
        else:
            means, log_scale = torch.zeros(1), 0.0
        start = torch.zeros(3 * n_components, self.n_features, dtype=self.made.layers[-1].bias.dtype)
        start[n_components : 2 * n_components] = means.to(start.dtype)[:, None]
        start[2 * n_components :] = log_scale
        # The part of each conditional that does not depend on the inputs,
        # stored divided by _OFFSET_GAIN. The first feature in the order has
        # nothing to condition on: its mixture is this offset (plus the output
        # bias of the MADE) alone, and Adam moves a parameter by about the
        # learning rate per step whatever its gradient, so unscaled it would
        # need thousands of steps to reach modes narrower than its start. The
        # gain makes it move as fast as the conditional parts, which many
        # hidden units drive at once.
        self.offset = nn.Parameter(start / _OFFSET_GAIN)

    def _mixture(self, u, context):
        """Component log-weights, means and log-scales, each (n, n_features, K)."""
        return self._mixture_of(self.made(u, context))

    def _mixture_of(self, blocks, features=slice(None)):
        """The mixture given the MADE's output blocks, for all or some ``features``."""
        # (n, n_features, 3K): what the MADE computes plus the input-independent part
        raw = torch.stack(blocks, dim=-1) + _OFFSET_GAIN * self.offset[:, features].t()
        logits, means, raw_log_scales = raw.split(self.n_components, dim=-1)
        log_scales = self.log_scale_bound * torch.tanh(raw_log_scales / self.log_scale_bound)
        return F.log_softmax(logits, dim=-1), means, log_scales

    def log_prob(self, u, context=None):
        log_weights, means, log_scales = self._mixture(u, context)
        z = (u.unsqueeze(-1) - means) * torch.exp(-log_scales)
        component = -0.5 * (z.square() + _LOG_2PI) - log_scales
        return torch.logsumexp(log_weights + component, dim=-1).sum(dim=-1)

    def from_uniform(self, noise, context=None):
        """Draw feature by feature: the first half of ``noise`` gives the standard
        normals, the second half the component choices.

        :meth:`MADE.solve` computes every hidden unit once, as soon as the
        features it depends on are drawn, rather than running the whole MADE
        once per feature.
        """
        normal = torch.special.ndtri(_open_unit(noise[:, : self.n_features]))
        uniform = noise[:, self.n_features :]

        def step(features, params):
            log_weights, means, log_scales = self._mixture_of(params, features)
            cumulative = torch.cumsum(torch.exp(log_weights), dim=-1)
            choice = (uniform[:, features].unsqueeze(-1) > cumulative).sum(dim=-1, keepdim=True)
            choice = choice.clamp(max=self.n_components - 1)
            mean = torch.gather(means, -1, choice).squeeze(-1)
            log_scale = torch.gather(log_scales, -1, choice).squeeze(-1)
            return mean + torch.exp(log_scale) * normal[:, features]

        return self.made.solve(step, noise.shape[0], context, like=normal)[0]


class _LearnedDF(_UniformNoiseBase):
    """A base with learned degrees of freedom ``df = 1 + exp(_DF_RATE raw_df)``, each above 1.

    They are a parameter named ``raw_df``, not ``weight``, so the L2 penalty
    on the weight matrices leaves them alone.
    """

    def _init_df(self, size, df, dtype):
        self.raw_df = nn.Parameter(torch.full((size,), _raw_df(df), dtype=dtype))

    @property
    def df(self):
        """Degrees of freedom, the shape of ``raw_df``."""
        return 1 + torch.exp(_DF_RATE * self.raw_df)

    def _df_numpy(self):
        return self.df.detach().cpu().numpy().astype(np.float64)


def _raw_df(df):
    """``raw_df`` for the degrees of freedom ``df`` (above 1)."""
    return math.log(df - 1) / _DF_RATE


class StudentT(_LearnedDF):
    """Independent 1-D Student t's, one learned degrees of freedom per feature.

    ``p(u) = prod_i t(u_i; df_i)`` with ``df_i = 1 + exp(10 * raw_df_i)``, so
    every ``df_i > 1`` and the mean exists (the conditional mean that
    :class:`~sklearn_maf.MAFConditionalDensity` predicts stays finite). Under
    affine MAF layers, whose log-scales are bounded, a standard-normal base
    gives log-densities that fall like ``-|x|^2`` far out: rows beyond the
    training range then cost hundreds or thousands of nats. A t base falls like
    ``-(df + 1) log|x|`` and lets the data choose how heavy the tails are; at
    large ``df`` it is the standard normal.

    Parameters
    ----------
    n_features : int
        Dimension.
    df_init : float, default=30.0
        Initial degrees of freedom of every feature: close to a normal, so a
        flow starts as it would with a Gaussian base and the tails grow only
        where the data ask for them.
    dtype : torch.dtype, optional
        Dtype of ``raw_df``.
    """

    def __init__(self, n_features, *, df_init=30.0, dtype=None):
        super().__init__()
        self.n_features = n_features
        self.n_noise = n_features
        self._init_df(n_features, df_init, dtype)  # one per feature

    def log_prob(self, u, context=None):
        df = self.df
        half = 0.5 * (df + 1)
        # The normaliser in float64 whatever the dtype: at large df it is the
        # small difference of two large lgammas (about 5e5 each at df = 1e5).
        # float32 gets it wrong by 1e-4 nats per feature at df = 1e3 and by
        # 3e-3 to 4e-3 from df = 1e4 on, as much as the benchmarks resolve,
        # and its gradient (a difference of digammas) is mostly round-off there.
        df64 = df.double()
        norm = torch.lgamma(0.5 * (df64 + 1)) - torch.lgamma(0.5 * df64) - 0.5 * torch.log(math.pi * df64)
        return (norm.to(u.dtype) - half * torch.log1p(u.square() / df)).sum(dim=-1)

    def from_uniform(self, noise, context=None):
        """The t quantile of each uniform.

        torch has no Student-t quantile (nor an incomplete beta function to
        invert), so scipy's ``stdtrit`` computes it in float64 on the CPU.
        Nothing is lost by that: sampling needs no gradient, and its cost is
        small next to the feature-by-feature inversion of the MAF layers.
        """
        p = _open_unit(noise).detach().cpu().numpy().astype(np.float64)
        u = special.stdtrit(self._df_numpy(), p)
        return torch.as_tensor(u, dtype=noise.dtype, device=noise.device)

    def normal_scores(self, u):
        """Map t-coordinates to standard normals, ``ndtri(stdtr(df, u))``.

        Computed from the lower tail at ``-|u|`` and given back its sign: far
        out, ``stdtr(df, u)`` itself rounds to 1, whose normal quantile is
        infinite.
        """
        t = u.detach().cpu().numpy().astype(np.float64)
        z = -np.sign(t) * special.ndtri(special.stdtr(self._df_numpy(), -np.abs(t)))
        return torch.as_tensor(z, dtype=u.dtype, device=u.device)

    def from_normal_scores(self, z):
        """The inverse of :meth:`normal_scores`, ``stdtrit(df, ndtr(z))``."""
        s = z.detach().cpu().numpy().astype(np.float64)
        u = -np.sign(s) * special.stdtrit(self._df_numpy(), special.ndtr(-np.abs(s)))
        return torch.as_tensor(u, dtype=z.dtype, device=z.device)


class EllipticalT(_LearnedDF):
    """The standard multivariate Student t: identity scatter, one learned degrees of freedom.

    ``p(u) = c(df) (1 + |u|^2 / df) ** (-(df + D) / 2)`` with ``df = 1 +
    exp(10 * raw_df)`` (as :class:`StudentT`, so ``df > 1``). Unlike
    :class:`StudentT`'s independent t's it is elliptical: its tails are those
    of the radius, the way a multivariate t's are, so that data with such
    tails need no flow layer to bend them. The estimators start ``df`` at
    that of a multivariate t fitted to the training rows (see
    ``set_df``); the starting point, not the learning, is what decides the
    fit: started at 30, ``df`` stays far too large (``benchmarks/RESULTS.md``).

    Parameters
    ----------
    n_features : int
        Dimension.
    df_init : float, default=30.0
        Initial degrees of freedom.
    dtype : torch.dtype, optional
        Dtype of ``raw_df``.
    """

    def __init__(self, n_features, *, df_init=30.0, dtype=None):
        super().__init__()
        self.n_features = n_features
        self.n_noise = n_features + 1  # the normal direction and scale, then the chi-square
        self._init_df(1, df_init, dtype)  # one for all the features

    @torch.no_grad()
    def set_df(self, df):
        """Set the degrees of freedom (above 1)."""
        if not df > 1:
            raise ValueError(f"df must be above 1, got {df}.")
        self.raw_df.fill_(_raw_df(df))

    def log_prob(self, u, context=None):
        d, df = u.shape[-1], self.df
        df64 = df.double()  # the normaliser in float64, as StudentT's
        norm = torch.lgamma(0.5 * (df64 + d)) - torch.lgamma(0.5 * df64) - 0.5 * d * torch.log(math.pi * df64)
        return norm.to(u.dtype) - 0.5 * (df + d) * torch.log1p(u.square().sum(dim=-1) / df)

    def from_uniform(self, noise, context=None):
        """``z sqrt(df / w)``: ``z`` the normal quantiles of the first ``n_features`` uniforms,
        ``w`` the chi-square(df) quantile of the last (scipy's, in float64 on the CPU)."""
        noise = _open_unit(noise)
        z = torch.special.ndtri(noise[:, : self.n_features])
        df = float(self._df_numpy()[0])
        p = noise[:, -1].detach().cpu().numpy().astype(np.float64)
        w = 2 * special.gammainccinv(df / 2, p)
        return z * torch.as_tensor(np.sqrt(df / w), dtype=z.dtype, device=z.device)[:, None]

    def normal_scores(self, u):
        """Map to standard normals by the radius: ``u |z| / |u|``, ``|z|`` the chi quantile of ``|u|``'s probability.

        ``|u|^2 df / (df + |u|^2)`` is Beta(D / 2, df / 2); each tail is
        computed from its own side, so that neither rounds to 1.
        """
        r2 = u.square().sum(dim=-1).detach().cpu().numpy().astype(np.float64)
        d, df = self.n_features, float(self._df_numpy()[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            upper = special.betainc(df / 2, d / 2, df / (df + r2))  # P(|U|^2 > r2)
            lower = special.betainc(d / 2, df / 2, r2 / (df + r2))
            s2 = np.where(upper < 0.5, 2 * special.gammainccinv(d / 2, upper), 2 * special.gammaincinv(d / 2, lower))
            ratio = np.where(r2 > 0, np.sqrt(s2 / r2), 1.0)
        return u * torch.as_tensor(ratio, dtype=u.dtype, device=u.device)[:, None]

    def from_normal_scores(self, z):
        """The inverse of :meth:`normal_scores`."""
        s2 = z.square().sum(dim=-1).detach().cpu().numpy().astype(np.float64)
        d, df = self.n_features, float(self._df_numpy()[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            upper = special.gammaincc(d / 2, s2 / 2)
            lower = special.gammainc(d / 2, s2 / 2)
            y = special.betaincinv(df / 2, d / 2, upper)  # df / (df + r2), from the upper tail
            x = special.betaincinv(d / 2, df / 2, lower)  # r2 / (df + r2)
            r2 = np.where(upper < 0.5, df * (1 - y) / y, df * x / (1 - x))
            ratio = np.where(s2 > 0, np.sqrt(r2 / s2), 1.0)
        return z * torch.as_tensor(ratio, dtype=z.dtype, device=z.device)[:, None]
