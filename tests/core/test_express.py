"""The express-lane scanners on both implementations, held byte for byte to the general path.

What ``scan_request``/``scan_response`` accept must become exactly the bytes the general
path sends (``FastServerCodec``/``FastClientCodec`` plus ``fastedge.http.headers``), and
they must never accept what that path refuses or reads differently. Every check here
therefore compares against the general path itself rather than against hand-written
expectations (two golden tests pin the format independently).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastedge.http.engine import END, Limits, RequestHead, ResponseHead
from fastedge.http.fast_engine import FastClientCodec, FastServerCodec
from fastedge.http.headers import rewrite_request_headers, rewrite_response_headers

from .conftest import load

CLIENT_IP = b"203.0.113.7"
PROTO = b"https"
VIA = b"1.1 fastedge"
RID = b"rid-from-proxy"
LIMITS = Limits()
CORPORA = Path("/work/shared/corpora")
FRESH_ID = re.compile(rb"[0-9a-f]{22,}")

compiled = load("express", "compiled")
python = load("express", "python")


@pytest.fixture
def ex(impl: str) -> ModuleType:
    return load("express", impl)


def scan(ex: ModuleType, data: bytes, limits: Limits = LIMITS) -> Any:
    return ex.scan_request(
        data,
        CLIENT_IP,
        PROTO,
        VIA,
        limits.max_head_bytes,
        limits.max_uri_bytes,
        limits.max_headers,
    )


def client_request_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The first valid client X-Request-Id, as rewrite_request_headers picks it."""
    for name, value in headers:
        valid = 0 < len(value) <= 200 and all(0x21 <= c <= 0x7E for c in value)
        if name == b"x-request-id" and valid:
            return value
    return None


def assert_request_parity(req: Any, data: bytes, limits: Limits = LIMITS) -> None:
    """``req`` (an accepted scan of ``data``) equals what the general path makes of it."""
    events = FastServerCodec(limits).feed(data)
    assert len(events) == 2, events  # exactly one request, complete, no error
    head, end = events
    assert isinstance(head, RequestHead) and end is END
    headers, request_id, host = rewrite_request_headers(
        head.headers, client_ip=CLIENT_IP, proto=PROTO, via=VIA
    )
    if client_request_id(head.headers) is None:
        # Both sides drew a fresh id from their own counter: compare the rest.
        assert FRESH_ID.fullmatch(req.request_id)
        assert headers[-1][0] == b"x-request-id"
        headers[-1] = (b"x-request-id", req.request_id)
    else:
        assert req.request_id == request_id
    for target in (head.target, b"/upstream/prefix" + head.target):
        wire = FastClientCodec(head.method).request_head(head.method, target, headers)
        assert req.compose(target) == wire
    path, question, query = head.target.partition(b"?")
    assert (req.method, req.target, req.path, req.query) == (
        head.method,
        head.target,
        path,
        question + query,
    )
    assert (req.host, req.keep_alive, req.data) == (host, head.keep_alive, data)
    # The fields as the codec reports them (what filters answering from memory see).
    assert req.headers() == head.headers
    sensitive = {b"cache-control", b"if-none-match", b"if-modified-since"}
    assert req.cache_sensitive == any(n in sensitive for n, _ in head.headers)


