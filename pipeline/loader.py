"""Torch-facing loaders: the resolved data plan, the stateful training loader, the exact evaluation loader.

- :func:`resolve` reads manifests and indexes once and fixes every number the loaders need
  (per-domain probabilities, batches per epoch); the result is small and picklable.
- :class:`TrainLoader` yields exactly ``len(loader)`` batches per epoch on every rank (infinite
  per-slot streams cut into equal epochs), and records after every batch the state of the DataLoader
  worker that produced it, so :meth:`TrainLoader.state_dict` resumes exactly after the last consumed batch.
- :class:`EvalDataset` plans val/test batches from the index (atom counts only), deals them to ranks
  round-robin and pads short ranks with empty batches: every sample exactly once per evaluation.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.collate import collate
from pipeline.config import DataConfig
from pipeline.index import DomainIndex, load_domain_index, read_index_table, read_manifest
from pipeline.items import COUNTERS
from pipeline.packer import OversizeError, budget_of, stats_of
from pipeline.packing import crop_to_budget, plan_batches
from pipeline.plan import domain_key, rng_for, sample_probabilities
from pipeline.read import DomainSource
from pipeline.stream import collate_options, finish, train_stream

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Resolved:
    """Everything the loaders need, computed once from the config and the indexes."""

    cfg: DataConfig
    names: list[str]
    train: list[DomainIndex]
    val: list[DomainIndex]
    test: list[DomainIndex]
    sample_probs: np.ndarray
    batch_probs: np.ndarray
    effective_mean_atoms: np.ndarray

    def split(self, split: str) -> list[DomainIndex]:
        return {"train": self.train, "val": self.val, "test": self.test}[split]


def _effective_atoms(ix: DomainIndex, cfg: DataConfig) -> np.ndarray:
    """Atoms each sample will have in a batch under the oversize policy (0: skipped)."""
    a = ix.num_atoms
    if cfg.batch_size is not None or cfg.max_atoms is None:
        return a
    if cfg.oversize_policy == "crop":
        return np.minimum(a, cfg.max_atoms)
    if cfg.oversize_policy == "skip":
        return np.where(_over_budget(ix, cfg), 0, a)
    return a


def _over_budget(ix: DomainIndex, cfg: DataConfig) -> np.ndarray:
    """Samples over ``max_atoms`` or (directed radius edges, 2 per stored pair) over ``max_edges``."""
    over = ix.num_atoms > cfg.max_atoms
    if cfg.max_edges is not None:
        over |= ix.num_edges.astype(np.int64) * 2 > cfg.max_edges
    return over


def _effective_edges(ix: DomainIndex, cfg: DataConfig) -> np.ndarray:
    """Directed radius edges each sample brings to a batch (an upper bound; cropped ones at most ``max_edges``)."""
    e = 2 * ix.num_edges.astype(np.int64)
    if cfg.batch_size is None and cfg.max_edges is not None and cfg.oversize_policy == "crop":
        return np.minimum(e, cfg.max_edges)
    return e


def _check_oversize(ixs: list[DomainIndex], cfg: DataConfig) -> None:
    if cfg.batch_size is not None or cfg.oversize_policy != "raise":
        return
    bad = []
    for ix in ixs:
        over = np.flatnonzero(_over_budget(ix, cfg))
        bad += [f"{ix.name}/{ix.split}:{ix.keys[i]} ({ix.num_atoms[i]} atoms)" for i in over[:5]]
    if bad:
        raise OversizeError(
            f"samples larger than max_atoms={cfg.max_atoms}/max_edges={cfg.max_edges}: {', '.join(bad)}; "
            "set data.oversize_policy to 'crop' or 'skip', or raise the budget"
        )


def release_heap() -> None:
    """Hand freed heap pages back to the OS: Arrow's pool, and glibc's malloc (``malloc_trim``, where it exists;
    the index checks' temporaries otherwise stay resident, ~60 B a row, and forked workers inherit them)."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


@contextmanager
def system_allocator():
    """Arrow allocates with malloc inside: what is freed then goes back to the OS with :func:`release_heap`
    (Arrow's default mimalloc pool kept ~15 bytes a row of the index reads' temporaries; measured at 1.3 M rows,
    tables read and checked, 19 MB)."""
    old = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(old)


def resolve(cfg: DataConfig) -> Resolved:
    """Read manifests and indexes (train, val, test) of the configured domains; fix the mixing probabilities."""
    manifests: dict[str, dict] = {}

    def manifest(root: str) -> dict:
        if root not in manifests:
            manifests[root] = read_manifest(root, cfg.storage)
        return manifests[root]

    if cfg.domains:
        specs = [(d.name, d.weight, d.root or cfg.root) for d in cfg.domains]
        natural = False
    else:
        specs = [(name, 1.0, cfg.root) for name in sorted(manifest(cfg.root).get("index", {}))]
        natural = True
        if not specs:
            raise ValueError(f"the manifest under {cfg.root!r} lists no domains; re-run the converter")
    names = [n for n, _, _ in specs]
    with system_allocator():
        tables = [read_index_table(root, n, manifest(root), cfg.storage) if n in manifest(root).get("index", {})
                  else None for n, _, root in specs]  # each index read and checked once, for all three splits
        splits = {
            s: [load_domain_index(root, n, s, manifest(root), cfg.storage, t)
                for (n, _, root), t in zip(specs, tables, strict=True)]
            for s in ("train", "val", "test")
        }
        del tables
    release_heap()  # the tables' and the checks' pages, kept by Arrow's pool and by malloc otherwise
    for ix in splits["train"] + splits["val"] + splits["test"]:
        if len(ix) and (cfg.radius_A > ix.radius_A + 1e-6 or cfg.max_neighbors > ix.max_neighbors):
            raise ValueError(
                f"data.radius_A={cfg.radius_A} / data.max_neighbors={cfg.max_neighbors} exceed what {ix.root!r} "
                f"stores ({ix.radius_A} Å / {ix.max_neighbors}); lower them or re-convert with --radius/--max-neighbors"
            )
    _check_oversize(splits["train"] + splits["val"] + splits["test"], cfg)
    train = splits["train"]
    eff = [_effective_atoms(ix, cfg) for ix in train]
    sizes = np.array([int((e > 0).sum()) for e in eff], np.float64)
    mean = np.array([e[e > 0].mean() if (e > 0).any() else 0.0 for e in eff])
    if natural:  # every domain in its natural proportion, whatever the unit
        weights = sizes.copy() if cfg.mix_by == "samples" else (sizes * mean if cfg.mix_by == "atoms" else np.ones(len(sizes)))
    else:
        weights = np.array([w for _, w, _ in specs], np.float64)
    for name, w, n in zip(names, weights, sizes, strict=True):
        if w > 0 and n == 0:
            raise ValueError(f"domain {name!r} has weight {w} but no training samples; set its weight to 0 or drop it")
    probs = sample_probabilities(weights, mean, sizes, cfg.mix_by, cfg.temperature)
    per_batch = (
        np.full(len(names), float(cfg.batch_size))
        if cfg.batch_size is not None
        else cfg.max_atoms / np.maximum(mean, 1.0)
    )
    bp = probs / per_batch  # a batch of domain d holds about per_batch[d] samples
    batch_probs = bp / bp.sum()
    log.info("domains %s: sample probabilities %s", names, np.round(probs, 4).tolist())
    return Resolved(cfg, names, train, splits["val"], splits["test"], probs, batch_probs, mean)


def train_batches_per_epoch(res: Resolved, world_size: int) -> int:
    """Configured, or one pass of all training atoms (samples in fixed-size mode) over the world's budget."""
    cfg = res.cfg
    if cfg.train_batches_per_epoch is not None:
        return cfg.train_batches_per_epoch
    if cfg.batch_size is not None:
        total = sum(len(ix) for ix, p in zip(res.train, res.sample_probs, strict=True) if p > 0)
        return max(1, math.ceil(total / (cfg.batch_size * world_size)))
    total = sum(int(_effective_atoms(ix, cfg).sum()) for ix, p in zip(res.train, res.sample_probs, strict=True) if p > 0)
    return max(1, math.ceil(total / (cfg.max_atoms * world_size)))


def storage_delta(mark: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(new mark, storage counters of this process since ``mark``): what the stream read for one batch; it travels
    in ``batch.stats["storage"]`` from a DataLoader worker to the main process, where the loader sums it."""
    now = storage.stats.snapshot()
    return now, {k: now[k] - mark.get(k, 0) for k in now}


def _identity(x):
    return x


def pack_tensors(c: dict) -> tuple:
    """All tensors of a dict in one uint8 buffer (one shared-memory segment to hand from a worker to the
    main process instead of one per tensor), plus the layout; other values travel as they are."""
    tensors = [(k, v) for k, v in c.items() if isinstance(v, torch.Tensor)]
    layout, off = [], 0
    for k, v in tensors:
        n = v.numel() * v.element_size()
        layout.append((k, v.dtype, tuple(v.shape), off, n))
        off += (n + 7) // 8 * 8  # keep every view 8-byte aligned
    buf = torch.empty(off, dtype=torch.uint8)
    for (_, v), (_, _, _, o, n) in zip(tensors, layout, strict=True):
        if n:
            buf[o : o + n] = v.contiguous().reshape(-1).view(torch.uint8)
    rest = {k: v for k, v in c.items() if not isinstance(v, torch.Tensor)}
    return buf, layout, rest


def unpack_tensors(packed: tuple) -> dict:
    """The dict of :func:`pack_tensors`, its tensors as views of the one buffer."""
    buf, layout, rest = packed
    out = dict(rest)
    for k, dtype, shape, o, n in layout:
        out[k] = buf[o : o + n].view(dtype).reshape(shape)
    return out


def _plain(x):
    """State to plain Python (lists, ints) so checkpoints load with ``torch.load(weights_only=True)``."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


class _TrainWorkerDataset(IterableDataset):
    """What each DataLoader worker runs: its logical slot's stream for the rest of the epoch."""

    def __init__(self, res: Resolved, rank: int, world: int, n_logical: int, states: list, done: int, total: int):
        self.res, self.rank, self.world, self.n_logical = res, rank, world, n_logical
        self.states, self.done, self.total = states, done, total

    def __iter__(self):
        info = get_worker_info()
        physical = 0 if info is None else info.id
        w = (physical + self.done) % self.n_logical  # rotate so the interleaving continues where it stopped
        first = self.done + ((w - self.done) % self.n_logical)
        count = len(range(first, self.total, self.n_logical))
        if count == 0:
            return
        stream = train_stream(
            self.res.cfg, self.res.train, self.res.sample_probs, self.res.batch_probs,
            self.rank * self.n_logical + w, self.world * self.n_logical,
        )
        try:
            mark = storage.stats.snapshot()
            if self.states[w] is not None:
                stream.load_state_dict(self.states[w])
            for _ in range(count):
                c = stream.next_compact()
                mark, c["stats"]["storage"] = storage_delta(mark)
                yield pack_tensors(c), w, stream.state_dict()
                mark = storage.stats.snapshot()  # not what the consumer did meanwhile (num_workers=0)
        finally:
            stream.close()


class TrainLoader:
    """Exactly ``len(self)`` training batches per epoch on every rank; exact, resumable position.

    Iterating it starts DataLoader workers (fresh each epoch) that continue the per-slot streams where
    the last consumed batch left them. ``state_dict(seq)`` gives the state right after the batch whose
    ``batch.loader_seq`` is ``seq`` (default: the last batch yielded).
    """

    def __init__(self, res: Resolved, rank: int = 0, world_size: int = 1, num_workers: int | None = None):
        cfg = res.cfg
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.res, self.rank, self.world = res, rank, world_size
        self.num_workers = cfg.num_workers if num_workers is None else num_workers
        self.n_logical = max(1, self.num_workers)
        self.batches_per_epoch = train_batches_per_epoch(res, world_size)
        self.epoch, self.done = 0, 0
        self.states: list = [None] * self.n_logical
        self.seq = 0
        self._history: deque = deque(maxlen=64)
        self._storage = dict.fromkeys(storage.StorageStats.FIELDS, 0)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _loader(self):
        ds = _TrainWorkerDataset(
            self.res, self.rank, self.world, self.n_logical, list(self.states), self.done, self.batches_per_epoch
        )
        if self.num_workers == 0:
            return iter(ds)
        return iter(
            DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                prefetch_factor=self.res.cfg.prefetch_factor,
                persistent_workers=False,
                multiprocessing_context=self.res.cfg.worker_start_method,
            )
        )

    def __iter__(self):
        if self.done >= self.batches_per_epoch:
            self.epoch, self.done = self.epoch + 1, 0
        for packed, w, state in self._loader():
            batch = finish(unpack_tensors(packed))  # in the main process: fewer bytes cross from the worker
            for k, v in batch.stats.get("storage", {}).items():
                self._storage[k] = self._storage.get(k, 0) + v
            self.states[w] = state
            self.done += 1
            self.seq += 1
            self._history.append((self.seq, self.epoch, self.done, list(self.states)))
            batch.loader_seq = self.seq
            yield batch
        if self.done >= self.batches_per_epoch:
            self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self, seq: int | None = None) -> dict:
        """The position after batch ``seq`` (default: the last yielded); plain Python types only."""
        snap = (self.seq, self.epoch, self.done, self.states)
        if seq is not None and seq != self.seq:
            found = [h for h in self._history if h[0] == seq]
            if not found:
                raise ValueError(f"loader position of batch {seq} is no longer kept (last {self.seq})")
            snap = found[0]
        s, epoch, done, states = snap
        if done >= self.batches_per_epoch:
            epoch, done = epoch + 1, 0
        return _plain({
            "version": STATE_VERSION,
            "seq": s,
            "epoch": epoch,
            "done": done,
            "rank": self.rank,
            "world_size": self.world,
            "num_workers": self.n_logical,
            "domains": self.res.names,
            "batches_per_epoch": self.batches_per_epoch,
            "workers": states,
        })

    def load_state_dict(self, st: dict) -> None:
        expect = {"world_size": self.world, "num_workers": self.n_logical, "domains": self.res.names}
        for k, v in expect.items():
            if st.get(k) != v:
                raise ValueError(
                    f"loader state was saved with {k}={st.get(k)!r}, this run has {v!r}; resume with the same "
                    "data.num_workers, world size and data.domains (the per-worker streams depend on them)"
                )
        if st.get("batches_per_epoch") != self.batches_per_epoch:
            log.warning("batches per epoch changed from %s to %s", st.get("batches_per_epoch"), self.batches_per_epoch)
        self.seq, self.epoch, self.done = int(st["seq"]), int(st["epoch"]), int(st["done"])
        self.states = list(st["workers"])
        self._history.clear()

    def storage_stats(self) -> dict[str, int]:
        """Storage counters (requests, retries, resumes, bytes_fetched, errors, cache hits, ...; see
        :class:`pipeline.storage.StorageStats`) of the reads behind the batches this loader yielded, summed over its
        workers: this rank since the loader was created (not restored on resume)."""
        return dict(self._storage)

    def stats(self) -> dict:
        """Cumulative per-domain counters of this rank (see :data:`pipeline.items.COUNTERS`) and passes."""
        total = np.zeros((len(self.res.names), len(COUNTERS)), np.int64)
        passes: list[list[int]] = [[] for _ in self.res.names]
        for st in self.states:
            if st is None:
                continue
            total += np.asarray(st["counters"], np.int64)
            live = [d for d, p in enumerate(self.res.sample_probs) if p > 0]
            for d, src in zip(live, st["sources"], strict=True):
                passes[d].append(int(src["pass"]))
        out = {}
        for d, name in enumerate(self.res.names):
            out[name] = {c: int(total[d, i]) for i, c in enumerate(COUNTERS)}
            out[name]["pass"] = min(passes[d]) if passes[d] else 0
        return out


