"""The base of :mod:`pipeline.storage`: errors, options, counters and URL helpers; imports nothing of ours.

Every other storage module (the backends, the retry/resume stream, the cache, the public face in
``pipeline/storage/__init__.py``) builds on this one, and this one on nothing of the project.

Tuning lives in :class:`StorageOptions`; set it once per process with :func:`configure` (fork-started
workers inherit it; spawn-started workers must call :func:`configure` again or pass ``options=``
explicitly). Credentials are never part of the options: they come from the environment or the
standard AWS chain only.

Counters (requests, retries, resumed bytes, cache hits, ...) are kept per process in :data:`stats`;
each remote stream also carries its own ``stream.stats``. A forked child starts with zeroed counters.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, fields, replace
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
    http_bearer_token_env: str | None = None
    """Name of an environment variable whose value is sent to http(s) sources as ``Authorization: Bearer``; never the token."""
    anonymous: bool = False
    """Send unsigned S3 requests (public buckets); no credentials are looked up."""
    connect_timeout_s: float = 5.0
    """Seconds to establish a TCP/TLS connection before the attempt counts as failed."""
    read_timeout_s: float = 30.0
    """Seconds without a single received byte before the attempt counts as failed."""
    request_deadline_s: float = 300.0
    """Seconds one request (one GET: answer and body) may take in total; past it the request is abandoned and retried
    from the last byte received (bounds a server that drips bytes just under read_timeout_s)."""
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
        positive = ("connect_timeout_s", "read_timeout_s", "request_deadline_s", "max_attempts", "chunk_bytes",
                    "cache_max_bytes")
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
        var = self.http_bearer_token_env
        if var is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            raise ValueError(  # never echo the value: it may be the token pasted by mistake
                "storage.http_bearer_token_env must name an environment variable (letters, digits and _, e.g. "
                "HTTP_TOKEN) that holds the token, not the token itself"
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


def local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def redact_url(url: str) -> str:
    """The URL for messages and logs: a query string (presigned-URL signatures, tokens) and credentials are hidden."""
    if scheme_of(url) == "file":
        return url
    p = urlparse(url)
    if has_credentials(url):
        p = p._replace(netloc="<redacted>@" + p.netloc.rpartition("@")[2])
    if p.query:
        p = p._replace(query="<redacted>")
    return p.geturl()


CREDENTIALS_FIX = (
    "credentials never go in a URL or a config: S3 keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
    "AWS chain, an http(s) bearer token from the environment variable named by storage.http_bearer_token_env"
)


def has_credentials(url: str) -> bool:
    """Whether a URL carries credentials (refused everywhere, see :data:`CREDENTIALS_FIX`): any ``user@`` for s3 and
    http(s) (``https://TOKEN@host`` is a credential), ``user:password@`` for the other schemes (``abfs://container@
    account...`` names a container, not a secret)."""
    scheme = scheme_of(url)
    p = urlparse(url)
    if scheme == "file" or "@" not in p.netloc:
        return False
    return scheme in ("s3", "http", "https") or ":" in p.netloc.rpartition("@")[0]


def check_scheme(url: str, *, write: bool = False) -> str:
    """The URL's scheme; refuses credentials in the URL, and http(s) for writing (backends check the rest)."""
    scheme = scheme_of(url)
    if has_credentials(url):
        raise StorageError(f"{redact_url(url)!r} carries credentials (user:password@ in the URL); {CREDENTIALS_FIX}")
    if write and scheme in ("http", "https"):
        raise StorageError(
            f"unsupported URL scheme {scheme!r} in {redact_url(url)!r} for writing; supported: local paths, file:// "
            "and s3://, and the fsspec protocols (gs://, az://, hf://, ...)"
        )
    return scheme
