"""Content-Length bodies the express lane relays across reads, against the general path.

Since the lane learnt to stream (``scan_response_start``, ``ClientConnection._express_more``),
a response whose head is whole but whose ``Content-Length`` body has only begun to arrive
is written to the client at once, and the rest of the body as it arrives; the last byte
ends the exchange on the lane (``_express_end``). Anything else while the body streams
(a client that does not read, leaves, half-closes or pipelines; an upstream that closes,
resets or stalls) promotes the exchange in mid-body (``express_promote``), and the general
path must carry on exactly as if it had handled the response from the start.

Every scenario runs twice over real loopback sockets, ``server.express`` off (the
reference) and on, against :class:`StreamOrigin`, a scripted origin that writes a body in
pieces a few milliseconds apart, or holds it at a point until the test resumes it. The
runs must agree on what a client and an operator can see: every byte each client read and
how its connection ended, every byte the origin received per connection and which of its
connections the proxy closed, the pool's gauges, the access-log lines (up to timings), the
request and upstream-error counters, a breaker's counts and a load-aware balancer's
requests in flight where one is configured.
``server.express_lane.served`` / ``.promoted`` and the connection's ``xleft`` (body bytes
still to come on the lane) prove the lane really streamed, so the agreement is not the
general path agreeing with itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import orjson
import pytest

from fastedge.server import ProxyServer
from tests import test_express_proxy
from tests.conftest import Response
from tests.test_express_proxy import (
    OriginConn,
    ScriptedOrigin,
    both,
    document,
    eventually,
    lane_counts,
    pool_stats,
    request,
    started_origins,
    warm,
)

MakeProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]
NewOrigin = Callable[[], Awaitable["StreamOrigin"]]

# The no-ERROR-logged check of tests/test_express_proxy.py (pytest finds fixtures by
# their module-level names): a failure inside a protocol callback is only logged.
no_errors_logged = test_express_proxy.no_errors_logged

# --- an origin that writes bodies in pieces -----------------------------------------------


def body_of(size: int) -> bytes:
    """The body of a ``size``-byte response: pseudo-random (so a lost, repeated or
    reordered piece cannot go unnoticed), the same in every run."""
    return random.Random(size).randbytes(size)


HOLD = "hold"
"""A script step: wait until the test calls :meth:`StreamOrigin.resume`."""
CLOSE = "close"
"""A script step: close the connection (FIN)."""
ABORT = "abort"
"""A script step: abort the connection (RST)."""

STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"
"""Bytes after a body that nobody asked for."""

Step = bytes | str


class StreamOrigin(ScriptedOrigin):
    """:class:`ScriptedOrigin`, and ``/pieces/<spec>[?params]``: a 200 with a
    ``Content-Length`` body (:func:`body_of` the declared length) written in pieces.

    ``spec`` is ``.``-separated: a number writes that many body bytes (the first one
    together with the head, so ``0`` sends the head alone), ``h`` holds until the test
    calls :meth:`resume`. Parameters: ``gap`` (ms between writes, default 5); ``cl``
    (the declared length, default the sum of the pieces: more makes a truncated body);
    ``first`` (ms before the head, default 0); ``end=close|abort`` (close or reset the
    connection after the script); ``stray=same`` (:data:`STRAY` in the write of the
    last piece) or ``stray=later`` (its own write, a gap later); ``close=1`` (the head
    says ``Connection: close``, the connection stays open). A HEAD gets the head alone,
    at once.

    The scripts of one connection play one after the other; :attr:`done` counts the
    finished ones and :attr:`holding` the holds being waited at.
    """

    def __init__(self) -> None:
        super().__init__()
        self.done = 0
        self._waiting: list[asyncio.Event] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def holding(self) -> int:
        """How many scripts wait at a hold."""
        return len(self._waiting)

    def resume(self) -> None:
        """Let every script waiting at a hold go on."""
        waiting, self._waiting = self._waiting, []
        for ev in waiting:
            ev.set()

    async def resume_held(self) -> None:
        """:meth:`resume` once a script waits at a hold (it reaches one in the step of
        the write before it, so it waits already when the client has those bytes; this
        only makes sure of it)."""
        await eventually(lambda: self.holding > 0)
        self.resume()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await super().close()

    def answer(self, conn: OriginConn, head: bytes) -> None:
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
        path, _, query = target.partition(b"?")
        parts = path.split(b"/")
        if parts[1] != b"pieces":
            super().answer(conn, head)
            return
        params = dict(p.split(b"=", 1) for p in query.split(b"&") if p)
        tokens = parts[2].decode().split(".")
        sizes = [int(t) for t in tokens if t != "h"]
        declared = int(params.get(b"cl", sum(sizes)))
        fields = b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n" % declared
        if params.get(b"close") == b"1":
            fields += b"Connection: close\r\n"
        response_head = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n"
        if method == b"HEAD":
            conn.transport.write(response_head)
            return
        body = body_of(declared)
        steps: list[Step] = []
        pos = 0
        for token in tokens:
            if token == "h":
                steps.append(HOLD)
                continue
            piece = body[pos : pos + int(token)]
            pos += int(token)
            steps.append(response_head + piece if not steps else piece)
        stray = params.get(b"stray")
        if stray == b"same":
            last = max(i for i, s in enumerate(steps) if isinstance(s, bytes))
            steps[last] = bytes(steps[last]) + STRAY
        elif stray == b"later":
            steps.append(STRAY)
        end = params.get(b"end")
        if end is not None:
            steps.append(CLOSE if end == b"close" else ABORT)
        gap = int(params.get(b"gap", 5)) / 1000
        first = int(params.get(b"first", 0)) / 1000
        previous = self._tasks.get(conn.index)
        self._tasks[conn.index] = asyncio.get_running_loop().create_task(
            self._play(conn, steps, gap, first, previous)
        )

    async def _play(
        self,
        conn: OriginConn,
        steps: list[Step],
        gap: float,
        first: float,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Play ``steps`` on ``conn`` (``first`` seconds later) after the connection's
        previous script."""
        if previous is not None:
            await previous
        if first:
            await asyncio.sleep(first)
        t = conn.transport
        wrote = False
        for step in steps:
            if step == HOLD:
                ev = asyncio.Event()
                self._waiting.append(ev)
                await ev.wait()
                wrote = False  # no gap after a hold: the test chose the moment
                continue
            if wrote or step in (CLOSE, ABORT):
                await asyncio.sleep(gap)
            if t.is_closing():
                break  # the proxy let the connection go
            if step == CLOSE:
                t.close()
            elif step == ABORT:
                t.abort()
            else:
                assert isinstance(step, bytes)
                t.write(step)
                wrote = True
        self.done += 1


