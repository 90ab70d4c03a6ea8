"""Prometheus metrics (prometheus-client), every name prefixed `lbcore_`.

A custom collector reads the live counters at scrape time through the
StatusView; it asks the control plane's event loop for the snapshot, so a
scrape never races a reload or a health change.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from ipaddress import IPv4Address, IPv6Address

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .status import StatusView

log = logging.getLogger("lbcore.metrics")


class LbCollector:
    """prometheus-client collector over a StatusView (called in the HTTP server's thread)."""

    def __init__(self, view: StatusView, loop: asyncio.AbstractEventLoop) -> None:
        self.view = view
        self.loop = loop

    def _snapshot(self) -> dict:
        async def snap() -> dict:
            return self.view.snapshot()
        return asyncio.run_coroutine_threadsafe(snap(), self.loop).result(timeout=10)

    def collect(self):
        s = self._snapshot()
        vl = ["vip", "address", "port", "protocol"]
        bl = ["vip", "backend"]
        v_pk = CounterMetricFamily("lbcore_vip_packets", "Packets forwarded for a VIP "
                                   "(both directions)", labels=vl)
        v_by = CounterMetricFamily("lbcore_vip_bytes", "Bytes forwarded for a VIP", labels=vl)
        v_nf = CounterMetricFamily("lbcore_vip_new_flows", "New flows to a VIP", labels=vl)
        v_af = GaugeMetricFamily("lbcore_vip_active_flows", "Tracked flows of a VIP", labels=vl)
        b_pk = CounterMetricFamily("lbcore_backend_packets", "Packets forwarded for a backend",
                                   labels=bl)
        b_by = CounterMetricFamily("lbcore_backend_bytes", "Bytes forwarded for a backend",
                                   labels=bl)
        b_nf = CounterMetricFamily("lbcore_backend_new_flows", "New flows sent to a backend",
                                   labels=bl)
        b_af = GaugeMetricFamily("lbcore_backend_active_flows", "Tracked flows of a backend",
                                 labels=bl)
        b_up = GaugeMetricFamily("lbcore_backend_up", "1 if the backend passes its health "
                                 "check, else 0", labels=bl)
        b_dr = GaugeMetricFamily("lbcore_backend_draining", "1 if the backend is draining",
                                 labels=bl)
        b_w = GaugeMetricFamily("lbcore_backend_weight", "Weight in the Maglev table now "
                                "(0 when down or draining)", labels=bl)
        for v in s["vips"]:
            lv = [v["name"], v["address"], str(v["port"]), v["protocol"]]
            v_pk.add_metric(lv, v["packets"])
            v_by.add_metric(lv, v["bytes"])
            v_nf.add_metric(lv, v["new_flows"])
            v_af.add_metric(lv, v["active_flows"])
            for b in v["backends"]:
                host = f"[{b['address']}]" if ":" in b["address"] else b["address"]
                lb = [v["name"], f"{host}:{b['port']}"]
                b_pk.add_metric(lb, b["packets"])
                b_by.add_metric(lb, b["bytes"])
                b_nf.add_metric(lb, b["new_flows"])
                b_af.add_metric(lb, b["active_flows"])
                b_up.add_metric(lb, 1 if b["state"] == "up" else 0)
                b_dr.add_metric(lb, 1 if b["draining"] else 0)
                b_w.add_metric(lb, b["effective_weight"])
        yield from (v_pk, v_by, v_nf, v_af, b_pk, b_by, b_nf, b_af, b_up, b_dr, b_w)

        drops = CounterMetricFamily("lbcore_drops", "Packets dropped, by reason",
                                    labels=["reason"])
        for reason, n in s["drops"].items():
            drops.add_metric([reason], n)
        yield drops
        pk = CounterMetricFamily("lbcore_packets", "Packets read and written by the data "
                                 "plane", labels=["direction"])
        pk.add_metric(["rx"], s["totals"]["rx"])
        pk.add_metric(["tx"], s["totals"]["tx"])
        yield pk
        txe = CounterMetricFamily("lbcore_tx_errors", "Writes to the device that failed")
        txe.add_metric([], s["totals"]["tx_errors"])
        yield txe
        f = s["flows"]
        yield GaugeMetricFamily("lbcore_flow_table_entries", "Tracked flows", value=f["active"])
        yield GaugeMetricFamily("lbcore_flow_table_capacity", "Flow table capacity",
                                value=f["capacity"])
        ev = CounterMetricFamily("lbcore_flow_table_events", "Flow table inserts, refusals "
                                 "and removals, by kind", labels=["event"])
        for k in ("inserted", "refused_full", "refused_exists", "evicted_expired",
                  "evicted_halfopen", "evicted_udp", "expired", "deleted"):
            ev.add_metric([k], f.get(k, 0))
        yield ev
        rb = CounterMetricFamily("lbcore_table_rebuilds", "Maglev tables built and published")
        rb.add_metric([], s["table"]["rebuilds"])
        yield rb
        pf = CounterMetricFamily("lbcore_table_publish_failures", "Forwarding tables that "
                                 "could not be built or published (the previous one stayed live)")
        pf.add_metric([], s["table"].get("publish_failures", 0))
        yield pf
        wl = CounterMetricFamily("lbcore_worker_loops", "Worker loop iterations",
                                 labels=["worker"])
        wb = CounterMetricFamily("lbcore_worker_batches", "Worker batches with packets",
                                 labels=["worker"])
        wp = CounterMetricFamily("lbcore_worker_packets", "Packets per worker",
                                 labels=["worker", "direction"])
        for i, w in enumerate(s["worker_loops"]):
            wl.add_metric([str(i)], w["loops"])
            wb.add_metric([str(i)], w["batches"])
            wp.add_metric([str(i), "rx"], w["rx"])
            wp.add_metric([str(i), "tx"], w["tx"])
        yield from (wl, wb, wp)
        yield GaugeMetricFamily("lbcore_uptime_seconds", "Seconds since start",
                                value=s["uptime"])


def start_metrics(listen: tuple[IPv4Address | IPv6Address, int] | None, view: StatusView,
                  stack: contextlib.AsyncExitStack) -> None:
    """Serve /metrics on ``listen`` (config.metrics_listen; None = off)."""
    if not listen:
        return
    addr, port = listen
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LbCollector(view, asyncio.get_running_loop()))
    server, thread = start_http_server(port, addr=str(addr), registry=registry)

    def _stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    stack.callback(_stop)
    log.info("metrics on http://%s:%d/metrics", addr, port)
