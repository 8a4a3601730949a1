"""``python -m shards_tools.merge PART [PART ...] OUT``: join the outputs of ``convert --part K/N`` runs.

Writes one dataset into OUT: every part's shards under new, globally unique names (the naming of a
single run, numbered on across parts), one index per domain (the parts' rows, shard paths rewritten),
the parts' rejections, and a manifest (written last) whose totals are the parts' sums. Shard bytes are
never rewritten: files are hard-linked when OUT is on the same file system, else copied, so every
shard keeps the sha256 its part's manifest recorded. Works from the manifest and index files alone.

Exit codes: 0 merged, 2 bad usage or parts that do not fit together (the message says which and why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import INDEX_DIR, MANIFEST_NAME, REJECTED_NAME, SPLITS, SchemaError, check_version, shard_name
from shards_tools import writer

log = logging.getLogger("shards_tools.merge")

PER_PART_OPTIONS = ("part",)
"""Manifest options that may differ between parts; every other option must be equal."""


class MergeError(ValueError):
    """The given parts cannot be merged into one dataset."""


def _sum_counts(a: dict, b: dict) -> dict:
    """Recursive sum of two nested dicts of numbers (the manifests' per-domain totals)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = _sum_counts(out.get(k, {}), v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = out.get(k, 0) + v
        elif k not in out:
            out[k] = v
    return out


def load_parts(parts: list[Path]) -> list[dict]:
    """The parts' manifests, checked to fit together: same format version and options, each part once."""
    mans = []
    for p in parts:
        f = p / MANIFEST_NAME
        if not f.is_file():
            raise MergeError(f"{p} has no {MANIFEST_NAME}: not a finished `shards_tools.convert` output "
                             "(rerun that part; it resumes)")
        man = json.loads(f.read_text())
        try:
            check_version(man.get("format_version"), str(f))
        except SchemaError as e:
            raise MergeError(str(e)) from None
        mans.append(man)
    first = {k: v for k, v in mans[0]["options"].items() if k not in PER_PART_OPTIONS}
    for p, man in zip(parts[1:], mans[1:], strict=True):
        opts = {k: v for k, v in man["options"].items() if k not in PER_PART_OPTIONS}
        diff = sorted(k for k in first.keys() | opts.keys() if first.get(k) != opts.get(k))
        if diff:
            raise MergeError(f"{p} was converted with other options than {parts[0]}: "
                             + ", ".join(f"{k}={opts.get(k)!r} vs {first.get(k)!r}" for k in diff)
                             + "; convert every part with the same options")
    labels = [m["options"].get("part") for m in mans]
    given = Counter(labels)
    if None not in given:
        total = {int(lab.split("/")[1]) for lab in labels}
        if len(total) != 1:
            raise MergeError(f"parts of different splits given: {sorted(set(labels))}")
        n = total.pop()
        twice = sorted(lab for lab, c in given.items() if c > 1)
        missing = sorted(set(range(1, n + 1)) - {int(lab.split("/")[0]) for lab in labels})
        if twice or missing:
            raise MergeError(f"parts of {n}: " + (f"given twice {twice}; " if twice else "")
                             + (f"missing {missing}" if missing else "") + " (pass each part's folder once)")
    return mans


def _place(src: Path, dst: Path) -> None:
    """``dst`` gets ``src``'s bytes: a hard link where possible, else a copy (under a temporary name)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def merge(parts: list[Path], out: Path) -> dict:
    """Merge ``parts`` into ``out``; returns the new manifest."""
    out_r = out.resolve()
    for p in parts:
        if p.resolve() == out_r:
            raise MergeError(f"OUT {out} is also given as a part; merge into a new folder")
    mans = load_parts(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands

    counter: Counter = Counter()
    renamed: list[dict[str, str]] = []
    shards: list[dict] = []
    for p, man in zip(parts, mans, strict=True):
        mapping = {}
        ordered = sorted(man["shards"], key=lambda s: (s["domain"], SPLITS.index(s["split"]), s["path"]))
        for sh in ordered:
            new = shard_name(sh["domain"], sh["split"], counter[(sh["domain"], sh["split"])])
            counter[(sh["domain"], sh["split"])] += 1
            mapping[sh["path"]] = new
            src = p / sh["path"]
            if src.stat().st_size != sh["bytes"]:
                raise MergeError(f"{src} has {src.stat().st_size} bytes, its manifest says {sh['bytes']}")
            _place(src, out / new)
            shards.append({**sh, "path": new})
        renamed.append(mapping)
    shards.sort(key=lambda s: (s["domain"], SPLITS.index(s["split"]), s["path"]))

    tables: dict[str, list[pa.Table]] = defaultdict(list)
    for p, man, mapping in zip(parts, mans, renamed, strict=True):
        for domain, rel in man["index"].items():
            t = pq.read_table(p / rel)
            col = t.column("shard").to_pylist()
            unknown = sorted(set(col) - mapping.keys())
            if unknown:
                raise MergeError(f"{p / rel} names shards its manifest does not list, e.g. {unknown[0]!r}")
            t = t.set_column(t.schema.get_field_index("shard"), t.schema.field("shard"),
                             pa.array([mapping[c] for c in col], t.schema.field("shard").type))
            tables[domain].append(t)
    index = {}
    owner: dict[str, str] = {}
    for domain in sorted(tables):
        t = pa.concat_tables(tables[domain])
        for key in t.column("key").to_pylist():
            if key in owner:
                raise MergeError(f"key {key!r} is in two parts (domains {owner[key]} and {domain}); "
                                 "were the same inputs converted twice?")
            owner[key] = domain
        rel = f"{INDEX_DIR}/{domain}.parquet"
        tmp = out / (rel + f".tmp{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, tmp, compression="zstd")
        os.replace(tmp, out / rel)
        index[domain] = rel

    rejected = []
    for p in parts:
        f = p / REJECTED_NAME
        if f.exists():
            rejected += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    rejected.sort(key=lambda r: (r["file"], r["record"], r["reason"]))
    writer.write_rejected(out, rejected)

    domains: dict = {}
    for man in mans:
        domains = _sum_counts(domains, {d: man["domains"][d] for d in sorted(man["domains"])})
    man = {**mans[0], "options": {**mans[0]["options"], "part": None}, "shards": shards, "index": index,
           "domains": domains, "rejected": sum(m.get("rejected", 0) for m in mans),
           "created_by": "shards_tools.merge"}
    writer.remove_stale(out, {s["path"] for s in shards} | set(index.values()),
                        [d.name for d in out.iterdir() if d.is_dir() and d.name != INDEX_DIR])
    writer.write_json_atomic(out / MANIFEST_NAME, man)
    return man


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards_tools.merge", description=__doc__.split("\n\n")[1],
                                epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", type=Path, help="part folders written by `convert --part K/N`, then OUT")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    a = p.parse_args(argv)
    if len(a.parts) < 2:
        p.error("give at least one PART folder and the OUT folder")
    *parts, out = a.parts
    try:
        man = merge(parts, out)
    except MergeError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if not a.quiet:
        total = sum(d["samples"] for d in man["domains"].values())
        sys.stdout.write(f"merged {len(parts)} parts into {out}: {len(man['shards'])} shards, {total} samples, "
                         f"{man['rejected']} rejected\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
