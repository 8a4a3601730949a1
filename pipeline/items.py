"""What travels between the training stages: decoded blocks (:class:`Block`), columns of references to their
samples (:class:`Rows`), :func:`gather` (the samples of some rows as one block), the per-domain counters and
:class:`BlockRandom`.

A training stream never makes one Python object per sample: a read decodes a block member once into a
:class:`Block` (the four arrays collation needs, concatenated, with offset arrays), and the shuffle buffer, the
mixer and the packer move :class:`Rows` -- numpy columns (domain, pass, id, atoms, edges, bytes, block, item) --
between them. A batch is gathered with one fancy-index per array and block.
"""

from __future__ import annotations

import numpy as np

from pipeline.schema import Sample

COUNTERS = ("samples", "atoms", "bad", "oversize_skipped", "oversize_cropped", "batches")
"""Per-domain counters of a stream (batches: batches that contain the domain)."""
_C = {name: i for i, name in enumerate(COUNTERS)}

ARRAYS = {"z": "atom", "pos": "atom", "bonds": "bond", "edges": "edge"}
"""The arrays a training block holds (what collation reads), each with the row family its offsets count."""
ROW_BYTES = {"atom": 13, "bond": 8, "edge": 8}
"""Bytes a block holds per atom (z uint8, pos 3 x float32), per bond and per stored pair (2 x int32)."""


class Block:
    """Samples of one domain: the :data:`ARRAYS` concatenated (pair indices local to their sample) and int64
    offsets ``ptr[family]`` [S + 1]. ``nbytes``: the bytes it holds."""

    __slots__ = ("arrays", "ptr", "nbytes")

    def __init__(self, arrays: dict[str, np.ndarray], ptr: dict[str, np.ndarray]) -> None:
        self.arrays, self.ptr = arrays, ptr
        self.nbytes = sum(a.nbytes for a in arrays.values()) + sum(p.nbytes for p in ptr.values())

    @staticmethod
    def from_arrays(a: dict[str, np.ndarray]) -> Block:
        """A block of decoded shard arrays (:func:`pipeline.schema.decode_block_arrays`): copies of the arrays
        collation needs, so the member's bytes are not pinned."""
        return Block({name: np.array(a[name]) for name in ARRAYS},
                     {fam: a[f"{fam}_ptr"].astype(np.int64) for fam in ROW_BYTES})

    @staticmethod
    def from_samples(samples: list[Sample]) -> Block:
        ptr = {}
        for fam, name in (("atom", "z"), ("bond", "bonds"), ("edge", "edges")):
            p = np.zeros(len(samples) + 1, np.int64)
            np.cumsum([len(getattr(s, name)) for s in samples], out=p[1:])
            ptr[fam] = p
        arrays = {"z": np.concatenate([s.z for s in samples]).astype(np.uint8, copy=False),
                  "pos": np.concatenate([s.pos for s in samples]).astype(np.float32, copy=False),
                  "bonds": np.concatenate([s.bonds.reshape(-1, 2) for s in samples]).astype(np.int32, copy=False),
                  "edges": np.concatenate([s.edges.reshape(-1, 2) for s in samples]).astype(np.int32, copy=False)}
        return Block(arrays, ptr)

    def counts(self, fam: str) -> np.ndarray:
        return np.diff(self.ptr[fam])

    def sample(self, k: int, key: str, domain: str, radius_A: float, max_neighbors: int) -> Sample:
        """Copies of sample ``k`` (no bond orders or optional arrays: a training block does not hold them)."""
        a, p = self.arrays, self.ptr
        sl = {name: slice(int(p[fam][k]), int(p[fam][k + 1])) for name, fam in ARRAYS.items()}
        return Sample(key=key, domain=domain, z=a["z"][sl["z"]].copy(), pos=a["pos"][sl["pos"]].copy(),
                      bonds=a["bonds"][sl["bonds"]].copy(), bond_order=np.zeros(0, np.uint8),
                      edges=a["edges"][sl["edges"]].copy(), radius_A=radius_A, max_neighbors=max_neighbors)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + c)`` for every (start, count): one vectorised index."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    shift = np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + shift


COLUMNS = ("d", "pass_", "idx", "atoms", "edges", "nbytes", "blk", "item")
"""Columns of :class:`Rows`: domain, pass, sample id, atoms, directed radius edges (an upper bound after
filtering), bytes held, block (position in ``Rows.blocks``), position in the block."""


