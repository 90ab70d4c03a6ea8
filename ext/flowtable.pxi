# flowtable.pxi - FlowTable: the shared connection table (ext/lb_flow.c).
#
# Used by the control plane (`lbcore flows`, expiry, purge on backend
# failure) and by tests. The benchmark and stress loops over it (fill,
# lookup_batch, hammer) live in the testing extension, ext/_testing.pyx.
from libc.errno cimport EEXIST, EINVAL

import os as _ft_os

_FT_WALK_CHUNK = 256


cdef class FlowTable:
    """The connection table: one entry per connection, found from both
    directions, fixed capacity, idle timeouts per state (ext/lb_flow.c).

    FlowTable(capacity, seed=None, timeouts=None): seed keys the bucket hash
    (random from os.urandom when None); timeouts is a dict in ms with keys of
    DEFAULT_TIMEOUTS_MS (missing keys keep their defaults). Raises ValueError
    on a bad capacity / timeout key, MemoryError when it cannot allocate.
    Addresses are str, ports host-order ints, `now` a uint32 ms clock.

    A FlowTable may also be a view of a table owned by someone else (the
    data plane's): see _flowtable_view()."""

    def __cinit__(self, *args, **kwargs):
        self.ft = NULL
        self._owned = False
        self._owner = None
        self._timeouts = dict(DEFAULT_TIMEOUTS_MS)

    def __init__(self, capacity, seed=None, timeouts=None):
        cdef long cap = capacity
        cdef lb_timeouts tmo
        if self.ft is not NULL:
            raise RuntimeError("FlowTable is already initialised")
        if cap < 1 or cap > LB_FLOW_MAX:
            raise ValueError(f"flow table capacity must be 1..{LB_FLOW_MAX}: {capacity!r}")
        if seed is None:
            seed = int.from_bytes(_ft_os.urandom(8), "little")
        self._timeouts = _fill_timeouts(&tmo, timeouts)
        self.ft = lb_flow_new(<uint32_t>cap, <uint64_t>(seed & 0xFFFFFFFFFFFFFFFF), &tmo)
        if self.ft is NULL:
            raise MemoryError(f"cannot allocate a flow table of {cap} flows")
        self._owned = True

    def __dealloc__(self):
        if self.ft is not NULL and self._owned:
            lb_flow_free(self.ft)
        self.ft = NULL

    cdef lb_flowtable *_t(self) except NULL:
        if self.ft is NULL:
            raise RuntimeError("FlowTable is not initialised")
        return self.ft

    def set_timeouts(self, timeouts: dict) -> None:
        """Change idle timeouts (ms) of the live table; missing keys reset to
        their defaults. Takes effect at the next expiry check."""
        cdef lb_timeouts tmo
        cdef lb_flowtable *t = self._t()
        self._timeouts = _fill_timeouts(&tmo, timeouts)
        lb_flow_set_timeouts(t, &tmo)

    @property
    def timeouts(self) -> dict:
        """The idle timeouts in force, ms, keyed as DEFAULT_TIMEOUTS_MS."""
        return dict(self._timeouts)

    @property
    def capacity(self) -> int:
        return lb_flow_capacity(self._t())

    @property
    def memory(self) -> int:
        """Bytes allocated for the table (all of it, at creation)."""
        return lb_flow_memory(self._t())

    def __len__(self) -> int:
        return lb_flow_count(self._t())

    cdef int _insert(self, lb_flow_entry *e, object client, object cport, object vip,
                     object vport, object backend, object bport, object proto, object state,
                     uint32_t now, uint32_t vip_stat, uint32_t be_stat) except? -1:
        cdef lb_flowtable *t = self._t()
        cdef int rc
        memset(e, 0, sizeof(lb_flow_entry))
        cdef int f1 = _fill_addr(e.client, client)
        cdef int f2 = _fill_addr(e.vip, vip)
        cdef int f3 = _fill_addr(e.backend, backend)
        if f1 != f2 or f1 != f3:
            raise ValueError("client, vip and backend must be of one address family")
        e.family = <uint8_t>f1
        e.cport = _port_be(cport)
        e.vport = _port_be(vport)
        e.bport = _port_be(bport)
        e.proto = <uint8_t>_proto(proto)
        e.state = <uint8_t>_state(state)
        e.vip_stat = vip_stat
        e.be_stat = be_stat
        rc = lb_flow_insert(t, e, now)
        if rc == -EINVAL:
            raise ValueError("invalid flow entry")
        return rc

    def insert(self, client, cport, vip, vport, backend, bport, proto, state="syn",
               uint32_t now=0, uint32_t vip_stat=0, uint32_t be_stat=0) -> int:
        """Insert a flow: 0, -errno.EEXIST (the key, or the reverse tuple, is
        taken) or -errno.ENOSPC (full of flows that may not be evicted).
        Bad arguments raise ValueError."""
        cdef lb_flow_entry e
        return self._insert(&e, client, cport, vip, vport, backend, bport, proto, state,
                            now, vip_stat, be_stat)

    def insert_get(self, client, cport, vip, vport, backend, bport, proto, state="syn",
                   uint32_t now=0, uint32_t vip_stat=0, uint32_t be_stat=0) -> tuple:
        """Like insert, but returns (rc, entry dict or None): on -EEXIST the
        entry already in the table (the one a racing worker must NAT by)."""
        cdef lb_flow_entry e
        rc = self._insert(&e, client, cport, vip, vport, backend, bport, proto, state,
                          now, vip_stat, be_stat)
        return rc, (_entry_dict(&e) if rc == 0 or rc == -EEXIST else None)

    def lookup(self, src, dst, sport, dport, proto, int dir=LB_DIR_FWD,
               uint8_t tcp_flags=0, uint32_t now=0):
        """Look a packet's 5-tuple up as the data plane does: dir DIR_FWD
        (client -> VIP) or DIR_REV (backend -> client). A hit advances the
        state by tcp_flags, refreshes last_seen and returns the entry as a
        dict; a miss returns None."""
        cdef lb_flowtable *t = self._t()
        cdef lb_flow_key k
        cdef lb_flow_entry e
        _fill_key(&k, src, dst, sport, dport, _proto(proto))
        if dir != LB_DIR_FWD and dir != LB_DIR_REV:
            raise ValueError(f"dir must be DIR_FWD or DIR_REV: {dir!r}")
        if lb_flow_lookup(t, &k, <lb_dir>dir, tcp_flags, now, &e):
            return _entry_dict(&e)
        return None

    def delete(self, client, vip, cport, vport, proto) -> bool:
        """Remove the flow with this forward key; False when there was none."""
        cdef lb_flowtable *t = self._t()
        cdef lb_flow_key k
        _fill_key(&k, client, vip, cport, vport, _proto(proto))
        return lb_flow_delete(t, &k) == 1

    def expire(self, uint32_t now, uint32_t max=0xFFFFFFFF) -> int:
        """Remove up to max entries idle past their timeout at `now` (one lap
        of the table at most, continuing where the last call stopped)."""
        cdef lb_flowtable *t = self._t()
        cdef uint32_t n
        with nogil:
            n = lb_flow_expire(t, now, max)
        return n

    def purge_backend(self, addr, port, proto) -> int:
        """Remove every flow pinned to backend addr:port/proto (it failed);
        returns how many."""
        cdef lb_flowtable *t = self._t()
        cdef uint8_t a[16]
        cdef uint16_t p
        cdef uint8_t pr = <uint8_t>_proto(proto)
        cdef uint32_t n
        _fill_addr(a, addr)
        p = _port_be(port)
        with nogil:
            n = lb_flow_purge_backend(t, a, p, pr)
        return n

    def walk(self, limit=None, vip=None, vport=None, proto=None) -> list:
        """Copies of the live entries (at most limit), as dicts: a consistent
        copy of each entry, not a snapshot of the whole table. vip / vport /
        proto keep only the flows of that VIP address / port / protocol (the
        filter runs in C: the others cost no dict)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0: {limit!r}")
        out, _ = self.walk_page(0, limit, vip, vport, proto)
        return out

    def walk_page(self, cursor, limit=None, vip=None, vport=None, proto=None) -> tuple:
        """One page of walk(): (flows, next cursor), the flows found from slot
        `cursor` on (0 to start), at most limit of them; the next cursor is
        None when the table has been walked to its end. The GIL is released
        while C scans, so a sparse filter over a big table holds up no other
        Python thread."""
        cdef lb_flowtable *t = self._t()
        cdef uint32_t cur, got, i, want
        cdef lb_flow_filter flt
        cdef lb_flow_filter *fp = NULL
        if cursor < 0 or cursor > 0xFFFFFFFF:
            raise ValueError(f"cursor must be 0..2^32-1: {cursor!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0: {limit!r}")
        cur = cursor
        memset(&flt, 0, sizeof(flt))
        if vip is not None or vport is not None or proto is not None:
            if vip is not None:
                flt.family = <uint8_t>_fill_addr(flt.vip, vip)
            if vport is not None:
                flt.vport = _port_be(vport)
            if proto is not None:
                flt.proto = <uint8_t>_proto(proto)
            fp = &flt
        cdef lb_flow_entry *buf = <lb_flow_entry *>malloc(
            _FT_WALK_CHUNK * sizeof(lb_flow_entry))
        if buf is NULL:
            raise MemoryError()
        out = []
        done = False
        try:
            while limit is None or len(out) < limit:
                want = _FT_WALK_CHUNK if limit is None else min(_FT_WALK_CHUNK,
                                                                limit - len(out))
                with nogil:
                    got = lb_flow_walk_filter(t, &cur, buf, want, fp)
                for i in range(got):
                    out.append(_entry_dict(&buf[i]))
                if got < want:
                    done = True
                    break
        finally:
            free(buf)
        return out, (None if done else cur)

    def counters(self) -> dict:
        """Insert refusals and removals by reason (struct lb_flow_counters)."""
        cdef lb_flow_counters c
        lb_flow_get_counters(self._t(), &c)
        return {"inserted": c.inserted, "refused_full": c.refused_full,
                "refused_exists": c.refused_exists, "evicted_expired": c.evicted_expired,
                "evicted_halfopen": c.evicted_halfopen, "evicted_udp": c.evicted_udp,
                "expired": c.expired,
                "deleted": c.deleted}

    def active_backend(self, uint32_t stat) -> int:
        """Live flows whose be_stat is `stat`."""
        return lb_flow_active_backend(self._t(), stat)

    def active_vip(self, uint32_t stat) -> int:
        """Live flows whose vip_stat is `stat`."""
        return lb_flow_active_vip(self._t(), stat)

    def check(self) -> bool:
        """Run the C consistency checker (lb_flow_check): True when every
        invariant holds. Locks the whole table while it runs."""
        return self.check_code() == 0

    def check_code(self) -> int:
        """lb_flow_check's answer: 0, or the number of the broken invariant."""
        cdef lb_flowtable *t = self._t()
        cdef int rc
        with nogil:
            rc = lb_flow_check(t)
        if rc < 0:
            raise convert_errno(rc, "lb_flow_check")
        return rc


cdef FlowTable _flowtable_view(lb_flowtable *ft, object owner, dict timeouts=None):
    """A FlowTable over a table owned by `owner` (e.g. the data plane's, for
    `lbcore flows`): never frees it, and keeps owner alive as long as the
    view lives. timeouts: what the owner created it with (for .timeouts)."""
    cdef FlowTable view = FlowTable.__new__(FlowTable)
    view.ft = ft
    view._owned = False
    view._owner = owner
    if timeouts is not None:
        view._timeouts = dict(timeouts)
    return view
