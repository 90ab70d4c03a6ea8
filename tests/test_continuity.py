"""Flow continuity across restarts, in the namespace lab: 30 keep-alive TCP
connections and a UDP flow are held through the balancer while it is
restarted 10 times in a row, the backend set changed before each start
(a backend added, one that holds none of the connections removed, weights
changed): every connection survives, on the backend it started on. Once
with SIGTERM, once with SIGKILL (the flow table file is adopted either
way: it is written by the packet path itself, not saved at exit), and the
persistent TUN with its routes is re-attached, not re-created. Then the gap
a steady UDP stream sees in a restart, measured with the TUN kept and with
it re-created, and the refusal of a device of tun_name that is not ours."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbcore import lab as lab_mod
from lbcore import netconf
from lbcore.control import request

pytestmark = pytest.mark.netns

VIP = lab_mod.VIP_V4
HOLDCONN = str(Path(__file__).with_name("holdconn.py"))
N_TCP = 30

# The backend set before each of the 10 starts: (backend number, weight). be4 and be5 come
# and go; every connection is opened while the set is be1..be3, so be4 and be5 never hold
# one and may be removed. Weights change on the way.
PLANS = [
    [(1, 1), (2, 1), (3, 1), (4, 1)],             # add be4
    [(1, 1), (2, 1), (3, 1)],                     # remove be4 (holds none)
    [(1, 1), (2, 3), (3, 1)],                     # weights
    [(1, 2), (2, 1), (3, 1), (5, 4)],             # add be5, weights
    [(1, 2), (2, 1), (3, 1), (4, 1), (5, 4)],     # add be4 again
    [(1, 1), (2, 1), (3, 5), (4, 1)],             # remove be5, weights
    [(1, 1), (2, 1), (3, 1)],                     # remove be4
    [(1, 7), (2, 1), (3, 1), (4, 2), (5, 2)],     # add both
    [(1, 1), (2, 2), (3, 3), (5, 1)],             # remove be4, weights
    [(1, 1), (2, 1), (3, 1), (4, 3)],             # remove be5, add be4
]


@pytest.fixture(scope="module")
def lab():
    with lab_mod.lease(backends=5) as state:
        yield state


def config(plan) -> str:
    return lab_mod.render_config(lab_mod.LabSpec(backends=5), backends=plan)


def start_client() -> subprocess.Popen:
    return netconf.popen_in_netns(
        lab_mod.CLIENT_NS, [sys.executable, HOLDCONN, json.dumps(
            {"vip": VIP, "n": N_TCP, "interval": 0.2, "udp_interval": 0.05,
             "max_seconds": 400, "sniff_if": lab_mod.CLIENT_IF})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=lab_mod.child_env(), text=True)


def finish_client(client: subprocess.Popen) -> dict:
    try:
        out, err = client.communicate("stop\n", timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"client printed nothing; stderr: {err[-2000:]}"
    return json.loads(lines[-1])


def adopted_counts(log: Path, offset: int) -> list[int]:
    text = log.read_text(errors="replace")[offset:]
    return [int(m) for m in re.findall(r"adopted (\d+) flow", text)]


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGKILL],
                         ids=["sigterm", "sigkill"])
def test_connections_survive_10_restarts_with_the_backend_set_changing(lab, kill_signal):
    lab_mod.restart_balancer(config=config([(1, 1), (2, 1), (3, 1)]))
    log = lab_mod.paths()["balancer_log"]
    offset = log.stat().st_size
    client = start_client()
    try:
        ready = json.loads(client.stdout.readline() or "{}").get("ready")
        assert ready, f"the client did not get going: {client.stderr.read()[-2000:]}"
        holding = {names[0] for names in ready.values()}
        assert holding <= {"be1", "be2", "be3"}, ready
        ifindex = tun_index()
        for plan in PLANS:
            t0 = time.monotonic()
            lab_mod.restart_balancer(kill_signal=kill_signal, config=config(plan))
            print(f"restart took {time.monotonic() - t0:.2f} s")
            # the persistent TUN is re-attached, not re-created
            assert tun_index() == ifindex
            time.sleep(1.0)
            assert client.poll() is None, "the client died"
        res = finish_client(client)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    flows, leaks = res["flows"], res["leaks"]
    broken = {k: f["error"] for k, f in flows.items() if f["error"]}
    counts = adopted_counts(log, offset)
    # every start adopted every flow: none may have broken
    assert len(counts) == len(PLANS) and min(counts) >= N_TCP + 1, counts
    moved = {k: f["names"] for k, f in flows.items() if len(f["names"]) != 1}
    assert not moved, f"moved to another backend: {moved}"
    assert {k: f["names"] for k, f in flows.items()} == ready
    # No un-translated reply may leave the gateway in a restart's gap (the reply path stays
    # reserved by blackholes while no data plane runs): a client would answer it with a RST.
    assert not leaks, f"un-translated replies reached the client: {leaks}"
    assert not broken, f"broken: {broken}"
    assert all(f["answered"] >= 10 for f in flows.values()), flows
    # the gap each restart left, as the flows saw it (reported, not asserted: a shared box)
    tcp_wait = max(f["max_wait"] for k, f in flows.items() if k.startswith("tcp"))
    print(f"longest wait for an answer, s: tcp {tcp_wait:.3f} udp {flows['udp']['max_wait']:.3f}")


def test_status_and_metrics_show_the_adopted_flows(lab):
    snap = request(str(lab_mod.paths()["control_socket"]), {"cmd": "status"})
    assert "adoption" in snap and snap["adoption"] is not None, snap.keys()
    assert snap["sync"] is None
    # and in the words of `lbcore status`
    text = subprocess.run([sys.executable, "-m", "lbcore", "status", "-s",
                           str(lab_mod.paths()["control_socket"])], capture_output=True,
                          text=True, timeout=60, check=True).stdout
    ad = snap["adoption"]
    want = (f"adopted {ad['adopted']} flow(s)" if "refused" not in ad else "not adopted")
    assert f"flow table at start: {want}" in text, text
    if snap.get("tun") is not None:
        assert f"tun {snap['tun']['name']}: " in text, text


# ---------------------------------------------------------------- the persistent TUN and the gap

# One UDP flow (one socket) asking every INTERVAL s until stdin gets a line (at most MAX_S s,
# at most MAX_N requests); prints the monotonic times of the answers as one JSON list. The
# longest stretch between two answers around a restart is that restart's gap.
PROBER = r"""
import json, select, socket, sys, time
addr, port, interval, max_s, max_n = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
s.connect((addr, port))
answers = []
t_end = time.monotonic() + max_s
nxt = time.monotonic()
sent = 0
print("ready", flush=True)
while time.monotonic() < t_end and sent < max_n:
    now = time.monotonic()
    if now >= nxt:
        try:
            s.send(b"gap")
            sent += 1
        except OSError:
            pass
        nxt = now + interval
    r, _, _ = select.select([s, sys.stdin], [], [], max(0.0, nxt - time.monotonic()))
    if sys.stdin in r:
        break
    if s in r:
        while True:
            try:
                s.recv(512)
            except OSError:
                break
            answers.append(time.monotonic())
