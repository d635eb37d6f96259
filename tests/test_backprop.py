"""The hand-written back-propagation of sklearn_maf._nn.backprop against autograd."""

import itertools
import math

import pytest
import torch

from sklearn_maf._nn import MAF, _native
from sklearn_maf._nn.backprop import Backprop, loss_and_grad, masked_weights, supports
from sklearn_maf._optimizer import make_optimizer
from sklearn_maf._training import TrainingConfig, train_flow

DTYPE = torch.float64


@pytest.fixture(autouse=True, params=["fused", "torch"])
def passes(request, monkeypatch):
    """Every test runs twice: element-wise passes in C (where built), and as torch operations."""
    if request.param == "torch":
        monkeypatch.setattr(_native, "_fused", None)
    elif not _native.available():
        pytest.skip("sklearn_maf._nn._fused was not built (no C compiler at install)")
    return request.param


def _pair(n_features, seed=1, **params):
    """Two identical float64 MAFs, every parameter entry moved off its initial value."""
    X = torch.randn(64, n_features, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    noise = torch.Generator().manual_seed(seed + 100)
    flows = []
    for _ in range(2):
        flow = MAF(
            X.mean(0), X.std(0), generator=torch.Generator().manual_seed(seed), dtype=DTYPE,
            **{"n_layers": 3, "hidden_units": 7, "n_hidden_layers": 2, **params},
        )  # fmt: skip
        flows.append(flow.train())
    with torch.no_grad():  # masked entries too: the masks must do their work in every pass
        for first, second in zip(*(flow.parameters() for flow in flows)):
            step = 0.3 * torch.randn(first.shape, generator=noise, dtype=DTYPE)
            first.add_(step)
            second.add_(step)
    return X * 2 + 1, flows


def _manual(flow, X, weight=None, assume_masked=False, context=None):
    loss = loss_and_grad(flow, X, weight, assume_masked, context)
    weights, masks = masked_weights(flow)
    torch._foreach_mul_([w.grad for w in weights], masks)
    return loss


def _autograd(flow, X, weight=None, context=None):
    log_prob = flow.log_prob(X, context, weight=weight)
    loss = -(log_prob.mean() if weight is None else (log_prob * weight).sum() / weight.sum())
    loss.backward()
    return loss.detach()


def _compare(reference, manual, X, n_context=0, weighted=False):
    """Autograd's gradients against the plan's, given a random context and weights if asked."""
    generator = torch.Generator().manual_seed(5)
    context = torch.randn(X.shape[0], n_context, generator=generator, dtype=DTYPE) if n_context else None
    weight = torch.rand(X.shape[0], generator=generator, dtype=DTYPE) * 3 if weighted else None
    assert supports(manual, context=context)
    loss_reference = _autograd(reference, X, weight, context)
    _assert_same(reference, manual, loss_reference, _manual(manual, X, weight, context=context))


def _assert_same(first, second, loss_first, loss_second):
    torch.testing.assert_close(loss_first, loss_second, rtol=1e-12, atol=0)
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        scale = 1 + float(a.grad.abs().max())
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-11 * scale, msg=name)
    for (name, a), b in zip(first.named_buffers(), second.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13, msg=name)  # running averages


@pytest.mark.parametrize(
    "n_features, batch_norm, activation, n_hidden_layers, order",
    list(itertools.product([1, 2, 5], [True, False], ["relu", "tanh"], [0, 1, 2], ["reverse", "random"])),
)
def test_gradients_equal_autograd(n_features, batch_norm, activation, n_hidden_layers, order):
    X, (reference, manual) = _pair(
        n_features, batch_norm=batch_norm, activation=activation,
        n_hidden_layers=n_hidden_layers, order=order,
    )  # fmt: skip
    _assert_same(reference, manual, _autograd(reference, X), _manual(manual, X))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_weighted_gradients_equal_autograd(batch_norm):
    X, (reference, manual) = _pair(3, batch_norm=batch_norm)
    weight = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(3), dtype=DTYPE) * 3
    _assert_same(reference, manual, _autograd(reference, X, weight), _manual(manual, X, weight))


@pytest.mark.parametrize(
    "n_features, batch_norm, weighted", list(itertools.product([1, 3], [True, False], [False, True]))
)
def test_student_t_base_gradients_equal_autograd(n_features, batch_norm, weighted):
    """The t base's degrees of freedom get autograd's gradient too, heavy and light tails alike."""
    X, (reference, manual) = _pair(n_features, batch_norm=batch_norm, base="student-t")
    with torch.no_grad():  # df from about 2 to about 55
        for flow in (reference, manual):
            flow.base.raw_df.copy_(torch.linspace(0.0, 0.4, n_features, dtype=DTYPE))
    _compare(reference, manual, X, weighted=weighted)
    assert float(manual.base.raw_df.grad.abs().min()) > 0


