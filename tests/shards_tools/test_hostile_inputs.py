"""Issue 12, converter: hostile or broken inputs never kill a conversion, never leak file bytes into
reports, and cost bounded memory. Every bad input is crafted here from the vendored demo data."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tracemalloc
import warnings
from pathlib import Path

import biotite.structure as struc
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import numpy as np
import pytest
from rdkit import Chem

from shards_tools import convert, readers
from shards_tools.convert import EXIT_CRASH, main
from tests.shards_tools.helpers import read_back, xyz_records

ARGS = ["--no-progress", "-q"]


def _rejected(out: Path) -> dict[tuple[str, int], str]:
    return {(r["file"], r["record"]): r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


def _pdb_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _restart_serials(lines: list[str], at: int) -> list[str]:
    out, n = [], 0
    for ln in lines:
        if ln.startswith(("ATOM", "HETATM")):
            n += 1
            if n > at:
                ln = ln[:6] + f"{n - at:5d}" + ln[11:]
        out.append(ln)
    return out


def test_per_file_failures_are_rejection_lines_and_the_run_goes_on(tmp_path, demo_raw):
    raw = tmp_path / "raw"
    (raw / "protein").mkdir(parents=True)
    (raw / "small_molecule").mkdir()
    # serials that restart (as in any PDB file over 99,999 atoms), with CONECT records addressing them
    src = demo_raw / "protein" / "6msm.pdb"
    (raw / "protein" / "restart.pdb").write_text("\n".join(_restart_serials(_pdb_lines(src), 300)) + "\n")
    # an mmCIF without atom_site
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atoms = pdb.get_structure(pdb.PDBFile.read(str(demo_raw / "protein" / "1i8nA.pdb")), model=1, include_bonds=True)
    cif = pdbx.CIFFile()
    pdbx.set_structure(cif, atoms)
    del cif.block["atom_site"]
    cif.write(str(raw / "protein" / "no_atom_site.cif"))
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", raw / "protein")
    (raw / "small_molecule" / "huge.xyz").write_text("2\nbig\nC 0 0 0\nO 1e39 0 1.2\n" + "2\nok\nC 0 0 0\nO 0 0 1.2\n")
    out = tmp_path / "out"
    assert main([str(raw), str(out), *ARGS]) == 1
    rej = _rejected(out)
    assert "no atom_site category" in rej[("protein/no_atom_site.cif", -1)]
    assert "out-of-range coordinates at atom 1" in rej[("small_molecule/huge.xyz", 0)]
    back = read_back(out)
    assert set(back) == {("protein/1i8nA.pdb", 0), ("protein/restart.pdb", 0), ("small_molecule/huge.xyz", 1)}
    # the restarted-serial file is converted, its bonds from the residue templates (CONECT is ambiguous)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pdb.get_structure(pdb.PDBFile.read(str(src)), model=1, include_bonds=False)
    s = back[("protein/restart.pdb", 0)]
    np.testing.assert_array_equal(s.pos, ref.coord.astype(np.float32))
    want = {tuple(sorted(p)) for p in struc.connect_via_residue_names(ref).as_array()[:, :2].tolist()}
    assert {tuple(p) for p in s.bonds.tolist()} == want


def test_reader_errors_reject_one_file_but_a_converter_bug_has_its_own_exit_code(tmp_path, demo_raw, monkeypatch):
    from biotite import InvalidFileError

    raw = tmp_path / "raw" / "protein"
    raw.mkdir(parents=True)
    for n in ("1i8nA.pdb", "1ahsA.pdb"):
        shutil.copy(demo_raw / "protein" / n, raw)
    real = readers.read_pdbx

    def flaky(data, fmt, mol_id, cap):
        if mol_id == "1ahsA":
            raise InvalidFileError("Atom IDs are not strictly increasing")
        return real(data, fmt, mol_id, cap)

    monkeypatch.setattr(readers, "read_pdbx", flaky)
    out = tmp_path / "out"
    assert main([str(tmp_path / "raw"), str(out), *ARGS]) == 1
    assert "InvalidFileError: Atom IDs are not strictly increasing" in _rejected(out)[("protein/1ahsA.pdb", -1)]
    assert (out / "manifest.json").exists()

    def buggy(*a):
        raise NameError("a bug in the converter")

    monkeypatch.setattr(readers, "read_pdbx", buggy)
    assert main([str(tmp_path / "raw"), str(out), *ARGS]) == EXIT_CRASH
    monkeypatch.setattr(readers, "read_pdbx", real)

    def disk_full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.writer, "write_shard", disk_full)
    assert main([str(tmp_path / "raw"), str(out), *ARGS]) == EXIT_CRASH
    # shards were about to be rewritten: the previous manifest must not describe them any more
    assert not (out / "manifest.json").exists()


def _with_element(lines: list[str], old: str, new: str) -> list[str]:
    return [ln[:76] + new.rjust(2) + ln[78:] if ln.startswith(("ATOM", "HETATM")) and ln[76:78].strip() == old else ln
            for ln in lines]


def test_deuterium_and_tritium_are_hydrogen(tmp_path, demo_raw):
    raw = tmp_path / "raw"
    (raw / "rna").mkdir(parents=True)
    (raw / "small_molecule").mkdir()
    lines = _pdb_lines(demo_raw / "rna" / "1JZC.pdb")
    (raw / "rna" / "h.pdb").write_text("\n".join(lines) + "\n")
    (raw / "rna" / "d.pdb").write_text("\n".join(_with_element(lines, "H", "D")) + "\n")
    water = "3\n{}\nO 0.0 0.0 0.0\n{} 0.96 0.0 0.0\n{} -0.24 0.93 0.0\n"
    (raw / "small_molecule" / "w.xyz").write_text(water.format("h2o", "H", "H") + water.format("d2o", "D", "T"))
    out = tmp_path / "out"
    assert main([str(raw), str(out), *ARGS]) == 0
    back = read_back(out)
    h, d = back[("rna/h.pdb", 0)], back[("rna/d.pdb", 0)]
    assert (h.z == 1).sum() == 143
    for name in ("z", "pos", "bonds", "bond_order", "edges"):
        np.testing.assert_array_equal(getattr(d, name), getattr(h, name), err_msg=name)
    w_h, w_d = back[("small_molecule/w.xyz", 0)], back[("small_molecule/w.xyz", 1)]
    np.testing.assert_array_equal(w_d.z, [8, 1, 1])
    np.testing.assert_array_equal(w_d.bonds, w_h.bonds)


def test_xyz_count_line_disagreeing_with_its_atom_lines_rejects_that_record(tmp_path, demo_raw):
    recs = xyz_records(demo_raw / "small_molecule" / "qm9_sample.xyz")[:6]
    text, declared = [], {}
    for k, (comment, symbols, coords) in enumerate(recs):
        n = len(symbols) + {1: -2, 3: +2}.get(k, 0)  # record 1 claims 2 too few, record 3 two too many
        declared[k] = n
        text.append(f"{n}\n{comment}\n" + "".join(f"{s} {x:.6f} {y:.6f} {z:.6f}\n" for s, (x, y, z) in zip(symbols, coords, strict=True)))
    raw = tmp_path / "raw" / "small_molecule"
    raw.mkdir(parents=True)
    (raw / "m.xyz").write_text("".join(text))
    out = tmp_path / "out"
    assert main([str(tmp_path / "raw"), str(out), *ARGS]) == 1
    rej = _rejected(out)
    assert set(rej) == {("small_molecule/m.xyz", 1), ("small_molecule/m.xyz", 3)}
    n1 = len(recs[1][1])
    assert "count mismatch: record at line" in rej[("small_molecule/m.xyz", 1)]
    assert f"declares {n1 - 2} atoms, {n1} atom lines follow" in rej[("small_molecule/m.xyz", 1)]
    back = read_back(out)
    for k in (0, 2, 4, 5):  # the neighbours are intact: every atom where it belongs
        s = back[("small_molecule/m.xyz", k)]
        assert s.num_atoms == len(recs[k][1])
        np.testing.assert_allclose(s.pos, recs[k][2], atol=1e-5)


def _gz_bomb(path: Path, inflated_mb: int) -> None:
    line = b"ATOM      1  CA  ALA A   1      11.104  13.207   2.100  1.00  0.00           C\n"
    block = line * (1 << 14)
    with gzip.open(path, "wb", compresslevel=9) as f:
        for _ in range(inflated_mb * 10**6 // len(block) + 1):
            f.write(block)


def test_decompression_bomb_is_refused_with_bounded_memory(tmp_path):
    bomb = tmp_path / "raw" / "protein" / "bomb.pdb.gz"
    bomb.parent.mkdir(parents=True)
    _gz_bomb(bomb, 60)
    assert bomb.stat().st_size < 1e6
    tracemalloc.start()
    with pytest.raises(readers.InputRejected, match="larger than 4 MB after decompression"):
        readers.read_capped(bomb, 4 * 10**6)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16e6, f"reading the capped bomb peaked at {peak / 1e6:.0f} MB (it inflates to 60 MB)"
    out = tmp_path / "out"
    assert main([str(tmp_path / "raw"), str(out), *ARGS, "--max-input-mb", "4"]) == 3
    assert "--max-input-mb" in _rejected(out)[("protein/bomb.pdb.gz", -1)]


def test_atom_count_and_record_size_caps(tmp_path, demo_raw):
    raw = tmp_path / "raw"
    (raw / "protein").mkdir(parents=True)
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", raw / "protein")
    shutil.copy(demo_raw / "protein" / "1ahsA.pdb", raw / "protein")
    out = tmp_path / "out"
    assert main([str(raw), str(out), *ARGS, "--max-file-atoms", "800"]) == 1
    rej = _rejected(out)
    assert set(rej) == {("protein/1ahsA.pdb", -1)}
    assert rej[("protein/1ahsA.pdb", -1)] == "947 atom records, more than --max-file-atoms 800; not parsed"
    assert {f for f, _ in read_back(out)} == {"protein/1i8nA.pdb"}  # 710 atoms: under the cap
    # exactly the SDF records over 4 kB are refused, every other one converted
    raw2 = tmp_path / "raw2" / "metabolite"
    raw2.mkdir(parents=True)
    sdf = demo_raw / "metabolite" / "metabolites_ccd_hmdb.sdf"
    shutil.copy(sdf, raw2)
    out2 = tmp_path / "out2"
    assert main([str(raw2.parent), str(out2), *ARGS, "--max-input-mb", "0.004"]) == 1
    rej = _rejected(out2)
    sizes = [len(r) + 5 for r in sdf.read_bytes().split(b"$$$$\n")[:-1]]
    big = {k for k, n in enumerate(sizes) if n > 4000}
    assert 0 < len(big) < 300
    assert {k for (_, k) in rej} == big
    assert all("larger than 0.004 MB" in r for r in rej.values())
    assert {k for (_, k) in read_back(out2)} == set(range(300)) - big


def test_byte_identical_inputs_are_converted_once(tmp_path, demo_raw):
    raw = tmp_path / "raw"
    (raw / "protein").mkdir(parents=True)
    (raw / "rna").mkdir()
    src = demo_raw / "protein" / "1i8nA.pdb"
    shutil.copy(src, raw / "protein" / "1i8nA.pdb")
    shutil.copy(src, raw / "protein" / "copy.pdb")
    shutil.copy(src, raw / "rna" / "1i8nA.pdb")  # across domains (and so across splits) too
    data = bytearray(src.read_bytes())
    data[-200] = ord("9") if data[-200] != ord("9") else ord("8")  # same size, one byte differs: not a duplicate
    (raw / "protein" / "near.pdb").write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main([str(raw), str(out), *ARGS]) == 1
    rej = _rejected(out)
    assert set(rej) == {("protein/copy.pdb", -1), ("rna/1i8nA.pdb", -1)}
    assert all("byte-identical to protein/1i8nA.pdb" in r for r in rej.values())
    assert {f for f, _ in read_back(out)} == {"protein/1i8nA.pdb", "protein/near.pdb"}


def test_unreadable_folder_is_a_rejection_and_a_nonzero_exit(tmp_path, demo_raw, monkeypatch):
    raw = tmp_path / "raw"
    (raw / "protein" / "locked").mkdir(parents=True)
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", raw / "protein")
    shutil.copy(demo_raw / "protein" / "1ahsA.pdb", raw / "protein" / "locked")
    real = os.scandir

    def scandir(path="."):  # tests run as root, whom chmod does not stop: the kernel's answer is simulated
        if isinstance(path, str | os.PathLike) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert main([str(raw), str(out), *ARGS]) == 1
    reason = _rejected(out)[("protein/locked", -1)]
    assert "cannot list this folder (PermissionError: Permission denied)" in reason
    assert {f for f, _ in read_back(out)} == {"protein/1i8nA.pdb"}


SECRET = "Zq7SECRETxK9-credentials-do-not-leak-4711"


def _secret_files(where: Path) -> None:
    """Garbage files whose bytes hold SECRET exactly where parsers quote what they choke on."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "count.xyz").write_text(f"{SECRET}\ncomment\n")
    (where / "coord.xyz").write_text(f"2\nm\nC 0 0 0\nO {SECRET} 0 1\n")
    (where / "sym.xyz").write_text(f"1\nm\n{SECRET} 0 0 0\n")
    (where / "block.sdf").write_text(f"{SECRET}\n  RDKit\n\n{SECRET}\nM  END\n$$$$\n")
    (where / "text.cif").write_text(f"data_{SECRET}\nloop_\n_atom_site.{SECRET}\n{SECRET} {SECRET}\n")
    (where / "text.pdb").write_text(f"ATOM  {SECRET}\nCONECT{SECRET}\n")
    (where / "text.bcif").write_text(SECRET * 3 + "bcif")  # (each file distinct: copies are dropped first)
    (where / "data.pt").write_text(SECRET * 3 + "pt")
    (where / "notgz.pdb.gz").write_text(SECRET * 3 + "pdb")  # gzip quotes the first bytes it rejects
    (where / "notgz.sdf.gz").write_text(SECRET * 3 + "sdf")


