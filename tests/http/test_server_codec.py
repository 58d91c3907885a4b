"""Server codec: request parsing, RFC 9112 strictness, limits and response framing, on
both engines (the ``engine`` fixture)."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastedge.http.engine import (
    END,
    Engine,
    Limits,
    ProtocolError,
    RequestEvent,
    RequestHead,
    ServerCodec,
)
from tests.http.conftest import DEFAULT_LIMITS, bytewise, describe, merge_bytes, serve

GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"


def head_of(events: list[RequestEvent]) -> RequestHead:
    head = events[0]
    assert isinstance(head, RequestHead)
    return head


def error_of(events: list[RequestEvent]) -> ProtocolError:
    error = events[-1]
    assert isinstance(error, ProtocolError), events
    return error


def parse_response(data: bytes, *, method: bytes = b"GET") -> tuple[h11.Response, bytes, bool]:
    """Read a serialised response with h11 as the client that sent ``method``: the head,
    the body, and whether the response framing ended before EOF."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return response, body, True
        else:
            client.receive_data(b"")
            rest = client.next_event()
            if isinstance(rest, h11.Data):
                body += rest.data
            return response, body, False


def fields(response: h11.Response) -> dict[bytes, bytes]:
    return {name: value for name, value in response.headers}


# -- parsing ---------------------------------------------------------------------------


