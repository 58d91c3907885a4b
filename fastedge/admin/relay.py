"""Relay one admin request to another fastedge process's admin listener.

The ``--workers`` supervisor (:mod:`fastedge.workers`) answers the instance's admin API
by asking its workers, each of which runs a private admin listener on loopback. This is
the small HTTP/1.1 client it uses: one connection per request (``Connection: close``;
admin traffic is a few requests per second at most, so pooling would only add state),
the response parsed by llhttp (httptools) so both ``Content-Length`` and chunked answers
work, everything bounded by a timeout and a size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import httptools

from fastedge.minihttp import Response

__all__ = ["MAX_RESPONSE_BYTES", "RelayError", "relay"]

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""Largest answer relayed: far above any admin document (a /metrics scrape of a big
config is a few hundred KiB), small enough that a runaway worker cannot exhaust memory."""

# Hop-by-hop fields (RFC 9110 §7.6.1) and framing, which this hop sets itself. The
# request id is re-sent explicitly so a worker logs and answers with the caller's id.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "x-request-id",
    }
)


class RelayError(Exception):
    """The peer could not be reached, timed out, or answered something unparsable."""


class _Reader:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.complete = False
        self.overflow = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        # Flag rather than raise: httptools would replace the exception with its own.
        if len(self.body) + len(body) > MAX_RESPONSE_BYTES:
            self.overflow = True
        else:
            self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def _request_bytes(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    request_id: str,
    host: str,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    has_host = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _DROP:
            continue
        has_host = has_host or lowered == "host"
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.append(f"host: {host}")
    lines.append(f"x-request-id: {request_id}")
    lines.append(f"content-length: {len(body)}")
    lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def relay(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    request_id: str,
    timeout: float,
) -> Response:
    """Send one request to ``host:port`` and return its answer.

    ``target`` is the path and query; ``headers`` are passed on except hop-by-hop and
    framing fields (a ``Host`` given is kept, so the peer's same-origin checks see what
    the client sent). ``HEAD`` is sent as ``GET`` (the caller's server drops the body
    and still announces its true length). Response framing headers and the peer's
    ``X-Request-Id`` are removed: the caller's server sets its own. Raises
    :class:`RelayError` on any failure, with a message fit for an error body.
    """
    wire_method = "GET" if method == "HEAD" else method
    data = _request_bytes(wire_method, target, headers, body, request_id, f"{host}:{port}")
    try:
        return await asyncio.wait_for(_exchange(host, port, data), timeout)
    except TimeoutError:
        raise RelayError(f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise RelayError(exc.strerror or str(exc)) from None


async def _exchange(host: str, port: int, data: bytes) -> Response:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        collected = _Reader()
        parser = httptools.HttpResponseParser(collected)
        while not collected.complete:
            chunk = await reader.read(65536)
            if not chunk:
                raise RelayError("connection closed before the answer was complete")
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError as exc:
                raise RelayError(f"malformed answer: {exc}") from None
            if collected.overflow:
                raise RelayError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
        status = int(parser.get_status_code())
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    headers = [(name, value) for name, value in collected.headers if name not in _DROP]
    return Response(status, headers, bytes(collected.body))
