# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""LRUCache, compiled. ``lru_py.py`` is the specification; this file follows it exactly.

Layout: a dict key -> ``_Node`` owns the nodes; the nodes form a circular doubly linked
list through a sentinel (``_root``) using *borrowed* ``PyObject*`` links, as CPython's
own ``OrderedDict`` does. Borrowed links mean relinking costs no reference counting and
creates no reference cycles for the garbage collector to chase. The invariant that makes
them safe: a node is unlinked before the dict drops it, and the list is emptied before
the dict is cleared, so no link ever points to a freed node, even while a key's or
value's ``__del__`` re-enters the cache.
"""

cimport cython
from cpython.object cimport PyObject
from libc.math cimport INFINITY, isfinite

import time

cdef extern from "Python.h":
    # Borrowed reference; NULL with no exception set means "absent". Cython checks
    # PyErr_Occurred on NULL so an unhashable key raises TypeError like dict.get.
    PyObject* PyDict_GetItemWithError(object mp, object key) except? NULL
    const Py_ssize_t PY_SSIZE_T_MAX

__all__ = ["LRUCache"]

cdef object _MISSING = object()
cdef object _monotonic = time.monotonic


@cython.final
@cython.freelist(256)
cdef class _Node:
    cdef object key
    cdef object value
    cdef Py_ssize_t size
    cdef double expires  # INFINITY: no TTL
    cdef PyObject* prev  # borrowed, see the module docstring
    cdef PyObject* next


cdef inline Py_ssize_t _check_bound(str name, object bound) except -2:
    """-1 for None (unbounded), else the validated bound."""
    if bound is None:
        return -1
    if isinstance(bound, bool) or not isinstance(bound, int):
        raise TypeError(f"{name} must be an int or None, not {type(bound).__name__}")
    if not 0 < bound <= PY_SSIZE_T_MAX:
        raise ValueError(f"{name} must be in 1..sys.maxsize, got {bound}")
    return bound


cdef inline Py_ssize_t _check_size(object size) except -1:
    cdef Py_ssize_t n
    if type(size) is not int and (isinstance(size, bool) or not isinstance(size, int)):
        raise TypeError(f"size must be an int, not {type(size).__name__}")
    try:
        n = size
    except OverflowError:
        n = -1
    if n < 0:
        raise ValueError(f"size must be in 0..sys.maxsize, got {size}")
    return n


cdef inline double _check_ttl(object ttl) except -1.0:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    cdef double seconds = float(ttl)
    # Same reasons as lru_py._check_ttl: a zero TTL stores a dead entry; NaN/inf are bugs.
    if not (seconds > 0.0 and isfinite(seconds)):
        raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
    return seconds


cdef inline double _clock(object now) except? -1.0:
    if now is None:
        return _monotonic()
    if type(now) is float:
        return <double>now
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError(f"now must be a number or None, not {type(now).__name__}")
    return float(now)


cdef _raise_callback_errors(list errors):
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup(f"{len(errors)} on_evict callbacks failed", errors)


@cython.final
@cython.no_gc_clear  # keep _map/_root valid while a cycle through a value is collected
cdef class LRUCache:
    """A least-recently-used cache bounded by entries and/or bytes, with optional TTL.

    See ``lru.pyi`` for the contract and ``lru_py.py`` for the specification.
    """

    cdef dict _map
    cdef _Node _root
    cdef PyObject* _root_ptr
    cdef Py_ssize_t _maxsize  # -1: unbounded
    cdef Py_ssize_t _max_bytes  # -1: unbounded
    cdef Py_ssize_t _bytes
    cdef object _on_evict
    cdef Py_ssize_t _hits
    cdef Py_ssize_t _misses
    cdef Py_ssize_t _evictions
    cdef Py_ssize_t _expired

    def __cinit__(self):
        self._map = {}
        self._root = _Node()
        self._root_ptr = <PyObject*>self._root
        self._root.prev = self._root_ptr
        self._root.next = self._root_ptr
        self._root.expires = INFINITY

    def __init__(self, maxsize=None, *, max_bytes=None, on_evict=None):
        self._maxsize = _check_bound("maxsize", maxsize)
        self._max_bytes = _check_bound("max_bytes", max_bytes)
        if on_evict is not None and not callable(on_evict):
            raise TypeError("on_evict must be callable or None")
        self._on_evict = on_evict

    # -- linked list -------------------------------------------------------------------

    cdef inline void _unlink(self, _Node node) noexcept:
        (<_Node>node.prev).next = node.next
        (<_Node>node.next).prev = node.prev

    cdef inline void _push_front(self, _Node node) noexcept:
        cdef _Node root = self._root
        node.prev = self._root_ptr
        node.next = root.next
        (<_Node>root.next).prev = <PyObject*>node
        root.next = <PyObject*>node

    cdef inline void _touch(self, _Node node) noexcept:
        if self._root.next != <PyObject*>node:
            self._unlink(node)
            self._push_front(node)

    cdef int _drop(self, _Node node) except -1:
        # Unlink first: the dict holds the last owning reference but the caller holds one
        # too, so ``node`` stays alive until the caller is done with it.
        self._unlink(node)
        self._bytes -= node.size
        del self._map[node.key]
        return 0

    cdef _Node _live(self, object key, object now):
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p is NULL:
            return None
        cdef _Node node = <_Node>p
        # The clock is read only for entries that have a TTL.
        if node.expires != INFINITY and _clock(now) >= node.expires:
            self._drop(node)
            self._expired += 1
            return None
        return node

    # -- reading -----------------------------------------------------------------------

    def get(self, key, default=None, *, now=None):
        """The value for ``key`` (made most recent), or ``default`` if absent or expired."""
        cdef _Node node = self._live(key, now)
        if node is None:
            self._misses += 1
            return default
        self._hits += 1
        self._touch(node)
        return node.value

    def __getitem__(self, key):
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        cdef _Node node
        if p is not NULL and (<_Node>p).expires == INFINITY:
            # Fast path: a hit on an entry without TTL needs no clock and no checks.
            node = <_Node>p
            self._hits += 1
            self._touch(node)
            return node.value
        node = self._live(key, None)
        if node is None:
            self._misses += 1
            raise KeyError(key)
        self._hits += 1
        self._touch(node)
        return node.value

    def peek(self, key, default=None, *, now=None):
        """The value for ``key`` without touching recency, statistics or contents."""
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p is NULL:
            return default
        cdef _Node node = <_Node>p
        if node.expires != INFINITY and _clock(now) >= node.expires:
            return default
        return node.value

    def __contains__(self, key):
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p is NULL:
            return False
        cdef _Node node = <_Node>p
        return node.expires == INFINITY or _clock(None) < node.expires

    def __len__(self):
        return len(self._map)

    def items(self, *, now=None):
        """``(key, value)`` pairs of the unexpired entries, most recent first."""
        cdef double t = _clock(now)
        cdef list out = []
        cdef PyObject* p = self._root.next
        cdef _Node node
        while p != self._root_ptr:
            node = <_Node>p
            if node.expires == INFINITY or t < node.expires:
                out.append((node.key, node.value))
            p = node.next
        return out

    def stats(self):
        """Counters and occupancy: ``hits``, ``misses``, ``evictions``, ``expired``,
        ``len``, ``bytes``, ``maxsize``, ``max_bytes``."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expired": self._expired,
            "len": len(self._map),
            "bytes": self._bytes,
            "maxsize": None if self._maxsize < 0 else self._maxsize,
            "max_bytes": None if self._max_bytes < 0 else self._max_bytes,
        }

    # -- writing -----------------------------------------------------------------------

    def set(self, key, value, *, size=1, ttl=None, now=None):
        """Store ``value`` under ``key`` as the most recent entry; evict to fit.

        Returns ``False`` (and removes any older value of ``key``) when ``size`` alone
        exceeds ``max_bytes``; ``True`` otherwise.
        """
        cdef Py_ssize_t nsize = _check_size(size)
        cdef double expires = INFINITY
        cdef double seconds
        if ttl is not None:
            seconds = _check_ttl(ttl)
            expires = _clock(now) + seconds
        return self._set(key, value, nsize, expires, PyDict_GetItemWithError(self._map, key))

    def __setitem__(self, key, value):
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        cdef _Node node
        if p is not NULL and self._max_bytes < 0 and self._bytes < PY_SSIZE_T_MAX:
            # Fast path: replacing a value with no byte bound cannot evict or overflow.
            node = <_Node>p
            # Hold the old value until the entry is consistent: its __del__ may re-enter.
            previous = node.value
            self._bytes += 1 - node.size
            node.value = value
            node.size = 1
            node.expires = INFINITY
            self._touch(node)
            return
        self._set(key, value, 1, INFINITY, p)

    cdef bint _set(
        self, object key, object value, Py_ssize_t size, double expires, PyObject* p
    ) except -1:
        # ``p`` is the map's current node for ``key`` (borrowed) or NULL, looked up by the
        # caller after every argument check, so no Python code ran in between.
        cdef _Node node
        if self._max_bytes >= 0 and size > self._max_bytes:
            if p is not NULL:
                node = <_Node>p  # an owned reference: _drop releases the dict's
                self._drop(node)
            return False
        if size > PY_SSIZE_T_MAX - self._bytes:
            raise ValueError("the total size of the entries would exceed sys.maxsize")
        if p is not NULL:
            node = <_Node>p
            previous = node.value  # released at return: its __del__ may re-enter
            self._bytes += size - node.size
            node.value = value
            node.size = size
            node.expires = expires
            self._touch(node)
        else:
            node = _Node.__new__(_Node)
            node.key = key
            node.value = value
            node.size = size
            node.expires = expires
            self._map[key] = node
            self._push_front(node)
            self._bytes += size
        if (self._maxsize >= 0 and len(self._map) > self._maxsize) or (
            self._max_bytes >= 0 and self._bytes > self._max_bytes
        ):
            self._evict_to_fit()
        return True

    cdef int _evict_to_fit(self) except -1:
        cdef list evicted = [] if self._on_evict is not None else None
        cdef _Node node
        while (self._maxsize >= 0 and len(self._map) > self._maxsize) or (
            self._max_bytes >= 0 and self._bytes > self._max_bytes
        ):
            # Never the entry just set: it is at the front and fits on its own.
            node = <_Node>self._root.prev
            self._drop(node)
            self._evictions += 1
            if evicted is not None:  # no callback: skip building the report
                evicted.append((node.key, node.value))
        if evicted is not None:
            self._report(evicted)
        return 0

    cdef int _report(self, list evicted) except -1:
        # The cache is consistent before the first callback runs, so a callback may read
        # or modify it, and a failing one cannot leave it half-updated.
        cdef object on_evict = self._on_evict
        cdef list errors = []
        for key, value in evicted:
            try:
                on_evict(key, value)
            except Exception as exc:
                errors.append(exc)
        _raise_callback_errors(errors)
        return 0

    def pop(self, key, default=_MISSING, *, now=None):
        """Remove ``key`` and return its value; if absent or expired return ``default``,
        or raise ``KeyError`` when no default is given."""
        cdef _Node node = self._live(key, now)
        if node is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._drop(node)
        return node.value

    def __delitem__(self, key):
        cdef PyObject* p = PyDict_GetItemWithError(self._map, key)
        if p is NULL:
            raise KeyError(key)
        cdef _Node node = <_Node>p  # an owned reference: _drop releases the dict's
        self._drop(node)

    def expire(self, *, now=None):
        """Remove every expired entry now (O(n)); returns how many were removed."""
        cdef double t = _clock(now)
        cdef Py_ssize_t removed = 0
        cdef PyObject* p = self._root.next
        cdef _Node node
        while p != self._root_ptr:
            node = <_Node>p
            p = node.next
            if node.expires != INFINITY and t >= node.expires:
                self._drop(node)
                removed += 1
        self._expired += removed
        return removed

    def clear(self):
        """Remove every entry (no ``on_evict`` calls); statistics are kept."""
        # Empty the list before the dict releases the nodes (see the module docstring).
        self._root.next = self._root_ptr
        self._root.prev = self._root_ptr
        self._bytes = 0
        self._map.clear()

    @property
    def maxsize(self):
        """The entry bound, or ``None``."""
        return None if self._maxsize < 0 else self._maxsize

    @property
    def max_bytes(self):
        """The byte bound, or ``None``."""
        return None if self._max_bytes < 0 else self._max_bytes

    def __repr__(self):
        return (
            f"<LRUCache len={len(self._map)} bytes={self._bytes} "
            f"maxsize={self.maxsize} max_bytes={self.max_bytes}>"
        )
