"""The on-disk shard schema: the one module both the converter (writer) and the loader (reader) import.

A shard is an uncompressed tar whose members are *blocks*: ``<key of its first sample>.safetensors``, each
holding up to :data:`BLOCK_MAX_SAMPLES` samples (about :data:`BLOCK_TARGET_BYTES`, or one larger sample) as
concatenated arrays with offset arrays, so a reader parses one header, checks one crc32 and validates values once
per block instead of per sample. A safetensors member holds the arrays and a small string->string metadata header;
it is pickle-free by construction (``safetensors`` only ever parses a JSON header and raw buffers).

Arrays of a block of ``S`` samples (``N`` atoms, ``B`` bonds, ``E`` radius-graph pairs in all); sample ``k`` owns
atoms ``atom_ptr[k]:atom_ptr[k+1]``, bonds ``bond_ptr[k]:bond_ptr[k+1]`` and pairs ``edge_ptr[k]:edge_ptr[k+1]``,
and its bond and pair indices are *local* (0 is its own first atom):

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
``atom_ptr``    int32 [S+1]  first atom of each sample, then N (every sample has at least one atom)
``bond_ptr``    int32 [S+1]  first bond of each sample, then B
``edge_ptr``    int32 [S+1]  first pair of each sample, then E
``res_index``   int32 [N]    optional (all samples of a block or none): residue sequence number
``chain``       uint16 [N]   optional: index into the sample's ``chains`` list
``atom_name``   uint8 [N,4]  optional: PDB atom name, ASCII, NUL padded
==============  ===========  =================================================================

Metadata header: one entry, ``block``, a sorted JSON object with ``format_version``, ``domain``, ``radius_A``,
``max_neighbors`` and ``samples``: per sample its :data:`SAMPLE_FIELDS` except those block-wide ones (one string,
so the bytes do not depend on safetensors' hash-map order). The Parquet index keeps one row per sample: the
block's byte range and crc32, and the sample's position ``item`` in it.

Layout of a shards root (local folder, ``http(s)://`` or ``s3://`` prefix)::

    <root>/manifest.json                       written last; see below
    <root>/index/<domain>.parquet              one row per sample, columns :data:`INDEX_COLUMNS`
    <root>/<domain>/<domain>-000000.tar        training shards
    <root>/<domain>/<domain>-val-000000.tar    held-out shards (val, test)
    <root>/rejected.jsonl                      inputs the converter refused, with reasons

``manifest.json``: ``{"format_version": 2, "options": {...converter options...},
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
from safetensors.numpy import save as _st_save

FORMAT_VERSION = 2
"""Bumped on any incompatible change; written in every block and in ``manifest.json`` (2: block members)."""

BLOCK_TARGET_BYTES = 256 * 2**10
"""The writer closes a block once its samples' arrays reach this many bytes (a larger sample is a block alone)."""
BLOCK_MAX_SAMPLES = 1024
"""At most this many samples per block (also bounds the index's ``item`` column)."""
MIN_SAMPLE_BYTES = 1 + 12 + 3 * 4
"""Bytes a sample takes in a block at least (one atom's z and pos, its three offset entries): bounds what a
manifest may claim a shard holds."""

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
    "offset": "int64: byte offset of the data of the sample's block member inside the (uncompressed) tar",
    "size": "int64: byte size of the block member",
    "item": "int32: the sample's position in its block (0-based)",
    "crc32": "int64: zlib.crc32 of the block member's bytes (readers verify each block with it)",
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


BLOCK_FIELDS = ("domain", "radius_A", "max_neighbors")
"""Fields of :data:`SAMPLE_FIELDS` shared by every sample of a block (stored once, in the block's metadata)."""
OPTIONAL_ARRAYS = ("res_index", "chain", "atom_name")
PTR_OF = {"N": "atom_ptr", "B": "bond_ptr", "E": "edge_ptr"}
"""Offset array of each per-sample dimension of a block."""


def _sample_arrays_to_write(s: Sample) -> dict[str, np.ndarray]:
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
    return arrays


def block_group(s: Sample) -> tuple:
    """Samples with equal groups may share a block (same block-wide fields and the same optional arrays)."""
    return (s.domain, repr(float(s.radius_A)), int(s.max_neighbors),
            tuple(getattr(s, name) is not None for name in OPTIONAL_ARRAYS))


def sample_nbytes(s: Sample) -> int:
    """Bytes a sample's arrays hold (what it adds to a block; what a shuffle buffer counts), from its row counts
    and the schema's dtypes: 13 an atom (z, pos), 9 a bond (pair, order), 8 a stored pair, plus the optional
    per-atom arrays."""
    n = len(s.z)
    extra = (0 if s.res_index is None else 4) + (0 if s.chain is None else 2) + (0 if s.atom_name is None else 4)
    return (13 + extra) * n + 9 * len(s.bonds) + 8 * len(s.edges)


