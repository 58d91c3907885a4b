"""The express lane end to end, over real loopback sockets, against the general path.

The express lane (``fastedge.proxy``, ``ClientConnection._express``) must be invisible:
every byte the origin receives and every byte the client receives is the same as with
``server.express = false``. A scripted in-test origin records every byte per connection
and answers per path (whole, in pieces, chunked, close-delimited, 1xx first, never, or by
closing), so each scenario runs twice, express on and off, and the two byte streams are
compared; ``server.express_lane.served`` / ``.promoted`` prove which lane was taken.

The first request of a proxy finds the upstream pool empty and takes the general path
(it connects); every scenario therefore warms the pool with one request first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import orjson
import pytest

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import Client, Response
from tests.raw_client import RawClient

MakeProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]

# --- a scripted origin ------------------------------------------------------------------


@dataclass
class OriginConn:
    """One connection the origin accepted: every byte received, the request heads in
    order, and whether the proxy closed it."""

    index: int
    transport: asyncio.Transport
    data: bytearray = field(default_factory=bytearray)
    heads: list[bytes] = field(default_factory=list)
    closed: bool = False


BIG_BODY = 50_000
"""Large, yet one TCP segment on loopback (MSS 65483): it arrives in one read."""


def _response(status: bytes, fields: list[bytes], body: bytes, head_request: bool) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    return head if head_request else head + body


class ScriptedOrigin:
    """An HTTP/1.1 origin on 127.0.0.1 answering bodiless requests by the first segment
    of the request path:

    * ``split``: the head, then the body 100 ms later (two writes);
    * ``slow``: the whole response 100 ms after the request; ``held``: the whole
      response when the test calls :meth:`release`;
    * ``chunked``: a chunked body in one write (on the lane since session 16);
      ``chunkedsplit``: the head and the first chunk, the rest 100 ms later;
      ``tabchunked``: ``Transfer-Encoding: chunked`` and a tab (llhttp then reads the
      body until close); ``eof``:
      no Content-Length, the body ends at close;
    * ``interim``: ``100`` and ``103`` in one write, the final response 100 ms later;
    * ``never``: no answer; ``drop``: closes the connection after reading the request;
    * ``stale``: closes the connection when it is not its first request (a pooled
      connection the origin timed out), else answers;
    * ``hdrs``: a response with many fields (hop-by-hop, Via, X-Request-Id, Set-Cookie);
    * ``nocontent``: 204; ``notmod``: 304 with a Content-Length; ``empty``:
      ``Content-Length: 0``; ``http10``: an HTTP/1.0 response; ``extra``: a response
      followed by bytes nobody asked for; ``interim1``: ``100`` and the response in one
      write; ``big``: a 50 kB body in one write;
    * ``closing``: ``Connection: close`` then closes;
    * anything else: a fixed 200 with a Content-Length body naming the target.
    """

    def __init__(self) -> None:
        self.conns: list[OriginConn] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handles: list[asyncio.TimerHandle] = []
        self.held: list[tuple[OriginConn, bytes]] = []

    def release(self) -> None:
        """Send the answers to the ``held`` requests."""
        for conn, data in self.held:
            if not conn.transport.is_closing():
                conn.transport.write(data)
        self.held.clear()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _OriginProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for handle in self._handles:
            handle.cancel()
        for conn in self.conns:
            conn.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def heads(self) -> list[tuple[int, bytes]]:
        """Every request head received, with the index of its connection."""
        return [(c.index, h) for c in self.conns for h in c.heads]

    def stream(self) -> list[bytes]:
        """Every byte received, per connection."""
        return [bytes(c.data) for c in self.conns]

    def later(self, delay: float, conn: OriginConn, data: bytes) -> None:
        def write() -> None:
            if not conn.transport.is_closing():
                conn.transport.write(data)

        self._handles.append(asyncio.get_running_loop().call_later(delay, write))

    def answer(self, conn: OriginConn, head: bytes) -> None:
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
        is_head = method == b"HEAD"
        kind = target.split(b"?", 1)[0].split(b"/")[1]
        t = conn.transport
        body = b"fixed body for " + target + b"\n"
        plain = [b"Content-Type: text/plain", b"Content-Length: %d" % len(body)]
        whole = _response(b"200 OK", plain, body, is_head)
        if kind == b"split":
            head_part = _response(b"200 OK", plain, b"", True)
            t.write(head_part)
            if not is_head:
                self.later(0.1, conn, body)
        elif kind == b"slow":
            self.later(0.1, conn, whole)
        elif kind == b"chunked":
            chunked = b"6\r\nfixed \r\n4\r\nbody\r\n0\r\n\r\n"
            t.write(_response(b"200 OK", [b"Transfer-Encoding: chunked"], chunked, is_head))
        elif kind == b"chunkedsplit":
            t.write(
                _response(b"200 OK", [b"Transfer-Encoding: chunked"], b"6\r\nfixed \r\n", is_head)
            )
            if not is_head:
                self.later(0.1, conn, b"4\r\nbody\r\n0\r\n\r\n")
        elif kind == b"tabchunked":
            chunked = b"6\r\nfixed \r\n4\r\nbody\r\n0\r\n\r\n"
            t.write(_response(b"200 OK", [b"Transfer-Encoding: chunked\t"], chunked, is_head))
        elif kind == b"eof":
            t.write(_response(b"200 OK", [b"Content-Type: text/plain"], body, is_head))
            t.close()
        elif kind == b"interim":
            t.write(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
            )
            self.later(0.1, conn, whole)
        elif kind == b"held":
            self.held.append((conn, whole))
        elif kind == b"never":
            pass
        elif kind == b"drop":
            t.close()
        elif kind == b"stale":
            if len(conn.heads) > 1:
                t.close()
            else:
                t.write(whole)
        elif kind == b"hdrs":
            fields = [
                b"Server: scripted",
                b"Content-Type: text/plain; charset=utf-8",
                b"Cache-Control: max-age=60",
                b"Set-Cookie: a=1; Path=/",
                b"Set-Cookie: b=2",
                b"Via: 1.0 origin-cache",
                b"X-Request-Id: from-origin",
                b"x-request-id: second-dropped",
                b"Connection: keep-alive",
                b"Keep-Alive: timeout=5",
                b"X-Spaced: \t padded value \t",
                b"Content-Length: %d" % len(body),
                b"X-Empty:",
            ]
            t.write(_response(b"200 OK", fields, body, is_head))
        elif kind == b"notmod":
            fields = [b'ETag: "v1"', b"Content-Length: %d" % len(body)]
            t.write(_response(b"304 Not Modified", fields, b"", True))
        elif kind == b"empty":
            t.write(_response(b"200 OK", [b"Content-Length: 0"], b"", is_head))
        elif kind == b"http10":
            t.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            if not is_head:
                t.write(body)
        elif kind == b"extra":
            t.write(whole + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        elif kind == b"interim1":
            t.write(b"HTTP/1.1 100 Continue\r\n\r\n" + whole)
        elif kind == b"big":
            big = b"b" * BIG_BODY
            t.write(_response(b"200 OK", [b"Content-Length: %d" % len(big)], big, is_head))
        elif kind == b"nocontent":
            t.write(_response(b"204 No Content", [b"X-Origin: 1"], b"", True))
        elif kind == b"closing":
            t.write(_response(b"200 OK", [*plain, b"Connection: close"], body, is_head))
            t.close()
        else:
            t.write(whole)


class _OriginProtocol(asyncio.Protocol):
    def __init__(self, origin: ScriptedOrigin) -> None:
        self.origin = origin
        self.buf = b""
        self.conn: OriginConn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = OriginConn(len(self.origin.conns), cast(asyncio.Transport, transport))
        self.origin.conns.append(self.conn)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        conn.data += data
        self.buf += data
        # Only bodiless requests come here: a head ends each one.
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[: end + 4], self.buf[end + 4 :]
            conn.heads.append(head)
            if not conn.transport.is_closing():
                self.origin.answer(conn, head)

    def eof_received(self) -> bool:
        assert self.conn is not None
        self.conn.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.conn is not None
        self.conn.closed = True


class StartableOrigin(Protocol):
    """An in-test origin: listens on :meth:`start`, drops everything on :meth:`close`."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


