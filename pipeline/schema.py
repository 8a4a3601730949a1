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
    try:
        validate_sample(s)
    except SchemaError as e:
        raise SchemaError(f"{where}: {e}") from None
    return s


ARRAY_SCHEMA = {
    "z": (np.dtype(np.uint8), ("N",)),
    "pos": (np.dtype(np.float32), ("N", 3)),
    "bonds": (np.dtype(np.int32), ("B", 2)),
    "bond_order": (np.dtype(np.uint8), ("B",)),
    "edges": (np.dtype(np.int32), ("E", 2)),
    "res_index": (np.dtype(np.int32), ("N",)),
    "chain": (np.dtype(np.uint16), ("N",)),
    "atom_name": (np.dtype(np.uint8), ("N", 4)),
}
"""Exact dtype and shape (symbols: atoms N, bonds B, pairs E) of every array a member may hold."""

REQUIRED_ARRAYS = ("z", "pos", "bonds", "bond_order", "edges")
MAX_Z = 118
MAX_BOND_ORDER = BOND_AROMATIC


def check_structure(arrays: dict[str, np.ndarray]) -> int:
    """Exact dtypes and shapes (:data:`ARRAY_SCHEMA`, no unknown names), at least one atom; returns N."""
    for name in REQUIRED_ARRAYS:
        if name not in arrays:
            raise SchemaError(f"array {name!r} is missing")
    dims: dict[str, int] = {}
    for name, a in arrays.items():
        spec = ARRAY_SCHEMA.get(name)
        if spec is None:
            raise SchemaError(f"unknown array {name!r}; this reader knows {sorted(ARRAY_SCHEMA)}")
        dtype, shape = spec
        if a.dtype != dtype:
            raise SchemaError(f"array {name!r} has dtype {a.dtype}, the schema says {dtype}")
        if a.ndim != len(shape):
            raise SchemaError(f"array {name!r} has shape {a.shape}, the schema says {shape}")
        for sym, got in zip(shape, a.shape, strict=True):
            want = dims.setdefault(sym, got) if isinstance(sym, str) else sym
            if got != want:
                raise SchemaError(f"array {name!r} has shape {a.shape}, the schema says {shape} with {sym}={want}")
    if dims["N"] == 0:
        raise SchemaError("sample has no atoms")
    return dims["N"]


def check_values(arrays: dict[str, np.ndarray]) -> None:
    """Atomic numbers in 1..118, finite coordinates, bond and pair indices in ``0..N-1`` with ``i < j``, bond
    orders 0..4 (arrays already passed :func:`check_structure`); raises :class:`SchemaError` naming the value."""
    z = arrays["z"]
    n = len(z)
    if z.min() < 1 or z.max() > MAX_Z:
        bad = int(z[(z < 1) | (z > MAX_Z)][0])
        raise SchemaError(f"atomic number {bad} outside 1..{MAX_Z}")
    if not np.isfinite(arrays["pos"].sum(dtype=np.float64)):  # NaN and inf propagate; float32 values cannot overflow
        raise SchemaError("coordinates are not all finite (NaN or inf)")
    for name in ("bonds", "edges"):
        p = arrays[name]
        if len(p) == 0:
            continue
        if p.view(np.uint32).max() >= n:  # negative indices wrap to huge unsigned values
            bad = int(p[(p < 0) | (p >= n)][0])
            raise SchemaError(f"{name} index {bad} outside 0..{n - 1} (the sample has {n} atoms)")
        if not (p[:, 0] < p[:, 1]).all():
            k = int(np.flatnonzero(p[:, 0] >= p[:, 1])[0])
            raise SchemaError(f"{name} pair {k} is {p[k].tolist()}, the schema stores each pair once with i < j")
    bo = arrays["bond_order"]
    if len(bo) and bo.max() > MAX_BOND_ORDER:
        raise SchemaError(f"bond order {int(bo.max())} outside 0..{MAX_BOND_ORDER}")


