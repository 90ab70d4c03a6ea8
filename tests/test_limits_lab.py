"""Per-VIP limits and persistence with real packets on the namespace lab: max_flows,
client_rate (drop and reject) and persistence = "source" do what the config says - counts
within a few percent of the configured limit - and show in `status --json` and the metrics.

The client side runs as functions in lbc-client's namespace (lbcore.netconf.run_in_netns):
every socket it makes belongs there. Each experiment is bounded in count and time.
"""
from __future__ import annotations

import errno
import re
import select
import socket
import sys
import time
import urllib.request

import pytest

from lbcore import lab as lab_mod
from lbcore import netconf
from lbcore.control import request
from lbcore.lab.traffic import read_response

pytestmark = pytest.mark.netns

VIP4 = lab_mod.VIP_V4
MAX_FLOWS = 40              # tcp/9000 (sink), drop
UDP_RATE = 200              # udp/5300, client_rate, drop (burst = rate)
TCP_RATE = 100              # tcp/9001 (source), client_rate, reject (burst = rate)
SOURCES = [f"198.18.0.{i}" for i in range(3, 15)]   # extra client addresses for persistence


def _vip_lines(text: str, port: int, lines: list[str]) -> str:
    """The lab config with ``lines`` added to the [[vip]] of ``port``."""
    out, n = re.subn(rf"(?m)^port = {port}$", "\n".join([f"port = {port}", *lines]), text)
    assert n == 1, (port, n)
    return out


def _config() -> str:
    text = lab_mod.render_config(lab_mod.LabSpec(backends=3))
    text = _vip_lines(text, lab_mod.SINK_PORT, [f"max_flows = {MAX_FLOWS}"])
    text = _vip_lines(text, lab_mod.UDP_PORT, [f"client_rate = {UDP_RATE}"])
    text = _vip_lines(text, lab_mod.SOURCE_PORT, [f"client_rate = {TCP_RATE}",
                                                  'limit_action = "reject"'])
    return _vip_lines(text, lab_mod.HTTP_PORT, ['persistence = "source"'])


def _control(req: dict, timeout: float = 60) -> dict:
    return netconf.run_in_netns(lab_mod.GW_NS, request,
                                str(lab_mod.paths()["control_socket"]), req, timeout)


