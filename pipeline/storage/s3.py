"""``s3://bucket/key`` objects through boto3: one client per process, created lazily after fork.

Reads disable botocore's own retries (``total_max_attempts=1``) so that every retry goes through
:class:`pipeline.storage.remote_stream.RemoteStream`, which resumes with a Range request and counts it.
Writes keep botocore's standard retries (``max_attempts`` tries), since a PUT is simply repeated.
Credentials come only from the environment / standard AWS chain (env vars, profile, SSO, instance
role); nothing here reads, stores or logs them. Checksums that newer boto3 adds by default are
only sent/validated when required, for compatibility with S3-compatible stores (MinIO, Ceph, R2).
"""

from __future__ import annotations

import logging
import os
import threading
from urllib.parse import urlparse

from pipeline.storage.base import StorageError, StorageNotFoundError, StorageOptions
from pipeline.storage.remote_stream import PastEnd, TransientError

try:
    import boto3
    import botocore.exceptions as bex
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore import UNSIGNED
    from botocore.config import Config
except ImportError:  # the optional [s3] extra is not installed
    boto3 = None

log = logging.getLogger(__name__)

_MULTIPART_BYTES = 64 << 20

if boto3 is not None:
    _RETRYABLE = (
        bex.ConnectionError,  # endpoint refused/unreachable, connect timeout
        bex.HTTPClientError,  # read timeout, connection closed, body cut short (ResponseStreamingError)
        bex.IncompleteReadError,  # fewer body bytes than Content-Length
    )
    _CREDENTIALS = (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError)
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_AUTH = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
    "TokenRefreshRequired", "AuthorizationHeaderMalformed", "403",
}
_THROTTLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}

_CRED_FIX = (
    "credentials come only from the environment or the standard AWS chain: check AWS_ACCESS_KEY_ID / "
    "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) or AWS_PROFILE, or set storage.anonymous=true for a public bucket"
)

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def reset_clients() -> None:
    """Forget every cached client (the next call creates new ones from the current environment)."""
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=reset_clients)  # a parent's client (sockets, pools) is not fork-safe


def _require_boto3(url: str) -> None:
    if boto3 is None:
        raise StorageError(f"reading {url} needs boto3: pip install 'molstream[s3]'")


def client(opts: StorageOptions, *, write: bool = False):
    """This process's boto3 S3 client for these options (created on first use, keyed by pid)."""
    endpoint = opts.resolved_endpoint()
    key = (os.getpid(), write, endpoint, opts.region, opts.addressing_style, opts.anonymous,
           opts.connect_timeout_s, opts.read_timeout_s, opts.max_attempts)
    c = _clients.get(key)
    if c is not None:
        return c
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _make_client(opts, endpoint, write)
            _clients[key] = c
    return c


def _make_client(opts: StorageOptions, endpoint: str | None, write: bool):
    session = boto3.session.Session()
    region = opts.region or session.region_name or "us-east-1"
    style = opts.addressing_style
    if style == "auto" and endpoint:
        style = "path"  # S3-compatible stores rarely have wildcard DNS for virtual-host buckets
    cfg = Config(
        connect_timeout=opts.connect_timeout_s,
        read_timeout=opts.read_timeout_s,
        retries={"total_max_attempts": opts.max_attempts if write else 1, "mode": "standard"},
        s3={"addressing_style": style},
        max_pool_connections=32,
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        **({"signature_version": UNSIGNED} if opts.anonymous else {}),
    )
    try:
        c = session.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
    except ValueError as e:  # malformed endpoint URL
        raise StorageError(
            f"invalid S3 endpoint {endpoint!r}: {e}; fix storage.endpoint_url or AWS_ENDPOINT_URL(_S3)"
        ) from None
    log.debug("created S3 client in pid %d (endpoint %s, region %s, %s)", os.getpid(),
              endpoint or "AWS default", region, "write" if write else "read")
    return c


def parse_url(url: str) -> tuple[str, str]:
    p = urlparse(url)
    bucket, key = p.netloc, p.path.lstrip("/")
    if not bucket or not key:
        raise StorageError(f"bad S3 URL {url!r}: expected s3://bucket/key")
    return bucket, key


class _S3Response:
    def __init__(self, body, size: int | None, etag: str | None, url: str) -> None:
        self._body, self.size, self.etag, self._url = body, size, etag, url

    def read(self, n: int) -> bytes:
        try:
            return self._body.read(n)
        except _RETRYABLE as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        self._body.close()


