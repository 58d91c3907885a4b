"""The reference HTTP/1.1 engine, built on h11.

h11 is a clear, well-tested state machine, but it is deliberately lenient in places where
fastedge must be strict (RFC 9112): it accepts bare-LF line endings, unfolds obs-fold,
lets control characters through field values, allows whitespace after a chunk size and
any bytes in chunk extensions, and collapses identical duplicate ``Content-Length``
fields. Because a proxy must never forward a message whose framing a downstream parser
could read differently (RFC 9112 §6.1, §11.2), this engine gates the bytes h11 sees:

* a request head reaches h11 only once it is complete and has passed
  ``H11ServerCodec._scan_head`` (CRLF-only lines, no obs-fold, no control characters,
  the limits);
* a ``Content-Length`` body is handed over exactly, so pipelined bytes never reach h11
  before :meth:`H11ServerCodec.next_cycle`;
* a chunked body goes through :class:`_ChunkedValidator`, which checks every chunk line
  strictly (as llhttp does) and hands h11 a canonical re-encoding (chunk extensions and
  trailer fields dropped: fastedge never forwards them).

The verdicts (accept, or which status) match the fast engine's; the test suite compares
them on the llhttp and HTTP Garden corpora.

Responses are serialised by h11 itself, so h11 also checks the proxy's output (a body
longer than its ``content-length`` raises). Known difference: h11 does not keep HTTP/1.0
connections alive (RFC 9112 §9.3 lets a server close), so an HTTP/1.0 client always gets
``Connection: close`` here.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

import h11

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

__all__ = ["H11_ENGINE", "H11ClientCodec", "H11Engine", "H11ServerCodec"]

_REASONS: Final[dict[int, bytes]] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

# RFC 9110 §5.6.2 token, §5.6.4 quoted-string (qdtext and quoted-pair, obs-text allowed).
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED: Final = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] CRLF, with no whitespace anywhere (llhttp's
# strict mode rejects "5 ", "5 ;a" and "5; a" alike, and so do we).
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]+)(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*\r\n"
)
# RFC 9112 §7.1.2 trailer field: field-name ":" OWS field-value OWS.
_FIELD_LINE: Final = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*\r\n")
# What h11 lets through in a head and fastedge refuses: a bare LF or CR (RFC 9112 §2.2;
# llhttp's strict mode refuses bare LF line endings too, so no two parsers can split the
# head differently), obs-fold (§5.2: reject or unfold; h11 would unfold), and control
# characters other than HTAB (RFC 9110 §5.5). Every pattern is at most 3 bytes long, so
# the head can be scanned incrementally with a 2-byte overlap.
_BAD_HEAD: Final = re.compile(rb"(?<!\r)\n|\r(?!\n)|\r\n[ \t]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ORIGIN_OR_ABSOLUTE: Final = re.compile(rb"/|\*$|[A-Za-z][A-Za-z0-9+.\-]*://")
# The methods llhttp knows for HTTP/1.x (its strict parser refuses any other token with
# 400, and the RTSP-only ones on an HTTP request line); kept identical so both engines
# agree. RFC 9110 §9.1 would allow 501 for an unknown method: the verdict is the same.
_METHODS: Final = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND "
    b"PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE "
    b"M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE "
    b"QUERY".split()
)
_MAX_CHUNK_SIZE: Final = 2**64  # llhttp's limit (a uint64), "Chunk size overflow" above

_HEAD, _BODY, _DONE = 0, 1, 2


class _ChunkedValidator:
    """Strict chunked-body framing (RFC 9112 §7.1) over the raw bytes.

    :meth:`step` consumes what it can from the front of a buffer and returns the canonical
    re-encoding for h11, or the error that stops the message.
    """

    __slots__ = ("_limits", "_meta", "_remaining", "_searched", "_state", "_trailers", "done")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailer section
        self._remaining = 0
        self._meta = 0  # bytes of lines since the last chunk data (as the fast engine)
        self._trailers = 0
        self._searched = 0  # bytes of a partial line already searched for its LF
        self.done = False

    def step(self, raw: bytearray) -> tuple[bytes, ProtocolError | None]:
        out: list[bytes] = []
        pos = 0
        error: ProtocolError | None = None
        while not self.done:
            state = self._state
            if state == 1:
                take = min(self._remaining, len(raw) - pos)
                if not take:
                    break
                self._meta = 0
                out.append(bytes(raw[pos : pos + take]))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = 2
            elif state == 2:
                tail = bytes(raw[pos : pos + 2])
                if tail != b"\r\n"[: len(tail)]:
                    error = ProtocolError(400, "malformed request: no CRLF after chunk data")
                    break
                if len(tail) < 2:
                    break
                out.append(tail)
                pos += 2
                self._state = 0
            else:
                end = raw.find(b"\n", pos + self._searched)
                meta = self._meta + (len(raw) if end < 0 else end + 1) - pos
                if meta > self._limits.max_head_bytes:
                    error = ProtocolError(431, "chunk metadata or trailer section too large")
                    break
                if end < 0:
                    self._searched = len(raw) - pos
                    break
                self._searched = 0
                self._meta = meta
                line = bytes(raw[pos : end + 1])
                pos = end + 1
                if state == 0:
                    match = _CHUNK_LINE.fullmatch(line)
                    if match is None:
                        error = ProtocolError(400, "malformed request: invalid chunk line")
                        break
                    size = int(match[1], 16)
                    if size >= _MAX_CHUNK_SIZE:
                        error = ProtocolError(400, "malformed request: chunk size overflow")
                        break
                    out.append(b"%x\r\n" % size)
                    if size:
                        self._state = 1
                        self._remaining = size
                    else:
                        self._state = 3
                elif line == b"\r\n":
                    out.append(line)
                    self.done = True
                elif _FIELD_LINE.fullmatch(line) is None:
                    # Trailer fields (RFC 9112 §7.1.2) are validated, then dropped.
                    error = ProtocolError(400, "malformed request: invalid trailer field")
                    break
                else:
                    self._trailers += 1
                    if self._trailers > self._limits.max_headers:
                        error = ProtocolError(431, "trailer section too large")
                        break
        del raw[:pos]
        return b"".join(out), error


def _split_fields(head: bytes) -> Headers:
    """The fields of a head already checked by ``_scan_head`` and h11."""
    lines = head[:-4].split(b"\r\n")
    fields: Headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def _target_overflow(raw: bytes | bytearray, line_stop: int, limits: Limits) -> int:
    """Where the request-target in a (possibly partial) request line ``raw[:line_stop]``
    goes past ``max_uri_bytes``: the index of its first byte over the limit, or -1."""
    first = raw.find(b" ", 0, line_stop)
    if first < 0:
        return -1
    start = first + 1
    end = raw.find(b" ", start, line_stop)
    if end < 0:
        end = line_stop
    return start + limits.max_uri_bytes if end - start > limits.max_uri_bytes else -1


def _request_line(head: bytes) -> tuple[bytes, bytes, bytes]:
    """Method, target and version of a head h11 refused (best effort, for ordering)."""
    parts = head[: head.find(b"\r\n")].split(b" ")
    version = parts[2][5:] if len(parts) == 3 and parts[2].startswith(b"HTTP/") else b""
    return (parts[0], parts[1] if len(parts) > 1 else b"", version)


def _check_request(
    method: bytes, target: bytes, version: bytes, fields: Headers, limits: Limits
) -> tuple[int | None, bool] | ProtocolError:
    """Framing and limit checks once h11 accepted the head, in the fast engine's order.
    Returns ``(content_length, chunked)`` or the error."""
    if method not in _METHODS:
        return ProtocolError(400, "malformed request: unknown method")
    if _ORIGIN_OR_ABSOLUTE.match(target) is None and method != b"CONNECT":
        # RFC 9112 §3.2: origin-form, absolute-form, or "*"; authority-form is for CONNECT.
        return ProtocolError(400, "malformed request: invalid request-target")
    lengths = [value for name, value in fields if name == b"content-length"]
    codings = [value for name, value in fields if name == b"transfer-encoding"]
    if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
        # RFC 9112 §6.3 rule 5: even identical duplicates are refused (as llhttp does).
        return ProtocolError(400, "malformed request: invalid Content-Length")
    if lengths and codings:
        # RFC 9112 §6.1: both present is a smuggling attempt, never forwarded.
        return ProtocolError(400, "malformed request: Content-Length with Transfer-Encoding")
    if len(fields) > limits.max_headers:
        return ProtocolError(431, "too many header fields")
    size = len(method) + len(target) + 14 + sum(len(n) + len(v) + 4 for n, v in fields)
    if size > limits.max_head_bytes:
        return ProtocolError(431, "request head too large")
    if version not in (b"1.0", b"1.1"):
        return ProtocolError(400, "unsupported HTTP version")
    hosts = sum(1 for name, _ in fields if name == b"host")
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        return ProtocolError(400, "missing or repeated Host header (RFC 9112 §3.2)")
    if codings:
        if version == b"1.0":
            return ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            # 400 like the fast engine (see there why not 501).
            return ProtocolError(400, "unsupported transfer coding")
        return (None, True)
    if lengths:
        length = int(lengths[0])
        if limits.max_body_bytes is not None and length > limits.max_body_bytes:
            return ProtocolError(413, "request body too large")
        return (length, False)
    return (None, False)


def _tokens(fields: Headers, name: bytes) -> list[bytes]:
    """The comma-separated tokens of all ``name`` fields, lower-cased."""
    return [
        token.strip().lower()
        for field, value in fields
        if field == name
        for token in value.split(b",")
        if token.strip()
    ]


def _field(fields: Headers, name: bytes) -> bytes | None:
    for field, value in fields:
        if field == name:
            return value
    return None


class H11ServerCodec:
    """Server side of one client connection, parsed and serialised by h11.

    Holds pipelined requests back until :meth:`next_cycle` (h11's model).
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=max(limits.max_head_bytes, 64 * 1024)
        )
        self._raw = bytearray()  # received, not yet handed to h11
        self._scanned = 0  # bytes of the pending head already checked
        self._line_checked = False  # the request line's target length was checked
        self._phase = _HEAD
        self._head: RequestHead | None = None
        self._remaining = 0  # Content-Length body bytes still to hand over
        self._chunks: _ChunkedValidator | None = None
        self._body_seen = 0
        self._request_done = False
        self._stopped = False
        self._error = False
        self._eof = False
        self._resp_close = False
        self._bodiless = False
        self._switched = False

    # -- receiving -------------------------------------------------------------------

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse client bytes; see :meth:`fastedge.http.engine.ServerCodec.feed`."""
        if self._stopped:
            if self._switched or (self._head is not None and self._head.upgrade):
                self._raw += data
            return []
        if not data:
            self._eof = True
        else:
            self._raw += data
        return self._advance()

    def express_ready(self) -> bool:
        """Never: the strict reference engine parses every request itself."""
        return False

    def next_cycle(self) -> list[RequestEvent]:
        """Start the next cycle: returns the events of a request already buffered."""
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        self._head = None
        self._phase = _HEAD
        self._request_done = False
        self._resp_close = False
        self._bodiless = False
        if self._stopped:
            return []
        return self._advance()

    def _advance(self) -> list[RequestEvent]:
        events: list[RequestEvent] = []
        try:
            self._advance_into(events)
        except h11.RemoteProtocolError as exc:
            events.append(
                self._stop(ProtocolError(exc.error_status_hint, f"malformed request: {exc}"))
            )
        return events

    def _stop(self, error: ProtocolError) -> ProtocolError:
        self._stopped = True
        self._error = True
        return error

    def _advance_into(self, events: list[RequestEvent]) -> None:
        raw = self._raw
        while not self._stopped:
            if self._phase == _HEAD:
                if self._head is not None:
                    return  # the previous request's response is not finished
                error, end = self._scan_head()
                if error is not None:
                    events.append(self._stop(error))
                    return
                if end < 0:
                    if self._eof:
                        self._stopped = True
                        if raw:
                            events.append(ProtocolError(400, "client closed mid-request"))
                    return
                head = bytes(raw[:end])
                del raw[:end]
                self._scanned = 0
                self._line_checked = False
                self._conn.receive_data(head)
                try:
                    event = self._conn.next_event()
                except h11.RemoteProtocolError as exc:
                    # h11 validates fields in order and stops at the first problem; when
                    # our own checks also fail, ours decide, so that the verdict is the
                    # one the fast engine gives (llhttp checks in a different order).
                    ours = _check_request(*_request_line(head), _split_fields(head), self._limits)
                    if isinstance(ours, ProtocolError):
                        events.append(self._stop(ours))
                        return
                    raise exc
                if not isinstance(event, h11.Request):  # pragma: no cover - h11 contract
                    raise h11.RemoteProtocolError("no request", error_status_hint=400)
                request = self._request(event, head)
                if isinstance(request, ProtocolError):
                    events.append(self._stop(request))
                    return
                self._head = request
                events.append(request)
                self._phase = _BODY
                self._body_seen = 0
                self._chunks = None
                if request.chunked:
                    self._chunks = _ChunkedValidator(self._limits)
                else:
                    self._remaining = request.content_length or 0
            elif self._phase == _BODY:
                if self._chunks is not None:
                    piece, error = self._chunks.step(raw)
                else:
                    take = min(self._remaining, len(raw))
                    piece, error = bytes(raw[:take]), None
                    del raw[:take]
                    self._remaining -= take
                if piece:
                    self._conn.receive_data(piece)
                while True:
                    event = self._conn.next_event()
                    if isinstance(event, h11.Data):
                        if not self._take_body(bytes(event.data), events):
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        events.append(END)
                        self._phase = _DONE
                        self._request_done = True
                        break
                    else:
                        break
                if error is not None:
                    events.append(self._stop(error))
                    return
                if self._phase == _BODY:
                    if self._eof:
                        events.append(self._stop(ProtocolError(400, "client closed mid-request")))
                    return
            else:
                current = self._head
                if current is not None and (not current.keep_alive or current.upgrade is not None):
                    # RFC 9112 §9.6: nothing after a ``close`` request is read; after an
                    # upgrade request the rest belongs to the tunnel (if it is accepted).
                    self._stopped = True
                return

    def _scan_head(self) -> tuple[ProtocolError | None, int]:
        """Check the pending head bytes h11 would accept but fastedge refuses, scanning
        each byte once. Returns the error, or the head's length (``-1``: incomplete)."""
        raw = self._raw
        limits = self._limits
        if not self._scanned:
            # RFC 9112 §2.2: ignore empty lines before the request-line (llhttp too).
            while raw[:2] == b"\r\n" or raw[:1] == b"\n":
                del raw[: 2 if raw[:1] == b"\r" else 1]
        start = max(0, self._scanned - 3)
        found = raw.find(b"\r\n\r\n", start)
        end = found + 4 if found >= 0 else -1
        if not self._line_checked:
            line_end = raw.find(b"\r\n")
            # (a CR at the very end may be followed by its LF in the next piece)
            line_stop = line_end if line_end >= 0 else len(raw) - (raw[-1:] == b"\r")
            bad = _BAD_HEAD.search(raw, max(0, self._scanned - 2), line_stop)
            over = _target_overflow(raw, line_stop, limits)
            # Whichever comes first in the bytes decides, a bad byte (400) or the byte
            # that takes the target past its limit (414): the verdict must not depend on
            # how the bytes were split across reads (a piece may end between the two).
            if bad is not None and (over < 0 or bad.start() < over):
                return ProtocolError(400, f"malformed request: {bytes(bad[0])!r} in the head"), -1
            if over >= 0:
                return ProtocolError(414, "request-target too long"), -1
            if line_end >= 0:
                self._line_checked = True
        if end < 0 and len(raw) > limits.max_head_bytes:
            return ProtocolError(431, "request head too large"), -1
        # A CR at the very end may be followed by its LF in the next piece.
        stop = end if end >= 0 else len(raw) - (raw[-1:] == b"\r")
        bad = _BAD_HEAD.search(raw, max(0, self._scanned - 2), stop)
        if bad is not None:
            return ProtocolError(400, f"malformed request: {bytes(bad[0])!r} in the head"), -1
        self._scanned = stop
        return None, end

    def _take_body(self, data: bytes, events: list[RequestEvent]) -> bool:
        limit = self._limits.max_body_bytes
        if limit is not None:
            self._body_seen += len(data)
            if self._body_seen > limit:
                events.append(self._stop(ProtocolError(413, "request body too large")))
                return False
        if data:
            events.append(data)
        return True

    def _request(self, event: h11.Request, head: bytes) -> RequestHead | ProtocolError:
        fields = _split_fields(head)
        method = bytes(event.method)
        target = bytes(event.target)
        version = bytes(event.http_version)
        checked = _check_request(method, target, version, fields, self._limits)
        if isinstance(checked, ProtocolError):
            return checked
        if method == b"CONNECT":
            # A reverse proxy does not open tunnels (RFC 9110 §9.3.6).
            return ProtocolError(501, "CONNECT is not supported")
        content_length, chunked = checked
        connection = _tokens(fields, b"connection")
        if version == b"1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection and b"close" not in connection
        upgrade = None
        if b"upgrade" in connection:
            upgrade = _field(fields, b"upgrade")
            if upgrade is not None and (chunked or content_length):
                return ProtocolError(400, "upgrade request with a body")
        expect = _field(fields, b"expect")
        return RequestHead(
            method=method,
            target=target,
            http_version=version,
            headers=fields,
            keep_alive=keep_alive,
            content_length=content_length,
            chunked=chunked,
            expect_continue=expect is not None and expect.lower() == b"100-continue",
            upgrade=upgrade,
        )

    # -- sending ---------------------------------------------------------------------

    def _send(self, event: h11.Event) -> bytes:
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            self._resp_close = True
            raise ProtocolError(502, f"invalid response: {exc}") from exc
        return data or b""

    def informational(self, status: int, headers: Headers | None = None) -> bytes:
        """Serialise an interim 1xx response (RFC 9110 §15.2)."""
        data = self._send(
            h11.InformationalResponse(
                status_code=status, headers=headers or [], reason=_REASONS.get(status, b"")
            )
        )
        if status == 101:
            self._switched = True
        return data

    def response_head(
        self, status: int, reason: bytes, headers: Headers, *, close: bool = False
    ) -> bytes:
        """Serialise the final response head; h11 chooses the framing (RFC 9112 §6.3)."""
        head = self._head
        keep_alive = (
            head is not None
            and head.keep_alive
            and self._request_done
            and head.upgrade is None
            and not close
        )
        fields = list(headers)
        if not keep_alive:
            fields.append((b"connection", b"close"))
        if head is None or self._conn.their_state is h11.ERROR:
            # No request was parsed (an error answer): a fresh h11 connection may send a
            # response from IDLE; it frames the body by the close.
            self._conn = h11.Connection(h11.SERVER)
        self._bodiless = (head is not None and head.method == b"HEAD") or status in (204, 304)
        self._resp_close = not keep_alive
        return self._send(
            h11.Response(
                status_code=status, headers=fields, reason=reason or _REASONS.get(status, b"")
            )
        )

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the response body; a body longer than its ``content-length``
        raises ``ProtocolError(502)``."""
        if self._bodiless or not data:
            return b""
        return self._send(h11.Data(data=data))

    def end(self) -> bytes:
        """Finish the response body; one shorter than its ``content-length`` raises
        ``ProtocolError(502)``."""
        return self._send(h11.EndOfMessage())

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry another request after the current response."""
        conn = self._conn
        return (
            not self._error
            and not self._resp_close
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
        )

    def upgraded(self) -> bytes:
        """After a 101: the bytes the client sent after the upgrade request's head."""
        tunnel = bytes(self._raw)
        self._raw.clear()
        self._stopped = True
        self._switched = True
        return tunnel


