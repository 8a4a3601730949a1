"""``python -m training.run CONFIG [key.sub=value ...] [--resume PATH|last] [--overwrite]``: one pretraining run.

Wires parts, nothing else: config → seeds/threads → data → model → callbacks/loggers → fit → test.
CONFIG is a YAML file (its relative paths resolve against its folder) or the name of a shipped config
(``demo``, ``multidomain``, ``s3``; ``--demo`` = ``demo``), read as if it were ``./configs/NAME.yaml``, so
its shards and runs land under the current directory.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import shutil
import sys
from pathlib import Path

from pipeline.demo import DemoConversionError
from pipeline.strict_config import ConfigError
from training.config import Loaded, load, shipped_names

log = logging.getLogger("training.run")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the command line, the config or the files it names; reported as one line, exit 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0])
    p.add_argument("args", nargs="*", metavar="CONFIG [key.sub=value ...]",
                   help=f"a YAML config file or a shipped config's name ({', '.join(shipped_names())}), then "
                        "overrides of any config field, e.g. trainer.max_steps=50 (options may come anywhere)")
    p.add_argument("--demo", action="store_true",
                   help="run the shipped demo config (same as CONFIG=demo): shards and runs under the current directory")
    p.add_argument("--resume", metavar="PATH|last",
                   help="continue model, optimiser, scheduler and data stream from a checkpoint "
                        "('last' = run_dir/checkpoints/last.ckpt)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a run_dir that holds an earlier run (its checkpoints and logs are deleted); "
                        "without it such a run_dir is refused")
    a = p.parse_intermixed_args(argv)
    items = list(a.args)
    if a.demo:
        a.config = "demo"
    elif items and "=" not in items[0]:
        a.config = items.pop(0)
    else:
        p.error("give a config: a YAML file (e.g. configs/demo.yaml), a shipped config's name "
                f"({', '.join(shipped_names())}), or --demo")
    a.overrides = items
    return a


def _rank() -> int:
    """This process's global rank as the launchers set it (torchrun, SLURM, Lightning's own DDP launcher)."""
    import os

    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def check_shards(loaded: Loaded) -> None:
    """A local shards root without a manifest is a user error; name it as written and as resolved."""
    from pipeline import storage
    from pipeline.schema import MANIFEST_NAME

    cfg = loaded.config.data
    roots = {"data.root": cfg.root}
    roots.update({f"data.domains[{i}].root": d.root for i, d in enumerate(cfg.domains) if d.root})
    for dotted, root in roots.items():
        if storage.scheme_of(root) == "file" and not (Path(root).expanduser() / MANIFEST_NAME).exists():
            raise UserError(f"{dotted} {loaded.describe(dotted)} has no {MANIFEST_NAME}: convert shards there first "
                            f"(python -m shards_tools.convert RAW/ SHARDS/) or point {dotted} at converted shards")


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix a new run with an earlier one in the same run_dir (or clear it with --overwrite)."""
    used = [p for p in (run_dir / "checkpoints", run_dir / "logs", run_dir / "loss.png") if p.exists()]
    if resume or not used:
        return
    if not overwrite:
        raise UserError(f"trainer.run_dir {run_dir} holds an earlier run ({', '.join(p.name for p in used)}): "
                        "continue it with --resume last, start over with --overwrite, or set trainer.run_dir=NEW_DIR")
    for p in used:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def resolve_resume(arg: str | None, run_dir: Path) -> str | None:
    if arg is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if arg == "last" else Path(arg)
    if not path.exists():
        raise UserError(f"--resume {arg}: no checkpoint at {path}; run without --resume to start fresh")
    return str(path)


def build_loggers(cfg, run_dir: Path, resume_step: int | None) -> list:
    from lightning.pytorch.loggers import CSVLogger

    from training.callbacks import continue_metrics_csv

    loggers = []
    if cfg.logging.csv:
        csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="logs")
        if _rank() == 0:  # the other ranks' CSVLogger writes nothing
            continue_metrics_csv(csv_logger, resume_step)
        loggers.append(csv_logger)
    if cfg.logging.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tb", version=""))
    if cfg.logging.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                                   save_dir=str(run_dir), offline=cfg.logging.wandb_mode == "offline"))
    return loggers


def build_callbacks(cfg, run_dir: Path, domains: list[str]) -> list:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from training.callbacks import BatchStatistics, LossPlot

    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        # first: trainer.checkpoint_callback, the best model after each validation; it also refreshes last.ckpt
        # then, so last.ckpt is always the newest state and never names a best file deleted later
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1,
                        save_last=True, enable_version_counter=False),
        # last.ckpt for --resume, on its own cadence
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, enable_version_counter=False,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps),
        BatchStatistics(domains, cfg.data.max_atoms, cfg.logging.batch_stats_every_n_steps),
    ]
    if cfg.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=cfg.trainer.early_stopping_patience))
    if cfg.logging.loss_plot and cfg.logging.csv:
        callbacks.append(LossPlot(run_dir / "logs" / "metrics.csv", run_dir / "loss.png"))
    return callbacks


