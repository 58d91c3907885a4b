"""Request bodies on the express lane, end to end, against the general path.

The express lane (``ClientConnection._express``) now also takes POST, PUT, PATCH, DELETE
and OPTIONS requests, and a ``Content-Length`` body that arrived whole in the same read as
the head (``fastedge._core.express.scan_request``). It must stay invisible: every scenario
here runs twice over real loopback sockets, ``server.express`` off (the reference) and on,
and the runs must agree on every byte the origin received per connection (heads and
bodies), every byte the client read, the request, retry and policy counters in
``/metrics`` and, where a log is kept, the access-log lines up to timings.
``server.express_lane.served`` / ``.promoted``, read before and after each request, prove
request by request which lane took it, so the agreement is not the general path agreeing
with itself.

:class:`BodyOrigin` is tests/test_express_proxy.py's ``ScriptedOrigin`` (the same answers
by path: ``split``, ``chunkedsplit``, ``stale``, ``interim``...) reading ``Content-Length``
bodies, which it keeps per request, with three more paths: ``echo`` (the method, target,
a per-path count and the body, echoed back), ``cached`` (a response an edge cache may
store) and ``flaky`` (``503`` on every odd-numbered request of the path, else ``200``).

A retried idempotent ``Content-Length: 0`` request
(:func:`test_a_retried_request_keeps_its_content_length_zero`) keeps its
``content-length: 0`` on the resend, as the general path does: this file found the lane's
promotion dropping it (fixed in session 17).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastedge.cache.edge import SERVICE, EdgeCache
from fastedge.server import ProxyServer
from tests import test_express_proxy
from tests.conftest import Response
from tests.raw_client import RawClient
from tests.test_auth import ENV, SECRET
from tests.test_express_chain import ALICE, Clock, bearer, chain_document, pin_clocks
from tests.test_express_proxy import (
    FRESH_ID,
    OriginConn,
    ScriptedOrigin,
    _OriginProtocol,
    document,
    eventually,
    lane_counts,
    started_origins,
)

MakeProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]
NewOrigin = Callable[[], Awaitable["BodyOrigin"]]
Lane = tuple[int, int]
"""What one request added to the lane's (served, promoted) counters."""

LANE: Lane = (1, 0)
PROMOTED: Lane = (1, 1)
GENERAL: Lane = (0, 0)

# The no-ERROR-logged check of tests/test_express_proxy.py (pytest finds fixtures by
# their module-level names): a failure inside a protocol callback is only logged.
no_errors_logged = test_express_proxy.no_errors_logged


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HS256 secret the auth policy of :func:`chain_document` reads."""
    monkeypatch.setenv(ENV, SECRET)


# --- an origin that reads request bodies ----------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One request the origin read: its connection, head and body."""

    conn: int
    head: bytes
    body: bytes


def _content_length(head: bytes) -> int:
    """The ``Content-Length`` of a request head (0 without one)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def _response(status: bytes, fields: list[bytes], body: bytes, head_request: bool) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    return head if head_request else head + body


class BodyOrigin(ScriptedOrigin):
    """:class:`ScriptedOrigin` reading ``Content-Length`` request bodies (kept in
    :attr:`received`), plus the ``echo``, ``cached`` and ``flaky`` paths."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.counts: dict[bytes, int] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _BodyProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def answer_request(self, conn: OriginConn, head: bytes, body: bytes) -> None:
        """Answer one whole request (head and body) by its path's first segment."""
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
        path = target.split(b"?", 1)[0]
        kind = path.split(b"/")[1]
        n = self.counts[path] = self.counts.get(path, 0) + 1
        is_head = method == b"HEAD"
        t = conn.transport
        if kind == b"echo":
            out = b"%s %s n=%d len=%d:" % (method, target, n, len(body)) + body
            t.write(_response(b"200 OK", [b"Content-Length: %d" % len(out)], out, is_head))
        elif kind == b"cached":
            out = b"cached %s n=%d\n" % (target, n)
            fields = [b"Cache-Control: max-age=60", b"Content-Length: %d" % len(out)]
            t.write(_response(b"200 OK", fields, out, is_head))
        elif kind == b"flaky":
            status = b"503 Service Unavailable" if n % 2 else b"200 OK"
            out = b"flaky %s n=%d\n" % (target, n)
            t.write(_response(status, [b"Content-Length: %d" % len(out)], out, is_head))
        else:
            self.answer(conn, head)

    def bodies(self) -> list[tuple[int, bytes]]:
        """Every request body received, with the index of its connection."""
        return [(r.conn, r.body) for r in self.received]


