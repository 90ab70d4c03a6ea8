"""`lbcore top`: the status page's picture in a terminal, redrawn every second.

For a gateway reached over ssh. Each second it asks the balancer for the same snapshot as
`lbcore status` (over the control socket, so it needs the socket's permissions, i.e. root) and
redraws it with rich's Live display on the terminal's alternate screen. The rates it shows are
the StatusView's (see :mod:`.status`): polling once a second makes them per-second rates.

`q` (read from the terminal in cbreak mode, which leaves Ctrl-C working) or Ctrl-C leaves and
gives the terminal back as it was. When the balancer does not answer (restarting, stopped), the
last picture stays, marked stale with the error, and top keeps asking.
"""
from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .client import ControlError, request, socket_path
from .fmt import (
    Level,
    Line,
    backend_state,
    clock,
    dataplane_lines,
    duration,
    hostport,
    si,
    vip_title,
    worst,
)

STYLE = {"up": "bold white on green4", "down": "bold white on red3",
         "draining": "bold black on yellow3"}
QUIT_KEYS = (b"q", b"Q")
# how top colours the levels of the shared data plane lines (see .fmt), as it colours the
# flow table's fill and the drops
LEVEL_STYLE: dict[Level, str] = {"": "", "ok": "green", "warn": "bold yellow", "bad": "bold red"}


def render(st: dict[str, Any] | None, error: str | None = None,
           now: float | None = None) -> RenderableType:
    """One screen: header, totals, a table of every VIP's backends, drops and flow events, then
    the data plane's lines (those of `lbcore status`) below them, where a screen too short
    for everything cuts them rather than the backends."""
    now = time.time() if now is None else now
    if st is None:
        return Text(f"lbcore top: waiting for the balancer: {error}\n(q or Ctrl-C leaves)",
                    style="red")
    parts: list[RenderableType] = []
    head = Text()
    head.append("lbcore top", style="bold")
    head.append(f"  {st['version']}  pid {st['pid']}  mode {st['mode']}  workers "
                f"{st['workers']}  up {duration(st['uptime'])}  ")
    head.append(f"at {clock(st.get('time', now), now)}", style="dim" if error else "")
    head.append("   q quits", style="dim")
    parts.append(head)
    if error:
        parts.append(Text(f"STALE: no answer from lbcore ({error}); retrying", style="bold red"))

    f, r = st["flows"], st["rates"]
    rt = r["totals"]
    fill = f["active"] / f["capacity"] if f["capacity"] else 0.0
    drop_rate = sum(x for x in r["drops"].values() if x) if r["interval"] else None
    line = Text()
    line.append(f"flows {f['active']:,}/{f['capacity']:,} ({fill:.1%})",
                style="bold red" if fill >= 0.9 else "yellow" if fill >= 0.75 else "")
    line.append(f"  new {si(rt['flow_new'], '/s')}  packets in {si(rt['rx'], '/s')} "
                f"out {si(rt['tx'], '/s')}  bytes in {si(rt['rx_bytes'], 'B/s')} "
                f"out {si(rt['tx_bytes'], 'B/s')}  ")
    line.append(f"drops {si(drop_rate, '/s')}", style="bold yellow" if drop_rate else "")
    parts.append(line)

    t = Table(expand=False, pad_edge=False, box=None, header_style="bold reverse")
    for col, right in (("VIP / backend", False), ("state", False), ("last change", False),
                       ("reason", False), ("weight", True), ("eff", True), ("flows", True),
                       ("new/s", True), ("pkt/s", True), ("bytes/s", True)):
        t.add_column(col, justify="right" if right else "left", no_wrap=col != "reason",
                     max_width=30 if col == "reason" else None)
    for v in st["vips"]:
        n, u = len(v["backends"]), v["usable_backends"]
        vr = v["rates"]
        name, where = vip_title(v)
        t.add_row(Text(f"{name} {where}" if name else where, style="bold"),
                  Text(f"{u}/{n} usable", style="green" if u else "bold white on red3"),
                  "", f"pool {v['pool']}", "", "", si(v["active_flows"]),
                  si(vr["new_flows"]), si(vr["packets"]), si(vr["bytes"], "B"))
        for b in v["backends"]:
            s = backend_state(b)
            br = b["rates"]
            eff = str(b["effective_weight"])
            if s == "up" and b["effective_weight"] < b["weight"]:
                eff += " slow"
            t.add_row(f"  {hostport(b['address'], b['port'])}",
                      Text(f" {s.upper()} ", style=STYLE[s]),
                      f"{clock(b['last_change'], now)} ({duration(now - b['last_change'])} ago)",
                      b["reason"], str(b["weight"]), eff, si(b["active_flows"]),
                      si(br["new_flows"]), si(br["packets"]), si(br["bytes"], "B"))
    parts.append(t)

    drops = [f"{k} {si(n)} ({si(r['drops'].get(k), '/s')})"
             for k, n in st["drops"].items() if n]
    parts.append(Text("drops: " + (", ".join(drops) if drops else "none"),
                      style="yellow" if drops else "dim"))
    events = [f"{k} {si(n)}" for k, n in f.items() if k not in ("active", "capacity") and n]
    parts.append(Text("flow table events: " + (", ".join(events) if events else "none"),
                      style="dim"))
    if st.get("bgp"):       # None without a [bgp] section
        parts.append(Text(f"BGP: {_bgp_text(st['bgp'])}"))
    for _part, lines in dataplane_lines(st, st.get("time", now)):
        parts += [_line(ln, indent=i > 0) for i, ln in enumerate(lines)]
    return Group(*parts)


