"""Where shards live: one small interface over local folders, http(s) and S3.

Every other module reads shard data only through :func:`open_stream` (a whole shard, read
sequentially), :func:`read_range` (a block of members) and :func:`read_bytes` (a small file such as
``manifest.json`` or an index), writes through :func:`write_bytes` / :func:`upload_file` /
:func:`upload_tree`, and joins locations with :func:`join`. Adding a scheme means adding a backend
module in this package and a branch here, nowhere else.

Layers (imports point down only)::

    __init__        the public face below: picks a backend per URL scheme, puts the cache in front
    cache           size-bounded local copies of remote shards (ShardCache)
    local s3 http   one module per backend; s3/http sources are read through ...
    remote_stream   ... RemoteStream: timeouts, bounded retries with backoff, Range resume, read-ahead
    base            errors, StorageOptions + configure, StorageStats + stats, URL helpers (imports nothing of ours)

Schemes: local paths and ``file://`` (read/write, :mod:`pipeline.storage.local`), ``http://`` /
``https://`` (read-only, :mod:`pipeline.storage.http`), ``s3://bucket/key`` (read/write,
:mod:`pipeline.storage.s3`). Options and counters: see :mod:`pipeline.storage.base`.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from pipeline.storage import local
from pipeline.storage.base import (
    ChecksumMismatchError,
    StorageError,
    StorageNotFoundError,
    StorageOptions,
    StorageStats,
    check_scheme,
    configure,
    get_options,
    join,
    redact_url,
    scheme_of,
    stats,
)

__all__ = [
    "ChecksumMismatchError", "StorageError", "StorageNotFoundError", "StorageOptions", "StorageStats",
    "configure", "exists", "finish", "get_options", "join", "open_stream", "read_bytes", "read_range",
    "redact_url", "reset_clients", "scheme_of", "stats", "upload_file", "upload_tree", "write_bytes",
]


# --------------------------------------------------------------------------------------------
# reading


def open_stream(url: str, *, sha256: str | None = None, options: StorageOptions | None = None) -> BinaryIO:
    """Open a shard for sequential reading.

    ``sha256`` (hex, from the manifest) enables verification: with a cache configured the shard is
    downloaded and verified before its first byte is returned (a mismatch is refetched once, then
    raises :class:`ChecksumMismatchError`); otherwise the hash is checked when the stream reaches its
    end (call :func:`finish` after the last sample so trailing padding is read and checked).
    Remote streams carry ``.stats`` (a :class:`StorageStats`) and ``.url``.
    """
    scheme = check_scheme(url)
    opts = options or get_options()
    if scheme == "file":
        return local.open_file(url, sha256)
    if opts.cache_dir:
        from pipeline.storage.cache import ShardCache

        return ShardCache(opts.cache_dir, opts.cache_max_bytes, opts.cache_lock_wait_s).open(
            url, _cache_identity(url, opts), lambda: _open_remote(url, opts, sha256=None), sha256
        )
    return _open_remote(url, opts, sha256=sha256)


def _cache_identity(url: str, opts: StorageOptions) -> str:
    """What makes two URLs the same object: the S3 endpoint is part of it."""
    return f"{opts.resolved_endpoint() or 'aws'}|{url}" if scheme_of(url) == "s3" else url


def _source_for(url: str, opts: StorageOptions):
    scheme = scheme_of(url)
    if scheme == "s3":
        from pipeline.storage.s3 import S3Source

        return S3Source(url, opts)
    from pipeline.storage.http import HttpSource

    return HttpSource(url, opts)


def _open_remote(url: str, opts: StorageOptions, *, sha256: str | None, readahead: bool = True) -> BinaryIO:
    from pipeline.storage.remote_stream import RemoteStream

    return RemoteStream(_source_for(url, opts), opts, sha256=sha256, readahead=readahead)  # type: ignore[return-value]


def read_bytes(url: str, *, options: StorageOptions | None = None) -> bytes:
    """Read a small file (manifest, index) whole, with the same retries as shards; never cached."""
    scheme = check_scheme(url)
    if scheme == "file":
        with open_stream(url) as f:
            return f.read()
    with _open_remote(url, options or get_options(), sha256=None, readahead=False) as f:
        return f.read()


def read_range(url: str, offset: int, size: int, *, options: StorageOptions | None = None) -> bytes:
    """Bytes ``offset`` .. ``offset + size`` of an object (fewer only where the object ends first).

    One bounded Range request for remote URLs, with the same timeouts, retries and resume as
    :func:`open_stream`; the way to read a block of members found through the shard index without
    streaming the whole shard. Never cached, never verified (a sha256 covers whole shards).
    """
    if offset < 0 or size < 0:
        raise ValueError(f"read_range({redact_url(url)!r}): offset and size must be >= 0, got {offset}, {size}")
    scheme = check_scheme(url)
    if scheme == "file":
        with open_stream(url) as f:
            f.seek(offset)
            return f.read(size)
    if size == 0:
        return b""
    from pipeline.storage.remote_stream import RemoteStream

    opts = options or get_options()
    with RemoteStream(_source_for(url, opts), opts, readahead=False, start=offset, end=offset + size) as f:
        return f.read()


def finish(stream: BinaryIO) -> int:
    """Read a stream to its end (tar padding after the last member) so its sha256, if any, is checked.

    Returns the number of bytes that were left; raises :class:`ChecksumMismatchError` on a mismatch.
    """
    n = 0
    while chunk := stream.read(1 << 20):
        n += len(chunk)
    return n


def exists(url: str, *, options: StorageOptions | None = None) -> bool:
    """Whether an object/file exists (a HEAD request for remote URLs)."""
    scheme = check_scheme(url)
    if scheme == "file":
        return local.exists(url)
    return _source_for(url, options or get_options()).exists()


# --------------------------------------------------------------------------------------------
# writing (converter output)


def write_bytes(url: str, data: bytes, *, options: StorageOptions | None = None) -> None:
    """Write a whole object atomically (local: temp file + rename; S3: one PUT, visible only when complete)."""
    scheme = check_scheme(url, write=True)
    if scheme == "file":
        local.write_bytes(url, data)
        return
    from pipeline.storage.s3 import S3Source

    S3Source(url, options or get_options()).put_bytes(data)


def upload_file(local_path: str, url: str, *, options: StorageOptions | None = None) -> None:
    """Copy a local file to ``url`` atomically (S3: multipart above 64 MiB, retried as a whole).

    The converter uploads shards and index first and ``manifest.json`` last, so a reader never
    sees a manifest naming objects that are not there yet.
    """
    scheme = check_scheme(url, write=True)
    if not os.path.isfile(local_path):
        raise StorageError(f"cannot upload {local_path} to {url}: no such local file")
    if scheme == "file":
        local.upload_file(local_path, url)
        return
    from pipeline.storage.s3 import S3Source

    S3Source(url, options or get_options()).upload_file(local_path)


def upload_tree(local_dir: str, url: str, *, last: tuple[str, ...] = ("manifest.json",),
                options: StorageOptions | None = None) -> list[str]:
    """Upload every file under ``local_dir`` to ``url`` (same relative paths), the ``last`` names last.

    Hidden files and folders (``.work``, temp files) are skipped. Returns the uploaded URLs in order;
    with the default, ``manifest.json`` is written after every shard and index it names.
    """
    if not os.path.isdir(local_dir):
        raise StorageError(f"cannot upload {local_dir}: not a folder")
    first, final = [], []
    for folder, dirs, files in os.walk(local_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(folder, name), local_dir)
            (final if rel in last else first).append(rel)
    final.sort(key=last.index)
    done = []
    for rel in first + final:
        target = join(url, *rel.split(os.sep))
        upload_file(os.path.join(local_dir, rel), target, options=options)
        done.append(target)
    return done


def reset_clients() -> None:
    """Drop this process's cached S3/http clients (e.g. after changing credentials in the environment)."""
    from pipeline.storage import http, s3

    s3.reset_clients()
    http.reset_clients()
