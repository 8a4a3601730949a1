"""Reading molstream shards with the ``webdataset`` package (interop; molstream's own loader does not use it).

Our shards follow WebDataset's conventions (uncompressed tar, one ``<key>.safetensors`` member per sample, the
key before the first dot), so any WebDataset pipeline can stream them; this module supplies the decoding,
which goes through :func:`pipeline.schema.decode_sample` (pickle-free, validated) like our own reader::

    import webdataset as wds
    from pipeline.wds import decode, sample_of, shard_urls

    urls = shard_urls("data/demo/shards", split="train")          # from manifest.json
    for s in wds.WebDataset(urls, shardshuffle=False).decode(decode).map(sample_of):
        s.key, s.domain, s.z, s.pos, s.bonds, s.edges                 # a pipeline.schema.Sample

``pip install "molstream[webdataset]"`` installs the package. Never pass webdataset's default decoders
(``.decode()`` with ``"pil"``/``"torch"`` etc.) to shards from strangers: some of them unpickle.
"""

from __future__ import annotations

from pipeline.schema import MEMBER_EXT, Sample, decode_sample


def decode(key: str, data: bytes) -> Sample | None:
    """A webdataset decoder handler: our ``.safetensors`` members to :class:`~pipeline.schema.Sample`.

    ``key`` is the member's extension (webdataset's handler convention); other members are left to other handlers.
    """
    if key.lower().rsplit(".", 1)[-1] != MEMBER_EXT:
        return None
    return decode_sample(data, where=f"webdataset member .{key}")


def sample_of(item: dict) -> Sample:
    """The :class:`~pipeline.schema.Sample` of one decoded webdataset item (for ``.map``)."""
    s = item[MEMBER_EXT]
    if not isinstance(s, Sample):  # .map(sample_of) without .decode(decode) first
        s = decode_sample(s, where=f"webdataset item {item.get('__key__')!r} of {item.get('__url__')!r}")
    return s


def shard_urls(root: str, split: str | None = "train", domains: list[str] | None = None) -> list[str]:
    """Local shard paths (or URLs under an http(s) root) listed in ``root``'s manifest.json, in manifest order.

    ``split``: train, val, test, or None for all; ``domains``: a subset of domains (None: all).
    """
    from pipeline import storage
    from pipeline.index import read_manifest

    manifest = read_manifest(root)
    return [storage.join(root, s["path"]) for s in manifest["shards"]
            if (split is None or s["split"] == split) and (domains is None or s["domain"] in domains)]
