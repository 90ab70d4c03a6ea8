"""lbcore.netconf: each primitive in throwaway namespaces, its idempotence, and undo().

Every namespace comes from the ``nsname``/``netns_factory`` fixtures, which remove it whatever
happens; addresses are from 198.18.0.0/15 and 2001:db8::/32 only.
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from lbcore import netconf as nc
from lbcore.lab.ns import ns_call, ns_python, ns_run

pytestmark = pytest.mark.netns


def _ns_inode(name: str) -> int:
    return os.stat(nc.netns_path(name)).st_ino


@pytest.fixture
def pair(netns_factory):
    """Two namespaces joined by a veth, 198.18.7.1/24 <-> 198.18.7.2/24 and 2001:db8:7::1/2."""
    a, b = netns_factory(), netns_factory()
    nc.veth_add("va", "vb", netns=a, peer_netns=b)
    nc.addr_add("va", "198.18.7.1/24", netns=a)
    nc.addr_add("vb", "198.18.7.2/24", netns=b)
    nc.addr_add("va", "2001:db8:7::1/64", netns=a)
    nc.addr_add("vb", "2001:db8:7::2/64", netns=b)
    return a, b


def _serve_once(sock: socket.socket, reply: bytes) -> None:
    conn, _ = sock.accept()
    with conn:
        conn.recv(100)
        conn.sendall(reply)


def _tcp_exchange(a: str, b: str, addr: str) -> bytes:
    """Listen in ``b`` on ``addr``, connect from ``a``: what comes back."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def listen() -> socket.socket:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.bind((addr, 0))
        s.listen()
        return s

    srv = ns_call(b, listen)        # the socket stays in b, usable from any thread
    t = threading.Thread(target=_serve_once, args=(srv, b"pong from b"))
    t.start()

    def connect() -> bytes:
        with socket.create_connection((addr, srv.getsockname()[1]), timeout=5) as c:
            c.sendall(b"ping")
            return c.recv(100)

    try:
        return ns_call(a, connect)
    finally:
        t.join(5)
        srv.close()


# --------------------------------------------------------------------------- namespaces

def test_netns_create_list_remove_idempotent():
    name = f"lbt-{os.getpid()}-ns"
    try:
        assert nc.netns_create(name) is True
        assert nc.netns_create(name) is False          # exists: no error, nothing done
        assert name in nc.netns_list("lbt-")
        assert nc.netns_list("lbt-zz-none") == []
        lo = [li for li in nc.links(name) if li.name == "lo"]
        assert lo and lo[0].up                          # loopback is up by default
    finally:
        assert nc.netns_remove(name) is True
    assert nc.netns_remove(name) is False               # absent: no error
    assert not nc.netns_exists(name)


def test_missing_netns_is_an_error_and_never_created():
    ghost = f"lbt-{os.getpid()}-ghost"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nc.links(ghost)
    with pytest.raises(FileNotFoundError):
        nc.run_in_netns(ghost, lambda: None)
    assert not nc.netns_exists(ghost)
    assert nc.link_del("x", netns=ghost) is False       # deletes in a gone netns are no-ops


# --------------------------------------------------------------------------- links

def test_veth_between_namespaces_carries_tcp_v4_and_v6(pair):
    a, b = pair
    assert [li.name for li in nc.links(a) if li.kind == "veth"] == ["va"]
    assert [li.name for li in nc.links(b) if li.kind == "veth"] == ["vb"]
    assert nc.link_index("va", netns=a) is not None
    assert nc.link_index("vb", netns=a) is None
    assert nc.veth_add("va", "vb", netns=a, peer_netns=b) is False   # idempotent
    assert _tcp_exchange(a, b, "198.18.7.2") == b"pong from b"
    assert _tcp_exchange(a, b, "2001:db8:7::2") == b"pong from b"    # NODAD: usable at once


