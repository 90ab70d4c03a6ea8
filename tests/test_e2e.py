"""End to end: real packets from lbc-client through the balancer in lbc-gw to
the backends, in the namespace lab (its names and addresses are a contract),
once per forwarding mode: tun, and rawsock (AF_PACKET)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from lbcore import lab as lab_mod
from lbcore import netconf
from lbcore.control import request
from lbcore.lab.ns import (
    bulk_sink,
    bulk_source,
    http_requests,
    ns_call,
    ns_python,
    udp_requests,
)

pytestmark = pytest.mark.netns

VIP4, VIP6 = lab_mod.VIP_V4, lab_mod.VIP_V6
CLIENT4 = "198.18.0.2"
N = 3


@pytest.fixture(scope="module", params=["tun", "rawsock"])
def lab(request):
    with lab_mod.lease(backends=N, ipv6=True, mode=request.param) as state:
        yield state


def ctl(cmd: dict):
    return request(str(lab_mod.paths()["control_socket"]), cmd)


# Client ports are fixed in the spread tests: Maglev and the selection hash
# are deterministic (the lab's hash_seed is fixed), so the shares are a
# property of the balancer, not of which ephemeral ports the kernel drew.
FIRST_SPORT = 20000


def share_ok(counts: dict, total: int, n: int) -> bool:
    return len(counts) == n and all(abs(c - total / n) <= 0.25 * total / n
                                    for c in counts.values())


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_300_http_requests_on_new_connections_spread_evenly(lab, vip):
    r = http_requests("lbc-client", vip, n=300, first_sport=FIRST_SPORT)
    assert r["ok"] == 300 and r["errors"] == 0, r["error_samples"]
    assert share_ok(r["counts"], 300, N), r["counts"]


@pytest.mark.parametrize("vip", [VIP4, VIP6], ids=["ipv4", "ipv6"])
def test_udp_request_response_spread(lab, vip):
    r = udp_requests("lbc-client", vip, n=300, first_sport=FIRST_SPORT)
    assert r["ok"] == 300, r
    assert share_ok(r["counts"], 300, N), r["counts"]


def test_one_connection_stays_on_one_backend_for_seconds(lab):
    """Keep-alive requests on one connection for 3 s (data both ways), then
    three shorter ones: each is answered by one backend throughout."""
    code = f"""
import json, socket, time
out = []
for c in range(4):
    s = socket.create_connection(("{VIP4}", 80), timeout=5)
    names = set(); n = 0; t0 = time.monotonic()
    while time.monotonic() - t0 < (3.0 if c == 0 else 0.5) and n < 1000:
        s.sendall(b"GET /x HTTP/1.1\\r\\nHost: vip\\r\\n\\r\\n")
        buf = b""
        while b"\\r\\n\\r\\n" not in buf or not buf.endswith(b"\\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        names.add(buf.split(b"\\r\\n\\r\\n", 1)[1].strip().decode())
        n += 1
        time.sleep(0.01)
    s.close()
    out.append([n, sorted(names)])
print(json.dumps(out))
"""
    res = ns_python("lbc-client", code, timeout=60)
    for n, names in res:
        assert n >= 20 and len(names) == 1, res


def test_bulk_100MB_both_ways_arrives_intact(lab):
    up = bulk_sink("lbc-client", VIP4, 100_000_000)
    assert up["ok"] and up["count"] == 100_000_000 and up["sha256"] == up["server_sha256"]
    down = bulk_source("lbc-client", VIP4, 100_000_000)
    assert down["ok"] and down["received"] == 100_000_000


CAPTURE = """
import json, sys, threading, time
from scapy.all import AsyncSniffer
from scapy.layers.inet import IP, TCP, UDP
sn = AsyncSniffer(iface="{iface}", store=True,
                  lfilter=lambda p: IP in p and (TCP in p and 30000 <= p[TCP].sport < 30030
                                                 or UDP in p and 31000 <= p[UDP].sport < 31030))
sn.start()
time.sleep(0.5)
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.5)
pk = sn.stop()
print(json.dumps([bytes(p[IP]).hex() for p in pk]))
"""

SEND = """
from scapy.all import send
from scapy.layers.inet import IP, TCP, UDP
pk = [IP(src="198.18.0.2", dst="{vip}") / TCP(sport=30000 + i, dport=80, flags="S", seq=i)
      for i in range(30)]
