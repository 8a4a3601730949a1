"""Issue 14: the encoder's Gaussian basis summed in checkpointed edge chunks equals the materialised
[E, K] path (forward and every gradient) and really keeps less for backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import ModelConfig
from model.encoder import AtomEncoder
from tests.model.helpers import synthetic_sample


def _inputs(n: int = 300, seed: int = 0):
    s = synthetic_sample("chunk", "small_molecule", n, np.random.default_rng(seed))
    edges = torch.from_numpy(s.edges.astype(np.int64)).T
    edge_index = torch.cat([edges, edges.flip(0)], dim=1)  # both directions, as the loader gives them
    bonds = torch.from_numpy(s.bonds.astype(np.int64)).T
    bond_index = torch.cat([bonds, bonds.flip(0)], dim=1)
    z = torch.from_numpy(s.z.astype(np.int64))
    pos = torch.from_numpy(s.pos).requires_grad_(True)
    return z, pos, edge_index, bond_index


def _encoders(chunk_elements: int):
    torch.manual_seed(0)
    keep = AtomEncoder(ModelConfig(distance_bias=True), 64)
    chunked = AtomEncoder(ModelConfig(distance_bias=False), 64)
    chunked.load_state_dict(keep.state_dict())
    chunked.chunk_elements = chunk_elements
    # non-trivial per-pair-type affine, so a chunk that mixes up type rows would show
    with torch.no_grad():
        for enc in (keep, chunked):
            enc.gaussian.mul.weight.copy_(1.0 + 0.1 * torch.arange(enc.gaussian.mul.weight.numel()).view(-1, 1) % 7)
            enc.gaussian.bias.weight.copy_(0.05 * (torch.arange(enc.gaussian.bias.weight.numel()).view(-1, 1) % 5))
    return keep, chunked


def _run(enc, inputs):
    z, pos, edge_index, bond_index = inputs
    pos = pos.detach().clone().requires_grad_(True)
    x, g = enc(z, pos, edge_index, bond_index)
    (x.square().sum() + x.sum()).backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    return x.detach(), g, pos.grad.clone(), grads


@pytest.mark.parametrize("chunk_elements", [1 << 30, 7 * 128])  # one chunk; 7-edge chunks (K = 128)
def test_chunked_gaussian_sum_equals_the_materialised_basis(chunk_elements):
    inputs = _inputs()
    keep, chunked = _encoders(chunk_elements)
    assert ModelConfig().num_gaussians == 128
    xa, ga, pa, grad_a = _run(keep, inputs)
    xb, gb, pb, grad_b = _run(chunked, inputs)
    assert ga is not None and ga.shape == (inputs[2].shape[1], 128)
    assert gb is None  # the basis of every edge is never handed on when no M block reads it
    torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)
    assert grad_a.keys() == grad_b.keys() and "gaussian.means" in grad_a and "gaussian.mul.weight" in grad_a
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-5, atol=1e-5, msg=name)


def _saved_bytes(enc, inputs) -> tuple[int, int]:
    z, pos, edge_index, bond_index = inputs
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x, _ = enc(z, pos.detach().clone().requires_grad_(True), edge_index, bond_index)
    return sum(sizes), max(sizes)


def test_chunked_path_saves_no_edge_by_gaussian_tensor_for_backward():
    inputs = _inputs(n=600, seed=1)
    e = inputs[2].shape[1]
    keep, chunked = _encoders(64 * 128)  # 64-edge chunks
    total_keep, _ = _saved_bytes(keep, inputs)
    total_chunk, largest_chunk = _saved_bytes(chunked, inputs)
    assert e * 128 * 4 > 1 << 20  # the [E, K] fp32 basis is large here
    assert largest_chunk < e * 128 * 4 / 4
    assert total_chunk < 0.25 * total_keep, (total_chunk, total_keep)
