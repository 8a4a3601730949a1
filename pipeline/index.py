"""Read a shards root's manifest and Parquet index into flat numpy arrays, one :class:`DomainIndex` per split.

Everything the loader plans (which samples a worker reads, how batches are packed for evaluation) is
computed on these arrays, never by touching shard bytes.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import (
    BLOCK_MAX_SAMPLES,
    INDEX_DIR,
    MANIFEST_NAME,
    MIN_SAMPLE_BYTES,
    SPLITS,
    SchemaError,
    check_version,
)

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 256
"""Longest sample key an index may hold (the converter's keys are at most 59 bytes): bounds the key column."""


class KeyColumn:
    """The sample keys of an index as one Arrow string array: about 4 bytes plus the key's own per row in one
    buffer (a numpy array of Python ``str`` took ~87 bytes a row, in the main process and again in every worker).

    ``keys[i]`` is a ``str``; :meth:`take` gives many at once (one Arrow call); :meth:`tolist` all of them.
    """

    __slots__ = ("_arr",)

    def __init__(self, arr: pa.Array | pa.ChunkedArray) -> None:
        self._arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr

    def __len__(self) -> int:
        return len(self._arr)

    def __getitem__(self, i: int | np.integer) -> str:
        return self._arr[int(i)].as_py()

    def __iter__(self):
        return iter(self._arr.to_pylist())

    def take(self, ids: np.ndarray | list[int]) -> list[str]:
        return self._arr.take(pa.array(np.asarray(ids, np.int64))).to_pylist()

    def tolist(self) -> list[str]:
        return self._arr.to_pylist()

    @property
    def nbytes(self) -> int:
        return self._arr.nbytes


@dataclass
class DomainIndex:
    """The samples of one domain and split, sorted by (shard, offset, item): row ``i`` is sample id ``i``.

    What rows of one block member share (shard, byte range, crc32) is held once per member: ~14 bytes a row
    besides the key (a row-per-sample copy of every column took ~42).
    """

    name: str
    split: str
    root: str
    shard_urls: list[str]
    keys: KeyColumn  # [n]
    member: np.ndarray  # int32 [n], the sample's block member (a member's rows are consecutive)
    item: np.ndarray  # uint16 [n], the sample's position in its block
    num_atoms: np.ndarray  # int32 [n]
    num_edges: np.ndarray  # int32 [n], stored radius pairs (each once)
    member_shard: np.ndarray  # int32 [m], per block member: index into shard_urls
    member_offset: np.ndarray  # int64 [m], byte offset of the member's data in its tar
    member_size: np.ndarray  # int64 [m], the member's bytes
    member_crc32: np.ndarray  # uint32 [m], zlib.crc32 of the member's bytes
    radius_A: float
    max_neighbors: int
    shard_sha256: list[str | None] | None = None  # per shard_urls entry, from the manifest (None: not listed)
    options: storage.StorageOptions | None = None  # how this root is read (data.storage); None: process default

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def total_atoms(self) -> int:
        return int(self.num_atoms.sum())

    def shard_of(self, rows: int | np.ndarray) -> int | np.ndarray:
        """Index into ``shard_urls`` of the samples ``rows``."""
        return self.member_shard[self.member[rows]]

    def offset_of(self, rows: int | np.ndarray) -> int | np.ndarray:
        """Byte offset of the block member of the samples ``rows``."""
        return self.member_offset[self.member[rows]]

    def size_of(self, rows: int | np.ndarray) -> int | np.ndarray:
        """Bytes of the block member of the samples ``rows``."""
        return self.member_size[self.member[rows]]

    def crc32_of(self, rows: int | np.ndarray) -> int | np.ndarray:
        """zlib.crc32 of the block member of the samples ``rows``."""
        return self.member_crc32[self.member[rows]]


def read_manifest(root: str, options: storage.StorageOptions | None = None) -> dict:
    url = storage.join(root, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(url, options=options)
    except storage.StorageNotFoundError as e:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} under shards root {storage.redact_url(root)!r} ({e}); point data.root at a folder "
            "written by `python -m shards_tools.convert RAW OUT`"
        ) from None
    # any other StorageError (credentials, unreachable endpoint, timeouts) already names the URL and the fix
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{url} is not valid JSON: {e}") from None
    check_version(manifest.get("format_version"), url)
    return manifest


