"""The ``[tracing]`` section and the process-wide tracer built from it.

```toml
[tracing]
sample_ratio = 0.01                            # new traces sampled (parent-based)
service_name = "fastedge"
otlp_endpoint = "http://127.0.0.1:4318/v1/traces"   # optional OTLP/HTTP JSON export
memory_spans = 1000                            # recent spans kept for admin GET /traces
```

Without the section no tracer exists and the data path never calls one. The tracer is
built once per process (it owns the exporter's queue and connection), so a reload does
not change tracing settings; the server says so when they differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastedge.config import (
    _build,
    _Context,
    _field,
    _integer,
    _Key,
    _read_table,
    _Schema,
    _string,
    _type_name,
)
from fastedge.observe.metrics import Metrics
from fastedge.observe.otlp import InMemorySink, OTLPExporter
from fastedge.observe.tracing import ParentBased, SpanExporter, TraceIdRatio, Tracer


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``[tracing]``: sampling, export and the in-process span store."""

    sample_ratio: float = 1.0
    # Root sampling ratio; a caller's sampled flag is always followed (ParentBased), as the
    # OpenTelemetry SDK's default sampler does. 1.0 suits the demo; production sets ~0.01.
    service_name: str = "fastedge"
    otlp_endpoint: str | None = None
    memory_spans: int = 1000
    # Recent spans kept in memory for the admin GET /traces (0 = none).
    max_queue: int = 2048
    # OTLP export queue: the OpenTelemetry SDK's BatchSpanProcessor maxQueueSize.


def _ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number between 0 and 1, got {_type_name(value)}")
    ratio = float(value)
    if not (0.0 <= ratio <= 1.0) or math.isnan(ratio):
        raise ValueError(f"must be between 0 and 1, got {value!r}")
    return ratio


def _endpoint(value: object) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s):// URL, got {text!r}")
    return text


_SCHEMA: _Schema = {
    "sample_ratio": _Key(_field(_ratio)),
    "service_name": _Key(_field(_string)),
    "otlp_endpoint": _Key(_field(_endpoint)),
    "memory_spans": _Key(_field(_integer(0, 1_000_000))),
    "max_queue": _Key(_field(_integer(1, 1_000_000))),
}


def convert_tracing_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[tracing]`` (registered in ``fastedge.config.EXTENSION_SECTIONS``)."""
    return _build(_read_table(ctx, path, value, _SCHEMA), TracingConfig)


@dataclass(slots=True)
class Tracing:
    """The process's tracer and the exporters it feeds."""

    config: TracingConfig
    tracer: Tracer
    sink: InMemorySink | None
    exporter: OTLPExporter | None

    async def aclose(self) -> None:
        """Flush and close the OTLP exporter."""
        if self.exporter is not None:
            await self.exporter.aclose()


def build_tracing(config: TracingConfig | None, metrics: Metrics) -> Tracing | None:
    """The tracer for ``config`` (``None`` without a ``[tracing]`` section)."""
    if config is None:
        return None
    exporters: list[SpanExporter] = []
    sink = InMemorySink(config.memory_spans) if config.memory_spans else None
    if sink is not None:
        exporters.append(sink)
    exporter = None
    if config.otlp_endpoint is not None:
        exporter = OTLPExporter(
            config.otlp_endpoint,
            max_queue=config.max_queue,
            service_name=config.service_name,
            metrics=metrics,
        )
        exporters.append(exporter)
    tracer = Tracer(ParentBased(TraceIdRatio(config.sample_ratio)), exporters)
    return Tracing(config, tracer, sink, exporter)
