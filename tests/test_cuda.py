"""Every estimator and option on a GPU, against the same model on the CPU.

Skipped without CUDA. Two kinds of check: a model fitted on the CPU and moved
to the GPU (through a pickle, as a user would ship it) must score, sample and
transform as it does on the CPU, to rounding; and a model trained on the GPU
in float64 must end close to the same model trained on the CPU (the order of
GPU reductions differs, so only to a tolerance).
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from sklearn_maf import MAFConditionalDensity, MAFDensity, MAFOutlierDetector

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning"),
]

SMALL = dict(n_layers=2, hidden_units=16, max_iter=3, random_state=0, precision="float64")


def _data(n=400, seed=0):
    rng = np.random.RandomState(seed)
    x0 = rng.normal(size=n)
    return np.c_[x0, 0.5 * x0**2 + 0.3 * rng.normal(size=n), rng.uniform(0.05, 0.95, size=n)]


def _integers(n=400, seed=0):
    rng = np.random.RandomState(seed)
    X = _data(n, seed)
    X[:, 2] = rng.poisson(3.0, size=n)
    return X


def _on_gpu(model):
    """The fitted ``model`` moved to the GPU the way a user ships one: by pickle."""
    payload = pickle.dumps(model)
    gpu = pickle.loads(payload)
    gpu.set_params(device="cuda")
    gpu.module_ = gpu.module_.to("cuda")
    return gpu


CASES = {
    "gaussian": (MAFDensity, dict(), _data),
    "mog": (MAFDensity, dict(base="mog", n_components=3), _data),
    "student-t": (MAFDensity, dict(base="student-t"), _data),
    "no batch norm, random order": (MAFDensity, dict(batch_norm=False, order="random"), _data),
    "bounds": (MAFDensity, dict(bounds=[[-np.inf, np.inf], [-np.inf, np.inf], [0.0, 1.0]]), _data),
    "discrete": (MAFDensity, dict(discrete_features=[2]), _integers),
    "outlier": (MAFOutlierDetector, dict(), _data),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_model_scores_and_samples_the_same_on_the_gpu(case):
    Estimator, params, data = CASES[case]
    X = data()
    cpu = Estimator(**SMALL, **params).fit(X)
    gpu = _on_gpu(cpu)
    assert next(gpu.module_.parameters()).device.type == "cuda"
    np.testing.assert_allclose(gpu.score_samples(X), cpu.score_samples(X), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        gpu.sample(50, random_state=3), cpu.sample(50, random_state=3), rtol=1e-7, atol=1e-7
    )
    if hasattr(cpu, "transform"):
        np.testing.assert_allclose(gpu.transform(X), cpu.transform(X), rtol=1e-9, atol=1e-9)
        U = cpu.transform(X)
        np.testing.assert_allclose(gpu.inverse_transform(U), X, rtol=1e-6, atol=1e-6)
    if hasattr(cpu, "decision_function"):
        np.testing.assert_array_equal(gpu.predict(X), cpu.predict(X))


@pytest.mark.parametrize("case", list(CASES))
def test_training_on_the_gpu_matches_the_cpu(case):
    Estimator, params, data = CASES[case]
    X = data()
    cpu = Estimator(**SMALL, **params).fit(X)
    gpu = Estimator(**SMALL, **params, device="cuda").fit(X)
    assert next(gpu.module_.parameters()).device.type == "cuda"
    scores = gpu.score_samples(X)
    assert scores.dtype == np.float64 and np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, cpu.score_samples(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gpu.loss_curve_, cpu.loss_curve_, rtol=1e-6)


def test_float32_training_on_the_gpu():
    X = _data(1000)
    model = MAFDensity(n_layers=3, hidden_units=32, max_iter=20, random_state=0, device="cuda").fit(X)
    scores = model.score_samples(X)
    assert np.all(np.isfinite(scores))
    reference = MAFDensity(n_layers=3, hidden_units=32, max_iter=20, random_state=0).fit(X)
    assert abs(scores.mean() - reference.score_samples(X).mean()) < 0.1
    # same random_state, same device: the same samples
    np.testing.assert_array_equal(model.sample(20, random_state=1), model.sample(20, random_state=1))


def test_conditional_density_on_the_gpu():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(400, 2))
    y = X @ [1.0, -0.5] + 0.3 * rng.normal(size=400)
    params = dict(SMALL, base="mog", n_components=3)
    cpu = MAFConditionalDensity(**params).fit(X, y)
    gpu = _on_gpu(cpu)
    np.testing.assert_allclose(gpu.score_samples(X, y), cpu.score_samples(X, y), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(gpu.predict(X), cpu.predict(X), rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(gpu.sample(X, random_state=0), cpu.sample(X, random_state=0), rtol=1e-7, atol=1e-7)
    trained = MAFConditionalDensity(**params, device="cuda").fit(X, y)
    np.testing.assert_allclose(trained.score_samples(X, y), cpu.score_samples(X, y), rtol=1e-5, atol=1e-5)


def test_partial_fit_and_warm_start_on_the_gpu():
    X = _data(600)
    streamed = MAFDensity(**{**SMALL, "device": "cuda"})
    for chunk in np.array_split(X, 3):
        streamed.partial_fit(chunk)
    assert streamed.n_iter_ == 3 and np.all(np.isfinite(streamed.score_samples(X)))
    model = MAFDensity(**{**SMALL, "device": "cuda"}, warm_start=True).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    assert model.n_iter_ == 6
    assert next(model.module_.parameters()).device.type == "cuda"


def test_gpu_model_pickles_for_a_cpu_machine():
    X = _data(300)
    model = MAFDensity(**{**SMALL, "device": "cuda"}).fit(X)
    state = model.__getstate__()
    assert next(state["module_"].parameters()).device.type == "cpu"
    cpu = pickle.loads(pickle.dumps(model))
    cpu.set_params(device="cpu")
    cpu.module_ = cpu.module_.cpu()
    np.testing.assert_allclose(cpu.score_samples(X), model.score_samples(X), rtol=1e-9, atol=1e-9)


def test_large_scoring_on_the_gpu_is_chunked_and_finite():
    X = _data(400)
    model = MAFDensity(**{**SMALL, "device": "cuda"}).fit(X)
    big = np.tile(X, (500, 1))  # 200,000 rows
    assert model._chunk_size() >= len(big)  # one chunk: on a GPU small chunks cost launches
    scores = model.score_samples(big)
    assert scores.shape == (big.shape[0],) and np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores[: len(X)], model.score_samples(X), rtol=1e-12)
    assert model.sample(100_000, random_state=0).shape == (100_000, 3)
