"""The training stream of one (rank, worker) slot: small stateful iterator→iterator stages.

The stages are composed in one place, :func:`train_stream`::

    plan + read + decode  (DomainSource, one per domain; infinite, pass after pass)
      → per-domain shuffle buffer bounded in bytes  (ShuffleBuffer)
      → mix domains by weight  (Mixer)            | homogeneous mode: choose a domain per batch
      → pack to the atom budget  (Packer)         |   and pack from that domain's own pool
      → transforms + collate to a PyG Batch  (Collator)

Every stage keeps its state as plain integers (pass, cursor, generator states, the ids of buffered and
pooled samples) so :meth:`TrainStream.state_dict` captures the stream exactly and
:meth:`TrainStream.load_state_dict` rebuilds it, re-reading buffered samples by id.
All randomness derives from integers: (seed, domain, pass, slot, batch number).
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import BinaryIO

import numpy as np
import torch

from pipeline import storage
from pipeline.collate import CollateOptions, collate_compact, expand
from pipeline.config import DataConfig
from pipeline.index import DomainIndex
from pipeline.packing import choose_head, crop_sample, filler_limit, pool_wants_more, select_batch
from pipeline.plan import domain_key, pass_order, read_blocks, rng_for, slot_piece
from pipeline.schema import Sample, SchemaError

log = logging.getLogger(__name__)

COUNTERS = ("samples", "atoms", "bad", "oversize_skipped", "oversize_cropped", "batches")
"""Per-domain counters of a stream (batches: batches that contain the domain)."""
_C = {name: i for i, name in enumerate(COUNTERS)}


class OversizeError(ValueError):
    """A sample exceeds the batch budget under ``oversize_policy='raise'``."""


class Item:
    """A decoded sample travelling through the stages, with its origin (domain, pass, sample id)."""

    __slots__ = ("d", "pass_", "idx", "atoms", "edges", "nbytes", "sample")

    def __init__(self, d: int, pass_: int, idx: int, sample: Sample | None, nbytes: int, edges: int) -> None:
        self.d, self.pass_, self.idx, self.sample, self.nbytes = d, pass_, idx, sample, nbytes
        self.atoms = 0 if sample is None else sample.num_atoms
        self.edges = edges  # directed radius edges (2 x stored pairs), an upper bound after filtering


class BlockRandom:
    """Uniform floats drawn in blocks (vectorised) whose position is exactly restorable."""

    def __init__(self, rng: np.random.Generator, block: int = 1024) -> None:
        self._rng, self._block = rng, block
        self._start_state = rng.bit_generator.state
        self._buf = rng.random(block)
        self._pos = 0

    def next(self) -> float:
        if self._pos == self._block:
            self._start_state = self._rng.bit_generator.state
            self._buf = self._rng.random(self._block)
            self._pos = 0
        u = self._buf[self._pos]
        self._pos += 1
        return float(u)

    def state_dict(self) -> dict:
        return {"state": self._start_state, "pos": self._pos}

    def load_state_dict(self, st: dict) -> None:
        self._rng.bit_generator.state = st["state"]
        self._start_state = st["state"]
        self._buf = self._rng.random(self._block)
        self._pos = int(st["pos"])


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

    def read_run(self, ids: np.ndarray) -> list[bytes | None]:
        """Bytes of a run of ids that are consecutive members of one shard, with one read call; None for members
        that could not be read (missing or truncated shard under ``bad_policy='skip'``)."""
        ix = self.index
        first, last = int(ids[0]), int(ids[-1])
        shard = int(ix.shard[first])
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
        mv = memoryview(data)
        out: list[bytes | None] = []
        for o, s in zip(ix.offset[ids].tolist(), ix.size[ids].tolist(), strict=True):
            lo = o - start
            out.append(bytes(mv[lo : lo + s]) if lo + s <= len(data) else None)
        return out

    def runs(self, ids: np.ndarray) -> list[np.ndarray]:
        """Split sample ids into runs of consecutive members of the same shard."""
        if len(ids) == 0:
            return []
        ids = np.asarray(ids, np.int64)
        brk = np.flatnonzero((np.diff(ids) != 1) | (np.diff(self.index.shard[ids]) != 0)) + 1
        return np.split(ids, brk)


_ST_DTYPES = {k: np.dtype(v) for k, v in {"U8": np.uint8, "I32": np.int32, "F32": np.float32, "U16": np.uint16,
              "I64": np.int64, "F64": np.float64, "I16": np.int16, "I8": np.int8, "U32": np.uint32,
              "F16": np.float16}.items()}


def fast_decode(data: bytes, index: DomainIndex, idx: int) -> Sample:
    """Decode a member's arrays without its metadata: key, domain and graph options come from the index and
    the manifest (whose format version was checked). Same safetensors layout as :func:`decode_sample`, a
    third of its cost; arrays are read-only views on ``data``. Raises SchemaError on malformed bytes."""
    if len(data) < 8:
        raise SchemaError(f"member is {len(data)} bytes, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise SchemaError(f"safetensors header claims {n} bytes but the member has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n].decode())
        arrays = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            dt = _ST_DTYPES[info["dtype"]]
            shape = info["shape"]
            count = math.prod(shape)
            if hi - lo != count * dt.itemsize or 8 + n + hi > len(data):
                raise SchemaError(f"array {name!r} has {hi - lo} bytes for shape {shape} {dt}")
            arrays[name] = np.frombuffer(data, dt, count, 8 + n + lo).reshape(shape)
        s = Sample(
            key=index.keys[idx], domain=index.name, z=arrays["z"], pos=arrays["pos"], bonds=arrays["bonds"],
            bond_order=arrays["bond_order"], edges=arrays["edges"], radius_A=index.radius_A,
            max_neighbors=index.max_neighbors, res_index=arrays.get("res_index"), chain=arrays.get("chain"),
            atom_name=arrays.get("atom_name"),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, SchemaError):
            raise
        raise SchemaError(f"malformed safetensors member ({type(e).__name__}: {e})") from None
    na = s.z.shape[0]
    if na != int(index.num_atoms[idx]) or s.pos.shape != (na, 3):
        raise SchemaError(
            f"member has {na} atoms (pos {s.pos.shape}) but the index says {int(index.num_atoms[idx])}; "
            "the index does not match the shard"
        )
    return s


def decode_member(data: bytes, index: DomainIndex, idx: int, bad_policy: str, verify: bool = True) -> Sample | None:
    """Decode one member (checked against the index's crc32 when ``verify``); a bad one raises (policy
    'raise') or returns None (policy 'skip', counted by the caller)."""
    try:
        if verify and index.crc32 is not None and zlib.crc32(data) != int(index.crc32[idx]):
            raise SchemaError(
                f"crc32 {zlib.crc32(data):#010x} does not match the index's {int(index.crc32[idx]):#010x}: "
                "the member is corrupt (re-fetch or re-convert the shard)"
            )
        return fast_decode(data, index, idx)
    except SchemaError as e:
        where = f"{index.shard_urls[int(index.shard[idx])]}:{index.keys[idx]}"
        msg = f"{where}: {e}"
        if bad_policy == "raise":
            raise SchemaError(f"{msg} (set data.bad_sample_policy='skip' to count and skip bad samples)") from None
        log.warning("skipping bad sample: %s", msg)
        return None


class DomainSource:
    """Plan + read + decode for one domain: yields Items of this slot's piece of pass 0, 1, 2, ..."""

    def __init__(self, index: DomainIndex, d: int, slot: int, n_slots: int, cfg: DataConfig, counters: np.ndarray):
        if len(index) == 0:
            raise ValueError(f"domain {index.name!r} has no {index.split} samples; drop it from data.domains")
        self.index, self.d, self.slot, self.n_slots, self.cfg, self.counters = index, d, slot, n_slots, cfg, counters
        self.fetcher = ShardFetcher(index, cfg.bad_sample_policy)
        self._blocks = read_blocks(index.shard, index.size, cfg.read_block_bytes)
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
        datas = self.fetcher.read_run(ids)
        ix = self.index
        for k, (i, data) in enumerate(zip(ids.tolist(), datas, strict=True)):
            s = None if data is None else decode_member(data, ix, i, self.cfg.bad_sample_policy, self.cfg.verify_crc32)
            nbytes = 0 if data is None else len(data)
            self._ready.append((lo + k, Item(self.d, self.pass_, i, s, nbytes, 2 * int(ix.num_edges[i]))))
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
            for i, data in zip(run.tolist(), self.fetcher.read_run(run), strict=True):
                s = None if data is None else decode_member(data, self.index, i, self.cfg.bad_sample_policy,
                                                            self.cfg.verify_crc32)
                got[i] = None if s is None else Item(self.d, 0, i, s, len(data), 2 * int(self.index.num_edges[i]))
        out = []
        for p, i in pass_ids:
            it = got[i]
            out.append(None if it is None else Item(self.d, p, i, it.sample, it.nbytes, it.edges))
        return out


