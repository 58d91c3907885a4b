"""The cache's storage: variants in the compiled ``LRUCache`` bounded in bytes, a streaming
fill that never buffers more than ``max_object_size``, purges, and request coalescing.

Layout. Every stored response is an :class:`Entry` under its full key (``primary + \\0 +
secondary``, see :func:`fastedge.cache.policy.cache_key`) in one ``LRUCache`` whose
``max_bytes`` bounds the whole store. A small index maps each primary key (``GET
https://host/path``) to its :class:`Variants`: the ``Vary`` field names of the most
recent response and the full keys stored under it. So a lookup is two dict probes, and
purging a URL (or every URL under a prefix) finds all its variants without scanning the
LRU. When a new response arrives with a different ``Vary``, the older variants become
unreachable (RFC 9111 §4.1: the most recent response's ``Vary`` selects) and are dropped.

Times are POSIX seconds (the timeline of ``Date``) and injectable everywhere; the LRU's
TTL is "kept for" (lifetime plus the stale windows), not freshness, which
:func:`fastedge.cache.policy.decide` computes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from fastedge.cache.control import CacheControl
from fastedge.cache.policy import secondary_key, vary_fields
from fastedge.core import LRUCache

__all__ = ["CacheStore", "CoalescingLocks", "Entry", "Filler", "Variants"]

Headers: TypeAlias = list[tuple[bytes, bytes]]

# Accounting overhead per entry and per header field, on top of the bytes themselves:
# roughly the Python objects (Entry, tuples, list slots) a stored response costs.
ENTRY_OVERHEAD: Final = 512
FIELD_OVERHEAD: Final = 64


@dataclass(slots=True)
class Entry:
    """One stored response (a variant).

    ``lifetime`` is its freshness lifetime (RFC 9111 §4.2.1, after any route override)
    and ``cc`` the Cache-Control that governs reuse; ``request_time``/``response_time``
    feed the age calculation (§4.2.3); ``body`` is the list of chunks as received.
    """

    key: bytes
    primary: bytes
    status: int
    headers: Headers
    body: list[bytes]
    cc: CacheControl
    lifetime: float
    request_time: float
    response_time: float
    stored_at: float
    vary: tuple[bytes, ...] = ()
    size: int = 0
    # The express lane's serialised status line and fields (without Age and
    # X-Request-Id), valid while ``headers`` is the list it was made from: every change
    # of the stored fields assigns a new list.
    wire: tuple[Headers, bytes] | None = None
    # The last whole express head made from ``wire``: (wire, age, ttl, head). Age and
    # ttl are sent in whole seconds, so consecutive hits mostly reuse it.
    hit_head: tuple[tuple[Headers, bytes], int, int, bytes] | None = None
    # The corrected initial age (RFC 9111 §4.2.3: parsed Age and Date, response delay),
    # valid while ``headers``, ``response_time`` and ``request_time`` are unchanged:
    # (headers, response_time, request_time, age).
    initial_age: tuple[Headers, float, float, float] | None = None

    @property
    def body_length(self) -> int:
        """Bytes of body stored."""
        return sum(len(c) for c in self.body)


@dataclass(slots=True)
class Variants:
    """The index record of one primary key: the selecting fields and stored full keys."""

    vary: tuple[bytes, ...]
    keys: set[bytes] = field(default_factory=set)


def _entry_size(headers: Headers, body_bytes: int) -> int:
    return ENTRY_OVERHEAD + body_bytes + sum(len(n) + len(v) + FIELD_OVERHEAD for n, v in headers)


class Filler:
    """One response being stored while it streams to the client (``CacheStore.begin_fill``).

    ``append`` each body chunk as it is forwarded; ``commit`` at the end of the body;
    ``abort`` when the exchange fails. Once the body passes ``max_object_size`` the fill
    aborts itself and drops what it held: the response keeps streaming to the client,
    it is just not stored (a pass-through).
    """

    __slots__ = ("_chunks", "_size", "_store", "entry", "state")

    def __init__(self, store: CacheStore, entry: Entry) -> None:
        self._store = store
        self.entry = entry
        self._chunks: list[bytes] = []
        self._size = _entry_size(entry.headers, 0)
        self.state = "filling"  # filling | committed | aborted

    @property
    def active(self) -> bool:
        """Whether chunks are still being collected."""
        return self.state == "filling"

    def append(self, chunk: bytes) -> bool:
        """Keep ``chunk``; ``False`` (and the fill aborted) once the object is too large."""
        if self.state != "filling":
            return False
        self._size += len(chunk)
        if self._size > self._store.max_object_size:
            self._store.fills_too_large += 1
            self.abort()
            return False
        if chunk:
            self._chunks.append(bytes(chunk))
        return True

    def commit(self, *, keep: float, now: float | None = None) -> bool:
        """Store the complete response for ``keep`` seconds (see ``policy.keep_for``).
        ``False`` when it was aborted or does not fit the store's byte bound."""
        if self.state != "filling":
            return False
        self.state = "committed"
        self.entry.body = self._chunks
        self.entry.size = self._size
        self._chunks = []
        return self._store._commit(self.entry, keep=keep, now=now)

    def abort(self) -> None:
        """Drop the partial entry (nothing was visible to readers)."""
        if self.state == "filling":
            self.state = "aborted"
            self._chunks = []
            self._store.fills_aborted += 1


