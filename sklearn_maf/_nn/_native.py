"""The one door into the optional C module ``_fused``: tensors in, every one checked.

The C functions read raw buffers: given a tensor of the wrong shape, dtype,
layout or device they would read or write the wrong memory. Every call goes
through a function here, which takes tensors, checks each against the others
(dtype, contiguity, device and every size) and raises ``ValueError`` before C
runs; the C module itself is imported nowhere else. The buffers a pass writes
its results into are made here.

Without the module (no C compiler at install) :func:`available` is False and
the callers run the same arithmetic as torch operations.
"""

import torch

try:  # built by setup.py where a C compiler is available
    from . import _fused
except ImportError:  # pragma: no cover - depends on the install
    _fused = None

__all__ = [
    "activation_backward",
    "adam_step",
    "affine_backward",
    "affine_forward",
    "affine_score",
    "available",
    "avx2",
    "batch_norm_backward",
    "batch_norm_forward",
    "gaussian_loss",
    "linear_relu_score",
    "set_avx2",
]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


def available(like=None):
    """Whether the C passes can run (on tensors like ``like``: float32 or float64 on the CPU)."""
    if _fused is None:
        return False
    return like is None or (like.is_cpu and like.dtype in _DTYPE_CODES)


def avx2():
    """Whether the passes compiled for AVX2 and FMA run (False without the module)."""
    return _fused is not None and _fused.avx2()


def set_avx2(flag):
    """Run the AVX2 passes (where the CPU has them) or the baseline's; returns the previous setting."""
    return _fused.set_avx2(flag)


def _check(name, tensor, dtype, shape):
    """``tensor``'s address, once it is a contiguous CPU tensor of ``dtype`` and ``shape``."""
    if tensor.dtype is not dtype or not tensor.is_cpu or not tensor.is_contiguous() or tensor.shape != shape:
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on the CPU, got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)} on {tensor.device} "
            f"(contiguous: {tensor.is_contiguous()})"
        )
    return tensor.data_ptr()


def _code(tensor):
    """The C module's dtype code of ``tensor`` (0: float32, 1: float64)."""
    code = _DTYPE_CODES.get(tensor.dtype)
    if code is None or _fused is None:
        raise ValueError(
            f"the C passes run on float32 or float64 tensors with the module built; got {tensor.dtype}, "
            f"module {'missing' if _fused is None else 'built'}"
        )
    return code


def _share(share, n_rows, dtype):
    """``(address, stride)`` of the rows' shares in a mean: one for all (0-d), or one per row."""
    if share.dim() == 0:
        return _check("share", share, dtype, ()), 0
    return _check("share", share.reshape(-1), dtype, (n_rows,)), 1


def _slabs(tensor):
    """The addresses of ``tensor[0]``, ``tensor[1]``, ...: slabs of one contiguous buffer made here."""
    step = tensor.numel() // tensor.shape[0] * tensor.element_size()
    return [tensor.data_ptr() + index * step for index in range(tensor.shape[0])]


# ------------------------------------------------------------------ training passes


def affine_forward(out, x, bound, log_det):
    """One affine MAF layer on a batch, adding its log-det per row to ``log_det``.

    ``out`` (n, 2 d) is the MADE's output, shift block then raw log-scale
    block; ``x`` (n, d) its input. Returns ``factors`` (3, n, d): ``u``,
    ``sigmoid(-2 raw / bound)`` and ``exp(-alpha)``, what the backward pass
    reads (see :meth:`AffineMADE.forward`).
    """
    code = _code(x)
    n_rows, d = x.shape
    dtype = x.dtype
    args = (_check("out", out, dtype, (n_rows, 2 * d)), _check("x", x, dtype, (n_rows, d)))
    log_det_address = _check("log_det", log_det, dtype, (n_rows,))
    factors = x.new_empty((3, n_rows, d))
    _fused.affine_forward(code, n_rows, d, float(bound), *args, *_slabs(factors), log_det_address)
    return factors


def affine_backward(factors, grad_u, share, bias_grad):
    """``(d loss / d out, d loss / d x)`` of :func:`affine_forward`; writes the output bias's gradient."""
    code = _code(grad_u)
    _, n_rows, d = factors.shape
    dtype = grad_u.dtype
    _check("factors", factors, dtype, (3, n_rows, d))
    grad_u_address = _check("grad_u", grad_u, dtype, (n_rows, d))
    share_address, share_stride = _share(share, n_rows, dtype)
    bias_address = _check("bias_grad", bias_grad, dtype, (2 * d,))
    grad_out = grad_u.new_empty((n_rows, 2 * d))
    grad_x = grad_u.new_empty((n_rows, d))
    u, sigmoid, scale = _slabs(factors)
    _fused.affine_backward(
        code, n_rows, d, grad_u_address, scale, u, sigmoid, share_address, share_stride,
        grad_out.data_ptr(), grad_x.data_ptr(), bias_address,
    )  # fmt: skip
    return grad_out, grad_x


