"""The named caches of one fastedge process, shared by every config generation.

A ``[caches.NAME]`` section describes a cache; each route naming it (``cache = "NAME"``)
gets a filter over the same :class:`EdgeCache`: one byte-bounded
:class:`~fastedge.cache.store.CacheStore`, one set of
:class:`~fastedge.cache.store.CoalescingLocks`, the background refreshes in flight and
the per-result counters. :class:`EdgeCaches` keeps them by name as a process-wide
service (``Runtime.service``), so a reload keeps what is stored — unless the reload
changes the cache's size bounds, which needs a new store (the LRU's bounds are fixed).

It also reports every cache to the metrics registry at scrape time (one collector for
all caches) and answers the admin API (:mod:`fastedge.admin.cache`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from fastedge.cache.store import CacheStore, CoalescingLocks
from fastedge.observe.metrics import MetricFamily

if TYPE_CHECKING:
    from fastedge.cache.shared import SharedFills
    from fastedge.observe.metrics import Metrics

__all__ = ["RESULTS", "SERVICE", "EdgeCache", "EdgeCaches"]

log = logging.getLogger("fastedge.cache")

#: The ``Runtime.service`` name of the registry.
SERVICE: Final = "fastedge.cache"

#: How a request on a cached route was answered (``fastedge_cache_requests_total``):
#: ``hit`` from storage without contacting the upstream (coalesced followers included);
#: ``stale`` a stale stored response (stale-while-revalidate, stale-if-error, a client's
#: max-stale); ``revalidated`` the upstream confirmed the stored response (304);
#: ``miss`` the upstream's response (stored or not); ``bypass`` not a cacheable request
#: (unsafe or other methods, upgrades).
RESULTS: Final = ("hit", "stale", "revalidated", "miss", "bypass")


class EdgeCache:
    """One named cache: storage, coalescing, background refreshes, counters."""

    def __init__(self, name: str, *, max_bytes: int, max_object_size: int) -> None:
        self.name = name
        self.store = CacheStore(max_bytes, max_object_size=max_object_size, clock=time.time)
        self.locks = CoalescingLocks()
        self.results: dict[str, int] = dict.fromkeys(RESULTS, 0)
        # Full keys whose background refresh is running: never two for one key.
        self.refreshing: set[bytes] = set()
        self.refreshes = 0  # background refreshes started
        self.refresh_failures = 0  # ... that could not reach the upstream or were invalid
        self.shared: SharedFills | None = None  # cross-instance coalescing ([redis])
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def clock(self) -> Callable[[], float]:
        """POSIX seconds for every freshness and age decision (tests inject one)."""
        return self.store.clock

    @clock.setter
    def clock(self, fn: Callable[[], float]) -> None:
        self.store.clock = fn

    def count(self, result: str) -> None:
        """Count one answer by ``result`` (one of :data:`RESULTS`)."""
        self.results[result] += 1

    def spawn(self, coro: Any) -> None:
        """Run a background task (refresh, publication) held until it ends; closing
        the cache cancels what is left."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, Any]:
        """Store counters, per-result answers, coalescing and refresh counts."""
        store = self.store.stats()
        return {
            "entries": store["len"],
            "urls": store["urls"],
            "bytes": store["bytes"],
            "max_bytes": store["max_bytes"],
            "max_object_size": self.store.max_object_size,
            "evictions": store["evictions"],
            "expired": store["expired"],
            "purged": store["purged"],
            "fills": {
                "started": store["fills_started"],
                "committed": store["fills_committed"],
                "aborted": store["fills_aborted"],
                "too_large": store["fills_too_large"],
            },
            "requests": dict(self.results),
            "coalesced": self.locks.coalesced,
            "coalesce_timeouts": self.locks.timed_out,
            "refreshes": self.refreshes,
            "refresh_failures": self.refresh_failures,
            "shared_failures": 0 if self.shared is None else self.shared.failures,
        }

    async def aclose(self) -> None:
        """Cancel background work (refreshes, publications) still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class EdgeCaches:
    """Every named cache of the process (a ``Runtime`` service, see the module doc)."""

    def __init__(self, metrics: Metrics) -> None:
        self.caches: dict[str, EdgeCache] = {}
        self._retired: list[EdgeCache] = []
        self._metrics = metrics
        metrics.add_collector(self.collect)

    def get(self, name: str, *, max_bytes: int, max_object_size: int) -> EdgeCache:
        """The cache ``name``; created on first use, replaced (empty) when its bounds
        changed since (a reload with another ``max_bytes`` / ``max_object_size``)."""
        cache = self.caches.get(name)
        if cache is not None:
            store = cache.store
            if store.stats()["max_bytes"] == max_bytes and store.max_object_size == max_object_size:
                return cache
            log.info("cache %r: size bounds changed, starting with an empty store", name)
            self._retired.append(cache)
        cache = self.caches[name] = EdgeCache(
            name, max_bytes=max_bytes, max_object_size=max_object_size
        )
        return cache

    def collect(self) -> list[MetricFamily]:
        """The cache metric families (called at every scrape)."""
        requests: list[tuple[str, dict[str, str], float]] = []
        size: list[tuple[str, dict[str, str], float]] = []
        entries: list[tuple[str, dict[str, str], float]] = []
        evictions: list[tuple[str, dict[str, str], float]] = []
        coalesced: list[tuple[str, dict[str, str], float]] = []
        for name, cache in sorted(self.caches.items()):
            labels = {"cache": name}
            for result, value in cache.results.items():
                requests.append(
                    ("fastedge_cache_requests_total", {"cache": name, "result": result}, value)
                )
            stats = cache.store.stats()
            size.append(("fastedge_cache_bytes", labels, stats["bytes"] or 0))
            entries.append(("fastedge_cache_entries", labels, stats["len"] or 0))
            evictions.append(("fastedge_cache_evictions_total", labels, stats["evictions"] or 0))
            coalesced.append(("fastedge_cache_coalesced_total", labels, cache.locks.coalesced))
        return [
            MetricFamily(
                "fastedge_cache_requests_total",
                "counter",
                "Requests on cached routes by how they were answered: hit, stale, "
                "revalidated, miss, bypass.",
                requests,
            ),
            MetricFamily(
                "fastedge_cache_bytes", "gauge", "Bytes held by the cache (accounted size).", size
            ),
            MetricFamily(
                "fastedge_cache_entries", "gauge", "Stored responses (variants).", entries
            ),
            MetricFamily(
                "fastedge_cache_evictions_total",
                "counter",
                "Entries evicted to stay within max_bytes.",
                evictions,
            ),
            MetricFamily(
                "fastedge_cache_coalesced_total",
                "counter",
                "Requests that waited for another request's fetch instead of their own.",
                coalesced,
            ),
        ]

    async def aclose(self) -> None:
        """Stop every cache's background work (``Runtime.close`` calls this)."""
        self._metrics.remove_collector(self.collect)
        for cache in [*self.caches.values(), *self._retired]:
            await cache.aclose()
        self._retired.clear()
