# packet.pxi - one packet through parse (lb_parse.c) and the NAT rewrite
# (lb_nat.c), for tests and the reference comparison (the benchmark loop is
# parse_rewrite_batch in ext/_testing.pyx).
#
# Every call copies the packet into a malloc'd buffer of exactly its length:
# the C core then reads the caller's bytes through a pointer whose end is the
# end of an allocation, which is what lets the sanitizer build catch a
# one-byte over-read (a bytes object has slack after its data).
# Address and port helpers: addr.pxi.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


cdef int _pk_entry(object entry, lb_flow_entry *e) except -1:
    """Fill a flow entry from a dict (client, cport, vip, vport, backend, bport,
    proto) or a tuple in that order. All three addresses share one family."""
    if isinstance(entry, dict):
        vals = tuple(entry[k] for k in
                     ("client", "cport", "vip", "vport", "backend", "bport", "proto"))
    else:
        vals = tuple(entry)
        if len(vals) != 7:
            raise ValueError("entry: (client, cport, vip, vport, backend, bport, proto)")
    memset(e, 0, sizeof(lb_flow_entry))
    fam = {_fill_addr(e.client, vals[0]), _fill_addr(e.vip, vals[2]),
           _fill_addr(e.backend, vals[4])}
    if len(fam) != 1:
        raise ValueError("entry: client, vip and backend must be of one family")
    e.family = <uint8_t>fam.pop()
    e.cport = _port_be(vals[1])
    e.vport = _port_be(vals[3])
    e.bport = _port_be(vals[5])
    if vals[6] not in (6, 17):
        raise ValueError(f"entry: proto must be 6 (TCP) or 17 (UDP), not {vals[6]!r}")
    e.proto = <uint8_t>vals[6]
    return 0


cdef uint8_t *_pk_copy(bytes data) except? NULL:
    """A malloc'd copy of exactly len(data) bytes (NULL for empty data)."""
    cdef Py_ssize_t n = len(data)
    cdef uint8_t *buf
    if n == 0:
        return NULL
    if n > 0xffffffff:
        raise ValueError("packet too large")
    buf = <uint8_t *>malloc(n)
    if buf == NULL:
        raise MemoryError()
    memcpy(buf, PyBytes_AS_STRING(data), n)
    return buf


cdef dict _pk_pkt_dict(const lb_pkt *p):
    k = &p.key
    d = {
        "reason": "none",
        "family": p.family,
        "proto": p.proto,
        "tcp_flags": p.tcp_flags,
        "flags": p.flags,
        "len": p.len,
        "l4_off": p.l4_off,
        "inner_off": p.inner_off,
        "inner_l4_off": p.inner_l4_off,
        "key": {
            "src": _addr_str(k.src, k.family),
            "dst": _addr_str(k.dst, k.family),
            "sport": _host16(k.sport),
            "dport": _host16(k.dport),
            "proto": k.proto,
            "family": k.family,
        },
    }
    if p.flags & F_PKT_FRAGMENT:
        raw = (<uint8_t *>&p.frag_id)
        d["frag"] = {
            "id": (raw[0] << 8 | raw[1]) if p.family == LB_AF_INET
            else (<uint32_t>raw[0] << 24 | <uint32_t>raw[1] << 16 | <uint32_t>raw[2] << 8
                  | raw[3]),
            "offset": p.frag_off, "length": p.frag_len, "nh": p.frag_nh,
            "last": bool(p.frag_last),
        }
    return d


def parse(data) -> dict:
    """Parse one IP packet (no L2 header) with lb_parse().

    Returns {"reason": name} (a DROP_REASONS name) if the packet is dropped;
    otherwise "reason" is "none" and the dict also holds family (4/6), proto,
    tcp_flags, flags (F_PKT_*), len (bytes of IP packet), l4_off, inner_off,
    inner_l4_off (ICMP errors) and key: src/dst (str), sport/dport (int),
    proto, family. For an ICMP error the key is the quoted flow, reversed.
    A fragment also has frag: id, offset, length (bytes), nh, last.
    """
    cdef bytes b = bytes(data)
    cdef lb_pkt p
    cdef uint8_t *buf = _pk_copy(b)
    cdef lb_drop_reason r
    try:
        r = lb_parse(buf, <uint32_t>len(b), &p)
        if r != LB_DROP_NONE:
            return {"reason": DROP_REASONS[<int>r]}
        return _pk_pkt_dict(&p)
    finally:
        free(buf)


def nat_rewrite(data, entry, int dir, bint csum_partial=False) -> bytes:
    """Parse data and rewrite it for the flow entry in direction dir
    (DIR_FWD: VIP:vport -> backend:bport as destination; DIR_REV:
    backend:bport -> VIP:vport as source). csum_partial marks a virtio
    NEEDS_CSUM packet (the L4 checksum field holds the pseudo-header sum).

    Returns the rewritten packet (the same length as data: bytes past the IP
    length are left as they are). Raises ValueError if the packet does not
    parse (the message names the drop reason) or the entry is bad.
    """
    cdef bytes b = bytes(data)
    cdef lb_pkt p
    cdef lb_flow_entry e
    cdef uint8_t *buf
    cdef lb_drop_reason r
    if dir != LB_DIR_FWD and dir != LB_DIR_REV:
        raise ValueError(f"dir must be DIR_FWD or DIR_REV, not {dir}")
    _pk_entry(entry, &e)
    buf = _pk_copy(b)
    try:
        r = lb_parse(buf, <uint32_t>len(b), &p)
        if r != LB_DROP_NONE:
            raise ValueError(f"packet dropped by parse: {DROP_REASONS[<int>r]}")
        if p.family != e.family:
            raise ValueError("packet and entry are of different families")
        if p.flags & F_PKT_ECHO:
            raise ValueError("an echo request is answered, not translated")
        if csum_partial:
            p.flags |= F_PKT_CSUM_PARTIAL
        lb_nat_rewrite(&p, &e, <lb_dir>dir)
        return PyBytes_FromStringAndSize(<char *>buf, len(b))
    finally:
        free(buf)


def inet_checksum(data) -> int:
    """The Internet checksum (RFC 1071) of data, via lb_csum_partial(): the
    value to store, as a host-order int. Of data with a correct checksum
    field inside it, 0."""
    cdef bytes b = bytes(data)
    cdef uint32_t s = lb_csum_partial(<const uint8_t *>PyBytes_AS_STRING(b), len(b), 0)
    return (~lb_csum_fold(s)) & 0xffff
