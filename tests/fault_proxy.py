"""A fault-injecting HTTP proxy in front of an S3 server (moto in the tests), counting what it injected.

Each request, with probability ``rate``, gets one fault of ``kinds`` (chosen uniformly):

    slowdown      503 SlowDown, not forwarded (S3's throttling answer)
    internal      500 InternalError, not forwarded
    drop_before   the connection is closed without an answer, not forwarded
    drop_after    forwarded and applied upstream, then the connection is closed without an answer: the
                  client retries a request that already took effect (a PUT that exists, a DELETE done)

Otherwise the request is forwarded and the answer passed back. ``only(method, path)`` narrows the requests
that may get a fault; ``limit`` caps the faults injected in all. Point a client at :attr:`FaultProxy.url`
(``AWS_ENDPOINT_URL`` or ``endpoint_url``). Used by ``benchmarks/chaos.py`` and ``tests/test_fault_proxy.py``.
"""

from __future__ import annotations

import http.client
import random
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "drop_before", "drop_after")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Hop-by-hop headers: about one connection, never forwarded.
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    """A threaded proxy on ``127.0.0.1``; a context manager. ``counts``: faults injected, by kind, plus
    ``forwarded`` (requests that reached the upstream)."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float,
        kinds: Sequence[str] = KINDS,
        seed: int = 0,
        only: Callable[[str, str], bool] | None = None,
        limit: int | None = None,
    ):
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds or not 0 <= rate <= 1:
            raise ValueError(f"kinds must be among {KINDS} and 0 <= rate <= 1 (got {kinds}, {rate})")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.rate, self.kinds, self.only, self.limit = rate, tuple(kinds), only, limit
        self.counts: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def faults(self) -> dict[str, int]:
        """Faults injected so far, by kind (every kind present, zeros included)."""
        with self._lock:
            return {k: self.counts[k] for k in KINDS}

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it), counted."""
        with self._lock:
            eligible = (self.only is None or self.only(method, path)) and (
                self.limit is None or sum(self.counts[k] for k in KINDS) < self.limit
            )
            kind = self._random.choice(self.kinds) if eligible and self._random.random() < self.rate else None
            self.counts[kind or "forwarded"] += 1
            if kind == "drop_after":
                self.counts["forwarded"] += 1
            return kind

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client killed mid-request (the chaos run kills processes) resets its connection: not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect

        def log_message(self, *args) -> None:  # quiet: one line per request would drown the output
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if not size:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(chunk)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _drop(self) -> None:
            self.close_connection = True  # the server closes the socket with no answer written

        def _handle(self) -> None:
            body = self._body()
            kind = proxy.draw(self.command, self.path)
            if kind in _ERRORS:
                status, code, message = _ERRORS[kind]
                data = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if kind == "drop_before":
                return self._drop()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            if kind == "drop_after":
                return self._drop()
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP and not (
                    key.lower() == "content-length" and self.command != "HEAD"
                ):
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
