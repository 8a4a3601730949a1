"""Atom-budget packing as pure functions on arrays of atom (and edge) counts, plus the spatial crop.

:func:`select_batch` picks one batch from a pool held oldest-first: the oldest samples go in first, in
arrival order, up to a fraction of the budget (so nothing starves, however large or small, and the
realised mix follows the drawn mix), then the remaining budget is filled best-fit — first-fit over the
rest sorted by size, largest first — so small molecules fill the gaps. The greedy is evaluated in runs
(cumulative sums + binary search), not sample by sample.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.schema import Sample

_BIG = np.iinfo(np.int64).max // 4


def select_batch(
    atoms: np.ndarray,
    max_atoms: int | None,
    edges: np.ndarray | None = None,
    max_edges: int | None = None,
    max_graphs: int | None = None,
    head: int = 0,
    fifo_fraction: float = 0.5,
) -> np.ndarray:
    """Positions (into the oldest-first pool) of one batch; never exceeds any budget.

    1. ``head`` (default: the oldest) always goes in;
    2. oldest first: then the pool in arrival order, while the batch stays within ``fifo_fraction`` of
       every budget (a contiguous run: this bounds how long any sample waits, whatever its size);
    3. best fit: the rest of the budget is filled first-fit over the remaining samples sorted by size,
       largest first.

    Every pool entry must fit the budgets on its own (oversize samples are handled before the pool).
    """
    n = len(atoms)
    if n == 0:
        return np.zeros(0, np.int64)
    max_a = _BIG if max_atoms is None else int(max_atoms)
    max_e = _BIG if max_edges is None or edges is None else int(max_edges)
    max_g = n if max_graphs is None else min(n, int(max_graphs))
    atoms = np.asarray(atoms, np.int64)
    edges = np.zeros(n, np.int64) if edges is None else np.asarray(edges, np.int64)
    if atoms[head] > max_a or edges[head] > max_e:
        raise ValueError(f"pool head has {atoms[head]} atoms / {edges[head]} edges, over the budget {max_a} / {max_e}")
    rem_a, rem_e, rem_g = max_a - int(atoms[head]), max_e - int(edges[head]), max_g - 1
    others = np.delete(np.arange(n), head)
    # 2. oldest first, within fifo_fraction of the budgets
    fa = int(fifo_fraction * max_a) - int(atoms[head]) if max_a != _BIG else _BIG
    fe = int(fifo_fraction * max_e) - int(edges[head]) if max_e != _BIG else _BIG
    k = min(
        int(np.searchsorted(np.cumsum(atoms[others]), fa, side="right")),
        int(np.searchsorted(np.cumsum(edges[others]), fe, side="right")) if max_e != _BIG else len(others),
        max(0, int(fifo_fraction * max_g) - 1) if max_graphs is not None else len(others),
    )
    k = max(0, min(k, rem_g))
    fifo = others[:k]
    rem_a -= int(atoms[fifo].sum())
    rem_e -= int(edges[fifo].sum())
    rem_g -= k
    taken = [head, *fifo.tolist()]
    rest = others[k:]
    if rem_g == 0 or len(rest) == 0:
        return np.array(taken, np.int64)
    # 3. best fit over the rest, largest first (ties: oldest first), evaluated in runs
    rest = rest[np.argsort(-atoms[rest], kind="stable")]
    sa, se = atoms[rest], edges[rest]
    ca, ce = np.cumsum(sa), np.cumsum(se)
    neg = -sa
    k, m = 0, len(rest)
    while k < m and rem_g > 0:
        # jump to the first remaining candidate whose atoms fit
        k += int(np.searchsorted(neg[k:], -rem_a, side="left"))
        if k >= m:
            break
        if se[k] > rem_e:  # fits by atoms, not by edges: skip just this one
            k += 1
            continue
        base_a = ca[k - 1] if k else 0
        base_e = ce[k - 1] if k else 0
        # the longest run k..j-1 that fits every budget as a whole (greedy takes each of them)
        j_a = k + int(np.searchsorted(ca[k:] - base_a, rem_a, side="right"))
        j_e = k + int(np.searchsorted(ce[k:] - base_e, rem_e, side="right")) if max_e != _BIG else m
        j = max(k + 1, min(j_a, j_e, k + rem_g))
        taken.extend(rest[k:j].tolist())
        rem_a -= int(ca[j - 1] - base_a)
        rem_e -= int(ce[j - 1] - base_e)
        rem_g -= j - k
        k = j
    return np.array(taken, np.int64)


def plan_batches(
    atoms: np.ndarray,
    max_atoms: int | None,
    edges: np.ndarray | None = None,
    max_edges: int | None = None,
    max_graphs: int | None = None,
    pool_atoms: int | None = None,
    pool_max_samples: int = 8192,
    batch_size: int | None = None,
    fifo_fraction: float = 0.5,
) -> list[np.ndarray]:
    """Pack a whole finite sequence (ids ``0..n-1`` in arrival order) into batches; every id exactly once.

    The streaming packer uses the same pool discipline (:func:`pool_wants_more`): top up the pool in
    arrival order, then :func:`select_batch`. ``batch_size``
    switches to fixed-size batches in arrival order.
    """
    n = len(atoms)
    ids = np.arange(n)
    if batch_size is not None:
        return [ids[i : i + batch_size] for i in range(0, n, batch_size)]
    atoms = np.asarray(atoms, np.int64)
    edges = None if edges is None else np.asarray(edges, np.int64)
    target = pool_atoms if pool_atoms is not None else 3 * (max_atoms or 1)
    filler = np.where(atoms <= filler_limit(max_atoms), atoms, 0)
    cum_t, cum_f = np.cumsum(atoms), np.cumsum(filler)
    pool = np.zeros(0, np.int64)
    nxt, out = 0, []
    while nxt < n or len(pool):
        held_t = int(atoms[pool].sum()) if len(pool) else 0
        held_f = int(filler[pool].sum()) if len(pool) else 0
        if nxt < n and pool_wants_more(held_t, held_f, len(pool), target, pool_max_samples):
            bt = int(cum_t[nxt - 1]) if nxt else 0
            bf = int(cum_f[nxt - 1]) if nxt else 0
            up_f = int(np.searchsorted(cum_f, bf + (target - held_f), side="left")) + 1
            up_t = int(np.searchsorted(cum_t, bt + (POOL_TOTAL_MULTIPLE * target - held_t), side="left")) + 1
            upto = min(n, up_f, up_t, nxt + pool_max_samples - len(pool))
            pool = np.concatenate([pool, ids[nxt:upto]])
            nxt = upto
        held_t = int(atoms[pool].sum())
        held_f = int(filler[pool].sum())
        head = choose_head(atoms[pool], held_t, held_f, target, max_atoms, exhausted=nxt >= n)
        pos = select_batch(
            atoms[pool], max_atoms, None if edges is None else edges[pool], max_edges, max_graphs, head, fifo_fraction
        )
        out.append(pool[np.sort(pos)])
        keep = np.ones(len(pool), bool)
        keep[pos] = False
        pool = pool[keep]
    return out


POOL_TOTAL_MULTIPLE = 4
"""The pool stops growing at this many times its target in total atoms, even when short of fillers."""


def filler_limit(max_atoms: int | None) -> int:
    """Samples up to half the budget can share a batch with others; only they count towards the pool target."""
    return _BIG if max_atoms is None else max(1, max_atoms // 2)


def choose_head(
    atoms: np.ndarray, total_atoms: int, filler_atoms: int, target: int, max_atoms: int | None, exhausted: bool = False
) -> int:
    """The oldest sample, unless the pool is clogged with large ones (full in atoms, short of fillers) or
    its input is exhausted: then the oldest large one, which makes a well-filled batch and keeps the
    fillers for the gaps."""
    if (exhausted or total_atoms >= POOL_TOTAL_MULTIPLE * target) and filler_atoms < target:
        big = np.flatnonzero(atoms > filler_limit(max_atoms))
        if len(big):
            return int(big[0])
    return 0


def pool_wants_more(total_atoms: int, filler_atoms: int, n: int, target: int, max_samples: int) -> bool:
    """The pool discipline: grow until the fillers hold ``target`` atoms (bounded in atoms and samples).

    Counting only fillers matters: a pool of three full-budget crops holds 3 budgets of atoms but can
    only make under-filled batches.
    """
    return n < max_samples and filler_atoms < target and total_atoms < POOL_TOTAL_MULTIPLE * target


_BOTH_SIGNS = np.int64(-0x7FFFFFFF80000000)  # bits 31 and 63: the signs of both int32 halves of an int64


def _kept_pairs(p: np.ndarray, new_id: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Renumbered int32 [k, 2] pairs whose both ends are kept (``new_id`` >= 0), and the keep-mask over ``p``.

    In chunks of pairs: the temporaries stay small (reused memory instead of fresh pages for every crop).
    """
    flat = np.asarray(p).reshape(-1)
    kept, oks = [], []
    for a in range(0, max(len(flat), 1), 2 * chunk):
        q = np.take(new_id, flat[a : a + 2 * chunk])  # np.take: much faster than fancy indexing with int32 ids
        v = q.view(np.int64)  # one (i, j) pair as one 8-byte item: 1-D masks instead of 2-D ones
        ok = (v & _BOTH_SIGNS) == 0
        kept.append(v[ok])
        oks.append(ok)
    return np.concatenate(kept).view(np.int32).reshape(-1, 2), np.concatenate(oks)