OriginT = TypeVar("OriginT", bound=StartableOrigin)


@contextlib.asynccontextmanager
async def started_origins(
    make: Callable[..., OriginT], *, release: bool = False
) -> AsyncIterator[Callable[..., Awaitable[OriginT]]]:
    """A factory of started origins, ``make(*args, **kw)`` each, every one closed at the
    end (with ``release``, its held answers are released first)."""
    origins: list[OriginT] = []

    async def start(*args: Any, **kw: Any) -> OriginT:
        origin = make(*args, **kw)
        await origin.start()
        origins.append(origin)
        return origin

    try:
        yield start
    finally:
        for origin in origins:
            if release:
                origin.release()  # type: ignore[attr-defined]
            await origin.close()


@pytest.fixture
async def new_origin() -> AsyncIterator[Callable[[], Awaitable[ScriptedOrigin]]]:
    """``await new_origin()``: a started scripted origin, closed at the end."""
    async with started_origins(ScriptedOrigin) as start:
        yield start


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A failure inside a protocol callback is only logged (by fastedge or by the event
    loop), never raised into the test: any ERROR record fails the test."""
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- helpers ----------------------------------------------------------------------------


def document(
    origin: int, *, express: bool = True, server: dict[str, Any] | None = None, **upstream: Any
) -> dict[str, Any]:
    """A config document routing everything to the scripted origin (a catch-all, a
    strip_prefix, a rewrite, a host and a methods route); ``upstream`` holds extra keys
    of the upstream."""
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "http": "fast",
            "access_log": False,
            "express": express,
            **(server or {}),
        },
        "admin": {"enabled": False},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"], **upstream}},
        "routes": [
            {"prefix": "/", "upstream": "origin"},
            {"prefix": "/api/users", "upstream": "origin", "strip_prefix": True},
            {"prefix": "/v1", "upstream": "origin", "rewrite": "/echo"},
            {"prefix": "/", "host": "api.example.test", "upstream": "origin", "rewrite": "/h/"},
            {"prefix": "/get-only", "methods": ["GET"], "upstream": "origin", "rewrite": "/g"},
        ],
    }


def request(target: str, rid: str, extra: str = "", method: str = "GET") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: example.test\r\nX-Request-Id: {rid}\r\n{extra}\r\n"
    ).encode()


WARM = request("/warm", "warm-0")


def lane_counts(server: ProxyServer) -> tuple[int, int]:
    lane = server.express_lane
    return int(lane.served), int(lane.promoted)


def pool_stats(server: ProxyServer) -> list[dict[str, int]]:
    return [t.pool.stats() for up in server.gateway.upstreams.values() for t in up.targets]


async def warm(server: ProxyServer) -> None:
    """One request on its own connection: the upstream pool then holds an idle
    connection, so the next simple request can take the express lane."""
    client = await Client.open(server.port)
    try:
        await client.send(WARM)
        assert (await client.read_response()).status == 200
    finally:
        await client.close()
    assert pool_stats(server)[0]["idle"] == 1


async def warm_proxy(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> tuple[ScriptedOrigin, ProxyServer]:
    """A scripted origin and a proxy on :func:`document`'s routes to it, warmed."""
    origin = await new_origin()
    proxy = await make_proxy(document(origin.port))
    await warm(proxy)
    return origin, proxy


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait (bounded) until ``check()``: for what another connection does next."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def until_heads(
    origin: ScriptedOrigin, count: int, transport: asyncio.BaseTransport | None = None
) -> None:
    """Wait until the origin received ``count`` requests (or ``transport`` closes)."""

    def reached() -> bool:
        return len(origin.heads()) >= count or (transport is not None and transport.is_closing())

    await eventually(reached)


