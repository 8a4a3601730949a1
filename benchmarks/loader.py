"""Streaming loader vs the seed-style path on the same structures; prints one JSON line.

Measured in the same run, each phase in its own process (so peak RSS is its own):

- ``ours``: ``pipeline.loader.TrainLoader`` (1 DataLoader worker, local shards, natural mix of the four
  demo domains, packing to ``--max-atoms``, transforms + collation to a PyG ``Batch``);
- ``seed``: the seed's path on the same training structures: ``torch.load`` of ``(data, slices)`` chunks
  (edges stored, as the seed's chunks), PyG ``DynamicBatchSampler(mode='node', max_num=25000)`` and
  ``Batch`` collation; one cold pass (every sample separated afresh) and one warm pass (PyG's cache);
- ``ours_without_transforms``: ours with masking, short- and long-range pairs off (clean batches, as the
  seed-style path makes): what the per-atom work of the pretraining transforms costs;
- ``rss_x10``: our loader's peak RSS when the data is replicated 10x (it must stay flat);
- ``first_10k``: time to the first batch with a synthetic 10 000-shard index.

    python benchmarks/loader.py [--batches 60] [--max-atoms 25000] [--domain protein] [--pt-root /path/to/demo-pt]
    python benchmarks/loader.py --qm9 [--qm9-limit N]     # small molecules only: QM9 from qm9pack
    python benchmarks/loader.py --profile SHARDS [--domain small_molecule]   # per-stage cProfile shares

Without ``--pt-root`` the demo raw data (minus the two RNAs over 25 000 atoms, which the seed's demo
chunks leave out too) is converted and the seed-style chunks are written from those very shards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG_RNA = ("1z58.pdb", "3jbv_A.pdb")
SHUFFLE_BUFFER_BYTES = 1 << 20


class PeakRss:
    """Peak of this process's resident set plus its children's (a loader worker), sampled from /proc (RSS every 10 ms, PSS every 100 ms).

    Not ``getrusage``: on Linux a process's ``ru_maxrss`` survives ``exec``, so a phase started by the driver
    would report the driver's own peak (the seed chunks, the 10x copy) as its floor. Pages a forked worker shares
    with the main process count twice, as summed RSS does; the peak of summed PSS (``Pss`` of
    ``/proc/PID/smaps_rollup``: each shared page split between the processes that map it) is kept beside it."""

    def __init__(self) -> None:
        import threading

        self.pid, self.peak, self.peak_pss = os.getpid(), 0, 0
        threading.Thread(target=self._run, daemon=True).start()  # sampling until the phase's process exits

    @staticmethod
    def _field_kb(pid: int, file: str, field: str) -> int:
        try:
            with open(f"/proc/{pid}/{file}") as f:
                return next(int(ln.split()[1]) for ln in f if ln.startswith(field))
        except (OSError, StopIteration):
            return 0  # exited between listing and reading

    def _children(self) -> list[int]:
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(c) for c in f.read().split()]
        except OSError:
            return []

    def sample(self, pss: bool = True) -> None:
        pids = [self.pid, *self._children()]
        self.peak = max(self.peak, sum(self._field_kb(p, "status", "VmRSS:") for p in pids))
        if pss:
            self.peak_pss = max(self.peak_pss, sum(self._field_kb(p, "smaps_rollup", "Pss:") for p in pids))

    def _run(self) -> None:
        # RSS every 10 ms; PSS every 100 ms: reading smaps_rollup walks the page tables (~0.5 ms for an 800 MB
        # process), and doing that every 10 ms for two processes took ~11 % of a core from the phase it measures
        for i in itertools.count():
            self.sample(pss=i % 10 == 0)
            time.sleep(0.01)

    def mb(self) -> float:
        self.sample()
        return round(self.peak / 1024, 1)

    def pss_mb(self) -> float:
        return round(self.peak_pss / 1024, 1)


# -- phases (each runs in a fresh process) -------------------------------------------------------------
def phase_ours(shards: str, batches: int, max_atoms: int, domain: str | None, transforms: bool = True) -> dict:
    from pipeline.config import DataConfig, DomainConfig
    from pipeline.loader import TrainLoader, resolve

    rss = PeakRss()
    t0 = time.perf_counter()
    # a 1 MiB shuffle buffer per domain: the 1x demo already fills it, so 1x vs 10x compares like with like
    cfg = DataConfig(root=shards, max_atoms=max_atoms, num_workers=1, train_batches_per_epoch=batches,
                     oversize_policy="crop", domains=(DomainConfig(domain),) if domain else (),
                     shuffle_buffer_bytes=SHUFFLE_BUFFER_BYTES,
                     **({} if transforms else {"mask_fraction": 0.0, "sr_fraction": 0.0, "lr_pairs_per_atom": 0.0}))
    loader = TrainLoader(resolve(cfg))
    atoms, n, t1, mols = [], 0, None, 0
    for b in loader:
        if t1 is None:
            t1 = time.perf_counter()
        else:  # throughput excludes the first batch (start-up is reported separately)
            atoms.append(b.num_nodes)
            mols += b.num_graphs
        n += 1
    t2 = time.perf_counter()
    return {"atoms_per_s": round(sum(atoms) / (t2 - t1)), "molecules_per_s": round(mols / (t2 - t1)), "fill": round(sum(atoms) / (len(atoms) * max_atoms), 4),
            "first_batch_s": round(t1 - t0, 3), "batches": n, "peak_rss_MB": rss.mb(), "peak_pss_MB": rss.pss_mb()}


def phase_seed(pt_root: str, max_atoms: int, min_batches: int, domain: str | None) -> dict:
    import torch
    from torch_geometric.data import InMemoryDataset
    from torch_geometric.loader import DataLoader, DynamicBatchSampler

    class Chunk(InMemoryDataset):
        def __init__(self, path):
            super().__init__(None)
            self.data, self.slices = torch.load(path, weights_only=False)

    rss = PeakRss()
    t0 = time.perf_counter()
    chunks = [Chunk(p) for p in sorted(Path(pt_root).glob(f"{domain or '*'}_chunk_*/processed/data.pt"))]
    dataset = torch.utils.data.ConcatDataset(chunks)
    torch.manual_seed(0)  # the seed-style sampler draws from torch's global generator
    sampler = DynamicBatchSampler(dataset, max_num=max_atoms, mode="node", shuffle=True)
    loader = DataLoader(dataset, batch_sampler=sampler)
    out = {}

    def one_pass() -> tuple[int, int, int, float]:
        atoms, n, mols, ts = 0, 0, 0, time.perf_counter()
        for b in loader:
            if "first_batch_s" not in out:
                out["first_batch_s"] = round(time.perf_counter() - t0, 3)
            atoms += b.num_nodes
            mols += b.num_graphs
            n += 1
        return atoms, n, mols, time.perf_counter() - ts

    for mode in ("cold", "warm"):  # cold: PyG's per-sample cache cleared before every pass (data > RAM)
        atoms, batches, mols, secs = 0, 0, 0, 0.0
        while batches < min_batches:
            if mode == "cold":
                for c in chunks:
                    c._data_list = None
            a, n, m, dt = one_pass()
            atoms, batches, mols, secs = atoms + a, batches + n, mols + m, secs + dt
        out[f"atoms_per_s_{mode}"] = round(atoms / secs)
        out[f"molecules_per_s_{mode}"] = round(mols / secs)
        out["fill"] = round(atoms / (batches * max_atoms), 4)
    out["batches_per_pass"] = n
    out["peak_rss_MB"], out["peak_pss_MB"] = rss.mb(), rss.pss_mb()
    return out


def profile_stages(shards: str, batches: int, max_atoms: int, domain: str | None) -> dict:
    """Where one slot's stream spends its time: unprofiled molecules/s, then cProfile shares per stage."""
    import cProfile
    import pstats

    from pipeline.config import DataConfig, DomainConfig
    from pipeline.loader import resolve
    from pipeline.stream import train_stream

    cfg = DataConfig(root=shards, max_atoms=max_atoms, num_workers=0, oversize_policy="crop",
                     domains=(DomainConfig(domain),) if domain else (), shuffle_buffer_bytes=SHUFFLE_BUFFER_BYTES)
    res = resolve(cfg)
    st = train_stream(cfg, res.train, res.sample_probs, res.batch_probs, 0, 1)
    st.next_compact()
    t, mols = time.perf_counter(), 0
    for _ in range(batches):
        mols += st.next_compact()["stats"]["graphs"]
    secs = time.perf_counter() - t
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        st.next_compact()
    prof.disable()
    stats = pstats.Stats(prof).stats

    def cum(module: str, fn: str) -> float:
        return sum(v[3] for k, v in stats.items() if k[0].endswith(module) and k[2] == fn)

    total = cum("stream.py", "next_compact") / 2  # TrainStream.next_compact wraps Collator.next_compact
    share = {name: round(cum(m, f) / total, 3) for name, (m, f) in {
        "read_and_decode": ("read.py", "_fill"), "decode_members": ("read.py", "decode_members"),
        "header_parse_and_views": ("schema.py", "_parse_member"), "gather_batches_and_compaction": ("items.py", "gather"),
        "compaction": ("items.py", "compacted"), "collate": ("collate.py", "collate_block")}.items()}
    share["value_validation"] = round((cum("schema.py", "check_offsets") + cum("schema.py", "sample_faults")) / total, 3)
    share["shuffle_mix_pack"] = round(1 - share["read_and_decode"] - share["collate"] - share["gather_batches_and_compaction"], 3)
    return {"molecules_per_s": round(mols / secs), "us_per_molecule": round(secs / mols * 1e6, 1),
            "cprofile_share": share}


