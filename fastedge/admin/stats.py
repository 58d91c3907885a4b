"""Per-second request statistics for the admin dashboard (``GET /stats``).

A :class:`StatsSampler` reads the process-wide request counters once per second with
:meth:`fastedge.observe.metrics.Metrics.request_totals` — the same aggregation a
Prometheus scrape does — and keeps the last ten minutes of

* request rate and server-error (5xx) rate per second,
* p50 and p99 latency estimated from that second's histogram delta.

Nothing runs on the request path: the proxy only bumps the counters it always bumps.

Quantiles are estimated the way PromQL's ``histogram_quantile`` does: find the bucket that
holds the rank and interpolate linearly inside it (the lower bound of the first bucket is
0); a rank in the overflow bucket answers the last finite bound. The error is therefore at
most one bucket width (see :data:`~fastedge.observe.metrics.DURATION_BUCKETS`), which is
what any Prometheus dashboard over the same histogram would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastedge.observe.metrics import DURATION_BUCKETS, Metrics, RequestTotals

__all__ = ["Point", "StatsSampler", "estimate_quantile"]

log = logging.getLogger("fastedge.admin.stats")

INTERVAL = 1.0
"""Seconds between samples: the dashboard refreshes every 1-2 s."""

WINDOW = 600
"""Samples kept: ten minutes at one per second (about 60 KiB of tuples)."""


def estimate_quantile(
    q: float, buckets: Sequence[int], bounds: Sequence[float] = DURATION_BUCKETS
) -> float | None:
    """The ``q``-quantile (0 < q < 1) of a histogram with non-cumulative ``buckets``
    (one per bound, then the overflow), or ``None`` when it is empty."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, count in enumerate(buckets):
        if count and cumulative + count >= rank:
            if i >= len(bounds):
                return bounds[-1]  # overflow bucket: all that is known is "above the last"
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-1]


@dataclass(frozen=True, slots=True)
class Point:
    """One second of traffic. ``p50``/``p99`` are seconds, ``None`` without requests."""

    t: float  # unix time at the end of the interval
    rps: float
    errors: float  # 5xx answers per second
    p50: float | None
    p99: float | None

    def as_json(self) -> dict[str, Any]:
        """The ``GET /stats`` form: milliseconds for latency, rounded for the wire."""
        return {
            "t": round(self.t, 3),
            "rps": round(self.rps, 2),
            "errors": round(self.errors, 2),
            "p50_ms": None if self.p50 is None else round(self.p50 * 1000, 3),
            "p99_ms": None if self.p99 is None else round(self.p99 * 1000, 3),
        }


class StatsSampler:
    """Samples :class:`Metrics` every ``interval`` seconds into a ring of ``window`` points.

    :meth:`sample` is the whole algorithm and takes injectable times, so tests drive it
    without sleeping; :meth:`start` runs it on a background task and :meth:`aclose`
    stops that task (``Runtime.close`` calls it at shutdown).
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        interval: float = INTERVAL,
        window: int = WINDOW,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.interval = interval
        self.points: deque[Point] = deque(maxlen=window)
        self._clock = clock
        self._wall = wall_clock
        self._last: RequestTotals = metrics.request_totals()
        self._last_at = clock()
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> Point | None:
        """Take one sample now; returns the new point (``None`` if no time passed)."""
        now = self._clock()
        totals = self.metrics.request_totals()
        elapsed = now - self._last_at
        if elapsed <= 0:
            return None
        last = self._last
        self._last, self._last_at = totals, now
        delta = [a - b for a, b in zip(totals.duration_buckets, last.duration_buckets, strict=True)]
        point = Point(
            t=self._wall(),
            rps=max(0, totals.requests - last.requests) / elapsed,
            errors=max(0, totals.by_class[5] - last.by_class[5]) / elapsed,
            p50=estimate_quantile(0.50, delta),
            p99=estimate_quantile(0.99, delta),
        )
        self.points.append(point)
        return point

    def snapshot(self, seconds: int | None = None) -> dict[str, Any]:
        """The ``GET /stats`` body: the last ``seconds`` points (all when ``None``),
        oldest first, plus the totals so far."""
        points = list(self.points)
        if seconds is not None:
            points = points[-seconds:] if seconds > 0 else []
        totals = self._last
        return {
            "interval": self.interval,
            "window": self.points.maxlen,
            "points": [p.as_json() for p in points],
            "totals": {
                "requests": totals.requests,
                "by_class": {f"{k}xx": n for k, n in enumerate(totals.by_class) if k},
            },
        }

    def start(self) -> None:
        """Sample every ``interval`` seconds on a task of the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Deadlines advance by whole intervals, so a late tick does not shift later ones;
        # after a long stall the schedule restarts instead of sampling in a burst.
        deadline = loop.time()
        while True:
            deadline = max(deadline + self.interval, loop.time())
            await asyncio.sleep(deadline - loop.time())
            try:
                self.sample()
            except Exception:  # a broken collector must not end the series
                log.exception("stats sample failed")

    async def aclose(self) -> None:
        """Stop sampling (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
