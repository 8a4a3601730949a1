"""Phase 1 of a conversion: input records -> encoded samples in a spool file plus a JSON sidecar.

One spool per task: a whole file (PDB, mmCIF, BCIF, .pt) or a range of records of a multi-record
SDF/XYZ file, so one large file is parsed by many workers at once. Spools live in ``OUT/.work/`` and
make a rerun after a kill cheap: a task whose file (path, size, mtime), record range and conversion
options are unchanged is not parsed again. Both files are written under temporary names and renamed,
the sidecar last, so a spool exists only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.schema import FORMAT_VERSION, Sample, encode_sample, make_key
from shards_tools.graph import radius_pairs
from shards_tools.readers import (
    RawRecord,
    ReadLimits,
    Record,
    describe_error,
    domain_from_path,
    format_of,
    parse_errors,
    parse_record,
    perceive_bonds,
    read_file,
)
from shards_tools.structure import Rejection, Structure, validate

_DOMAIN_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class ConvertOptions:
    """What changes the bytes of a sample or which inputs are refused; part of every spool's fingerprint."""

    radius_A: float = 5.0
    """Radius-graph cutoff, Å."""
    max_neighbors: int = 64
    """Radius-graph neighbours kept per atom."""
    max_atoms: int | None = None
    """Structures with more atoms are refused (None: no limit)."""
    domain: str | None = None
    """Put every input into this domain (None: infer it)."""
    trust_pickle: bool = False
    """Allow .pt files that need arbitrary unpickling."""
    max_input_mb: float = 512.0
    """MB, decompressed: largest file read whole, and largest single SDF/XYZ record."""
    max_file_atoms: int = 2_000_000
    """Atom records of one PDB/mmCIF/BCIF file (all models), counted before parsing."""

    def digest(self) -> str:
        blob = json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def limits(self) -> ReadLimits:
        return ReadLimits(max_input_bytes=int(self.max_input_mb * 1e6), max_file_atoms=self.max_file_atoms)


@dataclass
class SpoolResult:
    """What phase 2 needs to know about one task (a file, or a record range of one)."""

    source: str
    spool: str
    entries: list[dict]
    rejected: list[dict]


def file_fingerprint(path: Path, rel: str, opt: ConvertOptions) -> dict:
    st = path.stat()
    return {"source": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "options": opt.digest()}


