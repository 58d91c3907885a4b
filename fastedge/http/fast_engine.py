"""The fast HTTP/1.1 engine: llhttp (via httptools) in strict mode plus the few checks it
does not make.

llhttp already enforces most of RFC 9112 in strict mode (no leniency is ever enabled
here): token and field-value characters, CRLF line endings, obs-fold, whitespace before
the colon, ``Content-Length`` syntax and duplicates, ``Content-Length`` together with
``Transfer-Encoding``, chunk-size and chunk-extension syntax. Those checks are *not*
repeated in Python. What Python adds, once per message in ``on_headers_complete``:

* ``Host`` missing (HTTP/1.1) or repeated (RFC 9112 §3.2),
* any transfer coding other than a single ``chunked`` (RFC 9112 §6.1, §7: fastedge
  decodes no other coding, so it refuses with 400 instead of forwarding an unknown
  framing),
* ``Transfer-Encoding`` in an HTTP/1.0 request (RFC 9112 §6.1: faulty framing),
* HTTP versions other than 1.0/1.1 (llhttp accepts 0.9 and 2.0 syntax): 400,
* the :class:`~fastedge.http.engine.Limits`, which llhttp does not know.

Decisions shared with the h11 engine (the tests hold both to them):

* a transfer-coding or version problem is a 400 (not 501/505): the two parsers notice
  them at different points, and one status keeps their verdicts identical;
* ``CONNECT`` is a 501 (a reverse proxy opens no tunnels, RFC 9110 §9.3.6);
* an upgrade request with a body is a 400: after a 101 the bytes after the head would be
  either body or tunnel, an ambiguous framing (RFC 9112 §6.1);
* trailer fields are checked and dropped, chunk extensions never surfaced; both are
  bounded like a head (431);
* a response body longer than its ``content-length`` (or shorter, at ``end``) raises
  ``ProtocolError(502)`` instead of writing bytes the client would misread.

The hot path per request is: one Python callback per field (lower-case the name, trim the
value, one set lookup to note the few fields that matter for framing), one callback at the
end of the head that looks only at those noted fields, and the event object. Pipelined
requests are parsed ahead (llhttp never waits for the response). Measured in
``bench/test_bench_engine.py`` against httptools alone.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus
from typing import Final

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

from fastedge.http.engine import (
    END,
    Headers,
    Limits,
    ProtocolError,
    RequestEvent,
    RequestHead,
    ResponseEvent,
    ResponseHead,
)

__all__ = ["FAST_ENGINE", "FastClientCodec", "FastEngine", "FastServerCodec", "status_line"]

_V10: Final = b"1.0"
_V11: Final = b"1.1"
_VERSIONS: Final[dict[str, bytes]] = {"1.1": _V11, "1.0": _V10}
# The fields whose values decide framing and the request's meaning to the proxy; only
# these are looked at in Python (one set lookup per field on the hot path).
_NOTED: Final = frozenset((b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade"))

# Status lines and reason phrases built once (RFC 9112 §4: the server always answers
# with its own version, HTTP/1.1).
_REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in _REASONS.items()
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_TE_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_CONN_CLOSE: Final = b"connection: close\r\n"
_CONN_KEEP_ALIVE: Final = b"connection: keep-alive\r\n"
_CRLF: Final = b"\r\n"
_COLON: Final = b": "
_LAST_CHUNK: Final = b"0\r\n\r\n"
_EMPTY: Final = b""

# Response body framing chosen by ``response_head`` (RFC 9112 §6.3).
_NO_BODY: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_UNTIL_CLOSE: Final = 3

# A HEAD response head is buffered in Python (see FastClientCodec); bound it like nginx's
# default ``proxy_buffer_size`` family of limits does for upstream heads (64 KiB).
_MAX_UPSTREAM_HEAD: Final = 64 * 1024


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``; an empty ``reason`` gets the standard phrase."""
    if not reason:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = _REASONS.get(status, _EMPTY)
    elif _REASONS.get(status) == reason:
        return _STATUS_LINES[status]
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def _llhttp_error(exc: HttpParserError, side: int) -> ProtocolError:
    """Map an llhttp error to the status the peer gets (``side`` 0: server, else client)."""
    reason = str(exc)
    if side:
        return ProtocolError(502, f"malformed upstream response: {reason}")
    return ProtocolError(400, f"malformed request: {reason}")


