# flowtable.pxi - FlowTable: the shared connection table (ext/lb_flow.c).
#
# Used by the control plane (`lbcore flows`, expiry, purge on backend
# failure), by tests and by bench/bench_flow.py. Besides the one-call methods
# it has batch entry points (fill, lookup_batch, hammer) that run whole loops
# in C with the GIL released, so that benchmarks measure the table and not
# Python call overhead, and so that the concurrency test is truly parallel.
from libc.errno cimport EEXIST, EINVAL, ENOSPC
from libc.string cimport memcmp

import os as _ft_os
import threading as _ft_threading

_FT_COUNTERS = ("inserted", "refused_full", "refused_exists", "evicted_expired",
                "evicted_halfopen", "expired", "deleted")
_FT_WALK_CHUNK = 256


# ---- synthetic flows for the batch entry points -----------------------------
# Flow i: client 198.18.0.0/15 + (i >> 14), cport 1024 + (i & 0x3FFF),
# VIP 198.19.255.1:80 (a miss key uses vport 81), backend 198.19.254.(1 + i%16)
# :8080. Forward and reverse keys are unique for i < 2^31.
cdef enum:
    _FT_NBACKENDS = 16
    _FT_BATCH = 64      # keys per lb_flow_lookup_batch call, = LB_BATCH

cdef inline void _ft_synth(uint32_t i, uint8_t proto, uint8_t state, uint32_t vport,
                           lb_flow_entry *e) noexcept nogil:
    cdef uint32_t c = 0xC6120000u | ((i >> 14) & 0x1FFFFu)
    memset(e, 0, sizeof(lb_flow_entry))
    e.client[0] = <uint8_t>(c >> 24)
    e.client[1] = <uint8_t>(c >> 16)
    e.client[2] = <uint8_t>(c >> 8)
    e.client[3] = <uint8_t>c
    e.vip[0] = 198
    e.vip[1] = 19
    e.vip[2] = 255
    e.vip[3] = 1
    e.backend[0] = 198
    e.backend[1] = 19
    e.backend[2] = 254
    e.backend[3] = <uint8_t>(1 + i % _FT_NBACKENDS)
    e.cport = _be16(1024 + (i & 0x3FFFu))
    e.vport = _be16(vport)
    e.bport = _be16(8080)
    e.proto = proto
    e.family = LB_AF_INET
    e.state = state
    e.vip_stat = 1
    e.be_stat = 100 + i % _FT_NBACKENDS


cdef inline uint64_t _ft_rng(uint64_t *x) noexcept nogil:
    # xorshift64*: cheap, good enough to pick keys and operations
    x[0] ^= x[0] >> 12
    x[0] ^= x[0] << 25
    x[0] ^= x[0] >> 27
    return x[0] * 0x2545F4914F6CDD1Dull


cdef inline bint _ft_same_key(const lb_flow_entry *a, const lb_flow_entry *b) noexcept nogil:
    # the key fields: client, vip, backend, cport, vport, bport, proto, family
    return memcmp(a, b, LB_FLOW_KEYBYTES) == 0


cdef struct _ft_hstats:
    uint64_t ops
    uint64_t ins_ok
    uint64_t ins_exists
    uint64_t ins_full
    uint64_t hits
    uint64_t misses
    uint64_t deleted
    uint64_t expired
    uint64_t purged
    uint64_t walked
    uint64_t bad