def assert_response_parity(
    got: tuple[int, bool, int, bytes], data: bytes, head_request: bool, close: bool
) -> None:
    """``got`` (an accepted scan of ``data``) equals what the general path sends."""
    method = b"HEAD" if head_request else b"GET"
    server = FastServerCodec(LIMITS)
    server.feed(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec = FastClientCodec(method)
    events = codec.feed(data)
    assert len(events) >= 2, events
    ev, *body_events, end = events
    assert isinstance(ev, ResponseHead) and end is END, events
    body = b"".join(body_events)  # type: ignore[arg-type]  # bytes events between the two
    headers = rewrite_response_headers(
        ev.headers,
        via=VIA,
        request_id=RID,
        keep_length=ev.content_length is not None and not ev.chunked,
    )
    wire = server.response_head(ev.status, ev.reason, headers, close=close)
    # The proxy frames each body event as it comes (one chunk per upstream chunk when
    # chunked); end() raises on a short body.
    wire += b"".join(server.body(piece) for piece in body_events) + server.end()  # type: ignore[arg-type]
    status, reusable, body_length, out = got
    assert out == wire
    assert (status, body_length) == (ev.status, len(body))
    said_close = any(n == b"connection" and v.lower() == b"close" for n, v in ev.headers)
    if head_request and ev.content_length is None and status not in (204, 304):
        # llhttp does not know the request was HEAD: without Content-Length it expects a
        # body read until close, so the codec never reuses such a connection. Nothing
        # follows the head of a HEAD response (RFC 9110 §9.3.2); express reuses it.
        assert not codec.reusable
        assert reusable is not said_close
    else:
        assert reusable is codec.reusable


def check_request(ex: ModuleType, data: bytes, limits: Limits = LIMITS) -> Any:
    req = scan(ex, data, limits)
    if req is not None:
        assert_request_parity(req, data, limits)
    return req


def check_response(
    ex: ModuleType, data: bytes, head_request: bool = False, close: bool = False
) -> Any:
    got = ex.scan_response(data, head_request, VIA, RID, close)
    if got is not None:
        assert_response_parity(got, data, head_request, close)
    return got


def request(*fields: bytes, line: bytes = b"GET / HTTP/1.1") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def response(*fields: bytes, body: bytes = b"", line: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


# -- golden bytes ----------------------------------------------------------------------


def test_request_golden(ex: ModuleType) -> None:
    data = request(
        b"Host: h.example",
        b"User-Agent:  u/1 ",
        b"Connection: close",
        b"X-Request-Id: r1",
        b"Via: 1.0 a",
        b"X-Forwarded-For: 10.0.0.1",
        b"TE: trailers",
        b"Accept: */*",
        line=b"GET /p?q=1 HTTP/1.1",
    )
    req = scan(ex, data)
    assert req.compose(b"/up/p?q=1") == (
        b"GET /up/p?q=1 HTTP/1.1\r\nhost: h.example\r\nuser-agent: u/1\r\naccept: */*\r\n"
        b"x-forwarded-for: 10.0.0.1, 203.0.113.7\r\nx-forwarded-proto: https\r\n"
        b"x-forwarded-host: h.example\r\nvia: 1.0 a, 1.1 fastedge\r\nx-request-id: r1\r\n\r\n"
    )
    assert (req.path, req.query, req.host, req.keep_alive) == (b"/p", b"?q=1", b"h.example", False)


def test_response_golden(ex: ModuleType) -> None:
    data = response(
        b"Content-Type: text/plain",
        b"Content-Length: 5",
        b"Via: 1.1 up",
        b"Connection: close",
        b"Keep-Alive: timeout=5",
        body=b"hello",
        line=b"HTTP/1.1 200 Fine",
    )
    assert ex.scan_response(data, False, VIA, RID, True) == (
        200,
        False,
        5,
        b"HTTP/1.1 200 Fine\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n"
        b"via: 1.1 up, 1.1 fastedge\r\nx-request-id: rid-from-proxy\r\nconnection: close\r\n"
        b"\r\nhello",
    )


def test_request_attributes_are_read_only(ex: ModuleType) -> None:
    req = scan(ex, request(b"Host: a"))
    for name in ("method", "target", "path", "query", "host", "request_id", "keep_alive"):
        with pytest.raises(AttributeError):
            setattr(req, name, b"x")


# -- request parity --------------------------------------------------------------------

LONG_ID = b"i" * 200
ACCEPTED_REQUESTS = {
    "minimal": request(b"Host: example.com"),
    "head-query": request(b"Host: a", line=b"HEAD /a/b?x=1&y=%20&z HTTP/1.1"),
    "name-case-ows": request(b"hOsT:\t example.com:8080 \t", b"USER-agent:x", b"aCCept:  */*"),
    "value-inner-ws": request(b"Host: a", b"X-A: a \t b  c"),
    "empty-values": request(b"Host: a", b"X-Empty:", b"X-Blank: \t "),
    "host-last": request(b"Accept: */*", b"X-B: 1", b"Host: a"),
    "rid-valid": request(b"Host: a", b"X-Request-Id: abc-123"),
    "rid-200": request(b"Host: a", b"X-Request-Id: " + LONG_ID),
    "rid-201-then-valid": request(
        b"Host: a", b"X-Request-Id: " + LONG_ID + b"i", b"x-request-id: second"
    ),
    "rid-repeated": request(b"Host: a", b"X-Request-Id: one", b"X-REQUEST-ID: two"),
    "rid-space": request(b"Host: a", b"X-Request-Id: a b"),
    "rid-empty": request(b"Host: a", b"X-Request-Id:"),
    "xff": request(b"Host: a", b"X-Forwarded-For: 10.0.0.1, 10.0.0.2"),
    "xff-empty": request(b"Host: a", b"X-Forwarded-For:"),
    "via": request(b"Host: a", b"Via: 1.0 a, 1.1 b"),
    "xff-via-xfp-xfh": request(
        b"X-Forwarded-Proto: http",
        b"Host: a",
        b"Via: 1.0 x",
        b"X-Forwarded-Host: evil",
        b"X-Forwarded-For: 1.2.3.4",
    ),
    "connection-keep-alive": request(b"Host: a", b"Connection: keep-alive"),
    "connection-Keep-Alive": request(b"Host: a", b"Connection: Keep-Alive"),
    "connection-close": request(b"Host: a", b"Connection: close"),
    "connection-CLOSE": request(b"Host: a", b"connection:CLOSE "),
    "connection-both": request(b"Connection: keep-alive", b"Host: a", b"Connection: close"),
    "hop-by-hop": request(
        b"Host: a",
        b"TE: trailers",
        b"Keep-Alive: timeout=5",
        b"Trailer: x",
        b"Proxy-Connection: keep-alive",
    ),
    "close-named-keep-alive": request(b"Host: a", b"Close: x", b"Connection: keep-alive"),
    "target-chars": request(
        b"Host: a",
        line=b"GET /AZaz09-._~!$&'()*+,;=:@/?%?/ HTTP/1.1",
    ),
    "target-question": request(b"Host: a", line=b"GET /? HTTP/1.1"),
    "target-two-questions": request(b"Host: a", line=b"GET /a?b?c HTTP/1.1"),
    "tchar-name": request(b"Host: a", b"!#$%&'*+-.^_`|~09AZaz: v"),
    "max-fields": request(b"Host: a", *[b"X-F%d: %d" % (i, i) for i in range(99)]),
    "cache-control": request(b"Host: a", b"Cache-Control: no-cache"),
    "conditionals": request(b"Host: a", b'If-None-Match: "x"', b"IF-MODIFIED-SINCE: y"),
    "cache-looking-names": request(b"Host: a", b"X-Cache-Control: 1", b"If-Match: *"),
}


@pytest.mark.parametrize("data", ACCEPTED_REQUESTS.values(), ids=ACCEPTED_REQUESTS.keys())
def test_request_parity(ex: ModuleType, data: bytes) -> None:
    assert check_request(ex, data) is not None


def test_fresh_request_ids_follow_the_counter(ex: ModuleType) -> None:
    first = ex.new_request_id()
    req = scan(ex, request(b"Host: a", b"X-Request-Id: has space"))
    last = ex.new_request_id()
    assert [int(i[12:], 16) for i in (first, req.request_id, last)] == [
        int(first[12:], 16) + n for n in range(3)
    ]
    assert req.request_id[:12] == first[:12] == last[:12]


def test_new_request_id_format_and_uniqueness(ex: ModuleType) -> None:
    ids = [ex.new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rb"[0-9a-f]{22}", i) for i in ids)  # counter < 16**10 here
    assert len({i[:12] for i in ids}) == 1


def test_request_id_prefix_is_random_per_module() -> None:
    assert compiled.new_request_id()[:12] != python.new_request_id()[:12]


def test_headers_share_the_request_id_counter() -> None:
    """One counter per process: the general path's ids come from the selected module."""
    import fastedge._core as core
    from fastedge.http import headers

    selected = compiled if core.USING_EXTENSIONS else python
    assert headers.new_request_id is core.new_request_id is selected.new_request_id


# -- refusals: one per rule --------------------------------------------------------------

REFUSED_REQUESTS = {
    # exactly one head, nothing after it
    "incomplete": b"GET / HTTP/1.1\r\nHost: a\r\n",
    "body-after-head": request(b"Host: a") + b"x",
    "pipelined": request(b"Host: a") * 2,
    "leading-crlf": b"\r\n" + request(b"Host: a"),
    # request line
    "method-post": request(b"Host: a", line=b"POST / HTTP/1.1"),
    "method-lower": request(b"Host: a", line=b"get / HTTP/1.1"),
    "method-options": request(b"Host: a", line=b"OPTIONS / HTTP/1.1"),
    "two-sp-before-target": request(b"Host: a", line=b"GET  / HTTP/1.1"),
    "two-sp-before-version": request(b"Host: a", line=b"GET /  HTTP/1.1"),
    "htab-separator": request(b"Host: a", line=b"GET\t/ HTTP/1.1"),
    "target-asterisk": request(b"Host: a", line=b"GET * HTTP/1.1"),
    "target-absolute": request(b"Host: a", line=b"GET http://a/ HTTP/1.1"),
    "target-fragment": request(b"Host: a", line=b"GET /a#b HTTP/1.1"),
    "target-brace": request(b"Host: a", line=b"GET /{x} HTTP/1.1"),
    "target-quote": request(b"Host: a", line=b'GET /"x" HTTP/1.1'),
    "target-high-byte": request(b"Host: a", line=b"GET /\xc3\xa9 HTTP/1.1"),
    "target-del": request(b"Host: a", line=b"GET /\x7f HTTP/1.1"),
    "http-1.0": request(b"Host: a", line=b"GET / HTTP/1.0"),
    "http-1.2": request(b"Host: a", line=b"GET / HTTP/1.2"),
    "version-lower": request(b"Host: a", line=b"GET / http/1.1"),
    "request-line-lf": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    # field syntax
    "name-empty": request(b"Host: a", b": x"),
    "name-space": request(b"Host: a", b"X A: x"),
    "name-non-tchar": request(b"Host: a", b"X@A: x"),
    "space-before-colon": request(b"Host : a"),
    "no-colon": request(b"Host: a", b"X-A"),
    "obs-fold": request(b"Host: a", b"X-A: x", b" folded"),
    "value-high-byte": request(b"Host: a", b"X-A: caf\xc3\xa9"),
    "value-nul": request(b"Host: a", b"X-A: a\x00b"),
    "value-del": request(b"Host: a", b"X-A: a\x7fb"),
    "value-ctl": request(b"Host: a", b"X-A: a\x01b"),
    "value-bare-cr": request(b"Host: a", b"X-A: a\rb"),
    "value-bare-lf": request(b"Host: a", b"X-A: a\nb"),
    "value-cr-before-crlf": request(b"Host: a", b"X-A: a\r"),
    "lf-line-ending": b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    # host
    "host-missing": request(b"Accept: */*"),
    "host-twice": request(b"Host: a", b"Host: a"),
    "host-empty": request(b"Host:"),
    "host-blank": request(b"Host: \t"),
    # framing and protocol switches belong to the general path
    "content-length": request(b"Host: a", b"Content-Length: 0"),
    "transfer-encoding": request(b"Host: a", b"Transfer-Encoding: chunked"),
    "upgrade": request(b"Host: a", b"Upgrade: websocket"),
    "expect": request(b"Host: a", b"Expect: 100-continue"),
    # connection
    "connection-upgrade": request(b"Host: a", b"Connection: upgrade"),
    "connection-list": request(b"Host: a", b"Connection: keep-alive, close"),
    "connection-token": request(b"Host: a", b"Connection: x-custom"),
    "connection-empty": request(b"Host: a", b"Connection:"),
    # "close" nominates the field named close: the general path drops it (RFC 9110 §7.6.1)
    "close-named-with-close": request(b"Host: a", b"Close: x", b"Connection: close"),
    # llhttp reads Proxy-Connection as Connection: "close" there closes the general path
    "proxy-connection-close": request(b"Host: a", b"Proxy-Connection: close"),
    "proxy-connection-other": request(b"Host: a", b"Proxy-Connection: foo"),
    # merged fields: one each
    "xff-twice": request(b"Host: a", b"X-Forwarded-For: 1.1.1.1", b"X-Forwarded-For: 2.2.2.2"),
    "via-twice": request(b"Host: a", b"Via: 1.0 a", b"via: 1.0 b"),
}


@pytest.mark.parametrize("data", REFUSED_REQUESTS.values(), ids=REFUSED_REQUESTS.keys())
def test_request_refused(ex: ModuleType, data: bytes) -> None:
    assert scan(ex, data) is None


def test_proxy_connection_close_is_read_as_connection_close() -> None:
    """Why the rule above exists: the general path ends the connection."""
    head = FastServerCodec(LIMITS).feed(REFUSED_REQUESTS["proxy-connection-close"])[0]
    assert isinstance(head, RequestHead) and head.keep_alive is False


@pytest.mark.parametrize(
    ("name", "data", "status"),
    [
        ("max_head_bytes", request(b"Host: a", b"X-Pad: " + b"p" * 200), 431),
        ("max_uri_bytes", request(b"Host: a", line=b"GET /" + b"u" * 99 + b" HTTP/1.1"), 414),
        ("max_headers", request(b"Host: a", *[b"X-F%d: 1" % i for i in range(9)]), 431),
    ],
)
def test_request_limits(ex: ModuleType, name: str, data: bytes, status: int) -> None:
    """At the limit both paths accept; one under it express refuses and the codec answers."""
    size = {"max_head_bytes": len(data), "max_uri_bytes": 100, "max_headers": 10}[name]
    at = Limits(**{name: size})
    assert check_request(ex, data, at) is not None
    under = Limits(**{name: size - 1})
    assert scan(ex, data, under) is None
    error = FastServerCodec(under).feed(data)[-1]
    assert getattr(error, "status", None) == status


def test_field_limit_is_capped_at_100(ex: ModuleType) -> None:
    data = request(b"Host: a", *[b"X-F%d: 1" % i for i in range(100)])
    assert scan(ex, data, Limits(max_headers=1000)) is None  # 101 fields: general path


def test_negative_field_limit_refuses_safely(impl: str) -> None:
    """A nonsensical limit must not overrun the compiled scanner's field array."""
    code = (
        "import sys; from tests.core.conftest import load\n"
        f"ex = load('express', {impl!r})\n"
        "data = b'GET / HTTP/1.1\\r\\nHost: a\\r\\n' + b'a: b\\r\\n' * 5000 + b'\\r\\n'\n"
        "assert ex.scan_request(data, b'1', b'h', b'v', 10**6, 100, -1) is None\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=root, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-400:]


@pytest.mark.parametrize("position", range(5))
def test_none_arguments_raise(ex: ModuleType, position: int) -> None:
    args: list[Any] = [request(b"Host: a"), CLIENT_IP, PROTO, VIA, 8192, 8192, 100]
    if position == 4:
        req = scan(ex, args[0])
        with pytest.raises(TypeError):
            req.compose(None)
        return
    args[position] = None
    with pytest.raises(TypeError):
        ex.scan_request(*args)


@pytest.mark.parametrize("position", [0, 2])
def test_scan_response_none_arguments_raise(ex: ModuleType, position: int) -> None:
    args: list[Any] = [response(b"Content-Length: 0"), False, VIA, RID, False]
    args[position] = None
    with pytest.raises((TypeError, AttributeError)):  # the twin: no bytes methods on None
        ex.scan_response(*args)


# -- response parity -------------------------------------------------------------------

ACCEPTED_RESPONSES: dict[str, tuple[bytes, bool]] = {
    "minimal": (response(b"Content-Length: 2", body=b"ok"), False),
    "empty-body": (response(b"Content-Length: 0"), False),
    "leading-zeros": (response(b"content-length: 007", body=b"1234567"), False),
    "body-has-crlfcrlf": (response(b"Content-Length: 6", body=b"\r\n\r\nab"), False),
    "custom-reason": (response(b"Content-Length: 0", line=b"HTTP/1.1 299 Fine By Me"), False),
    "reason-leading-sp": (response(b"Content-Length: 0", line=b"HTTP/1.1 200  OK"), False),
    "reason-htab": (response(b"Content-Length: 0", line=b"HTTP/1.1 404 Not\tFound"), False),
    "status-599": (response(b"Content-Length: 0", line=b"HTTP/1.1 599 X"), False),
    "case-ows": (response(b"CONTENT-length:\t3 ", b"X-Thing:  a \t b ", body=b"abc"), False),
    "hop-by-hop": (
        response(
            b"Content-Length: 1",
            b"Connection: keep-alive",
            b"Keep-Alive: timeout=5",
            b"TE: x",
            b"Trailer: y",
            b"Expect: z",
            b"Proxy-Connection: Keep-Alive",
            body=b"z",
        ),
        False,
    ),
    "upstream-close": (response(b"Content-Length: 0", b"Connection: close"), False),
    "close-named-keep-alive": (response(b"Content-Length: 0", b"Close: x"), False),
    "via": (response(b"Via: 1.1 up", b"Content-Length: 0"), False),
    "rid-kept": (response(b"X-Request-Id: up-1", b"Content-Length: 0"), False),
    "rid-repeated": (
        response(b"X-Request-Id: up-1", b"Content-Length: 0", b"x-request-id: up-2"),
        False,
    ),
    "rid-empty": (response(b"X-Request-Id:", b"Content-Length: 0"), False),
    "204": (response(line=b"HTTP/1.1 204 No Content"), False),
    "shortest": (b"HTTP/1.1 204 X\r\n\r\n", False),
    "204-length": (response(b"Content-Length: 5", line=b"HTTP/1.1 204 No Content"), False),
    "304-length": (response(b"Content-Length: 9", line=b"HTTP/1.1 304 Not Modified"), False),
    "head-length": (response(b"Content-Length: 5"), True),
    "head-no-length": (response(b"Date: x"), True),
    "head-no-length-close": (response(b"Connection: close"), True),
    "max-fields": (response(b"Content-Length: 0", *[b"X-F%d: 1" % i for i in range(99)]), False),
    "max-head": (
        response(b"Content-Length: 0", b"X-Pad: " + b"p" * (65536 - 47)),
        False,
    ),
    # chunked bodies, re-framed as the general path writes them
    "chunked-empty": (response(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), False),
    "chunked": (
        response(
            b"Content-Type: text/plain",
            b"transfer-encoding: \t CHUNKED",
            b"X-After: 1",
            body=b"5\r\nhello\r\n1\r\n \r\n0000000A\r\n0123456789\r\n"
            b"e\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n0\r\n\r\n",
        ),
        False,
    ),
    "chunked-upper-hex": (
        response(b"Transfer-Encoding: chunked", body=b"1A\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"),
        False,
    ),
    "chunked-big": (
        response(
            b"Transfer-Encoding: chunked",
            body=b"10000\r\n" + b"b" * 65536 + b"\r\n3\r\nend\r\n0\r\n\r\n",
        ),
        False,
    ),
    "chunked-close": (
        response(b"Transfer-Encoding: chunked", b"Connection: close", body=b"0\r\n\r\n"),
        False,
    ),
}


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize(
    ("data", "head_request"), ACCEPTED_RESPONSES.values(), ids=ACCEPTED_RESPONSES.keys()
)
def test_response_parity(ex: ModuleType, data: bytes, head_request: bool, close: bool) -> None:
    assert check_response(ex, data, head_request, close) is not None


def test_max_head_case_is_at_the_limit() -> None:
    data = ACCEPTED_RESPONSES["max-head"][0]
    assert data.find(b"\r\n\r\n") + 4 == 65536


def test_head_response_without_length_is_reusable(ex: ModuleType) -> None:
    """A documented difference with the general path (see assert_response_parity)."""
    got = ex.scan_response(response(b"Date: x"), True, VIA, RID, False)
    assert got is not None and got[1] is True


# -- response refusals: one per rule -----------------------------------------------------

CL0 = b"Content-Length: 0"
REFUSED_RESPONSES: dict[str, tuple[bytes, bool]] = {
    # status line
    "http-1.0": (response(CL0, line=b"HTTP/1.0 200 OK"), False),
    "status-100": (response(CL0, line=b"HTTP/1.1 100 Continue"), False),
    "status-101": (response(CL0, line=b"HTTP/1.1 101 Switching Protocols"), False),
    "status-199": (response(CL0, line=b"HTTP/1.1 199 X"), False),
    "status-600": (response(CL0, line=b"HTTP/1.1 600 X"), False),
    "status-two-digits": (response(CL0, line=b"HTTP/1.1 20 OK"), False),
    "status-four-digits": (response(CL0, line=b"HTTP/1.1 2000 OK"), False),
    "status-not-digit": (response(CL0, line=b"HTTP/1.1 2x0 OK"), False),
    "two-sp-before-status": (response(CL0, line=b"HTTP/1.1  200 OK"), False),
    "no-reason": (response(CL0, line=b"HTTP/1.1 200"), False),
    "empty-reason": (response(CL0, line=b"HTTP/1.1 200 "), False),
    "reason-trailing-sp": (response(CL0, line=b"HTTP/1.1 200 OK "), False),
    "reason-trailing-htab": (response(CL0, line=b"HTTP/1.1 200 OK\t"), False),
    "reason-high-byte": (response(CL0, line=b"HTTP/1.1 200 \xc3\xa9"), False),
    "reason-ctl": (response(CL0, line=b"HTTP/1.1 200 O\x01K"), False),
    "status-line-lf": (b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", False),
    # field syntax
    "obs-fold": (response(CL0, b"X-A: x", b"\tfolded"), False),
    "space-before-colon": (response(b"Content-Length : 0"), False),
    "value-high-byte": (response(CL0, b"X-A: \xff"), False),
    "value-bare-cr": (response(CL0, b"X-A: a\rb"), False),
    "name-empty": (response(CL0, b": x"), False),
    # bounds
    "too-many-fields": (response(CL0, *[b"X-F%d: 1" % i for i in range(100)]), False),
    "head-too-large": (response(CL0, b"X-Pad: " + b"p" * (65536 - 46)), False),
    # framing
    "te-gzip": (response(b"Transfer-Encoding: gzip", body=b"x"), False),
    # llhttp reads "chunked" + HTAB as another coding; a trailing SP it reads as chunked,
    # but express refuses any trailing whitespace (one rule for both).
    "te-trailing-htab": (response(b"Transfer-Encoding: chunked\t", body=b"0\r\n\r\n"), False),
    "te-trailing-sp": (response(b"Transfer-Encoding: chunked ", body=b"0\r\n\r\n"), False),
    "te-list": (response(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), False),
    "te-twice": (
        response(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        False,
    ),
    "te-and-length": (
        response(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"),
        False,
    ),
    "te-head": (response(b"Transfer-Encoding: chunked"), True),
    "te-204": (response(b"Transfer-Encoding: chunked", line=b"HTTP/1.1 204 N"), False),
    "te-304": (response(b"Transfer-Encoding: chunked", line=b"HTTP/1.1 304 N"), False),
    "chunk-extension": (
        response(b"Transfer-Encoding: chunked", body=b"1;a=b\r\nx\r\n0\r\n\r\n"),
        False,
    ),
    "chunk-size-space": (
        response(b"Transfer-Encoding: chunked", body=b"1 \r\nx\r\n0\r\n\r\n"),
        False,
    ),
    "chunk-size-9-digits": (
        response(b"Transfer-Encoding: chunked", body=b"000000001\r\nx\r\n0\r\n\r\n"),
        False,
    ),
    "chunk-size-empty": (response(b"Transfer-Encoding: chunked", body=b"\r\n0\r\n\r\n"), False),
    "chunk-size-lf": (response(b"Transfer-Encoding: chunked", body=b"1\nx\r\n0\r\n\r\n"), False),
    "chunk-data-short": (
        response(b"Transfer-Encoding: chunked", body=b"3\r\nxy\r\n0\r\n\r\n"),
        False,
    ),
    "chunk-data-long": (
        response(b"Transfer-Encoding: chunked", body=b"1\r\nxy\r\n0\r\n\r\n"),
        False,
    ),
    "last-chunk-00": (response(b"Transfer-Encoding: chunked", body=b"00\r\n\r\n"), False),
    "last-chunk-ext": (response(b"Transfer-Encoding: chunked", body=b"0;x\r\n\r\n"), False),
    "trailer-field": (
        response(b"Transfer-Encoding: chunked", body=b"0\r\nX-T: 1\r\n\r\n"),
        False,
    ),
    "chunked-cut-short": (response(b"Transfer-Encoding: chunked", body=b"5\r\nhel"), False),
    "chunked-no-last": (response(b"Transfer-Encoding: chunked", body=b"1\r\nx\r\n"), False),
    "chunked-no-blank": (response(b"Transfer-Encoding: chunked", body=b"0\r\n"), False),
    "chunked-bytes-after": (
        response(b"Transfer-Encoding: chunked", body=b"0\r\n\r\nHTTP/1.1"),
        False,
    ),
    "upgrade": (response(CL0, b"Upgrade: h2c"), False),
    "length-twice": (response(CL0, CL0), False),
    "length-empty": (response(b"Content-Length:"), False),
    "length-plus": (response(b"Content-Length: +1", body=b"x"), False),
    "length-hex": (response(b"Content-Length: 0x1", body=b"x"), False),
    "length-list": (response(b"Content-Length: 1, 1", body=b"x"), False),
    "length-19-digits": (response(b"Content-Length: " + b"0" * 19), False),
    "no-length": (response(body=b"until close"), False),
    "no-length-no-body": (response(), False),
    "body-short": (response(b"Content-Length: 5", body=b"abcd"), False),
    "body-long": (response(b"Content-Length: 5", body=b"abcdef"), False),
    "incomplete-head": (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", False),
    "head-with-body": (response(b"Content-Length: 2", body=b"ok"), True),
    "204-with-body": (response(b"Content-Length: 2", body=b"ok", line=b"HTTP/1.1 204 N"), False),
    "304-with-body": (response(body=b"ok", line=b"HTTP/1.1 304 N"), False),
    # connection
    "connection-upgrade": (response(CL0, b"Connection: upgrade"), False),
    "connection-list": (response(CL0, b"Connection: close, x"), False),
    "close-named-with-close": (response(CL0, b"Close: x", b"Connection: close"), False),
    "proxy-connection-close": (response(CL0, b"Proxy-Connection: close"), False),
    # merged
    "via-twice": (response(CL0, b"Via: 1.1 a", b"Via: 1.1 b"), False),
}


@pytest.mark.parametrize(
    ("data", "head_request"), REFUSED_RESPONSES.values(), ids=REFUSED_RESPONSES.keys()
)
def test_response_refused(ex: ModuleType, data: bytes, head_request: bool) -> None:
    assert ex.scan_response(data, head_request, VIA, RID, False) is None


def test_proxy_connection_close_makes_the_upstream_not_reusable() -> None:
    codec = FastClientCodec(b"GET")
    codec.feed(REFUSED_RESPONSES["proxy-connection-close"][0])
    assert not codec.reusable


# -- generated valid messages ------------------------------------------------------------

SPECIAL = {
    b"host",
    b"connection",
    b"close",
    b"content-length",
    b"transfer-encoding",
    b"upgrade",
    b"expect",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VCHAR = "".join(map(chr, range(0x21, 0x7F)))
TARGET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"

names = (
    st.text(TCHAR, min_size=1, max_size=12)
    .map(str.encode)
    .filter(lambda n: n.lower() not in SPECIAL)
)
visible = st.text(VCHAR, min_size=1, max_size=12).map(str.encode)
values = st.lists(st.tuples(visible, st.sampled_from([b" ", b"\t", b" \t "])), max_size=3).map(
    lambda words: b"".join(w + gap for w, gap in words).rstrip(b" \t")
)
ows = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t"])


@st.composite
def cased(draw: st.DrawFn, name: bytes) -> bytes:
    flips = draw(st.integers(0, (1 << len(name)) - 1))
    return bytes(c ^ 0x20 if flips >> i & 1 and chr(c).isalpha() else c for i, c in enumerate(name))


@st.composite
def field_line(draw: st.DrawFn, name: bytes, value: bytes) -> bytes:
    return draw(cased(name)) + b":" + draw(ows) + value + draw(ows)


@st.composite
def simple_requests(draw: st.DrawFn) -> bytes:
    fields: list[tuple[bytes, bytes]] = [(b"host", draw(visible))]
    fields += draw(st.lists(st.tuples(names, values), max_size=6))
    optional = [
        (b"x-forwarded-for", values),
        (b"via", values),
        (b"connection", st.sampled_from([b"keep-alive", b"close", b"Keep-Alive", b"CLOSE"])),
        (b"proxy-connection", st.just(b"keep-alive")),
        (b"keep-alive", values),
        (b"te", values),
        (b"trailer", values),
        (b"x-forwarded-proto", values),
        (b"x-forwarded-host", values),
        (b"x-request-id", values),
        (b"x-request-id", st.sampled_from([b"", b"a" * 201, b"rid-1"])),
    ]
    for name, strategy in optional:
        if draw(st.booleans()):
            fields.append((name, draw(strategy)))
    fields = draw(st.permutations(fields))
    method = draw(st.sampled_from([b"GET", b"HEAD"]))
    target = b"/" + draw(st.text(TARGET, max_size=30)).encode()
    lines = [draw(field_line(n, v)) for n, v in fields]
    return request(*lines, line=method + b" " + target + b" HTTP/1.1")


@st.composite
def simple_responses(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 418, 500, 503, 599]))
    reason = draw(values.filter(bool))
    head_request = draw(st.booleans())
    bodiless = head_request or status in (204, 304)
    body = b"" if bodiless else draw(st.binary(max_size=40))
    fields: list[tuple[bytes, bytes]] = draw(st.lists(st.tuples(names, values), max_size=6))
    if not bodiless and draw(st.booleans()):
        # Chunked: the body cut into chunks, sizes in either case with leading zeros.
        pieces = draw(st.lists(st.binary(min_size=1, max_size=20), max_size=4))
        framed = b""
        for piece in pieces:
            size = b"%x" % len(piece)
            size = b"0" * draw(st.integers(0, 8 - len(size))) + size
            framed += (size.upper() if draw(st.booleans()) else size) + b"\r\n" + piece + b"\r\n"
        body = framed + b"0\r\n\r\n"
        fields.append((b"transfer-encoding", draw(cased(b"chunked"))))
    elif not bodiless or draw(st.booleans()):
        length = len(body) if not bodiless else draw(st.integers(0, 99))
        fields.append((b"content-length", b"%d" % length))
    optional = [
        (b"via", values),
        (b"connection", st.sampled_from([b"keep-alive", b"close", b"Keep-Alive", b"CLOSE"])),
        (b"proxy-connection", st.just(b"Keep-Alive")),
        (b"keep-alive", values),
        (b"te", values),
        (b"trailer", values),
        (b"expect", values),
        (b"x-request-id", values),
        (b"x-request-id", values),
    ]
    for name, strategy in optional:
        if draw(st.booleans()):
            fields.append((name, draw(strategy)))
    fields = draw(st.permutations(fields))
    # No whitespace after a Transfer-Encoding value (express refuses it: llhttp reads
    # "chunked" + HTAB as another coding).
    lines = [
        draw(cased(n)) + b":" + draw(ows) + v
        if n == b"transfer-encoding"
        else draw(field_line(n, v))
        for n, v in fields
    ]
    data = response(*lines, body=body, line=b"HTTP/1.1 %d %s" % (status, reason))
    return data, head_request, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(data=simple_requests())
def test_generated_requests_accepted_with_parity(data: bytes) -> None:
    got = [check_request(ex, data) for ex in (compiled, python)]
    assert got[0] is not None and got[1] is not None
    same_request(*got)


@settings(max_examples=150, deadline=None)
@given(case=simple_responses())
def test_generated_responses_accepted_with_parity(case: tuple[bytes, bool, bool]) -> None:
    data, head_request, close = case
    got = [check_response(ex, data, head_request, close) for ex in (compiled, python)]
    assert got[0] is not None and got[0] == got[1]


# -- mutations: both implementations agree, and never accept more than llhttp ------------

INTERESTING = [bytes([c]) for c in b' \t\r\n:\x00\x7f\x80\xff?#/,;%"@aZ0']


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "replace", "delete", "case", "split", "copy"]))
        pos = draw(st.integers(0, len(data)))
        size = draw(st.integers(1, 4))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=2))
        elif op == "replace":
            data[pos : pos + size] = draw(st.sampled_from(INTERESTING))
        elif op == "delete":
            del data[pos : pos + size]
        elif op == "case":
            data[pos : pos + size] = data[pos : pos + size].swapcase()
        elif op == "split":  # one read of a message split across several
            data = data[:pos] if draw(st.booleans()) else data[pos:]
        else:
            start = draw(st.integers(0, len(data)))
            data[pos:pos] = data[start : start + draw(st.integers(1, 30))]
    return bytes(data)


