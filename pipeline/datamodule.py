"""The LightningDataModule: train / val / test loaders built from one :class:`~pipeline.config.DataConfig`.

Resume: the training loader's position (per-worker stream states, epoch, batches done) is saved by
:meth:`ShardDataModule.state_dict` into every Lightning checkpoint and restored by
:meth:`ShardDataModule.load_state_dict` *before* any dataloader is built (Lightning restores datamodule
state ahead of ``configure_optimizers``), so computing ``trainer.estimated_stepping_batches`` first does
not lose it (the failure mode of Lightning issue #20550). Lightning fetches one batch ahead of the
training step; ``on_after_batch_transfer`` records which batch the step really received, and the saved
position is the one right after that batch.
"""

from __future__ import annotations

import logging

import lightning as L
import torch.distributed as dist

from pipeline.config import DataConfig
from pipeline.loader import Resolved, TrainLoader, eval_loader, resolve

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Streams the shards of ``config``; ``rank``/``world_size`` default to the trainer's (or torch.distributed's)."""

    def __init__(self, config: DataConfig, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self.config = config
        self._rank, self._world = rank, world_size
        self.resolved: Resolved | None = None
        self._train: TrainLoader | None = None
        self._pending: dict | None = None
        self._consumed_seq: int | None = None

    # -- placement ---------------------------------------------------------------------------------
    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.resolved is None:
            self.resolved = resolve(self.config)

    # -- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self) -> TrainLoader:
        self.setup()
        if self._train is None:
            rank, world = self.rank_world()
            self._train = TrainLoader(self.resolved, rank, world)
            if self._pending is not None:
                self._train.load_state_dict(self._pending)
                self._pending = None
        return self._train

    def val_dataloader(self):
        return self._eval("val")

    def test_dataloader(self):
        return self._eval("test")

    def _eval(self, split: str):
        self.setup()
        rank, world = self.rank_world()
        loader = eval_loader(self.resolved, split, rank, world)
        return loader if len(loader.dataset) else []

    # -- state -------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self._consumed_seq = getattr(batch, "loader_seq", None)
        return batch

    def state_dict(self) -> dict:
        if self._train is None:
            return {"train": self._pending} if self._pending is not None else {}
        return {"train": self._train.state_dict(self._consumed_seq)}

    def load_state_dict(self, state_dict: dict) -> None:
        st = state_dict.get("train")
        if st is None:
            return
        if self._train is not None:
            self._train.load_state_dict(st)
        else:
            self._pending = st

    def stats(self) -> dict:
        """Cumulative per-domain counters of this rank (samples, atoms, bad, oversize_skipped/cropped, batches, pass),
        plus ``"storage"``: the storage counters (requests, retries, resumes, bytes_fetched, errors, cache hits, ...)
        of the training reads of this rank, summed over its workers."""
        if self._train is None:
            return {}
        return {**self._train.stats(), "storage": self._train.storage_stats()}
