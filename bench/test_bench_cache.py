"""Per-hit cost of the edge cache, without sockets.

* ``test_cache_hit_filter_cost``: the ``cache`` filter's ``on_request`` answering a
  stored response (key, lookup, RFC 9111 decision, ``Age``, ``Cache-Status``).
* ``test_cache_hit_data_path_cost``: a whole cache hit through the data path (fake client
  transport: parse, route, filter, answer), the cached counterpart of
  ``bench/test_bench_proxy.py``'s relayed request.

    pytest bench/test_bench_cache.py --benchmark-only
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import uvloop

from bench.test_bench_proxy import REQUEST, RESPONSE, fake_document, fake_server
from fastedge.cache.control import format_http_date, parse_cache_control
from fastedge.cache.edge import EdgeCache
from fastedge.cache.policy import primary_key
from fastedge.filters import FilterContext, Response
from fastedge.filters.cache import CacheFilter, CacheSettings
from fastedge.proxy import ClientConnection, UpstreamConnection
from fastedge.server import ProxyServer

HEADERS = [
    (b"server", b"nginx/1.22.1"),
    (b"date", format_http_date(time.time())),
    (b"content-type", b"text/plain"),
    (b"cache-control", b"max-age=3600"),
    (b"via", b"1.1 fastedge"),
]


# The benchmark's upstream answer with today's Date and a freshness lifetime.
CACHEABLE_RESPONSE = RESPONSE.replace(
    b"Date: Fri, 27 Nov 2026 11:00:00 GMT",
    b"Date: " + format_http_date(time.time()) + b"\r\nCache-Control: max-age=3600",
)


def test_cache_hit_filter_cost(benchmark: Any) -> None:
    cache = EdgeCache("bench", max_bytes=1 << 26, max_object_size=1 << 22)
    now = time.time()
    cache.store.put(
        primary_key(b"GET", b"http", b"127.0.0.1:8080", b"/hello"),
        [],
        status=200,
        headers=HEADERS,
        body=b"hello world\n",
        cc=parse_cache_control([b"max-age=3600"]),
        lifetime=3600,
        request_time=now,
        response_time=now,
        keep=3600,
    )
    cache_filter = CacheFilter(CacheSettings(name="bench"), cache, route_upstream="o")
    request = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]

    def one_hit() -> Any:
        ctx = FilterContext(
            method=b"GET",
            path=b"/hello",
            query=b"",
            host=b"127.0.0.1:8080",
            client_ip=b"127.0.0.1",
            headers=request,
            upstream_headers=list(request),
            route="/",
            request_id=b"r",
        )
        return cache_filter.on_request(ctx)

    answer = benchmark(one_hit)
    assert isinstance(answer, Response) and answer.status == 200
    assert cache.results["hit"] > 0


@pytest.fixture
def cached_path() -> Any:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def build() -> tuple[ProxyServer, ClientConnection, UpstreamConnection]:
        doc = fake_document()
        doc["caches"] = {"c": {"max_bytes": "1MiB"}}
        doc["routes"][0]["cache"] = "c"
        server, client, upstream = fake_server(doc)
        # The first request is a miss: relayed and stored, then everything hits.
        client.data_received(REQUEST)
        upstream.data_received(CACHEABLE_RESPONSE)
        return server, client, upstream

    server, client, _ = loop.run_until_complete(build())
    yield server, client
    loop.close()
    asyncio.set_event_loop(None)


def test_cache_hit_data_path_cost(benchmark: Any, cached_path: Any) -> None:
    server, client = cached_path

    def one_hit() -> None:
        client.data_received(REQUEST)

    benchmark(one_hit)
    cache = server.runtime.services["fastedge.cache"].caches["c"]
    assert cache.results["miss"] == 1 and cache.results["hit"] > 0
    assert client.exchange is None
