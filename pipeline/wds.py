"""Reading molstream shards with the ``webdataset`` package (interop; molstream's own loader does not use it).

Our shards follow WebDataset's conventions (uncompressed tar, ``<key>.safetensors`` members, the key before the
first dot); each member is a *block* of samples (:mod:`pipeline.schema`), so a WebDataset item holds a list of
samples. This module supplies the decoding, which goes through :func:`pipeline.schema.decode_block` (pickle-free,
validated) like our own reader, and :func:`samples`, which flattens the blocks::

    import webdataset as wds
    from pipeline.wds import decode, samples, shard_urls

    urls = shard_urls("data/demo/shards", split="train")          # from manifest.json
    for s in wds.WebDataset(urls, shardshuffle=False).decode(decode).compose(samples):
        s.key, s.domain, s.z, s.pos, s.bonds, s.edges                 # a pipeline.schema.Sample

``pip install "molstream[webdataset]"`` installs the package. Never pass webdataset's default decoders
(``.decode()`` with ``"pil"``/``"torch"`` etc.) to shards from strangers: some of them unpickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pipeline.schema import MEMBER_EXT, Sample, decode_block


def decode(key: str, data: bytes) -> list[Sample] | None:
    """A webdataset decoder handler: our ``.safetensors`` block members to lists of
    :class:`~pipeline.schema.Sample`.

    ``key`` is the member's extension (webdataset's handler convention); other members are left to other handlers.
    """
    if key.lower().rsplit(".", 1)[-1] != MEMBER_EXT:
        return None
    return decode_block(data, where=f"webdataset member .{key}")


def samples_of(item: dict) -> list[Sample]:
    """The samples of one webdataset item (one block member), decoded here if ``.decode(decode)`` did not."""
    block = item[MEMBER_EXT]
    if isinstance(block, (bytes, bytearray, memoryview)):
        block = decode_block(bytes(block), where=f"webdataset item {item.get('__key__')!r} of {item.get('__url__')!r}")
    return block


def samples(items: Iterable[dict]) -> Iterator[Sample]:
    """Every sample of a stream of webdataset items, in shard order (for ``.compose(samples)``)."""
    for item in items:
        yield from samples_of(item)


def shard_urls(root: str, split: str | None = "train", domains: list[str] | None = None) -> list[str]:
    """Local shard paths (or URLs under an http(s) root) listed in ``root``'s manifest.json, in manifest order.

    ``split``: train, val, test, or None for all; ``domains``: a subset of domains (None: all).
    """
    from pipeline import storage
    from pipeline.index import read_manifest

    manifest = read_manifest(root)
    return [storage.join(root, s["path"]) for s in manifest["shards"]
            if (split is None or s["split"] == split) and (domains is None or s["domain"] in domains)]