cdef void _ft_hammer_loop(lb_flowtable *ft, uint64_t seed, uint64_t ops, uint32_t now,
                          uint32_t keys, uint32_t expire_jump, _ft_hstats *st) noexcept nogil:
    """One thread of FlowTable.hammer: a random mix of every operation on
    keys 0..keys-1, shared with the other threads (per mille: 350 insert,
    450 lookup, 80 delete, 50 expire at now + up to expire_jump ms, 68 walk,
    2 purge); its clock advances 1 ms per operation. Every entry it gets back
    (lookup hit, -EEXIST answer, walk) must be exactly synthetic flow i for
    the key it asked for; anything else counts as `bad` (a torn or mixed-up
    entry)."""
    cdef uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1
    cdef uint64_t n, r
    cdef uint32_t i, op, cursor, got, j, ci
    cdef uint8_t proto, state, flags
    cdef lb_flow_entry e, want
    cdef lb_flow_entry buf[16]
    cdef lb_flow_key k
    cdef int rc
    cdef uint8_t flagset[6]
    flagset[0] = 0
    flagset[1] = 0x02
    flagset[2] = 0x12
    flagset[3] = 0x10
    flagset[4] = 0x11
    flagset[5] = 0x04
    for n in range(ops):
        r = _ft_rng(&x)
        i = <uint32_t>((r >> 32) % keys)
        op = <uint32_t>((r & 0xFFFF) % 1000)
        r = _ft_rng(&x)     # independent bits for the operation's details
        now += 1
        proto = 17 if (i & 3) == 3 else 6
        state = LB_FS_UDP if proto == 17 else (LB_FS_SYN if (i & 4) else LB_FS_EST)
        _ft_synth(i, proto, state, 80, &want)
        if op < 350:
            e = want
            rc = lb_flow_insert(ft, &e, now)
            if rc == 0:
                st.ins_ok += 1
            elif rc == -EEXIST:
                st.ins_exists += 1
                if not _ft_same_key(&e, &want):
                    st.bad += 1
            elif rc == -ENOSPC:
                st.ins_full += 1
            else:
                st.bad += 1
        elif op < 800:
            flags = flagset[(r >> 8) % 6] if proto == 6 else 0
            if (r >> 20) & 1:
                lb_flow_key_rev(&want, &k)
                rc = lb_flow_lookup(ft, &k, LB_DIR_REV, flags, now, &e)
            else:
                lb_flow_key_fwd(&want, &k)
                rc = lb_flow_lookup(ft, &k, LB_DIR_FWD, flags, now, &e)
            if rc:
                st.hits += 1
                if not _ft_same_key(&e, &want) or e.state > LB_FS_UDP_STREAM:
                    st.bad += 1
            else:
                st.misses += 1
        elif op < 880:
            lb_flow_key_fwd(&want, &k)
            st.deleted += <uint64_t>lb_flow_delete(ft, &k)
        elif op < 930:
            st.expired += lb_flow_expire(ft, now + <uint32_t>((r >> 32) % expire_jump), 64)
        elif op < 998:
            cursor = <uint32_t>((r >> 32) % keys)
            got = lb_flow_walk(ft, &cursor, buf, 16)
            st.walked += got
            for j in range(got):
                ci = ((((buf[j].client[1] & 1u) << 16) | (<uint32_t>buf[j].client[2] << 8)
                       | buf[j].client[3]) << 14) | ((_host16(buf[j].cport) - 1024) & 0x3FFFu)
                _ft_synth(ci, buf[j].proto, 0, 80, &want)
                if not _ft_same_key(&buf[j], &want) or buf[j].state > LB_FS_UDP_STREAM:
                    st.bad += 1
        else:
            st.purged += lb_flow_purge_backend(ft, want.backend, want.bport, proto)
        st.ops += 1


