"""Plan + read + decode of one domain: :class:`ShardFetcher` (runs of block members through :mod:`pipeline.storage`),
:func:`decode_run` (crc32 + one validation per block), :class:`DomainSource` (this slot's piece of pass 0, 1, 2, ...)."""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.index import DomainIndex
from pipeline.items import _C, Item
from pipeline.plan import pass_order, read_blocks, slot_piece
from pipeline.schema import Sample, SchemaError, decode_block_arrays, sample_nbytes

log = logging.getLogger(__name__)


class ShardTruncatedError(storage.StorageError):
    """A shard ends before the members its index lists (a truncated upload or copy)."""


SHARD_FAULTS = (storage.StorageNotFoundError, storage.ChecksumMismatchError, ShardTruncatedError)
"""Faults of a shard's data (missing, truncated, sha256 mismatch), handled by ``data.bad_sample_policy``; any other
:class:`~pipeline.storage.StorageError` (credentials, endpoint, network after the retries) always raises."""

_warned_shards: set[str] = set()  # one warning per unreadable shard per process


class ShardFetcher:
    """Reads members by sample id through :mod:`pipeline.storage`: runs of consecutive members with one read
    (local or cached: an open file, seek + read; remote: ``storage.read_range``, a single Range request).

    A shard that is missing, truncated or fails its sha256 (:data:`SHARD_FAULTS`) raises a
    :class:`~pipeline.storage.StorageError` naming the URL under ``bad_policy='raise'``; under ``'skip'`` its
    unreadable members come back as None (the caller counts them as bad) after one warning naming the shard.
    Reads use ``index.options`` (``data.storage``), else the process default of :func:`pipeline.storage.configure`.
    """

    MAX_OPEN = 8
    """Local or cached shards kept open at once (a cache hit re-hashes the whole shard on open)."""

    def __init__(self, index: DomainIndex, bad_policy: str = "raise") -> None:
        self.index, self.bad_policy = index, bad_policy
        self.opts = index.options or storage.get_options()
        self._files: OrderedDict[int, BinaryIO] = OrderedDict()
        self._readable: dict[int, int] = {}  # shard -> bytes known to exist (0: missing), once a fault was seen

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, shard: int) -> BinaryIO:
        f = self._files.pop(shard, None)
        if f is None:
            sha = self.index.shard_sha256[shard] if self.index.shard_sha256 and self.opts.cache_dir else None
            f = storage.open_stream(self.index.shard_urls[shard], sha256=sha, options=self.opts)
            while len(self._files) >= self.MAX_OPEN:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f  # most recently used last
        return f

    def _read(self, shard: int, start: int, size: int) -> bytes:
        url = self.index.shard_urls[shard]
        if storage.scheme_of(url) == "file" or self.opts.cache_dir:
            f = self._file(shard)
            f.seek(start)
            return f.read(size)
        return storage.read_range(url, start, size, options=self.opts)  # one bounded Range request per run

    def _fault(self, shard: int, err: storage.StorageError, n_members: int) -> None:
        """Raise (policy 'raise') or warn once per shard (policy 'skip') about a shard's unreadable members."""
        url = storage.redact_url(self.index.shard_urls[shard])
        what = (f"shard {url} of domain {self.index.name!r} is listed in the index of "
                f"{storage.redact_url(self.index.root)!r} but cannot be read: {err}")
        if self.bad_policy == "raise":
            raise type(err)(
                f"{what}; re-upload the shard or re-run the converter, or set data.bad_sample_policy='skip' to count "
                "its unreadable samples as bad and go on"
            ) from None
        if url not in _warned_shards:
            _warned_shards.add(url)
            log.warning("skipping the unreadable samples of a shard (counted as bad): %s", what)
        log.debug("shard %s: %d unreadable members skipped in this read", url, n_members)

    def read_run(self, ids: np.ndarray) -> list[tuple[np.ndarray, bytes | None]]:
        """The block members of a run of ids (consecutive samples of one shard) with one read call: per member, the
        run's ids in it and its bytes (None: unreadable, a missing or truncated shard under ``bad_policy='skip'``).
        A run may start or end inside a member: the whole member is read."""
        ix = self.index
        ids = np.asarray(ids, np.int64)
        first, last = int(ids[0]), int(ids[-1])
        shard = int(ix.shard[first])
        if last - first + 1 != len(ids) or int(ix.shard[last]) != shard:
            raise ValueError(f"read_run takes consecutive members of one shard (split with runs()); got ids "
                             f"{first}..{last} ({len(ids)} ids) in shards {shard}..{int(ix.shard[last])}")
        start, end = int(ix.offset[first]), int(ix.offset[last] + ix.size[last])
        known = self._readable.get(shard)
        data = b""
        if known is None or start < known:  # else: past the known end of a faulty shard, already reported
            try:
                data = self._read(shard, start, end - start)
            except SHARD_FAULTS as e:
                self._readable[shard] = 0
                self._fault(shard, e, len(ids))
            else:
                if len(data) != end - start:
                    self._readable[shard] = start + len(data)
                    self._fault(shard, ShardTruncatedError(
                        f"wanted bytes {start}..{end}, got {len(data)}; the shard is truncated or does not match its index"
                    ), len(ids))
        off = ix.offset[first : last + 1]
        cuts = np.flatnonzero(off[1:] != off[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(ids)]
        mv = memoryview(data)
        out: list[tuple[np.ndarray, bytes | None]] = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            o, n = int(off[lo]) - start, int(ix.size[first + lo])
            out.append((ids[lo:hi], bytes(mv[o : o + n]) if o + n <= len(data) else None))
        return out

    def runs(self, ids: np.ndarray) -> list[np.ndarray]:
        """Split sample ids into runs of consecutive members of the same shard."""
        if len(ids) == 0:
            return []
        ids = np.asarray(ids, np.int64)
        brk = np.flatnonzero((np.diff(ids) != 1) | (np.diff(self.index.shard[ids]) != 0)) + 1
        return np.split(ids, brk)


def _reject(err: SchemaError, index: DomainIndex, ids: np.ndarray, bad_policy: str) -> None:
    """Bad samples (all of a block, or one): raise (policy 'raise') or warn once (policy 'skip'; the caller counts
    each)."""
    what = str(index.keys[int(ids[0])]) if len(ids) == 1 else f"{len(ids)} samples from {index.keys[int(ids[0])]}"
    msg = f"{index.shard_urls[int(index.shard[int(ids[0])])]}:{what}: {err}"
    if bad_policy == "raise":
        raise SchemaError(f"{msg} (set data.bad_sample_policy='skip' to count and skip bad samples)") from None
    log.warning("skipping bad samples: %s", msg)


def decode_run(members: list[tuple[np.ndarray, bytes | None]], index: DomainIndex, bad_policy: str,
               verify: bool = True) -> list[Sample | None]:
    """Samples of the block members of one read (:meth:`ShardFetcher.read_run`), in id order. Each block is checked
    once: its crc32 against the index (when ``verify``), its arrays against the schema
    (:func:`pipeline.schema.decode_block_arrays`: a fixed number of numpy reductions per block; a block that fails
    is examined sample by sample, and only its bad samples are rejected), and each sample's position and atom
    count against its index row. Key, domain and graph options come from the index and the
    manifest (whose format version was checked). Samples own copies of their arrays (a sample held in a buffer
    does not pin its block). A bad block or sample raises (policy 'raise') or comes back as None (policy 'skip',
    counted by the caller), as do members without bytes (an unreadable shard, reported)."""
    out: list[Sample | None] = []
    for ids, data in members:
        if data is None:
            out.extend([None] * len(ids))
            continue
        try:
            if verify and zlib.crc32(data) != int(index.crc32[ids[0]]):
                raise SchemaError(f"crc32 {zlib.crc32(data):#010x} does not match the index's "
                                  f"{int(index.crc32[ids[0]]):#010x}: the block is corrupt (re-fetch or re-convert the shard)")
            a, n, faults = decode_block_arrays(data)
            items = index.item[ids].astype(np.int64)
            if int(items.max()) >= n:
                raise SchemaError(f"the index places a sample at item {int(items.max())} of a block of {n} samples; "
                                  "the index does not match the shard")
        except SchemaError as e:
            _reject(e, index, ids, bad_policy)
            out.extend([None] * len(ids))
            continue
        ap, bp, ep = a["atom_ptr"], a["bond_ptr"], a["edge_ptr"]
        want = index.num_atoms[ids]
        got = (ap[items + 1] - ap[items]).astype(np.int64)
        z, pos, bonds, bo, edges = a["z"], a["pos"], a["bonds"], a["bond_order"], a["edges"]
        res, chain, names = a.get("res_index"), a.get("chain"), a.get("atom_name")
        keys = index.keys.take(ids)
        rows = zip(ap[items].tolist(), ap[items + 1].tolist(), bp[items].tolist(), bp[items + 1].tolist(),
                   ep[items].tolist(), ep[items + 1].tolist(), strict=True)
        for k, (a0, a1, b0, b1, e0, e1) in enumerate(rows):
            fault = faults.get(int(items[k])) if faults else None
            if fault is None and got[k] != want[k]:
                fault = f"sample has {int(got[k])} atoms but the index says {int(want[k])}; the index does not match the shard"
            if fault is not None:
                _reject(SchemaError(fault), index, ids[k : k + 1], bad_policy)
                out.append(None)
                continue
            out.append(Sample(
                key=keys[k], domain=index.name, z=z[a0:a1].copy(), pos=pos[a0:a1].copy(), bonds=bonds[b0:b1].copy(),
                bond_order=bo[b0:b1].copy(), edges=edges[e0:e1].copy(), radius_A=index.radius_A,
                max_neighbors=index.max_neighbors, res_index=None if res is None else res[a0:a1].copy(),
                chain=None if chain is None else chain[a0:a1].copy(),
                atom_name=None if names is None else names[a0:a1].copy(),
            ))
    return out


class DomainSource:
    """Plan + read + decode for one domain: yields Items of this slot's piece of pass 0, 1, 2, ..."""

    def __init__(self, index: DomainIndex, d: int, slot: int, n_slots: int, cfg: DataConfig, counters: np.ndarray):
        if len(index) == 0:
            raise ValueError(f"domain {index.name!r} has no {index.split} samples; drop it from data.domains")
        self.index, self.d, self.slot, self.n_slots, self.cfg, self.counters = index, d, slot, n_slots, cfg, counters
        self.fetcher = ShardFetcher(index, cfg.bad_sample_policy)
        self._blocks = read_blocks(index.shard, index.offset, cfg.read_block_bytes)
        self.pass_ = 0
        self._set_pass(0, 0)

    def _set_pass(self, pass_: int, cursor: int) -> None:
        self.pass_ = pass_
        self._piece = slot_piece(pass_order(self._blocks, self.cfg.seed, self.index.name, pass_), self.slot,
                                 self.n_slots, pass_)
        # read groups: runs of one block
        if len(self._piece):
            ids = self._piece
            brk = (np.diff(ids) != 1) | (np.diff(self._blocks[ids]) != 0)
            self._group_starts = np.concatenate([[0], np.flatnonzero(brk) + 1, [len(ids)]])
        else:
            self._group_starts = np.zeros(1, np.int64)
        self._next_read = cursor  # next piece position to read
        self._ready: deque[tuple[int, Item]] = deque()

    def _fill(self) -> None:
        for _ in range(self.n_slots + 1):  # a small domain may leave this slot's piece empty for a few passes
            if self._next_read < len(self._piece):
                break
            self._set_pass(self.pass_ + 1, 0)
        else:
            raise RuntimeError(f"domain {self.index.name!r}: no samples reach slot {self.slot}; this is a bug")
        g = int(np.searchsorted(self._group_starts, self._next_read, side="right"))
        lo, hi = self._next_read, int(self._group_starts[g])
        ids = self._piece[lo:hi]
        samples = decode_run(self.fetcher.read_run(ids), self.index, self.cfg.bad_sample_policy, self.cfg.verify_crc32)
        for k, (i, s, e) in enumerate(zip(ids.tolist(), samples, self.index.num_edges[ids].tolist(), strict=True)):
            self._ready.append((lo + k, Item(self.d, self.pass_, i, s, 0 if s is None else sample_nbytes(s), 2 * e)))
        self._next_read = hi

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        bad_in_a_row = 0
        while True:
            if not self._ready:
                self._fill()
            _, it = self._ready.popleft()
            if it.sample is not None:
                return it
            if it.pass_ == 0:  # each pass partitions the samples over all slots: count every bad sample once
                self.counters[self.d, _C["bad"]] += 1
            bad_in_a_row += 1
            if bad_in_a_row > len(self.index):  # more than a whole pass of this slot: would never return
                raise storage.StorageError(
                    f"domain {self.index.name!r}: {bad_in_a_row} samples in a row are bad or unreadable, a whole pass; "
                    f"check the shards under {storage.redact_url(self.index.root)!r} (or drop the domain)"
                )

    def state_dict(self) -> dict:
        cursor = self._ready[0][0] if self._ready else self._next_read
        return {"pass": self.pass_, "cursor": int(cursor)}

    def load_state_dict(self, st: dict) -> None:
        self._set_pass(int(st["pass"]), int(st["cursor"]))

    def fetch(self, pass_ids: list[tuple[int, int]]) -> list[Item | None]:
        """Re-read samples by (pass, id), in the given order (restoring buffers); None for bad ones."""
        if not pass_ids:
            return []
        ids = np.array([i for _, i in pass_ids], np.int64)
        order = np.argsort(ids, kind="stable")
        got: dict[int, Item | None] = {}
        for run in self.fetcher.runs(np.unique(ids[order])):
            samples = decode_run(self.fetcher.read_run(run), self.index, self.cfg.bad_sample_policy, self.cfg.verify_crc32)
            for i, s in zip(run.tolist(), samples, strict=True):
                got[i] = None if s is None else Item(self.d, 0, i, s, sample_nbytes(s),
                                                     2 * int(self.index.num_edges[i]))
        out = []
        for p, i in pass_ids:
            it = got[i]
            out.append(None if it is None else Item(self.d, p, i, it.sample, it.nbytes, it.edges))
        return out
