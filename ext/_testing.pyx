# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""lbcore._testing - benchmark and stress loops over the product's objects.

Not part of the product: built only with LB_TESTING=1 (the Makefile's
build, test-sanitize and bench targets set it), never by a plain
`pip install`. Each function runs a whole loop in C with the GIL released,
so that a benchmark measures the C code and not Python call overhead, and
so that the flow-table hammer is truly parallel. They operate on the
product's own FlowTable, MaglevTable and Dataplane (cimported through
lbcore/_core.pxd) and call the same C functions the data plane runs.
"""
cimport cython
from libc.errno cimport EEXIST, ENOSPC
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING
from lb cimport *
from lbcore._core cimport (Dataplane, FlowTable, MaglevTable, _be16, _host16, _pk_entry,
                           _proto, _state)

import threading as _threading


# ---- synthetic flows -------------------------------------------------------
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
    """One thread of hammer(): a random mix of every operation on
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


def fill(FlowTable ft not None, uint32_t n, uint32_t now=0, state="established",
         uint32_t start=0, proto=6) -> int:
    """Insert synthetic flows start..start+n-1 into ft in one C loop; returns
    how many were inserted (rc 0)."""
    cdef lb_flowtable *t = ft._t()
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
    return ok

def lookup_batch(FlowTable ft not None, uint32_t n, uint32_t span, bint hit=True,
                 uint32_t now=0, int dir=LB_DIR_FWD, uint8_t tcp_flags=0x10,
                 uint64_t seed=1, proto=6, bint batched=True) -> int:
    """n lookups in ft of synthetic flows drawn at random from 0..span-1,
    from direction dir; hit=False makes every key one that is not in the
    table. batched: LB_BATCH keys per lb_flow_lookup_batch call (as the data
    plane does), else one lb_flow_lookup per key. Returns the number of
    hits."""
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
    cdef lb_flowtable *t = ft._t()
    cdef lb_dir d = LB_DIR_REV if dir == LB_DIR_REV else LB_DIR_FWD
    cdef uint32_t nspan = span
    if nspan == 0:
        raise ValueError("span must be >= 1: the synthetic flows 0..span-1 to draw from")
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

