"""Client codec (fastedge → upstream): request serialisation and response parsing, on both
engines (the ``engine`` fixture)."""

from __future__ import annotations

import pytest

from fastedge.http.engine import (
    END,
    ClientCodec,
    Engine,
    ProtocolError,
    ResponseEvent,
    ResponseHead,
)
from tests.http.conftest import bytewise, merge_bytes

HOST = [(b"host", b"upstream")]


def exchange(
    engine: Engine, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None
) -> ClientCodec:
    """A client codec whose request (no body) was already written."""
    codec = engine.client(method)
    codec.request_head(method, b"/", headers or HOST)
    codec.end()
    return codec


def feed_all(codec: ClientCodec, pieces: list[bytes]) -> list[ResponseEvent]:
    events: list[ResponseEvent] = []
    for piece in pieces:
        events += codec.feed(piece)
    return events


def head_of(event: object) -> ResponseHead:
    assert isinstance(event, ResponseHead), event
    return event


def test_request_head_serialisation(engine: Engine) -> None:
    codec = engine.client(b"GET")
    data = codec.request_head(b"GET", b"/path?q=1", [(b"host", b"up"), (b"accept", b"*/*")])
    assert data == b"GET /path?q=1 HTTP/1.1\r\nhost: up\r\naccept: */*\r\n\r\n"
    assert codec.end() == b""


def test_request_chunked_body(engine: Engine) -> None:
    codec = engine.client(b"POST")
    codec.request_head(b"POST", b"/", [*HOST, (b"transfer-encoding", b"chunked")])
    assert codec.body(b"abc") == b"3\r\nabc\r\n"
    assert codec.body(b"") == b""
    assert codec.body(b"x" * 16) == b"10\r\n" + b"x" * 16 + b"\r\n"
    assert codec.end() == b"0\r\n\r\n"