def warn_bf16_on_cpu(cfg) -> None:
    import torch

    t = cfg.trainer
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if t.precision.startswith("bf16") and on_cpu:
        log.warning("trainer.precision=%s on a CPU: bf16 autocast is several times slower than 32-true there "
                    "(about 6.5x on the demo); set trainer.precision=32-true for CPU runs", t.precision)


def prune_best_checkpoints(ckpt_dir: Path, keep: str) -> None:
    """Delete best-*.ckpt other than ``keep`` (left by an interrupted run whose resume point predates them)."""
    for p in ckpt_dir.glob("best-*.ckpt"):
        if not keep or p.resolve() != Path(keep).resolve():
            p.unlink(missing_ok=True)


def train(loaded: Loaded, resume_arg: str | None, overwrite: bool) -> int:
    cfg = loaded.config
    run_dir = Path(cfg.trainer.run_dir)
    rank = _rank()
    resume = resolve_resume(resume_arg, run_dir)
    if rank == 0:
        prepare_run_dir(run_dir, resume, overwrite)

    import lightning as L
    import torch

    from model.lightning_module import PretrainingModule
    from pipeline import storage
    from pipeline.datamodule import ShardDataModule
    from pipeline.demo import DEMO_SHARDS, ensure_demo_shards
    from training.config import dump_config, hparams
    demo_targets = [DEMO_SHARDS] + ([loaded.base.parent / "data" / "demo" / "shards"] if loaded.shipped else [])
    for root in {cfg.data.root, *(d.root for d in cfg.data.domains if d.root)}:
        any(ensure_demo_shards(root, demo_shards=t) for t in demo_targets)  # converts once, other ranks wait
    check_shards(loaded)

    L.seed_everything(cfg.trainer.seed, workers=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    warn_bf16_on_cpu(cfg)
    data = ShardDataModule(cfg.data)
    try:
        data.setup()
    except (storage.StorageError, FileNotFoundError) as e:
        raise UserError(f"data.root {loaded.describe('data.root')}: {e}") from None
    resume_step = None
    if resume:
        resume_step = int(torch.load(resume, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    domains = data.resolved.names
    model = PretrainingModule(cfg.model, cfg.tasks, cfg.optim, domains=domains)
    model._log_hyperparams = False  # the loggers get the whole resolved config below, not just the model's part
    loggers = build_loggers(cfg, run_dir, resume_step)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
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
            logger=loggers or False,
            callbacks=build_callbacks(cfg, run_dir, domains),
            use_distributed_sampler=False,  # the stream shards work across ranks itself
            num_sanity_val_steps=0,
        )
    except (MisconfigurationException, TypeError, ValueError) as e:  # Lightning refusing a trainer.* combination,
        # e.g. trainer.devices=-1 with trainer.accelerator=cpu
        raise UserError(f"trainer: {e}") from None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    for lg in loggers:  # each logger writes on rank zero only
        lg.log_hyperparams(hparams(cfg))
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    best = best if best and Path(best).exists() else ""
    if cfg.trainer.test_after_fit:
        trainer.test(model, datamodule=data, ckpt_path=best or None)
    if trainer.is_global_zero:
        ckpt = run_dir / "checkpoints"
        prune_best_checkpoints(ckpt, best)
        lines = [f"checkpoints: {ckpt} (last.ckpt{', ' + Path(best).name if best else ''})",
                 f"config: {run_dir / 'config.yaml'}"]
        if cfg.logging.csv:
            lines.append(f"metrics: {run_dir / 'logs' / 'metrics.csv'}")
        if (run_dir / "loss.png").exists():
            lines.append(f"loss curve: {run_dir / 'loss.png'}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to the process's real stderr (fd 2): how to see where a DDP
    run hangs. Written to ``sys.__stderr__``, not ``sys.stderr``, which may be a capture object without a file
    descriptor (pytest, notebooks); where there is none at all, nothing is registered."""
    if not hasattr(faulthandler, "register") or sys.__stderr__ is None:
        return
    import signal

    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (OSError, ValueError):  # stderr closed or without a descriptor (io.UnsupportedOperation is an OSError)
        pass


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    _stacks_on_sigusr1()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load(a.config, a.overrides)
        return train(loaded, a.resume, a.overwrite)
    except (ConfigError, UserError) as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USER_ERROR
    except DemoConversionError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
