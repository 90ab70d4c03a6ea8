"""Number, time and state formatting shared by the status page, `lbcore top` and `lbcore status`,
so that they show a snapshot in the same words and judge it alike.

The data plane's parts of a snapshot (I/O path, busy polling, CPUs, rawsock's kernel copies,
fragment reassembly, flow continuity, SYN shedding) are worded here once, as lines
(:data:`Line`): pieces of text each with a level ("" plain, "ok", "warn" or "bad"). The three
readers differ only in how they colour a level (a rich style in the terminal, a CSS class on
the page), so a state that is a warning in one is a warning in all of them.
"""
from __future__ import annotations

import time
from typing import Any, Literal

UNKNOWN = "–"  # a rate not known yet (the view needs two samples)


def si(n: float | None, unit: str = "", digits: int = 1) -> str:
    """1234567 -> "1.2 M" (``unit`` appended: "1.2 MB/s"); None -> UNKNOWN."""
    if n is None:
        return UNKNOWN
    if abs(n) < 1000:
        num = f"{n:.0f}" if float(n).is_integer() or abs(n) >= 100 else f"{n:.{digits}f}"
        return f"{num} {unit}" if unit else num
    for prefix in ("k", "M", "G", "T", "P"):
        n /= 1000
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.{digits}f} {prefix}{unit}"
    raise AssertionError("unreachable")


def duration(s: float) -> str:
    """Seconds as the two largest units: "45s", "3m 20s", "2h 5m", "4d 1h"."""
    s = max(0, int(s))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {sec}s"
    return f"{sec}s"


def clock(ts: float, now: float) -> str:
    """A wall-clock time in the local zone, with the date when it is not ``now``'s day."""
    lt, ln = time.localtime(ts), time.localtime(now)
    fmt = "%H:%M:%S" if lt[:3] == ln[:3] else "%Y-%m-%d %H:%M:%S"
    return time.strftime(fmt, lt)


def backend_state(b: dict[str, Any]) -> str:
    """One word for a snapshot's backend: "down" (whether or not it is also draining),
    "draining" (up, but given no new flows) or "up"."""
    if b["state"] != "up":
        return "down"
    return "draining" if b["draining"] else "up"


def hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def vip_title(v: dict[str, Any]) -> tuple[str, str]:
    """(name, address) of a snapshot's VIP for a heading: the name is left out ("") when it
    is only the address again (a VIP without a name in the config is named after it)."""
    where = f"{hostport(v['address'], v['port'])}/{v['protocol']}"
    return ("" if v["name"] == where else v["name"]), where


