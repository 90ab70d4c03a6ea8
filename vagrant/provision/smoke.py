#!/usr/bin/env python3
"""smoke.py - in the client VM: a few requests through the gateway's VIP.

Each HTTP request goes on a new TCP connection (so each is a new flow the
balancer places by Maglev hashing) and each UDP request from a new socket; the
lab's servers answer with their backend's name, which is printed per request.
Bounded: at most 200 requests of each kind, a timeout per request and an
overall deadline. Exit status 0 only if every request was answered.
Only the box's python3 is used (stdlib), nothing to install in the client.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import socket
import sys
import time


def http_once(vip: str, port: int, timeout: float) -> tuple[str, str]:
    """One GET on a new connection; returns (client address:port, answer)."""
    conn = http.client.HTTPConnection(vip, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        local = "%s:%d" % conn.sock.getsockname()[:2]
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace").strip()
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}: {body[:60]}")
        return local, body
    finally:
        conn.close()


def udp_once(vip: str, port: int, timeout: float, seq: int) -> tuple[str, str]:
    """One datagram from a new socket; returns (client address:port, answer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((vip, port))
        s.send(b"lbcore vm lab %d\n" % seq)
        data = s.recv(2048)
        return "%s:%d" % s.getsockname()[:2], data.decode(errors="replace").strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vip", default="198.18.100.1")
    ap.add_argument("--http", type=int, default=12, help="HTTP requests (new connections)")
    ap.add_argument("--udp", type=int, default=6, help="UDP requests")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds for everything")
    a = ap.parse_args()
    a.http, a.udp = min(a.http, 200), min(a.udp, 200)
    end = time.monotonic() + a.deadline
    jobs = [("HTTP", a.vip, 80, i) for i in range(1, a.http + 1)]
    jobs += [("UDP", a.vip, 5300, i) for i in range(1, a.udp + 1)]
    answered: dict[str, collections.Counter[str]] = {"HTTP": collections.Counter(),
                                                     "UDP": collections.Counter()}
    failed = 0
    for kind, vip, port, i in jobs:
        if time.monotonic() > end:
            print(f"{kind:4} {i:3}  deadline of {a.deadline:.0f}s reached, stopping")
            failed += 1
            break
        try:
            if kind == "HTTP":
                local, who = http_once(vip, port, a.timeout)
            else:
                local, who = udp_once(vip, port, a.timeout, i)
        except OSError as e:
            print(f"{kind:4} {i:3}  -> {vip}:{port}  FAILED: {e}")
            failed += 1
            continue
        answered[kind][who] += 1
        print(f"{kind:4} {i:3}  {local:>21} -> {vip}:{port}  answered by {who}")
    for kind, want in (("HTTP", a.http), ("UDP", a.udp)):
        got = answered[kind]
        spread = ", ".join(f"{k} {v}" for k, v in sorted(got.items())) or "-"
        print(f"{kind}: {sum(got.values())}/{want} answered ({spread})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
