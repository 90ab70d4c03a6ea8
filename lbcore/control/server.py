"""Runtime control, server side: a Unix socket with a small JSON API inside `lbcore run`.

Protocol: one JSON object per line each way. Request {"cmd": NAME, ...args};
reply {"ok": true, "result": ...} or {"ok": false, "error": "..."}. The
socket is created mode 0600 in a 0700 directory: only root talks to it.

Commands: status, flows, pick (read through the StatusView), backend
(drain/undrain/weight) and reload (changes through the Daemon).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from ..balancer import PublishError
from ..config import (
    FLOW_MAX,
    MAX_WEIGHT,
    ArgumentError,
    check_address,
    check_choice,
    check_integer,
    check_port,
    check_protocol,
    check_spec,
    check_weight,
)
from .status import StatusView

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger("lbcore.control")

MAX_REQUEST = 64 * 1024


async def start_control(daemon: Daemon, view: StatusView,
                        stack: contextlib.AsyncExitStack) -> None:
    """Serve the control socket at config.control_socket; register its shutdown on
    ``stack``. Refuses to start when another lbcore answers on that socket."""
    path = daemon.config.control_socket
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if _socket_alive(path):
            raise RuntimeError(f"control socket {path} is in use (another lbcore running?)")
        os.unlink(path)
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _serve_client(daemon, view, r, w), path=path, limit=MAX_REQUEST)
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


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


async def _serve_client(daemon: Daemon, view: StatusView, reader: asyncio.StreamReader,
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
                try:
                    req = json.loads(line)
                except (ValueError, RecursionError):
                    raise ArgumentError("a request is one line of JSON") from None
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ArgumentError("a request is a JSON object with a string 'cmd'")
                result = await handle(daemon, view, req)
                resp = {"ok": True, "result": result}
            except (ArgumentError, PublishError) as e:
                resp = {"ok": False, "error": str(e)}
            except (ValueError, KeyError, TypeError) as e:
                # a refusal from deeper down (e.g. a VIP that matches nothing)
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


FLOWS_PAGE_MAX = 10000   # flows per answer: a bigger read pages with "cursor"

# the arguments each command accepts (besides "cmd"); anything else is refused, as an
# unknown key of the config is
_ARGS = {"status": (), "flows": ("vip", "limit", "cursor"),
         "pick": ("vip", "src", "sport", "proto"),
         "backend": ("action", "vip", "backend", "weight"), "reload": (),
         "drain-gateway": ()}
_BACKEND_ACTIONS = ("drain", "undrain", "weight")


def _check_args(cmd: str, req: dict) -> dict:
    """The request's arguments, after refusing unknown ones."""
    allowed = _ARGS.get(cmd)
    if allowed is None:
        raise ArgumentError(f"unknown command {cmd!r}; expected one of: " + ", ".join(_ARGS))
    args = {k: v for k, v in req.items() if k != "cmd"}
    for k in args:
        if k not in allowed:
            raise ArgumentError(f"{k}: unknown argument of {cmd}" + (
                "; expected one of: " + ", ".join(allowed) if allowed else " (it takes none)"))
    return args


def _required(args: dict, key: str, what: str) -> Any:
    if args.get(key) is None:
        raise ArgumentError(f"{key}: missing; expected {what}")
    return args[key]


def _find_vips(daemon: Daemon, spec: str) -> list:
    assert daemon.balancer is not None
    return daemon.balancer.find_vips(spec)


async def handle(daemon: Daemon, view: StatusView, req: dict) -> Any:
    """Execute one control request against the running daemon. Every argument is checked
    by the config's rules first (lbcore.config.check_*): a bad one raises ArgumentError
    naming it, before anything changes."""
    cmd = req["cmd"]
    args = _check_args(cmd, req)
    if cmd == "status":
        return view.snapshot()
    if cmd == "flows":
        vip = args.get("vip")
        vip = check_spec(vip, "vip") if vip not in (None, "") else None
        if vip is not None and not _find_vips(daemon, vip):
            raise ArgumentError(f"vip: no VIP matches {vip!r}")
        limit = args.get("limit")
        limit = 100 if limit is None else check_integer(limit, "limit", 1, FLOWS_PAGE_MAX)
        cursor = args.get("cursor")
        if cursor is None:
            return await view.flows(vip, limit)
        return await view.flows_page(vip, limit, check_integer(cursor, "cursor", 0, FLOW_MAX))
    if cmd == "pick":
        vip = check_spec(_required(args, "vip", "a VIP name or ADDR[:PORT]"), "vip")
        src = check_address(_required(args, "src", "the client's address"), "src")
        sport = check_port(_required(args, "sport", "the client's port"), "sport", lo=0)
        proto = args.get("proto")
        proto = check_protocol(proto, "proto") if proto is not None else None
        vips = [v for v in _find_vips(daemon, vip) if proto is None or v.proto == proto]
        if not vips:
            raise ArgumentError(f"vip: no {proto or ''} VIP matches {vip!r}".replace("  ", " "))
        if vips[0].address.version != src.version:
            raise ArgumentError(f"src: {src} is IPv{src.version}, VIP {vips[0].name} is "
                                f"IPv{vips[0].address.version}")
        return view.pick(vip, str(src), sport, proto)
    if cmd == "backend":
        return await _backend(daemon, args)
    if cmd == "drain-gateway":
        return {"withdrawn": daemon.drain_gateway()}
    ok, changes = await daemon.reload()   # cmd == "reload"
    if not ok:
        raise ArgumentError("reload refused: " + "; ".join(changes))
    return {"changes": changes}


async def _backend(daemon: Daemon, args: dict) -> dict:
    """drain / undrain / weight of the backends matching args["backend"] on args["vip"], as
    one transaction: all of them change and the table is published, or nothing changes."""
    bal = daemon.balancer
    assert bal is not None
    action = check_choice(_required(args, "action", "drain, undrain or weight"), "action",
                          _BACKEND_ACTIONS)
    vip = args.get("vip")
    vip = check_spec(vip, "vip") if vip is not None else None
    backend = check_spec(_required(args, "backend", "a backend ADDR[:PORT]"), "backend")
    weight = 0
    if action == "weight":
        weight = check_weight(_required(args, "weight", f"an integer 0..{MAX_WEIGHT}"))
    elif args.get("weight") is not None:
        raise ArgumentError(f"weight: only `backend weight` takes one, not {action}")
    matches = bal.find_backends(vip, backend)
    if not matches:
        raise ArgumentError(f"backend: no backend {backend!r} on VIP {vip!r}")

    def mutate() -> bool:
        changed = False
        for v, b in matches:
            if action == "weight":
                changed |= bal.set_backend_weight(v, b, weight)
            else:
                changed |= bal.drain(v, b, action == "drain")
        return changed

    changed = await daemon.change(mutate)
    return {"changed": changed, "backends": [f"{v.name} {b.address}:{b.port}"
                                             for v, b in matches]}
