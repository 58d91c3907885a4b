"""Batch routes through the real proxy, against a real batch endpoint in another process
(tests/batch_origin.py, which implements the documented wire format on its own)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastedge.config import ConfigError, parse_config
from fastedge.filters.batch import BatchFilter
from fastedge.filters.batch_wire import (
    WireError,
    answer_entry,
    decode_answers,
    decode_requests,
    encode_answers,
    encode_requests,
    headers_object,
)
from fastedge.server import ProxyServer
from tests.conftest import Client, Response, call, free_port, running_demo

SECRET = "batch-test-secret-0123456789-abcdefghijklmn"  # >= 32 bytes for HS256
ENV = "FASTEDGE_BATCH_TEST_JWT_SECRET"


def batch_doc(port: int, engine: str, batch: Any, **route: Any) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
        "admin": {"enabled": False},
        "upstreams": {"b": {"targets": [f"http://127.0.0.1:{port}"]}},
        "routes": [
            {
                "prefix": "/api",
                "upstream": "b",
                "strip_prefix": True,
                "name": "api",
                "batch": batch,
                **route,
            }
        ],
    }


async def fetch(port: int, path: str, *, method: str = "GET", extra: str = "") -> Response:
    client = await Client.open(port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: example.test\r\n{extra}\r\n"
        await client.send(head.encode())
        return await client.read_response(method=method.encode())
    finally:
        await client.close()


async def stats(port: int) -> dict[str, Any]:
    status, _, body = await call(port, "GET", "/stats")
    assert status == 200
    doc: dict[str, Any] = json.loads(body)
    return doc


def batch_filter(server: ProxyServer) -> BatchFilter:
    chain = server.gateway.router.routes[0].filters
    assert chain is not None
    f = chain.filters[-1]
    assert isinstance(f, BatchFilter)
    return f


def error_doc(resp: Response) -> dict[str, Any]:
    """The house error shape, with the response's own request id."""
    assert resp.header("content-type") == b"application/json"
    doc: dict[str, Any] = json.loads(resp.body)
    assert set(doc) == {"error", "status", "request_id"}
    assert doc["status"] == resp.status
    assert doc["request_id"].encode() == resp.header("x-request-id")
    return doc