class ShuffleBuffer:
    """Bounded (in bytes) streaming shuffle of one domain: fill to the bound, emit a random buffered sample.

    The (pass, id) of buffered samples are mirrored in a numpy array so the state is a cheap copy.
    """

    def __init__(self, source: DomainSource, capacity_bytes: int, rng: np.random.Generator) -> None:
        self.source, self.capacity = source, max(1, int(capacity_bytes))
        self.rand = BlockRandom(rng)
        self.items: list[Item] = []
        self.ids = np.zeros((64, 2), np.int64)
        self.nbytes = 0

    def __iter__(self) -> Iterator[Item]:
        return self

    def _push(self, it: Item) -> None:
        n = len(self.items)
        if n == len(self.ids):
            self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])
        self.ids[n, 0], self.ids[n, 1] = it.pass_, it.idx
        self.items.append(it)
        self.nbytes += it.nbytes

    def __next__(self) -> Item:
        items = self.items
        while self.nbytes < self.capacity or not items:
            self._push(next(self.source))
        last = len(items) - 1
        j = int(self.rand.next() * (last + 1))
        it = items[j]
        items[j] = items[last]
        self.ids[j] = self.ids[last]
        items.pop()
        self.nbytes -= it.nbytes
        return it

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict(), "ids": self.ids[: len(self.items)].copy()}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])
        self.items, self.nbytes = [], 0
        self.ids = np.zeros((64, 2), np.int64)
        pairs = [(int(p), int(i)) for p, i in np.asarray(st["ids"], np.int64).reshape(-1, 2)]
        for it in self.source.fetch(pairs):
            if it is not None:
                self._push(it)


