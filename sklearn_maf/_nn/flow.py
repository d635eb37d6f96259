"""Masked Autoregressive Flow (Papamakarios, Pavlakou & Murray, 2017): the composition.

Every transform maps data towards the base density and returns
``(outputs, logabsdet)``, where ``logabsdet`` has shape (n_samples,) and is
``log|det d outputs / d inputs|``; ``inverse`` maps back and returns the
log-determinant of that inverse map. A flow is the composition of its
transforms, so its log-density is the base log-density of the last output plus
the sum of the log-determinants.

The layers live in their own modules, each class with all its mathematics:
the fixed float64 first layers in :mod:`.preprocessing`, the learned ones in
:mod:`.transforms`, the base distributions in :mod:`.distributions`. A flow
names them through :data:`TRANSFORMS` and :data:`BASES`: adding one is a class
and a line there.
"""

import torch
from torch import nn

from .distributions import EllipticalT, MADEMoG, StandardNormal, StudentT
from .made import input_degrees, reused_buffers
from .preprocessing import Bounded, Standardize, Whiten, _feature_major
from .transforms import AffineMADE, BatchNorm, SplineMADE, power_tails, power_tails_inverse, soft_clamp

__all__ = ["BASES", "MAF", "TRANSFORMS", "power_tails", "power_tails_inverse", "soft_clamp"]

#: The autoregressive transforms a flow can stack: ``cls(degrees, log_scale_bound=...,
#: **transform_params, **made_params)``, where ``made_params`` configure its
#: :class:`~.made.MADE`.
TRANSFORMS = {"affine": AffineMADE, "spline": SplineMADE}


def _mog(spec):
    return MADEMoG(spec.degrees, spec.n_components, log_scale_bound=spec.log_scale_bound, **spec.made_params)


#: The base distributions, each made from a :class:`_BaseSpec` of the flow.
BASES = {
    "gaussian": lambda spec: StandardNormal(spec.n_features),
    "mog": _mog,
    "student-t": lambda spec: StudentT(spec.n_features, dtype=spec.dtype),
    "elliptical-t": lambda spec: EllipticalT(spec.n_features, dtype=spec.dtype),
}


class _BaseSpec:
    """What a base distribution may need from the flow that holds it."""

    def __init__(self, **values):
        self.__dict__.update(values)


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
    transform : {"affine", "spline"}, default="affine"
        The autoregressive transform of each MAF layer, a key of :data:`TRANSFORMS`:
        :class:`AffineMADE` or :class:`SplineMADE`.
    transform_params : dict, optional
        Further arguments of that transform (for "spline": ``n_bins``, ``tail_bound``).
    generator : torch.Generator, optional
        Source of all randomness at construction (weights, random orders).
    dtype : torch.dtype, optional
        Of the learned layers; the fixed ones (bounds, standardisation,
        whitening) are float64 whatever it is.
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
        transform="affine",
        transform_params=None,
        generator=None,
        dtype=None,
    ):
        super().__init__()
        n_features = loc.numel()
        self.n_features = n_features
        self.n_context = n_context
        # the fixed layers, in float64 whatever ``dtype`` (see preprocessing.py)
        transforms = [Standardize(torch.as_tensor(loc), torch.as_tensor(scale))]
        if whiten is not None:
            transforms.append(Whiten(*(torch.as_tensor(t) for t in whiten)))
        if bounds is not None:
            transforms.insert(0, Bounded(*(torch.as_tensor(b) for b in bounds)))
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
                TRANSFORMS[transform](
                    degrees(index), log_scale_bound=log_scale_bound, **(transform_params or {}), **made_params
                )
            )
            if batch_norm and index < n_layers - 1:
                transforms.append(BatchNorm(n_features, dtype=dtype))
        self.transforms = nn.ModuleList(transforms)
        self.base = BASES[base](
            _BaseSpec(
                n_features=n_features, degrees=degrees(n_layers), n_components=n_components,
                log_scale_bound=log_scale_bound, made_params=made_params, dtype=dtype,
            )
        )  # fmt: skip
        self.tail_cut = tail_cut if base == "gaussian" else None

    def n_fixed(self):
        """How many of the first transforms are fixed (``fixed`` True): run in float64, never trained."""
        count = 0
        for transform in self.transforms:
            if not getattr(transform, "fixed", False):
                break
            count += 1
        return count

    def forward(self, x, context=None, weight=None):
        """Map data to the base space; return ``(u, logabsdet)``.

        The fixed first layers run in float64, whatever the dtype of ``x`` and
        of the learned layers; their output is cast to the learned layers'
        dtype. Without autograd (scoring) the rows are made feature-major
        first, the layout in which :meth:`MADE._forward_inference` runs its
        products; every transform's element-wise work keeps it.
        """
        if not torch.is_grad_enabled():
            x = _feature_major(x)
        n_fixed = self.n_fixed()
        if n_fixed:
            x = x.to(torch.float64)
        logabsdet = None
        for index, transform in enumerate(self.transforms):
            if index == n_fixed and n_fixed:
                x = x.to(self._learned_dtype(index))
            x, ld = transform(x, context, weight)
            logabsdet = ld if logabsdet is None else logabsdet + ld
        if self.tail_cut is not None and not self.training:
            x, ld = power_tails(x, self.tail_cut)
            logabsdet = logabsdet + ld
        return x, logabsdet

    def _learned_dtype(self, index):
        """The dtype of the learned transforms, from the first of them (``self.transforms[index]``)."""
        param = next(self.transforms[index].parameters(), None)
        return torch.get_default_dtype() if param is None else param.dtype

    def inverse(self, u, context=None):
        """Map base-space points to data; return ``(x, logabsdet)`` of that map."""
        logabsdet = u.new_zeros(u.shape[0])
        if self.tail_cut is not None and not self.training:
            u, logabsdet = power_tails_inverse(u, self.tail_cut)
        n_fixed = self.n_fixed()
        for index in range(len(self.transforms) - 1, -1, -1):
            if index == n_fixed - 1:  # the fixed layers, in float64
                u = u.to(torch.float64)
            u, ld = self.transforms[index].inverse(u, context)
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
        n_fixed = self.n_fixed()
        with reused_buffers():
            for index, transform in enumerate(self.transforms[: last + 1]):
                if index == n_fixed:
                    x = x.to(self._learned_dtype(index))
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


def _rows(tensor, start, size):
    return None if tensor is None else tensor[start : start + size]
