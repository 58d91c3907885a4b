"""A minimal tracer: spans, parent-based ratio sampling, W3C propagation.

Only what a proxy needs: a server span per request (child of the caller's
``traceparent``), optionally a client span for the upstream hop, and export of finished,
sampled spans to any :class:`SpanExporter` (:class:`~fastedge.observe.otlp.OTLPExporter`,
:class:`~fastedge.observe.otlp.InMemorySink`). The data model and names follow
OpenTelemetry so OTLP export is a direct mapping:

* span kinds and status codes use the OTLP enum values (opentelemetry-proto
  ``trace/v1/trace.proto``);
* attribute names follow the OpenTelemetry HTTP semantic conventions (stable since
  semconv 1.23): ``http.request.method``, ``url.path``, ``http.route``,
  ``http.response.status_code``, ``server.address``, ``network.peer.address``; names of our
  own live under ``fastedge.`` as the conventions ask for vendor attributes;
* sampling is ``ParentBased(TraceIdRatioBased(r))`` from the OpenTelemetry SDK
  specification (``sdk.md`` "Sampling").

An unsampled span is a real :class:`Span` object with ``recording = False``: it still has
ids (so the upstream receives a valid ``traceparent`` with the sampled flag clear, as the
W3C spec expects of a participant) but ignores attributes and is never exported. Its cost
is one object and one ``os.urandom(8)`` call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Protocol, TypeAlias

from fastedge.observe.tracecontext import (
    FLAG_SAMPLED,
    TraceContext,
    format_tracestate,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    parse_tracestate,
)

__all__ = [
    "ATTR_CLIENT_ADDRESS",
    "ATTR_HTTP_METHOD",
    "ATTR_HTTP_ROUTE",
    "ATTR_HTTP_STATUS",
    "ATTR_PEER_ADDRESS",
    "ATTR_REQUEST_ID",
    "ATTR_SERVER_ADDRESS",
    "ATTR_SERVER_PORT",
    "ATTR_UPSTREAM",
    "ATTR_UPSTREAM_TARGET",
    "ATTR_URL_PATH",
    "AlwaysOff",
    "AlwaysOn",
    "AttributeValue",
    "ParentBased",
    "Sampler",
    "Span",
    "SpanExporter",
    "SpanKind",
    "StatusCode",
    "TraceIdRatio",
    "Tracer",
]

logger = logging.getLogger(__name__)

AttributeValue: TypeAlias = str | bool | int | float
"""Attribute values this tracer exports (OTLP ``AnyValue`` scalars)."""

# OpenTelemetry HTTP semantic conventions (https://opentelemetry.io/docs/specs/semconv/http/).
ATTR_HTTP_METHOD = "http.request.method"
ATTR_URL_PATH = "url.path"
ATTR_HTTP_ROUTE = "http.route"
ATTR_HTTP_STATUS = "http.response.status_code"
ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
ATTR_PEER_ADDRESS = "network.peer.address"
ATTR_CLIENT_ADDRESS = "client.address"
# fastedge's own attributes (semconv: vendor attributes under a vendor namespace).
ATTR_UPSTREAM = "fastedge.upstream"  # configured upstream name
ATTR_UPSTREAM_TARGET = "fastedge.upstream.target"  # chosen target, e.g. "127.0.0.1:9001"
ATTR_REQUEST_ID = "fastedge.request_id"


class SpanKind(IntEnum):
    """``Span.SpanKind`` of opentelemetry-proto (the integer values go on the wire)."""

    INTERNAL = 1
    SERVER = 2
    CLIENT = 3
    PRODUCER = 4
    CONSUMER = 5


class StatusCode(IntEnum):
    """``Status.StatusCode`` of opentelemetry-proto."""

    UNSET = 0
    OK = 1
    ERROR = 2


class SpanExporter(Protocol):
    """Receives finished, sampled spans. ``export`` is called on the request path, so it
    must be synchronous, O(1) and must not raise (it is guarded anyway)."""

    def export(self, span: Span) -> None:
        """Take ``span``; queue or store it, never block."""


class Sampler(Protocol):
    """Decides whether a new span is recorded and exported."""

    def should_sample(self, trace_id: str, parent: TraceContext | None) -> bool:
        """``trace_id`` is the span's trace id (hex); ``parent`` its parent, if any."""


class AlwaysOn:
    """Sample every span."""

    def should_sample(self, trace_id: str, parent: TraceContext | None) -> bool:
        return True


class AlwaysOff:
    """Sample nothing (spans still propagate context)."""

    def should_sample(self, trace_id: str, parent: TraceContext | None) -> bool:
        return False


