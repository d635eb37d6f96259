"""The classical densities mixed with the flow: Gaussian mixtures, a kernel density, their mixture.

The estimators fit their parameters (``sklearn_maf._reference``); this module
evaluates and samples them, in any dtype, on any device. Each draws a row from
``n_noise`` uniform numbers (``from_uniform``), so a draw in chunks is the
same as in one go.
"""

import math

import torch
from torch import nn

__all__ = [
    "GaussianKernelDensity",
    "GaussianMixtureDensity",
    "Mixture",
    "fixed_layers",
    "from_fixed",
    "to_fixed",
]

# Kernel-density terms evaluated at once (rows x points): bounds the memory of one block.
_KERNEL_BLOCK = 1 << 22


def _pick(weights, uniform):
    """Index drawn with probabilities ``weights`` for each of the ``uniform`` numbers."""
    cumulative = torch.cumsum(weights, dim=0)
    return torch.searchsorted(cumulative, uniform.contiguous()).clamp_max(cumulative.numel() - 1)


def _normal(uniform):
    """Standard normals from uniform numbers in (0, 1)."""
    return torch.special.ndtri(uniform.clamp(1e-300, 1 - 2**-53))


class GaussianMixtureDensity(nn.Module):
    """``sum_k weights[k] * N(z; means[k], cholesky[k] @ cholesky[k].T)``.

    Parameters
    ----------
    weights : torch.Tensor of shape (n_components,)
        Positive component weights summing to 1.
    means : torch.Tensor of shape (n_components, n_features)
        Component means.
    cholesky : torch.Tensor of shape (n_components, n_features, n_features)
        Lower-triangular Cholesky factors of the component covariances, with
        positive diagonals.
    """

    def __init__(self, weights, means, cholesky):
        super().__init__()
        weights, means, cholesky = (torch.as_tensor(t) for t in (weights, means, cholesky))
        n_components, n_features = means.shape
        if weights.shape != (n_components,) or cholesky.shape != (n_components, n_features, n_features):
            raise ValueError(
                f"weights, means and cholesky must have shapes (K,), (K, D) and (K, D, D); got "
                f"{tuple(weights.shape)}, {tuple(means.shape)} and {tuple(cholesky.shape)}."
            )
        diagonal = torch.diagonal(cholesky, dim1=-2, dim2=-1)
        if not bool((weights > 0).all()) or not bool((diagonal > 0).all()):
            raise ValueError("The weights and the Cholesky factors' diagonals must be positive.")
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("means", means)
        self.register_buffer("cholesky", torch.tril(cholesky))

    @property
    def n_features(self):
        return self.means.shape[1]

    def whitened(self, z):
        """Each row of ``z`` in each component's whitened coordinates ``L_k^-1 (z - mean_k)``, shape (K, n, D)."""
        cholesky = self.cholesky.to(z.dtype)
        # L^-1 once per component (D x D), then one batched product for the rows:
        # a triangular solve against every row costs several times as much
        identity = torch.eye(cholesky.shape[-1], dtype=z.dtype, device=z.device).expand_as(cholesky)
        inverse = torch.linalg.solve_triangular(cholesky, identity, upper=False)
        return z @ inverse.transpose(1, 2) - (inverse @ self.means.to(z.dtype)[:, :, None]).transpose(1, 2)

    def squared_radii(self, z):
        """Squared Mahalanobis radius of each row of ``z`` from each component, shape (n, K)."""
        return self.whitened(z).square().sum(dim=2).T  # (K, n, D) -> (n, K)

    def log_normalisers(self, dtype):
        """Log of each component's normalising constant, ``-D/2 log(2 pi) - log|L_k|``, shape (K,)."""
        log_det = torch.log(torch.diagonal(self.cholesky.to(dtype), dim1=-2, dim2=-1)).sum(dim=1)
        return -0.5 * self.n_features * math.log(2 * math.pi) - log_det

    def component_log_prob(self, z, weighted=True):
        """Log-density of each row of ``z`` under each component (times its weight), shape (n, K)."""
        log_prob = self.log_normalisers(z.dtype) - 0.5 * self.squared_radii(z)
        return log_prob + self.log_weights.to(z.dtype) if weighted else log_prob

    def log_prob(self, z):
        """Log-density of each row of ``z``, shape (n,)."""
        return torch.logsumexp(self.component_log_prob(z), dim=1)

    @property
    def n_noise(self):
        """Uniform numbers per drawn row: one picks the component, the others its point."""
        return self.n_features + 1

    def from_uniform(self, noise):
        """Rows drawn from uniform ``noise`` of shape (n, n_noise), row by row."""
        noise = noise.to(self.means.dtype)
        component = _pick(self.log_weights.exp(), noise[:, 0])
        normal = _normal(noise[:, 1:])
        return self.means[component] + (self.cholesky[component] @ normal[:, :, None])[:, :, 0]

    def sample(self, n_samples, generator=None):
        """Draw ``n_samples`` rows; every number comes from ``generator``, row by row."""
        return _sample(self, n_samples, generator, self.means)


