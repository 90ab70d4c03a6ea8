"""Several gateways, active-active: BGP announcements, ECMP at the router, VRRP on the rack.

One lab for the module (3 gateways, 3 backends, real BIRD and keepalived, real TCP). Each test
runs the steady load (lbcore.lab.steady: 60 keep-alive connections with a request every
100 ms, new-connection probes every 100 ms, a UDP request stream), does one thing to one
gateway, and checks what the connections saw. The tests print the measured times; this is the
command that measures them::

    .venv/bin/python -m pytest -s -q tests/test_ha.py

Bounds are generous and nothing asserts speed: the machine is shared.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbcore import lab, netconf
from lbcore.control.client import request
from lbcore.lab import multi

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GATEWAYS = 3
VIP = lab.VIP_V4
SETTLE = 6.0            # s of load after an event before the load stops


@pytest.fixture(scope="module")
def ha_lab():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    try:
        multi.check_tools()
    except lab.LabError as e:
        pytest.skip(str(e))
    with lab.lease(gateways=GATEWAYS, backends=3) as state:
        yield state


def all_gateways_up() -> None:
    """Start the balancers an earlier test left stopped (each test starts from 3 gateways)."""
    state = lab.load_state()
    assert state is not None
    for i in range(1, GATEWAYS + 1):
        if not any(p.role == f"balancer-gw{i}" and lab.proc_alive(p) for p in state.processes):
            multi.start_balancer(i)
    wait_nexthops(GATEWAYS)


def wait_nexthops(n: int, timeout: float = 30.0) -> float:
    """Wait until the router has ``n`` next hops for the VIP; the time it happened."""
    deadline = time.monotonic() + timeout
    while True:
        nh = multi.router_nexthops(VIP)
        if len(nh) == n:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"router next hops for {VIP}: {nh}, expected {n}")
        time.sleep(0.01)


class Load:
    """lbcore.lab.steady in the client namespace; stop() returns its result."""

    def __init__(self, **kwargs) -> None:
        # niced up: the load is the measuring instrument, and other test runs share the CPUs
        # (a starved client would time out its own requests)
        self.proc = netconf.popen_in_netns(
            lab.CLIENT_NS, ["nice", "-n", "-10", sys.executable, "-m", "lbcore.lab.steady"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=lab.child_env(), text=True)
        self.proc.stdin.write(json.dumps({"addr": VIP, **kwargs}) + "\n")
        self.proc.stdin.flush()
        self.ready = json.loads(self._line(60))

    def _line(self, timeout: float) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if not line:
            raise AssertionError(f"steady load gave no output (status {self.proc.poll()})")
        return line

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        result = json.loads(self._line(60))
        self.proc.wait(10)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


@contextlib.contextmanager
def load(**kwargs):
    ld = Load(**kwargs)
    try:
        yield ld
    finally:
        ld.kill()


def failover(res: dict, t_event: float, slow: float = 0.5) -> tuple[float | None, float]:
    """(recovered, slowest): new connections started after ``t_event`` that failed or took
    longer than ``slow`` s (their SYN met the dead gateway and was retransmitted); the end of
    the first good, quick one started after the last of those, relative to ``t_event``
    (None: no new connection was hurt), and the slowest one's duration."""
    after = sorted(p for p in res["probes"] if p[0] >= t_event)
    hurt = [p for p in after if not p[2] or p[1] - p[0] > slow]
    slowest = max((p[1] - p[0] for p in after), default=0.0)
    if not hurt:
        return None, slowest
    good = [p for p in after if p[0] > hurt[-1][0] and p[2] and p[1] - p[0] <= slow]
    return (good[0][1] - t_event if good else float("inf")), slowest


def check_survived(res: dict, t_event: float, new_after: float = 2.0) -> None:
    """Every keep-alive connection lived (answered within 3 s, never reset, same backend);
    every probe that started ``new_after`` s after the event succeeded."""
    assert res["failed"] == [], res["failed"][:5]
    assert res["resets"] == 0 and res["changed"] == 0
    late = [p for p in res["probes"] if p[0] >= t_event + new_after]
    assert late and all(p[2] for p in late), [p for p in late if not p[2]][:5]
    assert res["udp"]["answered"] > 0


