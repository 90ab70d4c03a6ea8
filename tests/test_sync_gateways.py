"""Two gateways with flow sync behind a router of the test's own: the router
spreads the VIP's connections over both (ECMP, L4 hash), the backends send
their replies over both (ECMP default route), each gateway runs `lbcore run`
with [sync] to the other. The backend set changes on both (so Maglev would
now send some connections elsewhere), then the gateway carrying connections
is taken away (its routes withdrawn, its balancer killed): every connection
continues on the other gateway, on its original backend.

    client --- router ==ECMP==> gw1, gw2 --- lan (bridge) --- be1..be4
                                  (sync: 198.19.0.1 <-> 198.19.0.2, UDP 7700)
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbcore import _core
from lbcore import netconf as nc
from lbcore.control import request
from lbcore.lab import child_env

pytestmark = pytest.mark.netns

VIP = "198.18.100.1"
HOLDCONN = str(Path(__file__).with_name("holdconn.py"))
N_TCP = 30
GW_LAN = {1: "198.19.0.1", 2: "198.19.0.2"}
GW_UP = {1: ("198.18.1.1", "198.18.1.2"), 2: ("198.18.2.1", "198.18.2.2")}   # router, gw
BE = {i: f"198.19.0.{10 + i}" for i in range(1, 5)}
READY_TIMEOUT = 40.0


def gw_config(i: int, run: Path, backends: list[tuple[int, int]]) -> str:
    bes = "\n".join(f'    {{ address = "{BE[b]}", port = {port}, weight = {w} }},'
                    for b, w in backends for port in [0])
    pools = []
    for name, port, check in (("web", 80, "tcp"), ("dns", 5300, None)):
        pools += [f"[pool.{name}]", "backends = [",
                  bes.replace("port = 0", f"port = {port}"), "]"]
        if check:
            pools += [f"[pool.{name}.health]", f'type = "{check}"', "interval = 1",
                      "timeout = 0.5", "rise = 1", "fall = 3"]
    other = GW_LAN[3 - i]
    return "\n".join([
        "[global]", 'mode = "tun"', 'tun_name = "lbc0"', "hash_seed = 7",
        f'control_socket = "{run}/gw{i}.sock"', 'metrics_listen = ""',
        f'flow_file = "{run}/gw{i}.flows"', "",
        "[sync]", f'listen = "{GW_LAN[i]}:7700"', f'peers = ["{other}:7700"]',
        'key = "a test key, long enough"', "refresh = 2", "",
        "[[vip]]", f'address = "{VIP}"', "port = 80", 'protocol = "tcp"', 'pool = "web"', "",
        "[[vip]]", f'address = "{VIP}"', "port = 5300", 'protocol = "udp"', 'pool = "dns"', "",
        *pools, ""])


class Rack:
    """The namespaces and processes of the test; stop() removes the processes by PID."""

    def __init__(self, make_ns, run: Path) -> None:
        self.run = run
        self.ns = {k: make_ns() for k in ("cl", "rtr", "lan", "gw1", "gw2", "be1", "be2",
                                          "be3", "be4")}
        self.procs: dict[str, subprocess.Popen] = {}

    def build(self) -> None:
        ns = self.ns
        nc.sysctl_set("net.ipv4.ip_forward", 1, netns=ns["rtr"])
        nc.sysctl_set("net.ipv4.fib_multipath_hash_policy", 1, netns=ns["rtr"])
        nc.veth_add("c0", "r-c", netns=ns["cl"], peer_netns=ns["rtr"])
        nc.addr_add("c0", "198.18.0.2/24", netns=ns["cl"])
        nc.addr_add("r-c", "198.18.0.1/24", netns=ns["rtr"])
        nc.route_add("default", gateway="198.18.0.1", netns=ns["cl"])
        nc.bridge_add("br0", netns=ns["lan"])
        for i in (1, 2):
            g = ns[f"gw{i}"]
            nc.sysctl_set("net.ipv4.ip_forward", 1, netns=g)
            nc.veth_add(f"r-g{i}", "up0", netns=ns["rtr"], peer_netns=g)
            nc.addr_add(f"r-g{i}", f"{GW_UP[i][0]}/30", netns=ns["rtr"])
            nc.addr_add("up0", f"{GW_UP[i][1]}/30", netns=g)
            nc.route_add("default", gateway=GW_UP[i][0], netns=g)
            nc.veth_add(f"l-g{i}", "lan0", netns=ns["lan"], peer_netns=g)
            nc.link_set(f"l-g{i}", netns=ns["lan"], master="br0")
            nc.addr_add("lan0", f"{GW_LAN[i]}/24", netns=g)
        for b in BE:
            n = ns[f"be{b}"]
            nc.veth_add(f"l-b{b}", "lan0", netns=ns["lan"], peer_netns=n)
            nc.link_set(f"l-b{b}", netns=ns["lan"], master="br0")
            nc.addr_add("lan0", f"{BE[b]}/24", netns=n)
        self.route_via((1, 2))

    def route_via(self, gws) -> None:
        """The router's VIP route and the backends' default route over these gateways (what
        BGP announcements and withdrawals would do)."""
        if len(gws) == 1:
            (g,) = gws
            nc.route_add(f"{VIP}/32", gateway=GW_UP[g][1], netns=self.ns["rtr"])
            for b in BE:
                nc.route_add("default", gateway=GW_LAN[g], netns=self.ns[f"be{b}"])
            return
        nc.route_add(f"{VIP}/32", netns=self.ns["rtr"],
                     multipath=[{"gateway": GW_UP[g][1]} for g in gws])
        for b in BE:
            nc.route_add("0.0.0.0/0", netns=self.ns[f"be{b}"],
                         multipath=[{"gateway": GW_LAN[g]} for g in gws])

    def spawn(self, name: str, netns: str, argv: list[str], **kw) -> subprocess.Popen:
        log = open(self.run / f"{name}.log", "ab")
        try:
            p = nc.popen_in_netns(netns, argv, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=child_env(),
                                  start_new_session=True, **kw)
        finally:
            log.close()
        self.procs[name] = p
        return p

    def start_servers(self) -> None:
        for b in BE:
            r, w = os.pipe()
            try:
                self.spawn(f"be{b}", self.ns[f"be{b}"],
                           [sys.executable, "-m", "lbcore.lab.servers", "--name", f"be{b}",
                            "--ready-fd", str(w)], pass_fds=(w,))
            finally:
                os.close(w)
            try:
                assert wait_read(r, b"ready", READY_TIMEOUT), f"be{b} not ready"
            finally:
                os.close(r)

    def start_gateway(self, i: int, backends) -> None:
        cfg = self.run / f"gw{i}.toml"
        cfg.write_text(gw_config(i, self.run, backends))
        log = self.run / f"gw{i}.log"
        offset = log.stat().st_size if log.exists() else 0
        p = self.spawn(f"gw{i}", self.ns[f"gw{i}"],
                       [sys.executable, "-m", "lbcore", "run", "-c", str(cfg)])
        deadline = time.monotonic() + READY_TIMEOUT
        while not re.search(r"\bready: ", log.read_text(errors="replace")[offset:]):
            assert p.poll() is None, f"gw{i} exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"gw{i} not ready: {log.read_text()[-3000:]}"
            time.sleep(0.05)

    def ctl(self, i: int, req: dict):
        return request(str(self.run / f"gw{i}.sock"), req)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with_kill(p)


def wait_read(fd: int, token: bytes, timeout: float) -> bool:
    import select
    got = b""
    deadline = time.monotonic() + timeout
    while token not in got and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            data = os.read(fd, 64)
            if not data:
                break
            got += data
    return token in got


def with_kill(p: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s: only the process this test started, by its PID."""
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)


