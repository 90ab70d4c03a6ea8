# maglev.pxi - the seeded flow hash and Maglev tables (ext/lb_hash.c,
# ext/lb_maglev.c) seen from Python. Address and key helpers: addr.pxi.

cdef uint64_t _MASK64 = 0xFFFFFFFFFFFFFFFF

cdef uint64_t _seed64(object seed) except? 0:
    """A seed as uint64_t; ValueError outside [0, 2**64)."""
    if not (0 <= seed <= _MASK64):
        raise ValueError(f"seed must be in [0, 2**64): {seed!r}")
    return <uint64_t>seed


cdef int _fill_backends(lb_backend *out, list backends) except -1:
    """Fill out[0..len) from (address, port, weight) tuples; ValueError names
    the bad entry."""
    cdef Py_ssize_t i
    cdef bytes a16
    cdef uint8_t *p
    for i, entry in enumerate(backends):
        try:
            addr, port, weight = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"backend {i}: expected (address, port, weight), got {entry!r}") from None
        try:
            fam, a16 = _addr16(addr)
        except (ValueError, TypeError):
            raise ValueError(f"backend {i}: not an IPv4 or IPv6 address: {addr!r}") from None
        if not (0 <= port <= 0xFFFF):
            raise ValueError(f"backend {i}: port out of range: {port!r}")
        if weight < 0:
            raise ValueError(f"backend {i}: negative weight: {weight!r}")
        if weight > 0xFFFFFFFF:
            raise ValueError(f"backend {i}: weight too large (max 2**32-1): {weight!r}")
        memset(&out[i], 0, sizeof(lb_backend))
        memcpy(out[i].addr, <const char *>a16, 16)
        p = <uint8_t *>&out[i].port
        p[0] = <uint8_t>(port >> 8)
        p[1] = <uint8_t>(port & 0xFF)
        out[i].family = <uint8_t>fam
        out[i].stat_id = <uint32_t>i
        out[i].weight = <uint32_t>weight
    return 0


cdef bytearray _build_ring(list backends, object ring_size, uint64_t seed):
    """Populate a ring (M uint16 slots, native order) into a new bytearray."""
    cdef Py_ssize_t n = len(backends)
    if not (2 <= ring_size <= LB_RING_SIZE_MAX) or not lb_maglev_is_prime(<uint32_t>ring_size):
        raise ValueError(
            f"ring size must be a prime in [2, {LB_RING_SIZE_MAX}], got {ring_size!r}")
    if n > LB_MAX_BACKENDS:
        raise ValueError(f"too many backends: {n} > {LB_MAX_BACKENDS}")
    cdef uint32_t M = <uint32_t>ring_size
    cdef bytearray buf = bytearray(2 * <Py_ssize_t>M)
    cdef uint16_t *ring = <uint16_t *><char *>buf
    cdef lb_backend *bk = <lb_backend *>calloc(n if n > 0 else 1, sizeof(lb_backend))
    cdef int rc
    if bk == NULL:
        raise MemoryError("maglev: backend array")
    try:
        _fill_backends(bk, backends)
        with nogil:
            rc = lb_maglev_populate(ring, M, bk, <uint32_t>n, seed)
    finally:
        free(bk)
    if rc < 0:
        raise convert_errno(rc, "lb_maglev_populate")
    return buf


def is_prime(n: int) -> bool:
    """True if n is prime; deterministic for 0 <= n < 2**32 (ValueError outside)."""
    if not (0 <= n <= 0xFFFFFFFF):
        raise ValueError(f"is_prime is defined for 0 <= n < 2**32: {n!r}")
    return lb_maglev_is_prime(<uint32_t>n) != 0


def hash_bytes(const unsigned char[:] data, seed: int) -> int:
    """lb_hash_bytes: the seeded 64-bit hash of a bytes-like object."""
    cdef uint64_t s = _seed64(seed)
    cdef Py_ssize_t n = data.shape[0]
    cdef const unsigned char *p = &data[0] if n > 0 else <const unsigned char *>""
    return lb_hash_bytes(p, <size_t>n, s)


