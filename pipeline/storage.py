"""Where shards live: one small interface over local folders, http(s) and S3.

Every other module reads shard data only through :func:`open_stream` (a whole shard, read
sequentially) and :func:`read_bytes` (a small file such as ``manifest.json`` or an index), and joins
locations with :func:`join`. Adding a scheme means adding it here and nowhere else.
"""

from __future__ import annotations

import os
from typing import BinaryIO
from urllib.parse import urlparse


class StorageError(OSError):
    """A shard or metadata file could not be read; the message names the URL."""


def scheme_of(url: str) -> str:
    p = urlparse(url)
    return p.scheme if len(p.scheme) > 1 else "file"  # "C:\\..." is a path, not a scheme


def join(root: str, *parts: str) -> str:
    """Join a root location (path or URL) with relative parts using '/'."""
    if scheme_of(root) == "file":
        return os.path.join(root, *parts)
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def open_stream(url: str) -> BinaryIO:
    """Open a shard for sequential reading."""
    scheme = scheme_of(url)
    if scheme == "file":
        path = _local_path(url)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise StorageError(f"shard not found: {path}") from None
    raise StorageError(f"unsupported URL scheme {scheme!r} in {url!r}; supported: local paths and file://")


def read_bytes(url: str) -> bytes:
    """Read a small file (manifest, index) whole."""
    with open_stream(url) as f:
        return f.read()
