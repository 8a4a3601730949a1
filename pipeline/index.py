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
from pipeline.schema import INDEX_DIR, MANIFEST_NAME, SchemaError, check_version

log = logging.getLogger(__name__)


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


def load_domain_index(root: str, domain: str, split: str, manifest: dict | None = None,
                      options: storage.StorageOptions | None = None) -> DomainIndex:
    """Load the index rows of ``domain`` and ``split`` under ``root``; empty arrays if the split has no samples.

    ``options`` (``data.storage``) is used for these reads and kept in the index for reading its shards.
    """
    manifest = manifest if manifest is not None else read_manifest(root, options)
    index_paths = manifest.get("index", {})
    if domain not in index_paths:
        raise ValueError(
            f"domain {domain!r} is not in the shards root {root!r}; it has {sorted(index_paths)}. "
            "Fix data.domains (or the domain's root)"
        )
    rel = index_paths.get(domain) or f"{INDEX_DIR}/{domain}.parquet"
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, rel), options=options)))
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
