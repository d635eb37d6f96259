"""Masked Autoregressive Flow (Papamakarios, Pavlakou & Murray, 2017), in pure torch.

Every transform maps data towards the base density and returns
``(outputs, logabsdet)``, where ``logabsdet`` has shape (n_samples,) and is
``log|det d outputs / d inputs|``; ``inverse`` maps back and returns the
log-determinant of that inverse map. A flow is the composition of its
transforms, so its log-density is the base log-density of the last output plus
the sum of the log-determinants.
"""

import math

import torch
from torch import nn

from . import _native
from .base import EllipticalT, MADEMoG, StandardNormal, StudentT
from .bounds import Bounded
from .made import MADE, input_degrees, reused_buffers

__all__ = ["MAF", "AffineMADE", "BatchNorm", "Standardize", "Whiten", "power_tails", "soft_clamp"]


def soft_clamp(x, bound):
    """Smoothly bound ``x`` to ``(-bound, bound)``; the identity near zero."""
    return bound * torch.tanh(x / bound)


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


class Standardize(nn.Module):
    """Fixed per-feature affine map ``(x - loc) / scale``, with its log-det.

    The first layer of every flow: fitted once on the training data so that
    raw features on any scale reach the learned layers standardised, while
    log-densities stay in the units of the data.
    """

    def __init__(self, loc, scale):
        super().__init__()
        self.register_buffer("loc", loc.clone())
        self.register_buffer("scale", scale.clone())

    def _logabsdet(self, x):
        return (-torch.log(self.scale).sum()).expand(x.shape[0])

    def forward(self, x, context=None, weight=None):
        return (x - self.loc) / self.scale, self._logabsdet(x)

    def inverse(self, u, context=None):
        return u * self.scale + self.loc, -self._logabsdet(u)


class Whiten(nn.Module):
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
        self.register_buffer("loc", loc.clone())
        self.register_buffer("chol", torch.tril(chol))

    def _logabsdet(self, x):
        # from the factor itself, which may have been rounded (a float32 fit)
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


class AffineMADE(nn.Module):
    """One MAF layer: ``u_i = (x_i - mu_i) * exp(-alpha_i)``.

    ``mu`` and ``alpha`` come from a :class:`MADE` of ``x`` in the order given
    by ``degrees``. The log-scale is ``alpha = soft_clamp(raw, log_scale_bound)``
    of the MADE's raw output in both directions (:meth:`forward` computes
    ``-alpha = soft_clamp(-raw)``, the same function), so density and sampling
    always describe the same model.

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
        # -alpha = soft_clamp(-raw) = bound tanh(raw / -bound), computed as
        # 2 bound sigmoid(-2 raw / bound) - bound, as backprop's training step
        # does: the same function, and in float64 a sigmoid costs less than half
        # a tanh (56 against 140 us on 21,000 numbers). The sign sits inside, so
        # that neither exp(-alpha) nor the log-det needs a negation.
        bound = self.log_scale_bound
        minus_log_scale = torch.sigmoid(raw_log_scale * (-2.0 / bound)).mul(2.0 * bound).sub_(bound)
        return (x - shift).mul_(torch.exp(minus_log_scale)), minus_log_scale.sum(dim=-1)

    def inverse(self, u, context=None):
        """Invert feature by feature, ``x_i = u_i * exp(alpha_i) + mu_i``.

        :meth:`MADE.solve` computes every hidden unit of the MADE once, as soon
        as the features it depends on are known, rather than running the whole
        network once per feature: about one forward pass of arithmetic instead
        of ``n_features``.
        """
        bound = self.log_scale_bound

        def step(features, params):
            shift, raw_log_scale = params
            return u[:, features] * torch.exp(soft_clamp(raw_log_scale, bound)) + shift

        x, (_, raw_log_scale) = self.made.solve(step, u.shape[0], context, like=u)
        return x, soft_clamp(raw_log_scale, bound).sum(dim=-1)


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

    def _logabsdet(self, var, n):
        return self._log_scale(var + self.eps).sum().expand(n)

    def normalize(self, x, weight=None):
        """The map and the pieces its gradient reuses: ``(y, log_scale, x - mean, var + eps, scale)``.

        The log of the per-feature scale serves both the map and its log-det:
        fewer tensor operations per training step than computing them apart.
        :func:`backprop.loss_and_grad` runs this too, so both training paths
        apply the same function.
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
        return x, -self._logabsdet(var, y.shape[0])


