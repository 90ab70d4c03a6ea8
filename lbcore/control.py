"""Runtime control: a Unix socket with a small JSON API, and its CLI client.

Protocol: one JSON object per line each way. Request {"cmd": NAME, ...args};
reply {"ok": true, "result": ...} or {"ok": false, "error": "..."}. The
socket is created mode 0600 in a 0700 directory: only root talks to it.

Commands: status, flows, pick, backend (drain/undrain/weight), reload.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import Any

log = logging.getLogger("lbcore.control")

MAX_REQUEST = 64 * 1024


# ---------------------------------------------------------------------------
# server side (inside `lbcore run`)

async def start_control(daemon, stack: contextlib.AsyncExitStack) -> None:
    """Start health checks, the control socket and the metrics endpoint;
    register their shutdown on `stack`."""
    from .metrics import start_metrics

    path = daemon.config.control_socket
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if _socket_alive(path):
            raise RuntimeError(f"control socket {path} is in use (another lbcore running?)")
        os.unlink(path)
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_client(daemon, r, w), path=path, limit=MAX_REQUEST)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)

    async def _close() -> None:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    stack.push_async_callback(_close)
    log.info("control socket %s", path)
    start_metrics(daemon, stack)


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


async def _serve_client(daemon, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                await _reply(writer, {"ok": False, "error": "request too large"})
                break
            if not line:
                break
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ValueError("a request is a JSON object with a string 'cmd'")
                result = await handle(daemon, req)
                resp = {"ok": True, "result": result}
            except (ValueError, KeyError, TypeError) as e:
                resp = {"ok": False, "error": str(e).strip("'\"")}
            except Exception as e:  # noqa: BLE001 - reported to the client, logged
                log.exception("control command failed")
                resp = {"ok": False, "error": f"internal error: {e}"}
            await _reply(writer, resp)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _reply(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


async def handle(daemon, req: dict) -> Any:
    """Execute one control request against the running daemon."""
    cmd = req["cmd"]
    bal = daemon.balancer
    if cmd == "status":
        return status(daemon)
    if cmd == "flows":
        limit = int(req.get("limit") or 100)
        flows = daemon.dp.flow_table.walk(limit=None if req.get("vip") else limit)
        if req.get("vip"):
            vips = [v for v in bal.vips.values() if _vip_match(v, req["vip"])]
            if not vips:
                raise ValueError(f"no VIP matches {req['vip']!r}")
            keys = {(str(v.address), v.port) for v in vips}
            flows = [f for f in flows if (f["vip"], f["vport"]) in keys][:limit]
        return flows
    if cmd == "pick":
        return bal.pick(str(req["vip"]), str(req["src"]), int(req["sport"]), req.get("proto"))
    if cmd == "backend":
        action = req.get("action")
        matches = bal.find_backends(req.get("vip"), str(req["backend"]))
        if not matches:
            raise ValueError(f"no backend {req['backend']!r} on VIP {req.get('vip')!r}")
        changed = False
        for v, b in matches:
            if action == "drain":
                changed |= bal.drain(v, b, True)
            elif action == "undrain":
                changed |= bal.drain(v, b, False)
            elif action == "weight":
                w = req.get("weight")
                if not isinstance(w, int) or isinstance(w, bool) or w < 0:
                    raise ValueError(f"weight must be an integer >= 0, not {w!r}")
                changed |= bal.set_backend_weight(v, b, w)
            else:
                raise ValueError(f"unknown backend action {action!r} (drain|undrain|weight)")
        if changed:
            daemon.republish()
        return {"changed": changed, "backends": [f"{v.name} {b.address}:{b.port}"
                                                 for v, b in matches]}
    if cmd == "reload":
        ok, changes = await daemon.reload()
        if not ok:
            raise ValueError("reload refused: " + "; ".join(changes))
        return {"changes": changes}
    raise ValueError(f"unknown command {cmd!r}")


def _vip_match(v, spec: str) -> bool:
    from .balancer import _vip_matches
    return _vip_matches(v, spec)


def status(daemon) -> dict:
    """Everything `lbcore status` shows, from the live data plane."""
    bal = daemon.balancer
    vstats = [v.stat_id for v in bal.vips.values()]
    bstats = [b.stat_id for v in bal.vips.values() for b in v.backends.values()]
    st = daemon.dp.stats(vip_stats=vstats, backend_stats=bstats)
    ft = daemon.dp.flow_table
    now = time.monotonic()
    vips = []
    for v in bal.vips.values():
        pk, by, nf = st["vips"][v.stat_id]
        bes = []
        for b in v.backends.values():
            bp, bb, bn = st["backends"][b.stat_id]
            hs = daemon.health_of(v, b)
            bes.append({
                "address": str(b.address), "port": b.port,
                "state": "up" if b.up else "down", "draining": b.draining,
                "weight": b.weight if b.weight_override is None else b.weight_override,
                "effective_weight": b.effective_weight(v.slow_start, now),
                "active_flows": ft.active_backend(b.stat_id), "packets": bp, "bytes": bb,
                "new_flows": bn, "last_change": b.last_change, "reason": b.reason,
                "health": hs,
            })
        vips.append({"name": v.name, "address": str(v.address), "port": v.port,
                     "protocol": v.proto, "pool": v.pool, "active_flows": ft.active_vip(v.stat_id),
                     "packets": pk, "bytes": by, "new_flows": nf, "backends": bes})
    return {
        "version": _version(), "pid": os.getpid(), "uptime": time.time() - daemon.started,
        "config": daemon.config_path, "mode": daemon.config.mode,
        "workers": daemon.config.workers, "vips": vips,
        "flows": {"active": len(ft), "capacity": ft.capacity, **ft.counters()},
        "totals": {k: st[k] for k in ("rx", "tx", "rx_bytes", "tx_bytes", "flow_hit",
                                      "flow_miss", "flow_new", "tx_errors")},
        "drops": st["drops"], "worker_loops": st["workers"],
        "table": {"rebuilds": bal.rebuilds, "last_build_seconds": bal.last_rebuild_s},
    }


def _version() -> str:
    from ._version import __version__
    return __version__


# ---------------------------------------------------------------------------
# client side (the CLI verbs)

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
    from .config import DEFAULT_CONTROL_SOCKET, ConfigError, load_config
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
    t = Table(show_lines=False)
    for col in ("VIP", "backend", "health", "weight", "flows", "packets", "bytes",
                "last change"):
        t.add_column(col, justify="right" if col in ("weight", "flows", "packets", "bytes")
                     else "left")
    for v in st["vips"]:
        t.add_row(f"[bold]{v['name']}[/]", f"{v['address']}:{v['port']}/{v['protocol']}", "",
                  "", str(v["active_flows"]), _human(v["packets"]), _human(v["bytes"]), "")
        for b in v["backends"]:
            health = "[green]up[/]" if b["state"] == "up" else "[red]down[/]"
            if b["draining"]:
                health += " [yellow]draining[/]"
            t.add_row("", f"{b['address']}:{b['port']}", health,
                      f"{b['effective_weight']}/{b['weight']}", str(b["active_flows"]),
                      _human(b["packets"]), _human(b["bytes"]),
                      f"{_ago(b['last_change'])} ({b['reason']})")
    con.print(t)
    drops = {k: v for k, v in st["drops"].items() if v}
    if drops:
        con.print("drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return 0


def cmd_flows(args) -> int:
    flows = request(socket_path(args), {"cmd": "flows", "vip": args.vip, "limit": args.limit})
    if args.json:
        print(json.dumps(flows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table()
    for col in ("proto", "client", "VIP", "backend", "state"):
        t.add_column(col)
    names = {6: "tcp", 17: "udp"}
    for fl in flows:
        t.add_row(names.get(fl["proto"], str(fl["proto"])), f"{fl['client']}:{fl['cport']}",
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
