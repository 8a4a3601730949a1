"""Fine-tuning: beats the mean predictor on the vendored QM9 subset, label joins fail clearly, splits keep
scaffolds together, a frozen pretrained backbone stays fixed, the batch position resumes, metrics are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.config import ModelConfig
from model.metrics import classification_metrics, regression_metrics, roc_auc
from model.network import MolecularESA
from model.pretrained import export_backbone
from pipeline.strict_config import ConfigError
from tests.training.conftest import QM9_CSV, REPO, TINY_MODEL
from training import finetune as ft
from training.finetune_config import LabelsConfig, load_finetune_config
from training.finetune_data import TrainBatches, load_labelled
from training.labels import LabelError, join_labels, murcko_scaffold, scaffold_split

pytestmark = pytest.mark.timeout(900)

CONFIG = REPO / "configs" / "finetune_qm9.yaml"


def _tiny(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={shards}", f"trainer.run_dir={run_dir}", "backbone.init=random", "backbone.checkpoint=null",
            *(f"model.{k}={v}" for k, v in TINY_MODEL.items()), "data.max_graphs=32", "trainer.num_threads=1",
            "trainer.progress_bar=false", "trainer.deterministic=true", "head.hidden=64", *extra]


def test_shipped_finetune_configs_load_and_round_trip(tmp_path):
    from training.finetune_config import dump_finetune_config

    paths = sorted((REPO / "configs").glob("finetune*.yaml"))
    assert CONFIG in paths
    for p in paths:
        cfg = load_finetune_config(p)
        (tmp_path / p.name).write_text(dump_finetune_config(cfg))
        assert load_finetune_config(tmp_path / p.name) == cfg


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean 'labels.targets'"):
        load_finetune_config(CONFIG, ["labels.tragets=[x]"])
    with pytest.raises(ConfigError, match="the architecture comes from backbone.checkpoint"):
        load_finetune_config(CONFIG, ["model.dim=32"])
    with pytest.raises(ConfigError, match="backbone.init=checkpoint needs backbone.checkpoint"):
        load_finetune_config(CONFIG, ["backbone.checkpoint=null"])


def test_finetune_beats_the_mean_predictor_on_qm9(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_finetune_config(CONFIG, _tiny(small_shards, run_dir, "trainer.max_steps=80", "trainer.val_check_interval=20",
                                             "optim.lr=3.0e-3", "backbone.lr_ratio=1.0"))
    res = ft.run(cfg)
    val = res["metrics"]["val"]["HOMO_LUMO_gap_au"]
    assert val["n"] == 40 and res["molecules"] == {"train": 320, "val": 40, "test": 40}
    assert val["mae"] < 0.85 * val["mean_predictor_mae"], val
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["metrics"]["val"]["HOMO_LUMO_gap_au"]["mae"] == pytest.approx(val["mae"])
    assert (run_dir / "parity.png").stat().st_size > 1000 and (run_dir / "config.yaml").exists()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt")) and (run_dir / "checkpoints" / "last.ckpt").exists()
    pred = pq.read_table(run_dir / "predictions.parquet").to_pydict()
    # every val and test molecule exactly once, never a training one; the table's truth is the CSV's
    assert len(pred["key"]) == len(set(pred["key"])) == 80
    gap = pa.csv.read_csv(QM9_CSV)["HOMO_LUMO_gap_au"].to_numpy()
    np.testing.assert_allclose(pred["HOMO_LUMO_gap_au_true"], gap[pred["label_row"]])
    mae = np.abs(np.array(pred["HOMO_LUMO_gap_au_pred"]) - pred["HOMO_LUMO_gap_au_true"])[np.array(pred["split"]) == "val"]
    assert mae.mean() == pytest.approx(val["mae"], rel=1e-5)


def test_frozen_pretrained_backbone_stays_fixed_and_the_head_learns(small_shards, tmp_path):
    torch.manual_seed(7)
    net = MolecularESA(ModelConfig(**TINY_MODEL))
    export = export_backbone(net, tmp_path / "export")
    run_dir = tmp_path / "frozen"
    over = [o for o in _tiny(small_shards, run_dir) if not o.startswith(("model.", "backbone."))]
    cfg = load_finetune_config(CONFIG, over + [f"backbone.checkpoint={export}", "backbone.freeze=true",
                                               "trainer.max_steps=4", "trainer.val_check_interval=2",
                                               "labels.targets=[HOMO_LUMO_gap_au, InternalEnergy_0K_au]"])
    res = ft.run(cfg)
    assert set(res["metrics"]["test"]) == {"HOMO_LUMO_gap_au", "InternalEnergy_0K_au"}
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for k, v in net.state_dict().items():
        assert torch.equal(state[f"net.{k}"], v), k
    head_keys = [k for k in state if k.startswith("head.") and k.endswith("weight")]
    assert head_keys
    # the head moved away from its initialisation (same seed gives the same init as the run's)
    from model.finetune import FinetuneModule

    torch.manual_seed(cfg.trainer.seed)
    init = FinetuneModule.from_config(cfg, net.cfg)
    assert any(not torch.equal(state[k], init.state_dict()[k]) for k in head_keys)


def test_train_batches_resume_at_the_next_batch(small_shards):
    cfg = load_finetune_config(CONFIG, _tiny(small_shards, Path("/unused")))
    ls = load_labelled(cfg)
    ref = TrainBatches(ls, cfg)
    stream = [b for _ in range(3) for b in ref]  # three epochs
    assert len({tuple(b["keys"]) for b in stream}) == len(stream)  # epochs are fresh shuffles
    epoch0 = sorted(k for b in stream[: len(TrainBatches(ls, cfg))] for k in b["keys"])
    assert epoch0 == sorted(ls.joined.keys[ls.ids("train")].tolist())  # each training molecule once per epoch
    cut = len(TrainBatches(ls, cfg)) + 2
    first = TrainBatches(ls, cfg)
    it = iter(first)
    seen = []
    while len(seen) < cut:
        try:
            seen.append(next(it))
        except StopIteration:
            it = iter(first)
    again = TrainBatches(ls, cfg)
    again.load_state_dict(first.state_dict())
    rest = [b for _ in range(3) for b in again][: len(stream) - cut]
    assert [b["keys"] for b in rest] == [b["keys"] for b in stream[cut:]]


def _index(keys, sources, records, domain="small_molecule") -> pa.Table:
    n = len(keys)
    return pa.table({"key": keys, "domain": [domain] * n, "split": ["train"] * n, "source": sources, "record": records})


def test_label_join_by_key_and_by_source_record():
    index = _index(["a_1", "b_2", "c_3"], ["x/f.xyz"] * 3, [0, 1, 2])
    by_key = join_labels(pa.table({"key": ["c_3", "a_1"], "y": [3.0, 1.0]}), index, LabelsConfig(path="t.csv", targets=("y",)))
    assert by_key.keys.tolist() == ["c_3", "a_1"] and by_key.y[:, 0].tolist() == [3.0, 1.0]
    rows = pa.table({"file": ["x/f.xyz", "x/f.xyz"], "rec": [2, 1], "y": [3.0, None]})
    by_rec = join_labels(rows, index, LabelsConfig(path="t.csv", targets=("y",), join="source_record",
                                                   source_column="file", record_column="rec"))
    assert by_rec.keys.tolist() == ["c_3", "b_2"] and np.isnan(by_rec.y[1, 0])
    by_order = join_labels(pa.table({"y": [0.0, 1.0, 2.0]}), index,
                           LabelsConfig(path="t.csv", targets=("y",), join="source_record", source="x/f.xyz"))
    assert by_order.keys.tolist() == ["a_1", "b_2", "c_3"]


def test_label_join_errors_are_clear():
    index = _index(["a_1", "b_2"], ["x/f.xyz"] * 2, [0, 1])
    cfg = LabelsConfig(path="t.csv", targets=("y",))
    with pytest.raises(LabelError, match=r"3 of 4 label rows match no shard sample, e\.g\. row 1 \(key='zz'\); row 2"):
        join_labels(pa.table({"key": ["a_1", "zz", "yy", "xx"], "y": [1.0, 2, 3, 4]}), index, cfg)
    warned = join_labels(pa.table({"key": ["a_1", "zz"], "y": [1.0, 2]}), index,
                         LabelsConfig(path="t.csv", targets=("y",), unmatched="warn"))
    assert warned.keys.tolist() == ["a_1"] and warned.unmatched == ["1"]
    with pytest.raises(LabelError, match="'yy' is not a column of the label table"):
        join_labels(pa.table({"key": ["a_1"], "y": [1.0]}), index, LabelsConfig(path="t.csv", targets=("yy",)))
    with pytest.raises(LabelError, match="named by more than one label row.*'a_1' by rows \\[0, 1\\]"):
        join_labels(pa.table({"key": ["a_1", "a_1"], "y": [1.0, 2.0]}), index, cfg)
    with pytest.raises(LabelError, match="targets must be numbers"):
        join_labels(pa.table({"key": ["a_1"], "y": ["high"]}), index, cfg)
    with pytest.raises(LabelError, match="needs 0/1 labels"):
        join_labels(pa.table({"key": ["a_1"], "y": [2.0]}), index,
                    LabelsConfig(path="t.csv", targets=("y",), task="classification"))
    with pytest.raises(LabelError, match="record_column is unset: the row number is the record"):
        join_labels(pa.table({"y": [1.0, 2.0, 3.0]}), index,
                    LabelsConfig(path="t.csv", targets=("y",), join="source_record", source="x/f.xyz"))


def test_cli_reports_a_bad_join_in_one_line(small_shards, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("key,gap\nnot_a_key,0.3\n")
    code = ft.main([str(CONFIG), *_tiny(small_shards, tmp_path / "r"), f"labels.path={labels}", "labels.join=key",
                    "labels.source=null", "labels.targets=[gap]"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: 1 of 1 label rows match no shard sample") and "not_a_key" in err


def test_scaffold_split_keeps_scaffolds_together(small_shards):
    cfg = load_finetune_config(CONFIG, _tiny(small_shards, Path("/unused"), "split.method=scaffold"))
    ls = load_labelled(cfg)
    scaffolds = [murcko_scaffold(s.z, s.bonds, s.bond_order) for s in ls.samples]
    where: dict[str, set] = {}
    for sc, sp in zip(scaffolds, ls.split.tolist(), strict=True):
        where.setdefault(sc, set()).add(sp)
    assert all(len(v) == 1 for v in where.values())
    assert 1 < len(where) < len(scaffolds)  # real sharing, not one group per molecule
    counts = {s: int((ls.split == s).sum()) for s in ("train", "val", "test")}
    assert counts["train"] >= 300 and counts["val"] >= 30 and counts["test"] >= 20, counts
    # benzene and toluene share the benzene framework; an acyclic molecule has the empty scaffold
    ring = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [0, 5]])
    benzene = murcko_scaffold(np.array([6] * 6 + [1] * 6), np.vstack([ring, [[i, i + 6] for i in range(6)]]), np.ones(12))
    toluene = murcko_scaffold(np.array([6] * 7 + [1] * 3), np.vstack([ring, [[0, 6], [6, 7], [6, 8], [6, 9]]]), np.ones(10))
    assert benzene == toluene != "" and murcko_scaffold(np.array([6, 6, 8]), np.array([[0, 1], [1, 2]]), np.ones(2)) == ""
    assert scaffold_split(["a"] * 5 + ["b"] * 3 + ["c", "d"], 0.2, 0.1, 0).tolist().count("train") >= 5


def test_metrics_match_scikit_learn():
    from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

    rng = np.random.default_rng(0)
    y, p = rng.normal(size=50), rng.normal(size=50)
    m = regression_metrics(p, y)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p)) and m["r2"] == pytest.approx(r2_score(y, p))
    labels, scores = rng.integers(0, 2, 60), np.round(rng.normal(size=60), 1)  # ties on purpose
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    y_nan = labels.astype(float)
    y_nan[:10] = np.nan
    c = classification_metrics(scores, y_nan)
    assert c["n"] == 50 and c["roc_auc"] == pytest.approx(roc_auc_score(labels[10:], scores[10:]))


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(small_shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    steps = ["trainer.max_steps=24", "trainer.checkpoint_every_n_steps=4", "trainer.val_check_interval=8",
             "data.max_graphs=16"]

    def cmd(run_dir):
        return [sys.executable, "-m", "training.finetune", str(CONFIG), *_tiny(small_shards, run_dir), *steps]

    ref = subprocess.run(cmd(tmp_path / "ref"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd(run_dir), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at, deadline = None, time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
            except (RuntimeError, EOFError, OSError):  # being written
                step = 0
            if step >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.1)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 24, "the run was not killed mid-way"
    resumed = subprocess.run(cmd(run_dir) + ["--resume", "last"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(last, map_location="cpu", weights_only=True)
    assert b["global_step"] == 24 and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), f"{k} differs after resume (killed at {killed_at})"
