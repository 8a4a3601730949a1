"""``python -m training.run CONFIG.yaml [key.sub=value ...] [--resume PATH|last]``: one pretraining run.

Wires parts, nothing else: config → seeds/threads → data → model → callbacks/loggers → fit → test.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from model.lightning_module import PretrainingModule
from pipeline.datamodule import ShardDataModule
from pipeline.demo import ensure_demo_shards
from pipeline.strict_config import ConfigError
from training.callbacks import BatchStatistics, LossPlot
from training.config import Config, dump_config, load_config

log = logging.getLogger("training.run")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of any config field, e.g. trainer.max_steps=50")
    p.add_argument("--resume", metavar="PATH|last",
                   help="continue model, optimiser, scheduler and data stream from a checkpoint ('last' = run_dir/checkpoints/last.ckpt)")
    return p.parse_args(argv)


def build_loggers(cfg: Config, run_dir: Path) -> list:
    loggers = []
    if cfg.logging.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="logs"))
    if cfg.logging.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tb", version=""))
    if cfg.logging.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                                   save_dir=str(run_dir), offline=cfg.logging.wandb_mode == "offline"))
    return loggers


def build_callbacks(cfg: Config, run_dir: Path, domains: list[str]) -> list:
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        # first: trainer.checkpoint_callback, the best model after each validation
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1),
        # last.ckpt for --resume, on its own cadence
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps),
        BatchStatistics(domains, cfg.data.max_atoms, cfg.logging.batch_stats_every_n_steps),
    ]
    if cfg.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=cfg.trainer.early_stopping_patience))
    if cfg.logging.loss_plot and cfg.logging.csv:
        callbacks.append(LossPlot(run_dir / "logs" / "metrics.csv", run_dir / "loss.png"))
    return callbacks


def resolve_resume(arg: str | None, run_dir: Path) -> str | None:
    if arg is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if arg == "last" else Path(arg)
    if not path.exists():
        raise SystemExit(f"error: --resume {arg}: no checkpoint at {path}; run without --resume to start fresh")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    resume = resolve_resume(a.resume, run_dir)

    L.seed_everything(cfg.trainer.seed, workers=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    for root in {cfg.data.root, *(d.root for d in cfg.data.domains if d.root)}:
        ensure_demo_shards(root)

    data = ShardDataModule(cfg.data)
    data.setup()
    domains = data.resolved.names
    model = PretrainingModule(cfg.model, cfg.tasks, cfg.optim, domains=domains)
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.trainer.limit_val_batches,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        enable_progress_bar=cfg.trainer.progress_bar,
        logger=build_loggers(cfg, run_dir) or False,
        callbacks=build_callbacks(cfg, run_dir, domains),
        use_distributed_sampler=False,  # the stream shards work across ranks itself
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    if cfg.trainer.test_after_fit:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=data, ckpt_path=best or None)
    if trainer.is_global_zero:
        ckpt = run_dir / "checkpoints"
        lines = [f"checkpoints: {ckpt} (last.ckpt, best-*.ckpt)", f"config: {run_dir / 'config.yaml'}"]
        if cfg.logging.csv:
            lines.append(f"metrics: {run_dir / 'logs' / 'metrics.csv'}")
        if (run_dir / "loss.png").exists():
            lines.append(f"loss curve: {run_dir / 'loss.png'}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
