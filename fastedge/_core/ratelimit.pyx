# cython: language_level=3
"""Per-key rate limiters, compiled. ``ratelimit_py.py`` is the specification.

Every answer must be bit-identical to the Python twin: each float below is the same
expression in the same order as there (IEEE-754 doubles in both), counts are C integers
bounded by ``2**53`` so their conversion to double is exact. Hypothesis checks it.

Memory layout: a dict ``key -> _Entry`` owns the entries; the entries are also threaded
on an intrusive doubly-linked recency list through *borrowed* pointers (no reference
cycles, no refcount traffic on a touch). Invariant: an entry is on the list iff it is in
the dict, so it is always unlinked before the dict drops it.

boundscheck/wraparound are off (setup.py): this module indexes no sequences.
"""

cimport cython
from cpython.dict cimport PyDict_GetItemWithError
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject
from libc.limits cimport LLONG_MAX
from libc.math cimport INFINITY, floor, isfinite
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

__all__ = ["SlidingWindow", "TokenBucket"]

cdef long long MAX_EXACT = 2 ** 53
# Same as ratelimit_py.PRUNE_PER_INSERT: bounded work per new key.
cdef int PRUNE_PER_INSERT = 4


cdef inline double _monotonic() noexcept nogil:
    # The clock behind time.monotonic() on Linux, without a Python call.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline double _clock(object now) except? -1.0:
    cdef double t
    if now is None:
        return _monotonic()
    if type(now) is float:
        t = PyFloat_AS_DOUBLE(now)
    elif isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError(f"now must be a number or None, got {type(now).__name__}")
    else:
        t = float(now)
    if not isfinite(t):
        # A NaN or infinite clock would poison the stored state for good.
        raise ValueError(f"now must be finite, got {now!r}")
    return t


cdef inline long long _cost(object cost) except -1:
    cdef int overflow = 0
    cdef long long c
    if type(cost) is not int and (isinstance(cost, bool) or not isinstance(cost, int)):
        raise TypeError(f"cost must be an int, got {type(cost).__name__}")
    c = PyLong_AsLongLongAndOverflow(cost, &overflow)
    if overflow > 0:
        # Above any limit (<= 2**53): never allowed; the value itself is never used.
        return LLONG_MAX
    if overflow < 0 or c < 1:
        raise ValueError(f"cost must be >= 1, got {cost!r}")
    return c


