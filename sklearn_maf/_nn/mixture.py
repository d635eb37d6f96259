"""A mixture of full-covariance Gaussians: the classical density mixed with the flow.

The estimators fit its parameters (``sklearn_maf._reference``); this module only
evaluates and samples it, in any dtype, on any device.
"""

import math

import torch
from torch import nn

__all__ = ["GaussianMixtureDensity", "fixed_layers", "from_fixed", "to_fixed"]


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

    def component_log_prob(self, z):
        """Log-density of each row of ``z`` under each weighted component, shape (n, K)."""
        chol = self.cholesky.to(z.dtype)
        centred = z[None, :, :] - self.means.to(z.dtype)[:, None, :]  # (K, n, D)
        # one triangular solve per component: the squared Mahalanobis radii
        white = torch.linalg.solve_triangular(chol, centred.transpose(1, 2), upper=False)
        radius2 = white.square().sum(dim=1)  # (K, n)
        log_det = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=1)
        log_norm = -0.5 * self.n_features * math.log(2 * math.pi) - log_det
        return (self.log_weights.to(z.dtype)[:, None] + log_norm[:, None] - 0.5 * radius2).T

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
        cumulative = torch.cumsum(self.log_weights.exp(), dim=0)
        component = torch.searchsorted(cumulative, noise[:, :1].contiguous()).clamp_max(cumulative.numel() - 1)[:, 0]
        normal = torch.special.ndtri(noise[:, 1:].clamp(1e-300, 1 - 2**-53))
        return self.means[component] + (self.cholesky[component] @ normal[:, :, None])[:, :, 0]

    def sample(self, n_samples, generator=None):
        """Draw ``n_samples`` rows; every number comes from ``generator``, row by row."""
        noise = torch.rand(n_samples, self.n_noise, generator=generator, dtype=torch.float64)
        return self.from_uniform(noise.to(self.means.device))


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