class S3Source:
    """One S3 object: ranged GETs for :class:`RemoteStream`, HEAD, PUT and multipart upload."""

    def __init__(self, url: str, opts: StorageOptions) -> None:
        _require_boto3(url)
        self.url, self._opts = url, opts
        self.bucket, self.key = parse_url(url)
        self.endpoint = opts.resolved_endpoint()

    def describe(self) -> str:
        return f"{self.url} (endpoint {self.endpoint or 'AWS default'})"

    def _classify(self, e: bex.ClientError, start: int = 0) -> Exception:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        msg = err.get("Message") or code
        if code in _NOT_FOUND or status == 404:
            what = "bucket" if code == "NoSuchBucket" else "object"
            return StorageNotFoundError(
                f"not found: {self.describe()}: no such {what}; check the bucket, the prefix and the endpoint"
            )
        if code in _AUTH or status in (401, 403):
            return StorageError(f"access denied to {self.describe()} ({code}: {msg}); {_CRED_FIX}")
        if code == "PreconditionFailed" or status == 412:
            return StorageError(
                f"{self.describe()} was replaced while being read (ETag changed); re-run once the upload has finished"
            )
        if status >= 500 or status == 429 or code in _THROTTLE:
            return TransientError(f"HTTP {status} {code}")
        return StorageError(f"S3 error reading {self.describe()}: HTTP {status} {code}: {msg}")

    def open(self, start: int, etag: str | None, end: int | None = None):
        kwargs = {"Bucket": self.bucket, "Key": self.key}
        if end is not None:
            kwargs["Range"] = f"bytes={start}-{end - 1}"
        elif start:
            kwargs["Range"] = f"bytes={start}-"
        if etag:
            kwargs["IfMatch"] = etag
        try:
            r = client(self._opts).get_object(**kwargs)
        except bex.ClientError as e:
            if "Range" in kwargs and e.response.get("Error", {}).get("Code") == "InvalidRange":
                return PastEnd()  # resumed exactly at the end, or a range past it
            raise self._classify(e, start) from None
        except _RETRYABLE as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        except _CREDENTIALS as e:
            raise StorageError(f"cannot sign a request for {self.url}: {e}; {_CRED_FIX}") from None
        size = r.get("ContentLength")
        content_range = r.get("ContentRange")  # "bytes 100-199/200"
        if content_range and "/" in content_range:
            total = content_range.rsplit("/", 1)[1]
            size = int(total) if total.isdigit() else None
        return _S3Response(r["Body"], size, r.get("ETag"), self.url)

    def exists(self) -> bool:
        try:
            client(self._opts).head_object(Bucket=self.bucket, Key=self.key)
            return True
        except bex.ClientError as e:
            err = self._classify(e)
            if isinstance(err, StorageNotFoundError):
                return False
            raise (err if isinstance(err, StorageError) else StorageError(f"HEAD {self.describe()} failed: {err}")) from None
        except _RETRYABLE as e:
            raise StorageError(f"cannot reach {self.describe()}: {e}; check the endpoint and the network") from None
        except _CREDENTIALS as e:
            raise StorageError(f"cannot sign a request for {self.url}: {e}; {_CRED_FIX}") from None

    # -- writing -------------------------------------------------------------------------------

    def _write_error(self, e: BaseException) -> StorageError:
        if isinstance(e, bex.ClientError):
            err = self._classify(e)
            if isinstance(err, StorageError):
                return err
            return StorageError(f"writing {self.describe()} failed after {self._opts.max_attempts} attempts: {err}")
        if isinstance(e, _CREDENTIALS):
            return StorageError(f"cannot sign a request for {self.url}: {e}; {_CRED_FIX}")
        return StorageError(
            f"writing {self.describe()} failed after {self._opts.max_attempts} attempts: {e}; "
            "check the endpoint and the network"
        )

    def put_bytes(self, data: bytes) -> None:
        try:
            client(self._opts, write=True).put_object(Bucket=self.bucket, Key=self.key, Body=data)
        except (bex.ClientError, *_RETRYABLE, *_CREDENTIALS) as e:
            raise self._write_error(e) from None

    def upload_file(self, local_path: str) -> None:
        cfg = TransferConfig(multipart_threshold=_MULTIPART_BYTES, multipart_chunksize=_MULTIPART_BYTES,
                             max_concurrency=4)
        try:
            client(self._opts, write=True).upload_file(local_path, self.bucket, self.key, Config=cfg)
        except S3UploadFailedError as e:
            cause = e.__context__
            if isinstance(cause, (bex.ClientError, *_RETRYABLE, *_CREDENTIALS)):
                raise self._write_error(cause) from None
            raise StorageError(f"uploading {local_path} to {self.describe()} failed: {e}") from None
        except (bex.ClientError, *_RETRYABLE, *_CREDENTIALS) as e:
            raise self._write_error(e) from None
