"""Fixtures of the loader tests: demo shards without the two largest RNAs (fast), plus helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

BIG_RNA = ("1z58.pdb", "3jbv_A.pdb")


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, demo_raw) -> Path:
    """The demo converted once per session without 1z58 and 3jbv_A (no sample over 25 000 atoms)."""
    from shards_tools.convert import main

    raw = tmp_path_factory.mktemp("raw_small")
    for dom in ("protein", "rna", "small_molecule", "metabolite"):
        shutil.copytree(demo_raw / dom, raw / dom, ignore=shutil.ignore_patterns(*BIG_RNA))
    out = tmp_path_factory.mktemp("small_shards")
    assert main([str(raw), str(out), "--no-progress", "-q"]) == 0
    return out
