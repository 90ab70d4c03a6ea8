"""A client that holds connections through the balancer while a test restarts
or replaces it: N keep-alive TCP connections, each sending a request every
`interval` s, and one UDP flow (one socket, one source port) sending a
request every `udp_interval` s. Run inside the client namespace:

    python holdconn.py '{"vip": "198.18.100.1", "n": 30}'

It prints one line ``{"ready": {...}}`` once every connection has had its
first answer (which backend each is on), then keeps going until a line
arrives on stdin (or its stdin closes, or `max_seconds` pass), and prints
one JSON line with the result of each flow: backends seen, requests
answered, the error that broke it if one did, the longest wait for an
answer. A broken TCP connection is not reopened: it stays broken.
"""
from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time

from lbcore.lab.traffic import read_response


def tcp_flow(vip: str, port: int, i: int, interval: float, stop: threading.Event,
             out: dict, first: threading.Barrier) -> None:
    r = out[f"tcp{i}"] = {"names": [], "answered": 0, "error": None, "max_wait": 0.0,
                          "sport": None}
    try:
        s = socket.create_connection((vip, port), timeout=30)
    except OSError as e:
        r["error"] = f"connect: {e!r}"
        first.abort()
        return
    r["sport"] = s.getsockname()[1]
    buf = b""
    started = False
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                s.sendall(b"GET /x HTTP/1.1\r\nHost: vip\r\n\r\n")
                status, body, buf, close = read_response(s, buf)
            except (OSError, ConnectionError) as e:
                r["error"] = f"{type(e).__name__}: {e}"
                return
            wait = time.monotonic() - t0
            r["max_wait"] = max(r["max_wait"], wait)
            name = body.decode().strip()
            if name not in r["names"]:
                r["names"].append(name)
            r["answered"] += 1
            if close or status != 200:
                r["error"] = f"server closed or status {status}"
                return
            if not started:
                started = True
                try:
                    first.wait()
                except threading.BrokenBarrierError:
                    return
            stop.wait(interval)
    finally:
        s.close()


def udp_flow(vip: str, port: int, interval: float, stop: threading.Event, out: dict,
             first: threading.Barrier) -> None:
    r = out["udp"] = {"names": [], "answered": 0, "sent": 0, "error": None, "max_wait": 0.0,
                      "sport": None}
    s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.25)
    s.connect((vip, port))
    r["sport"] = s.getsockname()[1]
    last_ok = time.monotonic()
    started = False
    try:
        while not stop.is_set():
            s.send(b"q")
            r["sent"] += 1
            try:
                name = s.recv(2048).decode().strip()
            except (TimeoutError, ConnectionRefusedError):
                # a lost datagram (or an ICMP error for one): UDP, try again
                stop.wait(interval)
                continue
            now = time.monotonic()
            r["max_wait"] = max(r["max_wait"], now - last_ok)
            last_ok = now
            if name not in r["names"]:
                r["names"].append(name)
            r["answered"] += 1
            if not started:
                started = True
                try:
                    first.wait()
                except threading.BrokenBarrierError:
                    return
            stop.wait(interval)
    finally:
        s.close()


def sniff_leaks(ifname: str, prefix: str, stop: threading.Event, out: dict) -> None:
    """Record the packets arriving at the client from a backend's own address
    (a reply that left the gateway un-translated: no data plane ran), as
    [source, source port, destination port]: they tell a connection reset by
    such a reply from one the balancer broke."""
    leaks: list = []
    out["leaks"] = leaks
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
    s.bind((ifname, 0))
    s.settimeout(0.2)
    want = socket.inet_aton(prefix)[:2]
    try:
        while not stop.is_set():
            try:
                p = s.recv(128)
            except TimeoutError:
                continue
            if len(p) < 24 or p[12:14] != want or p[9] not in (6, 17):
                continue
            ihl = (p[0] & 0x0F) * 4
            if len(p) < ihl + 4:
                continue
            rec = [socket.inet_ntoa(p[12:16]), int.from_bytes(p[ihl:ihl + 2], "big"),
                   int.from_bytes(p[ihl + 2:ihl + 4], "big")]
            if rec not in leaks and len(leaks) < 1000:
                leaks.append(rec)
    finally:
        s.close()


def main() -> int:
    args = json.loads(sys.argv[1])
    vip, n = args["vip"], args.get("n", 30)
    stop = threading.Event()
    out: dict = {}
    first = threading.Barrier(n + 2, timeout=60)
    threads = [threading.Thread(target=tcp_flow, daemon=True,
                                args=(vip, args.get("port", 80), i, args.get("interval", 0.2),
                                      stop, out, first)) for i in range(n)]
    threads.append(threading.Thread(target=udp_flow, daemon=True,
                                    args=(vip, args.get("udp_port", 5300),
                                          args.get("udp_interval", 0.05), stop, out, first)))
    extra = {}
    if args.get("sniff_if"):
        threading.Thread(target=sniff_leaks, daemon=True,
                         args=(args["sniff_if"], args.get("backend_net", "198.19.0.0"), stop,
                               extra)).start()
    for t in threads:
        t.start()
    try:
        first.wait()
        print(json.dumps({"ready": {k: v["names"] for k, v in out.items()}}), flush=True)
    except threading.BrokenBarrierError:
        print(json.dumps({"ready": None, "flows": out}), flush=True)
    deadline = time.monotonic() + args.get("max_seconds", 600)
    while time.monotonic() < deadline:
        r, _, _ = select.select([sys.stdin], [], [], 1.0)
        if r:
            break
    stop.set()
    for t in threads:
        t.join(timeout=40)
    print(json.dumps({"flows": out, "leaks": extra.get("leaks", [])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
