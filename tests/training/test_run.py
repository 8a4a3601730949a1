"""Real training processes: a short run end to end, SIGKILL + resume equals an uninterrupted run,
DDP with two CPU processes, and embeddings export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)

# A tiny, deterministic configuration of the demo: small model and budget, no dropout, one thread.
TINY = [
    "model.dim=32", "model.num_heads=4", "model.mlp_hidden=64", "model.num_gaussians=16", "model.num_seeds=4",
    "model.layers=M S P", "tasks.head_hidden=32", "data.max_atoms=800", "data.num_workers=1",
    "trainer.num_threads=1", "trainer.deterministic=true", "trainer.progress_bar=false",
    "trainer.test_after_fit=false", "logging.loss_plot=false", "logging.batch_stats_every_n_steps=2",
]


# Set by in-process Lightning runs of earlier tests (seed_everything) or by a launcher around pytest; a training
# subprocess that inherited them would seed or join a process group the test did not ask for.
_INHERITED = ("WANDB_API_KEY", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
              "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def _env() -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    for key in _INHERITED:
        env.pop(key, None)
    return env


def _cmd(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.run", str(REPO / "configs" / "demo.yaml"), f"data.root={shards}",
            f"trainer.run_dir={run_dir}", *TINY, *extra]


def _popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _dump_stacks_and_kill(proc: subprocess.Popen) -> str:
    """Make every process of ``proc``'s group (launcher, DDP ranks, loader workers) print its threads' stacks
    (training.run registers SIGUSR1), kill the group, return its stderr."""
    os.killpg(proc.pid, signal.SIGUSR1)
    time.sleep(5)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=60)[1]


def _run_or_dump_stacks(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a training process; if it is still running after ``timeout`` s, fail with the stacks of its process
    group: a hang is reported with where it hangs, not as a bare timeout."""
    proc = _popen(cmd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s; stacks and stderr:\n{_dump_stacks_and_kill(proc)[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_sigusr1_prints_the_stacks_of_a_running_training(demo_shards, tmp_path):
    """The hang diagnostic above works: a running training prints where each thread is on SIGUSR1."""
    run_dir = tmp_path / "long"
    proc = _popen(_cmd(demo_shards, run_dir, "trainer.max_steps=100000", "trainer.val_check_interval=100000"))
    deadline = time.time() + 300
    while not (run_dir / "config.yaml").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the training ended before it could be signalled"
    err = _dump_stacks_and_kill(proc)
    # faulthandler cuts a stack at 100 frames, so which frames show depends on where the run is (an import can be
    # deeper than that): assert the dump, not a particular frame
    assert "Current thread 0x" in err and "(most recent call first)" in err and '  File "' in err, err[-3000:]


def _weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_kill_and_resume_equals_uninterrupted_run(demo_shards, tmp_path):
    steps = ["trainer.max_steps=24", "trainer.checkpoint_every_n_steps=4", "trainer.val_check_interval=8"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = subprocess.run(_cmd(demo_shards, ref_dir, *steps), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(_cmd(demo_shards, run_dir, *steps), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 400
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
            except (RuntimeError, EOFError, OSError):  # being written
                step = 0
            if step >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 24, "the run was not killed mid-way"
    resumed = subprocess.run(_cmd(demo_shards, run_dir, *steps) + ["--resume", "last"], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(ref_dir / "checkpoints" / "last.ckpt"), _weights(last)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 24
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed at step {killed_at})"


def test_resume_refuses_a_missing_checkpoint(demo_shards, tmp_path):
    r = subprocess.run(_cmd(demo_shards, tmp_path / "none") + ["--resume", "last"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no checkpoint at" in r.stderr


def test_bad_config_value_fails_fast_with_the_fix(demo_shards, tmp_path):
    r = subprocess.run(_cmd(demo_shards, tmp_path / "x", "trainer.max_stepz=3"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "did you mean 'trainer.max_steps'" in r.stderr


def test_ddp_two_cpu_processes_run_to_the_end(demo_shards, tmp_path):
    run_dir = tmp_path / "ddp"
    r = _run_or_dump_stacks(_cmd(demo_shards, run_dir, "trainer.devices=2", "trainer.strategy=ddp",
                                 "trainer.accelerator=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3",
                                 "trainer.checkpoint_every_n_steps=3", "trainer.test_after_fit=true",
                                 "trainer.log_every_n_steps=1"), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "world_size: 2" in r.stderr or "MEMBER: 2/2" in r.stderr
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    header = metrics.splitlines()[0]
    for key in ("train/loss", "val/loss", "test/loss", "val/mlm_acc/small_molecule", "test/mlm_loss/protein",
                "atoms_per_s", "data/fill", "data/wait_fraction", "data/atom_share/rna", "data/oversize_cropped/rna"):
        assert key in header, key
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6


def test_embeddings_export_one_row_per_molecule(demo_shards, tmp_path):
    run_dir = tmp_path / "emb"
    r = subprocess.run(_cmd(demo_shards, run_dir, "trainer.max_steps=2", "trainer.val_check_interval=2"),
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "emb.parquet"
    e = subprocess.run([sys.executable, "-m", "training.embed", str(run_dir / "checkpoints" / "last.ckpt"),
                        str(demo_shards), str(out), "max_atoms=4000", "num_workers=0", "--no-progress"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    t = pq.read_table(out)
    keys = t.column("key").to_pylist()
    assert t.num_rows == 736 == len(set(keys))
    emb = torch.tensor(t.column("embedding").to_pylist())
    assert emb.shape == (736, 32) and torch.isfinite(emb).all()


def test_wandb_offline_and_tensorboard_loggers_work_without_network(demo_shards, tmp_path):
    run_dir = tmp_path / "loggers"
    env = _env()
    for k in list(env):
        if k.startswith("WANDB_"):
            env.pop(k)
    env["WANDB_DIR"] = str(tmp_path / "wandb-home")  # keep wandb's own files inside the test folder
    r = subprocess.run(_cmd(demo_shards, run_dir, "trainer.max_steps=3", "trainer.val_check_interval=3",
                            "trainer.log_every_n_steps=1", "logging.wandb=true", "logging.tensorboard=true",
                            "logging.wandb_run_name=unit-test", "logging.wandb_project=molstream-tests"),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline wandb run was written"
    assert list((run_dir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert "train/loss" in (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]


def _rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_run_dir_lifecycle_refuse_overwrite_resume_finished_and_metrics_kept(demo_shards, tmp_path):
    import yaml

    run_dir, tmp = tmp_path / "life", tmp_path / "tmpdir"
    tmp.mkdir()
    env = dict(_env(), TMPDIR=str(tmp))
    steps = ["trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1"]

    def run(*extra):
        return subprocess.run(_cmd(demo_shards, run_dir, *steps, *extra), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)

    first = run("trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _rows(run_dir)
    again = run("trainer.max_steps=4")  # a new run into a used run_dir is refused, nothing touched
    assert again.returncode == 2 and "--overwrite" in again.stderr and "--resume last" in again.stderr
    assert _rows(run_dir) == before
    finished = run("trainer.max_steps=4", "--resume", "last")  # resuming a finished run works
    assert finished.returncode == 0, finished.stderr[-3000:]
    longer = run("--resume", "last", "trainer.max_steps=6")  # options before overrides
    assert longer.returncode == 0, longer.stderr[-3000:]
    rows = _rows(run_dir)
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == list(range(6)), train_steps  # the first run's rows kept, none twice
    assert [r["train/loss"] for r in rows if r.get("train/loss")][:4] == [r["train/loss"] for r in before if r.get("train/loss")]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 2 and ckpts[-1] == "last.ckpt" and ckpts[0].startswith("best-"), ckpts
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
    hp = yaml.safe_load((run_dir / "logs" / "hparams.yaml").read_text())  # plain types only
    assert hp["trainer"]["max_steps"] == 6 and hp["data"]["root"] == str(demo_shards) and hp["model"]["layers"] == "M S P"
    assert not list(tmp.rglob("*.ckpt")) and not list(tmp.rglob("*tmp*ckpt*"))
    fresh = run("trainer.max_steps=2", "--overwrite")  # or start over explicitly
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [int(r["step"]) for r in _rows(run_dir) if r.get("train/loss")] == [0, 1]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2