def encode_block(samples: list[Sample]) -> bytes:
    """Serialise samples of one :func:`block_group` to the bytes of one ``.safetensors`` block member."""
    if not samples:
        raise ValueError("a block holds at least one sample")
    if len(samples) > BLOCK_MAX_SAMPLES:
        raise ValueError(f"a block holds at most {BLOCK_MAX_SAMPLES} samples, got {len(samples)}")
    group = block_group(samples[0])
    per = []
    for s in samples:
        if block_group(s) != group:
            raise ValueError(f"sample {s.key!r} does not share block fields {BLOCK_FIELDS} and optional arrays "
                             f"with {samples[0].key!r}: {block_group(s)} vs {group}; write it to another block")
        per.append(_sample_arrays_to_write(s))
    arrays = {name: np.concatenate([a[name] for a in per]) for name in per[0]}
    for sym, name in PTR_OF.items():
        src = {"N": "z", "B": "bonds", "E": "edges"}[sym]
        ptr = np.zeros(len(per) + 1, np.int64)
        np.cumsum([len(a[src]) for a in per], out=ptr[1:])
        if ptr[-1] > np.iinfo(np.int32).max:
            raise ValueError(f"block of {len(per)} samples has {int(ptr[-1])} rows of {src!r}, more than int32 holds")
        arrays[name] = ptr.astype(np.int32)
    first = samples[0]
    meta = {
        "format_version": FORMAT_VERSION,
        "domain": first.domain,
        "radius_A": repr(float(first.radius_A)),
        "max_neighbors": str(int(first.max_neighbors)),
        "samples": [{"key": s.key, "source": s.source, "record": str(s.record), "mol_id": s.mol_id,
                     "chains": json.dumps(s.chains)} for s in samples],
    }
    # One metadata entry only: safetensors keeps metadata in a hash map whose order varies between
    # processes, so the fields travel as one sorted JSON string to keep shards byte-identical.
    return _st_save(arrays, metadata={"block": json.dumps(meta, sort_keys=True)})


def encode_sample(s: Sample) -> bytes:
    """A block of one sample (the converter's spool and caches store samples this way)."""
    return encode_block([s])


