"""Parsers for what the load generators and /proc print. Pure functions: tested without root.

wrk's text output (we parse the text rather than a Lua ``done()`` hook so that the numbers come
from the same report a person reads), iperf3's ``--json`` document, the sender's JSON line, and
the CPU counters of /proc/stat and /proc/<pid>/stat.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


class ParseError(ValueError):
    """A generator's output was not what we expected (the message quotes it)."""


def wrk_time_us(text: str) -> float:
    """A wrk duration ("812.00us", "1.23ms", "2.00s", "1.00m") in microseconds."""
    m = re.fullmatch(r"\s*([0-9.]+)(us|ms|s|m|h)\s*", text)
    if not m:
        raise ParseError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def _si(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)([kKMG]?)\s*", text)
    if not m:
        raise ParseError(f"not a number: {text!r}")
    return float(m.group(1)) * _SI[m.group(2)]


@dataclass
class WrkResult:
    """What one wrk run reported."""

    requests: int
    duration_s: float
    rps: float
    latency_avg_us: float | None = None
    latency_max_us: float | None = None
    percentiles_us: dict[float, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0

    @property
    def error_count(self) -> int:
        """Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers."""
        return sum(self.errors.values()) + self.non_2xx


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk 4.x output (with or without ``--latency``)."""
    m = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),", text, re.M)
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    if not m or not rps:
        raise ParseError(f"no request count in wrk output:\n{text.strip()[:2000]}")
    res = WrkResult(requests=int(m.group(1)),
                    duration_s=wrk_time_us(m.group(2) + m.group(3)) / 1e6,
                    rps=float(rps.group(1)))
    lat = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if lat:
        res.latency_avg_us = wrk_time_us(lat.group(1))
        res.latency_max_us = wrk_time_us(lat.group(3))
    dist = text.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pm in re.finditer(r"^\s*([0-9.]+)%\s+(\S+)\s*$", dist[1], re.M):
            res.percentiles_us[float(pm.group(1))] = wrk_time_us(pm.group(2))
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if se:
        res.errors = dict(zip(("connect", "read", "write", "timeout"),
                              (int(g) for g in se.groups()), strict=True))
    nx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if nx:
        res.non_2xx = int(nx.group(1))
    return res


@dataclass
class IperfResult:
    """What one iperf3 client run reported (receiver side figures)."""

    gbps: float
    retransmits: int | None
    streams: int
    seconds: float


def parse_iperf3(text: str) -> IperfResult:
    """Parse ``iperf3 -c ... --json``. Raises ParseError with iperf3's own error if it failed."""
    try:
        doc: dict[str, Any] = json.loads(text)
    except ValueError as e:
        raise ParseError(f"iperf3 did not print JSON ({e}):\n{text.strip()[:2000]}") from e
    if doc.get("error"):
        raise ParseError(f"iperf3: {doc['error']}")
    try:
        end = doc["end"]
        recv = end["sum_received"]
        sent = end.get("sum_sent", {})
        streams = int(doc.get("start", {}).get("test_start", {}).get("num_streams", 0)
                      or len(end.get("streams", [])))
        return IperfResult(gbps=float(recv["bits_per_second"]) / 1e9,
                           retransmits=sent.get("retransmits"),
                           streams=streams, seconds=float(recv["seconds"]))
    except (KeyError, TypeError) as e:
        raise ParseError(f"iperf3 JSON without end.sum_received ({e})") from e


def parse_flood(text: str) -> dict[str, float]:
    """The JSON line udpflood prints at exit."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return {k: float(v) for k, v in json.loads(line).items()}
            except ValueError as e:
                raise ParseError(f"bad udpflood line {line!r}: {e}") from e
    raise ParseError(f"no result line from udpflood:\n{text.strip()[:2000]}")


# --------------------------------------------------------------------------- CPU

CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def parse_proc_stat(text: str) -> dict[int, dict[str, int]]:
    """Per-CPU tick counters of /proc/stat: {cpu: {"user": .., "system": .., "softirq": ..}}."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        m = re.match(r"^cpu(\d+)\s+(.*)$", line)
        if m:
            vals = [int(x) for x in m.group(2).split()]
            out[int(m.group(1))] = dict(zip(CPU_FIELDS, vals, strict=False))
    return out


def cpu_delta_pct(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]]
                  ) -> dict[int, dict[str, float]]:
    """Per-CPU share of each kind of time between two /proc/stat readings, in percent, plus
    "busy" (everything but idle and iowait)."""
    out: dict[int, dict[str, float]] = {}
    for cpu, a in after.items():
        b = before.get(cpu)
        if b is None:
            continue
        d = {k: a.get(k, 0) - b.get(k, 0) for k in CPU_FIELDS}
        total = sum(d.values())
        if total <= 0:
            continue
        pct = {k: 100.0 * v / total for k, v in d.items()}
        pct["busy"] = 100.0 - pct["idle"] - pct["iowait"]
        out[cpu] = pct
    return out


def cpu_seconds(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]],
                hz: int, kinds: tuple[str, ...] | None = None) -> float:
    """CPU seconds of the given kinds ("softirq", ...; default: everything but idle and
    iowait), summed over every CPU, between two /proc/stat readings (``hz``: clock ticks per
    second)."""
    want = kinds or tuple(k for k in CPU_FIELDS if k not in ("idle", "iowait"))
    ticks = 0
    for cpu, a in after.items():
        b = before.get(cpu)
        if b is None:
            continue
        ticks += sum(a.get(k, 0) - b.get(k, 0) for k in want)
    return ticks / hz


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks from /proc/<pid>/stat (the comm field may hold spaces
    and parentheses: split after the last ")")."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]), int(rest[12])
