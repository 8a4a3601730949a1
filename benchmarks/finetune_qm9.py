"""Downstream check: QM9 HOMO-LUMO gap and U0 MAE (meV) after fine-tuning, pretrained vs random init vs descriptors.

Three models, one seeded split, the same step budget, the same head, in one run:
- ``pretrained``: ``training.finetune`` from the demo checkpoint (or ``--checkpoint``);
- ``random_init``: the same architecture at random initialisation, same config otherwise;
- ``descriptor_head``: the same head (model.finetune.PropertyHead) on a classical descriptor vector
  (element counts + sorted Coulomb-matrix eigenvalues), trained with the same optimiser, schedule, steps,
  batch size and best-on-val selection;
and the mean predictor. Both targets are learnt jointly (one head, two outputs). Prints one JSON line
with test-split MAEs in meV.

These are small-budget CPU figures (hundreds of steps, a tiny model, 400 molecules by default). For scale:
SchNet reaches a gap MAE of about 63 meV trained on ~110 k QM9 molecules on a GPU.

    python benchmarks/finetune_qm9.py [--checkpoint runs/demo/checkpoints/last.ckpt] [--steps 300]
    pip download qm9pack --no-deps -d /tmp/qm9        # optional: the full QM9 (130 831 molecules, 104 MB)
    python benchmarks/finetune_qm9.py --qm9-full /tmp/qm9/qm9pack-1.0.3-py3-none-any.whl --qm9-limit 20000
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QM9_XYZ = REPO / "data" / "demo" / "raw" / "small_molecule" / "qm9_sample.xyz"
QM9_CSV = REPO / "data" / "demo" / "raw" / "small_molecule" / "qm9_properties.csv"
HARTREE_meV = 27211.386246
TARGETS = {"gap": "HOMO_LUMO_gap_au", "u0": "InternalEnergy_0K_au"}
ELEMENTS = (1, 6, 7, 8, 9)
ANCHOR = "SchNet gap MAE ~63 meV on full QM9 (~110k training molecules, GPU); these are small-budget CPU figures"


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")


# ---------------------------------------------------------------- data

def vendored(work: Path) -> tuple[Path, Path, str]:
    (work / "raw" / "small_molecule").mkdir(parents=True)
    shutil.copy(QM9_XYZ, work / "raw" / "small_molecule" / QM9_XYZ.name)
    return work / "raw", QM9_CSV, "vendored QM9 subset (400 molecules)"


def qm9_full(source: Path, limit: int | None, seed: int, work: Path) -> tuple[Path, Path, str]:
    """XYZ + label CSV of (a seeded subset of) QM9 read straight from qm9pack's CSV files (wheel or folder)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    cols = ["Index", "Elements", "XYZ_Ang", *TARGETS.values()]
    opts = pacsv.ConvertOptions(include_columns=cols)
    parts = []
    if source.is_file():
        with zipfile.ZipFile(source) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".csv") and "/qm9_part" in n)
            for n in names:
                parts.append(pacsv.read_csv(io.BytesIO(zf.read(n)), convert_options=opts))
    else:
        for p in sorted(source.rglob("qm9_part*.csv")):
            parts.append(pacsv.read_csv(p, convert_options=opts))
    if not parts:
        raise SystemExit(f"--qm9-full {source}: no qm9_part*.csv inside (expected qm9pack's wheel or its data folder)")
    table = pa.concat_tables(parts)
    n = table.num_rows
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:limit]) if limit and limit < n else np.arange(n)
    table = table.take(pa.array(rows))
    (work / "raw" / "small_molecule").mkdir(parents=True)
    xyz = work / "raw" / "small_molecule" / "qm9_full.xyz"
    labels = work / "qm9_full_labels.csv"
    d = table.to_pydict()
    with open(xyz, "w") as fx, open(labels, "w", newline="") as fl:
        w = csv.writer(fl)
        w.writerow(["index", *TARGETS.values()])
        for i in range(table.num_rows):
            elems = ast.literal_eval(d["Elements"][i])  # a Python list literal of symbols: parsed, never evaluated
            coords = ast.literal_eval(d["XYZ_Ang"][i])
            fx.write(f"{len(elems)}\n{d['Index'][i]}\n")
            fx.writelines(f"{e} {x:.10f} {y:.10f} {z:.10f}\n" for e, (x, y, z) in zip(elems, coords, strict=True))
            w.writerow([d["Index"][i], *(d[c][i] for c in TARGETS.values())])
    return work / "raw", labels, f"qm9pack full QM9, {table.num_rows} of {n} molecules (seed {seed})"


