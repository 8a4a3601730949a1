"""Pure planning on index arrays: which samples a (rank, worker) slot reads in a pass, and mixing weights.

A *pass* over a domain: its shards are cut into read blocks (the block members that start in one
``read_block_bytes`` window of a shard), the blocks are permuted with a generator seeded by (seed, domain, pass), and the
concatenated sample ids are cut into ``n_slots`` contiguous pieces of equal length (±1). Slot ``g``
(``rank * num_workers + worker``) reads piece ``(g + pass) % n_slots``. The pieces partition the pass, so
every sample is read exactly once per pass across all ranks and workers, at sample granularity: it
works with one shard for the whole world. The rotation lets a domain smaller than the world reach every
slot over successive passes.
"""

from __future__ import annotations

import zlib

import numpy as np


def domain_key(name: str) -> int:
    """A stable integer for a domain name (seeds must not depend on Python's salted ``hash``)."""
    return zlib.crc32(name.encode())


def rng_for(*ints: int) -> np.random.Generator:
    """A generator seeded only from integers."""
    return np.random.default_rng([int(i) & 0xFFFFFFFF for i in ints])


def read_blocks(shard: np.ndarray, offset: np.ndarray, block_bytes: int) -> np.ndarray:
    """Read block id of every sample or block member (sorted by shard, offset): those whose member starts in the same
    ``block_bytes`` window of a shard. A read block never spans two shards and never splits a block member (its
    samples share its offset)."""
    n = len(shard)
    if n == 0:
        return np.zeros(0, np.int64)
    window = offset // max(1, int(block_bytes))
    change = np.concatenate([[True], (shard[1:] != shard[:-1]) | (window[1:] != window[:-1])])
    return np.cumsum(change) - 1


def pass_order(blocks: np.ndarray, seed: int, domain: str, pass_: int) -> np.ndarray:
    """All sample ids of a domain in the read order of one pass (blocks permuted, contiguous inside); int32 while
    the ids fit (half the memory of a pass's order), int64 beyond."""
    n = len(blocks)
    if n == 0:
        return np.zeros(0, np.int64)
    dt = np.int32 if n < 2**31 else np.int64
    starts = np.flatnonzero(np.concatenate([[True], blocks[1:] != blocks[:-1]]))
    lengths = np.diff(np.concatenate([starts, [n]]))
    perm = rng_for(seed, domain_key(domain), pass_, 0x5A5A).permutation(len(starts))
    s, ln = starts[perm], lengths[perm]
    out_start = np.concatenate([[0], np.cumsum(ln)[:-1]])
    return np.repeat((s - out_start).astype(dt), ln) + np.arange(n, dtype=dt)


def slot_piece(order: np.ndarray, slot: int, n_slots: int, pass_: int) -> np.ndarray:
    """The contiguous piece of a pass that ``slot`` reads (see the module docstring)."""
    n = len(order)
    piece = (slot + pass_) % n_slots
    lo, hi = (piece * n) // n_slots, ((piece + 1) * n) // n_slots
    return order[lo:hi]


def sample_probabilities(
    weights: np.ndarray, mean_atoms: np.ndarray, sizes: np.ndarray, mix_by: str, temperature: float
) -> np.ndarray:
    """Per-sample draw probability of each domain.

    - ``samples``: p_d ∝ w_d (share of samples);
    - ``atoms``: p_d ∝ w_d / mean_atoms_d, so domain d supplies a share w_d of the atoms;
    - ``temperature``: p_d ∝ w_d · n_d^(1/T) over dataset sizes n_d (T=1: natural proportions, large T: uniform).
    """
    w = np.asarray(weights, np.float64)
    if mix_by == "samples":
        p = w.copy()
    elif mix_by == "atoms":
        p = w / np.maximum(np.asarray(mean_atoms, np.float64), 1e-12)
    elif mix_by == "temperature":
        p = w * np.asarray(sizes, np.float64) ** (1.0 / temperature)
    else:
        raise ValueError(f"mix_by={mix_by!r}: use 'samples', 'atoms' or 'temperature'")
    p = np.where(np.asarray(sizes) > 0, p, 0.0)
    if p.sum() <= 0:
        raise ValueError("every domain with a positive weight is empty; check data.domains and the shards root")
    return p / p.sum()