def test_link_set_attributes_and_undo(nsname):
    nc.veth_add("v0", "v1", netns=nsname, peer_netns=nsname)
    nc.bridge_add("br0", netns=nsname)
    with nc.NetChanges() as ch:
        old = nc.link_set("v0", netns=nsname, mtu=1400, txqueuelen=10000, master="br0",
                          state="down", changes=ch)
        assert old == {"mtu": 1500, "txqueuelen": 1000, "master": "", "state": "up"}
        li = {x.name: x for x in nc.links(nsname)}["v0"]
        assert (li.mtu, li.txqueuelen, li.master, li.up) == (1400, 10000, "br0", False)
        assert nc.link_set("v0", netns=nsname, mtu=1400, changes=ch) == {}   # no change
    li = {x.name: x for x in nc.links(nsname)}["v0"]
    assert (li.mtu, li.txqueuelen, li.master, li.up) == (1500, 1000, None, True)
    assert nc.link_del("v0", netns=nsname) is True
    assert nc.link_index("v1", netns=nsname) is None      # the peer went with it
    assert nc.link_del("v0", netns=nsname) is False
    with pytest.raises(OSError, match="no interface"):
        nc.link_set("v0", netns=nsname, mtu=1400)
    with pytest.raises(ValueError):
        nc.link_set("br0", netns=nsname, state="sideways")


# --------------------------------------------------------------------------- addresses/routes

def test_addresses_idempotent_and_deleted(nsname):
    nc.veth_add("v0", "v1", netns=nsname, peer_netns=nsname)
    assert nc.addr_add("v0", "198.18.9.1/24", netns=nsname) is True
    assert nc.addr_add("v0", "198.18.9.1/24", netns=nsname) is False
    assert nc.addr_add("v0", "2001:db8:9::1/64", netns=nsname) is True
    got = nc.addresses(nsname, "v0")
    assert ("v0", "198.18.9.1/24") in got and ("v0", "2001:db8:9::1/64") in got
    assert nc.addr_del("v0", "198.18.9.1/24", netns=nsname) is True
    assert nc.addr_del("v0", "198.18.9.1/24", netns=nsname) is False
    assert ("v0", "198.18.9.1/24") not in nc.addresses(nsname)


def test_routes_replace_tables_and_undo(nsname):
    nc.veth_add("v0", "v1", netns=nsname, peer_netns=nsname)
    nc.addr_add("v0", "198.18.9.1/24", netns=nsname)
    nc.addr_add("v0", "2001:db8:9::1/64", netns=nsname)
    with nc.NetChanges() as ch:
        nc.route_add("default", gateway="198.18.9.254", netns=nsname, changes=ch)
        nc.route_add("default", gateway="198.18.9.253", netns=nsname, changes=ch)  # replaces
        nc.route_add("198.18.100.1/32", oif="v0", table=100, netns=nsname, changes=ch)
        nc.route_add("::/0", oif="v0", table=100, netns=nsname, changes=ch)
        nc.route_add("default", gateway="2001:db8:9::fe", netns=nsname, changes=ch)
        main4 = [r for r in nc.routes(nsname, family=socket.AF_INET) if r.dst == "default"]
        assert [r.gateway for r in main4] == ["198.18.9.253"]
        t100 = {(r.dst, r.oif) for r in nc.routes(nsname, table=100)}
        assert t100 == {("198.18.100.1/32", "v0"), ("default", "v0")}
        v6 = [r for r in nc.routes(nsname, family=socket.AF_INET6) if r.dst == "default"]
        assert [r.gateway for r in v6] == ["2001:db8:9::fe"]
    assert nc.routes(nsname, table=100) == []
    assert [r for r in nc.routes(nsname) if r.dst == "default"] == []
    assert nc.route_del("198.18.100.1/32", oif="v0", table=100, netns=nsname) is False
    with pytest.raises(ValueError):
        nc.route_add("default", oif="v0", netns=nsname)    # family unknown


