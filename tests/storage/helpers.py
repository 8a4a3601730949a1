"""Constants and options shared by the storage tests."""

from __future__ import annotations

from pipeline import storage

BUCKET = "shards"

# sizes chosen to cover: empty, one byte, exactly one chunk, chunk +- 1, several chunks
CHUNK = 64 << 10
SIZES = [0, 1, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 300_000, 700_001]


def fast_options(**kw) -> storage.StorageOptions:
    """Short timeouts and backoff so fault tests finish in seconds."""
    base = dict(connect_timeout_s=1.0, read_timeout_s=0.4, max_attempts=10, backoff_s=0.01, backoff_max_s=0.05,
                chunk_bytes=CHUNK, readahead_chunks=4)
    base.update(kw)
    return storage.StorageOptions(**base)
