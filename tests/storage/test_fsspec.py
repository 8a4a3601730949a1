"""Schemes other than file/s3/http(s) go through fsspec and get the same retries, Range resume, sha256/crc32
checks, counters and cache. ``msdir://`` (tests/storage/folder_fs.py) is a real fsspec filesystem over a local
folder that injects connection resets and refuses to be used in a process it was not created in."""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.datamodule import ShardDataModule
from tests.storage import folder_fs
from tests.storage.helpers import fast_options

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def msdir(tmp_path):
    """``msdir://`` rooted at tmp_path (fault-free unless a test sets FolderFS.fault_rate), fresh instances."""
    folder_fs.register()
    fs = folder_fs.FolderFS
    saved = fs.root, fs.fault_rate, fs.seed, fs.pid_log
    fs.root, fs.fault_rate, fs.seed, fs.pid_log = str(tmp_path), 0.0, 0, None
    storage.reset_clients()
    storage.stats.reset()
    yield tmp_path
    fs.root, fs.fault_rate, fs.seed, fs.pid_log = saved
    storage.reset_clients()


def test_fsspec_reads_resume_after_faults_and_are_counted(msdir):
    data = random.Random(5).randbytes(700_001)
    (msdir / "d").mkdir()
    (msdir / "d" / "s.tar").write_bytes(data)
    folder_fs.FolderFS.fault_rate = 0.3
    opts = fast_options(max_attempts=20)
    u = "msdir://d/s.tar"
    with storage.open_stream(u, sha256=hashlib.sha256(data).hexdigest(), options=opts) as f:
        assert f.read() == data  # reassembled exactly from resumed reads, sha256 checked at the end
        assert f.stats["retries"] > 0 and f.stats["resumes"] > 0 and f.stats["errors"] == 0
    assert storage.read_range(u, 123_456, 200_000, options=opts) == data[123_456:323_456]
    assert storage.read_range(u, 700_000, 50, options=opts) == data[700_000:]
    assert storage.read_bytes(u, options=opts) == data
    assert storage.exists(u, options=opts) and not storage.exists("msdir://d/nope.tar", options=opts)
    s = storage.stats.snapshot()
    assert s["bytes_fetched"] == 2 * len(data) + 200_001 and s["retries"] > 0 and s["errors"] == 0
    with storage.open_stream(u, sha256="0" * 64, options=opts) as f:
        with pytest.raises(storage.ChecksumMismatchError, match=r"msdir://d/s\.tar: expected 0000"):
            f.read()
    folder_fs.FolderFS.fault_rate = 1.0
    with pytest.raises(storage.StorageError, match=r"reading msdir://d/s\.tar .*failed at byte 0 .*connection reset"):
        storage.read_bytes(u, options=fast_options(max_attempts=3))


def test_fsspec_missing_object_and_writes(msdir):
    with pytest.raises(storage.StorageNotFoundError, match=r"not found: msdir://d/absent\.tar"):
        storage.open_stream("msdir://d/absent.tar", options=fast_options())
    assert storage.stats["retries"] == 0  # not found is not retried
    storage.write_bytes("msdir://out/index/p.parquet", b"abc")
    assert (msdir / "out" / "index" / "p.parquet").read_bytes() == b"abc"
    (msdir / "local").mkdir()
    (msdir / "local" / "manifest.json").write_text("{}")
    (msdir / "local" / "a.tar").write_bytes(b"tar")
    assert storage.upload_tree(str(msdir / "local"), "msdir://up") == ["msdir://up/a.tar", "msdir://up/manifest.json"]
    assert (msdir / "up" / "a.tar").read_bytes() == b"tar"


def test_fsspec_shards_are_cached(msdir, tmp_path_factory):
    data = random.Random(6).randbytes(300_000)
    (msdir / "s.tar").write_bytes(data)
    opts = fast_options(cache_dir=str(tmp_path_factory.mktemp("cache")))
    sha = hashlib.sha256(data).hexdigest()
    for _ in range(2):
        with storage.open_stream("msdir://s.tar", sha256=sha, options=opts) as f:
            assert f.read() == data
    assert storage.stats["cache_misses"] == 1 and storage.stats["cache_hits"] == 1
    assert storage.stats["bytes_fetched"] == len(data)  # the second open read no byte from the store


@pytest.mark.parametrize("url, extra", [("gs://bucket/shards/manifest.json", "gcs"),
                                        ("az://container/shards/manifest.json", "azure"),
                                        ("hf://datasets/org/name/manifest.json", "hf")])
def test_a_missing_implementation_names_the_extra(url, extra):
    impl = {"gcs": "gcsfs", "azure": "adlfs", "hf": "huggingface_hub"}[extra]
    try:
        __import__(impl)
        pytest.skip(f"{impl} is installed")
    except ImportError:
        pass
    with pytest.raises(storage.StorageError, match=rf"needs the fsspec implementation .*pip install 'molstream\[{extra}\]'"):
        storage.read_bytes(url)


def test_an_unknown_scheme_is_refused_naming_the_url():
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme 'nosuch' in 'nosuch://b/k'.*fsspec"):
        storage.read_bytes("nosuch://b/k")


def _pass0(cfg: DataConfig, max_batches: int = 200):
    """(multiset of pass-0 keys, key sequence of every batch, stats) streamed through the DataModule's workers."""
    dm = ShardDataModule(cfg, rank=0, world_size=1)
    dm.setup()
    total = sum(len(ix) for ix in dm.resolved.train)
    keys: Counter = Counter()
    seq = []
    loader = dm.train_dataloader()
    it = iter(loader)
    try:
        while sum(keys.values()) < total:
            try:
                b = next(it)
            except StopIteration:  # an epoch ends before pass 0 of every domain has been delivered
                it = iter(loader)
                continue
            seq.append(tuple(b["keys"]))
            keys.update(k for k, p in zip(b["keys"], b.pass_index.tolist(), strict=True) if p == 0)
            assert len(seq) < max_batches, "pass 0 never completed"
    finally:
        it.close()
    return keys, seq, dm.stats()


@pytest.mark.slow
def test_two_workers_stream_one_pass_exactly_once_with_clients_made_after_fork(msdir, demo_shards):
    base = DataConfig(root=str(demo_shards), oversize_policy="crop", num_workers=2, worker_start_method="fork",
                      seed=4, prefetch_factor=1, shuffle_buffer_bytes=1 << 18)
    local, local_seq, _ = _pass0(base)
    assert len(local) > 600 and set(local.values()) == {1}
    fs = folder_fs.FolderFS
    fs.root, fs.fault_rate, fs.seed = str(demo_shards.parent), 0.05, 9
    fs.pid_log = str(msdir / "pids.log")
    cfg = replace(base, root=f"msdir://{demo_shards.name}", storage=fast_options(max_attempts=20))
    keys, seq, stats = _pass0(cfg)  # the main process reads manifest + index first: its instance exists before fork
    assert keys == local and seq == local_seq  # every sample once, the same batches as from local disk
    pids = Path(fs.pid_log).read_text().split()
    assert str(os.getpid()) in pids and len(set(pids) - {str(os.getpid())}) >= 2  # one instance per worker
    io = stats["storage"]
    assert io["bytes_fetched"] > 0 and io["retries"] > 0 and io["errors"] == 0
    assert all(stats[d]["bad"] == 0 for d in ("protein", "rna", "small_molecule", "metabolite"))