@pytest.fixture
async def new_stream_origin() -> AsyncIterator[NewOrigin]:
    """``await new_stream_origin()``: a started :class:`StreamOrigin`, closed at the end."""
    async with started_origins(StreamOrigin) as start:
        yield start


# --- a client that keeps every byte -------------------------------------------------------


class Peer:
    """A client connection to the proxy that keeps every byte it read (:attr:`data`) and
    how the proxy ended it (:attr:`ending`: ``"eof"``, ``"reset"`` or ``None``, open)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.data = bytearray()
        self.ending: str | None = None

    @classmethod
    async def open(cls, port: int) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    @classmethod
    async def adopt(cls, sock: socket.socket) -> Peer:
        """A peer on an already connected socket (one that has not been reading)."""
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read(self, timeout: float) -> bool:
        """Read once (bounded); False when the proxy ended the connection."""
        try:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionResetError:
            self.ending = "reset"
            return False
        if not chunk:
            self.ending = "eof"
            return False
        self.data += chunk
        return True

    async def read_until(self, check: Callable[[bytes], bool], timeout: float = 5.0) -> None:
        """Read until ``check(all bytes read)``; fails if the connection ends first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check(bytes(self.data)):
            left = deadline - loop.time()
            if left <= 0 or not await self._read(left):
                raise AssertionError(f"not reached: {len(self.data)} bytes, {self.ending}")

    async def read_body_bytes(self, count: int, responses: int = 1) -> None:
        """Read until the ``responses``-th response head and ``count`` bytes after it."""

        def enough(data: bytes) -> bool:
            pos = 0
            for _ in range(responses):
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    return False
                pos = end + 4
            return len(data) - pos >= count

        await self.read_until(enough)

    async def read_to_close(self, timeout: float = 5.0) -> None:
        """Read everything until the proxy ends the connection (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self._read(max(deadline - loop.time(), 0.001)):
            pass

    async def read_responses(self, methods: list[bytes], timeout: float = 5.0) -> list[Response]:
        """Read until ``methods``' responses are complete, and parse them (h11)."""

        def complete(data: bytes) -> bool:
            responses, _ = parse_responses(data, methods)
            return len(responses) == len(methods)

        await self.read_until(complete, timeout)
        return parse_responses(bytes(self.data), methods)[0]

    def reset(self) -> None:
        """Close with a reset (SO_LINGER 0), not a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):  # already reset
            await self.writer.wait_closed()


def parse_responses(data: bytes, methods: list[bytes]) -> tuple[list[Response], bytes]:
    """The complete responses in ``data`` (to requests with ``methods``, in order), parsed
    by h11 (a strict reference), and the body bytes of an incomplete one after them."""
    conn = h11.Connection(h11.CLIENT)
    if data:  # (no data would tell h11 the connection closed)
        conn.receive_data(data)
    out: list[Response] = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        resp: Response | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return out, b"".join(chunks)
            if isinstance(event, h11.Response):
                resp = Response(event.status_code, list(event.headers))
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert resp is not None
                resp.body = b"".join(chunks)
                out.append(resp)
                break
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            break  # the response closed the connection: nothing may follow
        conn.start_next_cycle()
    return out, b""


# --- one scenario, express off and on -----------------------------------------------------

TIMING = {"ts", "duration_ms", "upstream_ms"}

COUNTERS = (
    "fastedge_requests_total",
    "fastedge_request_duration_seconds_count",
    "fastedge_upstream_duration_seconds_count",
    "fastedge_upstream_errors_total",
    "fastedge_upstream_retries_total",
)
"""The metrics a request leaves behind on either lane (the lane's own are not here)."""


@dataclass
class Outcome:
    """What one proxy (express on or off) did in a scenario."""

    clients: list[tuple[bytes, str | None]]  # per client connection: bytes read, ending
    origin: list[tuple[bytes, bool]]  # per origin connection: bytes received, closed
    pool: list[dict[str, int]]
    log: list[dict[str, Any]]
    counters: list[str]
    breakers: list[tuple[object, ...]]
    inflight: list[int]  # a load-aware balancer's requests in flight, per target
    lanes: tuple[int, int]
    note: dict[str, Any] = field(default_factory=dict)  # what the scenario saw on the way

    def seen(self) -> dict[str, Any]:
        """Everything both lanes must agree on."""
        return {
            "clients": self.clients,
            "origin": self.origin,
            "pool": self.pool,
            "log": self.log,
            "counters": self.counters,
            "breakers": self.breakers,
            "inflight": self.inflight,
        }


@dataclass
class Stage:
    """What a scenario gets: the proxy, the origin, and a way to open clients."""

    proxy: ProxyServer
    origin: StreamOrigin
    express: bool
    peers: list[Peer] = field(default_factory=list)
    note: dict[str, Any] = field(default_factory=dict)

    async def peer(self) -> Peer:
        """A new client connection (its bytes are part of the outcome)."""
        peer = await Peer.open(self.proxy.port)
        self.peers.append(peer)
        return peer

    def conn(self) -> Any:
        """The proxy's one client connection (a ClientConnection)."""
        (conn,) = self.proxy.connections
        return conn

    async def streaming(self, left: int) -> None:
        """On the lane, wait until it relays a body with ``left`` bytes still to come
        (proof that the lane, not the general path, has the response so far); a
        load-aware balancer counts the request in flight meanwhile, on either lane."""
        if self.express:
            await eventually(lambda: self.conn().xreq is not None and self.conn().xleft == left)
        assert all(n == 1 for n in _inflight(self.proxy))


Scenario = Callable[[Stage], Awaitable[None]]


def _counters(proxy: ProxyServer) -> list[str]:
    text = proxy.metrics.render().decode()
    return [line for line in text.splitlines() if line.startswith(COUNTERS)]


def _breakers(proxy: ProxyServer) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for up in proxy.gateway.upstreams.values():
        for t in up.targets:
            if t.breaker is not None:
                s = t.breaker.stats()
                out.append((s["state"], s["requests"], s["failures"], s["probes_inflight"]))
    return out


def _inflight(proxy: ProxyServer) -> list[int]:
    return [
        up.balancer.inflight(t)
        for up in proxy.gateway.upstreams.values()
        if up.load_aware
        for t in up.targets
    ]


async def play(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    log_dir: Path,
    scenario: Scenario,
    *,
    express: bool,
    server: dict[str, Any] | None = None,
    **upstream: Any,
) -> Outcome:
    """Run ``scenario`` on a warmed proxy (express on or off, an access log in
    ``log_dir``), close its clients, wait until the proxy is quiet, and collect."""
    origin = await new_origin()
    log = log_dir / f"access-{express}.log"
    doc = document(
        origin.port, express=express, server={"access_log": str(log), **(server or {})}, **upstream
    )
    proxy = await make_proxy(doc)
    assert proxy.express_lane.enabled is express
    await warm(proxy)
    stage = Stage(proxy, origin, express)
    try:
        await scenario(stage)
    finally:
        for peer in stage.peers:
            await peer.close()
    # Quiet: no client connection left, no upstream connection checked out.
    await eventually(lambda: not proxy.connections)
    await eventually(lambda: all(s["active"] == 0 for s in pool_stats(proxy)))
    assert proxy.access_log is not None
    proxy.access_log.flush()
    lines = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    for line in lines:
        # Each run has its own origin: the one field that differs by design.
        assert line.pop("target") in (f"http://127.0.0.1:{origin.port}", None)
        for key in TIMING:
            line.pop(key)
    return Outcome(
        clients=[(bytes(p.data), p.ending) for p in stage.peers],
        origin=[(bytes(c.data), c.closed) for c in origin.conns],
        pool=pool_stats(proxy),
        log=lines,
        counters=_counters(proxy),
        breakers=_breakers(proxy),
        inflight=_inflight(proxy),
        lanes=lane_counts(proxy),
        note=stage.note,
    )


async def compare(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    log_dir: Path,
    scenario: Scenario,
    *,
    server: dict[str, Any] | None = None,
    **upstream: Any,
) -> tuple[Outcome, Outcome]:
    """``scenario`` with express off (the reference) and on: (express, general); asserts
    they agree on everything in :meth:`Outcome.seen`."""
    general = await play(
        make_proxy, new_origin, log_dir, scenario, express=False, server=server, **upstream
    )
    express = await play(
        make_proxy, new_origin, log_dir, scenario, express=True, server=server, **upstream
    )
    assert general.lanes == (0, 0)
    want, got = general.seen(), express.seen()
    for key in want:
        assert got[key] == want[key], key
    return express, general


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """A response's head (with its blank line) and the bytes after it."""
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


async def served_after(stage: Stage, rid: str) -> None:
    """A new client is served (``/after``): the proxy is healthy."""
    after = await stage.peer()
    await after.send(request("/after", rid))
    (resp,) = await after.read_responses([b"GET"])
    assert (resp.status, resp.body) == (200, b"fixed body for /after\n")


BREAKER = {"min_requests": 100, "failure_ratio": 0.5, "open_for": "5s"}
"""A breaker that never trips here: its counts show which outcomes were reported."""

UPSTREAMS = pytest.mark.parametrize(
    "upstream",
    [{}, {"breaker": BREAKER}, {"balance": "least_conn"}],
    ids=["plain", "breaker", "least_conn"],
)
"""A plain upstream, a resilient one (a breaker: verdicts reported once) and a
load-aware one (requests in flight counted until the exchange ends, on either lane)."""

# --- 1. parity: bodies in 2-5 pieces, byte for byte ---------------------------------------

BIG = 204_800
"""A 200 KB body, written as the head alone then four pieces."""

STREAMED: list[tuple[bytes, bytes]] = [
    (request("/pieces/10.20", "s-1"), b"GET"),
    (request("/pieces/0.100", "s-2"), b"GET"),  # the head alone, then the whole body
    (request("/pieces/50.30.20.10.5", "s-3"), b"GET"),  # five writes
    (request("/pieces/100.1.1.1.1", "s-4"), b"GET"),  # one byte at a time at the end
    (request("/pieces/1.1", "s-5"), b"GET"),
    (request("/pieces/0.1", "s-6"), b"GET"),
    (request("/pieces/0.65536.65536.65536.8192", "s-7"), b"GET"),
    (request("/pieces/3000.4000.5000?gap=20", "s-8"), b"GET"),
    (request("/pieces/10.20", "s-9", method="HEAD"), b"HEAD"),
    (request("/pieces/7.8.9", "s-10", "Connection: close\r\n"), b"GET"),
    (request("/plain", "s-11"), b"GET"),  # after a streamed body: the connection is reused
    (request("/pieces/0.5.5", "s-12"), b"GET"),
]
"""Responses whose body comes in pieces a few ms apart (and two that do not)."""


@pytest.mark.parametrize(
    "server",
    [{}, {"keepalive_timeout": "0s"}, {"max_requests_per_connection": 3}],
    ids=["default", "keepalive_off", "max_requests_3"],
)
async def test_streamed_bodies_match_the_general_path(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, server: dict[str, Any]
) -> None:
    """Byte for byte the general path's responses, every one on the lane (none
    promoted), all on the one upstream connection the warm-up opened."""
    express, general = await both(make_proxy, new_stream_origin, STREAMED, server=server)
    assert (express.served, express.promoted) == (len(STREAMED), 0)
    assert {i for i, _ in express.origin_heads} == {0}
    assert len(express.origin_heads) == len(STREAMED) + 1
    assert (
        pool_stats(express.server)
        == pool_stats(general.server)
        == [{"idle": 1, "active": 0, "waiting": 0}]
    )
    sizes = [30, 100, 115, 104, 2, 1, BIG, 12000, 0, 24, None, 10]
    for resp, size, (data, method) in zip(express.responses, sizes, STREAMED, strict=True):
        assert resp.status == 200
        if size is None:
            continue
        if method == b"HEAD":
            assert (resp.body, resp.header("content-length")) == (b"", b"30")
        else:
            assert resp.body == body_of(size), data
            assert resp.header("content-length") == b"%d" % size
    assert express.responses[9].header("connection") == b"close"


@UPSTREAMS
async def test_the_lane_writes_each_piece_as_it_arrives(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, tmp_path: Path, upstream: dict[str, Any]
) -> None:
    """The head and the body so far reach the client while the rest is still held at
    the origin; the lane keeps count of what is to come; the last piece ends the
    exchange on the lane (no promotion) and the upstream connection goes back idle."""

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        await client.send(request("/pieces/100.h.50.h.25", "w-1"))
        await client.read_body_bytes(100)
        await stage.streaming(75)
        await stage.origin.resume_held()
        await client.read_body_bytes(150)
        await stage.streaming(25)
        stage.note["mid"] = lane_counts(stage.proxy)
        await stage.origin.resume_held()
        (resp,) = await client.read_responses([b"GET"])
        assert resp.body == body_of(175)
        await client.send(request("/plain", "w-2"))
        await client.read_responses([b"GET", b"GET"])

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario, **upstream)
    assert express.note["mid"] == (1, 0)
    assert express.lanes == (2, 0)
    assert [closed for _, closed in express.origin] == [False]  # one connection, reused
    assert express.pool == [{"idle": 1, "active": 0, "waiting": 0}]
    assert express.log[1]["bytes_out"] == 175
    if "breaker" in upstream:
        assert express.breakers == [("closed", 3, 0, 0)]  # warm, w-1 (on the lane), w-2
    assert express.inflight == ([0] if "balance" in upstream else [])


