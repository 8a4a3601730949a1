"""Where shards live: one small interface over local folders, http(s) and S3.

Every other module reads shard data only through :func:`open_stream` (a whole shard, read
sequentially) and :func:`read_bytes` (a small file such as ``manifest.json`` or an index), writes
through :func:`write_bytes` / :func:`upload_file`, and joins locations with :func:`join`. Adding a
scheme means adding it here and nowhere else.

Schemes: local paths and ``file://`` (read/write), ``http://`` / ``https://`` (read-only, see
:mod:`pipeline.http_source`), ``s3://bucket/key`` (read/write, see :mod:`pipeline.s3`).

Remote reads are streamed by :class:`pipeline.remote_stream.RemoteStream`: connect/read timeouts,
bounded retries with exponential backoff, resume at the last byte with an HTTP Range request, and a
read-ahead thread. Tuning lives in :class:`StorageOptions`; set it once per process with
:func:`configure` (fork-started workers inherit it; spawn-started workers must call
:func:`configure` again or pass ``options=`` explicitly). Credentials are never part of the
options: they come from the environment or the standard AWS chain only.

Counters (requests, retries, resumed bytes, cache hits, ...) are kept per process in :data:`stats`;
each remote stream also carries its own ``stream.stats``. A forked child starts with zeroed
counters and no inherited clients.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, fields, replace
from typing import BinaryIO
from urllib.parse import urlparse


class StorageError(OSError):
    """A shard or metadata file could not be read or written; the message names the URL and the fix."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object does not exist (local file, http 404 or S3 NoSuchKey/NoSuchBucket)."""


class ChecksumMismatchError(StorageError):
    """The bytes read do not match the sha256 the caller expected (from the manifest)."""


# --------------------------------------------------------------------------------------------
# options


@dataclass(frozen=True)
class StorageOptions:
    """Tuning of remote reads and writes; never holds credentials (those come from the AWS chain)."""

    endpoint_url: str | None = None
    """S3 endpoint override (MinIO, Ceph, R2, moto); None: ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``, then AWS."""
    region: str | None = None
    """S3 region; None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / profile, else ``us-east-1``."""
    addressing_style: str = "auto"
    """S3 addressing: ``auto`` (path-style when an endpoint override is set), ``path`` or ``virtual``."""
    anonymous: bool = False
    """Send unsigned S3 requests (public buckets); no credentials are looked up."""
    connect_timeout_s: float = 5.0
    """Seconds to establish a TCP/TLS connection before the attempt counts as failed."""
    read_timeout_s: float = 30.0
    """Seconds without a single received byte before the attempt counts as failed."""
    max_attempts: int = 5
    """Attempts per request without progress (1 = no retry); a resumed read that made progress starts a new count."""
    max_total_retries: int = 50
    """Retries allowed over the whole life of one stream, progress or not (bounds a flapping link)."""
    backoff_s: float = 0.2
    """First retry delay in seconds; doubles per consecutive failure (with deterministic jitter)."""
    backoff_max_s: float = 5.0
    """Upper bound of one retry delay in seconds."""
    chunk_bytes: int = 1 << 20
    """Bytes per network read (and per read-ahead queue item)."""
    readahead_chunks: int = 8
    """Chunks a background thread may fetch ahead of the reader; 0 reads in the caller's thread."""
    cache_dir: str | None = None
    """Local cache folder for remote shards; None disables the cache."""
    cache_max_bytes: int = 20 << 30
    """Size bound of the cache folder in bytes; least recently used entries are evicted beyond it."""
    cache_lock_wait_s: float = 600.0
    """Seconds to wait for another process downloading the same shard before streaming it uncached."""

    def __post_init__(self) -> None:
        positive = ("connect_timeout_s", "read_timeout_s", "max_attempts", "chunk_bytes", "cache_max_bytes")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"storage.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_total_retries", "backoff_s", "backoff_max_s", "readahead_chunks", "cache_lock_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"storage.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.endpoint_url is not None:
            ep = urlparse(self.endpoint_url)
            if ep.username or ep.password or ep.query:
                raise ValueError(
                    "storage.endpoint_url must not carry credentials or a query string; credentials come only from "
                    "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or the standard AWS chain"
                )
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(
                f"storage.addressing_style must be 'auto', 'path' or 'virtual', got {self.addressing_style!r}"
            )

    def resolved_endpoint(self) -> str | None:
        """The S3 endpoint actually used: this option, else the standard environment variables."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


_options = StorageOptions()


def configure(options: StorageOptions | None = None, **overrides: object) -> StorageOptions:
    """Set this process's default options (``options`` and/or field overrides) and return them.

    Unknown field names raise ``ValueError`` naming the field and the valid ones.
    """
    global _options
    known = {f.name for f in fields(StorageOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown storage option(s) {unknown}; valid: {sorted(known)}")
    _options = replace(options if options is not None else _options, **overrides)  # type: ignore[arg-type]
    return _options


def get_options() -> StorageOptions:
    """This process's default options (see :func:`configure`)."""
    return _options


