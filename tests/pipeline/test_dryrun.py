"""The dry-run CLI on the demo shards and on a YAML config."""

from __future__ import annotations

import json

from pipeline.demo import ensure_demo_shards
from pipeline.dryrun import main
from pipeline.loader import resolve
from tests.pipeline.helpers import config


def test_folder_streams_exactly_one_pass(small_shards, capsys):
    assert main([str(small_shards), "--json", "--workers", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    total = sum(len(ix) for ix in resolve(config(small_shards)).train)
    assert out["samples"] == out["unique_keys"] == total
    assert out["largest_by_atoms"]["atoms"] <= 25_000 and out["fill_mean"] > 0.5
    assert abs(sum(out["share_samples"].values()) - 1) < 1e-3


def test_yaml_config_streams_training_batches(small_shards, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"data:\n  root: {small_shards}\n  max_atoms: 4000\n  oversize_policy: crop\n  num_workers: 0\n"
        "  domains:\n    - {name: protein, weight: 0.5}\n    - {name: small_molecule, weight: 0.5}\n"
        "model:\n  dim: 8\n"
    )
    assert main([str(cfg), "--batches", "7"]) == 0
    text = capsys.readouterr().out
    assert "batches 7" in text and "largest by edges" in text and "oversize_cropped" in text


def test_corrupt_payload_is_caught_by_crc(small_shards, tmp_path):
    import shutil

    import pytest

    from pipeline.index import load_domain_index
    from pipeline.loader import TrainLoader
    from pipeline.schema import SchemaError

    root = tmp_path / "flip"
    shutil.copytree(small_shards, root)
    ix = load_domain_index(str(root), "small_molecule", "train")
    with open(ix.shard_urls[0], "r+b") as f:  # flip one byte of the last array (coordinates stay parseable)
        at = int(ix.member_offset[0] + ix.member_size[0] - 3)
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    cfg = config(root, weights={"small_molecule": 1.0}, max_atoms=3000, train_batches_per_epoch=3)
    with pytest.raises(SchemaError, match="crc32"):
        list(TrainLoader(resolve(cfg)))


def test_demo_shards_are_converted_on_first_use(demo_raw, tmp_path):
    target = tmp_path / "shards"
    ensure_demo_shards(str(tmp_path / "elsewhere"), demo_raw, target)  # another root: untouched
    assert not target.exists()
    small = tmp_path / "raw"
    (small / "metabolite").mkdir(parents=True)
    (small / "metabolite" / "m.sdf").write_bytes((demo_raw / "metabolite" / "metabolites_ccd_hmdb.sdf").read_bytes())
    ensure_demo_shards(str(target), small, target)
    assert (target / "manifest.json").exists()
