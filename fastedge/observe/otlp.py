"""Span export: OTLP/HTTP with JSON encoding, and an in-memory sink for the admin API.

Why JSON and not protobuf: the OTLP specification (https://opentelemetry.io/docs/specs/otlp/
"OTLP/HTTP") allows either ``application/x-protobuf`` or ``application/json`` request
bodies, the latter in the proto3 JSON mapping with two OTLP-specific rules — trace and
span ids are hex strings (not base64) and enum fields are integers. Every OpenTelemetry
Collector and the major backends accept it on ``/v1/traces``. JSON lets fastedge export
with what it already depends on (``orjson`` to encode, ``h11`` for HTTP) instead of adding
``opentelemetry-proto`` and ``protobuf``; the price is a larger body (about 2x), which at
one POST per second (or per 512 spans) does not matter.

Export never slows or fails a request: :meth:`OTLPExporter.export` hands the span to a
:class:`~fastedge.batching.RequestBatcher` with ``put_nowait`` (O(1), no I/O, no await, no
future) and drops it — counting it in ``fastedge_trace_spans_dropped_total`` — when
``max_queue`` spans are already held. The batcher sends batches by size and time, one POST
at a time; failures are retried when the spec says so and then dropped and counted, and
never surface in the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import h11
import orjson

from fastedge.batching import BatcherClosed, BatcherFull, RequestBatcher
from fastedge.observe.metrics import MetricFamily
from fastedge.observe.tracing import AttributeValue, Span

if TYPE_CHECKING:
    from fastedge.observe.metrics import Metrics

__all__ = [
    "DROPPED_TOTAL",
    "EXPORTED_TOTAL",
    "InMemorySink",
    "OTLPExporter",
    "encode_spans",
    "span_to_dict",
    "span_to_otlp",
]

logger = logging.getLogger(__name__)

DROPPED_TOTAL = "fastedge_trace_spans_dropped_total"
EXPORTED_TOTAL = "fastedge_trace_spans_exported_total"
QUEUE_GAUGE = "fastedge_trace_export_queue_spans"

# OTLP spec, "OTLP/HTTP Throttling" and "Failures": 429, 502, 503 and 504 are retryable
# (503/429 may carry Retry-After); every other 4xx/5xx is permanent, so the batch is dropped.
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_MAX_RESPONSE_BODY = 64 * 1024  # an OTLP response is tiny (a partialSuccess at most)
_MAX_RETRY_AFTER = 30.0  # cap a server's Retry-After so aclose() stays bounded

_SCOPE = {"name": "fastedge", "version": "0.1.0"}


def _any_value(value: AttributeValue) -> dict[str, Any]:
    # OTLP JSON: AnyValue is a oneof; int64 is a decimal string in the proto3 JSON mapping.
    # bool first: bool is a subclass of int.
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


def _attributes(attrs: Mapping[str, AttributeValue]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _any_value(v)} for k, v in attrs.items()]


def span_to_otlp(span: Span) -> dict[str, Any]:
    """One finished span as an OTLP JSON ``Span`` object (opentelemetry-proto
    ``trace/v1/trace.proto``; ids as lower-case hex, times as decimal strings)."""
    out: dict[str, Any] = {
        "traceId": span.trace_id,
        "spanId": span.span_id,
        "name": span.name,
        "kind": int(span.kind),
        "startTimeUnixNano": str(span.start_ns),
        "endTimeUnixNano": str(span.end_ns if span.end_ns is not None else span.start_ns),
        "attributes": _attributes(span.attributes),
        "status": {"code": int(span.status_code)},
    }
    if span.parent_span_id is not None:
        out["parentSpanId"] = span.parent_span_id
    if span.tracestate:
        out["traceState"] = ",".join(f"{k}={v}" for k, v in span.tracestate)
    if span.status_message:
        out["status"]["message"] = span.status_message
    return out


def encode_spans(
    spans: Iterable[Span],
    service_name: str = "fastedge",
    resource_attributes: Mapping[str, AttributeValue] | None = None,
) -> bytes:
    """An ``ExportTraceServiceRequest`` body in OTLP JSON: one resource (``service.name``
    plus ``resource_attributes``), one instrumentation scope, the spans."""
    resource = {"service.name": service_name, **(resource_attributes or {})}
    doc = {
        "resourceSpans": [
            {
                "resource": {"attributes": _attributes(resource)},
                "scopeSpans": [{"scope": _SCOPE, "spans": [span_to_otlp(s) for s in spans]}],
            }
        ]
    }
    return orjson.dumps(doc)


def span_to_dict(span: Span) -> dict[str, Any]:
    """A flat, readable form of a span for the admin API (``GET /traces``)."""
    end = span.end_ns if span.end_ns is not None else span.start_ns
    return {
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id,
        "name": span.name,
        "kind": span.kind.name.lower(),
        "start_unix_nano": span.start_ns,
        "duration_ms": round((end - span.start_ns) / 1e6, 3),
        "status": span.status_code.name.lower(),
        "attributes": dict(span.attributes),
    }


class InMemorySink:
    """Keeps the ``maxlen`` most recent finished spans (a bounded deque) — the demo's
    trace store behind admin ``GET /traces``. ``export`` is O(1) and never blocks."""

    __slots__ = ("_spans",)

    def __init__(self, maxlen: int = 1000) -> None:
        self._spans: deque[Span] = deque(maxlen=maxlen)

    def export(self, span: Span) -> None:
        """Store ``span``, evicting the oldest when full."""
        self._spans.append(span)

    def spans(self) -> list[Span]:
        """Stored spans, oldest first."""
        return list(self._spans)

    def recent(self, limit: int = 100, trace_id: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` most recent spans (newest first) as dicts, optionally only one
        trace's."""
        out: list[dict[str, Any]] = []
        for span in reversed(self._spans):
            if trace_id is not None and span.trace_id != trace_id:
                continue
            out.append(span_to_dict(span))
            if len(out) >= limit:
                break
        return out

    def clear(self) -> None:
        """Forget every stored span."""
        self._spans.clear()

    def __len__(self) -> int:
        return len(self._spans)


