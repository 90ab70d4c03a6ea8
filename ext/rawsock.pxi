# rawsock.pxi - AF_PACKET sockets with TPACKET_V2 rings (mode "rawsock").
# The sockets are opened here (C does the setsockopt/mmap sequence, see
# lb_rawsock.c); lbcore.rawsock decides links, filters and fanout groups.
import ipaddress as _rs_ipaddress

@cython.final
cdef class RawSocket:
    """One AF_PACKET socket bound to a link, with a TPACKET_V2 receive ring
    (per-frame hand-over: no block retire timer on the path), a
    virtio_net_hdr per frame, a classic-BPF filter and a fanout group.

    RawSocket(ifindex, fanout_id, bpf, frame_nr=8192, qdisc_bypass=True)
      frame_nr: ring slots of LB_RAW_FRAME (2 KiB) bytes, rounded up to whole
        64 KiB blocks; a larger frame is read whole from the socket's queue.
      bpf: sequence of (code, jt, jf, k) instructions (empty: every frame).
      fanout_id: PACKET_FANOUT_HASH group id, 1..65535 (0: no fanout).
    Raises OSError (e.g. PermissionError without CAP_NET_RAW)."""
    cdef lb_raw_sock s
    cdef readonly uint32_t ifindex

    def __cinit__(self, uint32_t ifindex, uint32_t fanout_id, bpf=(),
                  uint32_t frame_nr=8192, bint qdisc_bypass=True):
        cdef Py_ssize_t n = len(bpf)
        cdef sock_filter *prog = NULL
        cdef int rc
        self.s.fd = -1
        if fanout_id > 0xffff:
            raise ValueError(f"fanout_id must be 0..65535, not {fanout_id}")
        prog = _bpf_program(bpf)
        try:
            with nogil:
                rc = lb_raw_open(&self.s, ifindex, <uint16_t>fanout_id, prog, <uint16_t>n,
                                 frame_nr, qdisc_bypass)
        finally:
            free(prog)
        if rc < 0:
            raise convert_errno(rc, f"AF_PACKET socket on ifindex {ifindex}")
        self.ifindex = ifindex

    def __dealloc__(self):
        lb_raw_close(&self.s)

    def set_filter(self, bpf):
        """Replace the BPF filter (atomically, in the kernel)."""
        cdef sock_filter *prog = _bpf_program(bpf)
        cdef int rc
        try:
            rc = lb_raw_set_filter(&self.s, prog, <uint16_t>len(bpf))
        finally:
            free(prog)
        if rc < 0:
            raise convert_errno(rc, "SO_ATTACH_FILTER")

    def ring_stats(self):
        """(frames received, frames dropped because the ring was full) since the last call
        (PACKET_STATISTICS; reading resets the kernel's counters)."""
        cdef uint32_t packets = 0, drops = 0
        cdef int rc = lb_raw_ring_stats(&self.s, &packets, &drops)
        if rc < 0:
            raise convert_errno(rc, "PACKET_STATISTICS")
        return packets, drops

    def close(self):
        """Close the socket and unmap its ring (idempotent)."""
        lb_raw_close(&self.s)

    @property
    def fd(self):
        return self.s.fd

    @property
    def ring_bytes(self):
        return self.s.ring_len

    @property
    def ring_frames(self):
        return self.s.frame_nr


cdef sock_filter *_bpf_program(bpf) except? NULL:
    """(code, jt, jf, k) tuples -> a calloc'ed sock_filter array (NULL if empty)."""
    cdef Py_ssize_t n = len(bpf), i
    cdef sock_filter *prog
    if n == 0:
        return NULL
    if n > 4096:
        raise ValueError(f"BPF program of {n} instructions (max 4096)")
    prog = <sock_filter *>calloc(n, sizeof(sock_filter))
    if prog == NULL:
        raise MemoryError()
    try:
        for i, (code, jt, jf, k) in enumerate(bpf):
            prog[i].code = code
            prog[i].jt = jt
            prog[i].jf = jf
            prog[i].k = k
    except BaseException:
        free(prog)
        raise
    return prog
