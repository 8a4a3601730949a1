"""Collate decoded samples into one PyG ``Batch``: the contract between the loader and the model.

Everything per batch is vectorised over the concatenated arrays; the only per-sample Python work is
gathering array references. All randomness comes from the ``numpy.random.Generator`` passed in, so a
batch is a pure function of (samples, generator state, options).

Fields of the returned batch (``N`` atoms, ``G`` graphs):

- ``z`` long [N]: true atomic numbers (MLM targets; the model hides masked ones itself).
- ``pos`` float32 [N, 3], Å.
- ``batch`` long [N], ``ptr`` long [G+1]: PyG's graph assignment.
- ``edge_index`` long [2, E]: radius graph inside each molecule, both directions (all i->j of the
  kept pairs, then all j->i), no self loops, *without* the held-out short-range pairs.
- ``edge_is_bond`` bool [E]: the edge is also a covalent bond.
- ``bond_index`` long [2, NB]: covalent bonds, both directions.
- ``mlm_mask`` bool [N]: atoms whose element is to be predicted.
- ``sr_index`` long [2, H]: held-out radius pairs (one direction, i < j) whose length is to be classified;
  about ``sr_fraction`` of the pairs (positions drawn with replacement, so slightly fewer).
- ``lr_index`` long [2, P]: random atom pairs, both atoms in the same molecule, i != j.
- ``domain`` long [G]: domain id (position in the loader's domain list); ``keys``: list[str] of G
  (read it as ``batch["keys"]``: ``batch.keys`` is PyG's method).

Added by the loader (:mod:`pipeline.stream`, :mod:`pipeline.loader`): ``stats`` (dict: atoms, graphs,
edges, fill, domain_atoms, domain_graphs), ``pass_index`` long [G] (training: the pass over its domain
each sample belongs to) and ``loader_seq`` (training: the batch's sequence number, used for resume). A
validation/test batch with ``num_graphs == 0`` pads a rank that has fewer planned batches than others.
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


def _cap_neighbors(src: np.ndarray, dst: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask: for each source atom keep its ``k`` nearest destinations (ties by order)."""
    order = np.lexsort((dist, src))
    s_sorted = src[order]
    start = np.searchsorted(s_sorted, s_sorted, side="left")
    rank = np.arange(len(order)) - start
    keep = np.zeros(len(order), bool)
    keep[order[rank < k]] = True
    return keep


def _offset_pairs(parts: list[np.ndarray], offsets: np.ndarray, dtype) -> np.ndarray:
    """Concatenate per-sample [k, 2] index arrays, shifting each by its sample's first atom.

    One pass: each part is shifted straight into its rows of the (new) output; samples are never modified.
    """
    total = sum(p.shape[0] for p in parts)
    out = np.empty((total, 2), dtype)
    a = 0
    for p, o in zip(parts, offsets.tolist(), strict=True):
        b = a + p.shape[0]
        np.add(p, o, out=out[a:b], dtype=dtype)
        a = b
    return out


def _check_radius(samples: list[Sample], opt: CollateOptions) -> tuple[bool, bool]:
    """Refuse options the shards cannot serve; say whether distance / neighbour filtering is needed."""
    radii = np.fromiter((s.radius_A for s in samples), np.float64, len(samples))
    caps = np.fromiter((s.max_neighbors for s in samples), np.int64, len(samples))
    if len(samples) and (opt.radius_A > radii.min() + 1e-6 or opt.max_neighbors > caps.min()):
        s = samples[int(np.argmin(radii) if opt.radius_A > radii.min() + 1e-6 else np.argmin(caps))]
        raise ValueError(
            f"sample {s.key} was converted with radius {s.radius_A} Å / max_neighbors {s.max_neighbors}, "
            f"but the loader asks for radius {opt.radius_A} Å / max_neighbors {opt.max_neighbors}; "
            "lower them in the config or re-convert with larger --radius/--max-neighbors"
        )
    need_dist = len(samples) > 0 and opt.radius_A < radii.max() - 1e-6
    need_cap = len(samples) > 0 and opt.max_neighbors < caps.max()
    return bool(need_dist), bool(need_cap)


