# lbcore/_core.pxd - the C-level face of lbcore._core (built from ext/_core.pyx)
# for the extensions that cimport it: lbcore._testing reaches the C structs
# behind FlowTable, MaglevTable and Dataplane through these declarations, so
# its benchmark and stress loops run on the product's own objects.
# Keep in step with ext/*.pxi: a field declared here is declared only here.
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from lb cimport lb_flowtable, lb_flow_entry, lb_vip, lb_dataplane, lb_rawsock, lb_shm


@cython.final
cdef class FlowTable:
    cdef lb_flowtable *ft
    cdef bint _owned
    cdef object _owner          # keeps the real owner of a viewed table alive
    cdef dict _timeouts
    cdef lb_flowtable *_t(self) except NULL
    cdef int _insert(self, lb_flow_entry *e, object client, object cport, object vip,
                     object vport, object backend, object bport, object proto, object state,
                     uint32_t now, uint32_t vip_stat, uint32_t be_stat) except? -1


@cython.final
cdef class MaglevTable:
    cdef lb_vip vip
    cdef bytes _ring            # owns vip.ring; never written after the build
    cdef uint64_t _seed
    cdef Py_ssize_t _n


@cython.final
cdef class Dataplane:
    cdef lb_dataplane *dp
    cdef lb_rawsock *rs
    cdef readonly uint32_t workers
    cdef object _lock           # serialises the control side's worker slot
    cdef dict _timeouts
    cdef lb_shm shm             # the flow table's file (base NULL: none)
    cdef object _flow_file      # its path once committed
    cdef object _pending_file   # its path until commit_flow_file (the mapping is of path + ".new")
    cdef bytes _boot_id
    cdef dict _io               # worker -> (I/O path, why not io_uring) of its TUN loop
    cdef lb_rawsock *_rawsock(self) except NULL


# Python values <-> struct fields (addr.pxi, packet.pxi), shared so that the
# testing extension converts arguments exactly as the product does.
cdef int _proto(object proto) except -1
cdef int _state(object state) except -1
cdef int _pk_entry(object entry, lb_flow_entry *e) except -1


cdef inline uint16_t _be16(uint32_t port) noexcept nogil:
    """A host-order port as the big-endian value the structs hold."""
    cdef uint8_t b[2]
    cdef uint16_t r
    b[0] = <uint8_t>(port >> 8)
    b[1] = <uint8_t>(port & 0xFF)
    memcpy(&r, b, 2)
    return r


cdef inline uint32_t _host16(uint16_t v) noexcept nogil:
    """A big-endian struct field as a host-order number."""
    cdef const uint8_t *b = <const uint8_t *>&v
    return (<uint32_t>b[0] << 8) | b[1]
