"""The SYN shed filter on a TUN (lbcore.dataplane.shed): what the kernel drops before the queue,
and the control law that sets the share. The kernel part runs in a namespace of its own: a TUN
with a VIP route, packets written by a raw socket, read back from the TUN's queue."""
from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lbcore import netconf
from lbcore.dataplane import shed
from lbcore.dataplane.tun.device import close_tun, open_tun

VIP = "198.18.100.1"
SRC = "198.18.0.2"


def _tcp(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def _exchange(fd: int, pkts: list[bytes]) -> list[bytes]:
    """Send ``pkts`` (IPv4 or IPv6, header included, one family) from the namespace towards
    the TUN; what its queue got."""
    v6 = pkts[0][0] >> 4 == 6
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                      socket.IPPROTO_RAW)
    got: list[bytes] = []
    try:
        for i, p in enumerate(pkts):
            dst = (socket.inet_ntop(socket.AF_INET6, p[24:40]) if v6
                   else socket.inet_ntoa(p[16:20]))
            s.sendto(p, (dst, 0))
            if i % 64 == 63:
                got += _drain(fd, 0.0)
        got += _drain(fd, 0.3)
    finally:
        s.close()
    return got


def _drain(fd: int, wait: float) -> list[bytes]:
    out = []
    while select.select([fd], [], [], wait)[0]:
        try:
            out.append(os.read(fd, 65536))
        except BlockingIOError:
            break
    return out


@contextmanager
def _shed_tun(vips: list[shed.GuardedVip], routes: tuple[str, ...] = (f"{VIP}/32",)
              ) -> Iterator[tuple[int, shed.SynShed]]:
    """A TUN (up, ``routes`` into it) with the shed filter for ``vips``: (queue fd, filter);
    both closed when the block ends."""
    fds, _ = open_tun("lbtshed0", 1, vnet_hdr=False)
    sh = None
    try:
        netconf.link_set("lbtshed0", state="up")
        for r in routes:
            netconf.route_add(r, oif="lbtshed0")
        sh = shed.SynShed.for_tun(fds[0], vips)
        assert sh is not None
        yield fds[0], sh
    finally:
        if sh is not None:
            sh.close()
        close_tun(fds)


def _in_ns(share: float) -> dict:
    with _shed_tun([shed.GuardedVip(ipaddress.ip_address(VIP), 80, 100)]) as (fd, sh):
        sh.set_share(0, share)
        syns = [_tcp(SRC, VIP, 20000 + i, 80, 0x02) for i in range(1000)]
        acks = [_tcp(SRC, VIP, 30000 + i, 80, 0x10) for i in range(300)]
        synacks = [_tcp(SRC, VIP, 31000 + i, 80, 0x12) for i in range(100)]
        other = [_tcp(SRC, VIP, 32000 + i, 81, 0x02) for i in range(300)]
        got = _exchange(fd, syns + acks + synacks + other)
        c = sh.counters()
        kinds = {"syn80": 0, "ack": 0, "synack": 0, "syn81": 0}
        for p in got:
            if len(p) < 40 or p[9] != 6:
                continue
            dport, flags = struct.unpack("!H", p[22:24])[0], p[33]
            key = ("syn81" if dport == 81 else "ack" if flags == 0x10
                   else "synack" if flags == 0x12 else "syn80")
            kinds[key] += 1
        # the SYNs again, as retries: those dropped the first time now pass
        again = _exchange(fd, syns)
        c2 = sh.counters()
        return {"got": kinds, "syns": c[0], "shed": c[1], "retried": c2[2],
                "again": sum(1 for p in again if len(p) >= 40 and p[9] == 6),
                "shed_again": c2[1] - c[1]}


@pytest.mark.netns
@pytest.mark.parametrize("share", [0.0, 0.5, shed.MAX_SHARE])
def test_filter_sheds_only_syns_to_a_guarded_vip(nsname, share):
    """Only SYN-without-ACK to the guarded VIP:port is shed, about ``share`` of them; an ACK
    (every packet of an established connection has one), a SYN-ACK and a SYN to another port
    all reach the queue; the map counts the SYNs seen and shed exactly."""
    r = netconf.run_in_netns(nsname, _in_ns, share)
    print(r)
    assert r["got"]["ack"] == 300 and r["got"]["synack"] == 100 and r["got"]["syn81"] == 300, r
    assert r["syns"] == 1000, r
    assert r["got"]["syn80"] + r["shed"] == 1000, r
    # binomial(1000, share): 6 standard deviations at most
    sd = (1000 * share * (1 - share)) ** 0.5
    assert abs(r["shed"] - 1000 * share) <= 6 * sd + 1, r
    # sent again (a client's SYN retransmission: same addresses, ports and sequence number),
    # every SYN dropped the first time passes as a retry
    assert r["retried"] >= r["shed"] * 0.99, r
    assert r["again"] + r["shed_again"] == 1000 and r["again"] >= r["retried"], r


