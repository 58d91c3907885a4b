"""The interface every HTTP/1.1 engine implements (h11 reference, fast httptools engine).

An engine turns bytes into events and events back into bytes, in the h11 style: no I/O,
no policy. The proxy (``fastedge.proxy``) owns sockets, routing and header rewriting; an
engine owns message framing (RFC 9112) and nothing else.

Two codecs per engine:

* :class:`ServerCodec` — one per client connection (fastedge is the server).
* :class:`ClientCodec` — one per upstream exchange (fastedge is the client); a pooled
  connection gets a fresh codec for each request it carries.

Events are plain objects so the hot path can dispatch on them cheaply:

* a :class:`RequestHead` / :class:`ResponseHead`,
* ``bytes`` — a piece of the message body (never empty),
* :data:`END` — the message is complete,
* a :class:`ProtocolError` *instance* — the input is malformed; it is always the last
  event and the codec is dead afterwards (``feed`` never raises for bad input, so events
  already parsed before the error are not lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

Headers: TypeAlias = list[tuple[bytes, bytes]]
"""Header fields in order: names lower-cased, values with surrounding whitespace trimmed."""


class ProtocolError(Exception):
    """Malformed or unacceptable HTTP; ``status`` is the answer the peer gets.

    Server side: 400 (malformed), 413 (body too large), 414 (URI too long), 431 (head too
    large or too many fields), 501 (unsupported transfer coding), 505 (version).
    Client side (a bad upstream response): 502.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class EndOfMessage:
    """Marks the end of one message; use the :data:`END` singleton (compare with ``is``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END = EndOfMessage()


@dataclass(slots=True)
class RequestHead:
    """A parsed request head."""

    method: bytes
    """As sent (methods are case-sensitive, RFC 9110 §9.1), e.g. ``b"GET"``."""
    target: bytes
    """The request-target as sent: origin-form, absolute-form, authority-form or ``*``."""
    http_version: bytes
    """``b"1.1"`` or ``b"1.0"``."""
    headers: Headers
    """All fields, hop-by-hop ones included (the proxy strips them)."""
    keep_alive: bool
    """The client allows another request on this connection (RFC 9112 §9.3)."""
    content_length: int | None
    """Declared body length, or ``None`` (chunked, or no body)."""
    chunked: bool
    """The body is chunked (RFC 9112 §7.1)."""
    expect_continue: bool
    """``Expect: 100-continue`` was sent (RFC 9110 §10.1.1)."""
    upgrade: bytes | None
    """The ``Upgrade`` value when the request asks to switch protocols, else ``None``."""

    @property
    def has_body(self) -> bool:
        """Whether body events may follow this head."""
        return self.chunked or bool(self.content_length)


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head (interim 1xx heads are reported too)."""

    status: int
    reason: bytes
    http_version: bytes
    headers: Headers
    keep_alive: bool
    """The upstream allows reuse after this response."""
    content_length: int | None
    chunked: bool


RequestEvent: TypeAlias = RequestHead | bytes | EndOfMessage | ProtocolError
ResponseEvent: TypeAlias = ResponseHead | bytes | EndOfMessage | ProtocolError


@dataclass(slots=True, frozen=True)
class Limits:
    """Server-side input limits; each default says where its number came from."""

    max_head_bytes: int = 16 * 1024
    """Request line + fields. nginx: 8 KiB buffers (4 x 8 KiB large); Node: 16 KiB
    (``--max-http-header-size``). We take Node's 16 KiB: larger than nginx's common case,
    small enough to bound memory per connection. Over it: 431."""
    max_uri_bytes: int = 8 * 1024
    """nginx answers 414 past one 8 KiB large buffer; HAProxy's ``tune.bufsize`` is 16 KiB."""
    max_headers: int = 100
    """Node's ``maxHeadersCount`` default (2000 in newer versions; Apache uses 100). 431."""
    max_body_bytes: int | None = 1024 * 1024 * 1024
    """nginx ``client_max_body_size`` is 1 MiB; a proxy that streams can afford more, so the
    default is 1 GiB; ``None`` means unlimited. Over it: 413."""


