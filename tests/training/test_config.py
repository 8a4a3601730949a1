"""The strict config loader and every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.strict_config import ConfigError
from training.config import Config, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
# configs/finetune*.yaml are fine-tuning configs (their own tree): tests/training/test_finetune.py loads them
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("finetune"))


def test_there_are_shipped_configs():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "multidomain.yaml", "s3.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_multidomain_config_matches_the_seed_setup():
    cfg = load_config(REPO / "configs" / "multidomain.yaml")
    assert cfg.data.max_atoms == 25_000 and cfg.data.mix_by == "atoms"
    assert {d.name: d.weight for d in cfg.data.domains} == {"protein": 60, "small_molecule": 25, "metabolite": 10, "rna": 5}
    assert cfg.model.layers == "M S M S M S P" and cfg.model.dim == 256 and cfg.model.num_heads == 8  # head_dim 32 (issue 14)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.early_stopping_patience == 15
    assert (cfg.tasks.long_range_weight, cfg.tasks.short_range_weight, cfg.tasks.mlm_weight) == (1.5, 1.0, 0.3)


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_dotted_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_stepz'; did you mean 'trainer.max_steps'"):
        load_config(_write(tmp_path, "trainer:\n  max_stepz: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'; did you mean 'model'"):
        load_config(_write(tmp_path, "modle: {}\n"))


def test_wrong_type_and_range_name_the_value(tmp_path):
    p = _write(tmp_path, "model:\n  dim: 64\n")
    with pytest.raises(ConfigError, match=r"model.dim: expected an integer, got 'wide'"):
        load_config(p, ["model.dim=wide"])
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8'"):
        load_config(p, ["trainer.precision=fp8"])
    with pytest.raises(ConfigError, match=r"data.domains\[0\]: missing required key\(s\) name"):
        load_config(p, ["data.domains=[{weight: 1}]"])
    with pytest.raises(ConfigError, match=r"expected true or false, got 'yes please'"):
        load_config(p, ["trainer.deterministic=yes please"])


def test_overrides_apply_to_any_field(tmp_path):
    p = _write(tmp_path, "model:\n  dim: 64\n  num_heads: 4\n")
    cfg = load_config(p, ["model.dim=32", "trainer.max_steps=7", "data.domains=[{name: rna, weight: 2}]"])
    assert cfg.model.dim == 32 and cfg.trainer.max_steps == 7
    assert cfg.data.domains[0].name == "rna" and cfg.data.domains[0].weight == 2.0
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(p, ["model.dim"])