class _BodyProtocol(_OriginProtocol):
    """The scripted origin's protocol, framing each request by its ``Content-Length``."""

    def __init__(self, origin: BodyOrigin) -> None:
        super().__init__(origin)
        self.body_origin = origin

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        conn.data += data
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[: end + 4]
            length = _content_length(head)
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            conn.heads.append(head)
            self.body_origin.received.append(Received(conn.index, head, body))
            if not conn.transport.is_closing():
                self.body_origin.answer_request(conn, head, body)


@pytest.fixture
async def new_origin() -> AsyncIterator[NewOrigin]:
    """``await new_origin()``: a started :class:`BodyOrigin`, closed at the end."""
    async with started_origins(BodyOrigin) as start:
        yield start


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    """One request: its bytes, its method (to read the response), and ``split_at``: when
    not 0, sent as two writes, ``data[:split_at]`` then, once the origin has received
    the head, the rest."""

    data: bytes
    method: bytes = b"GET"
    split_at: int = 0


def req(
    method: str,
    target: str,
    rid: str,
    body: bytes | None = None,
    extra: str = "",
    *,
    length: str | None = None,
    host: str = "example.test",
) -> Req:
    """``method target`` with ``X-Request-Id: rid``, the ``extra`` field lines, then a
    ``Content-Length`` (``length`` as written, else the body's length; none when ``body``
    is None) and the body."""
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: {rid}\r\n{extra}"
    if body is not None:
        head += f"Content-Length: {len(body) if length is None else length}\r\n"
    return Req(head.encode() + b"\r\n" + (body or b""), method.encode())


def split(r: Req, into_body: int = 0) -> Req:
    """``r`` sent in two writes: the head (and ``into_body`` bytes of the body), then the
    rest once the proxy has forwarded the head, so it reads the body apart from it."""
    return Req(r.data, r.method, r.data.index(b"\r\n\r\n") + 4 + into_body)


BINARY = bytes(range(256)) + b"\r\n\r\n\x00\xff"
"""Every byte value, a blank line and a NUL: a body is bytes, never a head."""
SMUGGLE = b"x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: example.test\r\n\r\n"
"""A body that reads as a second request to anyone framing by the blank line."""
BIG = bytes(i * 7 % 251 for i in range(40_000))
"""Large, yet one TCP segment on loopback: it arrives in one read with its head."""


# --- running a scenario ----------------------------------------------------------------------


@dataclass
class Run:
    """What one proxy (express on or off) did with a sequence of requests (the warm-up
    excluded from ``responses``, ``raw`` and ``lanes``)."""

    responses: list[Response]
    raw: list[bytes]
    lanes: list[Lane]
    metrics: list[str]
    log: list[dict[str, Any]]
    server: ProxyServer
    origin: BodyOrigin

    @property
    def served(self) -> Lane:
        """The lane's (served, promoted) counters in all, the warm-up included."""
        return lane_counts(self.server)


def plain(port: int, express: bool) -> dict[str, Any]:
    """tests/test_express_proxy.py's routes (a catch-all, strip_prefix, rewrite...)."""
    return document(port, express=express)


def counted_metrics(server: ProxyServer, origin: BodyOrigin) -> list[str]:
    """Every ``fastedge_*`` sample of a scrape but wall-clock timings (histogram buckets
    and sums) and the express lane's own counters, the origin's address replaced: what
    must not tell the lanes apart."""
    address = f"127.0.0.1:{origin.port}"
    keep = []
    for line in server.metrics.render().decode().splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not name.startswith("fastedge_") or name.startswith("fastedge_express_"):
            continue
        if name.endswith(("_bucket", "_sum")):
            continue
        keep.append(line.replace(address, "<origin>"))
    return keep


async def run_sequence(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    make_doc: Callable[[int, bool], dict[str, Any]],
    requests: list[Req],
    *,
    express: bool,
    warm: Req | None = None,
    setup: Callable[[ProxyServer], None] | None = None,
    log_dir: Path | None = None,
) -> Run:
    """Start an origin and a proxy on ``make_doc(origin port, express)``, send ``warm``
    (a GET: the upstream pool then holds an idle connection), then ``requests`` one
    after the other on one client connection, opening a new one after each response
    that closes it; ``setup`` runs on the proxy first (pinning clocks)."""
    origin = await new_origin()
    doc = make_doc(origin.port, express)
    log = None
    if log_dir is not None:
        log = log_dir / f"access-{express}.log"
        doc["server"]["access_log"] = str(log)
    proxy = await make_proxy(doc)
    assert proxy.express_lane.enabled is express
    if setup is not None:
        setup(proxy)
    client = await RawClient.open(proxy.port)
    responses: list[Response] = []
    raws: list[bytes] = []
    lanes: list[Lane] = []
    try:
        first = warm if warm is not None else req("GET", "/warm", "warm-0")
        for r in [first, *requests]:
            before = lane_counts(proxy)
            if r.split_at:
                # The rest only once the proxy has forwarded the first part (the general
                # path streams a body): it certainly read them apart, however loaded.
                sent = sum(len(x) for x in origin.stream())
                await client.send(r.data[: r.split_at])
                await eventually(lambda: sum(len(x) for x in origin.stream()) > sent)  # noqa: B023
                await asyncio.sleep(0.01)
                await client.send(r.data[r.split_at :])
            else:
                await client.send(r.data)
            resp, raw = await client.response(r.method)
            after = lane_counts(proxy)
            responses.append(resp)
            raws.append(raw)
            lanes.append((after[0] - before[0], after[1] - before[1]))
            if resp.header("connection") == b"close":
                assert await client.is_closed()
                await client.close()
                client = await RawClient.open(proxy.port)
        assert responses[0].status == 200, responses[0].body
    finally:
        await client.close()
    lines: list[dict[str, Any]] = []
    if log is not None:
        assert proxy.access_log is not None
        proxy.access_log.flush()
        lines = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    return Run(
        responses[1:], raws[1:], lanes[1:], counted_metrics(proxy, origin), lines, proxy, origin
    )


