"""`lbcore lab`: the namespaces, addresses and routes of the lab's contract, the backend servers,
and a `down` that leaves nothing behind (also after a crash).

The lab's names are fixed by contract, so every test that builds it holds the machine-wide lab
lock (lbcore.lab.turn) and tears the lab down whatever happens. Traffic goes
from lbc-client straight to the backends' addresses (kernel routing through lbc-gw); the tests
through the balancer and its VIP are the end-to-end tests'.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from lbcore import lab, netconf
from lbcore.config import parse_config
from lbcore.lab import ns as tb
from lbcore.lab.traffic import read_response

LAB_NETS = [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")]


def _in_lab_nets(addr: str | None) -> bool:
    if not addr or addr == "default":
        return False
    net = ipaddress.ip_network(addr, strict=False)
    return any(net.version == n.version and net.overlaps(n) for n in LAB_NETS)


def root_lab_footprint() -> set[tuple]:
    """Everything in the root namespace that touches the lab's ranges or names."""
    out: set[tuple] = set()
    out |= {("addr", i, a) for i, a in netconf.addresses(None) if _in_lab_nets(a)}
    out |= {("route", r.table, r.dst, r.gateway, r.oif) for r in netconf.routes(None, table=None)
            if _in_lab_nets(r.dst) or _in_lab_nets(r.gateway)
            or (r.oif or "").startswith("lbc")}
    out |= {("rule", r.priority, r.src, r.dst, r.iif) for r in netconf.rules(None)
            if _in_lab_nets(r.src) or _in_lab_nets(r.dst) or (r.iif or "").startswith("lbc")}
    out |= {("link", li.name) for li in netconf.links(None) if li.name.startswith("lbc")}
    return out


def assert_no_lab_left(pids: list[int]) -> None:
    assert lab.present_namespaces() == []
    assert not lab.paths()["dir"].exists()
    for pid in pids:
        assert lab.starttime(pid) is None, f"pid {pid} still runs"


def _lab_pids() -> list[int]:
    state = lab.load_state()
    assert state is not None
    return [p.pid for p in state.processes]


# --------------------------------------------------------------------------- one lab, many tests

@pytest.fixture(scope="class")
def built():
    """`lab up --no-balancer --backends 2 --ipv6` through the Python API, for TestLab (torn
    down after it, before the lifecycle tests below build their own), and the root
    namespace's lab footprint from before."""
    with lab.turn():
        lab.down(out=lambda _: None)
        before = root_lab_footprint()
    with lab.lease(backends=2, ipv6=True, balancer=False) as state:
        yield state, before