class _ExportFailed(Exception):
    def __init__(self, reason: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class _HTTPClient:
    """One keep-alive HTTP/1.1 connection to the collector, spoken with h11.

    Reconnects when the server closed the connection or anything went wrong; a request
    that failed is never resent on the same connection.
    """

    def __init__(self, endpoint: str, timeout: float) -> None:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"OTLP endpoint must be an http(s) URL, not {endpoint!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.tls = url.scheme == "https"
        self.target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal
        default_port = 443 if self.tls else 80
        self.authority = host if self.port == default_port else f"{host}:{self.port}"
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn: h11.Connection | None = None

    async def post(
        self, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """POST ``body``; return (status, headers, body). Raises OSError, TimeoutError or
        h11 errors; the connection is closed on any of them.

        A kept-alive connection may have been closed by the collector while idle (its
        keep-alive timeout); that failure is not the collector's answer, so the request
        is tried once more on a new connection before anything counts as a failure.
        """
        reused = self._conn is not None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await self._post(body, headers)
                except (OSError, h11.ProtocolError):
                    if not reused:
                        raise
                    await self.aclose()
                    return await self._post(body, headers)
        except BaseException:
            await self.aclose()
            raise

    async def _post(
        self, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if self._conn is None or self._writer is None or self._reader is None:
            ctx = ssl.create_default_context() if self.tls else None
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, ssl=ctx, server_hostname=self.host if ctx else None
            )
            self._conn = h11.Connection(h11.CLIENT)
        conn, reader, writer = self._conn, self._reader, self._writer
        request = h11.Request(
            method="POST",
            target=self.target,
            headers=[
                ("host", self.authority),
                ("content-length", str(len(body))),
                *headers,
            ],
        )
        writer.write(conn.send(request) or b"")
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        status = 0
        resp_headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)  # b"" means EOF; h11 then reports it
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = list(event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size <= _MAX_RESPONSE_BODY:
                    chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("collector closed the connection mid-response")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()  # "Connection: close" or similar: open anew next time
        return status, resp_headers, b"".join(chunks)

    async def aclose(self) -> None:
        """Close the connection (if any)."""
        writer = self._writer
        self._reader = self._writer = None
        self._conn = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    # RFC 9110 §10.2.3: delay-seconds or an HTTP-date; collectors send seconds. A date is
    # treated as "no hint" and the exponential backoff applies.
    for name, value in headers:
        if name == b"retry-after":
            try:
                return min(max(float(value), 0.0), _MAX_RETRY_AFTER)
            except ValueError:
                return None
    return None


class OTLPExporter:
    """Export finished spans to an OTLP/HTTP endpoint as JSON, in the background.

    Batching is a :class:`~fastedge.batching.RequestBatcher` fed fire-and-forget
    (``put_nowait``), with ``max_in_flight=1``: one POST at a time on the one keep-alive
    connection, and while it is out the next batch keeps filling.

    * ``export(span)``: synchronous, O(1), never blocks or raises; drops (and counts) when
      ``max_queue`` spans are already held (waiting or being sent). Defaults follow the
      OpenTelemetry SDK's BatchSpanProcessor (``maxQueueSize`` 2048,
      ``maxExportBatchSize`` 512); ``flush_interval`` is 1 s rather than the SDK's 5 s so
      the demo's collector shows requests promptly.
    * a batch is sent when ``max_batch`` spans are queued or its first span has waited
      ``flush_interval``; each POST has ``timeout`` seconds; 429/502/503/504 and connection
      errors are retried ``max_retries`` times with exponential backoff (``backoff * 2**n``,
      full jitter, honouring ``Retry-After``), as the OTLP spec asks; then the batch is
      dropped.
    * ``metrics`` (optional) receives ``fastedge_trace_spans_dropped_total{reason}``,
      ``fastedge_trace_spans_exported_total`` and the queue-length gauge.
    * ``force_flush()`` sends what is held now and waits for it; ``aclose()`` also stops
      accepting spans and closes the connection. Cancelling either stops the wait only:
      the spans still go out (or are counted as dropped).

    Every span handed to ``export`` ends up in ``exported`` or ``dropped`` (or is still
    ``queued``). Spans exported before any event loop runs are held (within
    ``max_queue``) until the first ``export`` inside a running loop, :meth:`start`,
    :meth:`force_flush` or :meth:`aclose`.
    """

    def __init__(
        self,
        endpoint: str = "http://127.0.0.1:4318/v1/traces",
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
        flush_interval: float = 1.0,
        timeout: float = 2.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        service_name: str = "fastedge",
        resource_attributes: Mapping[str, AttributeValue] | None = None,
        headers: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        if flush_interval <= 0 or timeout <= 0:
            raise ValueError("flush_interval and timeout must be positive")
        self._client = _HTTPClient(endpoint, timeout)
        self.endpoint = endpoint
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.flush_interval = flush_interval
        self.max_retries = max_retries
        self.backoff = backoff
        self.service_name = service_name
        self.resource_attributes = dict(resource_attributes or {})
        self._headers = [("content-type", "application/json"), *(headers or {}).items()]
        # on_full="error" is moot (put_nowait never waits); max_in_flight=1 because there
        # is one connection, and so a slow collector gets fewer, fuller batches.
        self._batcher: RequestBatcher[Span, None] = RequestBatcher(
            self._export_batch,
            max_batch=max_batch,
            max_wait=flush_interval,
            max_queued=max_queue,
            on_full="error",
            max_in_flight=1,
        )
        self._started = False  # bound to a running loop: export() goes to the batcher
        self._early: list[Span] = []  # exported before any loop ran; moved in by start()
        self._closing = False
        self.metrics = metrics
        self.dropped = 0
        """Spans dropped for any reason (also counted in ``metrics``)."""
        self.exported = 0
        """Spans the collector accepted."""
        if metrics is not None:
            metrics.describe(
                DROPPED_TOTAL,
                "counter",
                "Finished spans not exported, by reason "
                "(queue_full, closed, export_failed, rejected, cancelled).",
            )
            metrics.describe(EXPORTED_TOTAL, "counter", "Spans accepted by the OTLP endpoint.")
            metrics.add_collector(self._collect)

    # -- request path ---------------------------------------------------------------------------

    def export(self, span: Span) -> None:
        """Queue ``span`` for export; drop and count it when ``max_queue`` spans are held
        or the exporter is closing. Never blocks, never raises."""
        if not self._started:
            self._export_unstarted(span)
            return
        try:
            self._batcher.put_nowait(span)
        except BatcherFull:
            self._drop(1, "queue_full")
        except BatcherClosed:
            self._drop(1, "closed")
        except RuntimeError:
            # No running loop in this thread (a span ended after the loop stopped): the
            # loop that sends is gone, as good as closed.
            self._drop(1, "closed")

    @property
    def queued(self) -> int:
        """Spans held for export: waiting for their batch or being sent (at most
        ``max_queue``)."""
        return len(self._early) + self._batcher.outstanding

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind to the running event loop (``RuntimeError`` without one) and queue the
        spans exported before it ran. Idempotent; called by the first ``export`` made
        inside a running loop."""
        if self._started:
            return
        asyncio.get_running_loop()
        self._started = True
        early, self._early = self._early, []
        for span in early:  # they fit: the batcher is empty and len(early) <= max_queue
            self.export(span)

    async def force_flush(self) -> None:
        """Send every span held now (in batches of ``max_batch``) and return once each
        is exported or dropped."""
        self.start()
        await self._batcher.flush()

    async def aclose(self) -> None:
        """Stop accepting spans, send what is held, and close the connection.
        Idempotent; never raises for export failures (they are counted)."""
        self.start()  # spans held from before the loop go out too
        self._closing = True
        await self._batcher.aclose()
        await self._client.aclose()
        if self.metrics is not None:
            with contextlib.suppress(ValueError):
                self.metrics.remove_collector(self._collect)

    # -- internals --------------------------------------------------------------------------------

    def _export_unstarted(self, span: Span) -> None:
        if self._closing:
            self._drop(1, "closed")
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # No loop yet (spans ended during startup): hold the span, bounded like the
            # queue, until the exporter is started.
            if len(self._early) >= self.max_queue:
                self._drop(1, "queue_full")
            else:
                self._early.append(span)
            return
        self.start()
        self.export(span)

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self.metrics is not None:
            self.metrics.inc(DROPPED_TOTAL, (("reason", reason),), n)

    def _collect(self) -> list[MetricFamily]:
        return [
            MetricFamily(
                QUEUE_GAUGE,
                "gauge",
                "Finished spans held for export (waiting or being sent).",
                [(QUEUE_GAUGE, (), self.queued)],
            )
        ]

    async def _export_batch(self, batch: list[Span]) -> list[None]:
        """The batcher's handler: one POST (with retries). Accounts for every span
        itself — exported or dropped — and never raises but CancelledError."""
        try:
            await self._send(batch)
        except asyncio.CancelledError:
            # Only loop teardown cancels a batch (force_flush/aclose never do): count the
            # spans so that exported + dropped stays exact.
            self._drop(len(batch), "cancelled")
            raise
        except Exception:  # a bug, not an export failure: count the spans, keep going
            logger.exception("OTLP export of %d spans failed unexpectedly", len(batch))
            self._drop(len(batch), "export_failed")
        return [None] * len(batch)

    async def _send(self, batch: list[Span]) -> None:
        body = encode_spans(batch, self.service_name, self.resource_attributes)
        attempt = 0
        while True:
            try:
                await self._post_once(body, len(batch))
                return
            except _ExportFailed as err:
                if not err.retryable or attempt >= self.max_retries:
                    logger.warning(
                        "OTLP export of %d spans to %s failed (%s); dropped",
                        len(batch),
                        self.endpoint,
                        err.reason,
                    )
                    self._drop(len(batch), "export_failed")
                    return
                # Exponential backoff with full jitter (AWS architecture blog); a server's
                # Retry-After wins when present (OTLP spec, "OTLP/HTTP Throttling").
                delay = err.retry_after
                if delay is None:
                    delay = random.uniform(0, self.backoff * (2**attempt))
                attempt += 1
                await asyncio.sleep(delay)

    async def _post_once(self, body: bytes, n: int) -> None:
        try:
            status, headers, resp = await self._client.post(body, self._headers)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            raise _ExportFailed(f"{type(exc).__name__}: {exc}", retryable=True) from exc
        if 200 <= status < 300:
            rejected = min(_rejected_spans(resp), n)
            if rejected:
                # OTLP "Partial Success": the server kept the rest; don't retry.
                self._drop(rejected, "rejected")
            self.exported += n - rejected
            if self.metrics is not None:
                self.metrics.inc(EXPORTED_TOTAL, (), n - rejected)
            return
        raise _ExportFailed(
            f"HTTP {status}",
            retryable=status in RETRYABLE_STATUS,
            retry_after=_retry_after(headers),
        )


def _rejected_spans(body: bytes) -> int:
    # ExportTraceServiceResponse {"partialSuccess": {"rejectedSpans": "3", ...}}; int64 may
    # arrive as a string or a number. Anything unreadable counts as full success.
    if not body:
        return 0
    try:
        doc = orjson.loads(body)
        value = doc.get("partialSuccess", {}).get("rejectedSpans", 0)
        return max(int(value), 0)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0