def test_symlinks_leaving_raw_are_not_followed_and_no_report_quotes_file_bytes(tmp_path, demo_raw):
    outside = tmp_path / "outside"
    _secret_files(outside)
    shutil.copy(demo_raw / "protein" / "1ahsA.pdb", outside / "good.pdb")
    raw = tmp_path / "raw" / "small_molecule"
    raw.mkdir(parents=True)
    for f in sorted(outside.iterdir()):
        (raw / f"link_{f.name}").symlink_to(f)
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", raw / "real.pdb")
    (raw / "inside.pdb").symlink_to(raw / "real.pdb")
    out = tmp_path / "out"
    r = main([str(tmp_path / "raw"), str(out), *ARGS])
    assert r == 1
    rej = _rejected(out)
    links = {f for f, _ in rej}
    assert links == {f"small_molecule/link_{f.name}" for f in outside.iterdir()}
    assert all("outside RAW: not followed" in v for v in rej.values())
    assert {f for f, _ in read_back(out)} == {"small_molecule/real.pdb"}  # inside link: its target counts once
    # followed on request: every secret file is parsed and refused, none of its bytes in any report
    out2 = tmp_path / "out2"
    assert main([str(tmp_path / "raw"), str(out2), *ARGS, "--follow-symlinks"]) == 1
    text = (out2 / "rejected.jsonl").read_text()
    rej2 = _rejected(out2)
    assert {f for f, _ in rej2} >= {f"small_molecule/link_{f.name}" for f in outside.iterdir() if f.name != "good.pdb"}
    assert not any("byte-identical" in r for (f, _), r in rej2.items() if "/link_" in f)  # each really parsed
    assert ("small_molecule/link_good.pdb", 0) in read_back(out2)
    for piece in (SECRET, SECRET[:12], SECRET[12:24], "credentials", f"b'{SECRET[:2]}"):
        assert piece not in text, f"{piece!r} leaked into rejected.jsonl:\n{text}"


