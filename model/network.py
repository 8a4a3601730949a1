"""The whole network: atom encoder -> ESA backbone -> task heads, on one collated batch.

Input: the PyG ``Batch`` of :mod:`pipeline.collate`. The encoder and backbone read its input fields
only (``z``, ``pos``, ``batch``, ``ptr``, ``edge_index``, ``bond_index``: masked atoms already hidden and
noised by the loader); the task heads read the target fields (``mlm_mask``/``mlm_target``,
``sr_index``/``sr_target``, ``lr_index``/``lr_target``), so a batch without them embeds fine with
``with_tasks=False``. Output: :class:`ModelOutput` with ``node_embeddings`` [N, D],
``graph_embeddings`` [G, Dg] and the task predictions; deterministic given a batch (dropout aside).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from model.attention import AttentionLayout, resolve_backend
from model.config import ModelConfig, TasksConfig
from model.encoder import AtomEncoder
from model.esa import ESA
from model.tasks import PretrainingTasks, TaskPrediction

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("z", "pos", "batch", "ptr", "edge_index", "bond_index")
"""Input fields the backbone needs (a subset of :data:`pipeline.collate.INPUT_FIELDS`)."""


@dataclass
class ModelOutput:
    node_embeddings: Tensor  # [N, D]
    graph_embeddings: Tensor  # [G, Dg]
    predictions: dict[str, TaskPrediction] = field(default_factory=dict)


def _check_batch(batch) -> None:
    missing = [f for f in REQUIRED_FIELDS if getattr(batch, f, None) is None]
    if missing:
        raise ValueError(f"batch lacks fields {missing}; build batches with pipeline.collate.collate")
    n = batch.z.shape[0]
    if batch.pos.shape != (n, 3) or batch.batch.shape != (n,):
        raise ValueError(
            f"batch shapes disagree: z {tuple(batch.z.shape)}, pos {tuple(batch.pos.shape)}, "
            f"batch {tuple(batch.batch.shape)}; expected [N], [N,3], [N]"
        )
    lr = getattr(batch, "lr_index", None)
    if lr is not None and lr.numel() and bool((batch.batch[lr[0]] != batch.batch[lr[1]]).any()):
        raise ValueError("batch.lr_index pairs atoms of different molecules; long-range pairs must stay within one")


class MolecularESA(nn.Module):
    """Encoder + ESA backbone + pretraining heads.

    Args:
        model: encoder/backbone hyper-parameters.
        tasks: enabled tasks and their bins; ``None`` builds the backbone only (embedding export).
    """

    def __init__(self, model: ModelConfig, tasks: TasksConfig | None = None) -> None:
        super().__init__()
        self.cfg = model
        self.encoder = AtomEncoder(model, model.block_dims[0])
        self.backbone = ESA(model)
        self.tasks = (
            PretrainingTasks(tasks, self.backbone.node_dim, self.backbone.graph_dim) if tasks is not None else None
        )
        self._backend_logged: str | None = None

    @property
    def node_dim(self) -> int:
        return self.backbone.node_dim

    @property
    def graph_dim(self) -> int:
        return self.backbone.graph_dim

    def backend_for(self, device: torch.device) -> str:
        backend = resolve_backend(self.cfg.backend, device)
        if backend != self._backend_logged:
            log.info("attention backend: %s (model.backend=%s, device %s)", backend, self.cfg.backend, device)
            self._backend_logged = backend
        return backend

    def forward(self, batch, backend: str | None = None, with_tasks: bool = True) -> ModelOutput:
        """Embed a batch and, when tasks are configured and ``with_tasks``, predict the task targets.

        ``backend`` overrides ``model.backend`` for this call (tests compare backends with it).
        """
        _check_batch(batch)
        backend = resolve_backend(backend, batch.z.device) if backend else self.backend_for(batch.z.device)
        layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
        x, edge_feats = self.encoder(batch.z, batch.pos, batch.edge_index, batch.bond_index)  # [N, D], [E, K] or None
        node, graph = self.backbone(x, layout, backend, edge_feats)
        preds = self.tasks(node, graph, batch) if (with_tasks and self.tasks is not None) else {}
        return ModelOutput(node_embeddings=node, graph_embeddings=graph, predictions=preds)
