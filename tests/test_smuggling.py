"""Request-smuggling corpora through the whole proxy, on both engines.

Every item of ``shared/corpora`` (llhttp's request tests and the HTTP Garden's parser-bug
trophies) is sent through a real :class:`~fastedge.server.ProxyServer` to a *recording
origin* that keeps every byte it receives. For each item (as is, and with a ``Host``
field added when it has none, so the accepted paths are exercised too):

1. the origin's byte stream parses, strictly (h11 as the server), into exactly the
   requests the proxy answered with the origin's 200 — never an extra request, never a
   differently framed one (same methods and bodies as the engine itself parsed);
2. everything the proxy refused got a 4xx/5xx JSON answer; a malformed message's answer
   is the last one on the connection and says ``connection: close``;
3. forwarded heads never carry both ``Content-Length`` and ``Transfer-Encoding``, never
   obs-fold, and forwarded chunked bodies never carry chunk extensions or trailers.

One origin and one proxy per engine serve the whole module (a fresh pair per item costs
more than the items). Attribution to an item uses *epochs*: each connection's bytes are
recorded in segments, a new segment starting when a connection first speaks in a new
epoch. A pooled connection reused by the next item therefore starts a new segment at a
request boundary — unless the proxy reused a connection mid-message, which then shows up
as a stream that does not parse.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import h11
import pytest
import pytest_asyncio

from fastedge.config import parse_config
from fastedge.http.engine import END, Limits, RequestHead, get_engine
from fastedge.server import ProxyServer
from tests.http.conftest import serve

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORIGIN_MARK = (b"x-recording-origin", b"1")
"""Set on every origin answer, so the proxy's relayed answers are told from its own."""

SWITCH_PATH = b"/switch"
"""The recording origin answers a request for this path with ``101`` (if asked to upgrade)."""

# Statuses the proxy answers for malformed or unacceptable *messages* (the engine's
# ProtocolError statuses and the body timeout): the connection must close after them.
MALFORMED = frozenset({400, 408, 411, 413, 414, 431, 501, 505})


def corpora_dir() -> Path:
    """shared/corpora beside the clone (CI keeps a copy there), else $FASTEDGE_CORPORA.
    A missing corpus is an error, never a skip (same rule as tests/http/test_corpora_parse)."""
    beside = Path(__file__).resolve().parents[2] / "shared" / "corpora"
    if beside.is_dir():
        return beside
    env = os.environ.get("FASTEDGE_CORPORA")
    if env and Path(env).is_dir():
        return Path(env)
    raise FileNotFoundError(f"request corpora not found at {beside} nor in $FASTEDGE_CORPORA")


