"""``python -m shards_tools.convert RAW OUT``: pack structures into pickle-free WebDataset shards.

Reads the seed's ``.pt`` chunks and raw ``.pdb``/``.cif``/``.bcif``/``.sdf``/``.xyz`` files (``.gz`` too)
under RAW, validates every structure, and writes ``OUT/<domain>/<domain>-000000.tar`` shards with
``OUT/index/<domain>.parquet``, ``OUT/rejected.jsonl`` and ``OUT/manifest.json`` (written last).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from pipeline import storage
from pipeline.schema import MANIFEST_NAME, SPLITS, shard_name
from shards_tools import writer
from shards_tools.discover import Input, list_inputs, parse_part, part_folder, select_part
from shards_tools.readers import (
    STREAMED_FORMATS,
    describe_error,
    domain_from_path,
    format_of,
    parse_errors,
    split_records,
)
from shards_tools.splits import MIN_FOR_HOLDOUT, assign_splits
from shards_tools.spool import (
    ConvertOptions,
    SpoolResult,
    atomic_write,
    file_fingerprint,
    load_spool,
    spool_file,
    spool_paths,
    spool_range,
)

log = logging.getLogger("shards_tools.convert")

EXIT_OK, EXIT_REJECTS, EXIT_USAGE, EXIT_EMPTY, EXIT_CRASH = 0, 1, 2, 3, 4

RANGE_BYTES = 8 * 10**6
"""A record range of a multi-record file is also cut once its records reach this many bytes."""

EPILOG = f"""\
exit codes:
  0  every input structure was converted (or --allow-rejects was given)
  1  some inputs were rejected: the output is complete for everything else; see OUT/rejected.jsonl
     (unparseable files or records, refused sizes, unreadable folders, links leaving RAW, duplicates)
  2  bad command line (missing RAW folder, bad option values)
  3  nothing could be converted
  4  the converter itself failed (a bug, a full disk, ...): the traceback is on stderr and OUT has no
     manifest.json, so no reader takes it for complete; rerun after fixing the cause (it resumes)

files: byte-identical inputs are converted once (the first by name; the others are listed in
rejected.jsonl). Symbolic links are not followed unless --follow-symlinks (a link leaving RAW is listed
in rejected.jsonl). Files of unknown type are counted in the summary (listed with --verbose).
A domain with at least {MIN_FOR_HOLDOUT} structures always gets at least one val and one test sample.
Multi-record SDF/XYZ files are cut into ranges of --records-per-task records that workers parse in
parallel; the output does not depend on --workers or --records-per-task.

domain of a sample: --domain if given, else a .pt sample's dataset_type, else the folder name
(`protein_chunk_0` -> protein; `RAW/rna/x.pdb` -> rna).
The parse results are spooled in OUT/.work/ (removed after a successful run unless --keep-work): a run
killed part-way, started again, resumes from them and writes identical output.

cluster: --part K/N converts a deterministic 1/N of the inputs (balanced by bytes) into
OUT/part-K-of-N/; `python -m shards_tools.merge OUT/part-* MERGED` joins the parts.
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
    p.add_argument("--max-input-mb", type=float, default=512.0,
                   help="refuse a file read whole (PDB, mmCIF, BCIF, .pt), or one SDF/XYZ record, larger than this "
                        "many MB after decompression; it is not read further (default 512)")
    p.add_argument("--max-file-atoms", type=int, default=2_000_000,
                   help="refuse a PDB/mmCIF/BCIF file with more atom records (all models) than this, before "
                        "parsing it (default 2000000)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (output is identical for any value)")
    p.add_argument("--records-per-task", type=int, default=1000,
                   help="records of a multi-record SDF/XYZ file parsed per task (default 1000)")
    p.add_argument("--part", metavar="K/N", default=None,
                   help="convert only part K of N of the inputs, into OUT/part-K-of-N/ (see shards_tools.merge)")
    p.add_argument("--follow-symlinks", action="store_true", help="follow symbolic links, also those leaving RAW")
    p.add_argument("--keep-work", action="store_true", help="keep the parse spool OUT/.work/ after a successful run")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow .pt files that need arbitrary unpickling (runs code from the file: trusted files only)")
    p.add_argument("--allow-rejects", action="store_true", help="exit 0 even when some inputs were rejected")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list skipped files (unknown type, links not followed) in the summary")
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
    if a.records_per_task < 1:
        problems.append(f"--records-per-task must be >= 1, got {a.records_per_task}")
    if a.max_input_mb <= 0:
        problems.append(f"--max-input-mb must be > 0, got {a.max_input_mb}")
    if a.max_file_atoms < 1:
        problems.append(f"--max-file-atoms must be >= 1, got {a.max_file_atoms}")
    a.part_kn = None
    if a.part is not None:
        try:
            a.part_kn = parse_part(a.part)
        except ValueError as e:
            problems.append(str(e))
    for msg in problems:
        p.error(msg)
    return a