def convert(raw: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "shards_tools.convert", str(raw), str(out), "--no-progress", "-q",
                    "--workers", "2"], cwd=REPO, check=True, stdout=sys.stderr)


def demo_checkpoint(work: Path) -> Path:
    default = REPO / "runs" / "demo" / "checkpoints" / "last.ckpt"
    if default.exists():
        return default
    log("no demo checkpoint: training configs/demo.yaml first (a few minutes)")
    run_dir = work / "demo"
    subprocess.run([sys.executable, "-m", "training.run", str(REPO / "configs" / "demo.yaml"), f"trainer.run_dir={run_dir}",
                    "trainer.progress_bar=false"], cwd=REPO, check=True, stdout=sys.stderr)
    return run_dir / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------- descriptor baseline

def descriptors(samples, max_atoms: int) -> np.ndarray:
    """Element counts (H C N O F, other) and the sorted eigenvalues of the Coulomb matrix (zero-padded)."""
    out = np.zeros((len(samples), len(ELEMENTS) + 1 + max_atoms))
    for r, s in enumerate(samples):
        z = s.z.astype(np.float64)
        for j, e in enumerate(ELEMENTS):
            out[r, j] = float((s.z == e).sum())
        out[r, len(ELEMENTS)] = float(len(z) - out[r, : len(ELEMENTS)].sum())
        d = np.linalg.norm(s.pos[:, None, :] - s.pos[None, :, :], axis=-1).astype(np.float64)
        cm = np.outer(z, z) / np.where(d > 0, d, 1.0)
        np.fill_diagonal(cm, 0.5 * z**2.4)
        ev = np.sort(np.linalg.eigvalsh(cm))[::-1][:max_atoms]
        out[r, len(ELEMENTS) + 1 : len(ELEMENTS) + 1 + len(ev)] = ev
    return out


def descriptor_head(ls, cfg, seed: int) -> np.ndarray:
    """Train the fine-tuning head on descriptors with the fine-tuning recipe; test predictions [n_test, T]."""
    import torch

    from model.finetune import PropertyHead
    from model.optim import lr_factor, param_groups

    torch.manual_seed(seed)
    x = descriptors(ls.samples, max(s.num_atoms for s in ls.samples))
    tr, va, te = ls.ids("train"), ls.ids("val"), ls.ids("test")
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    xt = torch.tensor((x - mu) / sd, dtype=torch.float32)
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in ls.label_stats())
    y = torch.tensor(ls.joined.y, dtype=torch.float32)
    head = PropertyHead(x.shape[1], cfg.head.hidden, cfg.head.layers, y.shape[1], cfg.head.dropout)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(head, o.weight_decay), lr=o.lr)
    steps = cfg.trainer.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, o.warmup_fraction, o.min_lr_ratio))
    bs = cfg.data.max_graphs or 64
    rng = np.random.default_rng(cfg.data.seed)
    order, pos = rng.permutation(tr), 0

    def val_mae() -> float:
        with torch.no_grad():
            p = head(xt[va]) * std + mean
        return float(((p - y[va]).abs() / std).nanmean())

    best, best_state = math.inf, None
    for step in range(steps):
        if pos + bs > len(order):
            order, pos = rng.permutation(tr), 0
        idx = order[pos : pos + bs]
        pos += bs
        head.train()
        loss = torch.nn.functional.mse_loss(head(xt[idx]), (y[idx] - mean) / std)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.trainer.gradient_clip_val or 1e9)
        opt.step()
        sched.step()
        if (step + 1) % cfg.trainer.val_check_interval == 0 or step + 1 == steps:
            head.eval()
            v = val_mae()
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        return (head(xt[te]) * std + mean).numpy()