@pytest.fixture
def rack(netns_factory, tmp_path):
    r = Rack(netns_factory, tmp_path)
    try:
        r.build()
        r.start_servers()
        yield r
    finally:
        r.stop()


def test_connections_move_to_the_other_gateway_with_their_backends(rack):
    first = [(1, 1), (2, 1), (3, 1)]
    rack.start_gateway(1, first)
    rack.start_gateway(2, first)
    client = nc.popen_in_netns(
        rack.ns["cl"], [sys.executable, HOLDCONN, json.dumps(
            {"vip": VIP, "n": N_TCP, "interval": 0.2, "udp_interval": 0.05,
             "max_seconds": 300})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(), text=True)
    try:
        ready = json.loads(client.stdout.readline() or "{}").get("ready")
        assert ready, f"client did not get going: {client.stderr.read()[-2000:]}"
        time.sleep(1.0)        # a few sync drains and one refresh
        st1, st2 = rack.ctl(1, {"cmd": "status"}), rack.ctl(2, {"cmd": "status"})
        made1, made2 = st1["totals"]["flow_new"], st2["totals"]["flow_new"]
        assert made1 > 0 and made2 > 0, (made1, made2)   # the router uses both
        carrier = 1 if made1 >= made2 else 2
        other = 3 - carrier
        so = st2 if other == 2 else st1
        assert so["sync"]["received"].get("inserted", 0) >= (made1 if other == 2 else made2)
        # the backend set changes on both gateways: be4 comes with a big weight, be1's changes
        new = [(1, 3), (2, 1), (3, 1), (4, 6)]
        for i in (1, 2):
            (rack.run / f"gw{i}.toml").write_text(gw_config(i, rack.run, new))
            assert rack.ctl(i, {"cmd": "reload"})["changes"]
        # the carrier goes away: withdrawn from the router and the backends, then killed
        rack.route_via((other,))
        p = rack.procs[f"gw{carrier}"]
        p.kill()
        p.wait(timeout=10)
        time.sleep(3.0)
        out, err = client.communicate("stop\n", timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    flows = res["flows"]
    broken = {k: f["error"] for k, f in flows.items() if f["error"]}
    moved = {k: f["names"] for k, f in flows.items() if len(f["names"]) != 1}
    assert not broken, f"broken: {broken}"
    assert not moved, f"moved to another backend: {moved}"
    assert {k: f["names"] for k, f in flows.items()} == ready
    # after the loss every flow was answered through the survivor
    st = rack.ctl(other, {"cmd": "status"})
    assert st["totals"]["flow_hit"] > 0
    assert sum(st["sync"]["rejected"].values()) == 0, st["sync"]
    # what `lbcore status` says of it
    from rich.console import Console

    from lbcore.control.client import _print_continuity
    con = Console(record=True, width=400)
    _print_continuity(con, st)
    text = con.export_text()
    assert re.search(r"sync with \S+: sent \d+ new, \d+ refresh, \d+ end in \d+ datagrams; "
                     rf"received .*inserted={st['sync']['received']['inserted']}", text), text
    # evidence that the synced backends mattered: the new table sends most of these
    # connections elsewhere (both gateways build it alike: same seed, same backends)
    dp = _core.Dataplane(1, 64)
    dp.publish([(VIP, 80, "tcp", 1, 65537, [(BE[b], 80, w, b, False) for b, w in new])], 7)
    repicked = sum(dp.pick("198.18.0.2", f["sport"], VIP, 80, "tcp")[2] != BE[
        int(f["names"][0][2:])] for k, f in flows.items() if k.startswith("tcp"))
    assert repicked > 0
    print(f"\ngateway {carrier} carried {max(made1, made2)} of the flows; the new table "
          f"would send {repicked} of {N_TCP} connections elsewhere; survivor's sync "
          f"{st['sync']}")
