"""A small, bounded HTTP/1.1 client for the cache's background revalidations.

``stale-while-revalidate`` (RFC 5861 §3) answers the client from storage and refreshes
the entry behind its back; that refresh is a request nobody waits for, so it does not
go through an :class:`~fastedge.proxy.Exchange` (which exists to relay bytes to a
client). It is one GET on its own connection, parsed by h11 (the strict reference
parser), bounded in time (the upstream's response timeout, connect included) and in
size (the cache's ``max_object_size``: a body that could not be stored is not read).

One request per connection (``Connection: close``): refreshes happen at most once per
stored URL per freshness lifetime, so a pool would cost more than it saves — the same
trade-off as :func:`fastedge.filters.jwks.http_get`, which this follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import h11

__all__ = ["FetchError", "FetchTarget", "Fetched", "fetch"]

Headers: TypeAlias = list[tuple[bytes, bytes]]

# Request fields never sent on a refresh: framing (the refresh has no body), hop-by-hop
# fields (RFC 9110 §7.6.1; we send our own Connection), and the client's conditionals
# (the refresh carries the stored entry's validators instead, RFC 9111 §4.3.1).
_DROP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"content-length",
        b"expect",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
    }
)
# What h11 may buffer for one response head: the proxy's own request-head bound.
_MAX_HEAD: Final = 64 * 1024


class FetchError(Exception):
    """The refresh failed: connect, TLS, timeout, a malformed or too large response."""


class FetchTarget(Protocol):
    """Where to send the request (a :class:`fastedge.gateway.Target` satisfies it)."""

    host: str
    port: int
    authority: bytes
    ssl: ssl.SSLContext | None
    server_hostname: str | None


@dataclass(frozen=True, slots=True)
class Fetched:
    """A complete response: status, lower-case header names, the whole body."""

    status: int
    headers: Headers
    body: bytes


async def fetch(
    target: FetchTarget,
    path_query: bytes,
    headers: Headers,
    *,
    validators: Sequence[tuple[bytes, bytes]] = (),
    timeout: float,
    max_body: int,
) -> Fetched:
    """GET ``path_query`` from ``target`` with ``headers`` (see :func:`request_fields`)
    and ``validators`` (the stored entry's ``If-None-Match`` / ``If-Modified-Since``),
    all within ``timeout`` seconds.

    Raises :class:`FetchError` on any failure, including a body over ``max_body`` bytes.
    """
    fields = request_fields(headers, target.authority) + list(validators)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(target, path_query, fields, max_body)
    except TimeoutError:
        raise FetchError(
            f"no answer from {target.host}:{target.port} within {timeout:g}s"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"{target.host}:{target.port}: {exc}") from None
    except h11.ProtocolError as exc:
        raise FetchError(f"malformed response from {target.host}:{target.port}: {exc}") from None


def request_fields(headers: Headers, authority: bytes) -> Headers:
    """The fields a refresh sends: ``headers`` without framing, hop-by-hop and client
    conditional fields, with ``Host`` (``authority`` when absent) and
    ``Connection: close``."""
    out = [(n, v) for n, v in headers if n not in _DROP]
    if not any(n == b"host" for n, _ in out):
        out.insert(0, (b"host", authority))
    out.append((b"connection", b"close"))
    return out


async def _exchange(
    target: FetchTarget, path_query: bytes, headers: Headers, max_body: int
) -> Fetched:
    tls = target.ssl
    reader, writer = await asyncio.open_connection(
        target.host,
        target.port,
        ssl=tls,
        server_hostname=target.server_hostname if tls is not None else None,
    )
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        request = h11.Request(method=b"GET", target=path_query, headers=headers)
        writer.write(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        await writer.drain()
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
                return Fetched(status, fields, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise FetchError("connection closed before the response ended")
            # InformationalResponse (1xx): keep reading for the final response
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
