# Cython declarations for fastedge/upstream/express_view.py (compiled in pure-Python
# mode): fastedge/proxy.pxd cimports the class so the lane reads its fields in C.

from fastedge.upstream.resilient_tier cimport ResilientTier


cdef class ExpressView:
    cdef public bint express, plain, resilient, keyed, load_aware, verdicts, p2c
    cdef public object host_field, balancer
    cdef public ResilientTier tier
    cdef public double response_timeout