@cython.final
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
    cdef lb_flowtable *ft
    cdef bint _owned
    cdef object _owner          # keeps the real owner of a viewed table alive
    cdef dict _timeouts
    cdef uint32_t _synth_span   # synthetic flows 0.._synth_span-1 have been filled

    def __cinit__(self, *args, **kwargs):
        self.ft = NULL
        self._owned = False
        self._owner = None
        self._timeouts = dict(DEFAULT_TIMEOUTS_MS)
        self._synth_span = 0

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

    cdef inline lb_flowtable *_t(self) except NULL:
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

    def walk(self, limit=None) -> list:
        """Copies of the live entries (at most limit), as dicts: a consistent
        copy of each entry, not a snapshot of the whole table."""
        cdef lb_flowtable *t = self._t()
        cdef uint32_t cursor = 0, got, i, want
        cdef lb_flow_entry *buf = <lb_flow_entry *>malloc(
            _FT_WALK_CHUNK * sizeof(lb_flow_entry))
        if buf is NULL:
            raise MemoryError()
        out = []
        try:
            while limit is None or len(out) < limit:
                want = _FT_WALK_CHUNK if limit is None else min(_FT_WALK_CHUNK,
                                                                limit - len(out))
                with nogil:
                    got = lb_flow_walk(t, &cursor, buf, want)
                if got == 0:
                    break
                for i in range(got):
                    out.append(_entry_dict(&buf[i]))
        finally:
            free(buf)
        return out

    def counters(self) -> dict:
        """Insert refusals and removals by reason (struct lb_flow_counters)."""
        cdef lb_flow_counters c
        lb_flow_get_counters(self._t(), &c)
        return {"inserted": c.inserted, "refused_full": c.refused_full,
                "refused_exists": c.refused_exists, "evicted_expired": c.evicted_expired,
                "evicted_halfopen": c.evicted_halfopen, "expired": c.expired,
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

    # ---- batch entry points (C loops without the GIL) ----------------------

    def fill(self, uint32_t n, uint32_t now=0, state="established", uint32_t start=0,
             proto=6) -> int:
        """Insert synthetic flows start..start+n-1 in one C loop; returns how
        many were inserted (rc 0)."""
        cdef lb_flowtable *t = self._t()
        cdef uint8_t st = <uint8_t>_state(state)
        cdef uint8_t pr = <uint8_t>_proto(proto)
        cdef uint32_t i, ok = 0
        cdef lb_flow_entry e
        if <uint64_t>start + n > 0x80000000:
            raise ValueError("synthetic flows are numbered below 2^31")
        with nogil:
            for i in range(start, start + n):
                _ft_synth(i, pr, st, 80, &e)
                if lb_flow_insert(t, &e, now) == 0:
                    ok += 1
        self._synth_span = max(self._synth_span, start + n)
        return ok

    def lookup_batch(self, uint32_t n, span=None, bint hit=True, uint32_t now=0,
                     int dir=LB_DIR_FWD, uint8_t tcp_flags=0x10, uint64_t seed=1,
                     proto=6, bint batched=True) -> int:
        """n lookups of synthetic flows drawn at random from 0..span-1 (by
        default every flow fill() has inserted), from direction dir; hit=False makes every key one
        that is not in the table. batched: LB_BATCH keys per
        lb_flow_lookup_batch call (as the data plane does), else one
        lb_flow_lookup per key. Returns the number of hits."""
        cdef uint8_t pr = <uint8_t>_proto(proto)
        cdef uint32_t j, m, hits = 0
        cdef uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1
        cdef lb_flow_entry e
        cdef lb_flow_key keys[_FT_BATCH]
        cdef const lb_flow_key *kp[_FT_BATCH]
        cdef lb_flow_entry out[_FT_BATCH]
        cdef uint8_t dirs[_FT_BATCH]
        cdef uint8_t flags[_FT_BATCH]
        cdef uint8_t hitv[_FT_BATCH]
        cdef lb_flowtable *t = self._t()
        cdef lb_dir d = LB_DIR_REV if dir == LB_DIR_REV else LB_DIR_FWD
        cdef uint32_t nspan = self._synth_span if span is None else span
        if nspan == 0:
            raise ValueError("no synthetic flows to look up: fill() first or pass span")
        for j in range(<uint32_t>_FT_BATCH):
            kp[j] = &keys[j]
            dirs[j] = <uint8_t>d
            flags[j] = tcp_flags
        with nogil:
            while n > 0:
                m = n if n < _FT_BATCH else _FT_BATCH
                for j in range(m):
                    _ft_synth(<uint32_t>(_ft_rng(&x) % nspan), pr, 0, 80, &e)
                    if not hit:
                        e.vport = _be16(81)
                        e.bport = _be16(8081)
                    if d == LB_DIR_FWD:
                        lb_flow_key_fwd(&e, &keys[j])
                    else:
                        lb_flow_key_rev(&e, &keys[j])
                if batched:
                    hits += lb_flow_lookup_batch(t, kp, dirs, flags, m, now, out, hitv)
                else:
                    for j in range(m):
                        hits += <uint32_t>lb_flow_lookup(t, &keys[j], d, tcp_flags, now,
                                                         &out[j])
                n -= m
        return hits

    def hammer(self, int threads, uint64_t ops_per_thread, uint32_t now=0,
               keys=None, uint32_t expire_jump=5000) -> dict:
        """Run `threads` OS threads at once, each doing ops_per_thread random
        inserts, lookups (both directions), deletes, expires, walks and purges
        on an overlapping key set (default: twice the capacity, so the table
        is also full and evicting). Returns the summed per-thread tallies;
        `bad` counts entries that came back not matching their key."""
        cdef lb_flowtable *tbl = self._t()
        cdef uint32_t nkeys = 2 * lb_flow_capacity(tbl) if keys is None else keys
        if threads < 1 or nkeys < 1 or expire_jump < 1:
            raise ValueError("threads, keys and expire_jump must be >= 1")
        results = [None] * threads
        barrier = _ft_threading.Barrier(threads)

        def run(int tid):
            cdef _ft_hstats st
            memset(&st, 0, sizeof(st))
            barrier.wait()
            with nogil:
                _ft_hammer_loop(tbl, <uint64_t>tid + 1, ops_per_thread, now, nkeys,
                                expire_jump, &st)
            results[tid] = st

        pool = [_ft_threading.Thread(target=run, args=(n,), name=f"ft-hammer-{n}")
                for n in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        total = {}
        for r in results:
            for key, value in r.items():
                total[key] = total.get(key, 0) + value
        return total



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