def crop_sample(s: Sample, max_atoms: int, rng: np.random.Generator) -> Sample:
    """The ``max_atoms`` atoms nearest to a random atom (a spatially contiguous ball), arrays renumbered.

    Bonds and radius pairs survive when both ends are kept; per-atom optional arrays are sliced.
    """
    n = s.num_atoms
    if n <= max_atoms:
        return s
    center = s.pos[int(rng.integers(n))]
    d = s.pos - center
    d *= d
    d2 = d[:, 0] + d[:, 1]  # the same sums, in the same order, as ((s.pos - center) ** 2).sum(axis=1), 3x faster
    d2 += d[:, 2]
    keep = np.sort(np.argpartition(d2, max_atoms - 1)[:max_atoms])
    new_id = np.full(n, -1, np.int32)  # new index of every kept atom, -1 for dropped ones
    new_id[keep] = np.arange(len(keep), dtype=np.int32)
    bonds, bok = _kept_pairs(s.bonds, new_id)
    edges, _ = _kept_pairs(s.edges, new_id)
    return dataclasses.replace(
        s,
        z=s.z[keep],
        pos=s.pos[keep],
        bonds=bonds,
        bond_order=s.bond_order[bok] if len(s.bond_order) == len(s.bonds) else s.bond_order[:0],
        edges=edges,
        res_index=None if s.res_index is None else s.res_index[keep],
        chain=None if s.chain is None else s.chain[keep],
        atom_name=None if s.atom_name is None else s.atom_name[keep],
    )


def crop_to_budget(s: Sample, max_atoms: int | None, max_edges: int | None,
                   rng: np.random.Generator) -> tuple[Sample, int]:
    """:func:`crop_sample` to ``max_atoms``, shrunk further until its directed radius edges (2 per stored pair)
    fit ``max_edges``; returns the sample and its directed edges. The training packer and the evaluation loader
    both crop with it, so a budget that training meets is met by evaluation too."""
    target = s.num_atoms if max_atoms is None else min(s.num_atoms, max_atoms)
    while True:
        out = crop_sample(s, target, rng)
        edges = 2 * len(out.edges)
        if max_edges is None or edges <= max_edges or target <= 1:
            return out, edges
        target = max(1, int(target * max_edges / edges * 0.95))