class TraceIdRatio:
    """OpenTelemetry's ``TraceIdRatioBased``: sample when the trace id's low 64 bits are
    below ``ratio * 2**64``.

    Deterministic in the trace id, so every service using the same ratio makes the same
    decision for a trace; as in the OpenTelemetry Python SDK the bound is
    ``round(ratio * 2**64)`` against the right-most 8 bytes (the random part under Trace
    Context Level 2).
    """

    __slots__ = ("bound", "ratio")

    _LOW_64 = (1 << 64) - 1

    def __init__(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("sampling ratio must be within [0, 1]")
        self.ratio = ratio
        self.bound = round(ratio * (self._LOW_64 + 1))

    def should_sample(self, trace_id: str, parent: TraceContext | None) -> bool:
        return int(trace_id[16:], 16) < self.bound


class ParentBased:
    """OpenTelemetry's ``ParentBased``: with a parent, follow its sampled flag (so a trace
    is recorded end to end or not at all); without one, ask ``root``."""

    __slots__ = ("root",)

    def __init__(self, root: Sampler) -> None:
        self.root = root

    def should_sample(self, trace_id: str, parent: TraceContext | None) -> bool:
        if parent is not None:
            return parent.sampled
        return self.root.should_sample(trace_id, None)


class Span:
    """One timed operation. Create with :meth:`Tracer.start_span`; finish with :meth:`end`.

    Times are unix epoch nanoseconds (OTLP's ``fixed64 start_time_unix_nano``). When
    ``recording`` is false the setters do nothing and :meth:`end` exports nothing.
    """

    __slots__ = (
        "_exporters",
        "attributes",
        "end_ns",
        "kind",
        "name",
        "parent_span_id",
        "recording",
        "span_id",
        "start_ns",
        "status_code",
        "status_message",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        name: str,
        *,
        trace_id: str,
        span_id: str,
        parent_span_id: str | None,
        kind: SpanKind,
        start_ns: int,
        recording: bool,
        tracestate: tuple[tuple[str, str], ...] = (),
        attributes: dict[str, AttributeValue] | None = None,
        exporters: Sequence[SpanExporter] = (),
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns: int | None = None
        self.recording = recording
        self.tracestate = tracestate
        self.attributes: dict[str, AttributeValue] = attributes if attributes else {}
        self.status_code = StatusCode.UNSET
        self.status_message = ""
        self._exporters = exporters

    @property
    def context(self) -> TraceContext:
        """This span as a propagation context (what :meth:`Tracer.inject` sends)."""
        return TraceContext(
            self.trace_id,
            self.span_id,
            FLAG_SAMPLED if self.recording else 0,
            self.tracestate,
        )

    @property
    def ended(self) -> bool:
        """True once :meth:`end` ran."""
        return self.end_ns is not None

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Set one attribute (ignored when not recording)."""
        if self.recording:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Set several attributes (ignored when not recording)."""
        if self.recording:
            self.attributes.update(attributes)

    def set_status(self, code: StatusCode, message: str = "") -> None:
        """Set the span status. Per the OpenTelemetry HTTP conventions a server span is
        ``ERROR`` for 5xx only (4xx is the client's fault), a client span for 4xx too."""
        self.status_code = code
        self.status_message = message if code is StatusCode.ERROR else ""

    def end(self, now: int | None = None) -> None:
        """Finish the span at ``now`` (unix nanos; default the clock) and export it when
        sampled. A second call does nothing. Exporter errors are logged, never raised:
        tracing must not fail a request."""
        if self.end_ns is not None:
            return
        self.end_ns = time.time_ns() if now is None else now
        if not self.recording:
            return
        for exporter in self._exporters:
            try:
                exporter.export(self)
            except Exception:
                logger.exception("span exporter %r failed", exporter)

    def child(self, name: str, kind: SpanKind = SpanKind.INTERNAL) -> Span:
        """Start a child span of this one (same trace, same sampling decision).

        A non-recording parent gives a non-recording child, so untraced requests pay one
        object per child and export nothing.
        """
        return Span(
            name,
            trace_id=self.trace_id,
            span_id=new_span_id() if self.recording else self.span_id,
            parent_span_id=self.span_id,
            kind=kind,
            start_ns=time.time_ns(),
            recording=self.recording,
            tracestate=self.tracestate,
            exporters=self._exporters,
        )

    def end_error(self, message: str) -> None:
        """Mark the span as failed with ``message`` and end it."""
        self.set_status(StatusCode.ERROR, message)
        self.end()

    def __repr__(self) -> str:
        return (
            f"Span({self.name!r}, trace_id={self.trace_id}, span_id={self.span_id}, "
            f"parent={self.parent_span_id}, recording={self.recording})"
        )


class Tracer:
    """Starts spans, samples them, and moves contexts in and out of HTTP headers.

    ``Tracer(ParentBased(TraceIdRatio(0.1)), exporter)`` records 10% of new traces and
    every trace whose caller sampled it. ``exporter`` may be one exporter or several.
    """

    __slots__ = ("_exporters", "sampler")

    def __init__(
        self,
        sampler: Sampler | None = None,
        exporter: SpanExporter | Sequence[SpanExporter] = (),
    ) -> None:
        self.sampler: Sampler = sampler if sampler is not None else ParentBased(AlwaysOn())
        if isinstance(exporter, Sequence):
            self._exporters: tuple[SpanExporter, ...] = tuple(exporter)
        else:
            self._exporters = (exporter,)

    def start_span(
        self,
        name: str,
        parent: TraceContext | Span | None = None,
        *,
        kind: SpanKind = SpanKind.SERVER,
        attributes: Mapping[str, AttributeValue] | None = None,
        now: int | None = None,
        trace_id: str | None = None,
    ) -> Span:
        """Start a span named ``name`` (OTel HTTP convention: ``"{method} {route}"``).

        ``parent`` is an extracted remote context, a local :class:`Span`, or ``None`` for a
        new trace. ``now`` is the start time in unix nanos (default the clock).
        ``trace_id`` names a new trace (no parent) whose id was drawn already: the proxy's
        express lane draws one, and gives a request it samples to the general path with
        it, so that the sampling decision stays the one drawn.
        """
        if isinstance(parent, Span):
            parent = TraceContext(
                parent.trace_id,
                parent.span_id,
                FLAG_SAMPLED if parent.recording else 0,
                parent.tracestate,
            )
        if parent is None:
            if trace_id is None:
                trace_id = new_trace_id()
            parent_span_id = None
            tracestate: tuple[tuple[str, str], ...] = ()
        else:
            trace_id = parent.trace_id
            parent_span_id = parent.span_id
            tracestate = parent.tracestate
        recording = self.sampler.should_sample(trace_id, parent)
        return Span(
            name,
            trace_id=trace_id,
            span_id=new_span_id(),
            parent_span_id=parent_span_id,
            kind=kind,
            start_ns=time.time_ns() if now is None else now,
            recording=recording,
            tracestate=tracestate,
            attributes=dict(attributes) if (attributes and recording) else None,
            exporters=self._exporters,
        )

    @staticmethod
    def extract(headers: Iterable[tuple[bytes, bytes]]) -> TraceContext | None:
        """The caller's context from request fields (lower-case names), or ``None``.

        More than one ``traceparent`` field is treated as invalid (the value would be
        ambiguous); ``tracestate`` lines are combined, and only read when ``traceparent``
        is valid (W3C Trace Context §3.3: without a valid traceparent, tracestate is
        ignored).
        """
        traceparent: bytes | None = None
        states: list[bytes] = []
        for name, value in headers:
            if name == b"traceparent":
                if traceparent is not None:
                    return None
                traceparent = value
            elif name == b"tracestate":
                states.append(value)
        if traceparent is None:
            return None
        ctx = parse_traceparent(traceparent)
        if ctx is None or not states:
            return ctx
        return TraceContext(
            ctx.trace_id, ctx.span_id, ctx.flags, parse_tracestate(states), remote=True
        )

    @staticmethod
    def inject(ctx: TraceContext | Span) -> list[tuple[bytes, bytes]]:
        """Fields to send upstream: ``traceparent`` and, when non-empty, ``tracestate``
        (the W3C spec: vendors SHOULD avoid sending an empty tracestate). Only the sampled
        flag is propagated; other flag bits are reserved in version 00."""
        # Formatted here rather than via format_traceparent(ctx): injecting a Span is on
        # every request's path, and building a frozen TraceContext first costs more than
        # the formatting itself.
        if isinstance(ctx, Span):
            trace_id, span_id, state = ctx.trace_id, ctx.span_id, ctx.tracestate
            flags = b"01" if ctx.recording else b"00"
        else:
            trace_id, span_id, state = ctx.trace_id, ctx.span_id, ctx.tracestate
            flags = b"01" if ctx.flags & FLAG_SAMPLED else b"00"
        out = [(b"traceparent", b"00-%s-%s-%s" % (trace_id.encode(), span_id.encode(), flags))]
        if state:
            out.append((b"tracestate", format_tracestate(state).encode("ascii")))
        return out
