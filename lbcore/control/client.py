"""Runtime control, client side: the CLI verbs that talk to a running lbcore.

`status`, `flows`, `pick`, `backend` and `reload` send one request each over the control
socket (see :mod:`.server` for the protocol) and render the answer with rich, or as JSON.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from ..balancer import PROTO_NAMES
from ..config import DEFAULT_CONTROL_SOCKET, ConfigError, load_config
from .fmt import (
    Level,
    Line,
    adoption_line,
    ago,
    busy_poll_line,
    cpus_line,
    fragments_line,
    io_line,
    plain,
    rawsock_line,
    shed_lines,
    sync_line,
    tun_line,
)


class ControlError(RuntimeError):
    pass


def request(path: str, req: dict, timeout: float = 10.0) -> Any:
    """Send one request to a running lbcore; return its result or raise."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is lbcore running?") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing listens on {path}: lbcore is not running") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf:
        raise ControlError("lbcore closed the connection without an answer")
    resp = json.loads(buf)
    if not resp.get("ok"):
        raise ControlError(resp.get("error", "unknown error"))
    return resp["result"]


def socket_path(args) -> str:
    """--socket, else the config's control_socket, else the default."""
    if getattr(args, "socket", None):
        return args.socket
    cfg_path = getattr(args, "config", None)
    if cfg_path and os.path.exists(cfg_path):
        try:
            return load_config(cfg_path).control_socket
        except ConfigError:
            pass
    return DEFAULT_CONTROL_SOCKET


def _ago(ts: float) -> str:
    return ago(ts, time.time())


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


# how `status` colours the levels of the shared data plane lines (see .fmt)
STYLE: dict[Level, str] = {"": "", "ok": "green", "warn": "yellow", "bad": "red"}


def _print_line(con, line: Line | None) -> None:
    """One of the shared data plane lines (nothing for None), coloured by level. Printed as
    rich Text, not markup, so that brackets in a link name or an error message stay text; the
    console's highlighter still applies under the levels' colours, as rich does for markup."""
    if line is None:
        return
    from rich.text import Text
    text = con.render_str(plain(line), markup=False, emoji=False)
    text.copy_styles(Text.assemble(*((t, STYLE[lvl]) for t, lvl in line)))
    con.print(text)