async def wait_for(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- batching


async def test_fifty_concurrent_gets_make_five_batch_calls(
    batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    path = f"/batch/ok/fifty-{engine_name}"
    # A long max_wait: every batch is flushed by size, so exactly 5 calls are made however
    # the 50 requests happen to be spread over time.
    server = await make_proxy(
        batch_doc(
            batch_port,
            engine_name,
            {"path": path, "max_size": 10, "max_wait": "10s", "max_queued": 100},
        )
    )
    responses = await asyncio.gather(
        *(fetch(server.port, f"/api/item/{i}?x={i}") for i in range(50))
    )
    calls: set[int] = set()
    for i, resp in enumerate(responses):
        assert resp.status == 200, resp.body
        echo = json.loads(resp.body)  # h11 checked the framing: the proxy's own length
        assert echo["path"] == f"/item/{i}?x={i}" and echo["method"] == "GET"
        assert echo["size"] == 10
        # Each item carried its own request's id, and the client got that id back.
        assert echo["headers"]["x-request-id"].encode() == resp.header("x-request-id")
        assert resp.header("x-batch-call") == str(echo["call"]).encode()
        assert resp.header("via") is not None
        calls.add(echo["call"])
    assert calls == {1, 2, 3, 4, 5}
    seen = await stats(batch_port)
    assert seen["calls"][path] == 5 and seen["sizes"][path] == [10] * 5
    text = server.metrics.render().decode()
    assert 'fastedge_batch_calls_total{route="api"} 5' in text
    assert 'fastedge_batch_items_total{route="api"} 50' in text
    assert 'fastedge_batch_size_bucket{route="api",le="5"} 0' in text
    assert 'fastedge_batch_size_bucket{route="api",le="10"} 5' in text
    assert 'fastedge_batch_size_sum{route="api"} 50' in text


async def test_time_window_flushes_a_partial_batch(batch_port: int, make_proxy: Any) -> None:
    path = "/batch/ok/window"
    server = await make_proxy(
        batch_doc(batch_port, "fast", {"path": path, "max_size": 10, "max_wait": "20ms"})
    )
    responses = await asyncio.gather(*(fetch(server.port, f"/api/w/{i}") for i in range(3)))
    assert [r.status for r in responses] == [200, 200, 200]
    sizes = (await stats(batch_port))["sizes"][path]
    assert sum(sizes) == 3 and all(s < 10 for s in sizes)


async def test_items_keep_their_own_auth_claims(
    batch_port: int, make_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, SECRET)
    doc = batch_doc(
        batch_port,
        "fast",
        {"path": "/batch/ok/claims", "max_size": 2, "max_wait": "10s"},
        auth="default",
    )
    doc["auth"] = {
        "default": {"algorithms": ["HS256"], "keys": [{"algorithm": "HS256", "secret_env": ENV}]}
    }
    server = await make_proxy(doc)
    now = int(time.time())

    def token(sub: str) -> str:
        return jwt.encode({"sub": sub, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")

    alice, bob = await asyncio.gather(
        fetch(server.port, "/api/me", extra=f"Authorization: Bearer {token('alice')}\r\n"),
        fetch(
            server.port,
            "/api/me",
            extra=f"Authorization: Bearer {token('bob')}\r\nX-User-Id: alice\r\n",
        ),
    )
    a, b = json.loads(alice.body), json.loads(bob.body)
    assert a["call"] == b["call"] and a["size"] == 2  # one batch call, two items
    assert a["headers"]["x-user-id"] == "alice"
    assert b["headers"]["x-user-id"] == "bob"  # the client's forged copy never arrives
    assert "authorization" not in a["headers"] and "authorization" not in b["headers"]
    auth = server.config.sections.get("auth")
    close = getattr(auth, "aclose", None)
    if close is not None:
        await close()


async def test_head_is_batched_without_a_body(batch_port: int, make_proxy: Any) -> None:
    path = "/batch/ok/head"
    server = await make_proxy(batch_doc(batch_port, "h11", {"path": path, "max_wait": 0}))
    resp = await fetch(server.port, "/api/h", method="HEAD")
    assert resp.status == 200 and resp.body == b""
    assert resp.header("x-batch-call") == b"1"
    # For HEAD the upstream's Content-Length describes the GET body and is kept.
    assert resp.header("content-length") == b"999"
    assert (await stats(batch_port))["calls"][path] == 1


async def test_other_methods_and_bodies_pass_through_unbatched(
    batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    path = f"/batch/ok/pass-{engine_name}"
    server = await make_proxy(batch_doc(batch_port, engine_name, {"path": path, "max_wait": 0}))
    status, _, body = await call(server.port, "POST", "/api/orders", body=b"hello")
    assert status == 200
    assert json.loads(body) == {
        "unbatched": True,
        "method": "POST",
        "path": "/orders",
        "body_length": 5,
    }
    # A GET with a body is not batchable either (the format has no request bodies).
    status, _, body = await call(server.port, "GET", "/api/with-body", body=b"12345")
    assert status == 200 and json.loads(body)["unbatched"] is True
    assert path not in (await stats(batch_port))["calls"]


async def test_keep_alive_connection_is_reused(batch_port: int, make_proxy: Any) -> None:
    server = await make_proxy(batch_doc(batch_port, "fast", {"path": "/batch/ok/reuse"}))
    for i in range(3):
        resp = await fetch(server.port, f"/api/r/{i}")
        assert resp.status == 200 and json.loads(resp.body)["call"] == i + 1
    assert batch_filter(server).client.connections_opened == 1


async def test_a_connection_the_upstream_closed_is_replaced(
    batch_port: int, make_proxy: Any
) -> None:
    path = "/batch/stale/replaced"
    server = await make_proxy(batch_doc(batch_port, "fast", {"path": path, "max_wait": 0}))
    for i in range(2):
        resp = await fetch(server.port, f"/api/d/{i}")
        assert resp.status == 200, resp.body
    # The second call found its kept-alive connection closed without an answer and was
    # made again on a new one (safe: a batch holds only GET and HEAD).
    assert batch_filter(server).client.connections_opened == 2
    assert (await stats(batch_port))["calls"][path] == 2


async def test_a_cache_before_the_batch_lets_go_of_its_fill(
    batch_port: int, make_proxy: Any
) -> None:
    # The cache leads the fill of a miss (its followers wait for it); when the batch
    # filter answers instead of the upstream, the chain tells the cache the upstream
    # response will not come, so the next request for the URL does not wait behind a
    # fill that never ends.
    doc = batch_doc(batch_port, "fast", {"path": "/batch/ok/cached", "max_wait": 0}, cache="edge")
    doc["caches"] = {"edge": {}}
    server = await make_proxy(doc)
    chain = server.gateway.router.routes[0].filters
    assert chain is not None and [f.name for f in chain.filters] == ["cache", "batch"]
    locks = chain.filters[0].cache.locks  # type: ignore[attr-defined]
    for call_no in (1, 2):
        resp = await fetch(server.port, "/api/same")
        assert resp.status == 200 and json.loads(resp.body)["call"] == call_no
        assert len(locks) == 0
    assert locks.timed_out == 0


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "batch endpoint answered 500"),
        ("malformed", "malformed batch answer: batch answer is not JSON"),
        ("notarray", "malformed batch answer: batch answer must be a JSON array, got an object"),
        ("close", "batch call failed"),
    ],
)
async def test_a_failed_batch_call_answers_each_item_502(
    batch_port: int, engine_name: str, make_proxy: Any, mode: str, message: str
) -> None:
    path = f"/batch/{mode}/{engine_name}"
    server = await make_proxy(
        batch_doc(batch_port, engine_name, {"path": path, "max_size": 3, "max_wait": "10s"})
    )
    responses = await asyncio.gather(*(fetch(server.port, f"/api/f/{i}") for i in range(3)))
    ids = set()
    for resp in responses:
        assert resp.status == 502
        doc = error_doc(resp)
        assert doc["error"].startswith(message), doc
        ids.add(doc["request_id"])
    assert len(ids) == 3  # each client gets its own error, with its own request id
    assert (await stats(batch_port))["calls"][path] == 1
    reason = {"fail": "status", "malformed": "malformed", "notarray": "malformed", "close": "io"}
    assert (
        f'fastedge_batch_failures_total{{route="api",reason="{reason[mode]}"}} 1'
        in server.metrics.render().decode()
    )


async def test_one_bad_item_fails_alone(batch_port: int, engine_name: str, make_proxy: Any) -> None:
    paths = ["/a", "/missing", "/bad-item", "/inject", "/binary", "/cookies", "/status/404"]
    server = await make_proxy(
        batch_doc(
            batch_port,
            engine_name,
            {"path": f"/batch/ok/items-{engine_name}", "max_size": len(paths), "max_wait": "10s"},
        )
    )
    got = dict(
        zip(
            paths,
            await asyncio.gather(*(fetch(server.port, "/api" + p) for p in paths)),
            strict=True,
        )
    )
    assert got["/a"].status == 200 and json.loads(got["/a"].body)["size"] == len(paths)
    assert got["/missing"].status == 502
    assert "missing from the batch answer" in error_doc(got["/missing"])["error"]
    assert got["/bad-item"].status == 502
    assert "status must be an integer" in error_doc(got["/bad-item"])["error"]
    # A header value with CR LF would split the client's response: refused, never sent.
    assert got["/inject"].status == 502 and got["/inject"].header("set-cookie") is None
    assert "invalid value" in error_doc(got["/inject"])["error"]
    assert got["/binary"].status == 200 and got["/binary"].body == bytes(range(256))
    assert got["/cookies"].header_all("set-cookie") == [b"a=1", b"b=2"]
    assert got["/status/404"].status == 404 and got["/status/404"].body == b"status 404"


async def test_a_slow_batch_endpoint_answers_504(
    batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    server = await make_proxy(
        batch_doc(
            batch_port,
            engine_name,
            {
                "path": f"/batch/stall/{engine_name}",
                "max_size": 2,
                "max_wait": "10s",
                "timeout": "200ms",
            },
        )
    )
    responses = await asyncio.gather(*(fetch(server.port, f"/api/s/{i}") for i in range(2)))
    for resp in responses:
        assert resp.status == 504
        assert error_doc(resp)["error"] == "batch call to upstream 'b' timed out after 0.2s"


async def test_unreachable_batch_endpoint_answers_502(make_proxy: Any) -> None:
    port = free_port()  # nothing listens there
    server = await make_proxy(batch_doc(port, "fast", {"max_wait": 0}))
    resp = await fetch(server.port, "/api/x")
    assert resp.status == 502
    assert error_doc(resp)["error"].startswith("batch call failed: cannot connect to")


async def test_full_queue_answers_503_with_retry_after(
    batch_port: int, engine_name: str, make_proxy: Any
) -> None:
    path = f"/batch/hold/{engine_name}"
    server = await make_proxy(
        batch_doc(
            batch_port,
            engine_name,
            {"path": path, "max_size": 1, "max_wait": 0, "max_queued": 2},
        )
    )
    first = [asyncio.create_task(fetch(server.port, f"/api/q/{i}")) for i in range(2)]

    async def both_held() -> bool:
        return bool((await stats(batch_port))["held"].get(path) == 2)

    await wait_for(both_held, "two items held at the batch endpoint")
    refused = await fetch(server.port, "/api/q/3")
    assert refused.status == 503
    assert refused.header("retry-after") == b"1"
    assert error_doc(refused)["error"] == (
        "batch route 'api' is at capacity: 2 requests are already waiting (max_queued)"
    )
    await call(batch_port, "POST", f"/release?path={path}")
    done = await asyncio.gather(*first)
    assert [r.status for r in done] == [200, 200]
    text = server.metrics.render().decode()
    assert 'fastedge_batch_rejected_total{route="api",reason="queue_full"} 1' in text


async def test_closing_the_filter_flushes_waiting_requests(
    batch_port: int, make_proxy: Any
) -> None:
    path = "/batch/ok/flush"
    server = await make_proxy(
        batch_doc(batch_port, "fast", {"path": path, "max_size": 10, "max_wait": "10s"})
    )
    f = batch_filter(server)
    waiting = [asyncio.create_task(fetch(server.port, f"/api/z/{i}")) for i in range(3)]

    async def queued() -> bool:
        return f.batcher.queued == 3

    await wait_for(queued, "three queued requests")
    await f.aclose()  # what a reload or shutdown does: send now, not after 10 s
    done = await asyncio.gather(*waiting)
    assert [r.status for r in done] == [200, 200, 200]
    assert json.loads(done[0].body)["size"] == 3
    late = await fetch(server.port, "/api/z/late")
    assert late.status == 503 and "shutting down" in error_doc(late)["error"]


async def test_shutdown_sends_waiting_requests_before_the_drain_ends(
    batch_port: int, make_proxy: Any
) -> None:
    """A batch window longer than the drain timeout: shutdown sends what waits at once,
    so those clients get their answers instead of being cut off when the drain ends."""
    path = "/batch/ok/drain"
    server = await make_proxy(
        batch_doc(batch_port, "fast", {"path": path, "max_size": 10, "max_wait": "10s"})
    )
    f = batch_filter(server)
    waiting = [asyncio.create_task(fetch(server.port, f"/api/d/{i}")) for i in range(3)]

    async def queued() -> bool:
        return f.batcher.queued == 3

    await wait_for(queued, "three queued requests")
    await server.shutdown(drain_timeout=1)  # the window (10 s) outlasts the drain (1 s)
    done = await asyncio.gather(*waiting)
    assert [r.status for r in done] == [200, 200, 200]
    assert json.loads(done[0].body)["size"] == 3


# --------------------------------------------------------------------------- demo


async def test_demo_prices_route_is_batched() -> None:
    async with running_demo() as server:
        one, two, streamed, head = await asyncio.gather(
            fetch(server.port, "/api/prices/1"),
            fetch(server.port, "/api/prices/2"),
            fetch(server.port, "/api/prices/bytes/40"),
            fetch(server.port, "/api/prices/3", method="HEAD"),
        )
        assert json.loads(one.body)["id"] == 1 and json.loads(two.body)["id"] == 2
        assert one.header("x-version") == b"blue" and one.header("x-service") == b"products"
        assert streamed.status == 200 and streamed.body == b"0123456789abcdef" * 2 + b"01234567"
        assert head.status == 200 and head.body == b""
        text = server.metrics.render().decode()
        assert 'fastedge_batch_items_total{route="/api/prices"} 4' in text


# --------------------------------------------------------------------------- config


def config_errors(batch: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(batch_doc(1, "fast", batch))
    return info.value.errors


def test_config_defaults_and_true() -> None:
    config = parse_config(batch_doc(1, "fast", True))
    value = config.routes[0].policies["batch"]
    assert (value.path, value.max_size, value.max_wait, value.max_queued) == (
        "/batch",
        10,
        0.005,
        1000,
    )
    assert value.timeout is None and value.max_answer_size == 16 * 1024 * 1024
    config = parse_config(batch_doc(1, "fast", {"max_wait": "2ms", "timeout": "1.5s"}))
    value = config.routes[0].policies["batch"]
    assert value.max_wait == 0.002 and value.timeout == 1.5


def test_config_errors_name_their_key_paths() -> None:
    assert config_errors({"max_size": 0}) == [
        "routes[0].batch.max_size: must be between 1 and 1000, got 0"
    ]
    assert config_errors({"max_size": 20, "max_queued": 5}) == [
        "routes[0].batch.max_queued: must be at least max_size (20), got 5"
    ]
    assert config_errors({"max_queued": 5}) == [
        "routes[0].batch.max_queued: must be at least max_size (10), got 5"
    ]
    assert config_errors({"path": "batch"}) == [
        "routes[0].batch.path: must start with '/', got 'batch'"
    ]
    assert config_errors({"max_wait": "1m"}) == [
        "routes[0].batch.max_wait: must be at most 10s, got '1m'"
    ]
    errors = config_errors({"max_sise": 5, "timeout": "0s"})
    assert errors == [
        "routes[0].batch.max_sise: unknown key (did you mean 'max_size'?)",
        "routes[0].batch.timeout: must be at least 0.001s, got '0s'",
    ]
    assert config_errors(False) == ["routes[0].batch: expected a table or true, got boolean"]


# --------------------------------------------------------------------------- wire format


def test_request_items_combine_repeated_fields_and_drop_framing() -> None:
    fields = [
        (b"accept", b"text/html"),
        (b"accept", b"application/json"),
        (b"cookie", b"a=1"),
        (b"cookie", b"b=2"),
        (b"content-length", b"0"),
        (b"x-latin", b"caf\xe9"),
    ]
    assert headers_object(fields) == {
        "accept": "text/html, application/json",
        "cookie": "a=1; b=2",
        "x-latin": "caf\xe9",
    }
    body = encode_requests([("0", b"GET", b"/a?x=1", {"accept": "*/*"})])
    assert orjson.loads(body) == [
        {"id": "0", "method": "GET", "path": "/a?x=1", "headers": {"accept": "*/*"}}
    ]
    (item,) = decode_requests(body)
    assert (item.id, item.method, item.path, item.headers) == (
        "0",
        "GET",
        "/a?x=1",
        {"accept": "*/*"},
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"status": True}, "status must be an integer from 200 to 599"),
        ({"status": 101}, "status must be an integer from 200 to 599"),
        ({"status": 200, "headers": []}, "headers must be an object, got an array"),
        ({"status": 200, "headers": {"bad name": "x"}}, "is not an HTTP token"),
        ({"status": 200, "headers": {"x": "a\nb"}}, "invalid value"),
        ({"status": 200, "headers": {"x": "a\x00"}}, "invalid value"),
        ({"status": 200, "headers": {"x": "\u20ac"}}, "invalid value"),  # not Latin-1
        ({"status": 200, "headers": {"x": 5}}, "invalid value"),
        ({"status": 200, "body": "a", "body_b64": "YQ=="}, "both"),
        ({"status": 200, "body_b64": "not base64!"}, "body_b64 is not valid base64"),
        ({"status": 200, "body": 5}, "body must be a string, got a number"),
    ],
)
def test_a_malformed_entry_fails_only_its_item(entry: dict[str, Any], message: str) -> None:
    doc = orjson.dumps([{"id": "0", **entry}, {"id": "1", "status": 200, "future": [1]}])
    got = decode_answers(doc, ["0", "1"])
    assert isinstance(got["0"], WireError) and message in str(got["0"])
    assert not isinstance(got["1"], WireError)
    assert (got["1"].status, got["1"].headers, got["1"].body) == (200, [], b"")


def test_duplicate_and_foreign_entries() -> None:
    doc = orjson.dumps(
        [
            {"id": "0", "status": 200},
            {"id": "0", "status": 201},
            {"id": "9", "status": 200},  # not an id of this call: ignored
            {"status": 200},
            "junk",
        ]
    )
    got = decode_answers(doc, ["0", "1"])
    assert set(got) == {"0"} and "more than once" in str(got["0"])
    with pytest.raises(WireError, match="not JSON"):
        decode_answers(b"[", ["0"])
    with pytest.raises(WireError, match="must be a JSON array, got null"):
        decode_answers(b"null", ["0"])


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"{}", "must be a JSON array"),
        (b'[{"id": "0", "method": "POST", "path": "/"}]', "method must be GET or HEAD"),
        (b'[{"id": "0", "method": "GET", "path": "x"}]', "path must be a string starting"),
        (orjson.dumps([{"id": "0", "method": "GET", "path": "/"}] * 2), "unique"),
        (b'[{"id": "0", "method": "GET", "path": "/", "headers": {"a": 1}}]', "headers must"),
    ],
)
def test_endpoint_side_validation(doc: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        decode_requests(doc)


_names = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"))


@given(
    status=st.integers(200, 599),
    headers=st.lists(st.tuples(_names, _values), max_size=8),
    body=st.binary(max_size=300),
)
def test_answer_entries_round_trip(
    status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    doc = encode_answers([answer_entry("k", status, headers, body)])
    got = decode_answers(doc, ["k"])["k"]
    assert not isinstance(got, WireError)
    assert got.status == status and got.body == body
    # Repeated names stay repeated, in order; values are the same Latin-1 bytes.
    expected = sorted(((n.encode(), v.encode("latin-1")) for n, v in headers), key=lambda f: f[0])
    assert sorted(got.headers, key=lambda f: f[0]) == expected