# --- 2. a client that does not read -------------------------------------------------------

HUGE_SPEC = "65536" + ".262144" * 8
HUGE = 65536 + 262144 * 8  # about 2 MB


@pytest.mark.parametrize("client_close", [False, True], ids=["keep_alive", "client_close"])
async def test_client_not_reading_a_big_streamed_body(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, tmp_path: Path, client_close: bool
) -> None:
    """A 2 MB body in nine writes to a client that reads nothing until the proxy's
    write buffer is full (pause_writing, in mid-body: the general path takes over and
    stops reading the upstream); then it reads everything: intact, as express off, and
    the connections on both sides are still usable (``client_close``: the request said
    ``Connection: close``, which the promoted exchange keeps: the connection closes
    after the response)."""
    extra = "Connection: close\r\n" if client_close else ""

    async def scenario(stage: Stage) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", stage.proxy.port))
            await eventually(lambda: len(stage.proxy.connections) == 1)
            conn = stage.conn()
            # Small kernel buffers on the proxy's side too: its own buffer fills early.
            sending = conn.transport.get_extra_info("socket")
            sending.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await loop.sock_sendall(sock, request(f"/pieces/{HUGE_SPEC}", "big-1", extra))
            await eventually(lambda: conn.write_paused)
            stage.note["lanes_paused"] = lane_counts(stage.proxy)
            stage.note["promoted_mid_body"] = conn.xreq is None and conn.exchange is not None
        except BaseException:
            sock.close()
            raise
        client = await Peer.adopt(sock)
        stage.peers.append(client)
        (resp,) = await client.read_responses([b"GET"], timeout=10)
        assert resp.body == body_of(HUGE)
        assert stage.origin.done == 1  # the origin could write it all
        if client_close:
            assert resp.header("connection") == b"close"
            await client.read_to_close()
            assert client.ending == "eof"
            return
        await client.send(request("/plain", "big-2"))
        await client.read_responses([b"GET", b"GET"])

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario)
    assert express.note["lanes_paused"] == (1, 1)  # sent on the lane, promoted
    assert express.note["promoted_mid_body"]
    # The promoted exchange ended normally: the upstream connection was reused.
    assert express.lanes == ((1, 1) if client_close else (2, 1))
    assert [closed for _, closed in express.origin] == [False]
    assert express.log[1]["bytes_out"] == HUGE


