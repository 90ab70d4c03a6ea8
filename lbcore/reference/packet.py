"""Pure-Python oracle for ext/lb_parse.c and ext/lb_nat.c.

Written to be read, not to be fast: the same parse rules as the C core
(see the header comment of lb_parse.c), and a NAT rewrite that recomputes
every checksum it can from scratch (IPv4 headers, TCP/UDP over the whole
segment, the ICMP message) instead of updating it. Only two checksums cannot
be recomputed and are updated by RFC 1624 here too: a CHECKSUM_PARTIAL seed
(it is not a checksum of the bytes present) and the L4 checksum inside an
ICMP quote (it covers bytes that were not quoted).

`parse()` and `nat_rewrite()` return exactly what lbcore._core's functions of
the same names return, so the tests compare the two directly.
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Mirrors enum lb_drop_reason (and _core.DROP_REASONS; a test checks both).
DROP_REASONS: tuple[str, ...] = (
    "none", "truncated", "bad_version", "bad_ihl", "bad_totlen", "bad_exthdr",
    "fragment", "bad_l4", "unsupported", "no_vip", "no_backend",
    "icmp_no_flow", "icmp_bad", "bad_vnet", "flow_full", "no_neigh", "bad_l2",
    "frag_early", "closed_port", "limit_flows", "limit_rate", "new_flow_rate",
    "hold_overflow", "hold_timeout", "no_route", "ttl_exceeded",
)

DIR_FWD = 0
DIR_REV = 1

F_PKT_CSUM_PARTIAL = 1 << 0
F_PKT_ICMP_ERR = 1 << 1
F_PKT_FRAGMENT = 1 << 2
F_PKT_ECHO = 1 << 3

AF_INET = 4
AF_INET6 = 6

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58
HOPOPTS = 0
ROUTING = 43
FRAGMENT = 44
AH = 51
DSTOPTS = 60

MAX_EXTHDR = 8  # LB_MAX_EXTHDR

ICMP4_ERRORS = {3, 11, 12}      # dest unreachable, time exceeded, parameter problem
ICMP6_ERRORS = {1, 2, 3, 4}     # dest unreachable, too big, time exceeded, parameter


class Drop(Exception):
    """Parse failure; .reason is a DROP_REASONS name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Walk:
    l4_off: int
    end: int
    proto: int
    frag: dict | None = None    # the outer header is a fragment: id, offset, length, nh, last


def _frag(ident: int, offset: int, length: int, nh: int, last: bool) -> dict:
    """A fragment's fields, checked as lb_parse.c's frag_check does: the data must end by
    65535, and a non-last fragment's data is a non-empty multiple of 8 bytes."""
    if offset + length > 65535 or (not last and (length == 0 or length % 8)):
        raise Drop("fragment")
    return {"id": ident, "offset": offset, "length": length, "nh": nh, "last": last}


def _be16(d: bytes, off: int) -> int:
    return (d[off] << 8) | d[off + 1]


def _walk_ip4(d: bytes, off: int, end: int, quote: bool) -> _Walk:
    if end - off < 20:
        raise Drop("truncated")
    if d[off] >> 4 != 4:
        raise Drop("bad_version")
    hl = (d[off] & 0x0F) * 4
    if hl < 20 or hl > end - off:
        raise Drop("bad_ihl")
    tot = _be16(d, off + 2)
    frag = _be16(d, off + 6)
    if not quote:
        if tot < hl:
            raise Drop("bad_totlen")
        if tot > end - off:
            raise Drop("truncated")
        end = off + tot
        if frag & 0x3FFF:          # MF or a fragment offset
            return _Walk(off + hl, end, d[off + 9],
                         _frag(_be16(d, off + 4), (frag & 0x1FFF) * 8, tot - hl, d[off + 9],
                               not frag & 0x2000))
    else:
        if tot < hl + 8:
            raise Drop("bad_totlen")
        if frag & 0x1FFF:          # a quoted non-first fragment has no ports
            raise Drop("fragment")
    return _Walk(off + hl, end, d[off + 9])