class FastServerCodec:
    """Server side of one client connection, parsed by llhttp (strict mode).

    Parses ahead: pipelined requests are returned by :meth:`feed` as soon as they arrive;
    the response side follows the oldest request whose response is not finished.
    """

    __slots__ = (
        "_begin_credit",
        "_body_cap",
        "_body_seen",
        "_chunked",
        "_data",
        "_ended",
        "_error",
        "_events",
        "_feed_len",
        "_head_data",
        "_head_fed",
        "_head_upper",
        "_headers",
        "_in_head",
        "_in_message",
        "_max_body",
        "_max_head",
        "_max_headers",
        "_max_uri",
        "_meta_wire",
        "_msg_keep_alive",
        "_noted",
        "_parser",
        "_queue",
        "_resp_close",
        "_resp_mode",
        "_resp_remaining",
        "_stopped",
        "_trailers",
        "_tunnel",
        "_url",
    )

    def __init__(self, limits: Limits) -> None:
        self._max_head = limits.max_head_bytes
        self._max_uri = limits.max_uri_bytes
        self._max_headers = limits.max_headers
        self._max_body = limits.max_body_bytes
        self._body_cap = -1 if limits.max_body_bytes is None else limits.max_body_bytes
        self._events: list[RequestEvent] = []
        self._headers: Headers = []
        self._noted: Headers = []
        self._data = _EMPTY
        self._head_data: bytes | None = None
        self._url = _EMPTY
        self._in_head = False
        self._in_message = False
        self._head_fed = 0
        self._head_upper = 0
        self._feed_len = 0
        self._begin_credit = 0
        self._chunked = False
        self._body_seen = 0
        self._meta_wire = 0
        self._trailers = _TrailerSink(limits.max_headers, limits.max_head_bytes)
        self._msg_keep_alive = True
        self._error: ProtocolError | None = None
        self._stopped = False
        self._tunnel: bytes | None = None
        # Requests whose response is not finished, oldest first, and how many of them
        # have been received completely (their END was parsed).
        self._queue: deque[RequestHead] = deque()
        self._ended = 0
        self._resp_mode = _NO_BODY
        self._resp_remaining = 0
        self._resp_close = False
        # Created last: httptools reads the callbacks off ``self`` here.
        self._parser = HttpRequestParser(self)

    # -- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._noted = []
        self._url = _EMPTY
        self._in_head = True
        self._in_message = True
        # Bytes of the current piece that surely belong to this head: all of it when the
        # piece started between messages (only blank lines can precede the head), none
        # when an earlier message ended inside it (position unknown). The upper bound
        # always counts the whole piece.
        self._head_fed = self._begin_credit
        self._head_upper = self._feed_len
        # The piece the request line starts, when it is known to start at its beginning.
        self._head_data = self._data if self._begin_credit else None

    def on_url(self, url: bytes) -> None:
        # llhttp reports a URL split across feeds in pieces.
        url = self._url + url
        if len(url) > self._max_uri:
            raise self._fail(414, "request-target too long")
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops the leading OWS of a value but keeps the trailing one.
        name = name.lower()
        field = (name, value.rstrip())
        if name in _NOTED:
            self._noted.append(field)
        self._headers.append(field)

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self._headers
        # Trailer fields (RFC 9112 §7.1.2) also arrive through on_header: they go to a
        # sink that only counts them; fastedge does not forward trailers.
        self._headers = trailers = self._trailers
        trailers.fields = trailers.octets = 0
        self._in_head = False
        count = len(headers)
        if count > self._max_headers:
            raise self._fail(431, "too many header fields")
        url = self._url
        method: bytes = parser.get_method()
        if self._head_upper > self._max_head:
            size = len(method) + len(url) + 14 + sum(len(n) + len(v) + 4 for n, v in headers)
            if size > self._max_head:
                raise self._fail(431, "request head too large")
        data = self._data
        skip = len(method) + 1
        if (
            self._head_data is data
            and data[0] > 13  # not CR/LF: the request line starts the piece
            and data[skip] != 32  # one SP before the target (llhttp allows several)
            and data.startswith(b"HTTP/1.1", skip + len(url) + 1)
        ):
            # Read the version where the request line puts it: much cheaper than
            # get_http_version() (a str.format). Any other spelling (HTTP/1.0, extra
            # spaces, RTSP/ICE) gets llhttp's answer.
            version: bytes | None = _V11
        else:
            version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            # llhttp accepts HTTP/0.9 (no version at all) and 2.0 syntax; fastedge speaks
            # 1.x only. 400 rather than 505 so that every version error gets one answer,
            # whichever parser noticed it first.
            raise self._fail(400, "unsupported HTTP version")
        hosts = 0
        te = cl = expect = upgrade_field = None
        for name, value in self._noted:
            if name == b"host":
                hosts += 1
            elif name == b"content-length":
                cl = value  # llhttp refuses a second one
            elif name == b"transfer-encoding":
                if te is not None:
                    raise self._fail(400, "unsupported transfer coding")
                te = value
            elif name == b"expect":
                expect = value
            elif upgrade_field is None:
                upgrade_field = value
        if hosts != 1 and (hosts or version is _V11):
            raise self._fail(400, "missing or repeated Host header (RFC 9112 §3.2)")
        content_length: int | None = None
        chunked = False
        if te is not None:
            if version is _V10:
                raise self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te.lower() != b"chunked":
                # fastedge decodes no other coding and never forwards one it cannot frame
                # (RFC 9112 §6.1, §7). 400, not 501: llhttp refuses most such lists while
                # parsing, before the Host check, and one answer for all keeps both
                # engines' verdicts identical whatever the order of the checks.
                raise self._fail(400, "unsupported transfer coding")
            chunked = self._chunked = True
            self._body_seen = self._meta_wire = 0
        elif cl is not None:
            content_length = int(cl)
            if 0 <= self._body_cap < content_length:
                raise self._fail(413, "request body too large")
        upgrade: bytes | None = None
        if parser.should_upgrade():
            if method == b"CONNECT":
                raise self._fail(501, "CONNECT is not supported")
            upgrade = upgrade_field
            if chunked or content_length:
                raise self._fail(400, "upgrade request with a body")
        keep_alive = self._msg_keep_alive = parser.should_keep_alive()
        head = RequestHead(
            method,
            url,
            version,
            headers,
            keep_alive,
            content_length,
            chunked,
            expect is not None and expect.lower() == b"100-continue",
            upgrade,
        )
        self._queue.append(head)
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            self._meta_wire = 0
            if self._body_cap >= 0:
                seen = self._body_seen + len(body)
                if seen > self._body_cap:
                    raise self._fail(413, "request body too large")
                self._body_seen = seen
        self._events.append(body)

    def on_message_complete(self) -> None:
        self._events.append(END)
        self._chunked = False
        self._begin_credit = 0
        self._ended += 1
        self._in_message = False
        if not self._msg_keep_alive:
            # RFC 9112 §9.6: nothing after a request with ``close`` is read.
            self._stopped = True

    def _fail(self, status: int, reason: str) -> ProtocolError:
        error = self._error = ProtocolError(status, reason)
        return error

    def _callback_error(self, exc: HttpParserCallbackError) -> ProtocolError:
        """The error one of our callbacks raised (httptools chains it as the context).
        Anything but a ProtocolError is a bug: re-raised, never turned into a 400."""
        cause = exc.__context__
        if isinstance(cause, ProtocolError):
            self._error = cause
            return cause
        if cause is not None:
            raise cause
        error = self._error = _llhttp_error(exc, 0)
        return error

    # -- ServerCodec -----------------------------------------------------------------

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse client bytes; see :meth:`fastedge.http.engine.ServerCodec.feed`."""
        if self._stopped:
            if self._tunnel is not None:
                self._tunnel += data
            return []
        if not data:
            self._stopped = True
            if self._in_message:
                return [ProtocolError(400, "client closed the connection mid-request")]
            return []
        events: list[RequestEvent] = []
        self._events = events
        self._data = data
        size = self._feed_len = self._begin_credit = len(data)
        if self._in_head:
            self._head_fed += size
            self._head_upper += size
        elif self._chunked:
            # Chunk-size lines, extensions and trailers are metadata; llhttp streams
            # them, but httptools buffers a trailer field: bound what comes between
            # two pieces of data like a head.
            self._meta_wire += size
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._stopped = True
            self._tunnel = data[exc.args[0] :]
        except HttpParserCallbackError as exc:
            self._stopped = True
            events.append(self._callback_error(exc))
        except HttpParserError as exc:
            if not self._stopped:  # else: bytes after a ``close`` request, ignored
                self._stopped = True
                error = self._error = _llhttp_error(exc, 0)
                events.append(error)
        else:
            if self._in_head and self._head_fed > self._max_head:
                self._stopped = True
                events.append(self._fail(431, "request head too large"))
            elif self._chunked and self._meta_wire > self._max_head:
                self._stopped = True
                events.append(self._fail(431, "chunk metadata or trailer section too large"))
        return events

    def express_ready(self) -> bool:
        """Whether llhttp is between messages with nothing owed: the proxy's express lane
        may then serve whole requests without this codec (fastedge.proxy)."""
        return not (self._in_message or self._queue or self._stopped)

    def next_cycle(self) -> list[RequestEvent]:
        """Start the next request/response cycle; this engine parses ahead, so the events
        of later requests were already returned by :meth:`feed`."""
        if self._queue:
            self._queue.popleft()
            if self._ended:
                self._ended -= 1
        self._resp_mode = _NO_BODY
        self._resp_close = False
        return []

    def informational(self, status: int, headers: Headers | None = None) -> bytes:
        """Serialise an interim 1xx response (RFC 9110 §15.2)."""
        if status == 100 and not headers:
            return _CONTINUE
        parts = [status_line(status, _EMPTY)]
        for name, value in headers or ():
            parts += (name, _COLON, value, _CRLF)
        parts.append(_CRLF)
        return _EMPTY.join(parts)

    def response_head(
        self, status: int, reason: bytes, headers: Headers, *, close: bool = False
    ) -> bytes:
        """Serialise the final response head and choose its framing (RFC 9112 §6.3)."""
        line = _STATUS_LINES.get(status)
        if line is None or (reason and reason != _REASONS[status]):
            line = status_line(status, reason)
        parts = [line]
        content_length: bytes | None = None
        for name, value in headers:
            if name == b"content-length":
                content_length = value
            # Four references into one join: no per-field bytes objects (a concatenation
            # per field cost ~60% more instructions under callgrind).
            parts += (name, _COLON, value, _CRLF)
        queue = self._queue
        if queue:
            request = queue[0]
            keep_alive = (
                request.keep_alive
                and self._ended > 0  # the request body was read to its end
                and request.upgrade is None  # a refused upgrade: the client may be mid-switch
                and not close
            )
            http10 = request.http_version is _V10
            bodiless = request.method == b"HEAD"
        else:  # answering a request that never parsed (an error)
            keep_alive = http10 = bodiless = False
        if bodiless or status in (204, 304) or status < 200:
            self._resp_mode = _NO_BODY
        elif content_length is not None:
            self._resp_mode = _LENGTH
            self._resp_remaining = int(content_length)
        elif http10:
            # RFC 9112 §6.3 rule 8: an HTTP/1.0 client cannot read chunked; the body ends
            # when the connection closes.
            self._resp_mode = _UNTIL_CLOSE
            keep_alive = False
        else:
            self._resp_mode = _CHUNKED
            parts.append(_TE_CHUNKED)
        if not keep_alive:
            parts.append(_CONN_CLOSE)
        elif http10:
            parts.append(_CONN_KEEP_ALIVE)
        self._resp_close = not keep_alive
        parts.append(_CRLF)
        return _EMPTY.join(parts)

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the response body.

        With a declared ``content-length``, more bytes than declared raise
        ``ProtocolError(502)`` (h11 refuses the same): the response is broken and the
        connection must be closed, never extended with bytes the client would read as
        the next response.
        """
        mode = self._resp_mode
        if mode == _CHUNKED:
            if not data:
                return _EMPTY
            return b"%x\r\n%b\r\n" % (len(data), data)
        if mode == _LENGTH:
            remaining = self._resp_remaining - len(data)
            if remaining < 0:
                self._resp_close = True
                raise ProtocolError(502, "response body longer than its content-length")
            self._resp_remaining = remaining
            return data
        if mode == _NO_BODY:
            return _EMPTY
        return data

    def end(self) -> bytes:
        """Finish the response body (the last chunk when chunked).

        A body shorter than its ``content-length`` raises ``ProtocolError(502)``.
        """
        mode = self._resp_mode
        if mode == _CHUNKED:
            return _LAST_CHUNK
        if mode == _LENGTH and self._resp_remaining:
            self._resp_close = True
            raise ProtocolError(502, "response body shorter than its content-length")
        return _EMPTY

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after the current response."""
        # An error in a request parsed ahead does not matter here: its event is queued
        # and the proxy answers it after this response.
        if self._resp_close:
            return False
        queue = self._queue
        if not queue or not self._ended:
            return False
        request = queue[0]
        return request.keep_alive and request.upgrade is None

    def upgraded(self) -> bytes:
        """After a 101: the bytes the client sent after the upgrade request's head."""
        tunnel = self._tunnel or _EMPTY
        self._tunnel = _EMPTY
        self._stopped = True
        return tunnel