@pytest.mark.parametrize("df", [1.5, 3.0, 200.0])
@pytest.mark.parametrize(
    "n_features, batch_norm, weighted", list(itertools.product([1, 3], [True, False], [False, True]))
)
def test_elliptical_t_base_gradients_equal_autograd(n_features, batch_norm, weighted, df):
    """The multivariate t base's degrees of freedom get autograd's gradient too."""
    X, (reference, manual) = _pair(n_features, batch_norm=batch_norm, base="elliptical-t")
    for flow in (reference, manual):
        flow.base.set_df(df)
    _compare(reference, manual, X, weighted=weighted)
    assert float(manual.base.raw_df.grad.abs().min()) > 0


@pytest.mark.parametrize(
    "n_features, n_hidden_layers, base, weighted",
    [(1, 0, "gaussian", False), (3, 1, "gaussian", False), (3, 2, "gaussian", True),
     (1, 2, "student-t", False), (3, 0, "student-t", True), (3, 1, "elliptical-t", True)],
)  # fmt: skip
def test_context_gradients_equal_autograd(n_features, n_hidden_layers, base, weighted):
    """A conditional flow: the context enters each MADE's first layer and gets no gradient."""
    X, (reference, manual) = _pair(n_features, n_hidden_layers=n_hidden_layers, n_context=2, base=base)
    if base == "student-t":
        with torch.no_grad():
            for flow in (reference, manual):
                flow.base.raw_df.copy_(torch.linspace(0.0, 0.4, n_features, dtype=DTYPE))
    _compare(reference, manual, X, n_context=2, weighted=weighted)
    # the context columns of the first layers' weights were trained
    mades = [layer.made for layer in manual.transforms if hasattr(layer, "made")]
    first = [made.layers[0].weight.grad[:, n_features:] for made in mades]
    assert all(float(grad.abs().max()) > 0 for grad in first)


@pytest.mark.parametrize(
    "n_features, n_hidden_layers, n_components, n_context, weighted",
    [(1, 0, 1, 0, False), (1, 2, 3, 0, True), (3, 0, 3, 2, False), (3, 1, 1, 2, True),
     (3, 2, 3, 0, False), (3, 2, 3, 2, True)],
)  # fmt: skip
def test_mog_base_gradients_equal_autograd(n_features, n_hidden_layers, n_components, n_context, weighted):
    """The MADE MoG base: its MADE, its offset and the gradient it passes down to the flow."""
    X, (reference, manual) = _pair(
        n_features, n_hidden_layers=n_hidden_layers, n_context=n_context, base="mog",
        n_components=n_components,
    )  # fmt: skip
    _compare(reference, manual, X, n_context=n_context, weighted=weighted)
    # the means' and log-scales' offsets were trained (one component's weight has no gradient)
    assert float(manual.base.offset.grad[n_components:].abs().min()) > 0


def test_bounded_inputs_equal_autograd():
    X, _ = _pair(2)
    X = torch.sigmoid(X)  # inside (0, 1)
    bounds = (torch.zeros(2, dtype=DTYPE), torch.tensor([1.0, float("inf")], dtype=DTYPE))
    flows = [
        MAF(X.mean(0), X.std(0), n_layers=2, hidden_units=5, n_hidden_layers=1, bounds=bounds,
            generator=torch.Generator().manual_seed(0), dtype=DTYPE).train()
        for _ in range(2)
    ]  # fmt: skip
    assert supports(flows[1])
    _assert_same(flows[0], flows[1], _autograd(flows[0], X), _manual(flows[1], X))


@pytest.mark.parametrize("base", ["gaussian", "elliptical-t"])
def test_whitened_inputs_equal_autograd(base):
    X, _ = _pair(3)
    chol = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]], dtype=DTYPE)
    flows = [
        MAF(X.mean(0), X.std(0), n_layers=2, hidden_units=5, n_hidden_layers=1, base=base,
            whiten=(torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE), chol),
            generator=torch.Generator().manual_seed(0), dtype=DTYPE).train()
        for _ in range(2)
    ]  # fmt: skip
    assert supports(flows[1])
    _assert_same(flows[0], flows[1], _autograd(flows[0], X), _manual(flows[1], X))


