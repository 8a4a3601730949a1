"""The training stream of one (rank, worker) slot: small stateful iterator→iterator stages.

The stages are composed in one place, :func:`train_stream`::

    plan + read + decode  (DomainSource, one per domain; infinite, pass after pass)
      → per-domain shuffle buffer bounded in bytes  (ShuffleBuffer)
      → mix domains by weight  (Mixer)            | homogeneous mode: choose a domain per batch
      → pack to the atom budget  (Packer)         |   and pack from that domain's own pool
      → gather + transforms + collate to a PyG Batch  (Collator)

Between the stages travel :class:`~pipeline.items.Rows` (columns of references into decoded blocks), many
samples at a time; no stage makes a Python object per sample.

Every stage keeps its state as plain integers (pass, cursor, generator states, the ids of buffered and
pooled samples) so :meth:`TrainStream.state_dict` captures the stream exactly and
:meth:`TrainStream.load_state_dict` rebuilds it, re-reading buffered samples by id.
All randomness derives from integers: (seed, domain, pass, slot, batch number).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch

from pipeline.collate import CollateOptions, collate_block, expand
from pipeline.config import DataConfig
from pipeline.index import DomainIndex
from pipeline.items import _C, COUNTERS, Rows, gather
from pipeline.mix import Mixer, ShuffleBuffer
from pipeline.packer import HomogeneousPacker, Packer, batch_stats, budget_of
from pipeline.plan import domain_key, rng_for
from pipeline.read import DomainSource


class Collator:
    """Gather + transforms + collation; the batch's generator is seeded by (seed, slot, batch number)."""

    def __init__(self, upstream, opt: CollateOptions, seed: int, slot: int, indexes: list[DomainIndex],
                 max_atoms: int | None, counters: np.ndarray) -> None:
        self.upstream, self.opt, self.seed, self.slot, self.indexes = upstream, opt, seed, slot, indexes
        self.n_domains = len(indexes)
        self.radii = np.array([ix.radius_A for ix in indexes], np.float64)
        self.caps = np.array([ix.max_neighbors for ix in indexes], np.int64)
        self.max_atoms, self.counters = max_atoms, counters
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        return finish(self.next_compact())

    def keys(self, rows: Rows) -> list[str]:
        present = np.unique(rows.d).tolist()
        if len(present) == 1:
            return self.indexes[present[0]].keys.take(rows.idx)
        out = np.empty(len(rows), object)
        for d in present:
            sel = rows.d == d
            out[sel] = self.indexes[d].keys.take(rows.idx[sel])
        return out.tolist()

    def next_compact(self) -> dict:
        """The next batch in :func:`pipeline.collate.collate_block` form, with ``stats`` and ``pass_index``."""
        rows = next(self.upstream)
        rng = rng_for(self.seed, 0xC011, self.slot, self.n)
        c = collate_block(gather(rows), self.radii[rows.d], self.caps[rows.d], self.keys(rows), rows.d, self.opt, rng)
        stats = batch_stats(rows, self.n_domains, self.max_atoms, 2 * int(c["pairs"].shape[0]))
        c["stats"] = stats
        c["pass_index"] = torch.from_numpy(rows.pass_.copy())
        self.count(stats)
        self.n += 1
        return c

    def count(self, stats: dict) -> None:
        cnt = self.counters
        cnt[:, _C["samples"]] += stats["domain_graphs"]
        cnt[:, _C["atoms"]] += stats["domain_atoms"]
        cnt[:, _C["batches"]] += np.asarray(stats["domain_graphs"]) > 0

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


class TrainStream:
    """The composed stages of one slot: iterate for PyG batches; ``next_compact`` for the worker form,
    ``next_rows`` for the packed samples without collation."""

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

    def next_rows(self) -> Rows:
        """The next batch before collation (cheap; for planning checks and benchmarks of packing)."""
        rows = next(self.packer)
        self.collator.n += 1
        self.collator.count(batch_stats(rows, self.counters.shape[0], self.collator.max_atoms, 0))
        return rows

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
        # never more than about one pass of this slot: a buffer must not hold a sample twice (a lower bound of
        # the pass's bytes, which Rows.nbytes counts: 13 bytes an atom, 8 a stored pair, bonds left out)
        per_slot = int((13 * indexes[d].num_atoms.astype(np.int64) + 8 * indexes[d].num_edges.astype(np.int64)).sum()) // n_slots
        buffers[d] = ShuffleBuffer(sources[d], min(cfg.shuffle_buffer_bytes, per_slot), rng)
    budget = budget_of(cfg)
    if cfg.cross_domain_batches:
        mixer = Mixer(buffers, sample_probs, rng_for(cfg.seed, 0x313, slot))
        packer = Packer(mixer, budget, sources, counters)
    else:
        mixer = None
        packers = [Packer(b, budget, sources, counters) for b in buffers]
        packer = HomogeneousPacker(packers, batch_probs, rng_for(cfg.seed, 0x314, slot))
    collator = Collator(packer, collate_options(cfg), cfg.seed, slot, indexes, budget.max_atoms, counters)
    return TrainStream(sources, buffers, mixer, packer, collator, counters)
