"""The read model of a running balancer: what `lbcore status`, `lbcore flows`, `lbcore pick`
and the metrics endpoint show.

Every reader of the balancer's state goes through one :class:`StatusView`; it is the only code
outside the daemon that reads the data plane's counters and flow table. Its methods are called
on the event loop thread (the metrics scraper hops there first), so a snapshot never races a
reload or a health change; the parts that walk the flow table run in a worker thread.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..balancer import PROTO

if TYPE_CHECKING:
    from ..daemon import Daemon

TOTALS = ("rx", "tx", "rx_bytes", "tx_bytes", "flow_hit", "flow_miss", "flow_new", "tx_errors")


class StatusView:
    """Read-only views of one Daemon's balancer, data plane and health checks."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

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
            vips.append({"name": v.name, "address": str(v.address), "port": v.port,
                         "protocol": v.proto, "pool": v.pool,
                         "active_flows": ft.active_vip(v.stat_id), "packets": pk, "bytes": by,
                         "new_flows": nf, "backends": bes})
        return {
            "version": __version__, "pid": os.getpid(), "uptime": time.time() - d.started,
            "config": d.config_path, "mode": d.config.mode, "workers": d.config.workers,
            "vips": vips,
            "flows": {"active": len(ft), "capacity": ft.capacity, **ft.counters()},
            "totals": {k: st[k] for k in TOTALS},
            "drops": st["drops"], "worker_loops": st["workers"],
            "table": {"rebuilds": bal.rebuilds, "last_build_seconds": bal.last_rebuild_s,
                      "publish_failures": bal.publish_failures,
                      "last_publish_error": bal.last_publish_error},
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