def test_describe_error_hides_what_the_file_holds():
    data = f"x y {SECRET} z".encode()
    e = ValueError(f"could not convert string to float: '{SECRET}' near {SECRET[:10]}")
    msg = readers.describe_error(e, data)
    assert SECRET not in msg and SECRET[:10] not in msg
    assert msg.startswith("ValueError: could not convert string to float: '…'")


def test_unknown_extensions_are_counted_and_listed_with_verbose(tmp_path, demo_raw, capsys):
    raw = tmp_path / "raw" / "protein"
    raw.mkdir(parents=True)
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", raw)
    (raw / "x.pdb1").write_text("x")
    (raw / "y.cif.bz2").write_text("y")
    out = tmp_path / "out"
    assert main([str(tmp_path / "raw"), str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "skipped: 2 files of unknown type" in text and "x.pdb1" not in text
    assert main([str(tmp_path / "raw"), str(out), "--no-progress", "--verbose"]) == 0
    text = capsys.readouterr().out
    assert "skipped (unknown type): protein/x.pdb1" in text and "skipped (unknown type): protein/y.cif.bz2" in text


def test_sdf_d_symbol_is_hydrogen_too():
    mol = Chem.MolFromMolBlock("\n  t\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n"
                               "    0.0000    0.0000    0.0000 C   0  0\n    1.0900    0.0000    0.0000 D   0  0\n"
                               "  1  2  1  0\nM  END\n", sanitize=False, removeHs=False)
    assert [a.GetAtomicNum() for a in mol.GetAtoms()] == [6, 1]


def test_an_output_folder_inside_raw_is_not_read_as_input(tmp_path, demo_raw, capsys):
    raw = tmp_path / "raw" / "protein"
    raw.mkdir(parents=True)
    shutil.copy(demo_raw / "protein" / "1i8nA.pdb", raw)
    out = tmp_path / "raw" / "shards"
    for _ in range(2):
        assert main([str(tmp_path / "raw"), str(out), "--no-progress", "--keep-work"]) == 0
        assert "skipped: 0 files of unknown type" in capsys.readouterr().out


def test_writer_validates_every_block_it_writes(tmp_path):
    """A spooled sample that breaks the schema (a parser bug) stops the writer naming it, instead of landing in a
    shard that the loader would then reject; valid spools give blocks equal to the samples."""
    import numpy as np

    from pipeline.schema import Sample, SchemaError, decode_block, encode_sample
    from shards_tools.writer import write_shard

    def sample(k, z):
        return Sample(key=f"m{k}", domain="small_molecule", z=np.array(z, np.uint8),
                      pos=np.arange(3 * len(z), dtype=np.float32).reshape(-1, 3), bonds=np.zeros((0, 2), np.int32),
                      bond_order=np.zeros(0, np.uint8), edges=np.array([[0, 1]], np.int32), source="x.xyz", record=k,
                      radius_A=5.0, max_neighbors=32)

    def spool(samples, name):
        path, entries, off = tmp_path / name, [], 0
        with open(path, "wb") as f:
            for s in samples:
                data = encode_sample(s)
                f.write(data)
                entries.append({"spool": str(path), "spool_offset": off, "size": len(data), "key": s.key,
                                "num_atoms": s.num_atoms, "num_bonds": 0, "num_edges": 1, "source": s.source,
                                "record": s.record})
                off += len(data)
        return entries

    good = [sample(k, [6, 1, 1]) for k in range(5)]
    info, rows = write_shard(tmp_path / "out", "small_molecule/a.tar", spool(good, "a.spool"), "small_molecule", "train")
    assert [r["item"] for r in rows] == list(range(5)) and len({r["offset"] for r in rows}) == 1
    with open(tmp_path / "out" / "small_molecule" / "a.tar", "rb") as f:
        f.seek(rows[0]["offset"])
        assert [s.key for s in decode_block(f.read(rows[0]["size"]))] == [s.key for s in good]
    bad = [*good[:2], sample(9, [6, 0, 1]), *good[2:]]
    with pytest.raises(SchemaError, match=r"sample 'm9' \(record 9 of 'x.xyz'\) breaks the shard schema: atomic number 0"):
        write_shard(tmp_path / "out", "small_molecule/b.tar", spool(bad, "b.spool"), "small_molecule", "train")
    assert not (tmp_path / "out" / "small_molecule" / "b.tar").exists()