class Rows:
    """References to samples (one entry per sample, numpy int64 columns :data:`COLUMNS`) and the blocks that hold
    them. Every block of ``blocks`` is referenced by some row (operations drop the others)."""

    __slots__ = (*COLUMNS, "blocks")

    def __init__(self, blocks: list[Block], **cols: np.ndarray) -> None:
        self.blocks = blocks
        for name in COLUMNS:
            setattr(self, name, np.asarray(cols[name], np.int64))

    @staticmethod
    def empty() -> Rows:
        z = np.zeros(0, np.int64)
        return Rows([], **{name: z for name in COLUMNS})

    def __len__(self) -> int:
        return len(self.idx)

    def take(self, pos: np.ndarray) -> Rows:
        """The rows at ``pos`` (in that order), with only the blocks they reference."""
        pos = np.asarray(pos, np.int64)
        cols = {name: getattr(self, name)[pos] for name in COLUMNS}
        used = np.bincount(cols["blk"], minlength=len(self.blocks)) > 0  # a count, not a sort of the rows
        if used.all():
            return Rows(self.blocks, **cols)
        cols["blk"] = (np.cumsum(used) - 1)[cols["blk"]]  # blocks keep their order
        return Rows([self.blocks[i] for i in np.flatnonzero(used).tolist()], **cols)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty()
        if len(parts) == 1:
            return parts[0]
        blocks: list[Block] = []
        at: dict[int, int] = {}  # id(block) -> its position in blocks: a block shared by parts is listed once
        blk = []
        for p in parts:
            remap = np.array([at.setdefault(id(b), len(at)) for b in p.blocks], np.int64)
            if len(at) > len(blocks):
                blocks.extend(b for b in p.blocks if at[id(b)] >= len(blocks))
            blk.append(remap[p.blk])
        cols = {name: np.concatenate([getattr(p, name) for p in parts]) for name in COLUMNS if name != "blk"}
        cols["blk"] = np.concatenate(blk)
        return Rows(blocks, **cols)

    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def compacted(self, shared: frozenset[int] | set[int] = frozenset()) -> Rows:
        """These rows with their sparse blocks (under half of the block's bytes still referenced) gathered into one
        new block, when their blocks hold more than twice their bytes plus the largest block: a buffer or pool never
        pins much more than it holds, whatever order its samples leave in, and a fresh block is never copied.
        Blocks whose ``id`` is in ``shared`` are another holder's (a pool's rows in a shuffle buffer's blocks): they
        neither count nor move."""
        if len(self.blocks) <= 1 and not shared:
            return self
        sizes = np.fromiter((0 if id(b) in shared else b.nbytes for b in self.blocks), np.int64, len(self.blocks))
        live = np.bincount(self.blk, weights=self.nbytes, minlength=len(self.blocks))
        own = sizes > 0
        if int(sizes.sum()) <= 2 * int(live[own].sum()) + int(sizes.max(initial=0)):
            return self
        sparse = own & (2 * live < sizes)
        moved = np.flatnonzero(sparse[self.blk])
        kept = np.flatnonzero(~sparse)
        remap = np.full(len(self.blocks), len(kept), np.int64)  # sparse blocks' rows -> the new block (last)
        remap[kept] = np.arange(len(kept))
        cols = {name: getattr(self, name) for name in COLUMNS}
        cols["blk"] = remap[self.blk]
        cols["item"] = self.item.copy()
        cols["item"][moved] = np.arange(len(moved))
        return Rows([*(self.blocks[i] for i in kept.tolist()), gather(self.take(moved))], **cols)


def rows_of_block(block: Block, items: np.ndarray, d: int, pass_: int, ids: np.ndarray, edges: np.ndarray) -> Rows:
    """Rows for samples ``items`` of ``block`` (sample ids ``ids``, directed edge bounds ``edges``)."""
    items = np.asarray(items, np.int64)
    n = len(items)
    nbytes = np.zeros(n, np.int64)
    for fam, b in ROW_BYTES.items():
        p = block.ptr[fam]
        c = p[items + 1] - p[items]
        if fam == "atom":
            atoms = c
        nbytes += b * c
    return Rows([block], d=np.full(n, d), pass_=np.full(n, pass_), idx=ids, atoms=atoms, edges=edges,
                nbytes=nbytes, blk=np.zeros(n, np.int64), item=items)


