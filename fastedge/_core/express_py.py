"""The express lane's scanners, pure-Python twin of ``express.pyx``: the readable specification.

The express lane serves the commonest exchange without the general path's machinery: one
complete, simple request that arrived in one read (a head, and a ``Content-Length`` body
whole), answered by one simple response. The scanners validate the raw bytes, rewrite the
fields as :mod:`fastedge.http.headers` would and write the bytes to send.

They are *conservative*: anything unusual returns ``None`` and the proxy takes its general
path (llhttp codec, exchange, filters), which gives the exact answer (400, 414, 431,
streaming...). What they accept must turn into exactly the bytes the general path sends:

* upstream request: ``FastClientCodec.request_head(method, target, headers)`` with
  ``headers`` from ``rewrite_request_headers(head.headers, client_ip=, proto=, via=)``,
  ``head`` being what ``FastServerCodec.feed(data)`` parses;
* client response: ``FastServerCodec.response_head(status, reason,
  rewrite_response_headers(ev.headers, via=, request_id=, keep_length=True), close=close)``
  plus the body, ``ev`` being what ``FastClientCodec(method).feed(data)`` parses;

and they never accept bytes that llhttp would refuse or read differently.
``tests/core/test_express.py`` holds both implementations to the general path.

Accepted request heads (:func:`scan_request`; anything else gives ``None``):

* ``data`` is exactly one request: a head of at most ``max_head`` bytes (the request line,
  the field lines and the blank line), then exactly ``Content-Length`` bytes of body
  (none without that field), nothing after it (no pipelined request, no body still to
  come).
* Request line: ``GET``, ``HEAD``, ``POST``, ``PUT``, ``PATCH``, ``DELETE`` or
  ``OPTIONS``, one SP, an origin-form target of at most ``max_uri``
  bytes drawn from ``A-Z a-z 0-9 - . _ ~ ! $ & ' ( ) * + , ; = : @ / ? %``, one SP,
  ``HTTP/1.1``.
* At most ``min(max_headers, 100)`` field lines (see :func:`_parse_field` for their syntax).
* ``host``: exactly one, non-empty. ``transfer-encoding``, ``upgrade``, ``expect``:
  refused (a chunked body, an upgrade or a 100-continue is the general path's job).
* ``content-length``: at most one, 1-15 ASCII digits, at most ``max_body`` (when that is
  not negative: over it the general path answers 413). Dropped from its place and
  re-emitted from the number (no leading zeros) after ``x-request-id``, as
  ``Exchange.start`` does; the body follows the head unchanged.
* ``connection``: each exactly ``keep-alive`` or ``close`` (any case); ``close`` makes
  ``keep_alive`` false. With ``close``, a field *named* ``close`` is refused: the general
  path drops the fields a ``Connection`` value nominates (RFC 9110 §7.6.1).
* ``proxy-connection``: exactly ``keep-alive`` (any case), else refused. It means nothing
  in HTTP/1.1, but llhttp reads it as ``Connection``: a ``close`` there ends the
  connection on the general path (and its response says ``connection: close``).
* ``x-forwarded-for``, ``via``: at most one each (their merging is left to the general
  path). ``x-request-id``: the first value of 1-200 visible bytes is the request id.
* Dropped: ``connection``, ``keep-alive``, ``proxy-connection``, ``te``, ``trailer``,
  ``x-forwarded-for``, ``via``, every ``x-request-id``, ``x-forwarded-proto``,
  ``x-forwarded-host``. Every other field is kept in order (lower-cased name, trimmed
  value), then ``x-forwarded-for``, ``x-forwarded-proto``, ``x-forwarded-host``, ``via``
  and ``x-request-id`` are appended.
* ``authorization``: kept; when there is exactly one, its value is ``authorization``
  (for an auth policy on the lane). ``traceparent``/``tracestate``: kept; ``traced``
  says one was sent (a tracer must then continue the caller's trace).

Accepted responses (:func:`scan_response`; anything else gives ``None``):

* Status line ``HTTP/1.1 <3 digits, 200-599> <reason>``: a non-empty reason of visible
  bytes, SP and HTAB, not ending in SP/HTAB. It is copied verbatim.
* At most 100 field lines, the head (blank line included) at most 64 KiB.
* ``upgrade``: refused. ``content-length``: at most one, 1-18 ASCII digits, kept in
  place. ``transfer-encoding``: at most one, exactly ``chunked`` (any case, no whitespace
  after it: llhttp reads ``chunked`` + HTAB as another coding), never with
  ``content-length``, a HEAD request or a 204/304 status. ``connection``: as for requests
  (``close`` makes the upstream connection not reusable); ``proxy-connection``: as for
  requests.
* Body: none for a HEAD request or a 204/304 status (``data`` ends with the head);
  otherwise ``content-length`` is required and ``data`` is exactly the head plus that many
  bytes, or ``data`` is the head plus a whole chunked body (:func:`_chunks`: sizes of 1-8
  hex digits without extensions, the last chunk exactly ``0``, no trailer fields, nothing
  after it). A chunked body is re-framed as the general path writes it: one chunk per
  upstream chunk (llhttp reports each chunk's data as one piece), sizes in lower-case hex
  without leading zeros, ``transfer-encoding: chunked`` after the other fields.
  :func:`scan_response_start` also accepts a ``content-length`` body of which only the
  first bytes (none, some) arrived with the head; it says how many are still to come,
  and the caller relays them as they arrive (never more than that).
* Dropped: ``connection``, ``keep-alive``, ``proxy-connection``, ``te``, ``trailer``,
  ``expect``, ``via`` and every ``x-request-id`` after the first; the rest is kept in
  order, then ``via``, ``x-request-id`` (when the upstream sent none) and
  ``connection: close`` (when the caller closes) are appended.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Final

from fastedge.observe.tracecontext import new_span_id, new_trace_id

__all__ = [
    "ExpressRequest",
    "new_request_id",
    "scan_request",
    "scan_response",
    "scan_response_start",
]

# -- request ids ---------------------------------------------------------------------------

_ID_PREFIX: Final = os.urandom(6).hex().encode()
_id_counter: Final = itertools.count(1)


def new_request_id() -> bytes:
    """A process-unique request id: 12 hex digits of per-process randomness, then a counter
    (from 1) as at least 10 lower-case hex digits.

    Cheaper than ``uuid4`` (no syscall per request) and unique across processes and
    restarts with overwhelming probability (48 random bits per process).
    """
    return b"%s%010x" % (_ID_PREFIX, next(_id_counter))


def new_root_trace(bound: int) -> tuple[str, str | None, bytes | None]:
    """A new trace for a request without a caller's context, sampled as
    ``TraceIdRatio`` with this ``bound`` (``round(ratio * 2**64)``) would: when the trace
    id's right-most 8 bytes, big-endian, are below it.

    ``(trace_id, None, None)`` when sampled (the general path records it under that id);
    else ``(trace_id, span_id, line)`` with ``line`` the ``traceparent`` field line
    ``Tracer.inject`` writes for an unsampled span without a parent (CRLF included).
    """
    trace_id = new_trace_id()
    if int(trace_id[16:], 16) < bound:
        return (trace_id, None, None)
    span_id = new_span_id()
    line = b"traceparent: 00-%s-%s-00\r\n" % (trace_id.encode(), span_id.encode())
    return (trace_id, span_id, line)


# -- byte classes --------------------------------------------------------------------------

_ALNUM: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_TCHAR: Final = frozenset(_ALNUM + b"!#$%&'*+-.^_`|~")
"""Field-name bytes (RFC 9110 §5.6.2)."""
_TARGET: Final = frozenset(_ALNUM + b"-._~!$&'()*+,;=:@/?%")
"""Request-target bytes: a conservative subset of RFC 3986 (no fragment, no brackets)."""
_VCHAR: Final = frozenset(range(0x21, 0x7F))
_FIELD_TEXT: Final = _VCHAR | {0x20, 0x09}
"""Field-value and reason-phrase bytes: visible ASCII, SP, HTAB (no obs-text, no CTLs)."""
_OWS: Final = b" \t"

_MAX_FIELDS: Final = 100
"""Field lines per message, whatever the caller's limit (the compiled scanner's array)."""
_MAX_RESPONSE_HEAD: Final = 64 * 1024
"""Upstream response head, blank line included (like ``FastClientCodec``'s HEAD bound)."""
_MAX_REQUEST_ID: Final = 200
"""A longer client ``X-Request-Id`` is replaced, as ``rewrite_request_headers`` does."""

_CRLF: Final = b"\r\n"
_HEAD_END: Final = b"\r\n\r\n"
_GET: Final = b"GET"
_HEAD: Final = b"HEAD"
_METHODS: Final = {
    m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
}
"""RFC 9110 §9.3's methods but CONNECT and TRACE (the general path refuses or answers
those); any other token is the general path's."""
_MAX_CONTENT_LENGTH_DIGITS: Final = 15
"""Below 2**53: no overflow in the compiled scanner, as llhttp reads it."""
_VERSION: Final = b"HTTP/1.1"
_KEEP_ALIVE: Final = b"keep-alive"
_CLOSE: Final = b"close"

_REQUEST_REFUSED: Final = frozenset((b"transfer-encoding", b"upgrade", b"expect"))
_REQUEST_DROPPED: Final = frozenset(
    (b"keep-alive", b"te", b"trailer", b"x-forwarded-proto", b"x-forwarded-host")
)
_RESPONSE_REFUSED: Final = frozenset((b"transfer-encoding", b"upgrade"))
_RESPONSE_DROPPED: Final = frozenset((b"keep-alive", b"te", b"trailer", b"expect"))


# -- shared syntax -------------------------------------------------------------------------


# Fields a cache must look at (request Cache-Control, conditionals): flagged, still kept.
_CACHE_SENSITIVE: Final = frozenset((b"cache-control", b"if-none-match", b"if-modified-since"))
_TRACE_FIELDS: Final = frozenset((b"traceparent", b"tracestate"))


def _split_head(data: bytes) -> tuple[list[bytes], int] | None:
    """The head's lines (start line first, without their CRLFs) and the offset just past
    the blank line that ends the head; ``None`` when there is no blank line."""
    end = data.find(_HEAD_END)
    if end < 0:
        return None
    return data[:end].split(_CRLF), end + 4


def _parse_field(line: bytes) -> tuple[bytes, bytes] | None:
    """``(lower-cased name, trimmed value)`` of one field line, or ``None``.

    Syntax: one or more tchar, ``:`` right after the name (RFC 9112 §5.1: no space before
    it), optional SP/HTAB, the value, optional SP/HTAB. Value bytes are visible ASCII with
    SP/HTAB between them; an empty value is allowed. So no obs-fold (a line starting with
    whitespace has no name), no bare CR or LF, no NUL, no byte >= 0x80.
    """
    name, colon, rest = line.partition(b":")
    if not colon or not name or not _TCHAR.issuperset(name):
        return None
    # The bytes trimmed off are SP/HTAB, which the check allows anyway.
    if not _FIELD_TEXT.issuperset(rest):
        return None
    return name.lower(), rest.strip(_OWS)


def _parse_fields(lines: list[bytes], limit: int) -> list[tuple[bytes, bytes]] | None:
    """Every field line parsed, or ``None`` if one is malformed or there are over ``limit``."""
    if len(lines) > limit:
        return None
    fields = []
    for line in lines:
        parsed = _parse_field(line)
        if parsed is None:
            return None
        fields.append(parsed)
    return fields


def _connection_close(value: bytes) -> bool | None:
    """For a ``Connection`` value: ``True`` for ``close``, ``False`` for ``keep-alive``
    (any case), ``None`` for anything else (other tokens, lists: the general path)."""
    lowered = value.lower()
    if lowered == _CLOSE:
        return True
    if lowered == _KEEP_ALIVE:
        return False
    return None


def _valid_request_id(value: bytes) -> bool:
    """1-200 visible ASCII bytes (the id is echoed into logs and response headers)."""
    return 0 < len(value) <= _MAX_REQUEST_ID and _VCHAR.issuperset(value)


def _line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + _CRLF


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class ExpressRequest:
    """One simple request head, scanned and rewritten for the upstream (read-only).

    Created by :func:`scan_request` only.
    """

    method: bytes
    """One of ``GET HEAD POST PUT PATCH DELETE OPTIONS``."""
    target: bytes
    """The request-target as sent (origin-form)."""
    path: bytes
    """``target`` before the first ``?``."""
    query: bytes
    """``target`` from the first ``?`` (included) to its end, or ``b""``."""
    host: bytes
    """The ``Host`` value (trimmed, non-empty)."""
    request_id: bytes
    """The client's first valid ``X-Request-Id``, else a fresh :func:`new_request_id`."""
    keep_alive: bool
    """``False`` when a ``Connection`` field said ``close``."""
    cache_sensitive: bool
    """A field a cache must look at is present: ``Cache-Control``, ``If-None-Match`` or
    ``If-Modified-Since`` (they are forwarded like any other field)."""
    data: bytes
    """The bytes scanned: the whole request."""
    _block: bytes = field(repr=False)
    """The rewritten field lines, each ending in CRLF (no blank line)."""
    authorization: bytes | None = None
    """The ``Authorization`` value when exactly one was sent, else ``None``."""
    traced: bool = False
    """A ``traceparent`` or ``tracestate`` field was sent."""
    method_name: str = "GET"
    """``method``, decoded."""
    is_head: bool = False
    """``method`` is ``HEAD`` (no response body follows)."""
    get_or_head: bool = True
    """``method`` is ``GET`` or ``HEAD`` (what a cache may answer)."""
    body_length: int = 0
    """The ``Content-Length`` (0 without one): the body is the rest of ``data``."""
    length_field: bytes | None = None
    """The ``content-length`` line the block ends with, or ``None`` without one."""
    _head_end: int = field(default=0, repr=False)
    """Where the body starts in ``data``."""

    @property
    def body(self) -> bytes:
        """The request body (``b""`` without one)."""
        return self.data[self._head_end :]

    def compose(
        self, target: bytes, drop: tuple[bytes, ...] | None = None, extra: bytes | None = None
    ) -> bytes:
        """The upstream request for ``target``: ``METHOD target HTTP/1.1``, the
        rewritten fields except those named in ``drop`` (lower-case names), ``extra``
        (field lines, each ending in CRLF), the blank line and the body."""
        block = self._block
        if drop and any(type(name) is not bytes for name in drop):
            raise TypeError("compose(): drop holds field names as bytes")
        if drop:
            lines = block.split(_CRLF)[:-1]
            block = b"".join(line + _CRLF for line in lines if line.partition(b":")[0] not in drop)
        return b"".join(
            (self.method, b" ", target, b" HTTP/1.1\r\n", block, extra or b"", _CRLF, self.body)
        )

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every field as the codec would report it: ``(lower-cased name, trimmed value)``
        in order, hop-by-hop ones included (for filters that answer from memory)."""
        split = _split_head(self.data)
        assert split is not None  # scan_request accepted these bytes
        fields = _parse_fields(split[0][1:], _MAX_FIELDS)
        assert fields is not None
        return fields


def scan_request(
    data: bytes,
    client_ip: bytes,
    proto: bytes,
    via: bytes,
    max_head: int,
    max_uri: int,
    max_headers: int,
    max_body: int = -1,
) -> ExpressRequest | None:
    """An :class:`ExpressRequest` when ``data`` is exactly one simple request, a head and
    its ``Content-Length`` body whole (see the module docstring), else ``None``.

    ``client_ip``, ``proto`` and ``via`` feed ``X-Forwarded-For``/``-Proto`` and this hop's
    ``Via`` entry; the limits are the server's
    :class:`~fastedge.http.engine.Limits` (head bytes, target bytes, field count, body
    bytes: ``max_body`` < 0 for none).
    """
    split = _split_head(data)
    if split is None:
        return None
    lines, head_end = split
    if head_end > max_head:
        return None

    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    method_name = _METHODS.get(method)
    if method_name is None:
        return None
    if version != _VERSION or len(target) > max_uri:
        return None
    if not target.startswith(b"/") or not _TARGET.issuperset(target):
        return None

    fields = _parse_fields(lines[1:], min(max_headers, _MAX_FIELDS))
    if fields is None:
        return None

    kept: list[bytes] = []
    host: bytes | None = None
    xff: bytes | None = None
    via_in: bytes | None = None
    request_id: bytes | None = None
    close = False
    close_named = False
    cache_sensitive = False
    authorization: list[bytes] = []
    traced = False
    length: int | None = None
    for name, value in fields:
        if name == b"host":
            if host is not None or not value:
                return None
            host = value
        elif name == b"connection":
            said_close = _connection_close(value)
            if said_close is None:
                return None
            close = close or said_close
            continue
        elif name == b"proxy-connection":
            if value.lower() != _KEEP_ALIVE:
                return None
            continue
        elif name == b"x-forwarded-for":
            if xff is not None:
                return None
            xff = value
            continue
        elif name == b"via":
            if via_in is not None:
                return None
            via_in = value
            continue
        elif name == b"x-request-id":
            if request_id is None and _valid_request_id(value):
                request_id = value
            continue
        elif name == b"content-length":
            # 1-15 ASCII digits, once: anything else (a list, a sign, a second field)
            # is the general path's 400. Re-emitted from the number, after the head.
            if length is not None or not value.isdigit():
                return None
            if len(value) > _MAX_CONTENT_LENGTH_DIGITS:
                return None
            length = int(value)
            continue
        elif name in _REQUEST_REFUSED:
            return None
        elif name in _REQUEST_DROPPED:
            continue
        elif name == _CLOSE:
            close_named = True
        elif name in _CACHE_SENSITIVE:
            cache_sensitive = True
        elif name == b"authorization":
            authorization.append(value)
        elif name in _TRACE_FIELDS:
            traced = True
        kept.append(_line(name, value))
    # The body is exactly the rest of the read (none without Content-Length): anything
    # else is a body still to come, or a pipelined request.
    if len(data) - head_end != (length or 0):
        return None
    if length is not None and 0 <= max_body < length:
        return None  # the general path's 413
    if host is None or (close and close_named):
        return None

    if request_id is None:
        request_id = new_request_id()
    kept += (
        _line(b"x-forwarded-for", client_ip if xff is None else xff + b", " + client_ip),
        _line(b"x-forwarded-proto", proto),
        _line(b"x-forwarded-host", host),
        _line(b"via", via if via_in is None else via_in + b", " + via),
        _line(b"x-request-id", request_id),
    )
    length_field = None
    if length is not None:  # as Exchange.start appends it
        length_field = _line(b"content-length", b"%d" % length)
        kept.append(length_field)
    path, question, query = target.partition(b"?")
    return ExpressRequest(
        method=method,
        target=target,
        path=path,
        query=question + query,
        host=host,
        request_id=request_id,
        keep_alive=not close,
        cache_sensitive=cache_sensitive,
        data=data,
        _block=b"".join(kept),
        authorization=authorization[0] if len(authorization) == 1 else None,
        traced=traced,
        method_name=method_name,
        is_head=method == _HEAD,
        get_or_head=method in (_GET, _HEAD),
        body_length=length or 0,
        length_field=length_field,
        _head_end=head_end,
    )


# -- responses -----------------------------------------------------------------------------


def _status(line: bytes) -> int | None:
    """The status of a plain ``HTTP/1.1 <200-599> <reason>`` line, else ``None``."""
    if not line.startswith(b"HTTP/1.1 ") or line[12:13] != b" ":
        return None
    digits = line[9:12]
    reason = line[13:]
    if not digits.isdigit() or not 200 <= int(digits) <= 599:
        return None
    if not reason or reason[-1] in _OWS or not _FIELD_TEXT.issuperset(reason):
        return None
    return int(digits)


def scan_response(
    data: bytes, head_request: bool, via: bytes, request_id: bytes, close: bool
) -> tuple[int, bool, int, bytes] | None:
    """``(status, reusable, body_length, bytes for the client)`` when ``data`` is exactly
    one simple response (see the module docstring), else ``None``; the arguments are
    :func:`scan_response_start`'s."""
    found = scan_response_start(data, head_request, via, request_id, close)
    return None if found is None or found[4] else found[:4]


def scan_response_start(
    data: bytes, head_request: bool, via: bytes, request_id: bytes, close: bool
) -> tuple[int, bool, int, bytes, int] | None:
    """``(status, reusable, body_length, bytes for the client, body bytes still to come)``
    when ``data`` is one simple response (see the module docstring) or the start of one
    whose ``Content-Length`` body has only begun to arrive (the head whole, fewer body
    bytes than declared: the client's bytes then hold the head and the body so far, and
    the caller relays the rest as it comes), else ``None``.

    ``head_request``: the request was HEAD (no body follows). ``via``: this hop's ``Via``
    entry. ``request_id``: sent when the upstream gave none. ``close``: the client
    connection closes after this response (``connection: close`` is added). ``reusable``
    is false when the upstream said ``Connection: close``.
    """
    split = _split_head(data)
    if split is None:
        return None
    lines, head_end = split
    if head_end > _MAX_RESPONSE_HEAD:
        return None
    status = _status(lines[0])
    if status is None:
        return None
    fields = _parse_fields(lines[1:], _MAX_FIELDS)
    if fields is None:
        return None

    kept: list[bytes] = [lines[0], _CRLF]
    content_length: int | None = None
    chunked = False
    via_in: bytes | None = None
    has_request_id = False
    upstream_close = False
    close_named = False
    for line, (name, value) in zip(lines[1:], fields, strict=True):
        if name == b"content-length":
            if content_length is not None or not 0 < len(value) <= 18 or not value.isdigit():
                return None
            content_length = int(value)
        elif name == b"connection":
            said_close = _connection_close(value)
            if said_close is None:
                return None
            upstream_close = upstream_close or said_close
            continue
        elif name == b"proxy-connection":
            if value.lower() != _KEEP_ALIVE:
                return None
            continue
        elif name == b"via":
            if via_in is not None:
                return None
            via_in = value
            continue
        elif name == b"x-request-id":
            if has_request_id:
                continue  # one id per message: the upstream's first
            has_request_id = True
        elif name == b"transfer-encoding":
            # Whitespace after the value is refused: llhttp reads "chunked" + HTAB as
            # another coding (a body until close), unlike the codec's trimmed value.
            if chunked or value.lower() != b"chunked" or line[-1:] in b" \t":
                return None
            chunked = True
            continue  # the body is re-framed; the field is written after the others
        elif name in _RESPONSE_REFUSED:
            return None
        elif name in _RESPONSE_DROPPED:
            continue
        elif name == _CLOSE:
            close_named = True
        kept.append(_line(name, value))
    if upstream_close and close_named:
        return None

    chunks: list[bytes] | None = None
    if chunked:
        if content_length is not None or head_request or status == 204 or status == 304:
            return None  # framings the general path sorts out (llhttp refuses the first)
        chunks = _chunks(data, head_end)
        if chunks is None:
            return None
        body_length = sum(len(chunk) for chunk in chunks)
    elif head_request or status == 204 or status == 304:
        body_length = 0
    elif content_length is None:
        return None  # read until close: the general path streams it
    else:
        body_length = content_length
    avail = len(data) - head_end
    if chunks is None and avail > body_length:
        return None  # bytes after the response: the general path flags them

    kept.append(_line(b"via", via if via_in is None else via_in + b", " + via))
    if not has_request_id:
        kept.append(_line(b"x-request-id", request_id))
    if chunks is not None:
        kept.append(b"transfer-encoding: chunked\r\n")
    if close:
        kept.append(b"connection: close\r\n")
    kept.append(_CRLF)
    if chunks is None:
        kept.append(data[head_end:])
        left = body_length - avail
    else:
        kept.extend(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in chunks)
        kept.append(b"0\r\n\r\n")
        left = 0
    return status, not upstream_close, body_length, b"".join(kept), left


_HEX_DIGITS: Final = frozenset(b"0123456789abcdefABCDEF")


def _chunks(data: bytes, pos: int) -> list[bytes] | None:
    """The data of each chunk of the whole chunked body ``data[pos:]``, or ``None``.

    Plain syntax only (RFC 9112 §7.1): each chunk is ``1*8HEXDIG CRLF data CRLF`` with a
    size above 0 (no extensions, no whitespace), then the last chunk is exactly ``0
    CRLF`` followed by the blank line that ends the message (no trailer fields) and
    nothing after it. A body cut short (the rest in a later read) is ``None`` too: the
    general path then takes the bytes."""
    out: list[bytes] = []
    end = len(data)
    while True:
        eol = data.find(_CRLF, pos, pos + 10)
        digits = data[pos:eol]
        if eol <= pos or not all(c in _HEX_DIGITS for c in digits):
            return None
        size = int(digits, 16)
        pos = eol + 2
        if size == 0:  # the last chunk: exactly "0", the blank line, the message's end
            return out if digits == b"0" and data[pos:] == _CRLF else None
        if pos + size + 2 > end or data[pos + size : pos + size + 2] != _CRLF:
            return None
        out.append(data[pos : pos + size])
        pos += size + 2


# The compiled module's clock: perf_counter is clock_gettime(CLOCK_MONOTONIC) on Linux.
monotonic = time.perf_counter