def test_request_length_body(engine: Engine) -> None:
    codec = engine.client(b"PUT")
    codec.request_head(b"PUT", b"/", [*HOST, (b"content-length", b"5")])
    assert codec.body(b"hel") + codec.body(b"lo") == b"hello"
    assert codec.end() == b""


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("split", [False, True])
def test_content_length_response(engine: Engine, split: bool) -> None:
    codec = exchange(engine)
    events = merge_bytes(feed_all(codec, bytewise(RESPONSE) if split else [RESPONSE]))
    head = head_of(events[0])
    assert head.status == 200
    assert head.reason == b"OK"
    assert head.http_version == b"1.1"
    assert head.headers == [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    assert head.keep_alive
    assert head.content_length == 5
    assert not head.chunked
    assert events[1:] == [b"hello", END]
    assert codec.reusable


def test_chunked_response(engine: Engine) -> None:
    codec = exchange(engine)
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    events = merge_bytes(codec.feed(data))
    head = head_of(events[0])
    assert head.chunked
    assert head.content_length is None
    assert events[1:] == [b"hello world", END]
    assert codec.reusable


def test_close_delimited_response(engine: Engine) -> None:
    codec = exchange(engine)
    events = codec.feed(b"HTTP/1.1 200 OK\r\n\r\npart one ")
    events += codec.feed(b"part two")
    assert END not in events
    events += codec.feed(b"")
    merged = merge_bytes(events)
    assert not head_of(merged[0]).keep_alive
    assert merged[1:] == [b"part one part two", END]
    assert not codec.reusable


def test_connection_close_response_not_reusable(engine: Engine) -> None:
    codec = exchange(engine)
    events = codec.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert events[1:] == [END]
    assert not head_of(events[0]).keep_alive
    assert not codec.reusable


def test_response_to_head_has_no_body(engine: Engine) -> None:
    codec = exchange(engine, b"HEAD")
    events = codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert head_of(events[0]).content_length == 1234
    assert events[1:] == [END]
    assert codec.reusable


def test_response_to_head_byte_at_a_time(engine: Engine) -> None:
    codec = exchange(engine, b"HEAD")
    events = feed_all(codec, bytewise(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"))
    assert [type(e) for e in events] == [ResponseHead, type(END)]
    assert codec.reusable


def test_response_to_head_with_stray_bytes(engine: Engine) -> None:
    codec = exchange(engine, b"HEAD")
    events = codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert events[1:] == [END]
    assert not codec.reusable


def test_stray_bytes_after_response(engine: Engine) -> None:
    codec = exchange(engine)
    events = codec.feed(RESPONSE + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert merge_bytes(events)[1:] == [b"hello", END]
    assert not codec.reusable


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(engine: Engine, status: int) -> None:
    codec = exchange(engine)
    events = codec.feed(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    assert events[1:] == [END]
    assert codec.reusable


def test_continue_then_final(engine: Engine) -> None:
    codec = engine.client(b"POST")
    codec.request_head(
        b"POST", b"/", [*HOST, (b"content-length", b"2"), (b"expect", b"100-continue")]
    )
    interim = codec.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert len(interim) == 1
    assert head_of(interim[0]).status == 100
    codec.body(b"ok")
    codec.end()
    events = codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert head_of(events[0]).status == 200
    assert merge_bytes(events[1:]) == [b"hi", END]
    assert codec.reusable


def test_switching_protocols(engine: Engine) -> None:
    codec = exchange(
        engine, b"GET", [*HOST, (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    )
    events = codec.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"\r\ntunnel bytes"
    )
    assert len(events) == 1
    assert head_of(events[0]).status == 101
    assert codec.upgraded() == b"tunnel bytes"
    assert not codec.reusable


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        b"",
    ],
)
def test_eof_mid_response(engine: Engine, partial: bytes) -> None:
    codec = exchange(engine)
    events = codec.feed(partial) if partial else []
    events += codec.feed(b"")
    error = events[-1]
    assert isinstance(error, ProtocolError)
    assert error.status == 502
    assert not codec.reusable


@pytest.mark.parametrize(
    "garbage",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_response(engine: Engine, garbage: bytes) -> None:
    codec = exchange(engine)
    events = codec.feed(garbage)
    error = events[-1]
    assert isinstance(error, ProtocolError)
    assert error.status == 502
    assert codec.feed(b"more") == []
    assert not codec.reusable


@pytest.mark.parametrize("space", [b"", b" ", b"  ", b"\t", b" \t", b"\t ", b"\t\t"])
def test_chunked_with_trailing_whitespace_never_leaks_framing(engine: Engine, space: bytes) -> None:
    # llhttp reads `chunked` followed by a tab as another coding (a body until close).
    # Whatever an engine makes of it, the client gets the decoded body or a 502: never
    # the chunk framing as if it were the body, and never a body that ends early.
    codec = exchange(engine)
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked" + space + b"\r\n\r\n"
    events = codec.feed(response + b"5\r\nhello\r\n0\r\n\r\n") + codec.feed(b"")
    errors = [e for e in events if isinstance(e, ProtocolError)]
    body = b"".join(e for e in events if isinstance(e, bytes))
    if errors:
        assert errors[0].status == 502
        assert b"\r\n" not in body
    else:
        assert head_of(events[0]).chunked
        assert body == b"hello"
        assert events[-1] is END
    if engine.name == "fast":
        # Spaces are trimmed by llhttp's own reading too; a tab changes its framing.
        assert bool(errors) == (b"\t" in space)


def test_eof_after_end_is_quiet(engine: Engine) -> None:
    codec = exchange(engine)
    codec.feed(RESPONSE)
    assert codec.feed(b"") == []


@pytest.mark.parametrize(
    "coding",
    [b"gzip", b"gzip, chunked", b"chunked, gzip", b"chunked\r\nTransfer-Encoding: chunked"],
)
def test_unsupported_transfer_coding(engine: Engine, coding: bytes) -> None:
    # A coding fastedge does not decode would reach the client without its framing
    # field: refused on both engines.
    codec = exchange(engine)
    events = codec.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n")
    error = events[-1]
    assert isinstance(error, ProtocolError)
    assert error.status == 502
