# Cython declarations for fastedge/filters/ratelimit.py (compiled in pure-Python mode):
# the filter as a C struct, so that the express lane's admit() calls its check and apply
# as C methods (fastedge/filters/express.pxd) for every request on a limited route.

from fastedge.filters.express cimport ExpressContext, ExpressPolicyBase


cdef class RateLimitFilter(ExpressPolicyBase):
    cdef public object _only, policies
    cdef public bint express_ready
    cdef public str name
    cpdef bint express_check(self, ExpressContext x) except -1
    cpdef express_apply(self, ExpressContext x)
