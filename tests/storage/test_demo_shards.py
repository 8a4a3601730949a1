"""The converter's demo shards uploaded to loopback S3 and read back through faults: same members, same bytes."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pytest

from pipeline import storage
from pipeline.schema import MANIFEST_NAME, decode_block
from tests.storage.helpers import BUCKET, fast_options
from tests.storage_servers import FaultProxy

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI job


def members(root: str, opts: storage.StorageOptions | None = None) -> Counter:
    """Multiset of (shard, member name, payload) over every shard of the manifest, read through storage."""
    man = json.loads(storage.read_bytes(storage.join(root, MANIFEST_NAME), options=opts))
    out: Counter = Counter()
    for sh in man["shards"]:
        with storage.open_stream(storage.join(root, sh["path"]), sha256=sh["sha256"], options=opts) as f:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for m in tar:
                    out[(sh["path"], m.name, tar.extractfile(m).read())] += 1
            storage.finish(f)  # trailing padding read: the sha256 is checked
    return out


@pytest.fixture(scope="module")
def demo_on_s3(demo_shards, moto, objects):
    root = f"s3://{BUCKET}/demo"
    client = moto.boto3_client()  # setup with a plain client; the code under test only reads
    for path in sorted(p for p in demo_shards.rglob("*") if p.is_file() and ".work" not in p.parts):
        client.upload_file(str(path), BUCKET, f"demo/{path.relative_to(demo_shards).as_posix()}")
    return root


def test_demo_pass_through_faults_equals_local_pass(s3_env, demo_shards, demo_on_s3):
    local = members(str(demo_shards))
    assert sum(local.values()) > 20 and sum(len(decode_block(k[2])) for k in local) == 736  # block members
    assert members(demo_on_s3, fast_options()) == local
    with FaultProxy(s3_env.endpoint, rate=0.2, seed=3, stall_s=1.5) as proxy:
        faulty = members(demo_on_s3, fast_options(endpoint_url=proxy.endpoint, chunk_bytes=256 << 10))
        assert proxy.counts["faults"] > 0
        assert storage.stats["retries"] == proxy.counts["faults"]
    assert faulty == local
    assert storage.stats["checksum_mismatches"] == 0


def test_corrupted_shard_detected_by_manifest_sha(s3_env, demo_shards, demo_on_s3, moto):
    man = json.loads((demo_shards / MANIFEST_NAME).read_text())
    sh = max(man["shards"], key=lambda s: s["bytes"])
    data = bytearray((demo_shards / sh["path"]).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped in the store
    moto.boto3_client().put_object(Bucket=BUCKET, Key=f"demo-bad/{sh['path']}", Body=bytes(data))
    url = f"s3://{BUCKET}/demo-bad/{sh['path']}"
    with storage.open_stream(url, sha256=sh["sha256"], options=fast_options()) as f:
        with pytest.raises(storage.ChecksumMismatchError, match=sh["path"]):
            storage.finish(f)