# --- 3. a pipelined request in mid-body ---------------------------------------------------


@pytest.mark.parametrize("case", ["keep_alive", "upstream_close", "keepalive_off"])
async def test_pipelined_request_in_mid_body(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, tmp_path: Path, case: str
) -> None:
    """The client read the head and part of the body, then sent its next request: the
    general path finishes the first response, then answers the second, in order.
    ``upstream_close``: the origin's head said ``Connection: close`` (the lane's
    reusable verdict must survive the promotion: the next request goes elsewhere);
    ``keepalive_off``: the head the lane wrote said ``connection: close``, so the
    promoted exchange must close after it, the second request unanswered."""
    spec = "/pieces/100.h.200" + ("?close=1" if case == "upstream_close" else "")
    server = {"keepalive_timeout": "0s"} if case == "keepalive_off" else {}

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        await client.send(request(spec, "pl-1"))
        await client.read_body_bytes(100)
        await stage.streaming(200)
        await client.send(request("/pieces/5.5", "pl-2"))
        conn = stage.conn()
        await eventually(lambda: conn.ahead_bytes > 0)  # the proxy holds the second
        stage.note["lanes"] = lane_counts(stage.proxy)
        await stage.origin.resume_held()
        if case == "keepalive_off":
            (first,) = await client.read_responses([b"GET"])
            assert first.header("connection") == b"close"
            await client.read_to_close()
            assert client.ending == "eof"
        else:
            first, second = await client.read_responses([b"GET", b"GET"])
            assert (second.status, second.body) == (200, body_of(10))
            assert second.header("x-request-id") == b"pl-2"
        assert (first.status, first.body) == (200, body_of(300))
        assert first.header("x-request-id") == b"pl-1"

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario, server=server)
    assert express.note["lanes"] == (1, 1)
    heads = [data.count(b"HTTP/1.1\r\n") for data, _ in express.origin]
    # warm, pl-1 on the first connection; pl-2 there too unless the origin said close,
    # or not at all when the client connection had to close.
    assert heads == {"keep_alive": [3], "upstream_close": [2, 1], "keepalive_off": [2]}[case]
    # The proxy closed the connection the origin gave up, and only that one.
    assert express.origin[0][1] is (case == "upstream_close")


