"""Labelled molecules for fine-tuning: joined labels + their shard samples, held in memory, batched.

Label sets are small next to pretraining corpora (all of QM9, 130 831 molecules, is ~2.4 M atoms,
~100 MB decoded), so the matched samples are read once through the loader's own reader (crc32-checked,
pickle-free) and kept. Batches are packed under ``data.max_atoms`` / ``data.max_graphs`` by
:func:`pipeline.packing.plan_batches` and collated by :func:`pipeline.collate.collate` with every
pretraining task off (no masked atom, no held-out edge); ``batch.y`` [G, T] holds the labels.

Training batches: epoch ``e`` is a permutation seeded by ``(data.seed, e)``; the position (epoch, batches
done) is saved in checkpoints, so ``--resume`` continues with the next batch of the interrupted epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from pipeline.collate import CollateOptions, collate
from pipeline.config import DataConfig
from pipeline.index import load_domain_index, read_manifest
from pipeline.packing import plan_batches
from pipeline.schema import SPLITS, Sample
from pipeline.stream import COUNTERS, DomainSource
from training.finetune_config import FinetuneConfig
from training.labels import (
    Joined,
    LabelError,
    assign_splits,
    join_labels,
    murcko_scaffold,
    read_index_tables,
    read_table,
)

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """Matched molecules: samples, labels, split (row ``i`` of each is one molecule)."""

    joined: Joined
    samples: list[Sample]
    split: np.ndarray  # object [M]: train / val / test

    def ids(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def label_stats(self) -> tuple[list[float], list[float]]:
        """Per-target mean and std of the training labels (std 1 where it is 0 or undefined)."""
        y = self.joined.y[self.ids("train")]
        mean = np.nanmean(np.where(np.isfinite(y), y, np.nan), axis=0) if len(y) else np.zeros(y.shape[1])
        std = np.nanstd(np.where(np.isfinite(y), y, np.nan), axis=0) if len(y) else np.ones(y.shape[1])
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        return mean.tolist(), std.tolist()


def fetch_samples(root: str, joined: Joined, max_atoms: int) -> list[Sample]:
    """Decode the sample of every joined row (crc32-verified); an oversize sample is an error (no cropping)."""
    manifest = read_manifest(root)
    reader_cfg = DataConfig(root=root, bad_sample_policy="raise")
    out: list[Sample | None] = [None] * len(joined.keys)
    names = sorted(set(joined.domain.tolist()))
    for d, name in enumerate(names):
        for split in SPLITS:
            rows = np.flatnonzero((joined.domain == name) & (joined.shard_split == split))
            if rows.size == 0:
                continue
            ix = load_domain_index(root, name, split, manifest)
            pos = {k: i for i, k in enumerate(ix.keys.tolist())}
            big = [joined.keys[r] for r in rows if ix.num_atoms[pos[joined.keys[r]]] > max_atoms]
            if big:
                raise LabelError(f"{len(big)} labelled molecules have more than data.max_atoms={max_atoms} atoms "
                                 f"(e.g. {big[0]}); raise data.max_atoms (fine-tuning never crops a labelled molecule)")
            src = DomainSource(ix, d, 0, 1, reader_cfg, np.zeros((len(names), len(COUNTERS)), np.int64))
            try:
                samples = src.fetch_samples([pos[joined.keys[r]] for r in rows])
            finally:
                src.fetcher.close()
            for r, s in zip(rows.tolist(), samples, strict=True):
                out[r] = s
    return out  # type: ignore[return-value]


def load_labelled(cfg: FinetuneConfig) -> LabelledSet:
    """Read labels, join them to the shards' index, read the samples, assign splits."""
    index = read_index_tables(cfg.data.root, cfg.data.domains)
    table = read_table(cfg.labels.path)
    joined = join_labels(table, index, cfg.labels)
    log.info("labels: %d of %d rows matched shard samples (%d samples in the shards' index)",
             len(joined.keys), table.num_rows, index.num_rows)
    samples = fetch_samples(cfg.data.root, joined, cfg.data.max_atoms)
    scaffolds = ([murcko_scaffold(s.z, s.bonds, s.bond_order) for s in samples]
                 if cfg.split.method == "scaffold" else None)
    split = assign_splits(joined, cfg.split, scaffolds)
    log.info("split (%s): %s", cfg.split.method, {s: int((split == s).sum()) for s in SPLITS})
    return LabelledSet(joined, samples, split)


