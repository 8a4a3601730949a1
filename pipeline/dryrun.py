"""Stream batches with no model and print a summary: ``python -m pipeline.dryrun CONFIG.yaml|SHARDS [--batches N] [--json]``.

- A YAML config (a training config with a ``data:`` section, or a bare data section) streams training
  batches exactly as training would (mixing, packing, workers); ``--batches`` defaults to one epoch.
- A shards folder or URL (``--max-atoms``, ``--oversize-policy``) without ``--batches`` streams exactly one
  pass over all training samples, interleaved in their natural proportions; with ``--batches`` it streams
  the training mix (natural proportions) like a config does.

The summary: batches, samples, unique keys, atoms, fill mean and 5th percentile, realised domain shares
(atoms and samples), oversize/bad counts, the largest batch by atoms and by edges (the pessimistic
batch to try first for out-of-memory), throughput and time to the first batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.demo import DemoConversionError, ensure_demo_shards
from pipeline.paths import resolve_data_paths
from pipeline.strict_config import ConfigError, build, load_yaml

log = logging.getLogger("pipeline.dryrun")


def load_config(path: str) -> DataConfig:
    """A DataConfig from a YAML file: its ``data:`` section if present, else the whole mapping; relative
    paths in it resolve against the file's folder (``pipeline.paths``)."""
    doc = load_yaml(path)
    section = (doc.get("data") if "data" in doc else doc) or {}
    resolve_data_paths(section, Path(path).absolute().parent)
    try:
        return build(DataConfig, section, "data")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _is_config(target: str) -> bool:
    return target.endswith((".yaml", ".yml")) and storage.scheme_of(target) == "file" and Path(target).is_file()


def summarise(batches, names: list[str], max_atoms: int | None, elapsed_s: float, first_s: float,
              counters: dict | None, storage_counts: dict | None = None) -> dict:
    import numpy as np

    atoms = np.array([b.num_nodes for b in batches], np.int64)
    edges = np.array([b.edge_index.shape[1] for b in batches], np.int64)
    graphs = np.array([b.num_graphs for b in batches], np.int64)
    dom_atoms = np.zeros(len(names))
    dom_graphs = np.zeros(len(names))
    keys = []
    for b in batches:
        dom_atoms += b.stats["domain_atoms"]
        dom_graphs += b.stats["domain_graphs"]
        keys += b["keys"]
    fill = atoms / max_atoms if max_atoms else np.ones(len(atoms))
    ia = int(np.argmax(atoms)) if len(atoms) else -1
    ie = int(np.argmax(edges)) if len(edges) else -1
    out = {
        "batches": len(batches),
        "samples": int(graphs.sum()),
        "unique_keys": len(set(keys)),
        "atoms": int(atoms.sum()),
        "fill_mean": round(float(fill.mean()), 4) if len(fill) else 0.0,
        "fill_p5": round(float(np.percentile(fill, 5)), 4) if len(fill) else 0.0,
        "share_atoms": {n: round(float(v), 4) for n, v in zip(names, dom_atoms / max(1, dom_atoms.sum()), strict=True)},
        "share_samples": {n: round(float(v), 4) for n, v in zip(names, dom_graphs / max(1, dom_graphs.sum()), strict=True)},
        "largest_by_atoms": {"batch": ia, "atoms": int(atoms[ia]), "edges": int(edges[ia]), "graphs": int(graphs[ia])}
        if ia >= 0 else None,
        "largest_by_edges": {"batch": ie, "atoms": int(atoms[ie]), "edges": int(edges[ie]), "graphs": int(graphs[ie])}
        if ie >= 0 else None,
        "atoms_per_s": round(float(atoms.sum() / elapsed_s), 1) if elapsed_s > 0 else None,
        "batches_per_s": round(len(batches) / elapsed_s, 3) if elapsed_s > 0 else None,
        "first_batch_s": round(first_s, 3),
        "elapsed_s": round(elapsed_s, 3),
    }
    if counters is not None:
        out["counts"] = counters
    if storage_counts is not None:
        out["storage"] = storage_counts
    return out