# --- 4. the client leaves in mid-body -----------------------------------------------------


@UPSTREAMS
@pytest.mark.parametrize("how", ["reset", "half_close"])
async def test_client_leaves_in_mid_body(
    make_proxy: MakeProxy,
    new_stream_origin: NewOrigin,
    tmp_path: Path,
    how: str,
    upstream: dict[str, Any],
) -> None:
    """``reset``: the half-used upstream connection is dropped, not pooled as idle;
    ``half_close``: the client still reads the whole response, and then the connection
    closes (the upstream one is reused). Either way the next client is served."""

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        await client.send(request("/pieces/100.h.200", "cl-1"))
        await client.read_body_bytes(100)
        await stage.streaming(200)
        conn = stage.conn()
        if how == "reset":
            client.reset()
            await eventually(lambda: stage.origin.conns[0].closed)
            stage.note["lanes"] = lane_counts(stage.proxy)
            stage.note["pool"] = pool_stats(stage.proxy)
            stage.origin.resume()  # nothing to write to
        else:
            client.writer.write_eof()
            await eventually(lambda: conn.eof)
            stage.note["lanes"] = lane_counts(stage.proxy)
            await stage.origin.resume_held()
            (resp,) = await client.read_responses([b"GET"])
            assert resp.body == body_of(300)
            await client.read_to_close()
            assert client.ending == "eof"
        await served_after(stage, "cl-2")

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario, **upstream)
    assert express.note["lanes"] == (1, 1)
    if how == "reset":
        assert express.note["pool"] == [{"idle": 0, "active": 0, "waiting": 0}]
        assert [closed for _, closed in express.origin] == [True, False]
        assert express.log[1]["status"] == 200
        assert express.log[1]["error"] == "client closed connection"
        assert express.log[1]["bytes_out"] == 100
    else:
        assert [closed for _, closed in express.origin] == [False]
        assert express.log[1]["bytes_out"] == 300
    if "breaker" in upstream:
        # The 200 was reported once, at the head; the client leaving is no verdict.
        assert express.breakers == [("closed", 3, 0, 0)]
    assert express.inflight == ([0] if "balance" in upstream else [])


