"""Parse and NAT rewrite (ext/lb_parse.c, ext/lb_nat.c) against scapy and the
pure-Python oracle (lbcore/reference/packet.py).

Every valid case is checked three ways: the output equals what scapy builds
for the translated packet (fresh checksums), scapy recomputes the same
checksums when the output's checksum fields are deleted and it is rebuilt,
and the C core and the reference give the same bytes. Malformed packets are a
katran-style table of PacketCase(description, input, reason), ids=description.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPOption_Router_Alert,
    IPOption_RR,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Packet,
    Raw,
)

from lbcore import _core
from lbcore.reference import packet as ref

IMPLS = {"core": _core, "reference": ref}
FWD, REV = _core.DIR_FWD, _core.DIR_REV

# Lab addresses only (198.18.0.0/15, 2001:db8::/32).
ADDR = {
    4: {"client": "198.18.0.10", "vip": "198.18.1.1", "backend": "198.18.2.7",
        "router": "198.18.0.254"},
    6: {"client": "2001:db8::10", "vip": "2001:db8:1::1", "backend": "2001:db8:2::7",
        "router": "2001:db8::fe"},
}
CPORT, VPORT, BPORT = 40000, 80, 8080
PAYLOAD = bytes(range(37))          # odd length on purpose


def entry(family: int, proto: int) -> dict[str, Any]:
    a = ADDR[family]
    return {"client": a["client"], "cport": CPORT, "vip": a["vip"], "vport": VPORT,
            "backend": a["backend"], "bport": BPORT, "proto": proto}


def ends(family: int, dir: int) -> tuple[tuple, tuple]:
    """(src, dst, sport, dport) of the packet before and after the NAT."""
    a = ADDR[family]
    if dir == FWD:
        return ((a["client"], a["vip"], CPORT, VPORT), (a["client"], a["backend"], CPORT, BPORT))
    return ((a["backend"], a["client"], BPORT, CPORT), (a["vip"], a["client"], VPORT, CPORT))


# ------------------------------------------------------------ scapy helpers

def ip(family: int, src: str, dst: str, **kw: Any) -> Packet:
    return IP(src=src, dst=dst, **kw) if family == 4 else IPv6(src=src, dst=dst, **kw)


def splice_ah(pkt: bytes) -> bytes:
    """Insert an IPv6 AH header (24 bytes: length field 4 -> (4 + 2) * 4)
    right after the fixed IPv6 header of pkt. Checksums of the upper layer do
    not cover extension headers, so they stay valid."""
    nh = pkt[6]
    ah = struct.pack("!BBHII", nh, 4, 0, 0x1234, 7) + bytes(12)
    plen = struct.unpack("!H", pkt[4:6])[0] + len(ah)
    return pkt[:4] + struct.pack("!HB", plen, 51) + pkt[7:40] + ah + pkt[40:]


def rebuilt(out: bytes) -> bytes:
    """out dissected by scapy, every checksum field deleted, rebuilt: what
    scapy thinks the checksums should be. ICMP quotes are kept as raw bytes
    (their L4 checksum covers bytes that are not in the quote)."""
    p = IP(out) if out[0] >> 4 == 4 else IPv6(out)
    layer = p
    while layer is not None and not isinstance(layer, Raw | type(None)):
        if isinstance(layer, ICMP | ICMPv6DestUnreach | ICMPv6PacketTooBig):
            quote = bytes(layer.payload)
            layer.remove_payload()
            layer.add_payload(Raw(quote))
        for f in ("chksum", "cksum"):
            if f in layer.fields and not (isinstance(layer, UDP) and layer.chksum == 0):
                delattr(layer, f)           # (a zero UDP checksum means "none")
        layer = layer.payload if layer.payload else None
    return bytes(p)


def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_sum(family: int, src: str, dst: str, proto: int, length: int) -> int:
    """Folded one's-complement sum of the TCP/UDP pseudo-header (RFC 793 /
    RFC 8200 8.1), written independently of the reference."""
    import ipaddress

    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if family == 4:
        raw = s + d + bytes([0, proto]) + struct.pack("!H", length)
    else:
        raw = s + d + struct.pack("!I", length) + bytes([0, 0, 0, proto])
    return fold(sum(struct.unpack(f"!{len(raw) // 2}H", raw)))


# ------------------------------------------------------- valid packet table

Builder = Callable[[int, tuple], bytes]


def tcp(**ipkw: Any) -> Builder:
    def build(family: int, t: tuple) -> bytes:
        src, dst, sport, dport = t
        return bytes(ip(family, src, dst, **ipkw) / TCP(sport=sport, dport=dport, flags="S",
                                                        seq=1000) / Raw(PAYLOAD))
    return build


def udp(**udpkw: Any) -> Builder:
    def build(family: int, t: tuple) -> bytes:
        src, dst, sport, dport = t
        return bytes(ip(family, src, dst) / UDP(sport=sport, dport=dport, **udpkw)
                     / Raw(PAYLOAD))
    return build


def v6ext(*exts: Packet, proto: str = "tcp", ah: bool = False) -> Builder:
    def build(family: int, t: tuple) -> bytes:
        src, dst, sport, dport = t
        p = IPv6(src=src, dst=dst)
        for x in exts:
            p = p / x.copy()
        l4 = (TCP(sport=sport, dport=dport, flags="PA") if proto == "tcp"
              else UDP(sport=sport, dport=dport))
        b = bytes(p / l4 / Raw(PAYLOAD))
        return splice_ah(b) if ah else b
    return build


def tcp_opts(family: int, t: tuple) -> bytes:
    src, dst, sport, dport = t
    opts = [IPOption_Router_Alert(), IPOption_RR(routers=["198.18.0.1"])]
    return bytes(IP(src=src, dst=dst, options=opts)
                 / TCP(sport=sport, dport=dport, flags="S",
                       options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b""),
                                ("Timestamp", (1, 2))]) / Raw(PAYLOAD))


def _after_of(family: int, t: tuple) -> tuple:
    """The post-NAT 5-tuple of the case that t belongs to (t itself if it
    already is one)."""
    for d in (FWD, REV):
        before, after = ends(family, d)
        if t in (before, after):
            return after
    raise AssertionError(t)


def udp_csum_ffff(family: int, t: tuple) -> bytes:
    """A UDP packet whose checksum, once translated, computes to 0 and must
    be sent as 0xffff: the first payload word is chosen so that the
    translated packet's sum is 0xffff; the untranslated one carries the same
    payload (and an ordinary checksum)."""
    src, dst, sport, dport = t
    tsrc, tdst, tsport, tdport = _after_of(family, t)
    base = bytes(ip(family, tsrc, tdst) / UDP(sport=tsport, dport=tdport, chksum=0)
                 / Raw(b"\0\0" + PAYLOAD[2:]))
    l4 = base[20:] if family == 4 else base[40:]
    s = pseudo_sum(family, tsrc, tdst, 17, len(l4))
    l4 += b"\0" * (len(l4) % 2)
    s = fold(s + sum(struct.unpack(f"!{len(l4) // 2}H", l4)))
    word = 0xFFFF - s
    return bytes(ip(family, src, dst) / UDP(sport=sport, dport=dport)
                 / Raw(struct.pack("!H", word) + PAYLOAD[2:]))


@dataclass(frozen=True)
class NatCase:
    """A valid packet: built by `build` from the pre-NAT 5-tuple (input) and
    from the post-NAT one (expected output)."""

    description: str
    family: int
    proto: int
    build: Builder
    partial_ok: bool = True


NAT_CASES = [
    NatCase("v4 tcp", 4, 6, tcp()),
    NatCase("v4 tcp ip+tcp options", 4, 6, tcp_opts),
    NatCase("v4 tcp trailing padding", 4, 6, lambda f, t: tcp()(f, t) + b"\xaa" * 6),
    NatCase("v4 udp", 4, 17, udp()),
    NatCase("v4 udp zero checksum", 4, 17, udp(chksum=0), partial_ok=False),
    NatCase("v4 udp checksum becomes ffff", 4, 17, udp_csum_ffff, partial_ok=False),
    NatCase("v6 tcp", 6, 6, tcp()),
    NatCase("v6 udp", 6, 17, udp()),
    NatCase("v6 udp checksum becomes ffff", 6, 17, udp_csum_ffff, partial_ok=False),
    NatCase("v6 hop-by-hop tcp", 6, 6, v6ext(IPv6ExtHdrHopByHop())),
    NatCase("v6 hbh+dstopt udp", 6, 17,
            v6ext(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), proto="udp")),
    NatCase("v6 routing segleft 0", 6, 6,
            v6ext(IPv6ExtHdrRouting(addresses=["2001:db8:9::1"], segleft=0))),
    NatCase("v6 atomic fragment", 6, 6, v6ext(IPv6ExtHdrFragment(m=0, offset=0, id=7))),
    NatCase("v6 ah tcp", 6, 6, v6ext(ah=True)),
    NatCase("v6 8 extension headers", 6, 17,
            v6ext(IPv6ExtHdrHopByHop(), *[IPv6ExtHdrDestOpt()] * 7, proto="udp")),
]


@pytest.mark.parametrize("dir", [FWD, REV], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", NAT_CASES, ids=lambda c: c.description)
def test_nat_rewrite(case: NatCase, dir: int) -> None:
    before, after = ends(case.family, dir)
    pkt = case.build(case.family, before)
    expected = case.build(case.family, after)
    e = entry(case.family, case.proto)
    info = _core.parse(pkt)
    assert info == ref.parse(pkt)
    assert info["reason"] == "none"
    k = info["key"]
    assert (k["src"], k["dst"], k["sport"], k["dport"]) == before
    assert (k["proto"], k["family"], info["proto"]) == (case.proto, case.family, case.proto)
    out = _core.nat_rewrite(pkt, e, dir)
    assert out == expected
    assert rebuilt(out) == out
    assert ref.nat_rewrite(pkt, e, dir) == out
    k = _core.parse(out)["key"]
    assert (k["src"], k["dst"], k["sport"], k["dport"]) == after


def test_udp_zero_checksum_stays_zero() -> None:
    pkt = udp(chksum=0)(4, ends(4, FWD)[0])
    out = _core.nat_rewrite(pkt, entry(4, 17), FWD)
    assert out[26:28] == b"\0\0"


@pytest.mark.parametrize("case", [c for c in NAT_CASES if c.build is udp_csum_ffff],
                         ids=lambda c: c.description)
def test_udp_computed_zero_is_sent_as_ffff(case: NatCase) -> None:
    for dir in (FWD, REV):
        pkt = case.build(case.family, ends(case.family, dir)[0])
        out = _core.nat_rewrite(pkt, entry(case.family, 17), dir)
        off = _core.parse(out)["l4_off"] + 6
        assert out[off:off + 2] == b"\xff\xff"


def test_tcp_flags_and_trailing_bytes() -> None:
    pkt = tcp()(4, ends(4, FWD)[0]) + b"\xaa" * 6
    info = _core.parse(pkt)
    assert info["tcp_flags"] == 0x02 and info["len"] == len(pkt) - 6
    assert _core.nat_rewrite(pkt, entry(4, 6), FWD)[-6:] == b"\xaa" * 6


# ------------------------------------------------------ CHECKSUM_PARTIAL

def with_partial_seed(family: int, pkt: bytes) -> bytes:
    """pkt with its L4 checksum field replaced by the CHECKSUM_PARTIAL seed
    the kernel would have left: the folded pseudo-header sum, not inverted."""
    info = ref.parse(pkt)
    l4, proto = info["l4_off"], info["proto"]
    k = info["key"]
    length = (info["len"] - l4) if proto == 6 else struct.unpack("!H", pkt[l4 + 4:l4 + 6])[0]
    seed = pseudo_sum(family, k["src"], k["dst"], proto, length)
    off = l4 + (16 if proto == 6 else 6)
    return pkt[:off] + struct.pack("!H", seed) + pkt[off + 2:]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dir", [FWD, REV], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", [c for c in NAT_CASES if c.partial_ok],
                         ids=lambda c: c.description)
def test_nat_rewrite_csum_partial(case: NatCase, dir: int, impl: str) -> None:
    before, after = ends(case.family, dir)
    pkt = with_partial_seed(case.family, case.build(case.family, before))
    expected = with_partial_seed(case.family, case.build(case.family, after))
    out = IMPLS[impl].nat_rewrite(pkt, entry(case.family, case.proto), dir, csum_partial=True)
    assert out == expected


def test_csum_partial_ignores_ports() -> None:
    """Only the addresses enter the seed: same addresses, other ports -> the
    seed is unchanged."""
    a = ADDR[4]
    e = {**entry(4, 6), "backend": a["vip"]}        # backend address == VIP
    pkt = with_partial_seed(4, tcp()(4, ends(4, FWD)[0]))
    out = _core.nat_rewrite(pkt, e, FWD, csum_partial=True)
    assert out[36:38] == pkt[36:38]
    assert out[22:24] == struct.pack("!H", BPORT)


# ------------------------------------------------------------ ICMP errors

def quote_of(family: int, t: tuple, proto: int, n: int | None) -> bytes:
    """The first n bytes (all if None) of a TCP/UDP packet t: what an ICMP
    error quotes."""
    b = (tcp() if proto == 6 else udp())(family, t)
    return b if n is None else b[:n]


def icmp_error(family: int, outer_src: str, outer_dst: str, quote: bytes) -> bytes:
    if family == 4:    # dest unreachable / fragmentation needed
        return bytes(IP(src=outer_src, dst=outer_dst) / ICMP(type=3, code=4, nexthopmtu=1400)
                     / Raw(quote))
    return bytes(IPv6(src=outer_src, dst=outer_dst) / ICMPv6PacketTooBig(mtu=1280) / Raw(quote))


@dataclass(frozen=True)
class IcmpCase:
    description: str
    family: int
    proto: int
    quote_len: int | None     # bytes of the quoted packet; None = all
    dir: int
    from_router: bool = False


ICMP_CASES = [
    IcmpCase("v4 frag-needed fwd quoting udp", 4, 17, None, FWD),
    IcmpCase("v4 frag-needed fwd quoting tcp", 4, 6, None, FWD),
    IcmpCase("v4 frag-needed fwd quoting tcp 8 bytes", 4, 6, 28, FWD),
    IcmpCase("v4 frag-needed fwd quoting udp 8 bytes", 4, 17, 28, FWD),
    IcmpCase("v4 unreach rev from backend quoting udp", 4, 17, None, REV),
    IcmpCase("v4 unreach rev from router quoting tcp", 4, 6, None, REV, from_router=True),
    IcmpCase("v6 too-big fwd quoting tcp", 6, 6, None, FWD),
    IcmpCase("v6 too-big fwd quoting tcp 8 bytes", 6, 6, 48, FWD),
    IcmpCase("v6 too-big rev from backend quoting udp", 6, 17, None, REV),
    IcmpCase("v6 too-big rev from router quoting tcp", 6, 6, 60, REV, from_router=True),
]


def icmp_case_packets(c: IcmpCase) -> tuple[bytes, bytes]:
    """(input, expected output) of an ICMP error case.

    FWD: the balancer sent VIP:vport -> client (its REV translation of the
    backend's backend:bport -> client); a router on the client side reports
    it to the VIP. After the rewrite the error goes to the backend and quotes
    exactly what the backend sent.
    REV: the balancer sent client -> backend:bport (FWD translation of
    client -> VIP:vport); the backend (or a router) reports it to the client.
    After the rewrite it comes from the VIP (a router stays itself) and quotes
    what the client sent."""
    a = ADDR[c.family]
    fwd_before, fwd_after = ends(c.family, FWD)
    rev_before, rev_after = ends(c.family, REV)
    if c.dir == FWD:
        sent = quote_of(c.family, rev_after, c.proto, c.quote_len)
        orig = quote_of(c.family, rev_before, c.proto, c.quote_len)
        pkt = icmp_error(c.family, a["router"], a["vip"], sent)
        exp = icmp_error(c.family, a["router"], a["backend"], orig)
    else:
        sent = quote_of(c.family, fwd_after, c.proto, c.quote_len)
        orig = quote_of(c.family, fwd_before, c.proto, c.quote_len)
        src = a["router"] if c.from_router else a["backend"]
        pkt = icmp_error(c.family, src, a["client"], sent)
        exp = icmp_error(c.family, a["router"] if c.from_router else a["vip"], a["client"], orig)
    return pkt, exp


@pytest.mark.parametrize("case", ICMP_CASES, ids=lambda c: c.description)
def test_icmp_error(case: IcmpCase) -> None:
    pkt, expected = icmp_case_packets(case)
    info = _core.parse(pkt)
    assert info == ref.parse(pkt)
    assert info["reason"] == "none"
    assert info["flags"] & 2                         # F_PKT_ICMP_ERR
    assert info["proto"] == (1 if case.family == 4 else 58)
    # The key is the quoted flow reversed: the direction the error travels.
    # FWD quotes VIP:vport -> client, REV quotes client -> backend:bport;
    # reversed, both are the pre-NAT tuple of a packet going in case.dir.
    k = info["key"]
    before = ends(case.family, case.dir)[0]
    assert (k["src"], k["dst"], k["sport"], k["dport"], k["proto"]) == (*before, case.proto)
    assert info["inner_off"] == info["l4_off"] + 8
    out = _core.nat_rewrite(pkt, entry(case.family, case.proto), case.dir)
    assert out == expected
    assert rebuilt(out) == out
    assert ref.nat_rewrite(pkt, entry(case.family, case.proto), case.dir) == out


def test_icmp_tcp_checksum_outside_short_quote_untouched() -> None:
    """A quote of 8 TCP bytes has no checksum field to fix; the rest still
    translates (this is the short-quote case of the table, spelled out)."""
    c = ICMP_CASES[2]
    pkt, expected = icmp_case_packets(c)
    out = _core.nat_rewrite(pkt, entry(4, 6), FWD)
    assert len(out) == 8 + 20 + 20 + 8 and out == expected


# ------------------------------------------------------- malformed packets

@dataclass(frozen=True)
class PacketCase:
    """katran-style fixture: a packet and the drop reason parse must give
    (expected: the parse fields to check when reason is "none")."""

    description: str
    input: bytes
    reason: str
    expected: dict | None = None


def _v4(l4: Packet, **kw: Any) -> bytes:
    return bytes(IP(src="198.18.0.10", dst="198.18.1.1", **kw) / l4)


def _v6(*layers: Packet, **kw: Any) -> bytes:
    p = IPv6(src="2001:db8::10", dst="2001:db8:1::1", **kw)
    for x in layers:
        p = p / x
    return bytes(p)


def _set(b: bytes, off: int, val: bytes) -> bytes:
    return b[:off] + val + b[off + len(val):]


V4_TCP = _v4(TCP(sport=CPORT, dport=VPORT) / Raw(PAYLOAD))
V4_UDP = _v4(UDP(sport=CPORT, dport=VPORT) / Raw(PAYLOAD))
V6_TCP = _v6(TCP(sport=CPORT, dport=VPORT) / Raw(PAYLOAD))
V6_UDP = _v6(UDP(sport=CPORT, dport=VPORT) / Raw(PAYLOAD))
QUOTE4 = quote_of(4, ends(4, REV)[1], 17, None)
QUOTE6 = quote_of(6, ends(6, REV)[1], 6, None)


def _icmp4(quote: bytes, type: int = 3) -> bytes:
    return bytes(IP(src="198.18.0.254", dst="198.18.1.1") / ICMP(type=type, code=0)
                 / Raw(quote))


def _icmp6(quote: bytes) -> bytes:
    return bytes(IPv6(src="2001:db8::fe", dst="2001:db8:1::1") / ICMPv6PacketTooBig()
                 / Raw(quote))


MALFORMED = [
    PacketCase("empty", b"", "truncated"),
    PacketCase("one byte v4", b"\x45", "truncated"),
    PacketCase("version 5", _set(V4_TCP, 0, b"\x55"), "bad_version"),
    PacketCase("version 0", bytes(40), "bad_version"),
    PacketCase("v4 19 bytes", V4_TCP[:19], "truncated"),
    PacketCase("v4 ihl 4", _set(V4_TCP, 0, b"\x44"), "bad_ihl"),
    PacketCase("v4 ihl past buffer", _set(V4_TCP, 0, b"\x4f")[:56], "bad_ihl"),
    PacketCase("v4 totlen < ihl", _set(V4_TCP, 2, b"\x00\x13"), "bad_totlen"),
    PacketCase("v4 totlen > buffer", V4_TCP[:-1], "truncated"),
    PacketCase("v4 fragment data past 65535", _v4(Raw(PAYLOAD), frag=8189, proto=17),
               "fragment"),
    PacketCase("v4 non-last fragment of 7 bytes", _v4(Raw(bytes(7)), frag=10, flags="MF",
                                                      proto=17), "fragment"),
    PacketCase("v4 first fragment of an icmp message",
               _v4(ICMP(type=8) / Raw(bytes(32)), flags="MF"), "fragment"),
    PacketCase("v4 first fragment cuts the tcp header",
               _v4(Raw(bytes(16)), flags="MF", proto=6), "truncated"),
    PacketCase("v4 gre", _v4(Raw(PAYLOAD), proto=47), "unsupported"),
    PacketCase("v4 tcp header cut", _v4(Raw(bytes(19)), proto=6), "truncated"),
    PacketCase("v4 tcp doff 4", _set(V4_TCP, 32, b"\x40"), "bad_l4"),
    PacketCase("v4 tcp doff past packet", _v4(TCP(dataofs=15)), "bad_l4"),
    PacketCase("v4 udp header cut", _v4(Raw(bytes(7)), proto=17), "truncated"),
    PacketCase("v4 udp len 7", _set(V4_UDP, 24, b"\x00\x07"), "bad_l4"),
    PacketCase("v4 udp len > ip payload", _set(V4_UDP, 24, b"\x00\xff"), "bad_l4"),
    PacketCase("v4 icmp in v6", _v6(ICMP(type=3) / Raw(QUOTE4), nh=1), "unsupported"),
    PacketCase("v6 icmpv6 in v4", _v4(ICMPv6PacketTooBig() / Raw(QUOTE6), proto=58),
               "unsupported"),
    PacketCase("v6 39 bytes", V6_TCP[:39], "truncated"),
    PacketCase("v6 payload length 0 (jumbo)", _set(V6_TCP, 4, b"\x00\x00"), "bad_totlen"),
    PacketCase("v6 payload length > buffer", V6_TCP[:-1], "truncated"),
    PacketCase("v6 udp checksum 0", _v6(UDP(sport=1, dport=2, chksum=0)), "bad_l4"),
    PacketCase("v6 tcp doff 4", _set(V6_TCP, 52, b"\x40"), "bad_l4"),
    PacketCase("v6 udp len 7", _set(V6_UDP, 44, b"\x00\x07"), "bad_l4"),
    PacketCase("v6 hop-by-hop not first",
               _v6(IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop(), TCP()), "bad_exthdr"),
    PacketCase("v6 9 extension headers",
               _v6(*[IPv6ExtHdrDestOpt()] * 9, TCP()), "bad_exthdr"),
    PacketCase("v6 extension header past end",
               _set(_v6(IPv6ExtHdrDestOpt(), TCP()), 41, b"\x05"), "bad_exthdr"),
    PacketCase("v6 extension header cut", _v6(Raw(bytes(4)), nh=60), "bad_exthdr"),
    PacketCase("v6 two fragment headers",
               _v6(IPv6ExtHdrFragment(m=1, nh=44), IPv6ExtHdrFragment(m=1), TCP()),
               "fragment"),
    PacketCase("v6 non-last fragment of 12 bytes",
               _v6(IPv6ExtHdrFragment(offset=8, m=1, nh=17), Raw(bytes(12))), "fragment"),
    PacketCase("v6 routing segleft 1",
               _v6(IPv6ExtHdrRouting(addresses=["2001:db8:9::1"], segleft=1), TCP()),
               "unsupported"),
    PacketCase("v6 esp", _v6(Raw(bytes(32)), nh=50), "unsupported"),
    PacketCase("v6 no next header", _v6(Raw(bytes(8)), nh=59), "unsupported"),
    PacketCase("v4 icmp echo code 1", bytes(IP(src="198.18.0.254", dst="198.18.1.1")
                                             / ICMP(type=8, code=1)), "unsupported"),
    PacketCase("v4 icmp echo reply", bytes(IP(src="198.18.0.254", dst="198.18.1.1")
                                           / ICMP(type=0)), "unsupported"),
    PacketCase("v4 icmp source quench", _icmp4(QUOTE4, type=4), "unsupported"),
    PacketCase("v4 icmp redirect", _icmp4(QUOTE4, type=5), "unsupported"),
    PacketCase("v6 icmpv6 echo behind an extension header",
               _v6(IPv6ExtHdrDestOpt(), ICMPv6EchoRequest()), "unsupported"),
    PacketCase("v4 icmp header cut", _v4(Raw(bytes(7)), proto=1), "truncated"),
    PacketCase("v4 icmp quote ip only", _icmp4(QUOTE4[:20]), "icmp_bad"),
    PacketCase("v4 icmp quote 7 l4 bytes", _icmp4(QUOTE4[:27]), "icmp_bad"),
    PacketCase("v4 icmp quote of icmp", _icmp4(_icmp4(QUOTE4)[:28]), "icmp_bad"),
    PacketCase("v4 icmp quote non-first fragment",
               _icmp4(_set(QUOTE4, 6, b"\x00\x10")), "icmp_bad"),
    PacketCase("v4 icmp quote of v6", _icmp4(V6_TCP[:48]), "icmp_bad"),
    PacketCase("v4 icmp quote of gre", _icmp4(_v4(Raw(PAYLOAD), proto=47)), "icmp_bad"),
    PacketCase("v4 icmp quote ihl 4", _icmp4(_set(QUOTE4, 0, b"\x44")), "icmp_bad"),
    PacketCase("v6 icmp quote plen 0", _icmp6(_set(QUOTE6, 4, b"\x00\x00")), "icmp_bad"),
    PacketCase("v6 icmp quote of icmpv6", _icmp6(_icmp6(QUOTE6)[:48]), "icmp_bad"),
    PacketCase("v6 icmp quote 7 l4 bytes", _icmp6(QUOTE6[:47]), "icmp_bad"),
    PacketCase("v6 icmp quote fragment offset",
               _icmp6(_v6(IPv6ExtHdrFragment(offset=8), TCP())), "icmp_bad"),
    # Valid edge cases, with the fields that make them so.
    PacketCase("v4 icmp echo", _icmp4(bytes(20), type=8), "none", {"flags": 8}),
    PacketCase("v6 icmpv6 echo", _v6(ICMPv6EchoRequest()), "none", {"flags": 8}),
    PacketCase("v4 first fragment (MF)", _v4(TCP(sport=5, dport=6) / Raw(bytes(28)),
                                             flags="MF", id=77),
               "none", {"flags": 4, "key": {"src": "198.18.0.10", "dst": "198.18.1.1",
                                            "sport": 5, "dport": 6, "proto": 6, "family": 4},
                        "frag": {"id": 77, "offset": 0, "length": 48, "nh": 6,
                                 "last": False}}),
    PacketCase("v4 first fragment: udp length counts the datagram",
               _set(_v4(UDP(sport=5, dport=6) / Raw(bytes(32)), flags="MF"), 24, b"\x0b\xb8"),
               "none", {"flags": 4}),
    PacketCase("v4 later fragment", _v4(Raw(PAYLOAD), frag=10, proto=6, id=9), "none",
               {"flags": 4, "l4_off": 20,
                "key": {"src": "198.18.0.10", "dst": "198.18.1.1", "sport": 0, "dport": 0,
                        "proto": 6, "family": 4},
                "frag": {"id": 9, "offset": 80, "length": len(PAYLOAD), "nh": 6,
                         "last": True}}),
    PacketCase("v6 later fragment", _v6(IPv6ExtHdrFragment(offset=8, id=0x12345678, nh=17),
                                        Raw(bytes(20))), "none",
               {"flags": 4, "l4_off": 48, "proto": 17,
                "frag": {"id": 0x12345678, "offset": 64, "length": 20, "nh": 17,
                         "last": True}}),
    PacketCase("v6 first fragment (M=1)",
               _v6(IPv6ExtHdrFragment(m=1, id=5), TCP() / Raw(bytes(4))), "none",
               {"flags": 4, "l4_off": 48,
                "frag": {"id": 5, "offset": 0, "length": 24, "nh": 6, "last": False}}),
    PacketCase("v4 udp len < ip payload (padding, like the kernel)",
               _set(V4_UDP, 24, b"\x00\x08"), "none", {"len": len(V4_UDP)}),
    PacketCase("v4 icmp quote first fragment", _icmp4(_set(QUOTE4, 6, b"\x20\x00")), "none",
               {"flags": 2, "inner_l4_off": 48}),
    PacketCase("v6 icmp quote first fragment",
               _icmp6(_v6(IPv6ExtHdrFragment(m=1), TCP(sport=5, dport=6))), "none",
               {"inner_l4_off": 48 + 40 + 8}),
    PacketCase("v6 icmp quote cut after ports", _icmp6(QUOTE6[:48]), "none",
               {"key": {"src": ADDR[6]["client"], "dst": ADDR[6]["vip"], "sport": CPORT,
                        "dport": VPORT, "proto": 6, "family": 6}}),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: c.description)
def test_malformed(case: PacketCase, impl: str) -> None:
    m = IMPLS[impl]
    info = m.parse(case.input)
    assert info["reason"] == case.reason
    for k, v in (case.expected or {}).items():
        assert info[k] == v, k
    if case.reason != "none":
        assert info == {"reason": case.reason}
        e = entry(6 if case.input[:1] == b"\x60" else 4, 6)
        with pytest.raises(ValueError, match=case.reason):
            m.nat_rewrite(case.input, e, FWD)


@pytest.mark.parametrize("case", MALFORMED, ids=lambda c: c.description)
def test_malformed_c_equals_reference(case: PacketCase) -> None:
    assert _core.parse(case.input) == ref.parse(case.input)


def test_every_drop_reason_of_parse_is_covered() -> None:
    """The table exercises every reason lb_parse can return."""
    parse_reasons = {"truncated", "bad_version", "bad_ihl", "bad_totlen", "bad_exthdr",
                     "fragment", "bad_l4", "unsupported", "icmp_bad"}
    assert parse_reasons <= {c.reason for c in MALFORMED}


# ------------------------------------------------------------ API details

def test_drop_reason_names_match() -> None:
    assert ref.DROP_REASONS == _core.DROP_REASONS


@pytest.mark.parametrize("impl", IMPLS)
def test_entry_as_tuple_and_dict(impl: str) -> None:
    pkt = tcp()(4, ends(4, FWD)[0])
    e = entry(4, 6)
    t = tuple(e[k] for k in ("client", "cport", "vip", "vport", "backend", "bport", "proto"))
    m = IMPLS[impl]
    assert m.nat_rewrite(pkt, e, FWD) == m.nat_rewrite(pkt, t, FWD)


def test_entry_validation() -> None:
    pkt = tcp()(4, ends(4, FWD)[0])
    with pytest.raises(ValueError):
        _core.nat_rewrite(pkt, {**entry(4, 6), "backend": "2001:db8::1"}, FWD)
    with pytest.raises(ValueError):
        _core.nat_rewrite(pkt, {**entry(4, 6), "bport": 70000}, FWD)
    with pytest.raises(ValueError):
        _core.nat_rewrite(pkt, entry(4, 6), 5)
    with pytest.raises(ValueError, match="famil"):
        _core.nat_rewrite(pkt, entry(6, 6), FWD)


@pytest.mark.parametrize("data", [b"", b"\x01", bytes(range(256)) * 3, PAYLOAD, V4_TCP])
def test_inet_checksum(data: bytes) -> None:
    assert _core.inet_checksum(data) == ref.inet_checksum(data)
    assert _core.inet_checksum(V4_TCP[:20]) == 0     # a header with its checksum
