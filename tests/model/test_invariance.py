"""Rotation, translation and permutation invariance, in fp64."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import batch_to, build_net, make_batch, mixed_samples

TOL = 1e-9


def random_rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def permute_within_molecules(batch, seed: int):
    """The same batch with atoms shuffled inside each molecule and edges shuffled; returns (batch, perm)
    where new atom ``i`` is old atom ``perm[i]``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.empty(batch.num_nodes, dtype=torch.long)
    for a, b in zip(batch.ptr[:-1].tolist(), batch.ptr[1:].tolist(), strict=True):
        perm[a:b] = a + torch.randperm(b - a, generator=g)
    inv = torch.argsort(perm)
    out = batch.clone()
    out.z, out.pos, out.mlm_mask = batch.z[perm], batch.pos[perm], batch.mlm_mask[perm]
    true_z = batch.z.clone()
    true_z[batch.mlm_mask] = batch.mlm_target
    out.mlm_target = true_z[perm][out.mlm_mask]  # targets follow their atoms
    e = torch.randperm(batch.edge_index.shape[1], generator=g)
    out.edge_index = inv[batch.edge_index[:, e]]
    out.edge_is_bond = batch.edge_is_bond[e]
    out.bond_index = inv[batch.bond_index]
    out.sr_index = inv[batch.sr_index]
    out.lr_index = inv[batch.lr_index]
    return out, perm


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0
    assert err <= tol, err


@pytest.fixture(scope="module")
def batch64():
    return batch_to(make_batch(mixed_samples(), seed=3), torch.float64)


@pytest.mark.parametrize("backend", ["dense", "sparse"])
@pytest.mark.parametrize("rwpe", [0, 4])
@pytest.mark.parametrize("distance_bias", [False, True])
def test_rotation_translation_invariance(batch64, backend, rwpe, distance_bias):
    net = build_net(dtype=torch.float64, rwpe_steps=rwpe, distance_bias=distance_bias)
    with torch.no_grad():
        ref = net(batch64, backend=backend)
        moved = batch64.clone()
        moved.pos = batch64.pos @ random_rotation(7).T + torch.tensor([12.5, -3.0, 40.0], dtype=torch.float64)
        out = net(moved, backend=backend)
    assert not torch.allclose(moved.pos, batch64.pos)
    assert_close(out.graph_embeddings, ref.graph_embeddings)
    assert_close(out.node_embeddings, ref.node_embeddings)
    for task, p in ref.predictions.items():
        assert_close(out.predictions[task].logits, p.logits)
        assert torch.equal(out.predictions[task].target, p.target)


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_permutation_equivariance(batch64, backend):
    net = build_net(dtype=torch.float64, rwpe_steps=3, distance_bias=True)
    permuted, perm = permute_within_molecules(batch64, seed=5)
    assert not torch.equal(perm, torch.arange(len(perm)))
    with torch.no_grad():
        ref = net(batch64, backend=backend)
        out = net(permuted, backend=backend)
    assert_close(out.node_embeddings, ref.node_embeddings[perm])  # node embeddings move with their atoms
    assert_close(out.graph_embeddings, ref.graph_embeddings)
    for task in ("short_range", "long_range"):  # pairs keep their order, so logits match row by row
        assert_close(out.predictions[task].logits, ref.predictions[task].logits)
    # masked atoms are listed by atom index: match them through the permutation
    old_rows = {a: i for i, a in enumerate(batch64.mlm_mask.nonzero().squeeze(1).tolist())}
    new_atoms_as_old = perm[permuted.mlm_mask.nonzero().squeeze(1)].tolist()
    order = torch.tensor([old_rows[a] for a in new_atoms_as_old])
    assert_close(out.predictions["mlm"].logits, ref.predictions["mlm"].logits[order])
    assert torch.equal(out.predictions["mlm"].target, ref.predictions["mlm"].target[order])
