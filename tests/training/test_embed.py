"""Embeddings: raw files equal shards, node rows, predict_step equals training.embed, export / load_pretrained
round trip, and a --help that does not import torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from model.config import ModelConfig
from model.lightning_module import PretrainingModule
from model.network import MolecularESA
from model.pretrained import embed_batch, export_backbone, load_pretrained
from tests.training.conftest import REPO, TINY_MODEL
from training import embed as embed_cli

pytestmark = pytest.mark.timeout(600)


def _rows(path) -> dict[str, np.ndarray]:
    t = pq.read_table(path)
    return dict(zip(t.column("key").to_pylist(), np.asarray(t.column("embedding").to_pylist(), np.float32), strict=True))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(3)
    net = MolecularESA(ModelConfig(**TINY_MODEL))
    return net, export_backbone(net, tmp_path_factory.mktemp("export"))


def test_help_answers_without_importing_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, training.embed as e\n"
                        "try:\n    e.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
                        "print('HEAVY', sorted(m for m in ('torch', 'lightning', 'pyarrow', 'rdkit') if m in sys.modules))"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--nodes" in r.stdout and "--device" in r.stdout and "HEAVY []" in r.stdout


def test_sdf_embeddings_equal_the_shards_embeddings(small_raw, small_shards, exported, tmp_path):
    _, export = exported
    from_raw, from_shards = tmp_path / "raw.parquet", tmp_path / "shards.parquet"
    nodes_raw, nodes_shards = tmp_path / "raw_nodes.parquet", tmp_path / "shards_nodes.parquet"
    # the same folder the shards were converted from: same relative paths, so the same keys
    assert embed_cli.main([str(export), str(small_raw / "metabolite"), str(small_raw / "small_molecule"), str(from_raw),
                           "--max-atoms", "700", "--nodes", str(nodes_raw), "--no-progress"]) == 0
    assert embed_cli.main([str(export), str(small_shards), str(from_shards), "num_workers=0", "--max-atoms", "3000",
                           "--nodes", str(nodes_shards), "--no-progress"]) == 0
    raw_t = pq.read_table(from_raw)
    # raw sources were given as the domain folders themselves: keys are made from 'hmdb40.sdf#k' there, so
    # match on (source file name, record) instead
    shard_index = {}
    for dom in ("metabolite", "small_molecule"):
        ix = pq.read_table(small_shards / "index" / f"{dom}.parquet").to_pylist()
        shard_index.update({(r["source"].split("/")[-1], r["record"]): r["key"] for r in ix})
    shards = _rows(from_shards)
    assert raw_t.num_rows == len(shards) == 440
    for src, rec, emb in zip(raw_t.column("source").to_pylist(), raw_t.column("record").to_pylist(),
                             raw_t.column("embedding").to_pylist(), strict=True):
        np.testing.assert_allclose(np.asarray(emb, np.float32), shards[shard_index[(src, rec)]], atol=2e-5, rtol=1e-4)
    # node rows: one per atom, atom_index 0..n-1 within each molecule, same atoms in both
    nr, ns = pq.read_table(nodes_raw), pq.read_table(nodes_shards)
    assert nr.num_rows == ns.num_rows == int(np.sum(pq.read_table(from_shards).column("num_atoms").to_numpy()))
    sizes = dict(zip(pq.read_table(from_shards).column("key").to_pylist(),
                     pq.read_table(from_shards).column("num_atoms").to_pylist(), strict=True))
    keys, idx = ns.column("key").to_pylist(), ns.column("atom_index").to_pylist()
    per_key: dict[str, list[int]] = {}
    for k, i in zip(keys, idx, strict=True):
        per_key.setdefault(k, []).append(i)
    assert all(v == list(range(sizes[k])) for k, v in per_key.items()) and len(per_key) == 440
    # atom rows of one molecule agree between the raw and the shards path
    key_of = {k: shard_index[(s, r)] for k, s, r in zip(raw_t.column("key").to_pylist(), raw_t.column("source").to_pylist(),
                                                         raw_t.column("record").to_pylist(), strict=True)}
    raw_nodes = np.asarray(nr.column("embedding").to_pylist(), np.float32)
    shard_nodes = np.asarray(ns.column("embedding").to_pylist(), np.float32)
    start = {}
    for row, (k, i) in enumerate(zip(keys, idx, strict=True)):
        start.setdefault(k, row - i)
    for row, (k, i) in enumerate(zip(nr.column("key").to_pylist(), nr.column("atom_index").to_pylist(), strict=True)):
        np.testing.assert_allclose(raw_nodes[row], shard_nodes[start[key_of[k]] + i], atol=2e-5, rtol=1e-4)


def test_predict_step_equals_training_embed(small_shards, tmp_path):
    import lightning as L

    torch.manual_seed(1)
    module = PretrainingModule(TINY_MODEL, {"head_hidden": 16}, None, domains=["metabolite", "small_molecule"])
    cfg = embed_cli.shard_data_config(str(small_shards), "shards", ["num_workers=0"], 3000)
    table, _ = embed_cli.embed_batches(module.net, embed_cli.shard_batches(cfg, ["val"]), torch.device("cpu"),
                                       progress=False)
    batches = []
    for b in embed_cli.shard_batches(cfg, ["val"]):
        for f in ("mlm_mask", "sr_index", "lr_index"):  # inference needs no task field
            del b[f]
        batches.append(b)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    from torch.utils.data import DataLoader

    out = trainer.predict(module, dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    keys = [k for o in out for k in o["keys"]]
    got = torch.cat([o["graph_embeddings"] for o in out]).numpy()
    assert keys == table.column("key").to_pylist() and len(keys) > 0
    np.testing.assert_allclose(got, np.asarray(table.column("embedding").to_pylist(), np.float32), atol=1e-6)
    assert sum(o["node_embeddings"].shape[0] for o in out) == int(np.sum(table.column("num_atoms").to_numpy()))


def test_pretraining_batch_is_refused_for_embedding(small_shards):
    """A training batch shows masked atoms (mask token, noised positions): embedding it would describe another
    molecule, so embed_batch refuses it; the clean batch of the same molecules embeds."""
    import dataclasses

    from pipeline.loader import eval_loader, resolve

    torch.manual_seed(2)
    net = MolecularESA(ModelConfig(**TINY_MODEL)).eval()
    cfg = embed_cli.shard_data_config(str(small_shards), "shards", ["num_workers=0"], 3000)
    masked_cfg = dataclasses.replace(cfg, mask_fraction=0.3)
    clean = next(iter(eval_loader(resolve(cfg), "val", num_workers=0)))
    masked = next(iter(eval_loader(resolve(masked_cfg), "val", num_workers=0)))
    assert masked.mlm_mask.any() and masked["keys"] == clean["keys"]
    with torch.no_grad():
        a = embed_batch(net, clean)[1]
        naive = net(masked, with_tasks=False).graph_embeddings
        with pytest.raises(ValueError, match="mask_fraction=0"):
            embed_batch(net, masked)
    assert not torch.allclose(naive, a)  # masking does change the inputs: refusing it matters


def test_export_and_load_pretrained_round_trip(exported, small_shards, tmp_path):
    net, export = exported
    import model

    loaded = model.load_pretrained(export)
    assert not loaded.training and loaded.tasks is None
    for k, v in net.state_dict().items():
        if k.startswith(("encoder.", "backbone.")):
            assert torch.equal(v, loaded.state_dict()[k]), k
    cfg = embed_cli.shard_data_config(str(small_shards), "shards", ["num_workers=0"], 3000)
    batch = next(embed_cli.shard_batches(cfg, ["val"]))
    with torch.no_grad():
        torch.testing.assert_close(embed_batch(net.eval(), batch)[1], embed_batch(loaded, batch)[1], rtol=0, atol=0)
    # the safetensors file alone (config beside it) loads too; a folder without the config does not
    assert load_pretrained(export / "backbone.safetensors").cfg == net.cfg
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "backbone.safetensors").write_bytes((export / "backbone.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        load_pretrained(tmp_path / "lonely")


def test_lightning_checkpoint_exports_the_same_backbone(tmp_path):
    import lightning as L

    torch.manual_seed(4)
    module = PretrainingModule(TINY_MODEL, {"head_hidden": 16}, None, domains=["small_molecule"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=1)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    from_ckpt = load_pretrained(ckpt)
    r = subprocess.run([sys.executable, "-m", "model.pretrained", str(ckpt), str(tmp_path / "exp")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from_export = load_pretrained(tmp_path / "exp")
    sd = module.net.state_dict()
    for k, v in from_export.state_dict().items():
        assert torch.equal(v, sd[k]) and torch.equal(v, from_ckpt.state_dict()[k]), k
    assert not any(k.startswith("tasks.") for k in from_export.state_dict())


def test_embed_errors_are_one_line(tmp_path, exported, capsys):
    _, export = exported
    assert embed_cli.main([str(tmp_path / "missing.ckpt"), str(tmp_path), str(tmp_path / "o.parquet")]) == 2
    assert "no checkpoint or exported backbone" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert embed_cli.main([str(export), str(tmp_path / "empty"), str(tmp_path / "o.parquet")]) == 2
    assert "no structure files" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert embed_cli.main([str(export), str(tmp_path), str(tmp_path / "o.parquet"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
