"""The config tree of a fine-tuning run: data / labels / split / backbone / model / head / optim / trainer / logging.

Built by the same strict loader as the pretraining tree (``pipeline.strict_config``): unknown keys fail
with a did-you-mean, wrong types and bad values fail with the value seen. ``trainer`` and ``logging`` are
the pretraining run's sections (``training.config``), so checkpoints, loggers and early stopping read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import ModelConfig
from pipeline.paths import resolve_data_paths, resolve_paths
from pipeline.strict_config import ConfigError, apply_overrides, build, load_yaml, to_dict
from training.config import LoggingConfig, TrainerConfig

TASKS = ("regression", "classification")
JOINS = ("key", "source_record")
SPLIT_METHODS = ("shards", "random", "scaffold")
INITS = ("checkpoint", "random")
LOSSES = ("mse", "l1")
UNMATCHED = ("raise", "warn")


@dataclass(frozen=True)
class FinetuneDataConfig:
    """Which shards hold the labelled molecules, and how batches are made of them."""

    root: str = "data/demo/shards"
    """Shards root written by ``python -m shards_tools.convert`` (folder or URL) with manifest.json."""
    domains: tuple[str, ...] = ()
    """Domains whose samples the labels may name; empty = every domain of the manifest."""
    max_atoms: int = 4000
    """Atom budget per batch, atoms; a labelled molecule larger than this is an error (no cropping: it would change the label's molecule)."""
    max_graphs: int | None = 128
    """Cap on molecules per batch, graphs (None = atom budget only)."""
    radius_A: float = 5.0
    """Radius-graph cutoff, Å; must not exceed the converter's --radius (and must match pretraining)."""
    max_neighbors: int = 64
    """Radius neighbours kept per atom; must not exceed the converter's --max-neighbors."""
    seed: int = 0
    """Seed of the per-epoch shuffle of the training molecules."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        if self.max_atoms < 1 or (self.max_graphs is not None and self.max_graphs < 1):
            raise ValueError(f"data.max_atoms={self.max_atoms}, data.max_graphs={self.max_graphs}: must be >= 1")
        if self.radius_A <= 0 or self.max_neighbors < 1:
            raise ValueError(f"data.radius_A={self.radius_A} must be > 0 and data.max_neighbors={self.max_neighbors} >= 1")


@dataclass(frozen=True)
class LabelsConfig:
    """The label table and how its rows find their shard samples."""

    path: str = ""
    """CSV or Parquet file of labels (.csv, .tsv, .parquet), one row per molecule."""
    targets: tuple[str, ...] = ()
    """Columns to predict (one or several); empty cells / NaN are missing labels, masked out of loss and metrics."""
    task: str = "regression"
    """regression (MAE, RMSE, R² per target) or classification (binary 0/1 labels: accuracy, ROC-AUC per target)."""
    join: str = "key"
    """key: a column holds the shard sample key; source_record: the input file (relative to the converter's RAW) + record number."""
    key_column: str = "key"
    """join=key: column with the sample keys of the index."""
    source_column: str | None = None
    """join=source_record: column with the source file (relative to RAW, e.g. small_molecule/qm9_sample.xyz)."""
    source: str | None = None
    """join=source_record without source_column: the one source file every row comes from."""
    record_column: str | None = None
    """join=source_record: column with the 0-based record number inside the file; None = the row's position in the table."""
    unmatched: str = "raise"
    """Label rows with no shard sample: raise (an error listing the count and the first few) or warn (log them, write run_dir/unmatched_labels.csv, go on)."""
    normalize: bool = True
    """Regression: train on (y - mean) / std per target (train-split statistics); metrics are in the label's units."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if not self.path:
            raise ValueError("labels.path is empty: give the CSV/Parquet file of labels")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"labels.targets={list(self.targets)!r}: give one or more distinct column names")
        if self.task not in TASKS:
            raise ValueError(f"labels.task={self.task!r}: use one of {TASKS}")
        if self.join not in JOINS:
            raise ValueError(f"labels.join={self.join!r}: use one of {JOINS}")
        if self.join == "source_record" and (self.source_column is None) == (self.source is None):
            raise ValueError("labels.join=source_record: set exactly one of labels.source_column (per row) or labels.source (one file)")
        if self.unmatched not in UNMATCHED:
            raise ValueError(f"labels.unmatched={self.unmatched!r}: use one of {UNMATCHED}")


@dataclass(frozen=True)
class SplitConfig:
    """Train / val / test assignment of the labelled molecules."""

    method: str = "random"
    """shards (the converter's val/test splits), random (seeded, on the label table) or scaffold (Bemis-Murcko ring frameworks kept within one split)."""
    val_fraction: float = 0.1
    """random/scaffold: share of the labelled molecules in val."""
    test_fraction: float = 0.1
    """random/scaffold: share of the labelled molecules in test."""
    seed: int = 0
    """random/scaffold: seed of the split (the same seed gives the same split for the same label table)."""

    def __post_init__(self) -> None:
        if self.method not in SPLIT_METHODS:
            raise ValueError(f"split.method={self.method!r}: use one of {SPLIT_METHODS}")
        if not (0 < self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"split.val_fraction={self.val_fraction} must be > 0, test_fraction={self.test_fraction} >= 0, sum < 1")


@dataclass(frozen=True)
class BackboneConfig:
    """Where the encoder + ESA backbone come from and how it trains."""

    init: str = "checkpoint"
    """checkpoint: pretrained weights from ``checkpoint``; random: fresh weights (the architecture of ``checkpoint`` when given, else the model section)."""
    checkpoint: str | None = None
    """A training.run .ckpt, or an exported backbone (folder or .safetensors; model.pretrained)."""
    freeze: bool = False
    """Keep the backbone fixed (eval mode, no gradients); only the head trains."""
    lr_ratio: float = 0.1
    """Backbone learning rate = optim.lr * lr_ratio (1 = same as the head)."""

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"backbone.init={self.init!r}: use one of {INITS}")
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("backbone.init=checkpoint needs backbone.checkpoint (a .ckpt or exported backbone); "
                             "or set backbone.init=random")
        if not self.lr_ratio > 0:
            raise ValueError(f"backbone.lr_ratio={self.lr_ratio}: must be > 0 (use backbone.freeze=true to fix it)")


@dataclass(frozen=True)
class HeadConfig:
    """The prediction head on the molecule embedding."""

    hidden: int = 128
    """Hidden width of the head MLP (features)."""
    layers: int = 2
    """Linear layers of the head (1 = linear read-out)."""
    dropout: float = 0.0
    """Dropout between the head's layers (probability)."""
    use_node_embeddings: bool = False
    """Also feed the mean and max of the node embeddings (concatenated to the graph embedding)."""
    loss: str = "mse"
    """Regression loss on normalised targets: mse or l1 (classification: binary cross-entropy)."""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.layers < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"head.hidden={self.hidden}, head.layers={self.layers} must be >= 1, head.dropout in [0, 1)")
        if self.loss not in LOSSES:
            raise ValueError(f"head.loss={self.loss!r}: use one of {LOSSES}")


@dataclass(frozen=True)
class FinetuneOptimConfig:
    """torch AdamW with linear warm-up and cosine decay (per-group learning rates: head, backbone)."""

    lr: float = 1e-3
    """Peak learning rate of the head (after warm-up)."""
    weight_decay: float = 0.01
    """Decoupled weight decay of linear-layer matrices."""
    warmup_fraction: float = 0.05
    """Fraction of trainer.max_steps spent in linear warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at trainer.max_steps."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim: lr={self.lr} > 0, weight_decay={self.weight_decay} >= 0, warmup_fraction="
                             f"{self.warmup_fraction} in [0, 1), min_lr_ratio={self.min_lr_ratio} in [0, 1]")


@dataclass(frozen=True)
class FinetuneConfig:
    """A whole fine-tuning run."""

    labels: LabelsConfig
    """Label table and join (required)."""
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    """Shards and batching of the labelled molecules."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Train / val / test assignment."""
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(init="random"))
    """Pretrained or random backbone, freezing, learning-rate ratio."""
    model: ModelConfig | None = None
    """Architecture for backbone.init=random without a checkpoint (a checkpoint fixes its own architecture)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Prediction head."""
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    """Optimiser and schedule."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(run_dir="runs/finetune"))
    """Lightning Trainer and run bookkeeping (training.config.TrainerConfig; early stopping on val/loss)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Loggers (training.config.LoggingConfig)."""

    def __post_init__(self) -> None:
        if self.model is not None and self.backbone.checkpoint:
            raise ValueError("model: the architecture comes from backbone.checkpoint; drop the model section "
                             "(or drop backbone.checkpoint to build a random backbone from it)")


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a fine-tuning YAML, apply ``key.sub=value`` overrides, and build the strict tree."""
    doc = load_yaml(path)
    # relative local paths written in the YAML resolve against its folder (the rule of training.run); overrides
    # given on the command line resolve against the current directory
    resolve_data_paths(doc["data"], Path(path).absolute().parent) if isinstance(doc.get("data"), dict) else None
    resolve_paths(doc, Path(path).absolute().parent, (("labels", "path"), ("backbone", "checkpoint"), ("trainer", "run_dir")))
    data = apply_overrides(doc, list(overrides or []))
    try:
        return build(FinetuneConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_finetune_config(cfg: FinetuneConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
