"""Base distributions under the flow: a standard normal, the paper's MADE MoG,
independent Student t's with learned degrees of freedom, or a multivariate
(elliptical) Student t.

Each has ``log_prob(u, context)`` for points ``u`` in the space where the last
MAF layer ends, and draws from uniform noise: ``from_uniform(noise, context)``
maps ``n_noise`` uniforms per row to a draw, so a sample is a deterministic
function of its noise (``sample`` draws the noise from a generator; quasi-Monte
Carlo averages pass fixed points instead). Where the hand-written gradient of
a training step is kept, a base also has ``backprop_state`` and
``loss_and_grad`` (the protocol is described in :mod:`.backprop`); a base
without them is trained through autograd.
"""

import math
from types import SimpleNamespace

import numpy as np
import torch
from scipy import special
from torch import nn
from torch.nn import functional as F

from . import _native
from .made import MADE

__all__ = ["EllipticalT", "MADEMoG", "StandardNormal", "StudentT", "mean_over_rows"]

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


def mean_over_rows(rows, share):
    """``sum_r share_r rows_r``: the (weighted) mean of per-row values, given each row's share.

    ``share`` is ``1 / n`` as a 0-d tensor, or a column of the rows' normalised
    weights (see :class:`~.backprop.Batch`).
    """
    if share.dim() == 0:
        return rows.sum().mul_(share)
    return rows.mul(share.squeeze(1)).sum()


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

    def backprop_state(self, setup):
        return SimpleNamespace(
            native=setup.native, half=setup.constant(0.5), normaliser=setup.constant(0.5 * self.n_features * _LOG_2PI)
        )

    def loss_and_grad(self, state, u, log_det, batch):
        """``(mean of -log p(u) - log_det, d loss / d u)``: ``|u|^2 / 2`` plus the normaliser."""
        if state.native:
            loss, grad = _native.gaussian_loss(u, log_det, batch.share)
        else:
            minus_log_prob = u.mul(u).sum(dim=-1).mul_(state.half).sub_(log_det)
            loss, grad = mean_over_rows(minus_log_prob, batch.share), u * batch.share
        return loss.add_(state.normaliser), grad


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
        return self._mixture_of(self.made(u, context))[:3]

    def _mixture_of(self, out, features=slice(None)):
        """``(log-weights, means, log-scales, tanh)``, each (n, n_features, K), given the MADE's output.

        ``out`` is a tuple of its output blocks (for all or some ``features``),
        or its output product (n, 3 K n_features), blocks side by side (the
        hand-written training pass). ``tanh`` is that of the raw log-scales
        over the bound, whose derivative the backward pass reuses.
        """
        if isinstance(out, torch.Tensor):
            raw = out.view(out.shape[0], 3 * self.n_components, -1).transpose(1, 2)
        else:
            raw = torch.stack(out, dim=-1)
        # (n, n_features, 3K): what the MADE computes plus the input-independent part
        raw = raw + _OFFSET_GAIN * self.offset[:, features].t()
        logits, means, raw_log_scales = raw.split(self.n_components, dim=-1)
        tanh = torch.tanh(raw_log_scales / self.log_scale_bound)
        return F.log_softmax(logits, dim=-1), means, self.log_scale_bound * tanh, tanh

    @staticmethod
    def _log_conditionals(u, mixture):
        """``(log p(u_i | u_<i) + log(2 pi) / 2, (1 / scales, z, joint))`` per row and feature.

        ``joint`` is each component's log-weight plus its log-density, less
        the constant; the responsibilities are ``exp(joint - logsumexp(joint))``.
        """
        log_weights, means, log_scales, _ = mixture
        inverse_scales = torch.exp(-log_scales)
        z = (u.unsqueeze(-1) - means).mul_(inverse_scales)
        joint = log_weights - 0.5 * z * z - log_scales
        return torch.logsumexp(joint, dim=-1), (inverse_scales, z, joint)

    def log_prob(self, u, context=None):
        log_p, _ = self._log_conditionals(u, self._mixture_of(self.made(u, context)))
        return log_p.sum(dim=-1) - 0.5 * self.n_features * _LOG_2PI

    def backprop_state(self, setup):
        return SimpleNamespace(
            made=self.made.backprop_state(setup),
            grad_offset=self.offset.grad,
            normaliser=setup.constant(0.5 * self.n_features * _LOG_2PI),
        )

    def loss_and_grad(self, state, u, log_det, batch):
        """``(mean of -log p(u) - log_det, d loss / d u)``; writes the gradients of the MADE and the offset.

        With the responsibilities ``r``, the derivatives of ``-log p_i`` are
        ``softmax(logits) - r`` in the logits, ``-r z exp(-a)`` in the means,
        ``-r (z^2 - 1) (1 - tanh^2)`` in the raw log-scales, and ``sum_k r z
        exp(-a)`` in ``u_i`` directly; ``u`` also feeds the MADE, whose backward
        pass adds the rest.
        """
        share = batch.share
        out, made_cache = self.made.forward_cached(state.made, u, batch.context)
        mixture = self._mixture_of(out)
        log_p, (inverse_scales, z, joint) = self._log_conditionals(u, mixture)
        loss = mean_over_rows(log_p.sum(dim=-1).neg_().sub_(log_det), share).add_(state.normaliser)
        log_weights, _, _, tanh = mixture
        n_rows = u.shape[0]
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
        torch.mul(grad_raw.sum(dim=0).t(), _OFFSET_GAIN, out=state.grad_offset)
        grad_out = grad_raw.transpose(1, 2).reshape(n_rows, -1)  # back to the MADE's output layout
        grad_u = r_z_over_scale.sum(dim=-1).mul_(share)
        return loss, grad_u.add_(self.made.backward(state.made, made_cache, grad_out))

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
            log_weights, means, log_scales, _ = self._mixture_of(params, features)
            cumulative = torch.cumsum(torch.exp(log_weights), dim=-1)
            choice = (uniform[:, features].unsqueeze(-1) > cumulative).sum(dim=-1, keepdim=True)
            choice = choice.clamp(max=self.n_components - 1)
            mean = torch.gather(means, -1, choice).squeeze(-1)
            log_scale = torch.gather(log_scales, -1, choice).squeeze(-1)
            return mean + torch.exp(log_scale) * normal[:, features]

        return self.made.solve(step, noise.shape[0], context, like=normal)[0]


