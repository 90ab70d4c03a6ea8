"""A spoofed SYN flood at the lab sender's top rate against the namespace lab, with 20 held
keep-alive connections and new connections opened during it (lbcore.dataplane.shed).

The flood (tests/c/synflood.c, built here with gcc) comes from lbc-client with random
sources in 198.18.128.0/17, which the gateway routes back via lbc-client (so the backends'
SYN-ACKs to them leave the gateway and die there, as they would towards a spoofed address
elsewhere). Every process the test starts is stopped by its PID, also when it fails; the lab
(namespaces, routes) is removed by its lease.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lbcore import lab as lab_mod
from lbcore import netconf
from lbcore.control import request
from lbcore.lab import child_env

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
VIP4 = lab_mod.VIP_V4
FLOOD_SECONDS = 10.0
NEW_FLOW_RATE = 20000           # the web VIP's guard: new flows/s the data plane admits
HELD = 20

# HELD keep-alive connections, each asking once every 0.5 s until stdin closes; the time to
# each answer is recorded (a request waits up to 30 s: a stall is measured, not an error).
# "ready" once every connection got its first answer; at the end one JSON line per run.
HOLDER = r"""
import json, socket, sys, threading, time
from lbcore.lab.traffic import read_response
addr, n = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
res = [{"answers": 0, "slowest": 0.0, "late": 0, "backends": [], "errors": []}
       for _ in range(n)]
socks = [socket.create_connection((addr, 80), timeout=30) for _ in range(n)]
def ask(i, buf=b""):
    t = time.monotonic()
    socks[i].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body, buf, _ = read_response(socks[i], buf)
    dt = time.monotonic() - t
    r = res[i]
    r["answers"] += status == 200
    r["slowest"] = max(r["slowest"], dt)
    r["late"] += dt > 3.0
    b = body.decode().strip()
    if b not in r["backends"]:
        r["backends"].append(b)
    return buf
bufs = [ask(i) for i in range(n)]
def loop(i):
    buf = bufs[i]
    try:
        while not stop.wait(0.5):
            buf = ask(i, buf)
    except Exception as e:
        res[i]["errors"].append(f"{type(e).__name__}: {e}")
ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
for t in ts:
    t.start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
for t in ts:
    t.join(60)
print(json.dumps(res), flush=True)
"""

# A new connection (connect, one request, close) started every 0.1 s for `seconds`, each in
# a thread of its own with 10 s to finish; one JSON line: per connection [ok, seconds].
NEWCONNS = r"""
import json, socket, sys, threading, time
from lbcore.lab.traffic import read_response
addr, seconds = sys.argv[1], float(sys.argv[2])
out = []
def one():
    t = time.monotonic()
    try:
        with socket.create_connection((addr, 80), timeout=10) as s:
            s.settimeout(max(0.1, 10 - (time.monotonic() - t)))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = read_response(s, b"")[0]
        out.append([status == 200, time.monotonic() - t])
    except Exception:
        out.append([False, time.monotonic() - t])
ts = []
t0 = time.monotonic()
while time.monotonic() - t0 < seconds and len(ts) < 10 * seconds + 10:
    th = threading.Thread(target=one)
    th.start()
    ts.append(th)
    time.sleep(0.1)
for th in ts:
    th.join(15)
print(json.dumps(out), flush=True)
"""


def _build_synflood(tmp: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for tests/c/synflood.c")
    exe = tmp / "synflood"
    b = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                        str(ROOT / "tests" / "c" / "synflood.c")], capture_output=True, text=True)
    assert b.returncode == 0, b.stderr
    return exe


def _pin_cpu0() -> list[str]:
    """taskset to CPU 0 when there is more than one: the balancer's worker pins itself to the
    highest CPU, so the sender gets a core of its own and reaches its top rate."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpus[0])]


@contextmanager
def _proc(ns: str, argv: list[str], **kw) -> Iterator[subprocess.Popen]:
    """A process in ``ns``, killed by its PID if still running when the block ends."""
    p = netconf.popen_in_netns(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=child_env(), **kw)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def _control(req: dict, timeout: float = 60) -> object:
    return netconf.run_in_netns(lab_mod.GW_NS, request,
                                str(lab_mod.paths()["control_socket"]), req, timeout)


def _metrics() -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{lab_mod.METRICS_LISTEN}/metrics", timeout=30) as r:
            return r.read().decode()
    return netconf.run_in_netns(lab_mod.GW_NS, get)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition ``text``."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in the metrics")


