"""Learning check: do the pretraining tasks teach something the input does not give away, and do the
pretrained graph embeddings know chemistry that random ones and a classical descriptor don't?

Trains ``configs/demo.yaml`` (or loads ``--checkpoint``), then prints one JSON line with:

- ``heldout``: per task and per domain, on the held-out (val + test) batches of the real loader: accuracy,
  balanced accuracy (mean recall over the classes present), the majority-class accuracy (class taken on
  the train batches) and the chance balanced accuracy (1 / classes present), for the pretrained model and
  the same architecture at random initialisation;
- ``leakage``: per domain, a logistic regression fitted on the train batches' masked atoms' *own input
  features* (bond count, neighbour counts, nearest and mean close distance: what the model sees of the
  atom itself) predicting its element, scored on the held-out batches, next to the majority class;
- ``qm9``: 5-fold ridge (RidgeCV) R² from graph embeddings to QM9 properties of the demo's 400 molecules:
  pretrained, random init, and a classical descriptor on the same molecules (sorted Coulomb-matrix
  eigenvalues + element counts + interatomic-distance histogram).

    python benchmarks/probe.py [--checkpoint CKPT] [training overrides, e.g. model.distance_bias=true]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
QM9_CSV = REPO / "data" / "demo" / "raw" / "small_molecule" / "qm9_properties.csv"
PROPERTIES = ("HOMO_LUMO_gap_au", "Polarizability_bohr3", "Heatcapacity_Cv_cal_mol_K")
QM9_ELEMENTS = (1, 6, 7, 8, 9)
QM9_MAX_ATOMS = 29


def train_demo(run_dir: Path, overrides: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "training.run", str(REPO / "configs" / "demo.yaml"),
                    f"trainer.run_dir={run_dir}", "trainer.progress_bar=false", *overrides], cwd=REPO, check=True,
                   stdout=sys.stderr)  # keep stdout for the one JSON line
    return run_dir / "checkpoints" / "last.ckpt"


def ridge_r2(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Mean R² of a standardised RidgeCV over 5 seeded folds."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    folds = KFold(5, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, x, y, cv=folds, scoring="r2")))


def classical_descriptor(z: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Sorted Coulomb-matrix eigenvalues (padded to 29), element counts (H C N O F), distance histogram (0-10 Å)."""
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    zz = z.astype(np.float64)
    with np.errstate(divide="ignore"):
        cm = np.where(d > 0, np.outer(zz, zz) / d, 0.5 * zz**2.4)
    eig = np.sort(np.linalg.eigvalsh(cm))[::-1]
    eig = np.pad(eig, (0, max(0, QM9_MAX_ATOMS - len(eig))))[:QM9_MAX_ATOMS]
    counts = np.array([(z == e).sum() for e in QM9_ELEMENTS], np.float64)
    iu = np.triu_indices(len(z), 1)
    hist = np.histogram(d[iu], bins=20, range=(0.0, 10.0))[0].astype(np.float64)
    return np.concatenate([eig, counts, hist])


