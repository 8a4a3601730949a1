from __future__ import annotations

import pytest

from tests.model import helpers


@pytest.fixture
def mixed_samples():
    """Mixed sizes, real and hand-made: see :func:`tests.model.helpers.mixed_samples`."""
    return helpers.mixed_samples()
