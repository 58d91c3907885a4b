# Cython declarations for fastedge/upstream/health.py (compiled in pure-Python mode): a
# target's health verdict as a C struct, read for every request to a resilient upstream
# by the express lane (fastedge/upstream/resilient_tier.py).

cdef class HealthState:
    cdef public Py_ssize_t rise, fall, successes, failures, checks
    cdef public bint healthy
    cdef public object last_error