def _metrics() -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{lab_mod.METRICS_LISTEN}/metrics", timeout=30) as r:
            return r.read().decode()
    return netconf.run_in_netns(lab_mod.GW_NS, get)


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if (line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in the metrics")


def _vip(st: dict, port: int) -> dict:
    return next(v for v in st["vips"] if v["port"] == port and v["address"] == VIP4)


# ------------------------------------------------------------------ client side (lbc-client)

def _connect_many(n: int, port: int, wait: float, src: str = "") -> tuple[list, dict]:
    """``n`` non-blocking TCP connects to the VIP at once; after ``wait`` s: the connected
    sockets (left open) and the outcome counts."""
    socks, done, out = [], {}, {"ok": 0, "refused": 0, "timeout": 0, "other": 0}
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if src:
            s.bind((src, 0))
        s.connect_ex((VIP4, port))
        socks.append(s)
    end = time.monotonic() + wait
    while len(done) < n and time.monotonic() < end:
        _, w, _ = select.select([], [s for s in socks if s not in done], [], 0.05)
        for s in w:
            done[s] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    kept = []
    for s in socks:
        e = done.get(s)
        if e == 0:
            out["ok"] += 1
            kept.append(s)
            continue
        out["timeout" if e is None else "refused" if e == errno.ECONNREFUSED else "other"] += 1
        s.close()
    return kept, out


def _max_flows_open() -> tuple[list, dict]:
    # 3 s: the refused SYNs are retransmitted once or twice, and refused again
    return _connect_many(MAX_FLOWS + 20, lab_mod.SINK_PORT, 3.0)


def _udp_new_flows(n: int, per_second: float) -> dict:
    """``n`` datagrams, each from a new socket (a new flow), paced at ``per_second``; the
    answers that came back, and the seconds from the first send to the last."""
    socks = []
    t0 = time.monotonic()
    for i in range(n):
        while time.monotonic() - t0 < i / per_second:
            time.sleep(0.0005)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.sendto(b"q", (VIP4, lab_mod.UDP_PORT))
        socks.append(s)
    span = time.monotonic() - t0
    answered = set()
    poll = select.poll()                     # more sockets than select() can take
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poll.register(fd, select.POLLIN)
    end = time.monotonic() + 2.0
    while time.monotonic() < end and len(answered) < n:
        for fd, _ in poll.poll(100):
            poll.unregister(fd)
            try:
                by_fd[fd].recv(2048)
                answered.add(fd)
            except OSError:
                pass
    for s in socks:
        s.close()
    return {"sent": n, "answered": len(answered), "span": span}


def _tcp_new_flows(n: int, per_second: float) -> dict:
    """``n`` TCP connects paced at ``per_second``, each given 0.8 s (less than the SYN
    retransmission timeout, so each attempt is one SYN): connected, refused (an RST), neither."""
    out = {"ok": 0, "refused": 0, "timeout": 0, "other": 0}
    pending: list[tuple[socket.socket, float]] = []
    t0 = time.monotonic()

    def settle(force: bool) -> None:
        now = time.monotonic()
        _, w, _ = select.select([], [s for s, _ in pending], [], 0)
        keep = []
        for s, t in pending:
            if s in w:
                e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                out["ok" if e == 0 else "refused" if e == errno.ECONNREFUSED else "other"] += 1
                s.close()
            elif force or now - t > 0.8:
                out["timeout"] += 1
                s.close()
            else:
                keep.append((s, t))
        pending[:] = keep

    for i in range(n):
        while time.monotonic() - t0 < i / per_second:
            settle(False)
            time.sleep(0.0005)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((VIP4, lab_mod.SOURCE_PORT))
        pending.append((s, time.monotonic()))
    out["span"] = time.monotonic() - t0
    end = time.monotonic() + 1.0
    while pending and time.monotonic() < end:
        settle(False)
        time.sleep(0.01)
    settle(True)
    return out


def _backends_by_source(per_source: int) -> dict[str, list[str]]:
    """From each of SOURCES, ``per_source`` new connections with one request each: the
    backends that answered, per source."""
    got: dict[str, list[str]] = {}
    for src in SOURCES:
        for _ in range(per_source):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.bind((src, 0))
                s.connect((VIP4, lab_mod.HTTP_PORT))
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                _, body, _, _ = read_response(s, b"")
                got.setdefault(src, []).append(body.decode().strip())
    return got


# ------------------------------------------------------------------------------- the test

def test_limits_and_persistence_as_configured(tmp_path):
    """max_flows 40 admits 40 of 60 connections; client_rate 200/s (drop, UDP) and 100/s
    (reject, TCP: an RST each) admit a full bucket plus the rate; persistence = "source" keeps
    every source on one backend. Each count matches `status --json` and the metrics."""
    cfg = tmp_path / "lbcore.toml"
    cfg.write_text(_config())
    argv = (sys.executable, "-m", "lbcore", "run", "-c", str(cfg))
    with lab_mod.lease(lab_mod.LabSpec(backends=3, balancer_argv=argv)):
        cl = lab_mod.CLIENT_NS

        # max_flows: 60 connections at once to a VIP that takes 40
        kept, mf = netconf.run_in_netns(cl, _max_flows_open)
        try:
            st = _control({"cmd": "status"})
            metrics = _metrics()
        finally:
            for s in kept:
                s.close()
        sink = _vip(st, lab_mod.SINK_PORT)
        print(f"\nmax_flows {MAX_FLOWS}: {mf}; VIP active flows {sink['active_flows']}, "
              f"refused {sink['refused']}")
        assert MAX_FLOWS * 0.95 <= mf["ok"] <= MAX_FLOWS, mf
        assert mf["ok"] + mf["timeout"] == MAX_FLOWS + 20 and mf["refused"] == 0, mf
        assert sink["active_flows"] == mf["ok"], sink
        assert sink["settings"]["max_flows"] == MAX_FLOWS
        # every refused connection's SYN, and its retransmissions, counted
        assert sink["refused"]["limit_flows"] >= mf["timeout"], sink
        lab = {"vip": sink["name"], "address": VIP4, "port": str(lab_mod.SINK_PORT)}
        assert _metric(metrics, "lbcore_vip_refused_flows_total", limit="max_flows",
                       **lab) == sink["refused"]["limit_flows"]
        assert _metric(metrics, "lbcore_vip_active_flows", **lab) == mf["ok"]

        # client_rate, drop: 1500 new UDP flows at 600/s from one client, 200/s allowed
        udp = netconf.run_in_netns(cl, _udp_new_flows, 1500, 600.0)
        # client_rate, reject: 500 TCP connects at 250/s, 100/s allowed, the rest get an RST
        tcp = netconf.run_in_netns(cl, _tcp_new_flows, 500, 250.0)
        st = _control({"cmd": "status"})
        metrics = _metrics()
        u, t = _vip(st, lab_mod.UDP_PORT), _vip(st, lab_mod.SOURCE_PORT)
        want_u = UDP_RATE + UDP_RATE * udp["span"]        # a full bucket, then the rate
        want_t = TCP_RATE + TCP_RATE * tcp["span"]
        print(f"client_rate {UDP_RATE}/s drop (udp): {udp}, expected ~{want_u:.0f}; refused "
              f"{u['refused']}")
        print(f"client_rate {TCP_RATE}/s reject (tcp): {tcp}, expected ~{want_t:.0f}; refused "
              f"{t['refused']}; RSTs sent {st['totals']['resets']}")
        assert abs(udp["answered"] - want_u) <= 0.05 * want_u + 5, (udp, want_u)
        assert u["refused"]["limit_rate"] == udp["sent"] - udp["answered"], (u, udp)
        assert abs(tcp["ok"] - want_t) <= 0.05 * want_t + 5, (tcp, want_t)
        assert tcp["refused"] + tcp["ok"] == 500 and tcp["timeout"] == 0, tcp
        assert t["refused"]["limit_rate"] == tcp["refused"], (t, tcp)
        assert st["totals"]["resets"] >= tcp["refused"]
        for v, n in ((u, udp["sent"] - udp["answered"]), (t, tcp["refused"])):
            assert _metric(metrics, "lbcore_vip_refused_flows_total", limit="client_rate",
                           vip=v["name"], port=str(v["port"])) == n
        assert _metric(metrics, "lbcore_answers_total", kind="resets") >= tcp["refused"]

        # persistence = "source": every source keeps one backend, over new connections
        for src in SOURCES:
            netconf.addr_add(lab_mod.CLIENT_IF, f"{src}/24", netns=cl)
        got = netconf.run_in_netns(cl, _backends_by_source, 10)
        st = _control({"cmd": "status"})
        web = _vip(st, lab_mod.HTTP_PORT)
        print(f"persistence: {({s: sorted(set(b)) for s, b in got.items()})}")
        assert all(len(set(b)) == 1 and len(b) == 10 for b in got.values()), got
        assert len({b[0] for b in got.values()}) >= 2, got     # not all on one backend
        assert web["settings"]["persistence"] == "source"
