"""The edge cache's building blocks (RFC 9111 shared cache, RFC 5861, RFC 9211).

* :mod:`fastedge.cache.control` - ``Cache-Control`` and HTTP-date parsing;
* :mod:`fastedge.cache.policy` - storability, freshness, age, keys, reuse decisions,
  validation, invalidation, route overrides, ``Cache-Status``: pure functions;
* :mod:`fastedge.cache.store` - ``CacheStore`` over the compiled ``LRUCache`` with a
  streaming fill, purges, and ``CoalescingLocks`` for request coalescing.

See docs/_cache_state.md.
"""

from __future__ import annotations

from fastedge.cache.control import CacheControl, parse_cache_control, parse_http_date
from fastedge.cache.policy import (
    Decision,
    Fresh,
    Miss,
    MustRevalidate,
    StaleIfError,
    StaleWhileRevalidate,
    cache_key,
    cache_status,
    decide,
    is_storable,
)
from fastedge.cache.store import CacheStore, CoalescingLocks, Entry, Filler

__all__ = [
    "CacheControl",
    "CacheStore",
    "CoalescingLocks",
    "Decision",
    "Entry",
    "Filler",
    "Fresh",
    "Miss",
    "MustRevalidate",
    "StaleIfError",
    "StaleWhileRevalidate",
    "cache_key",
    "cache_status",
    "decide",
    "is_storable",
    "parse_cache_control",
    "parse_http_date",
]
