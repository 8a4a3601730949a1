"""Streaming shards from loopback S3 vs local disk, and through a 5 % fault proxy, in the same run.

Prints one JSON line. Each scenario reads every shard of the manifest through ``pipeline.storage``
(sha256-verified, tar-parsed member by member, like the loader's reader) and reports atoms/s
(manifest atoms / wall time, median of --repeats) and MB/s; ratios are against local disk measured in
the same run. Servers: moto's S3 server (IAM auth on) and :class:`FaultProxy`, both on 127.0.0.1.
With faults, a stalled request costs one read timeout (``--read-timeout``), so that figure depends on it.

    python benchmarks/s3_stream.py [--shards DIR] [--repeats 3] [--fault-rate 0.05] [--read-timeout 1.0]

Without --shards the vendored demo (data/demo/raw) is converted into a temporary folder first.
This measures the storage layer (a shard scan), not the whole loader (decode, mix, pack, collate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from pipeline import storage
from pipeline.schema import MANIFEST_NAME
from pipeline.storage_testing import FaultProxy, MotoServer

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"


def scan(root: str, opts: storage.StorageOptions) -> tuple[float, int, int]:
    """Read every shard of ``root`` once; returns (seconds, atoms, bytes)."""
    t0 = time.perf_counter()
    man = json.loads(storage.read_bytes(storage.join(root, MANIFEST_NAME), options=opts))
    atoms = nbytes = 0
    for sh in man["shards"]:
        with storage.open_stream(storage.join(root, sh["path"]), sha256=sh["sha256"], options=opts) as f:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for m in tar:
                    nbytes += len(tar.extractfile(m).read())
            storage.finish(f)
        atoms += sh["atoms"]
    return time.perf_counter() - t0, atoms, nbytes


def median_rate(root: str, opts: storage.StorageOptions, repeats: int) -> dict:
    runs = [scan(root, opts) for _ in range(repeats)]
    dt = statistics.median(r[0] for r in runs)
    return {"atoms_per_s": round(runs[0][1] / dt), "MB_per_s": round(runs[0][2] / dt / 1e6, 1), "seconds": round(dt, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=Path, help="converted shards folder (default: convert the demo)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fault-rate", type=float, default=0.05)
    p.add_argument("--read-timeout", type=float, default=1.0, help="seconds; a stall fault costs this much")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards
        if shards is None:
            from shards_tools.convert import main as convert

            shards = Path(tmp) / "shards"
            if convert([str(REPO / "data" / "demo" / "raw"), str(shards), "--no-progress", "-q"]) != 0:
                raise SystemExit("converting the demo data failed")
        with MotoServer() as moto:
            moto.boto3_client().create_bucket(Bucket=BUCKET)
            os.environ.update(moto.env())  # credentials only through the standard environment variables
            root = f"s3://{BUCKET}/shards"
            storage.upload_tree(str(shards), root)
            opts = storage.StorageOptions(read_timeout_s=a.read_timeout, backoff_s=0.05, max_attempts=8)
            out = {"benchmark": "s3_stream", "level": "shard scan (storage layer)", "shards": str(shards),
                   "repeats": a.repeats, "read_timeout_s": a.read_timeout}
            out["local"] = median_rate(str(shards), opts, a.repeats)
            out["s3"] = median_rate(root, opts, a.repeats)
            with FaultProxy(moto.endpoint, rate=a.fault_rate, seed=a.seed, stall_s=3 * a.read_timeout) as proxy:
                storage.stats.reset()
                faulty = storage.StorageOptions(**{**opts.__dict__, "endpoint_url": proxy.endpoint})
                out["s3_faults"] = median_rate(root, faulty, a.repeats)
                out["s3_faults"].update(fault_rate=a.fault_rate, faults=proxy.counts["faults"],
                                        retries=storage.stats["retries"], requests=proxy.counts["requests"])
    base = out["local"]["atoms_per_s"]
    out["s3_vs_local"] = round(out["s3"]["atoms_per_s"] / base, 3)
    out["s3_faults_vs_local"] = round(out["s3_faults"]["atoms_per_s"] / base, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