# --- 5. the upstream closes in mid-body ---------------------------------------------------


@UPSTREAMS
@pytest.mark.parametrize(
    "spec",
    [
        "/pieces/100.50?cl=300&end=close",
        "/pieces/100.50?cl=300&end=abort",
        "/pieces/0?cl=300&end=close",  # the head alone, then the close
        "/pieces/100.h?cl=300&end=close",
    ],
    ids=["close", "abort", "head_only", "held_close"],
)
async def test_upstream_closes_in_mid_body(
    make_proxy: MakeProxy,
    new_stream_origin: NewOrigin,
    tmp_path: Path,
    spec: str,
    upstream: dict[str, Any],
) -> None:
    """The client gets the head and the truncated body, then the connection closes
    (a 502 is impossible once the head is out), exactly as express off; the dead
    upstream connection is not pooled, and the next client is served."""
    sent = sum(int(t) for t in spec.split("?")[0].split("/")[2].split(".") if t != "h")

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        await client.send(request(spec, "uc-1"))
        if ".h" in spec:
            await client.read_body_bytes(sent)
            await stage.streaming(300 - sent)
            await stage.origin.resume_held()
        await client.read_to_close()
        await served_after(stage, "uc-2")

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario, **upstream)
    (data, ending), _ = express.clients
    head, body = split_head(data)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\ncontent-length: 300\r\n" in head
    assert body == body_of(300)[:sent]
    assert ending in ("eof", "reset")
    assert express.lanes == (1, 1)
    assert [closed for _, closed in express.origin] == [True, False]
    assert express.pool == [{"idle": 1, "active": 0, "waiting": 0}]
    assert express.log[1]["status"] == 200 and express.log[1]["bytes_out"] == sent
    assert express.log[1]["error"] == "upstream closed the connection before the response ended"
    if "breaker" in upstream:
        assert express.breakers == [("closed", 3, 0, 0)]
    assert express.inflight == ([0] if "balance" in upstream else [])