def activation_backward(grad, hidden, tanh, bias_grad):
    """``grad`` times the activation's derivative, in place, given its output ``hidden``; writes ``bias_grad``."""
    code = _code(grad)
    n_rows, n_units = grad.shape
    dtype = grad.dtype
    addresses = (
        _check("grad", grad, dtype, (n_rows, n_units)),
        _check("hidden", hidden, dtype, (n_rows, n_units)),
        _check("bias_grad", bias_grad, dtype, (n_units,)),
    )
    _fused.activation_backward(code, n_rows, n_units, bool(tanh), *addresses)
    return grad


def gaussian_loss(u, log_det, share):
    """``(loss, d loss / d u)`` of the N(0, I) base: ``sum share (|u|^2 / 2 - log_det)``, less its constant."""
    code = _code(u)
    n_rows, d = u.shape
    dtype = u.dtype
    u_address = _check("u", u, dtype, (n_rows, d))
    log_det_address = _check("log_det", log_det, dtype, (n_rows,))
    share_address, share_stride = _share(share, n_rows, dtype)
    loss = u.new_empty(())
    grad = u.new_empty((n_rows, d))
    _fused.gaussian_loss(
        code, n_rows, d, u_address, log_det_address, share_address, share_stride, grad.data_ptr(), loss.data_ptr()
    )
    return loss, grad


def batch_norm_forward(x, share, log_gamma, beta, running_mean, running_var, momentum, eps, log_det):
    """Batch norm with the (weighted) batch's moments; moves the running ones, adds the log-det.

    Returns ``(rows, features)``: ``rows`` (2, n, d) holds ``y`` and ``x -
    mean``, ``features`` (2, d) ``var + eps`` and the per-feature scale.
    """
    code = _code(x)
    n_rows, d = x.shape
    dtype = x.dtype
    x_address = _check("x", x, dtype, (n_rows, d))
    share_address, share_stride = _share(share, n_rows, dtype)
    parameters = (
        _check("log_gamma", log_gamma, dtype, (d,)), _check("beta", beta, dtype, (d,)),
        _check("running_mean", running_mean, dtype, (d,)), _check("running_var", running_var, dtype, (d,)),
    )  # fmt: skip
    log_det_address = _check("log_det", log_det, dtype, (n_rows,))
    rows = x.new_empty((2, n_rows, d))
    features = x.new_empty((2, d))
    _fused.batch_norm_forward(
        code, n_rows, d, x_address, share_address, share_stride, *parameters, float(momentum), float(eps),
        *_slabs(rows), *_slabs(features), log_det_address,
    )  # fmt: skip
    return rows, features


def batch_norm_backward(rows, features, grad_y, share, grad_log_gamma, grad_beta, need_input_grad=True):
    """Write the gradients of ``log_gamma`` and ``beta`` of :func:`batch_norm_forward`; d loss / d x, or None."""
    code = _code(grad_y)
    _, n_rows, d = rows.shape
    dtype = grad_y.dtype
    _check("rows", rows, dtype, (2, n_rows, d))
    _check("features", features, dtype, (2, d))
    grad_y_address = _check("grad_y", grad_y, dtype, (n_rows, d))
    share_address, share_stride = _share(share, n_rows, dtype)
    gradients = (_check("grad_log_gamma", grad_log_gamma, dtype, (d,)), _check("grad_beta", grad_beta, dtype, (d,)))
    grad_x = grad_y.new_empty((n_rows, d)) if need_input_grad else None
    _, centred = _slabs(rows)
    _fused.batch_norm_backward(
        code, n_rows, d, grad_y_address, centred, *_slabs(features), share_address, share_stride, *gradients,
        0 if grad_x is None else grad_x.data_ptr(),
    )  # fmt: skip
    return grad_x


