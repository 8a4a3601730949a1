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
    assert time.monotonic() - t0 < 2


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
