"""Every attention backend equals the dense, explicitly masked reference."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import model.attention as attention
from model.attention import Attention, AttentionLayout, attend_atoms, attend_pool, edge_attention, flash_attn_available
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


@pytest.fixture(params=[1 << 20, 40], ids=["one_chunk", "many_chunks"])
def chunk(request, monkeypatch):
    """The M kernel with one chunk of edges and with many small chunks (boundaries inside molecules)."""
    monkeypatch.setattr(attention, "EDGE_CHUNK_ELEMENTS", request.param)
    return request.param


def test_sparse_m_with_edge_bias_equals_dense_forward_and_grad(batch, chunk):
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = (x.requires_grad_() for x in _qkv(batch.num_nodes))
    bias = (3 * torch.randn(batch.edge_index.shape[1], 4, generator=torch.Generator().manual_seed(1))).requires_grad_()
    w = torch.randn(batch.num_nodes, 4, 8, generator=torch.Generator().manual_seed(2))
    outs, grads = {}, {}
    for backend in ("dense", "sparse"):
        out = attend_atoms(q, k, v, "M", layout, backend, 0.0, edge_bias=bias)
        outs[backend] = out
        grads[backend] = torch.autograd.grad((out * w).sum(), (q, k, v, bias))
    assert rel_err(outs["sparse"], outs["dense"]) <= RTOL
    for name, gs, gd in zip("qkvb", grads["sparse"], grads["dense"], strict=True):
        assert rel_err(gs, gd) <= RTOL, name
    no_bias = attend_atoms(q, k, v, "M", layout, "dense", 0.0)
    assert rel_err(no_bias, outs["dense"]) > 1e-2, "the bias changes the result"


def test_edge_bias_shape_is_checked(batch):
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = _qkv(batch.num_nodes)
    with pytest.raises(ValueError, match="edge_bias has 3 rows"):
        attend_atoms(q, k, v, "M", layout, "sparse", 0.0, edge_bias=torch.zeros(3, 4))


def test_edge_kernel_gradcheck_fp64(chunk):
    g = torch.Generator().manual_seed(0)
    n, h, d = 9, 2, 3
    ei = torch.randint(0, n, (2, 30), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    src, dst = torch.cat([ei[0], torch.arange(n)]), torch.cat([ei[1], torch.arange(n)])
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    b = torch.randn(src.shape[0], h, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: edge_attention(q, k, v, src, dst, 0.0, b), (q, k, v, b))


def test_edge_kernel_dropout_matches_its_own_mask():
    """With dropout the kernel equals softmax · (keep / (1-p)) · V for the mask drawn from the same seed,
    and its gradients equal autograd's through that formula."""
    g = torch.Generator().manual_seed(0)
    n, h, d, p = 20, 2, 4, 0.3
    ei = torch.randint(0, n, (2, 80), generator=g)
    ei = ei[:, ei[0] != ei[1]]
    src, dst = torch.cat([ei[0], torch.arange(n)]), torch.cat([ei[1], torch.arange(n)])
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = edge_attention(q, k, v, src, dst, p)
    torch.manual_seed(5)
    keep = torch.rand(src.shape[0], h, dtype=torch.float64) >= p
    s = (q[dst] * k[src]).sum(-1) / d**0.5
    e = torch.exp(s - s.max())
    probs = e / torch.zeros(n, h, dtype=torch.float64).index_add(0, dst, e)[dst]
    ref = torch.zeros(n, h, d, dtype=torch.float64).index_add(0, dst, (probs * keep / (1 - p)).unsqueeze(-1) * v[src])
    assert 0 < int((~keep).sum()) and rel_err(out, ref) <= 1e-12
    w = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v)),
                    strict=True):
        assert rel_err(a, b) <= 1e-10


def test_edge_kernel_accumulates_in_fp32_under_autocast(batch):
    """bf16 inputs under autocast: the result is bf16, and within bf16 rounding of the fp32 reference
    (a bf16 index_add over ~40 neighbours would be off by far more)."""
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = _qkv(batch.num_nodes)
    ref = attend_atoms(q, k, v, "M", layout, "dense", 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend_atoms(q.bfloat16(), k.bfloat16(), v.bfloat16(), "M", layout, "sparse", 0.0)
    exact = attend_atoms(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), "M", layout, "dense", 0.0)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), exact) <= 2 ** -8, "only the final cast rounds"
    assert rel_err(out.float(), ref) <= 2e-2


def test_bucket_gather_copies_no_whole_input(batch, monkeypatch):
    """S attention gathers each bucket's rows only: no tensor as large as the whole input is built per bucket."""
    layout = AttentionLayout.build(batch.ptr, batch.batch, batch.edge_index)
    q, k, v = _qkv(batch.num_nodes)
    seen = []
    real_cat = torch.cat

    def spy_cat(tensors, *a, **kw):
        seen.append(sum(t.shape[0] for t in tensors))
        return real_cat(tensors, *a, **kw)

    monkeypatch.setattr(torch, "cat", spy_cat)
    attend_atoms(q, k, v, "S", layout, "sparse", 0.0)
    attend_pool(q[:3], k, v, layout, "sparse", 0.0)
    assert not [m for m in seen if m >= batch.num_nodes]


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


