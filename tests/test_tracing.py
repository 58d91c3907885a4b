"""The tracer (sampling, spans, propagation) and span export: the in-memory sink and
OTLP/HTTP JSON against a real local receiver."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fastedge.observe.metrics import Metrics
from fastedge.observe.otlp import (
    DROPPED_TOTAL,
    EXPORTED_TOTAL,
    InMemorySink,
    OTLPExporter,
    encode_spans,
)
from fastedge.observe.tracecontext import TraceContext, parse_traceparent
from fastedge.observe.tracing import (
    ATTR_HTTP_METHOD,
    ATTR_HTTP_ROUTE,
    ATTR_HTTP_STATUS,
    ATTR_UPSTREAM_TARGET,
    ATTR_URL_PATH,
    AlwaysOff,
    AlwaysOn,
    ParentBased,
    Span,
    SpanKind,
    StatusCode,
    TraceIdRatio,
    Tracer,
)
from tests.conftest import free_port
from tests.otlp_receiver import Receiver

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"


class ListExporter:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    def export(self, span: Span) -> None:
        self.spans.append(span)


# -- sampling --------------------------------------------------------------------------------


def test_trace_id_ratio_uses_the_low_64_bits_like_otel() -> None:
    half = TraceIdRatio(0.5)
    assert half.bound == 1 << 63
    assert half.should_sample("f" * 16 + "0" * 15 + "1", None)
    assert half.should_sample("0" * 16 + "7fffffffffffffff", None)
    assert not half.should_sample("0" * 16 + "8000000000000000", None)
    assert not TraceIdRatio(0.0).should_sample("0" * 31 + "1", None)
    assert TraceIdRatio(1.0).should_sample("f" * 32, None)
    with pytest.raises(ValueError):
        TraceIdRatio(1.5)


def test_trace_id_ratio_samples_about_its_ratio() -> None:
    tracer = Tracer(ParentBased(TraceIdRatio(0.25)))
    sampled = sum(tracer.start_span("x").recording for _ in range(4000))
    assert 800 < sampled < 1200  # 1000 expected; this band is > 8 standard deviations


def test_parent_based_follows_the_parent_flag() -> None:
    tracer = Tracer(ParentBased(AlwaysOff()))
    assert tracer.start_span("a", TraceContext(TID, SID, 1)).recording
    assert not tracer.start_span("a", TraceContext(TID, SID, 0)).recording
    assert not tracer.start_span("root").recording
    on = Tracer(ParentBased(AlwaysOn()))
    assert not on.start_span("a", TraceContext(TID, SID, 0)).recording
    assert on.start_span("root").recording


# -- spans -----------------------------------------------------------------------------------


def test_server_span_continues_the_callers_trace_and_exports_on_end() -> None:
    out = ListExporter()
    tracer = Tracer(ParentBased(AlwaysOff()), out)
    parent = parse_traceparent(f"00-{TID}-{SID}-01")
    span = tracer.start_span(
        "GET /api/users",
        parent,
        attributes={ATTR_HTTP_METHOD: "GET", ATTR_URL_PATH: "/api/users/1"},
        now=1_000,
    )
    assert (span.trace_id, span.parent_span_id, span.kind) == (TID, SID, SpanKind.SERVER)
    span.set_attribute(ATTR_HTTP_ROUTE, "/api/users")
    span.set_attributes({ATTR_HTTP_STATUS: 200})
    span.end(now=5_000)
    span.end(now=9_000)  # second end: ignored, exported once
    assert out.spans == [span]
    assert span.end_ns == 5_000 and span.ended
    assert span.attributes == {
        ATTR_HTTP_METHOD: "GET",
        ATTR_URL_PATH: "/api/users/1",
        ATTR_HTTP_ROUTE: "/api/users",
        ATTR_HTTP_STATUS: 200,
    }


def test_child_span_of_a_local_span() -> None:
    out = ListExporter()
    tracer = Tracer(exporter=out)
    root = tracer.start_span("GET /")
    child = tracer.start_span("upstream", root, kind=SpanKind.CLIENT)
    assert child.trace_id == root.trace_id and child.parent_span_id == root.span_id
    assert child.span_id != root.span_id
    child.set_status(StatusCode.ERROR, "connect refused")
    child.end()
    root.end()
    assert [s.name for s in out.spans] == ["upstream", "GET /"]
    assert child.status_message == "connect refused"
    root.set_status(StatusCode.OK, "ignored for non-error")
    assert root.status_message == ""


def test_unsampled_span_propagates_but_records_nothing() -> None:
    out = ListExporter()
    tracer = Tracer(ParentBased(AlwaysOff()), out)
    span = tracer.start_span("GET /", attributes={"a": 1})
    span.set_attribute("b", 2)
    span.end()
    assert out.spans == [] and span.attributes == {}
    headers = tracer.inject(span)
    ctx = parse_traceparent(headers[0][1])
    assert ctx is not None and not ctx.sampled and ctx.span_id == span.span_id


def test_a_failing_exporter_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def export(self, span: Span) -> None:
            raise RuntimeError("boom")

    good = ListExporter()
    tracer = Tracer(exporter=[Broken(), good])
    span = tracer.start_span("x")
    span.end()
    assert good.spans == [span]
    assert "span exporter" in caplog.text


# -- propagation -----------------------------------------------------------------------------


def test_extract_and_inject_round_trip_with_tracestate() -> None:
    headers = [
        (b"host", b"x"),
        (b"traceparent", f"00-{TID}-{SID}-01".encode()),
        (b"tracestate", b"rojo=00f067aa0ba902b7"),
        (b"tracestate", b"congo=t61rcWkgMzE,BAD=1"),
    ]
    ctx = Tracer.extract(headers)
    assert ctx is not None and ctx.remote
    assert ctx.tracestate == (("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE"))
    tracer = Tracer(exporter=ListExporter())
    span = tracer.start_span("GET /", ctx)
    out = tracer.inject(span)
    assert out == [
        (b"traceparent", f"00-{TID}-{span.span_id}-01".encode()),
        (b"tracestate", b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
    ]


def test_extract_rejects_missing_invalid_and_repeated_traceparent() -> None:
    assert Tracer.extract([(b"tracestate", b"a=1")]) is None
    assert Tracer.extract([(b"traceparent", b"garbage"), (b"tracestate", b"a=1")]) is None
    tp = f"00-{TID}-{SID}-01".encode()
    assert Tracer.extract([(b"traceparent", tp), (b"traceparent", tp)]) is None


def test_inject_sends_no_empty_tracestate_and_only_the_sampled_flag() -> None:
    out = Tracer.inject(TraceContext(TID, SID, 0xFF))
    assert out == [(b"traceparent", f"00-{TID}-{SID}-01".encode())]


# -- OTLP JSON encoding ------------------------------------------------------------------------


def test_encode_spans_follows_the_otlp_json_mapping() -> None:
    tracer = Tracer(exporter=ListExporter())
    parent = TraceContext(TID, SID, 1, (("a", "1"),))
    span = tracer.start_span("GET /x", parent, now=1_700_000_000_000_000_000)
    span.set_attributes({"s": "v", "i": 7, "f": 0.5, "b": True})
    span.set_status(StatusCode.ERROR, "bad gateway")
    span.end(now=1_700_000_000_000_000_123)
    doc = orjson.loads(encode_spans([span], "svc", {"deployment.environment": "test"}))
    rs = doc["resourceSpans"][0]
    assert {"key": "service.name", "value": {"stringValue": "svc"}} in rs["resource"]["attributes"]
    out = rs["scopeSpans"][0]["spans"][0]
    assert out["traceId"] == TID and out["parentSpanId"] == SID and out["spanId"] == span.span_id
    assert out["kind"] == 2 and out["traceState"] == "a=1"
    assert out["startTimeUnixNano"] == "1700000000000000000"
    assert out["endTimeUnixNano"] == "1700000000000000123"
    assert out["status"] == {"code": 2, "message": "bad gateway"}
    assert out["attributes"] == [
        {"key": "s", "value": {"stringValue": "v"}},
        {"key": "i", "value": {"intValue": "7"}},
        {"key": "f", "value": {"doubleValue": 0.5}},
        {"key": "b", "value": {"boolValue": True}},
    ]


def test_in_memory_sink_keeps_the_most_recent_spans() -> None:
    sink = InMemorySink(maxlen=3)
    tracer = Tracer(exporter=sink)
    spans = [tracer.start_span(f"s{i}", now=0) for i in range(5)]
    for s in spans:
        s.end(now=2_000_000)
    assert [s.name for s in sink.spans()] == ["s2", "s3", "s4"]
    recent = sink.recent(limit=2)
    assert [d["name"] for d in recent] == ["s4", "s3"]
    assert recent[0]["duration_ms"] == 2.0 and recent[0]["kind"] == "server"
    assert sink.recent(trace_id=spans[3].trace_id)[0]["name"] == "s3"
    sink.clear()
    assert len(sink) == 0


# -- OTLP/HTTP against a real receiver -----------------------------------------------------------


async def test_spans_arrive_at_the_receiver_with_ids_links_and_attributes(
    receiver: Receiver,
) -> None:
    metrics = Metrics()
    exporter = OTLPExporter(
        f"http://127.0.0.1:{receiver.port}/v1/traces",
        flush_interval=0.02,
        service_name="edge-test",
        metrics=metrics,
    )
    tracer = Tracer(ParentBased(AlwaysOn()), exporter)
    parent = Tracer.extract([(b"traceparent", f"00-{TID}-{SID}-01".encode())])
    server_span = tracer.start_span("GET /api/users", parent, attributes={ATTR_HTTP_METHOD: "GET"})
    client_span = tracer.start_span("upstream users", server_span, kind=SpanKind.CLIENT)
    client_span.set_attribute(ATTR_UPSTREAM_TARGET, "127.0.0.1:9001")
    client_span.end()
    server_span.set_attribute(ATTR_HTTP_STATUS, 200)
    server_span.end()
    await asyncio.wait_for(receiver.arrived.wait(), 5)  # the interval flush, not aclose
    await exporter.aclose()

    assert receiver.content_types == [b"application/json"]
    doc = receiver.requests[0]
    resource = doc["resourceSpans"][0]["resource"]["attributes"]
    assert {"key": "service.name", "value": {"stringValue": "edge-test"}} in resource
    by_name = {s["name"]: s for s in receiver.spans()}
    assert set(by_name) == {"GET /api/users", "upstream users"}
    srv, cli = by_name["GET /api/users"], by_name["upstream users"]
    assert srv["traceId"] == cli["traceId"] == TID
    assert srv["parentSpanId"] == SID and srv["spanId"] == server_span.span_id
    assert cli["parentSpanId"] == srv["spanId"] and cli["kind"] == 3 and srv["kind"] == 2
    assert {"key": "http.response.status_code", "value": {"intValue": "200"}} in srv["attributes"]
    assert {
        "key": "fastedge.upstream.target",
        "value": {"stringValue": "127.0.0.1:9001"},
    } in cli["attributes"]
    assert int(srv["endTimeUnixNano"]) >= int(srv["startTimeUnixNano"])
    assert exporter.exported == 2 and exporter.dropped == 0
    assert f"{EXPORTED_TOTAL} 2" in metrics.render().decode()


async def test_full_batches_are_sent_without_waiting_for_the_interval(
    receiver: Receiver,
) -> None:
    exporter = OTLPExporter(
        f"http://127.0.0.1:{receiver.port}/v1/traces", max_batch=5, flush_interval=3600
    )
    tracer = Tracer(exporter=exporter)
    for i in range(12):
        tracer.start_span(f"s{i}").end()
    while len(receiver.requests) < 2:
        receiver.arrived.clear()
        await asyncio.wait_for(receiver.arrived.wait(), 5)
    await exporter.aclose()
    assert [len(d["resourceSpans"][0]["scopeSpans"][0]["spans"]) for d in receiver.requests] == [
        5,
        5,
        2,
    ]
    assert [s["name"] for s in receiver.spans()] == [f"s{i}" for i in range(12)]


async def test_retryable_status_is_retried_then_delivered(receiver: Receiver) -> None:
    receiver.script = [(503, [("retry-after", "0")], b""), (429, [], b"")]
    exporter = OTLPExporter(
        f"http://127.0.0.1:{receiver.port}/v1/traces", flush_interval=3600, backoff=0.001
    )
    Tracer(exporter=exporter).start_span("retried").end()
    await exporter.aclose()
    assert receiver.attempts == 3
    assert [s["name"] for s in receiver.spans()] == ["retried"]
    assert exporter.exported == 1 and exporter.dropped == 0


async def test_connection_closed_while_idle_is_reopened_without_a_retry(
    receiver: Receiver,
) -> None:
    receiver.close_after_response = True
    exporter = OTLPExporter(
        f"http://127.0.0.1:{receiver.port}/v1/traces", flush_interval=3600, max_retries=0
    )
    tracer = Tracer(exporter=exporter)
    tracer.start_span("first").end()
    await exporter.force_flush()
    tracer.start_span("second").end()
    await exporter.aclose()
    assert [s["name"] for s in receiver.spans()] == ["first", "second"]
    assert exporter.dropped == 0 and receiver.connections == 2


async def test_keep_alive_connection_is_reused(receiver: Receiver) -> None:
    exporter = OTLPExporter(f"http://127.0.0.1:{receiver.port}/v1/traces", flush_interval=3600)
    tracer = Tracer(exporter=exporter)
    for name in ("a", "b", "c"):
        tracer.start_span(name).end()
        await exporter.force_flush()
    await exporter.aclose()
    assert receiver.attempts == 3 and receiver.connections == 1


async def test_permanent_error_drops_the_batch_without_retry(receiver: Receiver) -> None:
    receiver.script = [(400, [], b'{"message": "bad"}')]
    metrics = Metrics()
    exporter = OTLPExporter(
        f"http://127.0.0.1:{receiver.port}/v1/traces",
        flush_interval=3600,
        backoff=0.001,
        metrics=metrics,
    )
    tracer = Tracer(exporter=exporter)
    tracer.start_span("a").end()
    tracer.start_span("b").end()
    await exporter.aclose()
    assert receiver.attempts == 1 and exporter.dropped == 2
    assert f'{DROPPED_TOTAL}{{reason="export_failed"}} 2' in metrics.render().decode()


async def test_partial_success_counts_rejected_spans(receiver: Receiver) -> None:
    receiver.script = [(200, [], b'{"partialSuccess": {"rejectedSpans": "1"}}')]
    exporter = OTLPExporter(f"http://127.0.0.1:{receiver.port}/v1/traces", flush_interval=3600)
    tracer = Tracer(exporter=exporter)
    tracer.start_span("a").end()
    tracer.start_span("b").end()
    await exporter.aclose()
    assert exporter.exported == 1 and exporter.dropped == 1


async def test_receiver_down_drops_and_counts_never_raises() -> None:
    metrics = Metrics()
    exporter = OTLPExporter(
        f"http://127.0.0.1:{free_port()}/v1/traces",
        flush_interval=0.01,
        max_retries=2,
        backoff=0.001,
        metrics=metrics,
    )
    tracer = Tracer(exporter=exporter)
    for i in range(3):
        span = tracer.start_span(f"s{i}")
        span.end()  # never raises, never awaits
    await exporter.force_flush()
    await exporter.aclose()
    assert exporter.dropped == 3 and exporter.exported == 0
    assert f'{DROPPED_TOTAL}{{reason="export_failed"}} 3' in metrics.render().decode()


async def test_full_queue_drops_and_counts() -> None:
    metrics = Metrics()
    exporter = OTLPExporter(
        f"http://127.0.0.1:{free_port()}/v1/traces",
        max_queue=3,
        flush_interval=3600,
        max_retries=0,
        metrics=metrics,
    )
    tracer = Tracer(exporter=exporter)
    for i in range(5):
        tracer.start_span(f"s{i}").end()  # synchronous: the sender has not run yet
    assert exporter.queued == 3 and exporter.dropped == 2
    text = metrics.render().decode()
    assert f'{DROPPED_TOTAL}{{reason="queue_full"}} 2' in text
    assert "fastedge_trace_export_queue_spans 3" in text
    await exporter.aclose()
    assert exporter.dropped == 5  # the 3 queued failed to send (receiver down)
    assert "fastedge_trace_export_queue_spans" not in metrics.render().decode()
    # after close: refused and counted, still no exception
    tracer.start_span("late").end()
    assert exporter.dropped == 6


def test_export_outside_a_loop_only_queues() -> None:
    exporter = OTLPExporter(flush_interval=3600)
    Tracer(exporter=exporter).start_span("x").end()
    assert exporter.queued == 1


def test_exporter_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        OTLPExporter("ftp://collector/v1/traces")
    with pytest.raises(ValueError):
        OTLPExporter(max_queue=0)
    with pytest.raises(ValueError):
        OTLPExporter(flush_interval=0)