async def both(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    requests: list[Req],
    make_doc: Callable[[int, bool], dict[str, Any]] = plain,
    *,
    fresh_ids: bool = False,
    **kw: Any,
) -> tuple[Run, Run]:
    """The same sequence with express off (the reference) and on; asserts that the
    origin received the same bytes per connection (the same heads and bodies), the client
    the same bytes per response (``fresh_ids``: up to ids the proxy made up), and that
    the counters and access-log lines (up to timings and the origin's address) agree."""
    general = await run_sequence(make_proxy, new_origin, make_doc, requests, express=False, **kw)
    express = await run_sequence(make_proxy, new_origin, make_doc, requests, express=True, **kw)
    assert general.served == (0, 0)
    assert set(general.lanes) <= {GENERAL}

    def norm(data: bytes) -> bytes:
        return FRESH_ID.sub(b"<id>", data) if fresh_ids else data

    assert [(i, norm(h)) for i, h in express.origin.heads()] == [
        (i, norm(h)) for i, h in general.origin.heads()
    ]
    assert express.origin.bodies() == general.origin.bodies()
    assert [norm(s) for s in express.origin.stream()] == [norm(s) for s in general.origin.stream()]
    for i, (got, want) in enumerate(zip(express.raw, general.raw, strict=True)):
        assert norm(got) == norm(want), (i, requests[i].data[:80])
    assert express.metrics == general.metrics
    assert len(express.log) == len(general.log)
    timing = {"ts", "duration_ms", "upstream_ms"}
    for got_line, want_line in zip(express.log, general.log, strict=True):
        assert list(got_line) == list(want_line)  # the same keys, in the same order
        for line, run in ((got_line, express), (want_line, general)):
            assert line["target"] in (None, f"http://127.0.0.1:{run.origin.port}")
        skip = timing | {"target"}
        assert {k: v for k, v in got_line.items() if k not in skip} == {
            k: v for k, v in want_line.items() if k not in skip
        }
    return express, general


def fields(head: bytes) -> list[bytes]:
    """The field lines of a request head (no request line, no blank line)."""
    return head.split(b"\r\n")[1:-2]


# --- 1. bodies on the lane ------------------------------------------------------------------

BODIES: list[Req] = [
    req("POST", "/echo/a", "b-1", b"hello=world&x=1", "Content-Type: text/plain\r\n"),
    req("GET", "/plain", "b-2"),
    req("PUT", "/echo/b?v=2", "b-3", BINARY),
    req("PATCH", "/echo/c", "b-4", SMUGGLE, "Accept: */*\r\n"),
    req("DELETE", "/echo/d", "b-5", b""),  # Content-Length: 0
    req("OPTIONS", "/echo/e", "b-6", b"opt"),
    req("POST", "/echo/f", "b-7", b"leading", length="007"),
    req("POST", "/echo/g", "b-8", b"0", length="00000000000001"),
    req("GET", "/plain?x=1", "b-9"),
    req("POST", "/echo/h", "b-10", b""),
    req("HEAD", "/echo/i", "b-11"),
    req("DELETE", "/echo/j", "b-12"),  # no body, no Content-Length
    req("OPTIONS", "/echo/k", "b-13"),
    req("POST", "/echo/l", "b-14", b"tab", length="\t3 "),  # OWS around the value
    req("POST", "/api/users/9?q=1", "b-15", b'{"name": "x"}'),  # strip_prefix
    req("PUT", "/v1/put", "b-16", b"rewritten"),  # rewrite to /echo
    req("POST", "/echo/m", "b-17", BIG),
    Req(  # the field's name in capitals, amid the others
        b"POST /echo/n HTTP/1.1\r\nHost: example.test\r\nX-Request-Id: b-18\r\n"
        b"CONTENT-LENGTH: 3\r\ncontent-type: a/b\r\n\r\nabc",
        b"POST",
    ),
    req("POST", "/nocontent", "b-19", b"204"),
    req("POST", "/echo/o", "b-20", b"bye", "Connection: close\r\n"),
    req("PATCH", "/echo/p", "b-21", b"after a close"),
    req("GET", "/plain", "b-22"),
]


