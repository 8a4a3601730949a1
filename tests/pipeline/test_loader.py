"""The streaming loader on the real demo shards: determinism, passes, mixing, budgets, policies, eval."""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.index import load_domain_index
from pipeline.loader import TrainLoader, eval_loader, resolve
from pipeline.packer import OversizeError
from pipeline.schema import SchemaError, decode_block
from pipeline.stream import train_stream
from pipeline.strict_config import build
from tests.pipeline.helpers import config


def keys_of(batches):
    return [tuple(b["keys"]) for b in batches]


def take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_same_seed_same_batches_other_seed_other_batches(small_shards):
    cfg = config(small_shards, train_batches_per_epoch=6, max_atoms=10_000)
    a = keys_of(TrainLoader(resolve(cfg)))
    b = keys_of(TrainLoader(resolve(cfg)))
    c = keys_of(TrainLoader(resolve(config(small_shards, train_batches_per_epoch=6, max_atoms=10_000, seed=1))))
    assert a == b and len(a) == 6
    assert a != c


def test_batches_are_identical_tensors_across_runs(small_shards):
    cfg = config(small_shards, train_batches_per_epoch=2, max_atoms=10_000)
    x, y = list(TrainLoader(resolve(cfg))), list(TrainLoader(resolve(cfg)))
    for bx, by in zip(x, y, strict=True):
        for name in ("z", "pos", "edge_index", "edge_is_bond", "mlm_mask", "sr_index", "lr_index", "domain"):
            assert np.array_equal(bx[name].numpy(), by[name].numpy()), name


def test_each_pass_visits_every_sample_once_across_slots(small_shards):
    """Four slots (2 ranks x 2 workers) of one domain, streams built directly: pass 0 and 1 are exact."""
    cfg = config(small_shards, weights={"protein": 1.0}, max_atoms=25_000)
    res = resolve(cfg)
    ix = res.train[0]
    seen = {}
    for slot in range(4):
        st = train_stream(cfg, res.train, res.sample_probs, res.batch_probs, slot, 4)
        while min(p for p in st.passes() if p is not None) < 20:
            rows = st.next_rows()
            for p, i in zip(rows.pass_.tolist(), rows.idx.tolist(), strict=True):
                seen.setdefault((p, i), []).append(slot)
    for p in (0, 1):
        got = sorted(i for (q, i) in seen if q == p)
        assert got == list(range(len(ix))), f"pass {p} incomplete or duplicated"
    assert all(len(v) == 1 for v in seen.values())  # no sample twice within a pass


def realised_shares(cfg, n_batches):
    res = resolve(cfg)
    st = train_stream(cfg, res.train, res.sample_probs, res.batch_probs, 0, 1)
    atoms = np.zeros(len(res.names))
    graphs = np.zeros(len(res.names))
    fills = []
    for _ in range(n_batches):
        rows = st.next_rows()
        np.add.at(atoms, rows.d, rows.atoms)
        np.add.at(graphs, rows.d, 1)
        total = int(rows.atoms.sum())
        fills.append(total / cfg.max_atoms)
        assert total <= cfg.max_atoms
    return res.names, atoms / atoms.sum(), graphs / graphs.sum(), np.array(fills)


TARGET = {"protein": 0.4, "rna": 0.1, "small_molecule": 0.25, "metabolite": 0.25}


@pytest.mark.parametrize("mix_by", ["atoms", "samples"])
def test_shares_within_two_percent_over_1000_batches(demo_shards, mix_by):
    cfg = config(demo_shards, weights=TARGET, mix_by=mix_by, oversize_policy="crop")
    names, by_atoms, by_samples, fills = realised_shares(cfg, 1000)
    realised = by_atoms if mix_by == "atoms" else by_samples
    for name, share in zip(names, realised, strict=True):
        assert abs(share - TARGET[name]) <= 0.02, (mix_by, name, share)
    assert fills.mean() >= 0.97


