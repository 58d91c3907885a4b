"""Observability: Prometheus metrics (:mod:`.metrics`) and the JSON access log (:mod:`.logging`)."""

from __future__ import annotations

from fastedge.observe.logging import AccessLog, setup_logging, utc_timestamp
from fastedge.observe.metrics import CONTENT_TYPE, MetricFamily, Metrics, Sample

__all__ = [
    "CONTENT_TYPE",
    "AccessLog",
    "MetricFamily",
    "Metrics",
    "Sample",
    "setup_logging",
    "utc_timestamp",
]