def _walk_ip6(d: bytes, off: int, end: int, quote: bool) -> _Walk:
    if end - off < 40:
        raise Drop("truncated")
    if d[off] >> 4 != 6:
        raise Drop("bad_version")
    plen = _be16(d, off + 4)
    if plen == 0:                  # jumbogram (RFC 2675) or no payload
        raise Drop("bad_totlen")
    if not quote:
        if plen > end - off - 40:
            raise Drop("truncated")
        end = off + 40 + plen
    nh = d[off + 6]
    cur = off + 40
    frag = None
    for i in range(MAX_EXTHDR + 1):
        if nh in (TCP, UDP, ICMPV6):
            return _Walk(cur, end, nh, frag)
        if nh not in (HOPOPTS, ROUTING, DSTOPTS, FRAGMENT, AH):
            raise Drop("unsupported")  # ESP, no next header, ...
        if i == MAX_EXTHDR:
            raise Drop("bad_exthdr")
        if nh == HOPOPTS and i != 0:
            raise Drop("bad_exthdr")
        if end - cur < 8:
            raise Drop("bad_exthdr")
        if nh == FRAGMENT:
            fo = _be16(d, cur + 2)
            if quote and fo & 0xFFF8:
                raise Drop("fragment")
            if not quote and fo & 0xFFF9:      # not an atomic fragment
                if frag is not None:
                    raise Drop("fragment")     # a second Fragment header
                frag = _frag(int.from_bytes(d[cur + 4:cur + 8], "big"), fo & 0xFFF8,
                             end - cur - 8, d[cur], not fo & 1)
                if frag["offset"]:             # a later fragment: no more headers
                    return _Walk(cur + 8, end, d[cur], frag)
            hlen = 8
        elif nh == AH:
            hlen = (d[cur + 1] + 2) * 4
        else:
            hlen = (d[cur + 1] + 1) * 8
        if hlen > end - cur:
            raise Drop("bad_exthdr")
        if nh == ROUTING and d[cur + 3] != 0:
            raise Drop("unsupported")  # segments left: not the final destination
        nh = d[cur]
        cur += hlen
    raise AssertionError("unreachable")


def _walk(d: bytes, off: int, end: int, family: int, quote: bool) -> _Walk:
    if family == AF_INET:
        return _walk_ip4(d, off, end, quote)
    return _walk_ip6(d, off, end, quote)


def _addrs(d: bytes, ip_off: int, family: int) -> tuple[str, str]:
    if family == AF_INET:
        return (str(ipaddress.IPv4Address(d[ip_off + 12:ip_off + 16])),
                str(ipaddress.IPv4Address(d[ip_off + 16:ip_off + 20])))
    return (str(ipaddress.IPv6Address(d[ip_off + 8:ip_off + 24])),
            str(ipaddress.IPv6Address(d[ip_off + 24:ip_off + 40])))


