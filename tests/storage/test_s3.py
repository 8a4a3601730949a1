"""s3:// through boto3 against moto's real S3 server on 127.0.0.1 (IAM auth on)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import random
import socket
import time

import pytest

from pipeline import storage
from pipeline.storage import s3
from tests.storage.helpers import BUCKET, fast_options
from tests.storage_servers import LOOPBACK, free_port

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job


def url(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


@pytest.mark.parametrize("readahead", [0, 4])
def test_every_object_reads_byte_identical(s3_env, objects, readahead):
    opts = fast_options(readahead_chunks=readahead)
    for key, data in objects.items():
        with storage.open_stream(url(key), options=opts) as f:
            assert f.read() == data, key
            assert f.read() == b"" and f.read(10) == b""
            assert f.stats["bytes_fetched"] == len(data)
    snap = storage.stats.snapshot()
    assert snap["streams"] == len(objects) and snap["requests"] == len(objects)
    assert snap["retries"] == 0 and snap["bytes_fetched"] == sum(map(len, objects.values()))


def test_small_reads_match_and_sha_verified(s3_env, objects):
    key, data = "data/obj-08.tar", objects["data/obj-08.tar"]
    sha = hashlib.sha256(data).hexdigest()
    rng = random.Random(0)
    out = bytearray()
    with storage.open_stream(url(key), sha256=sha, options=fast_options()) as f:
        while True:
            part = f.read(rng.choice([1, 511, 512, 10240, 70000]))
            if not part:
                break
            out += part
    assert bytes(out) == data


def test_sha_mismatch_raises_at_end_of_stream(s3_env, objects):
    key = "data/obj-06.tar"
    with storage.open_stream(url(key), sha256="0" * 64, options=fast_options()) as f:
        with pytest.raises(storage.ChecksumMismatchError, match=key):
            storage.finish(f)
    assert storage.stats["checksum_mismatches"] == 1


def test_seek_uses_range_requests(s3_env, objects):
    key, data = "data/obj-08.tar", objects["data/obj-08.tar"]
    rng = random.Random(7)
    with storage.open_stream(url(key), options=fast_options(readahead_chunks=2)) as f:
        assert f.seekable()
        for _ in range(20):
            start, n = rng.randrange(len(data)), rng.randrange(1, 50_000)
            assert f.seek(start) == start
            assert f.read(n) == data[start : start + n]
            assert f.tell() == min(len(data), start + n)
        assert f.seek(-10, os.SEEK_END) == len(data) - 10 and f.read() == data[-10:]
        assert f.seek(len(data) + 5) == len(data) + 5 and f.read(3) == b""
    assert storage.stats["resumes"] > 0


def test_read_bytes_join_exists(s3_env, objects):
    root = f"s3://{BUCKET}/data/"
    assert storage.join(root, "obj-02.tar") == url("data/obj-02.tar")
    assert storage.read_bytes(storage.join(root, "obj-02.tar")) == objects["data/obj-02.tar"]
    assert storage.exists(url("data/obj-02.tar"))
    assert not storage.exists(url("data/nope.tar"))


def test_write_bytes_and_upload_file_roundtrip(s3_env, tmp_path):
    storage.write_bytes(url("out/manifest.json"), b'{"format_version": 1}')
    assert storage.read_bytes(url("out/manifest.json")) == b'{"format_version": 1}'
    blob = random.Random(3).randbytes(200_000)
    (tmp_path / "shard.tar").write_bytes(blob)
    storage.upload_file(str(tmp_path / "shard.tar"), url("out/protein/protein-000000.tar"))
    with storage.open_stream(url("out/protein/protein-000000.tar")) as f:
        assert f.read() == blob
    with pytest.raises(storage.StorageError, match="no such local file"):
        storage.upload_file(str(tmp_path / "absent.tar"), url("out/x.tar"))
    with pytest.raises(storage.StorageNotFoundError, match="s3://no-such-bucket/x"):
        storage.write_bytes("s3://no-such-bucket/x", b"1")
    with pytest.raises(storage.StorageError, match="unsupported URL scheme 'http' .* for writing"):
        storage.write_bytes("http://127.0.0.1:1/x", b"1")


def test_missing_object_and_bucket_fail_fast_naming_the_url(s3_env):
    with pytest.raises(storage.StorageNotFoundError, match=r"s3://shards/data/absent\.tar .*no such object"):
        storage.open_stream(url("data/absent.tar"), options=fast_options())
    with pytest.raises(FileNotFoundError, match="s3://nobucket-xyz/k.*no such bucket"):
        storage.read_bytes("s3://nobucket-xyz/k", options=fast_options())
    assert storage.stats["retries"] == 0  # fast = not retried (no wall-clock bound: the machine may be loaded)
    with pytest.raises(storage.StorageError, match="expected s3://bucket/key"):
        storage.open_stream("s3://only-bucket")


def test_wrong_credentials_clear_error_fast_and_secret_never_shown(s3_env, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    wrong_secret = "wrong-secret-value-1234567890"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage.reset_clients()
    with pytest.raises(storage.StorageError, match="access denied.*SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY") as e:
        storage.open_stream(url("data/obj-02.tar"), options=fast_options())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    storage.reset_clients()
    with pytest.raises(storage.StorageError, match="access denied.*InvalidAccessKeyId") as e2:
        storage.read_bytes(url("data/obj-02.tar"), options=fast_options())
    with pytest.raises(storage.StorageError, match="access denied"):
        storage.write_bytes(url("out/denied"), b"x", options=fast_options())
    assert storage.stats["retries"] == 0  # fast = not retried
    for text in (str(e.value), str(e2.value), caplog.text):
        assert wrong_secret not in text and s3_env.secret_key not in text


def test_no_credentials_at_all(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.reset_clients()
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="Unable to locate credentials.*AWS_ACCESS_KEY_ID"):
        storage.open_stream(url("data/obj-02.tar"), options=fast_options())
    assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)


def test_unreachable_endpoint_gives_up_within_bounds(s3_env):
    closed = f"http://{LOOPBACK}:{free_port()}"
    opts = fast_options(endpoint_url=closed, max_attempts=4)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"s3://shards/data/obj-02.tar \(endpoint {closed}\) failed .*4 consecutive"):
        storage.open_stream(url("data/obj-02.tar"), options=opts)
    assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)
    assert storage.stats["retries"] == 3 and storage.stats["errors"] == 1


def test_silent_endpoint_times_out_instead_of_hanging(s3_env):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind((LOOPBACK, 0))
        silent.listen(16)
        endpoint = f"http://{LOOPBACK}:{silent.getsockname()[1]}"
        opts = fast_options(endpoint_url=endpoint, read_timeout_s=0.3, max_attempts=3)
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match="Read timeout"):
            storage.open_stream(url("data/obj-02.tar"), options=opts)
        assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)


def test_endpoint_resolution_option_then_env(s3_env, monkeypatch, objects):
    closed = f"http://{LOOPBACK}:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)  # the option wins over the environment
    assert storage.read_bytes(url("data/obj-02.tar"), options=fast_options(endpoint_url=s3_env.endpoint)) == \
        objects["data/obj-02.tar"]
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)  # generic variable as a fallback
    assert storage.read_bytes(url("data/obj-02.tar"), options=fast_options()) == objects["data/obj-02.tar"]
    with pytest.raises(storage.StorageError, match="invalid S3 endpoint"):
        storage.read_bytes(url("data/obj-02.tar"), options=fast_options(endpoint_url="not a url"))


def _child_read(key: str, q) -> None:
    data = storage.read_bytes(url(key))
    q.put((os.getpid(), hashlib.sha256(data).hexdigest(), sorted({k[0] for k in s3._clients}),
           storage.stats["streams"]))


def test_forked_worker_creates_its_own_client(s3_env, objects):
    key = "data/obj-07.tar"
    storage.read_bytes(url(key))  # the parent has a client and counters now
    assert {k[0] for k in s3._clients} == {os.getpid()}
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child_read, args=(key, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for pid, sha, client_pids, streams in results:
        assert sha == hashlib.sha256(objects[key]).hexdigest()
        assert client_pids == [pid]  # the parent's client was dropped at fork, a new one made
        assert streams == 1  # counters start from zero in a forked worker


def test_options_validation_and_configure():
    with pytest.raises(ValueError, match="storage.read_timeout_s must be > 0"):
        storage.StorageOptions(read_timeout_s=0)
    with pytest.raises(ValueError, match=r"unknown storage option\(s\) \['cache_size'\]"):
        storage.configure(cache_size=3)
    before = storage.get_options()
    try:
        assert storage.configure(max_attempts=7).max_attempts == 7
        assert storage.get_options().max_attempts == 7
    finally:
        storage.configure(before)


def test_upload_tree_writes_manifest_last(s3_env, tmp_path):
    (tmp_path / "protein").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / ".work").mkdir()
    (tmp_path / "protein" / "protein-000000.tar").write_bytes(b"t" * 1000)
    (tmp_path / "index" / "protein.parquet").write_bytes(b"p")
    (tmp_path / ".work" / "spool").write_bytes(b"skip me")
    (tmp_path / "manifest.json").write_bytes(b"{}")
    (tmp_path / "rejected.jsonl").write_bytes(b"")
    root = f"s3://{BUCKET}/tree"
    done = storage.upload_tree(str(tmp_path), root)
    assert done[-1] == f"{root}/manifest.json" and len(done) == 4
    assert storage.read_bytes(f"{root}/protein/protein-000000.tar") == b"t" * 1000
    assert not storage.exists(f"{root}/.work/spool")
    assert storage.read_bytes(f"{root}/rejected.jsonl") == b""


def test_read_range_is_one_bounded_request(s3_env, objects):
    key, data = "data/obj-08.tar", objects["data/obj-08.tar"]
    opts = fast_options()
    for offset, size in [(0, 10), (12345, 100_000), (len(data) - 5, 5), (len(data) - 5, 50), (len(data), 7), (3, 0)]:
        assert storage.read_range(url(key), offset, size, options=opts) == data[offset : offset + size]
    assert storage.stats["bytes_fetched"] == 10 + 100_000 + 5 + 5
    assert storage.read_range(url("data/obj-00.tar"), 0, 10, options=opts) == b""  # empty object


def test_read_range_resumes_through_cuts(s3_env, objects):
    from tests.storage_servers import FaultProxy

    key, data = "data/obj-08.tar", objects["data/obj-08.tar"]
    with FaultProxy(s3_env.endpoint, rate=0.5, seed=1, kinds=("cut", "stall_body")) as proxy:
        opts = fast_options(endpoint_url=proxy.endpoint)
        for offset in range(0, len(data), 150_000):
            assert storage.read_range(url(key), offset, 200_000, options=opts) == data[offset : offset + 200_000]
        assert storage.stats["retries"] == proxy.counts["faults"] > 0
