"""The distributed rate-limit backend: one atomic Lua script per decision on Redis.

Every decision is a single ``EVALSHA`` (redis-py's ``register_script`` falls back to
``SCRIPT LOAD`` when the server does not know the script yet): the script reads the key's
state, refills/rolls it, decides and writes it back inside Redis, which runs scripts one
at a time, so two instances can never both read "one left" and both take it (the
read-then-write race of a GET/SET client). One round trip per decision.

Clock: the scripts read the Redis server's own clock (``TIME``), never the caller's, so
instances whose clocks disagree still share one timeline. (Redis >= 5 replicates the
effects of a script, not the script itself, so ``TIME`` is safe inside one.)

State per key is one hash, with the same fields and formulas as the local limiters in
``fastedge._core.ratelimit_py`` (the specification), so a Redis-backed policy answers what
a local one would for the same hits:

* sliding window: ``i`` (fixed-window index), ``p`` (previous window's count), ``c``
  (current window's count); it expires when both windows have passed (an absent key is
  "both windows empty", the same answer);
* token bucket: ``t`` (tokens), ``l`` (time of the last refill); it expires once the
  bucket would be full again (an absent key is "full", the same answer).

So idle keys cost Redis nothing. Both scripts take *up to* ``want`` units in one call
(at least one, else the hit is refused): ``want = 1`` is the plain decision; the lease
mode (:class:`LeaseBook`) asks for a batch.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from fastedge.core import LRUCache

__all__ = [
    "SLIDING_WINDOW_LUA",
    "TOKEN_BUCKET_LUA",
    "Grant",
    "LeaseBook",
    "RedisLimiter",
    "RedisUnavailable",
]


class Grant(NamedTuple):
    """One answer from Redis: units ``granted`` (0 = refused), whole units ``remaining``
    after them, and ``seconds``: window reset when granted, retry-after when refused."""

    granted: int
    remaining: int
    seconds: float


class RedisUnavailable(Exception):
    """Redis could not answer in time (refused, reset, timed out, script error)."""


# ARGV: limit, window (s), want[, now (s) -- tests only; production uses TIME].
# Formulas and their order are those of SlidingWindow.hit / _evaluate in ratelimit_py.py.
SLIDING_WINDOW_LUA: Final = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t
if ARGV[4] then
  t = tonumber(ARGV[4])
else
  local now = redis.call('TIME')
  t = tonumber(now[1]) + tonumber(now[2]) / 1000000
end
local index = math.floor(t / window)
local prev, curr = 0, 0
local s = redis.call('HMGET', KEYS[1], 'i', 'p', 'c')
if s[1] then
  local stored = tonumber(s[1])
  if index <= stored then
    -- a clock behind the key's window is held at that window (as the local limiter)
    index = stored
    prev = tonumber(s[2])
    curr = tonumber(s[3])
  elseif index == stored + 1 then
    prev = tonumber(s[3])
  end
end
local elapsed = t - index * window
if elapsed < 0 then elapsed = 0 end
local estimate = prev * ((window - elapsed) / window) + curr
-- the most units g <= want with estimate + g <= limit (same comparison as the local hit)
local g = math.floor(limit - estimate)
if g > want then g = want end
if g < 0 then g = 0 end
if g >= 1 and estimate + g > limit then g = g - 1 end
if g < want and estimate + (g + 1) <= limit then g = g + 1 end
if g >= 1 then
  curr = curr + g
  redis.call('HSET', KEYS[1], 'i', string.format('%.17g', index), 'p', prev, 'c', curr)
  -- the counts matter until the window after this one has ended
  redis.call('PEXPIRE', KEYS[1], math.ceil(((index + 2) * window - t) * 1000) + 1000)
  local left = limit - (estimate + g)
  if left > 0 then left = math.floor(left) else left = 0 end
  return {g, left, string.format('%.17g', window - elapsed)}
end
local need = limit - 1
local wait
if curr <= need then
  wait = window * (1.0 - (need - curr) / prev) - elapsed
else
  wait = (window - elapsed) + window * (1.0 - need / curr)
end
if wait < 0 then wait = 0 end
local left = limit - estimate
if left > 0 then left = math.floor(left) else left = 0 end
return {0, left, string.format('%.17g', wait)}
"""

# ARGV: rate (tokens/s), burst, want[, now]. Formulas of TokenBucket.acquire.
TOKEN_BUCKET_LUA: Final = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t
if ARGV[4] then
  t = tonumber(ARGV[4])
else
  local now = redis.call('TIME')
  t = tonumber(now[1]) + tonumber(now[2]) / 1000000
end
local tokens, last = burst, t
local s = redis.call('HMGET', KEYS[1], 't', 'l')
if s[1] then
  tokens = tonumber(s[1])
  last = tonumber(s[2])
  if t > last then
    tokens = tokens + (t - last) * rate
    if tokens > burst then tokens = burst end
    last = t
  end
end
local g = math.floor(tokens)
if g > want then g = want end
if g >= 1 then
  tokens = tokens - g
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens),
             'l', string.format('%.17g', last))
  -- a bucket that has refilled is the same as no key at all
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
  return {g, math.floor(tokens), '0'}
