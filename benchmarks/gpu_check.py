"""GPU check: every attention backend agrees with the dense reference on CUDA, then time them.

1. Kernel check: random bf16 q/k/v on a real mixed batch (proteins, QM9, metabolites, a 1-atom
   molecule, an isolated atom) through M (with and without a per-edge bias), S and P attention of
   each backend, against the dense reference in fp32 (bf16 tolerance).
2. Model check: the whole network under bf16 autocast with each backend vs the dense reference in
   fp32, same weights.
3. Timing: train steps (forward + backward + AdamW, bf16 autocast) of ``ModelConfig()`` on the
   seed's worst case (``eval25k``: 24,995 atoms with one 13,434-atom molecule) for each fast backend,
   and on the small check batch for all backends including dense (same run); then the 25 k step
   for each ``--heads`` choice (width 256: 16 heads = head_dim 16, which flash kernels pad to 32).
4. FlexAttention as the M and S kernel (``benchmarks/flex_attention.py``) vs ours on the 25 k batch,
   forward + backward, with its error against ours; an error there is reported in the line, not fatal
   (``--no-flex`` skips it).
   Reports atoms/s, peak GPU memory and an MFU estimate from an analytic FLOP count (matmuls only;
   train = 3 x forward).

Without flash-attn (the test image has none) the backends are ``sparse`` (fused edge kernel for M,
SDPA per length bucket for S/P) and the dense reference. The batches are read from stored shard
members (no PDB/SDF parsing, no biotite/RDKit there). Build them here, carry them, run there:

    PYTHONPATH=$PWD python benchmarks/batches.py build/bench_batches      # here (a few MB, ignored by git)
    PYTHONPATH=$PWD python benchmarks/gpu_check.py --batches build/bench_batches   # on the GPU machine

(device tool: ``run(command="PYTHONPATH=$PWD python benchmarks/gpu_check.py", carry=["build/bench_batches"])``).
Prints one JSON line; exit status 1 when a check fails, 2 when there is no CUDA device. Finishes in
well under 5 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BF16_TOL = 3e-2
"""Max relative error (max |diff| / max |ref|) accepted between a bf16 backend and the fp32 reference."""

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 tensor-core peak by device-name substring (SXM figures; PCIe parts are lower)."""

log = logging.getLogger("gpu_check")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0


def model_flops(batch, cfg) -> float:
    """Forward matmul FLOPs of the network on ``batch`` (2 per multiply-add)."""
    n, g = batch.num_nodes, batch.num_graphs
    e = int(batch.edge_index.shape[1]) + n  # neighbours + self
    sq = float(((batch.ptr[1:] - batch.ptr[:-1]).double() ** 2).sum())
    k = cfg.num_gaussians
    f = 2 * n * (k * k + k * cfg.dim) + 2 * n * (5 * cfg.dim + cfg.dim * cfg.dim)  # encoder projections
    in_dim = cfg.block_dims[0]
    for kind, d in zip(cfg.layer_letters, cfg.block_dims, strict=True):
        if in_dim != d:
            f += 2 * n * in_dim * d
        if kind == "P":
            s = cfg.num_seeds
            f += 2 * n * 2 * d * d + 2 * s * 2 * d * d  # k, v of atoms; q, out of seeds
            f += 2 * 2 * s * n * d  # scores + weighted values
            f += 2 * g * s * 2 * d * cfg.mlp_hidden
        else:
            f += 2 * n * 4 * d * d + 2 * n * 2 * d * cfg.mlp_hidden
            f += 2 * 2 * (e if kind == "M" else sq) * d
        in_dim = d
    return float(f)


def kernel_check(batch, backends, device) -> dict:
    from model.attention import AttentionLayout, attend_atoms, attend_pool

    b = batch.to(device)
    layout = AttentionLayout.build(b.ptr, b.batch, b.edge_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b.num_nodes, 16, 16, generator=g).to(device) for _ in range(3))
    seeds = torch.randn(32, 16, 16, generator=g).to(device)
    lo = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {}
    bias = torch.randn(b.edge_index.shape[1], 16, generator=g).to(device)
    for backend in backends:
        for kind in ("M", "S"):
            ref = attend_atoms(q, k, v, kind, layout, "dense", 0.0)
            got = attend_atoms(q.to(lo), k.to(lo), v.to(lo), kind, layout, backend, 0.0)
            out[f"{backend}_{kind}"] = rel_err(got, ref)
        ref = attend_atoms(q, k, v, "M", layout, "dense", 0.0, edge_bias=bias)
        got = attend_atoms(q.to(lo), k.to(lo), v.to(lo), "M", layout, backend, 0.0, edge_bias=bias.to(lo))
        out[f"{backend}_M_bias"] = rel_err(got, ref)
        ref = attend_pool(seeds, k, v, layout, "dense", 0.0)
        out[f"{backend}_P"] = rel_err(attend_pool(seeds.to(lo), k.to(lo), v.to(lo), layout, backend, 0.0), ref)
    return out