def adam_step(
    param, grad, mask, decay, exp_avg, exp_avg_sq, *, step, lr, betas, eps,
    clip_average=None, clip_first=False, clip_factor=0.0, clip_momentum=0.0, average=None, average_weight=0.0,
):  # fmt: skip
    """Adam step number ``step`` on flat buffers of all the parameters; returns the gradient's norm.

    Masks the gradient (``grad * mask``), scales it to at most ``clip_factor``
    times the running norm in ``clip_average`` (a 0-d tensor, updated with
    ``clip_momentum``; ``clip_first``: start it at this step's norm; None: no
    clipping), adds the L2 term ``decay * param``, takes torch's Adam step, and
    moves ``average`` (None: none) by ``average_weight`` towards the new
    parameters. The norm is that of the masked gradient, before clipping.
    """
    code = _code(param)
    n = param.numel()
    dtype = param.dtype
    shape = (n,)
    buffers = (
        _check("param", param, dtype, shape), _check("grad", grad, dtype, shape), _check("mask", mask, dtype, shape),
        _check("decay", decay, dtype, shape), _check("exp_avg", exp_avg, dtype, shape),
        _check("exp_avg_sq", exp_avg_sq, dtype, shape),
    )  # fmt: skip
    average_address = 0 if average is None else _check("average", average, dtype, (n,))
    clip_address = 0 if clip_average is None else _check("clip_average", clip_average, dtype, ())
    beta1, beta2 = betas
    return _fused.adam_step(
        code, n, *buffers, average_address, clip_address, bool(clip_first), float(clip_factor),
        float(clip_momentum), float(lr), float(beta1), float(beta2), float(eps), 1 - beta1**step, 1 - beta2**step,
        float(average_weight),
    )  # fmt: skip


# ------------------------------------------------------------------- scoring passes (float64)


def _feature_major(name, tensor, shape):
    """The checks of a (rows, features) float64 CPU view whose columns are contiguous, ``x.t()`` of a (d, n) buffer."""
    n_rows, d = shape
    if (
        tensor.dtype is not torch.float64 or not tensor.is_cpu or tensor.shape != shape
        or (n_rows > 1 and tensor.stride(0) != 1) or (d > 1 and tensor.stride(1) < n_rows)
    ):  # fmt: skip
        raise ValueError(
            f"{name} must be a float64 CPU tensor of shape {tuple(shape)} with contiguous columns, got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}, strides {tensor.stride()} on {tensor.device}"
        )
    return tensor.data_ptr()


def affine_score(x, shift, raw_log_scale, bound):
    """``(u, log_det)`` of an affine MAF layer on feature-major float64 rows, without gradients.

    ``shift`` and ``raw_log_scale`` are (n, d) views whose columns are
    contiguous and ``n`` apart (blocks of one (2 d, n) product, as
    :meth:`MADE._forward_inference` returns them); ``x`` (n, d) has contiguous
    columns. ``u`` comes back in the same layout.
    """
    _code(x)
    n_rows, d = x.shape
    x_address = _feature_major("x", x, (n_rows, d))
    for name, block in (("shift", shift), ("raw_log_scale", raw_log_scale)):
        _feature_major(name, block, (n_rows, d))
        if d > 1 and block.stride(1) != n_rows:
            raise ValueError(f"{name}'s columns must be {n_rows} apart, got strides {block.stride()}")
    u = torch.empty((d, n_rows), dtype=torch.float64)
    log_det = torch.empty(n_rows, dtype=torch.float64)
    _fused.affine_score(
        n_rows, d, float(bound), shift.data_ptr(), raw_log_scale.data_ptr(), x_address,
        x.stride(1) if d > 1 else n_rows, u.data_ptr(), log_det.data_ptr(),
    )  # fmt: skip
    return u.t(), log_det


def linear_relu_score(weight, x, out):
    """``out = relu(weight @ x)`` in float64: ``weight`` (m, k) and ``x`` (k, n) contiguous, ``out`` (m, n) rows.

    ``out`` may be a view of rows of a larger buffer (its rows contiguous, any
    distance apart). For a first layer of few inputs (see :mod:`.made`).
    """
    _code(x)
    m, k = weight.shape
    n = x.shape[1] if x.dim() == 2 else -1
    weight_address = _check("weight", weight, torch.float64, (m, k))
    x_address = _check("x", x, torch.float64, (k, n))
    if (
        out.dtype is not torch.float64 or not out.is_cpu or out.shape != (m, n)
        or (n > 1 and out.stride(1) != 1) or (m > 1 and out.stride(0) < n)
    ):  # fmt: skip
        raise ValueError(
            f"out must be a float64 CPU tensor of shape {(m, n)} with contiguous rows, got {out.dtype} "
            f"of shape {tuple(out.shape)}, strides {out.stride()} on {out.device}"
        )
    _fused.linear_relu_score(n, m, k, weight_address, x_address, n, out.data_ptr(), out.stride(0) if m > 1 else n)
    return out