class CacheStore:
    """Stored responses bounded by ``max_bytes`` (and optionally ``max_entries``).

    ``max_object_size``: a response larger than this (headers + body + overhead) is never
    stored. ``clock``: POSIX seconds, the default for every ``now=``.
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        max_object_size: int,
        max_entries: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_object_size <= 0 or max_object_size > max_bytes:
            raise ValueError("max_object_size must be in 1..max_bytes")
        self.max_object_size = max_object_size
        self.clock = clock
        self._lru = LRUCache(max_entries, max_bytes=max_bytes, on_evict=self._evicted)
        self._index: dict[bytes, Variants] = {}
        # Bumped by every change of which key a request selects (a commit, a refresh,
        # a purge, a forgotten or evicted key): memos of key lookups are valid while it
        # holds (the express lane's hot-object memo in filters/cache.py).
        self.generation = 0
        self.fills_started = 0
        self.fills_committed = 0
        self.fills_aborted = 0
        self.fills_too_large = 0
        self.purged = 0

    # -- reading --------------------------------------------------------------------

    def lookup(
        self, primary: bytes, request_headers: Headers, *, now: float | None = None
    ) -> Entry | None:
        """The variant of ``primary`` selected by the request's fields, or ``None``."""
        variants = self._index.get(primary)
        if variants is None:
            return None
        key = primary + b"\0" + secondary_key(variants.vary, request_headers)
        entry: Entry | None = self._lru.get(key, now=self._now(now))
        if entry is None and key in variants.keys:
            self._forget(primary, key)  # expired out of the LRU
        return entry

    def peek_request(self, primary: bytes, request: Any, now: float) -> tuple[bytes, Entry] | None:
        """``(key, entry)`` of what :meth:`lookup` would return for an express request
        (``request.headers()`` is read only when the stored variants vary on a field),
        without recency, statistics or forgetting: the caller decides whether to serve
        at all, then :meth:`touch` es the key."""
        variants = self._index.get(primary)
        if variants is None:
            return None
        vary = variants.vary
        key = primary + b"\0" + (secondary_key(vary, request.headers()) if vary else b"")
        entry: Entry | None = self._lru.peek(key, None, now=now)
        return None if entry is None else (key, entry)

    def peek_key(self, key: bytes, now: float) -> Entry | None:
        """The entry under a full key from :meth:`peek_request`, without recency or
        statistics (``None`` once it expired or was evicted)."""
        entry: Entry | None = self._lru.peek(key, None, now=now)
        return entry

    def touch(self, key: bytes, now: float) -> Entry | None:
        """:meth:`lookup`'s recency and statistics for a key from :meth:`peek_request`."""
        entry: Entry | None = self._lru.get(key, None, now=now)
        return entry

    def peek(self, key: bytes, *, now: float | None = None) -> Entry | None:
        """The entry under the full ``key``, without recency or statistics changes."""
        entry: Entry | None = self._lru.peek(key, now=self._now(now))
        return entry

    def variants(self, primary: bytes) -> Variants | None:
        """The index record of ``primary`` (tests, admin)."""
        return self._index.get(primary)

    # -- writing --------------------------------------------------------------------

    def begin_fill(
        self,
        primary: bytes,
        request_headers: Headers,
        *,
        status: int,
        headers: Headers,
        cc: CacheControl,
        lifetime: float,
        request_time: float,
        response_time: float,
        content_length: int | None = None,
    ) -> Filler | None:
        """Start storing a response; ``None`` when it can't be (``Vary: *``, or a
        ``content_length`` / header block already beyond ``max_object_size``).

        ``headers`` should be what :func:`fastedge.cache.policy.storable_headers` kept.
        """
        vary = vary_fields(headers)
        if vary is None:
            return None
        if content_length is not None and (
            _entry_size(headers, content_length) > self.max_object_size
        ):
            self.fills_too_large += 1
            return None
        key = primary + b"\0" + secondary_key(vary, request_headers)
        entry = Entry(
            key=key,
            primary=primary,
            status=status,
            headers=list(headers),
            body=[],
            cc=cc,
            lifetime=lifetime,
            request_time=request_time,
            response_time=response_time,
            stored_at=response_time,
            vary=vary,
        )
        filler = Filler(self, entry)
        if filler._size > self.max_object_size:
            self.fills_too_large += 1
            return None
        self.fills_started += 1
        return filler

    def _commit(self, entry: Entry, *, keep: float, now: float | None) -> bool:
        self.generation += 1
        now = self._now(now)
        entry.stored_at = now
        variants = self._index.get(entry.primary)
        if variants is not None and variants.vary != entry.vary:
            # RFC 9111 §4.1: the newest response's Vary selects; older variants keyed
            # on other fields could never be selected again.
            for old in list(variants.keys):
                self._lru.pop(old, None)
            variants = None
        if variants is None:
            variants = self._index[entry.primary] = Variants(entry.vary)
        variants.keys.add(entry.key)  # before set: an eviction callback may drop it
        if not self._lru.set(entry.key, entry, size=entry.size, ttl=keep, now=now):
            self._forget(entry.primary, entry.key)
            return False
        self.fills_committed += 1
        return True

    def put(
        self,
        primary: bytes,
        request_headers: Headers,
        *,
        status: int,
        headers: Headers,
        body: bytes,
        cc: CacheControl,
        lifetime: float,
        request_time: float,
        response_time: float,
        keep: float,
        now: float | None = None,
    ) -> bool:
        """Store a complete response at once (``begin_fill`` + ``append`` + ``commit``)."""
        filler = self.begin_fill(
            primary,
            request_headers,
            status=status,
            headers=headers,
            cc=cc,
            lifetime=lifetime,
            request_time=request_time,
            response_time=response_time,
            content_length=len(body),
        )
        if filler is None or not filler.append(body):
            return False
        return filler.commit(keep=keep, now=now)

    def refresh(
        self,
        entry: Entry,
        *,
        headers: Headers,
        cc: CacheControl,
        lifetime: float,
        request_time: float,
        response_time: float,
        keep: float,
        now: float | None = None,
    ) -> bool:
        """Replace ``entry``'s metadata after a 304 (headers from ``policy.merge_304``)
        and keep it for ``keep`` more seconds (RFC 9111 §4.3.4). ``False`` if the entry
        is no longer stored (purged or evicted meanwhile)."""
        now = self._now(now)
        if self._lru.peek(entry.key, now=now) is not entry:
            return False
        entry.headers = list(headers)
        entry.cc = cc
        entry.lifetime = lifetime
        entry.request_time = request_time
        entry.response_time = response_time
        entry.stored_at = now
        entry.size = _entry_size(entry.headers, entry.body_length)
        self.generation += 1
        if not self._lru.set(entry.key, entry, size=entry.size, ttl=keep, now=now):
            self._forget(entry.primary, entry.key)
            return False
        return True

    # -- purging --------------------------------------------------------------------

    def purge(self, key: bytes) -> int:
        """Remove a primary key's variants, or one variant by its full key; the count."""
        self.generation += 1
        variants = self._index.pop(key, None)
        if variants is not None:
            removed = sum(1 for k in variants.keys if self._lru.pop(k, None) is not None)
        else:
            primary = key.partition(b"\0")[0]
            removed = int(self._lru.pop(key, None) is not None)
            self._forget(primary, key)
        self.purged += removed
        return removed

    def purge_prefix(self, url_prefix: bytes) -> int:
        """Remove every variant whose URL (``scheme://host/path?query``) starts with
        ``url_prefix``, for every method; O(number of stored URLs)."""
        removed = 0
        for primary in [p for p in self._index if p.partition(b" ")[2].startswith(url_prefix)]:
            removed += self.purge(primary)
        return removed

    def clear(self) -> None:
        """Remove everything (statistics are kept)."""
        self.generation += 1
        self._lru.clear()
        self._index.clear()

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict[str, int | None]:
        """The LRU's counters (``hits``, ``misses``, ``evictions``, ``expired``, ``len``,
        ``bytes``, ``maxsize``, ``max_bytes``) plus ``urls`` and the fill/purge counts."""
        out = dict(self._lru.stats())
        out.update(
            urls=len(self._index),
            fills_started=self.fills_started,
            fills_committed=self.fills_committed,
            fills_aborted=self.fills_aborted,
            fills_too_large=self.fills_too_large,
            purged=self.purged,
        )
        return out

    # -- internals ------------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _forget(self, primary: bytes, key: bytes) -> None:
        self.generation += 1
        variants = self._index.get(primary)
        if variants is not None:
            variants.keys.discard(key)
            if not variants.keys:
                del self._index[primary]

    def _evicted(self, key: bytes, entry: Entry) -> None:
        self._forget(entry.primary, key)


