"""Mode tun's two I/O paths (ext/lb_tun.c): io_uring, and plain read()/write(), forced with
LBCORE_TUN_IO=read/write. Real packets through the namespace lab in each: UDP and TCP over IPv4
and IPv6, answers the data plane builds itself (ping of a VIP: LB_REPLY), a large TCP transfer
as GSO super-packets arriving intact; the path shown in the log and in `lbcore status`; and a
worker on a TUN of its own that must return promptly after stop(), also while busy polling."""
from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

from lbcore import lab as lab_mod
from lbcore.control import request
from lbcore.lab.ns import bulk_sink, bulk_source, http_requests, ns_python, ns_run, udp_requests

pytestmark = pytest.mark.netns

VIP4, VIP6 = lab_mod.VIP_V4, lab_mod.VIP_V6
# io_uring is not there to test: the build has no liburing, or the kernel refuses rings
UNAVAILABLE = ("built without liburing", "not permitted")


@pytest.fixture(scope="module", params=["auto", "read/write"], ids=["io_uring", "read_write"])
def io_lab(request: pytest.FixtureRequest) -> Iterator[str]:
    """The lab with the balancer's workers on one I/O path; yields the path they run."""
    old = os.environ.get("LBCORE_TUN_IO")
    os.environ["LBCORE_TUN_IO"] = request.param     # the balancer inherits it (child_env)
    try:
        with lab_mod.lease(backends=2, ipv6=True, mode="tun", workers=2):
            log = lab_mod.paths()["balancer_log"].read_text()
            paths = re.findall(r"TUN I/O (io_uring|read/write)(?: \((.*)\))?", log)
            assert len(paths) == 2, log[-3000:]
            if request.param == "auto" and paths[0][0] != "io_uring" and any(
                    u in paths[0][1] for u in UNAVAILABLE):
                pytest.skip(f"io_uring unavailable here: {paths[0][1]}")
            yield "io_uring" if request.param == "auto" else "read/write"
    finally:
        if old is None:
            os.environ.pop("LBCORE_TUN_IO", None)
        else:
            os.environ["LBCORE_TUN_IO"] = old


def status() -> dict:
    return request(str(lab_mod.paths()["control_socket"]), {"cmd": "status"})


def test_the_log_and_status_name_the_path(io_lab):
    log = lab_mod.paths()["balancer_log"].read_text()
    assert log.count(f"TUN I/O {io_lab}") == 2, log[-3000:]
    assert status()["io"] == io_lab


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_udp_and_tcp_requests_are_answered(io_lab, vip):
    before = status()["totals"]["tx"]
    u = udp_requests("lbc-client", vip, n=200)
    assert u["ok"] == 200, u
    t = http_requests("lbc-client", vip, n=100)
    assert t["ok"] == 100 and t["errors"] == 0, t["error_samples"]
    # each exchange crossed the TUN at least twice (request in, reply back)
    assert status()["totals"]["tx"] - before >= 2 * 300


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_ping_of_the_vip_is_answered_by_the_data_plane(io_lab, vip):
    r = ns_run("lbc-client", ["ping", "-c", "5", "-i", "0.2", "-W", "3", vip], timeout=30,
               check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0% packet loss" in r.stdout


def test_a_large_tcp_transfer_arrives_intact_both_ways(io_lab):
    up = bulk_sink("lbc-client", VIP4, 50_000_000)
    assert up["ok"] and up["count"] == 50_000_000 and up["sha256"] == up["server_sha256"], up
    down = bulk_source("lbc-client", VIP6, 50_000_000)
    assert down["ok"] and down["received"] == 50_000_000, down
    assert status()["totals"]["tx_errors"] == 0


# A worker on a TUN of its own in a fresh namespace: 50 datagrams routed into the TUN (no
# table: each is read and dropped as no_vip), then stop() -- while the worker sleeps without
# busy polling, inside a 100 ms busy-poll window, asleep again after a 50 ms one, and after a
# 50 ms window set while the worker ran (as a reload does). Prints the path, the join times,
# the rx count and the time counted as busy polling.
STOP = """
import json, socket, subprocess, threading, time
from lbcore._core import Dataplane
from lbcore.dataplane.tun.device import open_tun, close_tun
out = {{}}
for name, busy, live, wait in (("0", 0, 0, 0.5), ("100000", 100000, 0, 0.02),
                               ("50000", 50000, 0, 0.5), ("live", 0, 50000, 0.5)):
    fds, _ = open_tun("lbt-io", 1, vnet_hdr=True)
    try:
        subprocess.run(["ip", "link", "set", "lbt-io", "up"], check=True)
        subprocess.run(["ip", "addr", "replace", "198.18.250.1/30", "dev", "lbt-io"], check=True)
        subprocess.run(["ip", "route", "replace", "198.18.251.0/24", "dev", "lbt-io"], check=True)
        dp = Dataplane(workers=1, busy_poll_us=busy)
        seen = []
        th = threading.Thread(target=dp.run_worker, args=(0, fds[0], True),
                              kwargs={{"io": {io!r}, "on_start": lambda p, w: seen.append((p, w))}})
        t_start = time.monotonic()
        th.start()
        time.sleep(0.3)
        if live:
            dp.busy_poll_us = live
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(50):
            s.sendto(b"x" * 64, ("198.18.251.7", 9000 + i))
        s.close()
        time.sleep(wait)
        t0 = time.monotonic()
        dp.stop()
        th.join(5)
        out[name] = {{"alive": th.is_alive(), "join": time.monotonic() - t0,
                     "window": dp.busy_poll_us, "rx": dp.stats()["rx"], "path": seen,
                     "io": dp.io_paths(),
                     "spin": dp.stats()["spin_ns"] / 1e9, "span": time.monotonic() - t_start}}
    finally:
        close_tun(fds)
print(json.dumps(out))
"""


@pytest.mark.parametrize("io", ["auto", "read/write"], ids=["io_uring", "read_write"])
def test_stop_ends_the_worker_promptly(io, nsname):
    res = ns_python(nsname, STOP.format(io=io), timeout=60)
    for busy, r in res.items():
        assert not r["alive"], (busy, r)
        assert r["join"] < 1.0, (busy, r)         # the loop looks at dp->stop every 100 ms
        assert r["rx"] >= 50, (busy, r)     # and what the kernel sends on a new link
        # busy polling is counted: none without a window; a whole window after the last
        # packet when the worker went to sleep after it; never more than the worker ran
        if busy == "0":
            assert r["spin"] == 0, r
        elif busy in ("50000", "live"):
            assert 0.045 <= r["spin"] <= r["span"], r
            assert r["window"] == 50000, r
        else:
            assert r["spin"] <= r["span"], r
        (path, why), = r["path"]
        assert r["io"] == {"0": [path, why]}, r
        if io == "read/write":
            assert path == "read/write" and "asked for" in why, r
        elif path != "io_uring" and any(u in why for u in UNAVAILABLE):
            pytest.skip(f"io_uring unavailable here: {why}")
        else:
            assert (path, why) == ("io_uring", ""), r
