"""FlexAttention as the M and S kernel, measured against ours (fused edge kernel for M, SDPA per length bucket
for S) and the dense reference, on a stored benchmark batch. Prints one JSON line.

- ``S``: a document mask (``batch[q] == batch[kv]``) over the packed atoms, one kernel for the whole batch.
- ``M``: the neighbour list as a bit-packed adjacency (``ceil(N/64)`` int64 words per atom: 78 MB at 25 k
  atoms, O(N²/64), where our edge kernel is O(E)) read by the mask function, plus the document mask;
  the block mask skips 128 × 128 tiles that hold no pair.

torch 2.13's FlexAttention has no backward on CPU ("FlexAttention does not support backward on CPU"), so
on CPU only the forward is timed (the first call includes ``torch.compile``, reported apart); on CUDA the
forward + backward. ``benchmarks/gpu_check.py`` calls :func:`measure` on the 25 k batch (guarded: an
error there is reported, never fatal).

    PYTHONPATH=$PWD python benchmarks/flex_attention.py [--batch check|eval25k] [--heads 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BLOCK = 128


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adjacency_bits(n: int, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[N, ceil(N/64)] int64: bit ``kv % 64`` of word ``kv // 64`` of row ``q`` is set when (q, kv) is a pair."""
    words = (n + 63) // 64
    codes = torch.unique(dst * n + src)  # each pair once, so adding distinct powers of two is an OR
    row, col = codes // n, codes % n
    bits = torch.zeros(n * words, dtype=torch.int64, device=src.device)
    bits.index_add_(0, row * words + col // 64, torch.ones_like(col) << (col % 64))  # bit 63 wraps to the sign bit
    return bits.view(n, words)


def flex_masks(layout, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    n = layout.num_atoms
    mol = layout.batch
    adj = adjacency_bits(n, layout.nbr_src, layout.nbr_dst)

    def doc(b, h, q, kv):
        return mol[q] == mol[kv]

    def nbr(b, h, q, kv):
        return ((adj[q, kv // 64] >> (kv % 64)) & 1) == 1

    t0 = time.perf_counter()
    s_mask = create_block_mask(doc, None, None, n, n, device=device.type, BLOCK_SIZE=BLOCK)
    m_mask = create_block_mask(nbr, None, None, n, n, device=device.type, BLOCK_SIZE=BLOCK)
    _sync(device)
    return s_mask, m_mask, time.perf_counter() - t0, adj.numel() * 8


def measure(batch, device: torch.device, heads: int = 8, dim: int = 256, repeats: int = 3) -> dict:
    """FlexAttention vs ours vs dense for M and S on ``batch``: max relative error and median seconds."""
    from torch.nn.attention.flex_attention import flex_attention

    from model.attention import AttentionLayout, attend_atoms

    b = batch.to(device)
    layout = AttentionLayout.build(b.ptr, b.batch, b.edge_index)
    n, d = layout.num_atoms, dim // heads
    train = device.type == "cuda"  # no FlexAttention backward on CPU
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(n, heads, d, generator=g).to(device, dt).requires_grad_(train) for _ in range(3))
    s_mask, m_mask, mask_s, adj_bytes = flex_masks(layout, device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run_flex(mask):
        o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
        return o[0].transpose(0, 1)  # [N, H, d]

    def run_ours(kind):
        return attend_atoms(q, k, v, kind, layout, "sparse", 0.0)

    def timed(fn) -> tuple[torch.Tensor, float, float]:
        times = []
        for _ in range(repeats + 1):
            for x in (q, k, v):
                x.grad = None
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            if train:
                out.float().square().sum().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return out.detach().float(), times[0], sorted(times[1:])[len(times[1:]) // 2]

    def rel(a, r):
        return float((a - r).abs().max() / r.abs().max().clamp(min=1e-12))

    out: dict = {"atoms": n, "pairs_M": int(layout.nbr_src.shape[0]), "heads": heads, "head_dim": d,
                 "timed": "forward+backward" if train else "forward only (no FlexAttention backward on CPU)",
                 "block_masks_s": round(mask_s, 3), "adjacency_bits_mb": round(adj_bytes / 2**20, 1)}
    small = layout.max_count <= 4096  # the dense reference pads every molecule to the largest
    for kind, mask in (("M", m_mask), ("S", s_mask)):
        o_flex, first, t_flex = timed(lambda mask=mask: run_flex(mask))
        o_ours, _, t_ours = timed(lambda kind=kind: run_ours(kind))
        row = {"flex_s": round(t_flex, 4), "flex_first_call_s": round(first, 2), "ours_s": round(t_ours, 4),
               "flex_over_ours": round(t_flex / t_ours, 3), "flex_vs_ours_rel_err": float(f"{rel(o_flex, o_ours):.3g}")}
        if small:
            with torch.no_grad():
                ref = attend_atoms(q.float(), k.float(), v.float(), kind, layout, "dense", 0.0)
            row["flex_vs_dense_rel_err"] = float(f"{rel(o_flex, ref):.3g}")
        out[kind] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=Path, default=REPO / "build" / "bench_batches", help="benchmarks/batches.py output")
    ap.add_argument("--batch", default="check", choices=["check", "eval25k"])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from benchmarks.batches import collate_samples, load

    batch = collate_samples(load(args.batch, args.batches), seed=1)
    line = {"benchmark": "flex_attention", "batch": args.batch, "device": args.device, "torch": torch.__version__,
            **measure(batch, torch.device(args.device), args.heads, repeats=args.repeats)}
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
