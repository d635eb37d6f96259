"""MADE: the masked autoencoder that parametrises one autoregressive layer.

The dependency structure of the network is *data*: every input, hidden unit and
output carries a degree, and a weight may connect unit ``j`` to unit ``k`` only if
the degrees allow it (Germain et al., 2015). Masks are buffers built once from the
degrees, so changing the variable order between layers is a change of degrees,
never a permutation of the data.
"""

import contextlib
import math
import threading
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from . import _native

__all__ = ["MADE", "MaskedLinear", "hidden_degrees", "input_degrees", "reused_buffers"]

_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}
# For MADE.solve, which runs without autograd: in place on a fresh product.
_ACTIVATIONS_INPLACE = {"relu": torch.relu_, "tanh": torch.tanh_}


def _threshold_backward(grad, output):
    """Gradient through a ReLU, given its output (positive exactly where its input is)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


def _tanh_backward(grad, output):
    """Gradient through tanh, given its output: ``grad * (1 - output^2)``."""
    return torch.ops.aten.tanh_backward(grad, output)


# The derivative of each activation given its output, for the hand-written backward pass.
_ACTIVATION_BACKWARDS = {"relu": _threshold_backward, "tanh": _tanh_backward}
# Scoring computes a first ReLU layer of at most this many inputs (features,
# context and the bias's row of ones) in C: the fused product and ReLU beat
# torch's with few inputs and stop paying from about 33 (benchmarks/RESULTS.md,
# "Do the C passes pay for themselves?").
_C_FIRST_LAYER_MAX_INPUTS = 24


# Per thread, inside `reused_buffers`: the buffers and prepared weights of inference passes.
_workspace = threading.local()


@contextlib.contextmanager
def reused_buffers():
    """Within the block, inference passes in this thread reuse their hidden activations' memory.

    Scoring a large array runs the same network on one chunk of rows after
    another, and every hidden layer's activations are a fresh tensor of
    megabytes per chunk. With glibc's allocator such blocks come from ``mmap``
    or from the top of a heap that is trimmed when they are freed, so each
    chunk touches its activations' pages anew: measured on 200,000 rows x 8
    features (5 MADEs of 100 units, float64, chunks of 2,621 rows), 300,000 page
    faults and about half the time of ``score_samples``. Inside this block the
    hidden activations go to two buffers per thread and shape (and the input,
    with its row of ones, to a third), kept until the block exits; only the
    output layer's result, which the caller keeps, is a new tensor. Buffers
    are never shared between threads.

    Each MADE also prepares its weights for these passes (masked, in level
    order, bias first) once per block rather than once per chunk, so its
    parameters must not change inside the block: it is meant for scoring.
    """
    previous = getattr(_workspace, "buffers", None)
    _workspace.buffers = {}
    try:
        yield
    finally:
        _workspace.buffers = previous


def _reusable(slot, shape, like):
    """``(tensor, new)``: an uninitialised tensor of ``shape`` like ``like``, and whether it is new.

    Within :func:`reused_buffers` it is the thread's buffer ``slot`` of that
    shape, made once and returned again (``new`` False) with what the last
    user left in it.
    """
    buffers = getattr(_workspace, "buffers", None)
    key = (slot, shape, like.dtype, like.device, torch.is_inference_mode_enabled())
    if buffers is not None and key in buffers:
        return buffers[key], False
    buffer = like.new_empty(shape)
    if buffers is not None:
        buffers[key] = buffer
    return buffer, True


def _ones_first(slot, shape, like):
    """A :func:`_reusable` tensor whose first row is ones; callers write only below it."""
    buffer, new = _reusable(slot, shape, like)
    if new:
        buffer[0] = 1
    return buffer


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

    The weight is zero wherever the mask is, from initialisation on, and
    training keeps it so (the gradient of a masked entry is zero, and so is
    its Adam step and L2 penalty); every forward pass applies the mask all the
    same, so that the autoregressive structure never rests on that alone.

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
        if not torch.is_grad_enabled():
            return self._forward_inference(h)
        for layer in self.layers[:-1]:
            h = self._activation(layer(h))
        return self.layers[-1](h).chunk(self.n_params, dim=-1)

    # -------------------------------------------- hand-written training pass (see backprop.py)

    def backprop_state(self, setup):
        """What :meth:`forward_cached` and :meth:`backward` reuse from step to step.

        The gradient buffers that :class:`~.backprop.Backprop` set, looked up
        once (reading a module's parameter and then its ``.grad`` costs about
        3 us per access), and with ``setup.assume_masked`` the weights'
        transposes as views: Adam updates the weights in place, so views taken
        once stay views of the current weights.
        """
        linears = list(self.layers)
        weights = [linear.weight for linear in linears]
        return SimpleNamespace(
            native=setup.native,
            weight_grads=[weight.grad for weight in weights],
            bias_grads=[linear.bias.grad for linear in linears],
            biases=[linear.bias for linear in linears],
            linears=linears,
            views=(weights, [weight.t() for weight in weights]) if setup.assume_masked else None,
        )

    def forward_cached(self, state, x, context=None):
        """``(out, cache)``: the output layer's product, all its blocks side by side.

        The products are laid out as MKL runs them fastest at these sizes
        (see :mod:`.backprop`): one product for all the output blocks.
        """
        if state.views is None:
            weights = [linear.weight * linear.mask for linear in state.linears]
            transposed = [weight.t() for weight in weights]
        else:
            weights, transposed = state.views
        activation = _ACTIVATIONS_INPLACE[self.activation]
        h = x if context is None else torch.cat([x, context], dim=1)  # the first layer's input
        hidden = [h]
        for bias, weight_t in zip(state.biases[:-1], transposed[:-1]):
            h = activation(torch.addmm(bias, h, weight_t))
            hidden.append(h)
        return torch.addmm(state.biases[-1], h, transposed[-1]), (hidden, weights)

    def backward(self, state, cache, grad_out, need_input_grad=True, output_bias_done=False):
        """Write the parameter gradients, given d loss / d out; return d loss / d x, or None.

        With ``output_bias_done``, the caller has written the output layer's
        bias gradient. The gradient of a masked weight is left unmasked: the
        caller masks them all at once. The first layer's weight gradient is
        computed as ``(x.T @ grad).T`` and the gradient of its input as
        ``(W.T @ grad.T).T``: with a few features these take faster BLAS paths
        than ``grad.T @ x`` and ``grad @ W``, and are no slower with many.
        """
        hidden, weights = cache
        weight_grads, bias_grads = state.weight_grads, state.bias_grads
        torch.mm(grad_out.t(), hidden[-1], out=weight_grads[-1])
        if not output_bias_done:
            torch.sum(grad_out, dim=0, out=bias_grads[-1])
        if len(weights) == 1 and not need_input_grad:
            return None
        grad_below = grad_out.mm(weights[-1])
        for depth in range(len(weights) - 2, -1, -1):
            if state.native:  # with the bias gradient, in one pass
                grad_out = _native.activation_backward(
                    grad_below, hidden[depth + 1], self.activation == "tanh", bias_grads[depth]
                )
            else:
                grad_out = _ACTIVATION_BACKWARDS[self.activation](grad_below, hidden[depth + 1])
                torch.sum(grad_out, dim=0, out=bias_grads[depth])
            if depth > 0:
                torch.mm(grad_out.t(), hidden[depth], out=weight_grads[depth])
            else:
                weight_grads[0].copy_(hidden[0].t().mm(grad_out).t())
            if depth == 0 and not need_input_grad:
                return None
            grad_below = grad_out.mm(weights[depth]) if depth > 0 else weights[0].t().mm(grad_out.t()).t()
        if grad_below.shape[1] != self.n_features:  # the first layer read the features, then the context
            grad_below = grad_below[:, : self.n_features]
        return grad_below

    # ------------------------------------------------------------------------ scoring

    def _forward_inference(self, h):
        """:meth:`forward` without autograd, as scoring runs it: feature-major.

        Each product is ``weight @ h.T``, a (units, rows) result, and the
        output blocks are transposed views of it: (rows, n_features) tensors
        whose columns are contiguous. On a CPU this layout is what makes the
        products fast: measured in float64 on 2,621 rows, the output layer's
        product takes 290 us as one (16, rows) result against 1,460 us as two
        (rows, 8) results, and the 100 x 100 layer 1,350 against 1,990 us.
        Element-wise work that follows keeps the layout (:meth:`MAF.forward`
        hands every transform feature-major rows when gradients are off).

        The hidden units are taken in the order of their levels (see
        :meth:`_inference_plan`), in which a square hidden-to-hidden layer is
        block lower-triangular: its lower-level units are one product over the
        lower-level units below, its others one product over all of them. That
        skips about a quarter of the layer's multiply-adds (all masked), and
        measured 1,180 us against 1,500 us for the 100 x 100 layer; splitting
        further, or splitting the first and the output layer, was not faster,
        because narrower products run below the dense rate.

        Activations work in place, in the buffers of :func:`reused_buffers` when
        it is active.
        """
        activation = _ACTIVATIONS_INPLACE[self.activation]
        *hidden, output = self._inference_weights()
        # Each layer's input carries a row of ones first, and each weight the
        # bias as its first column: the product adds the bias, and no pass
        # copies it into the result beforehand (as addmm's does).
        n_rows = h.shape[0]
        below = _ones_first("input", (h.shape[1] + 1, n_rows), h)
        below[1:] = h.t()
        for index, (n_units, blocks) in enumerate(hidden):
            out = _ones_first(index % 2, (n_units + 1, n_rows), h)
            if index == 0 and self._first_layer_in_c(below, blocks):
                (weight, _, _), = blocks
                _native.linear_relu_score(weight, below, out[1:])
            else:
                for weight, start, stop in blocks:
                    torch.mm(weight, below[: weight.shape[1]], out=out[1 + start : 1 + stop])
                activation(out[1:])
            below = out
        out = torch.mm(output, below)
        return tuple(block.t() for block in out.chunk(self.n_params))

    def _first_layer_in_c(self, below, blocks):
        """Whether ``_native.linear_relu_score`` computes the first layer (see its comment in C)."""
        if self.activation != "relu" or len(blocks) != 1 or not _native.avx2():
            return False
        weight = blocks[0][0]
        return (
            below.dtype == weight.dtype == torch.float64
            and below.device.type == weight.device.type == "cpu"
            and weight.shape[1] == below.shape[0] <= _C_FIRST_LAYER_MAX_INPUTS
            and weight.is_contiguous()
            and below.is_contiguous()
        )

    def _inference_weights(self):
        """The weights of :meth:`_forward_inference`, as :meth:`_inference_plan` lays them out.

        Per hidden layer ``(n_units, blocks)``, each block ``(weight, start,
        stop)`` the ``[bias, masked weight]`` of units ``start:stop`` over the
        units below that they read; then the output layer's ``[bias, masked
        weight]``. Rows and columns are in the plan's orders. Within
        :func:`reused_buffers` they are computed once per block, not once per
        chunk of rows.
        """
        buffers = getattr(_workspace, "buffers", None)
        key = ("weights", self, torch.is_inference_mode_enabled())
        if buffers is not None and key in buffers:
            return buffers[key]
        plan = self._inference_plan()
        weights, below = [], None
        for index, layer in enumerate(self.layers):
            weight, bias = layer.weight * layer.mask, layer.bias
            order = None
            if index < len(plan):
                order = torch.as_tensor(plan[index][0], device=weight.device)
                weight, bias = weight[order], bias[order]
            if below is not None:
                weight = weight[:, below]
            weight = torch.cat([bias[:, None], weight], dim=1)
            if order is None:
                weights.append(weight)
            else:
                blocks = [(weight[start:stop, : width + 1], start, stop) for start, stop, width in plan[index][1]]
                weights.append((weight.shape[0], blocks))
            below = order
        if buffers is not None:
            buffers[key] = weights
        return weights

    def _unit_levels(self):
        """Per layer, each unit's level: the highest input degree that reaches it through the masks.

        A unit of level ``t`` depends on the inputs of degree ``<= t`` only, and
        reads only units of level ``<= t`` in the layer below. Units that no
        input reaches (those that see only the context) have level 0.
        """
        levels = []
        below = self.degrees
        for layer in self.layers:
            mask = layer.mask != 0
            n_inputs = below.numel()
            reach = torch.where(mask[:, :n_inputs], below.to(mask.device)[None, :], -1)
            level = reach.amax(dim=1).clamp(min=0) if n_inputs else reach.new_zeros(mask.shape[0])
            levels.append(level)
            below = level
        return levels

    def _inference_plan(self):
        """The products of :meth:`_forward_inference`, worked out once from the masks.

        Returns, per hidden layer, ``(order, blocks)``: ``order`` lists the
        layer's units by level, and each ``(start, stop, width)`` in ``blocks``
        says that units ``start:stop`` (in that order) read only the first
        ``width`` units of the layer below (in its order). A square layer gets
        two blocks, split at the level that skips the most masked
        multiply-adds, when that skips at least a tenth of them. Plain Python
        data, cached on the module: the masks never change.
        """
        plan = self.__dict__.get("_plan")
        if plan is not None:
            return plan
        plan = []
        below = None
        for index, level in enumerate(self._unit_levels()[:-1]):
            level = level.cpu()
            order = torch.argsort(level, stable=True)
            n_units, width = self.layers[index].mask.shape
            blocks = [(0, n_units, width)]
            if below is not None:
                sorted_level = level[order]
                best_cost, best = n_units * width, None
                for split in torch.unique(sorted_level).tolist():
                    stop = int((sorted_level <= split).sum())
                    reads = int((below <= split).sum())
                    cost = stop * reads + (n_units - stop) * width
                    if cost < best_cost:
                        best_cost, best = cost, (stop, reads)
                if best is not None and best[0] < n_units and best_cost <= 0.9 * n_units * width:
                    stop, reads = best
                    blocks = [(0, stop, reads), (stop, n_units, width)]
            plan.append((order.tolist(), blocks))
            below = level[order]
        self._plan = plan
        return plan

    def solve(self, step, n_samples, context=None, *, like):
        """Find ``x`` such that each feature is ``step`` of its own conditionals.

        Inverting an autoregressive layer (sampling) must produce the features
        in their order, because the conditionals of a feature depend on the
        features before it. Running the whole network once per feature would
        cost ``n_features`` forward passes. Here every unit is computed once,
        as soon as the inputs it depends on are known: a unit's *level* is the
        highest input degree that reaches it through the masks, and the units
        of level ``t - 1`` are computed right before the features of degree
        ``t`` are solved for. In total this is about one forward pass of
        arithmetic (half of it for the square hidden-to-hidden layers, whose
        units only read the lower levels of the layer below), in
        ``n_features`` steps of small matrix products.

        The products use exactly the connections the masks allow, so the result
        equals a full forward pass at ``x`` up to the order of summation.

        The fast path fills buffers in place, which autograd cannot
        differentiate through; when gradients are being recorded it runs the
        network once per feature instead (slower, same result).

        Parameters
        ----------
        step : callable
            ``step(features, params) -> values``: ``features`` is a LongTensor
            of the (original) indices of the features of one degree, ``params``
            a tuple of ``n_params`` tensors of shape (n_samples, len(features))
            holding their conditionals, in the output layout of :meth:`forward`;
            it returns their values, of shape (n_samples, len(features)).
        n_samples : int
            Number of rows.
        context : torch.Tensor of shape (n_samples, n_context), optional
            The conditioning features, as in :meth:`forward`.
        like : torch.Tensor
            Gives the dtype and device of the result.

        Returns
        -------
        x : torch.Tensor of shape (n_samples, n_features)
            The solution.
        params : tuple of torch.Tensor of shape (n_samples, n_features)
            The ``n_params`` output blocks of :meth:`forward` at ``x``.
        """
        if torch.is_grad_enabled():
            return self._solve_differentiably(step, n_samples, context, like)
        n_features, n_params = self.n_features, self.n_params
        dtype, device = like.dtype, like.device
        activation = _ACTIVATIONS_INPLACE[self.activation]
        degrees = self.degrees.to(device)
        input_order = torch.argsort(degrees, stable=True)
        sorted_degrees = degrees[input_order]
        levels = torch.arange(int(sorted_degrees.max()) + 1, device=device)
        # inputs_upto[d]: how many inputs (in degree order) have degree <= d
        inputs_upto = torch.searchsorted(sorted_degrees, levels, right=True).tolist()

        # Each layer with its units sorted by level and its columns in the order
        # of the layer below, so that "every unit of level <= d" is a prefix.
        layers = []
        below_order = input_order
        for layer, level in zip(self.layers, self._unit_levels()):
            weight = layer.weight * layer.mask
            n_inputs = below_order.numel()
            order = torch.argsort(level, stable=True)
            base = layer.bias.to(dtype)
            if context is not None and weight.shape[1] > n_inputs:
                # the context is known from the start: its share is a per-row bias
                base = torch.addmm(base, context.to(dtype), weight[:, n_inputs:].t())
            layers.append(
                dict(
                    weight=weight[:, :n_inputs][:, below_order],
                    base=base,
                    order=order,
                    upto=torch.searchsorted(level[order], levels, right=True).tolist(),
                )
            )
            below_order = order
        *hidden, output = layers
        for layer in hidden:
            layer["weight"] = layer["weight"][layer["order"]]
            layer["base"] = layer["base"][..., layer["order"]]

        # Degree order. Every step reads only the features and units solved
        # before it, so the buffers need no initial values.
        like = torch.empty((), dtype=dtype, device=device)
        x = _reusable(("solve", "x"), (n_samples, n_features), like)[0]
        h = [
            _reusable(("solve", index), (n_samples, len(layer["order"])), like)[0]
            for index, layer in enumerate(hidden)
        ]
        done = [0] * len(hidden)
        params = [torch.empty(n_samples, n_features, dtype=dtype, device=device) for _ in range(n_params)]
        for t in torch.unique(sorted_degrees).tolist():
            below_upto, below = inputs_upto, x
            for index, layer in enumerate(hidden):
                start, stop = done[index], layer["upto"][t - 1]
                if stop > start:
                    inputs = below[:, : below_upto[t - 1]]
                    weight = layer["weight"][start:stop, : below_upto[t - 1]]
                    pre = torch.addmm(layer["base"][..., start:stop], inputs, weight.t())
                    h[index][:, start:stop] = activation(pre)
                    done[index] = stop
                below_upto, below = layer["upto"], h[index]
            first, last = inputs_upto[t - 1], inputs_upto[t]
            features = input_order[first:last]
            rows = (torch.arange(n_params, device=device)[:, None] * n_features + features).flatten()
            weight = output["weight"][rows, : below_upto[t - 1]]
            out = torch.addmm(output["base"][..., rows], below[:, : below_upto[t - 1]], weight.t())
            blocks = out.split(features.numel(), dim=-1)
            x[:, first:last] = step(features, blocks)
            for block, values in zip(params, blocks):
                block[:, features] = values
        solution = torch.empty_like(x)
        solution[:, input_order] = x
        return solution, tuple(params)

    def _solve_differentiably(self, step, n_samples, context, like):
        """:meth:`solve` by one full pass per feature, out of place (autograd can follow)."""
        order = torch.argsort(self.degrees.to(like.device), stable=True)
        x = torch.zeros(n_samples, self.n_features, dtype=like.dtype, device=like.device)
        for _ in range(self.n_features):
            params = self(x, context)
            x = step(order, tuple(block[:, order] for block in params))[:, torch.argsort(order)]
        return x, self(x, context)
