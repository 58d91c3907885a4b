"""Request coalescing across fastedge instances, through the ``[redis]`` server.

In one process, :class:`~fastedge.cache.store.CoalescingLocks` makes concurrent misses
for one URL wait for a single upstream fetch. Several instances behind a load balancer
each have their own store, so the same burst would cost one fetch *per instance*. With
``[redis]`` the instance-local leader of a miss also takes a Redis lock for the URL
(:meth:`fastedge.state.RedisCoordinator.acquire`, a token-owned lease that only its
owner can release):

1. the holder fetches from the upstream, stores the response, then **publishes** it
   (status, headers, body, freshness bookkeeping) under a short-lived Redis key and
   releases the lock;
2. a leader on another instance waits for the lock (bounded by ``coalesce_wait``); when
   it gets it, it first looks for a publication: found, it stores and answers that
   (no upstream request); not found (the holder failed, or the response was not
   storable), it fetches itself, holding the lock.

A publication lives as long as the lock's lease: it is a hand-over to the instances that
are waiting *now*, not a second cache level (a purge on one instance could not reach
it). Every Redis call is bounded by ``[redis].timeout``; Redis unavailable, a lock
still held after the wait, or a publication that does not decode all mean "fetch
yourself" — coalescing is an optimisation, never a reason to fail a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

import orjson

from fastedge.cache.control import CacheControl, parse_cache_control
from fastedge.cache.policy import field_values
from fastedge.cache.store import Entry
from fastedge.state import LockNotAcquired, LockToken, RedisCoordinator, StateUnavailable

__all__ = ["Published", "SharedFills"]

log = logging.getLogger("fastedge.cache")

Headers: TypeAlias = list[tuple[bytes, bytes]]
T = TypeVar("T")

# Failures are logged at most once per this many seconds per cache, never per request.
_LOG_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class Published:
    """A response another instance stored, as it published it."""

    status: int
    headers: Headers
    body: bytes
    cc: CacheControl
    lifetime: float
    request_time: float
    response_time: float
    keep: float
    # The publisher's request fields named by the response's Vary: the variant this is.
    vary_request: Headers


def _digest(key: bytes) -> str:
    # Cache keys carry whole URLs; a fixed-size digest keeps Redis keys short.
    return hashlib.sha256(key).hexdigest()


class SharedFills:
    """Cross-instance fill locks and publications of one named cache."""

    __slots__ = ("_last_log", "coordinator", "failures", "lock_ttl", "name", "redis", "wait")

    def __init__(
        self,
        redis_client: Any,
        *,
        name: str,
        key_prefix: str,
        timeout: float,
        wait: float,
    ) -> None:
        self.redis = redis_client
        self.name = name
        self.wait = wait
        # The lease covers the holder's fetch; waiters give up after `wait` anyway, so a
        # longer lease would only delay the next instance after a crashed holder.
        self.lock_ttl = max(wait, 0.1)
        self.coordinator = RedisCoordinator(
            redis_client, key_prefix=f"{key_prefix}cache:{name}:", timeout=timeout
        )
        self.failures = 0  # Redis calls that failed (the request then went upstream)
        self._last_log = -_LOG_INTERVAL

    def _object_key(self, key: bytes) -> str:
        return self.coordinator.redis_key("obj", _digest(key))

    async def acquire(self, key: bytes) -> LockToken | None:
        """Hold the cross-instance fill lock of ``key``, waiting up to ``wait`` seconds;
        ``None`` when it stayed held or Redis did not answer (fetch without it)."""
        try:
            return await self.coordinator.acquire(_digest(key), ttl=self.lock_ttl, wait=self.wait)
        except LockNotAcquired:
            return None
        except StateUnavailable as exc:
            self._failed(exc)
            return None

    async def release(self, token: LockToken) -> None:
        """Give the lock back (a lease that expired meanwhile is left alone)."""
        try:
            await self.coordinator.release(token)
        except StateUnavailable as exc:
            self._failed(exc)

    async def load(self, key: bytes) -> Published | None:
        """The publication of ``key`` by another instance, if one is still there."""
        try:
            raw = await self._bounded(self.redis.get(self._object_key(key)))
        except StateUnavailable as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        try:
            return decode(bytes(raw))
        except (ValueError, KeyError, TypeError) as exc:
            self._failed(exc)
            return None

    async def publish_and_release(
        self, token: LockToken, key: bytes, entry: Entry, keep: float, request_headers: Headers
    ) -> None:
        """Publish a committed ``entry`` under ``key`` for the instances waiting on
        ``token``'s lock, then release the lock (in that order, so a waiter that gets
        the lock finds the publication)."""
        try:
            ms = max(1, round(self.lock_ttl * 1000))
            data = encode(entry, keep, request_headers)
            await self._bounded(self.redis.set(self._object_key(key), data, px=ms))
        except StateUnavailable as exc:
            self._failed(exc)
        await self.release(token)

    async def _bounded(self, pending: Awaitable[T]) -> T:
        """One Redis call within ``[redis].timeout``; failures → ``StateUnavailable``."""
        import redis.exceptions

        try:
            async with asyncio.timeout(self.coordinator.timeout):
                return await pending
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(f"redis: {exc or 'timed out'}") from exc

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            log.warning(
                "cache %r: cross-instance coalescing unavailable (%s); fetching locally",
                self.name,
                exc,
            )


def encode(entry: Entry, keep: float, request_headers: Headers) -> bytes:
    """An entry as bytes: one JSON head line (header bytes as latin-1 text), then the
    body. ``request_headers`` are the storing request's fields; those named by the
    entry's ``Vary`` are kept, so a receiver stores the publication as the same variant."""
    head = {
        "status": entry.status,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
        "cc": entry.cc.serialize().decode("latin-1"),
        "lifetime": entry.lifetime,
        "request_time": entry.request_time,
        "response_time": entry.response_time,
        "keep": keep,
        "vary_request": [
            [name.decode("latin-1"), value.decode("latin-1")]
            for name in entry.vary
            for value in field_values(request_headers, name)
        ],
    }
    return orjson.dumps(head) + b"\n" + b"".join(entry.body)


def decode(data: bytes) -> Published:
    """The inverse of :func:`encode`; raises ``ValueError``/``KeyError`` on bad input."""
    head_bytes, sep, body = data.partition(b"\n")
    if not sep:
        raise ValueError("no head line")
    head = orjson.loads(head_bytes)
    return Published(
        status=int(head["status"]),
        headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["headers"]],
        body=body,
        cc=parse_cache_control([head["cc"].encode("latin-1")]),
        lifetime=float(head["lifetime"]),
        request_time=float(head["request_time"]),
        response_time=float(head["response_time"]),
        keep=float(head["keep"]),
        vary_request=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["vary_request"]],
    )
