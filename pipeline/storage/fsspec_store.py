"""Every other scheme (``gs://``, ``az://`` / ``abfs://``, ``hf://``, ``memory://``, ...) through fsspec.

The object is read as a *source* of :class:`pipeline.storage.remote_stream.RemoteStream`, like S3 and http(s),
so it gets the same bounded retries with backoff, Range resume (a new ranged read from the last byte
received, guarded by the object's ETag / generation / mtime), sha256 and crc32 checks, counters and cache.

One filesystem instance per (process, protocol), created on first use and dropped in a forked child: fsspec's
async filesystems hold an event loop and sockets that are not fork-safe (s3fs #914), and fsspec's own
instance cache is skipped so that a parent's instance is never reused. Credentials come only from each
implementation's environment (``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``, ``HF_TOKEN``, ...).
The implementations are optional extras: ``molstream[gcs]`` (gcsfs), ``molstream[azure]`` (adlfs),
``molstream[hf]`` (huggingface_hub).
"""

from __future__ import annotations

import logging
import os
import threading

import fsspec

from pipeline.storage.base import StorageError, StorageNotFoundError, StorageOptions, redact_url, scheme_of
from pipeline.storage.remote_stream import PastEnd, TransientError

log = logging.getLogger(__name__)

EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure", "hf": "hf"}
"""The pip extra of molstream that installs the fsspec implementation of a scheme."""

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)
try:
    import aiohttp  # http-based async implementations (gcsfs, fsspec's HTTPFileSystem) raise its errors

    _TRANSIENT += (aiohttp.ClientError,)
except ImportError:
    pass

_VALIDATORS = ("ETag", "etag", "generation", "blob_id", "md5Hash", "LastModified", "last_modified", "mtime", "created")

_filesystems: dict[tuple, object] = {}
_filesystems_lock = threading.Lock()


def reset_clients() -> None:
    """Forget every filesystem instance (the next read creates new ones)."""
    global _filesystems_lock
    _filesystems.clear()
    _filesystems_lock = threading.Lock()


os.register_at_fork(after_in_child=reset_clients)


def implementation(protocol: str, url: str) -> type:
    """The fsspec filesystem class of ``protocol``; a missing one fails naming the extra that installs it."""
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        fix = f"pip install 'molstream[{extra}]'" if extra else "install the fsspec implementation of this scheme"
        raise StorageError(f"reading {url} needs the fsspec implementation of {protocol}:// ({e}); {fix}") from None
    except ValueError:
        raise StorageError(
            f"unsupported URL scheme {protocol!r} in {url!r}; supported: local paths, file://, http(s)://, s3:// and "
            "the protocols fsspec knows (fsspec.available_protocols(): gs:// with molstream[gcs], az:// and abfs:// "
            "with molstream[azure], hf:// with molstream[hf], memory://, ...)"
        ) from None


def filesystem(protocol: str, url: str):
    """This process's filesystem instance for ``protocol`` (created on first use, keyed by pid)."""
    key = (os.getpid(), protocol)
    fs = _filesystems.get(key)
    if fs is None:
        with _filesystems_lock:
            fs = _filesystems.get(key)
            if fs is None:
                cls = implementation(protocol, url)
                try:
                    fs = cls(skip_instance_cache=True)
                except (ValueError, TypeError, OSError) as e:
                    raise StorageError(f"cannot set up the {protocol}:// filesystem for {url}: {e}") from None
                _filesystems[key] = fs
                log.debug("created fsspec %s in pid %d", type(fs).__name__, os.getpid())
    return fs


def _validator(info: dict) -> str | None:
    for k in _VALIDATORS:
        v = info.get(k)
        if v is not None:
            return str(v)
    return None


class _FsspecResponse:
    def __init__(self, source: FsspecSource, f, pos: int, size: int | None, etag: str | None,
                 end: int | None) -> None:
        self._source, self._f, self._pos, self.size, self.etag, self._end = source, f, pos, size, etag, end

    def read(self, n: int) -> bytes:
        if self._end is not None:
            n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        try:
            chunk = self._f.read(n)
        except _PERMANENT as e:
            raise self._source.error(e) from None
        except _TRANSIENT as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        self._pos += len(chunk)
        return chunk

    def close(self) -> None:
        try:
            self._f.close()
        except _TRANSIENT:
            pass  # closing a broken read: nothing left to do


class FsspecSource:
    """One object behind an fsspec filesystem: ranged reads for :class:`RemoteStream`, exists, whole writes."""

    def __init__(self, url: str, opts: StorageOptions) -> None:
        self.url, self._opts = url, opts
        self.name = redact_url(url)
        self.protocol = scheme_of(url)
        self._fs = filesystem(self.protocol, self.name)
        self.path = type(self._fs)._strip_protocol(url)

    def describe(self) -> str:
        return f"{self.name} (fsspec {type(self._fs).__name__})"

    def error(self, e: BaseException) -> StorageError:
        if isinstance(e, FileNotFoundError):
            return StorageNotFoundError(f"not found: {self.describe()}; check the URL and the root")
        if isinstance(e, PermissionError):
            return StorageError(
                f"access denied to {self.describe()} ({e}); credentials come only from the environment of the "
                f"{self.protocol}:// implementation"
            )
        if isinstance(e, IsADirectoryError):
            return StorageError(f"expected a file, found a directory: {self.describe()}")
        return StorageError(f"{self.describe()}: {type(e).__name__}: {e}")

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except _PERMANENT as e:
            raise self.error(e) from None
        except _TRANSIENT as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e

    def open(self, start: int, etag: str | None, end: int | None = None):
        info = self._call(self._fs.info, self.path)
        if info.get("type") == "directory":
            raise StorageError(f"expected a file, found a directory: {self.describe()}")
        size = info.get("size")
        validator = _validator(info)
        if etag and validator and validator != etag:
            raise StorageError(f"{self.describe()} changed while being read (ETag/generation/mtime differs); re-run")
        if size is not None and start >= size and (start > 0 or end is not None):
            return PastEnd()
        f = self._call(self._open, start)
        return _FsspecResponse(self, f, start, size, validator, end)

    def _open(self, start: int):
        # cache_type="none": every read(n) is one ranged request for exactly those bytes
        f = self._fs.open(self.path, "rb", block_size=self._opts.chunk_bytes, cache_type="none")
        if start:
            f.seek(start)
        return f

    def exists(self) -> bool:
        try:
            return bool(self._call(self._fs.isfile, self.path))
        except TransientError as e:
            raise StorageError(f"cannot reach {self.describe()}: {e}; check the URL and the network") from None

    def put_bytes(self, data: bytes) -> None:
        try:
            self._call(self._fs.pipe_file, self.path, data)
        except TransientError as e:
            raise StorageError(f"writing {self.describe()} failed: {e}") from None

    def upload_file(self, local_path: str) -> None:
        try:
            self._call(self._fs.put_file, local_path, self.path)
        except TransientError as e:
            raise StorageError(f"uploading {local_path} to {self.describe()} failed: {e}") from None
