"""The on-disk shard schema: the one module both the converter (writer) and the loader (reader) import.

A shard is an uncompressed tar whose members are ``<key>.safetensors``, one member per sample.
A safetensors member holds the sample's arrays and a small string->string metadata header; it is
pickle-free by construction (``safetensors`` only ever parses a JSON header and raw buffers).

Arrays of a sample (``N`` atoms, ``B`` bonds, ``E`` radius-graph pairs):

==============  ===========  =================================================================
name            dtype        meaning
==============  ===========  =================================================================
``z``           uint8 [N]    atomic numbers, 1..118
``pos``         float32[N,3] coordinates in Ångström
``bonds``       int32 [B,2]  covalent bonds, each pair once with i < j
``bond_order``  uint8 [B]    0 unknown, 1 single, 2 double, 3 triple, 4 aromatic
``edges``       int32 [E,2]  radius-graph pairs (i < j) within ``radius_A`` Å, each atom keeping at
                             most ``max_neighbors`` nearest neighbours (stored: rebuilding costs more
                             than reading, see ``benchmarks/loader.py``)
``res_index``   int32 [N]    optional: residue sequence number
``chain``       uint16 [N]   optional: index into the ``chains`` metadata list
``atom_name``   uint8 [N,4]  optional: PDB atom name, ASCII, NUL padded
==============  ===========  =================================================================

Metadata header: one entry, ``sample``, a sorted JSON object with ``format_version`` and the fields of
:data:`SAMPLE_FIELDS` (one string, so the bytes do not depend on safetensors' hash-map order).

Layout of a shards root (local folder, ``http(s)://`` or ``s3://`` prefix)::

    <root>/manifest.json                       written last; see below
    <root>/index/<domain>.parquet              one row per sample, columns :data:`INDEX_COLUMNS`
    <root>/<domain>/<domain>-000000.tar        training shards
    <root>/<domain>/<domain>-val-000000.tar    held-out shards (val, test)
    <root>/rejected.jsonl                      inputs the converter refused, with reasons

``manifest.json``: ``{"format_version": 1, "options": {...converter options...},
"domains": {name: {"samples", "atoms", "splits": {split: {"samples", "atoms"}}}},
"shards": [{"path", "domain", "split", "samples", "atoms", "bytes", "sha256"}, ...],
"index": {domain: "index/<domain>.parquet"}}``. Shards are listed in order; within a domain and
split, the samples of all its shards in order form one global permutation (seeded shuffle).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

FORMAT_VERSION = 1
"""Bumped on any incompatible change; written in every sample and in ``manifest.json``."""

MEMBER_EXT = "safetensors"
MANIFEST_NAME = "manifest.json"
INDEX_DIR = "index"
REJECTED_NAME = "rejected.jsonl"

SAMPLE_FIELDS = ("key", "domain", "source", "record", "mol_id", "radius_A", "max_neighbors", "chains")

BOND_UNKNOWN, BOND_SINGLE, BOND_DOUBLE, BOND_TRIPLE, BOND_AROMATIC = 0, 1, 2, 3, 4

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class SchemaError(ValueError):
    """A shard member or manifest does not follow this schema."""


@dataclass
class Sample:
    """One structure, as written to and read from a shard."""

    key: str
    domain: str
    z: np.ndarray
    pos: np.ndarray
    bonds: np.ndarray
    bond_order: np.ndarray
    edges: np.ndarray
    source: str = ""
    record: int = 0
    mol_id: str = ""
    radius_A: float = 0.0
    max_neighbors: int = 0
    res_index: np.ndarray | None = None
    chain: np.ndarray | None = None
    chains: list[str] = field(default_factory=list)
    atom_name: np.ndarray | None = None

    @property
    def num_atoms(self) -> int:
        return int(self.z.shape[0])


SPLITS = ("train", "val", "test")

INDEX_COLUMNS = {
    "key": "string: WebDataset key of the sample (unique within the dataset)",
    "domain": "string: protein, small_molecule, metabolite, rna or a user-defined domain",
    "split": "string: train, val or test",
    "shard": "string: shard path relative to the shards root",
    "offset": "int64: byte offset of the member's data inside the (uncompressed) tar",
    "size": "int64: byte size of the member",
    "crc32": "int64: zlib.crc32 of the member's bytes (readers verify each sample with it)",
    "num_atoms": "int32",
    "num_bonds": "int32",
    "num_edges": "int32: stored radius-graph pairs (each once)",
    "source": "string: input file, relative to the converter's RAW folder",
    "record": "int32: record number inside the input file (0-based)",
}


def shard_name(domain: str, split: str, index: int) -> str:
    """Globally unique shard file name, relative to the shards root.

    Training shards are ``<domain>/<domain>-000000.tar``; held-out ones carry their split:
    ``<domain>/<domain>-val-000000.tar``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    mid = "" if split == "train" else f"-{split}"
    return f"{domain}/{domain}{mid}-{index:06d}.tar"