def test_only_supported_models_take_the_fast_path():
    X, (flow, _) = _pair(2)
    assert supports(flow)
    assert not supports(flow, context=X[:, :1])  # a context the flow was not built for
    _, (conditional, _) = _pair(2, n_context=1)
    assert supports(conditional, context=X[:, :1])
    assert not supports(conditional)  # a conditional flow needs its context
    mog = MAF(X.mean(0), X.std(0), n_layers=1, hidden_units=5, n_hidden_layers=1, base="mog",
              n_components=2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)  # fmt: skip
    assert supports(mog)
    student_t = MAF(X.mean(0), X.std(0), n_layers=1, hidden_units=5, n_hidden_layers=1, base="student-t",
                    generator=torch.Generator().manual_seed(0), dtype=DTYPE)  # fmt: skip
    assert supports(student_t)
    elliptical_t = MAF(X.mean(0), X.std(0), n_layers=1, hidden_units=5, n_hidden_layers=1, base="elliptical-t",
                       generator=torch.Generator().manual_seed(0), dtype=DTYPE)  # fmt: skip
    assert supports(elliptical_t)
    assert not supports(torch.nn.Identity())


def test_training_keeps_masked_weights_at_zero():
    """Masked weights start at zero and stay there: their gradients are masked."""
    X, _ = _pair(4)
    flow = MAF(X.mean(0), X.std(0), n_layers=3, hidden_units=7, n_hidden_layers=2,
               generator=torch.Generator().manual_seed(0), dtype=DTYPE).train()  # fmt: skip
    history = train_flow(
        flow, X, generator=torch.Generator().manual_seed(0), optimizer=make_optimizer(flow, 1e-2, 1e-3),
        config=TrainingConfig(
            batch_size=16, learning_rate=1e-2, alpha=1e-3, max_iter=3, tol=0.0, n_iter_no_change=100,
            warn_not_converged=False,
        ),
    )  # fmt: skip
    assert history.n_iter == 3
    for weight, mask in zip(*masked_weights(flow)):
        assert torch.all(weight[mask == 0] == 0)
        assert torch.any(weight[mask == 1] != 0)


def test_masked_weights_zeroed_once_give_the_same_gradients():
    """``assume_masked`` skips the masks once their entries are zero, with the same results."""
    X, (reference, manual) = _pair(4, batch_norm=True)
    with torch.no_grad():
        for flow in (reference, manual):
            torch._foreach_mul_(*masked_weights(flow))
    _assert_same(reference, manual, _manual(reference, X), _manual(manual, X, assume_masked=True))


def test_plan_reused_across_steps_follows_the_updated_weights():
    """A Backprop built once gives autograd's gradients at every step, as Adam moves the weights in place."""
    X, (reference, manual) = _pair(4, batch_norm=True)
    with torch.no_grad():
        for flow in (reference, manual):
            torch._foreach_mul_(*masked_weights(flow))
    optimizers = [make_optimizer(flow, 1e-2, 1e-3) for flow in (reference, manual)]
    plan = Backprop(manual, assume_masked=True)
    gradients = [param.grad for param in manual.parameters()]
    for _ in range(3):
        for param in reference.parameters():
            param.grad = None
        loss_reference = _autograd(reference, X)
        loss_manual = plan.loss_and_grad(X)
        plan.mask_gradients()
        _assert_same(reference, manual, loss_reference, loss_manual)
        for optimizer in optimizers:
            optimizer.step()
        # Adam turns round-off in near-zero gradients into steps of up to the
        # learning rate; copy (in place, as Adam writes) to compare like with like
        manual.load_state_dict(reference.state_dict())
    # the gradients were written into the same buffers all along
    assert all(param.grad is grad for param, grad in zip(manual.parameters(), gradients))


def test_a_plan_step_leaves_the_module_usable_by_autograd():
    """The plan computes in inference mode, yet the tensors it writes into stay normal ones.

    A gradient buffer or running average made inside inference mode would
    reject the in-place updates of autograd, an optimizer or ``load_state_dict``
    outside it, which is what ``partial_fit`` and the non-fast paths do next.
    """
    X, (reference, manual) = _pair(3, batch_norm=True)
    plan = Backprop(manual)
    loss = plan.loss_and_grad(X)
    written = [param.grad for param in manual.parameters()] + list(manual.buffers())
    assert not any(tensor.is_inference() for tensor in written)
    assert torch.isfinite(loss)
    # autograd adds into the same gradient buffers in place; the buffers load in place
    _autograd(manual, X)
    make_optimizer(manual, 1e-2, 0.0).step()
    manual.load_state_dict(reference.state_dict())


def test_c_passes_asked_for_where_they_cannot_run_are_refused(passes):
    X, (_, flow) = _pair(3)
    if passes == "torch":  # the module missing, as without a C compiler
        with pytest.raises(ValueError, match="module _fused missing"):
            Backprop(flow, native=True)
        assert not Backprop(flow).native
    else:
        assert Backprop(flow, native=True).native and Backprop(flow).native
        with pytest.raises(ValueError, match="torch.float16"):
            Backprop(flow.to(torch.float16), native=True)
    assert not Backprop(flow, native=False).native


