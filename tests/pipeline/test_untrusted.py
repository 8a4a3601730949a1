"""Shards and indexes are untrusted (issue 12): crafted bad members and index rows, made from the demo shards."""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.index import load_domain_index
from pipeline.loader import TrainLoader, eval_loader, resolve
from pipeline.schema import SchemaError, decode_block, decode_block_arrays, encode_block
from shards_tools.inspect import main as inspect_main
from tests.pipeline.helpers import config

DOMAIN = "metabolite"


def _member_arrays(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return 8 + n, {k: v for k, v in header.items() if k != "__metadata__"}


ROW_BYTES = {"z": 1, "pos": 12, "bonds": 8, "bond_order": 1, "edges": 8}
PTR = {"z": "atom_ptr", "pos": "atom_ptr", "bonds": "bond_ptr", "bond_order": "bond_ptr", "edges": "edge_ptr"}


def patch_member(root, domain: str, row: int, array: str, element: int, raw: bytes) -> str:
    """Overwrite bytes of one array of the sample on index row ``row`` (inside its block member) in place, then fix
    the index's crc32 (every row of the block) and the manifest's sha256, so that only the schema validation can
    catch the damage. Returns the sample's key."""
    ix = load_domain_index(str(root), domain, "train")
    shard, off, size = ix.shard_urls[int(ix.shard_of(row))], int(ix.offset_of(row)), int(ix.size_of(row))
    with open(shard, "r+b") as f:
        f.seek(off)
        data = bytearray(f.read(size))
        base, arrays = _member_arrays(bytes(data))
        block, _, _ = decode_block_arrays(bytes(data))
        assert len(block["atom_ptr"]) > 3, "the damaged sample should share its block with others"
        first = int(block[PTR[array]][int(ix.item[row])]) * ROW_BYTES[array]  # the sample's first row in the array
        lo = base + arrays[array]["data_offsets"][0] + first + element
        data[lo : lo + len(raw)] = raw
        f.seek(off)
        f.write(data)
    rel = f"index/{domain}.parquet"
    t = pq.read_table(root / rel)
    crc = t["crc32"].to_numpy().copy()
    shard_col, off_col = t["shard"].to_pylist(), t["offset"].to_numpy()
    for r in range(t.num_rows):
        if shard.endswith(shard_col[r]) and off_col[r] == off:
            crc[r] = zlib.crc32(bytes(data))
    pq.write_table(t.set_column(t.column_names.index("crc32"), "crc32", pa.array(crc, pa.int64())), root / rel)
    man = json.loads((root / "manifest.json").read_text())
    for sh in man["shards"]:
        if shard.endswith(sh["path"]):
            sh["sha256"] = hashlib.sha256((root / sh["path"]).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(man))
    return ix.keys[row]


CORRUPTIONS = {  # name: (array, byte offset inside it, bytes written, message)
    "nan_pos": ("pos", 4, np.float32(np.nan).tobytes(), "not all finite"),
    "inf_pos": ("pos", 0, np.float32(np.inf).tobytes(), "not all finite"),
    "z_0": ("z", 1, b"\x00", "atomic number 0"),
    "z_200": ("z", 0, b"\xc8", "atomic number 200"),
    "bond_out_of_range": ("bonds", 4, np.int32(10_000).tobytes(), "bonds index 10000"),
    "edge_out_of_range": ("edges", 0, np.int32(500).tobytes(), "edges index 500"),
    "edge_negative": ("edges", 0, np.int32(-1).tobytes(), "edges index -1"),
}


@pytest.fixture(scope="module")
def corrupted(small_shards, tmp_path_factory):
    """One copy per corruption kind, the damage in train row 3 of the metabolite domain."""
    out = {}
    for name, (array, at, raw, _) in CORRUPTIONS.items():
        root = tmp_path_factory.mktemp(name) / "root"
        shutil.copytree(small_shards, root)
        out[name] = (root, patch_member(root, DOMAIN, 3, array, at, raw))
    return out


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_values_raise_naming_sample_and_reason(corrupted, kind):
    root, key = corrupted[kind]
    cfg = config(root, weights={DOMAIN: 1.0}, max_atoms=3000, train_batches_per_epoch=4)
    with pytest.raises(SchemaError, match=rf"{key}.*{CORRUPTIONS[kind][3]}"):
        list(TrainLoader(resolve(cfg)))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_values_skipped_and_counted_once_over_many_passes(corrupted, kind):
    root, key = corrupted[kind]
    cfg = config(root, weights={DOMAIN: 1.0}, max_atoms=3000, train_batches_per_epoch=12, bad_sample_policy="skip")
    loader = TrainLoader(resolve(cfg))
    seen = [k for b in loader for k in b["keys"]]
    st = loader.stats()[DOMAIN]
    assert st["pass"] >= 2  # the bad sample was met in several passes ...
    assert key not in seen and st["bad"] == 1  # ... and counts once: samples, not read attempts, nor its block
    assert len(set(seen)) == len(load_domain_index(str(root), DOMAIN, "train")) - 1


def test_inspect_verify_decodes_and_validates_every_sample(corrupted, capsys):
    root, key = corrupted["bond_out_of_range"]  # bond-only damage: the radius graph is intact
    assert inspect_main([str(root), "--verify"]) != 0
    out = capsys.readouterr().out
    assert "FAILED" in out and key in out and "bonds index 10000" in out


def _block_arrays(small_shards) -> dict:
    """The arrays of the first train block of the metabolite domain (several samples)."""
    ix = load_domain_index(str(small_shards), DOMAIN, "train")
    with open(ix.shard_urls[0], "rb") as f:
        f.seek(int(ix.member_offset[0]))
        arrays, n, faults = decode_block_arrays(f.read(int(ix.member_size[0])))
    assert n > 3 and not faults
    return {k: v.copy() for k, v in arrays.items()}


def _member(arrays: dict) -> bytes:
    from safetensors.numpy import save

    return save(arrays, metadata={"block": "{}"})


def _decode(data: bytes) -> dict:
    """decode_block_arrays, raising the first sample fault as the loader's decode_run reports it."""
    arrays, _, faults = decode_block_arrays(data)
    if faults:
        raise SchemaError(next(iter(faults.values())))
    return arrays


def test_dtypes_must_be_exactly_the_schema(small_shards):
    a = _block_arrays(small_shards)
    _decode(_member(a))  # the real block is fine
    wide = dict(a, z=np.full(len(a["z"]), 500, np.int64))  # int64 500 would wrap to 244 as uint8
    with pytest.raises(SchemaError, match="'z' has dtype int64, the schema says uint8"):
        _decode(_member(wide))
    with pytest.raises(SchemaError, match="'pos' has dtype float64"):
        _decode(_member(dict(a, pos=a["pos"].astype(np.float64))))
    with pytest.raises(SchemaError, match="'bonds' has shape"):
        _decode(_member(dict(a, bonds=a["bonds"][:, :1].copy())))
    with pytest.raises(SchemaError, match="'bond_order' has shape"):
        _decode(_member(dict(a, bond_order=a["bond_order"][:-1].copy())))
    with pytest.raises(SchemaError, match="unknown array 'extra'"):
        _decode(_member(dict(a, extra=np.zeros(3, np.uint8))))
    with pytest.raises(SchemaError, match="i < j"):
        _decode(_member(dict(a, edges=a["edges"][:, ::-1].copy())))
    with pytest.raises(SchemaError, match="'edge_ptr' has shape"):  # offsets of another number of samples
        _decode(_member(dict(a, edge_ptr=a["edge_ptr"][:-1].copy())))
    with pytest.raises(SchemaError, match="'atom_ptr' has dtype int64"):
        _decode(_member(dict(a, atom_ptr=a["atom_ptr"].astype(np.int64))))
    with pytest.raises(SchemaError, match=r"arrays \['bond_ptr'\] are missing"):
        _decode(_member({k: v for k, v in a.items() if k != "bond_ptr"}))


def _ptr(a: dict, name: str, edit) -> dict:
    p = a[name].copy()
    edit(p)
    return dict(a, **{name: p})


@pytest.mark.parametrize("name, edit, message", [
    ("atom_ptr", lambda p: p.__setitem__(0, 1), "atom_ptr .* must start at 0"),
    ("atom_ptr", lambda p: p.__setitem__(-1, p[-1] + 1), r"atom_ptr .* end at N="),
    ("atom_ptr", lambda p: p.__setitem__(2, p[1]), "atom_ptr .* rise"),  # a sample of no atoms
    ("atom_ptr", lambda p: p.__setitem__(2, p[3] + 1), "atom_ptr .* rise"),  # falls: negative-length sample
    ("bond_ptr", lambda p: p.__setitem__(1, -5), "bond_ptr .* never fall"),
    ("edge_ptr", lambda p: p.__setitem__(-1, 2**31 - 1), r"edge_ptr .* end at E="),
])
def test_block_offsets_must_partition_the_arrays(small_shards, name, edit, message):
    with pytest.raises(SchemaError, match=message):
        decode_block_arrays(_member(_ptr(_block_arrays(small_shards), name, edit)))


def test_indices_are_local_to_their_sample(small_shards):
    """A bond index valid for the block (< N) but past its own sample's atoms is refused, naming that sample."""
    a = _block_arrays(small_shards)
    k = int(np.flatnonzero(np.diff(a["bond_ptr"]) > 0)[1])  # a sample with bonds, not the first
    b = a["bonds"].copy()
    n_k = int(a["atom_ptr"][k + 1] - a["atom_ptr"][k])
    b[int(a["bond_ptr"][k]), 1] = n_k  # one past its own last atom, but inside the block
    assert n_k < len(a["z"])
    _, _, faults = decode_block_arrays(_member(dict(a, bonds=b)))
    assert list(faults) == [k] and f"bonds index {n_k} outside 0..{n_k - 1}" in faults[k]


def _with_header(data: bytes, edit) -> bytes:
    base, arrays = _member_arrays(data)
    header = json.loads(data[8:base])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data[base:]


def test_array_offsets_must_be_inside_and_not_overlap(small_shards):
    data = _member(_block_arrays(small_shards))

    def overlap(h):  # bond_order's bytes moved onto the start of another array of the same size
        lo, hi = h["bond_order"]["data_offsets"]
        other = min((v["data_offsets"][0] for k, v in h.items() if k not in ("__metadata__", "bond_order")))
        h["bond_order"]["data_offsets"] = [other, other + hi - lo]

    def negative(h):
        lo, hi = h["z"]["data_offsets"]
        h["z"]["data_offsets"] = [lo - 10**6, hi - 10**6]

    def outside(h):
        lo, hi = h["z"]["data_offsets"]
        h["z"]["data_offsets"] = [lo + 10**6, hi + 10**6]

    def short(h):  # a byte range one byte smaller than the shape needs
        lo, hi = h["z"]["data_offsets"]
        h["z"]["data_offsets"] = [lo, hi - 1]

    def float_width(h):  # [N, 3.0]: equal to 3, but not an integer
        h["pos"]["shape"] = [h["pos"]["shape"][0], 3.0]

    with pytest.raises(SchemaError, match="overlapping"):
        _decode(_with_header(data, overlap))
    for edit in (negative, outside):
        with pytest.raises(SchemaError, match="byte range"):
            _decode(_with_header(data, edit))
    with pytest.raises(SchemaError, match="'z' has .* bytes for shape"):
        _decode(_with_header(data, short))
    with pytest.raises(SchemaError, match="'pos' has shape"):
        _decode(_with_header(data, float_width))


# -- the index ------------------------------------------------------------------------------------------
def tampered(small_shards, tmp_path, edit_table=None, edit_manifest=None):
    root = tmp_path / "root"
    shutil.copytree(small_shards, root)
    rel = root / "index" / f"{DOMAIN}.parquet"
    if edit_table is not None:
        t = pq.read_table(rel)
        cols = {c: t[c].to_pylist() for c in t.column_names}
        edit_table(cols)
        pq.write_table(pa.table(cols, schema=t.schema), rel)
    if edit_manifest is not None:
        man = json.loads((root / "manifest.json").read_text())
        edit_manifest(man)
        (root / "manifest.json").write_text(json.dumps(man))
    return root


def _set(col, row, value):
    def edit(cols):
        cols[col][row] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("shard", 2, "/dev/zero"), r"row 2 .*'/dev/zero' is not a relative path"),
    (_set("shard", 2, "../outside.tar"), r"row 2 .*'../outside.tar' is not a relative path"),
    (_set("shard", 2, "metabolite/unlisted-000000.tar"), r"row 2 .*not a 'metabolite' shard listed in the manifest"),
    (_set("shard", 2, "small_molecule/small_molecule-000000.tar"), r"row 2 .*not a 'metabolite' shard listed"),
    (_set("offset", 2, -512), r"row 2 .*offset -512 is negative"),
    (_set("size", 2, 10**12), r"row 2 .*size 1000000000000 is past the end of shard"),
    (_set("num_atoms", 2, 0), r"row 2 .*num_atoms 0"),
    (_set("split", 2, "val"), r"row 2 .*split 'val' but its shard"),
    (_set("offset", 2, None), r"row 2 .*offset is null"),
    (_set("key", 2, "k" * 257), r"row 2 .*key of 257 bytes \(a key has 1\.\.256\)"),
    (_set("key", 2, ""), r"row 2 .*key of 0 bytes"),
    (_set("crc32", 2, 1 << 32), r"row 2 .*crc32 4294967296 is not a 32-bit checksum"),
    (_set("crc32", 2, -1), r"row 2 .*crc32 -1 is not a 32-bit checksum"),
])
def test_bad_index_rows_rejected_at_load_naming_the_row(small_shards, tmp_path, edit, message):
    root = tampered(small_shards, tmp_path, edit)
    with pytest.raises(SchemaError, match=message):
        resolve(config(root, oversize_policy="crop"))


