"""The servers of one lab backend: small, fast, and standard library only.

``python3 -m lbcore.lab.servers --name be2`` runs, in one asyncio loop, what the lab's traffic
and the tests talk to (the namespace lab starts one per backend namespace; the Vagrant lab runs
the same on a VM, which is why this module imports nothing outside the standard library):

========  =====  =================================================================================
service   port   protocol
========  =====  =================================================================================
http      80     HTTP/1.x, any method and path: ``200``, body = the name and a newline (``be2\\n``).
                 Keep-alive (HTTP/1.1 default, 1.0 with ``Connection: keep-alive``), pipelining,
                 ``Connection: close`` honoured; a request body is read by Content-Length and
                 ignored; chunked request bodies are refused (501).
udp      5300    each datagram is answered with the name and a newline (``be2\\n``).
digest   5301    UDP: each datagram is answered with ``"<name> <length> <sha256 hex>\\n"`` of what
                 arrived: a short answer, so a large (fragmented) datagram can be checked whole.
                 A datagram starting with ``ECHO\\n`` is sent back as it came instead (a large
                 one: a fragmented reply).
sink     9000    TCP: the client sends any bytes, then half-closes (``shutdown(SHUT_WR)``);
                 the server answers one line ``"<count> <sha256 hex>\\n"`` of what it received,
                 and closes.
source   9001    TCP: the client sends one line ``"<N>\\n"`` (decimal, N <= 2**40); the server sends
                 N bytes of the pattern "byte i is i % 256" (:func:`pattern`, whose digest is
                 :func:`pattern_sha256`) and closes. A bad request gets ``"ERR ...\\n"``.
========  =====  =================================================================================

It listens on 0.0.0.0, and with ``--ipv6`` also on ``::`` (v6 only, so that v4 clients keep v4
sockets), or on the ``--bind`` addresses given. ``--ready-fd N`` makes it write ``ready\\n`` to
descriptor N once every socket listens (the lab waits on that, no polling). SIGTERM or SIGINT
stops it. The HTTP side is an ``asyncio.Protocol`` with a hand-written parser: no streams, one
write per batch of pipelined requests (uvloop is used when it is installed).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

HTTP_PORT = 80
UDP_PORT = 5300
DIGEST_PORT = 5301
SINK_PORT = 9000
SOURCE_PORT = 9001

MAX_HEAD = 16384            # bytes: a longer request head is refused (431)
MAX_SOURCE = 1 << 40        # bytes: the largest N the source sends
BACKLOG = 4096              # listen backlog: the lab opens thousands of connections per second
_BLOCK = bytes(range(256)) * 256    # 64 KiB of the pattern, aligned: block[k] == k % 256


def pattern(n: int) -> bytes:
    """The first ``n`` bytes of the source pattern (byte i is i % 256)."""
    whole, rest = divmod(n, len(_BLOCK))
    return _BLOCK * whole + _BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    """sha256 hex digest of ``pattern(n)``, computed in 64 KiB steps (no n-byte buffer)."""
    h = hashlib.sha256()
    whole, rest = divmod(n, len(_BLOCK))
    view = memoryview(_BLOCK)
    for _ in range(whole):
        h.update(view)
    h.update(view[:rest])
    return h.hexdigest()


# --------------------------------------------------------------------------- HTTP

def _response(body: bytes, connection: bytes | None) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    if connection:
        head += b"Connection: " + connection + b"\r\n"
    return head + b"\r\n" + body


def _error(status: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


class HttpProtocol(asyncio.Protocol):
    """One HTTP connection. Responses are precomputed; the parser looks only at what it needs:
    the request line's method and version, Connection, Content-Length, Transfer-Encoding."""

    __slots__ = ("_answers", "_buf", "_t")

    def __init__(self, answers: dict[str, bytes]) -> None:
        self._answers = answers
        self._buf = b""
        self._t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        out = []
        close = False
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    out.append(_error(b"431 Request Header Fields Too Large"))
                    close = True
                break
            head = buf[:end]
            eol = head.find(b"\r\n")
            reqline = head if eol < 0 else head[:eol]
            parts = reqline.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                out.append(_error(b"400 Bad Request"))
                close = True
                break
            version11 = parts[2] == b"HTTP/1.1"
            keep = version11
            body_len = 0
            if eol >= 0:
                lower = head[eol + 2:].lower()
                if b"transfer-encoding:" in lower:
                    out.append(_error(b"501 Not Implemented"))
                    close = True
                    break
                if b"connection:" in lower or b"content-length:" in lower:
                    for line in lower.split(b"\r\n"):
                        name, _, value = line.partition(b":")
                        name = name.strip()
                        if name == b"connection":
                            tokens = {t.strip() for t in value.split(b",")}
                            if b"close" in tokens:
                                keep = False
                            elif b"keep-alive" in tokens:
                                keep = True
                        elif name == b"content-length":
                            try:
                                body_len = int(value)
                            except ValueError:
                                body_len = -1
                            if body_len < 0:
                                out.append(_error(b"400 Bad Request"))
                                close = True
                                break
                    if close:
                        break
            if len(buf) < end + 4 + body_len:
                break  # wait for the rest of the body
            buf = buf[end + 4 + body_len:]
            head_only = parts[0] == b"HEAD"
            if not keep:
                out.append(self._answers["head-close" if head_only else "close"])
                close = True
                break
            if version11:
                out.append(self._answers["head" if head_only else "keep"])
            else:
                out.append(self._answers["head-keep10" if head_only else "keep10"])
        self._buf = b"" if close else buf
        t = self._t
        if t is None:
            return
        if out:
            t.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._t = None


