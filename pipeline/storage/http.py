"""``http(s)://`` objects (read-only) through urllib3: one pool per process, created after fork.

Resumes use ``Range: bytes=N-``; a server that ignores ranges (plain 200) is handled by skipping
the first N bytes. The ETag (else Last-Modified) of the first response guards every resume.
Content is requested with ``Accept-Encoding: identity`` so byte offsets are those of the file.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading

import urllib3

from pipeline.storage.base import StorageError, StorageNotFoundError, StorageOptions, redact_url
from pipeline.storage.remote_stream import PastEnd, TransientError

log = logging.getLogger(__name__)

_pools: dict[tuple, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()

_RETRYABLE = (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def reset_clients() -> None:
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=reset_clients)


def pool(opts: StorageOptions) -> urllib3.PoolManager:
    key = (os.getpid(), opts.connect_timeout_s, opts.read_timeout_s)
    p = _pools.get(key)
    if p is None:
        with _pools_lock:
            p = _pools.get(key)
            if p is None:
                p = urllib3.PoolManager(
                    num_pools=16,
                    maxsize=16,
                    timeout=urllib3.Timeout(connect=opts.connect_timeout_s, read=opts.read_timeout_s),
                    # no retries here (RemoteStream retries and counts them); redirects are followed
                    retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
                )
                _pools[key] = p
    return p


class _HttpResponse:
    def __init__(self, source: HttpSource, resp: urllib3.BaseHTTPResponse, size: int | None, etag: str | None,
                 skip: int) -> None:
        self._source, self._resp, self.size, self.etag, self._skip = source, resp, size, etag, skip

    def read(self, n: int) -> bytes:
        try:
            while self._skip:  # the server ignored our Range header: drop what we already have
                dropped = self._resp.read(min(self._skip, 1 << 20))
                if not dropped:
                    raise TransientError("connection closed while skipping to the resume offset")
                self._skip -= len(dropped)
            return self._resp.read(n)
        except _RETRYABLE as e:
            raise self._source._transient(e) from e

    def close(self) -> None:
        self._resp.release_conn()
        self._resp.close()


def _unwrap(e: BaseException) -> BaseException:
    return e.reason if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None else e


class HttpSource:
    def __init__(self, url: str, opts: StorageOptions) -> None:
        self.url, self._opts = url, opts
        self.name = redact_url(url)  # for messages and logs
        self._query = urllib3.util.parse_url(url).query

    def describe(self) -> str:
        return self.name

    def _transient(self, e: BaseException) -> TransientError:
        text = f"{type(e).__name__}: {e}"
        return TransientError(text.replace(self._query, "<redacted>") if self._query else text)

    def _request(self, method: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        try:
            return pool(self._opts).request(method, self.url, headers=headers, preload_content=False,
                                            decode_content=False)
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.ResponseError):  # too many redirects
                raise StorageError(f"{self.name}: {e.reason}") from None
            raise self._transient(_unwrap(e)) from e
        except urllib3.exceptions.LocationValueError as e:
            raise StorageError(f"bad URL {self.name!r}: {e}") from None
        except _RETRYABLE as e:
            raise self._transient(e) from e

    def _status_error(self, status: int) -> Exception:
        if status in (404, 410):
            return StorageNotFoundError(f"not found: {self.name} (HTTP {status}); check the URL and the server's root")
        if status in (401, 403):
            return StorageError(
                f"access denied to {self.name} (HTTP {status}); http(s) sources take no credentials: "
                "serve the files publicly or use a presigned URL"
            )
        if status in _TRANSIENT_STATUS or status >= 500:
            return TransientError(f"HTTP {status}")
        return StorageError(f"unexpected HTTP {status} for {self.name}")

    def open(self, start: int, etag: str | None, end: int | None = None):
        headers = {"Accept-Encoding": "identity"}
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        elif start:
            headers["Range"] = f"bytes={start}-"
        r = self._request("GET", headers)
        status = r.status
        if status == 416 and "Range" in headers:
            r.release_conn()
            return PastEnd()
        if status not in (200, 206):
            r.drain_conn()
            r.release_conn()
            raise self._status_error(status)
        validator = r.headers.get("ETag") or r.headers.get("Last-Modified")
        if etag and validator and validator != etag:
            r.release_conn()
            raise StorageError(f"{self.name} changed while being read (ETag/Last-Modified differs); re-run")
        length = r.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        skip = 0
        if status == 206:
            total = r.headers.get("Content-Range", "").rsplit("/", 1)[-1]
            size = int(total) if total.isdigit() else None
        elif start:
            skip = start  # Range ignored: full body again
        return _HttpResponse(self, r, size, validator, skip)

    def exists(self) -> bool:
        try:
            r = self._request("HEAD", {"Accept-Encoding": "identity"})
        except TransientError as e:
            raise StorageError(f"cannot reach {self.name}: {e}; check the URL and the network") from None
        r.release_conn()
        if r.status == 200:
            return True
        err = self._status_error(r.status)
        if isinstance(err, StorageNotFoundError):
            return False
        raise err if isinstance(err, StorageError) else StorageError(f"HEAD {self.name} failed: {err}")
