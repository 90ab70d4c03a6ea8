"""Number, time and state formatting shared by the status page and `lbcore top`, so that the
two show a snapshot in the same words."""
from __future__ import annotations

import time
from typing import Any

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