def ago(ts: float, now: float) -> str:
    """How long before ``now`` wall time ``ts`` was, coarsely: "45s ago", "12m ago", "3.5h ago"."""
    d = max(0.0, now - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


# --------------------------------------------------------------------------- the data plane

Level = Literal["", "ok", "warn", "bad"]
Line = list[tuple[str, Level]]   # one line of text in pieces, each with its level
LEVELS: tuple[Level, ...] = ("", "ok", "warn", "bad")   # from least to most alarming


def worst(line: Line) -> Level:
    """The most alarming level in ``line`` (what a whole row is marked with)."""
    return max((lvl for _, lvl in line), key=LEVELS.index, default="")


def plain(line: Line) -> str:
    """``line``'s text without levels."""
    return "".join(t for t, _ in line)


def io_line(io: str | None) -> Line | None:
    """The I/O path the TUN workers use ("io_uring", "read/write"; None before any started)."""
    return [(f"I/O path: {io}", "")] if io else None


def busy_poll_line(bp: dict[str, Any] | None) -> Line | None:
    """The workers' busy polling: the window, and the CPU it costs now and in all (the rate,
    "cores", is None until the status view's second look)."""
    if not bp:
        return None
    if not bp["window_us"]:
        return [("busy poll off (busy_poll_us = 0): workers sleep as soon as a queue is empty",
                 "")]
    now = (f"{bp['cores'] * 100:.1f} % of a core" if bp.get("cores") is not None
           else "rate not known yet")
    return [(f"busy poll {bp['window_us']} µs after traffic: {now} spinning on empty queues, "
             f"{bp['seconds']:.1f} s since start", "")]


def cpus_line(cpus: dict[str, Any] | None) -> Line | None:
    """Where the workers are pinned and where the rest of the process (event loop, health
    checks, HTTP) runs: on the CPUs no worker takes, or on every CPU when the workers take them
    all (then the control plane's bursts can preempt a polling worker). Nothing before the
    workers start."""
    if not cpus or not cpus.get("workers"):
        return None
    workers = ", ".join("any" if c is None else str(c) for c in cpus["workers"])
    control = cpus.get("control")
    return [(f"CPUs: worker(s) on {workers}; control plane on "
             + (", ".join(map(str, control)) if control
                else "every CPU (none is left without a worker)"), "")]


def rawsock_line(rs: dict[str, Any] | None) -> Line | None:
    """Mode rawsock: per link, where the kernel's own copy of a taken frame dies, and the
    frames lost to full receive rings. A link without its tc filter is a warning (its
    blackhole routes still keep the kernel out, at more CPU per frame); lost frames are bad."""
    if not rs:
        return None
    line: Line = [("kernel copies: ", "")]
    for i, (link, k) in enumerate(rs["kernel_copy"].items()):
        if i:
            line.append(("; ", ""))
        if k["dropped_by"] == "tc":
            line.append((f"{link}: tc filter, {k['dropped']} dropped", ""))
        else:
            line += [(f"{link}: ", ""), ("blackhole routes only", "warn"),
                     (f" ({k['reason']})", "")]
    if not rs["kernel_copy"]:
        line.append(("no links", ""))
    line.append(("  ", ""))
    line.append((f"{rs['ring_drops']} frames lost to full rings", "bad") if rs["ring_drops"]
                else ("no frames lost to full rings", ""))
    return line


def fragments_line(fr: dict[str, int] | None) -> Line | None:
    """Fragment reassembly, once any fragment was seen (None before: nothing to say)."""
    if not fr or not (fr["first"] or fr["held"] or fr["early_dropped"]):
        return None
    return [(f"fragments: {fr['entries']}/{fr['capacity']} datagrams, "
             f"{fr['buffers']}/{fr['buffer_capacity']} held; first {fr['first']}, "
             f"forwarded {fr['forwarded']}, held {fr['held']}, released {fr['released']}, "
             f"early_dropped {fr['early_dropped']}, timeouts {fr['timeouts']}, "
             f"evicted {fr['evicted']}", "")]


def adoption_line(ad: dict[str, Any] | None) -> Line | None:
    """What this run took over of the last run's flow table at start."""
    if ad is None:
        return None
    if "refused" in ad:
        return [(f"flow table at start: not adopted ({ad['refused']})", "")]
    skipped = {k: ad.get(k, 0) for k in ("expired", "unbound", "invalid", "duplicate", "full")
               if ad.get(k)}
    return [(f"flow table at start: adopted {ad['adopted']} flow(s) in "
             f"{ad.get('seconds', 0):.3f}s"
             + (" (skipped " + ", ".join(f"{k}={n}" for k, n in skipped.items()) + ")"
                if skipped else ""), "")]


def tun_line(tun: dict[str, Any] | None) -> Line | None:
    """Tun mode: whether this run attached to the TUN device the last run left."""
    if tun is None:
        return None
    return [(f"tun {tun['name']}: " + ("attached to the last run's device" if tun["adopted"]
                                      else "made at start"), "")]


def sync_line(sy: dict[str, Any] | None) -> Line | None:
    """The flow sync between gateways: peers, records sent and received, rejections."""
    if sy is None:
        return None
    sent, rec = sy["sent"], sy["received"]
    rejected = {k: n for k, n in sy["rejected"].items() if n}
    return [(f"sync with {', '.join(sy['peers']) or 'no peer'}: sent "
             f"{sent['records_new']} new, {sent['records_refresh']} refresh, "
             f"{sent['records_end']} end in {sent['datagrams']} datagrams; received "
             + ", ".join(f"{k}={n}" for k, n in rec.items())
             + ("; rejected " + ", ".join(f"{k}={n}" for k, n in sorted(rejected.items()))
                if rejected else ""), "")]


def shed_lines(sh: dict[str, Any] | None, now: float) -> list[Line]:
    """The SYN shed filter (tun mode, VIPs with new_flow_rate): shedding now (bad) or idle,
    then one line per guarded VIP; nothing without a guarded VIP."""
    if sh is None or not sh["vips"]:
        return []
    state: Line = ([("shedding", "bad"), (f" since {ago(sh['since'], now)}", "")]
                   if sh["active"] else [("idle", "ok")])
    dropped = sh.get("tun_dropped")
    lines = [[("SYN shed filter before the TUN queue: ", ""), *state]
             + ([(f"  (TUN dropped {dropped})", "")] if dropped is not None else [])]
    for v in sh["vips"]:
        udp = v.get("protocol") == "udp"
        lines.append([(
            f"{v['name']} {v['address']}:{v['port']}/{v.get('protocol', 'tcp')}: "
            f"new_flow_rate {v['new_flow_rate']}/s, offered "
            f"{v['syn_rate'] or 0:.0f} new-flow {'datagrams' if udp else 'SYNs'}/s, "
            f"share {v['share']:.0%}; seen {v['syns']}, shed {v['shed']}, "
            + (f"answered flows passed {v['retried']}" if udp
               else f"retries passed {v['retried']}"), "")])
    return lines


def dataplane_lines(st: dict[str, Any], now: float) -> list[tuple[str, list[Line]]]:
    """The data plane's parts of snapshot ``st`` that have something to show, in the order
    `lbcore status` prints them: (the part's key in the snapshot, its lines). The page and
    top walk this one list, so they show the same parts in the same order."""
    parts: list[tuple[str, list[Line | None]]] = [
        ("io", [io_line(st.get("io"))]),
        ("busy_poll", [busy_poll_line(st.get("busy_poll"))]),
        ("cpus", [cpus_line(st.get("cpus"))]),
        ("rawsock", [rawsock_line(st.get("rawsock"))]),
        ("fragments", [fragments_line(st.get("fragments"))]),
        ("adoption", [adoption_line(st.get("adoption"))]),
        ("tun", [tun_line(st.get("tun"))]),
        ("sync", [sync_line(st.get("sync"))]),
        ("shed", [*shed_lines(st.get("shed"), now)]),
    ]
    return [(k, [ln for ln in lines if ln]) for k, lines in parts if any(lines)]
