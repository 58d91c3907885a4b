# Cython declarations for fastedge/filters/auth.py (compiled in pure-Python mode): the
# filter as a C struct, so that the express lane's admit() calls its check and apply as
# C methods (fastedge/filters/express.pxd) for every request on a route with auth.

cimport cython

from fastedge.filters.express cimport ExpressContext, ExpressPolicyBase


cdef class AuthFilter(ExpressPolicyBase):
    cdef public object state
    cdef public bint express_ready
    @cython.locals(value=bytes, n=Py_ssize_t, token=bytes, now=double)
    cpdef bint express_check(self, ExpressContext x) except -1
    cpdef express_apply(self, ExpressContext x)
