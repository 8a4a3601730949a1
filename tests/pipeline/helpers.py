"""Helpers shared by the loader tests."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig, DomainConfig


def config(root: Path, **kw) -> DataConfig:
    """A loader config over ``root``; ``weights={name: w}`` builds the domain list."""
    weights = kw.pop("weights", None)
    if weights is not None:
        kw["domains"] = tuple(DomainConfig(name=k, weight=v) for k, v in weights.items())
    kw.setdefault("num_workers", 0)
    return DataConfig(root=str(root), **kw)