BROKEN_FLASH = {
    "abi": "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')",
    "oserror": "raise OSError('libcudart.so.12: cannot open shared object file')",
    "no_varlen": "x = 1",
    "missing_extension": "import flash_attn_2_cuda_does_not_exist",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BROKEN_FLASH))
def test_broken_flash_attn_falls_back_with_one_log_line(tmp_path, kind):
    """A broken flash-attn install (fake package first on the path) never crashes: 'auto' picks sparse, the
    S call runs, and exactly one warning names the reason (none when the package is simply absent)."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(BROKEN_FLASH[kind] + "\n")
    code = textwrap.dedent("""
        import logging, sys, torch
        logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
        from model.attention import AttentionLayout, attend_atoms, flash_attn_available, resolve_backend
        backend = resolve_backend("auto", torch.device("cpu"))
        ptr = torch.tensor([0, 3, 5]); batch = torch.tensor([0, 0, 0, 1, 1])
        layout = AttentionLayout.build(ptr, batch, torch.zeros(2, 0, dtype=torch.long))
        q = torch.randn(5, 2, 4)
        for _ in range(3):
            attend_atoms(q, q, q, "S", layout, backend, 0.0)
            flash_attn_available()
        print("OK", backend)
    """)
    repo = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{tmp_path}:{repo}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK sparse" in proc.stdout
    logs = [ln for ln in proc.stderr.splitlines() if ln.startswith("LOG model.attention")]
    assert len(logs) == 1 and "flash-attn is installed but unusable" in logs[0], proc.stderr
    if kind != "abi":
        return
    shutil.rmtree(pkg)  # absent package: silent
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=repo, timeout=120)
    assert proc.returncode == 0 and "OK sparse" in proc.stdout and "LOG model.attention" not in proc.stderr


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


BLOCKED = ("biotite", "rdkit", "bitsandbytes", "webdataset", "boto3", "flash_attn")
"""Absent from the GPU image. (urllib3 is not blocked: torch-geometric itself imports it through requests,
so an image with torch-geometric has it; our own use of it, pipeline.http_source, is not on this chain.)"""
GPU_CHECK_PROBE = """
import importlib.abc, runpy, sys, torch
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU image lacks it)", name=name)
sys.meta_path.insert(0, Block())
torch.cuda.is_available = lambda: False
mod = runpy.run_path({script!r}, run_name="gpu_check_probe")
rc = mod["main"](["--batches", {folder!r}])
from benchmarks.batches import collate_samples, load
errs = mod["kernel_check"](collate_samples(load("check", {folder!r})), ["sparse"], torch.device("cpu"))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("RESULT", rc, max(errs.values()), len(errs), loaded)
"""


@pytest.mark.slow
def test_gpu_check_runs_without_the_packages_the_gpu_image_lacks(tmp_path):
    """benchmarks/gpu_check.py with biotite/RDKit/bitsandbytes/webdataset/boto3/flash-attn blocked
    and no CUDA: exits 2 with a clear message, and its whole chain (stored batches -> collate -> M/S/P
    kernels with edge bias) imports and agrees with the dense reference."""
    from benchmarks.batches import check_samples, write

    repo = Path(__file__).resolve().parents[2]
    write(tmp_path / "check.tar", check_samples())
    code = GPU_CHECK_PROBE.format(blocked=BLOCKED, script=str(repo / "benchmarks" / "gpu_check.py"), folder=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=600,
                          env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device visible" in proc.stdout + proc.stderr
    result = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")).split(maxsplit=4)
    assert result[1] == "2", "exit status 2 without CUDA"
    assert float(result[2]) <= RTOL and int(result[3]) == 4, "sparse M, M with bias, S, P equal dense on CPU"
    assert result[4] == "[]", f"blocked modules were imported: {result[4]}"


def test_flex_benchmark_neighbour_bitmap_equals_the_pair_list():
    """benchmarks/flex_attention.py's M mask: bit kv of row q set exactly for the listed pairs (bit 63, the
    int64 sign bit, and repeated pairs included)."""
    from benchmarks.flex_attention import adjacency_bits

    n = 200
    g = torch.Generator().manual_seed(0)
    src = torch.cat([torch.randint(0, n, (3000,), generator=g), torch.tensor([63, 127, 63])])
    dst = torch.cat([torch.randint(0, n, (3000,), generator=g), torch.tensor([0, 5, 0])])
    bits = adjacency_bits(n, src, dst)
    assert bits.shape == (n, 4)
    q, kv = torch.arange(n)[:, None].expand(n, n), torch.arange(n)[None].expand(n, n)
    got = ((bits[q, kv // 64] >> (kv % 64)) & 1) == 1
    want = torch.zeros(n, n, dtype=torch.bool)
    want[dst, src] = True
    assert torch.equal(got, want)
