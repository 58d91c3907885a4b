# Cython declarations for fastedge/filters/express.py (compiled in pure-Python mode):
# the express lane's policy context as a C struct, made once per request on the lane.

cimport cython


cdef class ExpressContext:
    cdef public object request, claims, auth, memo
    cdef public bytes client_ip, extra
    cdef public str route
    cdef public tuple drop, fields


@cython.locals(x=ExpressContext)
cpdef ExpressContext admit(tuple filters, request, bytes client_ip, str route)
