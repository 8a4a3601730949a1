"""Fine-tuning LightningModule: the encoder + ESA backbone and a prediction head on molecule embeddings.

Regression targets are learnt in normalised units, ``(y - mean) / std`` per target (train-split statistics
stored as buffers), and reported in the label's units; classification targets are binary logits
(binary cross-entropy). Missing labels (NaN) are masked out of the loss and the metrics.

Batches carry ``y`` float [G, T] (NaN = missing) besides the model's input fields. Logged: ``train/loss``;
``val/loss`` (the normalised loss over the whole split) and per target ``val/{target}_{metric}``
(mae, rmse, r2 or accuracy, roc_auc), the same for ``test``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.network import MolecularESA
from model.optim import lr_factor, param_groups
from model.pretrained import embed_batch

log = logging.getLogger(__name__)


def mean_max_pool(node: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    """[G, 2D]: mean and max of each molecule's node embeddings."""
    d = node.shape[1]
    counts = torch.zeros(num_graphs, device=node.device, dtype=node.dtype).index_add_(
        0, batch, torch.ones_like(batch, dtype=node.dtype))
    mean = node.new_zeros(num_graphs, d).index_add_(0, batch, node) / counts.clamp(min=1).unsqueeze(1)
    mx = node.new_full((num_graphs, d), float("-inf")).scatter_reduce(
        0, batch.unsqueeze(1).expand(-1, d), node, reduce="amax", include_self=True)
    return torch.cat([mean, torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))], dim=1)