def _read_header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise SchemaError(f"block member is {len(data)} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SchemaError(f"safetensors header claims {n} bytes but the member has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"safetensors header is not JSON: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise SchemaError("block member has no metadata header; not written by shards_tools.convert")
    return meta


def check_version(version: object, where: str) -> None:
    """Refuse data written by an unknown format version."""
    if str(version) != str(FORMAT_VERSION):
        raise SchemaError(
            f"{where} has shard format version {version!r}, this reader understands only {FORMAT_VERSION}; "
            "re-convert the data with this version's `python -m shards_tools.convert`, "
            "or install the release that wrote it"
        )


def decode_block(data: bytes, where: str = "block", check_values: bool = True) -> list[Sample]:
    """Parse and validate one block member with its metadata (:func:`decode_block_arrays`, chain indices against
    each sample's chains); never unpickles. Samples own copies of their arrays. Raises :class:`SchemaError`.

    ``check_values=False`` checks structure and offsets only (the converter reading its own spool: it validates
    each block it writes once, see :func:`shards_tools.writer.write_shard`)."""
    header = _read_header_metadata(data)
    if "block" not in header and "sample" in header:
        try:
            old = json.loads(header["sample"]).get("format_version")
        except (json.JSONDecodeError, AttributeError):
            old = None
        check_version(old, where)
    try:
        meta = json.loads(header["block"])
        entries = meta["samples"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise SchemaError(f"{where}: metadata has no readable 'block' entry with 'samples'") from None
    check_version(meta.get("format_version"), where)
    try:
        if check_values:
            arrays, n, faults = decode_block_arrays(data)
        else:
            arrays = _parse_member(data)
            n, faults = check_offsets(arrays), {}
    except SchemaError as e:
        raise SchemaError(f"{where}: {e}") from None
    if not isinstance(entries, list) or len(entries) != n:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise SchemaError(f"{where}: metadata lists {got} samples, the arrays hold {n}")
    if faults:
        k, what = next(iter(faults.items()))
        key = entries[k].get("key") if isinstance(entries[k], dict) else None
        more = f" (and {len(faults) - 1} more samples)" if len(faults) > 1 else ""
        raise SchemaError(f"{where}: sample {k} ({key!r}): {what}{more}")
    out = []
    try:
        radius, max_nb = float(meta["radius_A"]), int(meta["max_neighbors"])
        for k, e in enumerate(entries):
            a = sample_arrays(arrays, k)
            s = Sample(key=e["key"], domain=meta["domain"], z=a["z"], pos=a["pos"], bonds=a["bonds"],
                       bond_order=a["bond_order"], edges=a["edges"], source=e.get("source", ""),
                       record=int(e.get("record", 0)), mol_id=e.get("mol_id", ""), radius_A=radius,
                       max_neighbors=max_nb, res_index=a.get("res_index"), chain=a.get("chain"),
                       chains=json.loads(e.get("chains", "[]")), atom_name=a.get("atom_name"))
            if s.chain is not None and len(s.chain) and int(s.chain.max()) >= max(len(s.chains), 1):
                raise SchemaError(f"sample {k} ({s.key!r}): chain index {int(s.chain.max())} outside the "
                                  f"{len(s.chains)} chains listed")
            out.append(s)
    except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as e:
        if isinstance(e, SchemaError):
            raise SchemaError(f"{where}: {e}") from None
        raise SchemaError(f"{where}: malformed sample metadata ({type(e).__name__}: {e})") from None
    return out


def decode_sample(data: bytes, where: str = "sample", check_values: bool = True) -> Sample:
    """:func:`decode_block` of a block that must hold exactly one sample (the converter's spool, caches)."""
    samples = decode_block(data, where, check_values)
    if len(samples) != 1:
        raise SchemaError(f"{where}: expected a block of one sample, got {len(samples)}")
    return samples[0]


ARRAY_SCHEMA = {
    "z": (np.dtype(np.uint8), ("N",)),
    "pos": (np.dtype(np.float32), ("N", 3)),
    "bonds": (np.dtype(np.int32), ("B", 2)),
    "bond_order": (np.dtype(np.uint8), ("B",)),
    "edges": (np.dtype(np.int32), ("E", 2)),
    "res_index": (np.dtype(np.int32), ("N",)),
    "chain": (np.dtype(np.uint16), ("N",)),
    "atom_name": (np.dtype(np.uint8), ("N", 4)),
    "atom_ptr": (np.dtype(np.int32), ("S1",)),
    "bond_ptr": (np.dtype(np.int32), ("S1",)),
    "edge_ptr": (np.dtype(np.int32), ("S1",)),
}
"""Exact dtype and shape (symbols: atoms N, bonds B, pairs E, samples plus one S1) of every array a block holds."""

REQUIRED_ARRAYS = ("z", "pos", "bonds", "bond_order", "edges", "atom_ptr", "bond_ptr", "edge_ptr")
MAX_Z = 118
MAX_BOND_ORDER = BOND_AROMATIC


def check_offsets(arrays: dict[str, np.ndarray]) -> int:
    """The offset arrays of a block whose structure :func:`_parse_member` checked: each starts at 0, never falls
    (``atom_ptr`` rises: every sample has an atom) and ends at N, B or E. Returns the number of samples."""
    n_total = {"N": len(arrays["z"]), "B": len(arrays["bonds"]), "E": len(arrays["edges"])}
    for sym, name in PTR_OF.items():
        ptr = arrays[name]
        d = np.diff(ptr)
        if ptr[0] != 0 or ptr[-1] != n_total[sym] or (d.min() < 1 if sym == "N" else d.min() < 0):
            raise SchemaError(f"{name} {_short(ptr)} must start at 0, {'rise' if sym == 'N' else 'never fall'} "
                              f"(every sample has {'an atom' if sym == 'N' else '0 or more rows'}) and end at "
                              f"{sym}={n_total[sym]}")
    return len(arrays["atom_ptr"]) - 1


def _values_ok(arrays: dict[str, np.ndarray], atoms: np.ndarray) -> bool:
    """Every value of a block valid: a fixed number of numpy reductions whatever the number of samples."""
    z = arrays["z"]
    if z.min() < 1 or z.max() > MAX_Z:
        return False
    if not np.isfinite(arrays["pos"].sum(dtype=np.float64)):  # NaN and inf propagate; float32 values cannot overflow
        return False
    for name, ptr_name in (("bonds", "bond_ptr"), ("edges", "edge_ptr")):
        p = arrays[name]
        if len(p) and ((p.view(np.uint32) >= np.repeat(atoms, np.diff(arrays[ptr_name]))[:, None]).any()
                       or (p[:, 0] >= p[:, 1]).any()):  # negative indices wrap to huge unsigned values
            return False
    bo = arrays["bond_order"]
    return not (len(bo) and bo.max() > MAX_BOND_ORDER)


def sample_faults(arrays: dict[str, np.ndarray]) -> dict[int, str]:
    """The samples of a block (offsets checked by :func:`check_offsets`) whose values break the schema, each with
    its first problem: atomic numbers in 1..118, finite coordinates, bond and pair indices local to the sample
    (``0..n_k-1``) with ``i < j``, bond orders 0..4. Empty (the usual case) after a fixed number of reductions;
    only a failing block is examined row by row, so one bad sample does not condemn its neighbours."""
    atoms = np.diff(arrays["atom_ptr"])
    if _values_ok(arrays, atoms):
        return {}
    faults: dict[int, str] = {}

    def note(rows: np.ndarray, ptr_name: str, what) -> None:
        for r in np.flatnonzero(rows).tolist():
            faults.setdefault(int(np.searchsorted(arrays[ptr_name], r, side="right")) - 1, what(r))

    z = arrays["z"]
    note((z < 1) | (z > MAX_Z), "atom_ptr", lambda r: f"atomic number {int(z[r])} outside 1..{MAX_Z}")
    note(~np.isfinite(arrays["pos"]).all(axis=1), "atom_ptr", lambda r: "coordinates are not all finite (NaN or inf)")
    for name, ptr_name in (("bonds", "bond_ptr"), ("edges", "edge_ptr")):
        p = arrays[name]
        if len(p) == 0:
            continue
        lim = np.repeat(atoms, np.diff(arrays[ptr_name]))
        over = p.view(np.uint32) >= lim[:, None]
        note(over.any(axis=1), ptr_name, lambda r, p=p, over=over, lim=lim, name=name: (
            f"{name} index {int(p[r][over[r]][0])} outside 0..{int(lim[r]) - 1} (the sample has {int(lim[r])} atoms)"))
        note(p[:, 0] >= p[:, 1], ptr_name, lambda r, p=p, name=name: (
            f"{name} pair {p[r].tolist()} breaks i < j (the schema stores each pair once with i < j)"))
    bo = arrays["bond_order"]
    note(bo > MAX_BOND_ORDER, "bond_ptr", lambda r: f"bond order {int(bo[r])} outside 0..{MAX_BOND_ORDER}")
    return dict(sorted(faults.items()))


def _short(a: np.ndarray) -> str:
    v = a.tolist()
    return str(v) if len(v) <= 8 else f"[{', '.join(map(str, v[:4]))}, ..., {', '.join(map(str, v[-2:]))}]"


def decode_block_arrays(data: bytes) -> tuple[dict[str, np.ndarray], int, dict[int, str]]:
    """The arrays of one block member without its metadata, its number of samples, and the samples whose values
    break the schema (:func:`sample_faults`; usually none); never unpickles. Parses the safetensors header itself (a
    third of ``safetensors.numpy.load``'s cost): every array's byte range must be non-negative, inside the member,
    of exactly its shape's size, and not overlap another; offsets are checked (:func:`check_offsets`). Arrays are
    read-only views on ``data``. Raises :class:`SchemaError` when the block as a whole is malformed."""
    arrays = _parse_member(data)
    n = check_offsets(arrays)
    return arrays, n, sample_faults(arrays)


def sample_arrays(arrays: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Copies of sample ``k``'s arrays out of a validated block (indices stay local to the sample)."""
    a0, a1 = int(arrays["atom_ptr"][k]), int(arrays["atom_ptr"][k + 1])
    b0, b1 = int(arrays["bond_ptr"][k]), int(arrays["bond_ptr"][k + 1])
    e0, e1 = int(arrays["edge_ptr"][k]), int(arrays["edge_ptr"][k + 1])
    out = {"z": arrays["z"][a0:a1].copy(), "pos": arrays["pos"][a0:a1].copy(), "bonds": arrays["bonds"][b0:b1].copy(),
           "bond_order": arrays["bond_order"][b0:b1].copy(), "edges": arrays["edges"][e0:e1].copy()}
    for name in OPTIONAL_ARRAYS:
        if name in arrays:
            out[name] = arrays[name][a0:a1].copy()
    return out


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
        raise SchemaError("block has no atoms")
    if dims["S1"] < 2:
        raise SchemaError(f"block offsets have {dims['S1']} entries; a block holds at least one sample (2 entries)")
    spans.sort()
    end = 0
    for lo, hi in spans:
        if lo < end and hi > lo:
            raise SchemaError(f"two arrays share bytes {lo}..{min(end, hi)} of the member (overlapping offsets)")
        end = max(end, hi)
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
