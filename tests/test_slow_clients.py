"""Slow and oversized clients against the real proxy, on both engines.

Small configured timeouts and limits, real loopback sockets, a recording origin (the one
from ``tests/test_smuggling.py``) to check what was forwarded. Waits are bounded and
assertions are on outcomes (closed, status, what the origin saw), never on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from fastedge.server import ProxyServer
from tests.conftest import Client, gateway_config, get
from tests.test_smuggling import RecordingOrigin, parse_forwarded

# Small enough to keep the file fast, large enough for a loaded 2-core CI box to send a
# request in time.
TIMEOUT = "300ms"
WAIT = 3.0  # upper bound for any expected close or answer (10x the timeouts)


@dataclass
class Stack:
    """A recording origin and a proxy in front of it, configured for one test."""

    origin: RecordingOrigin
    proxy: ProxyServer

    async def client(self) -> Client:
        return await Client.open(self.proxy.port)

    def forwarded(self) -> tuple[int, list[bool]]:
        """Complete requests the origin received, and for each connection that holds a
        partial request whether it was closed (a partial one may never be reused)."""
        complete = 0
        partial_closed: list[bool] = []
        for seg in self.origin.current():
            requests, partial = parse_forwarded(bytes(seg.data))
            complete += len(requests)
            if partial:
                partial_closed.append(seg.conn.closed)
        return complete, partial_closed


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(engine_name: str) -> AsyncIterator[MakeStack]:
    """Factory: ``await make_stack(header_timeout="300ms", ...)`` with [server] overrides."""
    origins: list[RecordingOrigin] = []
    proxies: list[ProxyServer] = []

    async def make(**server: Any) -> Stack:
        # Build the config first: a bad one must not leave a listening origin behind.
        config = gateway_config(1, engine_name, **server)
        origin = RecordingOrigin()
        origins.append(origin)
        port = await origin.start()
        origin.new_epoch()
        proxy = ProxyServer(gateway_config(port, engine_name, **server))
        proxies.append(proxy)
        assert proxy.config.server == config.server
        await proxy.start()
        return Stack(origin, proxy)

    try:
        yield make
    finally:
        for proxy in proxies:
            await proxy.shutdown(drain_timeout=0)
        for origin in origins:
            await origin.close()


async def barrier(stack: Stack) -> None:
    """One ordinary request on a new connection, answered: whatever the proxy was going
    to forward for an earlier (refused) request has reached the origin by now."""
    client = await stack.client()
    try:
        await client.send(get("/barrier"))
        assert (await client.read_response(timeout=WAIT)).status == 200
    finally:
        await client.close()
    await stack.origin.quiesce()


async def closes(client: Client) -> bool:
    """Whether the proxy closes the connection within ``WAIT`` (no more data comes)."""
    try:
        return await client.is_closed(WAIT)
    except TimeoutError:
        return False


async def closed_or_answered(client: Client) -> tuple[int | None, bool]:
    """(status of an answer if one came, whether the connection then closed)."""
    try:
        response = await client.read_response(timeout=WAIT)
    except TimeoutError:  # (an OSError subclass: caught first)
        return None, False
    except (ConnectionError, OSError):
        return None, True
    return response.status, await closes(client)


# --- timeouts -----------------------------------------------------------------------------


async def test_slowloris_partial_head_closed_after_header_timeout(make_stack: MakeStack) -> None:
    stack = await make_stack(header_timeout=TIMEOUT)
    client = await stack.client()
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert await closes(client), "the connection stayed open"
    finally:
        await client.close()
    await stack.origin.quiesce()
    assert not stack.origin.current(), "a partial head reached the origin"


async def test_slowloris_trickled_head_closed_after_header_timeout(
    make_stack: MakeStack,
) -> None:
    """The slowloris attack proper: one byte at a time, each well within the timeout.
    ``header_timeout`` is "time for the whole request head to arrive" (docs/config.md),
    so the connection must close although it is never idle for that long. Expected: closed
    after ~300 ms; the trickle goes on for 10x that (3 s) before the test gives up."""
    stack = await make_stack(header_timeout=TIMEOUT)
    client = await stack.client()
    reading = asyncio.ensure_future(client.reader.read(65536))
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(60):
            if reading.done():
                break
            with contextlib.suppress(ConnectionError, OSError):
                await client.send(b"a")
            await asyncio.sleep(0.05)  # waiting, not timing: the outcome is asserted
        assert reading.done(), "a trickled head kept the connection open past header_timeout"
        assert reading.exception() is not None or reading.result() == b""
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        elif not reading.cancelled():
            reading.exception()  # retrieved, so asyncio does not warn
        await client.close()
    await stack.origin.quiesce()
    assert not stack.origin.current(), "a partial head reached the origin"


async def test_slow_post_body_timeout(make_stack: MakeStack) -> None:
    """A declared body sent in part and then stalled: 408 (or a close) after
    body_timeout; the upstream connection carrying the partial body is closed, never
    pooled, and the next request goes on a clean connection."""
    stack = await make_stack(body_timeout=TIMEOUT)
    client = await stack.client()
    try:
        await client.send(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"b" * 10
        )
        status, closed = await closed_or_answered(client)
    finally:
        await client.close()
    assert status in (None, 408), status
    assert closed
    await barrier(stack)
    complete, partial_closed = stack.forwarded()
    assert complete == 1, "only the barrier request may be complete at the origin"
    assert all(partial_closed), "a connection holding a partial body was kept open"


async def test_idle_keepalive_closed_after_keepalive_timeout(make_stack: MakeStack) -> None:
    stack = await make_stack(keepalive_timeout=TIMEOUT)
    client = await stack.client()
    try:
        await client.send(get("/a"))
        response = await client.read_response(timeout=WAIT)
        assert response.status == 200
        assert response.header("connection") != b"close"
        assert await closes(client), "the connection stayed open"
    finally:
        await client.close()


async def test_max_requests_per_connection(make_stack: MakeStack) -> None:
    stack = await make_stack(max_requests_per_connection=3)
    client = await stack.client()
    try:
        for i in range(3):
            await client.send(get(f"/r{i}"))
            response = await client.read_response(timeout=WAIT)
            assert response.status == 200
            # Only the last response announces the close (RFC 9112 §9.6).
            assert (response.header("connection") == b"close") is (i == 2), (i, response)
        assert await closes(client), "the connection stayed open"
    finally:
        await client.close()


# --- size limits --------------------------------------------------------------------------

HEAD_LIMIT = 1024  # max_head_size = "1KiB": request line + fields + the empty line


def head_of_size(total: int) -> bytes:
    """A GET whose head (through the final CRLF CRLF) is exactly ``total`` bytes."""
    base = b"GET /h HTTP/1.1\r\nHost: x\r\nX-Pad: "
    data = base + b"p" * (total - len(base) - 4) + b"\r\n\r\n"
    assert len(data) == total
    return data


@pytest.mark.parametrize(("size", "status"), [(HEAD_LIMIT, 200), (HEAD_LIMIT + 1, 431)])
async def test_head_size_limit(make_stack: MakeStack, size: int, status: int) -> None:
    stack = await make_stack(max_head_size="1KiB", max_uri_size="512B")
    client = await stack.client()
    try:
        await client.send(head_of_size(size))
        response = await client.read_response(timeout=WAIT)
        assert response.status == status
        if status != 200:
            assert response.header("connection") == b"close"
            assert await closes(client), "the connection stayed open"
    finally:
        await client.close()
    await barrier(stack)
    assert stack.forwarded() == (2 if status == 200 else 1, [])


@pytest.mark.parametrize(("length", "status"), [(64, 200), (65, 414)])
async def test_uri_size_limit(make_stack: MakeStack, length: int, status: int) -> None:
    stack = await make_stack(max_uri_size="64B")
    client = await stack.client()
    try:
        await client.send(get("/" + "u" * (length - 1)))
        response = await client.read_response(timeout=WAIT)
        assert response.status == status
        if status != 200:
            assert await closes(client), "the connection stayed open"
    finally:
        await client.close()
    await barrier(stack)
    assert stack.forwarded() == (2 if status == 200 else 1, [])


BODY_LIMIT = 1024  # max_body_size = "1KiB"


@pytest.mark.parametrize(("length", "status"), [(BODY_LIMIT, 200), (BODY_LIMIT + 1, 413)])
async def test_declared_body_size_limit(make_stack: MakeStack, length: int, status: int) -> None:
    """Content-Length over the limit: 413 at once, nothing forwarded."""
    stack = await make_stack(max_body_size="1KiB")
    client = await stack.client()
    try:
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length + b"d" * length
        )
        response = await client.read_response(timeout=WAIT)
        assert response.status == status
        if status != 200:
            assert await closes(client), "the connection stayed open"
    finally:
        await client.close()
    await barrier(stack)
    assert stack.forwarded() == (2 if status == 200 else 1, [])


def chunked(sizes: list[int]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("sizes", "ok"),
    [([512, 512], True), ([512, 512, 1], False), ([1000, 100], False)],
    ids=["at-limit", "one-over", "crossing-mid-chunk"],
)
async def test_chunked_body_size_limit(make_stack: MakeStack, sizes: list[int], ok: bool) -> None:
    """A chunked body crossing the limit mid-stream: 413 or a closed connection, and the
    origin never sees a complete request (a partial one only on a closed connection)."""
    stack = await make_stack(max_body_size="1KiB")
    client = await stack.client()
    try:
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(sizes)
        )
        status, closed = await closed_or_answered(client) if not ok else (None, False)
        if ok:
            assert (await client.read_response(timeout=WAIT)).status == 200
        else:
            assert status in (None, 413), status
            assert closed
    finally:
        await client.close()
    await barrier(stack)
    complete, partial_closed = stack.forwarded()
    assert complete == (2 if ok else 1)
    assert all(partial_closed), "a connection holding a partial body was kept open"
