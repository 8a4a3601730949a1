"""The loader streaming from loopback S3 vs local disk, and through a 5 % fault proxy, in the same run.

Prints one JSON line. ``loader``: one epoch of the training loader (1 DataLoader worker: read + decode +
shuffle + mixing + packing + collate; one epoch = one pass of the training atoms over the budget) from local
disk, from moto's S3 server (IAM auth on) and through :class:`FaultProxy` at ``--fault-rate``, on the same
shards; atoms/s = atoms delivered / wall time from the first ``iter()`` (median of --repeats), with the
loader's storage counters (requests, retries). ``scan``: the storage layer alone (every shard read once,
sha256-verified and tar-parsed), as before. Counters (requests, retries, faults) are totals over the
repeats; the loader's counters cover its shard reads (not the manifest and index reads). Ratios are against local disk in the same run. A stalled
request costs one read timeout (``--read-timeout``), so the fault figures depend on it.

    python benchmarks/s3_stream.py [--shards DIR] [--repeats 3] [--fault-rate 0.05] [--read-timeout 1.0]

Without --shards the vendored demo (data/demo/raw) is converted into a temporary folder first.
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
from dataclasses import replace
from pathlib import Path

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.loader import TrainLoader, resolve
from pipeline.schema import MANIFEST_NAME
from tests.storage_servers import FaultProxy, MotoServer

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


def loader_pass(cfg: DataConfig) -> tuple[float, int, dict]:
    """One epoch of the training loader; returns (seconds, atoms delivered, storage counters)."""
    t0 = time.perf_counter()
    loader = TrainLoader(resolve(cfg), 0, 1)
    atoms = sum(int(b.num_nodes) for b in loader)
    return time.perf_counter() - t0, atoms, loader.storage_stats()


def loader_rate(cfg: DataConfig, repeats: int) -> dict:
    runs = [loader_pass(cfg) for _ in range(repeats)]
    dt = statistics.median(r[0] for r in runs)
    io = {k: sum(r[2][k] for r in runs) for k in ("requests", "retries", "bytes_fetched")}  # over all repeats
    return {"atoms_per_s": round(runs[0][1] / dt), "seconds": round(dt, 4), "atoms": runs[0][1],
            "requests": io["requests"], "retries": io["retries"], "MB_fetched": round(io["bytes_fetched"] / 1e6, 1)}


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
            cfg = DataConfig(root=str(shards), oversize_policy="crop", num_workers=1, worker_start_method="fork",
                             storage=opts)
            out = {"benchmark": "s3_stream", "shards": str(shards), "repeats": a.repeats,
                   "read_timeout_s": a.read_timeout, "fault_rate": a.fault_rate, "loader": {}, "scan": {}}
            with FaultProxy(moto.endpoint, rate=a.fault_rate, seed=a.seed, stall_s=3 * a.read_timeout) as proxy:
                faulty = replace(opts, endpoint_url=proxy.endpoint)
                for level, rate in (("loader", lambda r, o: loader_rate(replace(cfg, root=r, storage=o), a.repeats)),
                                    ("scan", lambda r, o: median_rate(r, o, a.repeats))):
                    res = out[level]
                    res["local"] = rate(str(shards), opts)
                    res["s3"] = rate(root, opts)
                    proxy.reset_counts()
                    storage.stats.reset()
                    res["s3_faults"] = rate(root, faulty)
                    res["s3_faults"].update(faults=proxy.counts["faults"], proxy_requests=proxy.counts["requests"])
                    if level == "scan":
                        res["s3_faults"]["retries"] = storage.stats["retries"]
                    base = res["local"]["atoms_per_s"]
                    res["s3_vs_local"] = round(res["s3"]["atoms_per_s"] / base, 3)
                    res["s3_faults_vs_local"] = round(res["s3_faults"]["atoms_per_s"] / base, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
