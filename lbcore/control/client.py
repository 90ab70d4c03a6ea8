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
    d = max(0, time.time() - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _print_busy_poll(con, bp: dict | None) -> None:
    """The workers' busy polling: the window, and the CPU it costs now and in all."""
    if not bp:
        return
    if not bp["window_us"]:
        con.print("busy poll off (busy_poll_us = 0): workers sleep as soon as a queue is empty")
        return
    now = (f"{bp['cores'] * 100:.1f} % of a core" if bp.get("cores") is not None
           else "rate not known yet")
    con.print(f"busy poll {bp['window_us']} µs after traffic: {now} spinning on empty queues, "
              f"{bp['seconds']:.1f} s since start")


def _print_rawsock(con, rs: dict | None) -> None:
    """Mode rawsock: per link, where the kernel's own copy of a taken frame dies; ring drops."""
    if not rs:
        return
    parts = []
    for link, k in rs["kernel_copy"].items():
        if k["dropped_by"] == "tc":
            parts.append(f"{link}: tc filter, {k['dropped']} dropped")
        else:
            parts.append(f"{link}: [yellow]blackhole routes only[/] ({k['reason']})")
    ring = (f"[red]{rs['ring_drops']} frames lost to full rings[/]" if rs["ring_drops"]
            else "no frames lost to full rings")
    con.print(f"kernel copies: {'; '.join(parts) or 'no links'}  {ring}")


def cmd_status(args) -> int:
    st = request(socket_path(args), {"cmd": "status"})
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table
    con = Console(width=None if sys.stdout.isatty() else 160)
    f = st["flows"]
    con.print(f"lbcore {st['version']} pid {st['pid']}  mode {st['mode']}  "
              f"workers {st['workers']}  up {st['uptime']:.0f}s  config {st['config']}")
    con.print(f"flows {f['active']}/{f['capacity']}  rx {st['totals']['rx']}  "
              f"tx {st['totals']['tx']}  table rebuilds {st['table']['rebuilds']}")
    _print_busy_poll(con, st.get("busy_poll"))
    _print_rawsock(con, st.get("rawsock"))
    _print_bgp(con, st.get("bgp"))
    t = Table(show_lines=False)
    for col in ("VIP", "backend", "health", "weight", "flows", "packets", "bytes",
                "last change"):
        t.add_column(col, justify="right" if col in ("weight", "flows", "packets", "bytes")
                     else "left")
    for v in st["vips"]:
        ann = ("[green]announced[/]" if v.get("announced")
               else f"[yellow]not announced[/]: {v.get('announce_reason')}")
        t.add_row(f"[bold]{v['name']}[/]", f"{v['address']}:{v['port']}/{v['protocol']}", "",
                  "", str(v["active_flows"]), _human(v["packets"]), _human(v["bytes"]),
                  f"table {v.get('table_digest')}  {ann}")
        for b in v["backends"]:
            health = "[green]up[/]" if b["state"] == "up" else "[red]down[/]"
            if b["draining"]:
                health += " [yellow]draining[/]"
            t.add_row("", f"{b['address']}:{b['port']}", health,
                      f"{b['effective_weight']}/{b['weight']}", str(b["active_flows"]),
                      _human(b["packets"]), _human(b["bytes"]),
                      f"{_ago(b['last_change'])} ({b['reason']})")
    con.print(t)
    for v in st["vips"]:
        refused = {k: n for k, n in v.get("refused", {}).items() if n}
        setting = {k: x for k, x in v.get("settings", {}).items()
                   if x and x not in ("none", "drop") and k != "persist_ms"}
        if refused or setting:
            con.print(f"{v['name']}: " + ", ".join(
                [f"{k}={x}" for k, x in setting.items()]
                + [f"refused {k}={n}" for k, n in sorted(refused.items())]))
    tbl = st["table"]
    if tbl.get("publish_failures"):
        con.print(f"[red]table publish failures: {tbl['publish_failures']}[/]"
                  + (f" (last: {tbl['last_publish_error']})" if tbl.get("last_publish_error")
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
    fr = st.get("fragments")
    if fr and (fr["first"] or fr["held"] or fr["early_dropped"]):
        con.print(f"fragments: {fr['entries']}/{fr['capacity']} datagrams, "
                  f"{fr['buffers']}/{fr['buffer_capacity']} held; first {fr['first']}, "
                  f"forwarded {fr['forwarded']}, held {fr['held']}, released {fr['released']}, "
                  f"early_dropped {fr['early_dropped']}, timeouts {fr['timeouts']}, "
                  f"evicted {fr['evicted']}")
    _print_continuity(con, st)
    _print_shed(con, st.get("shed"))
    return 0


def _print_continuity(con, st: dict) -> None:
    """The flow-continuity lines of `status`: what this run took over from the last one
    (flow table, TUN) and the flow sync between gateways."""
    ad = st.get("adoption")
    if ad is not None:
        if "refused" in ad:
            con.print(f"flow table at start: not adopted ({ad['refused']})")
        else:
            skipped = {k: ad.get(k, 0) for k in ("expired", "unbound", "invalid",
                                                 "duplicate", "full") if ad.get(k)}
            con.print(f"flow table at start: adopted {ad['adopted']} flow(s) in "
                      f"{ad.get('seconds', 0):.3f}s"
                      + (" (skipped " + ", ".join(f"{k}={n}" for k, n in skipped.items())
                         + ")" if skipped else ""))
    tun = st.get("tun")
    if tun is not None:
        con.print(f"tun {tun['name']}: " + ("attached to the last run's device"
                                           if tun["adopted"] else "made at start"))
    sy = st.get("sync")
    if sy is not None:
        sent, rec = sy["sent"], sy["received"]
        rejected = {k: n for k, n in sy["rejected"].items() if n}
        con.print(f"sync with {', '.join(sy['peers']) or 'no peer'}: sent "
                  f"{sent['records_new']} new, {sent['records_refresh']} refresh, "
                  f"{sent['records_end']} end in {sent['datagrams']} datagrams; received "
                  + ", ".join(f"{k}={n}" for k, n in rec.items())
                  + ("; rejected " + ", ".join(f"{k}={n}" for k, n in sorted(rejected.items()))
                     if rejected else ""))


def _print_shed(con, sh: dict | None) -> None:
    """The SYN shed filter's lines of `status` (tun mode): shedding now or not, per VIP."""
    if sh is None or not sh["vips"]:
        return
    state = (f"[red]shedding[/] since {_ago(sh['since'])}" if sh["active"]
             else "[green]idle[/]")
    dropped = sh.get("tun_dropped")
    con.print(f"SYN shed filter before the TUN queue: {state}"
              + (f"  (TUN dropped {dropped})" if dropped is not None else ""))
    for v in sh["vips"]:
        udp = v.get("protocol") == "udp"
        con.print(f"  {v['name']} {v['address']}:{v['port']}/{v.get('protocol', 'tcp')}: "
                  f"new_flow_rate {v['new_flow_rate']}/s, offered "
                  f"{v['syn_rate'] or 0:.0f} new-flow {'datagrams' if udp else 'SYNs'}/s, "
                  f"share {v['share']:.0%}; seen {v['syns']}, shed {v['shed']}, "
                  + (f"answered flows passed {v['retried']}" if udp
                     else f"retries passed {v['retried']}"))


def _print_bgp(con, bgp: dict | None) -> None:
    """The BGP lines of `status`: the speaker, then one line per session."""
    if bgp is None:
        con.print("bgp: not configured (no [bgp] section)")
        return
    con.print(f"bgp: {bgp['state']}  AS {bgp['local_as']}  router id {bgp['router_id']}  "
              f"BIRD pid {bgp['bird_pid']}  announced {', '.join(bgp['announced']) or '-'}")
    for sess in bgp["sessions"]:
        since = f"up {_ago(sess['since'])[:-4]}" if sess["up"] and sess["since"] else ""
        bfd = f"  BFD {sess['bfd']}" if sess["bfd"] is not None else "  BFD off"
        con.print(f"  neighbor {sess['neighbor']} AS {sess['as']}: {sess['state']} "
                  f"{since}{bfd}".rstrip())


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
