"""Batches for the model tests: real demo structures (through the converter's readers) plus a few
hand-made edge cases (a 1-atom molecule, a molecule with an isolated atom)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from pipeline.collate import CollateOptions, collate
from pipeline.schema import Sample
from shards_tools.spool import ConvertOptions, read_samples

DEMO_RAW = Path(__file__).resolve().parents[2] / "data" / "demo" / "raw"

RADIUS = 5.0
MAX_NEIGHBORS = 64


def radius_edges(pos: np.ndarray, radius: float = RADIUS) -> np.ndarray:
    pairs = cKDTree(pos).query_pairs(radius, output_type="ndarray")
    return pairs.astype(np.int32).reshape(-1, 2)


def synthetic_sample(key: str, domain: str, n: int, rng: np.random.Generator) -> Sample:
    """A bonded chain with 1.5 Å steps (a crude molecule): realistic distances, real bonds."""
    steps = rng.normal(size=(n, 3))
    steps = 1.5 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
    pos = np.cumsum(steps, axis=0).astype(np.float32) if n else np.zeros((0, 3), np.float32)
    z = rng.choice(np.array([1, 6, 7, 8, 16], np.uint8), size=n)
    bonds = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1).astype(np.int32) if n > 1 else np.zeros((0, 2), np.int32)
    return Sample(
        key=key, domain=domain, z=z, pos=pos, bonds=bonds, bond_order=np.zeros(len(bonds), np.uint8),
        edges=radius_edges(pos), radius_A=RADIUS, max_neighbors=MAX_NEIGHBORS,
    )


def isolated_atom_sample(key: str = "iso") -> Sample:
    """Three atoms, the third 20 Å away from the others: an atom with no neighbours at all."""
    pos = np.array([[0, 0, 0], [1.1, 0, 0], [20.0, 0, 0]], np.float32)
    return Sample(
        key=key, domain="small_molecule", z=np.array([6, 8, 1], np.uint8), pos=pos,
        bonds=np.array([[0, 1]], np.int32), bond_order=np.ones(1, np.uint8), edges=radius_edges(pos),
        radius_A=RADIUS, max_neighbors=MAX_NEIGHBORS,
    )


def single_atom_sample(key: str = "one") -> Sample:
    return Sample(
        key=key, domain="small_molecule", z=np.array([26], np.uint8), pos=np.zeros((1, 3), np.float32),
        bonds=np.zeros((0, 2), np.int32), bond_order=np.zeros(0, np.uint8), edges=np.zeros((0, 2), np.int32),
        radius_A=RADIUS, max_neighbors=MAX_NEIGHBORS,
    )


@cache
def _demo_file(rel: str, domain: str, limit: int) -> tuple[Sample, ...]:
    path = DEMO_RAW / rel
    out = read_samples(path, rel, domain, ConvertOptions(radius_A=RADIUS, max_neighbors=MAX_NEIGHBORS), limit)
    if not out:
        raise RuntimeError(f"no structure read from {path}")
    return tuple(out)


def demo_samples(rel: str, domain: str, limit: int = 1, max_atoms: int | None = None) -> list[Sample]:
    """The first ``limit`` records of a demo file (optionally cropped to its first ``max_atoms`` atoms)."""
    out = list(_demo_file(rel, domain, limit))
    return [crop(s, max_atoms) for s in out] if max_atoms else out


def crop(s: Sample, n: int) -> Sample:
    """The first ``n`` atoms of a sample with its bonds and radius pairs among them."""
    if s.num_atoms <= n:
        return s
    keep_b = (s.bonds < n).all(axis=1)
    keep_e = (s.edges < n).all(axis=1)
    return Sample(
        key=s.key, domain=s.domain, z=s.z[:n], pos=s.pos[:n], bonds=s.bonds[keep_b], bond_order=s.bond_order[keep_b],
        edges=s.edges[keep_e], radius_A=s.radius_A, max_neighbors=s.max_neighbors,
    )


def real_mixed_samples(protein_atoms: int = 120) -> list[Sample]:
    """A small real mixed set: a protein fragment, QM9 molecules, metabolites."""
    return (
        demo_samples("protein/1ahsA.pdb", "protein", 1, max_atoms=protein_atoms)
        + demo_samples("small_molecule/qm9_sample.xyz", "small_molecule", 4)
        + demo_samples("metabolite/metabolites_ccd_hmdb.sdf", "metabolite", 2)
    )


DOMAINS = ["protein", "small_molecule", "metabolite", "rna"]


def make_batch(samples: list[Sample], seed: int = 0, **opts):
    ids = [DOMAINS.index(s.domain) if s.domain in DOMAINS else 0 for s in samples]
    return collate(samples, ids, CollateOptions(**opts), np.random.default_rng(seed))


def mixed_samples() -> list[Sample]:
    """Mixed sizes: a protein fragment, a 1-atom molecule, QM9 molecules, a molecule with an
    isolated atom, a metabolite, a synthetic chain."""
    real = real_mixed_samples(protein_atoms=60)
    return [
        real[0], single_atom_sample(), real[1], isolated_atom_sample(), real[5], real[2],
        synthetic_sample("chain", "rna", 17, np.random.default_rng(0)),
    ]


def small_config(**kw):
    """A model small enough for CPU tests that still has every block type."""
    from model.config import ModelConfig

    base = dict(layers="M S M S P", dim=32, num_heads=4, mlp_hidden=64, num_gaussians=16, num_seeds=4)
    base.update(kw)
    return ModelConfig(**base)


def small_tasks(**kw):
    from model.config import TasksConfig

    return TasksConfig(head_hidden=32, **kw)


def build_net(seed: int = 0, dtype=None, **kw):
    import torch

    from model.network import MolecularESA

    torch.manual_seed(seed)
    net = MolecularESA(small_config(**kw), small_tasks()).eval()
    return net.to(dtype) if dtype is not None else net


def batch_to(batch, dtype):
    """A copy of ``batch`` with float fields (pos) in ``dtype``."""
    b = batch.clone()
    b.pos = b.pos.to(dtype)
    return b