def test_rules_idempotent_and_undo(nsname):
    nc.veth_add("v0", "v1", netns=nsname, peer_netns=nsname)
    spec = dict(priority=100, table=100, src="198.19.0.0/24", iif="v0", ipproto="tcp",
                sport=80)
    with nc.NetChanges() as ch:
        assert nc.rule_add(netns=nsname, changes=ch, **spec) is True
        assert nc.rule_add(netns=nsname, changes=ch, **spec) is False
        assert nc.rule_add(priority=101, table=100, src="2001:db8:1::/64", sport=(5300, 5301),
                           ipproto="udp", netns=nsname, changes=ch) is True
        mine = [r for r in nc.rules(nsname) if r.table == 100]
        assert [(r.priority, r.src, r.iif, r.ipproto, r.sport) for r in mine] == [
            (100, "198.19.0.0/24", "v0", socket.IPPROTO_TCP, "80:80"),
            (101, "2001:db8:1::/64", None, socket.IPPROTO_UDP, "5300:5301")]
    assert [r for r in nc.rules(nsname) if r.table == 100] == []
    assert nc.rule_del(netns=nsname, **spec) is False
    with pytest.raises(ValueError):
        nc.rule_add(priority=1, table=1, src="198.19.0.0/24", dst="2001:db8::/32", netns=nsname)


def test_neighbours(nsname):
    nc.veth_add("v0", "v1", netns=nsname, peer_netns=nsname)
    with nc.NetChanges() as ch:
        nc.neigh_add("v0", "198.18.9.7", "02:00:00:00:00:07", netns=nsname, changes=ch)
        nc.neigh_add("v0", "198.18.9.7", "02:00:00:00:00:08", netns=nsname, changes=ch)
        nc.neigh_add("v0", "2001:db8:9::7", "02:00:00:00:00:09", netns=nsname, changes=ch)
        got = {(ip, mac) for _, ip, mac, _ in nc.neighbours(nsname, "v0")}
        assert ("198.18.9.7", "02:00:00:00:00:08") in got
        assert ("2001:db8:9::7", "02:00:00:00:00:09") in got
    assert not [n for n in nc.neighbours(nsname, "v0") if n[1] in ("198.18.9.7",
                                                                    "2001:db8:9::7")]
    assert nc.neigh_del("v0", "198.18.9.7", netns=nsname) is False


# --------------------------------------------------------------------------- every delete

# (kind, add, delete that undoes the add, whether the object goes when interface v0 goes)
ADD_DELETE = [
    ("link", lambda ns: nc.veth_add("v0", "v1", netns=ns, peer_netns=ns),
     lambda ns: nc.link_del("v0", netns=ns), True),
    ("address", lambda ns: nc.addr_add("v0", "198.18.9.2/24", netns=ns),
     lambda ns: nc.addr_del("v0", "198.18.9.2/24", netns=ns), True),
    ("route", lambda ns: nc.route_add("198.18.50.0/24", oif="v0", netns=ns),
     lambda ns: nc.route_del("198.18.50.0/24", oif="v0", netns=ns), True),
    ("rule", lambda ns: nc.rule_add(priority=10, table=10, iif="v0", netns=ns),
     lambda ns: nc.rule_del(priority=10, table=10, iif="v0", netns=ns), False),
    ("neighbour", lambda ns: nc.neigh_add("v0", "198.18.9.7", "02:00:00:00:00:07", netns=ns),
     lambda ns: nc.neigh_del("v0", "198.18.9.7", netns=ns), True),
    ("proxy neighbour", lambda ns: nc.neigh_proxy_add("v0", "2001:db8:9::8", netns=ns),
     lambda ns: nc.neigh_proxy_del("v0", "2001:db8:9::8", netns=ns), True),
]


@pytest.mark.parametrize("add,delete,goes_with_link", [r[1:] for r in ADD_DELETE],
                         ids=[r[0] for r in ADD_DELETE])
