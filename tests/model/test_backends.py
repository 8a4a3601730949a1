"""Every attention backend equals the dense, explicitly masked reference."""

from __future__ import annotations

import pytest
import torch

from model.attention import Attention, AttentionLayout, attend_atoms, attend_pool, flash_attn_available
from tests.model.helpers import build_net, make_batch

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _qkv(n: int, h: int = 4, d: int = 8, seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).to(device, dtype) for _ in range(3)]


@pytest.fixture
def batch(mixed_samples):
    return make_batch(mixed_samples, seed=1)


def test_batch_has_the_edge_cases(batch):
    counts = (batch.ptr[1:] - batch.ptr[:-1]).tolist()
    assert 1 in counts, "a 1-atom molecule"
    deg = torch.bincount(batch.edge_index[1], minlength=batch.num_nodes)
    assert int((deg == 0).sum()) >= 2, "the 1-atom molecule and an isolated atom have no neighbours"
    assert len(set(counts)) >= 4, "mixed sizes"


@pytest.mark.parametrize("kind", ["M", "S"])
def test_sparse_atoms_equal_dense(batch, kind):
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = _qkv(batch.num_nodes)
    ref = attend_atoms(q, k, v, kind, layout, "dense", 0.0)
    out = attend_atoms(q, k, v, kind, layout, "sparse", 0.0)
    assert rel_err(out, ref) <= RTOL


def test_masks_matter(batch):
    """M and S differ, and both differ from attention across the whole batch: the masks are applied."""
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = _qkv(batch.num_nodes)
    m = attend_atoms(q, k, v, "M", layout, "dense", 0.0)
    s = attend_atoms(q, k, v, "S", layout, "dense", 0.0)
    full = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
    assert rel_err(m, s) > 1e-2 and rel_err(s, full) > 1e-2
    iso = torch.nonzero(torch.bincount(batch.edge_index[1], minlength=batch.num_nodes) == 0).squeeze(1)
    assert torch.allclose(m[iso], v[iso], atol=1e-6), "an atom without neighbours attends only to itself"


def test_sparse_m_with_edge_bias_equals_dense(batch):
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = _qkv(batch.num_nodes)
    bias = 3.0 * torch.randn(batch.edge_index.shape[1], 4, generator=torch.Generator().manual_seed(2))
    ref = attend_atoms(q, k, v, "M", layout, "dense", 0.0, bias)
    assert rel_err(attend_atoms(q, k, v, "M", layout, "sparse", 0.0, bias), ref) <= RTOL
    assert rel_err(ref, attend_atoms(q, k, v, "M", layout, "dense", 0.0)) > 1e-2, "the bias is applied"


def test_uniform_attention_averages_the_value_projection(batch):
    """With Q = K = 0 every key weighs the same, so M attention of atom i is W_o·mean_j(W_v·x_j) + b_o over
    its neighbours and itself: catches V computed from K (or from Q) in any backend."""
    torch.manual_seed(0)
    attn = Attention(16, 4, 0.0).eval()
    with torch.no_grad():
        for lin in (attn.q, attn.k):
            lin.weight.zero_()
            lin.bias.zero_()
    x = torch.randn(batch.num_nodes, 16)
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    src = torch.cat([batch.edge_index[0], torch.arange(batch.num_nodes)])
    dst = torch.cat([batch.edge_index[1], torch.arange(batch.num_nodes)])
    vx = attn.v(x)
    mean_v = torch.zeros_like(vx).index_add_(0, dst, vx[src]) / torch.bincount(dst).unsqueeze(1)
    want = attn.out(mean_v)
    for backend in ("dense", "sparse"):
        with torch.no_grad():
            assert rel_err(attn(x, "M", layout, backend), want) <= RTOL, backend


def test_sparse_pool_equals_dense(batch):
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    _, k, v = _qkv(batch.num_nodes)
    seeds = torch.randn(3, 4, 8)
    ref = attend_pool(seeds, k, v, layout, "dense", 0.0)
    assert ref.shape == (batch.num_graphs, 3, 4, 8)
    assert rel_err(attend_pool(seeds, k, v, layout, "sparse", 0.0), ref) <= RTOL


@pytest.mark.parametrize("distance_bias", [False, True])
def test_whole_model_sparse_equals_dense_forward_and_grad(batch, distance_bias):
    net = build_net(distance_bias=distance_bias)
    outs, grads = {}, {}
    for backend in ("dense", "sparse"):
        net.zero_grad()
        out = net(batch, backend=backend)
        loss = sum(p.logits.square().mean() for p in out.predictions.values()) + out.graph_embeddings.square().mean()
        loss.backward()
        outs[backend] = out
        grads[backend] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    d, s = outs["dense"], outs["sparse"]
    assert rel_err(s.node_embeddings, d.node_embeddings) <= RTOL
    assert rel_err(s.graph_embeddings, d.graph_embeddings) <= RTOL
    for task in d.predictions:
        assert rel_err(s.predictions[task].logits, d.predictions[task].logits) <= RTOL
    assert rel_err(grads["sparse"], grads["dense"]) <= 1e-4


needs_flash = pytest.mark.skipif(
    not (torch.cuda.is_available() and flash_attn_available()),
    reason="flash backend needs CUDA and flash-attn; benchmarks/gpu_check.py runs it on a GPU machine",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")


@needs_cuda
@pytest.mark.parametrize("backend", ["sparse", pytest.param("flash", marks=needs_flash)])
def test_cuda_backends_equal_dense(batch, backend):
    b = batch.to("cuda")
    layout = AttentionLayout.build(b.ptr, b.batch, b.edge_index)
    q, k, v = _qkv(b.num_nodes, device="cuda", dtype=torch.bfloat16)
    for kind in ("M", "S"):
        ref = attend_atoms(q.float(), k.float(), v.float(), kind, layout, "dense", 0.0)
        out = attend_atoms(q, k, v, kind, layout, backend, 0.0).float()
        assert rel_err(out, ref) <= 2e-2, kind
    seeds = torch.randn(3, 4, 8, device="cuda", dtype=torch.bfloat16)
    ref = attend_pool(seeds.float(), k.float(), v.float(), layout, "dense", 0.0)
    assert rel_err(attend_pool(seeds, k, v, layout, backend, 0.0).float(), ref) <= 2e-2