def _blocks_of_first_shard(cols) -> list[list[int]]:
    """Row numbers of each block member of the index's first shard, in block order, rows by item."""
    by_off: dict[int, list[int]] = {}
    for i, (sh, off) in enumerate(zip(cols["shard"], cols["offset"], strict=True)):
        if sh == cols["shard"][0]:
            by_off.setdefault(off, []).append(i)
    return [sorted(rows, key=lambda i: cols["item"][i]) for _, rows in sorted(by_off.items())]


def _move_rows(edit_rows):
    def edit(cols):
        blocks = _blocks_of_first_shard(cols)
        assert len(blocks) >= 2 and all(len(b) >= 3 for b in blocks[:2])
        edit_rows(cols, *blocks[:2])
    return edit


def _into(cols, row, block_row, item):  # row now claims to be sample ``item`` of another block
    for c in ("offset", "size", "crc32"):
        cols[c][row] = cols[c][block_row]
    cols["item"][row] = item


@pytest.mark.parametrize("edit, message", [
    # one row of the second block points 8 bytes into the first: members overlap
    (_move_rows(lambda c, a, b: c["offset"].__setitem__(b[0], c["offset"][a[0]] + 8)), "overlap another row's member"),
    # the second block's rows moved onto the first's offset, keeping their own size: one member, two sizes
    (_move_rows(lambda c, a, b: [c["offset"].__setitem__(r, c["offset"][a[0]]) for r in b]),
     "differs from another row of the block"),
    (_move_rows(lambda c, a, b: c["item"].__setitem__(a[1], 0)), "must number its samples 0, 1, 2"),
    (_move_rows(lambda c, a, b: c["item"].__setitem__(a[0], 1)), "must number its samples 0, 1, 2"),
    (_move_rows(lambda c, a, b: c["item"].__setitem__(a[1], 5000)), r"item 5000 outside 0\.\.1023"),
])
def test_block_rows_must_describe_one_member_each(small_shards, tmp_path, edit, message):
    with pytest.raises(SchemaError, match=message):
        resolve(config(tampered(small_shards, tmp_path, edit), oversize_policy="crop"))


