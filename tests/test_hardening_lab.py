"""Hostile conditions on the namespace lab: restarts and crashes under held connections, a
spoofed UDP flood against a small flow table, one-shot queries from clients the gateway has
never seen (rawsock). Each test leases its own lab, and every process it starts is stopped
by its PID, also when the test fails."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lbcore import lab as lab_mod
from lbcore import netconf
from lbcore.control import request
from lbcore.lab import child_env
from lbcore.lab.ns import udp_requests

pytestmark = pytest.mark.netns

VIP4, VIP6 = lab_mod.VIP_V4, lab_mod.VIP_V6

# 30 keep-alive HTTP connections to the VIP, each asking again every 0.1 s until stdin closes;
# a request waits up to 60 s for its answer (TCP retransmits through a restart). Prints
# "ready" once every connection got its first answer; when stdin closes each connection asks
# once more, then one JSON line holds per connection: answers, the backends that gave them,
# whether the last request was answered, the errors.
HOLDER = r"""
import json, socket, sys, threading, time
from lbcore.lab.traffic import read_response
addr, n = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
res = [{"ok": 0, "backends": [], "errors": []} for _ in range(n)]
socks = []
for i in range(n):
    s = socket.create_connection((addr, 80), timeout=30)
    s.settimeout(60)
    socks.append(s)
def ask(i, buf=b""):
    socks[i].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body, buf, _ = read_response(socks[i], buf)
    r = res[i]
    r["ok"] += status == 200
    b = body.decode().strip()
    if b not in r["backends"]:
        r["backends"].append(b)
    return buf
bufs = [ask(i) for i in range(n)]
def loop(i):
    buf = bufs[i]
    try:
        while not stop.is_set():
            buf = ask(i, buf)
            stop.wait(0.1)
        before = res[i]["ok"]
        ask(i, buf)                  # one more once told to stop: the connection still works
        res[i]["final"] = res[i]["ok"] > before
    except Exception as e:
        res[i]["errors"].append(f"{type(e).__name__}: {e}")
ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
for t in ts:
    t.start()
print("ready", flush=True)
sys.stdin.read()
stop.set()
for t in ts:
    t.join(90)
print(json.dumps(res), flush=True)
"""


@contextmanager
def held_connections(addr: str, n: int = 30) -> Iterator[subprocess.Popen]:
    """The HOLDER client in lbc-client; stopped by its PID whatever happens."""
    p = netconf.popen_in_netns(lab_mod.CLIENT_NS, [sys.executable, "-c", HOLDER, addr, str(n)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        line = p.stdout.readline()
        assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
        yield p
    finally:
        if p.poll() is None and not p.stdin.closed:
            p.stdin.close()
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            f.close()


def finish(p: subprocess.Popen) -> list[dict]:
    """Stop the holder; its per-connection results."""
    p.stdin.close()
    out = p.stdout.read()
    p.wait(timeout=120)
    assert p.returncode == 0, p.stderr.read()
    return json.loads(out.strip().splitlines()[-1])


def assert_all_kept(res: list[dict]) -> None:
    """No connection failed or moved, and each answered a request made after everything."""
    bad = [(i, r) for i, r in enumerate(res)
           if r["errors"] or len(r["backends"]) != 1 or not r.get("final")]
    assert not bad, bad[:5]


def test_restarts_and_crashes_reset_no_held_connection():
    """5 SIGTERM and 5 SIGKILL restarts of the balancer with the same config while 30
    keep-alive connections keep asking: no connection is reset or moved. In each gap the
    reply path's reservation drops the backends' (retransmitted) replies instead of letting
    them leave un-translated, and the VIP's packets instead of answering them with ICMP."""
    with lab_mod.lease(backends=3) as _:
        with held_connections(VIP4) as p:
            for i in range(10):
                sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
                lab_mod.restart_balancer(kill_signal=sig)
                time.sleep(1.0)
            res = finish(p)
        assert_all_kept(res)
        # the reservation is in place while the balancer runs, as it was after each stop
        rules = [r for r in netconf.rules(lab_mod.GW_NS) if r.priority == 4242]
        assert rules and len(rules) == len({(r.src, r.ipproto, r.sport) for r in rules})
        assert [r for r in netconf.routes(lab_mod.GW_NS, table=4242) if r.proto == 0xF4]


# --------------------------------------------------------------------------- the flood

FLOODER = r"""
import json, random, socket, struct, sys, time
vip, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
# spoofed sources on the client link's subnet (the gateway's reverse-path check passes them);
# .1 is the gateway, .2 the real client
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
dst = socket.inet_aton(vip)
rng = random.Random(7)
sent, t0 = 0, time.monotonic()
while sent < n:
    el = time.monotonic() - t0
    if el > seconds + 5:
        break
    if sent > n * el / seconds + 256:   # paced to n in `seconds`
        time.sleep(0.002)
        continue
    src = bytes([198, 18, 0, rng.randint(3, 254)])
    udp = struct.pack("!HHHH", rng.randint(1024, 65535), port, 12, 0) + b"spof"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    try:
        s.sendto(ip + udp, (vip, 0))
        sent += 1
    except OSError:
        time.sleep(0.001)
print(json.dumps({"sent": sent, "seconds": time.monotonic() - t0}), flush=True)
"""