@pytest.mark.netns
class TestLab:
    """One lab, many checks."""

    def test_namespaces_links_addresses_routes(self, built):
        state, _ = built
        assert lab.present_namespaces() == ["lbc-be1", "lbc-be2", "lbc-client", "lbc-gw"]
        want = {
            "lbc-client": {("lbc-cl-gw", "198.18.0.2/24"), ("lbc-cl-gw", "2001:db8::2/64")},
            "lbc-gw": {("lbc-gw-cl", "198.18.0.1/24"), ("lbc-gw-cl", "2001:db8::1/64"),
                       ("lbc-br0", "198.19.0.1/24"), ("lbc-br0", "2001:db8:1::1/64")},
            "lbc-be1": {("lbc-be1-gw", "198.19.0.11/24"), ("lbc-be1-gw", "2001:db8:1::11/64")},
            "lbc-be2": {("lbc-be2-gw", "198.19.0.12/24"), ("lbc-be2-gw", "2001:db8:1::12/64")},
        }
        for ns, addrs in want.items():
            got = {(i, a) for i, a in netconf.addresses(ns)
                   if not a.startswith(("fe80:", "127.", "::1/"))}
            assert got == addrs, ns
            assert len([li for li in netconf.links(ns) if li.name.startswith("lbc-")]) \
                == {"lbc-gw": 4}.get(ns, 1)
        masters = {li.name: li.master for li in netconf.links("lbc-gw")}
        assert masters["lbc-gw-be1"] == masters["lbc-gw-be2"] == "lbc-br0"
        for ns, gw4, gw6 in (("lbc-client", "198.18.0.1", "2001:db8::1"),
                             ("lbc-be1", "198.19.0.1", "2001:db8:1::1"),
                             ("lbc-be2", "198.19.0.1", "2001:db8:1::1")):
            defaults = {r.gateway for r in netconf.routes(ns) if r.dst == "default"}
            assert defaults == {gw4, gw6}, ns
        assert netconf.sysctl_get("net.ipv4.ip_forward", netns="lbc-gw") == "1"
        assert netconf.sysctl_get("net.ipv6.conf.all.forwarding", netns="lbc-gw") == "1"
        assert netconf.sysctl_get("net.ipv4.ip_forward", netns="lbc-be1") == "0"
        assert netconf.sysctl_get("net.ipv4.tcp_tw_reuse", netns="lbc-client") == "1"
        for ns in lab.present_namespaces():   # the VIP is on no interface: the balancer routes it
            assert not [a for _, a in netconf.addresses(ns)
                        if a.split("/")[0] in (lab.VIP_V4, lab.VIP_V6)]
        assert state.backend_addresses() == ["198.19.0.11", "198.19.0.12"]
        assert state.backend_addresses(socket.AF_INET6) == ["2001:db8:1::11", "2001:db8:1::12"]

    @pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
    def test_http_answers_each_backend_name(self, built, family):
        state, _ = built
        for i, addr in enumerate(state.backend_addresses(family), 1):
            r = tb.http_requests(lab.CLIENT_NS, addr, 30)
            assert (r["ok"], r["errors"], r["counts"]) == (30, 0, {f"be{i}": 30})
            assert len({port for port, _ in r["results"]}) == 30     # a new connection each
            r = tb.http_requests(lab.CLIENT_NS, addr, 200, keepalive=True)
            assert (r["ok"], r["counts"]) == (200, {f"be{i}": 200})
            assert len({port for port, _ in r["results"]}) == 1      # one connection

    def test_http_protocol_details(self, built):
        def talk(payload: bytes, read_all: bool = True) -> bytes:
            with socket.create_connection(("198.19.0.12", 80), timeout=5) as c:
                c.sendall(payload)
                if not read_all:
                    _, body, _, _ = read_response(c, b"")
                    c.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")  # still open
                    _, body2, _, _ = read_response(c, b"")
                    return body + body2
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
                return data

        def run() -> dict[str, bytes]:
            return {
                "pipelined": talk(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                                  b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
                "http10": talk(b"GET / HTTP/1.0\r\n\r\n"),
                "keepalive": talk(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", read_all=False),
                "head": talk(b"HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n"),
                "bad": talk(b"NONSENSE\r\n\r\n"),
            }

        got = tb.ns_call(lab.CLIENT_NS, run)
        assert got["pipelined"].count(b"HTTP/1.1 200 OK") == 3
        assert got["pipelined"].count(b"\r\n\r\nbe2\n") == 3
        assert got["pipelined"].endswith(b"Connection: close\r\n\r\nbe2\n")
        assert got["http10"].startswith(b"HTTP/1.1 200 OK") and got["http10"].endswith(b"be2\n")
        assert got["keepalive"] == b"be2\nbe2\n"
        assert b"Content-Length: 4" in got["head"] and got["head"].endswith(b"\r\n\r\n")
        assert got["bad"].startswith(b"HTTP/1.1 400")

    @pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
    def test_udp_answers_each_backend_name(self, built, family):
        state, _ = built
        for i, addr in enumerate(state.backend_addresses(family), 1):
            r = tb.udp_requests(lab.CLIENT_NS, addr, 50)
            assert (r["ok"], r["errors"], r["counts"]) == (50, 0, {f"be{i}": 50})
            r = tb.udp_requests(lab.CLIENT_NS, addr, 20, new_socket=False, payload="x" * 1000)
            assert r["counts"] == {f"be{i}": 20}

    @pytest.mark.parametrize("addr,nbytes", [("198.19.0.11", 20_000_003),
                                             ("2001:db8:1::12", 3_000_001), ("198.19.0.12", 0)])
    def test_bulk_sink_and_source(self, built, addr, nbytes):
        r = tb.bulk_sink(lab.CLIENT_NS, addr, nbytes)
        assert r["ok"] and r["count"] == nbytes and r["server_sha256"] == r["sha256"], r
        r = tb.bulk_source(lab.CLIENT_NS, addr, nbytes)
        assert r["ok"] and r["received"] == nbytes and r["sha256"] == r["expected_sha256"], r

    def test_source_refuses_a_bad_request(self, built):
        def ask() -> bytes:
            with socket.create_connection(("198.19.0.11", 9001), timeout=5) as c:
                c.sendall(b"lots\n")
                return c.recv(1000)

        assert tb.ns_call(lab.CLIENT_NS, ask).startswith(b"ERR ")

    def test_status(self, built, capsys):
        state, _ = built
        assert lab.cmd_status(None) == 0
        out = capsys.readouterr().out
        assert "lab: up, 2 backends, ipv6 yes, balancer no" in out
        for ns in ("lbc-client", "lbc-gw", "lbc-be1", "lbc-be2"):
            assert f"  {ns}\n" in out
        assert "198.19.0.12/24 2001:db8:1::12/64" in out and "master lbc-br0" in out
        for p in state.processes:
            assert f"pid {p.pid}" in out
        assert out.count(" alive ") == 2 and "DEAD" not in out
        assert "balancer: not started" in out

    def test_up_refuses_while_a_lab_exists(self, built):
        with pytest.raises(lab.LabError, match="already exists"):
            lab.up(lab.LabSpec(backends=1, balancer=False))
        assert lab.present_namespaces() == ["lbc-be1", "lbc-be2", "lbc-client", "lbc-gw"]

    def test_root_namespace_gets_nothing(self, built):
        _, before = built
        assert root_lab_footprint() == before
        for _, a in netconf.addresses(None):
            ip = a.split("/")[0]
            assert ip not in ("198.18.0.1", "198.18.0.2", "198.19.0.1", "198.19.0.11",
                              "198.19.0.12", "2001:db8::1", "2001:db8::2", "2001:db8:1::1")

    def test_server_logs_are_clean(self, built):
        state, _ = built
        for p in state.processes:
            text = Path(p.log).read_text()
            assert f"labservers {p.role} ready" in text
            assert "Traceback" not in text and "Error" not in text, text


# --------------------------------------------------------------------------- whole lifecycles

def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbcore", "lab", *args], capture_output=True,
                          text=True, timeout=timeout, env=lab.child_env())


@pytest.mark.netns
def test_cli_up_status_down_twice():
    with lab.turn():
        lab.down(out=lambda _: None)
        before = root_lab_footprint()
        try:
            r = _cli("up", "--no-balancer", "--backends", "2")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "lab: up, 2 backends, ipv6 no, balancer no" in r.stdout
            pids = _lab_pids()
            assert tb.http_get(lab.CLIENT_NS, "198.19.0.12") == "be2"
            r = _cli("status")
            assert r.returncode == 0 and "lbc-gw-be2" in r.stdout
            assert root_lab_footprint() == before
        finally:
            r = _cli("down")
        assert r.returncode == 0, r.stderr
        assert "removed netns lbc-gw" in r.stdout and "stopped be1" in r.stdout
        assert_no_lab_left(pids)
        assert root_lab_footprint() == before
        r = _cli("down")
        assert r.returncode == 0 and "nothing to remove" in r.stdout
        r = _cli("status")
        assert r.returncode == 1 and "no lab" in r.stdout


@pytest.mark.netns
def test_down_cleans_up_after_a_crash():
    with lab.turn():
        lab.down(out=lambda _: None)
        try:
            # 1. everything was SIGKILLed: dead processes, namespaces and state left behind.
            lab.up(lab.LabSpec(backends=1, balancer=False), out=lambda _: None)
            pids = _lab_pids()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            healthy, text = lab.status_text()
            assert not healthy and "DEAD" in text
            # someone else's process in the lab: reported by `down`, never killed by it
            stray = netconf.popen_in_netns(lab.CLIENT_NS, [sys.executable, "-c",
                                                           "import time; time.sleep(30)"])
            said: list[str] = []
            try:
                done = lab.down(out=said.append)
                assert lab.starttime(stray.pid) is not None
            finally:
                stray.kill()
                stray.wait()
            assert any("was not running" in d for d in done)
            assert any(f"pid {stray.pid} " in s and "lbc-client" in s for s in said), said
            assert_no_lab_left(pids)
            # 2. a crash before state.json was written: only namespaces are left.
            lab.up(lab.LabSpec(backends=1, balancer=False), out=lambda _: None)
            pids = _lab_pids()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            lab.paths()["state"].unlink()
            assert "no state file" in lab.status_text()[1]
            with pytest.raises(lab.LabError, match="already exists"):
                lab.up(lab.LabSpec(backends=1, balancer=False))
            lab.down(out=lambda _: None)
            assert_no_lab_left(pids)
        finally:
            lab.down(out=lambda _: None)


@pytest.mark.netns
def test_failure_half_way_through_up_removes_everything(monkeypatch):
    def broken(state):
        raise RuntimeError("servers cannot start")

    monkeypatch.setattr(lab, "_start_servers", broken)
    with lab.turn():
        lab.down(out=lambda _: None)
        try:
            with pytest.raises(RuntimeError, match="servers cannot start"):
                lab.up(lab.LabSpec(backends=2, balancer=False))
            assert_no_lab_left([])
        finally:
            lab.down(out=lambda _: None)


FAKE_BALANCER = ("import signal, sys, time; "
                 "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
                 "print('lbcore ready', flush=True); time.sleep(60)")


@pytest.mark.netns
def test_balancer_is_started_in_gw_waited_for_and_stopped(capsys):
    spec = lab.LabSpec(backends=1, ipv6=True, balancer_argv=(sys.executable, "-c", FAKE_BALANCER))
    with lab.turn():
        lab.down(out=lambda _: None)
        try:
            state = lab.up(spec, out=lambda _: None)
            bal = [p for p in state.processes if p.role == "balancer"]
            assert len(bal) == 1 and bal[0].netns == "lbc-gw" and lab.proc_alive(bal[0])
            assert os.readlink(f"/proc/{bal[0].pid}/ns/net").endswith(
                f"[{os.stat(netconf.netns_path('lbc-gw')).st_ino}]")
            config = tomllib.loads(lab.paths()["config"].read_text())
            assert config["global"]["control_socket"] == str(lab.paths()["control_socket"])
            assert lab.cmd_status(None) == 0
            out = capsys.readouterr().out
            for key in ("config", "control socket", "log", "metrics"):
                assert f"  {key} " in out
            assert str(lab.paths()["config"]) in out and str(lab.paths()["balancer_log"]) in out
        finally:
            done = lab.down(out=lambda _: None)
        assert done[0] == f"stopped balancer (pid {bal[0].pid})"   # first, before the servers
        assert_no_lab_left([p.pid for p in state.processes])


@pytest.mark.netns
def test_a_balancer_that_dies_fails_up_with_its_log():
    die = (sys.executable, "-c", "import sys; print('cannot open /dev/net/tun: boom'); sys.exit(3)")
    with lab.turn():
        lab.down(out=lambda _: None)
        try:
            t0 = time.monotonic()
            with pytest.raises(lab.LabError, match=r"(?s)exited \(status 3\).*boom"):
                lab.up(lab.LabSpec(backends=1, balancer_argv=die))
            assert time.monotonic() - t0 < lab.BALANCER_READY_TIMEOUT
            assert_no_lab_left([])
        finally:
            lab.down(out=lambda _: None)


@pytest.mark.netns
def test_labservers_standalone_defaults(nsname):
    """`python3 -m lbcore.lab.servers --name be7` as on a VM: default ports, SIGTERM ends it."""
    p = netconf.popen_in_netns(nsname, [sys.executable, "-m", "lbcore.lab.servers", "--name",
                                        "be7"], stdout=subprocess.PIPE, text=True,
                               env=lab.child_env())
    try:
        assert "labservers be7 ready" in p.stdout.readline()
        assert tb.http_get(nsname, "127.0.0.1") == "be7"
        assert tb.udp_requests(nsname, "127.0.0.1", 3)["counts"] == {"be7": 3}
        assert tb.bulk_sink(nsname, "127.0.0.1", 1000)["ok"]
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=10)
        p.stdout.close()
    assert rc == 0


