"""Collate decoded samples into one PyG ``Batch``: the contract between the loader and the model.

Everything per batch is vectorised over the concatenated arrays; the only per-sample Python work is
gathering array references. All randomness comes from the ``numpy.random.Generator`` passed in, so a
batch is a pure function of (samples, generator state, options).

Fields of the returned batch (``N`` atoms, ``G`` graphs):

- ``z`` long [N]: true atomic numbers (MLM targets; the model hides masked ones itself).
- ``pos`` float32 [N, 3], Å.
- ``batch`` long [N], ``ptr`` long [G+1]: PyG's graph assignment.
- ``edge_index`` long [2, E]: radius graph inside each molecule, both directions, no self loops,
  *without* the held-out short-range pairs.
- ``edge_is_bond`` bool [E]: the edge is also a covalent bond.
- ``bond_index`` long [2, NB]: covalent bonds, both directions.
- ``mlm_mask`` bool [N]: atoms whose element is to be predicted.
- ``sr_index`` long [2, H]: held-out radius pairs (one direction) whose length is to be classified.
- ``lr_index`` long [2, P]: random atom pairs, both atoms in the same molecule, i != j.
- ``domain`` long [G]: domain id (position in the loader's domain list); ``keys``: list[str] of G.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_geometric.data import Batch

from pipeline.schema import Sample


@dataclass(frozen=True)
class CollateOptions:
    """Per-batch transforms applied while collating."""

    radius_A: float = 5.0
    """Radius-graph cutoff in Å; must not exceed the cutoff the shards were written with."""
    max_neighbors: int = 64
    """Keep at most this many nearest radius neighbours per atom (the shards' cap is the upper bound)."""
    mask_fraction: float = 0.15
    """Fraction of atoms selected for masked-atom prediction (at least one per batch)."""
    sr_fraction: float = 0.1
    """Fraction of radius pairs held out of the input for short-range distance prediction."""
    lr_pairs_per_atom: float = 0.5
    """Random same-molecule pairs per atom for long-range distance prediction."""


def _edges_from_samples(samples: list[Sample], offsets: np.ndarray) -> np.ndarray:
    parts = [s.edges.astype(np.int64, copy=False) + off for s, off in zip(samples, offsets, strict=True)]
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)


def _cap_neighbors(src: np.ndarray, dst: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask: for each source atom keep its ``k`` nearest destinations (ties by order)."""
    order = np.lexsort((dist, src))
    s_sorted = src[order]
    start = np.searchsorted(s_sorted, s_sorted, side="left")
    rank = np.arange(len(order)) - start
    keep = np.zeros(len(order), bool)
    keep[order[rank < k]] = True
    return keep


def radius_pairs(samples: list[Sample], offsets: np.ndarray, pos: np.ndarray, opt: CollateOptions) -> np.ndarray:
    """Stored radius pairs (i < j) of all samples, filtered to ``opt.radius_A`` and ``opt.max_neighbors``."""
    for s in samples:
        if opt.radius_A > s.radius_A + 1e-6 or opt.max_neighbors > s.max_neighbors:
            raise ValueError(
                f"sample {s.key} was converted with radius {s.radius_A} Å / max_neighbors {s.max_neighbors}, "
                f"but the loader asks for radius {opt.radius_A} Å / max_neighbors {opt.max_neighbors}; "
                "lower them in the config or re-convert with larger --radius/--max-neighbors"
            )
    pairs = _edges_from_samples(samples, offsets)
    if len(pairs) == 0:
        return pairs
    d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
    keep = d <= opt.radius_A
    pairs, d = pairs[keep], d[keep]
    if any(opt.max_neighbors < s.max_neighbors for s in samples):
        # a pair survives when both directions survive the per-atom cap
        both_src = np.concatenate([pairs[:, 0], pairs[:, 1]])
        both_dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
        kept = _cap_neighbors(both_src, both_dst, np.concatenate([d, d]), opt.max_neighbors)
        m = len(pairs)
        pairs = pairs[kept[:m] & kept[m:]]
    return pairs


def _bond_flags(pairs: np.ndarray, bonds: np.ndarray, n_atoms: int) -> np.ndarray:
    if len(bonds) == 0 or len(pairs) == 0:
        return np.zeros(len(pairs), bool)
    code_p = pairs[:, 0] * n_atoms + pairs[:, 1]
    code_b = np.sort(bonds[:, 0] * n_atoms + bonds[:, 1])
    idx = np.searchsorted(code_b, code_p).clip(max=len(code_b) - 1)
    return code_b[idx] == code_p


def _long_range_pairs(counts: np.ndarray, offsets: np.ndarray, opt: CollateOptions, rng: np.random.Generator):
    """Uniform random ordered pairs (i != j) inside each molecule with at least two atoms."""
    eligible = counts >= 2
    per_mol = np.where(eligible, np.maximum(1, np.round(counts * opt.lr_pairs_per_atom)).astype(np.int64), 0)
    mol = np.repeat(np.arange(len(counts)), per_mol)
    if len(mol) == 0:
        return np.zeros((2, 0), np.int64)
    n = counts[mol]
    i = rng.integers(0, n)
    j = rng.integers(0, n - 1)
    j = j + (j >= i)  # skip i itself: uniform over the other n-1 atoms
    return np.stack([i + offsets[mol], j + offsets[mol]])


def collate(
    samples: list[Sample], domain_ids: list[int], opt: CollateOptions, rng: np.random.Generator
) -> Batch:
    """Build the PyG batch of ``samples`` (see the module docstring for its fields)."""
    counts = np.array([s.num_atoms for s in samples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    n = int(counts.sum())
    z = np.concatenate([s.z for s in samples]).astype(np.int64)
    pos = np.concatenate([s.pos for s in samples]).astype(np.float32, copy=False)
    bonds = np.concatenate(
        [s.bonds.astype(np.int64, copy=False) + off for s, off in zip(samples, offsets, strict=True)]
    ) if samples else np.zeros((0, 2), np.int64)

    pairs = radius_pairs(samples, offsets, pos, opt)
    is_bond = _bond_flags(pairs, np.sort(bonds, axis=1), n)
    held = rng.random(len(pairs)) < opt.sr_fraction
    sr = pairs[held].T
    kept, kept_bond = pairs[~held], is_bond[~held]
    edge_index = np.concatenate([kept.T, kept[:, ::-1].T], axis=1)
    edge_is_bond = np.concatenate([kept_bond, kept_bond])

    n_mask = max(1, int(round(opt.mask_fraction * n))) if n else 0
    mlm_mask = np.zeros(n, bool)
    mlm_mask[rng.choice(n, size=n_mask, replace=False)] = True

    lr = _long_range_pairs(counts, offsets, opt, rng)
    batch_vec = np.repeat(np.arange(len(samples)), counts)

    out = Batch(
        z=torch.from_numpy(z),
        pos=torch.from_numpy(np.ascontiguousarray(pos)),
        batch=torch.from_numpy(batch_vec),
        ptr=torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])),
        edge_index=torch.from_numpy(np.ascontiguousarray(edge_index)),
        edge_is_bond=torch.from_numpy(edge_is_bond),
        bond_index=torch.from_numpy(np.ascontiguousarray(np.concatenate([bonds.T, bonds[:, ::-1].T], axis=1))),
        mlm_mask=torch.from_numpy(mlm_mask),
        sr_index=torch.from_numpy(np.ascontiguousarray(sr)),
        lr_index=torch.from_numpy(lr),
        domain=torch.tensor(domain_ids, dtype=torch.long),
        keys=[s.key for s in samples],
    )
    out._num_graphs = len(samples)
    return out