class _FakeShed(shed.SynShed):
    """The control law without a kernel: counters come from the test."""

    def __init__(self, rate: int) -> None:
        super().__init__([shed.VipShed(shed.GuardedVip(ipaddress.ip_address(VIP), 80, rate))])
        self.c = [0, 0, 0]

    def counters(self) -> list[int]:
        return list(self.c)

    def set_share(self, i: int, share: float) -> None:
        self.vips[i].share = min(max(share, 0.0), shed.MAX_SHARE)


def test_control_law_follows_the_offered_rate():
    """Under a flood the share lets HEADROOM x new_flow_rate through; it is capped at
    MAX_SHARE; after the flood it decays to 0 within a few ticks; below MIN_SYNS it never
    starts."""
    s = _FakeShed(1000)
    t = 0.0
    s.tick(t)
    for syns_per_s, expect in ((100, 0.0), (30_000, 1 - shed.HEADROOM * 1000 / 30_000),
                               (3_000_000, shed.MAX_SHARE)):
        t += 1.0
        s.c[0] += syns_per_s
        s.tick(t)
        assert s.vips[0].share == pytest.approx(expect), (syns_per_s, s.vips[0])
        assert (s.since is not None) == (expect > 0)
    for _ in range(12):
        t += 1.0
        s.tick(t)
    assert s.vips[0].share == 0.0 and s.since is None
    st = s.status()
    assert st["vips"][0]["new_flow_rate"] == 1000 and st["active"] is False


def _reconfigure_in_ns() -> dict:
    a = shed.GuardedVip(ipaddress.ip_address(VIP), 80, 100)
    with _shed_tun([a]) as (fd, sh):
        first = sh.loaded
        sh.reconfigure([shed.GuardedVip(a.address, 80, 500)])     # a new rate: same program
        same = sh.loaded is first and sh.vips[0].vip.rate == 500
        sh.reconfigure([shed.GuardedVip(a.address, 81, 100)])     # another port: a new one
        sh.set_share(0, shed.MAX_SHARE)
        got = _exchange(fd, [_tcp(SRC, VIP, 20000 + i, p, 0x02)
                             for i in range(200) for p in (80, 81)])
        return {"same": same, "new": sh.loaded is not first, "counters": sh.counters(),
                "to80": sum(1 for p in got if struct.unpack("!H", p[22:24])[0] == 80)}


@pytest.mark.netns
def test_reload_swaps_the_program_for_new_vips(nsname):
    """A reload that only changes a rate keeps the program; one that guards another port
    swaps in a new program: SYNs to the old port all pass, those to the new one are shed."""
    r = netconf.run_in_netns(nsname, _reconfigure_in_ns)
    assert r["same"] and r["new"], r
    assert r["to80"] == 200, r
    syns, dropped, _ = r["counters"]
    assert syns == 200 and dropped >= 150, r


def _syns(got: list[bytes]) -> int:
    """The IPv4 TCP SYNs to VIP among what a queue got (the link's own chatter aside)."""
    return sum(1 for p in got if len(p) >= 40 and p[0] >> 4 == 4 and p[9] == 6
               and p[16:20] == socket.inet_aton(VIP) and p[33] == 0x02)


def _idle_then_guarded_in_ns() -> dict:
    a = shed.GuardedVip(ipaddress.ip_address(VIP), 80, 100)
    with _shed_tun([]) as (fd, sh):
        out: dict = {"idle": (sh.loaded is None, sh.status()["filter"])}
        sh.tick(1.0)                                    # an idle filter's loop has nothing to do
        syns = [_tcp(SRC, VIP, 20000 + i, 80, 0x02) for i in range(200)]
        out["idle_got"] = _syns(_exchange(fd, syns))
        sh.reconfigure([a])                             # a reload guards its first VIP
        sh.set_share(0, shed.MAX_SHARE)
        out["guarded"] = sh.loaded is not None and sh.status()["filter"] == "tun-ebpf"
        out["guarded_got"] = _syns(_exchange(fd, [_tcp(SRC, VIP, 40000 + i, 80, 0x02)
                                                  for i in range(200)]))
        out["counters"] = sh.counters()
        sh.reconfigure([])                              # and then none: the program goes
        out["unguarded"] = (sh.loaded is None, sh.vips)
        out["unguarded_got"] = _syns(_exchange(fd, [_tcp(SRC, VIP, 50000 + i, 80, 0x02)
                                                    for i in range(200)]))
        return out


