"""Prometheus metrics (prometheus-client), every name prefixed `lbcore_`, and the listener
that serves them beside the status page (:mod:`.web`).

A custom collector reads the live counters at scrape time through the
StatusView; it asks the control plane's event loop for the snapshot, so a
scrape never races a reload or a health change.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from ipaddress import IPv4Address, IPv6Address

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .status import StatusView
from .web import StatusHTTPServer, serve_in_thread

log = logging.getLogger("lbcore.metrics")


SNAPSHOT_TIMEOUT = 10.0  # s: a loop that does not answer by then makes the request fail (503)


def snapshot_on_loop(view: StatusView, loop: asyncio.AbstractEventLoop) -> dict:
    """``view.snapshot()`` run on the event loop ``loop``, called from another thread."""
    async def snap() -> dict:
        return view.snapshot()
    return asyncio.run_coroutine_threadsafe(snap(), loop).result(timeout=SNAPSHOT_TIMEOUT)


class LbCollector:
    """prometheus-client collector over a StatusView (called in the HTTP server's thread)."""

    def __init__(self, view: StatusView, loop: asyncio.AbstractEventLoop) -> None:
        self.view = view
        self.loop = loop

    @staticmethod
    def _bgp(s: dict):
        """BGP sessions (with [bgp]) and, per VIP, whether its address is announced."""
        ann = GaugeMetricFamily("lbcore_vip_announced", "1 if the VIP's address is announced "
                                "over BGP now, else 0", labels=["vip", "address", "port",
                                                                 "protocol"])
        for v in s["vips"]:
            ann.add_metric([v["name"], v["address"], str(v["port"]), v["protocol"]],
                           1 if v.get("announced") else 0)
        up = GaugeMetricFamily("lbcore_bgp_session_up", "1 if the BGP session to the "
                               "neighbor is established, else 0", labels=["neighbor", "as"])
        for sess in (s.get("bgp") or {}).get("sessions", []):
            up.add_metric([sess["neighbor"], str(sess["as"])], 1 if sess["up"] else 0)
        return (ann, up)

    @staticmethod
    def _shed(s: dict):
        """The SYN shed filter before the TUN queue (lbcore.dataplane.shed), when present."""
        sh = s.get("shed")
        if not sh:
            return ()
        lv = ["vip", "address", "port"]
        share = GaugeMetricFamily("lbcore_shed_share", "Share of the SYNs to a VIP the kernel "
                                  "filter drops before the TUN queue now (0..1)", labels=lv)
        syns = CounterMetricFamily("lbcore_shed_syns", "New-flow packets to a VIP the kernel "
                                   "filter saw, shed or not: SYNs without ACK (TCP), datagrams "
                                   "of clients no backend answered lately (UDP)", labels=lv)
        shed = CounterMetricFamily("lbcore_shed_packets", "New-flow packets to a VIP the kernel "
                                   "filter dropped before the TUN queue", labels=lv)
        for v in sh["vips"]:
            lab = [v["name"], v["address"], str(v["port"])]
            share.add_metric(lab, v["share"])
            syns.add_metric(lab, v["syns"])
            shed.add_metric(lab, v["shed"])
        active = GaugeMetricFamily("lbcore_shed_active", "1 while the kernel filter sheds "
                                   "SYNs of some VIP, else 0", value=1 if sh["active"] else 0)
        out = [share, syns, shed, active]
        if sh.get("tun_dropped") is not None:
            td = CounterMetricFamily("lbcore_tun_dropped", "Packets the kernel dropped on their "
                                     "way into the TUN's queues (full queue or shed filter)")
            td.add_metric([], sh["tun_dropped"])
            out.append(td)
        return out

    @staticmethod
    def _rawsock(s: dict):
        """Mode rawsock: the kernel's copies its tc ingress filters dropped, per link, and the
        frames the receive rings had no room for."""
        rs = s.get("rawsock")
        if not rs:
            return ()
        tc = GaugeMetricFamily("lbcore_rawsock_kernel_copy_filter", "1 if a tc ingress filter "
                               "drops the kernel's copy of the frames the workers take on the "
                               "link, 0 if only the blackhole routes do", labels=["link"])
        dropped = CounterMetricFamily("lbcore_rawsock_kernel_copies_dropped", "The kernel's "
                                      "copies of taken frames the link's tc ingress filter "
                                      "dropped before IP", labels=["link"])
        for link, k in rs["kernel_copy"].items():
            tc.add_metric([link], 1 if k["dropped_by"] == "tc" else 0)
            if k["dropped"] is not None:
                dropped.add_metric([link], k["dropped"])
        ring = CounterMetricFamily("lbcore_rawsock_ring_drops", "Frames the receive rings had "
                                   "no room for (the workers fell behind)")
        ring.add_metric([], rs["ring_drops"])
        return (tc, dropped, ring)

    def collect(self):
        s = snapshot_on_loop(self.view, self.loop)
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
        v_rf = CounterMetricFamily("lbcore_vip_refused_flows", "New flows to a VIP refused, by "
                                   "limit (max_flows, client_rate, new_flow_rate)",
                                   labels=[*vl, "limit"])
        for v in s["vips"]:
            lv = [v["name"], v["address"], str(v["port"]), v["protocol"]]
            for limit, key in (("max_flows", "limit_flows"), ("client_rate", "limit_rate"),
                               ("new_flow_rate", "shed")):
                v_rf.add_metric([*lv, limit], v["refused"][key])
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
        yield from (v_pk, v_by, v_nf, v_af, v_rf, b_pk, b_by, b_nf, b_af, b_up, b_dr, b_w)
        yield from self._bgp(s)
        yield from self._shed(s)
        yield from self._rawsock(s)

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
        yield CounterMetricFamily("lbcore_passed", "Packets from a backend's address that "
                                  "are no reply of any flow (its own traffic through the "
                                  "gateway), handed back to the kernel unchanged",
                                  value=s["totals"].get("passed", 0))
        an = CounterMetricFamily("lbcore_answers", "Packets the data plane answered itself, by "
                                 "kind (echo_replies, resets, unreachables; rejects_limited: "
                                 "not sent, over reject_rate)", labels=["kind"])
        for k in ("echo_replies", "resets", "unreachables", "rejects_limited"):
            an.add_metric([k], s["totals"][k])
        yield an
        fr = s["fragments"]
        fe = CounterMetricFamily("lbcore_frag_events", "Fragment cache: fragments and "
                                 "datagrams by event", labels=["event"])
        for k in ("first", "forwarded", "held", "released", "early_dropped", "dropped",
                  "timeouts", "timeout_held", "evicted", "completed"):
            fe.add_metric([k], fr[k])
        yield fe
        yield GaugeMetricFamily("lbcore_frag_entries", "Datagrams the fragment cache "
                                "remembers now", value=fr["entries"])
        yield GaugeMetricFamily("lbcore_frag_capacity", "Datagrams the fragment cache can "
                                "remember", value=fr["capacity"])
        yield GaugeMetricFamily("lbcore_frag_buffers", "Early fragments held now",
                                value=fr["buffers"])
        yield GaugeMetricFamily("lbcore_frag_buffer_capacity", "Early fragments the cache can "
                                "hold", value=fr["buffer_capacity"])
        yield GaugeMetricFamily("lbcore_frag_memory_bytes", "Memory of the fragment cache "
                                "(fixed at start)", value=fr["memory"])
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
        ad = s.get("adoption") or {}
        yield GaugeMetricFamily("lbcore_flows_adopted", "Flows taken over from the previous "
                                "run at start", value=ad.get("adopted", 0))
        tun = s.get("tun")
        if tun is not None:
            yield GaugeMetricFamily("lbcore_tun_adopted", "1 if this run attached to the "
                                    "persistent TUN device the previous run left, 0 if it "
                                    "created it", value=int(bool(tun["adopted"])))
        sy = s.get("sync")
        if sy is not None:
            sent = CounterMetricFamily("lbcore_sync_sent", "Flow sync: records sent by kind, "
                                       "datagrams, send errors, ring drops", labels=["what"])
            for k, v in sy["sent"].items():
                sent.add_metric([k], v)
            recv = CounterMetricFamily("lbcore_sync_received", "Flow sync: datagrams and "
                                       "records received, and what became of the records",
                                       labels=["what"])
            for k, v in sy["received"].items():
                recv.add_metric([k], v)
            rej = CounterMetricFamily("lbcore_sync_rejected", "Flow sync: datagrams dropped "
                                      "before any record was read, by reason",
                                      labels=["reason"])
            for k, v in sy["rejected"].items():
                rej.add_metric([k], v)
            yield from (sent, recv, rej)
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
        ws = CounterMetricFamily("lbcore_worker_busy_poll_seconds", "Seconds a worker spent "
                                 "polling its empty queue after traffic (busy_poll_us): CPU "
                                 "spent for latency, not on packets", labels=["worker"])
        for i, w in enumerate(s["worker_loops"]):
            wl.add_metric([str(i)], w["loops"])
            wb.add_metric([str(i)], w["batches"])
            wp.add_metric([str(i), "rx"], w["rx"])
            wp.add_metric([str(i), "tx"], w["tx"])
            ws.add_metric([str(i)], w["spin_s"])
        yield from (wl, wb, wp, ws)
        yield GaugeMetricFamily("lbcore_uptime_seconds", "Seconds since start",
                                value=s["uptime"])


def start_metrics(listen: tuple[IPv4Address | IPv6Address, int] | None, view: StatusView,
                  stack: contextlib.AsyncExitStack) -> None:
    """Serve /metrics, the status page (/) and /status.json on ``listen``
    (config.metrics_listen; None = off) until ``stack`` closes."""
    if not listen:
        return
    addr, port = listen
    loop = asyncio.get_running_loop()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LbCollector(view, loop))
    server = StatusHTTPServer(addr, port, lambda: snapshot_on_loop(view, loop), registry)
    stack.callback(serve_in_thread(server))
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    log.info("metrics on http://%s:%d/metrics, status page on http://%s:%d/",
             host, port, host, port)
