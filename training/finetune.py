"""``python -m training.finetune CONFIG.yaml [key.sub=value ...] [--resume PATH|last]``: fine-tune on labels.

Wires parts: config → labels joined to shard samples → backbone (pretrained or random) + head → Lightning
fit (best/last checkpoints, early stopping on val/loss, loggers) → metrics of the best checkpoint on val and
test next to the mean predictor's → run_dir/metrics.json (also printed), run_dir/predictions.parquet and,
for regression, run_dir/parity.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("training.finetune")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="fine-tuning YAML (see configs/finetune_qm9.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. trainer.max_steps=200 backbone.freeze=true")
    p.add_argument("--resume", metavar="PATH|last",
                   help="continue model, optimiser, schedule and batch position from a checkpoint ('last' = run_dir/checkpoints/last.ckpt)")
    return p.parse_args(argv)


def build_callbacks(cfg, run_dir: Path) -> list:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1),
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=cfg.trainer.checkpoint_every_n_steps),
    ]
    if cfg.trainer.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=cfg.trainer.early_stopping_patience))
    return callbacks


def build_backbone(cfg):
    """(ModelConfig, pretrained backbone tensors or None) for the configured init."""
    from model.config import ModelConfig
    from model.pretrained import read_pretrained

    if cfg.backbone.checkpoint:
        try:
            model_cfg, state = read_pretrained(cfg.backbone.checkpoint)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"backbone.checkpoint: {e}; pretrain first (python -m training.run configs/demo.yaml "
                                    "writes runs/demo/checkpoints/last.ckpt), or train from scratch with "
                                    "backbone.init=random backbone.checkpoint=null") from None
        return model_cfg, (state if cfg.backbone.init == "checkpoint" else None)
    return cfg.model or ModelConfig(), None


def evaluate(module, ls, split: str, cfg) -> tuple[dict, dict]:
    """(metrics per target, predictions as columns) of ``module`` on one split, without Lightning."""
    import numpy as np
    import torch

    from model.metrics import classification_metrics, mean_predictor_mae, regression_metrics
    from training.finetune_data import EvalBatches

    module.eval()
    preds, rows = [], []
    with torch.no_grad():
        for batch in EvalBatches(ls, split, cfg):
            preds.append(module(batch.to(module.device)).float().cpu().numpy())
            rows.append(batch.label_row.numpy())
    t = len(cfg.labels.targets)
    pred = np.concatenate(preds) if preds else np.zeros((0, t))
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    pos = {r: i for i, r in enumerate(ls.joined.label_row.tolist())}
    true = ls.joined.y[[pos[r] for r in row.tolist()]].reshape(len(row), t)
    train_y = ls.joined.y[ls.ids("train")]
    metrics = {}
    for j, name in enumerate(cfg.labels.targets):
        if cfg.labels.task == "regression":
            m = regression_metrics(pred[:, j], true[:, j])
            m["mean_predictor_mae"] = mean_predictor_mae(train_y[:, j], true[:, j])
        else:
            m = classification_metrics(pred[:, j], true[:, j])
        metrics[name] = m
    keys = [ls.joined.keys[pos[r]] for r in row.tolist()]
    return metrics, {"key": keys, "label_row": row, "split": [split] * len(row), "true": true, "pred": pred}


def parity_plot(cols: dict, targets, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(targets)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], targets, strict=True)):
        t, p = cols["true"][:, j], cols["pred"][:, j]
        ok = np.isfinite(t)
        ax.scatter(t[ok], p[ok], s=10, alpha=0.7)
        lo, hi = float(min(t[ok].min(), p[ok].min())), float(max(t[ok].max(), p[ok].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_title(f"{title}: MAE {np.abs(t[ok] - p[ok]).mean():.4g}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def format_table(metrics: dict) -> str:
    names = sorted({k for per_split in metrics.values() for m in per_split.values() for k in m})
    lines = [f"{'split':<6}{'target':<28}" + "".join(f"{k:>20}" for k in names)]
    for split, per in metrics.items():
        for target, m in per.items():
            lines.append(f"{split:<6}{target:<28}" + "".join(
                f"{m.get(k, float('nan')):>20.6g}" if not isinstance(m.get(k), int) else f"{m[k]:>20d}" for k in names))
    return "\n".join(lines)


def _resume_step(resume: str | None) -> int | None:
    """The global step of the checkpoint a run resumes from (metrics.csv keeps the rows before it)."""
    if resume is None:
        return None
    import torch

    return int(torch.load(resume, map_location="cpu", mmap=True, weights_only=False)["global_step"])


def run(cfg, resume: str | None = None) -> dict:
    """Fine-tune under ``cfg``; return the metrics dict (also written to run_dir/metrics.json)."""
    import lightning as L
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from model.finetune import FinetuneModule
    from pipeline.demo import ensure_demo_shards
    from training.finetune_config import dump_finetune_config
    from training.finetune_data import FinetuneDataModule, load_labelled
    from training.run import build_loggers

    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_finetune_config(cfg))
    L.seed_everything(cfg.trainer.seed, workers=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    ensure_demo_shards(cfg.data.root)

    ls = load_labelled(cfg)
    if ls.joined.unmatched:
        (run_dir / "unmatched_labels.csv").write_text("label_row\n" + "\n".join(ls.joined.unmatched) + "\n")
    model_cfg, state = build_backbone(cfg)
    mean, std = ls.label_stats() if cfg.labels.task == "regression" and cfg.labels.normalize else (None, None)
    module = FinetuneModule.from_config(cfg, model_cfg, mean, std)
    if state is not None:
        missing, unexpected = module.net.load_state_dict(state, strict=False)
        if [k for k in missing if k.startswith(("encoder.", "backbone."))] or unexpected:
            raise ValueError(f"backbone.checkpoint={cfg.backbone.checkpoint}: weights do not fit its model config")
        log.info("backbone: pretrained weights from %s (%d tensors)", cfg.backbone.checkpoint, len(state))
    else:
        log.info("backbone: random initialisation (seed %d)", cfg.trainer.seed)

    data = FinetuneDataModule(ls, cfg)
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None,
        reload_dataloaders_every_n_epochs=1,  # epochs differ in length (a fresh packing of a new permutation)
        limit_val_batches=cfg.trainer.limit_val_batches,
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        logger=build_loggers(cfg, run_dir, _resume_step(resume)) or False,
        callbacks=build_callbacks(cfg, run_dir),
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        module.load_state_dict(torch.load(best, map_location=module.device, weights_only=True)["state_dict"])
    results: dict = {"task": cfg.labels.task, "targets": list(cfg.labels.targets), "split_method": cfg.split.method,
                     "molecules": {s: int(len(ls.ids(s))) for s in ("train", "val", "test")},
                     "unmatched_label_rows": len(ls.joined.unmatched),
                     "backbone": cfg.backbone.init, "checkpoint": best or None, "steps": int(trainer.global_step)}
    per_split, cols_all = {}, []
    for split in ("val", "test"):
        if len(ls.ids(split)):
            per_split[split], cols = evaluate(module, ls, split, cfg)
            cols_all.append(cols)
    results["metrics"] = per_split
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
    t = len(cfg.labels.targets)
    table = {"key": sum((c["key"] for c in cols_all), []), "split": sum((c["split"] for c in cols_all), []),
             "label_row": np.concatenate([c["label_row"] for c in cols_all])}
    for j, name in enumerate(cfg.labels.targets):
        table[f"{name}_true"] = np.concatenate([c["true"][:, j] for c in cols_all])
        table[f"{name}_pred"] = np.concatenate([c["pred"][:, j] for c in cols_all])
    pq.write_table(pa.table(table), run_dir / "predictions.parquet")
    if cfg.labels.task == "regression" and cols_all:
        last = cols_all[-1]
        parity_plot(last, cfg.labels.targets, run_dir / "parity.png", last["split"][0] if t else "")
    return results


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.strict_config import ConfigError
    from training.finetune_config import load_finetune_config
    from training.labels import LabelError

    try:
        cfg = load_finetune_config(a.config, a.overrides)
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1:
        sys.stderr.write(f"error: trainer.devices={cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes}: "
                         "fine-tuning runs on one device; set both to 1\n")
        return 2
    run_dir = Path(cfg.trainer.run_dir)
    resume = None
    if a.resume is not None:
        path = run_dir / "checkpoints" / "last.ckpt" if a.resume == "last" else Path(a.resume)
        if not path.exists():
            sys.stderr.write(f"error: --resume {a.resume}: no checkpoint at {path}; run without --resume to start fresh\n")
            return 2
        resume = str(path)
    try:
        results = run(cfg, resume)
    except (LabelError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write(format_table(results["metrics"]) + "\n")
    sys.stdout.write(f"metrics: {run_dir / 'metrics.json'}\npredictions: {run_dir / 'predictions.parquet'}\n"
                     + (f"parity plot: {run_dir / 'parity.png'}\n" if (run_dir / "parity.png").exists() else "")
                     + f"checkpoints: {run_dir / 'checkpoints'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
