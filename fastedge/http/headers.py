"""Header rewriting for a forwarding proxy (RFC 9110 §7.6).

Two single-pass rewrites, one per direction; both run on every request, so they walk the
header list once and build the output list directly.

* Hop-by-hop fields are removed: the fixed set below plus every field named in
  ``Connection`` (RFC 9110 §7.6.1). Framing fields (``Content-Length``,
  ``Transfer-Encoding``) are removed too: the proxy re-frames each message itself, so a
  client's framing never reaches the upstream verbatim (RFC 9112 §6.1 smuggling defence).
* Forwarding fields are added: ``X-Forwarded-For/-Proto/-Host`` (de-facto standard, as
  nginx and HAProxy emit them), ``Via`` (RFC 9110 §7.6.3) and ``X-Request-Id``.
"""

from __future__ import annotations

from fastedge._core import new_request_id
from fastedge.http.engine import Headers

__all__ = ["HOP_BY_HOP", "new_request_id", "rewrite_request_headers", "rewrite_response_headers"]

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",  # non-standard, still sent by old clients (RFC 9110 §7.6.1)
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",  # framing: re-emitted by the proxy from the parsed length
        b"expect",  # 100-continue is answered by the proxy itself
    }
)
"""Removed in both directions. ``Proxy-Authorization``/``Proxy-Authenticate`` are left to
the route policy: fastedge does not consume them, so they pass like any other field."""

_REQUEST_ID_MAX = 200
"""A client-supplied ``X-Request-Id`` longer than this is replaced (it ends up in logs)."""

# Connection values that nominate only fields removed anyway (HOP_BY_HOP): the common
# case, which then costs no extra pass over the fields.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade"})


def _connection_tokens(value: bytes) -> list[bytes]:
    """Field names nominated by a ``Connection`` value (RFC 9110 §7.6.1) that are not
    already removed as hop-by-hop."""
    if value in _PLAIN_CONNECTION:
        return []
    tokens = (t.strip().lower() for t in value.split(b","))
    return [t for t in tokens if t and t not in HOP_BY_HOP]


def _valid_request_id(value: bytes) -> bool:
    # Visible ASCII only: the id is echoed into logs and response headers.
    return 0 < len(value) <= _REQUEST_ID_MAX and all(0x21 <= c <= 0x7E for c in value)


def rewrite_request_headers(
    headers: Headers,
    *,
    client_ip: bytes,
    proto: bytes,
    via: bytes,
    host_override: bytes | None = None,
    keep_upgrade: bool = False,
) -> tuple[Headers, bytes, bytes]:
    """Headers to send upstream, plus the request id and the client's ``Host``.

    ``via`` is this hop's ``Via`` entry (e.g. ``b"1.1 fastedge"``). With ``keep_upgrade``
    the ``Upgrade`` field and ``Connection: upgrade`` are kept so a WebSocket handshake can
    reach the upstream. The caller adds framing (``content-length`` or chunked).
    """
    out: Headers = []
    nominated: list[bytes] | None = None
    xff: bytes | None = None
    via_in: bytes | None = None
    request_id = b""
    host = b""
    upgrade_value = b""
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection":
                if nominated is None:
                    nominated = []
                nominated += _connection_tokens(value)
            elif name == b"upgrade":
                upgrade_value = value
            continue
        if name == b"host":
            host = value
            if host_override is not None:
                continue
        elif name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        elif name == b"via":
            via_in = value if via_in is None else via_in + b", " + value
            continue
        elif name == b"x-request-id":
            if not request_id and _valid_request_id(value):
                request_id = value
            continue
        elif name in (b"x-forwarded-proto", b"x-forwarded-host"):
            # Set by this hop from what it saw; a client's own values are not trusted.
            continue
        out.append((name, value))
    if nominated:
        drop = set(nominated)
        # Host is the request's target authority, not a hop-by-hop field: a client
        # nominating it must not leave the upstream request without one (RFC 9112 §3.2).
        drop.discard(b"host")
        out = [(n, v) for n, v in out if n not in drop]
        # Fields this hop merges or replaces are dropped too, not merged (§7.6.1).
        if b"x-forwarded-for" in drop:
            xff = None
        if b"via" in drop:
            via_in = None
        if b"x-request-id" in drop:
            request_id = b""
    if host_override is not None:
        out.append((b"host", host_override))
    if not request_id:
        request_id = new_request_id()
    out.append((b"x-forwarded-for", client_ip if xff is None else xff + b", " + client_ip))
    out.append((b"x-forwarded-proto", proto))
    if host:
        out.append((b"x-forwarded-host", host))
    out.append((b"via", via if via_in is None else via_in + b", " + via))
    out.append((b"x-request-id", request_id))
    if keep_upgrade and upgrade_value:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade_value))
    return out, request_id, host


def rewrite_response_headers(
    headers: Headers,
    *,
    via: bytes,
    request_id: bytes,
    keep_length: bool,
    keep_upgrade: bool = False,
) -> Headers:
    """Headers to send to the client from an upstream response.

    ``keep_length`` keeps ``Content-Length`` (the body is relayed with that exact length,
    or the request was HEAD and the field describes the GET body).
    """
    out: Headers = []
    nominated: list[bytes] | None = None
    has_request_id = False
    via_in: bytes | None = None
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection":
                if nominated is None:
                    nominated = []
                nominated += _connection_tokens(value)
                continue
            if name == b"content-length" and keep_length:
                out.append((name, value))
                continue
            if name == b"upgrade" and keep_upgrade:
                out.append((name, value))
            continue
        if name == b"via":
            via_in = value if via_in is None else via_in + b", " + value
            continue
        if name == b"x-request-id":
            if has_request_id:
                continue  # one id per message: the upstream's first
            has_request_id = True
        out.append((name, value))
    if nominated:
        drop = set(nominated)
        drop.discard(b"upgrade" if keep_upgrade else b"")
        out = [(n, v) for n, v in out if n not in drop]
        if b"x-request-id" in drop:
            has_request_id = False
        if b"via" in drop:
            via_in = None
    out.append((b"via", via if via_in is None else via_in + b", " + via))
    if not has_request_id:
        out.append((b"x-request-id", request_id))
    if keep_upgrade:
        out.append((b"connection", b"upgrade"))
    return out
