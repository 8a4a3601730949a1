"""The M (neighbour) attention kernel alone, on the eval25k batch: fused kernel vs the pre-issue-14 one.

For each head count (width 256), forward + backward of one M attention over the batch's 528 k radius
edges + self pairs: median seconds, and the bytes autograd keeps for backward (measured with
``saved_tensors_hooks``, each storage once). Prints one JSON line. Needs the stored batches
(``python benchmarks/batches.py``); the old kernel holds ~2.5 GB at 16 heads, so run it under the lock:

    flock /tmp/molstream-heavy.lock python benchmarks/m_kernel.py [--heads 16,8,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def saved_bytes_and_time(fn, q, k, v, w) -> tuple[int, float]:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v)
    (out * w).sum().backward()
    sec = time.perf_counter() - t0
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    return sum(b for p, b in storages.items() if p not in inputs), sec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="16,8,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.batches import collate_samples, load
    from benchmarks.model_step import old_edge_attention
    from model.attention import AttentionLayout, edge_attention

    b = collate_samples(load("eval25k"))
    lay = AttentionLayout.build(b.ptr, b.batch, b.edge_index)
    src, dst, n = lay.nbr_src, lay.nbr_dst, b.num_nodes
    line = {"benchmark": "m_kernel", "atoms": n, "pairs": int(src.shape[0]), "threads": args.threads, "dim": 256}
    for h in (int(x) for x in args.heads.split(",")):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, h, 256 // h, generator=g).requires_grad_() for _ in range(3))
        w = torch.randn(n, h, 256 // h, generator=g)
        for name, kern in (("old", old_edge_attention), ("fused", edge_attention)):
            runs = [saved_bytes_and_time(lambda q, k, v: kern(q, k, v, src, dst, 0.0), q, k, v, w)  # noqa: B023
                    for _ in range(args.repeats)]
            line[f"h{h}_{name}_s"] = round(float(np.median([r[1] for r in runs])), 3)
            line[f"h{h}_{name}_saved_mb"] = round(runs[0][0] / 2**20, 1)
        line[f"h{h}_speedup"] = round(line[f"h{h}_old_s"] / line[f"h{h}_fused_s"], 2)
        line[f"h{h}_fused_saved_mb_per_1k_pairs"] = round(line[f"h{h}_fused_saved_mb"] / (src.shape[0] / 1000), 4)
        line[f"h{h}_old_saved_mb_per_1k_pairs"] = round(line[f"h{h}_old_saved_mb"] / (src.shape[0] / 1000), 4)
    sys.stdout.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
