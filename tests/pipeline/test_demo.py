"""The demo auto-conversion under concurrent starts (two ranks): converted once, the other waits, both see it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CODE = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from pathlib import Path
from pipeline.demo import ensure_demo_shards
target = Path(sys.argv[2])
assert ensure_demo_shards(str(target), Path(sys.argv[1]), target)
print("MANIFEST", (target / "manifest.json").read_text().replace(chr(10), ""))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_concurrent_starts_convert_once(demo_raw, tmp_path):
    raw = tmp_path / "raw" / "metabolite"
    raw.mkdir(parents=True)
    (raw / "m.sdf").write_bytes((demo_raw / "metabolite" / "metabolites_ccd_hmdb.sdf").read_bytes())
    target = tmp_path / "data" / "demo" / "shards"
    env = dict(os.environ, PYTHONPATH=str(REPO), RANK="0")
    procs = [subprocess.Popen([sys.executable, "-c", CODE, str(raw.parent), str(target)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    converted = [e.count("demo shards missing: converting") for _, e in outs]
    assert sorted(converted) == [0, 1], converted
    manifests = [json.loads(o.split("MANIFEST ", 1)[1]) for o, _ in outs]
    assert manifests[0] == manifests[1] and manifests[0]["domains"]["metabolite"]
    again = subprocess.run([sys.executable, "-c", CODE, str(raw.parent), str(target)], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "converting" not in again.stderr


def test_other_roots_are_left_alone(demo_raw, tmp_path):
    from pipeline.demo import ensure_demo_shards

    target = tmp_path / "shards"
    assert ensure_demo_shards(str(tmp_path / "elsewhere"), demo_raw, target) is False
    assert ensure_demo_shards("s3://bucket/shards", demo_raw, target) is False
    assert not target.exists()