def _values_ok(many: list[dict[str, np.ndarray]]) -> bool:
    """:func:`check_values` of many samples at once (concatenated arrays, a fixed number of numpy calls)."""
    z = np.concatenate([a["z"] for a in many])
    if z.min() < 1 or z.max() > MAX_Z:
        return False
    if not np.isfinite(np.concatenate([a["pos"] for a in many]).sum(dtype=np.float64)):
        return False
    n = np.fromiter((len(a["z"]) for a in many), np.int64, len(many))
    for name in ("bonds", "edges"):
        p = np.concatenate([a[name] for a in many])
        if len(p) == 0:
            continue
        lim = np.repeat(n, np.fromiter((len(a[name]) for a in many), np.int64, len(many)))
        if (p.view(np.uint32) >= lim[:, None]).any() or (p[:, 0] >= p[:, 1]).any():
            return False
    bo = np.concatenate([a["bond_order"] for a in many])
    return not (len(bo) and bo.max() > MAX_BOND_ORDER)


def validate_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Check a member's arrays against the schema (:func:`check_structure`, then :func:`check_values`); raises
    :class:`SchemaError` naming what is wrong and the value seen. Vectorised: a handful of numpy reductions."""
    check_structure(arrays)
    check_values(arrays)


def validate_sample(s: Sample) -> None:
    """:func:`validate_arrays` on a decoded sample, and its chain indices against its chains
    (``inspect --verify`` and :func:`decode_sample` call it)."""
    arrays = {"z": s.z, "pos": s.pos, "bonds": s.bonds, "bond_order": s.bond_order, "edges": s.edges}
    for name in ("res_index", "chain", "atom_name"):
        if getattr(s, name) is not None:
            arrays[name] = getattr(s, name)
    validate_arrays(arrays)
    if s.chain is not None and len(s.chain) and int(s.chain.max()) >= max(len(s.chains), 1):
        raise SchemaError(f"chain index {int(s.chain.max())} outside the {len(s.chains)} chains listed")


_ST_DTYPES = {"U8": np.uint8, "I32": np.int32, "F32": np.float32, "U16": np.uint16, "I64": np.int64,
              "F64": np.float64, "I16": np.int16, "I8": np.int8, "U32": np.uint32, "F16": np.float16}
_ST_DTYPES = {k: np.dtype(v) for k, v in _ST_DTYPES.items()}


_ST_CODES = {"U8": np.dtype(np.uint8), "I32": np.dtype(np.int32), "F32": np.dtype(np.float32),
             "U16": np.dtype(np.uint16)}
_SPEC = {name: (next(c for c, d in _ST_CODES.items() if d == dt), dt, shape[0], shape[1] if len(shape) > 1 else 0,
                len(shape), dt.itemsize * (shape[1] if len(shape) > 1 else 1))
         for name, (dt, shape) in ARRAY_SCHEMA.items()}
"""Per array name: safetensors dtype code, dtype, first-dimension symbol, fixed width of the second dimension (0:
none), number of dimensions, bytes per row; every array of :data:`ARRAY_SCHEMA` is ``[symbol]`` or
``[symbol, width]``, which keeps :func:`_parse_member`'s per-array checks to a few comparisons."""
_REQUIRED = frozenset(REQUIRED_ARRAYS)
_JSON = json.JSONDecoder()