def _print_human(s: dict) -> None:
    lines = [
        f"batches {s['batches']}  samples {s['samples']}  unique keys {s['unique_keys']}  atoms {s['atoms']}",
        f"fill mean {s['fill_mean']:.3f}  p5 {s['fill_p5']:.3f}",
        "share of atoms:   " + "  ".join(f"{k} {v:.3f}" for k, v in s["share_atoms"].items()),
        "share of samples: " + "  ".join(f"{k} {v:.3f}" for k, v in s["share_samples"].items()),
    ]
    for k, c in (s.get("counts") or {}).items():
        lines.append(f"{k}: " + "  ".join(f"{n} {v}" for n, v in c.items() if n in ("oversize_skipped", "oversize_cropped", "bad", "pass")))
    for what in ("largest_by_atoms", "largest_by_edges"):
        b = s[what]
        if b:
            lines.append(f"{what.replace('_', ' ')}: batch {b['batch']} with {b['atoms']} atoms, {b['edges']} edges, {b['graphs']} graphs")
    st = s.get("storage") or {}
    if st.get("requests"):
        lines.append(f"storage: {st['requests']} requests, {st['retries']} retries, {st['resumes']} resumes, "
                     f"{st['bytes_fetched'] / 1e6:.1f} MB fetched, cache {st['cache_hits']} hits / {st['cache_misses']} misses")
    lines.append(f"throughput {s['atoms_per_s']} atoms/s, {s['batches_per_s']} batches/s; first batch after {s['first_batch_s']} s")
    print("\n".join(lines))


def run(cfg: DataConfig, batches: int | None, one_pass: bool, workers: int | None) -> dict:
    import numpy as np

    from pipeline.items import COUNTERS
    from pipeline.loader import TrainLoader, eval_loader, resolve

    t0 = time.perf_counter()
    res = resolve(cfg)
    if one_pass:
        loader = eval_loader(res, "train", 0, 1, num_workers=workers, shuffle=True)
        counters = None
        n_over = {ix.name: int((ix.num_atoms > cfg.max_atoms).sum()) if cfg.max_atoms else 0 for ix in res.train}
    else:
        loader = TrainLoader(res, 0, 1, num_workers=workers)
        if batches is None:
            batches = len(loader)
    got, first = [], None
    it = iter(loader)
    while batches is None or len(got) < batches:
        try:
            b = next(it)
        except StopIteration:
            if one_pass:
                break
            it = iter(loader)
            continue
        if first is None:
            first = time.perf_counter() - t0
        got.append(b)
    elapsed = time.perf_counter() - t0
    if one_pass:
        bad = np.zeros(len(res.names), np.int64)
        for b in got:
            bad += b.stats.get("domain_bad", 0)
        counters = {n: {("oversize_cropped" if cfg.oversize_policy == "crop" else "oversize_skipped"): v,
                        "bad": int(bad[d])} for d, (n, v) in enumerate(n_over.items())}
        io = dict.fromkeys(storage.StorageStats.FIELDS, 0)
        for b in got:
            for k, v in b.stats.get("storage", {}).items():
                io[k] = io.get(k, 0) + v
    else:
        counters = {n: {k: v for k, v in c.items() if k in (*COUNTERS, "pass")} for n, c in loader.stats().items()}
        io = loader.storage_stats()
    return summarise(got, res.names, None if cfg.batch_size is not None else cfg.max_atoms, elapsed, first or 0.0,
                     counters, io)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.dryrun", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a YAML config, or a shards root (folder or URL)")
    p.add_argument("--batches", type=int, default=None, help="batches to stream (default: one epoch / one pass)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--max-atoms", type=int, default=None, help="atom budget (shards root; default 25000)")
    p.add_argument("--oversize-policy", choices=("raise", "skip", "crop"), default=None,
                   help="shards root: what to do with samples over the budget (default: crop)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if _is_config(args.target):
        try:
            cfg = load_config(args.target)
        except ConfigError as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
        one_pass = False
    else:
        cfg = DataConfig(root=args.target, oversize_policy="crop")
        one_pass = args.batches is None
    over = {k: v for k, v in {"max_atoms": args.max_atoms, "oversize_policy": args.oversize_policy,
                              "seed": args.seed}.items() if v is not None}
    cfg = replace(cfg, **over)
    try:
        for root in {cfg.root, *(d.root for d in cfg.domains if d.root)}:
            ensure_demo_shards(root)
        summary = run(cfg, args.batches, one_pass, args.workers)
    except (storage.StorageError, FileNotFoundError, DemoConversionError) as e:  # already names the URL and the fix
        sys.stderr.write(f"error: {e}\n")
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        _print_human(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