def test_delete_once_then_gone_is_false(netns_factory, add, delete, goes_with_link):
    """A delete is True once; then every way of being gone is False, never an error: the
    object, the interface it hangs on, the namespace."""
    ns = netns_factory()
    nc.veth_add("v0", "v1", netns=ns, peer_netns=ns)
    nc.addr_add("v0", "198.18.9.1/24", netns=ns)
    add(ns)
    assert delete(ns) is True
    assert delete(ns) is False
    add(ns)
    nc.link_del("v0", netns=ns)
    assert delete(ns) is (not goes_with_link)   # a rule names v0; it outlives the link
    nc.netns_remove(ns)
    assert delete(ns) is False


# --------------------------------------------------------------------------- sysctls

def test_sysctl_in_netns_only_and_undo(nsname):
    root_before = nc.sysctl_get("net.ipv4.ip_forward")
    assert nc.sysctl_get("net.ipv4.ip_forward", netns=nsname) == "0"
    with nc.NetChanges() as ch:
        assert nc.sysctl_set("net.ipv4.ip_forward", 1, netns=nsname, changes=ch) == "0"
        assert nc.sysctl_set("net/ipv6/conf/all/forwarding", "1", netns=nsname,
                             changes=ch) == "0"
        assert nc.sysctl_set("net.ipv4.ip_forward", 1, netns=nsname, changes=ch) == "1"
        assert len(ch) == 2                                  # the no-op was not recorded
        nc.sysctl_set("net.ipv4.ip_local_port_range", "1024 65535", netns=nsname, changes=ch)
        assert nc.sysctl_set("net.ipv4.ip_local_port_range", "1024  65535", netns=nsname,
                             changes=ch).split() == ["1024", "65535"]
        assert len(ch) == 3
        assert nc.sysctl_get("net.ipv4.ip_forward", netns=nsname) == "1"
        assert nc.sysctl_get("net.ipv4.ip_forward") == root_before   # root untouched
    assert nc.sysctl_get("net.ipv4.ip_forward", netns=nsname) == "0"
    assert nc.sysctl_get("net.ipv6.conf.all.forwarding", netns=nsname) == "0"
    assert nc.sysctl_get("net.ipv4.ip_local_port_range", netns=nsname).split() == [
        "32768", "60999"]
    with pytest.raises(ValueError):
        nc.sysctl_path("net/../../etc/passwd")


# --------------------------------------------------------------------------- tc ingress

# classic BPF, direct action: IPv4 -> TC_ACT_SHOT, anything else -> TC_ACT_UNSPEC
DROP_V4 = [(0x28, 0, 0, 12), (0x15, 0, 1, 0x0800), (0x06, 0, 0, 2), (0x06, 0, 0, 0xFFFFFFFF)]
KEEP_ALL = [(0x06, 0, 0, 0xFFFFFFFF)]

UDP_PROBE = """
import json, socket, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
with socket.socket(fam, socket.SOCK_DGRAM) as s:
    for i in range(n):
        s.sendto(b"probe", (dst, port))
        time.sleep(0.01)
"""


def _udp_through(a: str, b: str, dst: str, n: int = 5) -> tuple[int, int]:
    """Send n datagrams from a to dst (in b): (how many b's socket got, how many frames a
    packet socket on vb saw)."""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET

    def open_both() -> tuple[socket.socket, socket.socket]:
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.bind((dst, 0))
        u.settimeout(0.05)
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        raw.bind(("vb", 0))
        raw.settimeout(0.05)
        return u, raw

    u, raw = ns_call(b, open_both)
    port = u.getsockname()[1]
    try:
        ns_run(a, [sys.executable, "-c", UDP_PROBE, dst, str(port), str(n)], timeout=30)
        got = seen = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (got < n or seen < n):
            for sock in (u, raw):
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    continue
                if sock is u:
                    got += data == b"probe"
                elif data.endswith(b"probe") and port.to_bytes(2, "big") in data:
                    seen += 1
        return got, seen
    finally:
        u.close()
        raw.close()


