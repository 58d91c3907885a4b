"""Per-request cost of the HTTP engines (pytest-benchmark; run ``pytest bench/
--benchmark-only``).

What is measured, for a typical browser-like request with 8 fields and a typical proxied
response head with 7 fields:

* ``raw_httptools``: httptools alone with the minimum Python callbacks (URL, lower-cased
  field tuples): the floor any llhttp-based engine pays;
* ``cycle[fast|h11]``: one whole request/response on a kept-alive connection: ``feed`` +
  ``response_head`` + ``body`` + ``end`` + ``next_cycle`` (what the proxy calls);
* ``feed_fast`` (with the ``next_cycle`` that follows it) and ``response_head_fast``;
* ``client[fast|h11]``: one upstream exchange (codec, request head, response parsed).
"""

from __future__ import annotations

from typing import Any

import httptools
import pytest

from fastedge.http.engine import Limits, get_engine

REQUEST = (
    b"GET /api/users/123?expand=profile HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef\r\n"
    b"X-Request-Id: 4f6c2a9e-1b7d-4c3e-9a5f-2d8e7b6c1a0f\r\n"
    b"\r\n"
)
RESPONSE_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"1234"),
    (b"date", b"Fri, 27 Nov 2026 11:00:00 GMT"),
    (b"server", b"upstream"),
    (b"cache-control", b"max-age=5, stale-while-revalidate=30"),
    (b"vary", b"accept-encoding"),
    (b"x-request-id", b"4f6c2a9e-1b7d-4c3e-9a5f-2d8e7b6c1a0f"),
]
BODY = b"x" * 1234
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(name + b": " + value + b"\r\n" for name, value in RESPONSE_HEADERS)
    + b"\r\n"
    + BODY
)
LIMITS = Limits()


class _MinimalProtocol:
    """The least a caller of httptools does: keep the URL and the lower-cased fields."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""

    def on_message_begin(self) -> None:
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        pass

    def on_message_complete(self) -> None:
        pass


def test_raw_httptools(benchmark: Any) -> None:
    protocol = _MinimalProtocol()
    parser = httptools.HttpRequestParser(protocol)
    benchmark(parser.feed_data, REQUEST)
    assert len(protocol.headers) == 8


@pytest.mark.parametrize("name", ["fast", "h11"])
def test_cycle(benchmark: Any, name: str) -> None:
    codec = get_engine(name).server(LIMITS)

    def cycle() -> bool:
        codec.feed(REQUEST)
        codec.response_head(200, b"OK", RESPONSE_HEADERS)
        codec.body(BODY)
        codec.end()
        alive = codec.keep_alive
        codec.next_cycle()
        return alive

    assert benchmark(cycle)


def test_feed_fast(benchmark: Any) -> None:
    codec = get_engine("fast").server(LIMITS)

    def feed() -> int:
        events = codec.feed(REQUEST)
        codec.next_cycle()  # keeps the queue of pending requests from growing
        return len(events)

    assert benchmark(feed) == 2


def test_response_head_fast(benchmark: Any) -> None:
    codec = get_engine("fast").server(LIMITS)
    codec.feed(REQUEST)
    head = benchmark(codec.response_head, 200, b"OK", RESPONSE_HEADERS)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("name", ["fast", "h11"])
def test_client(benchmark: Any, name: str) -> None:
    engine = get_engine(name)
    request_headers = [(b"host", b"upstream"), (b"accept", b"*/*")]

    def exchange() -> int:
        codec = engine.client(b"GET")
        codec.request_head(b"GET", b"/api/users/123", request_headers)
        codec.end()
        return len(codec.feed(RESPONSE))

    assert benchmark(exchange) >= 3
