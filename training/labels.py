"""Labels for fine-tuning: read a CSV/Parquet table, join its rows to shard samples, split them.

The join uses the Parquet index of each domain (key, split, source, record), so no sample is decoded to
find its label. Every label row must find its sample: unmatched rows are reported with their count and
the first few (an error, or a logged warning with ``labels.unmatched=warn``), never dropped silently.
Splits are pure functions of the joined table and a seed.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.index import read_manifest
from pipeline.schema import INDEX_DIR, SPLITS
from training.finetune_config import LabelsConfig, SplitConfig

log = logging.getLogger(__name__)


class LabelError(ValueError):
    """The label table cannot be used as configured; the message names the column/rows and the fix."""


@dataclass
class Joined:
    """Label rows matched to shard samples (row ``i`` of every array is one molecule)."""

    keys: np.ndarray  # object [M]
    domain: np.ndarray  # object [M], domain name of each sample
    shard_split: np.ndarray  # object [M], the converter's split of each sample
    label_row: np.ndarray  # int64 [M], row of the label table
    y: np.ndarray  # float64 [M, T]; NaN = missing label
    targets: tuple[str, ...]
    unmatched: list[str]  # descriptions of unmatched label rows (empty unless labels.unmatched=warn)


def read_table(path: str | Path) -> pa.Table:
    p = Path(path)
    if not p.exists():
        raise LabelError(f"labels.path={str(path)!r}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(p)
    if suffix in (".csv", ".tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        return pacsv.read_csv(p, parse_options=opts)
    raise LabelError(f"labels.path={str(path)!r}: unknown table type {suffix!r}; use .csv, .tsv or .parquet")


def _column(table: pa.Table, name: str, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise LabelError(f"{what}={name!r} is not a column of the label table; its columns: {table.column_names}")
    return table[name]


def target_matrix(table: pa.Table, cfg: LabelsConfig) -> np.ndarray:
    """float64 [rows, T] of the target columns; empty cells become NaN; non-numbers fail with the first bad cell."""
    cols = []
    for t in cfg.targets:
        col = _column(table, t, "labels.targets entry")
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)
                or pa.types.is_null(col.type)):
            bad = next((v for v in col.to_pylist() if v not in (None, "")), None)
            raise LabelError(f"target column {t!r} has type {col.type} (e.g. {bad!r}); targets must be numbers")
        cols.append(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False))
    y = np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0))
    if cfg.task == "classification":
        vals = y[np.isfinite(y)]
        odd = np.setdiff1d(np.unique(vals), [0.0, 1.0])
        if odd.size:
            raise LabelError(f"labels.task=classification needs 0/1 labels; target columns hold {odd[:5].tolist()}")
    return y


def read_index_tables(root: str, domains: tuple[str, ...], options: storage.StorageOptions | None = None) -> pa.Table:
    """key, domain, split, source, record of every sample of ``domains`` (all of the manifest when empty)."""
    man = read_manifest(root, options)
    paths = man.get("index", {})
    names = list(domains) or sorted(paths)
    missing = [d for d in names if d not in paths]
    if missing:
        raise LabelError(f"data.domains {missing} are not in the shards root {root!r}; it has {sorted(paths)}")
    parts = []
    for d in names:
        rel = paths.get(d) or f"{INDEX_DIR}/{d}.parquet"
        t = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, rel), options=options)),
                          columns=["key", "domain", "split", "source", "record"])
        parts.append(t)
    return pa.concat_tables(parts)


def _describe(table: pa.Table, rows: np.ndarray, cols: list[str]) -> list[str]:
    sub = table.take(pa.array(rows[:5])).select(cols).to_pylist()
    return [f"row {int(r)} ({', '.join(f'{k}={v!r}' for k, v in s.items())})" for r, s in zip(rows[:5], sub, strict=True)]


def join_labels(table: pa.Table, index: pa.Table, cfg: LabelsConfig) -> Joined:
    """Match each label row to its sample; report unmatched rows (count + first five) and duplicates."""
    y = target_matrix(table, cfg)
    idx_keys = np.asarray(index["key"].to_numpy(zero_copy_only=False), dtype=object)
    pos_of: dict = {}
    if cfg.join == "key":
        wanted = np.asarray(_column(table, cfg.key_column, "labels.key_column").to_pylist(), dtype=object)
        pos_of = {k: i for i, k in enumerate(idx_keys.tolist())}
        wanted_l = [None if k is None else str(k) for k in wanted.tolist()]
        show = [cfg.key_column]
        hint = (f"keys are the converter's sample keys (index/<domain>.parquet column 'key', e.g. {idx_keys[0]!r}); "
                "or join by source file + record with labels.join=source_record")
    else:
        src = index["source"].to_pylist()
        rec = index["record"].to_pylist()
        pos_of = {(s, int(r)): i for i, (s, r) in enumerate(zip(src, rec, strict=True))}
        if cfg.source_column is not None:
            sources = [None if s is None else str(s) for s in _column(table, cfg.source_column, "labels.source_column").to_pylist()]
        else:
            sources = [cfg.source] * table.num_rows
        if cfg.record_column is not None:
            records = _column(table, cfg.record_column, "labels.record_column").to_pylist()
        else:
            records = list(range(table.num_rows))
        wanted_l = [None if s is None or r is None else (s, int(r)) for s, r in zip(sources, records, strict=True)]
        show = [c for c in (cfg.source_column, cfg.record_column) if c] or [table.column_names[0]]
        have = sorted(set(src))[:3]
        hint = (f"sources are paths relative to the converter's RAW folder (the index has e.g. {have}) and records "
                "are 0-based positions inside the file" + ("" if cfg.record_column else
                                                          " (labels.record_column is unset: the row number is the record)"))
    hits = np.array([pos_of.get(w, -1) if w is not None else -1 for w in wanted_l], np.int64)
    miss = np.flatnonzero(hits < 0)
    unmatched: list[str] = []
    if miss.size:
        desc = _describe(table, miss, show)
        msg = (f"{miss.size} of {table.num_rows} label rows match no shard sample, e.g. {'; '.join(desc)}. "
               f"{hint}")
        if cfg.unmatched == "raise":
            raise LabelError(msg + "; set labels.unmatched=warn to train on the matched rows only")
        log.warning("%s; going on without them (labels.unmatched=warn)", msg)
        unmatched = [f"{r}" for r in miss.tolist()]
    ok = np.flatnonzero(hits >= 0)
    found = hits[ok]
    uniq, first, counts = np.unique(found, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        rows = [ok[found == d][:2].tolist() for d in dup[:3]]
        raise LabelError(f"{int((counts > 1).sum())} shard samples are named by more than one label row, e.g. sample "
                         f"{idx_keys[dup[0]]!r} by rows {rows[0]}; keep one row per molecule")
    if ok.size == 0:
        raise LabelError(f"no label row matches a shard sample ({table.num_rows} rows); {hint}")
    return Joined(
        keys=idx_keys[found],
        domain=np.asarray(index["domain"].to_numpy(zero_copy_only=False), dtype=object)[found],
        shard_split=np.asarray(index["split"].to_numpy(zero_copy_only=False), dtype=object)[found],
        label_row=ok.astype(np.int64),
        y=y[ok],
        targets=cfg.targets,
        unmatched=unmatched,
    )


# ---------------------------------------------------------------- splits

def random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Split name ('train'/'val'/'test') of each of ``n`` molecules: a seeded permutation cut by the fractions."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    out = np.full(n, "train", dtype=object)
    out[perm[:n_val]] = "val"
    out[perm[n_val : n_val + n_test]] = "test"
    return out


def scaffold_split(scaffolds: list[str], val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Molecules sharing a scaffold stay in one split. Big scaffold groups (more than half the val size)
    go to train first, in size order; the rest in a seeded random order fill train, then val, then test."""
    n = len(scaffolds)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scaffolds):
        groups.setdefault(s, []).append(i)
    n_val, n_test = int(round(val_fraction * n)), int(round(test_fraction * n))
    n_train = n - n_val - n_test
    sets = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    big = [g for g in sets if len(g) > n_val / 2]
    small = [g for g in sets if len(g) <= n_val / 2]
    rng = np.random.default_rng(seed)
    small = [small[i] for i in rng.permutation(len(small))]
    out = np.full(n, "test", dtype=object)
    filled = {"train": 0, "val": 0}
    for g in big + small:
        split = "train" if filled["train"] + len(g) <= n_train else "val" if filled["val"] + len(g) <= n_val else "test"
        if split != "test":
            filled[split] += len(g)
        out[g] = split
    return out


