"""The one config tree of a training run: data / model / tasks / optim / trainer / logging.

Loaded from YAML by :func:`load_config` through the strict loader of ``pipeline.strict_config``
(unknown keys fail with a did-you-mean, wrong types and out-of-range values fail with the value seen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import ModelConfig, OptimConfig, TasksConfig
from pipeline.config import DataConfig
from pipeline.strict_config import ConfigError, apply_overrides, build, load_yaml, to_dict

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp")


@dataclass(frozen=True)
class TrainerConfig:
    """Lightning Trainer and run bookkeeping."""

    max_steps: int = 1000
    """Optimiser steps of the run (the stream is infinite; this ends training)."""
    val_check_interval: int = 200
    """Run validation (and save the best checkpoint) every this many training batches."""
    checkpoint_every_n_steps: int = 100
    """Save run_dir/checkpoints/last.ckpt (model, optimiser, scheduler, data stream) every this many steps."""
    limit_val_batches: int | None = None
    """Cap on validation batches per evaluation (None = the whole val split, each sample once)."""
    accelerator: str = "auto"
    """cpu, gpu, or auto."""
    devices: int = 1
    """Devices (processes) per node."""
    num_nodes: int = 1
    """Nodes (torchrun / SLURM set the rest)."""
    strategy: str = "auto"
    """auto, ddp (one process per device, gloo on CPU, nccl on GPU), ddp_spawn, fsdp."""
    precision: str = "32-true"
    """32-true, bf16-mixed (autocast; works on CPU and GPU), 16-mixed, bf16-true."""
    gradient_clip_val: float = 1.0
    """Clip gradients to this global norm (0 = off)."""
    accumulate_grad_batches: int = 1
    """Batches per optimiser step."""
    log_every_n_steps: int = 10
    """Log training metrics every this many optimiser steps."""
    deterministic: bool = False
    """torch deterministic algorithms (slower; needed for bit-exact resume tests)."""
    num_threads: int = 0
    """torch intra-op threads per process (0 = leave torch's default)."""
    early_stopping_patience: int = 0
    """Stop when val/loss has not improved for this many validations (0 = off)."""
    run_dir: str = "runs/demo"
    """Folder for checkpoints, logs, the resolved config and plots."""
    test_after_fit: bool = True
    """Run the test split once after training, on the best checkpoint when there is one."""
    seed: int = 0
    """Seed of model initialisation and dropout (the loader has its own data.seed)."""
    progress_bar: bool = True
    """Show the progress bar (atoms/s included)."""

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps={self.max_steps}: must be >= 1")
        if self.val_check_interval < 1 or self.checkpoint_every_n_steps < 1:
            raise ValueError(f"trainer.val_check_interval={self.val_check_interval} and trainer.checkpoint_every_n_steps="
                             f"{self.checkpoint_every_n_steps}: must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r}: use one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy={self.strategy!r}: use one of {STRATEGIES}")
        if self.devices < 1 or self.num_nodes < 1 or self.accumulate_grad_batches < 1:
            raise ValueError("trainer.devices, trainer.num_nodes and trainer.accumulate_grad_batches must be >= 1")
        if self.num_threads < 0 or self.early_stopping_patience < 0 or self.gradient_clip_val < 0:
            raise ValueError("trainer.num_threads, early_stopping_patience and gradient_clip_val must be >= 0")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go."""

    csv: bool = True
    """Write metrics.csv under run_dir (default logger)."""
    tensorboard: bool = False
    """Also write TensorBoard event files under run_dir/tb."""
    wandb: bool = False
    """Also log to Weights & Biases (install the 'wandb' extra); credentials come from WANDB_API_KEY only."""
    wandb_project: str = "molstream"
    """W&B project name."""
    wandb_run_name: str | None = None
    """W&B run name (None = W&B picks one)."""
    wandb_mode: str = "offline"
    """online or offline (offline writes under run_dir/wandb and needs no network)."""
    batch_stats_every_n_steps: int = 10
    """Log batch statistics (domain shares, fill, atoms, oversize/bad counts, data wait) every this many steps."""
    loss_plot: bool = True
    """Write run_dir/loss.png from metrics.csv at the end of fit."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("online", "offline"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r}: use online or offline")
        if self.batch_stats_every_n_steps < 1:
            raise ValueError(f"logging.batch_stats_every_n_steps={self.batch_stats_every_n_steps}: must be >= 1")


@dataclass(frozen=True)
class Config:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    """Streaming loader (pipeline.config.DataConfig)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder and ESA backbone (model.config.ModelConfig)."""
    tasks: TasksConfig = field(default_factory=TasksConfig)
    """Pretraining tasks and their weights (model.config.TasksConfig)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and LR schedule (model.config.OptimConfig)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer and run bookkeeping."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Loggers and statistics."""


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key.sub=value`` overrides, and build the strict tree."""
    data = apply_overrides(load_yaml(path), list(overrides or []))
    try:
        return build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