pk += [IP(src="198.18.0.2", dst="{vip}") / UDP(sport=31000 + i, dport=5300) / b"q"
       for i in range(30)]
send(pk, verbose=False)
print(len(pk))
"""


def test_capture_at_backends_shows_client_address_and_valid_checksums(lab):
    """scapy sends fully checksummed SYNs and datagrams from lbc-client; a
    capture in each backend namespace sees the client's real address, its
    own address as destination, and checksums that scapy recomputes alike."""
    env_py = [sys.executable, "-c"]
    sniffers = []
    for i in range(1, N + 1):
        code = CAPTURE.format(iface=lab_mod.backend_if(i))
        p = netconf.popen_in_netns(lab_mod.backend_ns(i), env_py + [code],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        sniffers.append((i, p))
    try:
        for _, p in sniffers:
            assert p.stdout.readline().strip() == "ready"
        assert ns_python("lbc-client", SEND.format(vip=VIP4), timeout=60) == 60
        syns, dgrams, where = 0, 0, {}
        from scapy.layers.inet import IP, TCP, UDP
        for i, p in sniffers:
            out, _ = p.communicate("go\n", timeout=60)
            for hx in json.loads(out.strip().splitlines()[-1]):
                pkt = IP(bytes.fromhex(hx))
                assert pkt.src == CLIENT4
                assert pkt.dst == lab_mod.backend_v4(i)
                again = IP(bytes.fromhex(hx))
                del again.chksum
                l4 = TCP if TCP in again else UDP
                del again[l4].chksum
                again = IP(bytes(again))
                assert again.chksum == pkt.chksum and again[l4].chksum == pkt[l4].chksum
                syns += l4 is TCP and pkt[TCP].flags == "S"
                dgrams += l4 is UDP
                where.setdefault((l4.__name__, pkt[l4].sport), set()).add(i)
        # every SYN and datagram arrived (the client kernel's RSTs for the
        # backends' SYN-ACKs follow their flows too), each flow at one backend
        assert (syns, dgrams) == (30, 30)
        assert all(len(b) == 1 for b in where.values())
        assert len({b for s in where.values() for b in s}) == N
    finally:
        for _, p in sniffers:
            if p.poll() is None:
                p.kill()
                p.wait()


CLIENT_CAPTURE = """
import json, sys, time
from scapy.all import AsyncSniffer
from scapy.layers.inet import IP, ICMP
sn = AsyncSniffer(iface="lbc-cl-gw", store=True, lfilter=lambda p: IP in p)
sn.start()
time.sleep(0.5)
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.5)
pk = sn.stop()
print(json.dumps([[p[IP].src, p[IP].dst, ICMP in p] for p in pk]))
"""


def test_client_sees_only_the_vip_no_kernel_duplicates_or_icmp(lab):
    """What reaches the client while it talks to the VIP comes from the VIP alone: the
    gateway's kernel neither forwards a backend's un-NATed reply too nor answers the VIP's
    packets with ICMP errors (rawsock: its copy of them dies in a blackhole)."""
    sniffer = netconf.popen_in_netns("lbc-client", [sys.executable, "-c", CLIENT_CAPTURE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout.readline().strip() == "ready"
        assert http_requests("lbc-client", VIP4, n=30)["ok"] == 30
        assert udp_requests("lbc-client", VIP4, n=30)["ok"] == 30
        out, _ = sniffer.communicate("go\n", timeout=60)
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait()
    pkts = json.loads(out.strip().splitlines()[-1])
    to_client = [p for p in pkts if p[1] == CLIENT4]
    assert len(to_client) >= 60
    assert {src for src, _, _ in to_client} <= {VIP4, "198.18.0.1"}, to_client
    assert not [p for p in to_client if p[2]], "ICMP to the client"


def test_rawsock_kernel_copies_die_in_a_tc_filter(lab):
    """Mode rawsock: on both links a tc ingress filter drops the kernel's copy of each frame
    the workers take, before IP (status "rawsock", counted every 5 s); what the workers
    do not take - the client's own traffic to the gateway - still reaches the kernel. Mode
    tun has no such section."""
    st = ctl({"cmd": "status"})
    if lab.spec.mode == "tun":
        assert st["rawsock"] is None
        return
    copies = st["rawsock"]["kernel_copy"]
    assert set(copies) == {"lbc-gw-cl", "lbc-br0"}, copies
    assert all(c["dropped_by"] == "tc" and c["reason"] is None for c in copies.values())
    before = {k: c["dropped"] for k, c in copies.items()}
    assert udp_requests("lbc-client", VIP4, n=40)["ok"] == 40

    def grown() -> dict:
        now = ctl({"cmd": "status"})["rawsock"]["kernel_copy"]
        return {k: now[k]["dropped"] - before[k] for k in now}

    deadline = time.monotonic() + 20
    while min(grown().values()) < 40 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert min(grown().values()) >= 40, grown()       # 40 requests in, 40 replies back
    ping = subprocess.run(["ip", "netns", "exec", "lbc-client", "ping", "-c", "2", "-W", "2",
                           "198.18.0.1"], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr


def test_rawsock_a_new_gateway_address_is_left_to_the_kernel(lab):
    """The filters leave the gateway's own addresses to the kernel (a health check's reply,
    say); an address added while lbcore runs is one of them within seconds, else the tc
    filter would drop a backend's UDP to it as a reply to forward."""
    if lab.spec.mode == "tun":
        assert ctl({"cmd": "status"})["rawsock"] is None
        return
    new = "198.19.0.254"
    with netconf.NetChanges() as ch:
        netconf.addr_add("lbc-br0", f"{new}/24", netns="lbc-gw", changes=ch)

        def bind() -> socket.socket:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind((new, 7999))
            u.settimeout(0.2)
            return u

        u = ns_call("lbc-gw", bind)
        try:
            got = b""
            deadline = time.monotonic() + 15
            while not got and time.monotonic() < deadline:
                ns_python("lbc-be1", "import socket; socket.socket(socket.AF_INET, socket."
                          f"SOCK_DGRAM).sendto(b'to-the-gateway', ('{new}', 7999)); print(1)")
                try:
                    got = u.recv(100)
                except TimeoutError:
                    pass
            assert got == b"to-the-gateway"
        finally:
            u.close()


