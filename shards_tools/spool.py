"""Phase 1 of a conversion: one input file -> encoded samples in a spool file plus a JSON sidecar.

Spools live in ``OUT/.work/`` and make reruns cheap: a file whose path, size, mtime and the
conversion options are unchanged is not parsed again. Both files are written under temporary names
and renamed, the sidecar last, so a spool exists only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.schema import FORMAT_VERSION, Sample, encode_sample, make_key
from shards_tools.graph import radius_pairs
from shards_tools.readers import domain_from_path, format_of, perceive_bonds, read_file
from shards_tools.structure import Rejection, Structure, validate

_DOMAIN_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class ConvertOptions:
    """What changes the bytes of a sample; part of every spool's fingerprint and of the manifest."""

    radius_A: float = 5.0
    max_neighbors: int = 64
    max_atoms: int | None = None
    domain: str | None = None
    trust_pickle: bool = False

    def digest(self) -> str:
        blob = json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class SpoolResult:
    """What phase 2 needs to know about one input file."""

    source: str
    spool: str
    entries: list[dict]
    rejected: list[dict]


def _fingerprint(path: Path, rel: str, opt: ConvertOptions) -> dict:
    st = path.stat()
    return {"source": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "options": opt.digest()}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def to_sample(s: Structure, rel: str, domain: str, fmt: str, opt: ConvertOptions) -> Sample:
    """Finish a validated structure: bonds perceived when absent, radius graph, stable key."""
    pos = np.asarray(s.pos, np.float32)
    z = np.asarray(s.z, np.uint8)
    if s.bonds is None:
        bonds, order = perceive_bonds(z, pos, with_orders=(fmt == "xyz"))
    else:
        bonds = np.asarray(s.bonds, np.int64).reshape(-1, 2)
        order = np.asarray(s.bond_order if s.bond_order is not None else np.zeros(len(bonds)), np.uint8)
    if len(bonds):  # canonical: i < j, sorted, unique
        bonds = np.sort(bonds, axis=1)
        bonds, first = np.unique(bonds, axis=0, return_index=True)
        order = order[first]
    source_id = f"{rel}#{s.record}"
    return Sample(
        key=make_key(s.mol_id, source_id),
        domain=domain,
        z=z,
        pos=pos,
        bonds=bonds.astype(np.int32),
        bond_order=order,
        edges=radius_pairs(pos, opt.radius_A, opt.max_neighbors),
        source=rel,
        record=s.record,
        mol_id=s.mol_id,
        radius_A=opt.radius_A,
        max_neighbors=opt.max_neighbors,
        res_index=s.res_index,
        chain=s.chain,
        chains=s.chains,
        atom_name=s.atom_name,
    )


def _domain_for(s: Structure, rel: Path, opt: ConvertOptions) -> str | None:
    return opt.domain or s.domain or domain_from_path(rel)


def spool_file(path: Path, rel: str, workdir: Path, opt: ConvertOptions) -> SpoolResult:
    """Convert one input file into ``workdir/<digest>.bin`` + ``.json``; reuse them when unchanged."""
    digest = hashlib.sha256(rel.encode()).hexdigest()[:24]
    bin_path, meta_path = workdir / f"{digest}.bin", workdir / f"{digest}.json"
    fp = _fingerprint(path, rel, opt)
    if meta_path.exists() and bin_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            return SpoolResult(rel, str(bin_path), meta["entries"], meta["rejected"])

    fmt = format_of(path) or ""
    entries: list[dict] = []
    rejected: list[dict] = []
    tmp_bin = bin_path.with_name(bin_path.name + f".tmp{os.getpid()}")
    offset = 0
    with open(tmp_bin, "wb") as out:
        for rec in read_file(path, trust_pickle=opt.trust_pickle):
            if isinstance(rec, Rejection):
                rejected.append({"file": rel, "record": rec.record, "reason": rec.reason})
                continue
            domain = _domain_for(rec, Path(rel), opt)
            if not domain:
                rejected.append({"file": rel, "record": rec.record, "reason": (
                    "cannot tell the domain: put the file in a folder named after its domain "
                    "(protein/, small_molecule/, ...) or pass --domain NAME")})
                continue
            if not set(domain) <= _DOMAIN_OK:
                rejected.append({"file": rel, "record": rec.record,
                                 "reason": f"domain name {domain!r} may only use letters, digits, '_' and '-'"})
                continue
            reason = validate(rec, opt.max_atoms)
            if reason:
                rejected.append({"file": rel, "record": rec.record, "reason": reason})
                continue
            sample = to_sample(rec, rel, domain, fmt, opt)
            data = encode_sample(sample)
            out.write(data)
            entries.append({
                "key": sample.key, "domain": domain, "source": rel, "record": rec.record,
                "num_atoms": sample.num_atoms, "num_bonds": len(sample.bonds), "num_edges": len(sample.edges),
                "spool_offset": offset, "size": len(data),
            })
            offset += len(data)
    if not entries and not rejected:
        rejected.append({"file": rel, "record": -1, "reason": f"no structures found in this {fmt or 'unknown'} file"})
    os.replace(tmp_bin, bin_path)
    _atomic_write(meta_path, json.dumps({"fingerprint": fp, "entries": entries, "rejected": rejected}).encode())
    return SpoolResult(rel, str(bin_path), entries, rejected)


def read_samples(path: Path, rel: str, domain: str, opt: ConvertOptions | None = None,
                 limit: int | None = None) -> list[Sample]:
    """The valid structures of one file as finished samples (what the converter would store), without
    writing anything: for benchmarks and tests that need real samples directly. Rejections are skipped."""
    opt = opt or ConvertOptions()
    fmt = format_of(path) or ""
    out: list[Sample] = []
    for rec in read_file(path, trust_pickle=opt.trust_pickle):
        if isinstance(rec, Structure) and validate(rec, opt.max_atoms) is None:
            out.append(to_sample(rec, rel, domain, fmt, opt))
            if limit is not None and len(out) >= limit:
                break
    return out
