"""http(s):// sources against a local http.server on 127.0.0.1 (with and without Range support)."""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from pipeline import storage
from tests.storage.helpers import fast_options
from tests.storage_servers import LOOPBACK, FaultProxy, FolderServer, free_port

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job


@pytest.fixture
def folder(tmp_path):
    rng = random.Random(9)
    files = {f"shards/s-{i}.tar": rng.randbytes(n) for i, n in enumerate([0, 5, 100_000, 400_003])}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    storage.stats.reset()
    return tmp_path, files


@pytest.mark.parametrize("ranges", [True, False])
def test_http_reads_seeks_and_exists(folder, ranges):
    root, files = folder
    with FolderServer(str(root), ranges=ranges) as server:
        for name, data in files.items():
            u = storage.join(server.url, name)
            with storage.open_stream(u, sha256=hashlib.sha256(data).hexdigest(), options=fast_options()) as f:
                assert storage.finish(f) == len(data)  # read to the end: sha256 checked
            assert storage.read_bytes(u) == data
            assert storage.exists(u)
        assert not storage.exists(server.url + "/shards/none.tar")
        big = files["shards/s-3.tar"]
        with storage.open_stream(server.url + "/shards/s-3.tar", options=fast_options(readahead_chunks=0)) as f:
            f.seek(300_000)
            assert f.read(50) == big[300_000:300_050]
            f.seek(10)
            assert f.read(5) == big[10:15]


def test_http_missing_file_names_the_url(folder):
    root, _ = folder
    with FolderServer(str(root)) as server:
        with pytest.raises(storage.StorageNotFoundError, match=r"not found: http://127\.0\.0\.1:\d+/shards/x\.tar \(HTTP 404\)"):
            storage.open_stream(server.url + "/shards/x.tar")
    assert storage.stats["retries"] == 0


def test_http_unreachable_fails_fast(folder):
    u = f"http://{LOOPBACK}:{free_port()}/shards/s-1.tar"
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match=rf"reading {u} failed at byte 0 after 3 consecutive"):
        storage.read_bytes(u, options=fast_options(max_attempts=3))
    assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)


def test_query_strings_are_redacted_from_errors_and_logs(folder, caplog):
    caplog.set_level("DEBUG")
    secret = "X-Amz-Signature=deadbeefcafe0123"
    u = f"http://{LOOPBACK}:{free_port()}/shards/s-1.tar?{secret}"
    with pytest.raises(storage.StorageError, match=r"s-1\.tar\?<redacted>") as e:
        storage.open_stream(u, options=fast_options(max_attempts=2))
    root, files = folder
    with FolderServer(str(root)) as server:
        assert storage.read_bytes(f"{server.url}/shards/s-2.tar?{secret}") == files["shards/s-2.tar"]
        with pytest.raises(storage.StorageNotFoundError, match=r"x\.tar\?<redacted>") as e2:
            storage.read_bytes(f"{server.url}/shards/x.tar?{secret}")
    ours = "\n".join(r.getMessage() for r in caplog.records  # urllib3's own DEBUG lines show request paths
                     if r.name.startswith("pipeline."))
    assert "<redacted>" in ours
    assert secret not in str(e.value) + str(e2.value) + ours


def test_http_without_range_support_resumes_by_skipping(folder):
    root, files = folder
    data = files["shards/s-3.tar"]
    with FolderServer(str(root), ranges=False) as server, \
            FaultProxy(server.url, rate=0.5, seed=1, kinds=("cut",)) as proxy:
        with storage.open_stream(proxy.endpoint + "/shards/s-3.tar", options=fast_options()) as f:
            assert f.read() == data
            assert f.stats["retries"] == proxy.counts["cut"] > 0
            assert f.stats["bytes_fetched"] == len(data)  # skipped bytes are not delivered twice


def test_writes_to_http_are_refused():
    with pytest.raises(storage.StorageError, match="for writing; supported: local paths, file:// and s3://"):
        storage.upload_file(__file__, "https://example.invalid/x")


@pytest.mark.parametrize("ranges", [True, False])
def test_http_read_range(folder, ranges):
    root, files = folder
    data = files["shards/s-3.tar"]
    with FolderServer(str(root), ranges=ranges) as server:
        u = server.url + "/shards/s-3.tar"
        for offset, size in [(0, 1), (1000, 250_000), (len(data) - 3, 10), (len(data) + 1, 4)]:
            assert storage.read_range(u, offset, size, options=fast_options()) == data[offset : offset + size]