def radius_pairs(samples: list[Sample], offsets: np.ndarray, pos: np.ndarray, opt: CollateOptions) -> np.ndarray:
    """Stored radius pairs (i < j) of all samples, filtered to ``opt.radius_A`` and ``opt.max_neighbors``.

    The stored pairs already satisfy the converter's cutoff and cap; filtering (a distance per pair) only
    runs when the options ask for less. Returned as int32 when the batch has fewer than 2**31 atoms.
    """
    need_dist, need_cap = _check_radius(samples, opt)
    n = int(offsets[-1] + samples[-1].num_atoms) if samples else 0
    dtype = np.int32 if n < 2**31 - 1 else np.int64
    pairs = _offset_pairs([s.edges for s in samples], offsets, dtype)
    if len(pairs) == 0 or not (need_dist or need_cap):
        return pairs
    d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
    keep = d <= opt.radius_A
    pairs, d = pairs[keep], d[keep]
    if need_cap:
        # a pair survives when both directions survive the per-atom cap
        both_src = np.concatenate([pairs[:, 0], pairs[:, 1]])
        both_dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
        kept = _cap_neighbors(both_src, both_dst, np.concatenate([d, d]), opt.max_neighbors)
        m = len(pairs)
        pairs = pairs[kept[:m] & kept[m:]]
    return pairs


def _bond_flags(pairs: np.ndarray, bonds: np.ndarray, n_atoms: int) -> np.ndarray:
    """Which radius pairs (i < j) are covalent bonds (i < j): a binary search of the few bonds in the pairs."""
    flags = np.zeros(len(pairs), bool)
    if len(bonds) == 0 or len(pairs) == 0:
        return flags
    # code i * n + j, in int32 while n * n fits (half the bytes to write, compare and search)
    ct = np.int32 if n_atoms * n_atoms < 2**31 and pairs.dtype == np.int32 and bonds.dtype == np.int32 else np.int64
    code_p = pairs[:, 0].astype(ct) * ct(n_atoms)
    code_p += pairs[:, 1]
    if len(code_p) > 1 and not (code_p[1:] >= code_p[:-1]).all():  # the converter writes them sorted
        order = np.argsort(code_p, kind="stable")
        hit = _bond_flags(pairs[order], bonds, n_atoms)
        flags[order] = hit
        return flags
    code_b = bonds[:, 0].astype(ct) * ct(n_atoms)
    code_b += bonds[:, 1]
    idx = np.searchsorted(code_p, code_b)
    ok = idx < len(code_p)
    idx, code_b = idx[ok], code_b[ok]
    flags[idx[code_p[idx] == code_b]] = True
    return flags


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