def same_request(a: Any, b: Any) -> None:
    """Two scans of the same bytes agree (fresh ids differ: only their format is checked)."""
    assert (a is None) == (b is None)
    if a is None:
        return
    attrs = ("method", "target", "path", "query", "host", "keep_alive", "cache_sensitive", "data")
    assert [getattr(a, n) for n in attrs] == [getattr(b, n) for n in attrs]
    assert a.headers() == b.headers()
    wire_a, wire_b = a.compose(b"/t"), b.compose(b"/t")
    if a.request_id != b.request_id:
        assert FRESH_ID.fullmatch(a.request_id) and FRESH_ID.fullmatch(b.request_id)
        tail_a, tail_b = (b"x-request-id: %s\r\n\r\n" % r.request_id for r in (a, b))
        assert wire_a.endswith(tail_a) and wire_b.endswith(tail_b)
        wire_a, wire_b = wire_a[: -len(tail_a)], wire_b[: -len(tail_b)]
    assert wire_a == wire_b


REQUEST_BASES = st.sampled_from(
    [
        request(
            b"Host: example.com:8080",
            b"User-Agent: t/1",
            b"Accept: */*",
            b"Connection: keep-alive",
            b"X-Request-Id: abc-123",
            b"X-Forwarded-For: 10.0.0.1",
            b"Via: 1.0 other",
            line=b"GET /a/b?x=1&y=%20 HTTP/1.1",
        ),
        request(b"host:a", b"te: trailers", b"connection: close", line=b"HEAD / HTTP/1.1"),
        request(b"Host: a", b"Close: x", b"Proxy-Connection: keep-alive"),
    ]
)


