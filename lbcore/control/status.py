"""The read model of a running balancer: what `lbcore status`, `lbcore flows`, `lbcore pick`
and the metrics endpoint show.

Every reader of the balancer's state goes through one :class:`StatusView`; it is the only code
outside the daemon that reads the data plane's counters and flow table. Its methods are called
on the event loop thread (the HTTP server's threads hop there first), so a snapshot never races
a reload or a health change; the parts that walk the flow table run in a worker thread.

Rates (packets/s, bytes/s, new flows/s, drops/s) are computed here, not by each reader: every
snapshot keeps its counters, and the next one divides the difference to the newest kept sample
at least ``RATE_MIN_INTERVAL`` old by the time between them. So `status --json`, the status
page and `lbcore top` show the same figures from one piece of code, and a reader that polls
once a second (the page, top) gets per-second rates over about the last second, while one that
polls rarely (Prometheus, whose own rate() is what dashboards use) gets the mean since its last
look. A rate is None until there are two samples far enough apart, and for a counter that went
backwards (a VIP or backend that was removed and added again by a reload starts from zero).
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..balancer import PROTO
from ..tabledigest import vip_key

if TYPE_CHECKING:
    from ..daemon import Daemon

TOTALS = ("rx", "tx", "rx_bytes", "tx_bytes", "flow_hit", "flow_miss", "flow_new", "tx_errors",
          "echo_replies", "resets", "unreachables", "rejects_limited", "out_dropped",
          "passed")
RATED = ("packets", "bytes", "new_flows")  # the per-VIP and per-backend counters given as rates
# rates are taken over at least this many seconds (shorter gaps are too noisy) and at most
# RATE_MAX_INTERVAL (a sample older than that is forgotten: its mean says little about now)
RATE_MIN_INTERVAL = 0.9
RATE_MAX_INTERVAL = 60.0

Counters = dict[str, int]


class RateKeeper:
    """Per-second rates of monotonic counters from successive samples (see the module doc)."""

    def __init__(self, min_interval: float = RATE_MIN_INTERVAL,
                 max_interval: float = RATE_MAX_INTERVAL) -> None:
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._samples: deque[tuple[float, Counters]] = deque()

    def update(self, now: float, counters: Counters) -> tuple[float | None, dict[str, float]]:
        """Record ``counters`` at ``now`` (monotonic seconds); return the interval the rates
        span (None if no older sample is usable) and the rate of each counter that exists in
        both samples and did not go backwards."""
        while self._samples and now - self._samples[0][0] > self.max_interval:
            self._samples.popleft()
        base = None
        for t, c in reversed(self._samples):
            if now - t >= self.min_interval:
                base = (t, c)
                break
        # keep only what a later call can still use as its base: the samples younger than
        # min_interval, and the newest older one; and of the young ones no more than about
        # four a min_interval, however often readers look (each sample holds every counter)
        if base is not None:
            while self._samples[0][0] < base[0]:
                self._samples.popleft()
        if not self._samples or now - self._samples[-1][0] >= self.min_interval / 4:
            self._samples.append((now, counters))
        if base is None:
            return None, {}
        dt = now - base[0]
        old = base[1]
        return dt, {k: (v - old[k]) / dt for k, v in counters.items()
                    if k in old and v >= old[k]}


class StatusView:
    """Read-only views of one Daemon's balancer, data plane and health checks."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._rates = RateKeeper()

    def snapshot(self) -> dict[str, Any]:
        """Everything `lbcore status` shows, as JSON-able data (also `status --json`)."""
        d = self._daemon
        bal, dp = d.balancer, d.dp
        assert bal is not None and dp is not None
        vstats = [v.stat_id for v in bal.vips.values()]
        bstats = [b.stat_id for v in bal.vips.values() for b in v.backends.values()]
        st = dp.stats(vip_stats=vstats, backend_stats=bstats)
        ft = dp.flow_table
        now = time.monotonic()
        vips = []
        ann = d.announcer
        for v in bal.vips.values():
            pk, by, nf = st["vips"][v.stat_id]
            bes = []
            for b in v.backends.values():
                bp, bb, bn = st["backends"][b.stat_id]
                bes.append({
                    "address": str(b.address), "port": b.port,
                    "state": "up" if b.up else "down", "draining": b.draining,
                    "weight": b.current_weight, "effective_weight": b.effective_weight(
                        v.slow_start, now),
                    "active_flows": ft.active_backend(b.stat_id), "packets": bp, "bytes": bb,
                    "new_flows": bn, "last_change": b.last_change, "reason": b.reason,
                    "health": d.health_of(v, b),
                })
            announced, why = (ann.why(v.address) if ann is not None
                              else (False, "no [bgp] section"))
            vips.append({"name": v.name, "address": str(v.address), "port": v.port,
                         "protocol": v.proto, "pool": v.pool,
                         "announced": announced, "announce_reason": why,
                         "table_digest": d.digests.get(vip_key(v.address, v.port, v.proto)),
                         "active_flows": ft.active_vip(v.stat_id), "packets": pk, "bytes": by,
                         "new_flows": nf, "settings": dict(v.settings),
                         "refused": st.get("vip_limits", {}).get(
                             v.stat_id, {"limit_flows": 0, "limit_rate": 0, "shed": 0}),
                         "backends": bes,
                         "usable_backends": sum(1 for b in bes
                                                if b["state"] == "up" and not b["draining"])})
        snap = {
            "version": __version__, "pid": os.getpid(), "uptime": time.time() - d.started,
            "time": time.time(),
            "config": d.config_path, "mode": d.config.mode, "workers": d.config.workers,
            "io": ", ".join(sorted({p for p, _ in dp.io_paths().values()})) or None,
            "vips": vips,
            "flows": {"active": len(ft), "capacity": ft.capacity, **ft.counters()},
            "fragments": dp.frag_stats(),
            "totals": {k: st[k] for k in TOTALS},
            "drops": st["drops"], "worker_loops": st["workers"],
            # time the workers spent polling empty queues after traffic (the window is
            # busy_poll_us): CPU bought for latency, idle otherwise
            "busy_poll": {"window_us": dp.busy_poll_us, "seconds": st["spin_ns"] / 1e9},
            # where the workers are pinned (None: not pinned) and where everything else runs
            # (None: every CPU, when the workers leave no CPU free)
            "cpus": dict(d.cpus),
            "table": {"rebuilds": bal.rebuilds, "last_build_seconds": bal.last_rebuild_s,
                      "publish_failures": bal.publish_failures,
                      "last_publish_error": bal.last_publish_error},
            "bgp": ann.status() if ann is not None else None,
            "adoption": d.adoption,
            # tun mode: whether this run attached to the persistent TUN the last one left
            "tun": ({"name": d.config.tun_name, "adopted": d.tun_adopted,
                     "ifindex": getattr(d.plane, "ifindex", 0)}
                    if getattr(d, "tun_adopted", None) is not None else None),
            "sync": d.sync.counters() if d.sync is not None else None,
            "shed": d.shed.status() if getattr(d, "shed", None) is not None else None,
            # mode rawsock: how the kernel's own copies of the taken frames die, ring drops
            "rawsock": d.plane.status() if hasattr(d.plane, "status") else None,
        }
        self._add_rates(snap, now)
        return snap

    def _add_rates(self, snap: dict[str, Any], now: float) -> None:
        """Give every VIP and backend a "rates" dict (per second: packets, bytes, new_flows)
        and the snapshot a "rates" dict (the interval they span, and per second the totals,
        the drops by reason and the flow table's events)."""
        counters: Counters = {}
        for v in snap["vips"]:
            vkey = f"{v['address']}|{v['port']}|{v['protocol']}"
            for k in RATED:
                counters[f"vip|{vkey}|{k}"] = v[k]
            for b in v["backends"]:
                for k in RATED:
                    counters[f"be|{vkey}|{b['address']}|{b['port']}|{k}"] = b[k]
        for k, n in snap["totals"].items():
            counters[f"total|{k}"] = n
        for k, n in snap["drops"].items():
            counters[f"drop|{k}"] = n
        counters["busy_poll|seconds"] = snap["busy_poll"]["seconds"]
        events = {k: n for k, n in snap["flows"].items() if k not in ("active", "capacity")}
        for k, n in events.items():
            counters[f"flow|{k}"] = n
        interval, r = self._rates.update(now, counters)
        for v in snap["vips"]:
            vkey = f"{v['address']}|{v['port']}|{v['protocol']}"
            v["rates"] = {k: r.get(f"vip|{vkey}|{k}") for k in RATED}
            for b in v["backends"]:
                b["rates"] = {k: r.get(f"be|{vkey}|{b['address']}|{b['port']}|{k}")
                              for k in RATED}
        # seconds spinning per second: the share of one core, summed over the workers
        snap["busy_poll"]["cores"] = r.get("busy_poll|seconds")
        snap["rates"] = {
            "interval": interval,
            "totals": {k: r.get(f"total|{k}") for k in snap["totals"]},
            "drops": {k: r.get(f"drop|{k}") for k in snap["drops"]},
            "flows": {k: r.get(f"flow|{k}") for k in events},
        }

    async def flows(self, vip_spec: str | None = None, limit: int = 100) -> list[dict]:
        """Tracked flows (of the VIPs matching ``vip_spec``), at most ``limit``: the first
        page of flows_page()."""
        flows, _ = await self._page(vip_spec, limit, 0)
        return flows

    async def flows_page(self, vip_spec: str | None, limit: int, cursor: int) -> dict:
        """One page of tracked flows from ``cursor`` (0 to start): {"flows": [...], "cursor":
        where the next page starts, or None at the end}. A page is walked in a worker thread,
        with the VIP filter applied in C (the other flows cost no copy), so neither the event
        loop (health checks, the socket) nor the memory waits on the size of the table."""
        flows, nxt = await self._page(vip_spec, limit, cursor)
        return {"flows": flows, "cursor": nxt}

    async def _page(self, vip_spec: str | None, limit: int, cursor: int
                    ) -> tuple[list[dict], int | None]:
        d = self._daemon
        assert d.balancer is not None and d.dp is not None
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        ft = d.dp.flow_table
        if not vip_spec:
            return await asyncio.to_thread(ft.walk_page, cursor, limit)
        vips = d.balancer.find_vips(vip_spec)
        if not vips:
            raise ValueError(f"no VIP matches {vip_spec!r}")
        # the C filter: the one address, port and protocol the matches share (a spec names
        # one address, so only a VIP name shared across addresses leaves work for Python)
        addrs = {v.address for v in vips}
        ports = {v.port for v in vips}
        protos = {v.proto for v in vips}
        filt: dict[str, Any] = {}
        if len(addrs) == 1:
            filt["vip"] = str(next(iter(addrs)))
        if len(ports) == 1:
            filt["vport"] = next(iter(ports))
        if len(protos) == 1:
            filt["proto"] = next(iter(protos))
        keys = {(str(v.address), v.port, PROTO[v.proto]) for v in vips}
        if len(addrs) == 1:
            flows, nxt = await asyncio.to_thread(ft.walk_page, cursor, limit, **filt)
            return [f for f in flows if (f["vip"], f["vport"], f["proto"]) in keys], nxt
        out: list[dict] = []
        nxt: int | None = cursor
        while nxt is not None and len(out) < limit:
            flows, nxt = await asyncio.to_thread(ft.walk_page, nxt, limit - len(out), **filt)
            out += [f for f in flows if (f["vip"], f["vport"], f["proto"]) in keys]
        return out, nxt

    def pick(self, vip_spec: str, src: str, sport: int, proto: str | None = None) -> dict:
        """Which backend a flow from src:sport to the VIP goes to, and why."""
        assert self._daemon.balancer is not None
        return self._daemon.balancer.pick(vip_spec, src, sport, proto)