INT32_MAX = 2**31 - 1
"""Largest atom or edge count an index row may claim: :class:`DomainIndex` holds them as int32."""

REQUIRED_COLUMNS = ("key", "split", "shard", "offset", "size", "item", "crc32", "num_atoms", "num_edges")


def dictionary_codes(column: pa.ChunkedArray | pa.Array) -> tuple[list, np.ndarray]:
    """(distinct values, int32 code of every row) of a column, read as a dictionary or encoded here."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_dictionary(col.type):
        col = col.dictionary_encode()
    return col.dictionary.to_pylist(), col.indices.to_numpy(zero_copy_only=False).astype(np.int32)


def _bad_row(rel: str, table: pa.Table, row: int, what: str) -> SchemaError:
    key = table["key"][row].as_py() if "key" in table.column_names else "?"
    return SchemaError(
        f"{rel} row {row} (key {key!r}): {what}; the index does not match the manifest or its shards — "
        "re-convert the data with `python -m shards_tools.convert`, or get the root again from its source"
    )


def safe_relative_path(path: object, where: str) -> str:
    """``path`` if it is a plain relative path inside a root (no scheme, no ``..``, not absolute); else SchemaError."""
    p = str(path) if isinstance(path, str) else ""
    parts = p.split("/")
    if (not p or p.startswith("/") or "\\" in p or ":" in p or "\0" in p
            or any(part in ("", ".", "..") for part in parts)):
        raise SchemaError(f"{where}: shard path {path!r} is not a relative path inside the shards root")
    return p


def manifest_shards(manifest: dict, domain: str, where: str) -> dict[str, dict]:
    """The manifest's shards of ``domain`` by path (paths checked with :func:`safe_relative_path`)."""
    out = {}
    for k, sh in enumerate(manifest.get("shards") or []):
        if not isinstance(sh, dict) or sh.get("domain") != domain:
            continue
        path = safe_relative_path(sh.get("path"), f"{where} shards[{k}]")
        for field in ("samples", "bytes"):
            if not isinstance(sh.get(field), int) or sh[field] < 0:
                raise SchemaError(f"{where} shards[{k}] ({path}): {field}={sh.get(field)!r} is not a count")
        if sh["samples"] * MIN_SAMPLE_BYTES > sh["bytes"]:  # bounds what the index may then claim
            raise SchemaError(f"{where} shards[{k}] ({path}): {sh['samples']} samples cannot fit in {sh['bytes']} bytes")
        if sh.get("split") not in SPLITS:
            raise SchemaError(f"{where} shards[{k}] ({path}): split {sh.get('split')!r} is not one of {SPLITS}")
        out[path] = sh
    return out