@pytest.mark.parametrize("mode", ["tun", "rawsock"])
def test_syn_flood_keeps_held_connections_and_admits_new_ones(tmp_path, mode):
    """While the sender floods the web VIP with spoofed SYNs as fast as it can for 10 s (flow
    table 4096, new_flow_rate 20000): every one of 20 keep-alive connections gets every answer
    within 3 s, new connections opened meanwhile succeed, and (mode tun) the shed filter's
    work is visible in `status --json` and the metrics."""
    exe = _build_synflood(tmp_path)
    spec = lab_mod.LabSpec(backends=3, mode=mode,
                           global_extra=("flow_table_size = 4096",),
                           vip_extra=(f"new_flow_rate = {NEW_FLOW_RATE}",))
    with lab_mod.lease(spec):
        # the spoofed sources' way back: via lbc-client, which drops what is not its own
        netconf.route_add("198.18.128.0/17", gateway=lab_mod.CLIENT_V4, netns=lab_mod.GW_NS)
        with _proc(lab_mod.CLIENT_NS, [sys.executable, "-c", HOLDER, VIP4, str(HELD)],
                   stdin=subprocess.PIPE) as holder:
            line = holder.stdout.readline()
            assert line.strip() == "ready", (line, holder.stderr.read()
                                             if holder.poll() is not None else "")
            with _proc(lab_mod.CLIENT_NS, [*_pin_cpu0(), str(exe), "-d", VIP4, "-p", "80",
                                           "-n", "20000000", "-t", str(FLOOD_SECONDS)]) as flood, \
                    _proc(lab_mod.CLIENT_NS, [sys.executable, "-c", NEWCONNS, VIP4,
                                              str(FLOOD_SECONDS - 1)]) as newc:
                time.sleep(FLOOD_SECONDS / 2)
                during = _control({"cmd": "status"})
                during_text = subprocess.run(
                    [sys.executable, "-m", "lbcore", "status", "-s",
                     str(lab_mod.paths()["control_socket"])], capture_output=True, text=True,
                    timeout=60, env=child_env()).stdout
                fout, ferr = flood.communicate(timeout=FLOOD_SECONDS + 30)
                assert flood.returncode == 0, ferr
                nout, nerr = newc.communicate(timeout=60)
                assert newc.returncode == 0, nerr
            time.sleep(1.5)                       # the control loop relaxes the share
            after = _control({"cmd": "status"})
            metrics = _metrics()
            holder.stdin.close()
            hout = holder.stdout.read()
            holder.wait(timeout=90)
            assert holder.returncode == 0, holder.stderr.read()
        held = json.loads(hout.strip().splitlines()[-1])
        fl = json.loads(fout.strip().splitlines()[-1])
        new = json.loads(nout.strip().splitlines()[-1])

    ok = [t for good, t in new if good]
    share_new = len(ok) / max(1, len(new))
    slowest = max(r["slowest"] for r in held)
    sh_during, sh_after = during["shed"], after["shed"]
    if mode == "rawsock":           # no kernel filter there (yet): the ring takes the flood
        sh_during = sh_after = {"active": False, "since": None, "tun_dropped": None,
                                "vips": [{"port": 80, "share": 0.0, "syns": 0, "shed": 0,
                                          "retried": 0}]}
    web = next(v for v in sh_after["vips"] if v["port"] == 80)
    print(f"\nflood ({mode}): {fl['sent']} SYNs in {fl['elapsed']:.1f} s = {fl['pps']:.0f}/s "
          f"(send errors {fl['errors']})")
    print(f"held: {HELD} connections, {sum(r['answers'] for r in held)} answers, slowest "
          f"{slowest:.3f} s, late (> 3 s) {sum(r['late'] for r in held)}, errors "
          f"{sum(len(r['errors']) for r in held)}")
    print(f"new connections during the flood: {len(ok)} of {len(new)} = {share_new:.0%} "
          f"(median {sorted(ok)[len(ok) // 2] if ok else 0:.2f} s)")
    print(f"shed during: active {sh_during['active']}, shares "
          f"{[round(v['share'], 3) for v in sh_during['vips']]}; after: web VIP syns "
          f"{web['syns']}, shed {web['shed']}, passed as retries {web['retried']}, share "
          f"{web['share']}, tun_dropped "
          f"{sh_after['tun_dropped']}")
    print(f"data plane: refused {next(v for v in after['vips'] if v['port'] == 80)['refused']}, "
          f"drops {after['drops']}")

    # the flood ran, and at a rate well above what one worker forwards
    assert fl["sent"] >= 500_000, fl
    # every held connection answered every request, each within 3 s
    bad = [(i, r) for i, r in enumerate(held)
           if r["errors"] or r["late"] or len(r["backends"]) != 1 or r["answers"] < 15]
    assert not bad, bad[:5]
    # new connections succeed: in tun mode a retried SYN passes the filter, and then meets only
    # the guard's odds (1 / HEADROOM) - 100% in every run so far, the floor is generous; in
    # rawsock mode every try meets the guard's lottery among the flood (78-100% so far)
    floor = 0.7 if mode == "tun" else 0.25
    assert len(new) >= 50 and share_new >= floor, (len(new), share_new)
    if mode == "rawsock":
        assert during["shed"] is None and after["shed"] is None
        return
    # the filter acted during the flood, and it is visible where operators look
    assert sh_during["active"] and sh_during["since"] is not None, sh_during
    assert "SYN shed filter before the TUN queue: shedding" in during_text, during_text
    # it saw the flood, and dropped at least half of what came beyond 1.5 x new_flow_rate
    # (it aims at 1.2 x; the first tick comes up to 0.2 s late)
    excess = web["syns"] - 1.5 * NEW_FLOW_RATE * fl["elapsed"]
    assert web["syns"] >= fl["sent"] * 0.9 and web["shed"] >= 0.5 * excess, (web, excess)
    assert not sh_after["active"] and web["share"] == 0.0, sh_after
    assert _metric(metrics, "lbcore_shed_packets_total", address=VIP4, port="80") == web["shed"]
    assert _metric(metrics, "lbcore_shed_share", address=VIP4, port="80") == 0.0
    assert _metric(metrics, "lbcore_shed_active") == 0.0