class _Spooler:
    """Phase 1 driver: one task per whole file or per record range of a multi-record file, run inline
    (one worker) or in a process pool with a bounded number of tasks in flight (memory stays bounded
    however large a file is). Progress counts input bytes, so the ETA holds for one huge file too."""

    def __init__(self, workdir: Path, opt: ConvertOptions, workers: int, records_per_task: int, total_bytes: int,
                 progress: bool):
        self.workdir, self.opt, self.workers, self.rpt = workdir, opt, workers, records_per_task
        self.pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
        self.pending: deque = deque()
        self.results: dict[tuple[str, int], SpoolResult] = {}
        self.extra: list[dict] = []
        self.lists: list[tuple[Path, dict]] = []
        self.records = 0
        self.bar = tqdm(total=total_bytes, desc="parse", unit="B", unit_scale=True, disable=not progress)

    def _done(self, key: tuple[str, int], res: SpoolResult, nbytes: int) -> None:
        self.results[key] = res
        self.records += len(res.entries) + len(res.rejected)
        self.bar.update(nbytes)
        self.bar.set_postfix(records=self.records, refresh=False)

    def _submit(self, key: tuple[str, int], nbytes: int, fn, *args) -> None:
        if self.pool is None:
            self._done(key, fn(*args), nbytes)
            return
        while len(self.pending) >= 2 * self.workers:
            self._done(*self._take())
        self.pending.append((key, self.pool.submit(fn, *args), nbytes))

    def _take(self):
        key, fut, nbytes = self.pending.popleft()
        return key, fut.result(), nbytes

    def add(self, inp: Input) -> None:
        fmt = format_of(inp.path)
        if fmt in STREAMED_FORMATS:
            self._add_streamed(inp, fmt)
        else:
            self._submit((inp.rel, -1), inp.size, spool_file, inp.path, inp.rel, self.workdir, self.opt)

    def _add_streamed(self, inp: Input, fmt: str) -> None:
        fp_file = {**file_fingerprint(inp.path, inp.rel, self.opt), "records_per_task": self.rpt}
        _, list_path = spool_paths(self.workdir, inp.rel)
        if list_path.exists() and (listed := json.loads(list_path.read_text())).get("fingerprint") == fp_file:
            done = [load_spool(*spool_paths(self.workdir, inp.rel, r), fp) for r, fp in enumerate(listed["ranges"])]
            if all(d is not None for d in done):
                for r, d in enumerate(done):
                    self._done((inp.rel, r), d, inp.size if r == 0 else 0)
                return
        ranges: list[dict] = []
        batch: list = []
        batch_bytes, last_pos = 0, 0

        def flush() -> None:
            nonlocal batch, batch_bytes, last_pos
            r = len(ranges)
            fp = {**fp_file, "range": r, "first_record": batch[0].record, "records": len(batch)}
            ranges.append(fp)
            bin_path, meta_path = spool_paths(self.workdir, inp.rel, r)
            nbytes, last_pos = batch[-1].end_pos - last_pos, batch[-1].end_pos
            done = load_spool(bin_path, meta_path, fp)
            if done is not None:
                self._done((inp.rel, r), done, nbytes)
            else:
                self._submit((inp.rel, r), nbytes, spool_range, batch, inp.rel, fmt, str(bin_path), str(meta_path),
                             fp, self.opt)
            batch, batch_bytes = [], 0

        try:
            for raw in split_records(inp.path, fmt, self.opt.limits.max_input_bytes):
                batch.append(raw)
                batch_bytes += len(raw.data or b"")
                if len(batch) >= self.rpt or batch_bytes >= RANGE_BYTES:
                    flush()
        except parse_errors() as e:  # e.g. a corrupt .gz stream: the records before it are kept
            self.extra.append({"file": inp.rel, "record": -1, "reason": f"unreadable {fmt} file: {describe_error(e, None)}"})
        if batch:
            flush()
        if not ranges and not any(r["file"] == inp.rel for r in self.extra):
            self.extra.append({"file": inp.rel, "record": -1, "reason": f"no structures found in this {fmt} file"})
        self.bar.update(max(0, inp.size - last_pos))
        self.lists.append((list_path, {"fingerprint": fp_file, "ranges": ranges}))

    def run(self, inputs: list[Input]) -> tuple[list[SpoolResult], list[dict]]:
        try:
            for inp in inputs:
                self.add(inp)
            while self.pending:
                self._done(*self._take())
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
            self.bar.close()
        for path, listed in self.lists:  # a file's list of ranges is written once all of them are spooled
            atomic_write(path, json.dumps(listed).encode())
        order = {inp.rel: i for i, inp in enumerate(inputs)}
        keys = sorted(self.results, key=lambda k: (order[k[0]], k[1]))
        return [self.results[k] for k in keys], self.extra