@pytest.mark.netns
def test_ingress_filter_drops_after_the_taps_replaces_and_undoes(pair):
    a, b = pair
    assert _udp_through(a, b, "198.18.7.2") == (5, 5)
    assert nc.ingress_drops("vb", netns=b) is None              # no ingress qdisc yet
    ch = nc.NetChanges()
    nc.ingress_bpf_set("vb", DROP_V4, pref=244, name="t-drop", netns=b, changes=ch)
    # the packet socket (a tap) still sees every frame; IP never gets them
    assert _udp_through(a, b, "198.18.7.2") == (0, 5)
    assert nc.ingress_drops("vb", netns=b) >= 5
    assert _udp_through(a, b, "2001:db8:7::2") == (5, 5)       # UNSPEC: on to the stack
    # the same priority again: replaced in one step, not a second filter
    nc.ingress_bpf_set("vb", KEEP_ALL, pref=244, name="t-drop", netns=b)
    assert _udp_through(a, b, "198.18.7.2") == (5, 5)
    nc.ingress_bpf_set("vb", DROP_V4, pref=244, name="t-drop", netns=b)
    assert _udp_through(a, b, "198.18.7.2")[0] == 0
    assert ch.descriptions == [f"clsact qdisc on vb in netns {b}",
                               f"tc ingress filter t-drop (pref 244) on vb in netns {b}"]
    assert ch.undo() == []
    assert nc.ingress_drops("vb", netns=b) is None              # the qdisc it added: gone
    assert _udp_through(a, b, "198.18.7.2") == (5, 5)
    assert nc.ingress_bpf_del("vb", pref=244, netns=b) is False
    assert nc.ingress_qdisc_del("vb", netns=b) is False
    assert nc.ingress_bpf_del("nosuch", pref=244, netns=b) is False


@pytest.mark.netns
def test_ingress_filter_joins_an_ingress_qdisc_it_did_not_add(pair):
    a, b = pair
    with nc._ipr(b) as ipr:                     # an operator's own (old-style) ingress qdisc
        ipr.tc("add", "ingress", nc.link_index("vb", netns=b))
    ch = nc.NetChanges()
    nc.ingress_bpf_set("vb", DROP_V4, pref=244, name="t-drop", netns=b, changes=ch)
    assert _udp_through(a, b, "198.18.7.2")[0] == 0
    assert len(ch) == 1                         # the filter only
    ch.undo()
    assert _udp_through(a, b, "198.18.7.2")[0] == 5
    assert nc.ingress_drops("vb", netns=b) is not None          # the operator's qdisc stays
    with pytest.raises(OSError):
        nc.ingress_bpf_set("nosuch", DROP_V4, pref=244, name="t", netns=b)


# --------------------------------------------------------------------------- NetChanges

def test_undo_reverses_order_ignores_gone_and_reports_others():
    order = []
    ch = nc.NetChanges()
    ch.record("first", lambda: order.append(1))
    ch.record("gone", lambda: (_ for _ in ()).throw(FileNotFoundError(2, "gone")))
    ch.record("broken", lambda: (_ for _ in ()).throw(PermissionError(1, "nope")))
    ch.record("last", lambda: order.append(3))
    failures = ch.undo()
    assert order == [3, 1]
    assert len(failures) == 1 and failures[0].startswith("broken")
    assert len(ch) == 0 and ch.undo() == []


def test_failure_half_way_undoes_everything(netns_factory):
    host = netns_factory()
    name = f"lbt-{os.getpid()}-half"
    try:
        with pytest.raises(RuntimeError, match="boom"), nc.NetChanges() as ch:
            nc.netns_create(name, changes=ch)
            nc.veth_add("h0", "h1", netns=host, peer_netns=name, changes=ch)
            nc.addr_add("h0", "198.18.9.1/24", netns=host, changes=ch)
            nc.sysctl_set("net.ipv4.ip_forward", 1, netns=host, changes=ch)
            raise RuntimeError("boom")
        assert not nc.netns_exists(name)
    finally:
        nc.netns_remove(name)
    assert nc.link_index("h0", netns=host) is None
    assert nc.sysctl_get("net.ipv4.ip_forward", netns=host) == "0"