@pytest.mark.parametrize(
    "server",
    [{}, {"max_requests_per_connection": 5}, {"proxy_name": "edge-7"}],
    ids=["default", "max_requests_5", "proxy_name"],
)
async def test_bodies_take_the_lane_and_match_the_general_path(
    make_proxy: MakeProxy, new_origin: NewOrigin, server: dict[str, Any]
) -> None:
    """POST, PUT, PATCH, DELETE and OPTIONS with small, binary, empty, leading-zero,
    blank-line-holding and 40 kB bodies, mixed with GET and HEAD on keep-alive
    connections: every one takes the lane, and the origin and client bytes are the
    general path's; independently, each body reaches the origin intact right after a
    ``content-length`` re-emitted from the number after ``x-request-id``."""

    def make_doc(port: int, express: bool) -> dict[str, Any]:
        return document(port, express=express, server=server)

    reqs = BODIES
    express, _ = await both(make_proxy, new_origin, reqs, make_doc)
    assert express.lanes == [LANE] * len(reqs)
    assert [r.status for r in express.responses] == [200] * 18 + [204, 200, 200, 200]
    got = {r.head.split(b"x-request-id: ")[1].split(b"\r\n")[0]: r for r in express.origin.received}
    want_bodies = {
        b"b-1": b"hello=world&x=1",
        b"b-3": BINARY,
        b"b-4": SMUGGLE,
        b"b-5": b"",
        b"b-6": b"opt",
        b"b-7": b"leading",
        b"b-8": b"0",
        b"b-10": b"",
        b"b-14": b"tab",
        b"b-15": b'{"name": "x"}',
        b"b-16": b"rewritten",
        b"b-17": BIG,
        b"b-18": b"abc",
        b"b-19": b"204",
        b"b-20": b"bye",
        b"b-21": b"after a close",
    }
    for rid, body in want_bodies.items():
        seen = got[rid]
        assert seen.body == body, rid
        lines = fields(seen.head)
        assert lines.count(b"content-length: %d" % len(body)) == 1, seen.head
        assert sum(line.lower().startswith(b"content-length") for line in lines) == 1
        # the general path's order: ..., via, x-request-id, content-length
        assert lines[-2:] == [b"x-request-id: " + rid, b"content-length: %d" % len(body)]
    for rid in (b"b-2", b"b-9", b"b-11", b"b-12", b"b-13", b"b-22"):
        assert b"content-length" not in got[rid].head.lower()
        assert got[rid].body == b""
    assert b"/smuggled" not in b"".join(h for _, h in express.origin.heads())
    assert got[b"b-15"].head.startswith(b"POST /9?q=1 HTTP/1.1\r\n")
    assert got[b"b-16"].head.startswith(b"PUT /echo/put HTTP/1.1\r\n")
    by_rid = {r.header("x-request-id"): r for r in express.responses}
    assert by_rid[b"b-3"].body == b"PUT /echo/b?v=2 n=1 len=%d:" % len(BINARY) + BINARY
    assert by_rid[b"b-17"].body.endswith(BIG)
    assert by_rid[b"b-11"].body == b""
    assert by_rid[b"b-20"].header("connection") == b"close"
    if not server:
        # One upstream connection throughout: a request with a body leaves it reusable.
        assert {r.conn for r in express.origin.received} == {0}


# --- 2. an upstream Host and policy filters -------------------------------------------------