def read_index_table(root: str, domain: str, manifest: dict, options: storage.StorageOptions | None = None) -> pa.Table:
    """The whole Parquet index of ``domain`` (every split), checked against the manifest; SchemaError otherwise.

    The index is untrusted: its row count is checked against the manifest from the Parquet footer before any
    column is materialised (memory stays bounded whatever the file claims); then every row must name a shard
    of this domain listed in the manifest (relative, inside the root) with the row's split, lie inside that
    shard's bytes, and count positive atoms; keys are unique across shards and splits; and the rows of every
    shard and split add up to the manifest's counts (rows missing or extra are reported).
    """
    rel = safe_relative_path((manifest.get("index") or {}).get(domain) or f"{INDEX_DIR}/{domain}.parquet",
                             f"manifest index entry of {domain!r}")
    url = storage.join(root, rel)
    where = storage.redact_url(url)
    shards = manifest_shards(manifest, domain, storage.redact_url(storage.join(root, MANIFEST_NAME)))
    expected = sum(sh["samples"] for sh in shards.values())
    try:
        # shard and split come back as dictionaries: one int32 a row instead of a string
        pf = pq.ParquetFile(io.BytesIO(storage.read_bytes(url, options=options)), read_dictionary=["shard", "split"])
    except (pa.ArrowInvalid, OSError) as e:
        raise SchemaError(f"{where} is not a readable Parquet index: {e}") from None
    rows = pf.metadata.num_rows
    if rows != expected:
        raise SchemaError(
            f"{where} has {rows} rows but the manifest lists {expected} samples of {domain!r} in {len(shards)} shards; "
            "the index does not match the manifest: re-convert the data, or get the root again from its source"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise SchemaError(f"{where} lacks the columns {missing}; re-convert the data with this version's converter")
    try:
        table = pf.read(columns=list(REQUIRED_COLUMNS))
    except (pa.ArrowException, OSError) as e:
        raise SchemaError(f"{where}: the index's columns cannot be read ({e}); re-convert the data") from None
    if rows == 0:
        return table
    for c in REQUIRED_COLUMNS:
        if table[c].null_count:
            row = int(np.flatnonzero(table[c].is_null().to_numpy(zero_copy_only=False))[0])
            raise _bad_row(rel, table, row, f"{c} is null")
    _check_rows(rel, where, table, domain, shards)
    _check_keys(rel, where, table)
    return table


KEY_CHECK_ROWS = 1 << 16
"""Sorted keys compared this many at a time for duplicates (a slice of the keys at a time, not a sorted copy)."""


def _ints(column: pa.ChunkedArray, name: str, wide: bool = False) -> np.ndarray:
    """An integer column as numpy, in its own dtype (int64 when ``wide``: byte offsets are added), no copy if the
    column is one chunk of that dtype; TypeError for any other type."""
    a = column.to_numpy()
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"column {name!r} is {column.type}, not an integer column")
    return a.astype(np.int64, copy=False) if wide else a


