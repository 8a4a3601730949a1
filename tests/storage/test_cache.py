"""The local shard cache: hits, sha256 verification and refetch, size bound, several processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import pytest

from pipeline import storage
from pipeline.storage.cache import entry_name
from tests.storage.helpers import BUCKET, fast_options
from tests.storage_servers import FaultProxy

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job

KEY = "data/obj-08.tar"  # 700 001 bytes
URL = f"s3://{BUCKET}/{KEY}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entries(cache_dir) -> list[str]:
    return sorted(n for n in os.listdir(cache_dir) if not n.startswith("."))


@pytest.fixture
def counted(s3_env):
    """A fault-free proxy in front of moto: ``proxy.counts['requests']`` counts what reached the network."""
    with FaultProxy(s3_env.endpoint) as proxy:
        yield proxy


def test_miss_then_hit_without_network(counted, objects, tmp_path):
    opts = fast_options(endpoint_url=counted.endpoint, cache_dir=str(tmp_path))
    data = objects[KEY]
    for _ in range(3):
        with storage.open_stream(URL, sha256=sha(data), options=opts) as f:
            assert f.read() == data
    assert counted.counts["requests"] == 1
    assert storage.stats["cache_misses"] == 1 and storage.stats["cache_hits"] == 2
    assert entries(tmp_path) == [entry_name(f"{counted.endpoint}|{URL}", URL)]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_names_are_unique_per_url_and_endpoint():
    a = entry_name("http://127.0.0.1:1|s3://b/x/s-0.tar", "s3://b/x/s-0.tar")
    assert a.endswith("-s-0.tar")
    assert len({a, entry_name("http://127.0.0.1:2|s3://b/x/s-0.tar", "s3://b/x/s-0.tar"),
                entry_name("http://127.0.0.1:1|s3://b/y/s-0.tar", "s3://b/y/s-0.tar")}) == 3


def test_corrupted_cache_entry_is_refused_and_refetched(counted, objects, tmp_path):
    opts = fast_options(endpoint_url=counted.endpoint, cache_dir=str(tmp_path))
    data = objects[KEY]
    with storage.open_stream(URL, sha256=sha(data), options=opts) as f:
        f.read()
    (path,) = entries(tmp_path)
    with open(tmp_path / path, "r+b") as f:  # a bit flip on the local disk
        f.seek(1234)
        b = f.read(1)
        f.seek(1234)
        f.write(bytes([b[0] ^ 0x10]))
    with storage.open_stream(URL, sha256=sha(data), options=opts) as f:
        assert f.read() == data
    assert storage.stats["checksum_mismatches"] == 1
    assert counted.counts["requests"] == 2  # fetched again
    assert (tmp_path / path).read_bytes() == data


def test_object_not_matching_manifest_is_refused_before_any_byte(counted, objects, tmp_path):
    opts = fast_options(endpoint_url=counted.endpoint, cache_dir=str(tmp_path))
    wrong = "ab" * 32
    with pytest.raises(storage.ChecksumMismatchError, match=rf"{URL}: expected {wrong}.*download 2 of 2"):
        storage.open_stream(URL, sha256=wrong, options=opts)
    assert counted.counts["requests"] == 2  # one refetch, then refused
    assert storage.stats["checksum_mismatches"] == 2
    assert os.listdir(tmp_path) == [".locks"] or entries(tmp_path) == []


def test_cache_is_bounded_lru(s3_env, objects, tmp_path):
    bound = 800_000
    opts = fast_options(cache_dir=str(tmp_path), cache_max_bytes=bound)
    keys = ["data/obj-07.tar", "data/obj-06.tar", "data/obj-08.tar", "data/obj-05.tar"]
    for key in keys:
        with storage.open_stream(f"s3://{BUCKET}/{key}", options=opts) as f:
            assert f.read() == objects[key]
        total = sum(os.path.getsize(tmp_path / n) for n in entries(tmp_path))
        assert total <= bound
    assert storage.stats["cache_evictions"] >= 1
    names = entries(tmp_path)
    assert any(n.endswith("obj-05.tar") for n in names)  # the newest entry is kept
    assert not any(n.endswith("obj-07.tar") for n in names)  # the oldest went first


def test_object_larger_than_the_bound_is_served_uncached(s3_env, objects, tmp_path):
    opts = fast_options(cache_dir=str(tmp_path), cache_max_bytes=1000)
    with storage.open_stream(URL, sha256=sha(objects[KEY]), options=opts) as f:
        assert f.read() == objects[KEY]
    assert entries(tmp_path) == []


def _worker(endpoint: str, cache_dir: str, expected: str, q) -> None:
    opts = fast_options(endpoint_url=endpoint, cache_dir=cache_dir, readahead_chunks=2)
    with storage.open_stream(URL, sha256=expected, options=opts) as f:
        data = f.read()
    q.put(sha(data))


def test_concurrent_processes_download_once(counted, objects, tmp_path):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    expected = sha(objects[KEY])
    procs = [ctx.Process(target=_worker, args=(counted.endpoint, str(tmp_path), expected, q)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got == [expected] * 4
    assert counted.counts["requests"] == 1  # one process downloaded, the others waited on its lock and hit
    assert len(entries(tmp_path)) == 1
