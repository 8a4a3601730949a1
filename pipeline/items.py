"""What travels between the training stages: :class:`Item`, the per-domain counters, :class:`BlockRandom`."""

from __future__ import annotations

import numpy as np

from pipeline.schema import Sample

COUNTERS = ("samples", "atoms", "bad", "oversize_skipped", "oversize_cropped", "batches")
"""Per-domain counters of a stream (batches: batches that contain the domain)."""
_C = {name: i for i, name in enumerate(COUNTERS)}


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
