"""Learning check: do pretrained embeddings know chemistry that random ones don't?

Trains ``configs/demo.yaml`` (or loads ``--checkpoint``), embeds the demo's QM9 small molecules with
the pretrained model and with the same architecture at random initialisation, fits a ridge
regression (scikit-learn RidgeCV) from graph embeddings to a QM9 property on a seeded 80/20 split,
and evaluates the pretraining heads on the held-out (val + test) batches. Prints one JSON line:
R² of both, and held-out MLM / distance-bin accuracies next to their majority-class baselines.

    python benchmarks/probe.py [--checkpoint runs/demo/checkpoints/last.ckpt] [--property HOMO_LUMO_gap_au]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
QM9_CSV = REPO / "data" / "demo" / "raw" / "small_molecule" / "qm9_properties.csv"


def train_demo(run_dir: Path, overrides: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "training.run", str(REPO / "configs" / "demo.yaml"),
                    f"trainer.run_dir={run_dir}", "trainer.progress_bar=false", *overrides], cwd=REPO, check=True,
                   stdout=sys.stderr)  # keep stdout for the one JSON line
    return run_dir / "checkpoints" / "last.ckpt"


def ridge_r2(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    perm = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    model.fit(x[tr], y[tr])
    return float(model.score(x[te], y[te]))


@torch.no_grad()
def heldout_accuracy(module, cfg) -> dict:
    """Per task: accuracy on val+test batches and the majority-class baseline (majority taken on train batches)."""
    from pipeline.loader import eval_loader, resolve

    res = resolve(cfg)
    module.eval()

    def collect(split):
        out: dict[str, tuple[list, list]] = {}
        for batch in eval_loader(res, split, num_workers=0):
            if batch.num_graphs == 0:
                continue
            for task, p in module.net(batch).predictions.items():
                preds, tgts = out.setdefault(task, ([], []))
                preds.append(p.logits.argmax(-1))
                tgts.append(p.target)
        return {t: (torch.cat(a), torch.cat(b)) for t, (a, b) in out.items()}

    train = collect("train")
    held = {}
    for split in ("val", "test"):
        for t, (p, y) in collect(split).items():
            a, b = held.get(t, (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
            held[t] = (torch.cat([a, p]), torch.cat([b, y]))
    result = {}
    for t, (p, y) in held.items():
        majority = int(torch.mode(train[t][1]).values) if t in train else int(torch.mode(y).values)
        result[t] = {"acc": round(float((p == y).float().mean()), 4),
                     "majority_baseline": round(float((y == majority).float().mean()), 4), "targets": int(len(y))}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training the demo")
    p.add_argument("--property", default="HOMO_LUMO_gap_au", help="QM9 column to regress (default HOMO_LUMO_gap_au)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="training overrides when training the demo")
    a = p.parse_args()

    from model.lightning_module import PretrainingModule
    from training.config import load_config
    from training.embed import embed_batches, shard_batches

    ckpt = a.checkpoint or train_demo(Path(tempfile.mkdtemp(prefix="probe-")), a.overrides)
    pretrained = PretrainingModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    torch.manual_seed(a.seed)
    hp = pretrained.hparams
    random_init = PretrainingModule(hp["model"], hp["tasks"], hp["optim"], domains=hp["domains"])

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.num_workers=0"]).data
    sm_only = dataclasses.replace(cfg, domains=(dataclasses.replace(cfg.domains[0], name="small_molecule", weight=1.0),),
                                  mask_fraction=0.0, sr_fraction=0.0, lr_pairs_per_atom=0.0)
    with open(QM9_CSV) as f:
        prop = {int(r["index"]): float(r[a.property]) for r in csv.DictReader(f)}

    out = {"benchmark": "probe", "property": a.property, "checkpoint": str(ckpt)}
    for name, module in (("pretrained", pretrained), ("random_init", random_init)):
        table, _ = embed_batches(module.net, shard_batches(sm_only, ["train", "val", "test"]), torch.device("cpu"),
                                 progress=False)
        ids = [int(k.rsplit("_", 1)[0]) for k in table.column("key").to_pylist()]
        x = np.asarray(table.column("embedding").to_pylist(), np.float64)
        y = np.array([prop[i] for i in ids])
        out[f"r2_{name}"] = round(ridge_r2(x, y, a.seed), 4)
        out["molecules"] = len(y)
    out["heldout_pretrained"] = heldout_accuracy(pretrained, cfg)
    out["heldout_random_init"] = heldout_accuracy(random_init, cfg)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
