# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""lbcore._core - the compiled forwarding core.

One extension assembled from .pxi parts (as uvloop does): the C data plane in
ext/lb_*.c is reached only through the classes and functions defined here.
"""
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, calloc, free
from lb cimport *

include "consts.pxi"
include "errors.pxi"
include "addr.pxi"
include "maglev.pxi"
include "flowtable.pxi"
include "packet.pxi"
include "rawsock.pxi"
include "persist.pxi"
include "dataplane.pxi"
