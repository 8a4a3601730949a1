"""Reads through a fault-injecting proxy on 127.0.0.1: identical bytes, every fault retried and counted."""

from __future__ import annotations

import time

import pytest

from pipeline import storage
from tests.storage.helpers import BUCKET, fast_options
from tests.storage_servers import FAULT_KINDS, FaultProxy, FolderServer

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job


def read_all(objects: dict[str, bytes], opts: storage.StorageOptions, root: str = f"s3://{BUCKET}") -> None:
    for key, data in objects.items():
        with storage.open_stream(f"{root}/{key}", options=opts) as f:
            got = f.read()
        assert got == data, f"{key}: {len(got)} bytes read, {len(data)} expected"


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind_is_survived_and_counted(s3_env, objects, kind):
    with FaultProxy(s3_env.endpoint, rate=0.5, seed=11, kinds=(kind,), stall_s=1.5) as proxy:
        read_all(objects, fast_options(endpoint_url=proxy.endpoint))
        assert proxy.counts[kind] > 0
        # every injected fault costs exactly one failed attempt, and nothing else fails
        assert storage.stats["retries"] >= proxy.counts["faults"]  # each fault retried; a loaded machine adds timeouts
    if kind in ("cut", "stall_body"):
        assert storage.stats["resumes"] > 0  # continued at the last byte, not from 0
    assert storage.stats["errors"] == 0


@pytest.mark.parametrize("readahead", [0, 3])
def test_mixed_faults_many_seeds(s3_env, objects, readahead):
    opts_kw = dict(readahead_chunks=readahead)
    total_faults = 0
    with FaultProxy(s3_env.endpoint, rate=0.3, seed=0, stall_s=1.5) as proxy:
        for seed in range(3):
            proxy._rng.seed(seed)
            read_all(objects, fast_options(endpoint_url=proxy.endpoint, **opts_kw))
            assert storage.read_bytes(f"s3://{BUCKET}/data/obj-07.tar",
                                      options=fast_options(endpoint_url=proxy.endpoint)) == objects["data/obj-07.tar"]
        total_faults = proxy.counts["faults"]
    assert total_faults > 3
    assert storage.stats["retries"] >= total_faults  # each fault retried; a loaded machine adds timeouts


def test_resume_bytes_not_refetched(s3_env, objects):
    """After a cut, the next request starts at the byte where the body broke off."""
    key, data = "data/obj-08.tar", objects["data/obj-08.tar"]
    with FaultProxy(s3_env.endpoint, rate=1.0, kinds=("cut",)) as proxy:
        opts = fast_options(endpoint_url=proxy.endpoint, max_attempts=40, max_total_retries=40)
        with storage.open_stream(f"s3://{BUCKET}/{key}", options=opts) as f:
            assert f.read() == data
            # each request delivers half of what is left: ~log2(size) requests, each one a resume after the first
            assert f.stats["bytes_fetched"] == len(data)
            assert f.stats["retries"] == proxy.counts["cut"] == f.stats["requests"] - 1 <= 25


def test_persistent_faults_give_up_with_a_clear_error(s3_env, objects):
    with FaultProxy(s3_env.endpoint, rate=1.0, kinds=("503",)) as proxy:
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match=r"s3://shards/data/obj-02.tar .* 3 consecutive .*HTTP 503"):
            storage.open_stream(f"s3://{BUCKET}/data/obj-02.tar",
                                options=fast_options(endpoint_url=proxy.endpoint, max_attempts=3))
        assert time.monotonic() - t0 < 60  # catches a hang, not a speed bound (the counters pin the behaviour)
        assert proxy.counts["503"] == 3
    assert storage.stats["retries"] == 2 and storage.stats["errors"] == 1


def test_stream_total_retry_budget_is_bounded(s3_env, objects):
    """Progress resets the consecutive count, but max_total_retries still bounds a flapping link."""
    with FaultProxy(s3_env.endpoint, rate=1.0, kinds=("cut",)) as proxy:
        opts = fast_options(endpoint_url=proxy.endpoint, max_attempts=100, max_total_retries=4)
        with pytest.raises(storage.StorageError, match="obj-08.tar"):
            storage.read_bytes(f"s3://{BUCKET}/data/obj-08.tar", options=opts)
        assert proxy.counts["cut"] == 5


@pytest.mark.parametrize("ranges", [True, False])
def test_http_through_faults(tmp_path, objects, ranges):
    for key, data in objects.items():
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(data)
    storage.stats.reset()
    with FolderServer(str(tmp_path), ranges=ranges) as server, \
            FaultProxy(server.url, rate=0.4, seed=5, stall_s=1.5) as proxy:
        # a 1 s read timeout: stalls (1.5 s) still time out, a slow answer on a loaded 2-core box (0.4 s) does not
        read_all(objects, fast_options(read_timeout_s=1.0), root=proxy.endpoint)
        assert proxy.counts["faults"] > 0
        assert storage.stats["retries"] == proxy.counts["faults"]
