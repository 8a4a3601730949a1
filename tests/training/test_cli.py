"""training.run's command line and config resolution, without training: argument order, shipped configs by
name, config-relative paths, errors that blame the right place, trainer.devices, the bf16-on-CPU warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.strict_config import ConfigError
from training.config import hparams, load, load_config
from training.run import parse_args, warn_bf16_on_cpu

REPO = Path(__file__).resolve().parents[2]


def test_options_and_overrides_in_any_order():
    for argv in (["c.yaml", "--resume", "last", "trainer.max_steps=50", "model.dim=8"],
                 ["--resume", "last", "c.yaml", "trainer.max_steps=50", "model.dim=8"],
                 ["c.yaml", "trainer.max_steps=50", "--resume", "last", "model.dim=8"]):
        a = parse_args(argv)
        assert (a.config, a.resume, a.overrides) == ("c.yaml", "last", ["trainer.max_steps=50", "model.dim=8"])
    a = parse_args(["trainer.max_steps=3", "--demo"])
    assert (a.config, a.overrides) == ("demo", ["trainer.max_steps=3"])


def test_no_arguments_asks_for_a_config_only(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "give a config" in err and "overrides" not in err.splitlines()[-1]


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "proj" / "cfgs"
    folder.mkdir(parents=True)
    cfg = folder / "c.yaml"
    cfg.write_text("data:\n  root: ../shards\n  domains: [{name: rna, root: rna-shards}, {name: protein, root: s3://b/p}]\n"
                   "  storage: {cache_dir: ~/cache}\ntrainer:\n  run_dir: runs/x\n")
    monkeypatch.chdir(tmp_path)  # anywhere else
    got = load(str(cfg))
    c = got.config
    assert c.data.root == str(tmp_path / "proj" / "shards")
    assert c.data.domains[0].root == str(folder / "rna-shards") and c.data.domains[1].root == "s3://b/p"
    assert c.data.storage.cache_dir == str(Path("~/cache").expanduser())
    assert c.trainer.run_dir == str(folder / "runs" / "x")
    assert "'../shards'" in got.describe("data.root") and str(tmp_path / "proj" / "shards") in got.describe("data.root")
    over = load(str(cfg), ["trainer.run_dir=here", "data.root=/abs/shards"]).config  # the command line: as given
    assert over.trainer.run_dir == "here" and over.data.root == "/abs/shards"


def test_a_shipped_config_by_name_resolves_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = load("demo")
    assert got.shipped and got.config.trainer.run_dir == str(tmp_path / "runs" / "demo")
    assert got.config.data.root == str(tmp_path / "data" / "demo" / "shards")
    assert load(str(REPO / "configs" / "demo.yaml")).config.model == got.config.model
    with pytest.raises(ConfigError, match=r"config 'nosuch': no such file .* not the name of a shipped config \(demo"):
        load("nosuch")


def test_a_typo_is_blamed_where_it_was_written(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"^command-line override 'trainer.max_stepz=3': unknown config key"):
        load_config(cfg, ["model.dim=16", "trainer.max_stepz=3"])
    cfg.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}: unknown config key 'trainer.max_stepz'"):
        load_config(cfg, ["model.dim=16"])


@pytest.mark.parametrize("devices,ok", [("auto", True), ("-1", True), ("2", True), ("0", False), ("-2", False),
                                        ("many", False)])
def test_trainer_devices_accepts_what_lightning_does(tmp_path, devices, ok):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    if ok:
        got = load_config(cfg, [f"trainer.devices={devices}"]).trainer.devices
        assert got == (devices if devices == "auto" else int(devices))
    else:
        with pytest.raises(ConfigError, match="trainer.devices"):
            load_config(cfg, [f"trainer.devices={devices}"])


def test_hyperparameters_are_the_whole_config_in_plain_yaml():
    cfg = load_config(REPO / "configs" / "multidomain.yaml")
    text = yaml.safe_dump(hparams(cfg))  # safe_dump refuses tuples and other Python objects
    back = yaml.safe_load(text)
    assert {"data", "model", "tasks", "optim", "trainer", "logging"} <= back.keys()
    assert back["data"]["domains"][0]["name"] == "protein" and back["trainer"]["precision"] == "bf16-mixed"


def test_bf16_on_cpu_warns(caplog, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="training.run"):
        warn_bf16_on_cpu(load_config(cfg, ["trainer.precision=bf16-mixed", "trainer.accelerator=cpu"]))
        assert "bf16 autocast is several times slower" in caplog.text
        caplog.clear()
        warn_bf16_on_cpu(load_config(cfg, ["trainer.precision=32-true", "trainer.accelerator=cpu"]))
        assert caplog.text == ""


def _run(args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "training.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    cfg = tmp_path / "cfgs" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text("data:\n  root: missing-shards\ntrainer:\n  run_dir: run\n")
    for args, text in (([str(cfg)], f"data.root 'missing-shards' (in {cfg}, resolved against {cfg.parent} to "
                                     f"{cfg.parent / 'missing-shards'}) has no manifest.json"),
                       (["nope.yaml"], "config 'nope.yaml': no such file"),
                       ([str(cfg), "trainer.max_stepz=1"], "command-line override 'trainer.max_stepz=1'"),
                       ([str(cfg), "--resume", "last"], "--resume last: no checkpoint at")):
        r = _run(args, tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]] and text in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (cfg.parent / "run").exists() and not (tmp_path / "run").exists()


def test_help_answers_without_heavy_imports():
    code = ("import sys, training.run, pipeline.dryrun; heavy = {'torch', 'lightning', 'numpy'} & set(sys.modules); "
            "print(sorted(heavy))")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