# ---------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="pretrained checkpoint (default runs/demo/checkpoints/last.ckpt, trained if missing)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of every model (default 300)")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default 0)")
    p.add_argument("--qm9-full", type=Path, metavar="WHEEL_OR_DIR", help="qm9pack wheel (or its unpacked data folder)")
    p.add_argument("--qm9-limit", type=int, default=20000, help="with --qm9-full: seeded subset size (0 = all 130 831)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("overrides", nargs="*", help="fine-tuning overrides for both runs, e.g. head.hidden=256")
    a = p.parse_args()

    import torch

    from model.metrics import mean_predictor_mae
    from training.finetune import run
    from training.finetune_config import load_finetune_config
    from training.finetune_data import load_labelled

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="finetune-qm9-"))
    raw, labels, data_desc = (qm9_full(a.qm9_full, a.qm9_limit or None, a.seed, work) if a.qm9_full else vendored(work))
    shards = work / "shards"
    convert(raw, shards)
    ckpt = (a.checkpoint or demo_checkpoint(work)).resolve()
    pre_steps = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", -1)) if ckpt.suffix == ".ckpt" else None
    source = "small_molecule/" + next((raw / "small_molecule").glob("*.xyz")).name
    base = [f"data.root={shards}", f"labels.path={labels}", f"labels.source={source}",
            f"labels.targets=[{','.join(TARGETS.values())}]", f"backbone.checkpoint={ckpt}",
            f"trainer.max_steps={a.steps}", f"trainer.seed={a.seed}", f"split.seed={a.seed}", f"data.seed={a.seed}",
            f"trainer.val_check_interval={max(1, a.steps // 10)}", "trainer.progress_bar=false",
            f"trainer.num_threads={a.threads}", *a.overrides]
    out: dict = {"benchmark": "finetune_qm9", "data": data_desc, "steps": a.steps, "seed": a.seed,
                 "checkpoint": str(ckpt), "checkpoint_pretraining_steps": pre_steps, "targets_trained_jointly": True,
                 "split": "test split of a seeded random 80/10/10 split; best-on-val weights", "note": ANCHOR}
    maes: dict[str, dict[str, float]] = {k: {} for k in TARGETS}
    ls = None
    for name, init in (("pretrained", "checkpoint"), ("random_init", "random")):
        cfg = load_finetune_config(REPO / "configs" / "finetune_qm9.yaml",
                                   base + [f"backbone.init={init}", f"trainer.run_dir={work / name}"])
        log(f"fine-tuning {name} ...")
        res = run(cfg)
        for k, col in TARGETS.items():
            maes[k][name] = res["metrics"]["test"][col]["mae"] * HARTREE_meV
        if ls is None:
            ls = load_labelled(cfg)
            out["molecules"] = res["molecules"]
            for k, col in TARGETS.items():
                j = cfg.labels.targets.index(col)
                maes[k]["mean_predictor"] = mean_predictor_mae(ls.joined.y[ls.ids("train"), j],
                                                               ls.joined.y[ls.ids("test"), j]) * HARTREE_meV
    log("descriptor head ...")
    pred = descriptor_head(ls, cfg, a.seed)
    true = ls.joined.y[ls.ids("test")]
    for k, col in TARGETS.items():
        j = cfg.labels.targets.index(col)
        maes[k]["descriptor_head"] = float(np.nanmean(np.abs(pred[:, j] - true[:, j]))) * HARTREE_meV
    for k in TARGETS:
        out[f"{k}_mae_meV"] = {n: round(v, 1) for n, v in maes[k].items()}
        out[f"{k}_pretrained_over_random"] = round(maes[k]["pretrained"] / maes[k]["random_init"], 3)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
