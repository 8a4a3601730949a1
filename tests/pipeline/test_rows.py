"""Columnar sample references (pipeline.items): gather equals the samples concatenated, blocks are listed once and
dropped when unreferenced, buffers never pin much more than they hold, and a shuffle buffer hands out each sample of
a pass once."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.items import ARRAYS, COLUMNS, Block, Rows, gather
from pipeline.loader import resolve
from pipeline.mix import ShuffleBuffer
from pipeline.read import DomainSource, ShardFetcher, decode_run
from tests.pipeline.helpers import config

DOMAIN = "small_molecule"


def _source(small_shards, domain=DOMAIN, **kw):
    cfg = config(small_shards, weights={domain: 1.0}, read_block_bytes=1, **kw)  # one member per read
    res = resolve(cfg)
    return DomainSource(res.train[0], 0, 0, 1, cfg, np.zeros((1, 6), np.int64)), res.train[0]


def _all_rows(src: DomainSource) -> Rows:
    parts = []
    while src.pass_ == 0:
        parts.append(src.next_rows())
    return Rows.concat(parts)


def test_gather_equals_the_decoded_samples_in_row_order(small_shards):
    """Rows drawn from several blocks in a scrambled order, duplicates included, gather to exactly the arrays of
    the same samples decoded one by one (decode_run), concatenated in that order."""
    for domain in (DOMAIN, "protein"):
        src, ix = _source(small_shards, domain)
        rows = _all_rows(src)
        assert len(rows.blocks) >= 2, "the demo domain should span several blocks"
        pos = np.random.default_rng(0).permutation(len(rows))[: max(3, len(rows) // 2)]
        pos = np.concatenate([pos, pos[:2]])  # a sample twice
        sel = rows.take(pos)
        got = gather(sel)
        f = ShardFetcher(ix)
        by_id = {}
        for run in f.runs(np.arange(len(ix))):
            by_id.update(zip(run.tolist(), decode_run(f.read_run(run), ix, "raise"), strict=True))
        f.close()
        want = [by_id[i] for i in sel.idx.tolist()]
        for name in ARRAYS:
            ref = np.concatenate([getattr(s, name) for s in want])
            assert got.arrays[name].dtype == ref.dtype and np.array_equal(got.arrays[name], ref), (domain, name)
        assert np.array_equal(np.diff(got.ptr["atom"]), [s.num_atoms for s in want])
        assert np.array_equal(np.diff(got.ptr["edge"]), [len(s.edges) for s in want])
        assert np.array_equal(np.diff(got.ptr["bond"]), [len(s.bonds) for s in want])
        # a row's byte count is what its arrays hold in a block
        assert int(sel.nbytes.sum()) == sum(a.nbytes for a in got.arrays.values())
        ref_block = Block.from_samples(want)
        for name in ARRAYS:
            assert np.array_equal(ref_block.arrays[name], got.arrays[name])


def test_rows_list_each_block_once_and_only_referenced_ones(small_shards):
    src, _ = _source(small_shards)
    a, b = src.next_rows(), src.next_rows()
    both = Rows.concat([a.take(np.arange(len(a))), b, a.take(np.arange(1))])  # a's block reached twice
    assert len(both.blocks) == 2 and len(both) == 2 * len(a) + len(b) - (len(a) - 1)
    assert {id(x) for x in both.blocks} == {id(a.blocks[0]), id(b.blocks[0])}
    only_b = both.take(np.arange(len(a), len(a) + len(b)))
    assert len(only_b.blocks) == 1 and only_b.blocks[0] is b.blocks[0]
    assert np.array_equal(only_b.idx, b.idx) and np.array_equal(only_b.item, b.item)
    assert set(COLUMNS) <= set(Rows.__slots__)


def test_compacted_keeps_every_sample_and_bounds_pinned_bytes(small_shards):
    src, _ = _source(small_shards)
    rows = _all_rows(src)
    few = rows.take(np.arange(0, len(rows), 7))  # a seventh of every block: its blocks pin ~7x its bytes
    assert few.pinned_bytes() > 2 * int(few.nbytes.sum()) + max(b.nbytes for b in few.blocks)
    c = few.compacted()
    assert len(c.blocks) == 1 and c.pinned_bytes() <= int(c.nbytes.sum()) + c.blocks[0].ptr["atom"].nbytes * 3
    for name in COLUMNS[:6]:
        assert np.array_equal(getattr(c, name), getattr(few, name)), name
    g0, g1 = gather(few), gather(c)
    for name in ARRAYS:
        assert np.array_equal(g0.arrays[name], g1.arrays[name]), name
    dense = rows.take(np.arange(len(rows)))
    assert dense.compacted() is dense  # nothing to gain: no copy
    # a fresh (fully referenced) block is kept as it is; only the sparse ones are gathered
    fresh = _source(small_shards)[0].next_rows()
    mixed = Rows.concat([few, fresh]).compacted()
    assert fresh.blocks[0] in mixed.blocks and len(mixed.blocks) == 2
    assert mixed.pinned_bytes() <= 2 * int(mixed.nbytes.sum())
    for name in ARRAYS:
        assert np.array_equal(gather(mixed).arrays[name], gather(Rows.concat([few, fresh])).arrays[name]), name


@pytest.mark.parametrize("capacity", [20_000, 120_000])
def test_shuffle_buffer_gives_each_sample_once_per_pass_and_pins_little(small_shards, capacity):
    src, ix = _source(small_shards)
    buf = ShuffleBuffer(src, capacity, np.random.default_rng(3))
    seen: dict[int, list[int]] = {}
    biggest = 0
    while src.pass_ < 6:  # passes 0 and 1 have left the buffer long before
        out = buf.take(5)
        for p, i in zip(out.pass_.tolist(), out.idx.tolist(), strict=True):
            seen.setdefault(p, []).append(i)
        biggest = max([biggest, *(b.nbytes for b in buf.rows.blocks)])
        # buffered bytes stay within the bound plus one member; its blocks pin at most ~2x that (compaction)
        assert buf.nbytes == int(buf.rows.nbytes.sum())
        assert buf.rows.pinned_bytes() <= 2 * (capacity + biggest) + biggest
    for p in (0, 1):
        assert sorted(seen[p]) == list(range(len(ix))), f"pass {p}"
    first = seen[0][:50]
    assert first != sorted(first)  # shuffled


def test_shuffle_buffer_warms_up_then_holds_its_bound(small_shards):
    """The first take reads about 1/2**WARMUP_SHIFT of the bound (the first batch needs no full buffer), the bound
    doubles at every take up to the capacity, and a buffer restored mid-warm-up continues the same stream."""
    from pipeline.mix import WARMUP_SHIFT

    capacity = 3_000_000  # the demo's proteins: 9 train members of 0.27-1.3 MB, 4.9 MB in all
    src, _ = _source(small_shards, "protein")
    buf = ShuffleBuffer(src, capacity, np.random.default_rng(3))
    buf.take(1)
    biggest = max(b.nbytes for b in buf.rows.blocks)
    assert 0 < buf.nbytes <= (capacity >> WARMUP_SHIFT) + biggest  # what the first take read, less the sample out
    bounds = [buf.bound]
    for _ in range(WARMUP_SHIFT + 1):
        buf.take(1)
        bounds.append(buf.bound)
    assert bounds == [min(capacity, (capacity >> WARMUP_SHIFT) << k) for k in range(1, WARMUP_SHIFT + 3)]
    assert bounds[-1] == capacity and buf.nbytes >= capacity // 2

    def stream(cut):
        src, _ = _source(small_shards, "protein")
        buf = ShuffleBuffer(src, capacity, np.random.default_rng(3))
        got = [buf.take(3).idx.tolist() for _ in range(cut)]
        if cut:  # restore into a new buffer over a new source at the same cursor
            st, src_state = buf.state_dict(), src.state_dict()
            src, _ = _source(small_shards, "protein")
            src.load_state_dict(src_state)
            buf = ShuffleBuffer(src, capacity, np.random.default_rng(99))
            buf.load_state_dict(st)
        return got + [buf.take(3).idx.tolist() for _ in range(8 - cut)]

    assert stream(2) == stream(0)


def test_the_pool_pins_little_beyond_the_shuffle_buffers_blocks(small_shards):
    """The packer's pool references the shuffle buffer's blocks without copying; blocks only the pool still holds
    are compacted, so they never pin much more than the pool's samples in them (plus what the last batch took)."""
    from pipeline.stream import train_stream

    cfg = config(small_shards, weights={DOMAIN: 1.0}, max_atoms=1500, shuffle_buffer_bytes=30_000,
                 read_block_bytes=1)
    res = resolve(cfg)
    st = train_stream(cfg, res.train, res.sample_probs, res.batch_probs, 0, 1)
    worst = 0.0
    for _ in range(80):
        batch = st.next_rows()
        pool, shared = st.packer.pool, st.buffers[0].block_ids()
        own = np.array([id(b) not in shared for b in pool.blocks], bool)
        sizes = np.array([b.nbytes for b in pool.blocks], np.int64)
        live = int(pool.nbytes[own[pool.blk]].sum()) if len(pool) else 0
        if own.any():
            pinned = int(sizes[own].sum())
            assert pinned <= 2 * (live + int(batch.nbytes.sum())) + int(sizes.max()), (pinned, live)
            worst = max(worst, pinned / max(live, 1))
    assert worst > 0  # the pool did hold blocks of its own
