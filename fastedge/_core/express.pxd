# C declarations of fastedge/_core/express.pyx, cimported by the compiled proxy
# (fastedge/proxy.pxd) so that it reads an ExpressRequest's fields without attribute
# lookups and calls both scanners as C functions.

cdef class ExpressRequest:
    cdef readonly bytes method, target, path, query, host, request_id, data
    cdef readonly str method_name  # method, decoded
    cdef readonly bint keep_alive, cache_sensitive, traced, is_head, get_or_head
    cdef readonly object authorization  # bytes, or None (absent or sent twice)
    cdef readonly object length_field  # the content-length line, or None (no such field)
    cdef readonly Py_ssize_t body_length
    cdef bytes _block  # the rewritten fields, each ending in CRLF
    cdef Py_ssize_t _fields_at  # where the first field line starts in data
    cdef Py_ssize_t _head_end  # where the body starts in data
    cpdef bytes compose(self, bytes target, tuple drop=*, bytes extra=*)


cpdef ExpressRequest scan_request(
    bytes data,
    bytes client_ip,
    bytes proto,
    bytes via,
    Py_ssize_t max_head,
    Py_ssize_t max_uri,
    int max_headers,
    Py_ssize_t max_body=*,
)
cpdef double monotonic() noexcept
cpdef tuple scan_response(bytes data, bint head_request, bytes via, bytes request_id, bint close)
cpdef tuple scan_response_start(bytes data, bint head_request, bytes via, bytes request_id, bint close)