def test_budgets_hold_in_collated_batches(small_shards):
    cfg = config(small_shards, max_atoms=6000, max_graphs=40, max_edges=60_000, train_batches_per_epoch=15,
                 oversize_policy="crop")
    for b in TrainLoader(resolve(cfg)):
        assert b.num_nodes <= 6000 and b.num_graphs <= 40
        assert b.edge_index.shape[1] + 2 * b.sr_index.shape[1] <= 60_000
        assert b.stats["atoms"] == b.num_nodes and b.stats["graphs"] == b.num_graphs
        # the batch contract: edges inside molecules, both directions, masks and pairs consistent
        g = b.batch.numpy()
        ei = b.edge_index.numpy()
        assert np.array_equal(g[ei[0]], g[ei[1]]) and (ei[0] != ei[1]).all()
        lr = b.lr_index.numpy()
        assert np.array_equal(g[lr[0]], g[lr[1]]) and (lr[0] != lr[1]).all()
        assert b.mlm_mask.sum() >= 1


def test_fixed_batch_size_mode(small_shards):
    cfg = config(small_shards, batch_size=32, weights={"small_molecule": 1.0}, train_batches_per_epoch=5)
    batches = list(TrainLoader(resolve(cfg)))
    assert [b.num_graphs for b in batches] == [32] * 5


def test_homogeneous_batches_hold_one_domain(small_shards):
    cfg = config(small_shards, cross_domain_batches=False, max_atoms=10_000, train_batches_per_epoch=30,
                 weights={"protein": 0.5, "metabolite": 0.5}, mix_by="atoms")
    seen = set()
    for b in TrainLoader(resolve(cfg)):
        doms = set(b.domain.tolist())
        assert len(doms) == 1
        seen |= doms
    assert len(seen) == 2


def test_oversize_raise_names_the_sample_and_the_fix(demo_shards):
    with pytest.raises(OversizeError, match=r"1z58.*oversize_policy"):
        resolve(config(demo_shards, oversize_policy="raise"))


@pytest.mark.parametrize("policy", ["skip", "crop"])
def test_oversize_skip_and_crop_are_counted(demo_shards, policy):
    cfg = config(demo_shards, weights={"rna": 1.0}, oversize_policy=policy, train_batches_per_epoch=12)
    loader = TrainLoader(resolve(cfg))
    keys = set()
    for b in loader:
        assert b.num_nodes <= 25_000
        keys |= set(b["keys"])
    rna = loader.stats()["rna"]
    big = {k for k in keys if k.startswith(("1z58", "3jbv"))}
    if policy == "skip":
        assert rna["oversize_skipped"] >= 2 and rna["oversize_cropped"] == 0 and not big
    else:
        assert rna["oversize_cropped"] >= 2 and rna["oversize_skipped"] == 0 and len(big) == 2


def corrupt_copy(src, dst, domain):
    shutil.copytree(src, dst)
    ix = load_domain_index(str(dst), domain, "train")
    with open(ix.shard_urls[0], "r+b") as f:  # smash the safetensors header of the first member
        f.seek(int(ix.member_offset[0]))
        f.write(b"\xff" * 16)
    return ix.keys[0]


