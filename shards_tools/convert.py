"""``python -m shards_tools.convert RAW OUT``: pack structures into pickle-free WebDataset shards.

Reads the seed's ``.pt`` chunks and raw ``.pdb``/``.cif``/``.bcif``/``.sdf``/``.xyz`` files (``.gz`` too)
under RAW, validates every structure, and writes ``OUT/<domain>/<domain>-000000.tar`` shards with
``OUT/index/<domain>.parquet``, ``OUT/rejected.jsonl`` and ``OUT/manifest.json`` (written last).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipeline import storage
from pipeline.schema import MANIFEST_NAME, SPLITS, shard_name
from shards_tools import writer
from shards_tools.readers import domain_from_path, format_of
from shards_tools.spool import ConvertOptions, SpoolResult, spool_file

log = logging.getLogger("shards_tools.convert")

EXIT_OK, EXIT_REJECTS, EXIT_USAGE, EXIT_EMPTY = 0, 1, 2, 3

EPILOG = """\
exit codes:
  0  every input structure was converted (or --allow-rejects was given)
  1  some inputs were rejected: the output is complete for everything else; see OUT/rejected.jsonl
  2  bad command line (missing RAW folder, bad option values)
  3  nothing could be converted

domain of a sample: --domain if given, else a .pt sample's dataset_type, else the folder name
(`protein_chunk_0` -> protein; `RAW/rna/x.pdb` -> rna).
Re-running with the same inputs and options reuses OUT/.work/ and rewrites identical output.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m shards_tools.convert",
        description=__doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("raw", type=Path, help="input folder (one sub-folder per domain, or the seed's *_chunk_N layout)")
    p.add_argument("out", help="output folder for shards, index and manifest, or s3://bucket/prefix")
    p.add_argument("--staging", type=Path, default=None,
                   help="local folder where an s3:// output is built before upload (default: a folder under the "
                        "system temp dir named after the URL; reruns reuse it)")
    p.add_argument("--domain", help="put every input into this domain instead of inferring it")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle within each domain (default 0)")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    p.add_argument("--radius", type=float, default=5.0, help="radius-graph cutoff stored in the shards, Å (default 5.0)")
    p.add_argument("--max-neighbors", type=int, default=64, help="radius-graph neighbours kept per atom (default 64)")
    p.add_argument("--max-atoms", type=int, default=None, help="reject structures with more atoms than this")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of samples in the val split (default 0.05)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="fraction of samples in the test split (default 0.05)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (output is identical for any value)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow .pt files that need arbitrary unpickling (runs code from the file: trusted files only)")
    p.add_argument("--allow-rejects", action="store_true", help="exit 0 even when some inputs were rejected")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    a = p.parse_args(argv)
    problems = []
    if not a.raw.is_dir():
        problems.append(f"RAW must be an existing folder, got {str(a.raw)!r}")
    if a.shard_size_mb <= 0:
        problems.append(f"--shard-size-mb must be > 0, got {a.shard_size_mb}")
    if a.radius <= 0:
        problems.append(f"--radius must be > 0 Å, got {a.radius}")
    if a.max_neighbors < 1:
        problems.append(f"--max-neighbors must be >= 1, got {a.max_neighbors}")
    if a.max_atoms is not None and a.max_atoms < 1:
        problems.append(f"--max-atoms must be >= 1, got {a.max_atoms}")
    if not (0 <= a.val_fraction and 0 <= a.test_fraction and a.val_fraction + a.test_fraction < 1):
        problems.append(f"--val-fraction + --test-fraction must be in [0, 1), got {a.val_fraction} + {a.test_fraction}")
    if a.workers < 1:
        problems.append(f"--workers must be >= 1, got {a.workers}")
    for msg in problems:
        p.error(msg)
    return a