cdef double _positive_real(str name, object value) except -1.0:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    cdef double number = float(value)
    if not (number > 0.0 and isfinite(number)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


cdef long long _count(str name, object value) except -1:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= MAX_EXACT:
        raise ValueError(f"{name} must be an int in [1, {MAX_EXACT}], got {value!r}")
    return value


cdef inline long long _whole(double x) noexcept:
    """Whole units in ``x``, never negative."""
    return <long long>x if x > 0.0 else 0


@cython.final
@cython.freelist(256)
cdef class _Entry:
    """One key's state. TokenBucket uses tokens/last, SlidingWindow index/prev/curr."""
    cdef object key
    cdef PyObject* newer  # borrowed, toward the most recently used end
    cdef PyObject* older  # borrowed, toward the least recently used end
    cdef double tokens
    cdef double last
    cdef double index
    cdef long long prev
    cdef long long curr


cdef class _KeyTable:
    """The bounded key table with its recency list, shared by both limiters."""
    cdef dict _table
    cdef PyObject* _mru
    cdef PyObject* _lru
    cdef Py_ssize_t _max_keys

    def __len__(self):
        return len(self._table)

    @property
    def max_keys(self):
        """Most keys kept at once."""
        return self._max_keys

    def reset(self, key):
        """Forget ``key`` (it starts fresh). True if it was known."""
        cdef PyObject* p = PyDict_GetItemWithError(self._table, key)
        if p == NULL:
            return False
        cdef _Entry e = <_Entry>p
        _unlink(self, e)
        del self._table[key]
        return True

    def clear(self):
        """Forget every key."""
        self._mru = NULL
        self._lru = NULL
        self._table.clear()


cdef inline void _link_mru(_KeyTable t, _Entry e) noexcept:
    e.newer = NULL
    e.older = t._mru
    if t._mru != NULL:
        (<_Entry>t._mru).newer = <PyObject*>e
    else:
        t._lru = <PyObject*>e
    t._mru = <PyObject*>e


cdef inline void _unlink(_KeyTable t, _Entry e) noexcept:
    if e.newer != NULL:
        (<_Entry>e.newer).older = e.older
    else:
        t._mru = e.older
    if e.older != NULL:
        (<_Entry>e.older).newer = e.newer
    else:
        t._lru = e.newer
    e.newer = NULL
    e.older = NULL


cdef inline void _touch(_KeyTable t, _Entry e) noexcept:
    if t._mru != <PyObject*>e:
        _unlink(t, e)
        _link_mru(t, e)


cdef int _drop_lru(_KeyTable t) except -1:
    cdef _Entry e = <_Entry>t._lru  # a strong local reference survives the del below
    _unlink(t, e)
    del t._table[e.key]
    return 0


cdef inline _Entry _insert(_KeyTable t, object key):
    cdef _Entry e = _Entry.__new__(_Entry)
    e.key = key
    t._table[key] = e  # may raise (unhashable keys are caught earlier by the lookup)
    _link_mru(t, e)
    return e


@cython.final
cdef class TokenBucket(_KeyTable):
    """Token bucket per key; see ``ratelimit_py.TokenBucket`` and ``ratelimit.pyi``."""
    cdef double _rate
    cdef double _burst

    def __init__(self, rate, burst, *, max_keys=100_000):
        self._rate = _positive_real("rate", rate)
        self._burst = <double>_count("burst", burst)
        self._max_keys = _count("max_keys", max_keys)
        self._table = {}
        self._mru = NULL
        self._lru = NULL

    @property
    def rate(self):
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self):
        """Bucket capacity in tokens."""
        return <long long>self._burst

    def __repr__(self):
        return (
            f"TokenBucket(rate={self._rate!r}, burst={<long long>self._burst}, "
            f"max_keys={self._max_keys}) with {len(self._table)} keys"
        )

    cdef inline double _refilled(self, _Entry e, double t) noexcept:
        cdef double tokens
        if t > e.last:
            tokens = e.tokens + (t - e.last) * self._rate
            if tokens > self._burst:
                tokens = self._burst
            return tokens
        return e.tokens

    cdef inline tuple _denied(self, double tokens, long long c):
        if <double>c > self._burst:
            return (False, <long long>tokens, INFINITY)
        return (False, <long long>tokens, (<double>c - tokens) / self._rate)

    cdef int _make_room(self, double t) except -1:
        cdef int budget = PRUNE_PER_INSERT
        while budget > 0 and self._lru != NULL:
            if self._refilled(<_Entry>self._lru, t) < self._burst:
                break
            _drop_lru(self)  # full again: identical to a brand-new key
            budget -= 1
        if len(self._table) >= self._max_keys:
            _drop_lru(self)
        return 0

    def acquire(self, key, cost=1, now=None):
        """Take ``cost`` tokens from ``key``'s bucket; ``(allowed, remaining, retry_after)``."""
        cdef long long c = _cost(cost)
        cdef double t = _clock(now)
        cdef PyObject* p = PyDict_GetItemWithError(self._table, key)
        cdef _Entry e
        if <double>c > self._burst:
            return self._denied(self._burst if p == NULL else self._refilled(<_Entry>p, t), c)
        if p == NULL:
            self._make_room(t)
            e = _insert(self, key)
            e.tokens = self._burst
            e.last = t
        else:
            e = <_Entry>p
            if t > e.last:
                e.tokens = self._refilled(e, t)
                e.last = t
            _touch(self, e)
        if e.tokens >= <double>c:
            e.tokens -= <double>c
            return (True, <long long>e.tokens, 0.0)
        return self._denied(e.tokens, c)

    def peek(self, key, cost=1, now=None):
        """What ``acquire`` would answer, without taking tokens or touching the key."""
        cdef long long c = _cost(cost)
        cdef double t = _clock(now)
        cdef PyObject* p = PyDict_GetItemWithError(self._table, key)
        cdef double tokens = self._burst if p == NULL else self._refilled(<_Entry>p, t)
        if <double>c <= tokens:
            return (True, <long long>tokens, 0.0)
        return self._denied(tokens, c)


