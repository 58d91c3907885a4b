"""Durable-Object-style coordination: per-key locks with fencing tokens and atomic
read-merge-write of small JSON states. One API, two implementations:

* :class:`LocalCoordinator` - in-process (one fastedge instance; no ``[redis]``);
* :class:`RedisCoordinator` - shared by every instance through Redis.

Locks. ``async with coord.lock(key, ttl=10, wait=5) as token:`` holds ``key`` for at
most ``ttl`` seconds (a crashed holder cannot block the key forever) and yields a
:class:`LockToken` whose ``fence`` grows strictly with every acquisition of that key
(Redis ``INCR``). Pass the fence to whatever the lock protects so it can refuse a write
from a holder whose lock expired while it was paused (Kleppmann's fencing argument: a
lease alone cannot stop a paused holder from writing late). A lock belongs to the
acquisition that took it: release is a compare-and-delete on the random owner id plus
fence, so a holder whose TTL expired can never free the next holder's lock. An expired
lock is simply absent (Redis ``PX``), so a waiter takes it over with a fresh fence.

States. ``await coord.update(key, fn)`` applies ``fn(old) -> new`` atomically (``old``
is ``None`` when absent); values are anything JSON can carry. On Redis this is an
optimistic compare-and-set on a version number, done by a Lua script:

* read ``(version, data)`` with one ``HMGET``; compute ``fn`` locally; write with a
  script that sets ``data`` and ``version + 1`` only if the version is unchanged, else
  retry (jittered backoff). ``fn`` may therefore run several times: keep it pure.
* Why not ``WATCH``/``MULTI``: it is the same optimistic protocol, but it needs a
  connection pinned for the whole read-compute-write (the pooled client would have to
  hand one out per update), costs an extra round trip (``WATCH``, read, ``MULTI``..
  ``EXEC``), and its conflict detection is per connection, which is easy to get wrong
  with a shared pool. A versioned CAS script is two round trips on any connection.
* Why not run ``fn`` inside Redis: ``fn`` is arbitrary Python.

``delete`` leaves a tombstone (the version survives, the data goes), so a CAS that read
an old version can never succeed after a delete and a re-create (no ABA). Tombstones
and fence counters are a few bytes per key ever used; they carry no TTL on purpose
(a fence that restarted from 1 would not be monotonic).

Every Redis operation is bounded by ``timeout``; a refused, reset or slow Redis raises
:class:`StateUnavailable` - callers decide whether to fail open or closed.
"""

from __future__ import annotations

import abc
import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, TypeVar

__all__ = [
    "LocalCoordinator",
    "LockNotAcquired",
    "LockToken",
    "RedisCoordinator",
    "StateContention",
    "StateUnavailable",
]

T = TypeVar("T")


class StateUnavailable(Exception):
    """The state backend could not answer in time (Redis refused, reset, timed out)."""


class LockNotAcquired(Exception):
    """``lock``/``acquire`` waited ``wait`` seconds and the key stayed held."""


class StateContention(Exception):
    """``update`` lost the compare-and-set ``max_retries`` times in a row."""


@dataclass(frozen=True, slots=True)
class LockToken:
    """Proof of holding ``key``: ``fence`` strictly increases per key across holders;
    ``owner`` is this acquisition's random id (what release compares)."""

    key: str
    fence: int
    owner: str


# Waiting for a held lock: poll with doubling, jittered delays in this range (seconds).
# Redis has no cheap "wake me when this key is deleted" (keyspace notifications need
# server config), and a lock wait is the slow path by definition.
POLL_MIN: Final = 0.002
POLL_MAX: Final = 0.05


