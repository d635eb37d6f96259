"""MADE: the masked autoencoder that parametrises one autoregressive layer.

The dependency structure of the network is *data*: every input, hidden unit and
output carries a degree, and a weight may connect unit ``j`` to unit ``k`` only if
the degrees allow it (Germain et al., 2015). Masks are buffers built once from the
degrees, so changing the variable order between layers is a change of degrees,
never a permutation of the data.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MADE", "MaskedLinear", "hidden_degrees", "input_degrees"]

_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


def input_degrees(order):
    """Degrees of the inputs for a variable order.

    Parameters
    ----------
    order : torch.LongTensor of shape (n_features,)
        ``order[k]`` is the index of the feature that comes ``k``-th in the
        autoregressive order.

    Returns
    -------
    degrees : torch.LongTensor of shape (n_features,)
        ``degrees[i]`` is the 1-based position of feature ``i`` in the order:
        output ``i`` may depend on input ``j`` only if ``degrees[j] < degrees[i]``.
    """
    degrees = torch.empty_like(order)
    degrees[order] = torch.arange(1, order.numel() + 1, dtype=order.dtype)
    return degrees


def hidden_degrees(n_features, hidden_units, n_context=0):
    """Degrees of one hidden layer, cycling through ``1 .. n_features - 1``.

    Cycling (rather than drawing at random) gives every degree the same number of
    units, so every input ``j`` reaches every later output whenever
    ``hidden_units >= n_features - 1``. With one feature there is nothing to
    condition on: hidden units get degree 0 and see no input, and the layer's
    shift and log-scale are learned constants (a 1-D MAF is a Gaussian).

    With a context (``n_context > 0``) the cycle starts at 0: units of degree 0
    see the context and no input, and they are the only path from the context
    to the first output in the order. Every input then reaches every later
    output whenever ``hidden_units >= n_features``.
    """
    lowest = 0 if n_context or n_features == 1 else 1
    return torch.arange(hidden_units) % (n_features - lowest) + lowest


class MaskedLinear(nn.Module):
    """A linear layer whose weight is multiplied by a fixed binary mask.

    Parameters are initialised from ``generator`` (never torch's global RNG),
    uniformly in ``±scale / sqrt(fan_in)`` where ``fan_in`` counts the inputs
    the mask lets through.

    Parameters
    ----------
    mask : torch.Tensor of shape (out_features, in_features)
        1 where a connection is allowed.
    generator : torch.Generator, optional
        Source of randomness for the initial weights.
    scale : float, default=1.0
        Multiplies the initial weights; the output layer of a MADE uses a small
        value so that every flow starts close to the identity.
    """

    def __init__(self, mask, generator=None, scale=1.0, dtype=None):
        super().__init__()
        out_features, in_features = mask.shape
        self.register_buffer("mask", mask.to(dtype or torch.get_default_dtype()))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype))
        fan_in = mask.sum(dim=1).clamp(min=1).to(self.weight.dtype)
        bound = (scale / torch.sqrt(fan_in)).unsqueeze(1)
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0, generator=generator).mul_(bound)
            self.weight.mul_(self.mask)
            self.bias.uniform_(-1.0, 1.0, generator=generator).mul_(
                scale / math.sqrt(max(in_features, 1))
            )

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)

    def extra_repr(self):
        out_features, in_features = self.mask.shape
        return f"in_features={in_features}, out_features={out_features}"


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation with a fused output head.

    Maps ``x`` (and an optional, unmasked context) to the shift and raw
    log-scale of each autoregressive conditional: output ``i`` depends only on
    the inputs whose degree is lower than ``degrees[i]``.

    Parameters
    ----------
    degrees : torch.LongTensor of shape (n_features,)
        Degrees of the inputs, as returned by :func:`input_degrees`.
    hidden_units : int
        Width of each hidden layer.
    n_hidden_layers : int
        Number of hidden layers.
    activation : {"relu", "tanh"}
        Non-linearity between layers.
    n_context : int, default=0
        Number of context features fed, unmasked, into the first layer; hidden
        units of degree 0 carry them to every output (see :func:`hidden_degrees`).
    n_params : int, default=2
        Outputs per feature; the output layout is ``n_params`` blocks of
        ``n_features`` columns (for the affine layer: shift, then log-scale).
    generator : torch.Generator, optional
        Source of randomness for the initial weights.
    """

    def __init__(
        self,
        degrees,
        hidden_units,
        n_hidden_layers,
        activation="relu",
        n_context=0,
        n_params=2,
        generator=None,
        dtype=None,
    ):
        super().__init__()
        n_features = degrees.numel()
        self.n_features = n_features
        self.n_params = n_params
        self.register_buffer("degrees", degrees.clone())
        self._activation = _ACTIVATIONS[activation]
        self.activation = activation

        layers = []
        previous = degrees
        for index in range(n_hidden_layers):
            current = hidden_degrees(n_features, hidden_units, n_context)
            mask = current[:, None] >= previous[None, :]
            if index == 0 and n_context:
                mask = torch.cat([mask, torch.ones(hidden_units, n_context, dtype=torch.bool)], 1)
            layers.append(MaskedLinear(mask, generator, dtype=dtype))
            previous = current
        out_mask = degrees[:, None] > previous[None, :]
        if n_hidden_layers == 0 and n_context:
            out_mask = torch.cat([out_mask, torch.ones(n_features, n_context, dtype=torch.bool)], 1)
        out_mask = out_mask.repeat(n_params, 1)
        layers.append(MaskedLinear(out_mask, generator, scale=1e-2, dtype=dtype))
        self.layers = nn.ModuleList(layers)

    def forward(self, x, context=None):
        """Return the output blocks, each of shape (n_samples, n_features)."""
        h = x if context is None else torch.cat([x, context], dim=-1)
        for layer in self.layers[:-1]:
            h = self._activation(layer(h))
        return self.layers[-1](h).chunk(self.n_params, dim=-1)
