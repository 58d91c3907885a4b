"""LRUCache, pure-Python twin of ``lru.pyx``: the readable specification.

A least-recently-used cache bounded by entry count and/or total byte size, with optional
per-entry TTL expired lazily on access. Both implementations must behave identically;
``tests/core/test_router_lru_agree.py`` drives them side by side.

Rules (the contract the compiled module follows):

* Recency order: ``get``/``[]``/``set`` make an entry the most recent; ``peek``,
  ``in``, ``items`` and ``stats`` never change order, statistics or contents.
* Capacity: after a ``set`` the least recent entries are dropped until
  ``len <= maxsize`` and ``bytes <= max_bytes``. Each such drop is an *eviction*: it is
  counted and reported to ``on_evict(key, value)``. An entry whose ``size`` exceeds
  ``max_bytes`` is not stored at all (``set`` returns ``False``) and any older value
  under that key is removed, so a stale value is never served.
* TTL: an entry set with ``ttl`` expires at ``now + ttl``; from then on it is a miss.
  Expired entries are removed when a read finds them (``get``, ``[]``, ``pop``) or by
  ``expire()``; they are counted in ``stats()["expired"]`` and do *not* call
  ``on_evict``. An expired entry that reaches the LRU end before anyone reads it is
  dropped as an ordinary eviction (it was occupying capacity).
* Callbacks run after the cache is consistent again; an exception from ``on_evict``
  propagates to the caller of ``set`` (one failure: that exception; several: an
  ``ExceptionGroup``), after every evicted entry has been reported.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, Final

__all__ = ["LRUCache"]

_MISSING: Final[Any] = object()
_NO_EXPIRY: Final = math.inf


class _Node:
    """One entry; the nodes form a circular doubly linked list through a sentinel."""

    __slots__ = ("expires", "key", "next", "prev", "size", "value")

    def __init__(self, key: Any, value: Any, size: int, expires: float) -> None:
        self.key = key
        self.value = value
        self.size = size
        self.expires = expires
        self.prev: _Node = self
        self.next: _Node = self


def _check_bound(name: str, bound: object) -> int | None:
    if bound is None:
        return None
    if isinstance(bound, bool) or not isinstance(bound, int):
        raise TypeError(f"{name} must be an int or None, not {type(bound).__name__}")
    if not 0 < bound <= sys.maxsize:
        raise ValueError(f"{name} must be in 1..sys.maxsize, got {bound}")
    return bound


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, not {type(size).__name__}")
    if not 0 <= size <= sys.maxsize:
        raise ValueError(f"size must be in 0..sys.maxsize, got {size}")
    return size


def _check_ttl(ttl: object) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    seconds = float(ttl)
    # A zero TTL would store an entry that is already dead yet occupies capacity, and NaN
    # or infinity are almost certainly bugs in the caller's arithmetic.
    if not (seconds > 0.0 and math.isfinite(seconds)):
        raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
    return seconds


def _clock(now: object) -> float:
    if now is None:
        return time.monotonic()
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError(f"now must be a number or None, not {type(now).__name__}")
    return float(now)


def _raise_callback_errors(errors: list[Exception]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup(f"{len(errors)} on_evict callbacks failed", errors)


class LRUCache:
    """A least-recently-used cache bounded by entries and/or bytes, with optional TTL.

    ``maxsize`` bounds the number of entries, ``max_bytes`` the sum of the ``size`` given
    to :meth:`set`; ``None`` means unbounded. ``on_evict(key, value)`` is called for every
    entry dropped to make room. Keys are any hashable object.
    """

    __slots__ = (
        "_bytes",
        "_evictions",
        "_expired",
        "_hits",
        "_map",
        "_max_bytes",
        "_maxsize",
        "_misses",
        "_on_evict",
        "_root",
    )

    def __init__(
        self,
        maxsize: int | None = None,
        *,
        max_bytes: int | None = None,
        on_evict: Callable[[Any, Any], object] | None = None,
    ) -> None:
        self._maxsize = _check_bound("maxsize", maxsize)
        self._max_bytes = _check_bound("max_bytes", max_bytes)
        if on_evict is not None and not callable(on_evict):
            raise TypeError("on_evict must be callable or None")
        self._on_evict = on_evict
        self._map: dict[Hashable, _Node] = {}
        # Sentinel: root.next is the most recent entry, root.prev the least recent.
        self._root = _Node(None, None, 0, _NO_EXPIRY)
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expired = 0

    # -- linked list -------------------------------------------------------------------

    def _unlink(self, node: _Node) -> None:
        node.prev.next = node.next
        node.next.prev = node.prev

    def _push_front(self, node: _Node) -> None:
        root = self._root
        node.prev = root
        node.next = root.next
        root.next.prev = node
        root.next = node

    def _drop(self, node: _Node) -> None:
        """Remove ``node`` from the list, the map and the byte total."""
        self._unlink(node)
        del self._map[node.key]
        self._bytes -= node.size

    def _live(self, key: Hashable, now: object) -> _Node | None:
        """The node for ``key`` if present and unexpired; an expired one is removed."""
        node = self._map.get(key)
        if node is None:
            return None
        # The clock is read only for entries that have a TTL: the common case costs nothing.
        if node.expires != _NO_EXPIRY and _clock(now) >= node.expires:
            self._drop(node)
            self._expired += 1
            return None
        return node

    # -- reading -----------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None, *, now: float | None = None) -> Any:
        """The value for ``key`` (made most recent), or ``default`` if absent or expired."""
        node = self._live(key, now)
        if node is None:
            self._misses += 1
            return default
        self._hits += 1
        if self._root.next is not node:
            self._unlink(node)
            self._push_front(node)
        return node.value

    def __getitem__(self, key: Hashable) -> Any:
        """Like :meth:`get`, but a missing or expired key raises ``KeyError``."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def peek(self, key: Hashable, default: Any = None, *, now: float | None = None) -> Any:
        """The value for ``key`` without touching recency, statistics or contents."""
        node = self._map.get(key)
        if node is None:
            return default
        if node.expires != _NO_EXPIRY and _clock(now) >= node.expires:
            return default
        return node.value

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored and unexpired now (``time.monotonic()``); a pure read."""
        return self.peek(key, _MISSING) is not _MISSING

    def __len__(self) -> int:
        """Stored entries, including expired ones no read has removed yet (see ``expire``)."""
        return len(self._map)

    def items(self, *, now: float | None = None) -> list[tuple[Any, Any]]:
        """``(key, value)`` pairs of the unexpired entries, most recent first."""
        t = _clock(now)
        out: list[tuple[Any, Any]] = []
        node = self._root.next
        while node is not self._root:
            if node.expires == _NO_EXPIRY or t < node.expires:
                out.append((node.key, node.value))
            node = node.next
        return out

    def stats(self) -> dict[str, int | None]:
        """Counters and occupancy: ``hits``, ``misses``, ``evictions``, ``expired``,
        ``len`` (entries), ``bytes`` (sum of sizes), ``maxsize``, ``max_bytes``."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expired": self._expired,
            "len": len(self._map),
            "bytes": self._bytes,
            "maxsize": self._maxsize,
            "max_bytes": self._max_bytes,
        }

    # -- writing -----------------------------------------------------------------------

    def set(
        self,
        key: Hashable,
        value: Any,
        *,
        size: int = 1,
        ttl: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Store ``value`` under ``key`` as the most recent entry; evict to fit.

        Returns ``False`` (and removes any older value of ``key``) when ``size`` alone
        exceeds ``max_bytes``; ``True`` otherwise. Replacing a value never calls
        ``on_evict`` for the old one.
        """
        size = _check_size(size)
        expires = _NO_EXPIRY
        if ttl is not None:
            seconds = _check_ttl(ttl)
            expires = _clock(now) + seconds
        old = self._map.get(key)
        previous = None
        if self._max_bytes is not None and size > self._max_bytes:
            if old is not None:
                self._drop(old)
            return False
        # The compiled twin keeps the total in a C ssize_t; refuse rather than overflow.
        if self._bytes + size > sys.maxsize:
            raise ValueError("the total size of the entries would exceed sys.maxsize")
        if old is not None:
            # Hold the old value until the entry is consistent: its __del__ may re-enter.
            previous = old.value
            self._bytes += size - old.size
            old.value = value
            old.size = size
            old.expires = expires
            if self._root.next is not old:
                self._unlink(old)
                self._push_front(old)
        else:
            node = _Node(key, value, size, expires)
            self._map[key] = node
            self._push_front(node)
            self._bytes += size
        self._evict_to_fit()
        del previous
        return True

    def __setitem__(self, key: Hashable, value: Any) -> None:
        """``cache[key] = value`` is ``set(key, value)`` with size 1 and no TTL."""
        self.set(key, value)

    def _evict_to_fit(self) -> None:
        evicted: list[tuple[Any, Any]] = []
        maxsize, max_bytes = self._maxsize, self._max_bytes
        while (maxsize is not None and len(self._map) > maxsize) or (
            max_bytes is not None and self._bytes > max_bytes
        ):
            # Never the entry just set: it is at the front and fits on its own.
            node = self._root.prev
            self._drop(node)
            self._evictions += 1
            evicted.append((node.key, node.value))
        if evicted and self._on_evict is not None:
            self._report(evicted)

    def _report(self, evicted: list[tuple[Any, Any]]) -> None:
        # The cache is consistent before the first callback runs, so a callback may read
        # or modify it, and a failing one cannot leave it half-updated.
        on_evict = self._on_evict
        assert on_evict is not None
        errors: list[Exception] = []
        for key, value in evicted:
            try:
                on_evict(key, value)
            except Exception as exc:
                errors.append(exc)
        _raise_callback_errors(errors)

    def pop(self, key: Hashable, default: Any = _MISSING, *, now: float | None = None) -> Any:
        """Remove ``key`` and return its value; if absent or expired return ``default``,
        or raise ``KeyError`` when no default is given."""
        node = self._live(key, now)
        if node is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._drop(node)
        return node.value

    def __delitem__(self, key: Hashable) -> None:
        """Remove ``key`` (expired or not); ``KeyError`` if it is not stored."""
        node = self._map.get(key)
        if node is None:
            raise KeyError(key)
        self._drop(node)

    def expire(self, *, now: float | None = None) -> int:
        """Remove every expired entry now (O(n)); returns how many were removed."""
        t = _clock(now)
        removed = 0
        node = self._root.next
        while node is not self._root:
            following = node.next
            if node.expires != _NO_EXPIRY and t >= node.expires:
                self._drop(node)
                removed += 1
            node = following
        self._expired += removed
        return removed

    def clear(self) -> None:
        """Remove every entry (no ``on_evict`` calls); statistics are kept."""
        root = self._root
        node = root.next
        root.next = root.prev = root
        self._bytes = 0
        # Point the old nodes at the sentinel instead of each other: without cycles the
        # entries are freed right here (as in the compiled twin), not by a later GC pass.
        while node is not root:
            following = node.next
            node.prev = node.next = root
            node = following
        self._map.clear()

    @property
    def maxsize(self) -> int | None:
        """The entry bound, or ``None``."""
        return self._maxsize

    @property
    def max_bytes(self) -> int | None:
        """The byte bound, or ``None``."""
        return self._max_bytes

    def __repr__(self) -> str:
        return (
            f"<LRUCache len={len(self._map)} bytes={self._bytes} "
            f"maxsize={self._maxsize} max_bytes={self._max_bytes}>"
        )
