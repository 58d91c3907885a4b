# cython: language_level=3
"""Consistent-hash ring, ketama-compatible, compiled. ``hashring_py.py`` is the spec.

The ring is two C arrays: ``_points`` (sorted uint32) and ``_owners`` (index into
``_names`` of each point's node); a lookup is MD5 of the key (the small C MD5 below,
no ``hashlib`` call), then a binary search. Both arrays come from ``PyMem_Malloc`` so
``tracemalloc`` sees them.

boundscheck/wraparound are off (setup.py): every index below is proven in range where it
is computed (binary search bounds, ``% count``, owners < len(_names)).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport ceil, isfinite
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memset

from collections.abc import Mapping

__all__ = ["HashRing", "key_hash"]

cdef extern from *:
    """
    /* MD5 (RFC 1321), written for fastedge from the RFC's description. Only the
       digest words are needed: word i of the state is bytes 4i..4i+3 of the digest
       read little-endian, which is exactly ketama's i-th point. */
    #include <stdint.h>
    #include <string.h>

    #define FE_ROTL(x, c) (((x) << (c)) | ((x) >> (32 - (c))))
    #define FE_STEP(f, a, b, c, d, x, t, s) \\
        (a) += f((b), (c), (d)) + (x) + (uint32_t)(t); \\
        (a) = FE_ROTL((a), (s)); \\
        (a) += (b);
    #define FE_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
    #define FE_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
    #define FE_H(x, y, z) ((x) ^ (y) ^ (z))
    #define FE_I(x, y, z) ((y) ^ ((x) | ~(z)))

    static inline uint32_t fe_le32(const unsigned char *p) {
        return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
             | ((uint32_t)p[3] << 24);
    }

    static void fe_md5_block(uint32_t st[4], const unsigned char *blk) {
        uint32_t x[16];
        uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
        int i;
        for (i = 0; i < 16; i++) x[i] = fe_le32(blk + 4 * i);
        /* Round 1 */
        FE_STEP(FE_F, a, b, c, d, x[0], 0xd76aa478, 7)
        FE_STEP(FE_F, d, a, b, c, x[1], 0xe8c7b756, 12)
        FE_STEP(FE_F, c, d, a, b, x[2], 0x242070db, 17)
        FE_STEP(FE_F, b, c, d, a, x[3], 0xc1bdceee, 22)
        FE_STEP(FE_F, a, b, c, d, x[4], 0xf57c0faf, 7)
        FE_STEP(FE_F, d, a, b, c, x[5], 0x4787c62a, 12)
        FE_STEP(FE_F, c, d, a, b, x[6], 0xa8304613, 17)
        FE_STEP(FE_F, b, c, d, a, x[7], 0xfd469501, 22)
        FE_STEP(FE_F, a, b, c, d, x[8], 0x698098d8, 7)
        FE_STEP(FE_F, d, a, b, c, x[9], 0x8b44f7af, 12)
        FE_STEP(FE_F, c, d, a, b, x[10], 0xffff5bb1, 17)
        FE_STEP(FE_F, b, c, d, a, x[11], 0x895cd7be, 22)
        FE_STEP(FE_F, a, b, c, d, x[12], 0x6b901122, 7)
        FE_STEP(FE_F, d, a, b, c, x[13], 0xfd987193, 12)
        FE_STEP(FE_F, c, d, a, b, x[14], 0xa679438e, 17)
        FE_STEP(FE_F, b, c, d, a, x[15], 0x49b40821, 22)
        /* Round 2 */
        FE_STEP(FE_G, a, b, c, d, x[1], 0xf61e2562, 5)
        FE_STEP(FE_G, d, a, b, c, x[6], 0xc040b340, 9)
        FE_STEP(FE_G, c, d, a, b, x[11], 0x265e5a51, 14)
        FE_STEP(FE_G, b, c, d, a, x[0], 0xe9b6c7aa, 20)
        FE_STEP(FE_G, a, b, c, d, x[5], 0xd62f105d, 5)
        FE_STEP(FE_G, d, a, b, c, x[10], 0x02441453, 9)
        FE_STEP(FE_G, c, d, a, b, x[15], 0xd8a1e681, 14)
        FE_STEP(FE_G, b, c, d, a, x[4], 0xe7d3fbc8, 20)
        FE_STEP(FE_G, a, b, c, d, x[9], 0x21e1cde6, 5)
        FE_STEP(FE_G, d, a, b, c, x[14], 0xc33707d6, 9)
        FE_STEP(FE_G, c, d, a, b, x[3], 0xf4d50d87, 14)
        FE_STEP(FE_G, b, c, d, a, x[8], 0x455a14ed, 20)
        FE_STEP(FE_G, a, b, c, d, x[13], 0xa9e3e905, 5)
        FE_STEP(FE_G, d, a, b, c, x[2], 0xfcefa3f8, 9)
        FE_STEP(FE_G, c, d, a, b, x[7], 0x676f02d9, 14)
        FE_STEP(FE_G, b, c, d, a, x[12], 0x8d2a4c8a, 20)
        /* Round 3 */
        FE_STEP(FE_H, a, b, c, d, x[5], 0xfffa3942, 4)
        FE_STEP(FE_H, d, a, b, c, x[8], 0x8771f681, 11)
        FE_STEP(FE_H, c, d, a, b, x[11], 0x6d9d6122, 16)
        FE_STEP(FE_H, b, c, d, a, x[14], 0xfde5380c, 23)
        FE_STEP(FE_H, a, b, c, d, x[1], 0xa4beea44, 4)
        FE_STEP(FE_H, d, a, b, c, x[4], 0x4bdecfa9, 11)
        FE_STEP(FE_H, c, d, a, b, x[7], 0xf6bb4b60, 16)
        FE_STEP(FE_H, b, c, d, a, x[10], 0xbebfbc70, 23)
        FE_STEP(FE_H, a, b, c, d, x[13], 0x289b7ec6, 4)
        FE_STEP(FE_H, d, a, b, c, x[0], 0xeaa127fa, 11)
        FE_STEP(FE_H, c, d, a, b, x[3], 0xd4ef3085, 16)
        FE_STEP(FE_H, b, c, d, a, x[6], 0x04881d05, 23)
        FE_STEP(FE_H, a, b, c, d, x[9], 0xd9d4d039, 4)
        FE_STEP(FE_H, d, a, b, c, x[12], 0xe6db99e5, 11)
        FE_STEP(FE_H, c, d, a, b, x[15], 0x1fa27cf8, 16)
        FE_STEP(FE_H, b, c, d, a, x[2], 0xc4ac5665, 23)
        /* Round 4 */
        FE_STEP(FE_I, a, b, c, d, x[0], 0xf4292244, 6)
        FE_STEP(FE_I, d, a, b, c, x[7], 0x432aff97, 10)
        FE_STEP(FE_I, c, d, a, b, x[14], 0xab9423a7, 15)
        FE_STEP(FE_I, b, c, d, a, x[5], 0xfc93a039, 21)
        FE_STEP(FE_I, a, b, c, d, x[12], 0x655b59c3, 6)
        FE_STEP(FE_I, d, a, b, c, x[3], 0x8f0ccc92, 10)
        FE_STEP(FE_I, c, d, a, b, x[10], 0xffeff47d, 15)
        FE_STEP(FE_I, b, c, d, a, x[1], 0x85845dd1, 21)
        FE_STEP(FE_I, a, b, c, d, x[8], 0x6fa87e4f, 6)
        FE_STEP(FE_I, d, a, b, c, x[15], 0xfe2ce6e0, 10)
        FE_STEP(FE_I, c, d, a, b, x[6], 0xa3014314, 15)
        FE_STEP(FE_I, b, c, d, a, x[13], 0x4e0811a1, 21)
        FE_STEP(FE_I, a, b, c, d, x[4], 0xf7537e82, 6)
        FE_STEP(FE_I, d, a, b, c, x[11], 0xbd3af235, 10)
        FE_STEP(FE_I, c, d, a, b, x[2], 0x2ad7d2bb, 15)
        FE_STEP(FE_I, b, c, d, a, x[9], 0xeb86d391, 21)
        st[0] += a; st[1] += b; st[2] += c; st[3] += d;
    }

    /* The four little-endian words of MD5(data[0:len]). */
    static void fe_md5(const unsigned char *data, size_t len, uint32_t out[4]) {
        unsigned char tail[128];
        size_t full = len & ~(size_t)63, rest = len - full, padded;
        uint64_t bits = (uint64_t)len << 3;
        size_t i;
        out[0] = 0x67452301; out[1] = 0xefcdab89; out[2] = 0x98badcfe; out[3] = 0x10325476;
        for (i = 0; i < full; i += 64) fe_md5_block(out, data + i);
        /* Padding: 0x80, zeros, then the bit length little-endian in the last 8 bytes
           of a 64-byte block (one block, or two when fewer than 9 bytes remain). */
        memcpy(tail, data + full, rest);
        tail[rest] = 0x80;
        padded = (rest < 56) ? 64 : 128;
        memset(tail + rest + 1, 0, padded - rest - 1);
        for (i = 0; i < 8; i++) tail[padded - 8 + i] = (unsigned char)(bits >> (8 * i));
        fe_md5_block(out, tail);
        if (padded == 128) fe_md5_block(out, tail + 64);
    }
    """
    void fe_md5(const unsigned char* data, size_t length, uint32_t out[4]) noexcept nogil

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef enum:
    # Points per MD5 digest: 16 bytes = four 32-bit words (libketama).
    POINTS_PER_DIGEST = 4
    # Keeps every product in _rebuild within 64 bits; 16M points per node is no real ring.
    MAX_VNODES = 1 << 24


cdef inline uint32_t _key_hash(object key) except? 0:
    """Ketama hash of ``key``: MD5's first 4 bytes little-endian; str as UTF-8."""
    cdef const char* data
    cdef Py_ssize_t size = 0
    cdef uint32_t words[4]
    if type(key) is str:
        # Cached in the str object: no copy for ASCII, one encode per str otherwise.
        data = PyUnicode_AsUTF8AndSize(key, &size)
    elif type(key) is bytes:
        data = PyBytes_AS_STRING(key)
        size = PyBytes_GET_SIZE(key)
    elif isinstance(key, str):
        data = PyUnicode_AsUTF8AndSize(key, &size)
    elif isinstance(key, bytes):
        data = PyBytes_AS_STRING(key)
        size = PyBytes_GET_SIZE(key)
    else:
        raise TypeError(f"key must be str or bytes, got {type(key).__name__}")
    fe_md5(<const unsigned char*>data, <size_t>size, words)
    return words[0]


