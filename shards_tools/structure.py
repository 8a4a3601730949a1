"""One parsed input structure before it becomes a shard sample, and its validation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Structure:
    """A structure as a reader produced it (atom order of the source file)."""

    record: int
    """0-based record number inside its file."""
    mol_id: str
    z: np.ndarray
    pos: np.ndarray
    bonds: np.ndarray | None = None
    """int [B, 2] or None when the source has no bonds (they are then perceived)."""
    bond_order: np.ndarray | None = None
    domain: str | None = None
    """Set when the record itself names its domain (a .pt sample's dataset_type)."""
    res_index: np.ndarray | None = None
    chain: np.ndarray | None = None
    chains: list[str] = field(default_factory=list)
    atom_name: np.ndarray | None = None


@dataclass
class Rejection:
    """An input record (or a whole file, record -1) that could not be converted."""

    source: str
    record: int
    reason: str

    def as_json(self) -> dict:
        return {"file": self.source, "record": self.record, "reason": self.reason}


MAX_COORD_A = 1e6
"""Coordinates at or beyond this magnitude (Å) are refused: nothing real is that far out, and float32
(what shards store) overflows to inf past 3.4e38."""


def validate(s: Structure, max_atoms: int | None) -> str | None:
    """Return why ``s`` cannot be converted, or ``None`` when it is fine."""
    z, pos = np.asarray(s.z), np.asarray(s.pos)
    n = z.shape[0] if z.ndim == 1 else -1
    if z.ndim != 1:
        return f"atomic numbers have shape {z.shape}, expected [N]"
    if n == 0:
        return "zero atoms"
    if pos.shape != (n, 3):
        return f"wrong counts: {n} atomic numbers but coordinates of shape {pos.shape}"
    bad_z = (z < 1) | (z > 118)
    if bad_z.any():
        i = int(np.argmax(bad_z))
        return f"unknown element: atomic number {int(z[i])} at atom {i} (valid 1..118)"
    with np.errstate(invalid="ignore"):
        finite = (np.abs(pos) < MAX_COORD_A).all(axis=1)  # False for NaN and inf too
    if not finite.all():
        i = int(np.argmin(finite))
        return f"non-finite or out-of-range coordinates at atom {i} (|x| must be below {MAX_COORD_A:g} Å)"
    if max_atoms is not None and n > max_atoms:
        return f"{n} atoms exceed --max-atoms {max_atoms}"
    if s.bonds is not None and len(s.bonds):
        b = np.asarray(s.bonds)
        if b.ndim != 2 or b.shape[1] != 2:
            return f"bonds have shape {b.shape}, expected [B, 2]"
        if b.min() < 0 or b.max() >= n:
            return f"bond index out of range: [{int(b.min())}, {int(b.max())}] for {n} atoms"
        if (b[:, 0] == b[:, 1]).any():
            return "bond from an atom to itself"
        if s.bond_order is not None and len(s.bond_order) != len(b):
            return f"wrong counts: {len(b)} bonds but {len(s.bond_order)} bond orders"
    for name in ("res_index", "chain", "atom_name"):
        a = getattr(s, name)
        if a is not None and len(a) != n:
            return f"wrong counts: {name} has {len(a)} entries for {n} atoms"
    return None
