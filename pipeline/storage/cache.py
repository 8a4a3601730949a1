"""A size-bounded local cache of remote shards, safe with several worker processes.

Layout of ``cache_dir``::

    <sha256(identity)[:32]>-<basename>    one verified copy per URL (identity = URL, plus the endpoint for S3)
    .tmp-*                                downloads in progress (renamed into place when complete)
    .locks/<entry>.lock                   per-entry flock: one process downloads, the others wait, then hit
    .evict.lock                           flock held while evicting

An entry is only ever created by ``os.replace`` of a complete, verified temp file, so a reader never
sees a partial shard. With an expected sha256 the entry is verified before it is returned (on a hit
too: a corrupted entry is deleted and fetched again). The least recently used entries (mtime, touched
on every hit) are evicted when the folder exceeds ``max_bytes``; a shard larger than the whole bound
is verified and served from an unlinked temp file instead of being cached. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

from pipeline.storage.base import ChecksumMismatchError, StorageError, redact_url, stats
from pipeline.storage.remote_stream import wait_for

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_STALE_TMP_S = 24 * 3600
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def entry_name(identity: str, url: str) -> str:
    base = _UNSAFE.sub("_", url.rstrip("/").rsplit("/", 1)[-1])[-80:] or "object"
    return f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}-{base}"


def _sha256_of(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


class ShardCache:
    def __init__(self, root: str, max_bytes: int, lock_wait_s: float) -> None:
        self.root, self.max_bytes, self.lock_wait_s = root, max_bytes, lock_wait_s
        try:
            os.makedirs(os.path.join(root, ".locks"), exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create cache folder {root}: {e.strerror or e}; fix storage.cache_dir") from e

    def path_for(self, identity: str, url: str) -> str:
        return os.path.join(self.root, entry_name(identity, url))

    def open(self, url: str, identity: str, fetch: Callable[[], BinaryIO], sha256: str | None) -> BinaryIO:
        """The shard at ``url`` as a local file object, downloading it through ``fetch`` on a miss."""
        sha256 = sha256.lower() if sha256 else None
        path = self.path_for(identity, url)
        url = redact_url(url)  # only used in messages from here on
        f = self._hit(path, url, sha256)
        if f is not None:
            return f
        stats.add("cache_misses")
        lock_path = os.path.join(self.root, ".locks", os.path.basename(path) + ".lock")
        with open(lock_path, "a+b") as lock:
            if not wait_for(lambda: _try_lock(lock), self.lock_wait_s):
                log.warning("cache entry for %s is locked for over %.0fs; streaming it uncached", url, self.lock_wait_s)
                return self._download(url, fetch, sha256, keep_as=None)
            try:
                f = self._hit(path, url, sha256)  # another process may have fetched it while we waited
                if f is not None:
                    return f
                return self._download(url, fetch, sha256, keep_as=path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _hit(self, path: str, url: str, sha256: str | None) -> BinaryIO | None:
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller
        except FileNotFoundError:
            return None
        if sha256 is not None:
            got = _sha256_of(f)
            if got != sha256:
                f.close()
                stats.add("checksum_mismatches")
                log.warning("cached copy of %s has sha256 %s, expected %s; deleting it and fetching again",
                            url, got, sha256)
                _unlink(path)
                return None
            f.seek(0)
        try:
            os.utime(path)  # LRU order
        except FileNotFoundError:
            pass  # evicted meanwhile; the open file stays readable
        stats.add("cache_hits")
        return f

    def _download(self, url: str, fetch: Callable[[], BinaryIO], sha256: str | None, keep_as: str | None) -> BinaryIO:
        for attempt in (1, 2):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
            try:
                h = hashlib.sha256()
                size = 0
                with os.fdopen(fd, "wb") as out, fetch() as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                got = h.hexdigest()
                if sha256 is not None and got != sha256:
                    stats.add("checksum_mismatches")
                    msg = (f"sha256 mismatch for {url}: expected {sha256}, got {got} (download {attempt} of 2); "
                           "the object is corrupt or differs from the manifest: re-upload the shard or rebuild "
                           "the manifest")
                    if attempt == 2:
                        raise ChecksumMismatchError(msg)
                    log.warning("%s; fetching again", msg)
                    continue
                f = open(tmp, "rb")  # noqa: SIM115 - opened before the rename so eviction cannot race us
                if keep_as is None or size > self.max_bytes:
                    _unlink(tmp)  # served from the unlinked file, never cached
                else:
                    os.replace(tmp, keep_as)
                    self._evict(keep=keep_as)
                return f
            except StorageError:
                raise
            except OSError as e:
                raise StorageError(
                    f"cannot write the cache entry for {url} in {self.root}: {e.strerror or e}; "
                    "free space, lower storage.cache_max_bytes or change storage.cache_dir"
                ) from e
            finally:
                _unlink(tmp)
        raise AssertionError("unreachable")

    def _evict(self, keep: str) -> None:
        with open(os.path.join(self.root, ".evict.lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries, total, now = [], 0, time.time()
                for e in os.scandir(self.root):
                    if not e.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if e.name.startswith(".tmp-"):
                        if now - st.st_mtime > _STALE_TMP_S:  # left by a killed process
                            _unlink(e.path)
                        continue
                    if e.name.startswith("."):
                        continue
                    entries.append((st.st_mtime, st.st_size, e.path))
                    total += st.st_size
                for _, size, path in sorted(entries):
                    if total <= self.max_bytes:
                        break
                    if path == keep:
                        continue
                    _unlink(path)
                    total -= size
                    stats.add("cache_evictions")
                    log.debug("evicted %s from the cache", path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
