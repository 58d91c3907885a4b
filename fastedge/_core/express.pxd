# C declarations of fastedge/_core/express.pyx, cimported by the compiled proxy
# (fastedge/proxy.pxd) so that it reads an ExpressRequest's fields without attribute
# lookups and calls both scanners as C functions.

cdef class ExpressRequest:
    cdef readonly bytes method, target, path, query, host, request_id, data
    cdef readonly bint keep_alive, cache_sensitive, traced
    cdef readonly object authorization  # bytes, or None (absent or sent twice)
    cdef bytes _block  # the rewritten fields, each ending in CRLF
    cdef Py_ssize_t _fields_at  # where the first field line starts in data


cpdef ExpressRequest scan_request(
    bytes data,
    bytes client_ip,
    bytes proto,
    bytes via,
    Py_ssize_t max_head,
    Py_ssize_t max_uri,
    int max_headers,
)
cpdef tuple scan_response(bytes data, bint head_request, bytes via, bytes request_id, bint close)
cpdef tuple scan_response_start(bytes data, bint head_request, bytes via, bytes request_id, bint close)
