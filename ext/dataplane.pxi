# dataplane.pxi - the Dataplane: flow table, published forwarding table,
# worker loops. The only `with nogil` sites that run the packet path are here.
import errno as _dp_errno
import os as _dp_os
import threading as _dp_threading
import time as _dp_time


def _tun_fallback_why(int err):
    """Why a TUN worker runs read()/write(), from lb_tun_fallback()."""
    if err == -_dp_errno.ENOSYS:
        return "built without liburing"
    if err == -_dp_errno.ECANCELED:
        return "read/write asked for (LBCORE_TUN_IO or io=)"
    if err == -_dp_errno.EPERM:
        return "io_uring not permitted (kernel.io_uring_disabled?)"
    return f"io_uring set-up failed: {_dp_os.strerror(-err)}"


def now_ms() -> int:
    """The data plane's clock (CLOCK_MONOTONIC_COARSE, ms, wraps at 2^32):
    what flow timestamps and FlowTable's `now` arguments are measured in."""
    return lb_now_ms()


cdef class Dataplane:
    """The C data plane: one flow table, the published forwarding table, and
    `workers` worker slots (plus one private slot for `process()`).

    Dataplane(workers=1, flow_capacity=1<<20, flow_seed=None, timeouts=None,
              flow_file=None, boot_id=None, frag_entries=FRAG_ENTRIES,
              frag_buffers=FRAG_BUFFERS, frag_timeout_ms=FRAG_TIMEOUT_MS,
              client_entries=CLIENT_ENTRIES, reject_rate=REJECT_RATE,
              reject_burst=REJECT_BURST)
      flow_seed: None = random per start (against hash flooding); it also
        keys the fragment cache and the per-client table.
      timeouts: ms per state, keys of DEFAULT_TIMEOUTS_MS; missing = default.
      flow_file: keep the flow table's slots in this file (made as
        flow_file + ".new", a stale one replaced; commit_flow_file() renames
        it), so that the next process can adopt_flows() from it. The caller
        holds a lock that keeps a second process off the same path.
      boot_id: the 16 bytes the file is stamped with (default: this boot's).
      frag_entries: datagrams the fragment cache remembers (0: no cache,
        fragments are dropped); frag_buffers: early fragments it can hold;
        client_entries: per-client table (limits, persistence);
        reject_rate / reject_burst: RSTs and ICMP unreachables per second.
      busy_poll_us: how long a worker keeps polling after its last packet
        before it sleeps (0: it sleeps at once).
    """
    def __cinit__(self, uint32_t workers=1, uint32_t flow_capacity=1 << 20,
                  flow_seed=None, timeouts=None, flow_file=None, boot_id=None,
                  uint32_t frag_entries=LB_FRAG_ENTRIES,
                  uint32_t frag_buffers=LB_FRAG_BUFFERS,
                  uint32_t frag_timeout_ms=LB_FRAG_TIMEOUT_MS,
                  uint32_t client_entries=LB_CLIENT_ENTRIES,
                  uint32_t reject_rate=LB_REJECT_RATE, uint32_t reject_burst=LB_REJECT_BURST,
                  uint32_t busy_poll_us=0):
        cdef lb_timeouts tmo
        cdef uint64_t seed
        cdef bytes bpath
        cdef const uint8_t *bid
        cdef void *slots = NULL
        cdef int rc
        if workers < 1 or workers > 256:
            raise ValueError(f"workers must be 1..256, not {workers}")
        if flow_capacity < 1 or flow_capacity > LB_FLOW_MAX:
            raise ValueError(f"flow_capacity must be 1..{LB_FLOW_MAX}, not {flow_capacity}")
        if flow_seed is None:
            seed = int.from_bytes(_dp_os.urandom(8), "little")
        else:
            seed = <uint64_t>flow_seed
        self._timeouts = _fill_timeouts(&tmo, timeouts)
        # serialises the control side's use of the private worker slot
        # (pick, process, l2_lookup)
        self._lock = _dp_threading.Lock()
        memset(&self.shm, 0, sizeof(self.shm))
        self._flow_file = None
        self._boot_id = _boot_id_bytes(boot_id)
        if flow_file is not None:
            bpath = _dp_os.fsencode(str(flow_file) + ".new")
            try:
                _dp_os.unlink(bpath)          # left by a start that died half-way
            except FileNotFoundError:
                pass
            bid = <const uint8_t *><const char *>self._boot_id
            rc = lb_shm_create(bpath, flow_capacity, seed, bid, &self.shm)
            if rc < 0:
                raise convert_errno(rc, f"creating the flow table file {bpath.decode()}")
            slots = self.shm.slots
        with nogil:
            self.dp = lb_dp_new_at(workers, flow_capacity, seed, &tmo, slots)
        if self.dp == NULL:
            if slots != NULL:
                lb_shm_close(&self.shm)
                _dp_os.unlink(bpath)
            raise MemoryError("cannot allocate the data plane")
        self.workers = workers
        self._pending_file = None if flow_file is None else str(flow_file)
        if lb_dp_set_traffic(self.dp, frag_entries, frag_buffers, frag_timeout_ms,
                             client_entries, reject_rate, reject_burst, seed) < 0:
            raise ValueError(f"bad fragment cache ({frag_entries} entries, {frag_buffers} "
                             f"buffers, {frag_timeout_ms} ms) or client table "
                             f"({client_entries}) size")
        lb_dp_set_busy_poll(self.dp, busy_poll_us)

    def __dealloc__(self):
        if self.rs != NULL:
            lb_rawsock_free(self.rs)
            self.rs = NULL
        if self.dp != NULL:
            lb_dp_free(self.dp)
            self.dp = NULL
        # the file stays: it is what the next process adopts
        lb_shm_close(&self.shm)

    # ---- forwarding table -------------------------------------------------

    def publish(self, vips, uint64_t seed, uint32_t timeout_ms=2000):
        """Build a forwarding table and publish it atomically.

        vips: sequence of (address, port, proto, stat_id, ring_size, backends)
        or (..., backends, settings), with backends a sequence of (address,
        port, weight, stat_id, draining) and settings a dict of the VIP's
        traffic settings (VIP_SETTINGS; missing keys are off / "drop" /
        "none").
        A draining backend keeps its flows but gets no new ones (weight 0 in
        the ring). Every VIP's ring is rebuilt; the old table is freed once
        no worker can hold it (TimeoutError, and the old table leaked, when
        that takes longer than timeout_ms). Raises ValueError on a bad table
        (duplicate VIP, non-prime ring size, ...).
        """
        cdef lb_table *t = lb_table_new(len(vips), seed)
        cdef lb_table *old
        cdef lb_vip v
        cdef lb_backend *bes = NULL
        cdef uint32_t i, j, nb
        cdef int rc
        if t == NULL:
            raise ValueError(f"cannot build a table of {len(vips)} VIPs (max {LB_MAX_VIPS})")
        try:
            for i, spec in enumerate(vips):
                addr, port, proto, stat_id, ring_size, backends = spec[:6]
                memset(&v, 0, sizeof(v))
                _fill_vip_settings(&v, spec[6] if len(spec) > 6 else None)
                v.family = _fill_addr(v.addr, addr)
                v.port = _port_be(port)
                v.proto = _proto(proto)
                v.stat_id = stat_id
                v.ring_size = ring_size
                nb = len(backends)
                bes = <lb_backend *>calloc(nb if nb else 1, sizeof(lb_backend))
                if bes == NULL:
                    raise MemoryError()
                for j, (baddr, bport, weight, bstat, draining) in enumerate(backends):
                    bes[j].family = _fill_addr(bes[j].addr, baddr)
                    if bes[j].family != v.family:
                        raise ValueError(f"backend {baddr} is not of the family of VIP {addr}")
                    if weight < 0:
                        raise ValueError(f"negative weight {weight} for backend {baddr}")
                    bes[j].port = _port_be(bport)
                    bes[j].stat_id = bstat
                    bes[j].weight = 0 if draining else weight
                    bes[j].flags = F_BACKEND_DRAINING if draining else 0
                with nogil:
                    rc = lb_table_set_vip(t, i, &v, bes, nb)
                free(bes)
                bes = NULL
                if rc < 0:
                    raise convert_errno(rc, f"VIP {addr}:{port}/{proto}")
            rc = lb_table_seal(t)
            if rc < 0:
                raise convert_errno(rc, "sealing the forwarding table (duplicate VIP?)")
        except BaseException:
            free(bes)
            lb_table_free(t)
            raise
        with nogil:
            old = lb_dp_publish(self.dp, t)
            rc = lb_dp_synchronize(self.dp, timeout_ms)
        if rc < 0:
            # a worker is stuck inside a batch: leaking the old table is the
            # only safe choice (freeing it could crash that worker)
            raise TimeoutError("workers did not pass a quiescent point; old table leaked")
        lb_table_free(old)

    def pick(self, src, int sport, dst, int dport, proto):
        """Which backend the live table gives a NEW flow: (vip_stat, backend
        index, backend address, backend port) or None when dst is no VIP or
        the VIP has no usable backend. Existing flows: see lookup()."""
        cdef lb_flow_key k
        cdef const lb_vip *vip
        cdef uint16_t idx
        cdef lb_worker *w = lb_dp_worker(self.dp, self.workers)
        cdef const lb_table *t
        _fill_key(&k, src, dst, sport, dport, proto)
        self._lock.acquire()
        t = lb_dp_enter(w)
        try:
            if t == NULL:
                return None
            vip = lb_table_find_vip(t, &k)
            if vip == NULL:
                return None
            idx = lb_maglev_pick(vip, &k, t.sel_seed)
            if idx == LB_RING_EMPTY or idx >= vip.n_backends:
                return (vip.stat_id, None, None, None)
            return (vip.stat_id, idx, _addr_str(vip.backends[idx].addr, vip.family),
                    _be16(vip.backends[idx].port))
        finally:
            lb_dp_leave(w)
            self._lock.release()

    # ---- packets ----------------------------------------------------------

    def process(self, packets, now=None):
        """Run the pipeline over IP packets (bytes) with the published table,
        exactly as a worker does: returns [(verdict, reason, out_bytes)], one
        per packet, then one (VERDICT_TX or VERDICT_REPLY, "none", bytes) per
        extra packet the batch sent (released fragments, ICMP errors)."""
        cdef Py_ssize_t n = len(packets), i
        cdef uint32_t stride = 0
        cdef uint32_t tnow = lb_now_ms() if now is None else <uint32_t>now
        cdef uint8_t *buf
        cdef uint32_t *lens
        cdef uint8_t *verdicts
        cdef uint8_t *reasons
        cdef lb_worker *w = lb_dp_worker(self.dp, self.workers)
        if n == 0:
            return []
        for p in packets:
            stride = max(stride, len(p))
        stride = max(stride, 1)
        buf = <uint8_t *>calloc(n, stride)
        lens = <uint32_t *>calloc(n, sizeof(uint32_t))
        verdicts = <uint8_t *>calloc(n, 1)
        reasons = <uint8_t *>calloc(n, 1)
        try:
            if not (buf and lens and verdicts and reasons):
                raise MemoryError()
            for i, p in enumerate(packets):
                memcpy(buf + i * stride, <const char *>p, len(p))
                lens[i] = len(p)
            with self._lock:
                with nogil:
                    lb_process_batch(w, buf, stride, lens, verdicts, reasons, n, tnow)
                out = [(verdicts[i], DROP_REASONS[reasons[i]],
                        bytes(buf[i * stride: i * stride + lens[i]])) for i in range(n)]
                for i in range(w.out.n):
                    out.append((LB_REPLY if w.out.pkt[i].kind == LB_OUT_REPLY else LB_TX,
                                "none", bytes(w.out.pkt[i].data[:w.out.pkt[i].len])))
                lb_out_done(w)
            return out
        finally:
            free(buf)
            free(lens)
            free(verdicts)
            free(reasons)

    # ---- worker loops -----------------------------------------------------

    def run_worker(self, uint32_t i, int fd, bint vnet_hdr=False, io=None, on_start=None):
        """Run worker i on a TUN queue fd until stop(); blocks, GIL released.
        Call from a thread of its own. Raises OSError on a device error.

        io: "auto" (io_uring where it works, else read()/write()) or
        "read/write" (the plain path, also "rw"); None takes the environment
        variable LBCORE_TUN_IO, default "auto" (so that a deployment or a test
        can force the plain path without a config key). on_start(path, why)
        is called once the path is chosen, before the loop: path "io_uring" or
        "read/write", why "" or the reason io_uring is not used. The choice
        stays visible in io_paths() while the worker runs and after."""
        cdef lb_worker *w
        cdef lb_tun *t
        cdef int rc = 0, err = 0, want
        if i >= self.workers:
            raise IndexError(f"worker {i} of {self.workers}")
        if io is None:
            io = _dp_os.environ.get("LBCORE_TUN_IO", "auto") or "auto"
        if io not in ("auto", "read/write", "rw"):
            raise ValueError(f"io must be 'auto' or 'read/write', not {io!r}")
        want = io == "auto"
        w = lb_dp_worker(self.dp, i)
        w.fd = fd
        w.vnet_hdr = vnet_hdr
        with nogil:
            t = lb_tun_open(w, want, &err)
        if t == NULL:
            w.fd = -1
            raise convert_errno(err, f"worker {i}")
        try:
            if lb_tun_io(t) == LB_TUN_IO_URING:
                path, why = "io_uring", ""
            else:
                path, why = "read/write", _tun_fallback_why(lb_tun_fallback(t))
            if self._io is None:
                self._io = {}
            self._io[i] = (path, why)
            if on_start is not None:
                on_start(path, why)
            with nogil:
                rc = lb_tun_run(t)
        finally:
            with nogil:
                lb_tun_close(t)
            w.fd = -1
        if rc < 0:
            raise convert_errno(rc, f"worker {i}")

    def io_paths(self):
        """{worker: (path, why)} of the TUN workers started so far: path
        "io_uring" or "read/write", why "" or why not io_uring."""
        return dict(self._io or {})

    cdef lb_rawsock *_rawsock(self) except NULL:
        if self.rs == NULL:
            self.rs = lb_rawsock_new()
            if self.rs == NULL:
                raise MemoryError()
        return self.rs

    def run_rawsock_worker(self, uint32_t i, socks):
        """Run worker i on AF_PACKET sockets until stop(); blocks, GIL
        released. socks: [client-side RawSocket, backend-side RawSocket], or
        one RawSocket when both sides are the same link; a frame received on
        one leaves on the other. Raises OSError on a socket error."""
        cdef lb_raw_sock s[2]
        cdef uint32_t n = len(socks), j
        cdef lb_worker *w
        cdef lb_rawsock *rs = self._rawsock()
        cdef RawSocket rsock
        cdef int rc
        if i >= self.workers:
            raise IndexError(f"worker {i} of {self.workers}")
        if n < 1 or n > LB_RAW_LINKS:
            raise ValueError(f"1 or 2 sockets, not {n}")
        for j in range(n):
            rsock = socks[j]
            if rsock.s.fd < 0:
                raise ValueError("socket is closed")
            s[j] = rsock.s
        w = lb_dp_worker(self.dp, i)
        with nogil:
            rc = lb_rawsock_run(w, rs, s, n)
        if rc < 0:
            raise convert_errno(rc, f"rawsock worker {i}")

    def set_l2(self, src_macs, routes, neighbours, uint32_t timeout_ms=2000):
        """Publish a new L2 table for the rawsock workers (swapped as a
        whole, like the forwarding table).

        src_macs: the source MAC (6 bytes) of link 0 (client side) and link 1.
        routes: (link, network, gateway or None) with network an ip_network
        (or str) and gateway an address: which next hop a destination on that
        egress link goes to (longest prefix wins; no route = no_neigh drop).
        neighbours: (link, address, mac bytes): resolved next hops.
        Raises ValueError on a bad entry, TimeoutError like publish()."""
        cdef lb_rawsock *rs = self._rawsock()
        cdef lb_l2 *l2
        cdef lb_l2 *old
        cdef lb_l2_route r
        cdef uint8_t a[16]
        cdef uint8_t fam
        cdef bytes mac
        cdef uint32_t i
        cdef int rc
        routes = list(routes)
        neighbours = list(neighbours)
        l2 = lb_l2_new(len(routes), len(neighbours))
        if l2 == NULL:
            raise MemoryError()
        try:
            for i in range(2):
                mac = bytes(src_macs[i]) if i < len(src_macs) else bytes(6)
                if len(mac) != 6:
                    raise ValueError(f"source MAC of link {i} is not 6 bytes")
                memcpy(l2.src_mac[i], <const char *>mac, 6)
            for i, (link, net, gw) in enumerate(routes):
                net = _rs_ipaddress.ip_network(net)
                memset(&r, 0, sizeof(r))
                r.family = _fill_addr(r.prefix, net.network_address)
                r.plen = net.prefixlen
                r.link = link
                if gw is not None:
                    fam = _fill_addr(r.gw, gw)
                    if fam != r.family:
                        raise ValueError(f"gateway {gw} of route {net} is of another family")
                    r.has_gw = 1
                if lb_l2_set_route(l2, i, &r) < 0:
                    raise ValueError(f"bad route {link, net, gw}")
            for link, addr, mac in neighbours:
                if len(mac) != 6:
                    raise ValueError(f"MAC of {addr} is not 6 bytes")
                fam = _fill_addr(a, addr)
                rc = lb_l2_add_neigh(l2, link, fam, a, <const uint8_t *><const char *>mac)
                if rc < 0:
                    raise ValueError(f"bad neighbour {link, addr, mac}")
            lb_l2_seal(l2)
        except BaseException:
            lb_l2_free(l2)
            raise
        with nogil:
            old = lb_rawsock_publish(self.dp, rs, l2)
            rc = lb_dp_synchronize(self.dp, timeout_ms)
        if rc < 0:
            raise TimeoutError("workers did not pass a quiescent point; old L2 table leaked")
        lb_l2_free(old)

    def l2_lookup(self, uint8_t link, dst):
        """What a worker would do with a packet to dst leaving on link:
        (next hop, MAC bytes), or (next hop, None) when unresolved, with next
        hop None when no route covers dst."""
        cdef lb_rawsock *rs = self._rawsock()
        cdef uint8_t d[16]
        cdef uint8_t nh[16]
        cdef uint8_t fam
        cdef const uint8_t *mac
        cdef lb_worker *w = lb_dp_worker(self.dp, self.workers)
        cdef const lb_l2 *l2
        fam = _fill_addr(d, dst)
        self._lock.acquire()
        lb_dp_enter(w)
        try:
            l2 = lb_rawsock_l2(rs)
            if not lb_l2_nexthop(l2, link, fam, d, nh):
                return None, None
            mac = lb_l2_mac(l2, link, fam, nh)
            return _addr_str(nh, fam), (bytes(mac[:6]) if mac != NULL else None)
        finally:
            lb_dp_leave(w)
            self._lock.release()

    def l2_misses(self):
        """Next hops the workers recently found no MAC for: [(link,
        address)], most recent records, deduplicated (a hint for on-demand
        resolution, not a complete log)."""
        cdef lb_raw_miss out[16]
        cdef uint32_t n, i
        if self.rs == NULL:
            return []
        n = lb_rawsock_misses(self.rs, out, 16)
        return [(out[i].link, _addr_str(out[i].addr, out[i].family)) for i in range(n)]

    def stop(self):
        """Ask every worker loop to return (within its 100 ms poll timeout)."""
        lb_dp_set_stop(self.dp, 1)

    @property
    def busy_poll_us(self):
        """The busy-poll window (µs) the workers use; settable while they run
        (a reload): each reads it when its queue runs empty."""
        return lb_dp_busy_poll(self.dp)

    @busy_poll_us.setter
    def busy_poll_us(self, uint32_t us):
        lb_dp_set_busy_poll(self.dp, us)

    # ---- flow table -------------------------------------------------------

    @property
    def flow_table(self):
        """The data plane's flow table as a FlowTable (walk, lookup, expire,
        purge_backend, counters, active_vip/backend, len): a view that keeps
        this Dataplane alive and never frees the table."""
        return _flowtable_view(lb_dp_flows(self.dp), self, self._timeouts)

    # ---- counters ---------------------------------------------------------

    def stats(self, vip_stats=(), backend_stats=()):
        """Counters summed over all workers: totals, drops by reason, and
        (packets, bytes, new_flows) for the given VIP / backend stat ids."""
        cdef uint32_t i, r
        cdef lb_worker *w
        tot = dict(rx=0, tx=0, rx_bytes=0, tx_bytes=0, flow_hit=0, flow_miss=0,
                   flow_new=0, loops=0, batches=0, spin_ns=0, tx_errors=0, echo_replies=0, resets=0,
                   unreachables=0, rejects_limited=0, out_dropped=0, passed=0)
        limits = {s: [0, 0, 0] for s in vip_stats}
        drops = [0] * LB_DROP__COUNT
        vips = {s: [0, 0, 0] for s in vip_stats}
        bes = {s: [0, 0, 0] for s in backend_stats}
        workers = []
        for i in range(self.workers + 1):
            w = lb_dp_worker(self.dp, i)
            s = w.stats
            tot["rx"] += s.rx
            tot["tx"] += s.tx
            tot["rx_bytes"] += s.rx_bytes
            tot["tx_bytes"] += s.tx_bytes
            tot["flow_hit"] += s.flow_hit
            tot["flow_miss"] += s.flow_miss
            tot["flow_new"] += s.flow_new
            tot["loops"] += s.loops
            tot["batches"] += s.batches
            tot["spin_ns"] += s.spin_ns
            tot["tx_errors"] += s.tx_errors
            tot["echo_replies"] += s.echo_replies
            tot["resets"] += s.resets
            tot["unreachables"] += s.unreachables
            tot["rejects_limited"] += s.rejects_limited
            tot["out_dropped"] += s.out_dropped
            tot["passed"] += s.passed
            if i < self.workers:
                workers.append({"rx": s.rx, "tx": s.tx, "loops": s.loops,
                                "batches": s.batches, "spin_s": s.spin_ns / 1e9})
            for r in range(LB_DROP__COUNT):
                drops[r] += s.drops[r]
            for sid, acc in vips.items():
                if sid < LB_MAX_STAT_IDS:
                    acc[0] += s.vip[sid].packets
                    acc[1] += s.vip[sid].bytes
                    acc[2] += s.vip[sid].new_flows
            for sid, acc in limits.items():
                if sid < LB_MAX_STAT_IDS:
                    acc[0] += s.vip[sid].limit_flows
                    acc[1] += s.vip[sid].limit_rate
                    acc[2] += s.vip[sid].shed
            for sid, acc in bes.items():
                if sid < LB_MAX_STAT_IDS:
                    acc[0] += s.backend[sid].packets
                    acc[1] += s.backend[sid].bytes
                    acc[2] += s.backend[sid].new_flows
        tot["drops"] = {DROP_REASONS[r]: drops[r] for r in range(1, LB_DROP__COUNT)}
        tot["vips"] = {k: tuple(v) for k, v in vips.items()}
        # per VIP: new flows refused by max_flows, by client_rate, by new_flow_rate
        tot["vip_limits"] = {k: dict(zip(("limit_flows", "limit_rate", "shed"), v))
                             for k, v in limits.items()}
        tot["backends"] = {k: tuple(v) for k, v in bes.items()}
        tot["workers"] = workers
        return tot

    # ---- the flow table's file: adoption -----------------------------------

    @property
    def flow_file(self):
        """The path of the flow table's file (None: the table is in private
        memory); until commit_flow_file() the mapping is of path + ".new"."""
        return self._flow_file or self._pending_file

    def adopt_flows(self, path=None) -> dict:
        """Take over the flows of the table file at `path` (default: this
        data plane's flow_file), left by the previous process: each valid
        entry whose VIP and backend the published table still has keeps its
        backend, state and age (ext/lb_flow.c, "persistence"). Call after the
        first publish() and before the workers start.

        Returns {"adopted", "invalid", "expired", "unbound", "duplicate",
        "full", "seconds", "capacity"} or, when the file is not adopted,
        {"adopted": 0, "refused": why, "code": name}: never raises for what
        the file holds (missing, truncated, garbage, another layout, another
        boot)."""
        cdef lb_shm old
        cdef lb_flow_adopt_stats st
        cdef int err = 0, rc
        cdef const uint8_t *bid = <const uint8_t *><const char *>self._boot_id
        cdef lb_worker *w = lb_dp_worker(self.dp, self.workers)
        cdef const lb_table *t
        cdef bytes bpath
        cdef const char *cpath
        if path is None:
            path = self.flow_file
        if path is None:
            raise ValueError("no flow table file to adopt from")
        bpath = _dp_os.fsencode(str(path))
        cpath = bpath
        with nogil:
            rc = lb_shm_open_old(cpath, bid, &old, &err)
        if rc != LB_SHM_OK:
            return _refusal(rc, err)
        t0 = _dp_time.perf_counter()
        old_capacity = old.capacity
        try:
            with self._lock:
                with nogil:
                    t = lb_dp_enter(w)
                    lb_flow_adopt(lb_dp_flows(self.dp), old.slots, old.capacity, lb_now_ms(),
                                  lb_sync_bind, <void *>t, &st)
                    lb_dp_leave(w)
        finally:
            lb_shm_close(&old)
        return {"adopted": st.adopted, "invalid": st.invalid, "expired": st.expired,
                "unbound": st.unbound, "duplicate": st.duplicate, "full": st.full,
                "seconds": _dp_time.perf_counter() - t0, "capacity": old_capacity}

    def commit_flow_file(self) -> None:
        """Make this data plane's table file the one the next process adopts
        (rename path + ".new" over path; the old file's memory goes with its
        last mapping)."""
        if self._pending_file is None:
            raise ValueError("no flow table file")
        _dp_os.replace(self._pending_file + ".new", self._pending_file)
        self._flow_file, self._pending_file = self._pending_file, None

    # ---- flow sync: event rings and wire records ----------------------------

    def sync_attach(self, uint32_t ring_size=8192) -> None:
        """Give every worker a ring of ring_size (a power of two) flow events
        for sync_drain(). Before the workers start."""
        cdef int rc = lb_sync_attach(self.dp, ring_size)
        if rc < 0:
            raise ValueError(f"cannot make sync rings of {ring_size} (a power of two "
                             "2..2^20)")

    def sync_drain(self, uint32_t max=4096) -> tuple:
        """(records, drops): the flows the workers created since the last call
        (at most max) as LB_SYNC_NEW wire records, and how many events the
        full rings have dropped so far."""
        cdef lb_flow_entry *buf = <lb_flow_entry *>malloc(max * sizeof(lb_flow_entry) + 1)
        cdef uint8_t *out = <uint8_t *>malloc(<size_t>max * LB_SYNC_REC_SIZE + 1)
        cdef uint32_t n
        cdef uint64_t drops = 0
        cdef size_t nb
        try:
            if buf == NULL or out == NULL:
                raise MemoryError()
            with nogil:
                n = lb_sync_drain(self.dp, buf, max, &drops)
                nb = lb_sync_encode(buf, n, LB_SYNC_NEW, lb_now_ms(), out,
                                    <size_t>max * LB_SYNC_REC_SIZE)
            return out[:nb], drops
        finally:
            free(buf)
            free(out)

    def sync_drain_ends(self, uint32_t max=4096) -> tuple:
        """(records, reasons, drops): the flows the table removed on its own since the last
        call (at most max: reclaimed idle past their timeout or evicted by an insert, purged
        with their backend) as LB_SYNC_END wire records, how many of them by reason
        ("expired", "evicted", "purged"), and how many such events the full ring has dropped
        so far (those flows then expire at the peers)."""
        cdef lb_flow_entry *buf = <lb_flow_entry *>malloc(max * sizeof(lb_flow_entry) + 1)
        cdef uint8_t *out = <uint8_t *>malloc(<size_t>max * LB_SYNC_REC_SIZE + 1)
        cdef uint32_t n, i
        cdef uint64_t drops = 0
        cdef uint64_t why[4]
        cdef size_t nb
        memset(why, 0, sizeof(why))
        try:
            if buf == NULL or out == NULL:
                raise MemoryError()
            with nogil:
                n = lb_sync_drain_ends(self.dp, buf, max, &drops)
                for i in range(n):
                    why[buf[i].pad1 & 3] += 1
                    buf[i].pad1 = 0
                nb = lb_sync_encode(buf, n, LB_SYNC_END, lb_now_ms(), out,
                                    <size_t>max * LB_SYNC_REC_SIZE)
            return out[:nb], {"expired": why[1], "evicted": why[2], "purged": why[3]}, drops
        finally:
            free(buf)
            free(out)

    def sync_apply(self, const uint8_t[:] body, now=None) -> dict:
        """Apply a datagram's records (already authenticated) to the flow
        table, each bound to the published table; counts by outcome (ext/
        lb_sync.h, struct lb_sync_rx_stats). A body that is not whole records
        is refused as a whole: {"bad_length": 1}."""
        cdef lb_sync_rx_stats st
        cdef lb_worker *w = lb_dp_worker(self.dp, self.workers)
        cdef const lb_table *t
        cdef uint32_t tnow = lb_now_ms() if now is None else <uint32_t>now
        cdef size_t n = body.shape[0]
        cdef const uint8_t *p = &body[0] if n else NULL
        cdef int rc
        memset(&st, 0, sizeof(st))
        with self._lock:
            with nogil:
                t = lb_dp_enter(w)
                rc = lb_sync_apply(lb_dp_flows(self.dp), t, p, n, tnow, &st)
                lb_dp_leave(w)
        if rc < 0:
            return {"bad_length": 1}
        return {"inserted": st.inserted, "refreshed": st.refreshed, "ended": st.ended,
                "not_found": st.not_found, "bad_record": st.bad_record,
                "unknown_vip": st.unknown_vip, "unknown_backend": st.unknown_backend,
                "conflict": st.conflict, "full": st.full}

    def sync_refresh(self, uint32_t cursor, uint32_t max_age_ms, uint32_t max=4096) -> tuple:
        """(records, cursor, done): LB_SYNC_REFRESH records for the flows
        seen within max_age_ms, walking at most max entries from cursor (0 to
        start); done when the walk reached the end."""
        cdef lb_flow_entry *buf = <lb_flow_entry *>malloc(max * sizeof(lb_flow_entry) + 1)
        cdef uint8_t *out = <uint8_t *>malloc(<size_t>max * LB_SYNC_REC_SIZE + 1)
        cdef uint32_t n, i, k = 0, tnow = lb_now_ms()
        cdef uint32_t cur = cursor
        cdef size_t nb
        try:
            if buf == NULL or out == NULL:
                raise MemoryError()
            with nogil:
                n = lb_flow_walk(lb_dp_flows(self.dp), &cur, buf, max)
                for i in range(n):
                    if <uint32_t>(tnow - buf[i].last_seen) <= max_age_ms:
                        buf[k] = buf[i]
                        k += 1
                nb = lb_sync_encode(buf, k, LB_SYNC_REFRESH, tnow, out,
                                    <size_t>max * LB_SYNC_REC_SIZE)
            return out[:nb], cur, n == 0
        finally:
            free(buf)
            free(out)

    def expire_flows(self, uint32_t now, uint32_t max=65536) -> tuple:
        """Expire up to max idle flows (one call of the housekeeping):
        (removed, records) with records the LB_SYNC_END wire records of the
        flows removed, for the peers."""
        cdef lb_flow_entry *gone = <lb_flow_entry *>malloc(max * sizeof(lb_flow_entry) + 1)
        cdef uint8_t *out = <uint8_t *>malloc(<size_t>max * LB_SYNC_REC_SIZE + 1)
        cdef uint32_t removed, n = 0
        cdef size_t nb
        try:
            if gone == NULL or out == NULL:
                raise MemoryError()
            with nogil:
                removed = lb_flow_expire_report(lb_dp_flows(self.dp), now, max, gone, max, &n)
                nb = lb_sync_encode(gone, n, LB_SYNC_END, now, out,
                                    <size_t>max * LB_SYNC_REC_SIZE)
            return removed, out[:nb]
        finally:
            free(gone)
            free(out)
    # ---- fragment cache ---------------------------------------------------

    def frag_stats(self):
        """The fragment cache: its counters (FRAG_COUNTERS), datagrams and held
        fragments now (`entries`, `buffers`), its capacity (`capacity`,
        `buffer_capacity`) and `memory` (bytes, fixed at start)."""
        cdef lb_frag_counters c
        cdef uint32_t ne = 0, nb = 0, ce = 0, cb = 0
        if self.dp.frag == NULL:
            return {k: 0 for k in FRAG_COUNTERS} | {"entries": 0, "buffers": 0, "capacity": 0,
                                                     "buffer_capacity": 0, "memory": 0}
        lb_frag_get_counters(self.dp.frag, &c)
        lb_frag_usage(self.dp.frag, &ne, &nb, &ce, &cb)
        return {"first": c.first, "forwarded": c.forwarded, "held": c.held,
                "released": c.released, "early_dropped": c.early_dropped,
                "dropped": c.dropped, "timeouts": c.timeouts, "timeout_held": c.timeout_held,
                "evicted": c.evicted, "completed": c.completed,
                "entries": ne, "buffers": nb, "capacity": ce, "buffer_capacity": cb,
                "memory": lb_frag_memory(self.dp.frag)}

    def frag_expire(self, now=None, uint32_t max_sets=1 << 20):
        """Forget timed-out datagrams of the fragment cache (their held
        fragments are freed), scanning up to max_sets sets; returns how many."""
        cdef uint32_t tnow = lb_now_ms() if now is None else <uint32_t>now
        cdef uint32_t n
        if self.dp.frag == NULL:
            return 0
        with nogil:
            n = lb_frag_expire(self.dp.frag, tnow, max_sets)
        return n


