"""``python -m training.embed CHECKPOINT SHARDS_OR_CONFIG OUT.parquet``: one graph embedding per molecule.

SHARDS_OR_CONFIG is a shards folder/URL (read with the default loader options) or a training YAML
(its ``data`` section). Every sample of the chosen splits is embedded exactly once, with no atom
masked and no edge held out. Rows: key, domain, split, num_atoms (after any crop), embedding.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from model.lightning_module import PretrainingModule
from pipeline.config import DataConfig
from pipeline.loader import eval_loader, resolve
from training.config import load_config

log = logging.getLogger("training.embed")


def data_config(source: str, overrides: list[str]) -> DataConfig:
    """The loader options for embedding: from a YAML's data section or defaults over a shards root."""
    if source.endswith((".yaml", ".yml")):
        cfg = load_config(source, overrides).data
    else:
        cfg = load_config_from_root(source, overrides)
    # embeddings of whole, unmasked molecules; every sample once
    return dataclasses.replace(cfg, mask_fraction=0.0, sr_fraction=0.0, lr_pairs_per_atom=0.0)


def load_config_from_root(root: str, overrides: list[str]) -> DataConfig:
    from pipeline.strict_config import apply_overrides, build

    data = apply_overrides({"root": root, "oversize_policy": "crop"}, overrides)
    return build(DataConfig, data, "data")


@torch.no_grad()
def embed(module: PretrainingModule, cfg: DataConfig, splits: list[str], progress: bool = True) -> pa.Table:
    res = resolve(cfg)
    module.eval()
    keys, domains, split_col, atoms, vecs = [], [], [], [], []
    total = sum(len(ix) for s in splits for ix in res.split(s))
    bar = tqdm(total=total, unit="mol", desc="embed", disable=not progress)
    for split in splits:
        for batch in eval_loader(res, split, num_workers=min(cfg.num_workers, 1)):
            if batch.num_graphs == 0:
                continue
            out = module.net(batch, with_tasks=False)
            g = out.graph_embeddings.float().cpu()
            sizes = (batch.ptr[1:] - batch.ptr[:-1]).tolist()
            keys += list(batch["keys"])
            domains += [res.names[d] for d in batch.domain.tolist()]
            split_col += [split] * batch.num_graphs
            atoms += sizes
            vecs += list(g.numpy())
            bar.update(batch.num_graphs)
    bar.close()
    dim = vecs[0].shape[0] if vecs else 0
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "domain": pa.array(domains, pa.string()),
        "split": pa.array(split_col, pa.string()),
        "num_atoms": pa.array(atoms, pa.int32()),
        "embedding": pa.array([v.tolist() for v in vecs], pa.list_(pa.float32(), dim)),
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a .ckpt written by training.run")
    p.add_argument("source", help="shards folder/URL, or a training YAML whose data section to use")
    p.add_argument("out", type=Path, help="output .parquet")
    p.add_argument("overrides", nargs="*", help="loader overrides: key=value for a shards root, data.key=value for a YAML")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits to embed (default all)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not a.checkpoint.exists():
        sys.stderr.write(f"error: no checkpoint at {a.checkpoint}\n")
        return 2
    splits = [s.strip() for s in a.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in ("train", "val", "test")]
    if bad:
        sys.stderr.write(f"error: --splits {a.splits!r}: unknown split(s) {bad}; use train, val, test\n")
        return 2
    module = PretrainingModule.load_from_checkpoint(str(a.checkpoint), map_location="cpu")
    cfg = data_config(a.source, a.overrides)
    table = embed(module, cfg, splits, progress=not a.no_progress)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, a.out)
    sys.stdout.write(f"wrote {table.num_rows} embeddings of dim {table.schema.field('embedding').type.list_size} to {a.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
