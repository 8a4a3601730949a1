"""``python -m training.embed CHECKPOINT SOURCE [SOURCE ...] OUT.parquet``: one graph embedding per molecule.

CHECKPOINT: a training.run / training.finetune ``.ckpt`` or an exported backbone (``python -m model.pretrained``).
SOURCE: a shards folder/URL (every sample of --splits once; oversize samples cropped as the loader does), a
training YAML (its data section), or raw structure files / folders (PDB, mmCIF, BinaryCIF, SDF, MOL, XYZ,
.gz too: read by the converter's readers, bonds and radius graph built as the converter would).
Rows: key, domain, split, source, record, mol_id, num_atoms, embedding. With --nodes NODES.parquet, also one row
per atom: key, atom_index, atomic_number, embedding. No atom is masked and no edge held out.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("training.embed")

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
RAW_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".bcif", ".sdf", ".mol", ".xyz")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.embed", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a .ckpt (training.run / training.finetune) or an exported backbone folder")
    p.add_argument("paths", nargs="+", metavar="SOURCE ... OUT",
                   help="one or more sources (shards root/URL, training YAML, raw files or folders), then the output .parquet")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--max-atoms", type=int, default=25_000, help="atom budget per batch (default 25000)")
    p.add_argument("--nodes", type=Path, metavar="NODES.parquet", help="also write one row per atom here")
    p.add_argument("--splits", default="train,val,test", help="shards sources: comma-separated splits (default all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="loader override for shards/YAML sources (repeatable; a bare KEY=VALUE argument works too): "
                        "num_workers=0, or data.num_workers=0 for a YAML")
    p.add_argument("--radius", type=float, default=5.0, help="raw sources: radius-graph cutoff, Å (default 5.0, as the converter)")
    p.add_argument("--max-neighbors", type=int, default=64, help="raw sources: neighbours kept per atom (default 64)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    # KEY=VALUE positionals (the old form) are loader overrides too
    a.overrides += [x for x in a.paths if _OVERRIDE.match(x) and not Path(x).exists()]
    a.paths = [x for x in a.paths if not (_OVERRIDE.match(x) and not Path(x).exists())]
    if len(a.paths) < 2:
        p.error("give at least one SOURCE and the OUT.parquet path")
    a.sources, a.out = a.paths[:-1], Path(a.paths[-1])
    if a.out.suffix != ".parquet":
        p.error(f"the last path is the output and must end in .parquet, got {str(a.out)!r}")
    if a.max_atoms < 1:
        p.error(f"--max-atoms must be >= 1, got {a.max_atoms}")
    a.split_list = [s.strip() for s in a.splits.split(",") if s.strip()]
    bad = [s for s in a.split_list if s not in ("train", "val", "test")]
    if bad:
        p.error(f"--splits {a.splits!r}: unknown split(s) {bad}; use train, val, test")
    return a


def pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return dev


def source_kind(src: str) -> str:
    """yaml, raw (structure files / folders without a manifest) or shards."""
    if src.endswith((".yaml", ".yml")):
        return "yaml"
    p = Path(src)
    if p.is_file():
        return "raw"
    if p.is_dir() and not (p / "manifest.json").exists():
        return "raw"
    return "shards"


# ---------------------------------------------------------------- raw structure files

def raw_files(src: str) -> list[tuple[Path, str]]:
    """(path, name relative to the given folder, or the file name) of the structure files of a raw source."""
    from shards_tools.readers import format_of

    p = Path(src)
    if p.is_file():
        return [(p, p.name)]
    files = [(f, f.relative_to(p).as_posix()) for f in sorted(p.rglob("*")) if f.is_file() and format_of(f) not in (None, "pt")]
    if not files:
        raise ValueError(f"{src}: no structure files ({', '.join(RAW_SUFFIXES)}, .gz too) under this folder")
    return files


def raw_samples(src: str, radius_A: float, max_neighbors: int) -> Iterator:
    """Samples of a raw source, as the converter would store them; rejected records are logged and counted."""
    from shards_tools.readers import domain_from_path, format_of, read_file
    from shards_tools.spool import ConvertOptions, to_sample
    from shards_tools.structure import Rejection, validate

    opt = ConvertOptions(radius_A=radius_A, max_neighbors=max_neighbors)
    rejected = 0
    for path, rel in raw_files(src):
        domain = domain_from_path(Path(rel)) or "raw"
        for rec in read_file(path, rel):
            reason = rec.reason if isinstance(rec, Rejection) else validate(rec, None)
            if reason is not None:
                rejected += 1
                log.warning("skipping %s record %s: %s", rel, getattr(rec, "record", "?"), reason)
                continue
            yield to_sample(rec, rel, domain, format_of(path) or "", opt)
    if rejected:
        log.warning("%s: %d records could not be read (see the warnings above)", src, rejected)


def raw_batches(samples: Iterator, max_atoms: int, radius_A: float, max_neighbors: int) -> Iterator:
    """Batches in input order under the atom budget; a molecule bigger than the budget goes alone (never cropped)."""
    import numpy as np

    from pipeline.collate import CollateOptions, collate

    opt = CollateOptions(radius_A=radius_A, max_neighbors=max_neighbors, mask_fraction=0.0, sr_fraction=0.0,
                         lr_pairs_per_atom=0.0)
    pending, atoms = [], 0

    def flush():
        batch = collate(pending, [0] * len(pending), opt, np.random.default_rng(0))
        batch.meta = [(s.domain, "", s.source, s.record, s.mol_id) for s in pending]
        return batch

    for s in samples:
        if pending and atoms + s.num_atoms > max_atoms:
            yield flush()
            pending, atoms = [], 0
        if s.num_atoms > max_atoms:
            log.warning("%s (%d atoms) exceeds --max-atoms %d: embedded alone in its batch", s.key, s.num_atoms, max_atoms)
        pending.append(s)
        atoms += s.num_atoms
    if pending:
        yield flush()


# ---------------------------------------------------------------- shards

def shard_data_config(src: str, kind: str, overrides: list[str], max_atoms: int):
    """Loader options for embedding: a YAML's data section or defaults over a shards root; tasks off."""
    import dataclasses

    from pipeline.config import DataConfig
    from pipeline.strict_config import apply_overrides, build

    if kind == "yaml":
        from training.config import load_config

        cfg = load_config(src, overrides).data
    else:
        data = apply_overrides({"root": src, "oversize_policy": "crop", "max_atoms": max_atoms}, overrides)
        cfg = build(DataConfig, data, "data")
    return dataclasses.replace(cfg, mask_fraction=0.0, sr_fraction=0.0, lr_pairs_per_atom=0.0)


