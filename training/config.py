"""The one config tree of a training run: data / model / tasks / optim / trainer / logging.

Loaded from YAML by :func:`load_config` through the strict loader of ``pipeline.strict_config``
(unknown keys fail with a did-you-mean, wrong types and out-of-range values fail with the value seen).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import ModelConfig, OptimConfig, TasksConfig
from pipeline.config import DataConfig
from pipeline.paths import resolve_data_paths
from pipeline.paths import resolve_paths as resolve_paths_at
from pipeline.strict_config import ConfigError, apply_overrides, build, load_yaml, shown_override, to_dict

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
    devices: int | str = 1
    """Devices (processes) per node: a count >= 1, -1 (all visible devices) or auto (as Lightning)."""
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
        if self.devices != "auto" and (isinstance(self.devices, str) or (self.devices < 1 and self.devices != -1)):
            raise ValueError(f"trainer.devices={self.devices!r}: use a count >= 1, -1 (all devices) or auto")
        if self.num_nodes < 1 or self.accumulate_grad_batches < 1:
            raise ValueError("trainer.num_nodes and trainer.accumulate_grad_batches must be >= 1")
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


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "_configs"
"""The shipped YAMLs in a wheel (package data mapped from the source tree's configs/ in pyproject.toml)."""
if not SHIPPED_CONFIGS.is_dir():
    SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_config(name: str) -> Path | None:
    """The shipped config called ``name`` (``demo`` or ``demo.yaml``), or None."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if not stem or "/" in stem or os.sep in stem:
        return None
    path = SHIPPED_CONFIGS / f"{stem}.yaml"
    return path if path.is_file() else None


def shipped_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_paths(doc: dict, base: Path) -> dict[str, tuple[str, str]]:
    """Relative local paths of a whole config (data section and trainer.run_dir) made absolute against ``base``."""
    seen = resolve_data_paths(doc["data"], base) if isinstance(doc.get("data"), dict) else {}
    seen.update(resolve_paths_at(doc, base, (("trainer", "run_dir"),)))
    return seen


@dataclass(frozen=True)
class Loaded:
    """A config plus where its paths came from."""

    config: Config
    """The strict tree."""
    source: str
    """The YAML file read (as given on the command line, or the shipped config's name)."""
    base: Path
    """The folder its relative paths were resolved against."""
    paths: dict[str, tuple[str, str]]
    """Dotted key -> (as written, as resolved) for every path field that was resolved."""
    shipped: bool = False
    """True when ``source`` named a shipped config (resolved as if it were ./configs/NAME.yaml)."""

    def describe(self, dotted: str) -> str:
        """``'data/demo/shards' (in configs/demo.yaml, resolved against its folder to /abs/...)``."""
        written, resolved = self.paths.get(dotted, (None, None))
        if written is None or written == resolved:
            return repr(getattr_dotted(self.config, dotted))
        return f"{written!r} (in {self.source}, resolved against {self.base} to {resolved})"


def getattr_dotted(obj, dotted: str):
    for part in dotted.split("."):
        if "[" in part:
            name, idx = part[:-1].split("[")
            obj = getattr(obj, name)[int(idx)]
        else:
            obj = getattr(obj, part)
    return obj


def load(source: str | Path, overrides: list[str] | None = None, base: Path | None = None) -> Loaded:
    """Read a YAML config, resolve its relative paths, apply ``key.sub=value`` overrides, build the strict tree.

    ``source`` is a YAML file or the name of a shipped config (``demo``). Relative paths written in a YAML file
    resolve against the file's folder; a shipped config chosen by name resolves as if it were
    ``./configs/NAME.yaml`` (so its runs and shards land under the current directory); relative paths in
    overrides resolve against the current directory. Errors name the file or the override to blame.
    """
    overrides = list(overrides or [])
    path = Path(source)
    shipped = False
    if not path.is_file():
        shipped = shipped_config(str(source))
        if shipped is None:
            names = ", ".join(shipped_names())
            raise ConfigError(f"config {str(source)!r}: no such file (resolved to {path.absolute()}), and not the name of "
                              f"a shipped config ({names})")
        path, base, shipped = shipped, base or Path.cwd() / "configs", True
    base = (base or path.absolute().parent)
    doc = load_yaml(path)
    paths = resolve_paths(doc, base)
    try:
        build(Config, doc)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for i, item in enumerate(overrides):  # blame the first override that breaks a valid file
        try:
            build(Config, apply_overrides(_copy(doc), overrides[: i + 1]))
        except ConfigError as e:
            raise ConfigError(f"command-line override {shown_override(item)!r}: {e}") from None
    cfg = build(Config, apply_overrides(doc, overrides))
    for dotted in list(paths):
        if any(o.split("=", 1)[0].strip() == dotted for o in overrides):
            paths.pop(dotted)  # the command line replaced it: relative to the current directory
    return Loaded(cfg, str(source), base, paths, shipped)


def _copy(doc):
    return yaml.safe_load(yaml.safe_dump(doc))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The strict tree of a YAML config (see :func:`load`) with ``key.sub=value`` overrides applied."""
    return load(path, overrides).config


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def hparams(cfg: Config) -> dict:
    """The whole resolved config as plain YAML-safe types (lists, not tuples) for the loggers."""
    return to_dict(cfg)