class PropertyHead(nn.Module):
    """MLP from a molecule vector to T outputs: ``layers`` linear layers, GELU (+ dropout) between."""

    def __init__(self, in_dim: int, hidden: int, layers: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.LayerNorm(in_dim)]
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        mods.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FinetuneModule(L.LightningModule):
    """Backbone + head under Lightning (hyper-parameters are plain dicts, so checkpoints load with weights_only).

    Args:
        model: ModelConfig fields of the backbone.
        head: HeadConfig fields; optim: FinetuneOptimConfig fields; backbone: BackboneConfig fields.
        targets: target column names; task: regression or classification.
        y_mean, y_std: per-target normalisation (regression; ignored for classification).
    """

    def __init__(self, model: dict, head: dict, optim: dict, backbone: dict, targets: Sequence[str], task: str,
                 y_mean: Sequence[float] | None = None, y_std: Sequence[float] | None = None) -> None:
        super().__init__()
        t = len(targets)
        y_mean = list(y_mean) if y_mean is not None else [0.0] * t
        y_std = list(y_std) if y_std is not None else [1.0] * t
        self.save_hyperparameters({"model": dict(model), "head": dict(head), "optim": dict(optim),
                                   "backbone": dict(backbone), "targets": list(targets), "task": task,
                                   "y_mean": [float(v) for v in y_mean], "y_std": [float(v) for v in y_std]})
        self.model_cfg = ModelConfig(**model)
        self.targets, self.task = list(targets), task
        self.head_cfg, self.optim_cfg, self.backbone_cfg = dict(head), dict(optim), dict(backbone)
        self.net = MolecularESA(self.model_cfg, tasks=None)
        in_dim = self.net.graph_dim + (2 * self.net.node_dim if head["use_node_embeddings"] else 0)
        self.head = PropertyHead(in_dim, head["hidden"], head["layers"], t, head["dropout"])
        self.register_buffer("y_mean", torch.tensor(y_mean, dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(y_std, dtype=torch.float32))
        self.frozen = bool(backbone["freeze"])
        if self.frozen:
            self.net.requires_grad_(False)
        self._eval_out: list[tuple[Tensor, Tensor]] = []

    @classmethod
    def from_config(cls, cfg, model_cfg: ModelConfig, y_mean=None, y_std=None) -> FinetuneModule:
        """From a :class:`~training.finetune_config.FinetuneConfig` and the backbone's ModelConfig."""
        return cls(asdict(model_cfg), asdict(cfg.head), asdict(cfg.optim), asdict(cfg.backbone),
                   cfg.labels.targets, cfg.labels.task, y_mean, y_std)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.net.eval()  # a frozen backbone keeps dropout off
        return self

    # ------------------------------------------------------------------ forward

    def features(self, batch) -> tuple[Tensor, Tensor]:
        """(molecule vector fed to the head [G, F], graph embedding [G, Dg])."""
        node, graph = embed_batch(self.net, batch)
        x = graph
        if self.head_cfg["use_node_embeddings"]:
            x = torch.cat([graph, mean_max_pool(node, batch.batch, graph.shape[0])], dim=1)
        return x, graph

    def forward(self, batch) -> Tensor:
        """Predictions [G, T] in the label's units (regression) or logits (classification)."""
        x, _ = self.features(batch)
        return self._denormalise(self.head(x))

    def _denormalise(self, out: Tensor) -> Tensor:
        return out * self.y_std + self.y_mean if self.task == "regression" else out

    def _loss(self, raw: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(sum of per-label losses, number of labels) of head outputs ``raw`` against ``y`` (NaN masked)."""
        ok = torch.isfinite(y)
        if self.task == "regression":
            target = (torch.nan_to_num(y) - self.y_mean) / self.y_std
            per = F.mse_loss(raw, target, reduction="none") if self.head_cfg["loss"] == "mse" else \
                F.l1_loss(raw, target, reduction="none")
        else:
            per = F.binary_cross_entropy_with_logits(raw, torch.nan_to_num(y), reduction="none")
        return (per * ok).sum(), ok.sum()

    # ------------------------------------------------------------------ steps

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, _ = self.features(batch)
        total, n = self._loss(self.head(x).float(), batch.y)
        loss = total / n.clamp(min=1)
        self.log("train/loss", loss, batch_size=max(1, int(n)), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch) -> None:
        if batch.num_graphs == 0:
            return
        x, _ = self.features(batch)
        self._eval_out.append((self.head(x).float().detach().cpu(), batch.y.detach().cpu()))

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_epoch_end(self, stage: str) -> None:
        from model.metrics import classification_metrics, regression_metrics

        if not self._eval_out:
            return
        raw = torch.cat([o[0] for o in self._eval_out])
        y = torch.cat([o[1] for o in self._eval_out])
        self._eval_out = []
        total, n = self._loss(raw.to(self.y_mean.device), y.to(self.y_mean.device))
        self.log(f"{stage}/loss", total / n.clamp(min=1), batch_size=max(1, int(n)), prog_bar=stage == "val")
        pred = self._denormalise(raw.to(self.y_mean.device)).cpu().numpy()
        yn = y.numpy()
        self.last_metrics = {}
        for j, name in enumerate(self.targets):
            m = regression_metrics(pred[:, j], yn[:, j]) if self.task == "regression" else \
                classification_metrics(pred[:, j], yn[:, j])
            self.last_metrics[name] = m
            for k, v in m.items():
                if k != "n" and np.isfinite(v):
                    self.log(f"{stage}/{name}_{k}", float(v), batch_size=max(1, m["n"]))

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """keys, predictions [G, T] (label units / logits) and graph embeddings [G, Dg] of a batch."""
        x, graph = self.features(batch)
        return {"keys": list(batch["keys"]), "prediction": self._denormalise(self.head(x)), "graph_embeddings": graph}

    # ------------------------------------------------------------------ optimiser

    def configure_optimizers(self):
        o = self.optim_cfg
        groups = [dict(g, lr=o["lr"]) for g in param_groups(self.head, o["weight_decay"])]
        if not self.frozen:
            blr = o["lr"] * self.backbone_cfg["lr_ratio"]
            groups += [dict(g, lr=blr) for g in param_groups(self.net, o["weight_decay"])]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, lr=o["lr"])
        total = int(self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else 0
        if total <= 0:
            raise ValueError("fine-tuning needs trainer.max_steps > 0 for its schedule")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, o["warmup_fraction"], o["min_lr_ratio"]))
        log.info("optimizer: torch AdamW, head lr %.3g, backbone %s", o["lr"],
                 "frozen" if self.frozen else f"lr {o['lr'] * self.backbone_cfg['lr_ratio']:.3g}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