def test_simple_get_keep_alive(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(GET)
    assert events[1:] == [END]
    head = head_of(events)
    assert head.method == b"GET"
    assert head.target == b"/a?b=1"
    assert head.http_version == b"1.1"
    assert head.headers == [(b"host", b"example.com"), (b"accept", b"*/*")]
    assert head.keep_alive
    assert head.content_length is None
    assert not head.chunked
    assert not head.has_body
    assert not head.expect_continue
    assert head.upgrade is None
    codec.response_head(200, b"OK", [(b"content-length", b"2")])
    codec.body(b"hi")
    codec.end()
    assert codec.keep_alive
    assert codec.next_cycle() == []
    assert describe(codec.feed(GET)) == describe(events)


def test_field_names_lowercased_values_trimmed(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(b"GET / HTTP/1.1\r\nHOST: a\r\nX-Thing: \t spaced out \t\r\n\r\n")
    assert head_of(events).headers == [(b"host", b"a"), (b"x-thing", b"spaced out")]


def test_connection_close(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not head_of(events).keep_alive
    response = codec.response_head(200, b"", [(b"content-length", b"0")])
    codec.end()
    assert fields(parse_response(response)[0]).get(b"connection") == b"close"
    assert not codec.keep_alive


def test_bytes_after_close_request_are_ignored(engine: Engine) -> None:
    # RFC 9112 §9.6: the server reads nothing after a request with ``close``; llhttp's
    # strict "Data after Connection: close" error must not surface.
    codec = engine.server(DEFAULT_LIMITS)
    data = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGARBAGE\r\n\r\n"
    events = serve(codec, [data])
    assert [type(e) for e in events] == [RequestHead, type(END)]
    assert codec.feed(b"more garbage") == []


def test_http10_without_keep_alive(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(b"GET / HTTP/1.0\r\n\r\n")
    head = head_of(events)
    assert head.http_version == b"1.0"
    assert not head.keep_alive
    data = codec.response_head(200, b"", [])
    data += codec.body(b"hello") + codec.end()
    response, body, framed = parse_response(data)
    # RFC 9112 §6.3 rule 8: no chunked for 1.0 clients, the close ends the body.
    assert not framed
    assert body == b"hello"
    assert fields(response)[b"connection"] == b"close"
    assert b"transfer-encoding" not in fields(response)
    assert not codec.keep_alive


def test_http10_keep_alive(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert head_of(events).keep_alive
    data = codec.response_head(200, b"", [(b"content-length", b"2")]) + codec.body(b"hi")
    data += codec.end()
    response, body, _ = parse_response(data)
    assert body == b"hi"
    if engine.name == "fast":
        assert fields(response)[b"connection"] == b"keep-alive"
        assert codec.keep_alive
    else:
        # h11 has no HTTP/1.0 keep-alive: it closes, as RFC 9112 §9.3 allows.
        assert fields(response)[b"connection"] == b"close"
        assert not codec.keep_alive


def test_pipelining_three_requests_in_one_feed(engine: Engine) -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    whole = serve(engine.server(DEFAULT_LIMITS), [data])
    targets = [e.target for e in whole if isinstance(e, RequestHead)]
    assert targets == [b"/1", b"/2", b"/3"]
    assert merge_bytes(whole).count(END) == 3
    assert b"abc" in merge_bytes(whole)
    one_by_one = serve(engine.server(DEFAULT_LIMITS), bytewise(data))
    assert describe(one_by_one) == describe(whole)


def test_pipelined_requests_held_or_parsed_ahead(engine: Engine) -> None:
    # Both behaviours are allowed; together, feed + next_cycle give every request once.
    codec = engine.server(DEFAULT_LIMITS)
    first = codec.feed(GET + GET)
    assert first[:2] == [first[0], END]
    codec.response_head(204, b"", [])
    codec.end()
    rest = first[2:] + codec.next_cycle()
    assert describe(rest) == describe(first[:2])


def test_content_length_body(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    data = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world"
    events = merge_bytes(codec.feed(data[:40]) + codec.feed(data[40:]))
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.content_length == 11
    assert head.has_body
    assert events[1:] == [b"hello world", END]


def test_chunked_body_with_extensions_and_trailers(engine: Engine) -> None:
    data = (
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;name=value;flag;q="quoted \\" string"\r\nhello\r\n'
        b"6\r\n world\r\n"
        b"0\r\nTrailer-Field: dropped\r\n\r\n"
    )
    for pieces in ([data], bytewise(data)):
        codec = engine.server(DEFAULT_LIMITS)
        events: list[RequestEvent] = []
        for piece in pieces:
            events += codec.feed(piece)
        merged = merge_bytes(events)
        head = merged[0]
        assert isinstance(head, RequestHead)
        assert head.chunked
        assert head.content_length is None
        # Chunk extensions and trailer fields are accepted, never surfaced.
        assert merged[1:] == [b"hello world", END]
        assert head.headers == [(b"host", b"a"), (b"transfer-encoding", b"chunked")]


def test_expect_continue(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert head_of(events).expect_continue
    assert codec.informational(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert codec.feed(b"ok") == [b"ok", END]


UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_accepted(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(UPGRADE + b"tunnel-")
    assert events[1:] == [END]
    assert head_of(events).upgrade == b"websocket"
    assert codec.feed(b"bytes") == []
    switch = codec.informational(101, [(b"connection", b"upgrade"), (b"upgrade", b"websocket")])
    assert switch.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert switch.endswith(b"\r\n\r\n")
    assert codec.upgraded() == b"tunnel-bytes"


def test_upgrade_refused_closes(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = serve(codec, [UPGRADE + GET])
    assert [type(e) for e in events] == [RequestHead, type(END)]
    assert not codec.keep_alive


def test_upgrade_with_body_is_rejected(engine: Engine) -> None:
    # After a 101 the bytes after the head would be either body or tunnel: ambiguous
    # framing (RFC 9112 §6.1 spirit), so fastedge refuses the request.
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(UPGRADE[:-2] + b"Content-Length: 3\r\n\r\nabc")
    assert error_of(events).status == 400


def test_eof_between_messages(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    assert codec.feed(b"") == []
    codec = engine.server(DEFAULT_LIMITS)
    serve(codec, [GET], eof=False)
    assert codec.feed(b"") == []


@pytest.mark.parametrize(
    "partial",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab",
        b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
)
def test_eof_mid_message(engine: Engine, partial: bytes) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(partial)
    assert error_of(codec.feed(b"")).status == 400


# -- rejections (RFC 9112) ---------------------------------------------------------------

H = b"Host: a\r\n"
REJECTED = {
    # §6.1: both framings at once is how requests are smuggled.
    "cl-and-te": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te-and-cl": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n0\r\n\r\n",
        400,
    ),
    # §6.3 rule 5: differing or invalid lengths; identical duplicates refused too.
    "cl-differ": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
    ),
    "cl-same": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na",
        400,
    ),
    "cl-list": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\na", 400),
    "cl-plus": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\na", 400),
    "cl-negative": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    "cl-hex": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x1\r\n\r\na", 400),
    "cl-empty": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    # §6.1, §7: only a single final ``chunked`` is supported (400 on both engines).
    "te-gzip": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    "te-gzip-chunked": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te-chunked-twice": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te-comma-chunked": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te-http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # §5.2 obs-fold, §2.2 bare CR / LF, RFC 9110 §5.5 control characters.
    "obs-fold": (b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    "bare-lf-field": (b"GET / HTTP/1.1\r\n" + H + b"X: a\nY: b\r\n\r\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    "nul": (b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    "ctl": (b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    "del": (b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", 400),
    # §5.1: no whitespace between field name and colon.
    "space-before-colon": (b"GET / HTTP/1.1\r\n" + H + b"X : a\r\n\r\n", 400),
    "empty-name": (b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n", 400),
    # §7.1: chunk-size is 1*HEXDIG and nothing else.
    "chunk-0x": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-underscore": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-plus": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-minus": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-overlong": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-space": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-empty": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n\r\n\r\n",
        400,
    ),
    "chunk-no-crlf": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloX\r\n0\r\n\r\n",
        400,
    ),
    "chunk-bare-lf": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-ext-space": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5; a=b\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    # §2.3: HTTP/1.0 and 1.1 only (400, not 505, on both engines).
    "version-1.2": (b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    "version-2.0": (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
    "version-0.9": (b"GET /\r\n\r\n", 400),
    "version-junk": (b"GET / HTTP/1.10\r\n" + H + b"\r\n", 400),
    # §3.2: exactly one Host on 1.1, never two.
    "host-missing": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "host-twice": (b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    "host-twice-1.0": (b"GET / HTTP/1.0\r\n" + H + H + b"\r\n", 400),
    # §3.2: request-target forms.
    "target-relative": (b"GET foo HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-authority": (b"GET a:80 HTTP/1.1\r\n" + H + b"\r\n", 400),
    "target-space": (b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "method-lowercase": (b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "method-unknown": (b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 400),
    # A reverse proxy opens no tunnels (RFC 9110 §9.3.6).
    "connect": (b"CONNECT a:443 HTTP/1.1\r\n" + H + b"\r\n", 501),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected(engine: Engine, name: str) -> None:
    data, status = REJECTED[name]
    for pieces in ([data], bytewise(data)):
        events = serve(engine.server(DEFAULT_LIMITS), pieces)
        assert error_of(events).status == status, (name, events)
        if not name.startswith("chunk"):
            # Refused at head time: nothing of the bad request is handed on.
            assert len(events) == 1


@pytest.mark.parametrize(
    "data",
    [
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # RFC 9112 §2.2: empty line first
        b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n",  # obs-text
        b"GET / HTTP/1.1\r\nHost: a\r\nX:\r\n\r\n",  # empty value
        b"GET http://a/b?c HTTP/1.1\r\nHost: a\r\n\r\n",  # absolute-form
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",  # asterisk-form
        b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n\r\nabc",
        b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n000\r\n\r\n",
    ],
)
def test_accepted_edge_cases(engine: Engine, data: bytes) -> None:
    events = serve(engine.server(DEFAULT_LIMITS), [data])
    assert isinstance(events[0], RequestHead)
    assert events[-1] is END


def test_engines_agree_on_rejections() -> None:
    from fastedge.http.engine import get_engine

    for name, (data, _) in REJECTED.items():
        verdicts = {
            describe(serve(get_engine(e).server(DEFAULT_LIMITS), [data]))[-1]
            for e in ("h11", "fast")
        }
        assert len(verdicts) == 1, name


# -- limits ------------------------------------------------------------------------------

SMALL = Limits(max_head_bytes=1024, max_uri_bytes=100, max_headers=5, max_body_bytes=10)


def test_head_too_large(engine: Engine) -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 1100 + b"\r\n\r\n"
    for pieces in ([big], [big[:600], big[600:]], [big[:-4]]):
        codec = engine.server(SMALL)
        events: list[RequestEvent] = []
        for piece in pieces:
            events += codec.feed(piece)
        assert error_of(events).status == 431


def test_head_under_limit(engine: Engine) -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 900 + b"\r\n\r\n"
    assert engine.server(SMALL).feed(data)[-1] is END


def test_uri_too_long(engine: Engine) -> None:
    data = b"GET /" + b"u" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert error_of(engine.server(SMALL).feed(data)).status == 414
    # Also while the request line is still arriving.
    assert error_of(engine.server(SMALL).feed(data[:150])).status == 414


def test_too_many_headers(engine: Engine) -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 5 + b"\r\n"
    assert error_of(engine.server(SMALL).feed(data)).status == 431
    ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 4 + b"\r\n"
    assert engine.server(SMALL).feed(ok)[-1] is END


def test_content_length_over_limit(engine: Engine) -> None:
    codec = engine.server(SMALL)
    events = codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    # Refused at head time: the head is never emitted.
    assert describe(events) == [("error", 413)]
    assert not codec.keep_alive


def test_chunked_body_over_limit(engine: Engine) -> None:
    codec = engine.server(SMALL)
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n"
    )
    events = codec.feed(data)
    assert isinstance(events[0], RequestHead)
    assert error_of(events).status == 413
    assert b"".join(e for e in events if isinstance(e, bytes)) == b"abcdef"


def test_unlimited_body() -> None:
    from fastedge.http.engine import get_engine

    for name in ("h11", "fast"):
        codec = get_engine(name).server(Limits(max_body_bytes=None))
        events = codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n")
        assert head_of(events).content_length == 99999999999


# -- response serialisation ----------------------------------------------------------------


def respond(
    codec: ServerCodec, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    data = codec.response_head(status, b"", headers)
    if body:
        data += codec.body(body[:2]) + codec.body(body[2:])
    return data + codec.end()


def test_response_content_length(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    data = respond(
        codec, 200, [(b"content-type", b"text/plain"), (b"content-length", b"5")], b"hello"
    )
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    response, body, framed = parse_response(data)
    assert (body, framed) == (b"hello", True)
    assert fields(response)[b"content-type"] == b"text/plain"
    assert b"connection" not in fields(response)
    assert codec.keep_alive


def test_response_chunked_for_http11(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    head = codec.response_head(200, b"", [])
    assert codec.body(b"") == b""
    piece = codec.body(b"hello world")
    assert piece == b"b\r\nhello world\r\n"
    last = codec.end()
    assert last == b"0\r\n\r\n"
    response, body, framed = parse_response(head + piece + last)
    assert fields(response)[b"transfer-encoding"] == b"chunked"
    assert (body, framed) == (b"hello world", True)
    assert codec.keep_alive


def test_response_to_head_has_no_body(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = codec.response_head(200, b"", [(b"content-length", b"1234")])
    assert codec.body(b"ignored") == b""
    assert codec.end() == b""
    response, body, framed = parse_response(head, method=b"HEAD")
    # RFC 9110 §9.3.2: the content-length of the GET response is kept.
    assert fields(response)[b"content-length"] == b"1234"
    assert (body, framed) == (b"", True)
    assert codec.keep_alive


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(engine: Engine, status: int) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    head = codec.response_head(status, b"", [])
    assert codec.body(b"x") == b""
    assert codec.end() == b""
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"transfer-encoding" not in head.lower()
    assert codec.keep_alive


def test_reason_phrases(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    assert codec.response_head(404, b"", [(b"content-length", b"0")]).startswith(
        b"HTTP/1.1 404 Not Found\r\n"
    )
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    assert codec.response_head(200, b"Fine", [(b"content-length", b"0")]).startswith(
        b"HTTP/1.1 200 Fine\r\n"
    )


def test_close_requested_by_caller(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    head = codec.response_head(200, b"", [(b"content-length", b"0")], close=True)
    codec.end()
    assert fields(parse_response(head)[0])[b"connection"] == b"close"
    assert not codec.keep_alive


def test_error_response_without_request(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    events = codec.feed(b"NOT HTTP AT ALL\r\n\r\n")
    assert error_of(events).status == 400
    head = codec.response_head(400, b"", [(b"content-length", b"2")])
    data = head + codec.body(b"no") + codec.end()
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close\r\n" in data.lower()
    assert data.endswith(b"\r\n\r\nno")
    assert not codec.keep_alive


def test_early_response_before_body_end_closes(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    head = codec.response_head(401, b"", [(b"content-length", b"0")])
    codec.end()
    assert b"connection: close" in head.lower()
    assert not codec.keep_alive


def test_body_longer_than_content_length(engine: Engine) -> None:
    # Both engines refuse to emit more than declared: ProtocolError(502), and the
    # connection must then be closed.
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    codec.response_head(200, b"", [(b"content-length", b"3")])
    assert codec.body(b"ab") == b"ab"
    with pytest.raises(ProtocolError) as info:
        codec.body(b"cd")
    assert info.value.status == 502
    assert not codec.keep_alive


def test_body_shorter_than_content_length(engine: Engine) -> None:
    codec = engine.server(DEFAULT_LIMITS)
    codec.feed(GET)
    codec.response_head(200, b"", [(b"content-length", b"3")])
    codec.body(b"ab")
    with pytest.raises(ProtocolError) as info:
        codec.end()
    assert info.value.status == 502
    assert not codec.keep_alive


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_too_many_trailer_fields(engine: Engine) -> None:
    codec = engine.server(SMALL)
    events = codec.feed(CHUNKED_HEAD + b"1\r\nx\r\n0\r\n" + b"T: 1\r\n" * 6 + b"\r\n")
    assert error_of(events).status == 431


def test_oversized_chunk_metadata(engine: Engine) -> None:
    # Chunk extensions and trailers are bounded like a head (llhttp streams them, but a
    # proxy must not buffer an endless chunk line or trailer section).
    codec = engine.server(SMALL)
    events = codec.feed(CHUNKED_HEAD)
    events += codec.feed(b"5;" + b"e" * 600)
    events += codec.feed(b"e" * 600)
    assert error_of(events).status == 431
    codec = engine.server(SMALL)
    events = codec.feed(CHUNKED_HEAD + b"1\r\nx\r\n0\r\n")
    events += codec.feed(b"Trailer: " + b"t" * 600)
    events += codec.feed(b"t" * 600)
    assert error_of(events).status == 431


def test_many_small_chunks_are_fine(engine: Engine) -> None:
    codec = engine.server(Limits(max_head_bytes=1024))
    data = CHUNKED_HEAD + b"1;ext=value\r\nx\r\n" * 500 + b"0\r\n\r\n"
    events = merge_bytes(codec.feed(data[:5000]) + codec.feed(data[5000:]))
    assert events[1:] == [b"x" * 500, END]


PIPELINE = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: v\r\n\r\n"
    b"PUT /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nwxyz"
    b"GET /4 HTTP/1.0\r\n\r\n"
)


@given(cuts=st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12))
@settings(max_examples=60, deadline=None)
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    from fastedge.http.engine import get_engine

    bounds = [0, *sorted(set(cuts)), len(PIPELINE)]
    pieces = [PIPELINE[a:b] for a, b in itertools.pairwise(bounds)]
    expected = None
    for name in ("h11", "fast"):
        whole = describe(serve(get_engine(name).server(DEFAULT_LIMITS), [PIPELINE]))
        split = describe(serve(get_engine(name).server(DEFAULT_LIMITS), pieces))
        assert split == whole
        expected = expected or whole
        assert whole == expected
    assert expected is not None
    assert [e[2] for e in expected if isinstance(e, tuple)] == [b"/1", b"/2", b"/3", b"/4"]


@pytest.mark.parametrize(
    ("data", "version"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"1.1"),
        (b"GET / HTTP/1.0\r\n\r\n", b"1.0"),
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", b"1.1"),
        # llhttp accepts several spaces before the target: the version must still be
        # read right, not guessed from where a single space would put it.
        (b"GET          /xxHTTP/1.1yy HTTP/1.0\r\n\r\n", b"1.0"),
        (b"GET  /HTTP/1.1 HTTP/1.0\r\n\r\n", b"1.0"),
    ],
)
def test_version_reported(engine: Engine, data: bytes, version: bytes) -> None:
    for pieces in ([data], bytewise(data)):
        events = serve(engine.server(DEFAULT_LIMITS), pieces)
        if engine.name == "h11" and b"  " in data:
            # h11 requires exactly one SP (RFC 9112 §3); see test_corpora_parse.
            assert error_of(events).status == 400
            continue
        assert head_of(events).http_version == version
