"""Exact resume: a restored loader yields exactly the batches an uninterrupted one would."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from pipeline.datamodule import ShardDataModule
from pipeline.loader import TrainLoader, resolve
from tests.pipeline.helpers import config


def run(loader, n):
    out = []
    it = iter(loader)
    while len(out) < n:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)  # next epoch
            continue
        out.append((tuple(b["keys"]), b.mlm_mask.numpy().copy()))
    return out


@pytest.mark.parametrize(
    ("workers", "cut"),
    [(0, 1), (0, 7), (0, 16), (2, 5), (2, 9)],  # 7 and 16: epochs of 6 batches; many passes of small domains
)
def test_restore_continues_exactly(small_shards, workers, cut):
    cfg = config(small_shards, max_atoms=6000, train_batches_per_epoch=6, num_workers=workers,
                 shuffle_buffer_bytes=200_000, oversize_policy="crop")
    res = resolve(cfg)
    reference = run(TrainLoader(res), cut + 6)
    first = TrainLoader(res)
    got = run(first, cut)
    state = first.state_dict()
    assert state["workers"][0] is not None
    restored = TrainLoader(res)
    restored.load_state_dict(state)
    again = run(restored, 6)
    assert [k for k, _ in got + again] == [k for k, _ in reference]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got + again, reference, strict=True))
    passes = [s["pass"] for w in state["workers"] if w for s in w["sources"]]
    if cut >= 7:
        assert max(passes) >= 1  # the cut is past at least one pass boundary of some domain


def test_state_rejects_a_different_world(small_shards):
    res = resolve(config(small_shards, max_atoms=10_000, train_batches_per_epoch=2, num_workers=0))
    a = TrainLoader(res)
    run(a, 1)
    b = TrainLoader(res, rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        b.load_state_dict(a.state_dict())


class KeyRecorder(L.LightningModule):
    """A one-parameter model that records which molecules every training step saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, tuple(batch["keys"])))
        return (self.w * batch.pos.mean()).sum() + self.w.square().sum()

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches  # builds the train loader before the restore (#20550)
        assert steps > 0
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(cfg, tmp_path, max_steps, ckpt=None, every=None):
    model = KeyRecorder()
    cbs = []
    if every:
        cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                                       filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, callbacks=cbs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        enable_checkpointing=bool(every))
    trainer.fit(model, datamodule=ShardDataModule(cfg), ckpt_path=ckpt)
    return model.seen


@pytest.mark.parametrize("workers", [0, 2])
def test_state_survives_a_lightning_checkpoint(small_shards, tmp_path, workers):
    cfg = config(small_shards, max_atoms=6000, train_batches_per_epoch=4, num_workers=workers,
                 oversize_policy="crop")
    reference = fit(cfg, tmp_path / "a", 9)
    fit(cfg, tmp_path / "b", 9, every=3)
    ckpt = tmp_path / "b" / "step=6.ckpt"  # mid-epoch (epoch 1, batch 2 of 4)
    assert ckpt.exists()
    assert "ShardDataModule" in torch.load(ckpt, weights_only=True)
    resumed = fit(cfg, tmp_path / "c", 9, ckpt=str(ckpt))
    assert [k for _, k in resumed] == [k for _, k in reference][6:]
