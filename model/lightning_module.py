"""LightningModule: the network, its losses normalised by global target counts, per-task and
per-domain metrics, and the optimiser/schedule.

Normalisation: batch sizes vary (atom-budget packing), so a task's loss is
``sum of per-target cross-entropies over all ranks / number of targets over all ranks``. Each rank
back-propagates ``local_sum * world_size / global_count``; DDP's gradient averaging (÷ world_size)
then yields exactly the gradient of the global mean. The counts (and, for logging, the sums) are
all-reduced once per step in a single small tensor.

Logged keys (``stage`` = train/val/test; train on steps, val/test as epoch means weighted by the
global target count, which makes them exact means over the whole evaluation):

- ``{stage}/loss``: weighted total; ``{stage}/{task}_loss``, ``{stage}/{task}_acc``;
- ``{stage}/{task}_loss/{domain}``, ``{stage}/{task}_acc/{domain}`` for each domain present
  (training: every ``tasks.per_domain_every_n_steps`` steps).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, fields

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from model.config import ModelConfig, OptimConfig, TasksConfig
from model.network import ModelOutput, MolecularESA
from model.optim import build_optimizer, build_scheduler
from model.pretrained import embed_batch

log = logging.getLogger(__name__)


def _as_config(cls, value):
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}; known fields: {sorted(known)}")
        return cls(**value)
    raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_sum(x: Tensor) -> Tensor:
    if _world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


class PretrainingModule(L.LightningModule):
    """ESA pretraining under Lightning.

    Args:
        model: :class:`ModelConfig` (or a dict of its fields, as stored in checkpoints).
        tasks: :class:`TasksConfig` (or dict).
        optim: :class:`OptimConfig` (or dict).
        domains: domain names; ``domains[i]`` names ``batch.domain == i`` in logged keys.
    """

    def __init__(
        self,
        model: ModelConfig | dict | None = None,
        tasks: TasksConfig | dict | None = None,
        optim: OptimConfig | dict | None = None,
        domains: Sequence[str] = ("protein", "small_molecule", "metabolite", "rna"),
    ) -> None:
        super().__init__()
        self.model_cfg = _as_config(ModelConfig, model if model is not None else ModelConfig())
        self.tasks_cfg = _as_config(TasksConfig, tasks if tasks is not None else TasksConfig())
        self.optim_cfg = _as_config(OptimConfig, optim if optim is not None else OptimConfig())
        self.domains = [str(d) for d in domains]
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains={self.domains!r}: give a non-empty list of distinct names")
        self.save_hyperparameters(
            {
                "model": asdict(self.model_cfg),
                "tasks": asdict(self.tasks_cfg),
                "optim": asdict(self.optim_cfg),
                "domains": self.domains,
            }
        )
        self.net = MolecularESA(self.model_cfg, self.tasks_cfg)

    def forward(self, batch) -> ModelOutput:
        return self.net(batch)

    # ------------------------------------------------------------------ steps

    def training_step(self, batch, batch_idx: int) -> Tensor:
        every = self.tasks_cfg.per_domain_every_n_steps
        return self._step(batch, "train", per_domain=self.global_step % every == 0)

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        return self._step(batch, "val", per_domain=True)

    def test_step(self, batch, batch_idx: int) -> Tensor:
        return self._step(batch, "test", per_domain=True)

    def _step(self, batch, stage: str, per_domain: bool) -> Tensor:
        out = self.net(batch)
        tasks = list(out.predictions)
        n_dom = len(self.domains)
        if batch.domain.numel() and int(batch.domain.max()) >= n_dom:
            raise ValueError(
                f"batch.domain holds id {int(batch.domain.max())} but only {n_dom} domains are named "
                f"({self.domains}); pass the loader's domain list to PretrainingModule(domains=...)"
            )
        # stats[k, t, c]: k = (ce sum, correct, count), t = task, c = domain (last column: all)
        stats = torch.zeros(3, len(tasks), n_dom + 1, device=batch.z.device, dtype=torch.float64)
        ce_sums: list[Tensor] = []
        for t, task in enumerate(tasks):
            pred = out.predictions[task]
            ce, correct = pred.per_target()
            ce_sums.append(ce.sum())
            dom = batch.domain[pred.graph]  # [T]
            for k, v in enumerate((ce.detach(), correct, torch.ones_like(ce))):
                stats[k, t, n_dom] = v.sum().to(stats.dtype)
                if per_domain:
                    stats[k, t, :n_dom].index_add_(0, dom, v.to(stats.dtype))
        n_local = torch.tensor([batch.z.shape[0]], device=stats.device, dtype=stats.dtype)
        flat = _global_sum(torch.cat([stats.flatten(), n_local]))  # the step's only collective
        stats, n_atoms = flat[:-1].view_as(stats), flat[-1]
        world = _world_size()

        total = torch.zeros((), device=stats.device)
        for t, task in enumerate(tasks):
            count = stats[2, t, n_dom]
            loss_t = ce_sums[t] * world / count.clamp(min=1).float()  # this rank's share of the global mean
            total = total + self.tasks_cfg.weight(task) * loss_t
            if count > 0:
                self._log(f"{stage}/{task}_loss", stats[0, t, n_dom] / count, stage, count)
                self._log(f"{stage}/{task}_acc", stats[1, t, n_dom] / count, stage, count)
            if per_domain:
                for c, name in enumerate(self.domains):
                    cnt = stats[2, t, c]
                    if cnt > 0:
                        self._log(f"{stage}/{task}_loss/{name}", stats[0, t, c] / cnt, stage, cnt)
                        self._log(f"{stage}/{task}_acc/{name}", stats[1, t, c] / cnt, stage, cnt)
        # the logged total is the weighted sum of global means (identical on every rank)
        logged_total = sum(
            self.tasks_cfg.weight(task) * stats[0, t, n_dom] / stats[2, t, n_dom].clamp(min=1)
            for t, task in enumerate(tasks)
        )
        self._log(f"{stage}/loss", torch.as_tensor(logged_total, dtype=torch.float64), stage, n_atoms, prog_bar=True)
        return total

    def _log(self, name: str, value: Tensor, stage: str, count: Tensor, prog_bar: bool = False) -> None:
        train = stage == "train"
        self.log(
            name,
            value.float(),
            batch_size=max(1, int(count)),
            on_step=train,
            on_epoch=not train,
            prog_bar=prog_bar,
            sync_dist=not train and _world_size() > 1,  # values are already global; this only silences the DDP warning
            add_dataloader_idx=False,
        )

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Embeddings of the whole molecules (no atom masked; task fields need not be in the batch):
        ``keys``, ``graph_embeddings`` [G, Dg], ``node_embeddings`` [N, D], ``ptr`` [G+1]."""
        node, graph = embed_batch(self.net, batch)
        return {"keys": list(batch["keys"]), "graph_embeddings": graph, "node_embeddings": node, "ptr": batch.ptr}

    # ------------------------------------------------------------------ optimiser

    def configure_optimizers(self):
        total = self.optim_cfg.total_steps
        if total <= 0 and self._trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            total = int(self.trainer.max_steps)
        if total <= 0:
            raise ValueError(
                "the cosine schedule needs a length: set optim.total_steps or Trainer(max_steps=...) "
                "(the streaming loader has no epoch length to infer it from)"
            )
        opt = build_optimizer(self.net, self.optim_cfg)
        sched = build_scheduler(opt, self.optim_cfg, total)
        log.info(
            "schedule: %d steps, %d warm-up, cosine to %.3g x peak lr %.3g",
            total, round(self.optim_cfg.warmup_fraction * total), self.optim_cfg.min_lr_ratio, self.optim_cfg.lr,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
