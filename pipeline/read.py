"""Plan + read + decode of one domain: :class:`ShardFetcher` (runs of block members through :mod:`pipeline.storage`),
:func:`decode_members` (crc32 + one validation per block), :class:`DomainSource` (this slot's piece of pass 0, 1, 2,
...) as :class:`~pipeline.items.Rows` of decoded blocks."""

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
from pipeline.items import _C, Block, Rows, rows_of_block
from pipeline.plan import pass_order, read_blocks, slot_piece
from pipeline.schema import Sample, SchemaError, decode_block_arrays, sample_arrays

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
        shard = int(ix.shard_of(first))
        if last - first + 1 != len(ids) or int(ix.shard_of(last)) != shard:
            raise ValueError(f"read_run takes consecutive members of one shard (split with runs()); got ids "
                             f"{first}..{last} ({len(ids)} ids) in shards {shard}..{int(ix.shard_of(last))}")
        start, end = int(ix.offset_of(first)), int(ix.offset_of(last) + ix.size_of(last))
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
        member = ix.member[first : last + 1]
        cuts = np.flatnonzero(member[1:] != member[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(ids)]
        mv = memoryview(data)
        out: list[tuple[np.ndarray, bytes | None]] = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            m = int(member[lo])
            o, n = int(ix.member_offset[m]) - start, int(ix.member_size[m])
            out.append((ids[lo:hi], bytes(mv[o : o + n]) if o + n <= len(data) else None))
        return out

    def runs(self, ids: np.ndarray) -> list[np.ndarray]:
        """Split sample ids into runs of consecutive members of the same shard."""
        if len(ids) == 0:
            return []
        ids = np.asarray(ids, np.int64)
        brk = np.flatnonzero((np.diff(ids) != 1) | (np.diff(self.index.shard_of(ids)) != 0)) + 1
        return np.split(ids, brk)


def _reject(err: SchemaError, index: DomainIndex, ids: np.ndarray, bad_policy: str) -> None:
    """Bad samples (all of a block, or one): raise (policy 'raise') or warn once (policy 'skip'; the caller counts
    each)."""
    what = str(index.keys[int(ids[0])]) if len(ids) == 1 else f"{len(ids)} samples from {index.keys[int(ids[0])]}"
    msg = f"{index.shard_urls[int(index.shard_of(int(ids[0])))]}:{what}: {err}"
    if bad_policy == "raise":
        raise SchemaError(f"{msg} (set data.bad_sample_policy='skip' to count and skip bad samples)") from None
    log.warning("skipping bad samples: %s", msg)


def decode_members(members: list[tuple[np.ndarray, bytes | None]], index: DomainIndex, bad_policy: str,
                   verify: bool = True) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray] | None, np.ndarray, np.ndarray]]:
    """Per block member of one read (:meth:`ShardFetcher.read_run`): ``(ids, arrays, items, ok)``: the run's sample
    ids in it, the block's decoded arrays (None when the whole block is bad or unreadable), the ids' positions in the
    block and which of them are good.

    Each block is checked once: its crc32 against the index (when ``verify``), its arrays against the schema
    (:func:`pipeline.schema.decode_block_arrays`: a fixed number of numpy reductions per block; a block that fails
    is examined sample by sample, and only its bad samples are rejected), and each sample's position and atom count
    against its index row. A bad block or sample raises (policy 'raise') or is marked not ok (policy 'skip', counted
    by the caller), as are members without bytes (an unreadable shard, reported by the fetcher)."""
    for ids, data in members:
        none = np.zeros(len(ids), bool)
        if data is None:
            yield ids, None, np.zeros(len(ids), np.int64), none
            continue
        try:
            if verify and zlib.crc32(data) != int(index.crc32_of(ids[0])):
                raise SchemaError(f"crc32 {zlib.crc32(data):#010x} does not match the index's "
                                  f"{int(index.crc32_of(ids[0])):#010x}: the block is corrupt (re-fetch or re-convert the shard)")
            a, n, faults = decode_block_arrays(data)
            items = index.item[ids].astype(np.int64)
            if int(items.max()) >= n:
                raise SchemaError(f"the index places a sample at item {int(items.max())} of a block of {n} samples; "
                                  "the index does not match the shard")
        except SchemaError as e:
            _reject(e, index, ids, bad_policy)
            yield ids, None, np.zeros(len(ids), np.int64), none
            continue
        ap = a["atom_ptr"]
        got = (ap[items + 1] - ap[items]).astype(np.int64)
        bad = got != index.num_atoms[ids]
        if faults:
            bad |= np.isin(items, np.fromiter(faults, np.int64, len(faults)))
        for k in np.flatnonzero(bad).tolist():
            fault = faults.get(int(items[k])) if faults else None
            if fault is None:
                fault = (f"sample has {int(got[k])} atoms but the index says {int(index.num_atoms[ids[k]])}; "
                         "the index does not match the shard")
            _reject(SchemaError(fault), index, ids[k : k + 1], bad_policy)
        yield ids, a, items, ~bad