def _flat(a: np.ndarray) -> np.ndarray:
    """A 1-D view with one element per row (a [k, 2] int32 array as int64, [k, 3] float32 as 12-byte items): fancy
    indexing moves whole rows at once."""
    if a.ndim == 1:
        return a
    a = np.ascontiguousarray(a)
    return a.view(np.int64).reshape(-1) if a.dtype.itemsize * a.shape[1] == 8 else a.view(
        np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).reshape(-1)


def gather(rows: Rows) -> Block:
    """The samples of ``rows``, in row order, as one new block.

    The rows are grouped by source block (a stable sort); per row family one vectorised source index over all the
    groups and one destination index, then per array and group one ``np.take`` read (and, from several blocks,
    one scatter into place): the Python work grows with the number of source blocks, never with the rows."""
    n = len(rows)
    if n == 0:
        return Block({"z": np.zeros(0, np.uint8), "pos": np.zeros((0, 3), np.float32),
                      "bonds": np.zeros((0, 2), np.int32), "edges": np.zeros((0, 2), np.int32)},
                     {fam: np.zeros(1, np.int64) for fam in ROW_BYTES})
    one = len(rows.blocks) == 1
    order = np.arange(n) if one else np.argsort(rows.blk, kind="stable")
    sorted_blk = rows.blk[order]
    cuts = [0, n] if one else [0, *(np.flatnonzero(np.diff(sorted_blk)) + 1).tolist(), n]
    groups = [(rows.blocks[int(sorted_blk[lo])], lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    items = rows.item[order]
    ptr, src, dst, at = {}, {}, {}, {}
    for fam in ROW_BYTES:
        s = np.empty(n, np.int64)  # in block-sorted order
        c = np.empty(n, np.int64)
        for b, lo, hi in groups:
            it = items[lo:hi]
            s[lo:hi] = b.ptr[fam][it]
            c[lo:hi] = b.ptr[fam][it + 1] - s[lo:hi]
        counts = c if one else np.empty(n, np.int64)
        if not one:
            counts[order] = c
        p = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=p[1:])
        ptr[fam], src[fam] = p, ranges(s, c)
        at[fam] = np.concatenate([[0], np.cumsum(c)[np.asarray(cuts[1:]) - 1]])  # each group's span of src/dst
        dst[fam] = None if one else ranges(p[:-1][order], c)
    arrays = {}
    for name, fam in ARRAYS.items():
        first = groups[0][0].arrays[name]
        if one:
            arrays[name] = np.take(first, src[fam], axis=0)  # np.take: about twice as fast as first[idx]
            continue
        out = np.empty((int(ptr[fam][-1]), *first.shape[1:]), first.dtype)
        flat_out = _flat(out)
        for k, (b, _, _) in enumerate(groups):
            lo, hi = int(at[fam][k]), int(at[fam][k + 1])
            flat_out[dst[fam][lo:hi]] = _flat(np.take(b.arrays[name], src[fam][lo:hi], axis=0))
        arrays[name] = out
    return Block(arrays, ptr)


class BlockRandom:
    """Uniform floats drawn in blocks (vectorised) whose position is exactly restorable."""

    def __init__(self, rng: np.random.Generator, block: int = 1024) -> None:
        self._rng, self._block = rng, block
        self._start_state = rng.bit_generator.state
        self._buf = rng.random(block)
        self._pos = 0

    def next(self) -> float:
        return float(self.many(1)[0])

    def many(self, k: int) -> np.ndarray:
        """The next ``k`` floats (the same sequence as ``k`` calls of :meth:`next`)."""
        parts = []
        while k > 0:
            if self._pos == self._block:
                self._start_state = self._rng.bit_generator.state
                self._buf = self._rng.random(self._block)
                self._pos = 0
            m = min(k, self._block - self._pos)
            parts.append(self._buf[self._pos : self._pos + m])
            self._pos += m
            k -= m
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0)

    def state_dict(self) -> dict:
        return {"state": self._start_state, "pos": self._pos}

    def load_state_dict(self, st: dict) -> None:
        self._rng.bit_generator.state = st["state"]
        self._start_state = st["state"]
        self._buf = self._rng.random(self._block)
        self._pos = int(st["pos"])
