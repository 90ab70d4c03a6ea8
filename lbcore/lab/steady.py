"""Steady load for failover experiments: long-lived keep-alive HTTP connections, a stream of
new-connection probes and a UDP request stream, all timestamped.

Runs in the client namespace as ``python -m lbcore.lab.steady`` with a JSON object of keyword
arguments on stdin's first line; prints ``{"ready": ...}`` once every connection has had its
first answer, then runs until stdin gets another line (or closes) and prints the result as one
JSON line. Times are ``time.monotonic()`` - CLOCK_MONOTONIC, the same clock in every process
of the machine - so the caller can put its own events (a kill, a withdrawal seen at the router)
on the same time line.

A keep-alive connection is never re-opened: a reset, a closed connection or an answer later
than ``timeout`` ends it and counts as its failure, and an answer from a different backend
than its first counts as a change. Standard library only (asyncio).
"""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from typing import Any

from .servers import HTTP_PORT, UDP_PORT


async def _read_response(reader: asyncio.StreamReader) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    return body.decode("utf-8", "replace").strip()


class _Conn:
    def __init__(self) -> None:
        self.backend: str | None = None
        self.requests = 0
        self.changed = 0
        self.failure: str | None = None
        self.failed_at: float | None = None
        self.max_latency = 0.0


async def _keepalive(c: _Conn, addr: str, port: int, interval: float, timeout: float,
                     ready: asyncio.Event, stop: asyncio.Event) -> None:
    req = f"GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), timeout)
        while not stop.is_set():
            t0 = time.monotonic()
            writer.write(req)
            body = await asyncio.wait_for(_read_response(reader), timeout)
            dt = time.monotonic() - t0
            c.max_latency = max(c.max_latency, dt)
            c.requests += 1
            if c.backend is None:
                c.backend = body
                ready.set()
            elif body != c.backend:
                c.changed += 1
            await asyncio.sleep(max(0.0, interval - dt))
    except TimeoutError:
        c.failure, c.failed_at = f"no answer within {timeout} s", time.monotonic()
    except ConnectionResetError:
        c.failure, c.failed_at = "reset", time.monotonic()
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        c.failure, c.failed_at = f"{type(e).__name__}: {e}", time.monotonic()
    finally:
        if writer is not None:
            writer.close()


async def _probe(addr: str, port: int, timeout: float, out: list) -> None:
    """One new connection, one request: [start, end, ok, backend or error]."""
    t0 = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), timeout)
        writer.write(f"GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        body = await asyncio.wait_for(_read_response(reader), timeout)
        out.append([t0, time.monotonic(), True, body])
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
        out.append([t0, time.monotonic(), False, type(e).__name__])
    finally:
        if writer is not None:
            writer.close()


async def _probes(addr: str, port: int, interval: float, timeout: float, out: list,
                  stop: asyncio.Event) -> None:
    tasks = set()
    while not stop.is_set():
        t = asyncio.ensure_future(_probe(addr, port, timeout, out))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        await asyncio.sleep(interval)
    if tasks:
        await asyncio.wait(tasks)


async def _udp(addr: str, port: int, interval: float, timeout: float, out: dict,
               stop: asyncio.Event) -> None:
    """One socket (one flow), one request at a time: answered or lost, with its time."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect((addr, port))
    loop = asyncio.get_running_loop()
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            out["sent"] += 1
            try:
                await loop.sock_sendall(s, b"steady")
                body = (await asyncio.wait_for(loop.sock_recv(s, 512), timeout)).decode()
                out["answered"] += 1
                out["backends"][body.strip()] = out["backends"].get(body.strip(), 0) + 1
            except (TimeoutError, OSError):
                out["lost_at"].append(t0)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    finally:
        s.close()


async def run(addr: str, conns: int = 60, interval: float = 0.1, timeout: float = 3.0,
              port: int = HTTP_PORT, udp_port: int = UDP_PORT, probe_interval: float = 0.1,
              probe_timeout: float = 2.0, udp_interval: float = 0.05,
              udp_timeout: float = 0.5) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    cs = [_Conn() for _ in range(conns)]
    events = [asyncio.Event() for _ in cs]
    tasks = [asyncio.ensure_future(_keepalive(c, addr, port, interval, timeout, e, stop))
             for c, e in zip(cs, events, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
    probes: list = []
    udp: dict[str, Any] = {"sent": 0, "answered": 0, "lost_at": [], "backends": {}}
    extra = [asyncio.ensure_future(_probes(addr, port, probe_interval, probe_timeout, probes,
                                           stop)),
             asyncio.ensure_future(_udp(addr, udp_port, udp_interval, udp_timeout, udp, stop))]
    t_ready = time.monotonic()
    print(json.dumps({"ready": t_ready, "backends": sorted(c.backend or "" for c in cs)}),
          flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks, *extra)
    return {
        "ready": t_ready, "end": time.monotonic(), "conns": conns,
        "requests": sum(c.requests for c in cs),
        "failed": [[i, c.failure, c.failed_at, c.backend] for i, c in enumerate(cs)
                   if c.failure],
        "resets": sum(1 for c in cs if c.failure == "reset"),
        "changed": sum(c.changed for c in cs),
        "max_latency": max(c.max_latency for c in cs),
        "backends": {b: sum(1 for c in cs if c.backend == b) for b in {c.backend for c in cs}},
        "probes": probes, "udp": udp,
    }


def main() -> int:
    kwargs = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(run(**kwargs))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