class H11ClientCodec:
    """Client side of one upstream exchange, parsed and serialised by h11."""

    def __init__(self, method: bytes) -> None:
        # h11 learns the method (and so whether a body can follow) from request_head.
        self._head_request = method == b"HEAD"
        self._conn = h11.Connection(h11.CLIENT)
        self._done = False
        self._stopped = False
        self._keep_alive = False

    def _send(self, event: h11.Event) -> bytes:
        try:
            data = self._conn.send(event)
        except h11.LocalProtocolError as exc:
            raise ProtocolError(502, f"invalid request: {exc}") from exc
        return data or b""

    def request_head(self, method: bytes, target: bytes, headers: Headers) -> bytes:
        """Serialise ``METHOD target HTTP/1.1`` and the fields."""
        return self._send(h11.Request(method=method, target=target, headers=headers))

    def body(self, data: bytes) -> bytes:
        """Frame a piece of the request body (chunk-encode when chunked)."""
        if not data:
            return b""
        return self._send(h11.Data(data=data))

    def end(self) -> bytes:
        """Finish the request body."""
        return self._send(h11.EndOfMessage())

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse upstream bytes; see :meth:`fastedge.http.engine.ClientCodec.feed`."""
        if self._stopped:
            return []
        conn = self._conn
        events: list[ResponseEvent] = []
        try:
            conn.receive_data(data)
            while True:
                event = conn.next_event()
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    events.append(self._head(event))
                    if event.status_code == 101:
                        self._stopped = True
                        return events
                elif isinstance(event, h11.Data):
                    if event.data:
                        events.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    events.append(END)
                    self._done = True
                    self._stopped = True
                    return events
                elif isinstance(event, h11.ConnectionClosed):
                    self._stopped = True
                    events.append(ProtocolError(502, "upstream closed before a response"))
                    return events
                else:
                    if not data and not self._done:  # pragma: no cover - h11 raises first
                        self._stopped = True
                        events.append(ProtocolError(502, "upstream closed mid-response"))
                    return events
        except h11.RemoteProtocolError as exc:
            self._stopped = True
            events.append(ProtocolError(502, f"malformed upstream response: {exc}"))
        return events

    def _head(self, event: h11.InformationalResponse | h11.Response) -> ResponseHead:
        fields: Headers = [(bytes(n), bytes(v)) for n, v in event.headers]
        version = bytes(event.http_version)
        connection = _tokens(fields, b"connection")
        if version == b"1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection and b"close" not in connection
        chunked = _tokens(fields, b"transfer-encoding")[-1:] == [b"chunked"]
        length = _field(fields, b"content-length")
        content_length = int(length) if length is not None and not chunked else None
        if (
            content_length is None
            and not chunked
            and not self._head_request
            and event.status_code not in (204, 304)
            and event.status_code >= 200
        ):
            keep_alive = False  # RFC 9112 §6.3 rule 8: the close ends the body
        if isinstance(event, h11.Response):
            self._keep_alive = keep_alive
        return ResponseHead(
            status=event.status_code,
            reason=bytes(event.reason),
            http_version=version,
            headers=fields,
            keep_alive=keep_alive,
            content_length=content_length,
            chunked=chunked,
        )

    @property
    def reusable(self) -> bool:
        """After ``END``: keep-alive, fully read and no stray bytes (h11's own verdict:
        both sides ``DONE``)."""
        conn = self._conn
        return (
            self._done
            and self._keep_alive
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
        )

    def upgraded(self) -> bytes:
        """After a 101: the bytes the upstream sent after the 101 head."""
        return bytes(self._conn.trailing_data[0])


class H11Engine:
    """The h11 engine: the strict, readable reference (``http = "h11"``)."""

    name = "h11"

    def server(self, limits: Limits) -> H11ServerCodec:
        """A codec for a new client connection."""
        return H11ServerCodec(limits)

    def client(self, method: bytes, previous: object = None) -> H11ClientCodec:
        """A codec for one upstream exchange (h11 connections are not recycled)."""
        return H11ClientCodec(method)


H11_ENGINE: Final = H11Engine()
