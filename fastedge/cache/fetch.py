"""A small, bounded HTTP/1.1 client for the cache's background revalidations.

``stale-while-revalidate`` (RFC 5861 §3) answers the client from storage and refreshes
the entry behind its back; that refresh is a request nobody waits for, so it does not
go through an :class:`~fastedge.proxy.Exchange` (which exists to relay bytes to a
client). It is one GET on its own connection, parsed by h11 (the strict reference
parser), bounded in time (the upstream's response timeout, connect included) and in
size (the cache's ``max_object_size``: a body that could not be stored is not read).

One request per connection (``Connection: close``): refreshes happen at most once per
stored URL per freshness lifetime, so a pool would cost more than it saves. The GET
itself is :func:`fastedge.bounded_get.get_once`, shared with
:func:`fastedge.filters.jwks.http_get`.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Final, Protocol, TypeAlias

from fastedge.bounded_get import FetchError, HttpResponse, get_once

__all__ = ["FetchError", "FetchTarget", "HttpResponse", "fetch"]

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


class FetchTarget(Protocol):
    """Where to send the request (a :class:`fastedge.gateway.Target` satisfies it)."""

    host: str
    port: int
    authority: bytes
    ssl: ssl.SSLContext | None
    server_hostname: str | None


async def fetch(
    target: FetchTarget,
    path_query: bytes,
    headers: Headers,
    *,
    validators: Sequence[tuple[bytes, bytes]] = (),
    timeout: float,
    max_body: int,
) -> HttpResponse:
    """GET ``path_query`` from ``target`` with ``headers`` (see :func:`request_fields`)
    and ``validators`` (the stored entry's ``If-None-Match`` / ``If-Modified-Since``),
    all within ``timeout`` seconds.

    Raises :class:`FetchError` on any failure, including a body over ``max_body`` bytes.
    """
    fields = request_fields(headers, target.authority) + list(validators)
    return await get_once(
        target.host,
        target.port,
        path_query,
        fields,
        tls=target.ssl,
        server_hostname=target.server_hostname,
        timeout=timeout,
        max_head=_MAX_HEAD,
        max_body=max_body,
        label=f"{target.host}:{target.port}",
    )


def request_fields(headers: Headers, authority: bytes) -> Headers:
    """The fields a refresh sends: ``headers`` without framing, hop-by-hop and client
    conditional fields, with ``Host`` (``authority`` when absent) and
    ``Connection: close``."""
    out = [(n, v) for n, v in headers if n not in _DROP]
    if not any(n == b"host" for n, _ in out):
        out.insert(0, (b"host", authority))
    out.append((b"connection", b"close"))
    return out