class GaussianKernelDensity(nn.Module):
    """``sum_i weights[i] * N(z; points[i], bandwidth^2 I)``: a Gaussian kernel density.

    Parameters
    ----------
    points : torch.Tensor of shape (n_points, n_features)
    weights : torch.Tensor of shape (n_points,)
        Non-negative, with a positive sum; normalised here.
    bandwidth : float
        The kernel's standard deviation, the same in every direction.
    """

    def __init__(self, points, weights, bandwidth):
        super().__init__()
        points, weights = torch.as_tensor(points), torch.as_tensor(weights)
        if points.ndim != 2 or weights.shape != points.shape[:1]:
            raise ValueError(
                f"points and weights must have shapes (n, D) and (n,); got {tuple(points.shape)} "
                f"and {tuple(weights.shape)}."
            )
        if not bandwidth > 0 or not bool((weights >= 0).all()) or not weights.sum() > 0:
            raise ValueError("The bandwidth must be positive and the weights non-negative with a positive sum.")
        # a copy of its own: evenly spaced rows are a view whose storage, all
        # the rows, would otherwise go into every pickle of the model
        self.register_buffer("points", points.clone(memory_format=torch.contiguous_format))
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("bandwidth", torch.as_tensor(float(bandwidth), dtype=points.dtype))

    @property
    def n_features(self):
        return self.points.shape[1]

    @property
    def n_noise(self):
        """Uniform numbers per drawn row: one picks the point, the others the kernel's draw."""
        return self.n_features + 1

    def log_prob(self, z):
        """Log-density of each row of ``z``, shape (n,), summed over blocks of points."""
        points, log_weights = self.points.to(z.dtype), self.log_weights.to(z.dtype)
        h2 = self.bandwidth.to(z.dtype) ** 2
        z2 = z.square().sum(dim=1, keepdim=True)
        out = torch.full((z.shape[0],), -torch.inf, dtype=z.dtype, device=z.device)
        block = max(1, _KERNEL_BLOCK // max(1, z.shape[0]))
        for start in range(0, points.shape[0], block):
            p = points[start : start + block]
            distance2 = (z2 + p.square().sum(dim=1) - 2 * z @ p.T).clamp_min(0)
            out = torch.logaddexp(out, torch.logsumexp(log_weights[start : start + block] - distance2 / (2 * h2), dim=1))
        return out - 0.5 * self.n_features * torch.log(2 * math.pi * h2)

    def from_uniform(self, noise):
        """Rows drawn from uniform ``noise`` of shape (n, n_noise), row by row."""
        noise = noise.to(self.points.dtype)
        index = _pick(self.log_weights.exp(), noise[:, 0])
        return self.points[index] + self.bandwidth * _normal(noise[:, 1:])

    def sample(self, n_samples, generator=None):
        """Draw ``n_samples`` rows; every number comes from ``generator``, row by row."""
        return _sample(self, n_samples, generator, self.points)


class Mixture(nn.Module):
    """``sum_k weights[k] * parts[k](z)``: densities of the same space, mixed.

    Parameters
    ----------
    parts : list of torch.nn.Module
        Each with ``log_prob(z)``, ``from_uniform(noise)`` and ``n_noise``.
    weights : torch.Tensor of shape (len(parts),)
        Positive, normalised here.
    """

    def __init__(self, parts, weights):
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (len(parts),) or not bool((weights > 0).all()):
            raise ValueError(f"One positive weight per part is needed; got {weights.tolist()} for {len(parts)} parts.")
        self.parts = nn.ModuleList(parts)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    @property
    def n_features(self):
        return self.parts[0].n_features

    @property
    def n_noise(self):
        """Uniform numbers per drawn row: one picks the part, the others its draw."""
        return 1 + max(part.n_noise for part in self.parts)

    def log_prob(self, z):
        """Log-density of each row of ``z``, shape (n,)."""
        terms = [w.to(z.dtype) + part.log_prob(z) for w, part in zip(self.log_weights, self.parts)]
        return torch.logsumexp(torch.stack(terms, dim=1), dim=1)

    def from_uniform(self, noise):
        """Rows drawn from uniform ``noise`` of shape (n, n_noise), row by row."""
        noise = noise.to(torch.float64)
        which = _pick(self.log_weights.exp(), noise[:, 0])
        out = noise.new_empty(noise.shape[0], self.n_features)
        for index, part in enumerate(self.parts):
            rows = which == index
            if rows.any():
                out[rows] = part.from_uniform(noise[rows, 1 : 1 + part.n_noise]).to(out.dtype)
        return out

    def sample(self, n_samples, generator=None):
        """Draw ``n_samples`` rows; every number comes from ``generator``, row by row."""
        return _sample(self, n_samples, generator, self.log_weights)


def _sample(density, n_samples, generator, like):
    noise = torch.rand(n_samples, density.n_noise, generator=generator, dtype=torch.float64)
    return density.from_uniform(noise.to(like.device))


def fixed_layers(flow):
    """The flow's fixed first layers (bounds, standardisation, whitening: ``flow.n_fixed()`` of them)."""
    return list(flow.transforms[: flow.n_fixed()])


def to_fixed(flow, x):
    """``(z, logabsdet)``: rows ``x`` through the flow's fixed layers, where the reference lives."""
    logabsdet = x.new_zeros(x.shape[0])
    for layer in fixed_layers(flow):
        x, ld = layer(x)
        logabsdet = logabsdet + ld
    return x, logabsdet


def from_fixed(flow, z):
    """Points ``z`` of the fixed layers' output mapped back to data space."""
    for layer in reversed(fixed_layers(flow)):
        z = layer.inverse(z)[0]
    return z
