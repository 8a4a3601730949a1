"""Local paths and ``file://`` URLs: open (with optional sha256 verification), write atomically, copy."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from typing import BinaryIO

from pipeline.storage.base import ChecksumMismatchError, StorageError, StorageNotFoundError, local_path, stats


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


def open_file(url: str, sha256: str | None = None) -> BinaryIO:
    """A local file for reading; with ``sha256`` its hash is checked when it has been read to the end."""
    path = local_path(url)
    try:
        f = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise StorageNotFoundError(f"shard not found: {path}") from None
    except IsADirectoryError:
        raise StorageError(f"expected a file, found a directory: {path}") from None
    except PermissionError:
        raise StorageError(f"permission denied reading {path}: check the file's mode/owner") from None
    return _VerifyingFile(f, path, sha256) if sha256 else f  # type: ignore[return-value]


def exists(url: str) -> bool:
    return os.path.isfile(local_path(url))


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


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file atomically (temp file + rename)."""
    path = local_path(url)
    try:
        _local_write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror or e}") from e


def upload_file(local: str, url: str) -> None:
    """Copy the local file ``local`` to ``url`` atomically (nothing to do when both are the same file)."""
    path = local_path(url)
    if os.path.abspath(path) == os.path.abspath(local):
        return
    try:
        with open(local, "rb") as src:
            _local_write_atomic(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    except OSError as e:
        raise StorageError(f"cannot copy {local} to {path}: {e.strerror or e}") from e