def model_check(batch, backends, device) -> dict:
    from model.config import ModelConfig, TasksConfig
    from model.network import MolecularESA

    torch.manual_seed(0)
    net = MolecularESA(ModelConfig(), TasksConfig()).to(device).eval()
    b = batch.to(device)
    with torch.no_grad():
        ref = net(b, backend="dense")
        out = {}
        for backend in backends:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                got = net(b, backend=backend)
            errs = [rel_err(got.node_embeddings, ref.node_embeddings), rel_err(got.graph_embeddings, ref.graph_embeddings)]
            errs += [rel_err(got.predictions[t].logits, p.logits) for t, p in ref.predictions.items()]
            out[f"{backend}_model"] = max(errs)
    return out


def time_backend(batch, backend, device, steps: int, heads: int = 16) -> dict:
    from model.config import ModelConfig, TasksConfig
    from model.network import MolecularESA

    torch.manual_seed(0)
    cfg, tasks = ModelConfig(num_heads=heads), TasksConfig()
    net = MolecularESA(cfg, tasks).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    b = batch.to(device)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = net(b, backend=backend)
            loss = sum(tasks.weight(t) * torch.nn.functional.cross_entropy(p.logits.float(), p.target)
                       for t, p in out.predictions.items()) + 0.0 * out.graph_embeddings.float().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    flops = 3 * model_flops(batch, cfg)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    return {
        "atoms_per_s": round(b.num_nodes / sec, 1),
        "step_s": round(sec, 4),
        "tflops_per_s": round(flops / sec / 1e12, 2),
        "mfu": round(flops / sec / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=Path, default=REPO / "build" / "bench_batches",
                    help="folder written by benchmarks/batches.py (check.tar, eval25k.tar)")
    ap.add_argument("--heads", default="16,8,4", help="head counts timed on the 25 k batch (width 256)")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per backend (median reported)")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention measurement (step 4)")
    ap.add_argument("--device", default="cuda", help="cuda (default); 'cpu' only smoke-tests this script")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = (f"no CUDA device visible (torch {torch.__version__}, cuda build {torch.version.cuda}): run this "
               "script on a GPU machine; on CPU the backends are checked by `pytest tests/model`")
        log.error(msg)
        print(json.dumps({"benchmark": "gpu_check", "ok": False, "error": msg}))
        return 2
    from benchmarks.batches import collate_samples, load
    from model.attention import flash_attn_available

    t_start = time.perf_counter()
    backends = ["sparse"] + (["flash"] if device.type == "cuda" and flash_attn_available() else [])
    if "flash" not in backends:
        log.warning("flash-attn not importable (pip install .[gpu]): checking the non-flash (sparse/SDPA) path only")
    small = collate_samples(load("check", args.batches))
    big = collate_samples(load("eval25k", args.batches), seed=1)
    errs = kernel_check(small, backends, device) | model_check(small, backends, device)
    ok = all(v <= BF16_TOL for v in errs.values())
    log.info("checks: %s", errs)
    timing_small = {bk: time_backend(small, bk, device, args.steps) for bk in backends + ["dense"]}
    log.info("small batch: %s", timing_small)
    timing_big = {bk: time_backend(big, bk, device, args.steps) for bk in backends}
    log.info("eval25k: %s", timing_big)
    fast = backends[-1]
    timing_heads = {}
    for h in (int(x) for x in args.heads.split(",") if x):
        timing_heads[f"{fast}_heads{h}_dim{256 // h}"] = time_backend(big, fast, device, args.steps, heads=h)
        log.info("heads %d: %s", h, timing_heads[f"{fast}_heads{h}_dim{256 // h}"])
    flex: dict = {"skipped": True}
    if not args.no_flex:
        try:
            from benchmarks.flex_attention import measure

            flex = measure(big, device, heads=8)
        except Exception as err:  # an optional comparison: report, never lose the line above
            flex = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        log.info("flex: %s", flex)
    line = {
        "benchmark": "gpu_check",
        "ok": ok,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backends": backends,
        "tolerance": BF16_TOL,
        "max_rel_err": {k: float(f"{v:.3g}") for k, v in errs.items()},
        "small_batch": {"atoms": small.num_nodes, "molecules": small.num_graphs, **timing_small},
        "big_batch": {"atoms": big.num_nodes, "molecules": big.num_graphs,
                      "max_atoms_per_molecule": int((big.ptr[1:] - big.ptr[:-1]).max()),
                      "edges": int(big.edge_index.shape[1]), **timing_big},
        "heads_on_eval25k": timing_heads,
        "flex_attention_on_eval25k": flex,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(line))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
