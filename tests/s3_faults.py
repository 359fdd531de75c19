"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server), for tests.

`FaultProxy(upstream, plan)` listens on 127.0.0.1 only and forwards every request to `upstream`;
per its seeded `FaultPlan` it instead answers some with 503 SlowDown, 500 InternalError or 503
ServiceUnavailable, resets the connection (a GET's body cut half way), applies a write but answers
500, delays a request, or stalls a GET's body. Each decision is a pure function of (seed,
operation, path with the bucket and any published version id masked, how often this operation on this path came
before), so a run meets the same faults whatever its thread interleaving. Bounded: after `max_requests` requests or `max_seconds` it stops
forwarding and answers 503 (`exhausted` tells); no delay or stall is longer than the plan says.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qs, urlsplit

KINDS = ("slowdown", "error500", "unavailable", "reset", "applied500", "delay", "stall")
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "error500": (500, "InternalError", "We encountered an internal error. Please try again."),
           "unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
           "applied500": (500, "InternalError", "We encountered an internal error. Please try again."),
           "budget": (503, "SlowDown", "fault proxy: request budget exhausted")}


def operation(method: str, path_and_query: str) -> str:
    """The S3 operation family of a request: list, get, head, put, delete."""
    query = parse_qs(urlsplit(path_and_query).query, keep_blank_values=True)
    if method == "GET":
        return "list" if "list-type" in query or urlsplit(path_and_query).path.count("/") <= 1 else "get"
    if method == "HEAD":
        return "head"
    if method == "POST" and "delete" in query:
        return "delete"
    if method == "DELETE" and "uploadId" not in query:
        return "delete"
    return "put"  # PUT, multipart create/complete/abort, upload part


@dataclass
class FaultPlan:
    """`rates[op][kind]`: the chance that a request of `op` (whose path contains `match`) gets fault
    `kind`; `outage[op]`: a path part; requests of `op` whose path contains it always answer 503."""

    seed: int = 0
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    outage: dict[str, str] = field(default_factory=dict)
    match: str = ""
    delay_s: float = 0.05
    stall_s: float = 1.5

    def decide(self, op: str, path: str, nth: int) -> str | None:
        if op in self.outage and self.outage[op] in path:
            return "slowdown"
        if self.match not in path:
            return None
        digest = hashlib.sha256(f"{self.seed}|{op}|{path}|{nth}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for kind, rate in sorted(self.rates.get(op, {}).items()):
            if u < rate:
                return kind
            u -= rate
        return None


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan, max_requests: int = 20_000, max_seconds: float = 120) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname in ("127.0.0.1", "localhost"), "loopback upstreams only"
        self.upstream = (parts.hostname, parts.port)
        self.plan, self.max_requests, self.max_seconds = plan, max_requests, max_seconds
        self.injected: Counter[tuple[str, str]] = Counter()
        self.requests = 0
        self.exhausted = False
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._closed = False  # once closed, nothing more reaches the upstream (a late delayed PUT would)
        self._forwarding = 0  # requests on their way to the upstream right now
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving; requests still held (a delay fault) are dropped, and the ones already on
        their way upstream finish first, so that no request reaches the upstream after this returns."""
        with self._lock:
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + 30
        while self._forwarding and time.monotonic() < deadline:
            time.sleep(0.01)

    def faults(self, op: str | None = None) -> int:
        return sum(n for (o, _), n in self.injected.items() if op is None or o == op)

    def _decide(self, method: str, target: str) -> tuple[str, str | None]:
        op = operation(method, target)
        # the same plan for any bucket name and any published version id
        path = re.sub(r"^/[^/]+|/versions/[^/]+(?=/)", lambda m: "/*" if m.start() == 0 else "/versions/*",
                      urlsplit(target).path)
        with self._lock:
            self.requests += 1
            if self.requests > self.max_requests or time.monotonic() - self._start > self.max_seconds:
                self.exhausted = True
                return op, "budget"
            nth = self._seen[(op, path)]
            self._seen[(op, path)] += 1
            kind = self.plan.decide(op, path, nth)
            if kind is not None:
                self.injected[(op, kind)] += 1
            return op, kind

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(h)
        op, kind = self._decide(h.command, h.path)
        if kind in ("slowdown", "error500", "unavailable", "budget"):
            return _error(h, kind)
        if kind == "reset" and op != "get":
            return _reset(h)
        if kind == "delay":
            time.sleep(self.plan.delay_s)
        status, headers, data = self._forward(h, body)
        if kind == "applied500":
            return _error(h, kind)
        h.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                h.send_header(name, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD" or not data:
            return
        if kind in ("reset", "stall") and len(data) > 1:
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            if kind == "stall":
                time.sleep(self.plan.stall_s)
            return _reset(h)
        h.wfile.write(data)

    def _forward(self, h: http.server.BaseHTTPRequestHandler, body: bytes) -> tuple[int, list, bytes]:
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the fault proxy is closed")
            self._forwarding += 1
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()
            with self._lock:
                self._forwarding -= 1


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = b""
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += h.rfile.read(size)
            h.rfile.readline()
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def _error(h: http.server.BaseHTTPRequestHandler, kind: str) -> None:
    status, code, message = _ERRORS[kind]
    data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>fault</RequestId></Error>").encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/xml")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(data)


def _reset(h: http.server.BaseHTTPRequestHandler) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), answering nothing more."""
    h.close_connection = True
    try:
        h.wfile.flush()
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