class EvalDataset(IterableDataset):
    """Val/test batches planned from the index; this rank's share, dealt to workers round-robin."""

    def __init__(self, res: Resolved, split: str, rank: int = 0, world_size: int = 1, shuffle: bool = False):
        """``shuffle``: interleave all samples in a seeded random order before planning (one mixed pass in
        natural proportions, as the dry run streams it); otherwise domain after domain in index order."""
        self.res, self.split, self.rank, self.world = res, split, rank, world_size
        cfg = res.cfg
        budget = budget_of(cfg)
        ixs = res.split(split)
        self.skipped = [0] * len(ixs)
        groups = []  # (domain, ids) in planning order
        for d, ix in enumerate(ixs):
            if len(ix) == 0:
                continue
            eff = _effective_atoms(ix, cfg)
            keep = np.flatnonzero(eff > 0)
            self.skipped[d] = int(len(ix) - len(keep))
            groups.append((d, keep, eff[keep], _effective_edges(ix, cfg)[keep]))
        if cfg.cross_domain_batches and groups:
            groups = [(
                np.concatenate([np.full(len(g[1]), g[0]) for g in groups]),
                np.concatenate([g[1] for g in groups]),
                np.concatenate([g[2] for g in groups]),
                np.concatenate([g[3] for g in groups]),
            )]
        else:
            groups = [(np.full(len(g[1]), g[0]), g[1], g[2], g[3]) for g in groups]
        if shuffle:
            rng = rng_for(cfg.seed, 0x5F1E, domain_key(split))
            groups = [tuple(a[perm] for a in g) for g in groups for perm in [rng.permutation(len(g[1]))]]
        batches = []
        for dom, ids, atoms, edges in groups:
            for b in plan_batches(atoms, budget.max_atoms, edges if cfg.max_edges else None, cfg.max_edges,
                                  cfg.max_graphs, budget.pool_atoms or None, cfg.pool_max_samples, cfg.batch_size,
                                  cfg.fifo_fraction):
                batches.append((dom[b], ids[b]))
        self.n_total = len(batches)
        if any(self.skipped):
            log.warning("%s: skipping oversize samples per domain %s", split, dict(zip(res.names, self.skipped, strict=True)))
        mine = batches[rank::world_size]
        per_rank = math.ceil(len(batches) / world_size) if cfg.pad_eval_batches else len(mine)
        self.batches = [(i * world_size + rank, b) for i, b in enumerate(mine)]
        self.batches += [(-1, None)] * (per_rank - len(mine))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        cfg, ixs = self.res.cfg, self.res.split(self.split)
        opt = collate_options(cfg)
        sources: dict[int, DomainSource] = {}
        mark = storage.stats.snapshot()
        try:
            for number, b in self.batches[wid::nw]:
                if b is None:
                    yield _empty_batch(opt, len(ixs))
                    continue
                doms, ids = b
                samples, dlist = [], []
                bad = [0] * len(ixs)  # bad or unreadable samples of this batch (bad_sample_policy='skip')
                for d in np.unique(doms).tolist():
                    if d not in sources:
                        sources[d] = _eval_source(ixs[d], d, cfg)
                    sel = ids[doms == d]
                    for i, s in zip(sel.tolist(), sources[d].fetch_samples(sel.tolist()), strict=True):
                        if s is None:
                            bad[d] += 1
                            continue
                        if cfg.batch_size is None and (s.num_atoms > cfg.max_atoms or (
                                cfg.max_edges is not None and 2 * len(s.edges) > cfg.max_edges)):
                            rng = rng_for(cfg.seed, 0xC209, domain_key(ixs[d].name), -1, i)
                            s, _ = crop_to_budget(s, cfg.max_atoms, cfg.max_edges, rng)
                        samples.append(s)
                        dlist.append(d)
                rng = rng_for(cfg.seed, 0xE7A1, domain_key(self.split), number)
                batch = collate(samples, dlist, opt, rng)
                batch.stats = stats_of(
                    np.asarray(dlist, np.int64), np.array([s.num_atoms for s in samples], np.int64), len(ixs),
                    None if cfg.batch_size is not None else cfg.max_atoms, int(batch.edge_index.shape[1]),
                )
                batch.stats["domain_bad"] = bad
                mark, batch.stats["storage"] = storage_delta(mark)
                yield batch
                mark = storage.stats.snapshot()
        finally:
            for s in sources.values():
                s.fetcher.close()


def _eval_source(ix: DomainIndex, d: int, cfg: DataConfig) -> DomainSource:
    counters = np.zeros((d + 1, len(COUNTERS)), np.int64)
    return DomainSource(ix, d, 0, 1, cfg, counters)


def _empty_batch(opt, n_domains: int):
    batch = collate([], [], opt, np.random.default_rng(0))
    batch.stats = {"atoms": 0, "graphs": 0, "edges": 0, "fill": 0.0, "domain_atoms": [0] * n_domains,
                   "domain_graphs": [0] * n_domains}
    return batch


def eval_loader(
    res: Resolved, split: str, rank: int = 0, world_size: int = 1, num_workers: int | None = None, shuffle: bool = False
):
    """A DataLoader over the exact, finite val/test batches of this rank (any split; see :class:`EvalDataset`)."""
    ds = EvalDataset(res, split, rank, world_size, shuffle)
    nw = res.cfg.num_workers if num_workers is None else num_workers
    nw = min(nw, max(1, len(ds))) if nw else 0
    return DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_identity,
                      prefetch_factor=res.cfg.prefetch_factor if nw else None,
                      multiprocessing_context=res.cfg.worker_start_method if nw else None)