def _parse_member(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of one member as views on ``data``; structure checked as :func:`check_structure` does (on the
    header, before any array is made), values not. Every byte range must be non-negative, inside the member, of
    exactly its shape's size, and not overlap another."""
    if len(data) < 8:
        raise SchemaError(f"member is {len(data)} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SchemaError(f"safetensors header claims {n} bytes but the member has {len(data) - 8}")
    base, avail = 8 + n, len(data) - 8 - n
    try:
        header = _JSON.decode(data[8:base].decode())  # json.loads minus its encoding sniffing (UTF-8 by spec)
        arrays, spans, dims = {}, [], {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            spec = _SPEC.get(name)
            if spec is None:
                raise SchemaError(f"unknown array {name!r}; this reader knows {sorted(ARRAY_SCHEMA)}")
            code, dt, sym, width, ndim, row = spec
            shape = info["shape"]
            if info["dtype"] != code:
                got = _ST_DTYPES.get(info["dtype"], info["dtype"])
                raise SchemaError(f"array {name!r} has dtype {got}, the schema says {dt}")
            if len(shape) != ndim:
                raise SchemaError(f"array {name!r} has shape {tuple(shape)}, the schema says {ARRAY_SCHEMA[name][1]}")
            rows = shape[0]
            want = dims.setdefault(sym, rows)
            if (rows != want or rows.__class__ is not int or rows < 0
                    or (width and (shape[1] != width or shape[1].__class__ is not int))):
                raise SchemaError(f"array {name!r} has shape {tuple(shape)}, the schema says "
                                  f"{ARRAY_SCHEMA[name][1]} with {sym}={want}")
            lo, hi = info["data_offsets"]
            if not (lo.__class__ is int and hi.__class__ is int and 0 <= lo <= hi <= avail):
                raise SchemaError(f"array {name!r} has byte range {lo}..{hi} outside the member's {avail} data bytes")
            if hi - lo != rows * row:
                raise SchemaError(f"array {name!r} has {hi - lo} bytes for shape {shape} {dt}")
            a = np.frombuffer(data, dt, rows * (width or 1), base + lo)
            arrays[name] = a.reshape(rows, width) if width else a
            spans.append((lo, hi))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, SchemaError):
            raise
        raise SchemaError(f"malformed safetensors member ({type(e).__name__}: {e})") from None
    if not arrays.keys() >= _REQUIRED:
        raise SchemaError(f"arrays {[r for r in REQUIRED_ARRAYS if r not in arrays]} are missing")
    if dims["N"] == 0:
        raise SchemaError("sample has no atoms")
    spans.sort()
    end = 0
    for lo, hi in spans:
        if lo < end and hi > lo:
            raise SchemaError(f"two arrays share bytes {lo}..{min(end, hi)} of the member (overlapping offsets)")
        end = max(end, hi)
    return arrays


def decode_many(datas: list[bytes | None]) -> list[dict[str, np.ndarray] | SchemaError | None]:
    """Decode and validate the members of one read (a block of a shard): for each, its arrays (read-only views on
    its bytes), or the :class:`SchemaError` that rejects it, or None where no bytes came (``datas[k] is None``).

    Headers are parsed per member; values are validated once for the whole block (concatenated arrays), and
    member by member only when the block fails, to name the bad ones. Never unpickles.
    """
    out: list = []
    for d in datas:
        if d is None:
            out.append(None)
            continue
        try:
            out.append(_parse_member(d))
        except SchemaError as e:
            out.append(e)
    small = [a for a in out if isinstance(a, dict) and len(a["z"]) <= BLOCK_CHECK_MAX_ATOMS]
    block_ok = not small or _values_ok(small)
    for k, a in enumerate(out):
        if isinstance(a, dict) and (not block_ok or len(a["z"]) > BLOCK_CHECK_MAX_ATOMS):
            try:
                check_values(a)
            except SchemaError as e:
                out[k] = e
    return out


BLOCK_CHECK_MAX_ATOMS = 512
"""Samples up to this many atoms are value-checked together per block (concatenated); larger ones one by one
(their own reductions already amortise the per-call cost, and concatenating them would copy their bytes)."""


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of one member without its metadata, validated (:func:`validate_arrays`); never unpickles.

    Parses the safetensors header itself (a third of ``safetensors.numpy.load``'s cost): every array's byte
    range must be non-negative, inside the member, of exactly its shape's size, and not overlap another.
    Arrays are read-only views on ``data``. Raises :class:`SchemaError` on anything malformed.
    """
    arrays = _parse_member(data)
    check_values(arrays)
    return arrays


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