class _Coordinator(abc.ABC):
    """The lock-waiting loop shared by both implementations."""

    @abc.abstractmethod
    async def try_acquire(self, key: str, ttl: float) -> LockToken | None:
        """Take ``key`` for ``ttl`` seconds if it is free (or its holder expired)."""

    @abc.abstractmethod
    async def release(self, token: LockToken) -> bool:
        """Free ``token``'s lock if it still holds it; ``False`` otherwise (expired and
        possibly taken over: someone else's lock is never freed)."""

    async def _wait_for_change(self, key: str, delay: float) -> None:
        await asyncio.sleep(delay)

    async def acquire(self, key: str, *, ttl: float = 10.0, wait: float = 5.0) -> LockToken:
        """Take ``key``, waiting up to ``wait`` seconds; raises :class:`LockNotAcquired`."""
        if not ttl > 0:
            raise ValueError("ttl must be > 0")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        delay = POLL_MIN
        while True:
            token = await self.try_acquire(key, ttl)
            if token is not None:
                return token
            left = deadline - loop.time()
            if left <= 0:
                raise LockNotAcquired(f"lock {key!r} still held after {wait} s")
            await self._wait_for_change(key, min(left, delay * (0.5 + random.random())))
            delay = min(POLL_MAX, delay * 2)

    @asynccontextmanager
    async def lock(
        self, key: str, *, ttl: float = 10.0, wait: float = 5.0
    ) -> AsyncIterator[LockToken]:
        """Hold ``key`` for the block (see :meth:`acquire`). On exit the lock is
        released if still ours; if the backend is unreachable then, it expires by ttl."""
        token = await self.acquire(key, ttl=ttl, wait=wait)
        try:
            yield token
        finally:
            with suppress(StateUnavailable):
                await self.release(token)