def discover(raw: Path, out: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """Input files (path, posix path relative to RAW) in sorted order, and the ignored ones."""
    inputs, ignored = [], []
    out_resolved = out.resolve()
    for path in sorted(raw.rglob("*")):
        if not path.is_file() or out_resolved in path.resolve().parents:
            continue
        rel = path.relative_to(raw).as_posix()
        if format_of(path):
            inputs.append((path, rel))
        else:
            ignored.append(rel)
    return inputs, ignored


def _spool_all(inputs, workdir: Path, opt: ConvertOptions, workers: int, progress: bool) -> list[SpoolResult]:
    bar = tqdm(total=len(inputs), desc="parse", unit="file", disable=not progress)
    results: dict[str, SpoolResult] = {}
    if workers == 1:
        for path, rel in inputs:
            results[rel] = spool_file(path, rel, workdir, opt)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = {pool.submit(spool_file, path, rel, workdir, opt): rel for path, rel in inputs}
            for fut, rel in futs.items():
                results[rel] = fut.result()
                bar.update()
    bar.close()
    return [results[rel] for _, rel in inputs]


def _write_one(args):
    out_root, rel, members, domain, split = args
    return writer.write_shard(out_root, rel, members, domain, split)


def convert(a: argparse.Namespace) -> int:
    if storage.scheme_of(a.out) != "file":
        staging = a.staging or Path(tempfile.gettempdir()) / "molstream-convert" / hashlib.sha256(a.out.encode()).hexdigest()[:16]
        log.info("building %s in %s before upload", storage.redact_url(a.out), staging)
        code = convert_local(a, staging)
        if code != EXIT_EMPTY:
            urls = storage.upload_tree(str(staging), a.out)
            log.info("uploaded %d files to %s (manifest.json last)", len(urls), storage.redact_url(a.out))
        return code
    return convert_local(a, Path(a.out))


def convert_local(a: argparse.Namespace, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / ".work"
    workdir.mkdir(exist_ok=True)
    for stale in out.rglob("*.tmp*"):  # leftovers of a killed run
        stale.unlink()
    opt = ConvertOptions(radius_A=a.radius, max_neighbors=a.max_neighbors, max_atoms=a.max_atoms,
                         domain=a.domain, trust_pickle=a.trust_pickle)
    progress = not (a.no_progress or a.quiet)
    inputs, ignored = discover(a.raw, out)
    if ignored:
        log.info("ignoring %d files of unknown type (e.g. %s)", len(ignored), ignored[0])
    if not inputs:
        log.error("no input files under %s (looked for %s)", a.raw, ".pt .pdb .cif .bcif .sdf .mol .xyz [.gz]")
        return EXIT_EMPTY

    spools = _spool_all(inputs, workdir, opt, a.workers, progress)

    rejected = [r for s in spools for r in s.rejected]
    by_part: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seen: dict[str, str] = {}
    files_per_domain: dict[str, set] = defaultdict(set)
    for s in spools:
        for e in s.entries:
            if e["key"] in seen:
                rejected.append({"file": e["source"], "record": e["record"],
                                 "reason": f"duplicate key {e['key']} (also {seen[e['key']]})"})
                continue
            seen[e["key"]] = f"{e['source']}#{e['record']}"
            split = writer.assign_split(e["key"], a.val_fraction, a.test_fraction)
            by_part[(e["domain"], split)].append({**e, "spool": s.spool})
            files_per_domain[e["domain"]].add(e["source"])
    rejected.sort(key=lambda r: (r["file"], r["record"], r["reason"]))

    jobs = []
    target = int(a.shard_size_mb * 1e6)
    for domain in sorted({d for d, _ in by_part}):
        for split in SPLITS:
            plan = writer.plan_shards(by_part.get((domain, split), []), domain, split, a.seed, target)
            jobs += [(out, shard_name(domain, split, i), members, domain, split) for i, members in enumerate(plan)]

    results = []
    bar = tqdm(total=len(jobs), desc="write", unit="shard", disable=not progress)
    if a.workers == 1:
        for job in jobs:
            results.append(_write_one(job))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=a.workers) as pool:
            for r in pool.map(_write_one, jobs):
                results.append(r)
                bar.update()
    bar.close()

    shards = [info for info, _ in results]
    rows_by_domain: dict[str, list[dict]] = defaultdict(list)
    for info, rows in results:
        rows_by_domain[info.domain] += rows
    index = {d: writer.write_index(out, d, rows) for d, rows in sorted(rows_by_domain.items())}
    writer.remove_stale(out, {s.path for s in shards} | set(index.values()),
                        [p.name for p in out.iterdir() if p.is_dir() and p.name not in (".work", "index")])
    writer.write_rejected(out, rejected)
    options = {"seed": a.seed, "shard_size_mb": a.shard_size_mb, "radius_A": a.radius,
               "max_neighbors": a.max_neighbors, "max_atoms": a.max_atoms, "val_fraction": a.val_fraction,
               "test_fraction": a.test_fraction, "domain": a.domain, "trust_pickle": a.trust_pickle}
    man = writer.manifest(shards, index, options, len(rejected))
    writer.write_json_atomic(out / MANIFEST_NAME, man)

    _summary(man, files_per_domain, rejected, out)
    if not shards:
        return EXIT_EMPTY
    if rejected and not a.allow_rejects:
        return EXIT_REJECTS
    return EXIT_OK


def _summary(man: dict, files_per_domain, rejected: list[dict], out: Path) -> None:
    rej = Counter(domain_from_path(Path(r["file"])) or "(top level)" for r in rejected)
    names = sorted(set(man["domains"]) | set(rej))
    lines = [f"{'domain':<16}{'files':>7}{'structures':>12}{'atoms':>12}{'rejected':>10}"]
    for d in names:
        info = man["domains"].get(d, {"samples": 0, "atoms": 0})
        lines.append(f"{d:<16}{len(files_per_domain.get(d, ())):>7}{info['samples']:>12}{info['atoms']:>12}{rej.get(d, 0):>10}")
    lines.append(f"{len(man['shards'])} shards in {out}; {len(rejected)} rejected"
                 + (f" (reasons in {out / 'rejected.jsonl'})" if rejected else ""))
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return convert(a)


if __name__ == "__main__":
    sys.exit(main())
