import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _guard_global_torch_rng():
    """Every test doubles as a check that library code leaves torch's global RNG alone."""
    state = torch.random.get_rng_state()
    yield
    assert torch.equal(state, torch.random.get_rng_state()), "torch's global RNG state moved"


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)``: ``benchmarks/<name>.py`` as a module (skips where benchmarks/ is absent).

    The scripts import their siblings (``from speed import mixture``), so
    ``benchmarks/`` is on ``sys.path`` while one loads.
    """

    def load(name):
        path = BENCHMARKS / f"{name}.py"
        if not path.exists():
            pytest.skip("benchmarks/ is not part of this checkout")
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(BENCHMARKS))
        return module

    return load