def test_commit_keeps_changes(nsname):
    with nc.NetChanges() as ch:
        nc.bridge_add("brk", netns=nsname, changes=ch)
        ch.commit()
    assert nc.link_index("brk", netns=nsname) is not None


def test_undo_after_namespace_vanished_is_quiet(netns_factory):
    ns = netns_factory()
    ch = nc.NetChanges()
    nc.veth_add("g0", "g1", netns=ns, peer_netns=ns, changes=ch)
    nc.addr_add("g0", "198.18.9.1/24", netns=ns, changes=ch)
    nc.route_add("198.18.50.0/24", oif="g0", netns=ns, changes=ch)
    nc.rule_add(priority=10, table=10, src="198.18.9.0/24", netns=ns, changes=ch)
    nc.netns_remove(ns)
    assert ch.undo() == []


# --------------------------------------------------------------------------- threads/processes

def test_run_in_netns_leaves_the_caller_where_it_was(nsname):
    mine = os.readlink("/proc/thread-self/ns/net")
    seen = nc.run_in_netns(nsname, lambda: os.readlink("/proc/thread-self/ns/net"))
    assert os.readlink("/proc/thread-self/ns/net") == mine
    assert seen != mine and seen.endswith(f"[{_ns_inode(nsname)}]")
    with pytest.raises(ZeroDivisionError):
        nc.run_in_netns(nsname, lambda: 1 / 0)


def test_popen_and_helpers_run_inside_the_netns(nsname):
    code = "import os; print(os.stat('/proc/self/ns/net').st_ino)"
    p = nc.popen_in_netns(nsname, [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert int(out) == _ns_inode(nsname)
    assert ns_python(nsname, "import json, socket; print(json.dumps(socket.if_nameindex()))"
                     ) == [[1, "lo"]]
    assert ns_run(nsname, [sys.executable, "-c", "print('hi')"]).stdout == "hi\n"
    with pytest.raises(TypeError):
        nc.popen_in_netns(nsname, ["true"], preexec_fn=lambda: None)


def test_api_works_from_inside_an_asyncio_loop(nsname):
    async def main() -> list[str]:
        nc.bridge_add("bra", netns=nsname)
        return [li.name for li in nc.links(nsname)]

    assert "bra" in asyncio.run(main())


@pytest.mark.parametrize("all_rp,tun,v4", [(0, 0, (6, 17)), (1, 2, (17,)), (2, 2, (6, 17))])
def test_tun_reverse_path_check_and_port_less_rules_follow_conf_all(all_rp, tun, v4):
    # the kernel applies the larger of conf/all and the TUN's own rp_filter: where conf/all
    # is 0 the TUN is not checked at all, otherwise loosely (a passed packet's source routes
    # out the backend's link). IPv4 TCP backends get their port-less rule unless the check is
    # strict: it would drop the answers to their own TCP on the client-side links
    from ipaddress import ip_address

    from lbcore.dataplane import replies
    from lbcore.dataplane.tun import routes

    assert routes._tun_rp_filter(all_rp) == tun
    protos = routes._fragment_protos(all_rp)
    assert protos == {4: v4, 6: (6, 17)}
    paths = [replies.ReplyPath(ip_address("198.19.0.11"), 6, 80),
             replies.ReplyPath(ip_address("198.19.0.11"), 17, 53),
             replies.ReplyPath(ip_address("2001:db8:1::11"), 6, 80)]
    frags = {(str(p.address), p.proto) for p in replies.with_fragments(paths, protos)
             if p.port == replies.FRAGMENTS}
    assert frags == ({("198.19.0.11", p) for p in v4} | {("2001:db8:1::11", 6)})
