"""Phase 2 of a conversion: spooled samples -> shuffled tar shards of block members, Parquet indices, manifest.

Pure planning (:func:`plan_shards`; splits: :mod:`shards_tools.splits`) is separate from the writing. Every file is
written under a temporary name and renamed; the manifest is written last, so an interrupted run never
leaves output that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import (
    BLOCK_MAX_SAMPLES,
    BLOCK_TARGET_BYTES,
    FORMAT_VERSION,
    INDEX_DIR,
    MEMBER_EXT,
    REJECTED_NAME,
    SPLITS,
    Sample,
    SchemaError,
    block_group,
    decode_block_arrays,
    decode_sample,
    encode_block,
    sample_nbytes,
)

TAR_BLOCK = 512


def member_bytes(size: int) -> int:
    """Bytes a member of ``size`` takes in a tar: header plus padded data."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def plan_shards(entries: list[dict], domain: str, split: str, seed: int, target_bytes: int) -> list[list[dict]]:
    """Seeded global permutation of one domain/split, cut into shards of about ``target_bytes``.

    ``entries`` must come in a canonical order (sorted by source and record) so that the plan does
    not depend on how many workers parsed the inputs.
    """
    if not entries:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), SPLITS.index(split)])
    order = rng.permutation(len(entries))
    shards, current, size = [], [], 0
    for i in order:
        e = entries[i]
        current.append(e)
        size += member_bytes(e["size"])
        if size >= target_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


class _HashingWriter(io.RawIOBase):
    """File wrapper that hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, f):
        self.f, self.h, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.h.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos


@dataclass
class ShardInfo:
    path: str
    domain: str
    split: str
    samples: int
    atoms: int
    bytes: int
    sha256: str


def _blocks(members: list[dict], read) -> Iterable[tuple[list[dict], list[Sample]]]:
    """Consecutive members grouped into blocks: a block closes at :data:`BLOCK_TARGET_BYTES` of arrays, at
    :data:`BLOCK_MAX_SAMPLES` samples, or where the next sample cannot share it (:func:`block_group`)."""
    ents: list[dict] = []
    samples: list[Sample] = []
    nbytes = 0
    for e in members:
        s = read(e)
        if samples and (block_group(s) != block_group(samples[0]) or nbytes >= BLOCK_TARGET_BYTES
                        or len(samples) >= BLOCK_MAX_SAMPLES):
            yield ents, samples
            ents, samples, nbytes = [], [], 0
        ents.append(e)
        samples.append(s)
        nbytes += sample_nbytes(s)
    if samples:
        yield ents, samples


def write_shard(out_root: Path, rel_path: str, members: list[dict], domain: str, split: str) -> tuple[ShardInfo, list[dict]]:
    """Write one tar shard of block members (deterministic headers) and return its info and its index rows (one
    per sample: its block's byte range and crc32, its position in the block)."""
    final = out_root / rel_path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    rows = []
    spools: dict[str, object] = {}

    def read(e: dict) -> Sample:
        f = spools.get(e["spool"])
        if f is None:
            f = spools[e["spool"]] = open(e["spool"], "rb")  # noqa: SIM115 - closed below
        f.seek(e["spool_offset"])
        return decode_sample(f.read(e["size"]), where=f"spool {e['spool']} at {e['spool_offset']}", check_values=False)

    try:
        with open(tmp, "wb") as raw:
            hw = _HashingWriter(raw)
            with tarfile.open(fileobj=hw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for ents, samples in _blocks(members, read):
                    data = encode_block(samples)
                    _, _, faults = decode_block_arrays(data)  # values checked once per block, as the loader will
                    if faults:
                        k, what = next(iter(faults.items()))
                        raise SchemaError(f"sample {samples[k].key!r} (record {samples[k].record} of "
                                          f"{samples[k].source!r}) breaks the shard schema: {what}; a parser let it "
                                          "through: please report it with the input file")
                    info = tarfile.TarInfo(f"{ents[0]['key']}.{MEMBER_EXT}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
                    data_offset = tar.offset - -(-len(data) // TAR_BLOCK) * TAR_BLOCK
                    crc = zlib.crc32(data)
                    for item, e in enumerate(ents):
                        rows.append({
                            "key": e["key"], "domain": domain, "split": split, "shard": rel_path,
                            "offset": data_offset, "size": len(data), "item": item, "crc32": crc,
                            "num_atoms": e["num_atoms"], "num_bonds": e["num_bonds"], "num_edges": e["num_edges"],
                            "source": e["source"], "record": e["record"],
                        })
            size = hw.pos
            digest = hw.h.hexdigest()
        os.replace(tmp, final)
    finally:
        for f in spools.values():
            f.close()
        tmp.unlink(missing_ok=True)
    atoms = sum(e["num_atoms"] for e in members)
    return ShardInfo(rel_path, domain, split, len(members), atoms, size, digest), rows


_INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("domain", pa.string()), ("split", pa.string()), ("shard", pa.string()),
    ("offset", pa.int64()), ("size", pa.int64()), ("item", pa.int32()), ("crc32", pa.int64()), ("num_atoms", pa.int32()), ("num_bonds", pa.int32()),
    ("num_edges", pa.int32()), ("source", pa.string()), ("record", pa.int32()),
])


def write_index(out_root: Path, domain: str, rows: list[dict]) -> str:
    rel = f"{INDEX_DIR}/{domain}.parquet"
    final = out_root / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=_INDEX_SCHEMA)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    return rel


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_rejected(out_root: Path, rejected: Iterable[dict]) -> None:
    tmp = out_root / (REJECTED_NAME + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rejected:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, out_root / REJECTED_NAME)


def manifest(shards: list[ShardInfo], index: dict[str, str], options: dict, n_rejected: int) -> dict:
    domains: dict[str, dict] = {}
    for s in shards:
        d = domains.setdefault(s.domain, {"samples": 0, "atoms": 0, "splits": {}})
        d["samples"] += s.samples
        d["atoms"] += s.atoms
        sp = d["splits"].setdefault(s.split, {"samples": 0, "atoms": 0, "shards": 0})
        sp["samples"] += s.samples
        sp["atoms"] += s.atoms
        sp["shards"] += 1
    return {
        "format_version": FORMAT_VERSION,
        "created_by": "shards_tools.convert",
        "options": options,
        "domains": domains,
        "shards": [vars(s) for s in shards],
        "index": index,
        "rejected": n_rejected,
    }


def remove_stale(out_root: Path, keep: set[str], domains: Iterable[str]) -> None:
    """Delete shards and indices of an earlier run that the new plan does not contain."""
    for d in domains:
        for p in (out_root / d).glob(f"{d}-*.tar"):
            if f"{d}/{p.name}" not in keep:
                p.unlink()
    for p in (out_root / INDEX_DIR).glob("*.parquet") if (out_root / INDEX_DIR).exists() else []:
        if f"{INDEX_DIR}/{p.name}" not in keep:
            p.unlink()