def _line(line: Line, indent: bool = False) -> Text:
    """One shared data plane line (see .fmt), coloured by level. A plain line is cut to the
    terminal's width with an ellipsis, so that it takes one row (the backends' table above
    matters more than the end of a long sync line); one with a warning wraps instead, since
    the warning may be at its end (rawsock's frames lost to full rings)."""
    cut = worst(line) in ("", "ok")
    t = Text("  " if indent else "", no_wrap=cut, overflow="ellipsis" if cut else "fold")
    for text, lvl in line:
        t.append(text, style=LEVEL_STYLE[lvl])
    return t


def _bgp_text(bgp: Any) -> str:
    """The snapshot's "bgp" part on one line, as it comes (top does not interpret it)."""
    if isinstance(bgp, list):
        return "; ".join(_bgp_text(x) for x in bgp) or "none"
    if isinstance(bgp, dict):
        return ", ".join(f"{k}={_bgp_text(x)}" if isinstance(x, dict | list) else f"{k}={x}"
                         for k, x in bgp.items()) or "none"
    return str(bgp)


@contextlib.contextmanager
def keys() -> Iterator[Any]:
    """A function ``wait(timeout) -> bool`` that waits up to ``timeout`` s for a key and says
    whether it was a quit key. The terminal is in cbreak mode meanwhile (keys arrive one by
    one, unechoed; Ctrl-C still interrupts) and restored after; without a terminal on stdin,
    ``wait`` just sleeps."""
    fd = sys.stdin.fileno() if sys.stdin and not sys.stdin.closed else -1
    if fd < 0 or not os.isatty(fd):
        def sleep(timeout: float) -> bool:
            time.sleep(timeout)
            return False
        yield sleep
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def wait(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return False
            data = os.read(fd, 64)
            if not data or any(k in data for k in QUIT_KEYS):
                return True
        return False
    try:
        yield wait
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_top(args: Any) -> int:
    """`lbcore top`: redraw every ``args.interval`` s until q or Ctrl-C."""
    from rich.live import Live
    path = socket_path(args)
    interval = max(0.2, float(getattr(args, "interval", 1.0)))
    console = Console()
    last: dict[str, Any] | None = None
    try:
        with keys() as wait, Live(render(None, "connecting"), console=console, screen=True,
                                  auto_refresh=False, transient=True) as live:
            while True:
                error = None
                try:
                    last = request(path, {"cmd": "status"}, timeout=5)
                except (ControlError, OSError, ValueError) as e:
                    error = str(e)
                live.update(render(last, error), refresh=True)
                if wait(interval):
                    break
    except KeyboardInterrupt:
        pass
    return 0