class ServerCodec(Protocol):
    """Server side of one client connection."""

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse bytes from the client (``b""`` means the client closed its side).

        Returns the events completed by these bytes, in order. An engine may parse ahead
        into pipelined requests (the caller queues them) or hold them back until
        :meth:`next_cycle` (h11 does); callers must handle both. After a request that does
        not keep the connection alive, later bytes are ignored.
        """

    def express_ready(self) -> bool:
        """Whether the proxy's express lane may serve the next whole request without this
        codec (it is between messages with nothing owed); an engine without the lane's
        byte-identical guarantees always says False."""

    def next_cycle(self) -> list[RequestEvent]:
        """Call after the response to the current request ended (``end`` was called)
        and ``keep_alive`` is true; returns events already buffered for the next request."""

    def informational(self, status: int, headers: Headers = ...) -> bytes:
        """Serialise an interim response (``100 Continue``, ``101 Switching Protocols``)."""

    def response_head(
        self, status: int, reason: bytes, headers: Headers, *, close: bool = False
    ) -> bytes:
        """Serialise the final response head for the current request.

        ``headers`` carry no hop-by-hop or framing fields except ``content-length``, which
        the caller includes when it knows the body length. The codec chooses the framing:
        no body for HEAD requests and 204/304 responses; ``content-length`` when given;
        otherwise chunked for HTTP/1.1 clients, close-delimited for HTTP/1.0. It adds
        ``connection: close`` when the connection will close after this response (the
        client asked, HTTP/1.0 without keep-alive, close-delimited body, ``close=True``)
        and ``connection: keep-alive`` for an HTTP/1.0 client it keeps.
        """

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the response body (chunk-encode when chunked; nothing for
        HEAD/204/304)."""

    def end(self) -> bytes:
        """Finish the response body (the last chunk when chunked)."""

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after the current response."""

    def upgraded(self) -> bytes:
        """After a ``101`` was sent: leave HTTP and return the bytes the client sent after
        the upgrade request's head, which belong to the tunnel."""


class ClientCodec(Protocol):
    """Client side of one exchange with an upstream (one request, one response)."""

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        """Serialise the request head. ``headers`` include ``host`` and the framing the
        caller chose (``content-length`` or ``transfer-encoding: chunked``) and nothing
        hop-by-hop else (except ``connection``/``upgrade`` for an upgrade)."""

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the request body (chunk-encode when chunked)."""

    def end(self) -> bytes:
        """Finish the request body."""

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse bytes from the upstream (``b""``: it closed). Interim 1xx heads are
        reported as :class:`ResponseHead` events (no ``END`` follows them); a 101 ends
        parsing (the rest is tunnel data, see :meth:`upgraded`). A close before the end of
        a length- or chunk-delimited body gives a ``ProtocolError(502)`` event; a close
        ends a close-delimited body with ``END``."""

    @property
    def reusable(self) -> bool:
        """After ``END``: the connection may carry another request (keep-alive, the
        response fully read, no stray bytes after it)."""

    def upgraded(self) -> bytes:
        """After a 101: the bytes the upstream sent after the 101 head."""


class Engine(Protocol):
    """Factory of codecs for one HTTP/1.1 implementation."""

    name: str

    def server(self, limits: Limits) -> ServerCodec:
        """A codec for a new client connection."""

    def client(self, method: bytes, previous: ClientCodec | None = None) -> ClientCodec:
        """A codec for one upstream exchange; ``method`` tells whether a body can follow
        (a response to HEAD has none). ``previous`` is the codec of the last exchange on
        the same (reusable) connection: an engine may recycle it instead of building a
        new parser — on the hot path that saves an allocation and a reference cycle per
        request."""


EngineName: TypeAlias = Literal["auto", "h11", "fast"]


def get_engine(name: str = "auto") -> Engine:
    """Return the engine called ``name``: ``fast`` (httptools/llhttp, the default for
    ``auto``) or ``h11`` (the strict reference)."""
    if name in ("auto", "fast"):
        from fastedge.http.fast_engine import FAST_ENGINE

        return FAST_ENGINE
    if name == "h11":
        from fastedge.http.h11_engine import H11_ENGINE

        return H11_ENGINE
    raise ValueError(f"unknown HTTP engine {name!r} (expected auto, h11 or fast)")
