"""Shuffle and mix: a per-domain shuffle buffer bounded in bytes (:class:`ShuffleBuffer`), then the domain of
every next sample drawn by weight (:class:`Mixer`)."""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np

from pipeline.items import BlockRandom, Item
from pipeline.read import DomainSource


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
        self.cum = _cumulative(probs).tolist()  # a list: bisect per draw costs a tenth of np.searchsorted
        self.rand = BlockRandom(rng)

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        d = bisect.bisect_right(self.cum, self.rand.next())  # = np.searchsorted(cum, u, side="right")
        return next(self.streams[d])

    def state_dict(self) -> dict:
        return {"rand": self.rand.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.rand.load_state_dict(st["rand"])
