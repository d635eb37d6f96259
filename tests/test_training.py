"""Property tests for sklearn_maf._training: batches, history, early stopping, failures, weights."""

import math
import warnings

import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf._nn import MAF
from sklearn_maf import _training
from sklearn_maf._optimizer import _ParameterAverage, make_optimizer
from sklearn_maf._training import TrainingConfig, _batches, mean_log_prob, train_flow

DTYPE = torch.float64


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _flow(*, batch_norm=True, seed=0):
    """A small float64 2-D MAF: two MAF layers, one batch norm between them when asked."""
    return MAF(
        torch.zeros(2, dtype=DTYPE),
        torch.ones(2, dtype=DTYPE),
        n_layers=2,
        hidden_units=6,
        n_hidden_layers=1,
        batch_norm=batch_norm,
        generator=_generator(seed),
        dtype=DTYPE,
    )


def _data(n_samples=40, seed=1, shift=0.0):
    """Rows of a curved 2-D density, something for the flow to learn."""
    z = torch.randn(n_samples, 2, generator=_generator(seed), dtype=DTYPE)
    return torch.stack([z[:, 0], z[:, 0] ** 2 / 2 + 0.5 * z[:, 1]], dim=1) + shift


def _train(module, X, weight=None, validation=None, *, generator=None, optimizer=None, **params):
    """:func:`train_flow` with small defaults (never stopping early); ``params`` override the config's."""
    options = dict(batch_size=16, learning_rate=1e-2, alpha=0.0, max_iter=4, tol=0.0, n_iter_no_change=1000)
    options.update(params)
    return train_flow(
        module, X, weight, validation=validation, config=TrainingConfig(**options),
        generator=_generator(2) if generator is None else generator, optimizer=optimizer,
    )  # fmt: skip


def _max_iter_warning(max_iter):
    return pytest.warns(ConvergenceWarning, match=rf"maximum iterations \({max_iter}\) reached")


def _state(module):
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def _assert_states_equal(first, second, rtol=0.0, atol=0.0):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(
            first[name],
            second[name],
            rtol=rtol,
            atol=atol,
            msg=lambda message: f"{name}: {message}",
        )