def test_index_claiming_more_samples_than_a_block_holds_is_caught_on_read(small_shards, tmp_path):
    """The last row of the second block re-pointed as an extra sample of the first: the index is consistent on its
    own (numbering 0..S), only the block's offsets show it holds S samples; the reader refuses the row."""
    moved = []

    def edit(cols):
        blocks = _blocks_of_first_shard(cols)
        a, b = blocks[0], blocks[1]
        _into(cols, b[-1], a[0], len(a))
        moved.append(cols["key"][b[-1]])
    root = tampered(small_shards, tmp_path, edit)
    cfg = config(root, weights={DOMAIN: 1.0}, max_atoms=3000, train_batches_per_epoch=4)
    with pytest.raises(SchemaError, match=r"item \d+ of a block of \d+ samples; the index does not match the shard"):
        list(TrainLoader(resolve(cfg)))
    loader = TrainLoader(resolve(config(root, weights={DOMAIN: 1.0}, max_atoms=3000, train_batches_per_epoch=8,
                                        bad_sample_policy="skip")))
    seen = {k for batch in loader for k in batch["keys"]}
    assert moved[0] not in seen and loader.stats()[DOMAIN]["bad"] >= 1


def test_index_without_the_item_column_is_refused(small_shards, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(small_shards, root)
    rel = root / "index" / f"{DOMAIN}.parquet"
    t = pq.read_table(rel)
    pq.write_table(t.drop_columns(["item"]), rel)
    with pytest.raises(SchemaError, match=r"lacks the columns \['item'\]; re-convert"):
        resolve(config(root, oversize_policy="crop"))


def test_duplicate_keys_across_splits_rejected(small_shards, tmp_path):
    def edit(cols):
        train = cols["split"].index("train")
        val = cols["split"].index("val")
        cols["key"][val] = cols["key"][train]
        rows.extend(sorted([train, val]))
    rows: list[int] = []
    root = tampered(small_shards, tmp_path, edit)
    with pytest.raises(SchemaError, match=rf"row {rows[1]} \(key '[^']+'\): key '[^']+' is also on row {rows[0]} "
                                          r"\(duplicate keys"):
        resolve(config(root, oversize_policy="crop"))


@pytest.mark.parametrize("col", ["num_atoms", "num_edges"])
def test_index_counts_past_int32_rejected(small_shards, tmp_path, col):
    """Another writer's index may type the counts int64: a count the loader's int32 arrays cannot hold is refused,
    naming the row, not wrapped around."""
    root = tmp_path / "root"
    shutil.copytree(small_shards, root)
    rel = root / "index" / f"{DOMAIN}.parquet"
    t = pq.read_table(rel)
    cols = {c: t[c].to_pylist() for c in t.column_names}
    cols[col][2] = 2**31
    schema = t.schema.set(t.schema.get_field_index(col), pa.field(col, pa.int64()))
    pq.write_table(pa.table(cols, schema=schema), rel)
    with pytest.raises(SchemaError, match=rf"row 2 .*{col} 2147483648 is not in .*\.\.2147483647"):
        resolve(config(root, oversize_policy="crop"))


def test_index_rows_match_the_parquet_rows(small_shards):
    """What the loader holds once per block member (shard, byte range, crc32) gives back, for every sample, its
    own Parquet row; members are numbered in row order and each member's rows number its samples 0, 1, 2, ..."""
    t = pq.read_table(small_shards / "index" / f"{DOMAIN}.parquet")
    by_key = {r["key"]: r for r in t.to_pylist()}
    seen = 0
    for split in ("train", "val", "test"):
        ix = load_domain_index(str(small_shards), DOMAIN, split)
        assert len(ix.member_offset) < len(ix) or split != "train"  # blocks hold several samples
        assert (np.diff(ix.member) >= 0).all() and (np.diff(ix.member) <= 1).all() and ix.member[0] == 0
        for i, key in enumerate(ix.keys):
            r = by_key[key]
            assert r["split"] == split
            assert ix.shard_urls[int(ix.shard_of(i))].endswith("/" + r["shard"])
            got = (int(ix.offset_of(i)), int(ix.size_of(i)), int(ix.crc32_of(i)), int(ix.item[i]),
                   int(ix.num_atoms[i]), int(ix.num_edges[i]))
            assert got == (r["offset"], r["size"], r["crc32"], r["item"], r["num_atoms"], r["num_edges"]), key
            seen += 1
    assert seen == t.num_rows


def test_index_read_the_same_whatever_its_parquet_layout(small_shards, tmp_path):
    """Row groups with different shard/split dictionaries, or plain string columns, or rows in another order
    (an index from another writer) give the same sample ids, keys and arrays as the converter's own index."""
    def arrays(root):
        ixs = [load_domain_index(str(root), DOMAIN, split) for split in ("train", "val", "test")]
        return [(ix.keys.tolist(), [u.rsplit("/", 2)[-2:] for u in ix.shard_urls], ix.shard_of(slice(None)).tolist(),
                 ix.offset_of(slice(None)).tolist(), ix.size_of(slice(None)).tolist(), ix.num_atoms.tolist(),
                 ix.crc32_of(slice(None)).tolist(), ix.member.tolist(), ix.item.tolist()) for ix in ixs]

    want = arrays(small_shards)
    assert len(want[0][0]) > 10 and len(want[1][0]) > 0
    rel = "index/" + DOMAIN + ".parquet"
    t = pq.read_table(small_shards / rel)
    perm = np.random.default_rng(0).permutation(t.num_rows)
    for k, write in enumerate((
        lambda path: pq.write_table(t, path, row_group_size=7),  # each row group its own dictionary
        lambda path: pq.write_table(t.take(pa.array(perm)), path, row_group_size=5),
        lambda path: pq.write_table(t, path, use_dictionary=False, store_schema=False),
    )):
        root = tmp_path / f"r{k}"
        shutil.copytree(small_shards, root)
        write(root / rel)
        assert pq.ParquetFile(root / rel).metadata.num_row_groups == (1 if k == 2 else -(-t.num_rows // (7 - 2 * (k == 1))))
        assert arrays(root) == want, f"layout {k}"


def test_missing_rows_rejected(small_shards, tmp_path):
    def edit(cols):
        for c in cols.values():
            del c[5]
    with pytest.raises(SchemaError, match=r"has \d+ rows but the manifest lists \d+ samples of 'metabolite'"):
        resolve(config(tampered(small_shards, tmp_path, edit), oversize_policy="crop"))

    def shift(man):  # same total, but one shard's rows do not match its manifest entry
        shards = [sh for sh in man["shards"] if sh["domain"] == DOMAIN]
        shards[0]["samples"] += 1
        shards[1]["samples"] -= 1
    root = tampered(small_shards, tmp_path / "b", edit_manifest=shift)
    with pytest.raises(SchemaError, match=r"rows for shard .* the manifest says"):
        resolve(config(root, oversize_policy="crop"))


def test_row_count_checked_before_materialising(small_shards, tmp_path, monkeypatch):
    """Many more rows than the manifest lists (a small file can claim millions): refused from the footer."""
    root = tmp_path / "root"
    shutil.copytree(small_shards, root)
    rel = root / "index" / f"{DOMAIN}.parquet"
    t = pq.read_table(rel)
    pq.write_table(pa.concat_tables([t] * 400), rel, compression="zstd")
    assert rel.stat().st_size < 2 * 1024 * 1024

    def refuse(*a, **k):
        raise AssertionError("the index was materialised before its row count was checked")

    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    with pytest.raises(SchemaError, match=rf"has {400 * t.num_rows} rows but the manifest lists {t.num_rows}"):
        resolve(config(root, oversize_policy="crop"))


def test_manifest_shard_paths_must_be_relative_and_sized(small_shards, tmp_path):
    def absolute(man):
        man["shards"][0]["path"] = "/etc/passwd"
    with pytest.raises(SchemaError, match="'/etc/passwd' is not a relative path"):
        resolve(config(tampered(small_shards, tmp_path, edit_manifest=absolute), oversize_policy="crop"))

    def many(man):
        sh = next(sh for sh in man["shards"] if sh["domain"] == DOMAIN)
        sh["samples"] = 20_000_000
    with pytest.raises(SchemaError, match="20000000 samples cannot fit"):
        resolve(config(tampered(small_shards, tmp_path / "b", edit_manifest=many), oversize_policy="crop"))


# -- budgets ---------------------------------------------------------------------------------------------
def test_max_edges_below_every_molecule_with_skip_is_the_max_atoms_error(small_shards):
    def err(**kw):
        with pytest.raises(ValueError) as e:
            resolve(config(small_shards, weights={DOMAIN: 1.0}, oversize_policy="skip", **kw))
        return str(e.value)

    by_atoms = err(max_atoms=1)
    by_edges = err(max_atoms=25_000, max_edges=1)
    assert "no training samples" in by_atoms and by_edges == by_atoms


@pytest.mark.timeout(120)
def test_packer_never_loops_when_nothing_fits(small_shards):
    """Past resolve()'s check (a stream built directly): the packer raises instead of skipping forever."""
    from pipeline.packer import OversizeError
    from pipeline.stream import train_stream

    res = resolve(config(small_shards, weights={DOMAIN: 1.0}, oversize_policy="skip"))
    cfg = config(small_shards, weights={DOMAIN: 1.0}, oversize_policy="skip", max_edges=1)
    st = train_stream(cfg, res.train, res.sample_probs, res.batch_probs, 0, 1)
    with pytest.raises(OversizeError, match="nothing fits the budget"):
        st.next_rows()


def test_max_edges_with_crop_applies_to_eval(small_shards):
    cfg = config(small_shards, max_atoms=4000, max_edges=3000, oversize_policy="crop")
    res = resolve(cfg)
    assert any((2 * ix.num_edges > 3000).any() for ix in res.val)  # some val samples need an edge crop
    expected = sorted(k for ix in res.val for k in ix.keys.tolist())
    batches = list(eval_loader(res, "val"))
    assert sorted(k for b in batches for k in b["keys"]) == expected
    for b in batches:
        assert b.num_nodes <= 4000
        assert b.stats["edges"] <= 3000


def test_block_roundtrip_is_byte_identical(small_shards):
    """decode_block then encode_block gives the member's bytes back (the writer and the reader agree on the
    schema, metadata included), and every sample sits at its index row's item with the row's counts."""
    ix = load_domain_index(str(small_shards), DOMAIN, "train")
    rows = np.flatnonzero(ix.member == 0)
    assert ix.member_shard[0] == 0 and (ix.offset_of(rows) == ix.member_offset[0]).all()
    with open(ix.shard_urls[0], "rb") as f:
        f.seek(int(ix.member_offset[0]))
        data = f.read(int(ix.member_size[0]))
    samples = decode_block(data)
    assert encode_block(samples) == data
    assert [s.key for s in samples] == ix.keys.take(rows) and ix.item[rows].tolist() == list(range(len(rows)))
    assert [s.num_atoms for s in samples] == ix.num_atoms[rows].tolist()
    with pytest.raises(ValueError, match="does not share block fields"):
        encode_block([samples[0], type(samples[0])(**{**vars(samples[1]), "radius_A": 9.0})])


def test_block_validation_rejects_exactly_the_bad_samples(small_shards):
    """One block, two damaged samples: sample_faults names those two; the loader's decode_run under 'skip'
    returns every other sample of the block, and under 'raise' names the first bad one."""
    from pipeline.read import decode_run

    ix = load_domain_index(str(small_shards), DOMAIN, "train")
    rows = np.flatnonzero(ix.member == 0)
    with open(ix.shard_urls[0], "rb") as f:
        f.seek(int(ix.member_offset[0]))
        samples = decode_block(f.read(int(ix.member_size[0])))
    samples[1].z[0] = 0
    samples[3].pos[-1, 2] = np.nan
    data = encode_block(samples)
    _, n, faults = decode_block_arrays(data)
    assert n == len(rows) and list(faults) == [1, 3]
    assert "atomic number 0" in faults[1] and "not all finite" in faults[3]
    ix.member_crc32[0] = zlib.crc32(data)
    got = decode_run([(rows, data)], ix, "skip")
    assert [g is None for g in got] == [k in (1, 3) for k in range(len(rows))]
    assert [g.key for g in got if g is not None] == [s.key for k, s in enumerate(samples) if k not in (1, 3)]
    with pytest.raises(SchemaError, match=rf"{samples[1].key}: atomic number 0"):
        decode_run([(rows, data)], ix, "raise")
    got = decode_run([(rows[4:], data)], ix, "raise")  # a read of part of the block sees only its own samples
    assert [g.key for g in got] == [s.key for s in samples[4:]]