def _check_rows(rel: str, where: str, table: pa.Table, domain: str, shards: dict[str, dict]) -> None:
    """Every row names a listed shard of the row's split, lies inside its bytes, numbers its block's samples 0, 1,
    ...; counts are in range and add up to the manifest's. Its temporaries die on return, before the keys are checked."""
    try:
        off, size = _ints(table["offset"], "offset", wide=True), _ints(table["size"], "size", wide=True)
        atoms, edges = _ints(table["num_atoms"], "num_atoms"), _ints(table["num_edges"], "num_edges")
        item, crc = _ints(table["item"], "item"), _ints(table["crc32"], "crc32", wide=True)
        names, codes = dictionary_codes(table["shard"])
        split_names, scodes = dictionary_codes(table["split"])
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise SchemaError(f"{where}: columns of the wrong type ({e}); re-convert the data") from None
    for k, name in enumerate(names):
        if name not in shards:
            row = int(np.flatnonzero(codes == k)[0])
            try:
                safe_relative_path(name, "shard")
            except SchemaError as e:
                raise _bad_row(rel, table, row, str(e)) from None
            raise _bad_row(rel, table, row, f"shard {name!r} is not a {domain!r} shard listed in the manifest")
    end = off + size
    shard_bytes = np.array([shards[n]["bytes"] for n in names], np.int64)
    for bad, what in (
        (off < 0, lambda r: f"offset {off[r]} is negative"),
        (size < 0, lambda r: f"size {size[r]} is negative"),
        (end > shard_bytes[codes], lambda r: f"offset {off[r]} + size {size[r]} is past the end of shard "
                                             f"{names[codes[r]]!r} ({shard_bytes[codes[r]]} bytes in the manifest)"),
        ((atoms < 1) | (atoms > INT32_MAX), lambda r: f"num_atoms {atoms[r]} is not in 1..{INT32_MAX}"),
        ((edges < 0) | (edges > INT32_MAX), lambda r: f"num_edges {edges[r]} is not in 0..{INT32_MAX}"),
        ((crc < 0) | (crc > 0xFFFFFFFF), lambda r: f"crc32 {crc[r]} is not a 32-bit checksum"),
        ((item < 0) | (item >= BLOCK_MAX_SAMPLES), lambda r: f"item {item[r]} outside 0..{BLOCK_MAX_SAMPLES - 1}"),
    ):
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise _bad_row(rel, table, r, what(r))
    # rows of one block member share its byte range and crc32 and number its samples 0, 1, ...; members never overlap
    order = np.lexsort((item, off, codes))
    o, e, c, it, cr = off[order], end[order], codes[order], item[order], crc[order]
    del end
    same = (c[1:] == c[:-1]) & (o[1:] == o[:-1])
    for bad, what in (
        ((c[1:] == c[:-1]) & ~same & (o[1:] < e[:-1]), lambda r: f"bytes {off[r]}..{off[r] + size[r]} overlap "
                                                                f"another row's member in shard {names[codes[r]]!r}"),
        (same & ((e[1:] != e[:-1]) | (cr[1:] != cr[:-1])),
         lambda r: f"size {size[r]} or crc32 {crc[r]} differs from another row of the block at offset {off[r]}"),
        (np.where(same, it[1:] != it[:-1] + 1, it[1:] != 0),
         lambda r: f"item {item[r]}: the rows of the block at offset {off[r]} must number its samples 0, 1, 2, ..."),
    ):
        if bad.any():
            r = int(order[1:][bad][0])
            raise _bad_row(rel, table, r, what(r))
    if it[0] != 0:
        r = int(order[0])
        raise _bad_row(rel, table, r, f"item {item[r]}: the rows of the block at offset {off[r]} must number its "
                                      "samples 0, 1, 2, ...")
    del order, o, e, c, it, cr, same
    want_split = np.array([split_names.index(shards[n]["split"]) if shards[n]["split"] in split_names else -1
                           for n in names], np.int32)
    wrong = want_split[codes] != scodes
    if wrong.any():
        r = int(np.flatnonzero(wrong)[0])
        raise _bad_row(rel, table, r, f"split {split_names[scodes[r]]!r} but its shard {names[codes[r]]!r} is a "
                                      f"{shards[names[codes[r]]]['split']!r} shard in the manifest")
    per_shard = np.bincount(codes, minlength=len(names))
    position = {name: k for k, name in enumerate(names)}  # not names.index: quadratic in the shards (1.5 s at 10 k)
    for path, sh in shards.items():
        got = int(per_shard[position[path]]) if path in position else 0
        if got != sh["samples"]:
            raise SchemaError(f"{where}: {got} rows for shard {path!r}, the manifest says {sh['samples']} samples; "
                              "index rows are missing or extra: re-convert the data")


def _check_keys(rel: str, where: str, table: pa.Table) -> None:
    """Keys are 1..MAX_KEY_BYTES bytes and unique: sorted, equal keys are neighbours (a hash set took ~350 B a row);
    the sorted order is compared a slice at a time."""
    keys = table["key"]
    try:
        key_bytes = pc.binary_length(keys).to_numpy()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SchemaError(f"{where}: column 'key' is not a string column ({e}); re-convert the data") from None
    if (key_bytes > MAX_KEY_BYTES).any() or (key_bytes == 0).any():
        r = int(np.flatnonzero((key_bytes > MAX_KEY_BYTES) | (key_bytes == 0))[0])
        raise _bad_row(rel, table, r, f"key of {key_bytes[r]} bytes (a key has 1..{MAX_KEY_BYTES})")
    del key_bytes
    by_key = pc.sort_indices(keys).to_numpy()
    for lo in range(0, len(by_key) - 1, KEY_CHECK_ROWS):
        ids = by_key[lo : lo + KEY_CHECK_ROWS + 1]
        ordered = keys.take(pa.array(ids))
        same = pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False)
        if same.any():
            j = int(np.flatnonzero(same)[0])
            first, second = sorted(ids[[j, j + 1]].tolist())
            raise _bad_row(rel, table, second, f"key {ordered[j].as_py()!r} is also on row {first} (duplicate keys: "
                                               "the same sample would be read twice, or land in two splits)")


