"""Client side of the lab's servers (lbcore.lab.servers): HTTP, UDP and bulk TCP requests.

Standard library only, and every function returns plain JSON-able data, so that the same code
runs three ways:

* in the calling process, in a thread that has entered a namespace
  (``netconf.run_in_netns("lbc-client", http_requests, "198.18.100.1", n=300)``);
* in a subprocess inside a namespace that runs many requests and prints one JSON result
  (``python -m lbcore.lab.traffic`` reading ``{"fn": ..., "kwargs": ...}`` on stdin;
  :func:`lbcore.lab.ns.traffic` does this);
* on a VM of the Vagrant lab.

Every loop is bounded by a count and by a deadline; failures are counted and returned, never
retried silently.
"""
from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from collections import Counter
from typing import Any

from .servers import HTTP_PORT, SINK_PORT, SOURCE_PORT, UDP_PORT, pattern, pattern_sha256

__all__ = ["http_requests", "udp_requests", "bulk_sink", "bulk_source", "FUNCTIONS"]


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def read_response(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bytes, bool]:
    """Read one HTTP response (Content-Length framed). Returns status, body, leftover, and
    whether the server said Connection: close."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed before a response head")
        buf += data
    end = buf.index(b"\r\n\r\n")
    head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
    lines = head.split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed inside a response body")
        buf += data
    return status, buf[:length], buf[length:], close


def _summary(results: list[list[Any]], errors: list[str], t0: float) -> dict[str, Any]:
    """The result every request helper returns: answers per backend name and each answer."""
    return {"ok": len(results), "errors": len(errors), "error_samples": errors[:5],
            "counts": dict(Counter(body for _, body in results)), "results": results,
            "seconds": time.monotonic() - t0}


def _bind(sock: socket.socket, source: str | None, sport: int | None) -> None:
    """Bind to source address / port when asked. A fixed client port makes a flow, and so
    its backend, reproducible (SO_REUSEADDR: the port may still be in TIME_WAIT)."""
    if sport is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if source is not None or sport is not None:
        wildcard = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
        sock.bind((source or wildcard, sport or 0))


def http_requests(addr: str, port: int = HTTP_PORT, n: int = 1, *, keepalive: bool = False,
                  path: str = "/", timeout: float = 5.0, deadline: float = 60.0,
                  source: str | None = None, first_sport: int | None = None
                  ) -> dict[str, Any]:
    """``n`` GET requests to ``addr:port``.

    ``keepalive=False``: each on a new connection (a new flow each, what a balancer spreads);
    ``keepalive=True``: all on one HTTP/1.1 connection (one flow; reconnects if the server
    closes). ``first_sport``: connection i uses client port first_sport + i (reproducible
    flows). Returns ``{"ok", "errors", "counts": {body: n}, "results": [[local_port, body],
    ...], "error_samples": [...], "seconds"}``; a body is the response text stripped (the
    backend's name). Stops at ``deadline`` seconds and counts the rest as errors.
    """
    fam = _family(addr)
    results: list[list[Any]] = []
    errors: list[str] = []
    t0 = time.monotonic()
    sock: socket.socket | None = None
    leftover = b""
    req_ka = (f"GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").encode()
    req_close = (f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").encode()
    try:
        for i in range(n):
            if time.monotonic() - t0 > deadline:
                errors.append("deadline")
                continue
            try:
                if sock is None:
                    sock = socket.socket(fam, socket.SOCK_STREAM)
                    sock.settimeout(timeout)
                    _bind(sock, source, None if first_sport is None else first_sport + i)
                    sock.connect((addr, port))
                    leftover = b""
                sock.sendall(req_ka if keepalive else req_close)
                status, body, leftover, close = read_response(sock, leftover)
                lport = sock.getsockname()[1]
                if status != 200:
                    errors.append(f"status {status}")
                else:
                    results.append([lport, body.decode("utf-8", "replace").strip()])
                if close or not keepalive:
                    sock.close()
                    sock = None
            except (OSError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                if sock is not None:
                    sock.close()
                    sock = None
    finally:
        if sock is not None:
            sock.close()
    return _summary(results, errors, t0)


def udp_requests(addr: str, port: int = UDP_PORT, n: int = 1, *, new_socket: bool = True,
                 payload: bytes | str = b"ping", timeout: float = 5.0,
                 deadline: float = 60.0, first_sport: int | None = None) -> dict[str, Any]:
    """``n`` UDP request/response exchanges with ``addr:port``.

    ``new_socket=True``: each from a fresh socket (a new source port, a new flow each);
    otherwise all from one socket. ``first_sport``: socket i uses client port first_sport + i.
    A reply that does not come within ``timeout`` is an error.
    Returns the same shape as :func:`http_requests`.
    """
    if isinstance(payload, str):
        payload = payload.encode()
    fam = _family(addr)
    results: list[list[Any]] = []
    errors: list[str] = []
    t0 = time.monotonic()
    sock: socket.socket | None = None
    try:
        for i in range(n):
            if time.monotonic() - t0 > deadline:
                errors.append("deadline")
                continue
            if sock is None:
                sock = socket.socket(fam, socket.SOCK_DGRAM)
                sock.settimeout(timeout)
                _bind(sock, None, None if first_sport is None else first_sport + i)
                sock.connect((addr, port))
            try:
                sock.send(payload)
                reply = sock.recv(65536)
                results.append([sock.getsockname()[1], reply.decode("utf-8", "replace").strip()])
            except OSError as e:
                errors.append(f"{type(e).__name__}: {e}")
            if new_socket:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    return _summary(results, errors, t0)


def bulk_sink(addr: str, nbytes: int, port: int = SINK_PORT, *, timeout: float = 30.0
              ) -> dict[str, Any]:
    """Send ``nbytes`` of the pattern to the sink, half-close, read its count and digest.

    Returns ``{"sent", "sha256" (of what was sent), "count", "server_sha256", "ok",
    "local_port", "seconds"}``; ``ok`` says the server received exactly what was sent.
    """
    t0 = time.monotonic()
    h = hashlib.sha256()
    block = pattern(1 << 20)
    view = memoryview(block)
    with socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((addr, port))
        left = nbytes
        while left > 0:
            chunk = view[:min(left, len(block))]
            sock.sendall(chunk)
            h.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        lport = sock.getsockname()[1]
    count_s, _, digest = reply.decode().strip().partition(" ")
    count = int(count_s) if count_s.isdigit() else -1
    return {"sent": nbytes, "sha256": h.hexdigest(), "count": count, "server_sha256": digest,
            "ok": count == nbytes and digest == h.hexdigest(), "local_port": lport,
            "seconds": time.monotonic() - t0}


def bulk_source(addr: str, nbytes: int, port: int = SOURCE_PORT, *, timeout: float = 30.0
                ) -> dict[str, Any]:
    """Ask the source for ``nbytes`` and read them to the end.

    Returns ``{"received", "sha256", "expected_sha256", "ok", "local_port", "seconds"}``.
    """
    t0 = time.monotonic()
    h = hashlib.sha256()
    received = 0
    buf = bytearray(1 << 20)
    with socket.socket(_family(addr), socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((addr, port))
        sock.sendall(f"{nbytes}\n".encode())
        while True:
            k = sock.recv_into(buf)
            if not k:
                break
            h.update(memoryview(buf)[:k])
            received += k
        lport = sock.getsockname()[1]
    expected = pattern_sha256(nbytes)
    return {"received": received, "sha256": h.hexdigest(), "expected_sha256": expected,
            "ok": received == nbytes and h.hexdigest() == expected, "local_port": lport,
            "seconds": time.monotonic() - t0}


FUNCTIONS = {"http_requests": http_requests, "udp_requests": udp_requests,
             "bulk_sink": bulk_sink, "bulk_source": bulk_source}


def main() -> int:
    """Read ``{"fn": name, "kwargs": {...}}`` on stdin, print the JSON result on stdout."""
    req = json.load(sys.stdin)
    result = FUNCTIONS[req["fn"]](**req.get("kwargs", {}))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