# --------------------------------------------------------------------------------------------
# statistics


class StorageStats:
    """Thread-safe counters of one process (``storage.stats``) or one stream (``stream.stats``)."""

    FIELDS = (
        "streams",  # remote streams opened
        "requests",  # HTTP requests sent for reads (first GETs and resumes)
        "retries",  # failed attempts that were retried
        "resumes",  # ranged GETs that continued a stream at a byte offset > 0
        "bytes_fetched",  # payload bytes received from the network
        "errors",  # reads that finally failed (StorageError raised)
        "cache_hits",
        "cache_misses",
        "cache_evictions",
        "checksum_mismatches",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        """A copy of the counters; the loader can subtract two snapshots for per-interval figures."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(self.FIELDS, 0)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork time would never be released
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def __repr__(self) -> str:
        return f"StorageStats({self.snapshot()})"


stats = StorageStats()
"""Counters of this process; zeroed in forked children."""

os.register_at_fork(after_in_child=stats._after_fork)


# --------------------------------------------------------------------------------------------
# locations


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


def redact_url(url: str) -> str:
    """The URL for messages and logs: a query string (presigned-URL signatures, tokens) is hidden."""
    p = urlparse(url)
    return p._replace(query="<redacted>").geturl() if p.query else url


_SUPPORTED = "local paths, file://, http(s):// and s3://bucket/key"


def _check_scheme(url: str, *, write: bool = False) -> str:
    scheme = scheme_of(url)
    allowed = ("file", "s3") if write else ("file", "s3", "http", "https")
    if scheme not in allowed:
        what = "writing" if write else "reading"
        have = "local paths, file:// and s3://" if write else _SUPPORTED
        raise StorageError(f"unsupported URL scheme {scheme!r} in {redact_url(url)!r} for {what}; supported: {have}")
    return scheme


# --------------------------------------------------------------------------------------------
# reading


class _VerifyingFile(io.RawIOBase):
    """A local file whose sha256 is checked when it has been read to the end."""

    def __init__(self, f: BinaryIO, url: str, sha256: str) -> None:
        super().__init__()
        self._f, self.url, self._expected = f, url, sha256.lower()
        self._hash = hashlib.sha256()
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = self._f.readinto(b)
        if n:
            self._hash.update(memoryview(b)[:n])
        elif not self._verified:
            self._verified = True
            got = self._hash.hexdigest()
            if got != self._expected:
                stats.add("checksum_mismatches")
                raise ChecksumMismatchError(
                    f"sha256 mismatch for {self.url}: expected {self._expected}, got {got}; "
                    "the file is corrupt or differs from the manifest: rebuild or re-copy the shard"
                )
        return n

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        before = self._f.tell()
        pos = self._f.seek(offset, whence)
        if pos != before:
            self._verified = True  # the hash covers one sequential pass only
        return pos

    def close(self) -> None:
        self._f.close()
        super().close()


def open_stream(url: str, *, sha256: str | None = None, options: StorageOptions | None = None) -> BinaryIO:
    """Open a shard for sequential reading.

    ``sha256`` (hex, from the manifest) enables verification: with a cache configured the shard is
    downloaded and verified before its first byte is returned (a mismatch is refetched once, then
    raises :class:`ChecksumMismatchError`); otherwise the hash is checked when the stream reaches its
    end (call :func:`finish` after the last sample so trailing padding is read and checked).
    Remote streams carry ``.stats`` (a :class:`StorageStats`) and ``.url``.
    """
    scheme = _check_scheme(url)
    opts = options or _options
    if scheme == "file":
        path = _local_path(url)
        try:
            f = open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise StorageNotFoundError(f"shard not found: {path}") from None
        except IsADirectoryError:
            raise StorageError(f"expected a file, found a directory: {path}") from None
        except PermissionError:
            raise StorageError(f"permission denied reading {path}: check the file's mode/owner") from None
        return _VerifyingFile(f, path, sha256) if sha256 else f  # type: ignore[return-value]
    if opts.cache_dir:
        from pipeline.cache import ShardCache

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
        from pipeline.s3 import S3Source

        return S3Source(url, opts)
    from pipeline.http_source import HttpSource

    return HttpSource(url, opts)


def _open_remote(url: str, opts: StorageOptions, *, sha256: str | None, readahead: bool = True) -> BinaryIO:
    from pipeline.remote_stream import RemoteStream

    return RemoteStream(_source_for(url, opts), opts, sha256=sha256, readahead=readahead)  # type: ignore[return-value]


def read_bytes(url: str, *, options: StorageOptions | None = None) -> bytes:
    """Read a small file (manifest, index) whole, with the same retries as shards; never cached."""
    scheme = _check_scheme(url)
    if scheme == "file":
        with open_stream(url) as f:
            return f.read()
    with _open_remote(url, options or _options, sha256=None, readahead=False) as f:
        return f.read()


def read_range(url: str, offset: int, size: int, *, options: StorageOptions | None = None) -> bytes:
    """Bytes ``offset`` .. ``offset + size`` of an object (fewer only where the object ends first).

    One bounded Range request for remote URLs, with the same timeouts, retries and resume as
    :func:`open_stream`; the way to read a block of members found through the shard index without
    streaming the whole shard. Never cached, never verified (a sha256 covers whole shards).
    """
    if offset < 0 or size < 0:
        raise ValueError(f"read_range({redact_url(url)!r}): offset and size must be >= 0, got {offset}, {size}")
    scheme = _check_scheme(url)
    if scheme == "file":
        with open_stream(url) as f:
            f.seek(offset)
            return f.read(size)
    if size == 0:
        return b""
    from pipeline.remote_stream import RemoteStream

    opts = options or _options
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
    scheme = _check_scheme(url)
    if scheme == "file":
        return os.path.isfile(_local_path(url))
    return _source_for(url, options or _options).exists()


# --------------------------------------------------------------------------------------------
# writing (converter output)


def _local_write_atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(url: str, data: bytes, *, options: StorageOptions | None = None) -> None:
    """Write a whole object atomically (local: temp file + rename; S3: one PUT, visible only when complete)."""
    scheme = _check_scheme(url, write=True)
    if scheme == "file":
        path = _local_path(url)
        try:
            _local_write_atomic(path, lambda f: f.write(data))
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
        return
    from pipeline.s3 import S3Source

    S3Source(url, options or _options).put_bytes(data)


def upload_file(local_path: str, url: str, *, options: StorageOptions | None = None) -> None:
    """Copy a local file to ``url`` atomically (S3: multipart above 64 MiB, retried as a whole).

    The converter uploads shards and index first and ``manifest.json`` last, so a reader never
    sees a manifest naming objects that are not there yet.
    """
    scheme = _check_scheme(url, write=True)
    if not os.path.isfile(local_path):
        raise StorageError(f"cannot upload {local_path} to {url}: no such local file")
    if scheme == "file":
        path = _local_path(url)
        if os.path.abspath(path) == os.path.abspath(local_path):
            return
        try:
            with open(local_path, "rb") as src:
                _local_write_atomic(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        except OSError as e:
            raise StorageError(f"cannot copy {local_path} to {path}: {e.strerror or e}") from e
        return
    from pipeline.s3 import S3Source

    S3Source(url, options or _options).upload_file(local_path)


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
    from pipeline import http_source, s3

    s3.reset_clients()
    http_source.reset_clients()