def spool_paths(workdir: Path, rel: str, part: int | None = None) -> tuple[Path, Path]:
    """(samples, sidecar) of the whole file (``part`` None) or of its record range number ``part``."""
    digest = hashlib.sha256(rel.encode()).hexdigest()[:24]
    stem = digest if part is None else f"{digest}-r{part:06d}"
    return workdir / f"{stem}.bin", workdir / f"{stem}.json"


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_spool(bin_path: Path, meta_path: Path, fp: dict) -> SpoolResult | None:
    """A finished spool whose fingerprint is ``fp``, or None."""
    if not (meta_path.exists() and bin_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fp:
        return None
    return SpoolResult(fp["source"], str(bin_path), meta["entries"], meta["rejected"])


def to_sample(s: Structure, rel: str, domain: str, fmt: str, opt: ConvertOptions) -> Sample:
    """Finish a validated structure: bonds perceived when absent, radius graph, stable key."""
    pos = np.asarray(s.pos, np.float32)
    z = np.asarray(s.z, np.uint8)
    if s.bonds is None:
        bonds, order = perceive_bonds(z, pos, with_orders=(fmt == "xyz"))
    else:
        bonds = np.asarray(s.bonds, np.int64).reshape(-1, 2)
        order = np.asarray(s.bond_order if s.bond_order is not None else np.zeros(len(bonds)), np.uint8)
    if len(bonds):  # canonical: i < j, sorted, unique (i * N + j orders pairs as (i, j) does)
        bonds = np.sort(bonds, axis=1)
        code, first = np.unique(bonds[:, 0] * len(z) + bonds[:, 1], return_index=True)
        bonds, order = np.stack([code // len(z), code % len(z)], axis=1), order[first]
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


def _finish(rec: Structure, rel: str, fmt: str, opt: ConvertOptions) -> Sample | str:
    """The sample of one parsed structure, or why it is refused."""
    domain = _domain_for(rec, Path(rel), opt)
    if not domain:
        return ("cannot tell the domain: put the file in a folder named after its domain "
                "(protein/, small_molecule/, ...) or pass --domain NAME")
    if not set(domain) <= _DOMAIN_OK:
        return f"domain name {domain!r} may only use letters, digits, '_' and '-'"
    reason = validate(rec, opt.max_atoms)
    if reason:
        return reason
    try:
        return to_sample(rec, rel, domain, fmt, opt)
    except parse_errors() as e:  # bond perception or the radius graph gave up on this geometry
        return f"could not finish the structure: {describe_error(e, b'')}"


def spool_records(records: Iterable[Record], rel: str, fmt: str, bin_path: Path, meta_path: Path, fp: dict,
                  opt: ConvertOptions) -> SpoolResult:
    """Encode every structure of ``records`` into ``bin_path``; every refusal becomes a rejection line."""
    entries: list[dict] = []
    rejected: list[dict] = []
    tmp_bin = bin_path.with_name(bin_path.name + f".tmp{os.getpid()}")
    offset = 0
    with open(tmp_bin, "wb") as out:
        for rec in records:
            if isinstance(rec, Rejection):
                rejected.append({"file": rel, "record": rec.record, "reason": rec.reason})
                continue
            sample = _finish(rec, rel, fmt, opt)
            if isinstance(sample, str):
                rejected.append({"file": rel, "record": rec.record, "reason": sample})
                continue
            data = encode_sample(sample)
            out.write(data)
            entries.append({
                "key": sample.key, "domain": sample.domain, "source": rel, "record": rec.record,
                "num_atoms": sample.num_atoms, "num_bonds": len(sample.bonds), "num_edges": len(sample.edges),
                "spool_offset": offset, "size": len(data),
            })
            offset += len(data)
    os.replace(tmp_bin, bin_path)
    atomic_write(meta_path, json.dumps({"fingerprint": fp, "entries": entries, "rejected": rejected}).encode())
    return SpoolResult(rel, str(bin_path), entries, rejected)


def spool_file(path: Path, rel: str, workdir: Path, opt: ConvertOptions) -> SpoolResult:
    """Convert one whole input file into ``workdir/<digest>.bin`` + ``.json``; reuse them when unchanged."""
    bin_path, meta_path = spool_paths(workdir, rel)
    fp = file_fingerprint(path, rel, opt)
    done = load_spool(bin_path, meta_path, fp)
    if done is not None:
        return done
    fmt = format_of(path) or ""
    res = spool_records(read_file(path, rel, opt.trust_pickle, opt.limits), rel, fmt, bin_path, meta_path, fp, opt)
    if not res.entries and not res.rejected:
        res.rejected.append({"file": rel, "record": -1, "reason": f"no structures found in this {fmt or 'unknown'} file"})
        atomic_write(meta_path, json.dumps({"fingerprint": fp, "entries": [], "rejected": res.rejected}).encode())
    return res


def spool_range(raws: list[RawRecord], rel: str, fmt: str, bin_path: str, meta_path: str, fp: dict,
                opt: ConvertOptions) -> SpoolResult:
    """Parse and encode one range of raw SDF/XYZ records (what a worker does with a piece of a big file)."""
    stem = Path(rel).name.split(".")[0]
    records = (parse_record(r, fmt, rel, stem) for r in raws)
    return spool_records(records, rel, fmt, Path(bin_path), Path(meta_path), fp, opt)


def read_samples(path: Path, rel: str, domain: str, opt: ConvertOptions | None = None,
                 limit: int | None = None) -> list[Sample]:
    """The valid structures of one file as finished samples (what the converter would store), without
    writing anything: for benchmarks and tests that need real samples directly. Rejections are skipped."""
    opt = opt or ConvertOptions()
    fmt = format_of(path) or ""
    out: list[Sample] = []
    for rec in read_file(path, rel, opt.trust_pickle, opt.limits):
        if isinstance(rec, Structure) and validate(rec, opt.max_atoms) is None:
            out.append(to_sample(rec, rel, domain, fmt, opt))
            if limit is not None and len(out) >= limit:
                break
    return out
