"""Radius graphs computed once at conversion time and stored in the shards."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

SMALL_N = 128
"""Up to this many atoms the graph comes from a dense distance matrix instead of a k-d tree."""


def radius_pairs(pos: np.ndarray, radius_A: float, max_neighbors: int) -> np.ndarray:
    """Pairs (i < j) closer than ``radius_A`` where each atom is among the other's ``max_neighbors``
    nearest atoms (the seed's chunk graphs use the same rule). Returns int32 [E, 2], sorted."""
    n = len(pos)
    if n < 2:
        return np.zeros((0, 2), np.int32)
    if n <= min(max_neighbors + 1, SMALL_N):
        # the neighbour cap cannot bind: every pair within the radius, from one dense distance matrix
        # (a tree costs ~10x more for a QM9-size molecule); squared distances, as the tree compares them
        p = np.asarray(pos, np.float64)
        d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
        i, j = np.nonzero(np.triu(d2 < radius_A * radius_A, k=1))
        return np.stack([i, j], axis=1).astype(np.int32)
    k = min(max_neighbors + 1, n)
    _, idx = cKDTree(pos).query(pos, k=k, distance_upper_bound=radius_A)  # [n, k], n marks "none"
    src = np.repeat(np.arange(n), k)
    dst = idx.reshape(-1)
    ok = (dst < n) & (dst != src)
    src, dst = src[ok], dst[ok]
    fwd = src.astype(np.int64) * n + dst
    rev = dst.astype(np.int64) * n + src
    mutual = np.isin(fwd, rev, assume_unique=True)
    keep = mutual & (src < dst)
    pairs = np.stack([src[keep], dst[keep]], axis=1).astype(np.int32)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