def masked_atom_features(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A masked atom's own input features, its true element, and its molecule's domain."""
    from model.encoder import geometry_features

    src, dst = batch.edge_index
    d = (batch.pos[dst] - batch.pos[src]).norm(dim=-1)
    f = geometry_features(batch.num_nodes, batch.edge_index, d, batch.bond_index, 6.0, 3.0)
    m = batch.mlm_mask
    return f[m].numpy(), batch.mlm_target.numpy(), batch.domain[batch.batch[m]].numpy()


@torch.no_grad()
def collect(modules: dict, res, split: str) -> tuple[dict, tuple]:
    """Per module and task: (predicted class, target class, domain) over a split; masked-atom features."""
    from pipeline.loader import eval_loader

    preds: dict = {name: {} for name in modules}
    feats = []
    for batch in eval_loader(res, split, num_workers=0):
        if batch.num_graphs == 0:
            continue
        feats.append(masked_atom_features(batch))
        for name, module in modules.items():
            for task, p in module.net(batch).predictions.items():
                preds[name].setdefault(task, []).append(
                    (p.logits.argmax(-1).numpy(), p.target.numpy(), batch.domain[p.graph].numpy()))
    cat = lambda rows: tuple(np.concatenate(c) for c in zip(*rows, strict=True))  # noqa: E731
    return {n: {t: cat(r) for t, r in d.items()} for n, d in preds.items()}, cat(feats)


def scores(pred: np.ndarray, y: np.ndarray, majority: int) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    return {"acc": round(float((pred == y).mean()), 4), "balanced_acc": round(float(balanced_accuracy_score(y, pred)), 4),
            "majority_acc": round(float((y == majority).mean()), 4),
            "chance_balanced_acc": round(1.0 / len(np.unique(y)), 4), "targets": int(len(y))}


def heldout_and_leakage(modules: dict, cfg) -> tuple[dict, dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.loader import resolve

    res = resolve(cfg)
    train, train_feats = collect(modules, res, "train")
    held = [collect(modules, res, s) for s in ("val", "test")]
    feats = tuple(np.concatenate(c) for c in zip(held[0][1], held[1][1], strict=True))
    out: dict = {}
    for name in modules:
        out[name] = {}
        for task in train[name]:
            p, y, dom = (np.concatenate(c) for c in zip(held[0][0][name][task], held[1][0][name][task], strict=True))
            ty, tdom = train[name][task][1], train[name][task][2]
            out[name][task] = {}
            for d, dname in enumerate(res.names):
                sel, tsel = dom == d, tdom == d
                if sel.sum() and tsel.sum():
                    maj = int(np.bincount(ty[tsel]).argmax())
                    out[name][task][dname] = scores(p[sel], y[sel], maj)
    leak = {}
    (x, y, dom), (xt, yt, domt) = train_feats, feats
    for d, dname in enumerate(res.names):
        sel, selt = dom == d, domt == d
        if len(np.unique(y[sel])) < 2 or not selt.sum():
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[sel], y[sel])
        maj = int(np.bincount(y[sel]).argmax())
        leak[dname] = {"acc": round(float(clf.score(xt[selt], yt[selt])), 4),
                       "majority_acc": round(float((yt[selt] == maj).mean()), 4), "atoms": int(selt.sum())}
    return out, leak


@torch.no_grad()
def qm9_inputs(cfg) -> dict[int, np.ndarray]:
    """Classical descriptor of every demo QM9 molecule (clean inputs: nothing masked), by QM9 index."""
    from pipeline.loader import eval_loader, resolve

    res = resolve(cfg)
    out = {}
    for split in ("train", "val", "test"):
        for batch in eval_loader(res, split, num_workers=0):
            for g, key in enumerate(batch["keys"]):
                a, b = int(batch.ptr[g]), int(batch.ptr[g + 1])
                out[int(key.rsplit("_", 1)[0])] = classical_descriptor(batch.z[a:b].numpy(), batch.pos[a:b].double().numpy())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of training the demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="training overrides when training the demo")
    a = p.parse_args()

    from model.lightning_module import PretrainingModule
    from training.config import load_config
    from training.embed import embed_batches, shard_batches

    t0 = time.perf_counter()
    ckpt = a.checkpoint or train_demo(Path(tempfile.mkdtemp(prefix="probe-")), a.overrides)
    train_s = time.perf_counter() - t0
    pretrained = PretrainingModule.load_from_checkpoint(str(ckpt), map_location="cpu")
    torch.manual_seed(a.seed)
    hp = pretrained.hparams
    random_init = PretrainingModule(hp["model"], hp["tasks"], hp["optim"], domains=hp["domains"])
    modules = {"pretrained": pretrained.eval(), "random_init": random_init.eval()}

    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.num_workers=0", *[o for o in a.overrides if o.startswith("data.")]]).data
    sm_only = dataclasses.replace(cfg, domains=(dataclasses.replace(cfg.domains[0], name="small_molecule", weight=1.0),),
                                  mask_fraction=0.0, sr_fraction=0.0, lr_pairs_per_atom=0.0)
    with open(QM9_CSV) as f:
        rows = {int(r["index"]): r for r in csv.DictReader(f)}

    out = {"benchmark": "probe", "checkpoint": str(ckpt), "overrides": a.overrides, "train_s": round(train_s, 1)}
    classical = qm9_inputs(sm_only)
    emb = {}
    for name, module in modules.items():
        table, _ = embed_batches(module.net, shard_batches(sm_only, ["train", "val", "test"]), torch.device("cpu"),
                                 progress=False)
        ids = [int(k.rsplit("_", 1)[0]) for k in table.column("key").to_pylist()]
        emb[name] = (ids, np.asarray(table.column("embedding").to_pylist(), np.float64))
    ids = emb["pretrained"][0]
    qm9 = {"molecules": len(ids)}
    for prop in PROPERTIES:
        y = np.array([float(rows[i][prop]) for i in ids])
        qm9[prop] = {name: round(ridge_r2(x, y, a.seed), 4) for name, (_, x) in emb.items()}
        qm9[prop]["classical"] = round(ridge_r2(np.stack([classical[i] for i in ids]), y, a.seed), 4)
    out["qm9_r2"] = qm9
    out["heldout"], out["leakage"] = heldout_and_leakage(modules, cfg)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
