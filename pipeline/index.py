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
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import INDEX_DIR, MANIFEST_NAME, SPLITS, SchemaError, check_version

log = logging.getLogger(__name__)

TAR_BLOCK = 512


@dataclass
class DomainIndex:
    """The samples of one domain and split, sorted by (shard, offset): row ``i`` is sample id ``i``."""

    name: str
    split: str
    root: str
    shard_urls: list[str]
    keys: np.ndarray  # object [n]
    shard: np.ndarray  # int32 [n], index into shard_urls
    offset: np.ndarray  # int64 [n], byte offset of the member data in the tar
    size: np.ndarray  # int64 [n], member bytes
    num_atoms: np.ndarray  # int64 [n]
    num_edges: np.ndarray  # int64 [n], stored radius pairs (each once)
    crc32: np.ndarray | None  # int64 [n], zlib.crc32 of each member (None: an index written before it existed)
    radius_A: float
    max_neighbors: int
    shard_sha256: list[str | None] | None = None  # per shard_urls entry, from the manifest (None: not listed)
    options: storage.StorageOptions | None = None  # how this root is read (data.storage); None: process default

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def total_atoms(self) -> int:
        return int(self.num_atoms.sum())


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


REQUIRED_COLUMNS = ("key", "split", "shard", "offset", "size", "num_atoms", "num_edges")


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
        if sh["samples"] * 2 * TAR_BLOCK > sh["bytes"]:  # every member takes a tar header and a data block at least
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
        pf = pq.ParquetFile(io.BytesIO(storage.read_bytes(url, options=options)))
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
    table = pf.read()
    if rows == 0:
        return table
    for c in REQUIRED_COLUMNS:
        if table[c].null_count:
            row = int(np.flatnonzero(table[c].is_null().to_numpy(zero_copy_only=False))[0])
            raise _bad_row(rel, table, row, f"{c} is null")
    try:
        off = table["offset"].to_numpy().astype(np.int64)
        size = table["size"].to_numpy().astype(np.int64)
        atoms = table["num_atoms"].to_numpy().astype(np.int64)
        edges = table["num_edges"].to_numpy().astype(np.int64)
        shard_enc = table["shard"].combine_chunks().dictionary_encode()
        split_enc = table["split"].combine_chunks().dictionary_encode()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
        raise SchemaError(f"{where}: columns of the wrong type ({e}); re-convert the data") from None
    names = shard_enc.dictionary.to_pylist()
    codes = shard_enc.indices.to_numpy(zero_copy_only=False)
    for k, name in enumerate(names):
        if name not in shards:
            row = int(np.flatnonzero(codes == k)[0])
            try:
                safe_relative_path(name, "shard")
            except SchemaError as e:
                raise _bad_row(rel, table, row, str(e)) from None
            raise _bad_row(rel, table, row, f"shard {name!r} is not a {domain!r} shard listed in the manifest")
    shard_bytes = np.array([shards[n]["bytes"] for n in names], np.int64)[codes]
    for bad, what in (
        (off < 0, lambda r: f"offset {off[r]} is negative"),
        (size < 0, lambda r: f"size {size[r]} is negative"),
        (off + size > shard_bytes, lambda r: f"offset {off[r]} + size {size[r]} is past the end of shard "
                                             f"{names[codes[r]]!r} ({shard_bytes[r]} bytes in the manifest)"),
        (atoms < 1, lambda r: f"num_atoms {atoms[r]} is not positive"),
        (edges < 0, lambda r: f"num_edges {edges[r]} is negative"),
    ):
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise _bad_row(rel, table, r, what(r))
    order = np.lexsort((off, codes))
    o, e, c = off[order], (off + size)[order], codes[order]
    overlap = (c[1:] == c[:-1]) & (o[1:] < e[:-1])
    if overlap.any():
        r = int(order[1:][overlap][0])
        raise _bad_row(rel, table, r, f"bytes {off[r]}..{off[r] + size[r]} overlap another row's member in shard "
                                      f"{names[codes[r]]!r}")
    split_names = split_enc.dictionary.to_pylist()
    scodes = split_enc.indices.to_numpy(zero_copy_only=False)
    want_split = np.array([split_names.index(shards[n]["split"]) if shards[n]["split"] in split_names else -1
                           for n in names], np.int64)[codes]
    if (want_split != scodes).any():
        r = int(np.flatnonzero(want_split != scodes)[0])
        raise _bad_row(rel, table, r, f"split {split_names[scodes[r]]!r} but its shard {names[codes[r]]!r} is a "
                                      f"{shards[names[codes[r]]]['split']!r} shard in the manifest")
    per_shard = np.bincount(codes, minlength=len(names))
    for path, sh in shards.items():
        got = int(per_shard[names.index(path)]) if path in names else 0
        if got != sh["samples"]:
            raise SchemaError(f"{where}: {got} rows for shard {path!r}, the manifest says {sh['samples']} samples; "
                              "index rows are missing or extra: re-convert the data")
    keys = table["key"].combine_chunks()
    if pa.compute.count_distinct(keys).as_py() != rows:
        k = np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object)
        uniq, first, counts = np.unique(k, return_index=True, return_counts=True)
        dup = uniq[counts > 1][0]
        rows_of = np.flatnonzero(k == dup)[:2].tolist()
        raise _bad_row(rel, table, rows_of[1], f"key {dup!r} is also on row {rows_of[0]} (duplicate keys: the same "
                                              "sample would be read twice, or land in two splits)")
    return table


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
    table = table.filter(pa.compute.equal(table["split"], split))
    shard_enc = table["shard"].combine_chunks().dictionary_encode()
    shard_names = [str(s) for s in shard_enc.dictionary.to_pylist()]
    codes = shard_enc.indices.to_numpy(zero_copy_only=False).astype(np.int32)
    offset = table["offset"].to_numpy().astype(np.int64)
    order = np.lexsort((offset, codes))
    opts = manifest.get("options", {})
    sha = {sh.get("path"): sh.get("sha256") for sh in manifest.get("shards", []) if isinstance(sh, dict)}
    return DomainIndex(
        name=domain,
        split=split,
        root=root,
        shard_urls=[storage.join(root, s) for s in shard_names],
        keys=np.asarray(table["key"].to_numpy(zero_copy_only=False), dtype=object)[order],
        shard=codes[order],
        offset=offset[order],
        size=table["size"].to_numpy().astype(np.int64)[order],
        num_atoms=table["num_atoms"].to_numpy().astype(np.int64)[order],
        num_edges=table["num_edges"].to_numpy().astype(np.int64)[order],
        crc32=table["crc32"].to_numpy().astype(np.int64)[order] if "crc32" in table.column_names else None,
        radius_A=float(opts.get("radius_A") or 0.0),
        max_neighbors=int(opts.get("max_neighbors") or 0),
        shard_sha256=[sha.get(s) for s in shard_names],
        options=options,
    )
