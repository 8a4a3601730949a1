"""Converter throughput, figure and baseline measured in the same run; prints one JSON line.

Default: the vendored demo data with 1 and 2 workers (median of --repeats runs, each into a fresh folder).

``--qm9``: QM9 molecules (from the PyPI package ``qm9pack``: ``pip download qm9pack --no-deps -d /tmp/qm9``
gives a wheel whose CSVs hold all 130,831 molecules with coordinates) written as ONE multi-record XYZ file,
converted three ways: 1 worker (structures/s per core from CPU time), 2 workers with one task per file
(``--records-per-task`` larger than the file: the per-file parallelism of before, the baseline) and 2
workers with record ranges (the default). ``--qm9-limit`` takes the first N molecules (0: all).

    python benchmarks/convert.py [--raw data/demo/raw] [--repeats 3]
    python benchmarks/convert.py --qm9 [--qm9-source /tmp/qm9/qm9pack-1.0.3-py3-none-any.whl] [--qm9-limit 20000]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_BARE_DOT = re.compile(r"(\d)\.(?=[,\]])")
QM9_CSVS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def run_once(raw: Path, workers: int, extra: tuple[str, ...] = ()) -> tuple[float, float, int]:
    """(wall s, CPU s of the converter and its workers, structures converted)."""
    with tempfile.TemporaryDirectory() as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "shards_tools.convert", str(raw), tmp, "--workers", str(workers),
                        "--no-progress", "-q", *extra], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        n = json.loads((Path(tmp) / "manifest.json").read_text())
        return dt, cpu, sum(d["samples"] for d in n["domains"].values())


def _qm9_csv_streams(source: Path | None):
    if source is None:
        spec = importlib.util.find_spec("qm9pack")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("--qm9 needs the qm9pack data: `pip download qm9pack --no-deps -d /tmp/qm9`, then "
                             "--qm9-source /tmp/qm9/qm9pack-1.0.3-py3-none-any.whl (or pip install qm9pack)")
        source = Path(next(iter(spec.submodule_search_locations))) / "data"
    if source.is_file():
        z = zipfile.ZipFile(source)
        for name in QM9_CSVS:
            yield io.TextIOWrapper(z.open(f"qm9pack/data/{name}"), encoding="utf-8")
    else:
        for name in QM9_CSVS:
            yield open(source / name, encoding="utf-8")  # noqa: SIM115 - consumed and closed by the caller


def write_qm9_xyz(source: Path | None, limit: int, path: Path) -> tuple[int, int]:
    """QM9 molecules as one multi-record XYZ file; returns (molecules, atoms)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = atoms = 0
    with open(path, "w") as out:
        for f in _qm9_csv_streams(source):
            with f:
                for row in csv.DictReader(f):
                    symbols = json.loads(row["Elements"].replace("'", '"'))
                    coords = json.loads(_BARE_DOT.sub(r"\1.0", row["XYZ_Ang"]))  # "1." is not JSON
                    out.write(f"{len(symbols)}\n{row['XYZ_file'].removesuffix('.xyz')}\n")
                    out.writelines(f"{s} {x!r} {y!r} {z!r}\n" for s, (x, y, z) in zip(symbols, coords, strict=True))
                    n += 1
                    atoms += len(symbols)
                    if limit and n >= limit:
                        return n, atoms
    return n, atoms


def bench_qm9(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        n_mol, n_atoms = write_qm9_xyz(a.qm9_source, a.qm9_limit, raw / "small_molecule" / "qm9.xyz")
        out = {"benchmark": "convert_qm9", "molecules": n_mol, "atoms": n_atoms, "files": 1,
               "input_MB": round((raw / "small_molecule" / "qm9.xyz").stat().st_size / 1e6, 1),
               "note": "wall incl. process start; CPU = converter + workers (user + sys)"}
        runs = {"workers1": (1, ()), "workers2_per_file_baseline": (2, ("--records-per-task", str(10**9))),
                "workers2_record_ranges": (2, ())}
        for name, (w, extra) in runs.items():
            dt, cpu, n = run_once(raw, w, extra)
            out[name] = {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "structures": n,
                         "structures_per_s": round(n / dt, 1), "structures_per_cpu_s": round(n / cpu, 1)}
        out["per_core_structures_per_s"] = out["workers1"]["structures_per_cpu_s"]
        out["speedup_ranges_vs_per_file_2_workers"] = round(
            out["workers2_per_file_baseline"]["seconds"] / out["workers2_record_ranges"]["seconds"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, default=REPO / "data" / "demo" / "raw")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--qm9", action="store_true", help="benchmark on QM9 as one multi-record XYZ (needs qm9pack data)")
    p.add_argument("--qm9-source", type=Path, default=None, help="qm9pack wheel or its data/ folder (default: installed)")
    p.add_argument("--qm9-limit", type=int, default=20000, help="first N molecules (0: all 130,831; default 20000)")
    a = p.parse_args()
    if a.qm9:
        sys.stdout.write(json.dumps(bench_qm9(a)) + "\n")
        return
    mb = sum(f.stat().st_size for f in a.raw.rglob("*") if f.is_file()) / 1e6
    out = {"benchmark": "convert", "input": str(a.raw), "input_MB": round(mb, 2), "note": "wall time incl. process start"}
    times = {1: [], 2: []}
    cpus = {1: [], 2: []}
    n = 0
    for _ in range(a.repeats):
        for w in (1, 2):  # interleaved so machine noise hits both alike
            dt, cpu, n = run_once(a.raw, w)
            times[w].append(dt)
            cpus[w].append(cpu)
    for w, ts in times.items():
        med = statistics.median(ts)
        out[f"workers{w}"] = {"seconds": round(med, 3), "structures_per_s": round(n / med, 1), "MB_per_s": round(mb / med, 2),
                              "cpu_seconds": round(statistics.median(cpus[w]), 2)}
    out["structures"] = n
    out["speedup_2_vs_1"] = round(statistics.median(times[1]) / statistics.median(times[2]), 3)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