def shard_batches(cfg, splits: list[str]) -> Iterator:
    from pipeline.loader import eval_loader, resolve

    res = resolve(cfg)
    for split in splits:
        for batch in eval_loader(res, split, num_workers=min(cfg.num_workers, 1)):
            if batch.num_graphs == 0:
                continue
            batch.meta = [(res.names[d], split, "", -1, "") for d in batch.domain.tolist()]
            yield batch


# ---------------------------------------------------------------- embedding

def embed_batches(net, batches, device, nodes: bool = False, progress: bool = True):
    """Run ``net`` (a MolecularESA) over ``batches``; return (graph table, node table or None)."""
    import numpy as np
    import pyarrow as pa
    import torch
    from tqdm import tqdm

    from model.pretrained import embed_batch

    net.eval()
    rows: dict[str, list] = {k: [] for k in ("key", "domain", "split", "source", "record", "mol_id", "num_atoms")}
    vecs, node_parts = [], []
    bar = tqdm(unit="mol", desc="embed", disable=not progress)
    with torch.no_grad():
        for batch in batches:
            meta = batch.meta
            node, graph = embed_batch(net, batch.to(device))
            sizes = (batch.ptr[1:] - batch.ptr[:-1]).cpu().numpy()
            keys = list(batch["keys"])
            rows["key"] += keys
            for col, j in (("domain", 0), ("split", 1), ("source", 2), ("record", 3), ("mol_id", 4)):
                rows[col] += [m[j] for m in meta]
            rows["num_atoms"] += sizes.tolist()
            vecs.append(graph.float().cpu().numpy())
            if nodes:
                node_parts.append((np.repeat(np.array(keys, dtype=object), sizes),
                                   np.concatenate([np.arange(n) for n in sizes]) if len(sizes) else np.zeros(0, np.int64),
                                   batch.z.cpu().numpy(), node.float().cpu().numpy()))
            bar.update(len(keys))
    bar.close()
    dim = vecs[0].shape[1] if vecs else net.graph_dim
    emb = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    graph_table = pa.table({
        "key": pa.array(rows["key"], pa.string()),
        "domain": pa.array(rows["domain"], pa.string()),
        "split": pa.array(rows["split"], pa.string()),
        "source": pa.array(rows["source"], pa.string()),
        "record": pa.array(rows["record"], pa.int32()),
        "mol_id": pa.array(rows["mol_id"], pa.string()),
        "num_atoms": pa.array(rows["num_atoms"], pa.int32()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
    })
    node_table = None
    if nodes:
        d = net.node_dim
        k = np.concatenate([p[0] for p in node_parts]) if node_parts else np.zeros(0, object)
        node_table = pa.table({
            "key": pa.array(k.tolist(), pa.string()),
            "atom_index": pa.array(np.concatenate([p[1] for p in node_parts]) if node_parts else [], pa.int32()),
            "atomic_number": pa.array(np.concatenate([p[2] for p in node_parts]) if node_parts else [], pa.uint8()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array((np.concatenate([p[3] for p in node_parts]) if node_parts else np.zeros((0, d))).reshape(-1),
                         pa.float32()), d),
        })
    return graph_table, node_table


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import itertools

    import pyarrow.parquet as pq

    from model.pretrained import load_pretrained
    from pipeline.strict_config import ConfigError

    try:
        device = pick_device(a.device)
        net = load_pretrained(a.checkpoint, map_location=device)
        streams = []
        for src in a.sources:
            kind = source_kind(src)
            if kind == "raw":
                streams.append(raw_batches(raw_samples(src, a.radius, a.max_neighbors), a.max_atoms, a.radius,
                                           a.max_neighbors))
            else:
                streams.append(shard_batches(shard_data_config(src, kind, a.overrides, a.max_atoms), a.split_list))
        log.info("embedding on %s (%d source(s))", device, len(a.sources))
        graph_t, node_t = embed_batches(net, itertools.chain(*streams), device, nodes=a.nodes is not None,
                                        progress=not a.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(graph_t, a.out)
    msg = f"wrote {graph_t.num_rows} embeddings of dim {graph_t.schema.field('embedding').type.list_size} to {a.out}"
    if node_t is not None:
        a.nodes.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(node_t, a.nodes)
        msg += f"; {node_t.num_rows} atom embeddings to {a.nodes}"
    sys.stdout.write(msg + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