@dataclass
class Run:
    """What one proxy (express on or off) did with a sequence of requests."""

    responses: list[Response]
    raw: list[bytes]
    origin_heads: list[tuple[int, bytes]]
    origin_stream: list[bytes]
    served: int
    promoted: int
    server: ProxyServer
    origin: ScriptedOrigin


async def run_sequence(
    make_proxy: MakeProxy,
    new_origin: Callable[[], Awaitable[ScriptedOrigin]],
    requests: list[tuple[bytes, bytes]],
    *,
    express: bool,
    server: dict[str, Any] | None = None,
    **upstream: Any,
) -> Run:
    """Warm the pool, then send ``requests`` ((bytes, method) pairs) one after the other
    on one client connection, opening a new one after each response that closes it."""
    origin = await new_origin()
    proxy = await make_proxy(document(origin.port, express=express, server=server, **upstream))
    assert proxy.express_lane.enabled is express
    client = await RawClient.open(proxy.port)
    responses: list[Response] = []
    raws: list[bytes] = []
    try:
        for data, method in [(WARM, b"GET"), *requests]:
            client, resp, raw = await client.exchange_on(proxy.port, data, method=method)
            responses.append(resp)
            raws.append(raw)
    finally:
        await client.close()
    served, promoted = lane_counts(proxy)
    return Run(
        responses[1:],
        raws[1:],
        origin.heads(),
        origin.stream(),
        served,
        promoted,
        proxy,
        origin,
    )


FRESH_ID = re.compile(rb"[0-9a-f]{22,}")
"""A request id the proxy made up (12 random hex digits and a counter)."""


async def both(
    make_proxy: MakeProxy,
    new_origin: Callable[[], Awaitable[ScriptedOrigin]],
    requests: list[tuple[bytes, bytes]],
    *,
    fresh_ids: bool = False,
    **kw: Any,
) -> tuple[Run, Run]:
    """The same sequence with express off (the reference) and on; asserts both byte
    streams are identical (``fresh_ids``: up to the ids the proxy made up)."""
    general = await run_sequence(make_proxy, new_origin, requests, express=False, **kw)
    express = await run_sequence(make_proxy, new_origin, requests, express=True, **kw)
    assert general.served == 0

    def norm(data: bytes) -> bytes:
        return FRESH_ID.sub(b"<id>", data) if fresh_ids else data

    assert [(i, norm(h)) for i, h in express.origin_heads] == [
        (i, norm(h)) for i, h in general.origin_heads
    ]
    assert [norm(x) for x in express.origin_stream] == [norm(x) for x in general.origin_stream]
    for i, (got, want) in enumerate(zip(express.raw, general.raw, strict=True)):
        assert norm(got) == norm(want), (i, requests[i][0])
    return express, general


# --- 1. parity ----------------------------------------------------------------------------

PARITY: list[tuple[bytes, bytes]] = [
    (request("/plain", "p-1"), b"GET"),
    (request("/plain?x=1&y=%20z&empty=", "p-2"), b"GET"),
    (
        request(
            "/fwd",
            "p-3",
            "X-Forwarded-For: 10.0.0.1\r\nVia: 1.0 client-proxy\r\n"
            "X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n",
        ),
        b"GET",
    ),
    (
        request(
            "/hop",
            "p-4",
            "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
            "Proxy-Connection: keep-alive\r\nTrailer: x\r\nX-Kept: yes\r\n",
        ),
        b"GET",
    ),
    (request("/plain", "p-5", method="HEAD"), b"HEAD"),
    (request("/api/users/42?q=1", "p-6"), b"GET"),
    (request("/api/users", "p-7"), b"GET"),
    (request("/v1/a/b?z=2", "p-8"), b"GET"),
    (request("/hdrs", "p-9"), b"GET"),
    (request("/hdrs", "p-10", method="HEAD"), b"HEAD"),
    (request("/nocontent", "p-11"), b"GET"),
    (
        request(
            "/case",
            "p-12",
            "user-AGENT:  test/1.0 \r\nAccept: */*\r\nX-Empty:\r\nX-Tab:\tv\t\r\n"
            "Cookie: a=1; b=2\r\nX-Request-Id: second-id\r\n",
        ),
        b"GET",
    ),
    # The client's first X-Request-Id is too long to keep: the next valid one is used.
    (
        b"GET /ids HTTP/1.1\r\nHost: example.test\r\nX-Request-Id: "
        + b"x" * 201
        + b"\r\nX-Request-Id: p-13\r\n\r\n",
        b"GET",
    ),
    (b"GET /port HTTP/1.1\r\nHOST: Example.Test:8080\r\nx-request-id: p-14\r\n\r\n", b"GET"),
    (request("/bye", "p-15", "Connection: close\r\n"), b"GET"),
    (request("/after-close", "p-16"), b"GET"),
    (request("/bye", "p-17", "Connection: close\r\n", method="HEAD"), b"HEAD"),
    (b"GET /x?y HTTP/1.1\r\nHost: API.example.test\r\nX-Request-Id: p-18\r\n\r\n", b"GET"),
    (b"GET /x HTTP/1.1\r\nHost: api.example.test:80\r\nX-Request-Id: p-19\r\n\r\n", b"GET"),
    (request("/get-only/1", "p-20"), b"GET"),
    (request("/get-only/1", "p-21", method="HEAD"), b"HEAD"),  # the catch-all route
    (request("/notmod", "p-22", 'If-None-Match: "v1"\r\n'), b"GET"),
    (request("/empty", "p-23"), b"GET"),
    (request("/big", "p-24"), b"GET"),
    (request("/big", "p-25", method="HEAD"), b"HEAD"),
    (request("/p%2Fq/%7e;a=b/:@!$&'()*+,=", "p-26"), b"GET"),
    # Last: the origin closes this connection, so the next request would connect.
    (request("/closing", "p-27"), b"GET"),
]