def key_hash(key):
    """Ketama hash of a key: MD5's first 4 bytes, little-endian. ``str`` is UTF-8 encoded;
    ``bytes`` are hashed as they are."""
    return _key_hash(key)


def _md5_words(data):
    """The four little-endian words of MD5(``data``): exposed to test the C MD5."""
    cdef const unsigned char[:] view = data
    cdef uint32_t words[4]
    cdef unsigned char empty = 0
    fe_md5(&view[0] if view.shape[0] else &empty, <size_t>view.shape[0], words)
    return (words[0], words[1], words[2], words[3])


cdef int _cmp_u64(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0]
    cdef uint64_t y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef object _check_node(object node):
    if not isinstance(node, str):
        raise TypeError(f"node names must be str, got {type(node).__name__}")
    return node


cdef object _check_weight(object node, object weight):
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise TypeError(f"weight of {node!r} must be an int, got {type(weight).__name__}")
    if weight < 1:
        raise ValueError(f"weight of {node!r} must be >= 1, got {weight!r}")
    return weight


@cython.final
cdef class HashRing:
    """A ketama consistent-hash ring; see ``hashring_py.HashRing`` and ``hashring.pyi``."""
    cdef dict _weights
    cdef list _names
    cdef uint32_t* _points
    cdef Py_ssize_t* _owners
    cdef Py_ssize_t _count
    cdef Py_ssize_t _vnodes

    def __cinit__(self):
        self._points = NULL
        self._owners = NULL
        self._count = 0
        self._names = []
        self._weights = {}

    def __dealloc__(self):
        PyMem_Free(self._points)
        PyMem_Free(self._owners)

    def __init__(self, nodes=(), *, vnodes=160):
        if isinstance(vnodes, bool) or not isinstance(vnodes, int):
            raise TypeError(f"vnodes must be an int, got {type(vnodes).__name__}")
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes!r}")
        if vnodes > MAX_VNODES:
            raise ValueError(f"vnodes must be <= {MAX_VNODES}, got {vnodes!r}")
        if isinstance(nodes, str):
            raise TypeError("nodes must be an iterable of names, not a single str")
        cdef dict weights = {}
        if isinstance(nodes, Mapping):
            for node, weight in nodes.items():
                weights[_check_node(node)] = _check_weight(node, weight)
        else:
            for node in nodes:
                weights[_check_node(node)] = 1
        self._vnodes = vnodes
        self._weights = weights
        self._rebuild()

    cdef int _rebuild(self) except -1:
        """Place every node's points; all move when ``n`` or ``W`` change (ketama)."""
        cdef list names = list(self._weights)
        cdef Py_ssize_t n = len(names)
        cdef object total = sum(self._weights.values())
        cdef Py_ssize_t index, group, groups, word, size = 0, count = 0, i
        cdef uint32_t words[4]
        cdef uint64_t* keyed = NULL
        cdef uint32_t* points = NULL
        cdef Py_ssize_t* owners = NULL
        cdef bytes label
        cdef list group_counts = []
        for name in names:
            # Python ints: weights are unbounded, the quotient is not.
            groups = max(1, (self._vnodes * n * self._weights[name]) // (POINTS_PER_DIGEST * total))
            group_counts.append(groups)
            size += groups * POINTS_PER_DIGEST
        try:
            if size:
                keyed = <uint64_t*>PyMem_Malloc(size * sizeof(uint64_t))
                points = <uint32_t*>PyMem_Malloc(size * sizeof(uint32_t))
                owners = <Py_ssize_t*>PyMem_Malloc(size * sizeof(Py_ssize_t))
                if keyed == NULL or points == NULL or owners == NULL:
                    raise MemoryError()
            i = 0
            for index in range(n):
                groups = group_counts[index]
                for group in range(groups):
                    label = f"{names[index]}-{group}".encode()
                    fe_md5(<const unsigned char*>PyBytes_AS_STRING(label),
                           <size_t>PyBytes_GET_SIZE(label), words)
                    for word in range(POINTS_PER_DIGEST):
                        # Point in the high half, node index low: sorting orders equal
                        # points by insertion order, so the last one is the later node.
                        keyed[i] = ((<uint64_t>words[word]) << 32) | <uint64_t>index
                        i += 1
            if size:
                qsort(keyed, <size_t>size, sizeof(uint64_t), _cmp_u64)
            for i in range(size):
                if i + 1 < size and (keyed[i] >> 32) == (keyed[i + 1] >> 32):
                    continue  # a collision keeps the later node, as uhashring does
                points[count] = <uint32_t>(keyed[i] >> 32)
                owners[count] = <Py_ssize_t>(keyed[i] & 0xFFFFFFFF)
                count += 1
        except BaseException:
            PyMem_Free(points)
            PyMem_Free(owners)
            raise
        finally:
            PyMem_Free(keyed)
        # Swap in only once complete: a failure above leaves the old ring intact.
        PyMem_Free(self._points)
        PyMem_Free(self._owners)
        self._points = points
        self._owners = owners
        self._count = count
        self._names = names
        return 0

    cdef inline Py_ssize_t _start(self, object key) except -1:
        """Index of the first point > hash(key), wrapping to 0 (bisect_right)."""
        if self._count == 0:
            raise LookupError("the hash ring has no nodes")
        cdef uint32_t h = _key_hash(key)
        cdef Py_ssize_t lo = 0, hi = self._count, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._points[mid] <= h:
                lo = mid + 1
            else:
                hi = mid
        return 0 if lo == self._count else lo

    def get(self, key):
        """The node owning ``key``. ``LookupError`` if the ring is empty."""
        cdef Py_ssize_t start = self._start(key)
        return self._names[self._owners[start]]

    def get_n(self, key, n):
        """Up to ``n`` distinct nodes in ring order from ``key``'s point (failover order)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        cdef Py_ssize_t start = self._start(key)
        cdef Py_ssize_t nodes = len(self._names)
        cdef Py_ssize_t want = nodes if n > nodes else n
        cdef Py_ssize_t step, owner, count = self._count
        cdef list found = []
        cdef unsigned char* seen = <unsigned char*>PyMem_Malloc(<size_t>nodes)
        if seen == NULL:
            raise MemoryError()
        try:
            memset(seen, 0, <size_t>nodes)
            for step in range(count):
                owner = self._owners[(start + step) % count]
                if not seen[owner]:
                    seen[owner] = 1
                    found.append(self._names[owner])
                    if len(found) == want:
                        break
        finally:
            PyMem_Free(seen)
        return found

    def get_bounded(self, key, loads, c=1.25):
        """Consistent hashing with bounded loads; see ``hashring_py.HashRing.get_bounded``."""
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"c must be a number, got {type(c).__name__}")
        cdef double factor = float(c)
        if not (factor >= 1.0 and isfinite(factor)):
            raise ValueError(f"c must be a finite number >= 1, got {c!r}")
        cdef Py_ssize_t start = self._start(key)
        cdef list node_loads = [float(loads.get(name, 0)) for name in self._names]
        cdef double total = 0.0, capacity
        cdef Py_ssize_t step, owner, count = self._count
        for load in node_loads:
            total += <double>load
        capacity = ceil(factor * (total + 1.0) / <double>len(self._names))
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if <double>node_loads[owner] < capacity:
                return self._names[owner]
        # Unreachable for c >= 1 (a pigeonhole argument); kept as a safe answer.
        return self._names[self._owners[start]]

    def add(self, node, weight=1):
        """Add ``node`` (or change its weight, keeping its place in insertion order)."""
        _check_weight(_check_node(node), weight)
        cdef dict before = dict(self._weights)
        self._weights[node] = weight
        try:
            self._rebuild()
        except BaseException:
            self._weights = before  # all or nothing: the old ring is still in place
            raise

    def remove(self, node):
        """Remove ``node``; ``KeyError`` if it is not on the ring."""
        cdef dict before = dict(self._weights)
        del self._weights[_check_node(node)]
        try:
            self._rebuild()
        except BaseException:
            self._weights = before  # all or nothing: the old ring is still in place
            raise

    @property
    def nodes(self):
        """A copy of node name -> weight, in insertion order."""
        return dict(self._weights)

    @property
    def vnodes(self):
        """Points of an average-weight node."""
        return self._vnodes

    def points(self):
        """The sorted ring: ``(point, node)`` pairs, as uhashring's ``get_points()``."""
        return [(self._points[i], self._names[self._owners[i]]) for i in range(self._count)]

    def __len__(self):
        return len(self._weights)

    def __contains__(self, node):
        return node in self._weights

    def __repr__(self):
        return f"HashRing({self._weights!r}, vnodes={self._vnodes})"
