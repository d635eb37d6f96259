import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _guard_global_torch_rng():
    """Every test doubles as a check that library code leaves torch's global RNG alone."""
    state = torch.random.get_rng_state()
    yield
    assert torch.equal(state, torch.random.get_rng_state()), "torch's global RNG state moved"


@pytest.fixture
def rng():
    return np.random.RandomState(0)
