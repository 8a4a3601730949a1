"""Train/val/test assignment from each sample's key alone (pure functions)."""

from __future__ import annotations

import hashlib

MIN_FOR_HOLDOUT = 10
"""A domain with at least this many samples gets at least one val and one test sample (when the
corresponding fraction is above zero), however small the fractions."""


def key_position(key: str) -> float:
    """Where ``key`` falls in [0, 1): a stable hash, so adding data never moves existing samples."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split of one key from its position: [0, test) test, [test, test + val) val, else train."""
    u = key_position(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(keys: list[str], val_fraction: float, test_fraction: float,
                  min_for_holdout: int = MIN_FOR_HOLDOUT) -> list[str]:
    """Splits of one domain's keys: :func:`assign_split`, then, in a domain of at least ``min_for_holdout``
    samples whose val (or test) split came out empty, the train key lowest in key-hash order after the
    test range moves there (test first). Deterministic; independent of the order of ``keys``."""
    out = [assign_split(k, val_fraction, test_fraction) for k in keys]
    if len(keys) < min_for_holdout:
        return out
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction <= 0 or split in out:
            continue
        train = [i for i, s in enumerate(out) if s == "train"]
        if len(train) > 1:
            out[min(train, key=lambda i: (key_position(keys[i]), keys[i]))] = split
    return out