@cython.final
cdef class SlidingWindow(_KeyTable):
    """Sliding-window counter per key; see ``ratelimit_py.SlidingWindow`` (error bound)."""
    cdef long long _limit
    cdef double _window

    def __init__(self, limit, window, *, max_keys=100_000):
        self._limit = _count("limit", limit)
        self._window = _positive_real("window", window)
        self._max_keys = _count("max_keys", max_keys)
        self._table = {}
        self._mru = NULL
        self._lru = NULL

    @property
    def limit(self):
        """Most cost allowed per window."""
        return self._limit

    @property
    def window(self):
        """Window length in seconds."""
        return self._window

    def __repr__(self):
        return (
            f"SlidingWindow(limit={self._limit}, window={self._window!r}, "
            f"max_keys={self._max_keys}) with {len(self._table)} keys"
        )

    cdef inline double _estimate(
        self, double index, long long prev, long long curr, double t, double* elapsed
    ) noexcept:
        cdef double window = self._window
        cdef double e = t - index * window
        if e < 0.0:
            e = 0.0
        elapsed[0] = e
        return <double>prev * ((window - e) / window) + <double>curr

    cdef tuple _evaluate(self, double index, long long prev, long long curr, long long c, double t):
        cdef double window = self._window
        cdef long long limit = self._limit
        cdef double elapsed = 0.0
        cdef double estimate = self._estimate(index, prev, curr, t, &elapsed)
        cdef double wait
        cdef long long need
        if c > limit:
            return (False, _whole(<double>limit - estimate), INFINITY)
        if estimate + <double>c <= <double>limit:
            return (True, _whole(<double>limit - (estimate + <double>c)), window - elapsed)
        need = limit - c  # the estimate must fall to this for the hit to pass
        if curr <= need:
            # Within this window: the previous window's share decays linearly.
            wait = window * (1.0 - <double>(need - curr) / <double>prev) - elapsed
        else:
            # Only after this window ends, once `curr` becomes the decaying `prev`.
            wait = (window - elapsed) + window * (1.0 - <double>need / <double>curr)
        if wait < 0.0:
            wait = 0.0
        return (False, _whole(<double>limit - estimate), wait)

    @staticmethod
    cdef inline void _roll(_Entry e, double index) noexcept:
        """Bring ``e`` to window ``index``; an earlier window (clock went back) holds."""
        if index <= e.index:
            return
        if index == e.index + 1.0:
            e.prev = e.curr
        else:
            e.prev = 0
        e.curr = 0
        e.index = index

    cdef int _make_room(self, double index) except -1:
        cdef int budget = PRUNE_PER_INSERT
        cdef _Entry e
        while budget > 0 and self._lru != NULL:
            e = <_Entry>self._lru
            # Both windows empty once rolled to `index`: identical to a new key.
            if index <= e.index:
                if e.prev != 0 or e.curr != 0:
                    break
            elif index == e.index + 1.0:
                if e.curr != 0:
                    break
            _drop_lru(self)
            budget -= 1
        if len(self._table) >= self._max_keys:
            _drop_lru(self)
        return 0

    def hit(self, key, cost=1, now=None):
        """Count ``cost`` against ``key`` if there is room; ``(allowed, remaining, reset_after)``."""
        cdef long long c = _cost(cost)
        cdef double t = _clock(now)
        cdef double index = floor(t / self._window)
        cdef PyObject* p = PyDict_GetItemWithError(self._table, key)
        cdef _Entry e
        cdef tuple answer
        cdef long long prev, curr
        if c > self._limit:
            if p == NULL:
                return self._evaluate(index, 0, 0, c, t)
            e = <_Entry>p
            prev, curr, index = self._rolled(e, index)
            return self._evaluate(index, prev, curr, c, t)
        if p == NULL:
            self._make_room(index)
            e = _insert(self, key)
            e.index = index
            e.prev = 0
            e.curr = 0
        else:
            e = <_Entry>p
            SlidingWindow._roll(e, index)
            _touch(self, e)
        answer = self._evaluate(e.index, e.prev, e.curr, c, t)
        if answer[0] is True:
            e.curr += c
        return answer

    cdef tuple _rolled(self, _Entry e, double index):
        """``(prev, curr, index)`` of ``e`` seen from window ``index``, not stored."""
        if index <= e.index:
            return (e.prev, e.curr, e.index)
        if index == e.index + 1.0:
            return (e.curr, 0, index)
        return (0, 0, index)

    def peek(self, key, cost=1, now=None):
        """What ``hit`` would answer, without counting or touching the key."""
        cdef long long c = _cost(cost)
        cdef double t = _clock(now)
        cdef double index = floor(t / self._window)
        cdef PyObject* p = PyDict_GetItemWithError(self._table, key)
        cdef long long prev = 0, curr = 0
        cdef double elapsed = 0.0
        if p != NULL:
            prev, curr, index = self._rolled(<_Entry>p, index)
        cdef tuple answer = self._evaluate(index, prev, curr, c, t)
        cdef double estimate = self._estimate(index, prev, curr, t, &elapsed)
        return (answer[0], _whole(<double>self._limit - estimate), answer[2])