end
local left = 0
if tokens > 0 then left = math.floor(tokens) end
return {0, left, string.format('%.17g', (1 - tokens) / rate)}
"""


class RedisLimiter:
    """One policy's quota in Redis; :meth:`take` is one bounded round trip.

    ``client`` returns the shared ``redis.asyncio.Redis`` (``Runtime.redis``); it is
    called on first use, inside the event loop. ``algorithm`` is ``"sliding_window"``
    (``a`` = limit, ``b`` = window seconds) or ``"token_bucket"`` (``a`` = rate,
    ``b`` = burst). Keys are ``<key_prefix>rl:<policy>:<algorithm tag>:<key>``; the window
    length is part of the tag, since counts of another window size mean nothing.
    """

    __slots__ = (
        "_args",
        "_client",
        "_namespace",
        "_script",
        "_script_client",
        "_source",
        "timeout",
    )

    def __init__(
        self,
        client: Callable[[], Any],
        *,
        policy: str,
        algorithm: str,
        a: float,
        b: float,
        key_prefix: str,
        timeout: float,
    ) -> None:
        if algorithm == "sliding_window":
            self._source = SLIDING_WINDOW_LUA
            tag = f"sw{round(b * 1000)}"
        elif algorithm == "token_bucket":
            self._source = TOKEN_BUCKET_LUA
            tag = "tb"
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        self._client = client
        self._namespace = f"{key_prefix}rl:{policy}:{tag}:".encode()
        # Arguments as Redis sees them: repr() of a float round-trips exactly.
        self._args = (_number(a), _number(b))
        self._script: Any = None
        self._script_client: Any = None
        self.timeout = timeout

    def redis_key(self, key: bytes) -> bytes:
        """The Redis key holding ``key``'s state."""
        return self._namespace + key

    async def take(self, key: bytes, want: int = 1, *, now: float | None = None) -> Grant:
        """Take up to ``want`` units for ``key`` (at least one, else refuse).

        Bounded by ``timeout`` whatever the client's own settings (a blackholed server
        would otherwise hold the request for the kernel's connect timeout). ``now``
        replaces the Redis clock (tests only). Raises :class:`RedisUnavailable`.
        """
        import redis.exceptions

        args: tuple[Any, ...] = (*self._args, want)
        if now is not None:
            args += (_number(now),)
        try:
            async with asyncio.timeout(self.timeout):
                script = self._bound_script()
                reply = await script(keys=[self._namespace + key], args=args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(_describe(exc)) from exc
        granted, remaining, seconds = reply
        return Grant(int(granted), int(remaining), float(seconds))

    def _bound_script(self) -> Any:
        client = self._client()
        if client is None:
            raise OSError("no [redis] section is configured")
        if client is not self._script_client:
            self._script = client.register_script(self._source)
            self._script_client = client
        return self._script


class LeaseBook:
    """Local pre-allocation: take ``lease`` units per round trip, spend them locally.

    ``take_local`` is synchronous (no round trip) while the key holds leased units;
    ``acquire`` refills from Redis, one round trip per key at a time (concurrent requests
    for the same key wait for that trip rather than each leasing a batch).

    A lease expires at ``lifetime(grant)`` seconds: for a sliding window, the end of the
    fixed window it was counted in, so a unit is always spent in the window Redis counted
    it in; units still unspent then are dropped (under-admission, never over-admission).
    Memory is bounded by ``max_keys`` (least recently used keys drop their lease).
    """

    __slots__ = ("_leases", "_lifetime", "_pending", "clock", "lease", "limiter")

    def __init__(
        self,
        limiter: RedisLimiter,
        lease: int,
        *,
        lifetime: Callable[[Grant], float],
        max_keys: int,
        clock: Callable[[], float],
    ) -> None:
        self.limiter = limiter
        self.lease = lease
        self.clock = clock
        self._lifetime = lifetime
        # key -> [units left, remaining in Redis at the last refill, window seconds]
        self._leases: LRUCache = LRUCache(max_keys)
        self._pending: dict[bytes, asyncio.Future[None]] = {}

    def take_local(self, key: bytes, now: float) -> Grant | None:
        """Spend one leased unit of ``key``, or ``None`` when it holds none."""
        entry = self._leases.get(key, now=now)
        if entry is None:
            return None
        entry[0] -= 1
        if entry[0] <= 0:
            self._leases.pop(key, None)
        return Grant(1, entry[0] + entry[1], entry[2])

    def keys(self) -> int:
        """Keys with a lease entry (expired ones count until the LRU drops them)."""
        return len(self._leases)

    def leased(self, key: bytes, now: float) -> int:
        """Units ``key`` holds locally (for tests and the accuracy bound)."""
        entry = self._leases.peek(key, now=now)
        return 0 if entry is None else int(entry[0])

    async def acquire(self, key: bytes) -> Grant:
        """One unit for ``key``: from a lease another request is fetching, else from
        Redis (taking up to ``lease`` units and keeping the rest). Raises
        :class:`RedisUnavailable`."""
        while (pending := self._pending.get(key)) is not None:
            await asyncio.shield(pending)
            got = self.take_local(key, self.clock())
            if got is not None:
                return got
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[key] = done
        started = self.clock()
        try:
            grant = await self.limiter.take(key, self.lease)
        finally:
            del self._pending[key]
            done.set_result(None)
        if grant.granted > 1:
            # Redis read its clock somewhere between `started` and now, so counting the
            # lifetime from `started` never lets a lease outlive its window.
            now = self.clock()
            lifetime = self._lifetime(grant) - (now - started)
            if lifetime > 0:
                extra = grant.granted - 1
                self._leases.set(
                    key, [extra, grant.remaining, grant.seconds], ttl=lifetime, now=now
                )
                return Grant(1, grant.remaining + extra, grant.seconds)
        return Grant(min(grant.granted, 1), grant.remaining, grant.seconds)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return repr(float(value))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