class LocalCoordinator(_Coordinator):
    """In-process coordinator. ``clock`` (monotonic seconds) is injectable so tests can
    expire a lock without sleeping. Same semantics as :class:`RedisCoordinator`."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._locks: dict[str, tuple[str, int, float]] = {}  # key -> owner, fence, expiry
        self._fences: dict[str, int] = {}
        self._data: dict[str, tuple[int, str | None]] = {}  # key -> version, JSON text
        self._released: dict[str, asyncio.Event] = {}

    async def try_acquire(self, key: str, ttl: float) -> LockToken | None:
        now = self.clock()
        held = self._locks.get(key)
        if held is not None and held[2] > now:
            return None
        fence = self._fences.get(key, 0) + 1
        self._fences[key] = fence
        token = LockToken(key, fence, uuid.uuid4().hex)
        self._locks[key] = (token.owner, fence, now + ttl)
        return token

    async def release(self, token: LockToken) -> bool:
        held = self._locks.get(token.key)
        if held is None or (held[0], held[1]) != (token.owner, token.fence):
            return False
        del self._locks[token.key]
        event = self._released.pop(token.key, None)
        if event is not None:
            event.set()
        return True

    async def _wait_for_change(self, key: str, delay: float) -> None:
        # Woken at once by a release; the delay still bounds the wait because an
        # expiry (by the injectable clock) signals nothing.
        event = self._released.setdefault(key, asyncio.Event())
        with suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await event.wait()

    async def get(self, key: str) -> Any:
        """The state of ``key``, or ``None``."""
        text = self._data.get(key, (0, None))[1]
        return None if text is None else json.loads(text)

    async def put(self, key: str, value: Any) -> None:
        """Replace the state of ``key`` (must be JSON-serialisable)."""
        text = json.dumps(value)
        version = self._data.get(key, (0, None))[0]
        self._data[key] = (version + 1, text)

    async def delete(self, key: str) -> bool:
        """Remove the state of ``key``; whether there was one."""
        version, text = self._data.get(key, (0, None))
        if text is None:
            return False
        self._data[key] = (version + 1, None)
        return True

    async def update(self, key: str, fn: Callable[[Any], T]) -> T:
        """Atomically replace the state with ``fn(old)`` and return it. Synchronous code
        between read and write makes this atomic within the event loop."""
        version, text = self._data.get(key, (0, None))
        new = fn(None if text is None else json.loads(text))
        self._data[key] = (version + 1, json.dumps(new))
        return new


# KEYS: lock, fence. ARGV: owner, ttl ms. Returns the new fence, or nil if held. The
# lock's value is "owner:fence", so release compares both.
ACQUIRE_LUA: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
return fence
"""
# KEYS: lock. ARGV: "owner:fence". Compare-and-delete.
RELEASE_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lock. ARGV: "owner:fence", ttl ms. Compare-and-extend.
EXTEND_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: state hash {v: version, d: JSON}. ARGV: expected version, new JSON.
CAS_LUA: Final = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', v + 1, 'd', ARGV[2])
return 1
"""
# KEYS: state hash. ARGV: new JSON. Unconditional write that still bumps the version.
PUT_LUA: Final = """
redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'd', ARGV[1])
return 1
"""
# KEYS: state hash. Tombstone: keep (and bump) the version, drop the data.
DELETE_LUA: Final = """
if redis.call('HEXISTS', KEYS[1], 'd') == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'd')
redis.call('HINCRBY', KEYS[1], 'v', 1)
return 1
"""


class RedisCoordinator(_Coordinator):
    """Coordinator shared by every instance through Redis (``redis.asyncio.Redis``).

    Keys: ``<prefix>lock:<key>`` (string ``owner:fence``, ``PX`` = ttl),
    ``<prefix>fence:<key>`` (counter), ``<prefix>data:<key>`` (hash ``v``, ``d``). The
    caller owns ``redis_client`` (and closes it). Each call is bounded by ``timeout``.
    """

    def __init__(
        self,
        redis_client: Any,
        *,
        key_prefix: str = "fastedge:state:",
        timeout: float = 0.25,
        max_retries: int = 1000,
    ) -> None:
        self.client = redis_client
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.max_retries = max_retries
        self._acquire = redis_client.register_script(ACQUIRE_LUA)
        self._release = redis_client.register_script(RELEASE_LUA)
        self._extend = redis_client.register_script(EXTEND_LUA)
        self._cas = redis_client.register_script(CAS_LUA)
        self._put = redis_client.register_script(PUT_LUA)
        self._delete = redis_client.register_script(DELETE_LUA)

    def redis_key(self, kind: str, key: str) -> str:
        """The Redis key of ``kind`` (``lock``, ``fence``, ``data``) for ``key``."""
        return f"{self.key_prefix}{kind}:{key}"

    async def _call(self, pending: Awaitable[T]) -> T:
        import redis.exceptions

        try:
            async with asyncio.timeout(self.timeout):
                return await pending
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            detail = "timed out" if isinstance(exc, TimeoutError) and not str(exc) else exc
            raise StateUnavailable(f"redis: {detail}") from exc

    async def try_acquire(self, key: str, ttl: float) -> LockToken | None:
        owner = uuid.uuid4().hex
        keys = [self.redis_key("lock", key), self.redis_key("fence", key)]
        fence = await self._call(self._acquire(keys=keys, args=[owner, max(1, round(ttl * 1000))]))
        return None if fence is None else LockToken(key, int(fence), owner)

    async def release(self, token: LockToken) -> bool:
        lock_key = self.redis_key("lock", token.key)
        value = f"{token.owner}:{token.fence}"
        done = await self._call(self._release(keys=[lock_key], args=[value]))
        return bool(done)

    async def extend(self, token: LockToken, ttl: float) -> bool:
        """Push the lock's expiry to ``ttl`` seconds from now, if ``token`` still holds it."""
        lock_key = self.redis_key("lock", token.key)
        value = f"{token.owner}:{token.fence}"
        ms = max(1, round(ttl * 1000))
        done = await self._call(self._extend(keys=[lock_key], args=[value, ms]))
        return bool(done)

    async def _read(self, key: str) -> tuple[int, Any]:
        reply = await self._call(self.client.hmget(self.redis_key("data", key), "v", "d"))
        version, data = reply
        return int(version or 0), None if data is None else json.loads(data)

    async def get(self, key: str) -> Any:
        """The state of ``key``, or ``None``."""
        return (await self._read(key))[1]

    async def put(self, key: str, value: Any) -> None:
        """Replace the state of ``key`` (must be JSON-serialisable)."""
        text = json.dumps(value)
        await self._call(self._put(keys=[self.redis_key("data", key)], args=[text]))

    async def delete(self, key: str) -> bool:
        """Remove the state of ``key``; whether there was one."""
        done = await self._call(self._delete(keys=[self.redis_key("data", key)]))
        return bool(done)

    async def update(self, key: str, fn: Callable[[Any], T]) -> T:
        """Atomically replace the state with ``fn(old)`` and return it: optimistic
        versioned compare-and-set, retried on conflict (``fn`` may run more than once).
        Raises :class:`StateContention` after ``max_retries`` lost races."""
        data_key = self.redis_key("data", key)
        delay = POLL_MIN / 2
        for _ in range(self.max_retries):
            version, old = await self._read(key)
            new = fn(old)
            text = json.dumps(new)
            won = await self._call(self._cas(keys=[data_key], args=[version, text]))
            if won:
                return new
            # Jittered backoff spreads the contenders so one of them wins the next round.
            await asyncio.sleep(delay * random.random())
            delay = min(POLL_MAX, delay * 2)
        raise StateContention(f"update of {key!r} lost {self.max_retries} races")
