"""Hyper-parameters of the model, its pretraining tasks and its optimiser: three frozen dataclasses.

The training config tree nests these as they are; every field carries a one-line docstring with
its unit. Validation happens in ``__post_init__`` so a bad YAML value fails at load time, naming
the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_TYPES = ("M", "S", "P")
BACKENDS = ("auto", "dense", "sparse", "flash")
TASKS = ("long_range", "short_range", "mlm")
OPTIMIZERS = ("auto", "adamw8bit", "adamw")


def _as_tuple(value, name: str, typ) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list, got {value!r}")
    out = tuple(typ(v) for v in value)
    return out


@dataclass(frozen=True)
class ModelConfig:
    """Encoder and ESA backbone."""

    layers: str = "M S M S M S P"
    """Block string: M = attention over graph neighbours + self, S = full attention within a molecule, P = pooling (last)."""
    dim: int = 256
    """Width of the atom embeddings and of every block (features)."""
    num_heads: int = 16
    """Attention heads of every block (must divide the block's width)."""
    layer_dims: tuple[int, ...] = ()
    """Optional per-block widths, one per letter of ``layers``; empty = ``dim`` everywhere."""
    layer_heads: tuple[int, ...] = ()
    """Optional per-block head counts, one per letter of ``layers``; empty = ``num_heads`` everywhere."""
    mlp_hidden: int = 512
    """Hidden width of the MLP after each attention (features)."""
    dropout: float = 0.0
    """Dropout on the attention and MLP outputs before the residual add (probability)."""
    attn_dropout: float = 0.0
    """Dropout on attention probabilities (probability)."""
    num_seeds: int = 32
    """Learned seed vectors of the pooling (P) block; their outputs are averaged to one graph embedding."""
    num_gaussians: int = 128
    """Gaussian basis functions over neighbour distances (count)."""
    cutoff_A: float = 6.0
    """Neighbour cutoff of the geometric features in Å (only radius-graph edges are seen, so min(this, loader radius))."""
    close_cutoff_A: float = 3.0
    """Radius of the 'close neighbour' count and mean distance in Å."""
    rwpe_steps: int = 0
    """Random-walk positional encoding on the covalent-bond graph: number of steps (0 = off)."""
    distance_bias: bool = False
    """M blocks add a learned per-head logit bias from each edge's Gaussian distance features (Uni-Mol / Graphormer-3D)."""
    backend: str = "auto"
    """Attention backend: auto (flash on CUDA when flash-attn is installed, else sparse), dense (reference), sparse, flash."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_dims", _as_tuple(self.layer_dims, "model.layer_dims", int))
        object.__setattr__(self, "layer_heads", _as_tuple(self.layer_heads, "model.layer_heads", int))
        letters = self.layer_letters
        bad = [c for c in letters if c not in LAYER_TYPES]
        if not letters or bad:
            raise ValueError(
                f"model.layers={self.layers!r}: use space-separated letters from {LAYER_TYPES}, e.g. 'M S M S P'"
            )
        if "P" in letters[:-1]:
            raise ValueError(f"model.layers={self.layers!r}: P (pooling) may only be the last block")
        if letters[0] == "P":
            raise ValueError(f"model.layers={self.layers!r}: needs at least one M or S block before P")
        for name in ("layer_dims", "layer_heads"):
            v = getattr(self, name)
            if v and len(v) != len(letters):
                raise ValueError(
                    f"model.{name} has {len(v)} entries but model.layers has {len(letters)} blocks; "
                    "give one per block or leave it empty"
                )
        for i, (d, h) in enumerate(zip(self.block_dims, self.block_heads, strict=True)):
            if d <= 0 or h <= 0 or d % h:
                raise ValueError(f"block {i} ({letters[i]}): width {d} must be a positive multiple of heads {h}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend={self.backend!r}: choose one of {BACKENDS}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout}, model.attn_dropout={self.attn_dropout}: must be in [0, 1)")
        if self.num_seeds < 1 or self.num_gaussians < 1 or self.mlp_hidden < 1:
            raise ValueError("model.num_seeds, model.num_gaussians and model.mlp_hidden must be >= 1")
        if not 0 < self.close_cutoff_A <= self.cutoff_A:
            raise ValueError(
                f"model.close_cutoff_A={self.close_cutoff_A} must be > 0 and <= model.cutoff_A={self.cutoff_A}"
            )
        if self.rwpe_steps < 0:
            raise ValueError(f"model.rwpe_steps={self.rwpe_steps} must be >= 0 (0 turns it off)")

    @property
    def layer_letters(self) -> list[str]:
        return self.layers.split()

    @property
    def block_dims(self) -> tuple[int, ...]:
        return self.layer_dims or (self.dim,) * len(self.layer_letters)

    @property
    def block_heads(self) -> tuple[int, ...]:
        return self.layer_heads or (self.num_heads,) * len(self.layer_letters)


@dataclass(frozen=True)
class TasksConfig:
    """Pretraining tasks, their weights and distance bins."""

    tasks: tuple[str, ...] = ("long_range", "short_range", "mlm")
    """Enabled tasks, any of long_range, short_range, mlm."""
    long_range_weight: float = 1.5
    """Weight of the long-range distance-bin loss in the total loss."""
    short_range_weight: float = 1.0
    """Weight of the short-range (held-out edge) distance-bin loss in the total loss."""
    mlm_weight: float = 0.3
    """Weight of the masked-atom (element) loss in the total loss."""
    short_range_bins_A: tuple[float, ...] = (0.8, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5)
    """Bin boundaries of the short-range task in Å (classes = boundaries + 1)."""
    long_range_bins_A: tuple[float, ...] = (5.0, 6.2, 7.6, 9.4, 11.7, 14.4, 17.9, 22.1, 27.3, 33.8, 41.8, 51.7, 64.0)
    """Bin boundaries of the long-range task in Å (classes = boundaries + 1); log-spaced from the radius cutoff
    (long-range pairs are never input edges) to 64 Å, matching the loader's ``lr_strata_A``."""
    graph_context: bool = True
    """Every head also reads its molecule's pooled graph embedding, so the pooling (P) block trains with the tasks
    (false: P gets no gradient and its graph embeddings stay random)."""
    head_hidden: int = 256
    """Hidden width of every task head's MLP (features)."""
    per_domain_every_n_steps: int = 10
    """Log per-domain training losses/accuracies every this many optimiser steps (validation: always)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", _as_tuple(self.tasks, "tasks.tasks", str))
        object.__setattr__(self, "short_range_bins_A", _as_tuple(self.short_range_bins_A, "tasks.short_range_bins_A", float))
        object.__setattr__(self, "long_range_bins_A", _as_tuple(self.long_range_bins_A, "tasks.long_range_bins_A", float))
        bad = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or bad or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks.tasks={list(self.tasks)!r}: give distinct names from {TASKS}")
        for name in ("short_range_bins_A", "long_range_bins_A"):
            b = getattr(self, name)
            if not b or any(x >= y for x, y in zip(b, b[1:], strict=False)) or b[0] <= 0:
                raise ValueError(f"tasks.{name}={list(b)!r}: boundaries must be positive and strictly increasing")
        for t in self.tasks:
            if self.weight(t) < 0:
                raise ValueError(f"tasks.{t}_weight={self.weight(t)} must be >= 0")
        if self.head_hidden < 1 or self.per_domain_every_n_steps < 1:
            raise ValueError("tasks.head_hidden and tasks.per_domain_every_n_steps must be >= 1")

    def weight(self, task: str) -> float:
        return float(getattr(self, f"{task}_weight"))


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: str = "auto"
    """auto (bitsandbytes AdamW8bit when it works, else torch AdamW), adamw8bit (required), or adamw."""
    lr: float = 3e-4
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.01
    """Decoupled weight decay of AdamW (not applied to biases, norms and embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_fraction: float = 0.1
    """Fraction of the total steps spent in linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = 0.1
    """The cosine decays from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    total_steps: int = 0
    """Optimiser steps of the schedule; 0 = take ``Trainer(max_steps=...)``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", _as_tuple(self.betas, "optim.betas", float))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer={self.optimizer!r}: choose one of {OPTIMIZERS}")
        if self.lr <= 0 or self.weight_decay < 0 or self.eps <= 0 or len(self.betas) != 2:
            raise ValueError(
                f"optim: lr={self.lr} must be > 0, weight_decay={self.weight_decay} >= 0, eps={self.eps} > 0, "
                f"betas={self.betas} two numbers"
            )
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_ratio <= 1 or self.total_steps < 0:
            raise ValueError(
                f"optim: warmup_fraction={self.warmup_fraction} must be in [0, 1), "
                f"min_lr_ratio={self.min_lr_ratio} in [0, 1], total_steps={self.total_steps} >= 0"
            )