def test_a_dripping_server_hits_the_request_deadline_then_the_retry_policy(folder):
    """1 byte every 50 ms never trips the read timeout; without a total deadline this read takes 80 minutes."""
    root, files = folder
    with FolderServer(str(root), drip_s=0.05) as server:
        u = storage.join(server.url, "shards/s-2.tar")
        opts = fast_options(read_timeout_s=2.0, request_deadline_s=0.5, max_attempts=3)
        with pytest.raises(storage.StorageError, match=r"after 3 consecutive attempt\(s\) \(2 retries in total\): "
                                                        r"no complete answer within storage.request_deadline_s=0.5 s"):
            storage.read_bytes(u, options=opts)
        with pytest.raises(storage.StorageError, match="request_deadline_s=0.5"):
            with storage.open_stream(u, options=opts) as f:  # the same through the read-ahead thread
                f.read()
    assert storage.stats["retries"] == 4 and storage.stats["errors"] == 2
    with pytest.raises(ValueError, match="request_deadline_s must be > 0"):
        storage.StorageOptions(request_deadline_s=0)
    assert storage.StorageOptions().request_deadline_s >= 60  # the default leaves a slow shard time to arrive


def test_the_deadline_does_not_cut_a_healthy_read(folder):
    root, files = folder
    with FolderServer(str(root)) as server:
        u = storage.join(server.url, "shards/s-3.tar")
        assert storage.read_bytes(u, options=fast_options(request_deadline_s=30)) == files["shards/s-3.tar"]
    assert storage.stats["retries"] == 0


def test_private_http_with_a_bearer_token_from_the_environment(folder, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    token, wrong = "tok-SECRET-0123456789abcdef", "wrong-token-fedcba9876543210"
    root, files = folder
    data = files["shards/s-3.tar"]
    var = "MOLSTREAM_TEST_HTTP_TOKEN"
    monkeypatch.delenv(var, raising=False)
    opts = fast_options(http_bearer_token_env=var)
    with FolderServer(str(root), token=token) as server:
        u = storage.join(server.url, "shards/s-3.tar")
        with pytest.raises(storage.StorageError, match=r"access denied .*HTTP 401.*http_bearer_token_env") as e0:
            storage.read_bytes(u, options=fast_options())
        with pytest.raises(storage.StorageError, match=rf"names \${var}, but \${var} is not set") as e1:
            storage.read_bytes(u, options=opts)
        monkeypatch.setenv(var, wrong)
        with pytest.raises(storage.StorageError, match=rf"access denied .*HTTP 401.*check the token in \${var}") as e2:
            storage.open_stream(u, options=opts)
        monkeypatch.setenv(var, token)
        assert storage.read_bytes(u, options=opts) == data
        assert storage.exists(u, options=opts) and not storage.exists(server.url + "/shards/none.tar", options=opts)
        with FaultProxy(server.url, rate=0.5, seed=1, kinds=("cut",)) as proxy:  # resumed requests carry it too
            pu = storage.join(proxy.endpoint, "shards/s-3.tar")
            with storage.open_stream(pu, sha256=hashlib.sha256(data).hexdigest(), options=opts) as f:
                assert f.read() == data and f.stats["resumes"] > 0
            assert storage.read_range(pu, 1000, 5000, options=opts) == data[1000:6000]
    for text in (str(e0.value), str(e1.value), str(e2.value), caplog.text):
        assert token not in text and wrong not in text
    with pytest.raises(ValueError, match="must name an environment variable") as e3:
        storage.StorageOptions(http_bearer_token_env=f"Bearer {token}")
    assert token not in str(e3.value)


def _drip_read_in_child(url: str, q) -> None:
    try:
        storage.read_bytes(url, options=fast_options(read_timeout_s=2.0, request_deadline_s=0.3, max_attempts=2))
        q.put("read completed")
    except storage.StorageError as e:
        q.put(str(e))


def test_the_deadline_also_fires_in_a_forked_worker(folder):
    """The parent's deadline watchdog thread does not survive fork; the child must start its own."""
    import multiprocessing

    root, files = folder
    with FolderServer(str(root), drip_s=0.05) as server:
        u = storage.join(server.url, "shards/s-2.tar")
        with pytest.raises(storage.StorageError, match="request_deadline_s"):  # the parent's watchdog is running
            storage.read_bytes(u, options=fast_options(read_timeout_s=2.0, request_deadline_s=0.3, max_attempts=2))
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_drip_read_in_child, args=(u, q))
        p.start()
        try:
            msg = q.get(timeout=60)
        finally:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert "request_deadline_s=0.3" in msg
