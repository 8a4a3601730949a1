"""Test helpers: read converted shards back, build seed-style .pt chunks from the vendored data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.schema import Sample, decode_block


def read_back(root: Path) -> dict[tuple[str, int], Sample]:
    """Every sample of a shards folder, by (source file, record), read through the schema's decoder."""
    man = json.loads((root / "manifest.json").read_text())
    out = {}
    for sh in man["shards"]:
        with tarfile.open(root / sh["path"]) as tar:
            for m in tar:
                for s in decode_block(tar.extractfile(m).read()):
                    out[(s.source, s.record)] = s
    return out


def index_rows(root: Path) -> list[dict]:
    man = json.loads((root / "manifest.json").read_text())
    return [r for rel in man["index"].values() for r in pq.read_table(root / rel).to_pylist()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    """All output files except the .work cache, for byte-identity checks."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and ".work" not in p.parts}


def xyz_records(path: Path) -> list[tuple[str, list[str], np.ndarray]]:
    """Independent plain-text parse of a multi-record XYZ file: (comment, symbols, coords)."""
    lines = path.read_text().splitlines()
    i, out = 0, []
    while i < len(lines):
        n = int(lines[i])
        body = [ln.split() for ln in lines[i + 2 : i + 2 + n]]
        out.append((lines[i + 1].strip(), [b[0] for b in body], np.array([[float(x) for x in b[1:4]] for b in body])))
        i += 2 + n
    return out


def pyg_data_list(z_pos_ids: list[tuple[np.ndarray, np.ndarray, str]], domain: str):
    import torch
    from torch_geometric.data import Data

    return [Data(z=torch.from_numpy(z.astype(np.int64)), pos=torch.from_numpy(pos.astype(np.float32)),
                 mol_id=mid, dataset_type=domain, num_nodes=len(z)) for z, pos, mid in z_pos_ids]


def save_pt(path: Path, data_list, layout: str) -> None:
    """Write a chunk in one of the layouts the seed produced: 'old' (Data, slices),
    'new' (dict, slices, sizes, cls) of current PyG, or a plain 'list' of Data."""
    import torch
    from torch_geometric.data import InMemoryDataset

    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "list":
        torch.save(data_list, path)
        return
    data, slices = InMemoryDataset.collate(data_list)
    if layout == "old":
        torch.save((data, slices), path)
    else:
        torch.save((data.to_dict(), slices, {}, data.__class__), path)


def buf(b: bytes) -> io.BytesIO:
    return io.BytesIO(b)