def _parse(d: bytes) -> dict:
    if len(d) < 1:
        raise Drop("truncated")
    version = d[0] >> 4
    if version not in (4, 6):
        raise Drop("bad_version")
    family = AF_INET if version == 4 else AF_INET6
    w = _walk(d, 0, len(d), family, quote=False)
    end = w.end
    src, dst = _addrs(d, 0, family)
    res = {
        "reason": "none", "family": family, "proto": w.proto, "tcp_flags": 0, "flags": 0,
        "len": end, "l4_off": w.l4_off, "inner_off": 0, "inner_l4_off": 0,
        "key": {"src": src, "dst": dst, "sport": 0, "dport": 0, "proto": w.proto,
                "family": family},
    }
    l4 = w.l4_off
    if w.frag is not None:
        res["flags"] = F_PKT_FRAGMENT
        res["frag"] = w.frag
        if w.frag["offset"]:
            return res                 # a later fragment: no transport header
        if w.proto not in (TCP, UDP):
            raise Drop("fragment")
    if w.proto == TCP:
        if end - l4 < 20:
            raise Drop("truncated")
        doff = (d[l4 + 12] >> 4) * 4
        if doff < 20 or doff > end - l4:
            raise Drop("bad_l4")
        res["tcp_flags"] = d[l4 + 13]
    elif w.proto == UDP:
        if end - l4 < 8:
            raise Drop("truncated")
        ulen = _be16(d, l4 + 4)
        # a first fragment's UDP length counts the whole datagram
        if ulen < 8 or (ulen > end - l4 and w.frag is None):
            raise Drop("bad_l4")
        if family == AF_INET6 and _be16(d, l4 + 6) == 0:
            raise Drop("bad_l4")   # RFC 8200 8.1
    elif (w.proto == ICMP and family == AF_INET) or (w.proto == ICMPV6 and family == AF_INET6):
        if end - l4 >= 8 and d[l4 + 1] == 0 and (
                d[l4] == 8 if family == AF_INET else (d[l4] == 128 and l4 == 40)):
            res["flags"] = F_PKT_ECHO   # an echo request (IPv6: no extension headers)
            return res
        return _parse_icmp_err(d, family, l4, end, res)
    else:
        raise Drop("unsupported")
    res["key"]["sport"] = _be16(d, l4)
    res["key"]["dport"] = _be16(d, l4 + 2)
    return res


def _parse_icmp_err(d: bytes, family: int, l4: int, end: int, res: dict) -> dict:
    if end - l4 < 8:
        raise Drop("truncated")
    if d[l4] not in (ICMP4_ERRORS if family == AF_INET else ICMP6_ERRORS):
        raise Drop("unsupported")
    inner = l4 + 8
    try:
        w = _walk(d, inner, end, family, quote=True)
    except Drop:
        raise Drop("icmp_bad") from None
    if w.proto not in (TCP, UDP) or end - w.l4_off < 8:
        raise Drop("icmp_bad")
    qsrc, qdst = _addrs(d, inner, family)
    res["flags"] = F_PKT_ICMP_ERR
    res["inner_off"] = inner
    res["inner_l4_off"] = w.l4_off
    res["key"] = {"src": qdst, "dst": qsrc, "sport": _be16(d, w.l4_off + 2),
                  "dport": _be16(d, w.l4_off), "proto": w.proto, "family": family}
    return res


def parse(data: bytes) -> dict:
    """Same contract as lbcore._core.parse: {"reason": name} on a drop, else
    the full description (offsets, flags, key as Python values)."""
    try:
        return _parse(bytes(data))
    except Drop as e:
        return {"reason": e.reason}


# ---------------------------------------------------------------- checksums

def csum_sum(data: bytes) -> int:
    """One's-complement sum of big-endian 16-bit words, folded to 16 bits
    (an odd last byte is padded with a zero byte)."""
    if len(data) % 2:
        data = data + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum: the value to store in the field."""
    return ~csum_sum(data) & 0xFFFF


def _pseudo(family: int, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if family == AF_INET:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def _incremental(check: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over the changed words."""
    s = ~check & 0xFFFF
    for i in range(0, len(old), 2):
        s += (~_be16(old, i) & 0xFFFF) + _be16(new, i)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


@dataclass(frozen=True)
class Entry:
    """A flow's translation, addresses packed (4 or 16 bytes)."""

    client: bytes
    cport: int
    vip: bytes
    vport: int
    backend: bytes
    bport: int
    proto: int


def make_entry(entry: Mapping | Sequence) -> Entry:
    """Entry from a dict or a (client, cport, vip, vport, backend, bport,
    proto) tuple, as lbcore._core.nat_rewrite takes it."""
    if isinstance(entry, Mapping):
        keys = ("client", "cport", "vip", "vport", "backend", "bport", "proto")
        vals = tuple(entry[k] for k in keys)
    else:
        vals = tuple(entry)
    c, cp, v, vp, b, bp, proto = vals
    addrs = [ipaddress.ip_address(a) for a in (c, v, b)]
    if len({a.version for a in addrs}) != 1:
        raise ValueError("entry: client, vip and backend must be of one family")
    return Entry(addrs[0].packed, int(cp), addrs[1].packed, int(vp), addrs[2].packed,
                 int(bp), int(proto))