UDP_RATE = 2000                 # the dns VIP's guard in the UDP flood test: new flows/s

# HELD UDP flows (a socket each, connected to the VIP), each asking once every 0.5 s until
# stdin closes and waiting up to 3 s for the answer; "ready" once every flow got its first
# answer; at the end one JSON line: per flow answers, lost, slowest, backends.
UDP_HOLDER = r"""
import json, socket, sys, threading, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
res = [{"answers": 0, "lost": 0, "slowest": 0.0, "backends": []} for _ in range(n)]
socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3.0)
    s.connect((addr, port))
    socks.append(s)
def ask(i):
    t = time.monotonic()
    socks[i].send(b"held %d" % i)
    r = res[i]
    try:
        b = socks[i].recv(2048).decode().strip()
    except OSError:
        r["lost"] += 1
        return
    r["answers"] += 1
    r["slowest"] = max(r["slowest"], time.monotonic() - t)
    if b not in r["backends"]:
        r["backends"].append(b)
for i in range(n):
    for _ in range(5):
        ask(i)
        if res[i]["answers"]:
            break
    res[i]["lost"] = 0
def loop(i):
    while not stop.wait(0.5):
        ask(i)
ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
for t in ts:
    t.start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
for t in ts:
    t.join(30)
print(json.dumps(res), flush=True)
"""