def _cumulative(probs: np.ndarray) -> np.ndarray:
    """Cumulative probabilities whose last positive entry (and later) is > 1, so u in [0, 1) never picks p == 0."""
    p = np.asarray(probs, np.float64)
    cum = np.cumsum(p)
    cum[int(np.flatnonzero(p > 0)[-1]) :] = 2.0
    return cum


class Mixer:
    """Draw the domain of every next sample with fixed probabilities, then take it from that domain's buffer."""

    def __init__(self, streams: list[ShuffleBuffer], probs: np.ndarray, rng: np.random.Generator) -> None:
        self.streams = streams
        self.cum = _cumulative(probs)
        self.rand = BlockRandom(rng)

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        d = int(np.searchsorted(self.cum, self.rand.next(), side="right"))
        return next(self.streams[d])

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])


@dataclass(frozen=True)
class Budget:
    max_atoms: int | None
    max_edges: int | None
    max_graphs: int | None
    batch_size: int | None
    pool_atoms: int
    pool_max_samples: int
    oversize_policy: str
    seed: int
    fifo_fraction: float


class Packer:
    """Keep an oldest-first pool topped up from ``upstream`` and cut one batch from it per call."""

    def __init__(self, upstream: Iterator[Item], budget: Budget, sources: list[DomainSource], counters: np.ndarray):
        self.upstream, self.b, self.sources, self.counters = upstream, budget, sources, counters
        self.pool: list[Item] = []
        self.pool_atoms = 0
        self.filler_atoms = 0
        self.filler_limit = filler_limit(budget.max_atoms)

    def _admit(self, it: Item) -> Item | None:
        """Apply the oversize policy; returns the item to pool (maybe cropped) or None (skipped)."""
        b = self.b
        too_many_atoms = b.max_atoms is not None and it.atoms > b.max_atoms
        too_many_edges = b.max_edges is not None and it.edges > b.max_edges
        if b.batch_size is not None or not (too_many_atoms or too_many_edges):
            return it
        src = self.sources[it.d]
        key, name = src.index.keys[it.idx], src.index.name
        what = f"sample {key} ({name}) has {it.atoms} atoms / {it.edges} edges, over max_atoms={b.max_atoms} / max_edges={b.max_edges}"
        if b.oversize_policy == "raise":
            raise OversizeError(f"{what}; set data.oversize_policy to 'skip' or 'crop', or raise the budget")
        if b.oversize_policy == "skip":
            self.counters[it.d, _C["oversize_skipped"]] += 1
            log.info("skipping oversize %s", what)
            return None
        return self._crop(it)

    def _crop(self, it: Item) -> Item:
        b = self.b
        rng = rng_for(b.seed, 0xC209, domain_key(self.sources[it.d].index.name), it.pass_, it.idx)
        target = it.atoms if b.max_atoms is None else min(it.atoms, b.max_atoms)
        while True:
            s = crop_sample(it.sample, target, rng)
            edges = 2 * len(s.edges)
            if b.max_edges is None or edges <= b.max_edges or target <= 1:
                break
            target = max(1, int(target * b.max_edges / edges * 0.95))
        self.counters[it.d, _C["oversize_cropped"]] += 1
        return Item(it.d, it.pass_, it.idx, s, it.nbytes, edges)

    def _top_up(self) -> None:
        b, pool = self.b, self.pool
        if b.batch_size is not None:
            while len(pool) < b.batch_size:
                self._add(next(self.upstream))
            return
        while not pool or pool_wants_more(self.pool_atoms, self.filler_atoms, len(pool), b.pool_atoms,
                                          b.pool_max_samples):
            it = self._admit(next(self.upstream))
            if it is not None:
                self._add(it)

    def _add(self, it: Item) -> None:
        self.pool.append(it)
        self.pool_atoms += it.atoms
        if it.atoms <= self.filler_limit:
            self.filler_atoms += it.atoms

    def __iter__(self) -> Iterator[list[Item]]:
        return self

    def __next__(self) -> list[Item]:
        self._top_up()
        b = self.b
        if b.batch_size is not None:
            chosen = self.pool[: b.batch_size]
            self.pool = self.pool[b.batch_size :]
        else:
            atoms = np.fromiter((it.atoms for it in self.pool), np.int64, len(self.pool))
            edges = None
            if b.max_edges is not None:
                edges = np.fromiter((it.edges for it in self.pool), np.int64, len(self.pool))
            head = choose_head(atoms, self.pool_atoms, self.filler_atoms, b.pool_atoms, b.max_atoms)
            pos = np.sort(select_batch(atoms, b.max_atoms, edges, b.max_edges, b.max_graphs, head, b.fifo_fraction))
            chosen = [self.pool[i] for i in pos.tolist()]
            keep = np.ones(len(self.pool), bool)
            keep[pos] = False
            self.pool = [self.pool[i] for i in np.flatnonzero(keep).tolist()]
        for it in chosen:
            self.pool_atoms -= it.atoms
            if it.atoms <= self.filler_limit:
                self.filler_atoms -= it.atoms
        return chosen

    def state_dict(self) -> dict:
        return {"pool": [(it.d, it.pass_, it.idx) for it in self.pool]}

    def load_state_dict(self, st: dict) -> None:
        self.pool = []
        by_d: dict[int, list[tuple[int, int, int]]] = {}
        for k, (d, p, i) in enumerate(st["pool"]):
            by_d.setdefault(d, []).append((k, p, i))
        slots: list[Item | None] = [None] * len(st["pool"])
        for d, rows in by_d.items():
            for (k, _, _), it in zip(rows, self.sources[d].fetch([(p, i) for _, p, i in rows]), strict=True):
                if it is not None and (self.b.batch_size is None and self.b.max_atoms is not None):
                    if it.atoms > self.b.max_atoms or (self.b.max_edges is not None and it.edges > self.b.max_edges):
                        it = self._crop(it)
                        self.counters[d, _C["oversize_cropped"]] -= 1  # counted when first admitted
                slots[k] = it
        self.pool, self.pool_atoms, self.filler_atoms = [], 0, 0
        for it in slots:
            if it is not None:
                self._add(it)


