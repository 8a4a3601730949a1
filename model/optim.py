"""Optimiser and learning-rate schedule: AdamW8bit (bitsandbytes) where it works, else torch AdamW;
linear warm-up then cosine decay to a floor."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from model.config import OptimConfig

log = logging.getLogger(__name__)

NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices of linear layers only; never on biases, norms, embeddings, seeds."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw8bit_works(device: torch.device) -> str | None:
    """None when bitsandbytes' AdamW8bit can step a tensor on ``device``, else the reason it cannot."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # not installed, or its native library failed to load
        return f"bitsandbytes not importable ({e})"
    p = nn.Parameter(torch.zeros(4096, device=device))  # >= 4096 elements: takes the 8-bit state path
    p.grad = torch.ones_like(p)
    try:
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
        return f"AdamW8bit cannot step on {device.type} ({type(e).__name__}: {e})"
    if not torch.isfinite(p).all():
        return f"AdamW8bit produced non-finite values on {device.type}"
    return None


def build_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.optimizer``; logs which one was chosen and why."""
    groups = param_groups(module, cfg.weight_decay)
    device = next(module.parameters()).device
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer in ("auto", "adamw8bit"):
        reason = _adamw8bit_works(device)
        if reason is None:
            import bitsandbytes as bnb

            log.info("optimizer: bitsandbytes AdamW8bit (lr %.3g, weight decay %.3g)", cfg.lr, cfg.weight_decay)
            return bnb.optim.AdamW8bit(groups, **kw)
        if cfg.optimizer == "adamw8bit":
            raise RuntimeError(f"optim.optimizer='adamw8bit' but {reason}; set optim.optimizer to 'auto' or 'adamw'")
        log.warning("optimizer: torch AdamW, because %s", reason)
    else:
        log.info("optimizer: torch AdamW (optim.optimizer='adamw')")
    return torch.optim.AdamW(groups, **kw)


def lr_factor(step: int, total_steps: int, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up over ``warmup_fraction`` of the steps
    (from 1/warmup to 1), then cosine from 1 to ``min_lr_ratio`` at ``total_steps`` (flat after)."""
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, cfg.warmup_fraction, cfg.min_lr_ratio)
    )
