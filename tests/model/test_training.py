"""Training through the LightningModule: finite gradients, falling losses, optimiser and schedule,
checkpoint round trip, bf16 autocast."""

from __future__ import annotations

import csv
import logging
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from model.config import ModelConfig, OptimConfig, TasksConfig
from model.lightning_module import PretrainingModule
from model.optim import lr_factor
from tests.model.helpers import DOMAINS, make_batch, mixed_samples, real_mixed_samples, small_config, small_tasks


def module(**optim) -> PretrainingModule:
    torch.manual_seed(0)
    return PretrainingModule(small_config(), small_tasks(per_domain_every_n_steps=5), OptimConfig(**optim), DOMAINS)


def trainer(tmp_path, steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
        accelerator="cpu", devices=1, **kw,
    )


def loader(batches) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


@pytest.fixture(scope="module")
def real_batches():
    samples = real_mixed_samples(protein_atoms=150)
    return [make_batch(samples, seed=s) for s in range(4)]


@pytest.mark.parametrize("distance_bias", [False, True])
def test_every_parameter_trains(real_batches, distance_bias):
    """After one optimiser step every parameter, the pooling block's included, has a finite non-zero gradient
    and has moved (no parameter is reached only through a zero-weighted term)."""
    torch.manual_seed(0)
    m = PretrainingModule(small_config(distance_bias=distance_bias), small_tasks(), OptimConfig(optimizer="adamw"), DOMAINS)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for b in real_batches[:2]:
        opt.zero_grad()
        m._step(b, "train", per_domain=True).backward()
        opt.step()
    pool = [n for n, _ in m.named_parameters() if ".pool." in n]
    assert pool, "the model has a P block"
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        # padding rows of the embeddings never train (padding_idx); every other entry must
        g = p.grad[1:] if name.endswith("type_embed.weight") or name.endswith("period_embed.weight") else p.grad
        assert float(g.abs().max()) > 0, f"{name} has an all-zero gradient"
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"


def test_loss_is_the_mean_over_all_targets(real_batches):
    m = module()
    b = real_batches[0]
    with torch.no_grad():
        out = m.net(b)
        expected = sum(
            m.tasks_cfg.weight(t) * torch.nn.functional.cross_entropy(p.logits, p.target) for t, p in out.predictions.items()
        )
        got = m._step(b, "val", per_domain=True)
    torch.testing.assert_close(got, expected)


def _read_metrics(tmp_path) -> list[dict]:
    path = next(tmp_path.rglob("metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def test_three_losses_fall_on_real_batches(tmp_path, real_batches):
    m = module(lr=2e-3, optimizer="adamw")
    trainer(tmp_path, 150).fit(m, loader(real_batches))
    rows = _read_metrics(tmp_path)
    for task in ("mlm", "short_range", "long_range"):
        vals = [float(r[f"train/{task}_loss"]) for r in rows if r.get(f"train/{task}_loss")]
        assert len(vals) >= 100
        first, last = sum(vals[:20]) / 20, sum(vals[-20:]) / 20
        assert math.isfinite(last) and last < 0.8 * first, (task, first, last)
    domain_keys = {k for r in rows for k, v in r.items() if v and "/protein" in k}
    assert "train/mlm_loss/protein" in domain_keys and "train/long_range_acc/protein" in domain_keys


def test_validation_logs_per_domain_epoch_means(tmp_path, real_batches):
    m = module()
    t = trainer(tmp_path, 2, limit_val_batches=2)
    t.validate(m, loader(real_batches))
    metrics = t.callback_metrics
    for task in ("mlm", "short_range", "long_range"):
        for d in ("protein", "small_molecule", "metabolite"):
            assert f"val/{task}_loss/{d}" in metrics and f"val/{task}_acc/{d}" in metrics
        assert 0.0 <= float(metrics[f"val/{task}_acc"]) <= 1.0
    assert "val/mlm_loss/rna" not in metrics  # no RNA in the batches: nothing logged, nothing faked


def test_bf16_autocast_trains(tmp_path, real_batches):
    m = module()
    t = trainer(tmp_path, 3, precision="bf16-mixed")
    t.fit(m, loader(real_batches))
    assert math.isfinite(float(t.callback_metrics["train/loss"]))


def test_checkpoint_round_trip(tmp_path, real_batches):
    m = module()
    t = trainer(tmp_path, 3)
    t.fit(m, loader(real_batches))
    ckpt = tmp_path / "model.ckpt"
    t.save_checkpoint(ckpt)
    loaded = PretrainingModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert loaded.model_cfg == m.model_cfg and loaded.tasks_cfg == m.tasks_cfg and loaded.optim_cfg == m.optim_cfg
    assert loaded.domains == DOMAINS
    m.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = m(real_batches[1]), loaded(real_batches[1])
    assert torch.equal(a.graph_embeddings, b.graph_embeddings)
    for task in a.predictions:
        assert torch.equal(a.predictions[task].logits, b.predictions[task].logits)
    # and training resumes from it (optimizer + scheduler state included)
    t2 = trainer(tmp_path / "resume", 5)
    t2.fit(PretrainingModule(small_config(), small_tasks(), OptimConfig(), DOMAINS), loader(real_batches), ckpt_path=ckpt)
    assert t2.global_step == 5


def test_optimizer_choice_is_logged(caplog):
    from model.optim import build_optimizer

    m = module()
    with caplog.at_level(logging.INFO, logger="model.optim"):
        o8 = build_optimizer(m.net, OptimConfig(optimizer="auto"))
        o32 = build_optimizer(m.net, OptimConfig(optimizer="adamw"))
    assert type(o8).__name__ == "AdamW8bit"  # bitsandbytes steps CPU tensors (DESIGN §10)
    assert isinstance(o32, torch.optim.AdamW)
    assert "AdamW8bit" in caplog.text and "torch AdamW" in caplog.text


def test_schedule_warmup_cosine_floor():
    f = [lr_factor(s, 100, 0.1, 0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))  # warm-up rises
    assert all(a >= b for a, b in zip(f[10:100], f[11:100], strict=False))  # cosine falls
    assert f[100] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)


def test_schedule_needs_a_length():
    m = module()
    with pytest.raises(ValueError, match="max_steps"):
        m.configure_optimizers()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers="M X P"), "letters"),
        (dict(layers="M P S"), "last"),
        (dict(dim=30, num_heads=4), "multiple of heads"),
        (dict(layers="M S P", layer_dims=(32, 32)), "one per block"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_model_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_bad_tasks_and_batches_are_reported():
    with pytest.raises(ValueError, match="long_rang"):
        TasksConfig(tasks=("long_rang",))
    with pytest.raises(ValueError, match="strictly increasing"):
        TasksConfig(short_range_bins_A=(1.0, 0.5))
    m = PretrainingModule(small_config(), small_tasks(), OptimConfig(), ["protein"])
    b = make_batch(mixed_samples())
    with pytest.raises(ValueError, match="domains"):
        m._step(b, "train", per_domain=True)
    bad = b.clone()
    bad.z[0] = 0
    with pytest.raises(ValueError, match="outside 1..118"):
        m.net(bad)


def test_per_block_widths():
    from model.network import MolecularESA

    net = MolecularESA(small_config(layers="M S P", layer_dims=(32, 48, 16), layer_heads=(4, 4, 2)), small_tasks())
    out = net(make_batch(mixed_samples()))
    assert out.node_embeddings.shape[1] == 48 and out.graph_embeddings.shape[1] == 16