class HomogeneousPacker:
    """One domain per batch: draw the batch's domain, then cut the batch from that domain's own pool."""

    def __init__(self, packers: list[Packer], batch_probs: np.ndarray, rng: np.random.Generator) -> None:
        self.packers = packers
        self.cum = _cumulative(batch_probs)
        self.rand = BlockRandom(rng)

    def __iter__(self) -> Iterator[list[Item]]:
        return self

    def __next__(self) -> list[Item]:
        d = int(np.searchsorted(self.cum, self.rand.next(), side="right"))
        return next(self.packers[d])

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict(), "pools": [p.state_dict() for p in self.packers]}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])
        for p, s in zip(self.packers, st["pools"], strict=True):
            p.load_state_dict(s)


def batch_stats(items: list[Item], n_domains: int, max_atoms: int | None, n_edges: int) -> dict:
    """Per-batch statistics attached to every batch as ``batch.stats``."""
    d = np.fromiter((it.d for it in items), np.int64, len(items))
    a = np.fromiter((it.atoms for it in items), np.int64, len(items))
    return stats_of(d, a, n_domains, max_atoms, n_edges)


def stats_of(d: np.ndarray, a: np.ndarray, n_domains: int, max_atoms: int | None, n_edges: int) -> dict:
    """atoms, graphs, edges (directed, in edge_index), fill (atoms / max_atoms), per-domain atoms and graphs."""
    atoms = int(a.sum())
    return {
        "atoms": atoms,
        "graphs": len(a),
        "edges": n_edges,
        "fill": atoms / max_atoms if max_atoms else 1.0,
        "domain_atoms": np.bincount(d, weights=a, minlength=n_domains).astype(np.int64).tolist(),
        "domain_graphs": np.bincount(d, minlength=n_domains).tolist(),
    }


