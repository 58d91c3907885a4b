"""Per-request cost of the data path's Python work, without sockets.

Fake transports stand in for the client and upstream sockets; the real gateway, router,
pool, header rewriting and engine codecs run. This isolates what fastedge adds on top of
the kernel and the event loop, which is what ``make bench-load`` cannot separate.

    pytest bench/test_bench_proxy.py --benchmark-only
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import jwt
import pytest
import uvloop

from fastedge.config import parse_config
from fastedge.proxy import ClientConnection, UpstreamConnection
from fastedge.server import ProxyServer

# What wrk sends, and what nginx answers with `return 200 "hello world\n"`.
REQUEST = (
    b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 11:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n"
    b"hello world\n"
)


class FakeTransport:
    """Just enough of asyncio.Transport for the proxy's hot path."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += 1

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def fake_document(http: str = "fast") -> dict[str, Any]:
    """A config document: route ``/`` to upstream ``o``, whose one target is never dialled
    (:func:`fake_server` hands its pool a connection on a :class:`FakeTransport`)."""
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "http": http,
            "access_log": False,
            "max_requests_per_connection": 0,
        },
        "admin": {"enabled": False},
        "upstreams": {"o": {"targets": ["http://127.0.0.1:1"]}},
        "routes": [{"prefix": "/", "upstream": "o"}],
    }


def fake_server(doc: dict[str, Any]) -> tuple[ProxyServer, ClientConnection, UpstreamConnection]:
    """The server of ``doc`` (see :func:`fake_document`), one idle pooled connection to
    upstream ``o`` and one client connection, both on fake transports. Call it with a
    running event loop; feed the client ``REQUEST`` and the upstream ``RESPONSE``."""
    server = ProxyServer(parse_config(doc))
    target = server.gateway.upstreams["o"].targets[0]
    upstream = UpstreamConnection(target)
    upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    target.pool.state.idle.append(upstream)
    client = ClientConnection(server, b"http")
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    return server, client, upstream


SECRET = "bench-secret-bench-secret-bench-secret-0123"


def _policies() -> dict[str, Any]:
    """Issue 4's chain: JWT auth (cached verification) + a local per-user sliding window."""
    os.environ["FASTEDGE_BENCH_JWT_SECRET"] = SECRET
    return {
        "auth": {
            "bench": {
                "algorithms": ["HS256"],
                "keys": [{"algorithm": "HS256", "secret_env": "FASTEDGE_BENCH_JWT_SECRET"}],
            }
        },
        "rate_limits": {
            "per_user": {
                "algorithm": "sliding_window",
                "limit": 10**9,
                "window": "10s",
                "key": "claim:sub",
            }
        },
    }


def _authorized_request() -> bytes:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, SECRET, "HS256")
    return REQUEST.replace(
        b"Connection:", b"Authorization: Bearer %s\r\nConnection:" % token.encode()
    )


@pytest.fixture(params=["fast", "h11", "fast+auth+ratelimit"])
def hot_path(request: pytest.FixtureRequest) -> Any:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    engine, _, chain = str(request.param).partition("+")

    async def build() -> tuple[ProxyServer, ClientConnection, UpstreamConnection]:
        doc = fake_document(engine)
        if chain:
            doc.update(_policies())
            doc["routes"][0].update(auth="bench", rate_limit="per_user")
        return fake_server(doc)

    _server, client, upstream = loop.run_until_complete(build())
    yield client, upstream, (_authorized_request() if chain else REQUEST)
    loop.close()
    asyncio.set_event_loop(None)


def test_proxy_request_python_cost(benchmark: Any, hot_path: Any) -> None:
    client, upstream, request = hot_path

    def one_exchange() -> None:
        client.data_received(request)
        upstream.data_received(RESPONSE)

    benchmark(one_exchange)
    assert client.requests > 0 and client.exchange is None
