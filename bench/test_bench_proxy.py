"""Per-request cost of the data path's Python work, without sockets.

Fake transports stand in for the client and upstream sockets; the real gateway, router,
pool, header rewriting and engine codecs run. This isolates what fastedge adds on top of
the kernel and the event loop, which is what ``make bench-load`` cannot separate.

    pytest bench/test_bench_proxy.py --benchmark-only
"""

from __future__ import annotations

import asyncio
from typing import Any

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


@pytest.fixture(params=["fast", "h11"])
def hot_path(request: pytest.FixtureRequest) -> Any:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def build() -> tuple[ProxyServer, ClientConnection, UpstreamConnection]:
        config = parse_config(
            {
                "server": {
                    "listen": "127.0.0.1:0",
                    "http": request.param,
                    "access_log": False,
                    "max_requests_per_connection": 0,
                },
                "admin": {"enabled": False},
                "upstreams": {"o": {"targets": ["http://127.0.0.1:1"]}},
                "routes": [{"prefix": "/", "upstream": "o"}],
            }
        )
        server = ProxyServer(config)
        target = server.gateway.upstreams["o"].targets[0]
        upstream = UpstreamConnection(target)
        upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
        target.pool.state.idle.append(upstream)
        client = ClientConnection(server, b"http")
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        return server, client, upstream

    _server, client, upstream = loop.run_until_complete(build())
    yield client, upstream
    loop.close()
    asyncio.set_event_loop(None)


def test_proxy_request_python_cost(benchmark: Any, hot_path: Any) -> None:
    client, upstream = hot_path

    def one_exchange() -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    benchmark(one_exchange)
    assert client.requests > 0 and client.exchange is None
