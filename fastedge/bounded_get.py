"""One bounded HTTP/1.1 GET on its own connection: the proxy's own outgoing calls.

Some requests fastedge makes for itself rather than for a client: JWKS fetches and
account checks (:func:`fastedge.filters.jwks.http_get`) and the cache's background
revalidations (:func:`fastedge.cache.fetch.fetch`). They are rare (refresh intervals,
TTL-cached checks, once per stored URL per freshness lifetime), so each is one request
per connection (``Connection: close``; a pool would cost more than it saves), parsed by
h11 (the strict reference parser), bounded in time (one deadline, connect included) and
in size (the response head and the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TypeAlias

import h11

__all__ = ["FetchError", "HttpResponse", "get_once"]

Headers: TypeAlias = list[tuple[bytes, bytes]]


class FetchError(Exception):
    """An HTTP GET failed: no connection, TLS, timeout, malformed or oversized response."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response: status, lower-case header names, the whole body."""

    status: int
    headers: Headers
    body: bytes


async def get_once(
    host: str,
    port: int,
    target: bytes,
    headers: Headers,
    *,
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
    max_head: int,
    max_body: int,
    label: str,
) -> HttpResponse:
    """GET ``target`` (path and query) from ``host:port`` with exactly the request fields
    ``headers`` (the caller's ``Host`` and ``Connection: close`` included), over TLS
    when ``tls`` is given (SNI and verification against ``server_hostname``), all within
    ``timeout`` seconds.

    Raises :class:`FetchError` on every failure: its message starts with ``label``
    (what the caller calls this request) for a timeout, a connect or TLS error and a
    response h11 rejects (``max_head`` bounds the response head), and says so for a body
    over ``max_body`` bytes or a connection closed early. 1xx responses are skipped.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None
            )
            try:
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
                request = h11.Request(method=b"GET", target=target, headers=headers)
                writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
                await writer.drain()
                return await _read_response(conn, reader, max_body)
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError:
        raise FetchError(f"{label}: no answer within {timeout:g}s") from None
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"{label}: {exc}") from None
    except h11.ProtocolError as exc:
        raise FetchError(f"{label}: malformed response: {exc}") from None


async def _read_response(
    conn: h11.Connection, reader: asyncio.StreamReader, max_body: int
) -> HttpResponse:
    status = 0
    fields: Headers = []
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            fields = [(bytes(n), bytes(v)) for n, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > max_body:
                raise FetchError(f"response body larger than {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status, fields, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise FetchError("connection closed before the response ended")
        # InformationalResponse (1xx): keep reading for the final response
