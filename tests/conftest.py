"""Shared test fixtures: the vendored demo data and converted shards of it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_RAW = REPO / "data" / "demo" / "raw"


@pytest.fixture(scope="session")
def demo_raw() -> Path:
    return DEMO_RAW


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The whole vendored demo converted once per test session (default options)."""
    from shards_tools.convert import main

    out = tmp_path_factory.mktemp("demo_shards")
    assert main([str(DEMO_RAW), str(out), "--no-progress", "-q"]) == 0
    return out