def test_status_and_pick_agree_with_traffic(lab):
    st = ctl({"cmd": "status"})
    web = [v for v in st["vips"] if v["address"] == VIP4 and v["port"] == 80][0]
    assert web["new_flows"] >= 300 and all(b["state"] == "up" for b in web["backends"])
    r = http_requests("lbc-client", VIP4, n=20)
    for cport, name in r["results"]:
        got = ctl({"cmd": "pick", "vip": f"{VIP4}:80", "src": CLIENT4, "sport": cport})
        idx = int(name[2:])
        assert got["backend"] == f"{lab_mod.backend_v4(idx)}:80", (cport, name, got)


KEEPALIVE_CLIENT = """
import json, socket, sys
def ask(s):
    s.sendall(b"GET /x HTTP/1.1\\r\\nHost: vip\\r\\n\\r\\n")
    buf = b""
    while b"\\r\\n\\r\\n" not in buf or not buf.endswith(b"\\n"):
        chunk = s.recv(4096)
        if not chunk:
            return None
        buf += chunk
    return buf.split(b"\\r\\n\\r\\n", 1)[1].strip().decode()
def udp(u):
    for _ in range(5):
        u.send(b"ping")
        try:
            return u.recv(100).decode().strip()
        except OSError:
            pass
t = socket.create_connection(("{vip}", 80), timeout=10)
name = ask(t)
for _ in range(40):   # a UDP flow on the same backend as the connection
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect(("{vip}", 5300))
    if udp(u) == name:
        break
print(json.dumps([name, udp(u)]), flush=True)
sys.stdin.readline()
print(json.dumps([ask(t), udp(u)]), flush=True)
"""