class _ElementwiseAffine(torch.nn.Module):
    """A learned transform with no hand-written backward pass: ``u = x exp(a) + b``."""

    def __init__(self, n_features):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.linspace(-0.3, 0.4, n_features, dtype=DTYPE))
        self.shift = torch.nn.Parameter(torch.linspace(0.2, -0.1, n_features, dtype=DTYPE))

    def forward(self, x, context=None, weight=None):
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, u, context=None):
        return (u - self.shift) * torch.exp(-self.log_scale), -self.log_scale.sum().expand(u.shape[0])


class _ScaledNormal(torch.nn.Module):
    """A base distribution with no hand-written gradient: N(0, exp(2 c) I), c learned."""

    def __init__(self, n_features):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(0.3, dtype=DTYPE))

    def log_prob(self, u, context=None):
        z = u * torch.exp(-self.log_scale)
        return -0.5 * (z * z).sum(-1) - u.shape[-1] * (self.log_scale + 0.5 * math.log(2 * math.pi))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("base", ["gaussian", "mog", "scaled"])
def test_layers_without_a_backward_pass_are_differentiated_by_autograd_within_the_loop(weighted, base):
    """A new transform or base is a class with forward and log-density only: the step still works.

    Its place in the loop takes autograd's gradients, the hand-written
    layers around it theirs, and together they equal autograd's over the
    whole flow.
    """
    X, flows = _pair(3, batch_norm=True, base="gaussian" if base == "scaled" else base, n_components=2)
    for flow in flows:
        flow.transforms.insert(1, _ElementwiseAffine(3))  # after the fixed standardisation
        flow.transforms.insert(4, _ElementwiseAffine(3))  # between two MAF layers
        if base == "scaled":
            flow.base = _ScaledNormal(3)
    reference, manual = flows
    kinds = [type(layer).__name__ for layer in Backprop(manual).layers]
    assert kinds.count("_AutogradTransform") == 2 and kinds.count("AffineMADE") == 3
    _compare(reference, manual, X, weighted=weighted)
    assert float(manual.transforms[1].log_scale.grad.abs().min()) > 0
    if base == "scaled":
        assert float(manual.base.log_scale.grad.abs()) > 0


class _Shift(torch.nn.Module):
    """A volume-preserving transform, ``u = x + b``: its log-det is a constant outside the graph."""

    def __init__(self, n_features):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.linspace(0.2, -0.1, n_features, dtype=DTYPE))

    def forward(self, x, context=None, weight=None):
        return x + self.shift, x.new_zeros(x.shape[0])

    def inverse(self, u, context=None):
        return u - self.shift, u.new_zeros(u.shape[0])


@pytest.mark.parametrize("weighted", [False, True])
def test_a_layer_with_a_constant_log_det_is_differentiated_by_autograd(weighted):
    """The autograd fallback back-propagates through a log-det that is not part of the graph.

    It had passed the log-det to ``torch.autograd.backward`` unconditionally,
    which raises for a tensor that does not require a gradient.
    """
    X, flows = _pair(3, batch_norm=True)
    for flow in flows:
        flow.transforms.insert(3, _Shift(3))  # between two MAF layers
    reference, manual = flows
    _compare(reference, manual, X, weighted=weighted)
    assert float(manual.transforms[3].shift.grad.abs().min()) > 0


def test_a_flow_without_masked_weights_trains_by_the_loop():
    """A flow whose layers and base hold no MADE: masking the (no) weights is a no-op, not an error."""
    X, flows = _pair(3, n_layers=1, batch_norm=False)
    for flow in flows:
        flow.transforms[1] = _ElementwiseAffine(3)  # in place of the only MAF layer
    reference, manual = flows
    assert masked_weights(manual) == ([], [])
    plan = Backprop(manual, assume_masked=True)
    plan.zero_masked_weights()
    loss = plan.loss_and_grad(X)
    plan.mask_gradients()
    _assert_same(reference, manual, _autograd(reference, X), loss)
    history = train_flow(
        manual, X, generator=torch.Generator().manual_seed(0), optimizer=make_optimizer(manual, 1e-2, 0.0),
        config=TrainingConfig(
            batch_size=16, learning_rate=1e-2, alpha=0.0, max_iter=2, tol=0.0, n_iter_no_change=100,
            warn_not_converged=False,
        ),
    )  # fmt: skip
    assert history.n_iter == 2 and math.isfinite(history.loss_curve[-1])