def _web_pool_without_be3(text: str) -> str:
    """The lab's config with backend 3 left out of pool "web" (a reload adds it)."""
    head, sep, rest = text.partition("[pool.web]")
    body, sep2, tail = rest.partition("[pool.web.health]")
    body = re.sub(r'.*"198\.19\.0\.13", port = 80.*\n', "", body)
    return head + sep + body + sep2 + tail


def _control(req: dict, timeout: float = 60) -> object:
    return netconf.run_in_netns(lab_mod.GW_NS, request,
                                str(lab_mod.paths()["control_socket"]), req, timeout)


def test_spoofed_udp_flood_leaves_tcp_tracked_and_reloads_harmless(tmp_path):
    """100k spoofed datagrams in 5 s that the backends answer, against a 4096-flow table:
    answered UDP gives way, the 30 TCP connections opened during the flood are tracked, and a
    reload that adds a backend (during the flood) and one that re-weights (after it) move
    none of them."""
    spec0 = lab_mod.LabSpec(backends=3)
    cfg = tmp_path / "lbcore.toml"
    text = lab_mod.render_config(spec0).replace("[global]\n",
                                                "[global]\nflow_table_size = 4096\n", 1)
    cfg.write_text(_web_pool_without_be3(text))
    argv = (sys.executable, "-m", "lbcore", "run", "-c", str(cfg))
    with lab_mod.lease(lab_mod.LabSpec(backends=3, balancer_argv=argv)):
        flood = netconf.popen_in_netns(
            lab_mod.CLIENT_NS, [sys.executable, "-c", FLOODER, VIP4, str(lab_mod.UDP_PORT),
                                "100000", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            time.sleep(1.5)                          # the table is full of answered UDP by now
            with held_connections(VIP4) as p:
                # during the flood: a reload adds backend 3 to the pool
                cfg.write_text(text)
                r = _control({"cmd": "reload"})
                assert any("198.19.0.13" in c for c in r["changes"]), r
                out, err = flood.communicate(timeout=60)
                sent = json.loads(out.strip().splitlines()[-1])["sent"]
                st = _control({"cmd": "status"})
                # after it: a reload that re-weights
                cfg.write_text(text.replace('{ address = "198.19.0.11", port = 80, weight = 1 }',
                                            '{ address = "198.19.0.11", port = 80, weight = 3 }'))
                r2 = _control({"cmd": "reload"})
                assert r2["changes"], r2
                time.sleep(1.0)
                mine = _control({"cmd": "flows", "vip": f"{VIP4}:80", "limit": 10000})
                res = finish(p)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        assert sent == 100_000
        f = st["flows"]
        print(f"flood: {sent} datagrams; flow table {f}")
        assert f["capacity"] < 8192 and f["inserted"] > 20_000, f
        assert f["evicted_udp"] > 10_000, f
        assert_all_kept(res)
        tracked = [x for x in mine if x["client"] == lab_mod.CLIENT_V4]
        assert len(tracked) >= 30, (len(tracked), f)


# --------------------------------------------------------------------------- rawsock

ONE_SHOT = r"""
import json, socket, sys
src, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.bind((src, 0))
s.sendto(b"one-shot", (vip, port))
try:
    print(json.dumps(s.recv(2048).decode().strip()))
except OSError as e:
    print(json.dumps(None))
"""


def _one_shot(src: str, vip: str) -> str | None:
    """One datagram from ``src`` in lbc-client (a fresh socket); the answer or None."""
    p = netconf.popen_in_netns(lab_mod.CLIENT_NS, [sys.executable, "-c", ONE_SHOT, src, vip,
                                                   str(lab_mod.UDP_PORT)],
                               stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("family", [4, 6])
def test_rawsock_answers_a_one_shot_query_from_a_new_client(family):
    """A client address the gateway has never heard of sends one UDP datagram: the reply
    waits in the hold queue while the kernel resolves the client, and reaches it, instead of
    being dropped as no_neigh (4 of 4 such queries used to go unanswered)."""
    vip = VIP4 if family == 4 else VIP6
    with lab_mod.lease(backends=2, mode="rawsock", ipv6=True):
        assert udp_requests(lab_mod.CLIENT_NS, vip, n=2)["ok"] == 2   # the client knows the gw
        for i in range(4):
            src = f"198.18.0.{70 + i}" if family == 4 else f"2001:db8::{70 + i:x}"
            netconf.addr_add(lab_mod.CLIENT_IF, f"{src}/{24 if family == 4 else 64}",
                             netns=lab_mod.CLIENT_NS)
            known = [n for n in netconf.neighbours(lab_mod.GW_NS, lab_mod.GW_CLIENT_IF)
                     if n[1] == src and n[2]]
            assert not known, known      # a new client: the gateway has no MAC for it
            got = _one_shot(src, vip)
            assert got, f"no answer to the one-shot query from {src}"
        drops = _control({"cmd": "status"})["drops"]
        assert drops["no_neigh"] == 0 and drops["hold_timeout"] == 0, drops