def hammer(FlowTable ft not None, int threads, uint64_t ops_per_thread, uint32_t now=0,
           keys=None, uint32_t expire_jump=5000) -> dict:
    """Run `threads` OS threads at once on ft, each doing ops_per_thread random
    inserts, lookups (both directions), deletes, expires, walks and purges
    on an overlapping key set (default: twice the capacity, so the table
    is also full and evicting). Returns the summed per-thread tallies;
    `bad` counts entries that came back not matching their key."""
    cdef lb_flowtable *tbl = ft._t()
    cdef uint32_t nkeys = 2 * lb_flow_capacity(tbl) if keys is None else keys
    if threads < 1 or nkeys < 1 or expire_jump < 1:
        raise ValueError("threads, keys and expire_jump must be >= 1")
    results = [None] * threads
    barrier = _threading.Barrier(threads)

    def run(int tid):
        cdef _ft_hstats st
        memset(&st, 0, sizeof(st))
        barrier.wait()
        with nogil:
            _ft_hammer_loop(tbl, <uint64_t>tid + 1, ops_per_thread, now, nkeys,
                            expire_jump, &st)
        results[tid] = st

    pool = [_threading.Thread(target=run, args=(n,), name=f"ft-hammer-{n}")
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


# ---- Maglev ------------------------------------------------------------------

# flow keys generated per pick_batch() call: 4096 keys x 40 bytes = 160 KiB,
# enough distinct flows to touch every cache line of a 65537-slot ring
cdef enum:
    _BATCH_KEYS = 4096


def pick_batch(MaglevTable table not None, Py_ssize_t n, uint32_t seed_offset=0) -> int:
    """Run n table picks in a nogil C loop over generated IPv4 TCP flow keys
    (4096 distinct ones, varied by seed_offset) and return the sum of the
    picked slots' values: a checksum so the loop cannot be optimised away.
    For the benchmark: picks/s of hash + index, as on the packet path."""
    if n < 0:
        raise ValueError(f"n must be >= 0: {n!r}")
    cdef lb_flow_key *keys = <lb_flow_key *>calloc(_BATCH_KEYS, sizeof(lb_flow_key))
    if keys == NULL:
        raise MemoryError("pick_batch: keys")
    cdef uint32_t i, x, golden = 2654435761
    cdef Py_ssize_t j
    cdef uint64_t total = 0
    cdef lb_vip *vip = &table.vip
    cdef uint64_t seed = table._seed
    with nogil:
        for i in range(<uint32_t>_BATCH_KEYS):
            # 198.18.x.y:port -> 198.19.0.1:80, a different flow each
            x = (i + seed_offset) * golden
            keys[i].src[0] = 198
            keys[i].src[1] = 18
            keys[i].src[2] = <uint8_t>(x >> 24)
            keys[i].src[3] = <uint8_t>(x >> 16)
            (<uint8_t *>&keys[i].sport)[0] = <uint8_t>(x >> 8)
            (<uint8_t *>&keys[i].sport)[1] = <uint8_t>x
            keys[i].dst[0] = 198
            keys[i].dst[1] = 19
            keys[i].dst[3] = 1
            (<uint8_t *>&keys[i].dport)[1] = 80
            keys[i].proto = 6
            keys[i].family = LB_AF_INET
        for j in range(n):
            total += lb_maglev_pick(vip, &keys[j & (_BATCH_KEYS - 1)], seed)
    free(keys)
    return total


# ---- packets ----------------------------------------------------------------

def parse_rewrite_batch(packets, entry, int dir, long rounds, bint csum_partial=False) -> int:
    """Copy packets into one C buffer once, then run lb_parse +
    lb_nat_rewrite (for the flow entry, as nat_rewrite does) over all of
    them `rounds` times without the GIL.
    The rewrite is idempotent after the first round (the field already holds
    the new value, the checksum delta is zero, the work is the same).

    Returns how many packets were rewritten in total (parse failures are
    skipped and not counted).
    """
    cdef list pkts = [bytes(x) for x in packets]
    cdef Py_ssize_t n = len(pkts), i, stride = 0
    cdef long r
    cdef lb_flow_entry e
    cdef lb_pkt p
    cdef uint8_t *buf = NULL
    cdef uint32_t *lens = NULL
    cdef uint8_t flag = <uint8_t>(F_PKT_CSUM_PARTIAL if csum_partial else 0)
    cdef long long done = 0
    if dir != LB_DIR_FWD and dir != LB_DIR_REV:
        raise ValueError(f"dir must be DIR_FWD or DIR_REV, not {dir}")
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    _pk_entry(entry, &e)
    for x in pkts:
        stride = max(stride, len(<bytes>x))
    if n == 0 or stride == 0:
        return 0
    stride = (stride + 63) & ~63
    buf = <uint8_t *>malloc(n * stride)
    lens = <uint32_t *>malloc(n * sizeof(uint32_t))
    try:
        if buf == NULL or lens == NULL:
            raise MemoryError()
        for i in range(n):
            lens[i] = <uint32_t>len(<bytes>pkts[i])
            memcpy(buf + i * stride, PyBytes_AS_STRING(pkts[i]), lens[i])
        with nogil:
            for r in range(rounds):
                for i in range(n):
                    if lb_parse(buf + i * stride, lens[i], &p) == LB_DROP_NONE:
                        p.flags |= flag
                        lb_nat_rewrite(&p, &e, <lb_dir>dir)
                        done += 1
        return done
    finally:
        free(buf)
        free(lens)


def process_repeat(Dataplane dp not None, packets, uint32_t rounds, now=None):
    """Copy the packets into one buffer once, then run dp's pipeline (as
    Dataplane.process does) over them `rounds` times in one nogil call (each round
    re-copies the pristine packets, as a device read would). Returns the
    number of LB_TX verdicts."""
    cdef Py_ssize_t n = len(packets), i
    cdef uint32_t stride = 0, r, sent = 0
    cdef uint32_t tnow = lb_now_ms() if now is None else <uint32_t>now
    cdef uint8_t *orig
    cdef uint8_t *buf
    cdef uint32_t *lens
    cdef uint32_t *olens
    cdef uint8_t *verdicts
    cdef uint8_t *reasons
    cdef lb_worker *w = lb_dp_worker(dp.dp, dp.workers)
    if n == 0:
        return 0
    for p in packets:
        stride = max(stride, len(p))
    orig = <uint8_t *>calloc(n, stride)
    buf = <uint8_t *>calloc(n, stride)
    lens = <uint32_t *>calloc(n, sizeof(uint32_t))
    olens = <uint32_t *>calloc(n, sizeof(uint32_t))
    verdicts = <uint8_t *>calloc(n, 1)
    reasons = <uint8_t *>calloc(n, 1)
    try:
        if not (orig and buf and lens and olens and verdicts and reasons):
            raise MemoryError()
        for i, p in enumerate(packets):
            memcpy(orig + i * stride, <const char *>p, len(p))
            olens[i] = len(p)
        with dp._lock:
            with nogil:
                for r in range(rounds):
                    memcpy(buf, orig, n * stride)
                    memcpy(lens, olens, n * sizeof(uint32_t))
                    sent += lb_process_batch(w, buf, stride, lens, verdicts, reasons,
                                             n, tnow)
        return sent
    finally:
        free(orig)
        free(buf)
        free(lens)
        free(olens)
        free(verdicts)
        free(reasons)
