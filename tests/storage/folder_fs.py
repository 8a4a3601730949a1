"""A test fsspec filesystem, ``msdir://``, backed by a local folder and needing no network.

It stands for gcsfs / adlfs / HfFileSystem in tests: reads go through fsspec's ``AbstractFileSystem`` API, so the
storage layer cannot tell it from a real remote store. It can inject faults (a seeded fraction of reads raise
``ConnectionResetError`` after returning part of the data) and it refuses to be used in a process other than
the one that created it, the way an async filesystem's event loop breaks after fork (s3fs #914).
"""

from __future__ import annotations

import os
import random

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "msdir"


class ForkedUseError(RuntimeError):
    """The filesystem instance was created in another process (inherited through fork)."""


class _FlakyFile:
    def __init__(self, f, fs: FolderFS) -> None:
        self._f, self._fs = f, fs

    def seek(self, *a):
        return self._f.seek(*a)

    def read(self, n: int = -1) -> bytes:
        self._fs.check_pid()
        fs = self._fs
        if fs.fault_rate and fs.rng.random() < fs.fault_rate:
            fs.faults += 1
            raise ConnectionResetError("injected: connection reset by the test filesystem")
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


class FolderFS(DirFileSystem):
    """``msdir://rel/path`` is ``<root>/rel/path``; root, fault rate and seed are class settings made before fork."""

    protocol = PROTOCOL
    root: str | None = None
    fault_rate = 0.0
    seed = 0
    pid_log: str | None = None
    """A file that gets one line per instance: the pid that created it."""

    def __init__(self, **kw) -> None:
        if self.root is None:
            raise ValueError("FolderFS.root is not set")
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True), **kw)  # like an object store: no folders to make
        self.pid = os.getpid()
        self.rng = random.Random(f"{self.seed}:{self.pid}")
        self.faults = 0
        if self.pid_log:
            with open(self.pid_log, "a") as f:
                f.write(f"{self.pid}\n")

    def check_pid(self) -> None:
        if os.getpid() != self.pid:
            raise ForkedUseError(f"filesystem created in pid {self.pid} used in pid {os.getpid()}")

    def info(self, path, **kw):
        self.check_pid()
        return super().info(path, **kw)

    def open(self, path, *args, **kw):
        self.check_pid()
        return _FlakyFile(super().open(path, *args, **kw), self)


def register() -> None:
    fsspec.register_implementation(PROTOCOL, FolderFS, clobber=True)
