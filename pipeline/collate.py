"""Collate decoded samples into one PyG ``Batch``: the contract between the loader and the model.

Everything per batch is vectorised over the batch's samples as one :class:`~pipeline.items.Block` (arrays
concatenated, offsets per sample): no per-sample Python work in :func:`collate_block`. All randomness (which atoms are masked, their noise, held-out pairs,
long-range pairs) comes from the ``numpy.random.Generator`` passed in -- the stream seeds it from
(seed, slot, batch number) -- so a batch is a pure function of (samples, generator state, options),
deterministic and resumable.

The batch has two kinds of fields. **Inputs** are all the encoder and backbone may read; **targets**
are read by the pretraining tasks only, and no target is recoverable from the inputs (the leakage
tests in ``tests/model/test_leakage.py`` fit a classifier on the inputs to check it). A batch built with
``mask_fraction = sr_fraction = lr_pairs_per_atom = 0`` (embedding, inference) has empty target fields
and inputs equal to the clean molecule; the backbone needs only the input fields.

Inputs (``N`` atoms, ``G`` graphs):

- ``z`` long [N]: atom types the model sees: the atomic number (1..118), or :data:`MASK_TOKEN` (119) at
  a masked atom (with ``mask_random_fraction`` / ``mask_keep_fraction``, some masked atoms show a random
  element of the batch or their own instead, BERT's 80/10/10).
- ``pos`` float32 [N, 3], Å: coordinates; a masked atom's are shifted by uniform noise in
  ``±mask_noise_A`` per axis *before* any input distance or edge is computed.
- ``batch`` long [N], ``ptr`` long [G+1]: PyG's graph assignment.
- ``edge_index`` long [2, E]: radius graph inside each molecule on the input positions, both directions
  (all i->j of the pairs, then all j->i), no self loops, *without* the held-out short-range pairs. Pairs
  between unmasked atoms are the stored ones; a masked atom's pairs are rebuilt from its noised position
  (its ``max_neighbors`` nearest within ``radius_A``).
- ``edge_is_bond`` bool [E]: the edge is also a bond of ``bond_index``.
- ``bond_index`` long [2, NB]: covalent bonds, both directions, without the bonds of masked atoms and
  without the held-out short-range pairs.
- ``domain`` long [G]: domain id (position in the loader's domain list); ``keys``: list[str] of G
  (read it as ``batch["keys"]``: ``batch.keys`` is PyG's method).

Targets (tasks only):

- ``mlm_mask`` bool [N]: atoms whose element is to be predicted (``mask_fraction`` of every molecule with
  at least 2 atoms, at least one each; molecules of 1 atom never); ``mlm_target`` long [M]: their true
  atomic numbers, in atom order (``M = mlm_mask.sum()``).
- ``sr_index`` long [2, H]: held-out radius pairs (i < j, neither atom masked), about ``sr_fraction`` of the
  eligible pairs (positions drawn with replacement, so slightly fewer); ``sr_target`` float32 [H]: their
  clean length, Å.
- ``lr_index`` long [2, P]: same-molecule pairs, i != j, whose distance the input does not show (clean
  distance beyond ``radius_A``, so no input edge, or touching a masked atom, whose distance is noised),
  drawn stratified by distance (``lr_strata_A``) so every distance range a molecule has is sampled about equally;
  ``lr_target`` float32 [P]: their clean length, Å.

Added by the loader (:mod:`pipeline.stream`, :mod:`pipeline.loader`): ``stats`` (dict: atoms, graphs,
edges, fill, domain_atoms, domain_graphs), ``pass_index`` long [G] (training: the pass over its domain
each sample belongs to) and ``loader_seq`` (training: the batch's sequence number, used for resume). A
validation/test batch with ``num_graphs == 0`` pads a rank that has fewer planned batches than others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch_geometric.data import Batch

from pipeline.config import LR_STRATA_A
from pipeline.items import Block, Rows, gather, ranges
from pipeline.schema import Sample

MASK_TOKEN = 119
"""Input type of a masked atom: distinct from padding (0) and from every element (1..118)."""

INPUT_FIELDS = ("z", "pos", "batch", "ptr", "edge_index", "edge_is_bond", "bond_index", "domain")
"""Fields the encoder and backbone may read."""
TARGET_FIELDS = ("mlm_mask", "mlm_target", "sr_index", "sr_target", "lr_index", "lr_target")
"""Fields only the pretraining tasks read."""



@dataclass(frozen=True)
class CollateOptions:
    """Per-batch transforms applied while collating."""

    radius_A: float = 5.0
    """Radius-graph cutoff in Å; must not exceed the cutoff the shards were written with."""
    max_neighbors: int = 64
    """Keep at most this many nearest radius neighbours per atom (the shards' cap is the upper bound)."""
    mask_fraction: float = 0.15
    """Fraction of each molecule's atoms masked for element prediction (at least one per molecule of >= 2 atoms)."""
    mask_noise_A: float = 1.0
    """Masked atoms' coordinates get uniform noise in [-this, this] per axis, Å (0 = none; Uni-Mol uses 1)."""
    mask_random_fraction: float = 0.0
    """Share of masked atoms that show a random element of the batch instead of the mask token (BERT: 0.1)."""
    mask_keep_fraction: float = 0.0
    """Share of masked atoms that show their own element (BERT: 0.1); still noised and still targets."""
    sr_fraction: float = 0.1
    """Fraction of the radius pairs between unmasked atoms held out of the input for short-range prediction."""
    lr_pairs_per_atom: float = 0.5
    """Long-range pairs per atom of each molecule (at least one per molecule of >= 2 atoms), pairs/atom."""
    lr_strata_A: tuple[float, ...] = LR_STRATA_A
    """Distance strata of the long-range sampling, Å: candidates are drawn evenly from each stratum a molecule has."""
    lr_candidates: int = 4
    """Uniform candidate pairs drawn per long-range pair before stratified selection (count)."""
    max_edges: int | None = None
    """The batch's edge budget (``data.max_edges``): directed input edges + 2 per held-out pair never exceed it,
    even where masked atoms' pairs rebuilt on noised positions outnumber their stored ones (the farthest go)."""


def _dist(pos: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float32 distances |pos[i] - pos[j]| (``np.take`` of rows: about twice as fast as ``pos[i]``)."""
    diff = np.take(pos, i, axis=0) - np.take(pos, j, axis=0)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff)).astype(np.float32, copy=False)


def _cap_neighbors(src: np.ndarray, dst: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Boolean keep-mask: for each source atom keep its ``k`` nearest destinations (ties by order)."""
    order = np.lexsort((dist, src))
    s_sorted = src[order]
    start = np.searchsorted(s_sorted, s_sorted, side="left")
    rank = np.arange(len(order)) - start
    keep = np.zeros(len(order), bool)
    keep[order[rank < k]] = True
    return keep


def _offset_pairs(pairs: np.ndarray, counts: np.ndarray, offsets: np.ndarray, dtype) -> np.ndarray:
    """Per-sample [k, 2] index arrays concatenated in ``pairs`` (``counts`` rows each), shifted by their sample's
    first atom: one broadcast add into a new array (the block is never modified)."""
    out = pairs.astype(dtype, copy=True).reshape(-1, 2)
    if len(out):
        out += np.repeat(offsets.astype(dtype, copy=False), counts)[:, None]
    return out


def _check_radius(radii: np.ndarray, caps: np.ndarray, keys: list[str], opt: CollateOptions) -> tuple[bool, bool]:
    """Refuse options the shards cannot serve; say whether distance / neighbour filtering is needed."""
    if len(radii) and (opt.radius_A > radii.min() + 1e-6 or opt.max_neighbors > caps.min()):
        k = int(np.argmin(radii) if opt.radius_A > radii.min() + 1e-6 else np.argmin(caps))
        raise ValueError(
            f"sample {keys[k]} was converted with radius {float(radii[k])} Å / max_neighbors {int(caps[k])}, "
            f"but the loader asks for radius {opt.radius_A} Å / max_neighbors {opt.max_neighbors}; "
            "lower them in the config or re-convert with larger --radius/--max-neighbors"
        )
    need_dist = len(radii) > 0 and opt.radius_A < radii.max() - 1e-6
    need_cap = len(radii) > 0 and opt.max_neighbors < caps.max()
    return bool(need_dist), bool(need_cap)


def radius_pairs(pairs: np.ndarray, pos: np.ndarray, need_dist: bool, need_cap: bool, opt: CollateOptions) -> np.ndarray:
    """Stored radius pairs (i < j, batch-wide indices), filtered to ``opt.radius_A`` and ``opt.max_neighbors``.

    The stored pairs already satisfy the converter's cutoff and cap; filtering (a distance per pair) only
    runs when the options ask for less (``need_dist``, ``need_cap`` from :func:`_check_radius`).
    """
    if len(pairs) == 0 or not (need_dist or need_cap):
        return pairs
    d = _dist(pos, pairs[:, 0], pairs[:, 1])
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


def _pair_codes(pairs: np.ndarray, n: int) -> np.ndarray:
    """int64 code ``min * n + max`` of each unordered pair [k, 2]."""
    a = pairs[:, 0].astype(np.int64)
    b = pairs[:, 1].astype(np.int64)
    return np.minimum(a, b) * n + np.maximum(a, b)


def _is_in(codes: np.ndarray, sorted_codes: np.ndarray) -> np.ndarray:
    """Membership of ``codes`` in the sorted array ``sorted_codes`` (binary search)."""
    if len(sorted_codes) == 0 or len(codes) == 0:
        return np.zeros(len(codes), bool)
    idx = np.minimum(np.searchsorted(sorted_codes, codes), len(sorted_codes) - 1)
    return sorted_codes[idx] == codes


def mask_atoms(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Bool [N]: ``round(fraction * n)`` random atoms of each molecule of ``n >= 2`` atoms, at least one, at most n-1."""
    n = int(counts.sum())
    mask = np.zeros(n, bool)
    if n == 0 or fraction <= 0:
        return mask
    gid = np.repeat(np.arange(len(counts)), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.where(counts >= 2, np.clip(np.round(fraction * counts), 1, counts - 1), 0).astype(np.int64)
    # atoms of each molecule in random order, molecules in order: one sort of (molecule + uniform in [0, 1))
    order = np.argsort(gid + rng.random(n))
    mask[order[np.arange(n) - start < k[gid]]] = True
    return mask


def masked_neighbours(pos: np.ndarray, ptr: np.ndarray, atoms: np.ndarray, opt: CollateOptions) -> np.ndarray:
    """Radius pairs (i < j) touching ``atoms`` on positions ``pos``: each listed atom's ``max_neighbors`` nearest
    atoms of its own molecule (``ptr``: the molecules' first atoms) within ``radius_A``.

    In a molecule of at most ``max_neighbors + 1`` atoms the cap cannot bind: a listed atom's distances to every
    atom of its molecule are computed directly (small molecules: no tree), and a pair of two listed atoms is kept
    from its lower end only. Larger molecules share one k-d tree (moved apart so no pair across molecules is within
    the radius); there a pair of a listed and an unlisted atom is found once (only the listed end is queried), and
    pairs of two listed atoms, found from either end, are deduplicated: the union of both ends' capped neighbour
    lists, never a pair twice. Order: small molecules' pairs (by query), then large ones' with one listed atom, then
    those of two listed atoms sorted."""
    n = len(pos)
    if len(atoms) == 0 or n < 2:
        return np.zeros((0, 2), np.int64)
    counts = np.diff(ptr)
    gid = np.repeat(np.arange(len(counts)), counts)
    g = gid[atoms]
    small = counts[g] <= opt.max_neighbors + 1
    listed = np.zeros(n, bool)
    listed[atoms] = True
    out = []
    q = atoms[small]
    if len(q):
        c = counts[g[small]]
        cand = ranges(ptr[g[small]], c)
        src = np.repeat(q, c)
        diff = np.take(pos, cand, axis=0) - np.repeat(np.take(pos, q, axis=0), c, axis=0)
        ok = np.einsum("ij,ij->i", diff, diff) <= opt.radius_A * opt.radius_A
        ok &= (cand > src) | ((cand < src) & ~listed[cand])  # no self pair; a listed pair from its lower end
        a, b = src[ok], cand[ok]
        out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    q = atoms[~small]
    if len(q):
        big = np.flatnonzero(counts > opt.max_neighbors + 1)
        sub = ranges(ptr[big], counts[big])  # the atoms of the large molecules
        loc = np.full(n, -1, np.int64)
        loc[sub] = np.arange(len(sub))
        p = np.take(pos, sub, axis=0).astype(np.float64)
        width = float(np.ptp(p[:, 0])) + 2 * opt.radius_A + 1.0
        p[:, 0] += gid[sub] * width
        k = min(opt.max_neighbors + 1, len(sub))
        # an unbalanced, non-compact tree builds ~2x faster and queries as fast on atom clouds
        tree = cKDTree(p, balanced_tree=False, compact_nodes=False)
        dist, idx = tree.query(p[loc[q]], k=k, distance_upper_bound=opt.radius_A)
        dist, idx = dist.reshape(len(q), k), idx.reshape(len(q), k)
        src = np.broadcast_to(q[:, None], idx.shape)
        ok = (idx < len(sub)) & (dist <= opt.radius_A)
        s, d = src[ok], sub[idx[ok]]
        keep = d != s
        s, d = s[keep], d[keep]
        both = listed[d]
        out.append(np.stack([np.minimum(s[~both], d[~both]), np.maximum(s[~both], d[~both])], axis=1))
        codes = np.unique(_pair_codes(np.stack([s[both], d[both]], axis=1), n))
        out.append(np.stack([codes // n, codes % n], axis=1))
    return np.concatenate(out).astype(np.int64, copy=False)


def _long_range_pairs(
    counts: np.ndarray, offsets: np.ndarray, pos: np.ndarray, mlm_mask: np.ndarray, opt: CollateOptions,
    rng: np.random.Generator,
) -> np.ndarray:
    """Same-molecule pairs [2, P] (i != j) whose distance the input does not show, stratified by clean distance.

    A pair qualifies when its clean distance exceeds ``radius_A`` (so it is no input edge) or it touches a
    masked atom (the input shows only a noised distance, Uni-Mol's denoising target).

    Each molecule of ``n >= 2`` atoms wants ``K = max(1, round(n * lr_pairs_per_atom))`` pairs. From
    ``lr_candidates * K`` distinct uniform candidates, each stratum the molecule has keeps about ``K / strata``
    of its candidates (all of them when it has fewer): every distance range is sampled about equally, and a
    molecule gets at most about ``K`` pairs (fewer when its strata are sparse; uniform pairs on a protein
    fall ~80 % beyond 20 Å).
    """
    n_atoms = int(counts.sum())
    per_mol = np.where(counts >= 2, np.maximum(1, np.round(counts * opt.lr_pairs_per_atom)), 0).astype(np.int64)
    if opt.lr_pairs_per_atom <= 0 or per_mol.sum() == 0:
        return np.zeros((2, 0), np.int64)
    cand = per_mol * opt.lr_candidates
    mol = np.repeat(np.arange(len(counts)), cand)
    n = counts[mol]
    u = rng.random((2, len(mol)))  # floor(u * n): uniform integers in [0, n) without per-element bounds
    i = np.minimum((u[0] * n).astype(np.int64), n - 1)  # (u * n rounds up to n only for u within 2**-53 of 1)
    j = np.minimum((u[1] * (n - 1)).astype(np.int64), n - 2)
    j += j >= i  # skip i itself: uniform over the other n-1 atoms
    i += offsets[mol]
    j += offsets[mol]
    diff = np.take(pos, i, axis=0) - np.take(pos, j, axis=0)
    d2 = np.einsum("ij,ij->i", diff, diff)
    # keep pairs whose distance the input does not show, then the first of each repeated pair
    ok = np.flatnonzero((d2 > opt.radius_A * opt.radius_A) | mlm_mask[i] | mlm_mask[j])
    mol, i, j, d2 = mol[ok], i[ok], j[ok], d2[ok]
    _, first = np.unique(np.minimum(i, j) * n_atoms + np.maximum(i, j), return_index=True)
    if len(first) < len(i):
        first.sort()
        mol, i, j, d2 = mol[first], i[first], j[first], d2[first]
    strata = np.asarray(opt.lr_strata_A, np.float64)
    stratum = np.searchsorted(strata * strata, d2)  # squared distances against squared bounds: no square root
    n_str = len(opt.lr_strata_A) + 1
    cell = mol * n_str + stratum
    in_cell = np.bincount(cell, minlength=len(counts) * n_str)  # candidates per (molecule, stratum)
    strata_of_mol = (in_cell.reshape(len(counts), n_str) > 0).sum(1)
    quota = per_mol / np.maximum(strata_of_mol, 1)  # pairs wanted from each stratum the molecule has
    # keep each candidate with probability quota / candidates of its cell: about the quota from every stratum
    take = np.flatnonzero(rng.random(len(cell)) * in_cell[cell] < quota[mol])
    return np.stack([i[take], j[take]])


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


def _input_types(z: np.ndarray, mask: np.ndarray, opt: CollateOptions, rng: np.random.Generator) -> np.ndarray:
    """The types the model sees: :data:`MASK_TOKEN` at masked atoms, or (80/10/10) a random element of the batch
    / the atom's own element for shares ``mask_random_fraction`` / ``mask_keep_fraction`` of them."""
    out = z.copy()
    idx = np.flatnonzero(mask)
    shown = np.full(len(idx), MASK_TOKEN, np.uint8)
    if len(idx) and (opt.mask_random_fraction > 0 or opt.mask_keep_fraction > 0):
        u = rng.random(len(idx))
        rand = u < opt.mask_random_fraction
        keep = (u >= opt.mask_random_fraction) & (u < opt.mask_random_fraction + opt.mask_keep_fraction)
        shown[rand] = z[rng.integers(0, len(z), int(rand.sum()))]
        shown[keep] = z[idx[keep]]
    out[idx] = shown
    return out


def collate_compact(
    samples: list[Sample], domain_ids: list[int], opt: CollateOptions, rng: np.random.Generator
) -> dict:
    """:func:`collate_block` of whole samples (evaluation, fine-tuning, embedding)."""
    block = Block.from_samples(samples) if samples else gather(Rows.empty())
    radii = np.fromiter((s.radius_A for s in samples), np.float64, len(samples))
    caps = np.fromiter((s.max_neighbors for s in samples), np.int64, len(samples))
    return collate_block(block, radii, caps, [s.key for s in samples], domain_ids, opt, rng)


def collate_block(
    block: Block, radii: np.ndarray, caps: np.ndarray, keys: list[str], domain_ids, opt: CollateOptions,
    rng: np.random.Generator,
) -> dict:
    """All the per-batch work of :func:`collate`, in a compact form (int32 pairs stored once, uint8 elements),
    over the batch's samples as one :class:`~pipeline.items.Block` (graph options ``radii``/``caps`` per sample).

    DataLoader workers return this: it is a third of the bytes of the finished batch, and moving bytes
    from a worker to the main process costs about as much as computing them. :func:`expand` finishes it.

    Order of the work (each step sees only what the model may see from the steps before): mask atoms per
    molecule, noise their positions, rebuild their radius pairs on the noised positions, hold short-range
    pairs out of the pairs between unmasked atoms, remove masked atoms' bonds and held-out pairs from the
    bonds, draw long-range pairs among the pairs that are not input edges. Targets use the clean positions.
    """
    counts = block.counts("atom")
    ptr = block.ptr["atom"]
    offsets = ptr[:-1]
    n = int(ptr[-1])
    z = block.arrays["z"]
    pos = block.arrays["pos"]
    idx_t = np.int32 if n < 2**31 - 1 else np.int64
    bonds = _offset_pairs(block.arrays["bonds"], block.counts("bond"), offsets, idx_t)  # i < j (schema)
    need_dist, need_cap = _check_radius(np.asarray(radii, np.float64), np.asarray(caps, np.int64), keys, opt)
    pairs = radius_pairs(_offset_pairs(block.arrays["edges"], block.counts("edge"), offsets, idx_t), pos,
                         need_dist, need_cap, opt)

    # masked atoms: chosen per molecule, types replaced, positions noised, their radius pairs rebuilt
    mlm_mask = mask_atoms(counts, opt.mask_fraction, rng)
    masked = np.flatnonzero(mlm_mask)
    z_in = _input_types(z, mlm_mask, opt, rng)
    pos_in = pos
    eligible = ~(mlm_mask[pairs[:, 0]] | mlm_mask[pairs[:, 1]]) if len(masked) else np.ones(len(pairs), bool)
    mask_pairs = np.zeros((0, 2), idx_t)
    if len(masked) and opt.mask_noise_A > 0:
        pos_in = pos.copy()
        pos_in[masked] += rng.uniform(-opt.mask_noise_A, opt.mask_noise_A, (len(masked), 3)).astype(np.float32)
        mask_pairs = masked_neighbours(pos_in, ptr, masked, opt).astype(idx_t)
        pairs = _split_pairs(pairs, eligible)[0]  # stored pairs of masked atoms: measured on clean positions
        eligible = np.ones(len(pairs), bool)

    # held-out short-range pairs: about sr_fraction of the pairs between unmasked atoms (drawn with replacement)
    n_el = int(eligible.sum())
    held = np.zeros(len(pairs), bool)
    if n_el and opt.sr_fraction > 0:
        el_idx = np.flatnonzero(eligible)
        held[el_idx[rng.integers(0, n_el, int(rng.binomial(n_el, opt.sr_fraction)))]] = True
    sr, kept = _split_pairs(pairs, held)
    # bonds the model sees: none of a masked atom, none held out
    if len(bonds) and (len(masked) or len(sr)):
        drop = mlm_mask[bonds[:, 0]] | mlm_mask[bonds[:, 1]]
        drop |= _is_in(_pair_codes(bonds, n), np.sort(_pair_codes(sr, n)))
        bonds = bonds[~drop]
    kept_bond = _bond_flags(kept, bonds, n)  # masked atoms have no bonds left: their rebuilt pairs are no bonds
    if opt.max_edges is not None and len(mask_pairs):
        # the budget counted the stored pairs; on noised positions a masked atom can gain neighbours: the farthest
        # rebuilt pairs past the budget are dropped (directed edges + 2 per held-out pair <= max_edges)
        excess = min(len(kept) + len(mask_pairs) + len(sr) - opt.max_edges // 2, len(mask_pairs))
        if excess > 0:
            far = np.argsort(_dist(pos_in, mask_pairs[:, 0], mask_pairs[:, 1]), kind="stable")
            mask_pairs = mask_pairs[np.sort(far[: len(mask_pairs) - excess])]
    if len(mask_pairs):
        kept = np.concatenate([kept, mask_pairs])
        kept_bond = np.concatenate([kept_bond, np.zeros(len(mask_pairs), bool)])

    lr = _long_range_pairs(counts, offsets, pos, mlm_mask, opt, rng)
    t = torch.from_numpy
    return {
        "z": t(np.ascontiguousarray(z_in, np.uint8)),
        "pos": t(np.ascontiguousarray(pos_in)),
        "counts": t(counts),
        "pairs": t(np.ascontiguousarray(kept)),
        "pair_is_bond": t(kept_bond),
        "bonds": t(np.ascontiguousarray(bonds)),
        "mlm_mask": t(mlm_mask),
        "mlm_target": t(np.ascontiguousarray(z[masked], np.uint8)),
        "sr": t(np.ascontiguousarray(sr)),
        "sr_target": t(_dist(pos, sr[:, 0], sr[:, 1])),
        "lr": t(lr),
        "lr_target": t(_dist(pos, lr[0], lr[1])),
        "domain": torch.as_tensor(np.asarray(domain_ids, np.int64).reshape(-1)),
        "keys": list(keys),
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
        domain=c["domain"],
        mlm_mask=c["mlm_mask"],
        mlm_target=c["mlm_target"].long(),
        sr_index=c["sr"].T.long().contiguous(),
        sr_target=c["sr_target"],
        lr_index=c["lr"],
        lr_target=c["lr_target"],
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