def no_task_options(radius_A: float, max_neighbors: int) -> CollateOptions:
    """Collate options for whole molecules: no masked atom, no held-out edge (pipeline.collate has no
    'no long-range pairs' switch: lr_pairs_per_atom=0 still draws one pair per molecule, which nothing reads)."""
    return CollateOptions(radius_A=radius_A, max_neighbors=max_neighbors, mask_fraction=0.0, sr_fraction=0.0,
                          lr_pairs_per_atom=0.0)


def make_batch(ls: LabelledSet, ids: np.ndarray, opt: CollateOptions):
    """The collated batch of molecules ``ids`` with ``y`` [G, T] (float32, NaN = missing) and ``label_row``."""
    samples = [ls.samples[i] for i in ids.tolist()]
    batch = collate(samples, [0] * len(samples), opt, np.random.default_rng(0))
    batch.y = torch.as_tensor(ls.joined.y[ids], dtype=torch.float32).reshape(len(ids), -1)
    batch.label_row = torch.as_tensor(ls.joined.label_row[ids], dtype=torch.long)
    return batch


def pack(ls: LabelledSet, ids: np.ndarray, max_atoms: int, max_graphs: int | None) -> list[np.ndarray]:
    """Batches (arrays of molecule ids) of ``ids`` in their order, under the atom / molecule budget."""
    atoms = np.array([ls.samples[i].num_atoms for i in ids.tolist()], np.int64)
    return [ids[b] for b in plan_batches(atoms, max_atoms, max_graphs=max_graphs)]


class TrainBatches:
    """Seeded per-epoch shuffles of the training molecules; resumable position (epoch, batches done)."""

    def __init__(self, ls: LabelledSet, cfg: FinetuneConfig) -> None:
        self.ls, self.cfg = ls, cfg
        self.opt = no_task_options(cfg.data.radius_A, cfg.data.max_neighbors)
        self.epoch, self.done = 0, 0
        self._plans: dict[int, list[np.ndarray]] = {}

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k >= epoch - 1}
            ids = self.ls.ids("train")
            perm = np.random.default_rng([self.cfg.data.seed, epoch]).permutation(ids)
            self._plans[epoch] = pack(self.ls, perm, self.cfg.data.max_atoms, self.cfg.data.max_graphs)
        return self._plans[epoch]

    def _current(self) -> int:
        """The epoch the next batch belongs to."""
        return self.epoch + 1 if self.done >= len(self.plan(self.epoch)) else self.epoch

    def __len__(self) -> int:
        # epochs differ in length (packing a new permutation); Lightning reloads the loader each epoch to re-read it
        return len(self.plan(self._current()))

    def __iter__(self):
        if self.done >= len(self.plan(self.epoch)):
            self.epoch, self.done = self.epoch + 1, 0
        plan = self.plan(self.epoch)
        while self.done < len(plan):
            batch = make_batch(self.ls, plan[self.done], self.opt)
            self.done += 1
            batch.position = (self.epoch, self.done)
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.done = int(st["epoch"]), int(st["done"])


class EvalBatches:
    """The molecules of one split, each exactly once, in a fixed order."""

    def __init__(self, ls: LabelledSet, split: str, cfg: FinetuneConfig) -> None:
        self.ls = ls
        self.opt = no_task_options(cfg.data.radius_A, cfg.data.max_neighbors)
        self.plan = pack(ls, ls.ids(split), cfg.data.max_atoms, cfg.data.max_graphs)

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for ids in self.plan:
            yield make_batch(self.ls, ids, self.opt)


class FinetuneDataModule(L.LightningDataModule):
    """Train / val / test batches of a :class:`LabelledSet`; the training position is checkpointed.

    Lightning fetches one batch ahead, so the saved position is that of the batch the last training step
    received (recorded in ``on_after_batch_transfer``), not the loader's.
    """

    def __init__(self, ls: LabelledSet, cfg: FinetuneConfig) -> None:
        super().__init__()
        self.ls, self.cfg = ls, cfg
        self.train = TrainBatches(ls, cfg)
        self._consumed: tuple[int, int] | None = None

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return EvalBatches(self.ls, "val", self.cfg)

    def test_dataloader(self):
        return EvalBatches(self.ls, "test", self.cfg)

    def predict_dataloader(self):
        return [EvalBatches(self.ls, s, self.cfg) for s in SPLITS if len(self.ls.ids(s))]

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        pos = getattr(batch, "position", None)
        if pos is not None and self.trainer is not None and self.trainer.training:
            self._consumed = pos
        return batch

    def state_dict(self) -> dict:
        if self._consumed is None:
            return self.train.state_dict()
        return {"epoch": self._consumed[0], "done": self._consumed[1]}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.train.load_state_dict(state_dict)