FRAG_COUNTERS = ("first", "forwarded", "held", "released", "early_dropped", "dropped",
                 "timeouts", "timeout_held", "evicted", "completed")
# the keys of publish()'s per-VIP settings dict, with their defaults
VIP_SETTINGS = {"closed_port": "drop", "persistence": "none", "persist_ms": 0,
                "limit_action": "drop", "max_flows": 0, "client_rate": 0, "client_burst": 0,
                "new_flow_rate": 0, "new_flow_burst": 0}


cdef int _fill_vip_settings(lb_vip *v, settings) except -1:
    """Copy a publish() settings dict into v (None: everything off)."""
    if not settings:
        return 0
    bad = set(settings) - set(VIP_SETTINGS)
    if bad:
        raise ValueError(f"unknown VIP settings {sorted(bad)}")
    cp = settings.get("closed_port", "drop")
    pe = settings.get("persistence", "none")
    la = settings.get("limit_action", "drop")
    if cp not in ("drop", "reject") or pe not in ("none", "source") or la not in ("drop", "reject"):
        raise ValueError(f"bad VIP settings {settings}")
    v.closed_port = LB_CLOSED_REJECT if cp == "reject" else LB_CLOSED_DROP
    v.persistence = LB_PERSIST_SOURCE if pe == "source" else LB_PERSIST_NONE
    v.limit_action = LB_ACTION_REJECT if la == "reject" else LB_ACTION_DROP
    v.persist_ms = settings.get("persist_ms", 0)
    v.max_flows = settings.get("max_flows", 0)
    v.client_rate = settings.get("client_rate", 0)
    v.client_burst = settings.get("client_burst", 0)
    v.new_flow_rate = settings.get("new_flow_rate", 0)
    v.new_flow_burst = settings.get("new_flow_burst", 0)
    return 0