def make_key(mol_id: str, source_id: str) -> str:
    """A WebDataset-safe key: no dots (the first dot splits key from extension), no slashes.

    The readable part comes from ``mol_id``; a short hash of the stable source id keeps keys unique
    when two files hold molecules of the same name.
    """
    import hashlib

    readable = _KEY_UNSAFE.sub("_", mol_id).strip("_")[:48] or "mol"
    digest = hashlib.sha1(source_id.encode()).hexdigest()[:10]
    return f"{readable}_{digest}"


def encode_sample(s: Sample) -> bytes:
    """Serialise a sample to the bytes of one ``.safetensors`` member."""
    arrays = {
        "z": np.ascontiguousarray(s.z, dtype=np.uint8),
        "pos": np.ascontiguousarray(s.pos, dtype=np.float32).reshape(-1, 3),
        "bonds": np.ascontiguousarray(s.bonds, dtype=np.int32).reshape(-1, 2),
        "bond_order": np.ascontiguousarray(s.bond_order, dtype=np.uint8),
        "edges": np.ascontiguousarray(s.edges, dtype=np.int32).reshape(-1, 2),
    }
    if s.res_index is not None:
        arrays["res_index"] = np.ascontiguousarray(s.res_index, dtype=np.int32)
    if s.chain is not None:
        arrays["chain"] = np.ascontiguousarray(s.chain, dtype=np.uint16)
    if s.atom_name is not None:
        arrays["atom_name"] = np.ascontiguousarray(s.atom_name, dtype=np.uint8).reshape(-1, 4)
    fields = {
        "key": s.key,
        "domain": s.domain,
        "source": s.source,
        "record": str(s.record),
        "mol_id": s.mol_id,
        "radius_A": repr(float(s.radius_A)),
        "max_neighbors": str(int(s.max_neighbors)),
        "chains": json.dumps(s.chains),
    }
    # One metadata entry only: safetensors keeps metadata in a hash map whose order varies between
    # processes, so the fields travel as one sorted JSON string to keep shards byte-identical.
    meta = {"sample": json.dumps({"format_version": FORMAT_VERSION, **fields}, sort_keys=True)}
    return _st_save(arrays, metadata=meta)


def _read_header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise SchemaError(f"sample member is {len(data)} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SchemaError(f"safetensors header claims {n} bytes but the member has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"safetensors header is not JSON: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise SchemaError("sample member has no metadata header; not written by shards_tools.convert")
    return meta


def check_version(version: object, where: str) -> None:
    """Refuse data written by an unknown format version."""
    if str(version) != str(FORMAT_VERSION):
        raise SchemaError(
            f"{where} has shard format version {version!r}, this reader understands only {FORMAT_VERSION}; "
            "re-convert the data with this version's `python -m shards_tools.convert`, "
            "or install the release that wrote it"
        )


def decode_sample(data: bytes, where: str = "sample") -> Sample:
    """Parse the bytes of one member; never unpickles. Raises :class:`SchemaError` on bad bytes."""
    header = _read_header_metadata(data)
    try:
        meta = json.loads(header["sample"])
    except (KeyError, json.JSONDecodeError):
        raise SchemaError(f"{where}: metadata has no readable 'sample' entry") from None
    check_version(meta.get("format_version"), where)
    try:
        arrays = _st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError; normalise it
        raise SchemaError(f"{where}: cannot decode arrays: {e}") from None
    try:
        s = Sample(
            key=meta["key"],
            domain=meta["domain"],
            z=arrays["z"],
            pos=arrays["pos"],
            bonds=arrays["bonds"],
            bond_order=arrays["bond_order"],
            edges=arrays["edges"],
            source=meta.get("source", ""),
            record=int(meta.get("record", 0)),
            mol_id=meta.get("mol_id", ""),
            radius_A=float(meta.get("radius_A", 0.0)),
            max_neighbors=int(meta.get("max_neighbors", 0)),
            res_index=arrays.get("res_index"),
            chain=arrays.get("chain"),
            chains=json.loads(meta.get("chains", "[]")),
            atom_name=arrays.get("atom_name"),
        )
    except KeyError as e:
        raise SchemaError(f"{where}: missing field {e.args[0]!r}") from None
    n = s.z.shape[0]
    if s.pos.shape != (n, 3):
        raise SchemaError(f"{where}: pos has shape {s.pos.shape}, expected ({n}, 3)")
    return s


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key is everything before the first dot of the base name."""
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def atom_names_to_array(names: list[str] | np.ndarray) -> np.ndarray:
    """PDB atom names (<= 4 ASCII chars) to a uint8 [N, 4] array."""
    b = np.array([str(n).encode("ascii", "replace")[:4].ljust(4, b"\0") for n in names], dtype="S4")
    return b.view(np.uint8).reshape(-1, 4)


def atom_names_from_array(arr: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("ascii") for row in np.asarray(arr, dtype=np.uint8)]
