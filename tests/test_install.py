"""Packaging: the four packages refuse to be mixed with a shadowing module, and the wheel carries what a run
needs (configs, demo structures, console scripts) and no tests."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("molstream-train", "molstream-embed", "molstream-dryrun", "molstream-convert", "molstream-inspect")


def _env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


@pytest.mark.parametrize("name,importing", [("model", "pipeline"), ("pipeline", "training"), ("shards_tools", "model")])
def test_a_shadowing_module_fails_the_import_naming_its_path(tmp_path, name, importing):
    fake = tmp_path / f"{name}.py"
    fake.write_text("x = 1\n")
    # the script's folder (here: the cwd of -c) comes first on sys.path, molstream after it
    r = subprocess.run([sys.executable, "-c", f"import {importing}"], cwd=tmp_path, env=_env(PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: molstream:") and str(fake) in last and "shadows molstream's" in last


def test_no_shadow_imports_cleanly(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import pipeline, model, training, shards_tools"], cwd=tmp_path,
                       env=_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(REPO)], capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("molstream-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_ships_configs_demo_data_and_scripts_but_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    raw = {p.relative_to(REPO / "data" / "demo" / "raw").as_posix() for p in (REPO / "data" / "demo" / "raw").rglob("*")
           if p.is_file()}
    assert raw and {f"pipeline/_demo_raw/{p}" for p in raw} <= names
    assert {f"training/_configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= names
    for pkg in ("pipeline", "model", "training", "shards_tools"):
        assert f"{pkg}/__init__.py" in names
    assert not [n for n in names if n.startswith("tests/") or n.endswith("conftest.py") or "/shards/" in n]
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(ep).decode()
    for s in SCRIPTS:
        assert f"{s} = " in text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_demo_runs_from_an_empty_folder_and_writes_only_there(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # the installed layout of the wheel, without the source tree
    before = {p for p in site.rglob("*")}
    work = tmp_path / "empty"
    work.mkdir()
    env = _env(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    tiny = ["model.dim=32", "model.num_heads=4", "model.mlp_hidden=64", "model.num_gaussians=16", "model.num_seeds=4",
            "model.layers=M S P", "tasks.head_hidden=32", "data.max_atoms=800", "trainer.num_threads=1",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.progress_bar=false",
            "trainer.test_after_fit=false", "logging.loss_plot=false"]
    r = subprocess.run([sys.executable, "-m", "training.run", "--demo", *tiny], cwd=work, env=env,
                       capture_output=True, text=True, timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "data" / "demo" / "shards" / "manifest.json").exists()
    assert (work / "runs" / "demo" / "checkpoints" / "last.ckpt").exists()
    assert {p for p in site.rglob("*") if "__pycache__" not in p.parts} <= before, "the run wrote into the package"
    d = subprocess.run([sys.executable, "-m", "pipeline.dryrun", "data/demo/shards", "--batches", "2", "--json"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=300)
    assert d.returncode == 0 and '"batches": 2' in d.stdout, d.stderr[-2000:]