# --- 6. the upstream stalls in mid-body ---------------------------------------------------


@UPSTREAMS
async def test_upstream_stalls_in_mid_body(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, tmp_path: Path, upstream: dict[str, Any]
) -> None:
    """No more body within ``response_timeout`` (300 ms) of the last piece: the
    connection closes after the truncated body (no 504: the head is out), as express
    off; measured from the last piece, not from the request."""
    loop = asyncio.get_running_loop()

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        # The head and 50 bytes, 50 more 200 ms later (within the timeout), then nothing.
        await client.send(request("/pieces/50.50.h.10?gap=200", "st-1"))
        await client.read_body_bytes(50)
        await stage.streaming(60)
        await client.read_body_bytes(100)
        t0 = loop.time()
        await stage.streaming(10)
        await client.read_to_close()
        stage.note["waited"] = loop.time() - t0
        stage.origin.resume()  # too late: the proxy let the connection go
        await served_after(stage, "st-2")

    express, general = await compare(
        make_proxy,
        new_stream_origin,
        tmp_path,
        scenario,
        pool={"response_timeout": "300ms"},
        **upstream,
    )
    for run in (general, express):
        assert 0.25 <= run.note["waited"] < 1.5, run.note["waited"]
    (data, _), _ = express.clients
    assert split_head(data)[1] == body_of(110)[:100]
    assert express.lanes == (1, 1)
    assert [closed for _, closed in express.origin] == [True, False]
    assert express.log[1]["status"] == 200 and express.log[1]["error"] == "upstream timed out"
    if "breaker" in upstream:
        assert express.breakers == [("closed", 3, 0, 0)]
    assert express.inflight == ([0] if "balance" in upstream else [])


async def test_slow_body_within_the_idle_timeout_completes(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin
) -> None:
    """The head 250 ms after the request, then pieces 250 ms apart, 1 s in all, with a
    450 ms response timeout: an idle timeout (from the request to the head, then from
    each read to the next), not a total one; served on the lane without a promotion,
    as express off."""
    reqs = [
        (request("/pieces/10.10.10.10?first=250&gap=250", "sl-1"), b"GET"),
        (request("/plain", "sl-2"), b"GET"),
    ]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    express, _ = await both(make_proxy, new_stream_origin, reqs, pool={"response_timeout": "450ms"})
    assert loop.time() - t0 >= 2.0  # each run took its second
    assert express.responses[0].body == body_of(40)
    assert (express.served, express.promoted) == (2, 0)
    assert {i for i, _ in express.origin_heads} == {0}


# --- 7. stray bytes after the body --------------------------------------------------------


