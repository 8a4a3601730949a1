"""The three pretraining tasks: heads, targets and per-target losses.

- ``mlm``: predict the element of each masked atom (``batch.mlm_mask``) from its node embedding.
- ``short_range``: classify the length of each held-out radius pair (``batch.sr_index``; the loader
  removed these pairs from ``edge_index``) into the short-range bins.
- ``long_range``: classify the distance of random same-molecule pairs (``batch.lr_index``) into the
  long-range bins.

Targets are computed here, from ``batch.z`` and ``batch.pos``; the encoder never sees them. Pair
heads read the symmetric combination ``[h_i + h_j, h_i ⊙ h_j]`` so a pair's prediction does not
depend on its order. Losses are returned per target (summed and normalised by the caller, which
knows the global target count across ranks).
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


def distance_bins(pos: Tensor, pairs: Tensor, boundaries: Tensor) -> Tensor:
    """Bin index (0..len(boundaries)) of the length of each pair [2, P] (Å)."""
    d = (pos[pairs[0]] - pos[pairs[1]]).norm(dim=-1)  # [P]
    return torch.bucketize(d, boundaries.to(d.dtype))


class Head(nn.Module):
    def __init__(self, in_dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PairHead(Head):
    """Classifies an unordered atom pair from ``[h_i + h_j, h_i * h_j]``."""

    def __init__(self, node_dim: int, hidden: int, classes: int) -> None:
        super().__init__(2 * node_dim, hidden, classes)

    def forward(self, node: Tensor, pairs: Tensor) -> Tensor:
        hi, hj = node[pairs[0]], node[pairs[1]]  # [P, D] each
        return self.net(torch.cat([hi + hj, hi * hj], dim=-1))  # [P, C]


class PretrainingTasks(nn.Module):
    """Heads of the enabled tasks; ``forward`` returns a :class:`TaskPrediction` per task."""

    def __init__(self, cfg: TasksConfig, node_dim: int) -> None:
        super().__init__()
        self.tasks = cfg.tasks
        self.register_buffer("short_bins", torch.tensor(cfg.short_range_bins_A), persistent=False)
        self.register_buffer("long_bins", torch.tensor(cfg.long_range_bins_A), persistent=False)
        self.heads = nn.ModuleDict()
        if "mlm" in self.tasks:
            self.heads["mlm"] = Head(node_dim, cfg.head_hidden, NUM_ELEMENTS)
        if "short_range" in self.tasks:
            self.heads["short_range"] = PairHead(node_dim, cfg.head_hidden, len(cfg.short_range_bins_A) + 1)
        if "long_range" in self.tasks:
            self.heads["long_range"] = PairHead(node_dim, cfg.head_hidden, len(cfg.long_range_bins_A) + 1)

    def forward(self, node: Tensor, batch) -> dict[str, TaskPrediction]:
        out: dict[str, TaskPrediction] = {}
        if "mlm" in self.heads:
            idx = batch.mlm_mask.nonzero().squeeze(1)  # [T]
            out["mlm"] = TaskPrediction(self.heads["mlm"](node[idx]), batch.z[idx] - 1, batch.batch[idx])
        for task, pairs, bins in (
            ("short_range", batch.sr_index, self.short_bins),
            ("long_range", batch.lr_index, self.long_bins),
        ):
            if task in self.heads:
                out[task] = TaskPrediction(
                    self.heads[task](node, pairs), distance_bins(batch.pos, pairs, bins), batch.batch[pairs[0]]
                )
        return out