async def test_bodies_with_an_upstream_host_header(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """An upstream with its own ``host_header``: the client's Host is dropped and the
    upstream's follows ``x-request-id``, then the ``content-length``, byte for byte as
    the general path writes them, on the lane."""

    def make_doc(port: int, express: bool) -> dict[str, Any]:
        return document(port, express=express, host_header="backend.internal:8080")

    reqs = [
        req("POST", "/echo/a", "h-1", b"body one"),
        req("GET", "/plain", "h-2"),
        req("PUT", "/echo/b", "h-3", b"", "Host-Like: no\r\n"),
        req("DELETE", "/echo/c", "h-4"),
        req("PATCH", "/x", "h-5", b"routed by the client's host", host="api.example.test"),
        req("POST", "/echo/d", "h-6", b"007", length="0003"),
    ]
    express, _ = await both(make_proxy, new_origin, reqs, make_doc)
    assert express.lanes == [LANE] * len(reqs)
    heads = [r.head for r in express.origin.received[1:]]
    tails = [b"\r\nhost: backend.internal:8080\r\n\r\n"] * len(reqs)
    for i, size in ((0, 8), (2, 0), (4, 27), (5, 3)):
        tails[i] = b"\r\nhost: backend.internal:8080\r\ncontent-length: %d\r\n\r\n" % size
    for head, tail in zip(heads, tails, strict=True):
        assert head.endswith(tail), head
        assert head.count(b"\r\nhost: ") == 1
    assert heads[4].startswith(b"PATCH /h/x HTTP/1.1\r\n")  # the host route's rewrite


def _policy_doc(
    host_header: str | None,
) -> Callable[[int, bool], dict[str, Any]]:
    """tests/test_express_chain.py's JWT auth + per-user rate limit route with unsampled
    tracing (``/warm``: auth only), the upstream with ``host_header`` when given."""

    def make_doc(port: int, express: bool) -> dict[str, Any]:
        upstream = {} if host_header is None else {"host_header": host_header}
        return chain_document(port, express=express, upstream=upstream)

    return make_doc


def _pin(server: ProxyServer) -> None:
    pin_clocks(server, Clock())


TRACE_IDS = re.compile(rb"traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-")


def _no_trace_ids(data: bytes) -> bytes:
    """Trace and span ids are random: only their place and the sampled flag compare."""
    return TRACE_IDS.sub(b"traceparent: 00-<t>-<s>-", data)


@pytest.mark.parametrize("host_header", [None, "backend.internal"], ids=["client_host", "host"])
async def test_bodies_through_auth_rate_limit_and_tracing(
    make_proxy: MakeProxy, new_origin: NewOrigin, host_header: str | None
) -> None:
    """A route with JWT auth and a local rate limit, under unsampled tracing: requests
    with bodies take the lane, and the origin gets the general path's order: ...,
    ``x-request-id``, (the upstream's ``host``,) ``content-length``, ``traceparent``,
    then the forwarded claim; a request the policy refuses is the general path's 401."""
    auth = bearer(ALICE)
    reqs = [
        req("POST", "/p/a", "c-1", b"a=1", auth),
        req("PUT", "/p/b", "c-2", BINARY, auth + "X-User-Id: mallory\r\n"),
        req("GET", "/p/c", "c-3", None, auth),
        req("DELETE", "/p/d", "c-4", b"", auth),
        req("POST", "/p/e", "c-5", b"no token"),  # 401 on the general path
        req("PATCH", "/p/f", "c-6", b"again", auth),
    ]
    warm = req("GET", "/warm", "warm-0", None, auth)
    ids = _no_trace_ids
    kw: dict[str, Any] = {"warm": warm, "setup": _pin}
    general = await run_sequence(
        make_proxy, new_origin, _policy_doc(host_header), reqs, express=False, **kw
    )
    express = await run_sequence(
        make_proxy, new_origin, _policy_doc(host_header), reqs, express=True, **kw
    )
    assert [(i, ids(h)) for i, h in express.origin.heads()] == [
        (i, ids(h)) for i, h in general.origin.heads()
    ]
    assert express.origin.bodies() == general.origin.bodies()
    assert express.raw == general.raw
    assert express.metrics == general.metrics
    assert express.lanes == [LANE, LANE, LANE, LANE, GENERAL, LANE]
    assert [r.status for r in express.responses] == [200, 200, 200, 200, 401, 200]
    sizes = {b"c-1": 3, b"c-2": len(BINARY), b"c-4": 0, b"c-6": 5}
    for seen in express.origin.received[1:]:
        lines = fields(seen.head)
        at = next(i for i, line in enumerate(lines) if line.startswith(b"x-request-id: "))
        rid = lines[at][len(b"x-request-id: ") :]
        tail = lines[at + 1 :]
        if host_header is not None:
            assert tail[0] == b"host: " + host_header.encode()
            tail = tail[1:]
        if rid in sizes:
            assert tail[0] == b"content-length: %d" % sizes[rid], seen.head
            tail = tail[1:]
        assert tail[0].startswith(b"traceparent: 00-") and tail[0].endswith(b"-00")
        assert tail[1:] == [b"x-user-id: alice"], seen.head
        assert not any(line.lower().startswith(b"authorization") for line in lines)
    assert b"mallory" not in b"".join(h for _, h in express.origin.heads())


# --- 3. promotions with a body ---------------------------------------------------------------


async def test_promotions_with_a_body(make_proxy: MakeProxy, new_origin: NewOrigin) -> None:
    """A request with a body sent on the lane, then handed to the general path on a
    chunked body in pieces or interim responses (or relayed by the lane, a
    ``Content-Length`` body in pieces): the same bytes both ways; a pooled connection the
    origin closed without answering is retried for a bodiless GET or DELETE but not for
    a POST (even with ``Content-Length: 0``) or a PUT with a body: 502 on both lanes."""
    reqs = [
        req("POST", "/split/a", "s-1", b"split me"),  # the lane relays the rest
        req("PUT", "/chunkedsplit/b", "s-2", b"chunks"),
        req("POST", "/interim/c", "s-3", b"early hints"),
        req("PATCH", "/interim1/d", "s-4", b"100 first"),
        req("GET", "/plain", "s-5"),
        req("POST", "/stale/e", "s-6", b"not retried"),  # 502: the connection is gone
        req("GET", "/plain", "s-7"),  # connects (conn 1)
        req("GET", "/stale/f", "s-8"),  # conn 1 closes: retried on conn 2
        req("PUT", "/stale/g", "s-9", b"x"),  # conn 2 closes, PUT with a body: 502
        req("GET", "/plain", "s-10"),  # conn 3
        req("DELETE", "/stale/h", "s-11"),  # conn 3 closes: no body, retried
        req("POST", "/stale/i", "s-12", b""),  # conn 4 closes: POST never retried
        req("GET", "/plain", "s-13"),  # conn 5
        req("POST", "/echo/j", "s-14", b"still fine"),
    ]
    express, _ = await both(make_proxy, new_origin, reqs)
    statuses = [r.status for r in express.responses]
    assert statuses == [200, 200, 200, 200, 200, 502, 200, 200, 502, 200, 200, 502, 200, 200]
    assert express.lanes == [
        LANE,  # /split: a Content-Length body relayed as it comes
        PROMOTED,
        PROMOTED,
        PROMOTED,
        LANE,
        PROMOTED,
        GENERAL,
        PROMOTED,
        PROMOTED,
        GENERAL,
        PROMOTED,
        PROMOTED,
        GENERAL,
        LANE,
    ]
    assert express.responses[2].informational == [] and express.responses[2].body == (
        b"fixed body for /interim/c\n"
    )
    # Which request went out on which upstream connection, retries included.
    rids = [
        (r.conn, r.head.split(b"x-request-id: ")[1].split(b"\r\n")[0])
        for r in express.origin.received[1:]
    ]
    assert rids == [
        (0, b"s-1"),
        (0, b"s-2"),
        (0, b"s-3"),
        (0, b"s-4"),
        (0, b"s-5"),
        (0, b"s-6"),
        (1, b"s-7"),
        (1, b"s-8"),
        (2, b"s-8"),
        (2, b"s-9"),
        (3, b"s-10"),
        (3, b"s-11"),
        (4, b"s-11"),
        (4, b"s-12"),
        (5, b"s-13"),
        (5, b"s-14"),
    ]
    assert "fastedge_upstream_retries_total 2" in express.metrics  # s-8 and s-11


async def test_a_retryable_status_with_a_body_is_not_resent(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """A resilient upstream retrying 503: the lane promotes the 503 to the general path,
    which retries a bodiless PUT and GET but hands a POST's (and a PUT-with-a-body's)
    503 to the client, as with express off: the body is never sent twice."""

    def make_doc(port: int, express: bool) -> dict[str, Any]:
        retry = {
            "statuses": [503],
            "attempts": 2,
            "backoff_base": "0s",
            "backoff_max": "0s",
            "budget_ratio": 1.0,  # the budget never decides here
        }
        return document(port, express=express, retry=retry)

    reqs = [
        req("POST", "/flaky/a", "f-1", b"once"),  # 503, not retried
        req("PUT", "/flaky/b", "f-2"),  # 503, no body: retried, 200
        req("PUT", "/flaky/c", "f-3", b"body"),  # 503, not retried
        req("GET", "/flaky/d", "f-4"),  # 503, retried: 200
        req("POST", "/flaky/a", "f-5", b"twice"),  # the path's second: 200
    ]
    express, _ = await both(make_proxy, new_origin, reqs, make_doc)
    assert [r.status for r in express.responses] == [503, 200, 503, 200, 200]
    assert express.responses[0].body == b"flaky /flaky/a n=1\n"
    assert express.responses[1].body == b"flaky /flaky/b n=2\n"
    lanes = express.lanes
    assert lanes[0] == PROMOTED and lanes[2] == PROMOTED  # the 503 went to the general path
    assert [b for _, b in express.origin.bodies()[1:]] == [
        b"once",
        b"",
        b"",  # the PUT's retry
        b"body",
        b"",
        b"",
        b"twice",
    ]


RETRY_503: dict[str, Any] = {
    "statuses": [503],
    "attempts": 2,
    "backoff_base": "0s",
    "backoff_max": "0s",
    "budget_ratio": 1.0,
}


@pytest.mark.parametrize(
    ("method", "target", "upstream"),
    [
        ("DELETE", "/stale/a", {}),
        ("GET", "/stale/a", {}),
        ("OPTIONS", "/stale/a", {"host_header": "backend.internal"}),
        ("PUT", "/flaky/a", {"retry": RETRY_503}),
    ],
    ids=["stale-delete", "stale-get", "stale-host-header", "retried-503-put"],
)
async def test_a_retried_request_keeps_its_content_length_zero(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    method: str,
    target: str,
    upstream: dict[str, Any],
) -> None:
    """An idempotent request with ``Content-Length: 0`` (no body: retryable) sent on the
    lane and retried by the general path, after a pooled connection closed unanswered or
    a retryable 503: the retry carries ``content-length: 0`` in its place, as the lane's
    first attempt did and as both attempts do with express off."""

    def make_doc(port: int, express: bool) -> dict[str, Any]:
        return document(port, express=express, **upstream)

    reqs = [req(method, target, "z-1", b""), req("GET", "/plain", "z-2")]
    express, _ = await both(make_proxy, new_origin, reqs, make_doc)
    assert express.lanes[0] == PROMOTED
    assert express.responses[0].status == 200
    first, retried = (r.head for r in express.origin.received[1:3])
    assert first == retried
    tail = b"content-length: 0\r\n\r\n"
    if "host_header" in upstream:
        tail = b"host: backend.internal\r\n" + tail
    assert retried.endswith(b"\r\nx-request-id: z-1\r\n" + tail)


# --- 4. bodies the lane leaves to the general path -----------------------------------------


async def test_over_max_body_and_bodies_in_two_reads(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """A body over ``server.max_body_size`` gets the general path's 413 (nothing sent
    upstream) on both lanes; one at the limit takes the lane. A body that arrives in a
    read after its head (or only partly with it) goes to the general path, answered the
    same, and the lane's counters do not move."""

    def make_doc(port: int, express: bool) -> dict[str, Any]:
        return document(port, express=express, server={"max_body_size": 64})

    reqs = [
        req("POST", "/echo/a", "m-1", b"a" * 64),  # at the limit: the lane
        req("POST", "/echo/b", "m-2", b"b" * 65),  # 413, closes
        # Declared over the limit, the body not all sent: 413 on the head alone.
        req("PUT", "/echo/c", "m-3", b"c" * 10, length="000000000000065"),
        split(req("POST", "/echo/d", "m-4", b"late body")),
        split(req("PATCH", "/echo/e", "m-5", b"half and half"), into_body=4),
        split(req("DELETE", "/echo/f", "m-6", b"z")),
        req("POST", "/echo/g", "m-7", b"whole again"),
    ]
    # A 413 is answered before the request id is read: it carries one the proxy made up.
    express, _ = await both(make_proxy, new_origin, reqs, make_doc, fresh_ids=True)
    assert [r.status for r in express.responses] == [200, 413, 413, 200, 200, 200, 200]
    assert express.lanes == [LANE, GENERAL, GENERAL, GENERAL, GENERAL, GENERAL, LANE]
    assert [b for _, b in express.origin.bodies()[1:]] == [
        b"a" * 64,
        b"late body",
        b"half and half",
        b"z",
        b"whole again",
    ]
    for resp in express.responses[1:3]:
        assert resp.header("connection") == b"close"


async def test_body_in_two_reads_is_the_general_paths(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """On one keep-alive connection: a request whose body follows its head in another
    read is the general path's, and the next whole one takes the lane again."""
    reqs = [
        split(req("POST", "/echo/a", "t-1", b"in a second read")),
        req("POST", "/echo/b", "t-2", b"whole"),
        split(req("PUT", "/echo/c", "t-3", BINARY), into_body=100),
        req("GET", "/plain", "t-4"),
    ]
    express, _ = await both(make_proxy, new_origin, reqs)
    assert express.lanes == [GENERAL, LANE, GENERAL, LANE]
    assert express.responses[0].body == b"POST /echo/a n=1 len=16:in a second read"
    assert express.responses[2].body == b"PUT /echo/c n=1 len=%d:" % len(BINARY) + BINARY
    assert {r.conn for r in express.origin.received} == {0}


# --- 5. a cache route ----------------------------------------------------------------------


def _cache_doc(port: int, express: bool) -> dict[str, Any]:
    """Everything under ``/`` through edge cache ``edge`` alone."""
    doc = document(port, express=express)
    doc["caches"] = {"edge": {"max_bytes": "4MiB"}}
    doc["routes"] = [{"prefix": "/", "upstream": "origin", "cache": "edge"}]
    return doc


def _freeze_cache(server: ProxyServer) -> None:
    """The cache's clock stands still: ``Age`` is 0 in both runs whatever the timing."""
    edge: EdgeCache = server.runtime.services[SERVICE].caches["edge"]
    edge.clock = lambda: 1_700_000_000.0


async def test_cache_route_bodies_take_the_general_path(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """A route whose only filter is a cache: a stored GET is answered on the lane, but a
    POST/PUT/DELETE/OPTIONS to the same path, body or not, never is, nor a GET or HEAD
    with a body (each goes to the general path, which may invalidate the entry): the
    origin and client bytes, and what the next GET gets, are the same both ways."""
    reqs = [
        req("GET", "/cached/a", "k-1"),  # a miss: stored
        req("GET", "/cached/a", "k-2"),  # a hit: the lane
        req("POST", "/cached/a", "k-3", b"change it"),
        req("GET", "/cached/a", "k-4"),
        req("GET", "/cached/a", "k-5"),
        req("PUT", "/cached/a", "k-6", b""),
        req("GET", "/cached/a", "k-7"),
        req("DELETE", "/cached/a", "k-8"),
        req("OPTIONS", "/cached/a", "k-9", b"o"),
        req("HEAD", "/cached/a", "k-10"),
        req("GET", "/cached/a", "k-11"),
        req("POST", "/echo/z", "k-12", b"uncached path"),
        req("GET", "/cached/a", "k-13", b"a GET with a body"),
        req("GET", "/cached/a", "k-14", b""),  # Content-Length: 0: no body
        req("HEAD", "/cached/a", "k-15", b"h"),
    ]
    express, _ = await both(make_proxy, new_origin, reqs, _cache_doc, setup=_freeze_cache)
    assert [r.status for r in express.responses] == [200] * len(reqs)
    lanes = express.lanes
    # Every request with another method than GET/HEAD, or with a body.
    for i in (2, 5, 7, 8, 11, 12, 14):
        assert lanes[i] == GENERAL, (i, lanes)
    assert lanes[1] == LANE  # the stored GET
    assert LANE in [lanes[i] for i in (3, 4, 6, 9, 10)]  # hits again after each refill
    # What the origin saw: each unsafe request went there, with its body.
    sent = [(r.head.split(b" ")[0], r.body) for r in express.origin.received]
    assert [u for u in sent if u[0] not in (b"GET", b"HEAD")][:4] == [
        (b"POST", b"change it"),
        (b"PUT", b""),
        (b"DELETE", b""),
        (b"OPTIONS", b"o"),
    ]


# --- 6. metrics and access log --------------------------------------------------------------


async def test_metrics_and_access_log_for_bodies(
    make_proxy: MakeProxy, new_origin: NewOrigin, tmp_path: Path
) -> None:
    """The request counters (method label POST, PUT...) and the access-log lines
    (method, bytes_in = the body's length, bytes_out) of requests with bodies are the
    general path's, served on the lane and promoted alike."""
    reqs = [
        req("POST", "/echo/a", "l-1", b"12345"),
        req("POST", "/echo/b", "l-2", BINARY),
        req("PUT", "/echo/c", "l-3", b""),
        req("PATCH", "/split/d", "l-4", b"xyz"),
        req("POST", "/chunkedsplit/e", "l-5", b"pq"),  # promoted
        req("DELETE", "/echo/f", "l-6"),
        req("OPTIONS", "/echo/g", "l-7", b"o"),
        split(req("POST", "/echo/h", "l-8", b"two reads")),
    ]
    express, _ = await both(make_proxy, new_origin, reqs, log_dir=tmp_path)
    assert express.lanes == [LANE, LANE, LANE, LANE, PROMOTED, LANE, LANE, GENERAL]
    log = {line["request_id"]: line for line in express.log}
    want_in = {"l-1": 5, "l-2": len(BINARY), "l-3": 0, "l-4": 3, "l-5": 2, "l-6": 0, "l-7": 1}
    want_in["l-8"] = 9
    for rid, size in want_in.items():
        assert log[rid]["bytes_in"] == size, rid
    assert [log[f"l-{i}"]["method"] for i in range(1, 9)] == [
        "POST",
        "POST",
        "PUT",
        "PATCH",
        "POST",
        "DELETE",
        "OPTIONS",
        "POST",
    ]
    assert log["l-2"]["bytes_out"] == len(express.responses[1].body)
    totals = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in express.metrics
        if line.startswith("fastedge_requests_total{")
    }
    post = [v for s, v in totals.items() if 'method="POST"' in s and 'status="200"' in s]
    assert post == [4.0]
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
        assert [v for s, v in totals.items() if f'method="{method}"' in s] == [1.0], method