def _write_one(args):
    out_root, rel, members, domain, split = args
    return writer.write_shard(out_root, rel, members, domain, split)


def convert(a: argparse.Namespace) -> int:
    out = a.out if a.part_kn is None else storage.join(a.out, part_folder(*a.part_kn))
    if storage.scheme_of(out) != "file":
        staging = a.staging or Path(tempfile.gettempdir()) / "molstream-convert" / hashlib.sha256(out.encode()).hexdigest()[:16]
        log.info("building %s in %s before upload", storage.redact_url(out), staging)
        code = convert_local(a, staging)
        if code not in (EXIT_EMPTY, EXIT_CRASH):
            urls = storage.upload_tree(str(staging), out)
            log.info("uploaded %d files to %s (manifest.json last)", len(urls), storage.redact_url(out))
        return code
    return convert_local(a, Path(out))


def convert_local(a: argparse.Namespace, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / ".work"
    workdir.mkdir(exist_ok=True)
    for stale in out.rglob("*.tmp*"):  # leftovers of a killed run
        stale.unlink()
    opt = ConvertOptions(radius_A=a.radius, max_neighbors=a.max_neighbors, max_atoms=a.max_atoms,
                         domain=a.domain, trust_pickle=a.trust_pickle, max_input_mb=a.max_input_mb,
                         max_file_atoms=a.max_file_atoms)
    progress = not (a.no_progress or a.quiet)
    listing = list_inputs(a.raw, out, a.follow_symlinks)
    inputs = listing.inputs
    listing_rejects = listing.rejected
    if a.part_kn is not None:
        inputs = select_part(inputs, *a.part_kn)
        if a.part_kn[0] != 1:  # problems met while listing RAW are reported once, by part 1
            listing_rejects = []
    if listing.skipped:
        log.info("skipping %d files of unknown type (e.g. %s)", len(listing.skipped), listing.skipped[0])
    if not inputs:
        log.error("no input files under %s%s (looked for %s)", a.raw, f" for part {a.part}" if a.part else "",
                  ".pt .pdb .cif .bcif .sdf .mol .xyz [.gz]")
        return EXIT_EMPTY

    spools, extra = _Spooler(workdir, opt, a.workers, a.records_per_task, sum(i.size for i in inputs),
                             progress).run(inputs)

    rejected = listing_rejects + extra + [r for s in spools for r in s.rejected]
    by_domain: dict[str, list[dict]] = defaultdict(list)
    seen: dict[str, str] = {}
    files_per_domain: dict[str, set] = defaultdict(set)
    for s in spools:
        for e in s.entries:
            if e["key"] in seen:
                rejected.append({"file": e["source"], "record": e["record"],
                                 "reason": f"duplicate key {e['key']} (also {seen[e['key']]})"})
                continue
            seen[e["key"]] = f"{e['source']}#{e['record']}"
            by_domain[e["domain"]].append({**e, "spool": s.spool})
            files_per_domain[e["domain"]].add(e["source"])
    by_part: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for domain, entries in by_domain.items():
        for e, split in zip(entries, assign_splits([e["key"] for e in entries], a.val_fraction, a.test_fraction),
                            strict=True):
            by_part[(domain, split)].append(e)
    rejected.sort(key=lambda r: (r["file"], r["record"], r["reason"]))

    jobs = []
    target = int(a.shard_size_mb * 1e6)
    for domain in sorted(by_domain):
        for split in SPLITS:
            plan = writer.plan_shards(by_part.get((domain, split), []), domain, split, a.seed, target)
            jobs += [(out, shard_name(domain, split, i), members, domain, split) for i, members in enumerate(plan)]

    # From here on shards are rewritten in place: the old manifest would describe files that change.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
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
               "test_fraction": a.test_fraction, "domain": a.domain, "trust_pickle": a.trust_pickle,
               "max_input_mb": a.max_input_mb, "max_file_atoms": a.max_file_atoms,
               "follow_symlinks": a.follow_symlinks, "part": a.part}
    man = writer.manifest(shards, index, options, len(rejected))
    writer.write_json_atomic(out / MANIFEST_NAME, man)
    if not a.keep_work:
        shutil.rmtree(workdir)

    _summary(man, files_per_domain, rejected, out, listing.skipped, listing.links, a.verbose)
    if not shards:
        return EXIT_EMPTY
    if rejected and not a.allow_rejects:
        return EXIT_REJECTS
    return EXIT_OK