async def test_parity_with_an_upstream_host_header(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """An upstream with its own ``host_header``: the lane drops the client's Host and
    writes the upstream's after the request id, byte for byte as the general path."""
    express, _ = await both(make_proxy, new_origin, PARITY, host_header="backend.internal:8080")
    assert (express.served, express.promoted) == (len(PARITY), 0)
    heads = [h for _, h in express.origin_heads[1:]]
    for head in heads:
        assert head.count(b"\r\nhost: ") == 1
        assert head.endswith(b"\r\nhost: backend.internal:8080\r\n\r\n")
    # The client's Host still chose the route (the host route rewrites to /h/...).
    assert heads[17].startswith(b"GET /h/x?y HTTP/1.1\r\n")
    assert b"\r\nx-forwarded-host: example.test\r\n" in heads[0]


@pytest.mark.parametrize(
    "server",
    [
        {},
        {"keepalive_timeout": "0s"},
        {"max_requests_per_connection": 3},
        {"proxy_name": "edge-7"},
    ],
    ids=["default", "keepalive_off", "max_requests_3", "proxy_name"],
)
async def test_parity_with_the_general_path(
    make_proxy: MakeProxy,
    new_origin: Callable[[], Awaitable[ScriptedOrigin]],
    server: dict[str, Any],
) -> None:
    express, _ = await both(make_proxy, new_origin, PARITY, server=server)
    # Every request took the express lane and none needed the general path.
    assert (express.served, express.promoted) == (len(PARITY), 0)
    # All on the one upstream connection the warm-up opened.
    assert {i for i, _ in express.origin_heads} == {0}
    assert len(express.origin_heads) == len(PARITY) + 1
    # Independent checks of what both lanes sent (not only that they agree).
    via = b"1.1 " + server.get("proxy_name", "fastedge").encode()
    rids = [rid.decode() for rid in _rids(PARITY)]
    heads = dict(zip(rids, [h for _, h in express.origin_heads[1:]], strict=True))
    fwd = heads["p-3"]
    assert b"\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n" in fwd
    assert b"\r\nvia: 1.0 client-proxy, " + via + b"\r\n" in fwd
    assert b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: example.test\r\n" in fwd
    assert b"evil.test" not in fwd and b"https" not in fwd
    hop = heads["p-4"].lower()
    for gone in (b"\r\nkeep-alive:", b"\r\nte:", b"\r\nproxy-connection:", b"\r\ntrailer:"):
        assert gone not in hop
    assert b"\r\nx-kept: yes\r\n" in hop
    assert heads["p-6"].startswith(b"GET /42?q=1 HTTP/1.1\r\n")
    assert heads["p-7"].startswith(b"GET / HTTP/1.1\r\n")
    assert heads["p-8"].startswith(b"GET /echo/a/b?z=2 HTTP/1.1\r\n")
    assert heads["p-13"].endswith(b"\r\nx-request-id: p-13\r\n\r\n")
    assert heads["p-12"].count(b"x-request-id") == 1
    assert heads["p-18"].startswith(b"GET /h/x?y HTTP/1.1\r\n")
    assert heads["p-20"].startswith(b"GET /g/1 HTTP/1.1\r\n")
    assert heads["p-21"].startswith(b"HEAD /get-only/1 HTTP/1.1\r\n")
    by_rid = dict(zip(rids, express.responses, strict=True))
    hdrs = by_rid["p-9"]
    assert hdrs.header("x-request-id") == b"from-origin"
    assert hdrs.header("via") == b"1.0 origin-cache, " + via
    assert hdrs.header("keep-alive") is None
    assert hdrs.header_all("set-cookie") == [b"a=1; Path=/", b"b=2"]
    assert by_rid["p-10"].body == b""
    assert by_rid["p-10"].header("content-length") == b"%d" % len(b"fixed body for /hdrs\n")
    assert by_rid["p-11"].status == 204
    assert by_rid["p-15"].header("connection") == b"close"
    assert by_rid["p-22"].status == 304
    assert len(by_rid["p-24"].body) == BIG_BODY
    assert by_rid["p-1"].body == b"fixed body for /plain\n"
    assert by_rid["p-1"].header("x-request-id") == b"p-1"


def _rids(requests: list[tuple[bytes, bytes]]) -> list[bytes]:
    out = []
    for data, _ in requests:
        for line in data.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"x-request-id" and 0 < len(value.strip()) <= 200:
                out.append(value.strip())
                break
    return out


def _get(target: bytes, fields: bytes, method: bytes = b"GET") -> tuple[bytes, bytes]:
    return method + b" " + target + b" HTTP/1.1\r\n" + fields + b"\r\n", method


REFUSED: list[tuple[bytes, bytes]] = [
    _get(b"/r1", b"Host: example.test\r\nContent-Length: 0, 0\r\nX-Request-Id: r-1\r\n"),
    _get(b"/r2", b"Host: example.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"),
    _get(b"/r3", b"Host: example.test\r\nExpect: 100-continue\r\nX-Request-Id: r-3\r\n"),
    _get(b"/r4", b"Host: example.test\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"),
    _get(b"/r5", b"Host: example.test\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n"),
    _get(b"/r6", b"Host: example.test\r\nVia: 1.0 a\r\nVia: 1.0 b\r\n"),
    _get(b"/r7", b"Host: example.test\r\nX-Utf8: caf\xc3\xa9\r\n"),
    _get(b"/r8", b"Host: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"),
    _get(b"http://example.test/r9", b"Host: example.test\r\n"),
    _get(b"/r10", b"Host: example.test\r\n", method=b"PROPFIND"),
    _get(b"/r11", b"Host: example.test\r\n", method=b"TRACE"),
    (b"GET /r12 HTTP/1.0\r\nHost: example.test\r\nX-Request-Id: r-12\r\n\r\n", b"GET"),
    _get(b"/r13", b"Host: example.test\r\nConnection: close, keep-alive\r\n"),
    _get(b"/r14", b"Host: a.test\r\nHost: b.test\r\n"),  # 400, closes
    _get(b"/r15", b"X-Request-Id: r-15\r\n"),  # no Host: 400
    _get(b"/r16", b"Host: example.test\r\nX-Folded: a\r\n b\r\n"),  # obs-fold: 400
    _get(b"/r17", b"Host : example.test\r\n"),  # space before the colon: 400
    (b"GET  /r18 HTTP/1.1\r\nHost: example.test\r\n\r\n", b"GET"),
    _get(b"/r19|x", b"Host: example.test\r\n"),
    (b"GET /r20 HTTP/1.1\nHost: example.test\n\n", b"GET"),
]


async def test_parity_for_requests_the_lane_refuses(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """Anything unusual goes to the general path: the lane takes none of these (the
    answers, 200s and 400s, are the general path's own)."""
    express, _ = await both(make_proxy, new_origin, REFUSED, fresh_ids=True)
    assert (express.served, express.promoted) == (0, 0)
    statuses = [r.status for r in express.responses]
    assert 400 in statuses and 200 in statuses


async def test_bodiless_requests_of_other_methods_take_the_lane(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """OPTIONS, DELETE and a GET with ``Content-Length: 0`` (refused before session 17;
    tests/test_express_body.py has the requests with bodies): on the lane, same bytes."""
    reqs = [
        _get(b"/m1", b"Host: example.test\r\nContent-Length: 0\r\nX-Request-Id: m-1\r\n"),
        _get(b"/m2", b"Host: example.test\r\nX-Request-Id: m-2\r\n", method=b"OPTIONS"),
        _get(b"/m3", b"Host: example.test\r\nX-Request-Id: m-3\r\n", method=b"DELETE"),
    ]
    express, _ = await both(make_proxy, new_origin, reqs)
    assert (express.served, express.promoted) == (3, 0)
    assert [r.status for r in express.responses] == [200, 200, 200]


async def test_chunked_then_a_tab_is_refused_not_relayed_raw(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """``Transfer-Encoding: chunked<TAB>``: llhttp frames that body as read-until-close.
    Both lanes answer 502 (the lane declines it; the general path refuses the field)
    rather than relaying the chunk framing as the body, and the next request works."""
    reqs = [(request("/tabchunked", "t-1"), b"GET"), (request("/next", "t-2"), b"GET")]
    express, _ = await both(make_proxy, new_origin, reqs)
    first, after = express.responses
    assert first.status == 502
    assert b"fixed" not in first.body
    assert (after.status, after.body) == (200, b"fixed body for /next\n")
    assert express.promoted == 1


# --- 2. promotion: the general path takes over after the request was sent ------------------


@pytest.mark.parametrize(
    ("target", "method", "extra", "status", "body", "served"),
    [
        ("/split", b"GET", "", 200, b"fixed body for /split\n", 2),
        ("/split", b"GET", "Connection: close\r\n", 200, b"fixed body for /split\n", 2),
        ("/slow", b"HEAD", "", 200, b"", 2),
        ("/chunked", b"GET", "", 200, b"fixed body", 2),  # whole: served on the lane
        ("/chunkedsplit", b"GET", "", 200, b"fixed body", 2),
        ("/chunked", b"HEAD", "", 200, b"", 2),
        ("/eof", b"GET", "", 200, b"fixed body for /eof\n", 1),
        ("/interim", b"GET", "", 200, b"fixed body for /interim\n", 2),
        ("/interim1", b"GET", "", 200, b"fixed body for /interim1\n", 2),
        ("/http10", b"GET", "", 200, b"fixed body for /http10\n", 1),
        ("/extra", b"GET", "", 200, b"fixed body for /extra\n", 1),
        ("/stale", b"GET", "", 200, b"fixed body for /stale\n", 2),
    ],
)
@pytest.mark.parametrize(
    "upstream", [{}, {"host_header": "backend.internal"}], ids=["client_host", "host_header"]
)
async def test_promoted_responses_match_the_general_path(
    make_proxy: MakeProxy,
    new_origin: Callable[[], Awaitable[ScriptedOrigin]],
    target: str,
    method: bytes,
    extra: str,
    status: int,
    body: bytes,
    served: int,
    upstream: dict[str, Any],
) -> None:
    """``upstream``: with its own ``host_header``, the promoted exchange's fields (a
    retry resends them: ``/stale``) carry the upstream's Host as the lane wrote it."""
    reqs = [
        (request(target, "t-1", extra, method=method.decode()), method),
        (request("/next", "t-2"), b"GET"),  # the connection is still usable
    ]
    express, _ = await both(make_proxy, new_origin, reqs, **upstream)
    first, after = express.responses
    assert (first.status, first.body, first.informational) == (status, body, [])
    assert first.header("x-request-id") == b"t-1"
    assert first.header("connection") == (b"close" if extra else None)
    assert (after.status, after.body) == (200, b"fixed body for /next\n")
    # The request went out on the express lane, and the general path finished it (if
    # the upstream connection survived, the next request took the lane again).
    # /slow: whole, just late; /chunked: a whole chunked body, re-framed by the lane;
    # /split: the head, then the rest of its Content-Length body, relayed by the lane.
    lane_only = target in ("/slow", "/split") or (target, method) == ("/chunked", b"GET")
    promoted = 0 if lane_only else 1
    assert (express.served, express.promoted) == (served, promoted)
    if target == "/stale":
        # The pooled connection closed without answering: one retry on a fresh one,
        # carrying exactly the bytes the express lane had sent.
        (c0, stale), (c1, retried) = express.origin_heads[1:3]
        assert (c0, c1) == (0, 1)
        assert stale == retried


async def test_retry_keeps_the_request_id_made_up_by_the_lane(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """No X-Request-Id from the client: the id the lane made up is the one the retry
    sends and the one the client gets."""
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    client = await Client.open(proxy.port)
    try:
        await client.send(b"GET /stale HTTP/1.1\r\nHost: example.test\r\n\r\n")
        resp = await client.read_response()
    finally:
        await client.close()
    assert resp.status == 200
    assert lane_counts(proxy) == (1, 1)
    (_, sent), (_, retried) = origin.heads()[1:]
    assert sent == retried
    rid = resp.header("x-request-id")
    assert rid is not None and FRESH_ID.fullmatch(rid)
    assert sent.endswith(b"\r\nx-request-id: " + rid + b"\r\n\r\n")


async def test_response_timeout_answers_504(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    reqs = [(request("/never", "t-504"), b"GET"), (request("/next", "t-2"), b"GET")]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    express, _ = await both(make_proxy, new_origin, reqs, pool={"response_timeout": "300ms"})
    assert loop.time() - t0 >= 0.6  # both runs waited for the timeout
    resp = express.responses[0]
    assert resp.status == 504
    assert resp.header("content-type") == b"application/json"
    assert orjson.loads(resp.body) == {
        "error": "upstream timed out",
        "status": 504,
        "request_id": "t-504",
    }
    assert express.responses[1].status == 200
    assert (express.served, express.promoted) == (1, 1)
    # The connection that never answered was not reused.
    assert express.origin.conns[0].closed
    assert [i for i, _ in express.origin_heads] == [0, 0, 1]


async def test_timeout_is_measured_from_the_request(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """An express request started long after the connection's timer was armed still
    gets its whole response timeout (no earlier 504), and no more than that."""
    origin = await new_origin()
    proxy = await make_proxy(document(origin.port, pool={"response_timeout": "300ms"}))
    await warm(proxy)
    client = await Client.open(proxy.port)
    loop = asyncio.get_running_loop()
    try:
        await client.send(request("/plain", "a"))
        assert (await client.read_response()).status == 200
        await asyncio.sleep(0.2)  # idle, part-way to the armed re-check
        t0 = loop.time()
        await client.send(request("/never", "b"))
        resp = await client.read_response()
        waited = loop.time() - t0
    finally:
        await client.close()
    assert resp.status == 504
    assert 0.28 <= waited < 1.5, waited  # its own timeout: not earlier, not much later
    assert lane_counts(proxy) == (2, 1)


async def test_pipelined_request_during_express(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    client = await RawClient.open(proxy.port)
    try:
        await client.send(request("/held/1", "pipe-1"))
        # The first request is in flight (the origin has it and holds its answer)...
        await until_heads(origin, 2)
        assert lane_counts(proxy) == (1, 0)
        # ...when the client sends the next one: the general path takes over.
        await client.send(request("/p2", "pipe-2"))
        await eventually(lambda: lane_counts(proxy) == (1, 1))
        origin.release()
        first = await client.read_response()
        second = await client.read_response()
    finally:
        await client.close()
    assert (first.status, first.body) == (200, b"fixed body for /held/1\n")
    assert first.header("x-request-id") == b"pipe-1"
    assert (second.status, second.body) == (200, b"fixed body for /p2\n")
    assert second.header("x-request-id") == b"pipe-2"
    assert lane_counts(proxy) == (1, 1)
    # Both went upstream, in order, on the one pooled connection.
    targets = [h.split(b" ")[1] for _, h in origin.heads()]
    assert targets == [b"/warm", b"/held/1", b"/p2"]
    assert {i for i, _ in origin.heads()} == {0}


async def test_client_reset_during_express(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    bystander = await Client.open(proxy.port)  # another client, connected throughout
    # A plain blocking socket, so the reset can be forced (SO_LINGER 0: RST, not FIN).
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        sock.sendall(request("/never", "gone-1"))
        await until_heads(origin, 2)
        assert lane_counts(proxy) == (1, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    # The proxy let the upstream connection go instead of returning it to the pool.
    await eventually(lambda: origin.conns[0].closed)
    assert lane_counts(proxy) == (1, 1)
    assert pool_stats(proxy)[0] == {"idle": 0, "active": 0, "waiting": 0}
    try:
        await bystander.send(request("/still", "by-1"))
        resp = await bystander.read_response()
        assert (resp.status, resp.body) == (200, b"fixed body for /still\n")
    finally:
        await bystander.close()
    fresh = await Client.open(proxy.port)
    try:
        await fresh.send(request("/fresh", "by-2"))
        assert (await fresh.read_response()).status == 200
    finally:
        await fresh.close()
    assert [i for i, _ in origin.heads()] == [0, 0, 1, 1]


async def test_client_half_close_during_express_still_answered(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    client = await Client.open(proxy.port)
    try:
        await client.send(request("/held/h", "half-1"))
        await until_heads(origin, 2)
        client.writer.write_eof()
        await eventually(lambda: lane_counts(proxy) == (1, 1))
        origin.release()
        resp = await client.read_response()
        assert (resp.status, resp.body) == (200, b"fixed body for /held/h\n")
        assert await client.is_closed()
    finally:
        await client.close()
    assert lane_counts(proxy) == (1, 1)
    assert pool_stats(proxy)[0]["idle"] == 1  # the response was complete: reusable


async def test_upstream_drops_fresh_connection_gives_502(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """The origin closes every connection without answering: one retry on a fresh
    connection (which also closes), then 502, as on the general path."""
    reqs = [(request("/drop", "d-1"), b"GET"), (request("/next", "d-2"), b"GET")]
    express, _ = await both(make_proxy, new_origin, reqs)
    assert express.responses[0].status == 502
    assert express.responses[1].status == 200
    assert express.promoted == 1
    assert [i for i, _ in express.origin_heads] == [0, 0, 1, 2]


# --- 3. connection management -------------------------------------------------------------


async def test_client_connection_close(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    client = await RawClient.open(proxy.port)
    try:
        resp, raw = await client.exchange(request("/c", "close-1", "Connection: close\r\n"))
        assert resp.status == 200
        assert resp.header("connection") == b"close"
        assert raw.endswith(b"\r\nconnection: close\r\n\r\nfixed body for /c\n")
        assert await client.is_closed()
    finally:
        await client.close()
    assert lane_counts(proxy) == (1, 0)
    # Connection: close is hop-by-hop: the upstream connection stays pooled.
    assert b"connection" not in origin.heads()[1][1].lower()
    assert pool_stats(proxy)[0]["idle"] == 1


async def test_max_requests_per_connection(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin = await new_origin()
    proxy = await make_proxy(document(origin.port, server={"max_requests_per_connection": 2}))
    await warm(proxy)
    client = await Client.open(proxy.port)
    try:
        await client.send(request("/m1", "m-1"))
        first = await client.read_response()
        assert first.status == 200 and first.header("connection") is None
        await client.send(request("/m2", "m-2"))
        second = await client.read_response()
        assert second.status == 200 and second.header("connection") == b"close"
        assert await client.is_closed()
    finally:
        await client.close()
    assert lane_counts(proxy) == (2, 0)


async def test_keep_alive_serves_many_on_one_connection(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin = await new_origin()
    proxy = await make_proxy(document(origin.port))
    client = await Client.open(proxy.port)
    try:
        for i in range(20):
            await client.send(request(f"/k{i}", f"k-{i}"))
            resp = await client.read_response()
            assert (resp.status, resp.body) == (200, f"fixed body for /k{i}\n".encode())
    finally:
        await client.close()
    # The first connected (general path); every later one took the express lane.
    assert lane_counts(proxy) == (19, 0)
    assert len(origin.conns) == 1


async def test_keepalive_timeout_after_express(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin = await new_origin()
    proxy = await make_proxy(document(origin.port, server={"keepalive_timeout": "200ms"}))
    await warm(proxy)
    client = await Client.open(proxy.port)
    loop = asyncio.get_running_loop()
    try:
        await client.send(request("/ka", "ka-1"))
        assert (await client.read_response()).status == 200
        t0 = loop.time()
        assert await client.is_closed(timeout=2)
        assert 0.15 <= loop.time() - t0 < 1.0
    finally:
        await client.close()
    assert lane_counts(proxy) == (1, 0)


async def test_large_responses_to_a_client_that_does_not_read(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """Responses pile up in the proxy's write buffer until the transport calls
    pause_writing, from inside the write of an express response: every response must
    still arrive whole, in order, once the client reads."""
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
    await eventually(lambda: len(proxy.connections) == 1)
    (conn,) = proxy.connections
    # Small kernel buffers on the proxy's side too: its own buffer fills after a few.
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    count = 4
    for i in range(count):
        await loop.sock_sendall(sock, request(f"/big/{i}", f"big-{i}"))
        await until_heads(origin, i + 2, conn.transport)
        assert not conn.transport.is_closing(), (
            f"the proxy dropped the connection (request {i} sent)"
        )
        await asyncio.sleep(0.02)  # the response is relayed before the next request
    assert conn.write_paused  # the case under test was reached
    reader, writer = await asyncio.open_connection(sock=sock)
    client = Client(reader, writer)
    try:
        for i in range(count):
            resp = await client.read_response(timeout=3)
            assert (resp.status, resp.header("x-request-id")) == (200, f"big-{i}".encode())
            assert resp.body == b"b" * BIG_BODY
    finally:
        await client.close()


# --- 4. eligibility ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["rate_limit", "tracing", "h11", "express_off", "hash_header"])
async def test_not_eligible_stays_on_the_general_path(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]], variant: str
) -> None:
    origin = await new_origin()
    doc = document(origin.port)
    if variant == "rate_limit":
        # RateLimit fields on every response: a response phase the lane does not have
        # (a plain local limit is on the lane: tests/test_express_chain.py).
        doc["rate_limits"] = {
            "p": {
                "algorithm": "sliding_window",
                "limit": 1000,
                "window": "10s",
                "headers": "always",
            }
        }
        doc["routes"][0]["rate_limit"] = "p"
    elif variant == "tracing":
        # Every trace sampled: recorded spans need the general path (unsampled ones take
        # the lane: tests/test_express_chain.py).
        doc["tracing"] = {"sample_ratio": 1.0, "memory_spans": 0}
    elif variant == "h11":
        doc["server"]["http"] = "h11"
    elif variant == "express_off":
        doc["server"]["express"] = False
    elif variant == "hash_header":  # a consistent-hash key in a header: the general path
        doc["upstreams"]["origin"].update(balance="consistent_hash", hash_key="header:x-k")
    proxy = await make_proxy(doc)
    client = await Client.open(proxy.port)
    try:
        for i in range(4):
            await client.send(request(f"/e{i}", f"e-{i}"))
            resp = await client.read_response()
            assert (resp.status, resp.body) == (200, f"fixed body for /e{i}\n".encode())
    finally:
        await client.close()
    assert lane_counts(proxy) == (0, 0)
    assert len(origin.conns) == 1  # the pool was warm: the lane was refused, not skipped


# --- 5. metrics ---------------------------------------------------------------------------


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            out.append((series, float(value)))
    return out


async def test_metrics(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    _, proxy = await warm_proxy(make_proxy, new_origin)
    client = await Client.open(proxy.port)
    try:
        for i in range(3):
            await client.send(request(f"/x{i}", f"x-{i}"))
            assert (await client.read_response()).status == 200
        await client.send(request("/x", "x-h", method="HEAD"))
        assert (await client.read_response(method=b"HEAD")).status == 200
        await client.send(request("/chunkedsplit", "x-s"))
        assert (await client.read_response()).status == 200
    finally:
        await client.close()
    assert lane_counts(proxy) == (5, 1)
    text = proxy.metrics.render().decode()
    assert _samples(text, "fastedge_express_requests_total") == [
        ("fastedge_express_requests_total", 5.0)
    ]
    assert _samples(text, "fastedge_express_promoted_total") == [
        ("fastedge_express_promoted_total", 1.0)
    ]
    assert "# TYPE fastedge_express_requests_total counter" in text
    totals = dict(_samples(text, "fastedge_requests_total"))
    get_200 = [v for s, v in totals.items() if 'method="GET"' in s and 'status="200"' in s]
    head_200 = [v for s, v in totals.items() if 'method="HEAD"' in s and 'status="200"' in s]
    assert get_200 == [5.0]  # the warm-up, three express, one promoted
    assert head_200 == [1.0]


# --- 6. access log ------------------------------------------------------------------------


async def test_access_log_lines_match_the_general_path(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]], tmp_path: Path
) -> None:
    reqs = [
        (request("/a?q=1", "log-1"), b"GET"),
        (request("/a", "log-2", method="HEAD"), b"HEAD"),
        (request("/nocontent", "log-3"), b"GET"),
        (request("/hdrs", "log-4"), b"GET"),
    ]
    lines: dict[bool, list[dict[str, Any]]] = {}
    for express in (False, True):
        log = tmp_path / f"access-{express}.log"
        run = await run_sequence(
            make_proxy, new_origin, reqs, express=express, server={"access_log": str(log)}
        )
        assert run.served == (len(reqs) if express else 0)
        assert run.server.access_log is not None
        run.server.access_log.flush()
        lines[express] = [orjson.loads(x) for x in log.read_bytes().splitlines()]
        # Each run has its own origin: the one field that differs by design.
        for line in lines[express]:
            assert line.pop("target") == f"http://127.0.0.1:{run.origin.port}"
    general, express_lines = lines[False], lines[True]
    assert len(general) == len(express_lines) == len(reqs) + 1
    timing = {"ts", "duration_ms", "upstream_ms"}
    for want, got in zip(general, express_lines, strict=True):
        assert list(got) == list(want)  # the same keys, in the same order
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in want.items() if k not in timing
        }
        assert isinstance(got["duration_ms"], float) and isinstance(got["upstream_ms"], float)
    assert [x["request_id"] for x in express_lines] == [
        "warm-0",
        "log-1",
        "log-2",
        "log-3",
        "log-4",
    ]
    assert express_lines[1]["path"] == "/a?q=1"
    assert express_lines[1]["bytes_out"] == len(b"fixed body for /a?q=1\n")
    assert express_lines[2]["method"] == "HEAD" and express_lines[2]["bytes_out"] == 0


# --- 7. reloads ---------------------------------------------------------------------------


async def test_reload_turns_the_lane_off_and_on(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    origin, proxy = await warm_proxy(make_proxy, new_origin)
    client = await Client.open(proxy.port)
    try:
        for i, express in enumerate((True, False, True)):
            assert proxy.reload(parse_config(document(origin.port, express=express)))
            # Each generation has its own pools: its first request connects.
            for j in range(2):
                await client.send(request(f"/r{i}/{j}", f"r-{i}-{j}"))
                assert (await client.read_response()).status == 200
            assert lane_counts(proxy) == ((i + 2) // 2, 0)
    finally:
        await client.close()
    assert lane_counts(proxy) == (2, 0)


async def test_reload_from_h11_to_fast_keeps_open_connections_working(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """A connection accepted under ``http = "h11"`` keeps its h11 codec after a reload
    to the fast engine (where the lane is on): its next request must still be served."""
    origin = await new_origin()
    doc = document(origin.port)
    doc["server"]["http"] = "h11"
    proxy = await make_proxy(doc)
    client = await Client.open(proxy.port)
    try:
        await client.send(request("/before", "h-1"))
        assert (await client.read_response()).status == 200
        assert proxy.reload(parse_config(document(origin.port)))
        assert proxy.express_lane.enabled
        await client.send(request("/after", "h-2"))
        resp = await client.read_response(timeout=3)
        assert (resp.status, resp.body) == (200, b"fixed body for /after\n")
    finally:
        await client.close()


async def test_reload_during_an_express_request(
    make_proxy: MakeProxy, new_origin: Callable[[], Awaitable[ScriptedOrigin]]
) -> None:
    """A request in flight across a reload is answered as its own generation says, on
    either lane: here the Via of the config it started under."""
    vias = {}
    for express in (False, True):
        origin = await new_origin()
        proxy = await make_proxy(document(origin.port, express=express))
        await warm(proxy)
        client = await Client.open(proxy.port)
        try:
            await client.send(request("/held/r", "rl-1"))
            await until_heads(origin, 2)
            new = document(origin.port, express=express, server={"proxy_name": "edge-new"})
            assert proxy.reload(parse_config(new))
            origin.release()
            resp = await client.read_response()
        finally:
            await client.close()
        assert resp.status == 200
        assert lane_counts(proxy)[0] == (1 if express else 0)
        sent = origin.heads()[1][1]
        assert b"\r\nvia: 1.1 fastedge\r\n" in sent
        vias[express] = resp.header("via")
    assert vias[False] == b"1.1 fastedge"
    assert vias[True] == vias[False]