print(json.dumps(answers), flush=True)
"""
GAP_INTERVAL = 0.003
GAP_RESTARTS = 5


def tun_index() -> int | None:
    return netconf.link_index(lab_mod.TUN_NAME, netns=lab_mod.GW_NS)


def remove_tun() -> None:
    """Delete the lab balancer's persistent TUN (no balancer may hold it)."""
    from lbcore.dataplane.tun.device import remove_persistent
    netconf.run_in_netns(lab_mod.GW_NS, remove_persistent, lab_mod.TUN_NAME)


def measure_gaps(kill_signal: int, recreate: bool) -> list[float]:
    """Restart the lab's balancer GAP_RESTARTS times under a UDP request every GAP_INTERVAL s;
    the longest stretch without an answer around each restart. recreate: delete the TUN
    between stop and start (the new process creates it and its routes, as before the device
    was persistent) - the reference."""
    p = netconf.popen_in_netns(
        lab_mod.CLIENT_NS, [sys.executable, "-c", PROBER, VIP, str(lab_mod.UDP_PORT),
                            str(GAP_INTERVAL), "120", "100000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=lab_mod.child_env())
    windows = []
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(0.5)
        for _ in range(GAP_RESTARTS):
            t0 = time.monotonic()
            if recreate:
                lab_mod.stop_balancer(kill_signal)
                remove_tun()
                lab_mod.restart_balancer()
            else:
                before = tun_index()
                lab_mod.restart_balancer(kill_signal=kill_signal)
                assert tun_index() == before, "the TUN was re-created, not re-attached"
            time.sleep(0.7)
            windows.append((t0, time.monotonic()))
        out, err = p.communicate("stop\n", timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    answers = json.loads(out.strip().splitlines()[-1])
    gaps = []
    for t0, t1 in windows:
        around = [t for t in answers if t0 - 0.2 <= t <= t1]
        assert len(around) >= 2, f"no answers around a restart at {t0}: {err[-500:]}"
        gaps.append(max(b - a for a, b in zip(around, around[1:], strict=False)))
    return gaps


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGKILL],
                         ids=["sigterm", "sigkill"])
def test_restart_gap_with_the_persistent_tun(lab, kill_signal):
    """The TUN outlives the process with its routes; the next start re-attaches to it (same
    ifindex) and forwards before it reconciles routes and rules. The gap a steady UDP stream
    sees is measured both ways - the device deleted between stop and start (the reference:
    the new process creates it and its routes) and kept - and printed; asserted only: the kept
    device's median is not worse than a generous multiple of the reference's."""
    lab_mod.restart_balancer(config=config([(1, 1), (2, 1), (3, 1)]))
    reference = measure_gaps(kill_signal, recreate=True)
    kept = measure_gaps(kill_signal, recreate=False)
    med_ref, med_kept = statistics.median(reference), statistics.median(kept)
    print(f"\n{signal.Signals(kill_signal).name}: longest stretch without an answer, s "
          f"(UDP request every {GAP_INTERVAL * 1000:.0f} ms, {GAP_RESTARTS} restarts each): "
          f"TUN re-created {[round(g, 3) for g in reference]} median {med_ref:.3f}; "
          f"TUN kept {[round(g, 3) for g in kept]} median {med_kept:.3f}")
    assert med_kept <= 1.5 * med_ref + 0.2, (reference, kept)
    snap = request(str(lab_mod.paths()["control_socket"]), {"cmd": "status"})
    assert snap["tun"] == {"name": lab_mod.TUN_NAME, "adopted": True, "ifindex": tun_index()}
    routes = [r for r in netconf.routes(lab_mod.GW_NS) if r.oif == lab_mod.TUN_NAME]
    assert f"{VIP}/32" in {r.dst for r in routes}


def test_a_changed_worker_count_re_attaches_the_same_tun(lab):
    """3 workers after 1, then 1 again: the device keeps its ifindex, the new process attaches
    as many queues as it has workers, and the VIP answers."""
    from lbcore.lab.ns import udp_requests
    before = tun_index()
    try:
        for workers in (3, 1):
            text = lab_mod.render_config(lab_mod.LabSpec(backends=5, workers=workers),
                                         backends=[(1, 1), (2, 1), (3, 1)])
            lab_mod.restart_balancer(kill_signal=signal.SIGKILL, config=text)
            assert tun_index() == before
            info = netconf.run_in_netns(lab_mod.GW_NS, netconf.tun_info, lab_mod.TUN_NAME)
            assert info.queues == workers and info.persist, info
            assert udp_requests(lab_mod.CLIENT_NS, VIP, n=20)["ok"] == 20
    finally:
        lab_mod.restart_balancer(config=config([(1, 1), (2, 1), (3, 1)]))


def test_cleanup_on_exit_removes_the_tun_and_the_next_start_creates_it(lab):
    lab_mod.stop_balancer(signal.SIGTERM)
    assert tun_index() is not None             # a clean stop keeps it
    remove_tun()
    assert tun_index() is None
    lab_mod.restart_balancer()
    snap = request(str(lab_mod.paths()["control_socket"]), {"cmd": "status"})
    assert snap["tun"]["adopted"] is False


RUN_CONFIG = """
[global]
tun_name = "lbt0"
control_socket = "{sock}"
metrics_listen = ""

[[vip]]
address = "198.18.200.1"
port = 80
protocol = "tcp"
pool = "p"

[pool.p]
backends = [{{ address = "198.19.200.11", port = 80 }}]
"""


def _persistent_tun(name: str, flags: int) -> None:
    """A persistent TUN/TAP `name` with `flags` and no queue, in this thread's namespace."""
    import fcntl
    import os
    import struct

    from lbcore.dataplane.tun import device
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, device.TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, device.TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def _unpersist(name: str, flags: int) -> None:
    import fcntl
    import os
    import struct

    from lbcore.dataplane.tun import device
    if not device.ifindex(name):
        return
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, device.TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        fcntl.ioctl(fd, device.TUNSETPERSIST, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["veth", "tap", "tun-no-vnet-hdr"])
def test_an_existing_device_that_is_not_our_tun_is_refused(nsname, tmp_path, kind):
    """`lbcore run` never takes over a device of its tun_name that is not a TUN with its own
    flags: it exits 1 naming the device, and the device is left as it was."""
    from lbcore.dataplane.tun import device
    flags = {"tap": device.IFF_TAP | device.IFF_NO_PI | device.IFF_MULTI_QUEUE
             | device.IFF_VNET_HDR,
             "tun-no-vnet-hdr": device.IFF_TUN | device.IFF_NO_PI | device.IFF_MULTI_QUEUE
             }.get(kind, 0)
    cfg = tmp_path / "c.toml"
    cfg.write_text(RUN_CONFIG.format(sock=tmp_path / "s.sock"))
    try:
        if kind == "veth":
            netconf.veth_add("lbt0", "lbt0p", netns=nsname)
        else:
            netconf.run_in_netns(nsname, _persistent_tun, "lbt0", flags)
        before = netconf.link_index("lbt0", netns=nsname)
        p = netconf.popen_in_netns(nsname, [sys.executable, "-m", "lbcore", "run", "-c",
                                            str(cfg)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 1, out
        assert "'lbt0'" in out and "will not take it over" in out, out
        assert netconf.link_index("lbt0", netns=nsname) == before
    finally:
        if kind == "veth":
            netconf.link_del("lbt0", netns=nsname)
        else:
            netconf.run_in_netns(nsname, _unpersist, "lbt0", flags)


def test_a_tun_held_by_a_running_process_is_refused_at_once_naming_it(nsname):
    """A persistent TUN whose queue a running process holds is refused without waiting for
    it (only a process being torn down is waited for), and the error names the holder."""
    from lbcore.dataplane.tun import device

    def hold_and_attach() -> tuple[float, str, list]:
        q = device.attach_tun("lbt1", 1)         # this process: a running holder
        try:
            holders = device.queue_holders("lbt1")
            t0 = time.monotonic()
            try:
                device.attach_tun("lbt1", 1)
            except device.TunError as e:
                return time.monotonic() - t0, str(e), holders
            raise AssertionError("a held TUN was attached to")
        finally:
            device.close_tun(q.fds, remove=True)

    took, why, holders = netconf.run_in_netns(nsname, hold_and_attach)
    me = os.getpid()
    assert [(p, x) for p, _, x in holders] == [(me, False)], holders
    assert "in use" in why and f"pid {me} (" in why, why
    assert took < device.RELEASE_WAIT_S / 2, took
    assert not netconf.link_index("lbt1", netns=nsname)


def test_a_queue_held_by_no_process_is_not_waited_for_forever(nsname):
    """A killed run's queue that the kernel has not released yet (held by no process: here
    a queue file in flight in a unix socket, as an io_uring being torn down holds it) is
    waited for briefly; then the device is deleted and made anew, and cleanup removes it."""
    from lbcore.dataplane.tun import device

    def strand_a_queue(name: str, a: socket.socket) -> int:
        q = device.attach_tun(name, 1)
        socket.send_fds(a, [b"q"], q.fds)        # the file lives on in the socket
        os.close(q.fds[0])
        return q.ifindex

    def attach_again(name: str) -> tuple[bool, int, float]:
        t0 = time.monotonic()
        q = device.attach_tun(name, 1)
        took = time.monotonic() - t0
        device.close_tun(q.fds)
        return q.adopted, q.ifindex, took

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        first = netconf.run_in_netns(nsname, strand_a_queue, "lbt2", a)
        assert netconf.run_in_netns(nsname, device._stale, "lbt2")
        adopted, second, took = netconf.run_in_netns(nsname, attach_again, "lbt2")
        assert not adopted and second and second != first
        assert device.RELEASE_WAIT_S - 0.5 <= took < device.RELEASE_WAIT_S + 30, took
    finally:
        a.close()                                # the stranded file goes with them
        b.close()
    assert netconf.run_in_netns(nsname, device.remove_persistent, "lbt2")
    assert not netconf.link_index("lbt2", netns=nsname)