def _put16(buf: bytearray, off: int, v: int) -> None:
    buf[off:off + 2] = struct.pack("!H", v)


def _l4_csum_off(proto: int) -> int:
    return 16 if proto == TCP else 6


def _ip_fields(family: int) -> tuple[int, int, int]:
    """(src offset, dst offset, address length) in an IP header."""
    return (12, 16, 4) if family == AF_INET else (8, 24, 16)


def nat_rewrite(data: bytes, entry: Mapping | Sequence, dir: int,
                csum_partial: bool = False) -> bytes:
    """Same contract as lbcore._core.nat_rewrite: the packet rewritten for
    the flow entry in direction dir; ValueError if it does not parse."""
    info = parse(data)
    if info["reason"] != "none":
        raise ValueError(f"packet dropped by parse: {info['reason']}")
    e = make_entry(entry)
    family = info["family"]
    if len(e.vip) != (4 if family == AF_INET else 16):
        raise ValueError("packet and entry are of different families")
    if info["flags"] & F_PKT_ECHO:
        raise ValueError("an echo request is answered, not translated")
    buf = bytearray(data)
    if info["flags"] & F_PKT_ICMP_ERR:
        _nat_icmp(buf, info, e, dir)
    elif "frag" in info and info["frag"]["offset"]:
        _nat_ip(buf, family, e, dir)   # a later fragment: its IP header only
    else:
        _nat_l4(buf, info, e, dir, csum_partial)
    return bytes(buf)


def _nat_ip(buf: bytearray, family: int, e: Entry, dir: int) -> None:
    so, do, alen = _ip_fields(family)
    if dir == DIR_FWD:
        buf[do:do + alen] = e.backend
    else:
        buf[so:so + alen] = e.vip
    if family == AF_INET:
        _fix_ip4_header(buf, 0)


def _fix_ip4_header(buf: bytearray, off: int) -> None:
    hl = (buf[off] & 0x0F) * 4
    _put16(buf, off + 10, 0)
    _put16(buf, off + 10, inet_checksum(bytes(buf[off:off + hl])))


def _nat_l4(buf: bytearray, info: dict, e: Entry, dir: int, partial: bool) -> None:
    family, proto, l4, end = info["family"], info["proto"], info["l4_off"], info["len"]
    so, do, alen = _ip_fields(family)
    if dir == DIR_FWD:
        aoff, poff, to, to_port = do, l4 + 2, e.backend, e.bport
    else:
        aoff, poff, to, to_port = so, l4, e.vip, e.vport
    coff = l4 + _l4_csum_off(proto)
    old_check = _be16(buf, coff)
    old_addr = bytes(buf[aoff:aoff + alen])

    buf[aoff:aoff + alen] = to
    _put16(buf, poff, to_port)
    if family == AF_INET:
        _fix_ip4_header(buf, 0)

    if partial:
        # Seed of a checksum still to be completed: fold(old + ~from + to).
        _put16(buf, coff, ~_incremental(~old_check & 0xFFFF, old_addr, to) & 0xFFFF)
        return
    if proto == UDP and old_check == 0:
        return                       # IPv4 UDP without checksum stays without
    seg_end = l4 + _be16(buf, l4 + 4) if proto == UDP else end
    src, dst = bytes(buf[so:so + alen]), bytes(buf[do:do + alen])
    _put16(buf, coff, 0)
    seg = bytes(buf[l4:seg_end])
    c = inet_checksum(_pseudo(family, src, dst, proto, len(seg)) + seg)
    if proto == UDP and c == 0:
        c = 0xFFFF
    _put16(buf, coff, c)


