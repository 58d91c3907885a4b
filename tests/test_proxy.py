"""The data path end to end, over real loopback sockets, on both engines.

A client (raw bytes out, h11-parsed responses in) talks to an in-process proxy in front
of ``tests/origin.py`` running as its own process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import Client, Response, gateway_config, get, start_origin, stop_origin


async def roundtrip(port: int, data: bytes, *, method: bytes = b"GET") -> Response:
    client = await Client.open(port)
    try:
        await client.send(data)
        return await client.read_response(method=method)
    finally:
        await client.close()


def pool_doc(origin: int, engine: str, pool: dict[str, Any]) -> dict[str, Any]:
    """A config document routing everything to the origin with these pool settings."""
    return {
        "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
        "admin": {"enabled": False},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"], "pool": pool}},
        "routes": [{"prefix": "/", "upstream": "origin"}],
    }


def echo_of(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, resp
    doc: dict[str, Any] = json.loads(resp.body)
    return doc


def headers_of(doc: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in doc["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# --- forwarding and headers -------------------------------------------------------------


async def test_get_is_forwarded_with_forwarding_headers(proxy: ProxyServer) -> None:
    resp = await roundtrip(proxy.port, get("/echo?x=1"))
    doc = echo_of(resp)
    assert doc["target"] == "/echo?x=1"
    h = headers_of(doc)
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == ["example.test"]
    assert h["via"] == ["1.1 fastedge"]
    assert h["host"] == ["example.test"]
    request_id = h["x-request-id"][0]
    assert resp.header("x-request-id") == request_id.encode()
    assert resp.header("via") == b"1.1 fastedge"


async def test_hop_by_hop_headers_are_removed(proxy: ProxyServer) -> None:
    extra = (
        "Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
        "TE: trailers\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n"
        "X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Proto: https\r\n"
    )
    doc = echo_of(await roundtrip(proxy.port, get("/echo", extra=extra)))
    h = headers_of(doc)
    for gone in ("x-secret-hop", "keep-alive", "te", "proxy-connection"):
        assert gone not in h, gone
    assert h["x-kept"] == ["yes"]
    assert h["x-forwarded-for"] == ["10.9.9.9, 127.0.0.1"]  # appended, as nginx does
    assert h["x-forwarded-proto"] == ["http"]  # set from what this hop saw, not trusted
    assert h.get("connection", []) in ([], ["keep-alive"])


async def test_client_request_id_passes_both_ways(proxy: ProxyServer) -> None:
    resp = await roundtrip(proxy.port, get("/echo", extra="X-Request-Id: abc-123\r\n"))
    assert headers_of(echo_of(resp))["x-request-id"] == ["abc-123"]
    assert resp.header("x-request-id") == b"abc-123"


async def test_strip_prefix_and_rewrite(proxy: ProxyServer) -> None:
    resp = await roundtrip(proxy.port, get("/api/users/42?q=1"))
    assert resp.header("x-origin-path") == b"/42"
    resp = await roundtrip(proxy.port, get("/api/users"))
    assert resp.header("x-origin-path") == b"/"
    # /api/user is not /api/users: the catch-all route gets it unchanged
    resp = await roundtrip(proxy.port, get("/api/user"))
    assert resp.header("x-origin-path") == b"/api/user"
    doc = echo_of(await roundtrip(proxy.port, get("/v1/a/b?z=2")))
    assert doc["target"] == "/echo/a/b?z=2"


async def test_no_route_is_404_json(origin_port: int, engine_name: str) -> None:
    cfg = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine_name, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "routes": [{"prefix": "/api", "upstream": "o"}],
        }
    )
    server = ProxyServer(cfg)
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(get("/nope"))
        resp = await client.read_response()
        assert resp.status == 404
        body = json.loads(resp.body)
        assert body["status"] == 404 and body["error"]
        assert body["request_id"] == resp.header("x-request-id").decode()  # type: ignore[union-attr]
        # the connection stays usable after a 404
        await client.send(get("/api/x"))
        assert (await client.read_response()).status == 200
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


# --- keep-alive, pipelining, versions ---------------------------------------------------


async def test_keep_alive_and_upstream_reuse(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    for i in range(5):
        await client.send(get(f"/r{i}"))
        resp = await client.read_response()
        assert resp.header("x-origin-path") == f"/r{i}".encode()
    await client.close()
    stats = [t.pool.stats() for up in proxy.gateway.upstreams.values() for t in up.targets]
    assert stats[0]["idle"] == 1  # one upstream connection carried all five


async def test_pipelined_requests_answered_in_order(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(get("/slow?ms=50") + get("/p2") + get("/echo"))
    first = await client.read_response()
    second = await client.read_response()
    third = await client.read_response()
    assert first.body == b"slow"
    assert second.header("x-origin-path") == b"/p2"
    assert echo_of(third)["target"] == "/echo"
    await client.close()


async def test_pipelined_bytes_fed_one_at_a_time(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    data = get("/a") + get("/b")
    for i in range(len(data)):
        client.writer.write(data[i : i + 1])
    await client.writer.drain()
    assert (await client.read_response()).header("x-origin-path") == b"/a"
    assert (await client.read_response()).header("x-origin-path") == b"/b"
    await client.close()


async def test_http10_client(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(b"GET /bytes/1000?mode=chunked HTTP/1.0\r\nHost: a\r\n\r\n")
    raw = await client.read_raw_until_close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()  # 1.0 clients never get chunked
    assert len(body) == 1000
    await client.close()


async def test_http10_keep_alive(proxy: ProxyServer, engine_name: str) -> None:
    client = await Client.open(proxy.port)
    await client.send(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    if engine_name == "h11":
        # h11 cannot keep HTTP/1.0 connections alive: it answers and closes, and says so.
        raw = await client.read_raw_until_close()
        assert b"connection: close" in raw.lower() and raw.endswith(b"ok")
        await client.close()
        return
    raw = await asyncio.wait_for(client.reader.readuntil(b"ok"), 5)
    assert b"connection: keep-alive" in raw.lower()
    await client.send(b"GET /k2 HTTP/1.0\r\n\r\n")
    raw = await client.read_raw_until_close()
    assert b"/k2" in raw
    await client.close()


async def test_head_and_bodiless_statuses(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: a\r\n\r\n")
    resp = await client.read_response(method=b"HEAD")
    assert resp.status == 200 and resp.body == b""
    assert resp.header("content-length") == b"5000"
    for status in (204, 304):
        await client.send(get(f"/status/{status}"))
        resp = await client.read_response()
        assert resp.status == status and resp.body == b""
    await client.send(get("/after"))
    assert (await client.read_response()).header("x-origin-path") == b"/after"
    await client.close()


# --- bodies ----------------------------------------------------------------------------


async def test_chunked_request_body(proxy: ProxyServer) -> None:
    body = b"hello world, " * 1000
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (body[:100], body[100:]))
    req = (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    doc = echo_of(await roundtrip(proxy.port, req))
    assert doc["body_length"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    h = headers_of(doc)
    assert h["transfer-encoding"] == ["chunked"]


async def test_content_length_request_body(proxy: ProxyServer) -> None:
    body = bytes(range(256)) * 400
    req = b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    doc = echo_of(await roundtrip(proxy.port, req))
    assert doc["method"] == "PUT"
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("mode", ["length", "chunked", "close"])
async def test_response_framings(proxy: ProxyServer, mode: str) -> None:
    client = await Client.open(proxy.port)
    await client.send(get(f"/bytes/300000?mode={mode}"))
    resp = await client.read_response()
    assert len(resp.body) == 300000
    if mode == "close":
        # close-delimited from the upstream becomes chunked for an HTTP/1.1 client, so
        # the client connection survives
        assert resp.header("transfer-encoding") == b"chunked"
        await client.send(get("/again"))
        assert (await client.read_response()).status == 200
    await client.close()


async def test_expect_100_continue(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    line = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert line.startswith(b"HTTP/1.1 100")
    await client.send(b"hello")
    client.conn = __import__("h11").Connection(__import__("h11").CLIENT)
    doc = echo_of(await client.read_response())
    assert doc["body_length"] == 5
    assert "expect" not in headers_of(doc)
    await client.close()


async def test_websocket_style_upgrade_is_tunnelled(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(
        b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"upgrade: echo" in head.lower()
    await client.send(b"ping over the tunnel")
    got = await asyncio.wait_for(client.reader.readexactly(20), 5)
    assert got == b"PING OVER THE TUNNEL"
    await client.close()


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host on 1.1
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n", 413),
    ],
    ids=[
        "cl-and-te",
        "no-host",
        "space-in-name",
        "uri-too-long",
        "head-too-large",
        "body-too-large",
    ],
)
async def test_bad_requests_answered_and_closed(
    proxy: ProxyServer, raw: bytes, status: int
) -> None:
    client = await Client.open(proxy.port)
    await client.send(raw)
    data = await client.read_raw_until_close()
    assert data.startswith(b"HTTP/1.1 %d" % status), data[:80]
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["status"] == status
    await client.close()


async def test_upstream_refused_is_502(engine_name: str) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # nothing listens there now
    server = ProxyServer(gateway_config(dead_port, engine_name))
    await server.start()
    try:
        resp = await roundtrip(server.port, get("/x"))
        assert resp.status == 502
        assert json.loads(resp.body)["status"] == 502
    finally:
        await server.shutdown(drain_timeout=1)


async def test_upstream_timeout_is_504(origin_port: int, engine_name: str) -> None:
    doc = pool_doc(origin_port, engine_name, {"response_timeout": "300ms"})
    cfg = parse_config(doc)
    server = ProxyServer(cfg)
    await server.start()
    try:
        resp = await roundtrip(server.port, get("/stall"))
        assert resp.status == 504
        assert json.loads(resp.body)["error"]
    finally:
        await server.shutdown(drain_timeout=1)


async def test_upstream_truncation_aborts_client(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(get("/truncate"))
    with pytest.raises((ConnectionError, __import__("h11").RemoteProtocolError)):
        await client.read_response()
    await client.close()


async def test_upstream_close_without_answer_is_502(proxy: ProxyServer) -> None:
    resp = await roundtrip(proxy.port, get("/close"))
    assert resp.status == 502


async def test_stale_pooled_connection_is_retried_once(proxy: ProxyServer) -> None:
    client = await Client.open(proxy.port)
    await client.send(get("/warm"))
    assert (await client.read_response()).status == 200
    await client.send(get("/flaky"))  # reuses the pooled connection, which is closed on us
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"fresh"
    await client.close()


async def test_pool_wait_timeout_is_503(origin_port: int, engine_name: str) -> None:
    doc = pool_doc(origin_port, engine_name, {"max_connections": 1, "wait_timeout": "100ms"})
    server = ProxyServer(parse_config(doc))
    await server.start()
    try:
        slow = asyncio.create_task(roundtrip(server.port, get("/slow?ms=600")))
        await asyncio.sleep(0.1)  # let the slow request take the only connection
        busy = await roundtrip(server.port, get("/x"))
        assert busy.status == 503
        assert (await slow).status == 200
        # once the connection is free again, requests flow
        assert (await roundtrip(server.port, get("/y"))).status == 200
    finally:
        await server.shutdown(drain_timeout=1)


async def test_pool_waiter_gets_released_connection(origin_port: int, engine_name: str) -> None:
    doc = pool_doc(origin_port, engine_name, {"max_connections": 1, "wait_timeout": "5s"})
    server = ProxyServer(parse_config(doc))
    await server.start()
    try:
        results = await asyncio.gather(
            *(roundtrip(server.port, get(f"/slow?ms={20 + i}")) for i in range(5))
        )
        assert [r.status for r in results] == [200] * 5
        assert server.gateway.upstreams["origin"].targets[0].pool.stats()["idle"] == 1
    finally:
        await server.shutdown(drain_timeout=1)


# --- lifecycle -------------------------------------------------------------------------


async def test_reload_applies_to_new_requests_and_refuses_bad_config(
    origin_port: int, engine_name: str
) -> None:
    server = ProxyServer(gateway_config(origin_port, engine_name))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(get("/api/users/1"))
        assert (await client.read_response()).header("x-origin-path") == b"/1"
        new = parse_config(
            {
                "server": {"listen": "127.0.0.1:0", "http": engine_name, "access_log": False},
                "admin": {"enabled": False},
                "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
                "routes": [{"prefix": "/new", "upstream": "origin", "rewrite": "/renamed"}],
            }
        )
        assert server.reload(new)
        # the same kept-alive connection picks up the new routes on its next request
        await client.send(get("/new/x"))
        assert (await client.read_response()).header("x-origin-path") == b"/renamed/x"
        await client.send(get("/api/users/1"))
        assert (await client.read_response()).status == 404
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


async def test_reload_from_file_refuses_invalid(
    origin_port: int, engine_name: str, tmp_path: Any
) -> None:
    path = tmp_path / "f.toml"
    path.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\nhttp = "{engine_name}"\naccess_log = false\n'
        f"[admin]\nenabled = false\n"
        f'[upstreams.o]\ntargets = ["http://127.0.0.1:{origin_port}"]\n'
        f'[[routes]]\nprefix = "/"\nupstream = "o"\n'
    )
    from fastedge.config import load_config

    server = ProxyServer(load_config(path), config_path=str(path))
    await server.start()
    try:
        path.write_text(path.read_text().replace('upstream = "o"', 'upstream = "missing"'))
        assert not server.reload()
        assert (await roundtrip(server.port, get("/still"))).status == 200
    finally:
        await server.shutdown(drain_timeout=1)


async def test_graceful_shutdown_finishes_in_flight(origin_port: int, engine_name: str) -> None:
    server = ProxyServer(gateway_config(origin_port, engine_name))
    await server.start()
    port = server.port
    idle = await Client.open(port)
    await idle.send(get("/idle"))
    assert (await idle.read_response()).status == 200
    in_flight = asyncio.create_task(roundtrip(port, get("/slow?ms=300")))
    await asyncio.sleep(0.1)
    await server.shutdown(drain_timeout=5)
    resp = await in_flight
    assert resp.status == 200 and resp.body == b"slow"
    assert await idle.is_closed()
    await idle.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_metrics_count_requests(proxy: ProxyServer) -> None:
    await roundtrip(proxy.port, get("/m"))
    text = proxy.metrics.render().decode()
    assert 'fastedge_requests_total{route="/",method="GET",status="200"}' in text
    assert "fastedge_upstream_connections" in text


async def test_upstream_process_killed_then_restarted(engine_name: str) -> None:
    proc, port = start_origin()
    server = ProxyServer(gateway_config(port, engine_name))
    await server.start()
    try:
        assert (await roundtrip(server.port, get("/before"))).status == 200
        stop_origin(proc)
        # the pooled connection is dead and nothing listens: 502, never a hang
        assert (await roundtrip(server.port, get("/during"))).status == 502
    finally:
        await server.shutdown(drain_timeout=1)


async def test_suite_runs_on_uvloop() -> None:
    # The event loop fastedge runs on in production; asyncio's own loop differs in
    # transport types and timing (a uvloop-only bug was found this way).
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
