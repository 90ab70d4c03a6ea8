"""The read-only HTTP listener (``metrics_listen``): /metrics, the status page and its JSON twin.

    /             the status page (:mod:`.page`), which refreshes itself every second
    /status.json  the StatusView's snapshot: exactly what `lbcore status --json` prints
    /metrics      Prometheus exposition (prometheus-client's encoders, OpenMetrics when asked)

A small ``http.server.ThreadingHTTPServer`` of our own rather than prometheus-client's
start_http_server, because that one serves the metrics at every path and nothing else. Only
GET and HEAD are answered (405 for the other methods): nothing here changes the balancer, which
is what the control socket (root only) is for. The listener is loopback by default, like the
metrics always were; exposing it is the operator's choice of ``metrics_listen``.

Request threads never touch the balancer: they ask the event loop for a snapshot (the
``snapshot`` callable given to the server), so a page view never races a reload or a health
change, and a slow client costs a thread, not the loop's time.
"""
from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv6Address
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .._version import __version__
from . import page

log = logging.getLogger("lbcore.web")

SnapshotFn = Callable[[], dict[str, Any]]


class StatusHTTPServer(ThreadingHTTPServer):
    """Serves the three read-only views of one balancer (see the module doc)."""

    daemon_threads = True      # a hung client must not hold up shutdown
    allow_reuse_address = True

    def __init__(self, addr: IPv4Address | IPv6Address, port: int, snapshot: SnapshotFn,
                 registry: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        self.snapshot = snapshot
        self.registry = registry
        super().__init__((str(addr), port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: StatusHTTPServer
    server_version = f"lbcore/{__version__}"
    protocol_version = "HTTP/1.1"   # keep-alive: the page fetches itself every second
    timeout = 60                    # s: an idle kept-alive connection gives its thread back

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _not_allowed(self) -> None:
        # the request's body (if any) is not read, so this connection cannot carry another
        self.close_connection = True
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8",
                   b"read-only: GET and HEAD only\n", body=True,
                   extra={"Allow": "GET, HEAD", "Connection": "close"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _serve(self, body: bool) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/metrics":
                self._metrics(body)
            elif url.path in ("/", "/index.html"):
                data = page.render(self.server.snapshot()).encode()
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", data, body, extra={
                    "Content-Security-Policy": page.CONTENT_SECURITY_POLICY,
                    "X-Frame-Options": "DENY"})
            elif url.path == "/status.json":
                data = json.dumps(self.server.snapshot(), default=str).encode()
                self._send(HTTPStatus.OK, "application/json", data, body)
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8",
                           b"not found: try /, /status.json or /metrics\n", body)
        except Exception as e:  # the balancer is stopping, or its loop did not answer in time
            log.warning("HTTP %s: %s: %s", url.path, type(e).__name__, e)
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8",
                       f"lbcore did not answer: {type(e).__name__}: {e}\n".encode(), body)

    def _metrics(self, body: bool) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        data = encoder(self.server.registry)
        extra = {}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            data = gzip.compress(data)
            extra["Content-Encoding"] = "gzip"
        self._send(HTTPStatus.OK, content_type, data, body, extra=extra)

    def _send(self, status: HTTPStatus, content_type: str, data: bytes, body: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)


def serve_in_thread(server: StatusHTTPServer) -> Callable[[], None]:
    """Run ``server`` in a daemon thread; return the function that stops it and waits."""
    thread = threading.Thread(target=server.serve_forever, name="lbcore-http", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return stop