def cmd_status(args) -> int:
    st = request(socket_path(args), {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    con = Console(width=None if sys.stdout.isatty() else 160)
    f = st["flows"]
    con.print(f"lbcore {st['version']} pid {st['pid']}  mode {st['mode']}  "
              f"workers {st['workers']}  up {st['uptime']:.0f}s  config {st['config']}")
    con.print(f"flows {f['active']}/{f['capacity']}  rx {st['totals']['rx']}  "
              f"tx {st['totals']['tx']}  table rebuilds {st['table']['rebuilds']}")
    for line in (io_line(st.get("io")), busy_poll_line(st.get("busy_poll")),
                 cpus_line(st.get("cpus")), rawsock_line(st.get("rawsock"))):
        _print_line(con, line)
    _print_bgp(con, st.get("bgp"))
    t = Table(show_lines=False)
    for col in ("VIP", "backend", "health", "weight", "flows", "packets", "bytes",
                "last change"):
        t.add_column(col, justify="right" if col in ("weight", "flows", "packets", "bytes")
                     else "left")
    for v in st["vips"]:
        ann = ("[green]announced[/]" if v.get("announced")
               else f"[yellow]not announced[/]: {escape(str(v.get('announce_reason')))}")
        t.add_row(f"[bold]{escape(v['name'])}[/]",
                  f"{v['address']}:{v['port']}/{v['protocol']}", "", "", str(v["active_flows"]),
                  _human(v["packets"]), _human(v["bytes"]),
                  f"table {v.get('table_digest')}  {ann}")
        for b in v["backends"]:
            health = "[green]up[/]" if b["state"] == "up" else "[red]down[/]"
            if b["draining"]:
                health += " [yellow]draining[/]"
            t.add_row("", f"{b['address']}:{b['port']}", health,
                      f"{b['effective_weight']}/{b['weight']}", str(b["active_flows"]),
                      _human(b["packets"]), _human(b["bytes"]),
                      f"{_ago(b['last_change'])} ({escape(str(b['reason']))})")
    con.print(t)
    for v in st["vips"]:
        refused = {k: n for k, n in v.get("refused", {}).items() if n}
        setting = {k: x for k, x in v.get("settings", {}).items()
                   if x and x not in ("none", "drop") and k != "persist_ms"}
        if refused or setting:
            con.print(escape(f"{v['name']}: " + ", ".join(
                [f"{k}={x}" for k, x in setting.items()]
                + [f"refused {k}={n}" for k, n in sorted(refused.items())])))
    tbl = st["table"]
    if tbl.get("publish_failures"):
        con.print(f"[red]table publish failures: {tbl['publish_failures']}[/]"
                  + (f" (last: {escape(tbl['last_publish_error'])})"
                     if tbl.get("last_publish_error")
                     else " (the last publish succeeded)"))
    drops = {k: v for k, v in st["drops"].items() if v}
    if drops:
        con.print("drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    tot = st["totals"]
    answers = {k: tot.get(k, 0) for k in ("echo_replies", "resets", "unreachables",
                                          "rejects_limited") if tot.get(k)}
    if answers:
        con.print("answered: " + ", ".join(f"{k}={n}" for k, n in answers.items()))
    if tot.get("passed"):
        con.print(f"passed to the kernel (a backend's own traffic): {tot['passed']}")
    _print_line(con, fragments_line(st.get("fragments")))
    _print_continuity(con, st)
    _print_shed(con, st.get("shed"))
    return 0


def _print_continuity(con, st: dict) -> None:
    """The flow-continuity lines of `status`: what this run took over from the last one
    (flow table, TUN) and the flow sync between gateways."""
    _print_line(con, adoption_line(st.get("adoption")))
    _print_line(con, tun_line(st.get("tun")))
    _print_line(con, sync_line(st.get("sync")))


def _print_shed(con, sh: dict | None) -> None:
    """The SYN shed filter's lines of `status` (tun mode): shedding now or not, per VIP."""
    for i, line in enumerate(shed_lines(sh, time.time())):
        _print_line(con, [("  ", "")] + line if i else line)


def _print_bgp(con, bgp: dict | None) -> None:
    """The BGP lines of `status`: the speaker, then one line per session."""
    if bgp is None:
        con.print("bgp: not configured (no [bgp] section)", markup=False)
        return
    con.print(f"bgp: {bgp['state']}  AS {bgp['local_as']}  router id {bgp['router_id']}  "
              f"BIRD pid {bgp['bird_pid']}  announced {', '.join(bgp['announced']) or '-'}",
              markup=False)
    for sess in bgp["sessions"]:
        since = f"up {_ago(sess['since'])[:-4]}" if sess["up"] and sess["since"] else ""
        bfd = f"  BFD {sess['bfd']}" if sess["bfd"] is not None else "  BFD off"
        con.print(f"  neighbor {sess['neighbor']} AS {sess['as']}: {sess['state']} "
                  f"{since}{bfd}".rstrip(), markup=False)


def cmd_drain_gateway(args) -> int:
    """`lbcore drain-gateway`: withdraw every VIP from BGP, keep forwarding."""
    r = request(socket_path(args), {"cmd": "drain-gateway"})
    print(f"drained: withdrew {', '.join(r['withdrawn']) or 'nothing (none was announced)'}; "
          "forwarding goes on until the balancer stops")
    return 0


FLOWS_PAGE = 1000    # flows per request: the balancer copies one page at a time


def fetch_flows(path: str, vip: str | None, limit: int) -> list[dict]:
    """Up to ``limit`` tracked flows (of ``vip``), fetched a page at a time (the "cursor"
    argument of the flows command), so that neither side holds a big table's copy at once."""
    flows: list[dict] = []
    cursor: int | None = 0
    while cursor is not None and len(flows) < limit:
        page = request(path, {"cmd": "flows", "vip": vip, "cursor": cursor,
                              "limit": min(FLOWS_PAGE, limit - len(flows))}, timeout=60)
        flows += page["flows"]
        cursor = page["cursor"]
    return flows


def cmd_flows(args) -> int:
    if args.limit < 1:
        raise ControlError(f"--limit must be at least 1, not {args.limit}")
    flows = fetch_flows(socket_path(args), args.vip, args.limit)
    if args.json:
        print(json.dumps(flows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table()
    for col in ("proto", "client", "VIP", "backend", "state"):
        t.add_column(col)
    for fl in flows:
        t.add_row(PROTO_NAMES.get(fl["proto"], str(fl["proto"])), f"{fl['client']}:{fl['cport']}",
                  f"{fl['vip']}:{fl['vport']}", f"{fl['backend']}:{fl['bport']}", fl["state"])
    Console().print(t)
    print(f"{len(flows)} flow(s) shown")
    return 0


def cmd_pick(args) -> int:
    r = request(socket_path(args), {"cmd": "pick", "vip": args.vip, "src": args.src,
                                    "sport": args.sport, "proto": args.proto})
    print(f"{r['vip']}: {args.src}:{args.sport} -> {r['backend'] or 'nothing'} ({r['why']})")
    return 0 if r["backend"] else 1


def cmd_backend(args) -> int:
    req = {"cmd": "backend", "action": args.action, "vip": args.vip, "backend": args.backend}
    if args.action == "weight":
        if args.weight is None:
            raise ControlError("`backend weight` needs a weight")
        req["weight"] = args.weight
    r = request(socket_path(args), req)
    print(("changed: " if r["changed"] else "unchanged: ") + ", ".join(r["backends"]))
    return 0


def cmd_reload(args) -> int:
    r = request(socket_path(args), {"cmd": "reload"}, timeout=60)
    for c in r["changes"]:
        print(c)
    print(f"reloaded: {len(r['changes'])} change(s)")
    return 0
