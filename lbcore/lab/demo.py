"""`lbcore demo` (`make demo`): the lab up, a bounded burst of real traffic
through the balancer, a report of what happened, the lab down.

Everything runs in the lab's namespaces (198.18.0.0/15); the root namespace
is never given an address or a route. The traffic is bounded in count and
time, and the lab is torn down also when something fails.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter, defaultdict

from .. import lab
from ..control.client import request
from .ns import http_requests, udp_requests

KEEPALIVE_CONNS = 10
KEEPALIVE_REQS = 20


def cmd_demo(args) -> int:
    if os.geteuid() != 0:
        print("lbcore demo: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table
    con = Console(width=None if sys.stdout.isatty() else 100)
    n_be = args.backends
    con.print(f"[bold]lbcore demo[/]: a client, a gateway running lbcore (tun mode) and "
              f"{n_be} backends in network namespaces; VIP {lab.VIP_V4} tcp/80, udp/5300")
    t0 = time.monotonic()
    # lease() waits for the lab's turn (tests and bench-lab share the lab
    # names), replaces any lab left over, and always tears down
    with lab.lease(backends=n_be):
        con.print(f"lab up in {time.monotonic() - t0:.1f} s; sending traffic from lbc-client")
        http = http_requests("lbc-client", lab.VIP_V4, n=args.requests, deadline=60)
        udp = udp_requests("lbc-client", lab.VIP_V4, n=args.udp, deadline=60)
        sticky = [http_requests("lbc-client", lab.VIP_V4, n=KEEPALIVE_REQS, keepalive=True,
                                deadline=30) for _ in range(KEEPALIVE_CONNS)]
        st = request(str(lab.paths()["control_socket"]), {"cmd": "status"})
    con.print("lab down: namespaces, TUN, routes and rules removed\n")

    names = [lab.backend_name(i) for i in range(1, n_be + 1)]
    addr_of = {lab.backend_name(i): lab.backend_v4(i) for i in range(1, n_be + 1)}
    bytes_of: dict[str, int] = defaultdict(int)
    flows_of: dict[str, int] = defaultdict(int)
    for v in st["vips"]:
        for b in v["backends"]:
            for name, a in addr_of.items():
                if b["address"] == a:
                    bytes_of[name] += b["bytes"]
                    flows_of[name] += b["new_flows"]

    t = Table(title="per backend")
    for col in ("backend", "address", "HTTP conns", "share", "UDP answers", "share",
                "new flows (all VIPs)", "bytes"):
        t.add_column(col, justify="left" if col in ("backend", "address") else "right")
    for name in names:
        h, u = http["counts"].get(name, 0), udp["counts"].get(name, 0)
        t.add_row(name, addr_of[name], str(h), f"{100 * h / max(1, http['ok']):.1f}%", str(u),
                  f"{100 * u / max(1, udp['ok']):.1f}%", str(flows_of[name]),
                  f"{bytes_of[name]:,}")
    con.print(t)

    tot = Table(title="totals")
    for col in ("traffic", "sent", "answered", "errors", "seconds", "per second"):
        tot.add_column(col, justify="left" if col == "traffic" else "right")
    for label, r, n in (("HTTP, a new connection each", http, args.requests),
                        ("UDP, a new source port each", udp, args.udp)):
        tot.add_row(label, str(n), str(r["ok"]), str(r["errors"]), f"{r['seconds']:.2f}",
                    f"{r['ok'] / max(r['seconds'], 1e-9):,.0f}")
    con.print(tot)

    per_conn = [set(Counter(b for _, b in s["results"])) for s in sticky]
    ok_sticky = all(len(s) == 1 for s in per_conn) and all(
        s["ok"] == KEEPALIVE_REQS for s in sticky)
    con.print(f"flow affinity: {KEEPALIVE_CONNS} keep-alive connections x {KEEPALIVE_REQS} "
              f"requests; each connection answered by one backend: "
              + ("[green]yes[/]" if ok_sticky else "[red]NO[/]")
              + f" ({', '.join(sorted(next(iter(s)) for s in per_conn if s))})")
    drops = {k: v for k, v in st["drops"].items() if v}
    con.print(f"balancer: {st['totals']['rx']} packets in, {st['totals']['tx']} out, "
              f"{st['flows']['active']} flows tracked at the end"
              + (f"; drops: {drops}" if drops else "; no drops"))
    ok = (http["errors"] == 0 and udp["errors"] == 0 and ok_sticky
          and all(http["counts"].get(n, 0) for n in names))
    con.print("[bold green]demo OK[/]" if ok else "[bold red]demo FAILED[/]")
    return 0 if ok else 1
