"""CPU train-step throughput of the chosen attention backend vs the dense padded reference.

Builds one realistic mixed batch from the vendored demo structures (protein chains + QM9 small
molecules + HMDB metabolites), then times forward + backward + AdamW step of the full-size model
(``ModelConfig()`` defaults: ``M S M S M S P``, 256 wide, 16 heads) for each backend, each in its own
subprocess so that peak memory (max RSS) is measured per backend. Prints one JSON line.

The dense reference materialises [molecules, heads, Lmax, Lmax] scores per layer, so the default
batch is sized for it to fit in a few GB (one protein + 23 small molecules); ``--no-dense`` lets the
chosen backend run alone on bigger batches.

``--batch eval25k`` runs the seed's worst case instead (24,995 atoms, one 13,434-atom molecule, built
by ``benchmarks/batches.py``) against ``--baseline sparse_old``: the sparse backend as it was before issue 14
(edge-wise M kernel with autograd through [E, D] gathers, the encoder's [E, K] Gaussian basis kept for
backward, strided per-bucket SDPA inputs; only the S path's full-input copy per bucket is not reproduced),
kept here only, benchmark-side, for this side-by-side record.
Peak RSS per backend (own subprocess) and memory per 1 k attention pairs (edges + self) are printed.

    python benchmarks/model_step.py [--proteins 1] [--small 16] [--metabolites 7] [--steps 3]
    PYTHONPATH=$PWD python benchmarks/batches.py  # once
    flock /tmp/molstream-heavy.lock python benchmarks/model_step.py --batch eval25k --baseline sparse_old --steps 2
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "raw"
# smallest demo proteins first, so the dense reference fits in memory
PROTEINS = ["2xdgA.pdb", "2xcjA.pdb", "2cviA.pdb", "1i8nA.pdb", "1mr1D.pdb", "1lpbA.pdb"]
DOMAINS = ["protein", "small_molecule", "metabolite", "rna"]

log = logging.getLogger("model_step")


def old_gather_bucket(x, b):
    """Per-bucket gather before issue 14 (benchmark-only baseline): strided [b, H, L, d] view handed to SDPA."""
    return x[b.gather].transpose(1, 2)


def old_edge_attention(q, k, v, src, dst, dropout_p, bias=None):
    """The M kernel before issue 14 (benchmark-only baseline): autograd saves [E, H, d] gathers."""
    import math

    n, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q[dst].to(acc) * k[src].to(acc)).sum(-1) / math.sqrt(d)  # [E, H]
    if bias is not None:
        scores = scores + bias.to(acc)
    with torch.no_grad():
        smax = torch.full((n, h), float("-inf"), device=q.device, dtype=acc).scatter_reduce(
            0, dst.unsqueeze(1).expand(-1, h), scores, reduce="amax", include_self=True
        )
    e = torch.exp(scores - smax[dst])
    denom = torch.zeros(n, h, device=q.device, dtype=acc).index_add_(0, dst, e)
    probs = (e / denom[dst]).to(v.dtype)
    probs = torch.nn.functional.dropout(probs, dropout_p)
    return torch.zeros_like(v).index_add_(0, dst, probs.unsqueeze(-1) * v[src])


def demo_batch(n_proteins: int, n_small: int, n_metabolites: int, seed: int = 0):
    from pipeline.collate import CollateOptions, collate
    from shards_tools.spool import read_samples

    if n_proteins > len(PROTEINS):
        raise SystemExit(f"--proteins {n_proteins}: at most {len(PROTEINS)} demo proteins are listed")

    def read(rel: str, domain: str, limit: int):
        return read_samples(DEMO / rel, rel, domain, limit=limit)

    samples = [s for p in PROTEINS[:n_proteins] for s in read(f"protein/{p}", "protein", 1)]
    samples += read("small_molecule/qm9_sample.xyz", "small_molecule", n_small)
    samples += read("metabolite/metabolites_ccd_hmdb.sdf", "metabolite", n_metabolites)
    ids = [DOMAINS.index(s.domain) for s in samples]
    return collate(samples, ids, CollateOptions(), np.random.default_rng(seed))


def train_step(net, opt, batch, backend: str, weights: dict[str, float]) -> float:
    out = net(batch, backend=backend)
    loss = sum(weights[t] * torch.nn.functional.cross_entropy(p.logits, p.target) for t, p in out.predictions.items())
    loss = loss + 0.0 * out.graph_embeddings.sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def worker(args) -> dict:
    from model.config import ModelConfig, TasksConfig
    from model.network import MolecularESA

    torch.manual_seed(0)
    if args.batch == "demo":
        batch = demo_batch(args.proteins, args.small, args.metabolites)
    else:
        from benchmarks.batches import collate_samples, load

        batch = collate_samples(load(args.batch))
    backend = args.worker
    if backend == "sparse_old":
        import model.attention

        model.attention.edge_attention = old_edge_attention
        model.attention._gather_bucket = old_gather_bucket
        backend = "sparse"
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tasks = TasksConfig()
    net = MolecularESA(ModelConfig(num_heads=args.heads), tasks).train()
    if args.worker == "sparse_old":
        net.encoder.keep_edge_features = True  # the [E, K] Gaussian basis held for backward, as before issue 14
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    weights = {t: tasks.weight(t) for t in tasks.tasks}
    train_step(net, opt, batch, backend, weights)  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(net, opt, batch, backend, weights)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    return {
        "backend": args.worker,
        "step_s": round(sec, 4),
        "atoms_per_s": round(batch.num_nodes / sec, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_model_mb": round(rss_start, 1),
        "atoms": batch.num_nodes,
        "molecules": batch.num_graphs,
        "max_atoms_per_molecule": int((batch.ptr[1:] - batch.ptr[:-1]).max()),
        "edges": int(batch.edge_index.shape[1]),
    }


def _with_memory_per_pairs(r: dict) -> dict:
    pairs = r["edges"] + r["atoms"]  # neighbour pairs + self
    r["mb_per_1k_pairs"] = round((r["peak_rss_mb"] - r["rss_before_model_mb"]) / (pairs / 1000), 3)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proteins", type=int, default=1, help="demo protein chains in the batch (smallest first)")
    ap.add_argument("--small", type=int, default=16, help="QM9 molecules in the batch")
    ap.add_argument("--metabolites", type=int, default=7, help="HMDB metabolites in the batch")
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per backend (median reported)")
    ap.add_argument("--backend", default="sparse", help="the chosen backend to compare with the dense reference")
    ap.add_argument("--baseline", default="dense", choices=["dense", "sparse_old"],
                    help="reference run in the same invocation: dense (default) or the pre-issue-14 sparse M kernel")
    ap.add_argument("--no-dense", action="store_true", help="skip the baseline (for batches the dense one cannot fit)")
    ap.add_argument("--batch", default="demo", choices=["demo", "eval25k", "check"],
                    help="demo: built from --proteins/--small/--metabolites; eval25k/check: from benchmarks/batches.py")
    ap.add_argument("--heads", type=int, default=16, help="attention heads (width 256: 16 heads = head_dim 16)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {}
    for backend in [args.backend] + ([] if args.no_dense else [args.baseline]):
        cmd = [sys.executable, __file__, "--worker", backend, "--proteins", str(args.proteins), "--small",
               str(args.small), "--metabolites", str(args.metabolites), "--steps", str(args.steps),
               "--threads", str(args.threads), "--batch", args.batch, "--heads", str(args.heads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            log.error("backend %s failed (exit %d): %s", backend, proc.returncode, proc.stderr[-2000:])
            return proc.returncode or 1
        results[backend] = _with_memory_per_pairs(json.loads(proc.stdout.strip().splitlines()[-1]))
    chosen = results[args.backend]
    line = {
        "benchmark": "model_step",
        "device": "cpu",
        "threads": args.threads,
        "model": f"M S M S M S P, dim 256, {args.heads} heads",
        "batch": args.batch,
        "atoms": chosen["atoms"],
        "edges": chosen["edges"],
        "molecules": chosen["molecules"],
        "max_atoms_per_molecule": chosen["max_atoms_per_molecule"],
        "backend": args.backend,
        "atoms_per_s": chosen["atoms_per_s"],
        "step_s": chosen["step_s"],
        "peak_rss_mb": chosen["peak_rss_mb"],
        "mb_per_1k_pairs": chosen["mb_per_1k_pairs"],
        "rss_before_model_mb": chosen["rss_before_model_mb"],
    }
    if not args.no_dense:
        b, name = results[args.baseline], args.baseline
        line.update({
            f"{name}_atoms_per_s": b["atoms_per_s"],
            f"{name}_step_s": b["step_s"],
            f"{name}_peak_rss_mb": b["peak_rss_mb"],
            f"{name}_mb_per_1k_pairs": b["mb_per_1k_pairs"],
            f"speedup_vs_{name}": round(chosen["atoms_per_s"] / b["atoms_per_s"], 2),
            f"peak_rss_ratio_vs_{name}": round(chosen["peak_rss_mb"] / b["peak_rss_mb"], 3),
        })
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
