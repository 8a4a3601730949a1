"""``python -m shards_tools.inspect OUT [--verify] [--json] [--plot FILE.png]``: what a shards folder holds.

Prints per-domain samples, atoms (min/median/p95/max), shards and bytes. ``--verify`` re-hashes every
shard against the manifest and decodes every block to cross-check the index (key, offset, size, item, crc32,
atom, bond and edge counts, domain). Exit code 0 when clean, 1 when verification found problems, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import zlib

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.schema import MANIFEST_NAME, SchemaError, check_version, decode_block, split_member_name


def load_manifest(root: str) -> dict:
    try:
        man = json.loads(storage.read_bytes(storage.join(root, MANIFEST_NAME)))
    except storage.StorageError as e:
        raise SystemExit(f"error: {e}; is {root!r} the output folder of shards_tools.convert?") from None
    check_version(man.get("format_version"), f"{root}/{MANIFEST_NAME}")
    return man


def load_index(root: str, man: dict):
    tables = {d: pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, rel)))) for d, rel in man["index"].items()}
    return tables


def stats(man: dict, index: dict) -> dict:
    out = {}
    for d, t in sorted(index.items()):
        atoms = t.column("num_atoms").to_numpy()
        shards = [s for s in man["shards"] if s["domain"] == d]
        out[d] = {
            "samples": int(len(atoms)),
            "atoms_total": int(atoms.sum()),
            "atoms_min": int(atoms.min()),
            "atoms_median": float(np.median(atoms)),
            "atoms_p95": float(np.percentile(atoms, 95)),
            "atoms_max": int(atoms.max()),
            "shards": len(shards),
            "bytes": int(sum(s["bytes"] for s in shards)),
            "splits": man["domains"][d]["splits"],
        }
    return out


def verify(root: str, man: dict, index: dict) -> list[str]:
    """Every problem found, as readable lines (empty when the folder is consistent)."""
    problems: list[str] = []
    rows = {}
    for t in index.values():
        for r in t.to_pylist():
            rows[r["key"]] = r
    seen: set[str] = set()
    for sh in man["shards"]:
        url = storage.join(root, sh["path"])
        h = hashlib.sha256()
        try:
            with storage.open_stream(url) as f:
                data = f.read()
        except storage.StorageError as e:
            problems.append(str(e))
            continue
        h.update(data)
        if h.hexdigest() != sh["sha256"]:
            problems.append(f"{sh['path']}: sha256 {h.hexdigest()} differs from the manifest's {sh['sha256']}")
            continue
        n = 0
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for m in tar:
                    key, _ = split_member_name(m.name)
                    payload = tar.extractfile(m).read()
                    try:
                        samples = decode_block(payload, f"{sh['path']}:{m.name}")
                    except SchemaError as e:
                        problems.append(str(e))
                        continue
                    n += len(samples)
                    if samples[0].key != key:
                        problems.append(f"{sh['path']}:{m.name}: the block's first sample is {samples[0].key!r}, "
                                        f"its member name says {key!r}")
                    crc = zlib.crc32(payload)
                    for k, s in enumerate(samples):
                        r = rows.get(s.key)
                        if r is None:
                            problems.append(f"{sh['path']}:{m.name}: sample {s.key!r} is not in the index")
                            continue
                        seen.add(s.key)
                        checks = [("shard", sh["path"]), ("offset", m.offset_data), ("size", m.size), ("item", k),
                                  ("crc32", crc), ("num_atoms", s.num_atoms), ("num_bonds", len(s.bonds)),
                                  ("num_edges", len(s.edges)), ("domain", s.domain)]
                        for col, val in checks:
                            if r[col] != val:
                                problems.append(f"{sh['path']}:{m.name}: sample {s.key!r}: index {col}={r[col]!r} "
                                                f"but the shard has {val!r}")
        except tarfile.TarError as e:
            problems.append(f"{sh['path']}: {e}")
        if n != sh["samples"]:
            problems.append(f"{sh['path']}: {n} samples, manifest says {sh['samples']}")
    missing = set(rows) - seen
    if missing:
        problems.append(f"{len(missing)} indexed samples are in no shard, e.g. {sorted(missing)[:3]}")
    return problems


def plot(index: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    all_atoms = np.concatenate([t.column("num_atoms").to_numpy() for t in index.values()])
    bins = np.logspace(np.log10(max(1, all_atoms.min())), np.log10(all_atoms.max() + 1), 40)
    for d, t in sorted(index.items()):
        ax.hist(t.column("num_atoms").to_numpy(), bins=bins, alpha=0.6, label=f"{d} ({t.num_rows})")
    ax.set_xscale("log")
    ax.set_xlabel("atoms per sample")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title("atoms per sample by domain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards_tools.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="shards folder or URL (written by shards_tools.convert)")
    p.add_argument("--verify", action="store_true", help="re-hash shards and cross-check the index against decoded samples")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="write a histogram of atoms per sample per domain")
    a = p.parse_args(argv)
    man = load_manifest(a.root)
    index = load_index(a.root, man)
    st = stats(man, index)
    problems = verify(a.root, man, index) if a.verify else []
    if a.plot:
        plot(index, a.plot)
    if a.json:
        out = {"root": a.root, "format_version": man["format_version"], "domains": st, "rejected": man.get("rejected", 0)}
        if a.verify:
            out["verify"] = {"ok": not problems, "problems": problems}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        lines = [f"{'domain':<16}{'samples':>8}{'atoms':>10}{'min':>7}{'median':>8}{'p95':>9}{'max':>8}{'shards':>7}{'MB':>9}"]
        for d, s in st.items():
            lines.append(f"{d:<16}{s['samples']:>8}{s['atoms_total']:>10}{s['atoms_min']:>7}{s['atoms_median']:>8.0f}"
                         f"{s['atoms_p95']:>9.0f}{s['atoms_max']:>8}{s['shards']:>7}{s['bytes'] / 1e6:>9.2f}")
        if a.verify:
            lines.append("verify: OK, every shard hash and index row matches" if not problems
                         else "verify: FAILED\n  " + "\n  ".join(problems))
        if a.plot:
            lines.append(f"plot written to {a.plot}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
