"""Circuit breaker, one per upstream target.

A breaker stops sending requests to a target that is failing, so a struggling server gets
room to recover and clients get a fast 503 (with ``Retry-After``) instead of a slow 502/504.

States (Hystrix / Resilience4j):

* **closed** — requests flow; outcomes go into a rolling window of time buckets. When the
  window holds at least ``min_requests`` outcomes and the failure ratio reaches
  ``failure_ratio``, the breaker trips.
* **open** — every request is refused for ``open_for`` seconds. Each trip that follows a
  failed half-open probe doubles the open time, up to ``open_for_max`` (Resilience4j's
  exponential ``waitDurationInOpenState``); a successful close resets it.
* **half_open** — after the open time, ``half_open_probes`` requests are let through (at
  most that many per half-open period); if they all succeed the breaker closes with an
  empty window, the first failure re-opens it.

Everything is synchronous bookkeeping (no I/O, no timers): the state advances lazily when
:meth:`CircuitBreaker.allow` or :meth:`CircuitBreaker.record` is called, and every method
takes ``now=`` so tests drive time by hand.

Contract with the caller: every :meth:`~CircuitBreaker.allow` that returned ``True`` is
followed by exactly one :meth:`~CircuitBreaker.record` (the request got a verdict) or
:meth:`~CircuitBreaker.abandon` (it ended without one: the client left). The caller reads
:attr:`~CircuitBreaker.generation` right after ``allow()`` and passes it back: the
generation changes with every state change, so the result of a slow request admitted
before a trip cannot be taken for a half-open probe's (a late failure would re-open the
breaker, a late abandon would let an extra probe through). Without ``generation=`` a
result counts for the current state; results arriving while open are always ignored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class RollingCounts:
    """Two counters (``total``, ``hits``) over a rolling window of time buckets.

    The window of ``window`` seconds is cut into ``buckets`` slots (Hystrix's
    ``metrics.rollingStats``: 10 buckets over 10 s). A slot is reused, and reset, when time
    comes back round to it, so memory is fixed and nothing needs a timer. Counts are
    accurate to one bucket width at the old end of the window.
    """

    __slots__ = ("_epochs", "_hits", "_n", "_totals", "_width", "window")

    def __init__(self, window: float, buckets: int = 10) -> None:
        if not window > 0 or not math.isfinite(window):
            raise ValueError("window must be a positive number of seconds")
        if buckets < 1:
            raise ValueError("buckets must be >= 1")
        self.window = window
        self._n = buckets
        self._width = window / buckets
        self._epochs = [-1] * buckets  # absolute bucket number each slot holds
        self._totals = [0] * buckets
        self._hits = [0] * buckets

    # Type comments, not annotations: the .pxd gives these C types (so for the others).
    def add(self, now, total=1, hits=0):  # type: (float, int, int) -> None
        """Count ``total`` events, ``hits`` of them hits, at time ``now``."""
        epoch = int(now // self._width)
        slot = epoch % self._n
        if self._epochs[slot] != epoch:
            self._epochs[slot] = epoch
            self._totals[slot] = 0
            self._hits[slot] = 0
        self._totals[slot] += total
        self._hits[slot] += hits

    def sums(self, now: float) -> tuple[int, int]:
        """``(total, hits)`` over the buckets still inside the window at ``now``."""
        oldest = int(now // self._width) - self._n
        total = hits = 0
        epochs = self._epochs
        for i in range(self._n):
            if epochs[i] > oldest:
                total += self._totals[i]
                hits += self._hits[i]
        return total, hits

    def clear(self) -> None:
        """Forget every count."""
        for i in range(self._n):
            self._epochs[i] = -1
            self._totals[i] = 0
            self._hits[i] = 0


class CircuitBreaker:
    """A closed → open → half-open circuit breaker for one target (see module docstring).

    Defaults are Hystrix's (``circuitBreaker.requestVolumeThreshold`` 20,
    ``errorThresholdPercentage`` 50, ``sleepWindowInMilliseconds`` 5000, one half-open
    probe, a 10 s window of 10 buckets); the growth cap of 60 s is Resilience4j's default
    ``waitDurationInOpenState``.
    """

    __slots__ = (
        "_clock",
        "_counts",
        "_open_for_now",
        "_opened_at",
        "_probe_successes",
        "_probes_inflight",
        "_state",
        "failure_ratio",
        "generation",
        "half_open_probes",
        "min_requests",
        "open_for",
        "open_for_max",
        "trips",
    )

    def __init__(
        self,
        *,
        failure_ratio: float = 0.5,
        min_requests: int = 20,
        window: float = 10.0,
        buckets: int = 10,
        open_for: float = 5.0,
        open_for_max: float = 60.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if min_requests < 1:
            raise ValueError("min_requests must be >= 1")
        if not open_for > 0 or open_for_max < open_for:
            raise ValueError("need 0 < open_for <= open_for_max")
        if half_open_probes < 1:
            raise ValueError("half_open_probes must be >= 1")
        self.failure_ratio = failure_ratio
        self.min_requests = min_requests
        self.open_for = open_for
        self.open_for_max = open_for_max
        self.half_open_probes = half_open_probes
        self._clock = clock
        self._counts = RollingCounts(window, buckets)
        self._state: State = "closed"
        self._opened_at = 0.0
        self._open_for_now = open_for  # current open time, grows on repeated trips
        self._probes_inflight = 0
        self._probe_successes = 0
        self.trips = 0  # times the breaker opened (a counter for metrics)
        self.generation = 0  # bumped on every state change

    @property
    def state(self) -> State:
        """``"closed"``, ``"open"`` or ``"half_open"`` as of the last call (an open
        breaker whose time is up reports ``"open"`` until the next ``allow()``)."""
        return self._state

    def allow(self, now=None):  # type: (float | None) -> bool
        """Whether a request may go to the target now. A ``True`` in half-open takes one
        probe slot, to be given back by :meth:`record` or :meth:`abandon`."""
        state = self._state
        if state == "closed":
            return True
        if now is None:
            now = self._clock()
        if state == "open":
            if now - self._opened_at < self._open_for_now:
                return False
            self._state = "half_open"
            self.generation += 1
            self._probes_inflight = 0
            self._probe_successes = 0
        # half-open: at most ``half_open_probes`` admissions per half-open period
        if self._probes_inflight + self._probe_successes < self.half_open_probes:
            self._probes_inflight += 1
            return True
        return False

    def record(
        self, success: bool, now: float | None = None, *, generation: int | None = None
    ) -> None:
        """The outcome of a request that :meth:`allow` let through (``generation``: the
        breaker's :attr:`generation` when it was allowed; stale results are ignored)."""
        self.record_outcome(
            success,
            self._clock() if now is None else now,
            self.generation if generation is None else generation,
        )

    def record_outcome(self, success, now, generation):  # type: (bool, float, int) -> None
        """:meth:`record` with every argument given (a C call for the compiled callers:
        the express lane reports each attempt through it)."""
        if generation != self.generation:
            return
        state = self._state
        if state == "closed":
            counts = self._counts
            counts.add(now, 1, 0 if success else 1)
            if not success:
                total, failures = counts.sums(now)
                if total >= self.min_requests and failures >= self.failure_ratio * total:
                    self._trip(now, False)
        elif state == "half_open":
            if self._probes_inflight > 0:
                self._probes_inflight -= 1
            if not success:
                self._trip(now, True)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.half_open_probes:
                self._close()
        # open: a late result from before the trip says nothing about the target now

    def abandon(self, *, generation: int | None = None) -> None:
        """A request that :meth:`allow` let through ended without a verdict (cancelled,
        client gone): in half-open its probe slot is freed for another request."""
        if generation is not None and generation != self.generation:
            return
        if self._state == "half_open" and self._probes_inflight > 0:
            self._probes_inflight -= 1

    def retry_after(self, now: float | None = None) -> float:
        """Seconds until the breaker may admit a request (for a 503's ``Retry-After``).

        0 when closed or when a half-open probe slot is free; the remaining open time when
        open; the base ``open_for`` while half-open probes are all taken (their outcome
        decides, and a failure re-opens for at least that long).
        """
        state = self._state
        if state == "closed":
            return 0.0
        if now is None:
            now = self._clock()
        if state == "open":
            return max(0.0, self._opened_at + self._open_for_now - now)
        if self._probes_inflight + self._probe_successes < self.half_open_probes:
            return 0.0
        return self.open_for

    def stats(self, now: float | None = None) -> dict[str, float | int | str]:
        """A snapshot for metrics and the admin API."""
        if now is None:
            now = self._clock()
        total, failures = self._counts.sums(now)
        return {
            "state": self._state,
            "requests": total,
            "failures": failures,
            "failure_ratio": failures / total if total else 0.0,
            "trips": self.trips,
            "open_for": self._open_for_now,
            "retry_after": self.retry_after(now),
            "probes_inflight": self._probes_inflight,
        }

    def _trip(self, now, grow):  # type: (float, bool) -> None
        if grow:  # a failed probe: the target is still down, back off longer
            self._open_for_now = min(self._open_for_now * 2, self.open_for_max)
        self._state = "open"
        self.generation += 1
        self._opened_at = now
        self._probes_inflight = 0
        self._probe_successes = 0
        self.trips += 1

    def _close(self) -> None:
        self._state = "closed"
        self.generation += 1
        self._open_for_now = self.open_for
        self._probes_inflight = 0
        self._probe_successes = 0
        self._counts.clear()  # a fresh start: old failures must not re-trip at once