def _split_pairs(pairs: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pairs[held], pairs[~held]); an int32 pair is compressed as one 8-byte item (much faster than 2-D masking)."""
    if pairs.dtype == np.int32 and pairs.flags.c_contiguous and len(pairs):
        flat = pairs.view(np.int64).reshape(-1)
        sr, kept = np.compress(held, flat), np.compress(~held, flat)  # np.compress: faster than flat[held]
        return sr.view(np.int32).reshape(-1, 2), kept.view(np.int32).reshape(-1, 2)
    return pairs[held], pairs[~held]


def _both_directions(pairs: np.ndarray) -> np.ndarray:
    """[k, 2] pairs (i, j) to a long [2, 2k] index: all (i, j) then all (j, i)."""
    k = len(pairs)
    out = np.empty((2, 2 * k), np.int64)
    out[0, :k] = pairs[:, 0]
    out[0, k:] = pairs[:, 1]
    out[1, :k] = pairs[:, 1]
    out[1, k:] = pairs[:, 0]
    return out


def collate_compact(
    samples: list[Sample], domain_ids: list[int], opt: CollateOptions, rng: np.random.Generator
) -> dict:
    """All the per-batch work of :func:`collate`, in a compact form (int32 pairs stored once, uint8 elements).

    DataLoader workers return this: it is a third of the bytes of the finished batch, and moving bytes
    from a worker to the main process costs about as much as computing them. :func:`expand` finishes it.
    """
    g = len(samples)
    counts = np.fromiter((s.z.shape[0] for s in samples), np.int64, g)
    ptr = np.zeros(g + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    offsets = ptr[:-1]
    n = int(ptr[-1])
    z = np.concatenate([s.z for s in samples]) if g else np.zeros(0, np.uint8)
    pos = np.concatenate([s.pos for s in samples]).astype(np.float32, copy=False) if g else np.zeros((0, 3), np.float32)
    idx_t = np.int32 if n < 2**31 - 1 else np.int64
    bonds = _offset_pairs([s.bonds for s in samples], offsets, idx_t)  # i < j (schema)

    pairs = radius_pairs(samples, offsets, pos, opt) if g else np.zeros((0, 2), np.int32)
    # held-out short-range pairs: about sr_fraction of the pairs, positions drawn with replacement
    n_pairs = len(pairs)
    held = np.zeros(n_pairs, bool)
    if n_pairs and opt.sr_fraction > 0:
        held[rng.integers(0, n_pairs, int(rng.binomial(n_pairs, opt.sr_fraction)))] = True
    sr, kept = _split_pairs(pairs, held)
    kept_bond = _bond_flags(kept, bonds, n)

    n_mask = max(1, int(round(opt.mask_fraction * n))) if n and opt.mask_fraction > 0 else 0
    mlm_mask = np.zeros(n, bool)
    if n_mask:
        mlm_mask[rng.choice(n, size=n_mask, replace=False)] = True

    lr = _long_range_pairs(counts, offsets, opt, rng)
    t = torch.from_numpy
    return {
        "z": t(np.ascontiguousarray(z, np.uint8)),
        "pos": t(np.ascontiguousarray(pos)),
        "counts": t(counts),
        "pairs": t(np.ascontiguousarray(kept)),
        "pair_is_bond": t(kept_bond),
        "bonds": t(np.ascontiguousarray(bonds)),
        "mlm_mask": t(mlm_mask),
        "sr": t(np.ascontiguousarray(sr)),
        "lr": t(lr),
        "domain": torch.tensor(domain_ids, dtype=torch.long),
        "keys": [s.key for s in samples],
    }


def expand(c: dict) -> Batch:
    """The PyG batch (module docstring) from :func:`collate_compact`'s output."""
    counts = c["counts"]
    g = int(counts.shape[0])
    ptr = torch.zeros(g + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=ptr[1:])
    pair_bond = c["pair_is_bond"]
    out = Batch(
        z=c["z"].long(),
        pos=c["pos"],
        batch=torch.repeat_interleave(torch.arange(g), counts),
        ptr=ptr,
        edge_index=torch.from_numpy(_both_directions(c["pairs"].numpy())),
        edge_is_bond=torch.cat([pair_bond, pair_bond]),
        bond_index=torch.from_numpy(_both_directions(c["bonds"].numpy())),
        mlm_mask=c["mlm_mask"],
        sr_index=c["sr"].T.long().contiguous(),
        lr_index=c["lr"],
        domain=c["domain"],
        keys=c["keys"],
    )
    out._num_graphs = g
    return out


def collate(
    samples: list[Sample], domain_ids: list[int], opt: CollateOptions, rng: np.random.Generator
) -> Batch:
    """Build the PyG batch of ``samples`` (see the module docstring for its fields).

    An empty ``samples`` list gives a valid batch with zero graphs (used to pad evaluation ranks).
    """
    return expand(collate_compact(samples, domain_ids, opt, rng))