def report(what: str, t_kill: float, t_withdrawn: float | None, res: dict) -> None:
    recovered, slowest = failover(res, t_kill)
    lost = [t for t in res["udp"]["lost_at"] if t >= t_kill - 0.5]
    print(f"\n{what}: withdrawn at the router {_ms(t_withdrawn, t_kill)} after the kill; "
          f"new connections normal again {_fmt(recovered)} after the kill (slowest "
          f"{slowest * 1000:.0f} ms; failed {sum(1 for p in res['probes'] if not p[2])} of "
          f"{len(res['probes'])}); keep-alive requests: max latency "
          f"{res['max_latency'] * 1000:.0f} ms, {res['requests']} answered; "
          f"UDP lost {len(lost)} of {res['udp']['sent']}")


def _ms(t: float | None, t0: float) -> str:
    return "never" if t is None else f"{(t - t0) * 1000:.0f} ms"


def _fmt(x: float | None) -> str:
    return "at once (none was slowed)" if x is None else f"{x * 1000:.0f} ms"


def wait_withdrawn(before: int, timeout: float = 15.0) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(multi.router_nexthops(VIP)) < before:
            return time.monotonic()
        time.sleep(0.005)
    return None


# --------------------------------------------------------------------------- 5: same tables

def test_digests_equal_on_every_gateway(ha_lab):
    wait_nexthops(GATEWAYS)
    digests = []
    for i in range(1, GATEWAYS + 1):
        st = request(str(multi.gateway_socket(i)), {"cmd": "status"})
        assert st["bgp"]["state"] == "running"
        assert all(s["up"] and s["bfd"] == "Up" for s in st["bgp"]["sessions"]), st["bgp"]
        assert all(v["announced"] for v in st["vips"])
        digests.append({f"{v['address']}:{v['port']}/{v['protocol']}": v["table_digest"]
                        for v in st["vips"]})
    assert all(d == digests[0] for d in digests) and all(digests[0].values()), digests
    healthy, text = lab.status_text()
    assert healthy, text
    for i in range(1, GATEWAYS + 1):
        assert f"lbc-gw{i}" in text and "announces 198.18.100.1/32" in text


BAD_BGP = """
[bgp]
local_as = 65001
router_id = "198.18.1.11"
neighbors = [{ address = "198.18.1.1", as = 65000 }]
hold_time = 1
"""


def test_bad_bgp_refused_before_anything_starts(tmp_path: Path):
    cfg = lab.render_config(lab.LabSpec(), tmp_path) + BAD_BGP
    p = tmp_path / "bad.toml"
    p.write_text(cfg)
    r = subprocess.run([sys.executable, "-m", "lbcore", "check-config", str(p)],
                       capture_output=True, text=True, env=lab.child_env())
    assert r.returncode == 1 and "bgp.hold_time" in r.stderr and "got 1" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "lbcore", "run", "-c", str(p)],
                       capture_output=True, text=True, env=lab.child_env(), timeout=60)
    assert r.returncode == 2 and "bgp.hold_time" in r.stderr, r.stderr


# --------------------------------------------------------------------------- 1 and 4

# The backend set every gateway changes to while connections are held (new weights move
# many Maglev slots): a connection moved to another gateway keeps its backend only through
# flow sync, not through the table.
CHANGED = [(1, 1), (2, 5), (3, 2)]


def reload_all(backends, gateways) -> None:
    """Give ``gateways`` the lab's config with ``backends`` (None: the lab's own) and reload."""
    state = lab.load_state()
    assert state is not None
    for i in gateways:
        (multi.gw_dir(i) / "lbcore.toml").write_text(
            lab.render_config(state.spec, gateway=i, backends=backends))
        request(str(multi.gateway_socket(i)), {"cmd": "reload"}, timeout=60)