@settings(max_examples=400, deadline=None)
@given(data=mutated(REQUEST_BASES | simple_requests()))
def test_mutated_requests(data: bytes) -> None:
    got = scan(compiled, data), scan(python, data)
    same_request(*got)
    if got[1] is not None:
        assert_request_parity(got[1], data)


RESPONSE_BASES = st.sampled_from(
    [
        response(
            b"Content-Type: text/html",
            b"Content-Length: 5",
            b"Via: 1.1 up",
            b"X-Request-Id: up-1",
            b"Connection: keep-alive",
            body=b"hello",
        ),
        response(b"ETag: x", b"Content-Length: 3", line=b"HTTP/1.1 304 Not Modified"),
        response(
            b"Content-Type: text/plain",
            b"Transfer-Encoding: chunked",
            b"Connection: keep-alive",
            body=b"5\r\nhello\r\n2\r\n\r\n\r\n0\r\n\r\n",
        ),
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    data=mutated(RESPONSE_BASES | simple_responses().map(lambda c: c[0])),
    head_request=st.booleans(),
    close=st.booleans(),
)
def test_mutated_responses(data: bytes, head_request: bool, close: bool) -> None:
    got = [ex.scan_response(data, head_request, VIA, RID, close) for ex in (compiled, python)]
    assert got[0] == got[1]
    if got[1] is not None:
        assert_response_parity(got[1], data, head_request, close)


# -- corpora -----------------------------------------------------------------------------


def corpus(name: str) -> list[tuple[str, bytes]]:
    items = json.loads((CORPORA / name).read_text())
    return [(item["id"], base64.b64decode(item["raw_b64"])) for item in items]


CORPUS = corpus("llhttp_requests.json") + corpus("garden_trophies.json")


def with_host(data: bytes) -> bytes:
    """``data`` with a ``Host`` field after its first line: most corpus cases lack one,
    which alone would stop express before the oddity the case is about."""
    line_end = data.find(b"\r\n") + 2
    return data[:line_end] + b"Host: a\r\n" + data[line_end:] if line_end > 1 else data


def test_corpora(ex: ModuleType) -> None:
    """Whatever express accepts from the parser-bug corpora, the codec reads the same."""
    accepted = [
        case
        for case, data in CORPUS
        for variant in (data, with_host(data))
        if check_request(ex, variant) is not None
    ]
    assert accepted  # a few cases are plain GETs: the parity check did run


# -- policy fields: authorization, traced, compose(drop, extra) ---------------------------


def extra_fields(extra: bytes) -> list[tuple[bytes, bytes]]:
    """The ``(name, value)`` pairs of ``extra`` (whole ``name: value`` lines, each ending
    in CRLF), as a caller on the general path would append them to the header list."""
    assert extra.endswith(b"\r\n") or not extra
    pairs = []
    for line in extra.split(b"\r\n")[:-1]:
        name, sep, value = line.partition(b": ")
        assert sep, line
        pairs.append((name, value))
    return pairs


def general_compose(
    req: Any, data: bytes, target: bytes, drop: tuple[bytes, ...], extra: bytes
) -> bytes:
    """What the general path sends for ``data`` with the fields named in ``drop`` left out
    and ``extra``'s fields appended (proxy.py does the same to ``ex.up_headers``).

    ``req`` supplies the request id when the client sent no valid one: each side then drew
    a fresh id from its own counter (see assert_request_parity)."""
    events = FastServerCodec(LIMITS).feed(data)
    assert len(events) == 2, events
    head = events[0]
    assert isinstance(head, RequestHead)
    headers, _, _ = rewrite_request_headers(head.headers, client_ip=CLIENT_IP, proto=PROTO, via=VIA)
    if client_request_id(head.headers) is None:
        assert headers[-1][0] == b"x-request-id"
        headers[-1] = (b"x-request-id", req.request_id)
    headers = [h for h in headers if h[0] not in drop] + extra_fields(extra)
    return FastClientCodec(head.method).request_head(head.method, target, headers)


def parsed_fields(wire: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of ``wire`` as llhttp reads them, asserting it is one complete request."""
    events = FastServerCodec(LIMITS).feed(wire)
    assert len(events) == 2, events  # one request, complete, no error, nothing after it
    head, end = events
    assert isinstance(head, RequestHead) and end is END
    return head.headers


@pytest.mark.parametrize(
    "fields",
    [
        (),
        (b"Proxy-Authorization: Basic eA==",),  # another field: not the client's own
        (b"X-Authorization: Bearer a",),
        (b"Authorization-Extra: Bearer a",),
        (b"Authorizatio: Bearer a",),
    ],
    ids=["none", "proxy-authorization", "prefixed", "suffixed", "shorter"],
)
def test_authorization_absent_is_none(ex: ModuleType, fields: tuple[bytes, ...]) -> None:
    """Only a field named exactly ``Authorization`` counts; look-alike names do not."""
    req = check_request(ex, request(b"Host: a", *fields))
    assert req is not None and req.authorization is None


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"Authorization: Bearer abc", b"Bearer abc"),
        (b"authorization:Bearer abc", b"Bearer abc"),
        (b"AUTHORIZATION: \t Bearer abc \t ", b"Bearer abc"),
        (b"aUtHoRiZaTiOn:\tBasic  a\tb", b"Basic  a\tb"),  # inner whitespace is the value's
        (b"Authorization:", b""),  # one empty field is still one field: not None
        (b"Authorization: \t", b""),
    ],
)
def test_authorization_single_value_trimmed(ex: ModuleType, line: bytes, value: bytes) -> None:
    """One field: its value without surrounding OWS, whatever the case of its name, and
    the request is forwarded with that field kept (parity with the general path)."""
    data = request(b"Host: a", b"Accept: */*", line, b"X-Request-Id: r1")
    req = check_request(ex, data)
    assert req is not None
    assert req.authorization == value
    assert type(req.authorization) is bytes  # an empty value must not read as "absent"
    # Kept in place, lower-cased and trimmed, as the codec would forward it.
    assert b"\r\naccept: */*\r\nauthorization: %s\r\n" % value in req.compose(b"/")


@pytest.mark.parametrize(
    "lines",
    [
        (b"Authorization: Bearer a", b"Authorization: Bearer b"),
        (b"Authorization: Bearer a", b"authorization: Bearer a"),  # same value: still two
        (b"Authorization: Bearer a", b"X-A: 1", b"AUTHORIZATION:"),  # empty still counts
        (b"Authorization: a", b"Authorization: b", b"Authorization: c"),
    ],
    ids=["two", "two-same", "two-one-empty", "three"],
)
def test_authorization_repeated_is_none(ex: ModuleType, lines: tuple[bytes, ...]) -> None:
    """Two or more fields: ``None`` (the general path answers those), yet the request is
    still accepted and forwarded with every copy, as the general path would."""
    req = check_request(ex, request(b"Host: a", *lines))
    assert req is not None and req.authorization is None
    sent = sum(line.lower().startswith(b"authorization:") for line in lines)
    assert req.compose(b"/").count(b"\r\nauthorization: ") == sent >= 2


@pytest.mark.parametrize(
    ("fields", "traced"),
    [
        ((), False),
        ((b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",), True),
        ((b"tracestate: congo=t61rcWkgMzE",), True),
        ((b"traceparent: 00-a-b-01", b"tracestate: a=b"), True),
        ((b"TraceParent: 00-a-b-01",), True),
        ((b"TRACESTATE:x",), True),
        ((b"tRaCePaReNt:", b"X-A: 1"), True),  # an empty value still was sent
        ((b"X-Traceparent: 1", b"Tracestate-X: 1", b"Trace: 1", b"Traceparen: 1"), False),
    ],
    ids=["neither", "traceparent", "tracestate", "both", "mixed-case", "upper", "empty", "alike"],
)
def test_traced(ex: ModuleType, fields: tuple[bytes, ...], traced: bool) -> None:
    """``traced`` says a trace field was sent; the fields are forwarded unchanged (the
    parity check in check_request holds the forwarded bytes to the general path)."""
    req = check_request(ex, request(b"Host: a", *fields))
    assert req is not None
    assert req.traced is traced
    assert req.authorization is None  # independent flags: no trace field sets the other
    for name, value in req.headers():
        if name in (b"traceparent", b"tracestate"):
            assert b"\r\n%s: %s\r\n" % (name, value) in req.compose(b"/")


def test_policy_attributes_are_read_only(ex: ModuleType) -> None:
    req = scan(ex, request(b"Host: a", b"Authorization: x", b"traceparent: y"))
    assert (req.authorization, req.traced) == (b"x", True)
    for name in ("authorization", "traced"):
        with pytest.raises(AttributeError):
            setattr(req, name, None)


POLICY_REQUEST = request(
    b"Host: api.example",
    b"X-User-Id: admin",  # a claim-like field sent by the client: a spoof to drop
    b"Authorization: Bearer t0k3n",
    b"Accept: */*",
    b"x-user-id: root",  # a second copy: every occurrence must go
    b"X-Forwarded-For: 10.0.0.1",
    b"traceparent: 00-a-b-01",
    b"X-Request-Id: r-policy",
    line=b"GET /v1/items?id=7 HTTP/1.1",
)
POLICY_DROPS: dict[str, tuple[bytes, ...]] = {
    "authorization": (b"authorization",),
    "spoofed-claim": (b"x-user-id",),
    "appended-xff": (b"x-forwarded-for",),
    "appended-all": (
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"via",
        b"x-request-id",
    ),
    "first-field": (b"host",),
    "trace": (b"traceparent",),
    "auth-and-claim": (b"authorization", b"x-user-id"),
    "absent": (b"x-absent",),
    "empty": (),
    # Whole names only: a prefix, a longer name or another case must not match.
    "prefix": (b"x-user", b"authorizatio", b"x-forwarded"),
    "longer": (b"x-user-id2", b"authorization:", b"hosts"),
    "upper-case": (b"Authorization", b"X-USER-ID"),
    "empty-name": (b"",),
    "duplicates": (b"x-user-id", b"x-user-id"),
}
POLICY_EXTRAS: dict[str, bytes] = {
    "no-extra": b"",
    "one": b"x-user-id: 42\r\n",
    "several": b"x-user-id: 42\r\nx-user-role: reader\r\ntraceparent: 00-c-d-00\r\n",
    "empty-value": b"x-flag: \r\n",
}


@pytest.mark.parametrize("extra", POLICY_EXTRAS.values(), ids=POLICY_EXTRAS.keys())
@pytest.mark.parametrize("drop", POLICY_DROPS.values(), ids=POLICY_DROPS.keys())
def test_compose_drop_extra_parity(ex: ModuleType, drop: tuple[bytes, ...], extra: bytes) -> None:
    """``compose(target, drop, extra)`` is byte for byte the general path's head with the
    dropped names filtered out of the rewritten fields and ``extra``'s fields appended."""
    req = check_request(ex, POLICY_REQUEST)
    assert req is not None
    for target in (req.target, b"/upstream" + req.target):
        wire = req.compose(target, drop, extra)
        assert wire == general_compose(req, POLICY_REQUEST, target, drop, extra)
        if b"host" in drop:
            continue  # byte parity only: without Host llhttp answers 400, as it should
        # And the upstream reads it as intended: no dropped name unless extra adds it.
        got = parsed_fields(wire)
        added = extra_fields(extra)
        assert not {n for n, _ in got} & (set(drop) - {n for n, _ in added})
        assert got[len(got) - len(added) :] == added  # extra last, before the blank line


@pytest.mark.parametrize("drop", POLICY_DROPS.values(), ids=POLICY_DROPS.keys())
def test_compose_drop_nothing_matching_changes_nothing(
    ex: ModuleType, drop: tuple[bytes, ...]
) -> None:
    """A drop naming no forwarded field, or an empty one, gives exactly ``compose(target)``;
    one naming a forwarded field gives fewer bytes."""
    req = scan(ex, POLICY_REQUEST)
    plain = req.compose(b"/t")
    present = {n for n, _ in parsed_fields(plain)}
    assert req.compose(b"/t", None, None) == req.compose(b"/t", (), b"") == plain
    if present & set(drop):
        assert len(req.compose(b"/t", drop)) < len(plain)
    else:
        assert req.compose(b"/t", drop) == plain


def test_compose_drop_extra_golden(ex: ModuleType) -> None:
    """The format pinned independently of the general path: every copy of a dropped name
    goes (client-sent or appended), the rest keeps its order, ``extra`` comes last."""
    req = scan(ex, POLICY_REQUEST)
    wire = req.compose(
        b"/items?id=7",
        (b"authorization", b"x-user-id", b"x-forwarded-for"),
        b"x-user-id: 42\r\n",
    )
    assert wire == (
        b"GET /items?id=7 HTTP/1.1\r\nhost: api.example\r\naccept: */*\r\n"
        b"traceparent: 00-a-b-01\r\nx-forwarded-proto: https\r\n"
        b"x-forwarded-host: api.example\r\nvia: 1.1 fastedge\r\nx-request-id: r-policy\r\n"
        b"x-user-id: 42\r\n\r\n"
    )
    # The scan itself is untouched by compose: a second call without drop keeps all.
    assert req.compose(b"/t").count(b"\r\nx-user-id: ") == 2


def test_compose_drop_on_head_request(ex: ModuleType) -> None:
    """The method is kept on the composed line when lines are dropped and added."""
    data = request(b"Host: a", b"Authorization: x", line=b"HEAD /h HTTP/1.1")
    req = check_request(ex, data)
    assert req is not None
    wire = req.compose(b"/h", (b"authorization",), b"x-a: 1\r\n")
    assert wire.startswith(b"HEAD /h HTTP/1.1\r\nhost: a\r\n")
    assert wire == general_compose(req, data, b"/h", (b"authorization",), b"x-a: 1\r\n")


@pytest.mark.parametrize("extra", POLICY_EXTRAS.values(), ids=POLICY_EXTRAS.keys())
@pytest.mark.parametrize("drop", POLICY_DROPS.values(), ids=POLICY_DROPS.keys())
def test_compose_drop_extra_implementations_agree(drop: tuple[bytes, ...], extra: bytes) -> None:
    """The compiled scanner and its twin compose the same bytes and report the same
    policy fields (the request carries its own id, so even the ids agree)."""
    a, b = scan(compiled, POLICY_REQUEST), scan(python, POLICY_REQUEST)
    assert (a.authorization, a.traced) == (b.authorization, b.traced) == (b"Bearer t0k3n", True)
    assert a.compose(b"/x", drop, extra) == b.compose(b"/x", drop, extra)


# Generated: simple requests with policy fields (any case, anywhere, auth possibly twice).
POLICY_NAMES = [b"authorization", b"traceparent", b"tracestate", b"x-user-id"]


@st.composite
def policy_requests(draw: st.DrawFn) -> bytes:
    data = draw(simple_requests())
    lines = data[:-4].split(b"\r\n")  # the request line, then the field lines
    for name in draw(st.lists(st.sampled_from(POLICY_NAMES), max_size=4)):
        lines.insert(draw(st.integers(1, len(lines))), draw(field_line(name, draw(values))))
    return b"\r\n".join(lines) + b"\r\n\r\n"


extra_lines = st.lists(st.tuples(names | st.sampled_from(POLICY_NAMES), values), max_size=4).map(
    lambda pairs: b"".join(n + b": " + v + b"\r\n" for n, v in pairs)
)


def without_fresh_id(wire: bytes, req: Any) -> bytes:
    """``wire`` with its appended ``x-request-id`` line's value masked (each side drew its
    own fresh id when the client sent no valid one)."""
    line = b"\r\nx-request-id: %s\r\n" % req.request_id
    assert wire.count(line) <= 1
    return wire.replace(line, b"\r\nx-request-id: <fresh>\r\n")


@settings(max_examples=200, deadline=None)
@given(data=policy_requests(), extra=extra_lines, choice=st.data())
def test_generated_compose_drop_extra(data: bytes, extra: bytes, choice: st.DataObject) -> None:
    """For any accepted request, a random subset of the forwarded names as ``drop`` (at
    times with an absent name or a prefix of a present one) and random extra lines: both
    implementations compose the same bytes, equal to the general path's, which llhttp
    reads as one request with the expected fields. The policy attributes agree with what
    the codec parsed."""
    reqs = [scan(ex, data) for ex in (compiled, python)]
    assert reqs[0] is not None and reqs[1] is not None
    parsed = parsed_fields(data)
    auths = [v for n, v in parsed if n == b"authorization"]
    for req in reqs:
        assert req.authorization == (auths[0] if len(auths) == 1 else None)
        assert req.traced is any(n in (b"traceparent", b"tracestate") for n, _ in parsed)

    # Host stays: no policy drops it, and the upstream could not read the request without.
    forwarded = sorted({n for n, _ in parsed_fields(reqs[1].compose(b"/t"))} - {b"host"})
    drop = tuple(choice.draw(st.lists(st.sampled_from(forwarded), unique=True)))
    if choice.draw(st.booleans()):
        drop += (b"x-not-sent",)
    if forwarded and choice.draw(st.booleans()):
        # A proper prefix of a forwarded name: whole names only must match.
        name = choice.draw(st.sampled_from(forwarded))
        drop += (name[: choice.draw(st.integers(0, len(name) - 1))],)
    target = b"/up" + reqs[1].target
    wires = [req.compose(target, drop, extra) for req in reqs]
    for req, wire in zip(reqs, wires, strict=True):
        assert wire == general_compose(req, data, target, drop, extra)
    assert without_fresh_id(wires[0], reqs[0]) == without_fresh_id(wires[1], reqs[1])

    # What the upstream reads: the forwarded fields minus the dropped names, then extra's.
    expected = [h for h in parsed_fields(reqs[1].compose(target)) if h[0] not in drop]
    expected += [(n.lower(), v) for n, v in extra_fields(extra)]
    assert parsed_fields(wires[1]) == expected


@pytest.mark.parametrize(
    "name", [bytearray(b"x-user-id"), memoryview(b"x-user-id"), "x-user-id", None, 1]
)
def test_compose_drop_names_must_be_bytes(ex: ModuleType, name: object) -> None:
    """A drop name that is not ``bytes`` is refused in both implementations: the compiled
    one reads names as bytes objects, and a ``str`` would silently drop nothing (a spoofed
    claim field forwarded)."""
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: admin\r\n\r\n"
    req = ex.scan_request(data, b"1.2.3.4", b"https", b"1.1 fe", 8192, 8192, 100)
    assert req is not None
    with pytest.raises(TypeError):
        req.compose(b"/", (b"authorization", name))


# -- field values a word at a time ---------------------------------------------------------
# The compiled scanner checks a value eight bytes at a time (SP and VCHAR only) up to the
# line's CR, byte by byte after the first word holding anything else. Values built from
# the bytes at the edges of those sets, at every offset and length around a word, must be
# judged exactly as the twin judges them, with the same trimmed value.

_EDGE_BYTES = st.sampled_from(
    [
        b"a",
        b"a",
        b"a",
        b" ",
        b"\t",
        b"!",
        b"~",
        b"\x7f",
        b"\x80",
        b"\xff",
        b"\x1f",
        b"\x00",
        b"\n",
        b"\r",
        b"\x0b",
    ]
)
_EDGE_VALUES = st.lists(_EDGE_BYTES, min_size=0, max_size=40).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(value=_EDGE_VALUES, pad=st.integers(0, 9))
def test_word_scan_values_parity(value: bytes, pad: int) -> None:
    data = request(b"Host: a", b"X-" + b"p" * pad + b": " + value, b"Accept: */*")
    got = scan(compiled, data), scan(python, data)
    same_request(*got)
    if got[1] is not None:
        assert_request_parity(got[1], data)
    resp = response(b"Server: " + value, b"Content-Length: 0")
    answers = [ex.scan_response(resp, False, VIA, RID, False) for ex in (compiled, python)]
    assert answers[0] == answers[1]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 150])
