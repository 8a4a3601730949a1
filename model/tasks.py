"""The three pretraining tasks: heads, targets and per-target losses.

- ``mlm``: predict the true element (``batch.mlm_target``) of each masked atom (``batch.mlm_mask``); the
  loader already replaced its type by the mask token, noised its position and removed its bonds.
- ``short_range``: classify the clean length (``batch.sr_target``) of each held-out radius pair
  (``batch.sr_index``; absent from every input graph, neither atom masked) into the short-range bins.
- ``long_range``: classify the clean distance (``batch.lr_target``) of same-molecule pairs that are not
  input edges (``batch.lr_index``, sampled stratified by distance) into the long-range bins.

The heads read target fields only for *which* atoms/pairs to predict and what the answer is; the
features come from the backbone, which reads the input fields only. With ``tasks.graph_context`` every
head also reads its molecule's pooled embedding (the pooling block's only training signal). Pair heads
read the symmetric combination ``[h_i + h_j, h_i ⊙ h_j]`` so a pair's prediction does not depend on its
order. Losses are returned per target (summed and normalised by the caller, which knows the global
target count across ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import TasksConfig
from model.encoder import NUM_ELEMENTS


@dataclass
class TaskPrediction:
    """Logits and targets of one task on one batch."""

    logits: Tensor  # [T, C]
    target: Tensor  # long [T]
    graph: Tensor  # long [T]: molecule of each target (for per-domain metrics)

    def per_target(self) -> tuple[Tensor, Tensor]:
        """Cross-entropy [T] (fp32) and correctness [T] (bool) of each target."""
        logits = self.logits.float()
        ce = F.cross_entropy(logits, self.target, reduction="none")
        return ce, logits.argmax(dim=-1) == self.target


def distance_bins(dist: Tensor, boundaries: Tensor) -> Tensor:
    """Bin index (0..len(boundaries)) of each distance [P] (Å)."""
    return torch.bucketize(dist, boundaries.to(dist.dtype))


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PretrainingTasks(nn.Module):
    """Heads of the enabled tasks; ``forward`` returns a :class:`TaskPrediction` per task."""

    def __init__(self, cfg: TasksConfig, node_dim: int, graph_dim: int) -> None:
        super().__init__()
        self.tasks = cfg.tasks
        self.graph_context = cfg.graph_context
        ctx = graph_dim if cfg.graph_context else 0
        self.register_buffer("short_bins", torch.tensor(cfg.short_range_bins_A), persistent=False)
        self.register_buffer("long_bins", torch.tensor(cfg.long_range_bins_A), persistent=False)
        self.heads = nn.ModuleDict()
        if "mlm" in self.tasks:
            self.heads["mlm"] = Head(node_dim + ctx, cfg.head_hidden, NUM_ELEMENTS)
        if "short_range" in self.tasks:
            self.heads["short_range"] = Head(2 * node_dim + ctx, cfg.head_hidden, len(cfg.short_range_bins_A) + 1)
        if "long_range" in self.tasks:
            self.heads["long_range"] = Head(2 * node_dim + ctx, cfg.head_hidden, len(cfg.long_range_bins_A) + 1)

    def _with_context(self, x: Tensor, graph: Tensor, mol: Tensor) -> Tensor:
        return torch.cat([x, graph[mol].to(x.dtype)], dim=-1) if self.graph_context else x

    def forward(self, node: Tensor, graph: Tensor, batch) -> dict[str, TaskPrediction]:
        out: dict[str, TaskPrediction] = {}
        if "mlm" in self.heads:
            idx = batch.mlm_mask.nonzero().squeeze(1)  # [T]
            mol = batch.batch[idx]
            logits = self.heads["mlm"](self._with_context(node[idx], graph, mol))  # [T, 118]
            out["mlm"] = TaskPrediction(logits, batch.mlm_target - 1, mol)
        for task, pairs, dist, bins in (
            ("short_range", batch.sr_index, batch.sr_target, self.short_bins),
            ("long_range", batch.lr_index, batch.lr_target, self.long_bins),
        ):
            if task in self.heads:
                hi, hj = node[pairs[0]], node[pairs[1]]  # [P, D] each
                mol = batch.batch[pairs[0]]
                logits = self.heads[task](self._with_context(torch.cat([hi + hj, hi * hj], dim=-1), graph, mol))
                out[task] = TaskPrediction(logits, distance_bins(dist, bins), mol)
        return out
