"""Real servers on 127.0.0.1 for storage tests and benchmarks (no in-process mocking).

- :class:`MotoServer`: moto's standalone S3 server (``moto_server -H 127.0.0.1 -p PORT``) in a
  subprocess, with IAM authentication switched on and one user whose key pair is exported through
  :meth:`MotoServer.env` (so wrong credentials are really rejected).
- :class:`FaultProxy`: an HTTP/1.1 forwarding proxy in front of any loopback server that, for a
  seeded fraction of requests, answers 500/503, cuts the body in half and closes the connection, or
  stalls (before the headers or mid-body) past the client's read timeout. ``proxy.counts`` tells
  how many faults of each kind it injected.
- :class:`FolderServer`: ``http.server`` serving a folder, with or without Range support.

Used by ``tests/storage`` and ``benchmarks/s3_stream.py``; other tests can build on them (e.g. a
training run streaming from :class:`MotoServer`). Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s}s") from None
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# moto


class MotoServer:
    """moto's S3 server as a subprocess on 127.0.0.1; IAM auth on, one full-access user.

    ``env()`` gives the variables a client process needs (credentials, region, endpoint).
    """

    user = "molstream-test"

    def __init__(self, auth: bool = True) -> None:
        self.auth = auth
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.access_key = "testing-no-auth"
        self.secret_key = "testing-no-auth"
        self._log = tempfile.TemporaryFile()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> MotoServer:
        exe = shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            self.proc = subprocess.Popen([*cmd, "-H", LOOPBACK, "-p", str(self.port)], env=env,
                                         stdout=self._log, stderr=subprocess.STDOUT)
            try:
                wait_listening(self.port, timeout_s)
                break
            except TimeoutError:
                self.stop()
        else:
            raise RuntimeError(f"moto_server did not start: {self.output()}")
        if self.auth:
            self._enable_auth()
        return self

    def _enable_auth(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName=self.user)
        key = iam.create_access_key(UserName=self.user)["AccessKey"]
        iam.put_user_policy(UserName=self.user, PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        conn.request("POST", "/moto-api/reset-auth", body=b"0")  # from now on every request is authenticated
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"moto refused to enable authentication: HTTP {resp.status}")

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment for clients: this server's credentials, region, and ``endpoint`` (default: the server)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint or self.endpoint,
        }

    def boto3_client(self):
        """A plain boto3 client with this server's credentials (for test setup: buckets, uploads)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()


# --------------------------------------------------------------------------------------------
# fault-injecting proxy

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
FAULT_KINDS = ("500", "503", "cut", "stall", "stall_body")


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("proxy: " + fmt, *args)

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        body = self._read_body()
        fault = self.server.decide(self.command)
        try:
            if fault in ("500", "503"):
                self.server.count(fault)
                code = "InternalError" if fault == "500" else "SlowDown"
                payload = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                self.send_response_only(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True
                return
            if fault == "stall":
                self.server.count(fault)
                self.server.stop_event.wait(self.server.stall_s)
                self.close_connection = True
                return
            status, reason, headers, data = self._upstream(body)
            cut = fault in ("cut", "stall_body") and self.command != "HEAD" and len(data) >= 2
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            if self.command == "HEAD":
                length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("Content-Length", length)
            else:
                self.send_header("Content-Length", str(len(data)))
            if cut:
                self.server.count(fault)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if fault == "stall_body":
                    self.server.stop_event.wait(self.server.stall_s)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:  # the client gave up (timeout) first
            log.debug("proxy: client went away: %s", e)
            self.close_connection = True

    def _upstream(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(LOOPBACK, self.server.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-response (timeouts, cut streams, closed readers) are normal here."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            log.debug("%s: client %s went away: %s", type(self).__name__, client_address, err)
        else:
            super().handle_error(request, client_address)


class _ProxyServer(_QuietServer):
    daemon_threads = True
    block_on_close = False
    upstream_port: int
    stall_s: float
    stop_event: threading.Event

    def decide(self, method: str) -> str | None:
        p: FaultProxy = self.owner  # type: ignore[attr-defined]
        return p._decide(method)

    def count(self, kind: str) -> None:
        self.owner._count(kind)  # type: ignore[attr-defined]


class FaultProxy:
    """Forward HTTP from ``127.0.0.1:<port>`` to ``upstream`` and inject faults into a seeded fraction.

    ``rate``: probability that a request (of ``methods``) gets a fault; the kind is drawn from
    ``kinds`` (``500``, ``503``, ``cut`` = half the body then close, ``stall`` = no answer for
    ``stall_s``, ``stall_body`` = half the body then silence for ``stall_s``). Decisions come from
    ``random.Random(seed)`` in request-arrival order. ``counts`` maps kind -> injected faults, plus
    ``requests`` (all requests seen) and ``faults`` (their sum).
    """

    def __init__(self, upstream: str, *, rate: float = 0.0, seed: int = 0, kinds: tuple[str, ...] = FAULT_KINDS,
                 stall_s: float = 2.0, methods: tuple[str, ...] = ("GET",)) -> None:
        u = urllib.parse.urlparse(upstream)
        if u.hostname not in (LOOPBACK, "localhost") or not u.port:
            raise ValueError(f"FaultProxy only forwards to a loopback server with a port, got {upstream!r}")
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; valid: {FAULT_KINDS}")
        self.rate, self.kinds, self.methods = rate, tuple(kinds), tuple(methods)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"requests": 0, "faults": 0, **dict.fromkeys(FAULT_KINDS, 0)}
        self._server = _ProxyServer((LOOPBACK, 0), _ProxyHandler)
        self._server.owner = self  # type: ignore[attr-defined]
        self._server.upstream_port = u.port
        self._server.stall_s = stall_s
        self._server.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def _decide(self, method: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if method not in self.methods or self.rate <= 0:
                return None
            if self._rng.random() >= self.rate:
                return None
            return self._rng.choice(self.kinds)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.counts["faults"] += 1

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def reset_counts(self) -> None:
        with self._lock:
            self.counts = dict.fromkeys(self.counts, 0)

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stop_event.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# http folder server

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _FolderHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:
        log.debug("http: " + fmt, *args)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        with open(path, "rb") as f:
            data = f.read()
        st = os.stat(path)
        size = len(data)
        status, start, end = 200, 0, size
        m = _RANGE.fullmatch(self.headers.get("Range", "")) if self.server.ranges else None  # type: ignore[attr-defined]
        if m:
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{st.st_size:x}-{st.st_mtime_ns:x}"')
        if self.server.ranges:  # type: ignore[attr-defined]
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end])


class FolderServer:
    """Serve ``root`` over http on 127.0.0.1; ``ranges=False`` ignores Range headers like many simple servers."""

    def __init__(self, root: str, *, ranges: bool = True) -> None:
        handler = type("Handler", (_FolderHandler,), {})
        self._server = _QuietServer((LOOPBACK, 0), lambda *a: handler(*a, directory=root))
        self._server.ranges = ranges  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> FolderServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="folder-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FolderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