def hash_flow(str src, str dst, sport: int, dport: int, proto: int, seed: int) -> int:
    """lb_hash_flow of the 5-tuple: addresses v4 or v6 (both the same family),
    ports in host order. The seed is the config's selection seed."""
    cdef lb_flow_key k
    cdef uint64_t s = _seed64(seed)
    _fill_key(&k, src, dst, sport, dport, proto)
    return lb_hash_flow(&k, s)


def flow_key(str src, str dst, sport: int, dport: int, proto: int) -> bytes:
    """The 40 bytes of struct lb_flow_key as the C core builds them (for tests
    and for comparing with lbcore.reference.hash.flow_key)."""
    cdef lb_flow_key k
    _fill_key(&k, src, dst, sport, dport, proto)
    return (<char *>&k)[:sizeof(lb_flow_key)]


def maglev_ring(backends, ring_size=RING_SIZE, seed=0):
    """Build a Maglev ring (lb_maglev_populate) and return it as a memoryview
    of uint16: ring_size slots of indexes into `backends`, RING_EMPTY where no
    backend has positive weight.

    backends: sequence of (address: str, port: int, weight: int).
    Raises ValueError for a non-prime or out-of-range ring_size, too many
    backends, a bad address/port, a negative weight or a bad seed.
    """
    return memoryview(_build_ring(list(backends), ring_size, _seed64(seed))).cast("H")


cdef class MaglevTable:
    """One VIP's Maglev table: the ring plus a pick() that runs the same C
    path as the data plane (lb_maglev_pick). Immutable once built; a change
    of backends is a new MaglevTable (built aside, then swapped in, as the
    data plane does with its tables: readers never see a half-built ring)."""

    def __init__(self, backends, ring_size=RING_SIZE, seed=0):
        """backends: sequence of (address, port, weight); raises ValueError as
        maglev_ring() does."""
        cdef list bl = list(backends)
        self._seed = _seed64(seed)
        self._ring = bytes(_build_ring(bl, ring_size, self._seed))
        self._n = len(bl)
        memset(&self.vip, 0, sizeof(lb_vip))
        self.vip.ring_size = <uint32_t>ring_size
        self.vip.n_backends = <uint32_t>self._n
        self.vip.ring = <uint16_t *><const char *>self._ring

    @property
    def ring(self):
        """The ring as a read-only memoryview of uint16."""
        return memoryview(self._ring).cast("H")

    @property
    def ring_size(self) -> int:
        return self.vip.ring_size

    @property
    def n_backends(self) -> int:
        return self._n

    @property
    def seed(self) -> int:
        return self._seed

    def pick(self, str src, str dst, sport: int, dport: int, proto: int):
        """Index (into the backends given) that the flow goes to, or None if
        the table has no backend of positive weight."""
        cdef lb_flow_key k
        _fill_key(&k, src, dst, sport, dport, proto)
        cdef uint16_t v = lb_maglev_pick(&self.vip, &k, self._seed)
        return None if v == LB_RING_EMPTY else v

    def counts(self) -> list:
        """Slots owned by each backend, by index (RING_EMPTY slots not counted)."""
        cdef uint32_t s
        cdef uint16_t v
        cdef const uint16_t *ring = self.vip.ring
        cdef uint32_t *acc = <uint32_t *>calloc(self._n + 1, sizeof(uint32_t))
        if acc == NULL:
            raise MemoryError("counts")
        for s in range(self.vip.ring_size):
            v = ring[s]
            if v != LB_RING_EMPTY:
                acc[v] += 1
        c = [acc[v] for v in range(self._n)]
        free(acc)
        return c

    def __len__(self):
        return self.vip.ring_size

    def __repr__(self):
        return (f"<MaglevTable ring_size={self.vip.ring_size} "
                f"backends={self._n} seed={self._seed:#x}>")
