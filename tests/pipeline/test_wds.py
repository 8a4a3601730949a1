"""The webdataset package itself reads our converted demo shards: every sample, equal to our own reader's."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import storage
from pipeline.index import load_domain_index, read_manifest
from pipeline.schema import SPLITS, Sample, decode_block
from pipeline.wds import decode, samples, shard_urls

wds = pytest.importorskip("webdataset")

ARRAYS = ("z", "pos", "bonds", "bond_order", "edges", "res_index", "chain", "atom_name")


def _ours(root) -> dict[str, Sample]:
    """Every sample through our index (byte offsets from the Parquet index, not tar parsing)."""
    out = {}
    for domain in read_manifest(str(root))["domains"]:
        for split in SPLITS:
            ix = load_domain_index(str(root), domain, split)
            for i in range(len(ix)):
                data = storage.read_range(ix.shard_urls[int(ix.shard_of(i))], int(ix.offset_of(i)), int(ix.size_of(i)))
                s = decode_block(data)[int(ix.item[i])]
                assert s.key == str(ix.keys[i])
                out[s.key] = s
    return out


def _same(a: Sample, b: Sample) -> None:
    assert (a.key, a.domain, a.source, a.record, a.mol_id, a.chains) == (b.key, b.domain, b.source, b.record, b.mol_id, b.chains)
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), f"{a.key}: {name} differs"


def test_webdataset_reads_every_sample_equal_to_our_reader(demo_shards):
    ours = _ours(demo_shards)
    urls = shard_urls(str(demo_shards), split=None)
    assert len(urls) == len(read_manifest(str(demo_shards))["shards"])
    got = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(decode).compose(samples):
        assert isinstance(s, Sample) and s.key not in got, "a sample came twice"
        got[s.key] = s
    assert got.keys() == ours.keys() and len(got) == 736
    for k, s in got.items():
        _same(s, ours[k])


def test_split_and_domain_filters_and_compose_without_decode(demo_shards):
    train = shard_urls(str(demo_shards), split="train", domains=["rna"])
    assert train and all("/rna/" in u and "-val-" not in u and "-test-" not in u for u in train)
    keys = {s.key for s in wds.WebDataset(train, shardshuffle=False, empty_check=False).compose(samples)}
    ix = load_domain_index(str(demo_shards), "rna", "train")
    assert keys == set(map(str, ix.keys))


def test_decoder_leaves_other_members_alone():
    assert decode("json", b"{}") is None and decode("cls", b"1") is None
