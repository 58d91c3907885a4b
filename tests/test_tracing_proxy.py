"""Tracing through the real proxy: W3C propagation, spans, admin /traces, OTLP export."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fastedge.config import parse_config
from fastedge.observe.tracecontext import parse_traceparent
from fastedge.server import ProxyServer
from tests.conftest import Client, get
from tests.otlp_receiver import Receiver

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def traced_config(origin: int, engine: str, tracing: dict[str, Any], **server: Any) -> Any:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False, **server},
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin}"]}},
            "routes": [{"prefix": "/api", "upstream": "o", "rewrite": "/echo", "name": "api"}],
            "tracing": tracing,
        }
    )


async def echo(port: int, extra: str = "") -> dict[str, Any]:
    client = await Client.open(port)
    try:
        await client.send(get("/api/x", extra=extra))
        resp = await client.read_response()
        assert resp.status == 200
        doc: dict[str, Any] = json.loads(resp.body)
        return doc
    finally:
        await client.close()


def upstream_traceparent(doc: dict[str, Any]) -> str:
    values = [v for n, v in doc["headers"] if n.lower() == "traceparent"]
    assert len(values) == 1, values
    return str(values[0])


async def test_caller_trace_is_continued_and_recorded(
    origin_port: int, engine_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    server = ProxyServer(
        traced_config(origin_port, engine_name, {"sample_ratio": 0.0}, access_log=str(log)),
        admin_token="t",
    )
    await server.start()
    try:
        doc = await echo(server.port, f"traceparent: {CALLER}\r\ntracestate: vendor=1\r\n")
        sent = parse_traceparent(upstream_traceparent(doc))
        assert sent is not None and sent.sampled  # the caller's sampled flag is followed
        assert sent.trace_id == CALLER.split("-")[1]
        assert sent.span_id != CALLER.split("-")[2]  # our span is the upstream's parent
        assert [v for n, v in doc["headers"] if n.lower() == "tracestate"] == ["vendor=1"]
        assert server.tracing is not None and server.tracing.sink is not None
        spans = {s["name"]: s for s in server.tracing.sink.recent(10)}
        assert set(spans) == {"GET api", "fastedge.upstream"}
        span, client = spans["GET api"], spans["fastedge.upstream"]
        # the upstream's parent is our CLIENT span, a child of our SERVER span
        assert client["trace_id"] == sent.trace_id and client["span_id"] == sent.span_id
        assert client["parent_span_id"] == span["span_id"]
        assert span["trace_id"] == sent.trace_id
        assert span["parent_span_id"] == CALLER.split("-")[2]
        attrs = span["attributes"]
        assert attrs["http.route"] == "api" and attrs["http.response.status_code"] == 200
        assert attrs["url.path"] == "/api/x" and attrs["http.request.method"] == "GET"
        # the admin API lists it
        admin = await Client.open(server.admin_port or 0)
        await admin.send(get("/traces?limit=5", extra="Authorization: Bearer t\r\n"))
        listed = json.loads((await admin.read_response()).body)["spans"]
        assert sorted(s["span_id"] for s in listed) == sorted([span["span_id"], client["span_id"]])
        await admin.close()
    finally:
        await server.shutdown(drain_timeout=1)
    # every access-log line carries the trace id
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["trace_id"] == CALLER.split("-")[1]


async def test_unsampled_requests_propagate_but_record_nothing(
    origin_port: int, engine_name: str
) -> None:
    server = ProxyServer(traced_config(origin_port, engine_name, {"sample_ratio": 0.0}))
    await server.start()
    try:
        doc = await echo(server.port)
        sent = parse_traceparent(upstream_traceparent(doc))
        assert sent is not None and not sent.sampled
        assert server.tracing is not None and server.tracing.sink is not None
        assert server.tracing.sink.recent(10) == []
    finally:
        await server.shutdown(drain_timeout=1)


async def test_spans_are_exported_over_otlp(
    origin_port: int,
    engine_name: str,
    receiver: Receiver,
) -> None:
    endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
    server = ProxyServer(
        traced_config(origin_port, engine_name, {"sample_ratio": 1.0, "otlp_endpoint": endpoint})
    )
    await server.start()
    try:
        doc = await echo(server.port)
        trace_id = upstream_traceparent(doc).split("-")[1]
    finally:
        await server.shutdown(drain_timeout=1)  # flushes the exporter
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    spans = {s["name"]: s for s in receiver.spans()}
    assert set(spans) == {"GET api", "fastedge.upstream"}  # flushed together at shutdown
    assert spans["GET api"]["traceId"] == trace_id
    assert spans["fastedge.upstream"]["parentSpanId"] == spans["GET api"]["spanId"]


async def test_without_tracing_no_traceparent_is_added(origin_port: int, engine_name: str) -> None:
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine_name, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "routes": [{"prefix": "/api", "upstream": "o", "rewrite": "/echo"}],
        }
    )
    server = ProxyServer(config)
    await server.start()
    try:
        doc = await echo(server.port, f"traceparent: {CALLER}\r\n")
        # no tracer: the caller's header passes through untouched
        assert upstream_traceparent(doc) == CALLER
    finally:
        await server.shutdown(drain_timeout=1)
