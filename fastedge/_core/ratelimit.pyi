"""Per-key rate limiters (compiled). ``ratelimit_py.py`` is the readable twin.

Both limiters answer ``(allowed, remaining, seconds)`` and keep per-key state in a table
bounded by ``max_keys``. A new key first drops (at most 4) idle keys from the
least-recently-used end whose state has decayed back to "fresh" -- a full bucket, two
empty windows -- which changes no answer; if the table is still full, the least recently
used key is evicted even though it holds state, and starts fresh if it returns.

Every time-dependent call takes ``now`` (seconds, any monotonic origin; default
``time.monotonic()``). A clock that goes backwards adds no tokens and opens no window.

Bad arguments raise ``TypeError`` (wrong type; ``bool`` is not accepted as a number) or
``ValueError`` (out of range, non-finite ``now``) and leave the state untouched.
"""

from collections.abc import Hashable
from typing import final

@final
class TokenBucket:
    """Token bucket per key: ``burst`` tokens of capacity, refilled at ``rate`` per second.

    A new key starts full. ``rate``: tokens per second, a finite number > 0. ``burst``: an
    int in ``[1, 2**53]``. ``max_keys``: an int >= 1.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None: ...
    @property
    def rate(self) -> float:
        """Tokens added per second."""
    @property
    def burst(self) -> int:
        """Bucket capacity in tokens."""
    @property
    def max_keys(self) -> int:
        """Most keys kept at once."""
    def acquire(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """Take ``cost`` (an int >= 1) tokens from ``key``'s bucket if it holds that many.

        Returns ``(allowed, remaining, retry_after)``: ``remaining`` is the whole tokens
        left after this call; ``retry_after`` is ``0.0`` when allowed, else the seconds
        until ``cost`` tokens will be there (if nobody else takes them). A ``cost`` above
        ``burst`` is never allowed: ``retry_after`` is ``math.inf``, state untouched.
        """
    def peek(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """What :meth:`acquire` would answer, without taking tokens or touching the key;
        ``remaining`` is the whole tokens available now."""
    def reset(self, key: Hashable) -> bool:
        """Forget ``key`` (its bucket is full again). True if it was known."""
    def clear(self) -> None:
        """Forget every key."""
    def __len__(self) -> int:
        """Keys currently held."""

@final
class SlidingWindow:
    """Sliding-window counter per key (Cloudflare's): at most ``limit`` cost per ``window``.

    Time is cut into fixed windows ``[k*W, (k+1)*W)``; each key counts the allowed cost of
    the current window (``curr``) and of the previous one (``prev``). At ``e`` seconds into
    the current window the cost of the last ``W`` seconds is estimated as
    ``prev * (W - e) / W + curr`` -- exact if the previous window's hits were spread
    uniformly. A hit is allowed if ``estimate + cost <= limit``; refused hits don't count.

    Error bound: with ``A`` the true allowed cost in ``(now - W, now]``, ``A - estimate``
    lies in ``[-prev*(W-e)/W, prev*e/W]``. The limiter over-admits by at most
    ``prev*e/W`` (previous hits bunched at that window's end) and under-admits by at most
    ``prev*(W-e)/W`` (bunched at its start); as ``prev, curr <= limit``, no true sliding
    window ever holds ``2*limit`` or more.

    ``limit``: an int in ``[1, 2**53]``; ``window``: seconds, a finite number > 0.
    """

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None: ...
    @property
    def limit(self) -> int:
        """Most cost allowed per window."""
    @property
    def window(self) -> float:
        """Window length in seconds."""
    @property
    def max_keys(self) -> int:
        """Most keys kept at once."""
    def hit(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """Count ``cost`` (an int >= 1) against ``key`` if the estimate leaves room.

        Returns ``(allowed, remaining, reset_after)``. ``remaining``: whole cost that could
        still be allowed right now. ``reset_after``: when allowed, the seconds until the
        current fixed window ends (``RateLimit-Reset``); when refused, the seconds until a
        hit of this ``cost`` would be allowed if no other hit came (``Retry-After``). A
        ``cost`` above ``limit`` is never allowed: ``math.inf``, state untouched.
        """
    def peek(
        self, key: Hashable, cost: int = 1, now: float | None = None
    ) -> tuple[bool, int, float]:
        """What :meth:`hit` would answer, without counting or touching the key;
        ``remaining`` is the room before this hit."""
    def reset(self, key: Hashable) -> bool:
        """Forget ``key`` (both its windows are empty again). True if it was known."""
    def clear(self) -> None:
        """Forget every key."""
    def __len__(self) -> int:
        """Keys currently held."""