@pytest.mark.parametrize("stray", ["same", "later"])
async def test_stray_bytes_after_a_streamed_body(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, tmp_path: Path, stray: str
) -> None:
    """Bytes after the body (``same``: in the read with its last bytes; ``later``: a
    read of their own, once the exchange is over): the client gets exactly the body,
    and the upstream connection is not reused: the next request connects anew."""

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        await client.send(request(f"/pieces/100.50?stray={stray}", "sb-1"))
        (resp,) = await client.read_responses([b"GET"])
        assert resp.body == body_of(150)
        await eventually(lambda: stage.origin.conns[0].closed)
        await client.send(request("/plain", "sb-2"))
        await client.read_responses([b"GET", b"GET"])

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario)
    ((data, _),) = express.clients
    assert STRAY not in data
    assert len(parse_responses(data, [b"GET", b"GET"])[0]) == 2
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert [closed for _, closed in express.origin] == [True, False]
    assert [data.count(b"HTTP/1.1\r\n") for data, _ in express.origin] == [2, 1]
    assert express.lanes == (1, 0)  # the next request found the pool empty: it connected
    assert express.pool == [{"idle": 1, "active": 0, "waiting": 0}]


async def test_upstream_connection_close_on_a_streamed_body(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin
) -> None:
    """The origin's head says ``Connection: close`` (and it keeps the connection open):
    the lane relays the body, then lets the connection go instead of pooling it; the
    next request connects anew, as express off."""
    reqs = [
        (request("/pieces/10.20?close=1", "uk-1"), b"GET"),
        (request("/plain", "uk-2"), b"GET"),
    ]
    express, general = await both(make_proxy, new_stream_origin, reqs)
    assert express.responses[0].body == body_of(30)
    assert express.responses[0].header("connection") is None  # hop-by-hop: not relayed
    assert (express.served, express.promoted) == (1, 0)
    assert [i for i, _ in express.origin_heads] == [0, 0, 1]
    assert express.origin.conns[0].closed
    assert pool_stats(express.server) == pool_stats(general.server)


# --- 8. HEAD, 204 and 304 -----------------------------------------------------------------

BODILESS: list[tuple[bytes, bytes]] = [
    (request("/pieces/10.20", "nb-1", method="HEAD"), b"HEAD"),
    (request("/pieces/0.100", "nb-2", method="HEAD"), b"HEAD"),
    (request("/nocontent", "nb-3"), b"GET"),
    (request("/notmod", "nb-4", 'If-None-Match: "v1"\r\n'), b"GET"),
    (request("/empty", "nb-5"), b"GET"),
    (request("/pieces/3.4", "nb-6"), b"GET"),
]


async def test_head_204_and_304_do_not_stream(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin
) -> None:
    """A Content-Length on a HEAD, 204 or 304 response announces no body: each is whole
    at once (with a 1 s response timeout, waiting for a body would end the connection
    instead), on the lane, on the one upstream connection."""
    express, _ = await both(
        make_proxy, new_stream_origin, BODILESS, pool={"response_timeout": "1s"}
    )
    assert (express.served, express.promoted) == (len(BODILESS), 0)
    assert {i for i, _ in express.origin_heads} == {0}
    statuses = [r.status for r in express.responses]
    assert statuses == [200, 200, 204, 304, 200, 200]
    assert [r.body for r in express.responses] == [b"", b"", b"", b"", b"", body_of(7)]
    assert express.responses[0].header("content-length") == b"30"


# --- and: a graceful shutdown in mid-body -------------------------------------------------


async def test_shutdown_in_mid_body_finishes_the_response_then_closes(
    make_proxy: MakeProxy, new_stream_origin: NewOrigin, tmp_path: Path
) -> None:
    """A graceful stop while the lane relays a body: the response completes (its head
    did not say close), then the connection closes, as on the general path."""

    async def scenario(stage: Stage) -> None:
        client = await stage.peer()
        await client.send(request("/pieces/100.h.50", "sd-1"))
        await client.read_body_bytes(100)
        await stage.streaming(50)
        conn = stage.conn()
        conn.shutdown()  # what ProxyServer.shutdown does to each connection
        assert not conn.transport.is_closing()
        await stage.origin.resume_held()
        (resp,) = await client.read_responses([b"GET"])
        assert resp.body == body_of(150) and resp.header("connection") is None
        await client.read_to_close()
        assert client.ending == "eof"

    express, _ = await compare(make_proxy, new_stream_origin, tmp_path, scenario)
    assert express.lanes == (1, 0)
    assert express.pool == [{"idle": 1, "active": 0, "waiting": 0}]
