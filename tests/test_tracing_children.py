"""Child spans through the real proxy: one per filter (``fastedge.<filter>``) and a CLIENT
span for the upstream call (``fastedge.upstream``), recorded by the in-memory sink."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import jwt
import pytest

from fastedge.observe.tracecontext import parse_traceparent
from fastedge.observe.tracing import Span, SpanKind, StatusCode
from fastedge.server import ProxyServer
from tests.conftest import Client, Response, get

SECRET = "tracing-children-secret-0123456789-abcdefgh"  # >= 32 bytes for HS256
ENV = "FASTEDGE_TRACING_CHILDREN_SECRET"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def config_doc(
    origin: int, batch: int, engine: str, *, ratio: float = 1.0, redis_url: str | None = None
) -> dict[str, Any]:
    limit: dict[str, Any] = {"algorithm": "sliding_window", "limit": 100, "window": "10s"}
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
        "admin": {"enabled": False},
        "upstreams": {
            "o": {"targets": [f"http://127.0.0.1:{origin}"]},
            "slow": {
                "targets": [f"http://127.0.0.1:{origin}"],
                "pool": {"response_timeout": "200ms"},
            },
            "b": {"targets": [f"http://127.0.0.1:{batch}"]},
        },
        "auth": {
            "default": {
                "algorithms": ["HS256"],
                "keys": [{"algorithm": "HS256", "secret_env": ENV}],
            }
        },
        "rate_limits": {"per_ip": limit},
        "routes": [
            {
                "prefix": "/api",
                "upstream": "o",
                "rewrite": "/echo",
                "name": "api",
                "auth": "default",
                "rate_limit": "per_ip",
            },
            {"prefix": "/stall", "upstream": "slow", "name": "stall"},
            {
                "prefix": "/batched",
                "upstream": "b",
                "strip_prefix": True,
                "name": "batched",
                "batch": {"path": f"/batch/ok/{uuid.uuid4().hex}", "max_wait": 0},
            },
            {
                "prefix": "/batchfail",
                "upstream": "b",
                "name": "batchfail",
                "batch": {"path": "/batch/fail/tracing", "max_wait": 0},
            },
        ],
        "tracing": {"sample_ratio": ratio, "memory_spans": 100},
    }
    if redis_url is not None:
        doc["redis"] = {"url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:8]}:"}
        limit["backend"] = "redis"
    return doc


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


def token(sub: str = "alice") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")


async def request(server: ProxyServer, path: str, extra: str = "") -> Response:
    client = await Client.open(server.port)
    try:
        await client.send(get(path, extra=extra))
        return await client.read_response()
    finally:
        await client.close()


async def spans_of(server: ProxyServer, count: int) -> list[Span]:
    """The sink's spans once ``count`` have ended (the server span ends last, as the
    request is logged), oldest first."""
    assert server.tracing is not None and server.tracing.sink is not None
    sink = server.tracing.sink
    deadline = time.monotonic() + 5
    while len(sink) < count:
        assert time.monotonic() < deadline, f"expected {count} spans, got {sink.spans()}"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)  # nothing more may arrive
    return sink.spans()


def by_name(spans: list[Span]) -> dict[str, Span]:
    named = {s.name: s for s in spans}
    assert len(named) == len(spans), [s.name for s in spans]
    return named


async def test_filters_and_the_upstream_call_are_children_of_the_server_span(
    origin_port: int, batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    server = await make_proxy(config_doc(origin_port, batch_port, engine_name))
    caller = f"traceparent: 00-{CALLER_TRACE}-{CALLER_SPAN}-01\r\n"
    resp = await request(server, "/api/x", f"Authorization: Bearer {token()}\r\n{caller}")
    assert resp.status == 200
    spans = by_name(await spans_of(server, 4))
    assert set(spans) == {"GET api", "fastedge.auth", "fastedge.rate_limit", "fastedge.upstream"}
    root = spans["GET api"]
    assert root.kind is SpanKind.SERVER and root.parent_span_id == CALLER_SPAN
    assert {s.trace_id for s in spans.values()} == {CALLER_TRACE}
    assert len({s.span_id for s in spans.values()}) == 4
    for name in ("fastedge.auth", "fastedge.rate_limit"):
        child = spans[name]
        assert child.kind is SpanKind.INTERNAL and child.parent_span_id == root.span_id
        assert child.status_code is StatusCode.UNSET
    up = spans["fastedge.upstream"]
    assert up.kind is SpanKind.CLIENT and up.parent_span_id == root.span_id
    assert up.status_code is StatusCode.UNSET
    assert up.attributes["http.response.status_code"] == 200
    assert up.attributes["server.port"] == origin_port
    # Every child lies within the server span; the filters ran before the upstream call.
    for child in spans.values():
        assert child.end_ns is not None and root.end_ns is not None
        assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns
    assert spans["fastedge.rate_limit"].end_ns <= up.start_ns  # type: ignore[operator]
    # The upstream is told that its parent is the CLIENT span of this attempt.
    sent = [v for n, v in json.loads(resp.body)["headers"] if n.lower() == "traceparent"]
    assert len(sent) == 1
    ctx = parse_traceparent(sent[0])
    assert ctx is not None and ctx.sampled
    assert (ctx.trace_id, ctx.span_id) == (CALLER_TRACE, up.span_id)


async def test_an_async_filter_keeps_the_parents_right(
    origin_port: int, batch_port: int, redis_url: str, make_proxy: Any
) -> None:
    # A Redis-backed limit answers through an awaitable: the rest of the chain then runs
    # in a task, where its child spans must still hang off the server span.
    server = await make_proxy(config_doc(origin_port, batch_port, "fast", redis_url=redis_url))
    resp = await request(server, "/api/x", f"Authorization: Bearer {token()}\r\n")
    assert resp.status == 200
    spans = by_name(await spans_of(server, 4))
    root = spans["GET api"]
    for name in ("fastedge.auth", "fastedge.rate_limit", "fastedge.upstream"):
        assert spans[name].parent_span_id == root.span_id
        assert spans[name].trace_id == root.trace_id
        assert spans[name].status_code is StatusCode.UNSET


async def test_a_401_marks_the_auth_child_as_error(
    origin_port: int, batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    server = await make_proxy(config_doc(origin_port, batch_port, engine_name))
    resp = await request(server, "/api/x")
    assert resp.status == 401
    spans = by_name(await spans_of(server, 2))
    # The chain stopped at auth: no rate-limit span, no upstream call.
    assert set(spans) == {"GET api", "fastedge.auth"}
    auth, root = spans["fastedge.auth"], spans["GET api"]
    assert auth.parent_span_id == root.span_id
    assert auth.status_code is StatusCode.ERROR and auth.status_message
    assert auth.attributes["http.response.status_code"] == 401
    # OTel HTTP conventions: a 4xx is the client's fault, not the server span's error.
    assert root.attributes["http.response.status_code"] == 401
    assert root.status_code is StatusCode.UNSET


async def test_an_unsampled_request_exports_nothing(
    origin_port: int, batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    server = await make_proxy(config_doc(origin_port, batch_port, engine_name, ratio=0.0))
    resp = await request(server, "/api/x", f"Authorization: Bearer {token()}\r\n")
    assert resp.status == 200
    # A caller's unsampled trace is followed too (parent-based sampling).
    caller = f"traceparent: 00-{CALLER_TRACE}-{CALLER_SPAN}-00\r\n"
    resp2 = await request(server, "/api/x", f"Authorization: Bearer {token()}\r\n{caller}")
    assert resp2.status == 200
    for r in (resp, resp2):
        sent = [v for n, v in json.loads(r.body)["headers"] if n.lower() == "traceparent"]
        ctx = parse_traceparent(sent[0])
        assert ctx is not None and not ctx.sampled
    await asyncio.sleep(0.05)
    assert server.tracing is not None and server.tracing.sink is not None
    assert server.tracing.sink.spans() == []


async def test_an_upstream_timeout_marks_the_upstream_span_as_error(
    origin_port: int, batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    server = await make_proxy(config_doc(origin_port, batch_port, engine_name))
    resp = await request(server, "/stall")
    assert resp.status == 504
    spans = by_name(await spans_of(server, 2))
    up, root = spans["fastedge.upstream"], spans["GET stall"]
    assert up.parent_span_id == root.span_id and up.kind is SpanKind.CLIENT
    assert up.status_code is StatusCode.ERROR
    assert up.status_message == "upstream timed out"
    assert root.status_code is StatusCode.ERROR  # a 5xx is the server span's error


async def test_an_upstream_4xx_is_an_error_of_the_client_span_only(
    origin_port: int, batch_port: int, make_proxy: Any
) -> None:
    doc = config_doc(origin_port, batch_port, "fast")
    doc["routes"].append({"prefix": "/status", "upstream": "o", "name": "status"})
    server = await make_proxy(doc)
    resp = await request(server, "/status/404")
    assert resp.status == 404
    spans = by_name(await spans_of(server, 2))
    # OTel HTTP conventions: 4xx is an error for a CLIENT span, not for a SERVER span.
    assert spans["fastedge.upstream"].status_code is StatusCode.ERROR
    assert spans["fastedge.upstream"].attributes["http.response.status_code"] == 404
    assert spans["GET status"].status_code is StatusCode.UNSET


async def test_the_batch_filter_has_its_span(
    origin_port: int, batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    server = await make_proxy(config_doc(origin_port, batch_port, engine_name))
    resp = await request(server, "/batched/item")
    assert resp.status == 200
    spans = by_name(await spans_of(server, 2))
    # The request went inside a batch call, not through the proxy's upstream path.
    assert set(spans) == {"GET batched", "fastedge.batch"}
    batch, root = spans["fastedge.batch"], spans["GET batched"]
    assert batch.parent_span_id == root.span_id and batch.trace_id == root.trace_id
    assert batch.status_code is StatusCode.UNSET
    assert batch.attributes["fastedge.answered"] is True
    assert root.attributes["fastedge.batch.size"] == 1
    assert root.attributes["fastedge.upstream.target"] == f"http://127.0.0.1:{batch_port}"
    assert isinstance(root.attributes["fastedge.batch.id"], str)
    # The item carried the request's own trace context to the batch endpoint.
    item_headers = json.loads(resp.body)["headers"]
    ctx = parse_traceparent(item_headers["traceparent"])
    assert ctx is not None and (ctx.trace_id, ctx.span_id) == (root.trace_id, root.span_id)


async def test_a_failed_batch_marks_the_batch_span_as_error(
    origin_port: int, batch_port: int, make_proxy: Any
) -> None:
    server = await make_proxy(config_doc(origin_port, batch_port, "fast"))
    resp = await request(server, "/batchfail/item")
    assert resp.status == 502
    spans = by_name(await spans_of(server, 2))
    batch = spans["fastedge.batch"]
    assert batch.status_code is StatusCode.ERROR
    assert batch.status_message == "batch endpoint answered 500"
    assert batch.attributes["http.response.status_code"] == 502
    assert spans["GET batchfail"].status_code is StatusCode.ERROR
