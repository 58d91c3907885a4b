"""Scrape-time metric collectors for state that already exists elsewhere.

Nothing here runs per request: each collector reads a length or a counter that its owner
keeps anyway, when ``/metrics`` is scraped.

* :func:`process_families` — standard process metrics under the names every Prometheus
  client library uses (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
  ``process_open_fds``, ``process_max_fds``), so stock dashboards and alerts work
  unchanged. Only metrics whose sum over processes means something are exported: with
  ``--workers N`` the supervisor sums every worker's scrape (:mod:`.aggregate`), which
  gives the instance's CPU, memory and descriptors, whereas a summed
  ``process_start_time_seconds`` would be meaningless, so it is left out.
* :class:`ServerCollector` — per-process state of a :class:`~fastedge.server.ProxyServer`:
  rate-limiter keys held in memory (``fastedge_ratelimit_keys{policy,backend}``) and the
  spans kept for ``GET /traces`` (``fastedge_trace_memory_spans``).
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING

from fastedge.observe.metrics import MetricFamily, Sample

if TYPE_CHECKING:
    from fastedge.server import ProxyServer

__all__ = ["ServerCollector", "process_families"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_families() -> list[MetricFamily]:
    """CPU time, resident memory and file descriptors of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    families = [
        MetricFamily(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            [("process_cpu_seconds_total", (), usage.ru_utime + usage.ru_stime)],
        ),
    ]
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            rss_pages = int(f.read().split()[1])
        families.append(
            MetricFamily(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                [("process_resident_memory_bytes", (), rss_pages * _PAGE_SIZE)],
            )
        )
        open_fds = len(os.listdir("/proc/self/fd"))
        families.append(
            MetricFamily(
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                [("process_open_fds", (), open_fds)],
            )
        )
    except OSError:  # not Linux: the portable metrics above still go out
        pass
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        families.append(
            MetricFamily(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                [("process_max_fds", (), soft)],
            )
        )
    return families


class ServerCollector:
    """Scrape-time gauges of one server's current configuration generation."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def __call__(self) -> list[MetricFamily]:
        families = [self._ratelimit_keys(), self._memory_spans()]
        return [family for family in families if family.samples]

    def _ratelimit_keys(self) -> MetricFamily:
        # Policies are shared by the routes naming them, so each is reported once.
        seen: dict[str, Sample] = {}
        for route in self.server.gateway.router.routes:
            chain = route.filters
            if chain is None:
                continue
            for f in chain.filters:
                if f.name != "rate_limit":
                    continue
                for policy in getattr(f, "policies", ()):
                    if policy.name not in seen:
                        labels = (("policy", policy.name), ("backend", policy.config.backend))
                        seen[policy.name] = (
                            "fastedge_ratelimit_keys",
                            labels,
                            policy.tracked_keys(),
                        )
        return MetricFamily(
            "fastedge_ratelimit_keys",
            "gauge",
            "Rate-limit keys (clients, users, ...) with state held in this process, by policy: "
            "counters for backend=local, leases for backend=redis. Bounded by max_keys.",
            [seen[name] for name in sorted(seen)],
        )

    def _memory_spans(self) -> MetricFamily:
        tracing = self.server.tracing
        sink = None if tracing is None else tracing.sink
        samples: list[Sample] = []
        if sink is not None:
            samples.append(("fastedge_trace_memory_spans", (), len(sink)))
        return MetricFamily(
            "fastedge_trace_memory_spans",
            "gauge",
            "Finished spans kept in memory for the admin GET /traces (bounded by "
            "[tracing] memory_spans; the oldest are evicted).",
            samples,
        )