def phase_first(shards: str, max_atoms: int) -> dict:
    from pipeline.config import DataConfig
    from pipeline.loader import TrainLoader, resolve

    t0 = time.perf_counter()
    cfg = DataConfig(root=shards, max_atoms=max_atoms, num_workers=1, train_batches_per_epoch=1)
    next(iter(TrainLoader(resolve(cfg))))
    return {"first_batch_s": round(time.perf_counter() - t0, 3)}


# -- data preparation ----------------------------------------------------------------------------------
def convert(raw: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "shards_tools.convert", str(raw), str(out), "--no-progress", "-q"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def find_qm9_wheel() -> Path | None:
    """The ``qm9pack`` wheel (``pip download qm9pack --no-deps -d /tmp/qm9``) or its installed package folder."""
    for p in sorted(Path("/tmp/qm9").glob("qm9pack-*.whl")):
        return p
    import importlib.util

    spec = importlib.util.find_spec("qm9pack")
    return Path(spec.origin).parent if spec and spec.origin else None


def qm9_raw(src: Path, out: Path, limit: int | None, files: int = 4) -> int:
    """QM9's 3D structures from ``qm9pack``'s CSVs (columns ``Elements``, ``XYZ_Ang``), read directly, written as
    ``files`` multi-record XYZ files under ``out/small_molecule``; returns the number of molecules."""
    import ast
    import csv
    import io
    import zipfile

    def csv_texts():
        if src.is_dir():
            for p in sorted((src / "data").glob("qm9_part*.csv")):
                yield p.read_text()
        else:
            with zipfile.ZipFile(src) as z:
                for name in sorted(n for n in z.namelist() if "/data/qm9_part" in n):
                    yield z.read(name).decode()

    csv.field_size_limit(1 << 24)
    records = []
    for text in csv_texts():
        for row in csv.DictReader(io.StringIO(text)):
            els, xyz = ast.literal_eval(row["Elements"]), ast.literal_eval(row["XYZ_Ang"])
            name = row["XYZ_file"].removesuffix(".xyz")
            lines = [str(len(els)), name] + [f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(els, xyz, strict=True)]
            records.append("\n".join(lines) + "\n")
            if limit is not None and len(records) >= limit:
                break
        if limit is not None and len(records) >= limit:
            break
    (out / "small_molecule").mkdir(parents=True)
    per = -(-len(records) // files)
    for k in range(files):
        (out / "small_molecule" / f"qm9_{k}.xyz").write_text("".join(records[k * per : (k + 1) * per]))
    return len(records)


def seed_chunks_from_shards(shards: Path, out: Path) -> None:
    """The seed's chunk layout (``(data, slices)`` of PyG Data with both-direction edges) of the training samples."""
    import numpy as np
    import torch
    from torch_geometric.data import Data, InMemoryDataset

    from pipeline.config import DataConfig
    from pipeline.loader import resolve
    from pipeline.read import ShardFetcher, decode_run

    res = resolve(DataConfig(root=str(shards), oversize_policy="crop"))
    for ix in res.train:
        f = ShardFetcher(ix)
        data = []
        for run in f.runs(np.arange(len(ix))):  # read_run reads consecutive members of one shard
            for s in decode_run(f.read_run(run), ix, "raise"):
                e = torch.from_numpy(s.edges.astype(np.int64)).T
                ei = torch.cat([e, e.flip(0)], 1)
                pos = torch.from_numpy(s.pos.copy())
                data.append(Data(z=torch.from_numpy(s.z.astype(np.int64)), pos=pos, edge_index=ei,
                                 edge_attr=(pos[ei[0]] - pos[ei[1]]).norm(dim=1, keepdim=True), num_nodes=s.num_atoms))
        f.close()
        d = out / f"{ix.name}_chunk_0" / "processed"
        d.mkdir(parents=True)
        torch.save(InMemoryDataset.collate(data), d / "data.pt")


def replicate(shards: Path, out: Path, times: int) -> None:
    """The same shards ``times`` over (new shard names and keys), for the RSS-vs-size check."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((shards / "manifest.json").read_text())
    (out / "index").mkdir(parents=True)
    for rel in manifest["index"].values():
        t = pq.read_table(shards / rel)
        parts = []
        for r in range(times):
            for shard in set(t["shard"].to_pylist()):
                dst = out / shard.replace(".tar", f"-r{r}.tar")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shards / shard, dst)
            cols = {c: t[c] for c in t.column_names}
            cols["shard"] = pa.array([s.replace(".tar", f"-r{r}.tar") for s in t["shard"].to_pylist()])
            cols["key"] = pa.array([f"{k}_r{r}" for k in t["key"].to_pylist()])
            parts.append(pa.table(cols))
        pq.write_table(pa.concat_tables(parts), out / rel)
    # the manifest lists every copy (the loader checks the index against it)
    manifest["shards"] = [dict(sh, path=sh["path"].replace(".tar", f"-r{r}.tar"))
                          for r in range(times) for sh in manifest["shards"]]
    for d in manifest["domains"].values():
        for entry in (d, *d["splits"].values()):
            entry["samples"] *= times
            entry["atoms"] *= times
    (out / "manifest.json").write_text(json.dumps(manifest))


def many_shards(shards: Path, out: Path, n_shards: int, per_shard: int = 5) -> None:
    """A synthetic root with ``n_shards`` small valid tar shards of small molecules (one domain, one block each)."""
    import dataclasses
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import DataConfig
    from pipeline.loader import resolve
    from pipeline.read import ShardFetcher, decode_run
    from pipeline.schema import encode_block

    res = resolve(DataConfig(root=str(shards), domains=({"name": "small_molecule"},), oversize_policy="crop"))
    ix = res.train[0]
    f = ShardFetcher(ix)
    run = f.runs(np.arange(min(len(ix), 200)))[0]
    pool = decode_run(f.read_run(run), ix, "raise")
    rows = {c: [] for c in ("key", "domain", "split", "shard", "offset", "size", "item", "crc32", "num_atoms",
                            "num_bonds", "num_edges", "source", "record")}
    (out / "small_molecule").mkdir(parents=True)
    k = 0
    for s_i in range(n_shards):
        rel = f"small_molecule/small_molecule-{s_i:06d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            block = []
            for _ in range(per_shard):
                s = pool[k % len(pool)]
                block.append(dataclasses.replace(s, key=f"m{k:08d}", record=k))
                k += 1
            data = encode_block(block)  # the shard's samples in one block member, as the converter writes them
            info = tarfile.TarInfo(f"{block[0].key}.safetensors")
            info.size = len(data)
            start = tar.offset  # a USTAR header with a short name is one 512-byte block
            tar.addfile(info, io.BytesIO(data))
            for item, s in enumerate(block):
                for c, v in (("key", s.key), ("domain", "small_molecule"), ("split", "train"), ("shard", rel),
                             ("offset", start + 512), ("size", len(data)), ("item", item),
                             ("crc32", zlib.crc32(data)), ("num_atoms", s.num_atoms),
                             ("num_bonds", len(s.bonds)), ("num_edges", len(s.edges)), ("source", "synthetic"),
                             ("record", s.record)):
                    rows[c].append(v)
        (out / rel).write_bytes(buf.getvalue())
    (out / "index").mkdir()
    pq.write_table(pa.table(rows), out / "index" / "small_molecule.parquet")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["index"] = {"small_molecule": "index/small_molecule.parquet"}
    manifest["shards"] = [{"path": f"small_molecule/small_molecule-{s_i:06d}.tar", "domain": "small_molecule",
                           "split": "train", "samples": per_shard,
                           "bytes": (out / f"small_molecule/small_molecule-{s_i:06d}.tar").stat().st_size}
                          for s_i in range(n_shards)]
    n = n_shards * per_shard
    manifest["domains"] = {"small_molecule": {"samples": n, "splits": {"train": {"samples": n}}}}
    (out / "manifest.json").write_text(json.dumps(manifest))


def run_phase(*args: str, domain: str | None = None) -> dict:
    extra = ["--domain", domain] if domain else []
    out = subprocess.run([sys.executable, __file__, *extra, "--phase", *args], cwd=REPO, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=60, help="batches our loader streams (default 60)")
    p.add_argument("--max-atoms", type=int, default=25_000)
    p.add_argument("--pt-root", type=Path, default=None, help="seed-style chunks to convert and compare against")
    p.add_argument("--domain", default=None, help="compare on one domain only (default: the natural mix of all)")
    p.add_argument("--qm9", action="store_true",
                   help="small molecules only: the full QM9 from qm9pack (`pip download qm9pack --no-deps -d /tmp/qm9`)")
    p.add_argument("--qm9-limit", type=int, default=None, help="with --qm9: only the first N molecules")
    p.add_argument("--skip-first", action="store_true", help="skip the 10 000-shard first-batch check")
    p.add_argument("--profile", metavar="SHARDS", default=None,
                   help="only profile one slot's stream over SHARDS (honours --domain, --batches); one JSON line")
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        import torch

        torch.set_num_threads(1)  # one core each: torch's OpenMP threads collapse under CPU contention
        name, *rest = a.phase
        fn = {"ours": lambda: phase_ours(rest[0], int(rest[1]), a.max_atoms, a.domain),
              "ours_plain": lambda: phase_ours(rest[0], int(rest[1]), a.max_atoms, a.domain, transforms=False),
              "seed": lambda: phase_seed(rest[0], a.max_atoms, int(rest[1]), a.domain),
              "first": lambda: phase_first(rest[0], a.max_atoms)}[name]
        print(json.dumps(fn()))
        return
    if a.profile:
        import torch

        torch.set_num_threads(1)
        print(json.dumps({"benchmark": "loader_profile", "mix": a.domain or "natural mix of all domains",
                          **profile_stages(a.profile, a.batches, a.max_atoms, a.domain)}))
        return
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        shards, pt = tmp / "shards", tmp / "pt"
        if a.qm9:
            src = find_qm9_wheel()
            if src is None:
                p.error("--qm9 needs qm9pack: `pip download qm9pack --no-deps -d /tmp/qm9` (or pip install qm9pack)")
            a.domain = "small_molecule"
            n_qm9 = qm9_raw(src, tmp / "raw", a.qm9_limit)
            convert(tmp / "raw", shards)
            seed_chunks_from_shards(shards, pt)
        elif a.pt_root is not None:
            convert(a.pt_root, shards)
            pt = a.pt_root
        else:
            raw = tmp / "raw"
            for dom in ("protein", "rna", "small_molecule", "metabolite"):
                shutil.copytree(REPO / "data" / "demo" / "raw" / dom, raw / dom, ignore=shutil.ignore_patterns(*BIG_RNA))
            convert(raw, shards)
            seed_chunks_from_shards(shards, pt)
        replicate(shards, tmp / "x10", 10)
        os.sync()  # the copies' dirty pages written back now, not during the timed phases
        ours = run_phase("ours", str(shards), str(a.batches), domain=a.domain)
        seed = run_phase("seed", str(pt), str(a.batches), domain=a.domain)
        plain = run_phase("ours_plain", str(shards), str(a.batches), domain=a.domain)
        ours_x10 = run_phase("ours", str(tmp / "x10"), str(a.batches), domain=a.domain)
        first = {"first_batch_s": None}
        if not a.skip_first:
            many_shards(shards, tmp / "many", 10_000)
            os.sync()  # the 10,000 new files written back now, not during the timed first batch
            first = run_phase("first", str(tmp / "many"))
    print(json.dumps({
        "benchmark": "loader",
        "max_atoms": a.max_atoms,
        "mix": (f"QM9 ({n_qm9} molecules)" if a.qm9 else a.domain) or "natural mix of all domains",
        "ours_config": {"num_workers": 1, "shuffle_buffer_bytes": SHUFFLE_BUFFER_BYTES, "transforms": "all (MLM, sr, lr)"},
        "ours": ours,
        "seed": seed,
        "ratio_vs_seed_cold": round(ours["atoms_per_s"] / seed["atoms_per_s_cold"], 2),
        "ratio_vs_seed_warm": round(ours["atoms_per_s"] / seed["atoms_per_s_warm"], 2),
        # the seed-style path collates clean molecules; ours also masks, noises, rebuilds and draws the task pairs
        "ours_without_transforms": plain,
        "plain_ratio_vs_seed_cold": round(plain["atoms_per_s"] / seed["atoms_per_s_cold"], 2),
        "plain_ratio_vs_seed_warm": round(plain["atoms_per_s"] / seed["atoms_per_s_warm"], 2),
        "rss_x10_ratio": round(ours_x10["peak_rss_MB"] / ours["peak_rss_MB"], 3),
        "rss_vs_seed": round(ours["peak_rss_MB"] / seed["peak_rss_MB"], 3),
        "pss_x10_ratio": round(ours_x10["peak_pss_MB"] / ours["peak_pss_MB"], 3),
        "pss_vs_seed": round(ours["peak_pss_MB"] / seed["peak_pss_MB"], 3),
        "ours_x10": ours_x10,
        "first_batch_10k_shards_s": first["first_batch_s"],
        "targets": {"ratio": ">= 3 (mixed); small molecules >= 10 cold, >= 5 warm", "rss_vs_seed": "<= 1", "fill": ">= 0.97", "rss_x10_ratio": "<= 1.1", "first_batch_10k_shards_s": "<= 2"},
    }))


if __name__ == "__main__":
    main()