@pytest.mark.netns
def test_a_reload_that_guards_the_first_vip_attaches_the_filter(nsname):
    """A run that starts with no guarded VIP keeps an idle filter: every SYN reaches the
    queue; a reload that sets new_flow_rate on a VIP attaches the program at once (no
    restart), and a reload that guards nothing any more takes it away."""
    r = netconf.run_in_netns(nsname, _idle_then_guarded_in_ns)
    assert r["idle"] == (True, "idle") and r["idle_got"] == 200, r
    assert r["guarded"] and r["counters"][0] == 200 and r["guarded_got"] <= 40, r
    assert r["unguarded"] == (True, []) and r["unguarded_got"] == 200, r


CLIENT4, BACKEND4 = "198.18.0.50", "198.18.1.10"
VIP6, CLIENT6, BACKEND6 = "2001:db8:100::1", "2001:db8::50", "2001:db8:1::10"


def _udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 or IPv6 UDP datagram of 8 payload bytes (checksum 0 / left to nobody: the
    filter does not look at it)."""
    if ":" in src:
        udp = struct.pack("!HHHH", sport, dport, 16, 0) + bytes(8)
        return (struct.pack("!IHBB", 6 << 28, len(udp), 17, 64)
                + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + udp)
    udp = struct.pack("!HHHH", sport, dport, 16, 0) + bytes(8)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + udp


def _udp_to(got: list[bytes], port: int) -> int:
    """The UDP datagrams to ``port`` among what a queue got."""
    n = 0
    for p in got:
        v6 = len(p) >= 48 and p[0] >> 4 == 6 and p[6] == 17
        v4 = len(p) >= 28 and p[0] >> 4 == 4 and p[9] == 17
        off = 40 if v6 else (p[0] & 15) * 4 if v4 else None
        if off is not None and struct.unpack("!H", p[off + 2:off + 4])[0] == port:
            n += 1
    return n


def _udp_in_ns(v6: bool) -> dict:
    vip, client, backend = (VIP6, CLIENT6, BACKEND6) if v6 else (VIP, CLIENT4, BACKEND4)
    plen = 128 if v6 else 32
    g = shed.GuardedVip(ipaddress.ip_address(vip), 5300, 100, "dns", shed.IPPROTO_UDP)
    # the client's route into the TUN is the replies' way in
    with _shed_tun([g], (f"{vip}/{plen}", f"{client}/{plen}")) as (fd, sh):
        sh.set_share(0, shed.MAX_SHARE)
        out: dict = {}
        # a backend answers ten clients: their (address, port) become known
        got = _exchange(fd, [_udp(backend, client, 5300, 5000 + i) for i in range(10)])
        out["replies"] = sum(_udp_to(got, 5000 + i) for i in range(10))
        known = [_udp(client, vip, 5000 + i, 5300) for i in range(10) for _ in range(20)]
        out["known_got"] = _udp_to(_exchange(fd, known), 5300)
        c1 = sh.counters()
        unknown = [_udp(client, vip, 6000 + i, 5300) for i in range(200)]
        out["unknown_got"] = _udp_to(_exchange(fd, unknown), 5300)
        c2 = sh.counters()
        # two generations later nothing is known any more
        sh.rotate(1_000.0)
        sh.rotate(1_000.0 + shed.MARK_GENERATION_S)
        out["forgotten_got"] = _udp_to(_exchange(fd, known[:200:20]), 5300)
        sh.set_share(0, 0.0)                       # not shedding: all pass
        out["calm_got"] = _udp_to(_exchange(fd, unknown), 5300)
        out["c1"], out["c2"], out["c3"] = c1, c2, sh.counters()
        return out


@pytest.mark.netns
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_datagrams_of_answered_clients_pass_a_shedding_filter(nsname, family):
    """UDP has no SYN: a client a backend answered (its reply went through the TUN) is a
    going flow, and its datagrams pass even at the highest share (counted as passed anyway);
    datagrams of other clients are new flows and are shed; a client not answered for two
    generations of marks is new again; with the share at 0 everything passes."""
    r = netconf.run_in_netns(nsname, _udp_in_ns, family == "ipv6")
    assert r["replies"] == 10, r                          # replies reach the queue untouched
    assert r["known_got"] == 200, r
    assert r["c1"] == [0, 0, 200], r                       # seen (new), shed, passed anyway
    assert r["unknown_got"] <= 40 and r["c2"][0] == 200 and r["c2"][1] == 200 - r["unknown_got"]
    assert r["forgotten_got"] <= 5, r
    assert r["calm_got"] == 200, r
    assert r["c3"][0] == 200 + 10 + 200, r