def _wait_all_up(timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = ctl({"cmd": "status"})
        if all(b["state"] == "up" for v in st["vips"] for b in v["backends"]):
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def _recreate_backend_link(i: int) -> None:
    """Backend i's veth deleted and made again, as lbcore.lab makes it: same names and
    addresses, a new (random) MAC."""
    ns = lab_mod.backend_ns(i)
    netconf.link_del(lab_mod.gw_backend_if(i), netns=lab_mod.GW_NS)
    netconf.veth_add(lab_mod.backend_if(i), lab_mod.gw_backend_if(i), netns=ns,
                     peer_netns=lab_mod.GW_NS)
    netconf.link_set(lab_mod.gw_backend_if(i), netns=lab_mod.GW_NS, master=lab_mod.BRIDGE)
    netconf.addr_add(lab_mod.backend_if(i), f"{lab_mod.backend_v4(i)}/24", netns=ns)
    netconf.addr_add(lab_mod.backend_if(i), f"{lab_mod.backend_v6(i)}/64", netns=ns)
    netconf.route_add("default", gateway=lab_mod.GW_BACKEND_V4, netns=ns)
    netconf.route_add("default", gateway=lab_mod.GW_BACKEND_V6, netns=ns)


def _gw_mac_of(addr: str) -> str | None:
    for _, ip, mac, _ in netconf.neighbours(lab_mod.GW_NS, lab_mod.BRIDGE):
        if ip == addr:
            return mac
    return None


def test_backend_mac_change_flows_continue_after_neighbour_update(lab):
    """A backend's link is re-created (a new MAC); once the backend has spoken (its first
    packet to the gateway is an ARP request carrying the new MAC: the neighbour update), a TCP
    connection and a UDP flow pinned to it before the change go on, to the same backend."""
    _wait_all_up()
    client = netconf.popen_in_netns(
        "lbc-client", [sys.executable, "-c", KEEPALIVE_CLIENT.format(vip=VIP4)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        tcp_be, udp_be = json.loads(client.stdout.readline())
        assert tcp_be == udp_be and tcp_be.startswith("be")
        i = int(tcp_be[2:])
        addr = lab_mod.backend_v4(i)
        old_mac = _gw_mac_of(addr)
        assert old_mac
        _recreate_backend_link(i)
        new_mac = [x.mac for x in netconf.links(lab_mod.backend_ns(i))
                   if x.name == lab_mod.backend_if(i)][0]
        assert new_mac != old_mac
        # the backend speaks first (as a rebooted or replaced server does): any packet to the
        # gateway makes it ARP for the gateway, and the gateway learns the new MAC from that
        ns_python(lab_mod.backend_ns(i), f"""
import socket
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("{lab_mod.GW_BACKEND_V4}", 9))
print(1)""")
        deadline = time.monotonic() + 10
        while _gw_mac_of(addr) != new_mac:
            assert time.monotonic() < deadline, (_gw_mac_of(addr), new_mac)
            time.sleep(0.05)
        time.sleep(0.5)   # rawsock: the balancer's L2 table follows the kernel's
        out, _ = client.communicate("go\n", timeout=60)
        assert json.loads(out.strip().splitlines()[-1]) == [tcp_be, udp_be]
        # new flows reach the re-created backend too
        r = http_requests("lbc-client", VIP4, n=60)
        assert r["ok"] == 60 and r["counts"].get(tcp_be, 0) > 0, r
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def lbcore_tc_filters(link: str) -> int:
    """How many of lbcore's kernel-copy filters (mode rawsock) hang on the link's ingress."""
    from lbcore.dataplane.rawsock import KERNEL_DROP_PREF
    with netconf._ipr("lbc-gw") as ipr:
        idx = netconf.link_index(link, netns="lbc-gw")
        return sum(1 for f in ipr.get_filters(index=idx, parent=0xFFFFFFF2)
                   if f["info"] >> 16 == KERNEL_DROP_PREF and f.get_attr("TCA_OPTIONS"))


def test_sigkill_then_restart_starts_clean_and_works(lab):
    """A crashed balancer leaves its persistent TUN, which the next start re-attaches to (same
    ifindex); its stale rules are removed by the next start, which forwards again."""
    if lab.spec.mode == "rawsock":
        # a blackhole route a SIGKILLed run left for a VIP the next config lacks goes too
        netconf.route_add("198.18.100.99/32", type="blackhole", proto=0xF4, netns="lbc-gw")
    before = netconf.link_index("lbc0", netns="lbc-gw")
    lab_mod.restart_balancer(kill_signal=signal.SIGKILL)
    if lab.spec.mode == "tun":
        assert netconf.link_index("lbc0", netns="lbc-gw") == before
    assert not [r for r in netconf.routes("lbc-gw") if r.dst == "198.18.100.99/32"]
    rules = [r for r in netconf.rules("lbc-gw") if r.priority == 4242]
    # one rule per (backend, port) of the config, no duplicates from the old run
    assert len(rules) == len({(r.src, r.ipproto, r.sport) for r in rules}) > 0
    r = http_requests("lbc-client", VIP4, n=60)
    assert r["ok"] == 60
    if lab.spec.mode == "tun":
        assert [x for x in netconf.links("lbc-gw") if x.name == "lbc0"]
    else:   # the killed run's tc filters were replaced, not doubled
        assert [lbcore_tc_filters(k) for k in ("lbc-gw-cl", "lbc-br0")] == [1, 1]


def test_sigterm_undoes_everything_in_the_gateway_but_the_reply_reservation(lab):
    """A clean stop undoes the rest; what keeps replies from leaving un-translated until the
    next start stays (the reply rules, blackholes for the replies and the VIPs), and so does
    tun mode's persistent TUN with its routes (no queue attached, it drops what reaches it);
    `lbcore cleanup` removes all that too."""
    rules = [r for r in netconf.rules("lbc-gw") if r.priority == 4242]
    assert rules
    log = lab_mod.paths()["balancer_log"]
    offset = log.stat().st_size
    assert lab_mod.stop_balancer(signal.SIGTERM, timeout=30)
    assert "stopped cleanly" in log.read_text()[offset:]
    tun = lab.spec.mode == "tun"
    assert bool([x for x in netconf.links("lbc-gw") if x.name == "lbc0"]) == tun
    assert [r for r in netconf.rules("lbc-gw") if r.priority == 4242] == rules
    assert {(r.dst, r.type, r.proto) for r in netconf.routes("lbc-gw", table=4242)
            if r.oif != "lbc0"} <= {("default", 6, 0xF4)}
    vip_routes = [r for r in netconf.routes("lbc-gw") if r.dst.split("/")[0] in (VIP4, VIP6)
                  and r.oif != "lbc0"]
    assert vip_routes and all((r.type, r.proto) == (6, 0xF4) for r in vip_routes)
    if not tun:
        from lbcore.dataplane.rawsock import KERNEL_DROP_PREF
        # a clean stop removes its tc filters; one as a crashed run leaves it: cleanup's
        assert [lbcore_tc_filters(k) for k in ("lbc-gw-cl", "lbc-br0")] == [0, 0]
        netconf.ingress_bpf_set("lbc-br0", [(0x06, 0, 0, 0xFFFFFFFF)], pref=KERNEL_DROP_PREF,
                                name="left-by-a-crash", netns="lbc-gw")
        assert lbcore_tc_filters("lbc-br0") == 1
    cfg = lab_mod.paths()["config"]
    p = netconf.popen_in_netns("lbc-gw", [sys.executable, "-m", "lbcore", "cleanup", "-c",
                                          str(cfg)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert not [r for r in netconf.rules("lbc-gw") if r.priority == 4242]
    assert not [x for x in netconf.links("lbc-gw") if x.name == "lbc0"]
    assert not [r for r in netconf.routes("lbc-gw", table=4242)]
    assert not [r for r in netconf.routes("lbc-gw") if r.dst.split("/")[0] in (VIP4, VIP6)]
    if not tun:
        assert "removed the tc ingress filter on lbc-br0" in out
        assert lbcore_tc_filters("lbc-br0") == 0
    lab_mod.restart_balancer()
    assert http_requests("lbc-client", VIP4, n=10)["ok"] == 10