# --------------------------------------------------------------------------- no root needed

def test_render_config_is_the_lab():
    c = tomllib.loads(lab.render_config(lab.LabSpec(backends=3, ipv6=True, mode="rawsock",
                                                    workers=2)))
    g = c["global"]
    assert (g["mode"], g["workers"], g["tun_name"], g["metrics_listen"]) == (
        "rawsock", 2, "lbc0", "127.0.0.1:9150")
    vips = {(v["address"], v["port"], v["protocol"]): v["pool"] for v in c["vip"]}
    assert vips == {("198.18.100.1", 80, "tcp"): "web", ("198.18.100.1", 5300, "udp"): "dns",
                    ("198.18.100.1", 9000, "tcp"): "sink", ("198.18.100.1", 9001, "tcp"): "source",
                    ("2001:db8:100::1", 80, "tcp"): "web6",
                    ("2001:db8:100::1", 5300, "udp"): "dns6",
                    ("2001:db8:100::1", 9000, "tcp"): "sink6",
                    ("2001:db8:100::1", 9001, "tcp"): "source6"}
    assert [b["address"] for b in c["pool"]["web"]["backends"]] == [
        "198.19.0.11", "198.19.0.12", "198.19.0.13"]
    assert [b["address"] for b in c["pool"]["dns6"]["backends"]] == [
        "2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13"]
    assert {b["port"] for b in c["pool"]["dns"]["backends"]} == {5300}
    assert c["pool"]["web"]["health"]["type"] == "http"
    assert c["pool"]["dns"]["health"]["type"] == "udp"
    assert c["pool"]["sink"]["health"]["type"] == "tcp"
    v4only = lab.render_config(lab.LabSpec(backends=1))
    assert set(tomllib.loads(v4only)["pool"]) == {"web", "dns", "sink", "source"}
    # the balancer accepts what the lab generates
    cfg = parse_config(v4only)
    assert len(cfg.vips) == 4 and cfg.backend_count == 4


def test_lab_spec_is_checked():
    for bad in (dict(backends=0), dict(backends=lab.MAX_BACKENDS + 1), dict(mode="x"),
                dict(workers=0)):
        with pytest.raises(ValueError):
            lab.LabSpec(**bad)
    names = [lab.backend_if(lab.MAX_BACKENDS), lab.gw_backend_if(lab.MAX_BACKENDS),
             lab.CLIENT_IF, lab.GW_CLIENT_IF, lab.BRIDGE, lab.TUN_NAME]
    assert all(len(n) <= 15 for n in names)        # IFNAMSIZ
    assert lab.backend_v4(lab.MAX_BACKENDS) == "198.19.0.250"
    assert ipaddress.ip_address(lab.backend_v6(lab.MAX_BACKENDS))
