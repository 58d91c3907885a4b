"""Typed contract of the compiled ``LRUCache`` (``lru.pyx``); ``lru_py.py`` is the
readable specification and behaves identically.

A least-recently-used cache bounded by entry count and/or total byte size, with optional
per-entry TTL expired lazily on access (``now=`` injectable, default
``time.monotonic()``). ``on_evict(key, value)`` is called for every entry dropped to make
room (not for TTL expiry, replacement, ``pop``, ``del`` or ``clear``).
"""

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["LRUCache"]

class LRUCache:
    """A least-recently-used cache bounded by entries and/or bytes, with optional TTL.

    ``maxsize`` bounds the number of entries, ``max_bytes`` the sum of the ``size``
    given to :meth:`set`; ``None`` means unbounded. Bounds must be ints in
    ``1..sys.maxsize`` (``ValueError``/``TypeError`` otherwise).
    """

    def __init__(
        self,
        maxsize: int | None = None,
        *,
        max_bytes: int | None = None,
        on_evict: Callable[[Any, Any], object] | None = None,
    ) -> None: ...
    def get(self, key: Hashable, default: Any = None, *, now: float | None = None) -> Any:
        """The value for ``key`` (made most recent), or ``default`` if absent or expired.
        Counts a hit or a miss; an expired entry is removed."""
    def __getitem__(self, key: Hashable) -> Any:
        """Like :meth:`get`, but a missing or expired key raises ``KeyError``."""
    def peek(self, key: Hashable, default: Any = None, *, now: float | None = None) -> Any:
        """The value for ``key`` without touching recency, statistics or contents."""
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is stored and unexpired now; a pure read."""
    def __len__(self) -> int:
        """Stored entries, including expired ones no read has removed yet."""
    def items(self, *, now: float | None = None) -> list[tuple[Any, Any]]:
        """``(key, value)`` pairs of the unexpired entries, most recent first."""
    def stats(self) -> dict[str, int | None]:
        """``hits``, ``misses``, ``evictions``, ``expired``, ``len`` (entries), ``bytes``
        (sum of sizes), ``maxsize``, ``max_bytes``."""
    def set(
        self,
        key: Hashable,
        value: Any,
        *,
        size: int = 1,
        ttl: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Store ``value`` as the most recent entry and evict least recent ones to fit.

        ``size`` is an int >= 0, ``ttl`` seconds > 0 (finite) or ``None``. Returns
        ``False`` without storing (and removes any older value of ``key``) when ``size``
        exceeds ``max_bytes``. An exception from ``on_evict`` propagates after the set
        completed and every eviction was reported (several: an ``ExceptionGroup``).
        """
    def __setitem__(self, key: Hashable, value: Any) -> None:
        """``set(key, value)`` with size 1 and no TTL."""
    def pop(self, key: Hashable, default: Any = ..., *, now: float | None = None) -> Any:
        """Remove ``key`` and return its value; if absent or expired return ``default``,
        or raise ``KeyError`` when no default is given."""
    def __delitem__(self, key: Hashable) -> None:
        """Remove ``key`` (expired or not); ``KeyError`` if it is not stored."""
    def expire(self, *, now: float | None = None) -> int:
        """Remove every expired entry (O(n)); returns how many were removed."""
    def clear(self) -> None:
        """Remove every entry (no ``on_evict`` calls); statistics are kept."""
    @property
    def maxsize(self) -> int | None:
        """The entry bound, or ``None``."""
    @property
    def max_bytes(self) -> int | None:
        """The byte bound, or ``None``."""
