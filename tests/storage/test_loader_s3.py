"""The loader streaming the demo shards from loopback S3 (moto, IAM auth on): one pass through a fault proxy,
corrupt / truncated / missing shards under raise and skip, wrong credentials and an unreachable endpoint, and a
real training run end to end with no credential in its outputs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import DataConfig, DomainConfig
from pipeline.datamodule import ShardDataModule
from pipeline.dryrun import main as dryrun_main
from pipeline.dryrun import run as dryrun
from pipeline.index import load_domain_index
from pipeline.schema import SchemaError
from tests.storage.helpers import BUCKET, fast_options
from tests.storage_servers import LOOPBACK, FaultProxy, free_port

pytestmark = pytest.mark.timeout(240)  # a hang is a failure, not a stuck CI job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory, demo_raw) -> Path:
    """The whole demo converted with small shards (several per domain), so one shard can be broken alone."""
    from shards_tools.convert import main as convert

    out = tmp_path_factory.mktemp("split_shards")
    assert convert([str(demo_raw), str(out), "--shard-size-mb", "0.25", "--no-progress", "-q"]) == 0
    return out


def upload(moto, local: Path, prefix: str, edit: dict | None = None) -> str:
    """Copy a shards folder to s3://shards/<prefix> (test setup: a plain boto3 client); ``edit`` maps a relative
    path to a function of its bytes (None: the object is left out)."""
    client = moto.boto3_client()
    edit = edit or {}
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        data = path.read_bytes()
        if rel in edit:
            if edit[rel] is None:
                continue
            data = edit[rel](data)
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=data)
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def demo_s3(moto, objects, split_shards) -> str:
    return upload(moto, split_shards, "loader-demo")


def pass0(cfg: DataConfig, max_batches: int = 200):
    """Stream training batches (through the DataModule, with its workers) until pass 0 of every domain has been
    delivered; returns (multiset of pass-0 keys, key sequence of every batch, the DataModule's stats)."""
    dm = ShardDataModule(cfg, rank=0, world_size=1)
    dm.setup()
    total = sum(len(ix) for ix in dm.resolved.train)
    loader = dm.train_dataloader()
    keys: Counter = Counter()
    seq = []
    it = iter(loader)
    try:
        while sum(keys.values()) < total:
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            seq.append(tuple(b["keys"]))
            keys.update(k for k, p in zip(b["keys"], b.pass_index.tolist(), strict=True) if p == 0)
            assert len(seq) < max_batches, "pass 0 never completed"
    finally:
        it.close()
    return keys, seq, dm.stats()


def test_one_pass_through_faults_equals_local_pass(s3_env, split_shards, demo_s3):
    # a small shuffle buffer: pass 0 of every domain ends soon after its last sample was read
    base = DataConfig(root=str(split_shards), oversize_policy="crop", num_workers=1, seed=3, prefetch_factor=1,
                      shuffle_buffer_bytes=1 << 18)
    local, local_seq, local_stats = pass0(base)
    assert len(local) > 600 and set(local.values()) == {1}  # every training sample once
    assert local_stats["storage"]["requests"] == 0  # local reads are not network requests
    with FaultProxy(s3_env.endpoint, rate=0.08, seed=7, stall_s=1.5) as proxy:
        # the endpoint and timeouts come from the config (data.storage), in the main process and the worker
        opts = fast_options(endpoint_url=proxy.endpoint, chunk_bytes=64 << 10)
        faulty, faulty_seq, stats = pass0(replace(base, root=demo_s3, storage=opts))
        assert proxy.counts["faults"] > 0
    assert faulty == local
    assert faulty_seq == local_seq  # deterministic: the same batches, faults or not
    io = stats["storage"]
    assert io["retries"] > 0 and io["errors"] == 0 and io["bytes_fetched"] > 0
    assert io["retries"] <= proxy.counts["faults"]
    assert all(stats[d]["bad"] == 0 for d in ("protein", "rna", "small_molecule", "metabolite"))


def _flip(ix, i):
    def edit(data: bytes) -> bytes:
        b = bytearray(data)
        b[int(ix.offset_of(i) + ix.size_of(i)) - 3] ^= 0x10  # one bit inside the member's last array
        return bytes(b)
    return edit


def _truncate(at: int):
    return lambda data: data[:at]


def faulty_shard(split_shards: Path, kind: str):
    """(domain, relative shard path, edit, keys of the train samples lost) for one broken shard."""
    dom = "protein" if kind == "flip" else "metabolite"
    ix = load_domain_index(str(split_shards), dom, "train")
    shard = 1
    rel = Path(ix.shard_urls[shard]).relative_to(split_shards).as_posix()
    ids = [i for i in range(len(ix)) if int(ix.shard_of(i)) == shard]
    assert len(ids) >= 2
    if kind == "flip":  # a bit of a block member: every sample of that block is lost (its crc32 fails)
        return dom, rel, _flip(ix, ids[0]), {ix.keys[i] for i in ids if ix.member[i] == ix.member[ids[0]]}
    if kind == "missing":
        return dom, rel, None, {ix.keys[i] for i in ids}
    cut_at = int(ix.offset_of(ids[len(ids) // 2]))
    cut = cut_at + 5  # inside a block member: it and every later one are lost
    return dom, rel, _truncate(cut), {ix.keys[i] for i in ids if ix.offset_of(i) >= cut_at}


@pytest.mark.parametrize("kind", ["flip", "truncate", "missing"])
def test_broken_shard_raises_or_is_skipped_and_counted(s3_env, moto, split_shards, kind, caplog):
    dom, rel, edit, lost = faulty_shard(split_shards, kind)
    root = upload(moto, split_shards, f"broken-{kind}", {rel: edit})
    url = f"{root}/{rel}"
    cfg = DataConfig(root=root, oversize_policy="crop", num_workers=0, storage=fast_options(),
                     domains=(DomainConfig(name=dom),), train_batches_per_epoch=200)
    # raise: a clear error naming the shard (crc32 for a flipped bit; the URL for a truncated or missing shard)
    errors = (SchemaError,) if kind == "flip" else (storage.StorageError,)
    with pytest.raises(errors, match=rel if kind == "flip" else url) as e:
        pass0(cfg)
    if kind != "flip":
        assert "bad_sample_policy='skip'" in str(e.value)
    # skip: every other sample of the pass exactly once, the lost ones counted as bad, a warning naming the shard
    skip = replace(cfg, bad_sample_policy="skip")
    with caplog.at_level(logging.WARNING):
        keys, _, stats = _pass0_without(skip, lost)
    assert not lost & set(keys) and set(keys.values()) == {1}
    assert stats[dom]["bad"] >= len(lost)
    assert any(rel in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # the exact one-pass dry run counts each lost sample once as bad and delivers the rest once
    summary = dryrun(skip, None, True, 0)
    all_keys = {k for k in load_domain_index(str(split_shards), dom, "train").keys.tolist()}
    assert summary["samples"] == summary["unique_keys"] == len(all_keys) - len(lost)
    assert summary["counts"][dom]["bad"] == len(lost)
    assert summary["storage"]["requests"] > 0


def _pass0_without(cfg: DataConfig, lost: set):
    """pass0, where the lost samples can never arrive: stop when every other sample of pass 0 was delivered."""
    dm = ShardDataModule(cfg, rank=0, world_size=1)
    dm.setup()
    expected = len(dm.resolved.train[0]) - len(lost)
    keys: Counter = Counter()
    it = iter(dm.train_dataloader())
    try:
        for n, b in enumerate(it):
            keys.update(k for k, p in zip(b["keys"], b.pass_index.tolist(), strict=True) if p == 0)
            if sum(keys.values()) >= expected:
                break
            assert n < 400, "pass 0 never completed"
    finally:
        it.close()
    return keys, None, dm.stats()


def test_wrong_credentials_fail_fast_with_the_fix(s3_env, demo_s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.reset_clients()
    cfg = DataConfig(root=demo_s3, oversize_policy="crop", num_workers=0, storage=fast_options())
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"access denied to s3://shards/loader-demo/manifest.json.*AWS_"):
        ShardDataModule(cfg).setup()
    assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)


def test_unreachable_endpoint_fails_within_the_timeout(s3_env, demo_s3, tmp_path, capsys):
    closed = f"http://{LOOPBACK}:{free_port()}"
    cfg = DataConfig(root=demo_s3, oversize_policy="crop", num_workers=0,
                     storage=fast_options(endpoint_url=closed, max_attempts=3))
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=r"manifest.json .*endpoint http://127.0.0.1:\d+.*check the endpoint"):
        ShardDataModule(cfg).setup()
    assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)
    # the dry run: a one-line error, exit code 1, no traceback, no hang
    yaml = tmp_path / "dry.yaml"
    yaml.write_text(f"data:\n  root: {demo_s3}\n  num_workers: 0\n  oversize_policy: crop\n"
                    f"  storage: {{endpoint_url: '{closed}', connect_timeout_s: 1.0, max_attempts: 2, backoff_s: 0.01}}\n")
    t0 = time.monotonic()
    assert dryrun_main([str(yaml), "--batches", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: reading s3://shards/loader-demo/manifest.json") and closed in err
    assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)


def test_dry_run_summary_counts_storage(s3_env, demo_s3, capsys):
    assert dryrun_main([demo_s3, "--json", "--workers", "1"]) == 0  # endpoint from AWS_ENDPOINT_URL_S3
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == out["unique_keys"] > 600
    assert out["storage"]["requests"] > 0 and out["storage"]["bytes_fetched"] > 0 and out["storage"]["errors"] == 0


TINY = [  # tests/training/test_run.py's tiny configuration
    "model.dim=32", "model.num_heads=4", "model.mlp_hidden=64", "model.num_gaussians=16", "model.num_seeds=4",
    "model.layers=M S P", "tasks.head_hidden=32", "data.max_atoms=800", "data.num_workers=1",
    "trainer.num_threads=1", "trainer.deterministic=true", "trainer.progress_bar=false",
    "trainer.test_after_fit=false", "logging.loss_plot=false", "logging.batch_stats_every_n_steps=2",
]


def test_training_run_streams_from_s3_and_leaks_no_credential(s3_env, demo_s3, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL_S3", "WANDB_API_KEY")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "training.run", str(REPO / "configs" / "demo.yaml"), f"data.root={demo_s3}",
           f"data.storage.endpoint_url={s3_env.endpoint}", "data.storage.read_timeout_s=10",  # endpoint from config
           f"trainer.run_dir={run_dir}", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=4",
           "trainer.limit_val_batches=2", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    import torch

    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 4
    saved = (run_dir / "config.yaml").read_text()
    assert demo_s3 in saved and s3_env.endpoint in saved
    outputs = {"stdout": r.stdout.encode(), "stderr": r.stderr.encode()}
    for p in run_dir.rglob("*"):
        if p.is_file():
            outputs[str(p.relative_to(run_dir))] = p.read_bytes()
    assert {"config.yaml", "logs/metrics.csv", "checkpoints/last.ckpt"} <= set(outputs)
    for secret in (s3_env.secret_key, s3_env.access_key):
        leaked = [name for name, data in outputs.items() if secret.encode() in data]
        assert not leaked, f"a credential appears in {leaked}"
