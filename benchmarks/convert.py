"""Converter throughput on the vendored demo data with 1 and 2 workers, measured in the same run.

Prints one JSON line: structures/s and input MB/s per worker count (median of --repeats runs, each into a
fresh folder so nothing is reused), plus the 2-worker/1-worker speed-up.

    python benchmarks/convert.py [--raw data/demo/raw] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(raw: Path, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "shards_tools.convert", str(raw), tmp, "--workers", str(workers),
                        "--no-progress", "-q"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        n = json.loads((Path(tmp) / "manifest.json").read_text())
        return dt, sum(d["samples"] for d in n["domains"].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--raw", type=Path, default=REPO / "data" / "demo" / "raw")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    mb = sum(f.stat().st_size for f in a.raw.rglob("*") if f.is_file()) / 1e6
    out = {"benchmark": "convert", "input": str(a.raw), "input_MB": round(mb, 2), "note": "wall time incl. process start"}
    times = {1: [], 2: []}
    n = 0
    for _ in range(a.repeats):
        for w in (1, 2):  # interleaved so machine noise hits both alike
            dt, n = run_once(a.raw, w)
            times[w].append(dt)
    for w, ts in times.items():
        med = statistics.median(ts)
        out[f"workers{w}"] = {"seconds": round(med, 3), "structures_per_s": round(n / med, 1), "MB_per_s": round(mb / med, 2)}
    out["structures"] = n
    out["speedup_2_vs_1"] = round(statistics.median(times[1]) / statistics.median(times[2]), 3)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
