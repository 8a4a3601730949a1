"""The packing stage: a thin stateful wrapper around the pure functions of :mod:`pipeline.packing`.

:class:`Packer` keeps an oldest-first pool under the :class:`Budget` and cuts one batch per call (oversize samples
follow ``oversize_policy``); :class:`HomogeneousPacker` draws one domain per batch; :func:`batch_stats` describes
a batch (atoms, fill, per-domain composition)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.config import DataConfig
from pipeline.items import _C, Block, BlockRandom, Rows, rows_of_block
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
    """Keep an oldest-first pool (:class:`~pipeline.items.Rows`) topped up from ``upstream`` (a
    :class:`~pipeline.mix.Mixer` or one domain's :class:`~pipeline.mix.ShuffleBuffer`) and cut one batch from it
    per call."""

    def __init__(self, upstream, budget: Budget, sources: list[DomainSource | None], counters: np.ndarray):
        self.upstream, self.b, self.sources, self.counters = upstream, budget, sources, counters
        self.pool = Rows.empty()
        self.filler_limit = filler_limit(budget.max_atoms)
        # mean atoms of a sample, to size draws: at first the largest domain mean, then what was admitted
        self._mean0 = max([float(x.index.num_atoms.mean()) for x in sources if x is not None] or [1.0])
        self._seen = [0, 0]  # atoms, samples admitted

    def _admit(self, rows: Rows) -> tuple[Rows, int]:
        """Apply the oversize policy; returns the rows to pool (some maybe cropped) and how many were skipped."""
        b = self.b
        over = self._over(rows)
        if not over.any():
            return rows, 0
        keep = np.flatnonzero(~over)
        cropped, at = [], []
        for k in np.flatnonzero(over).tolist():
            d, idx = int(rows.d[k]), int(rows.idx[k])
            src = self.sources[d]
            what = (f"sample {src.index.keys[idx]} ({src.index.name}) has {int(rows.atoms[k])} atoms / "
                    f"{int(rows.edges[k])} edges, over max_atoms={b.max_atoms} / max_edges={b.max_edges}")
            if b.oversize_policy == "raise":
                raise OversizeError(f"{what}; set data.oversize_policy to 'skip' or 'crop', or raise the budget")
            if b.oversize_policy == "skip":
                self.counters[d, _C["oversize_skipped"]] += 1
                log.info("skipping oversize %s", what)
                continue
            cropped.append(self._crop(rows.take(np.array([k]))))
            self.counters[d, _C["oversize_cropped"]] += 1
            at.append(k)
        if not cropped:
            return rows.take(keep), len(rows) - len(keep)
        both = Rows.concat([rows.take(keep), *cropped])
        pos = np.concatenate([keep, np.asarray(at, np.int64)])
        return both.take(np.argsort(pos, kind="stable")), len(rows) - len(pos)

    def _over(self, rows: Rows) -> np.ndarray:
        """Which rows exceed the atom or edge budget (none with a fixed batch_size)."""
        b, over = self.b, np.zeros(len(rows), bool)
        if b.batch_size is None and b.max_atoms is not None:
            over |= rows.atoms > b.max_atoms
        if b.batch_size is None and b.max_edges is not None:
            over |= rows.edges > b.max_edges
        return over

    def _crop(self, row: Rows) -> Rows:
        """One row, cropped to the budget (:func:`~pipeline.packing.crop_to_budget`) into a block of its own."""
        b = self.b
        d, p, idx = int(row.d[0]), int(row.pass_[0]), int(row.idx[0])
        ix = self.sources[d].index
        rng = rng_for(b.seed, 0xC209, domain_key(ix.name), p, idx)
        s = row.blocks[0].sample(int(row.item[0]), str(ix.keys[idx]), ix.name, ix.radius_A, ix.max_neighbors)
        s, edges = crop_to_budget(s, b.max_atoms, b.max_edges, rng)
        return rows_of_block(Block.from_samples([s]), np.zeros(1, np.int64), d, p, np.array([idx]), np.array([edges]))

    def _filler_atoms(self) -> int:
        a = self.pool.atoms
        return int(a[a <= self.filler_limit].sum())

    def _top_up(self) -> None:
        b = self.b
        if b.batch_size is not None:
            if len(self.pool) < b.batch_size:
                more = self.upstream.take(b.batch_size - len(self.pool))
                self.pool = Rows.concat([self.pool, more]).compacted(self.upstream.block_ids())
            return
        skipped, limit = 0, sum(len(s.index) for s in self.sources if s is not None)
        parts, n, total, filler = [self.pool], len(self.pool), int(self.pool.atoms.sum()), self._filler_atoms()
        while not n or pool_wants_more(total, filler, n, b.pool_atoms, b.pool_max_samples):
            mean = self._seen[0] / self._seen[1] if self._seen[1] >= 64 else self._mean0
            # 90 % of the samples that would fill the pool's deficit: two or three draws converge on it, rarely
            # overshooting by more than a few samples (every draw costs a pass over the shuffle buffer)
            k = int(min(max(0.9 * (b.pool_atoms - filler) / mean, 1), max(b.pool_max_samples - n, 1)))
            rows, n_skipped = self._admit(self.upstream.take(k))
            if len(rows):
                parts.append(rows)
                a = rows.atoms
                n, total, filler = n + len(rows), total + int(a.sum()), filler + int(a[a <= self.filler_limit].sum())
                self._seen[0] += int(a.sum())
                self._seen[1] += len(a)
                skipped = 0
            if n_skipped and (skipped := skipped + n_skipped) > limit:  # a whole pass skipped (resolve() refuses such configs first)
                raise OversizeError(f"nothing fits the budget max_atoms={b.max_atoms} / max_edges={b.max_edges}: "
                                    f"{skipped} samples in a row were skipped as oversize; raise the budget")
        self.pool = Rows.concat(parts).compacted(self.upstream.block_ids())

    def __next__(self) -> Rows:
        self._top_up()
        b, pool = self.b, self.pool
        if b.batch_size is not None:
            pos = np.arange(b.batch_size)
        else:
            edges = pool.edges if b.max_edges is not None else None
            head = choose_head(pool.atoms, int(pool.atoms.sum()), self._filler_atoms(), b.pool_atoms, b.max_atoms)
            pos = np.sort(select_batch(pool.atoms, b.max_atoms, edges, b.max_edges, b.max_graphs, head,
                                       b.fifo_fraction))
        keep = np.ones(len(pool), bool)
        keep[pos] = False
        self.pool = pool.take(np.flatnonzero(keep))
        return pool.take(pos)

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"pool": np.stack([self.pool.d, self.pool.pass_, self.pool.idx], axis=1), "seen": list(self._seen)}

    def load_state_dict(self, st: dict) -> None:
        self._seen = [int(x) for x in st.get("seen", (0, 0))]  # a state saved before draw sizing: sized afresh
        want = np.asarray(st["pool"], np.int64).reshape(-1, 3)
        at = {(d, p, i): k for k, (d, p, i) in enumerate(want.tolist())}
        parts = []
        for d in np.unique(want[:, 0]).tolist():
            rows = self.sources[d].fetch_rows(want[want[:, 0] == d][:, 1:])
            over = self._over(rows)
            if over.any():  # cropped when first admitted (and counted then)
                rows = Rows.concat([rows.take(np.flatnonzero(~over)),
                                    *[self._crop(rows.take(np.array([k]))) for k in np.flatnonzero(over).tolist()]])
            parts.append(rows)
        rows = Rows.concat(parts)
        order = [at[(d, p, i)] for d, p, i in zip(rows.d.tolist(), rows.pass_.tolist(), rows.idx.tolist(), strict=True)]
        self.pool = rows.take(np.argsort(np.asarray(order, np.int64), kind="stable"))


class HomogeneousPacker:
    """One domain per batch: draw the batch's domain, then cut the batch from that domain's own pool."""

    def __init__(self, packers: list[Packer], batch_probs: np.ndarray, rng: np.random.Generator) -> None:
        self.packers = packers
        self.cum = _cumulative(batch_probs)
        self.rand = BlockRandom(rng)

    def __iter__(self):
        return self

    def __next__(self) -> Rows:
        d = int(np.searchsorted(self.cum, self.rand.next(), side="right"))
        return next(self.packers[d])

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict(), "pools": [p.state_dict() for p in self.packers]}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])
        for p, s in zip(self.packers, st["pools"], strict=True):
            p.load_state_dict(s)


def batch_stats(rows: Rows, n_domains: int, max_atoms: int | None, n_edges: int) -> dict:
    """Per-batch statistics attached to every batch as ``batch.stats``."""
    return stats_of(rows.d, rows.atoms, n_domains, max_atoms, n_edges)


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