def _summary(man: dict, files_per_domain, rejected: list[dict], out: Path, skipped: list[str], links: list[str],
             verbose: bool) -> None:
    rej = Counter(domain_from_path(Path(r["file"])) or "(top level)" for r in rejected)
    names = sorted(set(man["domains"]) | set(rej))
    lines = [f"{'domain':<16}{'files':>7}{'structures':>12}{'atoms':>12}{'rejected':>10}"]
    for d in names:
        info = man["domains"].get(d, {"samples": 0, "atoms": 0})
        lines.append(f"{d:<16}{len(files_per_domain.get(d, ())):>7}{info['samples']:>12}{info['atoms']:>12}{rej.get(d, 0):>10}")
    lines.append(f"{len(man['shards'])} shards in {out}; {len(rejected)} rejected"
                 + (f" (reasons in {out / 'rejected.jsonl'})" if rejected else ""))
    lines.append(f"skipped: {len(skipped)} files of unknown type, {len(links)} symbolic links not followed"
                 + ("" if verbose or not (skipped or links) else " (list them with --verbose)"))
    if verbose:
        lines += [f"  skipped (unknown type): {r}" for r in skipped] + [f"  skipped (symbolic link): {r}" for r in links]
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return convert(a)
    except KeyboardInterrupt:
        raise
    except Exception:  # the CLI boundary: any failure of the converter itself gets its own exit code
        log.exception("the converter failed (exit %d); inputs that merely could not be read are rejected, "
                      "not raised, so this is a bug or an environment problem (disk full, permissions on OUT)",
                      EXIT_CRASH)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