def _nat_icmp(buf: bytearray, info: dict, e: Entry, dir: int) -> None:
    family, end, l4 = info["family"], info["len"], info["l4_off"]
    inner, il4, qproto = info["inner_off"], info["inner_l4_off"], info["key"]["proto"]
    so, do, alen = _ip_fields(family)
    if dir == DIR_FWD:      # quote VIP:vport -> client; outer dst VIP
        in_aoff, in_poff, out_aoff = inner + so, il4, do
        to, to_port = e.backend, e.bport
    else:                   # quote client -> backend:bport; outer src maybe backend
        in_aoff, in_poff, out_aoff = inner + do, il4 + 2, so
        if bytes(buf[so:so + alen]) != e.backend:
            out_aoff = None
        to, to_port = e.vip, e.vport

    # The quoted L4 checksum covers bytes we do not have: RFC 1624 update.
    coff = il4 + _l4_csum_off(qproto)
    if coff + 2 <= end:
        old = _be16(buf, coff)
        if not (qproto == UDP and old == 0):
            old_words = bytes(buf[in_aoff:in_aoff + alen]) + bytes(buf[in_poff:in_poff + 2])
            new_words = to + struct.pack("!H", to_port)
            c = _incremental(old, old_words, new_words)
            if qproto == UDP and c == 0:
                c = 0xFFFF
            _put16(buf, coff, c)
    buf[in_aoff:in_aoff + alen] = to
    _put16(buf, in_poff, to_port)
    if family == AF_INET:
        _fix_ip4_header(buf, inner)
    if out_aoff is not None:
        buf[out_aoff:out_aoff + alen] = to
    if family == AF_INET:
        _fix_ip4_header(buf, 0)

    _put16(buf, l4 + 2, 0)
    msg = bytes(buf[l4:end])
    if family == AF_INET:
        c = inet_checksum(msg)
    else:
        c = inet_checksum(_pseudo(family, bytes(buf[so:so + alen]), bytes(buf[do:do + alen]),
                                  ICMPV6, len(msg)) + msg)
    _put16(buf, l4 + 2, c)


def fix_checksums(data: bytes) -> bytes:
    """data with every checksum that nat_rewrite maintains recomputed from
    scratch (IPv4 headers, TCP/UDP, ICMP; a zero IPv4 UDP checksum stays
    zero; a quoted L4 checksum is left alone: it covers bytes not quoted).

    For tests that mutate packets: the incremental C update and this oracle
    agree exactly when the input's checksums are right, and this makes them
    right. ValueError if the packet does not parse."""
    info = parse(data)
    if info["reason"] != "none":
        raise ValueError(f"packet dropped by parse: {info['reason']}")
    buf = bytearray(data)
    family, proto, l4, end = info["family"], info["proto"], info["l4_off"], info["len"]
    so, do, alen = _ip_fields(family)
    src, dst = bytes(buf[so:so + alen]), bytes(buf[do:do + alen])
    if family == AF_INET:
        _fix_ip4_header(buf, 0)
    if info["flags"] & F_PKT_ICMP_ERR:
        if family == AF_INET:
            _fix_ip4_header(buf, info["inner_off"])
        _put16(buf, l4 + 2, 0)
        msg = bytes(buf[l4:end])
        pseudo = b"" if family == AF_INET else _pseudo(family, src, dst, ICMPV6, len(msg))
        _put16(buf, l4 + 2, inet_checksum(pseudo + msg))
        return bytes(buf)
    if info.get("frag") and info["frag"]["offset"]:
        return bytes(buf)              # a later fragment: no transport checksum to fix
    coff = l4 + _l4_csum_off(proto)
    if proto == UDP and _be16(buf, coff) == 0:
        return bytes(buf)
    seg_end = l4 + _be16(buf, l4 + 4) if proto == UDP else end
    _put16(buf, coff, 0)
    seg = bytes(buf[l4:seg_end])
    c = inet_checksum(_pseudo(family, src, dst, proto, len(seg)) + seg)
    _put16(buf, coff, 0xFFFF if proto == UDP and c == 0 else c)
    return bytes(buf)
