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


cdef class Metrics


@cython.locals(cell=Counter)
cdef _record(list hist, double seconds)


# A route's request metrics as a cell: the express lane records each request through
# one C call on C doubles, without the registry's dictionary lookups.
cdef class RouteStats:
    cdef public Metrics metrics
    cdef public str name
    cdef public list total, upstream
    cdef public object _method
    cdef public long _status
    cdef public Counter _cell
    @cython.locals(cell=Counter, hist=list)
    cpdef observe(self, str method, long status, double total_seconds, upstream_seconds)
    @cython.locals(cell=Counter)
    cpdef Counter _series(self, str method, long status)


cdef class Metrics:
    cdef public dict _requests, _routes, _total, _upstream, _counters, _cells, _descriptions
    cdef public list _collectors
    @cython.locals(stats=RouteStats)
    cpdef observe_request(self, route, method, status, total_seconds, upstream_seconds)
    cpdef RouteStats route(self, str route)
    cpdef list _histogram(self, dict data, str route)