def _load(name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads((corpora_dir() / name).read_text())
    return items


ITEMS = {item["id"]: item for item in _load("llhttp_requests.json") + _load("garden_trophies.json")}


def with_host(data: bytes) -> bytes:
    """``data`` with a Host field after the first HTTP/1.1 request line, if it has none
    (the same rule as the engine corpus test)."""
    if re.search(rb"\nhost:", data, re.IGNORECASE) or b" HTTP/1.1\r\n" not in data:
        return data
    return data.replace(b" HTTP/1.1\r\n", b" HTTP/1.1\r\nHost: corpus\r\n", 1)


def _cases() -> list[Any]:
    """(item, variant) pairs; the Host variant only where it differs (no skips)."""
    out = []
    for item_id in sorted(ITEMS):
        data = base64.b64decode(ITEMS[item_id]["raw_b64"])
        out.append(pytest.param(item_id, data, id=f"{item_id}-raw"))
        hosted = with_host(data)
        if hosted != data:
            out.append(pytest.param(item_id, hosted, id=f"{item_id}-host"))
    return out


# --- the recording origin -------------------------------------------------------------


@dataclass
class Segment:
    """Bytes one origin connection received during one epoch."""

    epoch: int
    conn: OriginConnection
    data: bytearray = field(default_factory=bytearray)


class RecordingOrigin:
    """An origin that records every byte per connection and epoch and answers each
    request it parses (h11, strict) with an empty 200."""

    def __init__(self) -> None:
        self.epoch = 0
        self.segments: list[Segment] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: OriginConnection(self), "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def new_epoch(self) -> None:
        self.epoch += 1
        self.segments = []

    def current(self) -> list[Segment]:
        return [s for s in self.segments if s.epoch == self.epoch]

    async def quiesce(self, timeout: float = 3.0) -> None:
        """Wait until every connection of this epoch is closed or between requests, so
        its record is complete (bounded; a stuck connection is reported by the checks)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(s.conn.settled() for s in self.current()):
                return
            await asyncio.sleep(0.005)


class OriginConnection(asyncio.Protocol):
    """One recorded origin connection."""

    def __init__(self, origin: RecordingOrigin) -> None:
        self.origin = origin
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        self.transport: asyncio.Transport | None = None
        self.segment: Segment | None = None
        self.target = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def settled(self) -> bool:
        data, _ = self.h11.trailing_data
        return self.closed or (self.h11.their_state is h11.IDLE and not data)

    def data_received(self, data: bytes) -> None:
        seg = self.segment
        if seg is None or seg.epoch != self.origin.epoch:
            seg = self.segment = Segment(self.origin.epoch, self)
            self.origin.segments.append(seg)
        seg.data += data
        assert self.transport is not None
        try:
            self.h11.receive_data(data)
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    self.target = event.target
                if isinstance(event, h11.EndOfMessage) and self.target == SWITCH_PATH:
                    # Agree to any upgrade, whatever the method (see
                    # test_origin_101_to_head_upgrade_is_not_an_internal_error).
                    self.transport.write(
                        self.h11.send(
                            h11.InformationalResponse(
                                status_code=101,
                                headers=[(b"upgrade", b"foo"), (b"connection", b"upgrade")],
                            )
                        )
                        or b""
                    )
                    self.h11 = h11.Connection(h11.SERVER)  # the rest is tunnel data
                    self.closed = True  # nothing more to record as HTTP
                    return
                if isinstance(event, h11.EndOfMessage):
                    out = self.h11.send(
                        h11.Response(
                            status_code=200, headers=[ORIGIN_MARK, (b"content-length", b"0")]
                        )
                    )
                    out = (out or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
                    self.transport.write(out)
                    if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                        self.h11.start_next_cycle()
                    else:
                        self.transport.close()
                        return
        except h11.ProtocolError:
            # The proxy forwarded something h11 refuses: answer in a way the test notices
            # (not the origin's 200) and close. The offline parse reports it too.
            self.transport.write(b"HTTP/1.1 421 Origin Refused\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


# --- offline checks of what the origin received --------------------------------------


@dataclass
class Forwarded:
    """One complete request as the origin's stream parses (strict h11)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


def parse_forwarded(data: bytes) -> tuple[list[Forwarded], bool]:
    """Complete requests in ``data`` (h11 as server, strict) and whether a partial
    request follows them. Raises ``h11.ProtocolError`` if the stream is malformed."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    conn.receive_data(data)
    out: list[Forwarded] = []
    head: h11.Request | None = None
    body: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            break
        if isinstance(event, h11.Request):
            head, body = event, []
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            out.append(Forwarded(head.method, head.target, list(head.headers), b"".join(body)))
            head = None
            conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            break
    rest, _ = conn.trailing_data
    return out, head is not None or bool(rest)


def check_raw_framing(data: bytes) -> None:
    """Walk the forwarded bytes message by message and check what h11 tolerates but a
    proxy must never emit: CL with TE, obs-fold, chunk extensions, trailers."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return  # a partial head (a request abandoned mid-way; parse_forwarded saw it)
        lines = data[pos:end].split(b"\r\n")
        names: list[bytes] = []
        for line in lines[1:]:
            assert not line[:1].isspace(), f"obs-fold forwarded: {line!r}"
            names.append(line.split(b":", 1)[0].lower())
        assert not (b"content-length" in names and b"transfer-encoding" in names), lines
        assert names.count(b"content-length") <= 1, lines
        assert names.count(b"transfer-encoding") <= 1, lines
        pos = end + 4
        if b"transfer-encoding" in names:
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return
                size_line = data[pos:eol]
                assert re.fullmatch(rb"[0-9a-f]+", size_line), f"chunk line {size_line!r}"
                size = int(size_line, 16)
                pos = eol + 2
                if size == 0:
                    if len(data) >= pos + 2:
                        assert data[pos : pos + 2] == b"\r\n", "trailer fields forwarded"
                    pos += 2
                    break
                pos += size + 2
        elif b"content-length" in names:
            value = next(
                line.split(b":", 1)[1].strip()
                for line in lines[1:]
                if line.split(b":", 1)[0].lower() == b"content-length"
            )
            pos += int(value)


# --- the proxy's answers ----------------------------------------------------------------


@dataclass
class Answer:
    """One response the proxy sent the client."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def from_origin(self) -> bool:
        return self.header(ORIGIN_MARK[0]) == ORIGIN_MARK[1]


def parse_answers(data: bytes) -> list[Answer]:
    """Responses in ``data``. The proxy frames everything with content-length (origin
    answers are empty; error answers JSON), except that an answer to HEAD has none of
    its declared body: a body is taken only when the bytes look like the JSON body."""
    out: list[Answer] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"truncated response head: {data[pos:]!r}"
        lines = data[pos:end].split(b"\r\n")
        assert re.fullmatch(rb"HTTP/1\.1 \d{3} .*", lines[0]), lines[0]
        status = int(lines[0][9:12])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip()))
        pos = end + 4
        body = b""
        length = next((int(v) for n, v in headers if n == b"content-length"), 0)
        if status >= 200 and length and data[pos : pos + 1] == b"{":
            body = data[pos : pos + length]
            pos += length
        out.append(Answer(status, headers, body))
    return out


# --- fixtures ---------------------------------------------------------------------------


@dataclass
class Stack:
    engine: str
    origin: RecordingOrigin
    proxy: ProxyServer


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["h11", "fast"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """One recording origin and one proxy in front of it, per engine."""
    engine = str(request.param)
    origin = RecordingOrigin()
    port = await origin.start()
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{port}"]}},
            "routes": [{"prefix": "/", "upstream": "origin"}],
        }
    )
    proxy = ProxyServer(config)
    await proxy.start()
    try:
        yield Stack(engine, origin, proxy)
    finally:
        await proxy.shutdown(drain_timeout=1)
        await origin.close()


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, and read everything until the proxy closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()
    try:
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the proxy refused early and closed; its answer is still readable
        while True:
            try:
                piece = await asyncio.wait_for(reader.read(65536), timeout)
            except ConnectionResetError:
                break
            if not piece:
                break
            out += piece
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return bytes(out)


def engine_requests(engine: str, data: bytes) -> list[tuple[bytes, bytes]]:
    """(method, body) of each request the engine itself accepts in ``data``."""
    out: list[tuple[bytes, bytes]] = []
    method = b""
    body: list[bytes] = []
    for event in serve(get_engine(engine).server(Limits()), [data]):
        if isinstance(event, RequestHead):
            method, body = event.method, []
        elif isinstance(event, bytes):
            body.append(event)
        elif event is END:
            out.append((method, b"".join(body)))
    return out


# --- the test ---------------------------------------------------------------------------


@pytest.mark.parametrize(("item_id", "data"), _cases())
async def test_corpus_item_through_proxy(stack: Stack, item_id: str, data: bytes) -> None:
    stack.origin.new_epoch()
    raw_answers = await exchange(stack.proxy.port, data)
    await stack.origin.quiesce()

    answers = [a for a in parse_answers(raw_answers) if a.status >= 200]

    # (1) the origin saw exactly the requests the proxy relayed answers for, framed as
    # the engine framed them.
    forwarded: list[Forwarded] = []
    for seg in stack.origin.current():
        try:
            complete, partial = parse_forwarded(bytes(seg.data))
        except h11.ProtocolError as exc:
            pytest.fail(f"{item_id}: origin stream does not parse ({exc}): {bytes(seg.data)!r}")
        # A partial request may only be left on a connection the proxy closed.
        assert not partial or seg.conn.closed, f"{item_id}: partial request on a live conn"
        check_raw_framing(bytes(seg.data))
        forwarded += complete
    relayed = [a for a in answers if a.from_origin]
    assert len(forwarded) == len(relayed), (item_id, forwarded, answers)
    accepted = engine_requests(stack.engine, data)
    expected = [accepted[i] for i, a in enumerate(answers) if a.from_origin and i < len(accepted)]
    assert [(f.method, f.body) for f in forwarded] == expected, item_id

    # (2) every refusal is a JSON 4xx/5xx; a malformed message's is last and closes.
    for i, answer in enumerate(answers):
        if answer.from_origin:
            assert answer.status == 200, item_id
            continue
        assert 400 <= answer.status < 600, (item_id, answer)
        assert answer.header(b"content-type") == b"application/json", (item_id, answer)
        if answer.body:
            assert json.loads(answer.body)["status"] == answer.status, (item_id, answer)
        if answer.status in MALFORMED and not _target_form_refusal(answer):
            assert i == len(answers) - 1, f"{item_id}: answers after a {answer.status}"
            assert answer.header(b"connection") == b"close", (item_id, answer)

    # (3) forwarded heads are clean.
    for f in forwarded:
        names = [n.lower() for n, _ in f.headers]
        assert not (b"content-length" in names and b"transfer-encoding" in names), item_id
        for _, value in f.headers:
            assert b"\r" not in value and b"\n" not in value, item_id


def _target_form_refusal(answer: Answer) -> bool:
    """The 400 for a request-target form the proxy does not route (``*`` for a method
    other than OPTIONS, authority-form without CONNECT). It currently keeps the
    connection open; that is checked separately by
    :func:`test_bad_request_target_form_closes_connection` so that one finding fails one
    test instead of every corpus item that happens to use such a target."""
    return answer.status == 400 and b"unsupported request-target form" in answer.body


@pytest.mark.parametrize(
    "request_line",
    [b"M-SEARCH * HTTP/1.1", b"GET example.test:80 HTTP/1.1"],
    ids=["asterisk-form-not-options", "authority-form-not-connect"],
)
async def test_bad_request_target_form_closes_connection(stack: Stack, request_line: bytes) -> None:
    """DESIGN §6: malformed HTTP gets 400 *and the connection is closed*. A request-target
    in a form its method does not allow (RFC 9112 §3.2.3, §3.2.4) is malformed; the answer
    must say ``connection: close``, and a request pipelined after it must not be served."""
    stack.origin.new_epoch()
    data = request_line + b"\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n"
    answers = parse_answers(await exchange(stack.proxy.port, data))
    await stack.origin.quiesce()
    assert answers[0].status == 400
    assert answers[0].header(b"connection") == b"close", answers[0]
    assert len(answers) == 1, answers
    assert not stack.origin.current()


async def test_connection_nominating_host_still_forwards_host(stack: Stack) -> None:
    """``Connection: host`` from a client (RFC 9110 §7.6.1 makes the proxy drop the
    client's Host) must still leave the upstream request with exactly one Host (RFC 9112
    §3.2: an HTTP/1.1 request without one is invalid). Expected: the origin's 200 and one
    ``host`` field upstream; never a 500 or a Host-less request."""
    stack.origin.new_epoch()
    data = b"GET /h HTTP/1.1\r\nHost: x.test\r\nConnection: host\r\n\r\n"
    answers = parse_answers(await exchange(stack.proxy.port, data))
    await stack.origin.quiesce()
    assert [a.status for a in answers] == [200], answers
    forwarded = [f for seg in stack.origin.current() for f in parse_forwarded(bytes(seg.data))[0]]
    assert len(forwarded) == 1
    assert [n for n, _ in forwarded[0].headers].count(b"host") == 1, forwarded[0].headers


async def test_origin_101_to_head_upgrade_is_not_an_internal_error(stack: Stack) -> None:
    """An origin that accepts an upgrade asked for by a HEAD request answers ``101``; the
    proxy may tunnel (101) or refuse the response (502), but its client codec must not
    raise (the engine contract: ``feed`` never raises), which surfaces as a 500."""
    stack.origin.new_epoch()
    data = (
        b"HEAD " + SWITCH_PATH + b" HTTP/1.1\r\nHost: x\r\n"
        b"Connection: upgrade\r\nUpgrade: foo\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    assert head.split(b" ")[1] in (b"101", b"502"), head


async def test_client_half_close_before_101_reaches_the_origin(stack: Stack) -> None:
    """A client that sends an upgrade request and half-closes at once (before the 101
    arrives) has said all it will say; once the tunnel starts, that end of input must
    reach the origin (the tunnel relays half-closes), and the origin closing must then
    close the client connection. Expected: the 101, then EOF within the timeout; not a
    connection left open forever."""
    stack.origin.new_epoch()
    data = (
        b"GET " + SWITCH_PATH + b" HTTP/1.1\r\nHost: x\r\n"
        b"Connection: upgrade\r\nUpgrade: foo\r\n\r\n"
    )
    raw = await exchange(stack.proxy.port, data, timeout=3)
    assert raw.startswith(b"HTTP/1.1 101 "), raw


UPGRADE = (
    b"GET " + SWITCH_PATH + b" HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n"
)


async def _fresh_proxy(stack: Stack) -> ProxyServer:
    """A proxy of its own (in front of the module's origin), for counting connections."""
    port = stack.proxy.config.upstreams["origin"].targets[0].port
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": stack.engine, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{port}"]}},
            "routes": [{"prefix": "/", "upstream": "origin"}],
        }
    )
    proxy = ProxyServer(config)
    await proxy.start()
    return proxy