class Collator:
    """Transforms + collation; the batch's generator is seeded by (seed, slot, batch number)."""

    def __init__(self, upstream: Iterator[list[Item]], opt: CollateOptions, seed: int, slot: int, n_domains: int,
                 max_atoms: int | None, counters: np.ndarray) -> None:
        self.upstream, self.opt, self.seed, self.slot, self.n_domains = upstream, opt, seed, slot, n_domains
        self.max_atoms, self.counters = max_atoms, counters
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        return finish(self.next_compact())

    def next_compact(self) -> dict:
        """The next batch in :func:`pipeline.collate.collate_compact` form, with ``stats`` and ``pass_index``."""
        items = next(self.upstream)
        rng = rng_for(self.seed, 0xC011, self.slot, self.n)
        c = collate_compact([it.sample for it in items], [it.d for it in items], self.opt, rng)
        stats = batch_stats(items, self.n_domains, self.max_atoms, 2 * int(c["pairs"].shape[0]))
        c["stats"] = stats
        c["pass_index"] = torch.tensor([it.pass_ for it in items], dtype=torch.long)
        cnt = self.counters
        cnt[:, _C["samples"]] += stats["domain_graphs"]
        cnt[:, _C["atoms"]] += stats["domain_atoms"]
        cnt[:, _C["batches"]] += np.asarray(stats["domain_graphs"]) > 0
        self.n += 1
        return c

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, st: dict) -> None:
        self.n = int(st["n"])


def finish(c: dict):
    """Expand a compact batch into the PyG Batch and attach the loader's fields (``stats``, ``pass_index``)."""
    batch = expand(c)
    batch.stats = c["stats"]
    batch.pass_index = c["pass_index"]
    return batch


def collate_options(cfg: DataConfig) -> CollateOptions:
    """The collate options of a data config: each CollateOptions field that DataConfig has, from it."""
    return CollateOptions(**{f.name: getattr(cfg, f.name) for f in fields(CollateOptions) if hasattr(cfg, f.name)})


def budget_of(cfg: DataConfig) -> Budget:
    return Budget(
        max_atoms=None if cfg.batch_size is not None else cfg.max_atoms,
        max_edges=cfg.max_edges,
        max_graphs=cfg.max_graphs,
        batch_size=cfg.batch_size,
        pool_atoms=int(cfg.pool_budget_multiple * (cfg.max_atoms or 0)),
        pool_max_samples=cfg.pool_max_samples,
        oversize_policy=cfg.oversize_policy,
        seed=cfg.seed,
        fifo_fraction=cfg.fifo_fraction,
    )