def test_word_scan_long_values_accepted_and_trimmed(ex: ModuleType, n: int) -> None:
    value = bytes(0x21 + i % 94 for i in range(n))
    found = scan(ex, request(b"Host: a", b"Authorization: Bearer " + value + b" \t "))
    assert found is not None
    assert found.authorization == (b"Bearer " + value).rstrip()
    assert scan(ex, request(b"Host: a", b"X-A: " + value + b"\x7f")) is None


# -- a Content-Length body that has only begun to arrive (scan_response_start) ----------


def general_stream(data: bytes, cut: int, head_request: bool, close: bool) -> bytes:
    """What the general path writes for ``data`` arriving as ``data[:cut]`` then
    ``data[cut:]``: each read's events framed as the proxy frames them."""
    method = b"HEAD" if head_request else b"GET"
    server = FastServerCodec(LIMITS)
    server.feed(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    codec = FastClientCodec(method)
    wire = b""
    for piece in (data[:cut], data[cut:]):
        for ev in codec.feed(piece):
            if isinstance(ev, ResponseHead):
                headers = rewrite_response_headers(
                    ev.headers, via=VIA, request_id=RID, keep_length=True
                )
                wire += server.response_head(ev.status, ev.reason, headers, close=close)
            elif ev is END:
                wire += server.end()
            else:
                assert isinstance(ev, bytes), ev
                wire += server.body(ev)
    return wire


@settings(max_examples=200, deadline=None)
@given(case=simple_responses(), where=st.floats(0, 1))
def test_a_body_cut_anywhere_relays_what_the_general_path_writes(
    case: tuple[bytes, bool, bool], where: float
) -> None:
    """Any accepted Content-Length response cut at any point of its body: both
    implementations accept the first part, say how many bytes are to come, and the
    first part's bytes followed by the rest, as relayed, are what the general path
    writes for the same two reads."""
    data, head_request, close = case
    whole = compiled.scan_response(data, head_request, VIA, RID, close)
    assume(whole is not None and b"transfer-encoding" not in data.lower())
    head_end = data.index(b"\r\n\r\n") + 4
    cut = head_end + int((len(data) - head_end) * where)
    got = [
        impl.scan_response_start(data[:cut], head_request, VIA, RID, close)
        for impl in (compiled, python)
    ]
    assert got[0] == got[1]
    assert got[0] is not None
    status, reusable, body_length, out, left = got[0]
    assert (status, reusable, body_length) == whole[:3]
    assert left == len(data) - cut
    assert out + data[cut:] == whole[3]
    assert out + data[cut:] == general_stream(data, cut, head_request, close)
    # scan_response takes only whole responses.
    if left:
        assert compiled.scan_response(data[:cut], head_request, VIA, RID, close) is None
        assert python.scan_response(data[:cut], head_request, VIA, RID, close) is None


@pytest.mark.parametrize(
    ("data", "head_request"),
    [
        (response(b"Content-Length: 5", body=b"abcdef"), False),  # bytes after the body
        (response(b"Transfer-Encoding: chunked", body=b"5\r\nab"), False),  # chunked: whole
        (response(body=b"until close"), False),  # no framing
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", False),  # the head itself cut
        (response(b"Content-Length: 5", body=b"ab"), True),  # HEAD: no body at all
        (response(b"Content-Length: 5", body=b"ab", line=b"HTTP/1.1 204 N"), False),
    ],
    ids=["long", "chunked-partial", "no-length", "head-cut", "head-request", "204"],
)
def test_what_start_still_refuses(ex: ModuleType, data: bytes, head_request: bool) -> None:
    """Only a Content-Length body may be partial: never more bytes than declared, never
    a partial chunked body, a partial head or a body where none may be."""
    assert ex.scan_response_start(data, head_request, VIA, RID, False) is None


def test_start_of_an_empty_body_read(ex: ModuleType) -> None:
    """The head alone, with the whole body still to come."""
    data = response(b"Content-Length: 7")
    got = ex.scan_response_start(data, False, VIA, RID, True)
    assert got is not None
    assert got[2] == 7 and got[4] == 7
    assert got[3].endswith(b"\r\nconnection: close\r\n\r\n")