# A new UDP flow (a new socket: one question, 1 s for the answer, up to 3 tries) started
# every 0.1 s for `seconds`; one JSON line: per flow [answered, seconds].
UDP_NEW = r"""
import json, socket, sys, threading, time
addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = []
def one():
    t = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.connect((addr, port))
        for _ in range(3):
            s.send(b"new")
            try:
                s.recv(2048)
                out.append([True, time.monotonic() - t])
                return
            except OSError:
                pass
    out.append([False, time.monotonic() - t])
ts = []
t0 = time.monotonic()
while time.monotonic() - t0 < seconds and len(ts) < 10 * seconds + 10:
    th = threading.Thread(target=one)
    th.start()
    ts.append(th)
    time.sleep(0.1)
for th in ts:
    th.join(10)
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("mode", ["tun", "rawsock"])
def test_udp_flood_keeps_answered_flows_going(tmp_path, mode):
    """While the sender floods the dns VIP with spoofed datagrams as fast as it can for 10 s
    (flow table 4096, new_flow_rate 2000): every one of 20 UDP flows the backends answer keeps
    getting its answers, and (mode tun) the shed filter drops the flood before the TUN queue
    while letting the answered flows' datagrams through. New UDP flows opened during the
    flood are reported, not asserted: their first datagram cannot be told from the flood's."""
    exe = _build_synflood(tmp_path)
    port = lab_mod.UDP_PORT
    spec = lab_mod.LabSpec(backends=3, mode=mode,
                           global_extra=("flow_table_size = 4096",),
                           vip_extra=(f"new_flow_rate = {UDP_RATE}",))
    with lab_mod.lease(spec):
        netconf.route_add("198.18.128.0/17", gateway=lab_mod.CLIENT_V4, netns=lab_mod.GW_NS)
        with _proc(lab_mod.CLIENT_NS, [sys.executable, "-c", UDP_HOLDER, VIP4, str(port),
                                       str(HELD)], stdin=subprocess.PIPE) as holder:
            line = holder.stdout.readline()
            assert line.strip() == "ready", (line, holder.stderr.read()
                                             if holder.poll() is not None else "")
            with _proc(lab_mod.CLIENT_NS, [*_pin_cpu0(), str(exe), "-u", "-d", VIP4, "-p",
                                           str(port), "-n", "20000000", "-t",
                                           str(FLOOD_SECONDS)]) as flood, \
                    _proc(lab_mod.CLIENT_NS, [sys.executable, "-c", UDP_NEW, VIP4, str(port),
                                              str(FLOOD_SECONDS - 1)]) as newc:
                time.sleep(FLOOD_SECONDS / 2)
                during = _control({"cmd": "status"})
                fout, ferr = flood.communicate(timeout=FLOOD_SECONDS + 30)
                assert flood.returncode == 0, ferr
                nout, nerr = newc.communicate(timeout=60)
                assert newc.returncode == 0, nerr
            time.sleep(1.5)
            after = _control({"cmd": "status"})
            metrics = _metrics()
            holder.stdin.close()
            hout = holder.stdout.read()
            holder.wait(timeout=60)
            assert holder.returncode == 0, holder.stderr.read()
        held = json.loads(hout.strip().splitlines()[-1])
        fl = json.loads(fout.strip().splitlines()[-1])
        new = json.loads(nout.strip().splitlines()[-1])

    ok = [t for good, t in new if good]
    answers, lost = sum(r["answers"] for r in held), sum(r["lost"] for r in held)
    print(f"\nUDP flood ({mode}): {fl['sent']} datagrams in {fl['elapsed']:.1f} s = "
          f"{fl['pps']:.0f}/s (send errors {fl['errors']})")
    print(f"held: {HELD} flows, {answers} answers, {lost} lost, slowest "
          f"{max(r['slowest'] for r in held):.3f} s")
    print(f"new UDP flows during the flood: {len(ok)} of {len(new)} answered")
    dns = None
    if during["shed"] is not None:
        dns = next(v for v in after["shed"]["vips"] if v["port"] == port)
        print(f"shed: during active {during['shed']['active']}; dns VIP new datagrams "
              f"{dns['syns']}, shed {dns['shed']}, passed as answered flows {dns['retried']}, "
              f"tun_dropped {after['shed']['tun_dropped']}")
    print(f"data plane: refused {next(v for v in after['vips'] if v['port'] == port)['refused']}"
          f", drops {after['drops']}")

    assert fl["sent"] >= 500_000, fl
    # every answered flow kept its backend and its answers: at most one lost in a flow (a
    # datagram has no retransmission; one can go anywhere on a loaded 2-core machine)
    bad = [(i, r) for i, r in enumerate(held)
           if len(r["backends"]) != 1 or r["answers"] < 15 or r["lost"] > 1]
    assert not bad, bad[:5]
    assert lost <= 3, held
    if mode == "rawsock":
        assert during["shed"] is None
        return
    assert dns is not None and during["shed"]["active"], during["shed"]
    # the filter saw the flood as new flows and dropped most of what came beyond the guard;
    # the held flows' datagrams passed as answered ones
    excess = dns["syns"] - 1.5 * UDP_RATE * fl["elapsed"]
    assert dns["syns"] >= fl["sent"] * 0.9 and dns["shed"] >= 0.5 * excess, (dns, excess)
    assert dns["retried"] >= HELD * 5, dns
    assert _metric(metrics, "lbcore_shed_packets_total", address=VIP4,
                   port=str(port)) == dns["shed"]
