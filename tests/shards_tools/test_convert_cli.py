"""Converter behaviour: rejections, pickle refusal, determinism, kill-and-rerun, format versions, usage errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.schema import FORMAT_VERSION, SchemaError, decode_sample, make_key
from shards_tools.convert import main
from tests.shards_tools.helpers import read_back, tree_bytes

REPO = Path(__file__).resolve().parents[2]


def _rejected(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]


GOOD_XYZ = "3\nwater\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0\n"


def test_each_rejection_kind_is_reported_and_the_rest_converted(tmp_path, demo_raw):
    raw = tmp_path / "raw"
    sm = raw / "small_molecule"
    sm.mkdir(parents=True)
    (sm / "empty.xyz").write_text("")
    (sm / "truncated.xyz").write_text("5\ncut\nC 0 0 0\nH 1 0 0\n")
    (sm / "nan.xyz").write_text("2\nnan\nC 0 0 0\nO nan 0 1.2\n")
    (sm / "unknown.xyz").write_text("2\nxx\nC 0 0 0\nQq 1.2 0 0\n")
    (sm / "zero.xyz").write_text("0\nnothing\n")
    (sm / "counts.xyz").write_text("abc\nnot a count\n")
    (sm / "mixed.xyz").write_text(GOOD_XYZ + "2\nbad line\nC 0 0\nH 1 0 0\n" + GOOD_XYZ)
    (sm / "garbage.sdf").write_bytes(os.urandom(2000))
    prot = raw / "protein"
    prot.mkdir()
    (prot / "garbage.cif").write_bytes(b"\x00\x01 not a cif at all \xff" * 50)
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", prot)
    (prot / "half.pdb").write_bytes((demo_raw / "protein" / "1i8nA.pdb").read_bytes()[:100] + b"ATOM  garbage")
    out = tmp_path / "out"
    assert main([str(raw), str(out), "--no-progress", "-q"]) == 1
    rej = {(r["file"], r["record"]): r["reason"] for r in _rejected(out)}
    assert "no structures found" in rej[("small_molecule/empty.xyz", -1)]
    assert "truncated" in rej[("small_molecule/truncated.xyz", 0)]
    assert "non-finite or out-of-range coordinates at atom 1" in rej[("small_molecule/nan.xyz", 0)]
    assert "unknown element" in rej[("small_molecule/unknown.xyz", 0)]
    assert rej[("small_molecule/zero.xyz", 0)] == "zero atoms"
    assert "expected an atom count" in rej[("small_molecule/counts.xyz", 0)]
    assert "abc" not in rej[("small_molecule/counts.xyz", 0)]  # the file's bytes are never echoed
    assert "malformed atom line" in rej[("small_molecule/mixed.xyz", 1)]
    assert any(f == "small_molecule/garbage.sdf" for f, _ in rej)
    assert "unreadable cif file" in rej[("protein/garbage.cif", -1)]
    assert any(f == "protein/half.pdb" for f, _ in rej)
    back = read_back(out)
    # everything valid was still converted, including the good records around the bad one
    assert {k for k in back} == {("protein/1i8nA.pdb", 0), ("small_molecule/mixed.xyz", 0), ("small_molecule/mixed.xyz", 2)}
    # --allow-rejects: same output, exit 0
    assert main([str(raw), str(out), "--no-progress", "-q", "--allow-rejects"]) == 0


def test_wrong_counts_and_bond_ranges_are_rejected():
    from shards_tools.structure import Structure, validate

    z, pos = np.array([6, 8]), np.zeros((2, 3))
    assert "wrong counts" in validate(Structure(0, "m", z, np.zeros((3, 3))), None)
    assert "bond index out of range" in validate(Structure(0, "m", z, pos, bonds=np.array([[0, 5]])), None)
    assert "exceed --max-atoms 1" in validate(Structure(0, "m", z, pos), 1)
    assert "unknown element: atomic number 119" in validate(Structure(0, "m", np.array([6, 119]), pos), None)
    assert validate(Structure(0, "m", z, pos, bonds=np.array([[0, 1]]), bond_order=np.array([2])), None) is None


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_without_trust_pickle(tmp_path):
    marker = tmp_path / "pwned"
    raw = tmp_path / "raw" / "protein_chunk_0" / "processed"
    raw.mkdir(parents=True)
    torch.save({"payload": _Evil(str(marker))}, raw / "data.pt")
    out = tmp_path / "out"
    assert main([str(tmp_path / "raw"), str(out), "--no-progress", "-q", "--allow-rejects"]) == 3
    assert not marker.exists(), "the pickle payload ran"
    (r,) = _rejected(out)
    assert "--trust-pickle" in r["reason"] and "refused to unpickle" in r["reason"]
    # with the flag, the file is unpickled (the payload runs: that is what the flag allows)
    shutil.rmtree(out)
    main([str(tmp_path / "raw"), str(out), "--no-progress", "-q", "--trust-pickle", "--allow-rejects"])
    assert marker.exists()


def _subset(tmp_path: Path, demo_raw: Path) -> Path:
    raw = tmp_path / "raw"
    for d, names in {"protein": ["1i8nA.pdb", "1ahsA.pdb", "1dx5I.pdb"], "rna": ["434d.pdb", "1JZC.pdb"],
                     "small_molecule": ["qm9_sample.xyz"], "metabolite": ["metabolites_ccd_hmdb.sdf"]}.items():
        (raw / d).mkdir(parents=True)
        for n in names:
            shutil.copy(demo_raw / d / n, raw / d / n)
    return raw


def test_output_is_byte_identical_across_worker_counts_and_reruns(tmp_path, demo_raw):
    raw = _subset(tmp_path, demo_raw)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([str(raw), str(a), "--no-progress", "-q", "--workers", "1", "--shard-size-mb", "0.3"]) == 0
    assert main([str(raw), str(b), "--no-progress", "-q", "--workers", "2", "--shard-size-mb", "0.3"]) == 0
    ta = tree_bytes(a)
    assert len([p for p in ta if p.endswith(".tar")]) > 4
    assert ta == tree_bytes(b)
    # rerun into the same folder reuses the spools and rewrites identical output
    assert main([str(raw), str(a), "--no-progress", "-q"]) == 0
    assert main([str(raw), str(a), "--no-progress", "-q", "--shard-size-mb", "0.3"]) == 0
    assert tree_bytes(a) == ta
    # a different seed gives a different permutation
    c = tmp_path / "c"
    assert main([str(raw), str(c), "--no-progress", "-q", "--shard-size-mb", "0.3", "--seed", "1"]) == 0
    assert tree_bytes(c)["index/small_molecule.parquet"] != ta["index/small_molecule.parquet"]


def test_killed_conversion_reruns_to_identical_output(tmp_path, demo_raw):
    raw = _subset(tmp_path, demo_raw)
    ref = tmp_path / "ref"
    assert main([str(raw), str(ref), "--no-progress", "-q", "--shard-size-mb", "0.3"]) == 0
    want = tree_bytes(ref)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shards_tools.convert", str(raw), str(out), "--no-progress", "-q", "--shard-size-mb", "0.3"]
    killed_before_manifest = 0
    for delay in (1.5, 2.5, 3.5):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "manifest.json").exists():
            killed_before_manifest += 1
            # an interrupted run leaves no shard that looks complete: no manifest means "not done"
    assert killed_before_manifest >= 1, "no kill landed mid-run; the test did not exercise an interruption"
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(out) == want
    assert not list(out.rglob("*.tmp*"))


def test_reader_refuses_an_unknown_format_version(demo_shards, monkeypatch):
    import tarfile

    from pipeline import schema

    man = json.loads((demo_shards / "manifest.json").read_text())
    with tarfile.open(demo_shards / man["shards"][0]["path"]) as tar:
        s = schema.decode_block(tar.extractfile(tar.next()).read())[0]
    monkeypatch.setattr(schema, "FORMAT_VERSION", 9)
    data = schema.encode_sample(s)
    monkeypatch.setattr(schema, "FORMAT_VERSION", FORMAT_VERSION)
    with pytest.raises(SchemaError, match="format version 9.*re-convert"):
        decode_sample(data)
    with pytest.raises(SchemaError, match="too short"):
        decode_sample(b"\x01")
    # a member of format 1 (one sample per member, a 'sample' metadata entry) is refused with the same advice
    from safetensors.numpy import save

    v1 = save({"z": s.z, "pos": s.pos}, metadata={"sample": json.dumps({"format_version": 1, "key": s.key})})
    with pytest.raises(SchemaError, match="format version 1.*re-convert"):
        schema.decode_block(v1)
    man["format_version"] = 7
    other = demo_shards.parent / "v7"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(man))
    r = subprocess.run([sys.executable, "-m", "shards_tools.inspect", str(other)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "version 7" in r.stderr


def test_keys_are_webdataset_safe_and_stable():
    k = make_key("1abc.A/chain B", "protein/1abc.A.cif#0")
    assert "." not in k and "/" not in k and " " not in k
    assert k == make_key("1abc.A/chain B", "protein/1abc.A.cif#0")
    assert k != make_key("1abc.A/chain B", "protein/1abc.A.cif#1")


def test_usage_errors_and_help_document_exit_codes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "shards_tools.convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "RAW must be an existing folder" in r.stderr
    h = subprocess.run([sys.executable, "-m", "shards_tools.convert", "--help"], cwd=REPO, capture_output=True, text=True)
    assert "exit codes" in h.stdout and "--trust-pickle" in h.stdout


def test_inspect_verify_detects_a_corrupted_shard(tmp_path, demo_raw):
    raw = _subset(tmp_path, demo_raw)
    out = tmp_path / "out"
    assert main([str(raw), str(out), "--no-progress", "-q"]) == 0
    ok = subprocess.run([sys.executable, "-m", "shards_tools.inspect", str(out), "--verify", "--json",
                         "--plot", str(tmp_path / "h.png")], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["verify"]["ok"] and info["domains"]["protein"]["samples"] == 3
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shard = out / json.loads((out / "manifest.json").read_text())["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0x40
    shard.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "shards_tools.inspect", str(out), "--verify"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "sha256" in bad.stdout