def load_domain_index(root: str, domain: str, split: str, manifest: dict | None = None,
                      options: storage.StorageOptions | None = None, table: pa.Table | None = None) -> DomainIndex:
    """Load the index rows of ``domain`` and ``split`` under ``root``; empty arrays if the split has no samples.

    ``options`` (``data.storage``) is used for these reads and kept in the index for reading its shards;
    ``table``: the domain's index from :func:`read_index_table` when the caller has read it already.
    """
    manifest = manifest if manifest is not None else read_manifest(root, options)
    index_paths = manifest.get("index", {})
    if domain not in index_paths:
        raise ValueError(
            f"domain {domain!r} is not in the shards root {root!r}; it has {sorted(index_paths)}. "
            "Fix data.domains (or the domain's root)"
        )
    table = table if table is not None else read_index_table(root, domain, manifest, options)
    split_names, split_codes = dictionary_codes(table["split"])
    rows = np.flatnonzero(split_codes == split_names.index(split)) if split in split_names else np.zeros(0, np.int64)
    all_names, all_codes = dictionary_codes(table["shard"])
    # this split's shards, numbered in order of their first row (as the index lists them)
    used, first, codes = np.unique(all_codes[rows], return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty(len(used), np.int32)
    rank[by_first] = np.arange(len(used), dtype=np.int32)
    shard_names = [str(all_names[u]) for u in used[by_first]]
    codes = rank[codes.reshape(-1)]
    offset = table["offset"].take(pa.array(rows)).to_numpy().astype(np.int64)
    item = table["item"].take(pa.array(rows)).to_numpy().astype(np.uint16)
    order = np.lexsort((item, offset, codes))
    rows = pa.array(rows[order])

    def column(name: str, dtype: type) -> np.ndarray:  # this split's rows only: no full-length temporaries
        return table[name].take(rows).to_numpy().astype(dtype)

    shard, offset = codes[order], offset[order]
    first = np.flatnonzero(np.concatenate([[len(shard) > 0], (shard[1:] != shard[:-1]) | (offset[1:] != offset[:-1])]))
    member = np.zeros(len(shard), np.int32)
    member[first[1:]] = 1
    np.cumsum(member, dtype=np.int32, out=member)
    opts = manifest.get("options", {})
    sha = {sh.get("path"): sh.get("sha256") for sh in manifest.get("shards", []) if isinstance(sh, dict)}
    first_rows = rows.take(pa.array(first))
    return DomainIndex(
        name=domain,
        split=split,
        root=root,
        shard_urls=[storage.join(root, s) for s in shard_names],
        keys=KeyColumn(table["key"].take(rows)),
        member=member,
        item=item[order],
        num_atoms=column("num_atoms", np.int32),
        num_edges=column("num_edges", np.int32),
        member_shard=shard[first],
        member_offset=offset[first],
        member_size=table["size"].take(first_rows).to_numpy().astype(np.int64),
        member_crc32=table["crc32"].take(first_rows).to_numpy().astype(np.uint32),
        radius_A=float(opts.get("radius_A") or 0.0),
        max_neighbors=int(opts.get("max_neighbors") or 0),
        shard_sha256=[sha.get(s) for s in shard_names],
        options=options,
    )
