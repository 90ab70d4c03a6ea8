"""End to end, the traffic a rack carries besides plain flows: ping of a VIP, closed ports
answered (closed_port = "reject"), UDP datagrams larger than the MTU (fragments, in order and
in reverse order), and a fragment flood, in the namespace lab, once per forwarding mode."""
from __future__ import annotations

import pytest

from lbcore import lab as lab_mod
from lbcore.control import request
from lbcore.lab.ns import ns_python, ns_run

pytestmark = pytest.mark.netns

VIP4, VIP6 = lab_mod.VIP_V4, lab_mod.VIP_V6
DIGEST = lab_mod.DIGEST_PORT


@pytest.fixture(scope="module", params=["tun", "rawsock"])
def lab(request):
    with lab_mod.lease(backends=3, ipv6=True, mode=request.param, digest=True,
                       global_extra=('closed_port = "reject"',)) as state:
        yield state


def status() -> dict:
    return request(str(lab_mod.paths()["control_socket"]), {"cmd": "status"})


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_ping_of_the_vip_answers(lab, vip):
    r = ns_run("lbc-client", ["ping", "-c", "3", "-i", "0.2", "-W", "3", vip], timeout=30,
               check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0% packet loss" in r.stdout


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_closed_ports_are_refused(lab, vip):
    out = ns_python("lbc-client", f"""
import json, socket
fam = socket.AF_INET6 if ":" in {vip!r} else socket.AF_INET
res = []
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(({vip!r}, 81))
    res.append("connected")
except ConnectionRefusedError:
    res.append("refused")
except OSError as e:
    res.append(repr(e))
u = socket.socket(fam, socket.SOCK_DGRAM)
u.settimeout(5)
u.connect(({vip!r}, 5399))
u.send(b"x")
try:
    u.recv(100)
    res.append("answered")
except ConnectionRefusedError:
    res.append("refused")
except OSError as e:
    res.append(repr(e))
print(json.dumps(",".join(res)))
""", timeout=30)
    assert out == "refused,refused", out




@pytest.mark.parametrize("vip,size", [(VIP4, 3000), (VIP4, 8000), (VIP6, 3000), (VIP6, 1472)],
                         ids=["ipv4-3000", "ipv4-8000", "ipv6-3000", "ipv6-1472"])
def test_large_udp_datagrams_arrive_whole(lab, vip, size):
    out = ns_python("lbc-client", f"""
import hashlib, socket
fam = socket.AF_INET6 if ":" in {vip!r} else socket.AF_INET
ok = 0
for i in range(20):
    data = bytes((i + j) % 251 for j in range({size}))
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.connect(({vip!r}, {DIGEST}))
    u.send(data)
    try:
        name, n, digest = u.recv(200).split()
    except OSError:
        continue
    ok += int(n) == len(data) and digest.decode() == hashlib.sha256(data).hexdigest()
print(ok)
""", timeout=120)
    assert out >= 19, out      # one loss tolerated: UDP on a busy shared box
    assert status()["fragments"]["first"] >= 19


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_fragments_in_reverse_order_are_held_and_arrive_whole(lab, vip):
    out = ns_python("lbc-client", f"""
import hashlib, socket
from scapy.all import IP, IPv6, IPv6ExtHdrFragment, UDP, conf, fragment, fragment6, send
conf.verb = 0
v6 = ":" in {vip!r}
fam = socket.AF_INET6 if v6 else socket.AF_INET
src = "2001:db8::2" if v6 else "198.18.0.2"
ok = 0
for i in range(10):
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((src, 0))
    u.settimeout(3)
    sport = u.getsockname()[1]
    data = bytes((i * 7 + j) % 256 for j in range(3000))
    if v6:
        frags = fragment6(IPv6(src=src, dst={vip!r}) / IPv6ExtHdrFragment(id=1000 + i)
                          / UDP(sport=sport, dport={DIGEST}) / data, 1280)
    else:
        frags = fragment(IP(src=src, dst={vip!r}, id=1000 + i)
                         / UDP(sport=sport, dport={DIGEST}) / data, fragsize=1200)
    for f in reversed(frags):
        send(f)
    try:
        name, n, digest = u.recv(200).split()
    except OSError:
        continue
    ok += int(n) == len(data) and digest.decode() == hashlib.sha256(data).hexdigest()
print(ok)
""", timeout=180)
    assert out >= 9, out
    fr = status()["fragments"]
    assert fr["held"] >= 9 and fr["released"] >= 9, fr


@pytest.mark.parametrize("vip,size", [(VIP4, 3000), (VIP4, 8000), (VIP6, 3000)],
                         ids=["ipv4-3000", "ipv4-8000", "ipv6-3000"])
def test_fragmented_replies_come_back_whole_and_translated(lab, vip, size):
    # the digest service echoes an ECHO datagram whole: the backend fragments its reply; a
    # capture on the client's link counts every frame from a backend's own address (an
    # un-translated reply fragment), which must never leave the gateway
    out = ns_python("lbc-client", f"""
import json, select, socket, time
fam = socket.AF_INET6 if ":" in {vip!r} else socket.AF_INET
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
def leaked():
    n = 0
    while select.select([cap], [], [], 0)[0]:
        d = cap.recv(70000)
        et = d[12:14]
        if et == b"\\x08\\x00" and d[26:29] == bytes([198, 19, 0]):
            n += 1
        elif et == b"\\x86\\xdd" and d[22:28] == bytes.fromhex("20010db80001"):
            n += 1
    return n
ok = bad = 0
for i in range({size} and 20):
    data = b"ECHO\\n" + bytes((i + j) % 251 for j in range({size} - 5))
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.connect(({vip!r}, {DIGEST}))
    u.send(data)
    try:
        ok += u.recv(70000) == data
    except OSError:
        pass
    bad += leaked()
time.sleep(0.5)
bad += leaked()
print(json.dumps([ok, bad]))
""", timeout=120)
    ok, leaked = out
    assert leaked == 0, out
    assert ok >= 19, out       # one loss tolerated: UDP on a busy shared box


def test_fragment_flood_is_bounded_and_forwarding_goes_on(lab):
    before = status()["fragments"]
    out = ns_python("lbc-client", f"""
import random, socket, struct, time
# 20000 later fragments with random IDs (no first fragment ever comes), from spoofed sources
# in 198.18.128.0/17, through a raw socket: bounded in count and time
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
vip = socket.inet_aton({VIP4!r})
payload = bytes(512)
t0 = time.monotonic()
sent = 0
for i in range(20000):
    if time.monotonic() - t0 > 30:
        break
    src = struct.pack("!I", (198 << 24) | (18 << 16) | 0x8000 | random.getrandbits(15))
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), random.getrandbits(16),
                      0x2000 | random.randint(1, 100), 64, 17, 0, src, vip)
    try:
        s.sendto(hdr + payload, ({VIP4!r}, 0))
        sent += 1
    except OSError:
        pass
print(sent)
""", timeout=120)
    assert out > 1000, out
    fr = status()["fragments"]
    assert fr["memory"] == before["memory"]                      # nothing grows
    assert fr["buffers"] <= fr["buffer_capacity"]
    assert fr["entries"] <= fr["capacity"]
    assert fr["held"] + fr["early_dropped"] > before["held"] + before["early_dropped"]
    # forwarding goes on
    r = ns_python("lbc-client", f"""
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.connect(({VIP4!r}, {DIGEST}))
u.send(bytes(300))
print(u.recv(200).split()[1].decode())
""", timeout=30)
    assert r == 300


# A backend's TCP reply, fragmented by the backend (DF off; IPv6: a Fragment header): the
# backend's kernel never does that for TCP, so a script in every backend namespace watches for
# the client's marker segment on an established connection to the VIP and answers it, from the
# backend that got the flow, with a 3000-byte segment cut in fragments (scapy), in the
# connection's own sequence space. The client must read those bytes whole, from the VIP.
FRAG_TCP_SENDER = r"""
import json, select, socket, struct, sys, time
from scapy.all import IP, IPv6, IPv6ExtHdrFragment, TCP, conf, fragment, fragment6, send
conf.verb = 0
marker, size, deadline = sys.argv[1].encode(), int(sys.argv[2]), time.monotonic() + 40
cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
print("ready", flush=True)
sent = 0
while time.monotonic() < deadline and not sent:
    if not select.select([cap], [], [], 0.2)[0]:
        continue
    d, addr = cap.recvfrom(70000)
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    et = d[12:14]
    if et == b"\x08\x00" and d[23] == 6:
        ihl = (d[14] & 15) * 4
        src, dst, l4 = socket.inet_ntop(socket.AF_INET, d[26:30]), \
            socket.inet_ntop(socket.AF_INET, d[30:34]), 14 + ihl
        end = 14 + struct.unpack("!H", d[16:18])[0]
    elif et == b"\x86\xdd" and d[20] == 6:
        src, dst, l4 = socket.inet_ntop(socket.AF_INET6, d[22:38]), \
            socket.inet_ntop(socket.AF_INET6, d[38:54]), 54
        end = 54 + struct.unpack("!H", d[18:20])[0]
    else:
        continue
    sport, dport, seq, ack = struct.unpack("!HHII", d[l4:l4 + 12])
    payload = d[l4 + (d[l4 + 12] >> 4) * 4:end]
    if dport != 80 or payload != marker:
        continue
    data = bytes(i % 251 for i in range(size))
    seg = TCP(sport=80, dport=sport, seq=ack, ack=seq + len(payload), flags="PA") / data
    if ":" in src:
        frags = fragment6(IPv6(src=dst, dst=src) / IPv6ExtHdrFragment(id=4242) / seg, 1280)
    else:
        frags = fragment(IP(src=dst, dst=src, flags=0, id=4242) / seg, fragsize=1200)
    for f in frags:
        send(f)
    sent = len(frags)
print(json.dumps(sent))
"""


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_fragmented_tcp_reply_comes_back_whole_and_translated(lab, vip):
    if vip == VIP4 and lab.spec.mode == "tun" and _strict_rp_filter():
        pytest.skip("conf/all/rp_filter is 1 in the gateway: no port-less IPv4 TCP rule")
    _fragmented_tcp_reply(lab, vip)


def _strict_rp_filter() -> bool:
    from lbcore import netconf
    return netconf.sysctl_get("net/ipv4/conf/all/rp_filter", netns=lab_mod.GW_NS) == "1"


def _fragmented_tcp_reply(lab, vip: str) -> None:
    import subprocess
    import sys

    from lbcore import netconf
    from lbcore.lab import child_env

    marker, size = "FRAGTCP-" + vip, 3000
    senders = [netconf.popen_in_netns(ns, [sys.executable, "-c", FRAG_TCP_SENDER, marker,
                                           str(size)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=child_env())
               for ns in (lab_mod.backend_ns(i) for i in range(1, lab.spec.backends + 1))]
    try:
        # every capture socket is open (importing scapy takes seconds on a busy machine)
        ready = [p.stdout.readline().strip() for p in senders]
        assert ready == ["ready"] * len(senders), ready
        out = ns_python("lbc-client", f"""
import json, socket, time
fam = socket.AF_INET6 if ":" in {vip!r} else socket.AF_INET
s = socket.create_connection(({vip!r}, 80), timeout=10)
s.sendall({marker!r}.encode())
got = b""
end = time.monotonic() + 15
while len(got) < {size} and time.monotonic() < end:
    try:
        b = s.recv(65536)
    except socket.timeout:
        break
    if not b:
        break
    got += b
print(json.dumps([len(got), got == bytes(i % 251 for i in range({size})), s.getpeername()[0]]))
""", timeout=60)
    finally:
        results = []
        for p in senders:
            try:
                o, e = p.communicate(timeout=45)
            except subprocess.TimeoutExpired:
                p.kill()
                o, e = p.communicate()
            results.append((p.returncode, o.strip(), e[-500:]))
    sent = [int(o.splitlines()[-1]) for rc, o, e in results if rc == 0 and o]
    assert sum(1 for n in sent if n) == 1, results        # one backend had the flow
    assert max(sent) >= 3, results                         # and cut its segment in fragments
    n, same, peer = out
    assert n == size and same, out
    assert peer == vip


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_backends_own_traffic_through_the_gateway_passes(lab, family):
    # a backend's TCP and UDP (a large, fragmented datagram too) to a client-side address, no
    # reply of any flow: the port-less reply rules bring it to the data plane, which passes it
    # (counted "passed": mode tun hands it back to the kernel through the TUN, mode rawsock
    # forwards it itself); the answers come back the normal way
    if family == "ipv4" and lab.spec.mode == "tun" and _strict_rp_filter():
        pytest.skip("conf/all/rp_filter is 1 in the gateway: no IPv4 pass-through there")
    _own_traffic(lab, family)


def _own_traffic(lab, family: str) -> None:
    v6 = family == "ipv6"
    client = lab_mod.CLIENT_V6 if v6 else lab_mod.CLIENT_V4
    before = status()["totals"].get("passed", 0)
    server = netconf_popen("lbc-client", f"""
import json, socket, threading
fam = socket.AF_INET6 if {v6!r} else socket.AF_INET
t = socket.socket(fam, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(({client!r}, 7070)); t.listen(4); t.settimeout(30)
u = socket.socket(fam, socket.SOCK_DGRAM)
u.bind(({client!r}, 7071)); u.settimeout(30)
print("ready", flush=True)
c, _ = t.accept()
c.settimeout(10)
c.sendall(c.recv(100)[::-1])
d, a = u.recvfrom(70000)
u.sendto(str(len(d)).encode(), a)
d, a = u.recvfrom(70000)
u.sendto(str(len(d)).encode(), a)
c.close()
""")
    try:
        assert server.stdout.readline().strip() == "ready"
        out = ns_python(lab_mod.backend_ns(1), f"""
import json, socket
fam = socket.AF_INET6 if {v6!r} else socket.AF_INET
res = []
s = socket.create_connection(({client!r}, 7070), timeout=10)
s.sendall(b"hello")
res.append(s.recv(100).decode())
for size in (100, 3000):
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.connect(({client!r}, 7071))
    for _ in range(3):
        u.send(bytes(size))
        try:
            res.append(int(u.recv(100)))
            break
        except OSError:
            pass
    else:
        res.append("lost")
print(json.dumps(res))
""", timeout=60)
    finally:
        try:
            server.communicate(timeout=30)
        except Exception:  # noqa: BLE001 - the test's own server, by its PID
            server.kill()
            server.communicate()
    assert out == ["olleh", 100, 3000], out
    # the SYN, data, FIN of the TCP side, the datagrams and their fragments
    assert status()["totals"]["passed"] - before >= 6
    from lbcore import netconf
    from lbcore.dataplane import replies

    fam = 10 if v6 else 2
    rules = netconf.rules(lab_mod.GW_NS, family=fam)
    # mode tun: the pass rule leads what the TUN hands back to the main table; mode rawsock
    # has none (nothing is handed back to the kernel)
    assert [r.iif for r in rules if r.priority == replies.PASS_PRIORITY
            and r.table == replies.MAIN_TABLE] == (
                [lab_mod.TUN_NAME] if lab.spec.mode == "tun" else []), rules
    for proto in (6, 17):                       # the port-less TCP and UDP rules
        assert any(r.priority == replies.RULE_PRIORITY and r.ipproto == proto and not r.sport
                   for r in rules), rules


def netconf_popen(ns: str, code: str):
    """``python -c code`` in ``ns``, stdout a pipe (lines), the caller ends it."""
    import subprocess
    import sys

    from lbcore import netconf
    from lbcore.lab import child_env

    return netconf.popen_in_netns(ns, [sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=child_env())


def test_with_loose_rp_filter_a_backends_own_traffic_and_fragmented_replies_pass(lab):
    """With net.ipv4.conf.all.rp_filter = 2 (loose, the systemd default on many distributions)
    at start, the kernel checks the reverse path of what leaves the TUN: lbcore makes the
    TUN's check loose and gives it an address, so a backend's own IPv4 traffic (passed back
    through the TUN) and a fragmented IPv4 TCP reply still get through."""
    if lab.spec.mode != "tun":
        pytest.skip("only mode tun hands packets to the kernel's forwarding path")
    from lbcore import netconf

    key = "net/ipv4/conf/all/rp_filter"
    old = netconf.sysctl_get(key, netns=lab_mod.GW_NS)
    netconf.sysctl_set(key, 2, netns=lab_mod.GW_NS)
    try:
        lab_mod.restart_balancer()
        tun = lab_mod.TUN_NAME
        assert netconf.sysctl_get(f"net/ipv4/conf/{tun}/rp_filter", netns=lab_mod.GW_NS) == "2"
        assert (tun, "192.0.0.8/32") in netconf.addresses(lab_mod.GW_NS, tun)
        _own_traffic(lab, "ipv4")
        _fragmented_tcp_reply(lab, VIP4)
    finally:
        netconf.sysctl_set(key, old, netns=lab_mod.GW_NS)
        lab_mod.restart_balancer()
