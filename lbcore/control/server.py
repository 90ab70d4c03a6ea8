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
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                    raise ValueError("a request is a JSON object with a string 'cmd'")
                result = await handle(daemon, view, req)
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


async def handle(daemon: Daemon, view: StatusView, req: dict) -> Any:
    """Execute one control request against the running daemon."""
    cmd = req["cmd"]
    if cmd == "status":
        return view.snapshot()
    if cmd == "flows":
        return await view.flows(req.get("vip"), int(req.get("limit") or 100))
    if cmd == "pick":
        return view.pick(str(req["vip"]), str(req["src"]), int(req["sport"]), req.get("proto"))
    if cmd == "backend":
        return await _backend(daemon, req)
    if cmd == "drain-gateway":
        return {"withdrawn": daemon.drain_gateway()}
    if cmd == "reload":
        ok, changes = await daemon.reload()
        if not ok:
            raise ValueError("reload refused: " + "; ".join(changes))
        return {"changes": changes}
    raise ValueError(f"unknown command {cmd!r}")


async def _backend(daemon: Daemon, req: dict) -> dict:
    """drain / undrain / weight of the backends matching req["backend"] on req["vip"]."""
    bal = daemon.balancer
    assert bal is not None
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
        await daemon.republish()
    return {"changed": changed, "backends": [f"{v.name} {b.address}:{b.port}"
                                             for v, b in matches]}