def test_bad_sample_raises_or_is_counted(small_shards, tmp_path):
    root = tmp_path / "bad"
    key = corrupt_copy(small_shards, root, "metabolite")
    cfg = config(root, weights={"metabolite": 1.0}, max_atoms=3000, train_batches_per_epoch=4)
    with pytest.raises(SchemaError, match=key):
        list(TrainLoader(resolve(cfg)))
    cfg = config(root, weights={"metabolite": 1.0}, max_atoms=3000, train_batches_per_epoch=4,
                 bad_sample_policy="skip")
    loader = TrainLoader(resolve(cfg))
    seen = {k for b in loader for k in b["keys"]}
    assert key not in seen and loader.stats()["metabolite"]["bad"] >= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_is_exact_and_ranks_step_equally(small_shards, world):
    cfg = config(small_shards, max_atoms=2000, num_workers=2, oversize_policy="crop")
    res = resolve(cfg)
    expected = sorted(k for ix in res.val for k in ix.keys.tolist())
    got, lengths = [], []
    for rank in range(world):
        loader = eval_loader(res, "val", rank, world)
        batches = list(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        got += [k for b in batches for k in b["keys"]]
        assert all(b.num_nodes <= 2000 for b in batches)
    assert sorted(got) == expected
    assert len(set(lengths)) == 1
    again = [k for b in eval_loader(res, "val", 0, world) for k in b["keys"]]
    assert again == [k for b in eval_loader(res, "val", 0, world) for k in b["keys"]]


def test_config_errors_name_the_field_and_fix(small_shards):
    with pytest.raises(ValueError, match="did you mean 'data.max_atoms'"):
        build(DataConfig, {"max_atom": 10}, "data")
    with pytest.raises(ValueError, match="oversize_policy"):
        DataConfig(oversize_policy="drop")
    with pytest.raises(ValueError, match=r"'peptide' is not in the shards root.*data.domains"):
        resolve(config(small_shards, weights={"peptide": 1.0}))
    with pytest.raises(ValueError, match="re-convert with --radius"):
        resolve(config(small_shards, radius_A=8.0))
    cfg = build(DataConfig, {"root": "x", "domains": [{"name": "protein", "weight": 0.7},
                                                      {"name": "rna", "weight": 0.3, "root": "y"}]}, "data")
    assert cfg.domains[1].root == "y" and cfg.domains[0].weight == 0.7


def test_read_run_refuses_ids_that_are_not_one_shards_consecutive_members(small_shards):
    """read_run reads one byte range of one shard: ids across shards came back as None (silently), ids with a gap
    would read bytes nobody asked for; both are refused, naming the ids and shards."""
    import dataclasses

    from pipeline.read import ShardFetcher

    ix = next(i for i in resolve(config(small_shards)).train if len(i) >= 10)
    f = ShardFetcher(ix)
    try:
        for ids in (np.arange(5), np.arange(3, len(ix))):  # from a block's start, or from inside one
            members = f.read_run(ids)
            assert np.array_equal(np.concatenate([m for m, _ in members]), ids)
            for m, data in members:  # each whole block member, once, holding the samples at their items
                assert data is not None and len(data) == ix.size_of(m[0]) and (ix.member[m] == ix.member[m[0]]).all()
                assert zlib.crc32(data) == ix.crc32_of(m[0])
                assert [s.key for s in decode_block(data)[int(ix.item[m[0]]):][: len(m)]] == ix.keys.take(m)
        with pytest.raises(ValueError, match=r"consecutive members of one shard .* ids 0\.\.4 \(3 ids\)"):
            f.read_run(np.array([0, 2, 4]))
        m0 = int(ix.member[0])  # rows 0..2 in a member of shard 0, the rest in one of shard 1
        two = dataclasses.replace(ix, member=np.where(np.arange(len(ix)) < 3, 0, 1).astype(np.int32),
                                  member_shard=np.array([0, 1], np.int32), shard_urls=ix.shard_urls * 2,
                                  member_offset=ix.member_offset[[m0, m0]], member_size=ix.member_size[[m0, m0]],
                                  member_crc32=ix.member_crc32[[m0, m0]])
        with pytest.raises(ValueError, match=r"in shards 0\.\.1"):
            ShardFetcher(two).read_run(np.arange(5))
        assert [len(r) for r in ShardFetcher(two).runs(np.arange(5))] == [3, 2]
    finally:
        f.close()


def test_sample_nbytes_equals_the_decoded_arrays_bytes(small_shards):
    """The writer's block sizing per sample is what its arrays hold (every domain: optional arrays too)."""
    from pipeline.read import ShardFetcher, decode_run
    from pipeline.schema import sample_nbytes

    for ix in resolve(config(small_shards, oversize_policy="crop")).train:
        f = ShardFetcher(ix)
        for run in f.runs(np.arange(len(ix))):
            for s in decode_run(f.read_run(run), ix, "raise"):
                arrays = (s.z, s.pos, s.bonds, s.bond_order, s.edges, s.res_index, s.chain, s.atom_name)
                assert sample_nbytes(s) == sum(a.nbytes for a in arrays if a is not None), s.key
        f.close()
