# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""SipHash-2-4 (Aumasson and Bernstein, 2012) with 64- and 128-bit output, in C.

The auth policy's verification cache is keyed by a digest of the token, never the token
(a memory dump holds no usable credentials). SHA-256 through ``hashlib`` cost ~9k
instructions per request on the express lane's full chain, most of them OpenSSL's
per-call context set-up (session 18, callgrind); the key only has to be unforgeable by
someone who does not know the process's secret key, which is what SipHash, a keyed
pseudo-random function, is for: SipHash-2-4-128 under a random 128-bit key.

``siphash_py.py`` is the pure-Python twin and the readable specification.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t


cdef inline uint64_t _rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline uint64_t _load64(const uint8_t *p) noexcept nogil:
    # Little-endian whatever the host (the specification's byte order).
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32) | (<uint64_t>p[5] << 40)
            | (<uint64_t>p[6] << 48) | (<uint64_t>p[7] << 56))


cdef inline void _store64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline void _rounds(uint64_t *v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        v[0] += v[1]
        v[1] = _rotl(v[1], 13)
        v[1] ^= v[0]
        v[0] = _rotl(v[0], 32)
        v[2] += v[3]
        v[3] = _rotl(v[3], 16)
        v[3] ^= v[2]
        v[0] += v[3]
        v[3] = _rotl(v[3], 21)
        v[3] ^= v[0]
        v[2] += v[1]
        v[1] = _rotl(v[1], 17)
        v[1] ^= v[2]
        v[2] = _rotl(v[2], 32)


cdef void _siphash(const uint8_t *data, Py_ssize_t n, const uint8_t *key, uint8_t *out,
                   bint wide) noexcept nogil:
    cdef uint64_t k0 = _load64(key)
    cdef uint64_t k1 = _load64(key + 8)
    cdef uint64_t v[4]
    cdef uint64_t m
    cdef Py_ssize_t whole = n - (n & 7)
    cdef Py_ssize_t i
    cdef int left = <int>(n & 7)
    v[0] = k0 ^ 0x736f6d6570736575ULL
    v[1] = k1 ^ 0x646f72616e646f6dULL
    v[2] = k0 ^ 0x6c7967656e657261ULL
    v[3] = k1 ^ 0x7465646279746573ULL
    if wide:
        v[1] ^= 0xee
    i = 0
    while i < whole:
        m = _load64(data + i)
        v[3] ^= m
        _rounds(v, 2)
        v[0] ^= m
        i += 8
    # The last block: the remaining bytes, and the length's low byte on top.
    m = (<uint64_t>n) << 56
    while left > 0:
        left -= 1
        m |= (<uint64_t>data[whole + left]) << (8 * left)
    v[3] ^= m
    _rounds(v, 2)
    v[0] ^= m
    v[2] ^= 0xee if wide else 0xff
    _rounds(v, 4)
    _store64(out, v[0] ^ v[1] ^ v[2] ^ v[3])
    if wide:
        v[1] ^= 0xdd
        _rounds(v, 4)
        _store64(out + 8, v[0] ^ v[1] ^ v[2] ^ v[3])


cdef bytes _digest(bytes key, bytes data, bint wide):
    if key is None or PyBytes_GET_SIZE(key) != 16:
        raise ValueError("SipHash needs a 16-byte key")
    if data is None:
        raise TypeError("data must be bytes, not None")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16 if wide else 8)
    _siphash(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
             <const uint8_t *>PyBytes_AS_STRING(key), <uint8_t *>PyBytes_AS_STRING(out), wide)
    return out


cpdef bytes siphash128(bytes key, bytes data):
    """SipHash-2-4 of ``data`` under the 16-byte ``key``: 16 bytes (the reference
    implementation's byte order)."""
    return _digest(key, data, True)


cpdef bytes siphash64(bytes key, bytes data):
    """SipHash-2-4 of ``data`` under the 16-byte ``key``: 8 bytes, little-endian."""
    return _digest(key, data, False)
