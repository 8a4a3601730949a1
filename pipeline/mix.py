"""Shuffle and mix: a per-domain shuffle buffer bounded in bytes (:class:`ShuffleBuffer`), then the domain of
every next sample drawn by weight (:class:`Mixer`). Both hand out :class:`~pipeline.items.Rows`, many at a time."""

from __future__ import annotations

import numpy as np

from pipeline.items import BlockRandom, Rows
from pipeline.read import DomainSource

WARMUP_SHIFT = 5
"""A shuffle buffer starts at 1/2**WARMUP_SHIFT of its bound and doubles it at every :meth:`ShuffleBuffer.take`
(webdataset's ``initial``): the first batch reads what it needs, not a whole buffer first (3,490 shards of a
10,000-shard root for the 16 MiB default, 1.5 s)."""


class ShuffleBuffer:
    """Bounded (in bytes) streaming shuffle of one domain: fill to the bound, emit random buffered samples.

    :meth:`take` emits at most half of the buffered samples between fills (a random subset, in random order), so
    the buffer stays between half and all of its bound (plus one block member); its blocks never pin much more
    than the samples they hold (:meth:`~pipeline.items.Rows.compacted`). The bound starts smaller
    (:data:`WARMUP_SHIFT`) and reaches ``capacity_bytes`` after a few takes.
    """

    def __init__(self, source: DomainSource, capacity_bytes: int, rng: np.random.Generator) -> None:
        self.source, self.capacity = source, max(1, int(capacity_bytes))
        self.bound = max(1, self.capacity >> WARMUP_SHIFT)  # grows to capacity
        self.rand = BlockRandom(rng)
        self.rows = Rows.empty()
        self.nbytes = 0

    def _fill(self) -> None:
        parts = [self.rows]
        while self.nbytes < self.bound:  # bound >= 1: at least one member
            r = self.source.next_rows()
            parts.append(r)
            self.nbytes += int(r.nbytes.sum())
        self.rows = Rows.concat(parts).compacted()

    def take(self, k: int) -> Rows:
        """The next ``k`` samples."""
        out = []
        while k > 0:
            if self.nbytes < self.bound:
                self._fill()
            n = len(self.rows)
            m = min(k, max(1, n // 2))
            # the m samples of the smallest uniforms, in increasing order: a partition, then a sort of m (not of n)
            u = self.rand.many(n)
            first = np.argpartition(u, m - 1)[:m] if m < n else np.arange(n)
            first = first[np.argsort(u[first], kind="stable")]
            keep = np.ones(n, bool)
            keep[first] = False
            out.append(self.rows.take(first))
            self.rows = self.rows.take(np.flatnonzero(keep))
            self.nbytes -= int(out[-1].nbytes.sum())
            k -= m
        self.bound = min(self.capacity, 2 * self.bound)
        return Rows.concat(out)

    def block_ids(self) -> set[int]:
        """``id`` of every block this buffer holds."""
        return {id(b) for b in self.rows.blocks}

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict(), "ids": np.stack([self.rows.pass_, self.rows.idx], axis=1),
                "bound": self.bound}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])
        self.bound = min(self.capacity, int(st.get("bound", self.capacity)))  # older states: a full-size buffer
        self.rows = self.source.fetch_rows(st["ids"])
        self.nbytes = int(self.rows.nbytes.sum())


def _cumulative(probs: np.ndarray) -> np.ndarray:
    """Cumulative probabilities whose last positive entry (and later) is > 1, so u in [0, 1) never picks p == 0."""
    p = np.asarray(probs, np.float64)
    cum = np.cumsum(p)
    cum[int(np.flatnonzero(p > 0)[-1]) :] = 2.0
    return cum


class Mixer:
    """Draw the domain of every next sample with fixed probabilities, then take it from that domain's buffer."""

    def __init__(self, streams: list[ShuffleBuffer | None], probs: np.ndarray, rng: np.random.Generator) -> None:
        self.streams = streams
        self.cum = _cumulative(probs)
        self.rand = BlockRandom(rng)

    def take(self, k: int) -> Rows:
        """The next ``k`` samples, each from the domain drawn for it (in draw order)."""
        d = np.searchsorted(self.cum, self.rand.many(k), side="right")
        grouped = np.argsort(d, kind="stable")
        present = np.unique(d).tolist()
        if len(present) == 1:
            return self.streams[present[0]].take(k)
        rows = Rows.concat([self.streams[x].take(int((d == x).sum())) for x in present])
        back = np.empty(k, np.int64)
        back[grouped] = np.arange(k)
        return rows.take(back)

    def block_ids(self) -> set[int]:
        """``id`` of every block the domains' buffers hold."""
        return set().union(*(x.block_ids() for x in self.streams if x is not None))

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])
