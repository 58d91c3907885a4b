"""Retry decisions: which failures to retry, how long to wait, and a budget.

* :class:`RetryPolicy` — per route: how many attempts, on which failures, with what
  backoff. Connect failures are always retryable (nothing was sent, so even a POST is
  safe — nginx and Envoy do the same); anything that may have reached the upstream is
  retried only for idempotent methods (RFC 9110 §9.2.2) unless the route opts in (nginx
  stopped retrying non-idempotent requests by default in 1.9.13,
  ``proxy_next_upstream ... non_idempotent``).
* :class:`RetryBudget` — per upstream: retries may add at most ``ratio`` of the request
  rate, plus a small floor, over a rolling window (Finagle's ``RetryBudget``; Envoy's
  ``retry_budget`` is the same idea as a concurrency ratio). Without it, ``attempts=3``
  triples the load on an upstream that is already failing.

Both are plain synchronous objects; the RNG and the clock are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal, Protocol

from fastedge.upstream.breaker import RollingCounts

# RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE (safe) plus PUT and DELETE.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Envoy's ``retry_on: gateway-error``: the upstream (or a proxy in front of it) says it
# could not serve the request; any other status is the application's answer.
DEFAULT_RETRY_STATUSES = frozenset({502, 503, 504})


class SupportsRandom(Protocol):
    """What backoff needs from an RNG (``random.Random`` fits)."""

    def random(self) -> float:
        """A float in ``[0, 1)``."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry one request and how long to wait before the next attempt.

    ``attempts`` counts the first try (gRPC's ``maxAttempts``): 3 means up to two retries.
    ``backoff_base``/``backoff_max`` default to Envoy's 25 ms base interval and its
    10 * base cap; ``jitter`` is one of the strategies of the AWS architecture blog post
    "Exponential Backoff And Jitter" (Marc Brooker, 2015): ``"full"`` (the default, the one
    that post recommends), ``"equal"`` or ``"none"``.
    """

    attempts: int = 3
    backoff_base: float = 0.025
    backoff_max: float = 0.250
    jitter: Literal["full", "equal", "none"] = "full"
    retry_on_statuses: Collection[int] = field(default=DEFAULT_RETRY_STATUSES)
    retry_non_idempotent: bool = False
    retry_on_timeout: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1 (it counts the first try)")
        if not 0 <= self.backoff_base <= self.backoff_max or not math.isfinite(self.backoff_max):
            raise ValueError("need 0 <= backoff_base <= backoff_max (finite)")
        if self.jitter not in ("full", "equal", "none"):
            raise ValueError("jitter must be 'full', 'equal' or 'none'")
        object.__setattr__(self, "retry_on_statuses", frozenset(self.retry_on_statuses))

    def should_retry(
        self,
        method: str,
        attempt: int,
        *,
        connect_error: bool = False,
        timeout: bool = False,
        reset: bool = False,
        status: int | None = None,
    ) -> bool:
        """Whether attempt number ``attempt`` (1 = the first try) should be followed by
        another, given how it failed.

        ``connect_error``: no connection could be made (refused, connect timeout, TLS
        handshake) — nothing was sent, so any method may be retried. ``timeout``: the
        request was sent but no (complete) response came in time. ``reset``: the
        connection broke (closed, reset, unparsable answer) before a response head —
        retried like nginx's ``proxy_next_upstream error``, idempotent methods only.
        ``status``: the upstream answered with this status. The caller must also not
        retry once response
        bytes went to the client, or when the request body was streamed and not kept.
        """
        if attempt >= self.attempts:
            return False
        if connect_error:
            return True
        if not self.retry_non_idempotent and method.upper() not in IDEMPOTENT_METHODS:
            return False
        if timeout:
            return self.retry_on_timeout
        if reset:
            return True
        return status is not None and status in self.retry_on_statuses

    def backoff(self, attempt: int, rng: SupportsRandom) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = the first retry).

        The ceiling grows exponentially, ``min(backoff_max, backoff_base * 2**(attempt-1))``;
        "full" jitter waits a uniform random time in ``[0, ceiling)``, "equal" jitter
        ``ceiling/2`` plus a uniform random time in ``[0, ceiling/2)``. Jitter spreads the
        retries of many clients that failed together instead of sending them in waves.
        """
        if attempt < 1:
            raise ValueError("attempt must be >= 1")
        # Cap the exponent first: 2**attempt overflows a float for large attempts.
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt - 1, 64))
        if self.jitter == "full":
            return ceiling * rng.random()
        if self.jitter == "equal":
            half = ceiling / 2
            return half + half * rng.random()
        return ceiling


class RetryBudget:
    """Retries allowed only while they stay a fraction of the requests (Finagle).

    Over a rolling ``window`` (seconds), ``retries <= ratio * requests + min_per_second *
    window``. Defaults are Finagle's ``RetryBudget()``: 20% of requests, a floor of 10
    retries per second, a 10 s window. The floor lets a quiet service still retry; the
    ratio caps what retries can add to a busy one during an outage (1.2x load instead of
    ``attempts``x).

    Call :meth:`record_request` once per original request (retries are not requests: they
    would raise their own budget) and :meth:`try_acquire_retry` before each retry.
    """

    __slots__ = ("_floor", "_requests", "_retries", "min_per_second", "ratio")

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        *,
        buckets: int = 10,
    ) -> None:
        if not ratio >= 0 or min_per_second < 0:
            raise ValueError("ratio and min_per_second must be >= 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._floor = min_per_second * window
        self._requests = RollingCounts(window, buckets)
        self._retries = RollingCounts(window, buckets)

    def record_request(self, now: float) -> None:
        """Count one original request (it deposits ``ratio`` of a retry)."""
        self._requests.add(now)

    def try_acquire_retry(self, now: float) -> bool:
        """Take one retry from the budget; ``False`` (and nothing taken) when spent."""
        requests, _ = self._requests.sums(now)
        retries, _ = self._retries.sums(now)
        if retries + 1 > self.ratio * requests + self._floor:
            return False
        self._retries.add(now)
        return True

    def available(self, now: float) -> int:
        """Retries that could be taken now (for metrics)."""
        requests, _ = self._requests.sums(now)
        retries, _ = self._retries.sums(now)
        return max(0, math.floor(self.ratio * requests + self._floor) - retries)
