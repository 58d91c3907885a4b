"""Demo upstream services and the mini HTTP/1.1 server under them, over loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import h11
import jwt
import orjson
import pytest
import uvloop

from fastedge.demo_services import (
    BYTES_PATTERN,
    DEMO_PORTS,
    DemoServices,
    start_demo_services,
)
from fastedge.minihttp import Limits, Request, Response, start_server
from tests.conftest import call

SECRET = "demo-secret-of-at-least-32-bytes!"


async def raw_exchange(port: int, data: bytes) -> list[tuple[h11.Response, bytes]]:
    """Send raw bytes, read until the server closes, parse the responses with h11."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    raw = await reader.read()  # until EOF: every exchange here ends with a close
    writer.close()
    await writer.wait_closed()
    return parse_responses(raw)


def parse_responses(raw: bytes) -> list[tuple[h11.Response, bytes]]:
    """Split a byte stream into ``(response head, body)`` pairs; h11 checks the framing."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(raw)
    client.receive_data(b"")
    out: list[tuple[h11.Response, bytes]] = []
    head: h11.Response | None = None
    body = b""
    while True:
        # h11 pairs each response with a request; pretend each was a GET.
        if client.our_state is h11.IDLE:
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        event = client.next_event()
        if isinstance(event, h11.Response):
            head, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            out.append((head, body))
            if client.their_state is h11.MUST_CLOSE:
                break
            client.start_next_cycle()
        else:  # NEED_DATA at EOF, or ConnectionClosed
            break
    return out


@pytest.fixture
async def demo() -> AsyncIterator[DemoServices]:
    services = await start_demo_services(product_versions=("blue", "green"), jwt_secret=SECRET)
    yield services
    await services.close()


# -- users ---------------------------------------------------------------------------------


async def test_users_list_and_one(demo: DemoServices) -> None:
    status, headers, body = await call(demo.ports["users"], "GET", "/")
    assert status == 200
    assert headers["x-service"] == "users"
    users = orjson.loads(body)
    assert [u["name"] for u in users] == ["alice", "bob", "mallory"]
    assert [u["name"] for u in users if u["disabled"]] == ["mallory"]

    status, headers, body = await call(demo.ports["users"], "GET", "/alice", {"X-User-Id": "bob"})
    assert status == 200
    assert orjson.loads(body)["name"] == "alice"
    assert headers["x-user-id"] == "bob"

    status, _, body = await call(demo.ports["users"], "GET", "/nobody")
    assert status == 404
    assert orjson.loads(body)["status"] == 404
    assert (await call(demo.ports["users"], "DELETE", "/alice"))[0] == 405


# -- products ------------------------------------------------------------------------------


async def test_products_versions_and_cache_headers(demo: DemoServices) -> None:
    assert demo.ports["products"] == demo.ports["products-blue"]
    for version in ("blue", "green"):
        port = demo.ports[f"products-{version}"]
        status, headers, body = await call(port, "GET", "/")
        assert status == 200
        assert headers["x-version"] == version
        assert headers["cache-control"] == "max-age=5, stale-while-revalidate=30"
        products = orjson.loads(body)
        assert all("price" in p and p["version"] == version for p in products)
        status, headers, body = await call(port, "GET", "/2")
        assert status == 200
        assert orjson.loads(body)["id"] == 2
        assert headers["x-version"] == version
    assert (await call(demo.ports["products"], "GET", "/99"))[0] == 404
    assert (await call(demo.ports["products"], "GET", "/abc"))[0] == 404


# -- auth ----------------------------------------------------------------------------------


async def test_auth_issues_hs256_jwt(demo: DemoServices) -> None:
    status, _, body = await call(
        demo.ports["auth"],
        "POST",
        "/token",
        {"content-type": "application/json"},
        b'{"sub":"alice"}',
    )
    assert status == 200
    answer = orjson.loads(body)
    assert answer["expires_in"] == 300
    claims = jwt.decode(answer["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.get_unverified_header(answer["token"])["alg"] == "HS256"


@pytest.mark.parametrize("body", [b"not json", b"[]", b"{}", b'{"sub": ""}', b'{"sub": 7}'])
async def test_auth_rejects_bad_bodies(demo: DemoServices, body: bytes) -> None:
    status, _, answer = await call(demo.ports["auth"], "POST", "/token", None, body)
    assert status == 400
    assert set(orjson.loads(answer)) == {"error", "status", "request_id"}


async def test_auth_wrong_method(demo: DemoServices) -> None:
    status, headers, _ = await call(demo.ports["auth"], "GET", "/token")
    assert status == 405
    assert headers["allow"] == "POST"


async def test_default_secret_is_random_and_exposed() -> None:
    services = await start_demo_services()
    try:
        assert len(services.jwt_secret) == 32
        _, _, body = await call(services.ports["auth"], "POST", "/token", None, b'{"sub":"bob"}')
        token = orjson.loads(body)["token"]
        assert jwt.decode(token, services.jwt_secret, algorithms=["HS256"])["sub"] == "bob"
    finally:
        await services.close()


# -- shared endpoints ----------------------------------------------------------------------


async def test_healthz_and_echo(demo: DemoServices) -> None:
    for name in ("users", "auth", "products", "products-green"):
        status, _, body = await call(demo.ports[name], "GET", "/healthz")
        assert status == 200
        assert orjson.loads(body)["status"] == "ok"
    status, _, body = await call(
        demo.ports["users"], "GET", "/echo?a=1&b=2", {"X-Forwarded-For": "10.0.0.1"}
    )
    echo = orjson.loads(body)
    assert echo["method"] == "GET"
    assert echo["path"] == "/echo"
    assert echo["query"] == "a=1&b=2"
    assert ["x-forwarded-for", "10.0.0.1"] in echo["headers"]
    assert echo["client"].startswith("127.0.0.1:")


async def test_post_echo_returns_body(demo: DemoServices) -> None:
    status, headers, body = await call(
        demo.ports["auth"], "POST", "/echo", {"content-type": "text/x-test"}, b"hello"
    )
    assert (status, body) == (200, b"hello")
    assert headers["content-type"] == "text/x-test"


async def test_chunked_upload_to_echo(demo: DemoServices) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    )
    responses = await raw_exchange(demo.ports["users"], request)
    assert [(r.status_code, body) for r, body in responses] == [(200, b"hello world")]


async def test_bytes_streams_chunked(demo: DemoServices) -> None:
    n = 200_000
    status, headers, body = await call(demo.ports["products"], "GET", f"/bytes/{n}")
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert body == (BYTES_PATTERN * (n // len(BYTES_PATTERN) + 1))[:n]
    status, _, body = await call(demo.ports["products"], "GET", "/bytes/0")
    assert (status, body) == (200, b"")
    assert (await call(demo.ports["products"], "GET", "/bytes/-1"))[0] == 400
    status, _, body = await call(demo.ports["products"], "HEAD", "/bytes/10")
    assert (status, body) == (200, b"")


# -- protocol behaviour of the mini server -------------------------------------------------


async def test_malformed_request_is_400_and_close(demo: DemoServices) -> None:
    responses = await raw_exchange(demo.ports["users"], b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert len(responses) == 1
    head, body = responses[0]
    assert head.status_code == 400
    assert (b"connection", b"close") in head.headers
    assert orjson.loads(body)["status"] == 400


async def test_keep_alive_two_requests_on_one_connection(demo: DemoServices) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", demo.ports["users"])
    client = h11.Connection(h11.CLIENT)
    bodies = []
    try:
        for path in ("/alice", "/bob"):
            writer.write(
                client.send(h11.Request(method="GET", target=path, headers=[("host", "x")]))
            )
            writer.write(client.send(h11.EndOfMessage()))
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            bodies.append(orjson.loads(body)["name"])
            client.start_next_cycle()  # raises unless the connection is reusable
    finally:
        writer.close()
        await writer.wait_closed()
    assert bodies == ["alice", "bob"]


async def test_pipelined_requests_answered_in_order(demo: DemoServices) -> None:
    data = (
        b"GET /bob HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /alice HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    responses = await raw_exchange(demo.ports["users"], data)
    assert [r.status_code for r, _ in responses] == [200, 200, 200]
    assert orjson.loads(responses[0][1])["name"] == "bob"
    assert responses[1][1] == b"abc"
    assert orjson.loads(responses[2][1])["name"] == "alice"


async def test_good_request_answered_before_bad_one(demo: DemoServices) -> None:
    data = b"GET /bob HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP\r\n\r\n"
    responses = await raw_exchange(demo.ports["users"], data)
    assert [r.status_code for r, _ in responses] == [200, 400]
    # The good answer keeps the connection open in its headers; the 400 carries the close.
    assert (b"connection", b"close") not in responses[0][0].headers
    assert (b"connection", b"close") in responses[1][0].headers


async def test_expect_100_continue(demo: DemoServices) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", demo.ports["auth"])
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ping")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await writer.wait_closed()


async def test_http10_closes_after_response(demo: DemoServices) -> None:
    responses = await raw_exchange(demo.ports["users"], b"GET /alice HTTP/1.0\r\n\r\n")
    assert responses[0][0].status_code == 200
    assert orjson.loads(responses[0][1])["name"] == "alice"


async def test_limits_and_handler_errors() -> None:
    async def broken_stream() -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("stream bug")

    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        if request.path == "/nocontent":
            return Response(204, [], b"ignored")
        if request.path == "/broken-stream":
            return Response(200, [], broken_stream())
        return Response.text(f"{len(request.body)}")

    server = await start_server(
        handler, "127.0.0.1", 0, limits=Limits(max_body_bytes=10, max_header_count=3)
    )
    try:
        status, _, body = await call(server.port, "GET", "/boom")
        assert status == 500
        assert orjson.loads(body)["error"] == "internal error"
        # 204: no body and no framing headers; the connection stays usable.
        nocontent = (
            b"GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        responses = await raw_exchange(server.port, nocontent)
        assert [(r.status_code, b) for r, b in responses] == [(204, b""), (200, b"0")]
        assert not any(
            name in (b"content-length", b"transfer-encoding") for name, _ in responses[0][0].headers
        )
        # A body iterator failing mid-stream drops the connection: no terminating chunk.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /broken-stream HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await reader.read()
        assert raw.endswith(b"5\r\nfirst\r\n")
        writer.close()
        await writer.wait_closed()
        # Chunked bodies are bounded as they arrive.
        chunked = (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
        )
        responses = await raw_exchange(server.port, chunked)
        assert responses[0][0].status_code == 413
        long_uri = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await raw_exchange(server.port, long_uri))[0][0].status_code == 414
        many = b"GET / HTTP/1.1\r\nHost: x\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n"
        assert (await raw_exchange(server.port, many))[0][0].status_code == 431
    finally:
        await server.close()


async def test_close_drops_idle_keep_alive_connections() -> None:
    services = await start_demo_services()
    reader, writer = await asyncio.open_connection("127.0.0.1", services.ports["users"])
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b'"ok"')
    await services.close()  # must not wait for the idle keep-alive connection
    rest = await reader.read()  # the end of the body, then EOF from the server's close
    assert rest.endswith(b"}")
    assert reader.at_eof()
    writer.close()
    await writer.wait_closed()


async def test_ports_mapping() -> None:
    with pytest.raises(ValueError, match="unknown demo service"):
        await start_demo_services(ports={"billing": 0})
    with pytest.raises(ValueError, match="at least 32 bytes"):
        await start_demo_services(jwt_secret="short")
    with pytest.raises(ValueError, match="product_versions"):
        await start_demo_services(product_versions=())
    assert set(DEMO_PORTS) >= {"users", "auth", "products-blue"}


def test_on_uvloop() -> None:
    """The process runs on uvloop, whose transports differ from asyncio's: run the core
    protocol paths there too (a sync test owning its own uvloop loop)."""

    async def scenario() -> None:
        services = await start_demo_services(jwt_secret=SECRET)
        try:
            port = services.ports["users"]
            data = (
                b"GET /bob HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\n\r\n"
                b"GET /bytes/70000 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"BROKEN\r\n\r\n"
            )
            responses = await raw_exchange(port, data)
            assert [r.status_code for r, _ in responses] == [200, 200, 200, 400]
            assert responses[1][1] == b"abc"
            assert len(responses[2][1]) == 70000
            # A refused upload still gets its 413 (lingering close, no RST).
            status, _, _ = await call(port, "POST", "/echo", None, b"x" * (2 << 20))
            assert status == 413
        finally:
            await services.close()

    uvloop.run(scenario())