class _LearnedDF(_UniformNoiseBase):
    """Student t's with learned degrees of freedom ``df = 1 + exp(_DF_RATE raw_df)``, each above 1.

    One log-density for both t bases: ``k`` t's, each of dimension ``m``, on
    ``q = s / df`` where ``s`` is ``u_i^2`` per feature (:class:`StudentT`,
    ``m = 1``) or ``|u|^2`` per row (:class:`EllipticalT`, ``m = D``)::

        -log p(u) = sum_k h log(1 + q) - N(df),  h = (df + m) / 2,
        N(df) = lgamma(h) - lgamma(df / 2) - m log(pi df) / 2.

    Its derivative in ``u`` is ``2 h u / (df (1 + q))``; in ``df``, ``log(1 +
    q) / 2 - h q / (df (1 + q)) - N'(df)`` with ``N'(df) = (digamma(h) -
    digamma(df / 2) - m / df) / 2``. ``N`` and ``N'`` are computed in float64
    whatever the dtype: at large df ``N`` is the small difference of two large
    lgammas (about 5e5 each at df = 1e5); float32 gets it wrong by 1e-4 nats
    per feature at df = 1e3 and by 3e-3 to 4e-3 from df = 1e4 on, and its
    gradient (a difference of digammas) is mostly round-off there.

    The degrees of freedom are a parameter named ``raw_df``, not ``weight``, so
    the L2 penalty on the weight matrices leaves them alone.
    """

    def _init_df(self, size, df, dtype):
        self.raw_df = nn.Parameter(torch.full((size,), _raw_df(df), dtype=dtype))

    @property
    def df(self):
        """Degrees of freedom, the shape of ``raw_df``."""
        return 1 + torch.exp(_DF_RATE * self.raw_df)

    def _df_numpy(self):
        return self.df.detach().cpu().numpy().astype(np.float64)

    def _squares(self, u):
        """``s``: (n, k) squared values, one column per t."""
        raise NotImplementedError

    def _normaliser(self, df64):
        """``N(df)`` per t, in float64."""
        m = self._t_dimension
        return torch.lgamma(0.5 * (df64 + m)) - torch.lgamma(0.5 * df64) - 0.5 * m * torch.log(math.pi * df64)

    def log_prob(self, u, context=None):
        df = self.df
        h = 0.5 * (df + self._t_dimension)
        q = self._squares(u) / df
        return self._normaliser(df.double()).sum().to(u.dtype) - (h * torch.log1p(q)).sum(dim=-1)

    def backprop_state(self, setup):
        return SimpleNamespace(
            grad_raw_df=self.raw_df.grad, half=setup.constant(0.5), half_m=setup.constant(0.5 * self._t_dimension)
        )

    def loss_and_grad(self, state, u, log_det, batch):
        """``(mean of -log p(u) - log_det, d loss / d u)``; writes the gradient of ``raw_df``."""
        df = self.df
        df64 = df.double()
        share = batch.share
        h = torch.add(state.half_m, df, alpha=0.5)
        q = self._squares(u).div_(df)
        log1p_q = torch.log1p(q)
        rows = torch.mv(log1p_q, h).sub_(self._normaliser(df64).sum().to(u.dtype))
        loss = mean_over_rows(rows.sub_(log_det), share)
        inverse = q.add(1).mul_(df).reciprocal_()  # 1 / (df (1 + q))
        grad_u = u * inverse.mul(2 * h).mul_(share)
        m = self._t_dimension
        norm_derivative = 0.5 * (torch.digamma(0.5 * (df64 + m)) - torch.digamma(0.5 * df64) - m / df64)
        per_row = torch.addcmul(log1p_q.mul_(state.half), h * q, inverse, value=-1.0).mul_(share)
        grad_df = per_row.sum(dim=0).sub_(norm_derivative.to(df.dtype))
        torch.mul(grad_df, (df - 1).mul_(_DF_RATE), out=state.grad_raw_df)
        return loss, grad_u


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

    _t_dimension = 1

    def _squares(self, u):
        return u.mul(u)

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

    @property
    def _t_dimension(self):
        return self.n_features

    def _squares(self, u):
        return u.mul(u).sum(dim=-1, keepdim=True)

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