async def _wait_no_connections(proxy: ProxyServer, timeout: float = 2.0) -> int:
    """Poll (bounded) until the proxy tracks no client connection; return how many remain."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proxy.connections and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return len(proxy.connections)


async def test_upgraded_connection_is_forgotten_after_close(stack: Stack) -> None:
    """After a tunnel ends (the client closes it), the proxy must not keep tracking the
    connection: ``server.connections`` feeds the ``fastedge_client_connections`` gauge
    and graceful shutdown waits for it to empty. Expected: empty within 2 s; a stale
    entry (the pre-upgrade ``ClientConnection``) is a leak per upgraded connection."""
    proxy = await _fresh_proxy(stack)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        left = await _wait_no_connections(proxy)
        assert left == 0, [type(c).__name__ for c in proxy.connections]
    finally:
        await proxy.shutdown(drain_timeout=0)


async def test_tunnel_closes_when_both_sides_half_closed(stack: Stack) -> None:
    """Client half-closes the tunnel; the origin (seeing the relayed EOF) closes; the
    client reads EOF and closes. Both proxy-side sockets must then be closed. Expected:
    no tracked connection and no open transport within 2 s; a tunnel whose two ends only
    ever half-close is never closed (two descriptors leaked per such tunnel)."""
    proxy = await _fresh_proxy(stack)
    try:
        raw = await exchange(proxy.port, UPGRADE, timeout=3)
        assert raw.startswith(b"HTTP/1.1 101 "), raw
        await _wait_no_connections(proxy)
        still_open = [
            type(c).__name__
            for c in proxy.connections
            if c.transport is not None and not c.transport.is_closing()
        ]
        assert not still_open, still_open
    finally:
        await proxy.shutdown(drain_timeout=0)