def decode_run(members: list[tuple[np.ndarray, bytes | None]], index: DomainIndex, bad_policy: str,
               verify: bool = True) -> list[Sample | None]:
    """Whole samples of the block members of one read, in id order (None: bad or unreadable; see
    :func:`decode_members`). Key, domain and graph options come from the index and the manifest (whose format
    version was checked). Samples own copies of their arrays. For evaluation, fine-tuning and tools; the training
    stream keeps blocks (:meth:`DomainSource.next_rows`)."""
    out: list[Sample | None] = []
    for ids, a, items, ok in decode_members(members, index, bad_policy, verify):
        if a is None:
            out.extend([None] * len(ids))
            continue
        keys = index.keys.take(ids)
        for k, good in enumerate(ok.tolist()):
            if not good:
                out.append(None)
                continue
            arr = sample_arrays(a, int(items[k]))
            out.append(Sample(key=keys[k], domain=index.name, radius_A=index.radius_A,
                              max_neighbors=index.max_neighbors, **arr))
    return out


class DomainSource:
    """Plan + read + decode for one domain: :meth:`next_rows` gives this slot's piece of pass 0, 1, 2, ... as
    :class:`~pipeline.items.Rows`, one block member at a time."""

    def __init__(self, index: DomainIndex, d: int, slot: int, n_slots: int, cfg: DataConfig, counters: np.ndarray):
        if len(index) == 0:
            raise ValueError(f"domain {index.name!r} has no {index.split} samples; drop it from data.domains")
        self.index, self.d, self.slot, self.n_slots, self.cfg, self.counters = index, d, slot, n_slots, cfg, counters
        self.fetcher = ShardFetcher(index, cfg.bad_sample_policy)
        # read block of every sample (int32: ~4 bytes a row; a member's samples share their member's)
        self._blocks = read_blocks(index.member_shard, index.member_offset, cfg.read_block_bytes).astype(np.int32)[
            index.member]
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
        # per block member read and not yet handed out: (piece position of its first id, bad samples, rows)
        self._ready: deque[tuple[int, int, Rows | None]] = deque()

    def _rows(self, ids: np.ndarray, a: dict[str, np.ndarray] | None, items: np.ndarray, ok: np.ndarray,
              pass_: int) -> Rows | None:
        if a is None or not ok.any():
            return None
        good = ids[ok]
        return rows_of_block(Block.from_arrays(a), items[ok], self.d, pass_, good,
                             2 * self.index.num_edges[good].astype(np.int64))  # directed radius edges

    def _fill(self) -> None:
        for _ in range(self.n_slots + 1):  # a small domain may leave this slot's piece empty for a few passes
            if self._next_read < len(self._piece):
                break
            self._set_pass(self.pass_ + 1, 0)
        else:
            raise RuntimeError(f"domain {self.index.name!r}: no samples reach slot {self.slot}; this is a bug")
        g = int(np.searchsorted(self._group_starts, self._next_read, side="right"))
        lo, hi = self._next_read, int(self._group_starts[g])
        at = lo
        for ids, a, items, ok in decode_members(self.fetcher.read_run(self._piece[lo:hi]), self.index,
                                                self.cfg.bad_sample_policy, self.cfg.verify_crc32):
            self._ready.append((at, len(ids) - int(ok.sum()), self._rows(ids, a, items, ok, self.pass_)))
            at += len(ids)
        self._next_read = hi

    def next_rows(self) -> Rows:
        """The good samples of the next block member of this slot's piece (never empty); bad or unreadable ones
        are counted (in pass 0: each pass partitions the samples over all slots, so every bad sample counts once)."""
        bad_in_a_row = 0
        while True:
            if not self._ready:
                self._fill()
            _, n_bad, rows = self._ready.popleft()
            if n_bad and self.pass_ == 0:
                self.counters[self.d, _C["bad"]] += n_bad
            if rows is not None:
                return rows
            bad_in_a_row += n_bad
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

    def fetch_rows(self, pass_ids: np.ndarray) -> Rows:
        """Re-read samples by (pass, id) rows [k, 2], in the given order (restoring buffers and pools); bad ones
        are left out."""
        pass_ids = np.asarray(pass_ids, np.int64).reshape(-1, 2)
        if len(pass_ids) == 0:
            return Rows.empty()
        parts = []
        for run in self.fetcher.runs(np.unique(pass_ids[:, 1])):
            for ids, a, items, ok in decode_members(self.fetcher.read_run(run), self.index,
                                                    self.cfg.bad_sample_policy, self.cfg.verify_crc32):
                r = self._rows(ids, a, items, ok, 0)
                if r is not None:
                    parts.append(r)
        found = Rows.concat(parts)
        where = {i: k for k, i in enumerate(found.idx.tolist())}
        pick = [(where[i], p) for p, i in pass_ids.tolist() if i in where]
        out = found.take(np.array([k for k, _ in pick], np.int64))
        out.pass_ = np.array([p for _, p in pick], np.int64)
        return out

    def fetch_samples(self, ids: list[int]) -> list[Sample | None]:
        """Whole samples by id, in the given order (evaluation, fine-tuning); None for bad ones."""
        got: dict[int, Sample | None] = {}
        for run in self.fetcher.runs(np.unique(np.asarray(ids, np.int64))):
            got.update(zip(run.tolist(), decode_run(self.fetcher.read_run(run), self.index, self.cfg.bad_sample_policy,
                                                    self.cfg.verify_crc32), strict=True))
        return [got[int(i)] for i in ids]
