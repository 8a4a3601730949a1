from __future__ import annotations

import pytest
import torch

from tests.model import helpers


@pytest.fixture
def mixed_samples():
    """Mixed sizes, real and hand-made: see :func:`tests.model.helpers.mixed_samples`."""
    return helpers.mixed_samples()


@pytest.fixture(autouse=True)
def one_thread():
    """Test models are tiny: intra-op threads gain nothing, and on a busy 2-core box they spin
    (one training test went from 4 s to 133 s under load with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
