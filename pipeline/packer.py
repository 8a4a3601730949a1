"""The packing stage: a thin stateful wrapper around the pure functions of :mod:`pipeline.packing`.

:class:`Packer` keeps an oldest-first pool under the :class:`Budget` and cuts one batch per call (oversize samples
follow ``oversize_policy``); :class:`HomogeneousPacker` draws one domain per batch; :func:`batch_stats` describes
a batch (atoms, fill, per-domain composition)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.items import _C, BlockRandom, Item
from pipeline.mix import _cumulative
from pipeline.packing import choose_head, crop_to_budget, filler_limit, pool_wants_more, select_batch
from pipeline.plan import domain_key, rng_for
from pipeline.read import DomainSource

log = logging.getLogger(__name__)


class OversizeError(ValueError):
    """A sample exceeds the batch budget under ``oversize_policy='raise'``."""


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
        s, edges = crop_to_budget(it.sample, b.max_atoms, b.max_edges, rng)
        self.counters[it.d, _C["oversize_cropped"]] += 1
        return Item(it.d, it.pass_, it.idx, s, it.nbytes, edges)

    def _top_up(self) -> None:
        b, pool = self.b, self.pool
        if b.batch_size is not None:
            while len(pool) < b.batch_size:
                self._add(next(self.upstream))
            return
        skipped, limit = 0, sum(len(s.index) for s in self.sources if s is not None)
        while not pool or pool_wants_more(self.pool_atoms, self.filler_atoms, len(pool), b.pool_atoms,
                                          b.pool_max_samples):
            it = self._admit(next(self.upstream))
            if it is not None:
                self._add(it)
                skipped = 0
            elif (skipped := skipped + 1) > limit:  # a whole pass skipped (resolve() refuses such configs first)
                raise OversizeError(f"nothing fits the budget max_atoms={b.max_atoms} / max_edges={b.max_edges}: "
                                    f"{skipped} samples in a row were skipped as oversize; raise the budget")

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
