"""The live generation's upstreams, process-wide: health-check handover and metrics.

Every config load builds new :class:`~fastedge.gateway.Upstream` objects; requests in
flight finish on the old ones. One :class:`UpstreamRegistry` per process (a
``Runtime.service``) remembers which generation is live, so that

* a new generation can inherit what is known about the same servers (breakers, health
  verdicts, ejections, the retry budget; see ``Upstream.__init__``'s ``previous``);
* only the live generation probes: :meth:`UpstreamRegistry.install` starts the new
  health checkers and stops the previous generation's at once, instead of both probing
  every target until the old gateway is retired after the drain timeout;
* the resilience gauges are reported once, for the live upstreams.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastedge.observe.metrics import MetricFamily, Metrics, Sample

if TYPE_CHECKING:
    from fastedge.gateway import Upstream

_BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}

_COUNTERS = {
    "fastedge_upstream_ejections_total": "Targets ejected by outlier detection, by upstream "
    "and target.",
    "fastedge_retry_budget_exhausted_total": "Retries refused because the upstream's retry "
    "budget was spent, by upstream.",
}


class UpstreamRegistry:
    """Which config generation's upstreams are live (see the module docstring)."""

    __slots__ = ("current", "metrics")

    def __init__(self, metrics: Metrics | None) -> None:
        self.current: dict[str, Upstream] = {}
        self.metrics = metrics
        if metrics is not None:
            for name, text in _COUNTERS.items():
                metrics.describe(name, "counter", text)
            metrics.add_collector(self.collect)

    def install(self, upstreams: Mapping[str, Upstream]) -> None:
        """Make ``upstreams`` the live generation: start their health checks, stop the
        previous generation's."""
        previous = self.current
        self.current = dict(upstreams)
        live = {id(up) for up in upstreams.values()}
        for up in previous.values():
            if id(up) not in live:
                up.stop_checks()
        for up in upstreams.values():
            up.start()

    async def aclose(self) -> None:
        """Stop every live health check (process shutdown)."""
        current, self.current = self.current, {}
        for up in current.values():
            await up.aclose()

    def collect(self) -> list[MetricFamily]:
        """Scrape-time gauges of the live upstreams' targets."""
        now = time.monotonic()
        healthy: list[Sample] = []
        ejected: list[Sample] = []
        breakers: list[Sample] = []
        for up in self.current.values():
            for t in up.targets:
                labels = (("upstream", up.name), ("target", t.name))
                healthy.append(("fastedge_upstream_target_healthy", labels, int(up.is_healthy(t))))
                if up.outlier is not None:
                    ejected.append(
                        ("fastedge_upstream_target_ejected", labels, int(up.is_ejected(t, now)))
                    )
                if t.breaker is not None:
                    state = _BREAKER_GAUGE[up.breaker_state(t, now)]
                    breakers.append(("fastedge_breaker_state", labels, state))
        return [
            MetricFamily(
                "fastedge_upstream_target_healthy",
                "gauge",
                "1 when the target passes its active health checks (always 1 without).",
                healthy,
            ),
            MetricFamily(
                "fastedge_upstream_target_ejected",
                "gauge",
                "1 while outlier detection has the target out of rotation.",
                ejected,
            ),
            MetricFamily(
                "fastedge_breaker_state",
                "gauge",
                "Circuit breaker per target: 0 closed, 1 half-open, 2 open.",
                breakers,
            ),
        ]