class _TrailerSink(list[tuple[bytes, bytes]]):
    """Where trailer fields go: counted and bounded like head fields, then dropped."""

    __slots__ = ("fields", "max_fields", "max_octets", "octets")

    def __init__(self, max_fields: int, max_octets: int) -> None:
        super().__init__()
        self.max_fields = max_fields
        self.max_octets = max_octets
        self.fields = 0
        self.octets = 0

    def append(self, field: tuple[bytes, bytes]) -> None:
        self.fields += 1
        self.octets += len(field[0]) + len(field[1])
        if self.fields > self.max_fields or self.octets > self.max_octets:
            raise ProtocolError(431, "trailer section too large")


def _client_error(exc: HttpParserError) -> ProtocolError:
    """The 502 for a bad upstream response; a callback's own ProtocolError is kept and
    any other exception from a callback (a bug) re-raised, never hidden."""
    cause = exc.__context__
    if isinstance(cause, ProtocolError):
        return cause
    if cause is not None and isinstance(exc, HttpParserCallbackError):
        raise cause
    return _llhttp_error(exc, 1)


class FastClientCodec:
    """Client side of one upstream exchange, parsed by llhttp (strict mode)."""

    __slots__ = (
        "_body_mode",
        "_chunked_request",
        "_done",
        "_events",
        "_head_buffer",
        "_head_request",
        "_headers",
        "_interim",
        "_keep_alive",
        "_parser",
        "_reason",
        "_stopped",
        "_stray",
        "_tunnel",
    )

    def __init__(self, method: bytes) -> None:
        self._head_request = method == b"HEAD"
        self._head_buffer = _EMPTY
        self._chunked_request = False
        self._events: list[ResponseEvent] = []
        self._headers: Headers = []
        self._reason = _EMPTY
        self._interim = False
        self._done = False
        self._stopped = False
        self._stray = False
        self._keep_alive = False
        self._body_mode = _NO_BODY
        self._tunnel: bytes | None = None
        self._parser = HttpResponseParser(self)

    def recycle(self, method: bytes) -> bool:
        """Prepare for the next exchange on the same connection, keeping the parser.

        Only after a clean, complete, non-HEAD response: llhttp is then between messages
        (after a HEAD response it still expects the body the head announced, so that
        parser is never reused). Returns whether the codec was recycled.
        """
        if not (self._done and self._keep_alive) or self._stray or self._head_request:
            return False
        if self._tunnel is not None or self._head_buffer:
            return False
        self._head_request = method == b"HEAD"
        self._chunked_request = False
        self._headers = []
        self._reason = _EMPTY
        self._interim = False
        self._done = False
        self._stopped = False
        self._keep_alive = False
        self._body_mode = _NO_BODY
        return True

    # -- request serialisation -------------------------------------------------------

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        """Serialise ``METHOD target HTTP/1.1`` and the fields."""
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            if name == b"transfer-encoding":
                self._chunked_request = value.lower() == b"chunked"
            parts += (name, _COLON, value, _CRLF)
        parts.append(_CRLF)
        return _EMPTY.join(parts)

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the request body (chunk-encode when chunked)."""
        if self._chunked_request:
            if not data:
                return _EMPTY
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        """Finish the request body (the last chunk when chunked)."""
        return _LAST_CHUNK if self._chunked_request else _EMPTY

    # -- llhttp callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            # A second response: the upstream sent bytes nobody asked for.
            self._stray = True
            raise ProtocolError(502, "stray bytes after the response")
        self._headers = []
        self._reason = _EMPTY

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        stripped = value.rstrip()
        if stripped is not value and name == b"transfer-encoding" and 9 in value[len(stripped) :]:
            # llhttp reads ``chunked`` followed by a tab as another coding, a body read
            # until close: trimmed, the value would pass for chunked and the client would
            # get the raw chunk framing inside ours. Kept as is, it is refused below.
            stripped = value
        self._headers.append((name, stripped))

    def on_headers_complete(self) -> None:
        parser = self._parser
        headers = self._headers
        self._headers = []
        status: int = parser.get_status_code()
        fields = dict(headers)
        te = fields.get(b"transfer-encoding")
        chunked = False
        if te is not None:
            if te.lower() != b"chunked" or [n for n, _ in headers].count(b"transfer-encoding") > 1:
                # Another coding (RFC 9112 §6.3 would read to the close) would reach the
                # client without its Transfer-Encoding, which fastedge does not forward:
                # refused, as h11 does.
                raise ProtocolError(502, "unsupported transfer coding from upstream")
            chunked = True
        content_length: int | None = None
        cl = fields.get(b"content-length")
        if cl is not None and te is None:
            content_length = int(cl)
        keep_alive = self._keep_alive = parser.should_keep_alive()
        version = _VERSIONS.get(parser.get_http_version(), _V11)
        self._events.append(
            ResponseHead(
                status, self._reason, version, headers, keep_alive, content_length, chunked
            )
        )
        if status < 200:
            # RFC 9110 §15.2: an interim head has no END; a final response follows, or,
            # after a 101, the tunnel (llhttp then raises HttpParserUpgrade).
            self._interim = True
            return
        if self._head_request or status in (204, 304):
            self._body_mode = _NO_BODY
        elif chunked or content_length is not None:
            self._body_mode = _LENGTH
        else:
            self._body_mode = _UNTIL_CLOSE
        if self._head_request:
            # RFC 9110 §9.3.2: no body follows a response to HEAD, whatever its fields say;
            # llhttp cannot know the request method, so the message ends here.
            self._events.append(END)
            self._done = True

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self._done:
            self._events.append(END)
            self._done = True

    # -- ClientCodec -----------------------------------------------------------------

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse upstream bytes; see :meth:`fastedge.http.engine.ClientCodec.feed`."""
        if self._stopped:
            if self._tunnel is not None:
                self._tunnel += data
            elif data:
                self._stray = True
            return []
        if not data:
            return self._eof()
        events: list[ResponseEvent] = []
        self._events = events
        if self._head_request:
            self._feed_heads(data)
            return events
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._stopped = True
            self._tunnel = data[exc.args[0] :]
        except HttpParserError as exc:
            self._stopped = True
            if self._done:
                self._stray = True
            else:
                events.append(_client_error(exc))
        else:
            if self._done:
                self._stopped = True
        return events

    def _feed_heads(self, data: bytes) -> None:
        """HEAD exchange: hand llhttp complete heads only, so that it never waits for a
        body; bytes after the final head are stray (the connection is not reusable)."""
        buffer = self._head_buffer + data
        while not self._done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_UPSTREAM_HEAD:
                    self._stopped = True
                    self._events.append(ProtocolError(502, "upstream response head too large"))
                break
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            try:
                self._parser.feed_data(head)
            except HttpParserUpgrade:
                # A 101 to a HEAD upgrade request: what follows the head is tunnel data.
                self._stopped = True
                self._tunnel = buffer
                self._head_buffer = _EMPTY
                return
            except HttpParserError as exc:
                self._stopped = True
                self._events.append(_client_error(exc))
                return
        self._head_buffer = buffer
        if self._done:
            self._stopped = True
            if buffer:
                self._stray = True

    def _eof(self) -> list[ResponseEvent]:
        self._stopped = True
        if self._done:
            return []
        if self._body_mode == _UNTIL_CLOSE:
            # RFC 9112 §6.3 rule 8: the close ends a body without other framing.
            self._done = True
            self._keep_alive = False
            return [END]
        return [ProtocolError(502, "upstream closed the connection mid-response")]

    @property
    def reusable(self) -> bool:
        """After ``END``: keep-alive, fully read and no stray bytes."""
        return self._done and self._keep_alive and not self._stray and self._tunnel is None

    def upgraded(self) -> bytes:
        """After a 101: the bytes the upstream sent after the 101 head."""
        tunnel = self._tunnel or _EMPTY
        self._tunnel = _EMPTY
        return tunnel


class FastEngine:
    """The httptools/llhttp engine (the default for ``http = "auto"``)."""

    name = "fast"

    def server(self, limits: Limits) -> FastServerCodec:
        """A codec for a new client connection."""
        return FastServerCodec(limits)

    def client(self, method: bytes, previous: object = None) -> FastClientCodec:
        """A codec for one upstream exchange, recycling ``previous`` when its parser is
        between messages (see :meth:`FastClientCodec.recycle`)."""
        if type(previous) is FastClientCodec and previous.recycle(method):
            return previous
        return FastClientCodec(method)


FAST_ENGINE: Final = FastEngine()