class MAF(nn.Module):
    """Masked Autoregressive Flow over a standard-normal, MADE MoG or Student-t base density.

    ``Standardize -> Whiten? -> AffineMADE -> [BatchNorm? -> AffineMADE] x (n_layers - 1) -> N(0, I)``,
    with :func:`power_tails` before N(0, I) in eval mode when ``tail_cut`` is set.

    Batch norm sits *between* MAF layers. One after the last layer would be an
    affine map whose optimum is known in closed form (zero shift, unit scale):
    its gradient is zero up to round-off there, and Adam amplifies that
    round-off (its step is ``lr / eps`` times the gradient when the gradient is
    below ``eps``), which makes training chaotic in the last digits.

    Parameters
    ----------
    loc, scale : torch.Tensor of shape (n_features,)
        The fixed standardisation, fitted on the training data.
    n_layers : int
        Number of MAF layers.
    hidden_units, n_hidden_layers, activation
        Architecture of each MADE.
    batch_norm : bool
        Whether a :class:`BatchNorm` sits between consecutive MAF layers.
    order : {"reverse", "random"}
        "reverse": the order alternates between the natural order and its
        reverse, as in the paper; "random": a random order per layer.
    n_context : int, default=0
        Context features fed, unmasked, into every MADE (a conditional flow).
    base : {"gaussian", "mog", "student-t", "elliptical-t"}, default="gaussian"
        The base density: N(0, I), or a :class:`MADEMoG` whose conditionals are
        mixtures of ``n_components`` Gaussians (the paper's "MAF MoG"), with the
        next variable order of the alternation, or a :class:`StudentT`:
        independent t's with learned degrees of freedom, for heavy tails, or
        an :class:`EllipticalT`: the multivariate t, one learned degrees of
        freedom.
    n_components : int, default=10
        Components per conditional of the MADE MoG base.
    bounds : tuple (low, high) of tensors of shape (n_features,), optional
        Support of each feature (``-inf`` / ``inf`` for an open side): a fixed
        :class:`Bounded` layer then comes first, and ``loc`` / ``scale`` are
        those of its output.
    whiten : tuple (loc, chol) of tensors, optional
        A fixed :class:`Whiten` layer after the standardisation, mapping its
        output by the location ``loc`` (n_features,) and the lower-triangular
        Cholesky factor ``chol`` (n_features, n_features) of a scatter, both
        in standardised units.
    tail_cut : float, optional
        With the Gaussian base, in eval mode only: :func:`power_tails` at
        ``tail_cut`` between the last layer and N(0, I), so that a row far
        outside the training range costs a logarithm rather than a square in
        base space. Training mode (the training loss) uses N(0, I) alone.
    generator : torch.Generator, optional
        Source of all randomness at construction (weights, random orders).
    """

    tail_cut = None  # flows pickled before the parameter existed

    def __init__(
        self,
        loc,
        scale,
        *,
        n_layers,
        hidden_units,
        n_hidden_layers,
        activation="relu",
        batch_norm=True,
        order="reverse",
        n_context=0,
        base="gaussian",
        n_components=10,
        bounds=None,
        whiten=None,
        log_scale_bound=5.0,
        tail_cut=None,
        generator=None,
        dtype=None,
    ):
        super().__init__()
        n_features = loc.numel()
        self.n_features = n_features
        self.n_context = n_context
        transforms = [Standardize(loc.to(dtype), scale.to(dtype))]
        if whiten is not None:
            transforms.append(Whiten(*(torch.as_tensor(t, dtype=dtype) for t in whiten)))
        if bounds is not None:
            transforms.insert(0, Bounded(*(torch.as_tensor(b, dtype=dtype) for b in bounds)))
        natural = torch.arange(n_features)

        def degrees(index):
            if order == "random":
                return input_degrees(torch.randperm(n_features, generator=generator))
            return input_degrees(natural if index % 2 == 0 else natural.flip(0))

        made_params = dict(
            hidden_units=hidden_units,
            n_hidden_layers=n_hidden_layers,
            activation=activation,
            n_context=n_context,
            generator=generator,
            dtype=dtype,
        )
        for index in range(n_layers):
            transforms.append(
                AffineMADE(degrees(index), log_scale_bound=log_scale_bound, **made_params)
            )
            if batch_norm and index < n_layers - 1:
                transforms.append(BatchNorm(n_features, dtype=dtype))
        self.transforms = nn.ModuleList(transforms)
        if base == "mog":
            self.base = MADEMoG(
                degrees(n_layers), n_components, log_scale_bound=log_scale_bound, **made_params
            )
        elif base == "student-t":
            self.base = StudentT(n_features, dtype=dtype)
        elif base == "elliptical-t":
            self.base = EllipticalT(n_features, dtype=dtype)
        else:
            self.base = StandardNormal(n_features)
        self.tail_cut = tail_cut if base == "gaussian" else None

    def forward(self, x, context=None, weight=None):
        """Map data to the base space; return ``(u, logabsdet)``.

        Without autograd (scoring) the rows are made feature-major first, the
        layout in which :meth:`MADE._forward_inference` runs its products; every
        transform's element-wise work keeps it.
        """
        if not torch.is_grad_enabled():
            x = _feature_major(x)
        logabsdet = None
        for transform in self.transforms:
            x, ld = transform(x, context, weight)
            logabsdet = ld if logabsdet is None else logabsdet + ld
        if self.tail_cut is not None and not self.training:
            x, ld = power_tails(x, self.tail_cut)
            logabsdet = logabsdet + ld
        return x, logabsdet

    def inverse(self, u, context=None):
        """Map base-space points to data; return ``(x, logabsdet)`` of that map."""
        logabsdet = u.new_zeros(u.shape[0])
        if self.tail_cut is not None and not self.training:
            u, logabsdet = power_tails_inverse(u, self.tail_cut)
        for transform in reversed(self.transforms):
            u, ld = transform.inverse(u, context)
            logabsdet = logabsdet + ld
        return u, logabsdet

    def base_log_prob(self, u, context=None):
        """Log-density of the base distribution at ``u``, shape (n_samples,)."""
        return self.base.log_prob(u, context)

    def log_prob(self, x, context=None, weight=None):
        """Log-density of each row of ``x``, shape (n_samples,)."""
        u, logabsdet = self(x, context, weight)
        return self.base.log_prob(u, context) + logabsdet

    def sample(self, n_samples, context=None, generator=None):
        """Draw ``n_samples`` rows (one per context row when a context is given)."""
        u = self.base.sample(n_samples, context, generator, like=next(self.parameters()))
        return self.inverse(u, context)[0]

    @torch.no_grad()
    def set_batch_norm_statistics(self, x, context=None, weight=None, chunk_size=65536):
        """Give every batch-norm layer the exact statistics of its inputs over ``x``.

        The transforms are applied one at a time to all rows (in chunks of
        ``chunk_size``, so memory stays at about two copies of ``x``), and each
        batch-norm layer gets the (weighted) moments of what reaches it before
        its output feeds the next layer: the result is what a pass over the
        whole data set in eval mode sees. Transforms after the last batch-norm
        layer are not run: nothing after it needs statistics. The chunks reuse
        their activation buffers (:func:`reused_buffers`), as scoring does.
        """
        batch_norms = [i for i, t in enumerate(self.transforms) if isinstance(t, BatchNorm)]
        if not batch_norms:
            return
        last = batch_norms[-1]
        was_training = self.training
        self.eval()
        with reused_buffers():
            for index, transform in enumerate(self.transforms[: last + 1]):
                if isinstance(transform, BatchNorm):
                    transform.set_statistics(*BatchNorm.weighted_moments(x, weight))
                if index == last:
                    break
                x = torch.cat(
                    [
                        transform(x[start : start + chunk_size], _rows(context, start, chunk_size))[0]
                        for start in range(0, x.shape[0], chunk_size)
                    ]
                )
        self.train(was_training)


def _scores_in_c(x, shift, raw_log_scale):
    """Whether :func:`_native.affine_score` can run: float64 on a CPU, feature-major, the C module built."""
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


def _feature_major(x):
    """``x`` with the same values, laid out column by column (a transposed contiguous tensor)."""
    return x.t().contiguous().t()


def _rows(tensor, start, size):
    return None if tensor is None else tensor[start : start + size]