class TrainStream:
    """The composed stages of one slot: iterate for PyG batches; ``next_compact`` for the worker form,
    ``next_items`` for the packed samples without collation."""

    def __init__(self, sources, buffers, mixer, packer, collator, counters):
        self.sources, self.buffers, self.mixer, self.packer = sources, buffers, mixer, packer
        self.collator, self.counters = collator, counters
        self._live_sources = [s for s in sources if s is not None]
        self._live_buffers = [b for b in buffers if b is not None]

    def __iter__(self):
        return self

    def __next__(self):
        return finish(self.collator.next_compact())

    def next_compact(self) -> dict:
        return self.collator.next_compact()

    def next_items(self) -> list[Item]:
        """The next batch before collation (cheap; for planning checks and benchmarks of packing)."""
        items = next(self.packer)
        self.collator.n += 1
        stats = batch_stats(items, self.counters.shape[0], self.collator.max_atoms, 0)
        self.counters[:, _C["samples"]] += stats["domain_graphs"]
        self.counters[:, _C["atoms"]] += stats["domain_atoms"]
        self.counters[:, _C["batches"]] += np.asarray(stats["domain_graphs"]) > 0
        return items

    def state_dict(self) -> dict:
        return {
            "sources": [s.state_dict() for s in self._live_sources],
            "buffers": [b.state_dict() for b in self._live_buffers],
            "mixer": None if self.mixer is None else self.mixer.state_dict(),
            "packer": self.packer.state_dict(),
            "collator": self.collator.state_dict(),
            "counters": self.counters.tolist(),
        }

    def load_state_dict(self, st: dict) -> None:
        if len(st["sources"]) != len(self._live_sources):
            raise ValueError(
                f"loader state has {len(st['sources'])} domains, this config has {len(self._live_sources)}; "
                "resume with the same data.domains"
            )
        for s, x in zip(self._live_sources, st["sources"], strict=True):
            s.load_state_dict(x)
        for b, x in zip(self._live_buffers, st["buffers"], strict=True):
            b.load_state_dict(x)
        if self.mixer is not None:
            self.mixer.load_state_dict(st["mixer"])
        self.packer.load_state_dict(st["packer"])
        self.collator.load_state_dict(st["collator"])
        self.counters[...] = np.asarray(st["counters"], np.int64)

    def passes(self) -> list[int | None]:
        return [None if s is None else s.pass_ for s in self.sources]

    def close(self) -> None:
        for s in self._live_sources:
            s.fetcher.close()


def train_stream(
    cfg: DataConfig,
    indexes: list[DomainIndex],
    sample_probs: np.ndarray,
    batch_probs: np.ndarray,
    slot: int,
    n_slots: int,
) -> TrainStream:
    """Compose the training stages of one slot (``slot = rank * num_workers + worker``)."""
    n_dom = len(indexes)
    counters = np.zeros((n_dom, len(COUNTERS)), np.int64)
    live = [d for d in range(n_dom) if sample_probs[d] > 0]
    sources: list[DomainSource | None] = [None] * n_dom
    buffers: list[ShuffleBuffer | None] = [None] * n_dom
    for d in live:
        sources[d] = DomainSource(indexes[d], d, slot, n_slots, cfg, counters)
        rng = rng_for(cfg.seed, 0x5B0F, domain_key(indexes[d].name), slot)
        # never more than about one pass of this slot: a buffer must not hold a sample twice
        per_slot = int(indexes[d].size.sum()) // n_slots
        buffers[d] = ShuffleBuffer(sources[d], min(cfg.shuffle_buffer_bytes, per_slot), rng)
    budget = budget_of(cfg)
    if cfg.cross_domain_batches:
        mixer = Mixer(buffers, sample_probs, rng_for(cfg.seed, 0x313, slot))
        packer = Packer(mixer, budget, sources, counters)
    else:
        mixer = None
        packers = [Packer(b if b is not None else iter(()), budget, sources, counters) for b in buffers]
        packer = HomogeneousPacker(packers, batch_probs, rng_for(cfg.seed, 0x314, slot))
    collator = Collator(packer, collate_options(cfg), cfg.seed, slot, n_dom, budget.max_atoms, counters)
    return TrainStream(sources, buffers, mixer, packer, collator, counters)