def murcko_scaffold(z: np.ndarray, bonds: np.ndarray, bond_order: np.ndarray) -> str:
    """Canonical SMILES of the Bemis-Murcko framework (rings + linkers; side chains and H pruned), '' if acyclic.

    Computed on the stored graph (atoms + bonds), so it works when the bond orders are unknown: such
    bonds are written as single bonds.
    """
    from rdkit import Chem

    n = len(z)
    keep = np.ones(n, bool)
    deg = np.zeros(n, np.int64)
    b = np.asarray(bonds, np.int64).reshape(-1, 2)
    np.add.at(deg, b[:, 0], 1)
    np.add.at(deg, b[:, 1], 1)
    while True:  # peel terminal atoms until only rings and the paths between them remain
        leaves = np.flatnonzero(keep & (deg <= 1))
        if leaves.size == 0:
            break
        keep[leaves] = False
        for col in (0, 1):
            hit = np.isin(b[:, col], leaves)
            other = b[hit, 1 - col]
            np.subtract.at(deg, other, 1)
        alive = keep[b[:, 0]] & keep[b[:, 1]]
        b, bond_order = b[alive], np.asarray(bond_order)[alive]
    if not keep.any():
        return ""
    mol = Chem.RWMol()
    new = -np.ones(n, np.int64)
    for i in np.flatnonzero(keep):
        a = Chem.Atom(int(z[i]))
        a.SetNoImplicit(True)
        new[i] = mol.AddAtom(a)
    kinds = {2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE, 4: Chem.BondType.AROMATIC}
    for (i, j), o in zip(b.tolist(), np.asarray(bond_order).tolist(), strict=True):
        mol.AddBond(int(new[i]), int(new[j]), kinds.get(int(o), Chem.BondType.SINGLE))
    return Chem.MolToSmiles(mol.GetMol(), canonical=True)


def assign_splits(joined: Joined, cfg: SplitConfig, scaffolds: list[str] | None = None) -> np.ndarray:
    """Split of each joined molecule under ``cfg`` (shards: the converter's own)."""
    if cfg.method == "shards":
        out = joined.shard_split.copy()
    elif cfg.method == "random":
        out = random_split(len(joined.keys), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    else:
        if scaffolds is None:
            raise ValueError("split.method=scaffold needs the molecules' scaffolds")
        out = scaffold_split(scaffolds, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    counts = {s: int((out == s).sum()) for s in SPLITS}
    if counts["train"] == 0 or counts["val"] == 0:
        raise LabelError(f"split.method={cfg.method}: the labelled molecules split into {counts}; train and val need "
                         "molecules (with method=shards, re-convert with --val-fraction > 0 or use method=random)")
    return out