def http_answers(name: str) -> dict[str, bytes]:
    """The precomputed responses of a backend called ``name``."""
    body = name.encode() + b"\n"
    full = {"keep": _response(body, None), "keep10": _response(body, b"keep-alive"),
            "close": _response(body, b"close")}
    heads = {"head" if k == "keep" else f"head-{k}": v[:v.index(b"\r\n\r\n") + 4]
             for k, v in full.items()}
    return {**full, **heads}


# --------------------------------------------------------------------------- UDP

class UdpProtocol(asyncio.DatagramProtocol):
    """Answers every datagram with the name (digest=False), or with the name, the length and
    the SHA-256 of the datagram (digest=True)."""

    def __init__(self, reply: bytes, digest: bool = False) -> None:
        self._reply = reply
        self._digest = digest
        self._t: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self._t is not None:
            if self._digest and data.startswith(b"ECHO\n"):
                self._t.sendto(data, addr)
            elif self._digest:
                self._t.sendto(b"%s %d %s\n" % (self._reply.strip(), len(data),
                                                hashlib.sha256(data).hexdigest().encode()), addr)
            else:
                self._t.sendto(self._reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an earlier reply; nothing to do


# --------------------------------------------------------------------------- bulk

class SinkProtocol(asyncio.Protocol):
    """Counts and hashes everything until the client half-closes, then answers the totals."""

    def __init__(self) -> None:
        self._count = 0
        self._hash = hashlib.sha256()
        self._t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._count += len(data)
        self._hash.update(data)

    def eof_received(self) -> bool:
        if self._t is not None:
            self._t.write(f"{self._count} {self._hash.hexdigest()}\n".encode())
            self._t.close()
        return True


class SourceProtocol(asyncio.Protocol):
    """Reads "N\\n", sends N pattern bytes with flow control, closes."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = -1
        self._paused = False
        self._t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._left >= 0 or self._t is None:
            return  # the request is in; anything else is ignored
        self._buf += data
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > 64:
                self._fail("request too long")
            return
        try:
            n = int(self._buf[:nl])
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_SOURCE:
            self._fail(f"want one line: a byte count from 0 to {MAX_SOURCE}")
            return
        self._left = n
        self._send()

    def _fail(self, why: str) -> None:
        assert self._t is not None
        self._t.write(f"ERR {why}\n".encode())
        self._t.close()

    def _send(self) -> None:
        t = self._t
        view = memoryview(_BLOCK)
        while t is not None and self._left > 0 and not self._paused:
            chunk = min(self._left, len(_BLOCK))   # whole blocks keep the pattern aligned
            self._left -= chunk
            t.write(view[:chunk])
        if t is not None and self._left == 0:
            t.close()   # flushes what is buffered first
            self._left = -2

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        # Not self._send() directly: asyncio calls this from inside its write-ready handler,
        # and closing the transport there makes it report connection_lost twice (3.11).
        self._paused = False
        asyncio.get_running_loop().call_soon(self._send)

    def connection_lost(self, exc: Exception | None) -> None:
        self._t = None


# --------------------------------------------------------------------------- main

async def serve(name: str, binds: Sequence[str], *, http_port: int = HTTP_PORT,
                udp_port: int = UDP_PORT, sink_port: int = SINK_PORT,
                source_port: int = SOURCE_PORT, ready: asyncio.Future | None = None) -> None:
    """Run every service on every address in ``binds`` until cancelled."""
    loop = asyncio.get_running_loop()
    answers = http_answers(name)
    reply = name.encode() + b"\n"
    servers = []
    transports = []
    try:
        for host in binds:
            servers.append(await loop.create_server(
                lambda: HttpProtocol(answers), host, http_port, backlog=BACKLOG,
                reuse_address=True))
            servers.append(await loop.create_server(SinkProtocol, host, sink_port,
                                                    backlog=BACKLOG, reuse_address=True))
            servers.append(await loop.create_server(SourceProtocol, host, source_port,
                                                    backlog=BACKLOG, reuse_address=True))
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((host, udp_port))
            t, _ = await loop.create_datagram_endpoint(lambda: UdpProtocol(reply), sock=sock)
            transports.append(t)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, DIGEST_PORT))
            t, _ = await loop.create_datagram_endpoint(lambda: UdpProtocol(reply, True),
                                                       sock=sock)
            transports.append(t)
        if ready is not None:
            ready.set_result(None)
        await asyncio.Event().wait()
    finally:
        for t in transports:
            t.close()
        for s in servers:
            s.close()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m lbcore.lab.servers",
                                description="HTTP, UDP and bulk TCP servers of one lab backend.")
    p.add_argument("--name", required=True, help="the name the servers answer (e.g. be2)")
    p.add_argument("--ipv6", action="store_true", help="also listen on ::")
    p.add_argument("--bind", action="append", metavar="ADDR",
                   help="listen on ADDR (repeatable; default 0.0.0.0, and :: with --ipv6)")
    p.add_argument("--http-port", type=int, default=HTTP_PORT)
    p.add_argument("--udp-port", type=int, default=UDP_PORT)
    p.add_argument("--sink-port", type=int, default=SINK_PORT)
    p.add_argument("--source-port", type=int, default=SOURCE_PORT)
    p.add_argument("--ready-fd", type=int, help="write 'ready\\n' to this descriptor when up")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    binds = args.bind or (["0.0.0.0", "::"] if args.ipv6 else ["0.0.0.0"])
    try:
        import uvloop  # type: ignore[import-not-found]
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    ready: asyncio.Future = loop.create_future()
    task = loop.create_task(serve(args.name, binds, http_port=args.http_port,
                                  udp_port=args.udp_port, sink_port=args.sink_port,
                                  source_port=args.source_port, ready=ready))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    def announce(_: asyncio.Future) -> None:
        if ready.cancelled() or ready.exception() is not None:
            return
        print(f"labservers {args.name} ready: http :{args.http_port} udp :{args.udp_port} "
              f"sink :{args.sink_port} source :{args.source_port} on {' '.join(binds)}",
              flush=True)
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    ready.add_done_callback(announce)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    except OSError as e:
        print(f"labservers {args.name}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
