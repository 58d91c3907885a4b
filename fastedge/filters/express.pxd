# Cython declarations for fastedge/filters/express.py (compiled in pure-Python mode):
# the express lane's policy context as a C struct, made once per request on the lane.

cimport cython


cdef class ExpressContext:
    cdef public object request, claims, auth, memo
    cdef public bytes client_ip, extra
    cdef public str route
    cdef public tuple drop, fields


cdef class ExpressPolicyBase:
    cpdef bint express_check(self, ExpressContext x) except -1
    cpdef express_apply(self, ExpressContext x)


@cython.locals(x=ExpressContext, p=ExpressPolicyBase)
cpdef ExpressContext admit(tuple filters, request, bytes client_ip, str route)