@pytest.mark.parametrize("batch_size", [1, 2, 4, 16, 100])
@pytest.mark.parametrize("n_rows", [2, 3, 7, 16, 17, 33])
def test_batches_cover_every_row_once_and_never_end_with_a_single_row(n_rows, batch_size):
    batches = _batches(n_rows, batch_size, _generator(0))
    assert torch.equal(torch.sort(torch.cat(batches)).values, torch.arange(n_rows))
    assert all(batch.numel() == batch_size for batch in batches[:-1])
    assert 2 <= batches[-1].numel() <= batch_size + 1
    again = _batches(n_rows, batch_size, _generator(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_batches_skip_rows_of_zero_weight():
    """Only rows of positive weight are batched; with none at zero, the batches are unchanged."""
    weight = torch.zeros(50, dtype=DTYPE)
    weight[[3, 17, 18, 40]] = 2.0
    batches = _batches(50, 3, _generator(0), weight=weight)
    assert torch.equal(torch.sort(torch.cat(batches)).values, torch.tensor([3, 17, 18, 40]))
    positive = torch.rand(50, generator=_generator(1), dtype=DTYPE) + 0.1
    weighted, unweighted = _batches(50, 8, _generator(0), weight=positive), _batches(50, 8, _generator(0))
    assert all(torch.equal(a, b) for a, b in zip(weighted, unweighted))


def test_sparse_positive_weights_train_without_a_non_finite_loss():
    """Regression: a batch of zero-weight rows only gave the loss 0 / 0 = NaN in epoch 1."""
    X = _data(400)
    weight = torch.zeros(400, dtype=DTYPE)
    weight[::10] = 1.0  # 40 rows count; most batches of 8 drawn from all rows would have none
    module = _flow()
    with _max_iter_warning(3):
        history = _train(module, X, weight, batch_size=8, max_iter=3)
    assert not history.non_finite and history.n_iter == 3
    assert all(math.isfinite(loss) for loss in history.loss_curve)
    assert history.n_steps == 3 * 5  # 40 weighted rows in batches of 8


def test_batches_are_reshuffled_every_epoch():
    generator = _generator(0)
    first, second = (torch.cat(_batches(30, 8, generator)) for _ in range(2))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("with_validation", [False, True])
def test_train_flow_returns_its_history(with_validation):
    module = _flow()
    validation = (_data(10, seed=3), None, None) if with_validation else None
    with _max_iter_warning(4):
        history = _train(module, _data(), validation=validation)

    assert history.n_iter == len(history.loss_curve) == 4
    assert history.n_steps == 4 * 3  # 40 rows in batches of 16, 16 and 8
    assert all(math.isfinite(loss) for loss in history.loss_curve)
    assert history.loss_curve[-1] < history.loss_curve[0]
    assert history.best_loss == min(history.loss_curve)
    assert not history.stopped_early and not history.non_finite
    assert not module.training
    if with_validation:
        assert len(history.validation_scores) == 4
        assert history.best_validation_score == max(history.validation_scores)
    else:
        assert history.validation_scores == []


@pytest.mark.parametrize("weighted", [False, True])
def test_epoch_loss_is_the_weighted_mean_over_all_rows_whatever_the_batches(weighted):
    """Batches of unequal weight count by their weight, not their number of rows."""
    module = _flow(batch_norm=False)
    X = _data(37)
    weight = torch.rand(37, generator=_generator(5), dtype=DTYPE) * 4 if weighted else None
    with torch.no_grad():
        log_prob = module.log_prob(X)
    expected = -(log_prob.mean() if weight is None else (log_prob * weight).sum() / weight.sum())
    with _max_iter_warning(1):
        # Steps of 1e-300 leave every weight as it is: each batch is scored by the initial flow.
        history = _train(module, X, weight, learning_rate=1e-300, batch_size=8, max_iter=1)
    assert history.n_steps == 5  # 8, 8, 8, 8 and 5 rows
    assert history.loss_curve[0] == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("max_iter", [1, 3])
def test_convergence_warning_when_max_iter_is_reached(max_iter):
    with _max_iter_warning(max_iter):
        history = _train(_flow(), _data(), max_iter=max_iter)
    assert history.n_iter == max_iter and not history.stopped_early


@pytest.mark.parametrize("n_iter_no_change", [1, 3])
@pytest.mark.parametrize("with_validation", [False, True])
def test_patience_counts_epochs_without_an_improvement_of_tol(with_validation, n_iter_no_change):
    """With an unreachable tol only the first epoch improves: training stops after 1 + patience."""
    validation = (_data(10, seed=3), None, None) if with_validation else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        history = _train(
            _flow(),
            _data(),
            validation=validation,
            tol=1e9,
            n_iter_no_change=n_iter_no_change,
            max_iter=50,
        )
    assert history.stopped_early
    assert history.n_iter == 1 + n_iter_no_change


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_early_stopping_restores_the_best_validation_weights(batch_norm, average):
    """The returned module scores exactly best_validation_score, from an epoch before the last.

    With ``average``, the scored and restored weights are the averaged ones.
    """
    module = _flow(batch_norm=batch_norm)
    validation = (_data(12, seed=3, shift=1.0), None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        history = _train(
            module,
            _data(),
            validation=validation,
            learning_rate=5e-2,
            n_iter_no_change=3,
            max_iter=200,
            average=average,
        )

    scores = history.validation_scores
    best_epoch = max(range(len(scores)), key=scores.__getitem__)
    assert history.stopped_early
    assert history.n_iter == best_epoch + 1 + 3
    assert history.best_validation_score == scores[best_epoch] != scores[-1]
    # The snapshot holds the batch-norm running statistics too, so the check is exact.
    assert mean_log_prob(module, *validation) == history.best_validation_score


@pytest.mark.parametrize("with_validation", [False, True])
@pytest.mark.parametrize("cause", ["learning_rate", "infinite_row"])
def test_non_finite_loss_stops_training_and_keeps_good_weights(cause, with_validation):
    """A non-finite loss stops training with a warning and leaves weights whose loss is finite."""
    module = _flow()
    initial = _state(module)
    X = _data()
    finite_rows = X.clone()
    if cause == "infinite_row":
        X[3, 0] = math.inf
    validation = (_data(10, seed=3), None, None) if with_validation else None
    learning_rate = 1e30 if cause == "learning_rate" else 1e-2
    with pytest.warns(ConvergenceWarning, match="became non-finite") as record:
        history = _train(
            module,
            X,
            validation=validation,
            learning_rate=learning_rate,
            batch_size=40,
            max_iter=10,
        )

    assert not any("maximum iterations" in str(warning.message) for warning in record)
    assert history.non_finite and history.n_iter == len(history.loss_curve) < 10
    assert all(math.isfinite(loss) for loss in history.loss_curve)
    assert all(torch.isfinite(tensor).all() for tensor in module.state_dict().values())
    if cause == "infinite_row":
        _assert_states_equal(_state(module), initial)
    for training in [False, True]:
        module.train(training)
        with torch.no_grad():
            assert torch.isfinite(module.log_prob(finite_rows)).all(), (
                "the kept weights do not give a finite loss"
            )


def _reference_training_with_l2(module, X, *, alpha, learning_rate, n_epochs):
    """Full-batch Adam on the mean negative log-likelihood plus ``alpha / 2 * ||W||^2``.

    The penalty is written into the loss and covers only the parameters named
    ``*.weight``; Adam itself has no weight decay.
    """
    weights = [param for name, param in module.named_parameters() if name.endswith(".weight")]
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    module.train()
    for _ in range(n_epochs):
        penalty = sum(weight.square().sum() for weight in weights)
        loss = -module.log_prob(X).mean() + alpha / 2 * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()


def test_weight_decay_is_an_l2_penalty_on_the_weight_matrices_only():
    """Training with alpha is Adam on the loss plus alpha/2 times the squared weight matrices."""
    X = _data()
    module, reference, undecayed = _flow(), _flow(), _flow()
    with _max_iter_warning(3):
        _train(module, X, alpha=0.5, batch_size=40, max_iter=3)
    with _max_iter_warning(3):
        _train(undecayed, X, alpha=0.0, batch_size=40, max_iter=3)
    _reference_training_with_l2(reference, X, alpha=0.5, learning_rate=1e-2, n_epochs=3)

    # Shifts feeding the batch norm have a zero gradient up to round-off, which Adam
    # scales up to about learning_rate * round-off / eps per step: hence atol.
    _assert_states_equal(_state(module), _state(reference), rtol=1e-10, atol=1e-9)
    assert not torch.allclose(
        module.transforms[1].made.layers[0].weight, undecayed.transforms[1].made.layers[0].weight
    )


@pytest.mark.parametrize(
    "adaptive, batch_size, factor",
    [
        (False, 2, 1.0),
        # 20 steps per epoch: 100 steps take 5 epochs; 10 epochs without improvement halve twice
        (True, 2, 0.25),
        # 3 steps per epoch: 10 epochs hold 30 steps, too few to halve the rate
        (True, 16, 1.0),
    ],
)
def test_adaptive_learning_rate_halves_after_epochs_and_steps_without_improvement(
    adaptive, batch_size, factor
):
    """With an unreachable tol, every epoch after the first fails to improve."""
    module = _flow()
    optimizer = make_optimizer(module, 1e-2, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        history = _train(
            module, _data(), tol=1e9, n_iter_no_change=10, max_iter=50, batch_size=batch_size,
            optimizer=optimizer, adaptive=adaptive,
        )  # fmt: skip
    assert history.n_iter == 11
    assert optimizer.lr == pytest.approx(1e-2 * factor, rel=1e-15)


@pytest.mark.parametrize("with_validation", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_integer_weights_equal_repeated_rows_in_full_batch(batch_norm, with_validation):
    """Weights count rows: in the loss, the batch-norm moments and the validation score."""
    X = _data(20)
    weight = torch.randint(0, 4, (20,), generator=_generator(5)).to(DTYPE)
    repeated = X.repeat_interleave(weight.long(), dim=0)
    weighted_validation = repeated_validation = None
    if with_validation:
        X_val = _data(8, seed=3)
        weight_val = torch.randint(1, 4, (8,), generator=_generator(6)).to(DTYPE)
        weighted_validation = (X_val, weight_val, None)
        repeated_validation = (X_val.repeat_interleave(weight_val.long(), dim=0), None, None)

    weighted_module, repeated_module = _flow(batch_norm=batch_norm), _flow(batch_norm=batch_norm)
    batch_size = repeated.shape[0]
    with _max_iter_warning(4):
        weighted = _train(weighted_module, X, weight, weighted_validation, batch_size=batch_size)
    with _max_iter_warning(4):
        plain = _train(repeated_module, repeated, None, repeated_validation, batch_size=batch_size)

    torch.testing.assert_close(weighted.loss_curve, plain.loss_curve, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        weighted.validation_scores, plain.validation_scores, rtol=1e-10, atol=0
    )
    # Adam divides each step by the root of the squared gradient's average, which
    # turns round-off in a near-zero gradient into a difference of up to ~1e-10
    # after a few steps; a weight that did not count would differ by ~1e-2.
    _assert_states_equal(_state(weighted_module), _state(repeated_module), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_validation", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_same_generator_seed_gives_bit_identical_training(batch_norm, with_validation):
    validation = (_data(10, seed=3), None, None) if with_validation else None

    def run(generator_seed):
        module = _flow(batch_norm=batch_norm)
        with _max_iter_warning(3):
            history = _train(
                module,
                _data(),
                validation=validation,
                max_iter=3,
                generator=_generator(generator_seed),
            )
        return module, history

    first, first_history = run(2)
    second, second_history = run(2)
    _, other_history = run(3)
    _assert_states_equal(_state(first), _state(second))
    assert first_history == second_history
    assert first_history.loss_curve != other_history.loss_curve, (
        "the shuffling ignores the generator"
    )
    assert not torch.equal(
        first.transforms[1].made.layers[0].weight, _flow().transforms[1].made.layers[0].weight
    )


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_mean_log_prob_is_the_weighted_mean_in_eval_mode(chunk_size):
    module = _flow()
    with _max_iter_warning(2):
        _train(module, _data(), max_iter=2)
    module.train()
    X = _data(11, seed=4)
    weight = torch.rand(11, generator=_generator(7), dtype=DTYPE)
    module.eval()
    with torch.no_grad():
        log_prob = module.log_prob(X)
    module.train()
    score = mean_log_prob(module, X, weight, chunk_size=chunk_size)
    assert module.training
    assert score == pytest.approx(float((log_prob * weight).sum() / weight.sum()), rel=1e-13)
    assert mean_log_prob(module, X, chunk_size=chunk_size) == pytest.approx(
        float(log_prob.mean()), rel=1e-13
    )


def test_plan_gradients_are_views_of_one_flat_buffer():
    from sklearn_maf._nn import backprop

    module = _flow(batch_norm=True)
    plan = backprop.Backprop(module, assume_masked=True)
    params = list(module.parameters())
    assert plan.flat_grad.numel() == sum(param.numel() for param in params)
    plan.loss_and_grad(_data(16))
    flat = torch.cat([param.grad.flatten() for param in params])
    torch.testing.assert_close(flat, plan.flat_grad, rtol=0, atol=0)
    plan.flat_grad.mul_(2.0)  # a change to the buffer is a change to every .grad
    torch.testing.assert_close(torch.cat([param.grad.flatten() for param in params]), 2 * flat, rtol=0, atol=0)


@pytest.fixture
def recorded_averages(monkeypatch):
    """The :class:`_ParameterAverage` objects that train_flow makes, in order."""
    made = []

    class Recording(_ParameterAverage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_training, "_ParameterAverage", Recording)
    return made


def test_averaging_leaves_the_training_path_and_returns_the_average(recorded_averages):
    """Without validation rows the module ends with the average; the steps themselves are unchanged."""
    made = recorded_averages
    plain, averaged = _flow(), _flow()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        history_plain = _train(plain, _data(), max_iter=6)
        history_averaged = _train(averaged, _data(), max_iter=6, average=True)
    assert history_averaged.loss_curve == history_plain.loss_curve
    assert len(made) == 1
    for param, mine in zip(averaged.parameters(), made[0].average):
        torch.testing.assert_close(param.detach(), mine, rtol=0, atol=0)
    # the average of the last steps: near the weights they ended at, not equal
    last = torch.cat([param.detach().flatten() for param in plain.parameters()])
    ours = torch.cat([param.detach().flatten() for param in averaged.parameters()])
    assert not torch.equal(ours, last)
    assert float((ours - last).abs().max()) < 0.5


def test_validation_scores_are_those_of_the_averaged_weights(recorded_averages):
    made = recorded_averages
    module = _flow(batch_norm=False)
    validation = (_data(12, seed=3, shift=1.0), None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        history = _train(module, _data(), validation=validation, max_iter=5, average=True)
    with made[0].applied():  # the average after the last epoch, as that epoch scored it
        assert mean_log_prob(module, *validation) == history.validation_scores[-1]


@pytest.mark.parametrize("weighted", [False, True])
def test_modules_without_a_plan_train_by_autograd_to_the_same_fit(monkeypatch, weighted):
    """The autograd fallback of a training step (no estimator's model needs it any more).

    With :func:`backprop.supports` refusing every module, the fit is the
    hand-written step's, to round-off: same losses and the same density,
    gradient clipping (its list-of-tensors form) included.
    """
    X = _data(48)
    weight = torch.rand(48, generator=_generator(3), dtype=DTYPE) + 0.5 if weighted else None
    flows = [_flow(), _flow()]
    fast = _train(flows[0], X, weight, warn_not_converged=False)
    monkeypatch.setattr(_training.backprop, "supports", lambda *args, **kwargs: False)
    steps, log_prob = [], flows[1].log_prob

    def counted_log_prob(*args, **kwargs):
        steps.append(1)
        return log_prob(*args, **kwargs)

    monkeypatch.setattr(flows[1], "log_prob", counted_log_prob)
    slow = _train(flows[1], X, weight, warn_not_converged=False)
    assert len(steps) == slow.n_steps == fast.n_steps  # every step went through autograd
    monkeypatch.undo()
    torch.testing.assert_close(torch.tensor(slow.loss_curve), torch.tensor(fast.loss_curve), rtol=1e-9, atol=0.0)
    with torch.no_grad():
        scores = [flow.eval().log_prob(X) for flow in flows]
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-9, atol=1e-9)


def _mean_of_rows(rows, weight):
    return float(_training._weighted_mean(rows, weight))


def _left_out_by_brute_force(epochs, weight):
    """Each row's score at the first epoch of best weighted total without one unit of its weight."""
    n_epochs, n_rows = epochs.shape
    scores = torch.empty(n_rows, dtype=DTYPE)
    for i in range(n_rows):
        rest = weight.clone()
        rest[i] -= min(float(weight[i]), 1.0)
        totals = [float((rest * epochs[e]).sum()) for e in range(n_epochs)]
        scores[i] = epochs[max(range(n_epochs), key=totals.__getitem__), i]
    return scores


@pytest.mark.parametrize("weighted", [False, True])
def test_left_out_choice_scores_each_row_at_the_epoch_the_other_rows_choose(weighted):
    """The correction moves each row to the epoch chosen without it: brute force agrees, and it is at most 0."""
    generator = _generator(1)
    # epochs that differ row by row by more than their totals do: several rows change the choice
    epochs = torch.randn(8, 30, generator=generator, dtype=DTYPE)
    weight = torch.rand(30, generator=generator, dtype=DTYPE) * 3 if weighted else None
    choice = _training._LeftOutChoice(weight, 30, "cpu")
    best = -math.inf
    for rows in epochs:
        score = _mean_of_rows(rows, weight)
        choice.update(rows, chosen=score > best)
        best = max(best, score)
    chosen = max(range(8), key=lambda e: _mean_of_rows(epochs[e], weight))
    expected = _left_out_by_brute_force(epochs, torch.ones(30, dtype=DTYPE) if weight is None else weight)
    correction = torch.as_tensor(choice.correction())
    torch.testing.assert_close(correction, expected - epochs[chosen])
    assert (correction <= 0).all() and (correction < 0).sum() >= 2


def test_left_out_choice_counts_a_weight_of_two_as_two_copies():
    """A row of weight 2 is left out one copy at a time, as two rows of weight 1 are each."""
    epochs = torch.randn(6, 10, generator=_generator(7), dtype=DTYPE)
    doubled = torch.cat([epochs, epochs[:, :1]], dim=1)  # row 0 twice
    weight = torch.ones(10, dtype=DTYPE)
    weight[0] = 2.0
    choices = [_training._LeftOutChoice(weight, 10, "cpu"), _training._LeftOutChoice(None, 11, "cpu")]
    for (choice, rows, w) in zip(choices, (epochs, doubled), (weight, None)):
        best = -math.inf
        for epoch in rows:
            score = _mean_of_rows(epoch, w)
            choice.update(epoch, chosen=score > best)
            best = max(best, score)
    weighted, copies = (torch.as_tensor(choice.correction()) for choice in choices)
    torch.testing.assert_close(weighted, copies[:10])
    assert copies[0] == copies[10]


def test_an_epoch_with_a_row_at_minus_infinity_is_kept_for_no_row():
    """Its total is -inf: early stopping never keeps it, and the left-out choice does not either."""
    epochs = torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, -math.inf]], dtype=DTYPE)
    choice = _training._LeftOutChoice(None, 3, "cpu")
    choice.update(epochs[0], chosen=True)
    choice.update(epochs[1], chosen=False)
    assert (choice.correction() == 0).all()


def test_train_flow_returns_the_left_out_correction_of_its_validation_rows():
    """One value per validation row, at most 0; with a single epoch nothing can change and it is 0."""
    validation = (_data(12, seed=3, shift=1.0), None, None)
    history = _train(_flow(), _data(), validation=validation, learning_rate=5e-2, max_iter=30)
    assert history.validation_correction.shape == (12,)
    assert (history.validation_correction <= 0).all()
    with _max_iter_warning(1):
        single = _train(_flow(), _data(), validation=validation, max_iter=1)
    assert (single.validation_correction == 0).all()
