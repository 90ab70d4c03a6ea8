# addr.pxi - Python values <-> fields of the C structs (lb_types.h), in one
# place for every other .pxi: addresses, ports, protocols, flow keys, flow
# entries and idle timeouts.
import socket as _socket

PROTO_NUMBERS = {"tcp": 6, "udp": 17}
_STATE_IDS = {name: sid for sid, name in FLOW_STATES.items()}


cdef int _fill_addr(uint8_t *out, object addr) except -1:
    """Write an IPv4/IPv6 address (str or ipaddress object) into 16 bytes,
    IPv4 in the first 4 and zeroes after (lb_types.h); return LB_AF_INET or
    LB_AF_INET6. inet_pton is the judge, so C and the reference agree on what
    is an address (no scoped IPv6, no leading zeros)."""
    cdef bytes raw
    cdef int family
    if addr is None:
        raise ValueError("address is None")
    s = addr if isinstance(addr, str) else str(addr)
    try:
        if ":" in s:
            raw = _socket.inet_pton(_socket.AF_INET6, s)
            family = LB_AF_INET6
        else:
            raw = _socket.inet_pton(_socket.AF_INET, s)
            family = LB_AF_INET
    except (OSError, UnicodeError, ValueError):
        raise ValueError(f"not an IPv4 or IPv6 address: {addr!r}") from None
    memset(out, 0, 16)
    memcpy(out, <const char *>raw, len(raw))
    return family


cdef tuple _addr16(object addr):
    """(family, 16 bytes) of an address, as _fill_addr writes them."""
    cdef uint8_t b[16]
    cdef int family = _fill_addr(b, addr)
    return family, bytes(b[:16])


cdef str _addr_str(const uint8_t *a, int family):
    cdef bytes raw = (<const char *>a)[:4] if family == LB_AF_INET else (<const char *>a)[:16]
    return _socket.inet_ntop(_socket.AF_INET if family == LB_AF_INET else _socket.AF_INET6, raw)


# _be16 and _host16 (ports <-> struct fields) are inline in lbcore/_core.pxd.


cdef uint16_t _port_be(object port, str what="port") except? 0:
    """A port 0..65535 (ValueError otherwise) as the struct's big-endian value."""
    if not (0 <= port <= 0xFFFF):
        raise ValueError(f"{what} out of range: {port!r}")
    return _be16(<uint32_t>port)


cdef int _proto(object proto) except -1:
    """"tcp"/"udp" or 6/17 -> the protocol number."""
    if isinstance(proto, str):
        try:
            return PROTO_NUMBERS[proto.lower()]
        except KeyError:
            raise ValueError(f"unknown protocol: {proto!r}") from None
    if proto != 6 and proto != 17:
        raise ValueError(f"protocol must be 6 (tcp) or 17 (udp): {proto!r}")
    return <int>proto


cdef int _state(object state) except -1:
    """A flow state name (FLOW_STATES) or number -> enum lb_flow_state."""
    if isinstance(state, str):
        try:
            return _STATE_IDS[state]
        except KeyError:
            raise ValueError(f"unknown flow state: {state!r}") from None
    if state not in FLOW_STATES:
        raise ValueError(f"unknown flow state: {state!r}")
    return <int>state


cdef int _fill_key(lb_flow_key *k, src, dst, sport, dport, proto) except -1:
    """A flow key from a Python 5-tuple: addresses (str or ipaddress), ports
    in host order (stored big-endian, as the packet has them), the protocol
    as a number 0..255 or "tcp"/"udp"; pad zeroed."""
    if isinstance(proto, str):
        proto = _proto(proto)
    if not (0 <= proto <= 0xFF):
        raise ValueError(f"proto out of range: {proto!r}")
    memset(k, 0, sizeof(lb_flow_key))
    cdef int f1 = _fill_addr(k.src, src)
    cdef int f2 = _fill_addr(k.dst, dst)
    if f1 != f2:
        raise ValueError(f"address families differ: {src!r}, {dst!r}")
    k.sport = _port_be(sport, "sport")
    k.dport = _port_be(dport, "dport")
    k.proto = <uint8_t>proto
    k.family = <uint8_t>f1
    return 0


cdef dict _entry_dict(const lb_flow_entry *e):
    """A tracked flow as Python values (what `lbcore flows` shows)."""
    return {
        "client": _addr_str(e.client, e.family), "cport": _host16(e.cport),
        "vip": _addr_str(e.vip, e.family), "vport": _host16(e.vport),
        "backend": _addr_str(e.backend, e.family), "bport": _host16(e.bport),
        "proto": e.proto, "family": e.family,
        "state": FLOW_STATES.get(e.state, str(e.state)),
        "flags": e.flags, "rev_seen": bool(e.flags & F_FLOW_REV_SEEN),
        "vip_stat": e.vip_stat, "be_stat": e.be_stat, "last_seen": e.last_seen,
    }


cdef dict _fill_timeouts(lb_timeouts *tmo, object timeouts):
    """Idle timeouts in ms keyed as DEFAULT_TIMEOUTS_MS (missing keys take
    the default) into *tmo; returns the merged dict."""
    merged = dict(DEFAULT_TIMEOUTS_MS)
    for key, value in (timeouts or {}).items():
        if key not in merged:
            raise ValueError(f"unknown flow timeout {key!r}; known: {sorted(merged)}")
        if not 0 < int(value) < 2 ** 31:
            raise ValueError(f"flow timeout {key}={value!r} must be 1..2^31-1 ms")
        merged[key] = int(value)
    tmo.tcp_syn = merged["tcp_syn"]
    tmo.tcp_est = merged["tcp_established"]
    tmo.tcp_fin = merged["tcp_fin"]
    tmo.tcp_close = merged["tcp_close"]
    tmo.udp = merged["udp"]
    tmo.udp_stream = merged["udp_stream"]
    return merged
