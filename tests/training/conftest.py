"""Fixtures of the downstream tests: small shards of the vendored QM9 molecules and HMDB metabolites."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO_RAW = REPO / "data" / "demo" / "raw"
QM9_CSV = DEMO_RAW / "small_molecule" / "qm9_properties.csv"

TINY_MODEL = {"layers": "M S P", "dim": 32, "num_heads": 4, "mlp_hidden": 64, "num_gaussians": 16, "num_seeds": 4}


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory) -> Path:
    """QM9 (400 molecules, one XYZ) and the first 40 HMDB metabolites (one SDF), one folder per domain."""
    raw = tmp_path_factory.mktemp("small_raw")
    (raw / "small_molecule").mkdir()
    shutil.copy(DEMO_RAW / "small_molecule" / "qm9_sample.xyz", raw / "small_molecule" / "qm9_sample.xyz")
    (raw / "metabolite").mkdir()
    text = (DEMO_RAW / "metabolite" / "metabolites_ccd_hmdb.sdf").read_text()
    records = text.split("$$$$\n")[:40]
    (raw / "metabolite" / "hmdb40.sdf").write_text("$$$$\n".join(records) + "$$$$\n")
    return raw


@pytest.fixture(scope="session")
def small_shards(small_raw, tmp_path_factory) -> Path:
    from shards_tools.convert import main

    out = tmp_path_factory.mktemp("small_shards")
    assert main([str(small_raw), str(out), "--no-progress", "-q"]) == 0
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more intra-op threads only spin on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
