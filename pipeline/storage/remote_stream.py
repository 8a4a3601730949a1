"""A sequential reader over a remote object that survives faults.

:class:`RemoteStream` asks a *source* (:class:`pipeline.storage.s3.S3Source`,
:class:`pipeline.storage.http.HttpSource`) for the object from byte ``pos`` onwards, reads it in
chunks, and when an attempt fails (timeout, connection reset, body cut short, 5xx) waits with
exponential backoff and asks again from the last byte received: a Range request, guarded by the
object's ETag so a replaced object is never spliced into the old one. Attempts without progress are
bounded by ``max_attempts``; retries over the stream's life by ``max_total_retries``.

With ``readahead_chunks > 0`` a daemon thread runs the fetch loop and keeps up to that many chunks
queued, so the consumer (tar parsing, decoding) overlaps with the download.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import Protocol

from pipeline.storage.base import ChecksumMismatchError, StorageError, StorageOptions, StorageStats, redact_url, stats

log = logging.getLogger(__name__)


class PastEnd:
    """The answer to a range that starts at or past the end of the object (HTTP 416)."""

    size = None
    etag = None
    past_end = True

    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass


class TransientError(Exception):
    """One attempt failed in a way worth retrying (internal: never escapes this package)."""


class Response(Protocol):
    size: int | None
    """Total size of the object in bytes, when the server said."""
    etag: str | None
    """Validator of the object's version (ETag or Last-Modified), used to guard resumes."""

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at the end. Raises TransientError or StorageError."""

    def close(self) -> None: ...

    # optional: ``abort()``, called from another thread when the request's deadline passes; it must make a read
    # that is blocked in that moment return or raise (shut the socket down)


class Source(Protocol):
    url: str

    def describe(self) -> str:
        """The URL plus where it is fetched from, for error messages."""

    def open(self, start: int, etag: str | None, end: int | None = None) -> Response:
        """Request bytes ``start`` .. ``end`` (exclusive; None: to the end). Raises TransientError or StorageError."""

    def exists(self) -> bool: ...


_EOF = object()


class _Watchdog:
    """One daemon thread per process that calls ``fn`` once ``deadline`` (monotonic seconds) passes, unless cancelled.

    Cheaper than a ``threading.Timer`` per request (a thread start costs ~0.1-0.7 ms); restarted lazily after fork.
    """

    def __init__(self) -> None:
        self._after_fork()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, list]] = []
        self._seq = 0
        self._compact_at = 4096
        self._thread: threading.Thread | None = None

    def add(self, deadline: float, fn) -> list:
        """Schedule ``fn``; returns a handle for :meth:`cancel`."""
        entry = [fn]
        with self._cv:
            self._seq += 1
            if len(self._heap) >= self._compact_at:  # mostly requests that finished in time: drop them
                self._heap = [e for e in self._heap if e[2][0] is not None]
                heapq.heapify(self._heap)
                self._compact_at = max(4096, 2 * len(self._heap))
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, self._seq, entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="storage-deadlines", daemon=True)
                self._thread.start()
            if earliest:  # the thread waits for the earliest deadline only
                self._cv.notify()
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[0] = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][2][0] is None:  # cancelled: drop without waiting
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cv.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cv.wait(wait)
                    continue
                _, _, entry = heapq.heappop(self._heap)
            fn, entry[0] = entry[0], None
            if fn is not None:
                fn()


_watchdog = _Watchdog()


class _Deadline:
    """A response with a total deadline: past it, the watchdog aborts the response (``abort()``: shuts its socket, so
    a blocked read returns) and every read raises TransientError, so the stream retries from the last byte."""

    past_end = False

    def __init__(self, resp: Response, started: float, deadline_s: float) -> None:
        self._resp, self._deadline_s = resp, deadline_s
        self.size, self.etag = resp.size, resp.etag
        self.expired = False
        self._timer = _watchdog.add(started + deadline_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        abort = getattr(self._resp, "abort", None)
        if abort is not None:
            try:
                abort()
            except OSError as e:  # the connection is already gone: the read fails by itself
                log.debug("aborting a request past its deadline: %s", e)

    def _late(self) -> TransientError:
        return TransientError(
            f"no complete answer within storage.request_deadline_s={self._deadline_s:g} s (the server sends too slowly)"
        )

    def read(self, n: int) -> bytes:
        if self.expired:
            raise self._late()
        try:
            chunk = self._resp.read(n)
        except (TransientError, StorageError, OSError, ValueError):
            if self.expired:  # the abort broke the read
                raise self._late() from None
            raise
        if self.expired and not chunk:  # an aborted read can look like the end of the object
            raise self._late()
        return chunk

    def close(self) -> None:
        _watchdog.cancel(self._timer)
        self._resp.close()


def backoff_delay(opts: StorageOptions, failures: int, salt: str) -> float:
    """Exponential backoff with deterministic jitter in [0.5, 1] of the nominal delay."""
    nominal = min(opts.backoff_max_s, opts.backoff_s * (2 ** (failures - 1)))
    return nominal * (0.5 + 0.5 * random.Random(f"{salt}:{failures}").random())


class RemoteStream(io.RawIOBase):
    """Read-only, resumable stream over one remote object; sequential, with cheap seeks.

    ``read(n)`` returns exactly ``n`` bytes unless the end is reached. Errors surface as
    :class:`StorageError` (subclasses: not found, checksum mismatch) naming the URL. The first
    request is made in the constructor, so a missing object or bad credentials fail at open time.
    ``seek`` to a short distance ahead reads through; anywhere else it issues a new Range request
    (the shard index's byte offsets make this a random-access reader). A seek ends sha256
    verification for the stream (the hash covers one sequential pass only).
    """

    def __init__(self, source: Source, opts: StorageOptions, *, sha256: str | None = None, readahead: bool = True,
                 start: int = 0, end: int | None = None):
        super().__init__()
        self._end = end  # exclusive; None = to the end of the object (read_range sets it)
        self.url = redact_url(source.url)  # for messages and logs
        self.stats = StorageStats()
        self._source, self._opts = source, opts
        self._expected = sha256.lower() if sha256 else None
        self._hash = hashlib.sha256() if sha256 else None
        self._threaded = readahead and opts.readahead_chunks > 0
        self._retries = 0  # over the stream's life
        self._etag: str | None = None
        self.size: int | None = None
        self._buf = b""
        self._off = 0
        self._pos = 0  # logical position of the consumer
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._gen: Iterator[bytes] | None = None
        self._queue: queue.Queue | None = None
        self._count("streams")
        first = self._request(start, [0], self._stop)  # fail fast: missing object, credentials
        self.size, self._etag = first.size, first.etag
        self._pos = start
        self._start(start, first)

    # -- fetching (runs in the read-ahead thread when there is one) ---------------------------

    def _count(self, name: str, n: int = 1) -> None:
        self.stats.add(name, n)
        stats.add(name, n)

    def _start(self, pos: int, resp: Response | None) -> None:
        """Begin producing chunks from byte ``pos`` (``resp``: an already-open response at ``pos``)."""
        self._stop = stop = threading.Event()
        gen = self._chunks(pos, resp, stop)
        self._buf, self._off, self._done, self._error = b"", 0, False, None
        if self._threaded:
            self._gen = None
            self._queue = q = queue.Queue(maxsize=self._opts.readahead_chunks)
            threading.Thread(target=self._pump, args=(gen, q, stop), name=f"readahead {self.url}", daemon=True).start()
        else:
            self._gen, self._queue = gen, None

    def _halt(self) -> None:
        """Stop the current producer; its thread exits within ~0.1 s or one read timeout."""
        self._stop.set()
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        if self._queue is not None:
            while True:  # free queued chunks now
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue = None

    def _request(self, pos: int, failures: list[int], stop: threading.Event) -> Response:
        while True:
            try:
                self._count("requests")
                if pos:
                    self._count("resumes")
                started = time.monotonic()
                resp = self._source.open(pos, self._etag, self._end)
                if getattr(resp, "past_end", False):
                    return resp
                return _Deadline(resp, started, self._opts.request_deadline_s)
            except TransientError as e:
                self._after_failure(e, pos, failures, stop)
            except StorageError:
                self._count("errors")
                raise

    def _after_failure(self, err: TransientError, pos: int, failures: list[int], stop: threading.Event) -> None:
        """Count a failed attempt; sleep before the next one, or raise when the bounds are spent."""
        failures[0] += 1
        self._retries += 1
        opts = self._opts
        if failures[0] >= opts.max_attempts or self._retries > opts.max_total_retries:
            self._count("errors")
            of = f" of {self.size}" if self.size is not None else ""
            raise StorageError(
                f"reading {self._source.describe()} failed at byte {pos}{of} after {failures[0]} consecutive "
                f"attempt(s) ({self._retries - 1} retries in total): {err}; check the endpoint and the network, "
                "or raise storage.max_attempts / storage.read_timeout_s"
            ) from err
        self._count("retries")
        delay = backoff_delay(opts, failures[0], self.url)
        log.info("retrying %s at byte %d in %.2fs (attempt %d/%d): %s", self.url, pos, delay,
                 failures[0] + 1, opts.max_attempts, err)
        if stop.wait(delay):
            raise StorageError(f"stream {self.url} closed while waiting to retry")

    def _chunks(self, pos: int, resp: Response | None, stop: threading.Event) -> Iterator[bytes]:
        failures = [0]  # consecutive failures without progress
        n = self._opts.chunk_bytes
        limit = self._end if self.size is None else min(self.size, self._end if self._end is not None else self.size)
        try:
            while not stop.is_set():
                try:
                    if resp is None:
                        resp = self._request(pos, failures, stop)
                        if resp.size is not None and self.size is not None and resp.size != self.size:
                            raise StorageError(
                                f"{self._source.describe()} changed size from {self.size} to {resp.size} bytes "
                                "while being read; re-run once the upload has finished"
                            )
                    if getattr(resp, "past_end", False):  # HTTP 416: nothing at or after pos
                        return
                    want = n if limit is None else min(n, limit - pos)
                    chunk = resp.read(want) if want > 0 else b""
                    if not chunk and limit is not None and pos < limit:
                        raise TransientError(f"connection closed at byte {pos} of {limit}")
                except TransientError as e:
                    if resp is not None:
                        resp.close()
                    resp = None
                    self._after_failure(e, pos, failures, stop)
                    continue
                if not chunk:
                    return
                pos += len(chunk)
                if not getattr(resp, "expired", False):  # bytes cut loose by a deadline abort are no progress
                    failures[0] = 0
                self._count("bytes_fetched", len(chunk))
                yield chunk
        finally:
            if resp is not None:
                resp.close()

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, gen: Iterator[bytes], q: queue.Queue, stop: threading.Event) -> None:
        terminal_sent = False
        try:
            for chunk in gen:
                if not self._put(q, stop, chunk):
                    return
            terminal_sent = self._put(q, stop, _EOF)
        except StorageError as e:
            terminal_sent = self._put(q, stop, e)
        finally:
            gen.close()
            if not terminal_sent and not stop.is_set():
                self._put(q, stop, StorageError(f"read-ahead thread for {self.url} stopped unexpectedly (see the log)"))

    # -- consuming -----------------------------------------------------------------------------

    def _next_chunk(self) -> bytes | None:
        if self._error is not None:
            raise self._error
        if self._done:
            return None
        try:
            if self._gen is not None:
                item: object = next(self._gen, _EOF)
            else:
                assert self._queue is not None
                item = self._queue.get()
        except StorageError as e:
            self._error = e
            raise
        if item is _EOF:
            self._done = True
            self._verify()
            return None
        if isinstance(item, BaseException):
            self._error = item
            raise item
        if self._hash is not None:
            self._hash.update(item)  # type: ignore[arg-type]
        return item  # type: ignore[return-value]

    def _verify(self) -> None:
        if self._hash is None:
            return
        got, self._hash = self._hash.hexdigest(), None
        if got != self._expected:
            self._count("checksum_mismatches")
            self._error = ChecksumMismatchError(
                f"sha256 mismatch for {self.url}: expected {self._expected}, got {got}; the object is corrupt or "
                "differs from the manifest: re-upload the shard or rebuild the manifest"
            )
            raise self._error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        if self.closed:
            raise ValueError(f"I/O operation on closed stream {self.url}")
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError(f"seek on closed stream {self.url}")
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            if self.size is None:
                raise io.UnsupportedOperation(f"{self.url}: size unknown, cannot seek from the end")
            offset += self.size
        elif whence != io.SEEK_SET:
            raise ValueError(f"invalid whence {whence}")
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        if offset == self._pos:
            return offset
        if self._hash is not None:
            log.debug("%s: seek ends sha256 verification of this stream", self.url)
            self._hash = None
        gap = offset - self._pos
        if 0 < gap <= self._opts.chunk_bytes * (self._opts.readahead_chunks + 1):
            while gap > 0:  # near: the bytes are (probably) already fetched
                got = len(self.read(min(gap, 1 << 20)))
                if not got:
                    break
                gap -= got
            self._pos = offset
            return offset
        self._halt()
        self._pos = offset
        if self.size is not None and offset >= self.size:
            self._stop = threading.Event()
            self._buf, self._off, self._done, self._error, self._gen, self._queue = b"", 0, True, None, None, None
        else:
            self._start(offset, None)
        return offset

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError(f"read from closed stream {self.url}")
        if size is None or size < 0:
            parts = [self._buf[self._off :]]
            self._buf, self._off = b"", 0
            while (chunk := self._next_chunk()) is not None:
                parts.append(chunk)
            out = b"".join(parts)
            self._pos += len(out)
            return out
        avail = len(self._buf) - self._off
        if size <= avail:  # fast path: tarfile reads small blocks
            out = self._buf[self._off : self._off + size]
            self._off += size
            self._pos += size
            return out
        parts = [self._buf[self._off :]]
        got = avail
        self._buf, self._off = b"", 0
        while got < size:
            chunk = self._next_chunk()
            if chunk is None:
                break
            need = size - got
            if len(chunk) > need:
                parts.append(chunk[:need])
                self._buf, self._off = chunk, need
                got = size
            else:
                parts.append(chunk)
                got += len(chunk)
        self._pos += got
        return b"".join(parts)

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed and hasattr(self, "_gen"):  # hasattr: the constructor may have raised
            self._halt()
        super().close()


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (bounded; for locks and servers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
