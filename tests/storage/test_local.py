"""Local paths and file:// behind the same interface: reads, sha256 verification, atomic writes."""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline import storage


def test_local_read_join_and_file_url(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s.tar").write_bytes(b"hello")
    u = storage.join(str(tmp_path), "a", "s.tar")
    assert storage.scheme_of(u) == "file" and storage.read_bytes(u) == b"hello"
    assert storage.read_bytes(f"file://{u}") == b"hello"
    assert storage.exists(u) and not storage.exists(u + "x")
    assert storage.join("s3://b/p/", "a", "/s.tar") == "s3://b/p/a/s.tar"


def test_local_missing_and_directory(tmp_path):
    with pytest.raises(storage.StorageNotFoundError, match=r"shard not found: .*nope\.tar"):
        storage.open_stream(str(tmp_path / "nope.tar"))
    with pytest.raises(storage.StorageError, match="expected a file, found a directory"):
        storage.open_stream(str(tmp_path))


def test_local_sha256_checked_at_end(tmp_path):
    p = tmp_path / "s.tar"
    p.write_bytes(b"x" * 5000)
    good = hashlib.sha256(b"x" * 5000).hexdigest()
    with storage.open_stream(str(p), sha256=good) as f:
        assert f.read(100) == b"x" * 100
        assert storage.finish(f) == 4900
    with storage.open_stream(str(p), sha256="1" * 64) as f:
        f.read(10)
        with pytest.raises(storage.ChecksumMismatchError, match=r"s\.tar: expected 1111"):
            storage.finish(f)
    with storage.open_stream(str(p), sha256="1" * 64) as f:  # a seek ends verification (partial reads)
        f.seek(4000)
        assert f.read() == b"x" * 1000


def test_local_writes_are_atomic(tmp_path):
    target = tmp_path / "out" / "index" / "protein.parquet"
    storage.write_bytes(str(target), b"abc")
    assert target.read_bytes() == b"abc"
    src = tmp_path / "src.tar"
    src.write_bytes(os.urandom(3 << 20))
    storage.upload_file(str(src), str(tmp_path / "out" / "p" / "s.tar"))
    assert (tmp_path / "out" / "p" / "s.tar").read_bytes() == src.read_bytes()
    assert not [n for n in os.listdir(tmp_path / "out" / "p") if n.endswith(".tmp")]
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(storage.StorageError, match="cannot write .*afile/x"):
        storage.write_bytes(str(tmp_path / "afile" / "x"), b"1")  # parent is a file: fails for root too


def test_unsupported_scheme_names_the_url():
    # gs://, az://, hf:// ... go through fsspec now (tests/storage/test_fsspec.py); a scheme fsspec lacks is refused
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme 'nosuch' in 'nosuch://b/k'.*supported: local"):
        storage.open_stream("nosuch://b/k")


def test_local_read_range(tmp_path):
    (tmp_path / "s.tar").write_bytes(bytes(range(256)))
    assert storage.read_range(str(tmp_path / "s.tar"), 250, 10) == bytes(range(250, 256))
    with pytest.raises(ValueError, match="must be >= 0"):
        storage.read_range(str(tmp_path / "s.tar"), -1, 10)
