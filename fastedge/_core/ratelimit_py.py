"""Per-key rate limiters: the pure-Python twin of ``ratelimit.pyx`` and its specification.

Two algorithms, one shape of answer ``(allowed, remaining, seconds)``:

* :class:`TokenBucket` -- a bucket of ``burst`` tokens per key, refilled continuously at
  ``rate`` tokens per second; a request takes ``cost`` tokens or is refused.
* :class:`SlidingWindow` -- the sliding-window *counter* (Cloudflare's): two fixed-window
  counters per key, the previous one weighted by how much of it the sliding window still
  covers. O(1) memory per key; its error bound is documented on the class.

Both keep per-key state in a table bounded by ``max_keys``. When a new key arrives, idle
keys whose state has decayed back to "fresh" (a full bucket, empty windows) are dropped
first from the least-recently-used end: forgetting them changes no answer. Only if the
table is still full is the least-recently-used key evicted even though it still holds
state; that key starts fresh if it returns (the price of a too-small ``max_keys``).

The compiled module must give bit-identical answers: every float is computed by the same
expression in the same order here and there (IEEE-754 doubles both), and the test suite
checks it operation by operation with Hypothesis.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["SlidingWindow", "TokenBucket"]

#: Counts and capacities must be exact in a C double so both twins compute alike.
MAX_EXACT = 2**53

#: New-key inserts drop at most this many fully decayed keys from the LRU end, so one
#: request never pays for sweeping a large idle table (the max_keys bound holds anyway).
PRUNE_PER_INSERT = 4

INF = math.inf


def _check_positive_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _check_count(name: str, value: object, high: int = MAX_EXACT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= high:
        raise ValueError(f"{name} must be an int in [1, {high}], got {value!r}")
    return value


def _check_cost(cost: object) -> int:
    # Costs above the limit are legal (they are simply never allowed), so only the type
    # and the lower bound are checked; huge ints stay Python ints and compare exactly.
    if isinstance(cost, bool) or not isinstance(cost, int):
        raise TypeError(f"cost must be an int, got {type(cost).__name__}")
    if cost < 1:
        raise ValueError(f"cost must be >= 1, got {cost!r}")
    return cost


def _clock(now: float | None) -> float:
    if now is None:
        return time.monotonic()
    if isinstance(now, bool) or not isinstance(now, (int, float)):
        raise TypeError(f"now must be a number or None, got {type(now).__name__}")
    t = float(now)
    if not math.isfinite(t):
        # A NaN or infinite clock would poison the stored state for good.
        raise ValueError(f"now must be finite, got {now!r}")
    return t


class _BucketState:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


class TokenBucket:
    """Token bucket per key: ``burst`` tokens of capacity, refilled at ``rate`` per second.

    A new key starts full. ``acquire`` refills the key's bucket for the time elapsed since
    its last call (never above ``burst``; a clock that goes backwards adds nothing), then
    takes ``cost`` tokens if there are that many.
    """

    __slots__ = ("_buckets", "_burst", "_max_keys", "_rate")

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self._rate = _check_positive_real("rate", rate)
        self._burst = float(_check_count("burst", burst))
        self._max_keys = _check_count("max_keys", max_keys)
        # Ordered oldest use first: the first item is the least recently used key.
        self._buckets: OrderedDict[Hashable, _BucketState] = OrderedDict()

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> int:
        """Bucket capacity in tokens."""
        return int(self._burst)

    @property
    def max_keys(self) -> int:
        """Most keys kept at once."""
        return self._max_keys

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self._rate!r}, burst={int(self._burst)}, "
            f"max_keys={self._max_keys}) with {len(self._buckets)} keys"
        )

    def _refilled(self, state: _BucketState, t: float) -> float:
        if t > state.last:
            tokens = state.tokens + (t - state.last) * self._rate
            if tokens > self._burst:
                tokens = self._burst
            return tokens
        return state.tokens

    def _denied(self, tokens: float, cost: int) -> tuple[bool, int, float]:
        if cost > self._burst:
            return (False, int(tokens), INF)
        return (False, int(tokens), (float(cost) - tokens) / self._rate)

    def _make_room(self, t: float) -> None:
        buckets = self._buckets
        for _ in range(PRUNE_PER_INSERT):
            if not buckets:
                break
            oldest = next(iter(buckets.values()))
            if self._refilled(oldest, t) < self._burst:
                break
            buckets.popitem(last=False)  # full again: identical to a brand-new key
        if len(buckets) >= self._max_keys:
            buckets.popitem(last=False)

    def acquire(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """Take ``cost`` tokens from ``key``'s bucket if it holds that many.

        Returns ``(allowed, remaining, retry_after)``: ``remaining`` is the whole tokens
        left after this call; ``retry_after`` is ``0.0`` when allowed, else the seconds
        until ``cost`` tokens will be there (if nobody else takes them). A ``cost`` above
        ``burst`` can never be allowed: ``retry_after`` is ``math.inf`` and the key's state
        is left untouched.
        """
        c = _check_cost(cost)
        t = _clock(now)
        state = self._buckets.get(key)
        if c > self._burst:
            return self._denied(self._burst if state is None else self._refilled(state, t), c)
        if state is None:
            self._make_room(t)
            state = _BucketState(self._burst, t)
            self._buckets[key] = state
        else:
            if t > state.last:
                state.tokens = self._refilled(state, t)
                state.last = t
            self._buckets.move_to_end(key)
        if state.tokens >= c:
            state.tokens -= c
            return (True, int(state.tokens), 0.0)
        return self._denied(state.tokens, c)

    def peek(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """What :meth:`acquire` would answer, without taking tokens or touching the key.

        ``remaining`` here is the whole tokens available now (nothing is taken).
        """
        c = _check_cost(cost)
        t = _clock(now)
        state = self._buckets.get(key)
        tokens = self._burst if state is None else self._refilled(state, t)
        if c <= tokens:
            return (True, int(tokens), 0.0)
        return self._denied(tokens, c)

    def reset(self, key: Hashable) -> bool:
        """Forget ``key`` (its bucket is full again). True if it was known."""
        return self._buckets.pop(key, None) is not None

    def clear(self) -> None:
        """Forget every key."""
        self._buckets.clear()


class _WindowState:
    __slots__ = ("curr", "index", "prev")

    def __init__(self, index: float, prev: int, curr: int) -> None:
        self.index = index
        self.prev = prev
        self.curr = curr


class SlidingWindow:
    """Sliding-window counter per key: at most ``limit`` cost per ``window`` seconds.

    Time is cut into fixed windows ``[k*window, (k+1)*window)``. Each key counts the
    allowed cost of the current window (``curr``) and of the one before (``prev``). At
    ``elapsed`` seconds into the current window the cost in the last ``window`` seconds is
    estimated as ``prev * (window - elapsed) / window + curr``, assuming the previous
    window's hits were spread uniformly. A hit is allowed if ``estimate + cost <= limit``;
    refused hits are not counted.

    Error bound. Let ``A`` be the true cost allowed in ``(now - window, now]``, ``e`` the
    seconds elapsed in the current window and ``W`` the window. ``A - estimate`` lies in
    ``[-prev*(W-e)/W, prev*e/W]``: the limiter over-admits by at most ``prev*e/W`` (the
    previous window's hits bunched at its end) and under-admits by at most
    ``prev*(W-e)/W`` (bunched at its start). As every allowed hit keeps the estimate
    within ``limit``, ``prev <= limit`` and ``curr <= limit``: no true sliding window ever
    holds ``2*limit`` or more. With uniformly spread traffic the estimate is exact.
    """

    __slots__ = ("_limit", "_max_keys", "_window", "_windows")

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None:
        self._limit = _check_count("limit", limit)
        self._window = _check_positive_real("window", window)
        self._max_keys = _check_count("max_keys", max_keys)
        self._windows: OrderedDict[Hashable, _WindowState] = OrderedDict()

    @property
    def limit(self) -> int:
        """Most cost allowed per window."""
        return self._limit

    @property
    def window(self) -> float:
        """Window length in seconds."""
        return self._window

    @property
    def max_keys(self) -> int:
        """Most keys kept at once."""
        return self._max_keys

    def __len__(self) -> int:
        return len(self._windows)

    def __repr__(self) -> str:
        return (
            f"SlidingWindow(limit={self._limit}, window={self._window!r}, "
            f"max_keys={self._max_keys}) with {len(self._windows)} keys"
        )

    def _rolled(self, state: _WindowState, index: float) -> tuple[float, int, int]:
        """``(index, prev, curr)`` of ``state`` seen from window ``index``.

        A clock that went back into an earlier window is held at the key's window.
        """
        if index <= state.index:
            return (state.index, state.prev, state.curr)
        if index == state.index + 1.0:
            return (index, state.curr, 0)
        return (index, 0, 0)

    def _estimate(self, index: float, prev: int, curr: int, t: float) -> tuple[float, float]:
        """``(elapsed, estimate)``: seconds into window ``index`` and the sliding count."""
        window = self._window
        elapsed = t - index * window
        if elapsed < 0.0:
            elapsed = 0.0
        return (elapsed, float(prev) * ((window - elapsed) / window) + float(curr))

    def _evaluate(
        self, index: float, prev: int, curr: int, cost: int, t: float
    ) -> tuple[bool, int, float]:
        window = self._window
        limit = self._limit
        elapsed, estimate = self._estimate(index, prev, curr, t)
        if cost > limit:
            return (False, _whole(float(limit) - estimate), INF)
        if estimate + float(cost) <= float(limit):
            return (True, _whole(float(limit) - (estimate + float(cost))), window - elapsed)
        need = limit - cost  # the estimate must fall to this for the hit to pass
        if curr <= need:
            # Within this window: the previous window's share decays linearly.
            wait = window * (1.0 - float(need - curr) / float(prev)) - elapsed
        else:
            # Only after this window ends, once `curr` becomes the decaying `prev`.
            wait = (window - elapsed) + window * (1.0 - float(need) / float(curr))
        if wait < 0.0:
            wait = 0.0
        return (False, _whole(float(limit) - estimate), wait)

    def _make_room(self, index: float) -> None:
        windows = self._windows
        for _ in range(PRUNE_PER_INSERT):
            if not windows:
                break
            _, prev, curr = self._rolled(next(iter(windows.values())), index)
            if prev != 0 or curr != 0:
                break
            windows.popitem(last=False)  # both windows empty: identical to a new key
        if len(windows) >= self._max_keys:
            windows.popitem(last=False)

    def hit(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """Count ``cost`` against ``key`` if the estimate leaves room for it.

        Returns ``(allowed, remaining, reset_after)``. ``remaining`` is the whole cost that
        could still be allowed right now. ``reset_after``: when allowed, the seconds until
        the current fixed window ends (``RateLimit-Reset``); when refused, the seconds until
        a hit of this ``cost`` would be allowed if no other hit came (``Retry-After``).
        A ``cost`` above ``limit`` is never allowed: ``math.inf``, state untouched.
        """
        c = _check_cost(cost)
        t = _clock(now)
        index = float(math.floor(t / self._window))
        state = self._windows.get(key)
        if c > self._limit:
            if state is None:
                return self._evaluate(index, 0, 0, c, t)
            return self._evaluate(*self._rolled(state, index), c, t)
        if state is None:
            self._make_room(index)
            state = _WindowState(index, 0, 0)
            self._windows[key] = state
        else:
            state.index, state.prev, state.curr = self._rolled(state, index)
            self._windows.move_to_end(key)
        answer = self._evaluate(state.index, state.prev, state.curr, c, t)
        if answer[0]:
            state.curr += c
        return answer

    def peek(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """What :meth:`hit` would answer, without counting or touching the key.

        ``remaining`` here is the room left before this hit (nothing is counted).
        """
        c = _check_cost(cost)
        t = _clock(now)
        index = float(math.floor(t / self._window))
        state = self._windows.get(key)
        rolled = (index, 0, 0) if state is None else self._rolled(state, index)
        allowed, _, seconds = self._evaluate(*rolled, c, t)
        _, estimate = self._estimate(*rolled, t)
        return (allowed, _whole(float(self._limit) - estimate), seconds)

    def reset(self, key: Hashable) -> bool:
        """Forget ``key`` (both its windows are empty again). True if it was known."""
        return self._windows.pop(key, None) is not None

    def clear(self) -> None:
        """Forget every key."""
        self._windows.clear()


def _whole(x: float) -> int:
    """Whole units in ``x``, never negative."""
    return int(x) if x > 0.0 else 0