def test_process_crash(ha_lab):
    """The backend set changes on every gateway while connections are held, then gw1's
    balancer is SIGKILLed: its connections continue on another gateway, each on its
    original backend (flow sync told the others which), none reset."""
    wait_nexthops(GATEWAYS)
    try:
        with load() as ld:
            time.sleep(1.0)
            reload_all(CHANGED, range(1, GATEWAYS + 1))
            time.sleep(1.0)
            synced = request(str(multi.gateway_socket(2)), {"cmd": "status"})["sync"]
            t_kill = multi.kill_balancer(1, signal.SIGKILL)
            t_withdrawn = wait_withdrawn(GATEWAYS)
            time.sleep(SETTLE)
            res = ld.stop()
    finally:
        with contextlib.suppress(Exception):
            reload_all(None, range(2, GATEWAYS + 1))   # gw1 starts with the lab's own
    report("SIGKILL of gw1's lbcore run, after a change of the backend set", t_kill,
           t_withdrawn, res)
    assert synced and synced["received"].get("records", 0) > 0, synced
    assert t_withdrawn is not None
    assert multi.gw_v4(1) not in multi.router_nexthops(VIP)
    check_survived(res, t_kill)


def test_return(ha_lab):
    """The killed gateway starts again and is announced; no connection changes backend."""
    if len(multi.router_nexthops(VIP)) == GATEWAYS:
        pytest.skip("needs the gateway test_process_crash took down")
    with load() as ld:
        time.sleep(1.0)
        t0 = time.monotonic()
        multi.start_balancer(1)
        t_back = wait_nexthops(GATEWAYS)
        time.sleep(SETTLE)
        res = ld.stop()
    print(f"\ngw1 restarted: announced at the router {(t_back - t0) * 1000:.0f} ms after "
          "the start")
    assert res["failed"] == [] and res["changed"] == 0 and res["resets"] == 0
    assert all(p[2] for p in res["probes"]), [p for p in res["probes"] if not p[2]][:5]


# --------------------------------------------------------------------------- 3

def test_planned_drain(ha_lab):
    all_gateways_up()
    with load(udp_timeout=1.0) as ld:
        time.sleep(1.0)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "lbcore", "drain-gateway", "-s",
                            str(multi.gateway_socket(2))], capture_output=True, text=True,
                           env=lab.child_env(), timeout=30)
        assert r.returncode == 0 and "198.18.100.1" in r.stdout, r.stdout + r.stderr
        t_withdrawn = wait_withdrawn(GATEWAYS)
        st = request(str(multi.gateway_socket(2)), {"cmd": "status"})
        assert st["bgp"]["state"] == "drained" and not st["vips"][0]["announced"]
        assert "drained" in st["vips"][0]["announce_reason"]
        multi.kill_balancer(2, signal.SIGTERM)
        time.sleep(SETTLE)
        res = ld.stop()
    print(f"\ndrain of gw2: withdrawn at the router {_ms(t_withdrawn, t0)} after "
          f"drain-gateway; UDP lost {len(res['udp']['lost_at'])} of {res['udp']['sent']}")
    assert t_withdrawn is not None
    assert res["failed"] == [] and res["resets"] == 0 and res["changed"] == 0
    assert all(p[2] for p in res["probes"]), [p for p in res["probes"] if not p[2]][:5]
    assert res["udp"]["lost_at"] == []
    multi.start_balancer(2)
    wait_nexthops(GATEWAYS)


# --------------------------------------------------------------------------- 2

def test_box_failure(ha_lab):
    all_gateways_up()
    with load() as ld:
        time.sleep(1.0)
        t_kill = multi.kill_box(3)
        t_withdrawn = wait_withdrawn(GATEWAYS)
        time.sleep(SETTLE)
        res = ld.stop()
    report("gw3's box failure (every process killed, links down)", t_kill, t_withdrawn, res)
    assert t_withdrawn is not None
    check_survived(res, t_kill)
