"""Pure packing, planning and mixing functions on arrays of counts."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.packing import crop_sample, plan_batches, select_batch
from pipeline.plan import pass_order, read_blocks, sample_probabilities, slot_piece
from pipeline.schema import Sample


def naive_select(atoms, max_atoms, edges, max_edges, max_graphs, fifo=0.5, head=0):
    """The specification: head, then arrival order within fifo x budget, then first-fit largest first."""
    taken, ra, re_, rg = [head], max_atoms - atoms[head], max_edges - edges[head], max_graphs - 1
    fa, fe, fg = fifo * max_atoms - atoms[head], fifo * max_edges - edges[head], int(fifo * max_graphs) - 1
    others = [i for i in range(len(atoms)) if i != head]
    for i in others:
        if atoms[i] <= fa and edges[i] <= fe and fg > 0 and rg > 0:
            taken.append(i)
            fa, fe, fg = fa - atoms[i], fe - edges[i], fg - 1
            ra, re_, rg = ra - atoms[i], re_ - edges[i], rg - 1
        else:
            break
    for i in sorted((i for i in others if i not in taken), key=lambda i: (-atoms[i], i)):
        if rg and atoms[i] <= ra and edges[i] <= re_:
            taken.append(i)
            ra, re_, rg = ra - atoms[i], re_ - edges[i], rg - 1
    return sorted(taken)


@pytest.mark.parametrize("seed", range(30))
def test_select_batch_is_the_greedy_and_never_exceeds_budgets(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    atoms = np.where(rng.random(n) < 0.3, rng.integers(500, 9000, n), rng.integers(5, 60, n))
    edges = atoms * rng.integers(5, 30, n)
    max_atoms, max_edges = 10_000, int(rng.integers(60_000, 200_000))
    max_graphs = int(rng.integers(1, 200))
    atoms[0] = min(atoms[0], max_atoms)
    edges[0] = min(edges[0], max_edges)
    got = sorted(select_batch(atoms, max_atoms, edges, max_edges, max_graphs).tolist())
    assert got == naive_select(atoms.tolist(), max_atoms, edges.tolist(), max_edges, max_graphs)
    assert 0 in got and len(set(got)) == len(got)
    assert atoms[got].sum() <= max_atoms and edges[got].sum() <= max_edges and len(got) <= max_graphs


def test_select_batch_rejects_an_oversize_head():
    with pytest.raises(ValueError, match="over the budget"):
        select_batch(np.array([30, 5]), 20)


def test_plan_batches_uses_every_id_once_and_fills_the_budget():
    rng = np.random.default_rng(0)
    atoms = np.concatenate([rng.integers(600, 9700, 300), rng.integers(6, 110, 20_000)])
    atoms = atoms[rng.permutation(len(atoms))]
    batches = plan_batches(atoms, 25_000)
    ids = np.concatenate(batches)
    assert np.array_equal(np.sort(ids), np.arange(len(atoms)))
    sums = np.array([atoms[b].sum() for b in batches])
    assert sums.max() <= 25_000
    assert sums[:-3].mean() >= 0.97 * 25_000  # the tail of a finite sequence may be partial


def test_plan_batches_fixed_size():
    batches = plan_batches(np.ones(70, np.int64), None, batch_size=32)
    assert [len(b) for b in batches] == [32, 32, 6]


def test_pool_clogged_with_large_samples_still_fills():
    # a third of the samples take a whole budget: they must not crowd the fillers out of the pool
    rng = np.random.default_rng(1)
    atoms = np.where(rng.random(3000) < 0.01, 25_000, rng.integers(10, 120, 3000))
    batches = plan_batches(atoms, 25_000)
    sums = np.array([atoms[b].sum() for b in batches])
    assert sums.max() <= 25_000 and sums[:-3].mean() > 0.97 * 25_000


@pytest.mark.parametrize(("n", "slots"), [(1, 4), (3, 4), (23, 4), (354, 6), (1000, 3)])
def test_slot_pieces_partition_every_pass(n, slots):
    rng = np.random.default_rng(n)
    shard = np.sort(rng.integers(0, 3, n))
    size = rng.integers(1000, 5000, n)
    offset = np.concatenate([np.cumsum(size[shard == k]) - size[shard == k] for k in range(3)])
    blocks = read_blocks(shard, offset, 20_000)
    orders = []
    for p in range(3):
        order = pass_order(blocks, 7, "protein", p)
        pieces = [slot_piece(order, g, slots, p) for g in range(slots)]
        allp = np.concatenate(pieces)
        assert np.array_equal(np.sort(allp), np.arange(n))
        assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
        orders.append(order)
    assert np.array_equal(pass_order(blocks, 7, "protein", 1), orders[1])  # deterministic
    if n > 100:
        assert not np.array_equal(orders[0], orders[1])  # a fresh permutation each pass


def test_read_blocks_never_span_shards_nor_split_a_member_and_respect_size():
    shard = np.array([0, 0, 0, 1, 1, 2])
    offset = np.array([0, 10, 20, 0, 10, 0])
    assert read_blocks(shard, offset, 20).tolist() == [0, 0, 1, 2, 2, 3]
    # samples of one block member share its offset: a read block takes all of them, however many
    shard = np.array([0, 0, 0, 0, 0, 1])
    offset = np.array([0, 15, 15, 15, 40, 15])
    assert read_blocks(shard, offset, 20).tolist() == [0, 0, 0, 0, 1, 2]


def test_sample_probabilities_modes():
    w = np.array([0.5, 0.5])
    mean = np.array([1000.0, 10.0])
    size = np.array([10, 1000])
    assert np.allclose(sample_probabilities(w, mean, size, "samples", 1), [0.5, 0.5])
    p = sample_probabilities(w, mean, size, "atoms", 1)
    assert np.allclose(p * mean / (p * mean).sum(), [0.5, 0.5])  # equal shares of atoms
    assert np.allclose(sample_probabilities(np.ones(2), mean, size, "temperature", 1), [10 / 1010, 1000 / 1010])
    assert np.allclose(sample_probabilities(np.ones(2), mean, size, "temperature", 1e9), [0.5, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="mix_by"):
        sample_probabilities(w, mean, size, "bytes", 1)


def test_crop_is_a_spatial_ball_with_valid_arrays():
    rng = np.random.default_rng(0)
    n = 500
    pos = rng.normal(size=(n, 3)).astype(np.float32) * 10
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    i, j = np.nonzero(np.triu(d < 4, 1))
    edges = np.stack([i, j], 1).astype(np.int32)
    s = Sample("k", "protein", np.full(n, 6, np.uint8), pos, edges[:50], np.ones(50, np.uint8), edges,
               res_index=np.arange(n, dtype=np.int32))
    c = crop_sample(s, 100, np.random.default_rng(3))
    assert c.num_atoms == 100 and c.res_index is not None
    kept = c.res_index  # original atom ids, order preserved
    assert np.all(np.diff(kept) > 0)
    center = pos[np.random.default_rng(3).integers(n)]
    dist = np.linalg.norm(pos - center, axis=1)
    dropped = np.setdiff1d(np.arange(n), kept)
    assert dist[kept].max() <= dist[dropped].min() + 1e-5
    assert c.edges.max() < 100 and len(c.bonds) == len(c.bond_order)
    orig = {(int(kept[a]), int(kept[b])) for a, b in c.edges}
    assert orig == {(int(a), int(b)) for a, b in edges if a in set(kept) and b in set(kept)}
