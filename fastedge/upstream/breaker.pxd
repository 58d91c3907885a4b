# Cython declarations for fastedge/upstream/breaker.py (compiled in pure-Python mode): the
# breaker and its rolling window as C structs, since a resilient upstream asks its
# breaker about every request (admit, record) and its retry budget counts each one.

cimport cython


cdef class RollingCounts:
    cdef public double window, _width
    cdef public Py_ssize_t _n
    cdef public list _epochs, _totals, _hits
    @cython.locals(epoch=object, slot=Py_ssize_t)
    cpdef add(self, double now, Py_ssize_t total=*, Py_ssize_t hits=*)
    @cython.locals(oldest=object, i=Py_ssize_t, epochs=list)
    cpdef tuple sums(self, double now)
    @cython.locals(i=Py_ssize_t)
    cpdef clear(self)


cdef class CircuitBreaker:
    cdef public double failure_ratio, open_for, open_for_max, _opened_at, _open_for_now
    cdef public Py_ssize_t min_requests, half_open_probes, _probes_inflight
    cdef public Py_ssize_t _probe_successes, trips, generation
    cdef public str _state
    cdef public object _clock
    cdef public RollingCounts _counts
    @cython.locals(state=str)
    cpdef bint allow(self, now=*) except -1
    @cython.locals(state=str, counts=RollingCounts, when=double)
    cpdef record_outcome(self, bint success, double now, Py_ssize_t generation)
    cpdef _trip(self, double now, bint grow)
    cpdef _close(self)
