# Cython declarations for fastedge/upstream/resilient_tier.py (compiled in pure-Python
# mode): the express lane calls attempt(), record_request() and report() as C methods
# (fastedge/proxy.pxd cimports the class), and they read the breakers, health verdicts
# and budget as C structs.

cimport cython

from fastedge.upstream.breaker cimport CircuitBreaker
from fastedge.upstream.health cimport HealthState
from fastedge.upstream.retry cimport RetryBudget


cdef class ResilientTier:
    cdef public object upstream, groups, tier, outlier
    cdef public list targets, states, breakers, names, _ok
    cdef public Py_ssize_t n
    cdef public RetryBudget budget
    @cython.locals(ok=list, states=list, breakers=list, found=bint, i=Py_ssize_t, state=HealthState, available=bint, b=CircuitBreaker)
    cpdef bint _scan(self, double now, bint ejection) except -1
    @cython.locals(now=double, i=Py_ssize_t, ok=list, targets=list)
    cpdef tuple attempt(self)
    @cython.locals(b=CircuitBreaker)
    cpdef tuple _admit(self, Py_ssize_t i)
    @cython.locals(budget=RetryBudget)
    cpdef record_request(self)
    @cython.locals(ok=bint, b=CircuitBreaker)
    cpdef report(self, object target, long long generation, int status)
