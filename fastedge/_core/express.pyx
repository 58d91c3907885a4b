# cython: language_level=3
"""The express lane's scanners, in C: one simple request head, one simple response.

The proxy's general path parses with llhttp through Python callbacks, builds a header
list, rewrites it and serialises it again: about 40% of its instructions per request. For
the commonest exchange (a request that arrives whole, head and ``Content-Length`` body,
answered by a response with a ``Content-Length`` or chunked body) these functions do the
same work on the raw bytes: validate, rewrite the fields and write the bytes to send, with a handful of
allocations.

They are deliberately *conservative*: anything unusual (a chunked request, an upgrade, an odd
``Connection``, a byte outside the plain sets, a message split across reads) returns
``None`` and the proxy takes its general path, which gives the exact answer. What they do
accept they must turn into exactly the bytes the general path would send; the pure-Python
twin ``express_py.py`` is the readable specification and ``tests/core/test_express.py``
holds both to the general path, byte for byte.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "Python.h":
    int _PyBytes_Resize(PyObject** obj, Py_ssize_t size) except -1

# --------------------------------------------------------------------------------------
# Character classes (RFC 9110 §5.6.2 tchar; field-value VCHAR; a conservative subset of
# RFC 3986 for the request-target: anything else goes to llhttp, which decides).
# --------------------------------------------------------------------------------------
cdef unsigned char _TCHAR[256]
cdef unsigned char _VCHAR[256]
cdef unsigned char _VALUE[256]  # 1: VCHAR, 2: SP or HTAB, 0: ends the value
cdef unsigned char _LOWER[256]
cdef unsigned char _TARGET[256]


cdef void _init_tables():
    cdef int c
    for c in range(256):
        _TCHAR[c] = 0
        _VCHAR[c] = 1 if 0x21 <= c <= 0x7E else 0
        _TARGET[c] = 0
        _VALUE[c] = 1 if 0x21 <= c <= 0x7E else (2 if c == 32 or c == 9 else 0)
        _LOWER[c] = c + 32 if 65 <= c <= 90 else c
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        _TCHAR[c] = 1
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%":
        _TARGET[c] = 1


_init_tables()

cdef enum:
    MAX_FIELDS = 100
    MAX_RESPONSE_HEAD = 65536
    MAX_REQUEST_ID = 200

# Field kinds.
cdef enum:
    K_OTHER = 0  # kept as is
    K_DROP = 1  # hop-by-hop or replaced by this hop: not forwarded
    K_HOST = 2
    K_XFF = 3
    K_VIA = 4
    K_XRID = 5
    K_CONN = 6
    K_REFUSE = 7  # the general path must handle this message
    K_CL = 8
    K_CLOSE_NAME = 9  # a field named "close": nominated away by "Connection: close"
    K_PROXY_CONN = 10  # llhttp reads it as Connection: only "keep-alive" is plain
    K_CACHE = 11  # kept; a cache must look at it (Cache-Control, conditionals)
    K_AUTH = 12  # kept; its value is handed to an auth policy (Authorization)
    K_TRACE = 13  # kept; a tracer must look at it (traceparent, tracestate)
    K_TE = 14  # a response's Transfer-Encoding: "chunked" is re-framed, else refused

cdef struct Field:
    Py_ssize_t name
    Py_ssize_t name_len
    Py_ssize_t value
    Py_ssize_t value_len
    int kind


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef inline bint _is(const unsigned char* p, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept nogil:
    """Whether p[:n], lower-cased, equals the lower-case literal ``lit``."""
    cdef Py_ssize_t i
    if n != m:
        return False
    for i in range(n):
        if _lower(p[i]) != <unsigned char>lit[i]:
            return False
    return True


cdef int _hop_kind(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """The fields both directions treat alike (hop-by-hop, Via, X-Request-Id, a field
    named ``close``); K_OTHER for any other name."""
    if n == 10:
        if _is(p, n, b"connection", 10):
            return K_CONN
        if _is(p, n, b"keep-alive", 10):
            return K_DROP
    if n == 3 and _is(p, n, b"via", 3):
        return K_VIA
    if n == 12 and _is(p, n, b"x-request-id", 12):
        return K_XRID
    if n == 5 and _is(p, n, b"close", 5):
        return K_CLOSE_NAME
    if _is(p, n, b"transfer-encoding", 17) or _is(p, n, b"upgrade", 7):
        return K_REFUSE
    if _is(p, n, b"proxy-connection", 16):
        return K_PROXY_CONN
    if _is(p, n, b"te", 2) or _is(p, n, b"trailer", 7):
        return K_DROP
    return K_OTHER


cdef int _request_kind(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    if n == 4 and _is(p, n, b"host", 4):
        return K_HOST
    if n == 15 and _is(p, n, b"x-forwarded-for", 15):
        return K_XFF
    if _is(p, n, b"content-length", 14):
        return K_CL  # a body, whole in this read: forwarded after the head
    if _is(p, n, b"expect", 6):
        return K_REFUSE  # 100-continue: the general path's
    cdef int kind = _hop_kind(p, n)
    if kind != K_OTHER:
        return kind
    if (
        _is(p, n, b"cache-control", 13)
        or _is(p, n, b"if-none-match", 13)
        or _is(p, n, b"if-modified-since", 17)
    ):
        return K_CACHE
    if n == 13 and _is(p, n, b"authorization", 13):
        return K_AUTH
    if _is(p, n, b"traceparent", 11) or _is(p, n, b"tracestate", 10):
        return K_TRACE
    if _is(p, n, b"x-forwarded-proto", 17) or _is(p, n, b"x-forwarded-host", 16):
        return K_DROP  # set by this hop from what it saw
    return K_OTHER


cdef int _response_kind(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    if n == 14 and _is(p, n, b"content-length", 14):
        return K_CL
    if n == 17 and _is(p, n, b"transfer-encoding", 17):
        return K_TE
    if n == 6 and _is(p, n, b"expect", 6):
        return K_DROP
    return _hop_kind(p, n)


# Eight bytes at once: whether all are SP or VCHARs (0x20-0x7E), as Bit Twiddling Hacks'
# hasless(w, 0x20) | hasmore(w, 0x7E) is zero (exact as a yes or no).
cdef uint64_t _ONES = 0x0101010101010101
cdef uint64_t _HIGH = 0x8080808080808080


cdef inline bint _eight_plain(const unsigned char* p) noexcept nogil:
    cdef uint64_t w
    memcpy(&w, p, 8)
    return ((((w - _ONES * 0x20) & ~w) | ((w + _ONES) | w)) & _HIGH) == 0


cdef Py_ssize_t _fields(
    const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, Field* out, int limit, int* count
) noexcept nogil:
    """Parse field lines from ``pos`` up to and including the blank line; returns the
    position after it (the head's end), or -1 for anything outside the plain syntax."""
    cdef Py_ssize_t start, vstart, vend, lim
    cdef const unsigned char* cr
    cdef int n = 0
    while True:
        if pos + 2 > end:
            return -1
        if p[pos] == 13:
            if p[pos + 1] != 10:
                return -1
            count[0] = n
            return pos + 2
        start = pos
        # Every bytes object ends in a NUL (p[end] == 0), which no table admits: the
        # scans below stop at the end without a bounds check per byte.
        while _TCHAR[p[pos]]:
            pos += 1
        if pos == start or pos >= end or p[pos] != 58:  # ':' right after the name
            return -1
        if n == limit:
            return -1
        out[n].name = start
        out[n].name_len = pos - start
        pos += 1
        while p[pos] == 32 or p[pos] == 9:
            pos += 1
        vstart = pos
        # The line ends at the first CR (memchr: values such as a bearer token can be
        # long); every byte before it must be a VCHAR, SP or HTAB, a word at a time
        # while the words hold no control byte, then byte by byte.
        cr = <const unsigned char*>memchr(p + pos, 13, end - pos)
        if cr == NULL:
            return -1
        lim = cr - p
        while pos + 8 <= lim and _eight_plain(p + pos):
            pos += 8
        while pos < lim:
            if _VALUE[p[pos]] == 0:
                return -1
            pos += 1
        if lim + 2 > end or p[lim + 1] != 10:
            return -1
        vend = lim  # the value without trailing whitespace
        while vend > vstart and (p[vend - 1] == 32 or p[vend - 1] == 9):
            vend -= 1
        pos = lim + 2
        out[n].value = vstart
        out[n].value_len = vend - vstart
        n += 1


cdef inline bint _connection_value(const unsigned char* p, Field* f, bint* close) noexcept nogil:
    """``keep-alive`` or ``close`` (any case); False for any other value."""
    if _is(p + f.value, f.value_len, b"keep-alive", 10):
        return True
    if _is(p + f.value, f.value_len, b"close", 5):
        close[0] = True
        return True
    return False


cdef inline bint _hop_field(
    const unsigned char* p, Field* f, int kind, int i, bint* close, int* via_i
) noexcept nogil:
    """The fields both directions check alike (``_hop_kind``): ``Connection`` only
    ``keep-alive``/``close`` (``close`` noted), ``Proxy-Connection`` only ``keep-alive``,
    at most one ``Via`` (its index noted). False: the general path's message."""
    if kind == K_CONN:
        return _connection_value(p, f, close)
    if kind == K_PROXY_CONN:
        return _is(p + f.value, f.value_len, b"keep-alive", 10)
    if via_i[0] >= 0:  # K_VIA
        return False
    via_i[0] = i
    return True


cdef inline char* _put(char* w, const void* src, Py_ssize_t n) noexcept nogil:
    memcpy(w, src, n)
    return w + n


cdef inline char* _put_lower(char* w, const unsigned char* src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        w[i] = <char>_LOWER[src[i]]
    return w + n


cdef inline char* _put_field(char* w, const unsigned char* p, Field* f) noexcept nogil:
    w = _put_lower(w, p + f.name, f.name_len)
    w[0] = 58
    w[1] = 32
    w = _put(w + 2, p + f.value, f.value_len)
    w[0] = 13
    w[1] = 10
    return w + 2


cdef char* _put_kept(char* w, const unsigned char* block, Py_ssize_t n, tuple drop) except NULL:
    """Copy the field lines of ``block`` (our own output: lower-case names, CRLF
    endings) except those whose name is in ``drop``."""
    cdef Py_ssize_t pos = 0, colon, eol, nlen
    cdef bint keep
    cdef object name
    while pos < n:
        colon = pos
        while block[colon] != 58:
            colon += 1
        # The line's end: memchr, since values (a bearer token) can be long.
        eol = <const unsigned char*>memchr(block + colon, 10, n - colon) - block + 1
        keep = True
        for name in drop:
            nlen = PyBytes_GET_SIZE(name)
            if nlen == colon - pos and memcmp(PyBytes_AS_STRING(name), block + pos, nlen) == 0:
                keep = False
                break
        if keep:
            w = _put(w, block + pos, eol - pos)
        pos = eol
    return w


# --------------------------------------------------------------------------------------
# Request ids (shared with fastedge.http.headers.new_request_id: one counter per process)
# --------------------------------------------------------------------------------------
cdef bytes _ID_PREFIX = os.urandom(6).hex().encode()
cdef unsigned long long _id_counter = 0
cdef const char* _HEX = b"0123456789abcdef"


cdef bytes _new_id():
    global _id_counter
    cdef char digits[32]
    cdef int n = 0, i
    cdef unsigned long long v
    _id_counter += 1
    v = _id_counter
    while v or n < 10:
        digits[n] = _HEX[v & 15]
        v >>= 4
        n += 1
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(_ID_PREFIX)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, plen + n)
    cdef char* w = PyBytes_AS_STRING(out)
    memcpy(w, PyBytes_AS_STRING(_ID_PREFIX), plen)
    for i in range(n):
        w[plen + i] = digits[n - 1 - i]
    return out


def new_request_id():
    """A process-unique request id: a random per-process prefix and a counter.

    Cheaper than ``uuid4`` (no syscall per request) and unique across processes and
    restarts with overwhelming probability (48 random bits per process).
    """
    return _new_id()


# --------------------------------------------------------------------------------------
# Trace contexts for traced express requests (fastedge.observe.tracing for the model)
# --------------------------------------------------------------------------------------
cdef enum:
    RANDOM_POOL = 4096

cdef unsigned char _random[RANDOM_POOL]
cdef Py_ssize_t _random_at = RANDOM_POOL


def _fresh_pool_after_fork():
    # A forked worker must not hand out the ids its parent will also use.
    global _random_at
    _random_at = RANDOM_POOL


os.register_at_fork(after_in_child=_fresh_pool_after_fork)


cdef int _draw(unsigned char* out, Py_ssize_t n) except -1:
    """``n`` random bytes, never all zero (W3C Trace Context: an all-zero id is invalid),
    from os.urandom drawn 4 KiB at a time."""
    global _random_at
    cdef Py_ssize_t i
    cdef bytes fresh
    while True:
        if _random_at + n > RANDOM_POOL:
            fresh = os.urandom(RANDOM_POOL)
            memcpy(_random, PyBytes_AS_STRING(fresh), RANDOM_POOL)
            _random_at = 0
        memcpy(out, _random + _random_at, n)
        _random_at += n
        for i in range(n):
            if out[i]:
                return 0


cdef inline void _hex(char* w, const unsigned char* src, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        w[2 * i] = _HEX[src[i] >> 4]
        w[2 * i + 1] = _HEX[src[i] & 15]


def new_root_trace(object bound not None):
    """A new trace for a request without a caller's context, sampled as
    ``TraceIdRatio`` with this ``bound`` (``round(ratio * 2**64)``) would: when the trace
    id's right-most 8 bytes, big-endian, are below it.

    ``(trace_id, None, None)`` when sampled (the general path records it under that id);
    else ``(trace_id, span_id, line)`` with ``line`` the ``traceparent`` field line
    ``Tracer.inject`` writes for an unsampled span without a parent (CRLF included).
    """
    cdef unsigned char tid[16]
    cdef unsigned char sid[8]
    cdef char text[32]
    cdef unsigned long long low = 0
    cdef int i
    _draw(tid, 16)
    for i in range(8, 16):
        low = (low << 8) | tid[i]
    _hex(text, tid, 16)
    trace_id = text[:32].decode("ascii")
    if bound > low:
        return (trace_id, None, None)
    _draw(sid, 8)
    _hex(text, sid, 8)
    span_id = text[:16].decode("ascii")
    cdef bytes line = PyBytes_FromStringAndSize(NULL, 70)
    cdef char* w = PyBytes_AS_STRING(line)
    w = _put(w, b"traceparent: 00-", 16)
    _hex(w, tid, 16)
    w[32] = 45  # '-'
    _hex(w + 33, sid, 8)
    _put(w + 49, b"-00\r\n", 5)
    return (trace_id, span_id, line)


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------
cdef bytes _GET = b"GET"
cdef bytes _HEAD = b"HEAD"
cdef bytes _POST = b"POST"
cdef bytes _PUT = b"PUT"
cdef bytes _PATCH = b"PATCH"
cdef bytes _DELETE = b"DELETE"
cdef bytes _OPTIONS = b"OPTIONS"
cdef bytes _EMPTY = b""
# The request methods the lane takes, and their names (ExpressRequest.method_name).
cdef tuple _METHODS = (_GET, _HEAD, _POST, _PUT, _PATCH, _DELETE, _OPTIONS)
cdef tuple _METHOD_NAMES = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
cdef enum:
    MAX_CONTENT_LENGTH_DIGITS = 15  # below 2**53: no C overflow, as llhttp reads it


cdef class ExpressRequest:
    """One simple request head, scanned and rewritten for the upstream (fields declared
    in express.pxd, so that the compiled proxy reads them as C fields)."""

    def __init__(self):
        raise TypeError("ExpressRequest objects come from scan_request()")

    cpdef bytes compose(self, bytes target, tuple drop=None, bytes extra=None):
        """The upstream request: ``METHOD target HTTP/1.1``, the fields without those
        named in ``drop`` (lower-case names), ``extra`` (field lines, each ending in
        CRLF), the blank line."""
        # cpdef: the compiled proxy calls it in C (no method lookup per request).
        if target is None:
            raise TypeError("compose(): target must be bytes, not None")
        cdef Py_ssize_t mlen = PyBytes_GET_SIZE(self.method)
        cdef Py_ssize_t tlen = PyBytes_GET_SIZE(target)
        cdef Py_ssize_t blen = PyBytes_GET_SIZE(self._block)
        cdef Py_ssize_t xlen = 0 if extra is None else PyBytes_GET_SIZE(extra)
        cdef Py_ssize_t body = self.body_length
        cdef object name
        if drop:
            for name in drop:
                if type(name) is not bytes:
                    raise TypeError("compose(): drop holds field names as bytes")
        cdef bytes out = PyBytes_FromStringAndSize(NULL, mlen + tlen + blen + xlen + body + 14)
        cdef char* start = PyBytes_AS_STRING(out)
        cdef char* w = start
        w = _put(w, PyBytes_AS_STRING(self.method), mlen)
        w[0] = 32
        w = _put(w + 1, PyBytes_AS_STRING(target), tlen)
        w = _put(w, b" HTTP/1.1\r\n", 11)
        if drop:
            w = _put_kept(w, <const unsigned char*>PyBytes_AS_STRING(self._block), blen, drop)
        else:
            w = _put(w, PyBytes_AS_STRING(self._block), blen)
        if xlen:
            w = _put(w, PyBytes_AS_STRING(extra), xlen)
        w[0] = 13
        w[1] = 10
        w += 2
        if body:  # the body, whole (scan_request checked its length)
            w = _put(w, PyBytes_AS_STRING(self.data) + self._head_end, body)
        cdef PyObject* raw
        if w - start != PyBytes_GET_SIZE(out):
            # Lines were dropped: the bytes object is still private (one reference), so
            # shrink it in place rather than copy a slice.
            raw = <PyObject*>out
            Py_INCREF(out)  # raw's reference; then out lets go of its own
            out = None
            _PyBytes_Resize(&raw, w - start)  # on failure raw is freed and NULL
            out = <object>raw
            Py_DECREF(out)  # raw's reference is now out's
        return out

    def headers(self):
        """Every field as the codec would report it: ``(lower-cased name, trimmed
        value)`` in order, hop-by-hop ones included (for filters that answer from
        memory). Scanned again from ``data``: only such routes pay for the list."""
        cdef Field fields[MAX_FIELDS]
        cdef int count = 0, i
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(self.data)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(self.data)
        cdef list out = []
        cdef bytes name
        cdef Field* f
        if _fields(p, self._fields_at, end, fields, MAX_FIELDS, &count) != self._head_end:
            raise AssertionError("express request fields no longer scan")
        for i in range(count):
            f = &fields[i]
            name = PyBytes_FromStringAndSize(NULL, f.name_len)
            _put_lower(PyBytes_AS_STRING(name), p + f.name, f.name_len)
            out.append(
                (name, PyBytes_FromStringAndSize(<const char*>p + f.value, f.value_len))
            )
        return out

    @property
    def body(self):
        """The request body (``b""`` without one): ``body_length`` bytes after the head."""
        return self.data[self._head_end:]


# cpdef: the compiled proxy calls both scanners as C functions (express.pxd).
cpdef ExpressRequest scan_request(
    bytes data,
    bytes client_ip,
    bytes proto,
    bytes via,
    Py_ssize_t max_head,
    Py_ssize_t max_uri,
    int max_headers,
    Py_ssize_t max_body=-1,
):
    """An :class:`ExpressRequest` when ``data`` is exactly one simple request (a head,
    and its ``Content-Length`` body whole), else ``None`` (see the module docstring and
    ``express_py.scan_request``)."""
    if data is None or client_ip is None or proto is None or via is None:
        raise TypeError("scan_request() takes bytes, not None")
    cdef Field fields[MAX_FIELDS]
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos, tstart, tend, qpos = -1, head_end, size, i
    cdef int count = 0, kind, limit
    cdef int host_i = -1, xff_i = -1, via_i = -1, rid_i = -1, auth_i = -1, auths = 0
    cdef int cl_i = -1, cl_digits = 0
    cdef Py_ssize_t cl = 0
    cdef bint close = False, close_named = False, valid, cache_sensitive = False
    cdef bint traced = False
    cdef bytes method, candidate
    cdef str method_name
    cdef Py_ssize_t k, mlen
    cdef Field* f
    if end < 18:
        return None
    # RFC 9110 §9.3's methods but CONNECT and TRACE (the general path refuses or
    # answers those), GET first; any other token is the general path's. end >= 18:
    # p[mlen] (at most p[7]) is inside the request.
    method = None
    for k in range(7):
        candidate = <bytes>PyTuple_GET_ITEM(_METHODS, k)
        mlen = PyBytes_GET_SIZE(candidate)
        if p[mlen] == 32 and memcmp(p, PyBytes_AS_STRING(candidate), mlen) == 0:
            method = candidate
            method_name = <str>PyTuple_GET_ITEM(_METHOD_NAMES, k)
            pos = mlen + 1
            break
    if method is None:
        return None
    tstart = pos
    if p[pos] != 47:  # origin-form only: '/'
        return None
    while _TARGET[p[pos]]:  # stops at the NUL after the bytes, at the latest
        if p[pos] == 63 and qpos < 0:  # '?'
            qpos = pos
        pos += 1
    tend = pos
    if tend - tstart > max_uri or pos + 11 > end or memcmp(p + pos, b" HTTP/1.1\r\n", 11) != 0:
        return None
    limit = max_headers if max_headers < MAX_FIELDS else MAX_FIELDS
    if limit < 0:
        limit = 0
    cdef Py_ssize_t fields_at = pos + 11
    head_end = _fields(p, fields_at, end, fields, limit, &count)
    if head_end < 0 or head_end > max_head:  # malformed, or over the head limit (431)
        return None
    size = 0
    for i in range(count):
        f = &fields[i]
        kind = f.kind = _request_kind(p + f.name, f.name_len)
        if kind == K_OTHER:
            size += f.name_len + f.value_len + 4
        elif kind == K_HOST:
            if host_i >= 0 or f.value_len == 0:
                return None
            host_i = i
            size += f.name_len + f.value_len + 4
        elif kind == K_CLOSE_NAME or kind == K_CACHE or kind == K_AUTH or kind == K_TRACE:
            # Forwarded as they are; what they say is noted for the caller.
            if kind == K_CLOSE_NAME:
                close_named = True
            elif kind == K_CACHE:
                cache_sensitive = True
            elif kind == K_AUTH:
                auth_i = i
                auths += 1
            else:
                traced = True
            f.kind = K_OTHER
            size += f.name_len + f.value_len + 4
        elif kind == K_CONN or kind == K_PROXY_CONN or kind == K_VIA:
            if not _hop_field(p, f, kind, i, &close, &via_i):
                return None
        elif kind == K_XFF:
            if xff_i >= 0:
                return None
            xff_i = i
        elif kind == K_XRID:
            if rid_i < 0 and 0 < f.value_len <= MAX_REQUEST_ID:
                valid = True
                for pos in range(f.value, f.value + f.value_len):
                    if not _VCHAR[p[pos]]:
                        valid = False
                        break
                if valid:
                    rid_i = i
        elif kind == K_CL:
            # 1-15 ASCII digits, once: anything else (a list, a sign, a second field)
            # is the general path's 400.
            if cl_i >= 0 or f.value_len == 0 or f.value_len > MAX_CONTENT_LENGTH_DIGITS:
                return None
            for pos in range(f.value, f.value + f.value_len):
                if p[pos] < 48 or p[pos] > 57:
                    return None
                cl = cl * 10 + (p[pos] - 48)
            cl_i = i
        elif kind == K_REFUSE:
            return None
    # The body is exactly the rest of the read (none without Content-Length): anything
    # else is a body still to come, or a pipelined request.
    if end - head_end != cl:
        return None
    if cl_i >= 0 and 0 <= max_body < cl:
        return None  # the general path's 413
    if host_i < 0 or (close and close_named):
        # No Host (the general path answers 400), or "Connection: close" nominating a
        # field that is also present: the general path drops it; leave that to it.
        return None
    cdef ExpressRequest req = ExpressRequest.__new__(ExpressRequest)
    req.method = method
    req.method_name = method_name
    req.is_head = method is _HEAD
    req.get_or_head = method is _GET or method is _HEAD
    req.data = data
    req._fields_at = fields_at
    req._head_end = head_end
    req.body_length = cl
    req.keep_alive = not close
    req.cache_sensitive = cache_sensitive
    req.traced = traced
    if auths == 1:
        f = &fields[auth_i]
        req.authorization = PyBytes_FromStringAndSize(<const char*>p + f.value, f.value_len)
    req.target = PyBytes_FromStringAndSize(<const char*>p + tstart, tend - tstart)
    if qpos < 0:
        req.path = req.target
        req.query = _EMPTY
    else:
        req.path = PyBytes_FromStringAndSize(<const char*>p + tstart, qpos - tstart)
        req.query = PyBytes_FromStringAndSize(<const char*>p + qpos, tend - qpos)
    f = &fields[host_i]
    req.host = PyBytes_FromStringAndSize(<const char*>p + f.value, f.value_len)
    if rid_i >= 0:
        f = &fields[rid_i]
        req.request_id = PyBytes_FromStringAndSize(<const char*>p + f.value, f.value_len)
    else:
        req.request_id = _new_id()
    cdef Py_ssize_t iplen = PyBytes_GET_SIZE(client_ip)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(proto)
    cdef Py_ssize_t vialen = PyBytes_GET_SIZE(via)
    cdef Py_ssize_t ridlen = PyBytes_GET_SIZE(req.request_id)
    size += 17 + iplen + 2  # x-forwarded-for
    if xff_i >= 0:
        size += fields[xff_i].value_len + 2
    size += 19 + plen + 2  # x-forwarded-proto
    size += 18 + fields[host_i].value_len + 2  # x-forwarded-host
    size += 5 + vialen + 2  # via
    if via_i >= 0:
        size += fields[via_i].value_len + 2
    size += 14 + ridlen + 2  # x-request-id
    if cl_i >= 0:  # content-length, re-emitted from the parsed number (Exchange.start)
        cl_digits = 1
        pos = cl
        while pos >= 10:
            pos //= 10
            cl_digits += 1
        size += 16 + cl_digits + 2
    cdef bytes block = PyBytes_FromStringAndSize(NULL, size)
    cdef char* w = PyBytes_AS_STRING(block)
    for i in range(count):
        f = &fields[i]
        if f.kind == K_OTHER or f.kind == K_HOST:
            w = _put_field(w, p, f)
    w = _put(w, b"x-forwarded-for: ", 17)
    if xff_i >= 0:
        w = _put(w, p + fields[xff_i].value, fields[xff_i].value_len)
        w = _put(w, b", ", 2)
    w = _put(w, PyBytes_AS_STRING(client_ip), iplen)
    w = _put(w, b"\r\nx-forwarded-proto: ", 21)
    w = _put(w, PyBytes_AS_STRING(proto), plen)
    w = _put(w, b"\r\nx-forwarded-host: ", 20)
    w = _put(w, p + fields[host_i].value, fields[host_i].value_len)
    w = _put(w, b"\r\nvia: ", 7)
    if via_i >= 0:
        w = _put(w, p + fields[via_i].value, fields[via_i].value_len)
        w = _put(w, b", ", 2)
    w = _put(w, PyBytes_AS_STRING(via), vialen)
    w = _put(w, b"\r\nx-request-id: ", 16)
    w = _put(w, PyBytes_AS_STRING(req.request_id), ridlen)
    w[0] = 13
    w[1] = 10
    w += 2
    if cl_i >= 0:
        w = _put(w, b"content-length: ", 16)
        pos = cl
        for i in range(cl_digits - 1, -1, -1):
            w[i] = <char>(48 + pos % 10)
            pos //= 10
        w[cl_digits] = 13
        w[cl_digits + 1] = 10
        # The same line on its own, for a caller that must move it (an upstream's own
        # Host goes before it).
        req.length_field = PyBytes_FromStringAndSize(w - 16, 16 + cl_digits + 2)
    req._block = block
    return req


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------
cpdef tuple scan_response(
    bytes data, bint head_request, bytes via, bytes request_id, bint close
):
    """``(status, reusable, body_length, bytes for the client)`` when ``data`` is exactly
    one simple response (see ``express_py.scan_response``), else ``None``."""
    if data is None or via is None or request_id is None:
        raise TypeError("scan_response() takes bytes, not None")
    cdef tuple found = _scan_response(data, head_request, via, request_id, close, False)
    return None if found is None else found[:4]


cpdef tuple scan_response_start(
    bytes data, bint head_request, bytes via, bytes request_id, bint close
):
    """``scan_response``, and also a response whose ``Content-Length`` body has only
    begun to arrive: ``(status, reusable, body_length, bytes for the client, bytes of
    the body still to come)`` (see ``express_py.scan_response_start``), else ``None``."""
    if data is None or via is None or request_id is None:
        raise TypeError("scan_response_start() takes bytes, not None")
    return _scan_response(data, head_request, via, request_id, close, True)


cdef tuple _scan_response(
    bytes data, bint head_request, bytes via, bytes request_id, bint close, bint partial
):
    cdef Field fields[MAX_FIELDS]
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos, line_end, head_end, size, i, body = 0, avail = 0
    cdef int count = 0, kind, status
    cdef int via_i = -1, rid_i = -1, cl_i = -1, te_i = -1
    cdef Py_ssize_t chunked_size = 0  # the re-framed chunked body's bytes, when chunked
    cdef bint upstream_close = False, close_named = False
    cdef unsigned char c
    cdef Field* f
    if end < 18 or memcmp(p, b"HTTP/1.1 ", 9) != 0:
        return None
    for pos in range(9, 12):
        if not (48 <= p[pos] <= 57):
            return None
    status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    if status < 200 or status > 599 or p[12] != 32:
        return None
    pos = 13
    while pos < end:
        c = p[pos]
        if not (_VCHAR[c] or c == 32 or c == 9):
            break
        pos += 1
    if pos == 13 or p[pos - 1] == 32 or p[pos - 1] == 9:
        return None  # no reason phrase, or trailing whitespace: the general path decides
    if pos + 2 > end or p[pos] != 13 or p[pos + 1] != 10:
        return None
    line_end = pos + 2
    head_end = _fields(p, line_end, end, fields, MAX_FIELDS, &count)
    if head_end < 0 or head_end > MAX_RESPONSE_HEAD:
        return None
    size = line_end
    for i in range(count):
        f = &fields[i]
        kind = f.kind = _response_kind(p + f.name, f.name_len)
        if kind == K_OTHER:
            size += f.name_len + f.value_len + 4
        elif kind == K_CLOSE_NAME:
            close_named = True
            f.kind = K_OTHER
            size += f.name_len + f.value_len + 4
        elif kind == K_CL:
            if cl_i >= 0 or f.value_len == 0 or f.value_len > 18:
                return None
            for pos in range(f.value, f.value + f.value_len):
                if not (48 <= p[pos] <= 57):
                    return None
            cl_i = i
            size += f.name_len + f.value_len + 4
        elif kind == K_XRID:
            if rid_i < 0:
                rid_i = i
                size += f.name_len + f.value_len + 4
            else:
                f.kind = K_DROP
        elif kind == K_CONN or kind == K_PROXY_CONN or kind == K_VIA:
            if not _hop_field(p, f, kind, i, &upstream_close, &via_i):
                return None
        elif kind == K_TE:
            # Nothing after the value but the line's end: llhttp reads "chunked" + HTAB
            # as another coding (a body until close), unlike the codec's trimmed value.
            if (
                te_i >= 0
                or not _is(p + f.value, f.value_len, b"chunked", 7)
                or p[f.value + f.value_len] != 13
            ):
                return None
            te_i = i
        elif kind == K_REFUSE:
            return None
    if upstream_close and close_named:
        return None
    if te_i >= 0:
        if cl_i >= 0 or head_request or status == 204 or status == 304:
            return None  # framings the general path sorts out (llhttp refuses the first)
        chunked_size = _chunked(p, head_end, end, &body)
        if chunked_size < 0:
            return None
    else:
        if not (head_request or status == 204 or status == 304):
            if cl_i < 0:
                return None
            f = &fields[cl_i]
            for pos in range(f.value, f.value + f.value_len):
                body = body * 10 + (p[pos] - 48)
        avail = end - head_end
        if avail > body or (avail < body and not partial):
            return None
    cdef Py_ssize_t vialen = PyBytes_GET_SIZE(via)
    cdef Py_ssize_t ridlen = PyBytes_GET_SIZE(request_id)
    size += 5 + vialen + 2
    if via_i >= 0:
        size += fields[via_i].value_len + 2
    if rid_i < 0:
        size += 14 + ridlen + 2
    if close:
        size += 19
    if te_i >= 0:
        size += 28 + 2 + chunked_size  # transfer-encoding: chunked, the blank line
    else:
        size += 2 + avail
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* w = PyBytes_AS_STRING(out)
    w = _put(w, p, line_end)
    for i in range(count):
        f = &fields[i]
        kind = f.kind
        if kind == K_OTHER or kind == K_CL or kind == K_XRID:
            w = _put_field(w, p, f)
    w = _put(w, b"via: ", 5)
    if via_i >= 0:
        w = _put(w, p + fields[via_i].value, fields[via_i].value_len)
        w = _put(w, b", ", 2)
    w = _put(w, PyBytes_AS_STRING(via), vialen)
    w = _put(w, b"\r\n", 2)
    if rid_i < 0:
        w = _put(w, b"x-request-id: ", 14)
        w = _put(w, PyBytes_AS_STRING(request_id), ridlen)
        w = _put(w, b"\r\n", 2)
    if te_i >= 0:
        w = _put(w, b"transfer-encoding: chunked\r\n", 28)
    if close:
        w = _put(w, b"connection: close\r\n", 19)
    w = _put(w, b"\r\n", 2)
    if te_i >= 0:
        _rechunk(w, p, head_end)
        avail = body  # whole
    elif avail:
        _put(w, p + head_end, avail)
    return (status, not upstream_close, body, out, body - avail)


cdef inline int _hex_value(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef inline int _hex_width(Py_ssize_t n) noexcept nogil:
    """Digits of ``n`` (> 0) in hex."""
    cdef int width = 0
    while n:
        n >>= 4
        width += 1
    return width


cdef Py_ssize_t _chunk_line(
    const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* size
) noexcept nogil:
    """Read a chunk-size line at ``pos``: 1-8 hex digits then CRLF. Sets ``size`` and
    returns the position after the CRLF, or -1. ``size`` is -2 for a zero size written
    other than exactly ``0`` (refused, like every oddity)."""
    cdef Py_ssize_t start = pos, n = 0
    cdef int digit
    while pos < end and pos - start < 9:
        digit = _hex_value(p[pos])
        if digit < 0:
            break
        n = n * 16 + digit
        pos += 1
    if pos == start or pos - start > 8 or pos + 2 > end or p[pos] != 13 or p[pos + 1] != 10:
        return -1
    size[0] = -2 if n == 0 and pos - start != 1 else n
    return pos + 2


cdef Py_ssize_t _chunked(
    const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* data_total
) noexcept nogil:
    """Check that ``p[pos:end]`` is exactly one whole chunked body in plain syntax (see
    ``express_py._chunks``); returns the size of its re-framed form and sets
    ``data_total`` to the data's bytes, or returns -1."""
    cdef Py_ssize_t size, framed = 5, total = 0  # the last chunk: "0" CRLF CRLF
    while True:
        pos = _chunk_line(p, pos, end, &size)
        if pos < 0 or size == -2:
            return -1
        if size == 0:
            if pos + 2 != end or p[pos] != 13 or p[pos + 1] != 10:
                return -1  # trailer fields, bytes after the message, or cut short
            data_total[0] = total
            return framed
        if size > end - pos - 2 or p[pos + size] != 13 or p[pos + size + 1] != 10:
            return -1
        framed += _hex_width(size) + 4 + size
        total += size
        pos += size + 2


cdef void _rechunk(char* w, const unsigned char* p, Py_ssize_t pos) noexcept nogil:
    """Write the body ``_chunked`` accepted at ``pos`` as the general path frames it:
    lower-case hex sizes without leading zeros, then the last chunk."""
    cdef Py_ssize_t size, n
    cdef int width, i
    while True:
        pos = _chunk_line(p, pos, pos + 12, &size)  # accepted: the line is there
        if size == 0:
            break
        width = _hex_width(size)
        n = size
        for i in range(width - 1, -1, -1):
            w[i] = _HEX[n & 15]
            n >>= 4
        w[width] = 13
        w[width + 1] = 10
        w = _put(w + width + 2, <const char*>p + pos, size)
        w[0] = 13
        w[1] = 10
        w += 2
        pos += size + 2
    memcpy(w, b"0\r\n\r\n", 5)


cpdef double monotonic() noexcept:
    """``time.perf_counter()`` (``clock_gettime(CLOCK_MONOTONIC)`` on Linux) as a C double:
    the express lane times each request twice, and a float object per reading was a
    measurable part of its own work (session 18)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