class CoalescingLocks:
    """Request coalescing: one upstream fetch per key at a time.

    ``async with locks.fill(key, wait=2.0) as leader:`` — the first caller is the
    ``leader`` (``True``) and fetches; later callers wait until the leader's block exits
    (or ``wait`` seconds, whichever is first) and get ``False``: they look in the store
    again and, on a miss (the leader failed, was too slow, or the response was not
    storable), go upstream themselves. The wait is bounded so one slow origin response
    never holds a crowd hostage. Per-process; across instances, see ``fastedge.state``.
    """

    __slots__ = ("_fills", "coalesced", "timed_out")

    def __init__(self) -> None:
        self._fills: dict[Hashable, asyncio.Event] = {}
        self.coalesced = 0  # waiters released by their leader
        self.timed_out = 0  # waiters that gave up after `wait`

    def __len__(self) -> int:
        return len(self._fills)

    def lead(self, key: Hashable) -> bool:
        """The manual form's first step, synchronous: ``True`` when the caller now leads
        the fill of ``key`` (and must call :meth:`release` exactly once, whatever
        happens), ``False`` when another caller leads it (then :meth:`follow`)."""
        if key in self._fills:
            return False
        self._fills[key] = asyncio.Event()
        return True

    def release(self, key: Hashable) -> None:
        """End the fill of ``key`` led by the caller: its followers wake up."""
        event = self._fills.pop(key, None)
        if event is not None:
            event.set()

    async def follow(self, key: Hashable, wait: float) -> bool:
        """Wait for the leader of ``key`` to :meth:`release` (``True``), at most ``wait``
        seconds (``False``: it is still busy, go upstream yourself). ``True`` at once
        when nobody leads ``key`` any more."""
        event = self._fills.get(key)
        if event is None:
            return True
        try:
            async with asyncio.timeout(wait):
                await event.wait()
        except TimeoutError:
            self.timed_out += 1
            return False
        self.coalesced += 1
        return True

    @asynccontextmanager
    async def fill(self, key: Hashable, wait: float = 2.0) -> AsyncIterator[bool]:
        """Lead (``True``) or follow (``False``) the fill of ``key``; see the class.

        The context-manager form of :meth:`lead` / :meth:`release` / :meth:`follow`;
        the cache filter uses the manual form, because its leader holds the key from a
        request's head to the end of the response's body, across callbacks.
        """
        if self.lead(key):
            try:
                yield True
            finally:
                self.release(key)
            return
        await self.follow(key, wait)
        yield False
