# Cython declarations for fastedge/observe/metrics.py (compiled in pure-Python mode):
# the registry as a C struct, so that the data path's per-request observe_request is a
# C call on typed dicts (the express lane cimports it through fastedge/proxy.pxd).

cimport cython


# Called twice per request by observe_request: a C call on a C double.
@cython.locals(i=Py_ssize_t, bound=double)
cpdef Py_ssize_t _bucket(double seconds)


cdef class Counter:
    cdef public double value
    cpdef inc(self)


cdef class Metrics:
    cdef public dict _requests, _total, _upstream, _counters, _cells, _descriptions
    cdef public list _collectors
    cpdef observe_request(self, route, method, status, total_seconds, upstream_seconds)
