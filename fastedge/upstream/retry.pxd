# Cython declarations for fastedge/upstream/retry.py (compiled in pure-Python mode): the
# retry budget as a C struct, since every request to an upstream with retries counts
# toward it (record_request).

from fastedge.upstream.breaker cimport RollingCounts


cdef class RetryBudget:
    cdef public double ratio, min_per_second, _floor
    cdef public RollingCounts _requests, _retries
    cpdef record_request(self, double now)
