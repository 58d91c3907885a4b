"""Contract tests for fastedge's own transports (``fastedge._core.edgeio``).

The same test bodies run on two implementations of asyncio's transport contract:

* ``edge``: ``edgeio.EdgeServer`` (accepted connections) and ``edgeio.open_connection``
  (outgoing ones), every socket in one ``EdgeLoop`` epoll set;
* ``loop``: uvloop's own ``loop.create_server(factory, sock=...)`` and
  ``loop.create_connection``: the reference.

The far end of every connection is a plain non-blocking socket driven with
``loop.sock_*`` on 127.0.0.1 (and ::1 where the host has it), so what is checked is what
a real peer sees. Where edgeio deliberately differs from uvloop the test runs on ``edge``
only and its docstring says why (no test is marked xfail: the two edge bugs these tests
found are fixed).
The module ends with ``fastedge.transports`` (the selection) and the proxy end to end with
``server.io = "edge"`` and ``"loop"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastedge import transports
from fastedge.config import ConfigError, parse_config
from fastedge.server import ProxyServer
from tests.conftest import Client, free_port, gateway_config, has_ipv6_loopback

edgeio: Any = transports._edgeio

needs_edge = pytest.mark.skipif(
    edgeio is None, reason="fastedge._core.edgeio is not built (Linux + make build)"
)

TIMEOUT = 10.0  # bound on any single wait; a correct run takes milliseconds
KIB = 1024
MIB = 1024 * KIB


HOSTS = [
    "127.0.0.1",
    pytest.param(
        "::1", marks=pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
    ),
]


def fd_count() -> int:
    """Open descriptors of this process (Linux /proc)."""
    return len(os.listdir("/proc/self/fd"))


def baseline_fd_count() -> int:
    """The descriptor count to compare against later: garbage from earlier tests (an
    EdgeLoop in a reference cycle holds its epoll descriptor) is collected first so it
    cannot close a descriptor in the middle of the measurement."""
    gc.collect()
    return fd_count()


async def settled_fd_count(expected: int, timeout: float = 2.0) -> int:
    """The descriptor count once it equals ``expected`` or ``timeout`` passed: uvloop
    closes descriptors a loop iteration or two after the transport says so."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while fd_count() != expected and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return fd_count()


# --- a recording protocol --------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """Records every callback in order, with what it was given."""

    def __init__(self, eof_answer: bool | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.calls: list[str] = []
        self.transport: Any = None
        self.received = bytearray()
        self.lost_with: list[BaseException | None] = []
        self.eof_answer = eof_answer
        self.made: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.paused: asyncio.Future[None] = loop.create_future()
        self.resumed: asyncio.Future[None] = loop.create_future()
        self.changed = asyncio.Event()
        self.size_at_pause = -1
        self.size_at_resume = -1
        self.closing_now = False  # a test sets it around transport.close()
        self.lost_inside_close = False

    def count(self, name: str) -> int:
        return self.calls.count(name)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.calls.append("connection_made")
        self.transport = transport
        if not self.made.done():
            self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.calls.append("data_received")
        assert type(data) is bytes
        self.received += data
        self.changed.set()

    def eof_received(self) -> bool | None:
        self.calls.append("eof_received")
        if not self.eof.done():
            self.eof.set_result(None)
        return self.eof_answer

    def connection_lost(self, exc: BaseException | None) -> None:
        self.calls.append("connection_lost")
        self.lost_with.append(exc)
        self.lost_inside_close = self.lost_inside_close or self.closing_now
        if not self.lost.done():
            self.lost.set_result(None)
        self.changed.set()

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")
        self.size_at_pause = self.transport.get_write_buffer_size()
        if not self.paused.done():
            self.paused.set_result(None)

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")
        self.size_at_resume = self.transport.get_write_buffer_size()
        if not self.resumed.done():
            self.resumed.set_result(None)

    async def wait_bytes(self, n: int, timeout: float = TIMEOUT) -> bytes:
        """Wait (bounded) until at least ``n`` bytes arrived; all that arrived."""

        async def until() -> None:
            while len(self.received) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(until(), timeout)
        return bytes(self.received)

    async def wait_lost(self, timeout: float = TIMEOUT) -> None:
        await asyncio.wait_for(asyncio.shield(self.lost), timeout)


class Factory:
    """A protocol factory that counts its calls and hands out what it made."""

    def __init__(self, make: Callable[[], Recorder] = Recorder) -> None:
        self.make = make
        self.made: list[Recorder] = []
        self._queue: asyncio.Queue[Recorder] = asyncio.Queue()
        self._connected = asyncio.Event()

    def __call__(self) -> Recorder:
        proto = self.make()
        self.made.append(proto)
        self._queue.put_nowait(proto)
        proto.made.add_done_callback(lambda _: self._connected.set())
        return proto

    async def for_peer(self, peer: socket.socket) -> Recorder:
        """The connected protocol whose transport's peer is ``peer`` (accept side, with
        several connections being accepted at once)."""
        name = peer.getsockname()

        async def find() -> Recorder:
            while True:
                for proto in self.made:
                    if proto.made.done() and proto.transport.get_extra_info("peername") == name:
                        return proto
                self._connected.clear()
                await self._connected.wait()

        return await asyncio.wait_for(find(), TIMEOUT)

    async def next(self) -> Recorder:
        """The next protocol made, once its ``connection_made`` ran."""
        proto = await asyncio.wait_for(self._queue.get(), TIMEOUT)
        await asyncio.wait_for(asyncio.shield(proto.made), TIMEOUT)
        return proto


# --- the two implementations -----------------------------------------------------------


@dataclass
class Impl:
    """One implementation of the transports under test."""

    name: str
    loop: asyncio.AbstractEventLoop
    edge: Any  # the EdgeLoop (edge), None (loop)

    async def serve(self, factory: Callable[[], Any], sock: socket.socket) -> Any:
        """Accept on the listening ``sock`` (the server owns it from here on)."""
        if self.edge is not None:
            return edgeio.EdgeServer(self.edge, factory, [sock])
        return await self.loop.create_server(factory, sock=sock)

    async def connect(self, factory: Callable[[], Any], host: str, port: int) -> Any:
        """``(transport, protocol)`` connected to ``host``:``port``."""
        if self.edge is not None:
            return await edgeio.open_connection(self.edge, factory, host, port)
        return await self.loop.create_connection(factory, host, port)


@pytest.fixture(params=[pytest.param("edge", marks=needs_edge), "loop"])
async def impl(request: pytest.FixtureRequest) -> AsyncIterator[Impl]:
    """Every contract test runs on both implementations."""
    loop = asyncio.get_running_loop()
    edge = edgeio.EdgeLoop(loop) if request.param == "edge" else None
    try:
        impl = Impl(str(request.param), loop, edge)
        await warm_up(impl)
        yield impl
    finally:
        if edge is not None:
            edge.close()


async def warm_up(impl: Impl) -> None:
    """One accepted, one opened and one refused connection: uvloop opens a descriptor
    or two of its own the first time (libuv's spare /dev/null for EMFILE), which
    descriptor counts taken later must not mistake for a leak."""
    for side in SIDES:
        async with open_pair(impl, side=side) as pair:
            pair.transport.close()
            await pair.proto.wait_lost()
    with contextlib.suppress(ConnectionRefusedError):
        await asyncio.wait_for(impl.connect(Factory(), "127.0.0.1", free_port()), TIMEOUT)


@pytest.fixture
async def edge_impl() -> AsyncIterator[Impl]:
    """The edge implementation alone (for deliberate differences and edge-only checks)."""
    if edgeio is None:
        # Only where the build has no edgeio (FASTEDGE_NO_EXTENSIONS, not Linux): then the
        # proxy runs on the loop's transports and the "loop" half still runs every test.
        pytest.skip("fastedge._core.edgeio is not built")
    loop = asyncio.get_running_loop()
    edge = edgeio.EdgeLoop(loop)
    try:
        yield Impl("edge", loop, edge)
    finally:
        edge.close()


SIDES = ["accept", "connect"]


@dataclass
class Pair:
    """A transport under test and the plain socket at the other end of its connection."""

    transport: Any
    proto: Recorder
    peer: socket.socket
    server: Any  # the impl's server (accept side), None (connect side)
    factory: Factory


def shrink_send_buffer(transport: Any) -> None:
    """A small kernel send buffer, so the transport's own buffer fills up soon."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


@contextlib.asynccontextmanager
async def open_pair(
    impl: Impl,
    *,
    side: str = "accept",
    host: str = "127.0.0.1",
    make: Callable[[], Recorder] = Recorder,
    small_buffers: bool = False,
) -> AsyncIterator[Pair]:
    """A connection between a transport of ``impl`` and a plain socket: accepted by the
    impl's server (``accept``) or opened by the impl (``connect``). ``small_buffers``
    shrinks the kernel buffers on both ends so writes get buffered by the transport.
    Everything is closed at the end (the transport aborted if still open)."""
    loop = impl.loop
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    factory = Factory(make)
    listener = socket.socket(family, socket.SOCK_STREAM)
    peer: socket.socket | None = None
    server: Any = None
    try:
        listener.bind((host, 0))
        listener.setblocking(False)
        if small_buffers and side == "connect":
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited
        listener.listen()
        addr = listener.getsockname()
        if side == "accept":
            server = await impl.serve(factory, listener)
            peer = socket.socket(family, socket.SOCK_STREAM)
            peer.setblocking(False)
            if small_buffers:
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await asyncio.wait_for(loop.sock_connect(peer, addr[:2]), TIMEOUT)
            proto = await factory.next()
            transport = proto.transport
        else:
            (transport, _), (peer, _) = await asyncio.wait_for(
                asyncio.gather(impl.connect(factory, host, addr[1]), loop.sock_accept(listener)),
                TIMEOUT,
            )
            peer.setblocking(False)
            proto = await factory.next()
            assert proto.transport is transport
        if small_buffers:
            shrink_send_buffer(transport)
        yield Pair(transport, proto, peer, server, factory)
    finally:
        for p in factory.made:
            # A protocol replaced with set_protocol hears nothing more: not waited for.
            if p.made.done() and not p.lost.done() and p.transport.get_protocol() is p:
                p.transport.abort()
                await p.wait_lost()
        if peer is not None:
            peer.close()
        if server is not None:
            server.close()
        listener.close()


async def recv_exactly(sock: socket.socket, n: int, timeout: float = TIMEOUT) -> bytes:
    """Read exactly ``n`` bytes from the peer socket (fails on EOF first)."""
    loop = asyncio.get_running_loop()
    out = bytearray()

    async def run() -> None:
        while len(out) < n:
            data = await loop.sock_recv(sock, min(n - len(out), 256 * KIB))
            assert data, f"EOF after {len(out)} of {n} bytes"
            out.extend(data)

    await asyncio.wait_for(run(), timeout)
    return bytes(out)


async def recv_until_eof(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything the peer socket reads up to EOF."""
    loop = asyncio.get_running_loop()
    out = bytearray()

    async def run() -> None:
        while data := await loop.sock_recv(sock, 256 * KIB):
            out.extend(data)

    await asyncio.wait_for(run(), timeout)
    return bytes(out)


async def connection_ends(sock: socket.socket, timeout: float = TIMEOUT) -> None:
    """Wait until the peer socket sees the connection end (EOF or reset)."""
    loop = asyncio.get_running_loop()

    async def run() -> None:
        with contextlib.suppress(ConnectionResetError):
            while await loop.sock_recv(sock, 256 * KIB):
                pass

    await asyncio.wait_for(run(), timeout)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def iterations(n: int = 5) -> None:
    """Let the loop run ``n`` iterations (for checks that something did NOT happen)."""
    for _ in range(n):
        await asyncio.sleep(0)


# --- 1. accept, connect, addresses -----------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
async def test_accept_calls_factory_once_per_connection_with_addresses(
    impl: Impl, host: str
) -> None:
    """Three clients: three protocols, each told about its own transport once; the
    transport's peername/sockname are the client socket's sockname/peername (IPv4 and
    IPv6 tuples as the socket module spells them); unknown keys give the default."""
    loop = impl.loop
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    factory = Factory()
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    server = await impl.serve(factory, listener)
    peers: list[socket.socket] = []
    try:
        for _ in range(3):
            peer = socket.socket(family, socket.SOCK_STREAM)
            peer.setblocking(False)
            peers.append(peer)
            await asyncio.wait_for(loop.sock_connect(peer, listener.getsockname()[:2]), TIMEOUT)
            await factory.next()
        await iterations()
        assert len(factory.made) == 3
        transports_seen = [p.transport for p in factory.made]
        assert len({id(t) for t in transports_seen}) == 3
        by_port = {
            t.get_extra_info("peername")[1]: (p, t)
            for p, t in zip(factory.made, transports_seen, strict=True)
        }
        for peer in peers:
            proto, t = by_port[peer.getsockname()[1]]
            assert proto.calls == ["connection_made"]
            assert t.get_protocol() is proto
            assert t.get_extra_info("peername") == peer.getsockname()
            assert t.get_extra_info("sockname") == peer.getpeername()
            assert t.get_extra_info("no-such-key") is None
            marker = object()
            assert t.get_extra_info("no-such-key", marker) is marker
            assert not t.is_closing()
            assert t.is_reading()
    finally:
        for p in factory.made:
            p.transport.abort()
            await p.wait_lost()
        for peer in peers:
            peer.close()
        server.close()


@pytest.mark.parametrize("host", HOSTS)
async def test_connect_side_addresses(impl: Impl, host: str) -> None:
    """An outgoing connection: connection_made once with the returned transport, which
    reports the accepted socket's addresses the other way round."""
    async with open_pair(impl, side="connect", host=host) as pair:
        t = pair.transport
        assert pair.proto.calls == ["connection_made"]
        assert len(pair.factory.made) == 1
        assert t.get_protocol() is pair.proto
        assert t.get_extra_info("peername") == pair.peer.getsockname()
        assert t.get_extra_info("sockname") == pair.peer.getpeername()
        assert t.get_extra_info("nope", 42) == 42


# --- 2. data integrity -----------------------------------------------------------------


def _as_kind(data: bytes, kind: int) -> bytes | bytearray | memoryview:
    if kind == 0:
        return data
    if kind == 1:
        return bytearray(data)
    return memoryview(b"--" + data + b"--")[2:-2]


@pytest.mark.parametrize("side", SIDES)
async def test_data_integrity_both_directions(impl: Impl, side: str) -> None:
    """4 MiB each way at once, in writes of random sizes as bytes, bytearray (changed
    right after the write: the transport must have copied it) and memoryview: both ends
    receive exactly what was sent, in order. write(b"") is a no-op and write(str) a
    TypeError."""
    rng = random.Random(f"integrity-{side}")
    loop = impl.loop
    async with open_pair(impl, side=side) as pair:
        t = pair.transport
        out = rng.randbytes(4 * MIB)
        back = rng.randbytes(4 * MIB)

        async def write_all() -> None:
            pos = 0
            while pos < len(out):
                n = rng.randint(1, 96 * KIB)
                kind = rng.randrange(3)
                data = _as_kind(out[pos : pos + n], kind)
                t.write(data)
                if isinstance(data, bytearray):
                    data[:] = b"\xff" * len(data)
                pos += n
                if rng.random() < 0.3:
                    await asyncio.sleep(0)

        async def peer_sends() -> None:
            pos = 0
            while pos < len(back):
                n = rng.randint(1, 128 * KIB)
                await loop.sock_sendall(pair.peer, back[pos : pos + n])
                pos += n

        received_by_peer, _, _ = await asyncio.gather(
            recv_exactly(pair.peer, len(out)), write_all(), peer_sends()
        )
        assert received_by_peer == out
        assert await pair.proto.wait_bytes(len(back)) == back
        size = t.get_write_buffer_size()
        t.write(b"")
        assert t.get_write_buffer_size() == size
        with pytest.raises(TypeError):
            t.write("text")  # type: ignore[arg-type]
        t.write(b"end")
        assert await recv_exactly(pair.peer, 3) == b"end"
        assert "connection_lost" not in pair.proto.calls


# --- 3. flow control -------------------------------------------------------------------


async def test_flow_control_pause_and_resume_writing(impl: Impl) -> None:
    """A peer that does not read: the buffer grows, pause_writing is called once, when
    the buffer first exceeds the high-water mark, and not again however much more is
    written; once the peer reads, resume_writing is called once, with the buffer at or
    below the low-water mark; the buffer ends empty."""
    async with open_pair(impl, small_buffers=True) as pair:
        t, proto = pair.transport, pair.proto
        t.set_write_buffer_limits(high=64 * KIB, low=16 * KIB)  # asyncio's defaults
        chunk = b"f" * (8 * KIB)
        written = 0
        for _ in range(4096):  # 32 MiB at most: far more than any kernel buffer
            t.write(chunk)
            written += len(chunk)
            if proto.paused.done():
                break
        assert proto.count("pause_writing") == 1
        assert proto.size_at_pause > 64 * KIB
        assert proto.size_at_pause - len(chunk) <= 64 * KIB  # paused on the crossing write
        for _ in range(10):
            t.write(chunk)
            written += len(chunk)
        await iterations()
        assert t.get_write_buffer_size() >= proto.size_at_pause + 10 * len(chunk) - 64 * KIB
        assert proto.count("pause_writing") == 1
        assert proto.count("resume_writing") == 0
        data = await recv_exactly(pair.peer, written)
        assert data == b"f" * written
        await asyncio.wait_for(asyncio.shield(proto.resumed), TIMEOUT)
        assert proto.count("resume_writing") == 1
        assert 0 <= proto.size_at_resume <= 16 * KIB
        assert t.get_write_buffer_size() == 0
        assert proto.calls.index("pause_writing") < proto.calls.index("resume_writing")


async def test_write_buffer_limits_round_trip(impl: Impl) -> None:
    """set_write_buffer_limits/get_write_buffer_limits as asyncio: (low, high), a missing
    bound derived from the other (low = high // 4, high = 4 * low), defaults restored
    with no arguments, ValueError when high < low or low < 0 (limits left unchanged)."""
    async with open_pair(impl) as pair:
        t = pair.transport
        assert t.get_write_buffer_limits()[1] == 64 * KIB
        t.set_write_buffer_limits(high=1000, low=100)
        assert t.get_write_buffer_limits() == (100, 1000)
        t.set_write_buffer_limits(high=1000)
        assert t.get_write_buffer_limits() == (250, 1000)
        t.set_write_buffer_limits(low=300)
        assert t.get_write_buffer_limits() == (300, 1200)
        t.set_write_buffer_limits(high=0, low=0)
        assert t.get_write_buffer_limits() == (0, 0)
        t.set_write_buffer_limits()
        assert t.get_write_buffer_limits() == (16 * KIB, 64 * KIB)
        t.set_write_buffer_limits(high=2000, low=500)
        with pytest.raises(ValueError):
            t.set_write_buffer_limits(high=10, low=20)
        with pytest.raises(ValueError):
            t.set_write_buffer_limits(high=10, low=-1)
        assert t.get_write_buffer_limits() == (500, 2000)


async def test_default_write_buffer_limits(edge_impl: Impl) -> None:
    """Edge only: a new transport starts at asyncio's limits, 16 KiB / 64 KiB (as
    selector_events). uvloop differs here: its TCP transports report a low-water mark of
    16 bytes until set_write_buffer_limits is called, so the low default is not a
    shared contract (the high one, 64 KiB, is checked on both above)."""
    async with open_pair(edge_impl) as pair:
        assert pair.transport.get_write_buffer_limits() == (16 * KIB, 64 * KIB)


async def test_lowering_high_water_below_buffer_pauses(impl: Impl) -> None:
    """Lowering the high-water mark below what is buffered pauses the protocol at once
    (asyncio calls _maybe_pause_protocol from set_write_buffer_limits)."""
    async with open_pair(impl, small_buffers=True) as pair:
        t, proto = pair.transport, pair.proto
        t.set_write_buffer_limits(high=4 * MIB)
        written = 0
        while t.get_write_buffer_size() < 100 * KIB and written < 32 * MIB:
            t.write(b"g" * (16 * KIB))
            written += 16 * KIB
        assert proto.count("pause_writing") == 0
        t.set_write_buffer_limits(high=50 * KIB)
        assert proto.count("pause_writing") == 1
        assert await recv_exactly(pair.peer, written) == b"g" * written
        await asyncio.wait_for(asyncio.shield(proto.resumed), TIMEOUT)
        assert proto.count("resume_writing") == 1


# --- 4. close --------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_close_flushes_then_closes(impl: Impl, side: str) -> None:
    """close() with megabytes buffered: the peer receives every byte, then EOF;
    connection_lost(None) is called once, after close() returned (a later loop
    iteration), and is_closing() is true from close() on. A second close() is a no-op."""
    async with open_pair(impl, side=side, small_buffers=True) as pair:
        t, proto = pair.transport, pair.proto
        payload = random.Random(7).randbytes(2 * MIB)
        t.write(payload)
        assert t.get_write_buffer_size() > 0  # the peer has not read: some is buffered
        proto.closing_now = True
        t.close()
        proto.closing_now = False
        assert t.is_closing()
        assert "connection_lost" not in proto.calls
        assert await recv_until_eof(pair.peer) == payload
        await proto.wait_lost()
        t.close()
        await iterations()
        assert proto.lost_with == [None]
        assert proto.count("connection_lost") == 1
        assert not proto.lost_inside_close
        assert t.get_write_buffer_size() == 0


@pytest.mark.parametrize("side", SIDES)
async def test_close_idle_calls_connection_lost_later(impl: Impl, side: str) -> None:
    """close() with nothing buffered: connection_lost is still not called inside
    close() (the protocol may not expect re-entry), but soon after, once; the peer sees
    EOF."""
    async with open_pair(impl, side=side) as pair:
        t, proto = pair.transport, pair.proto
        proto.closing_now = True
        t.close()
        proto.closing_now = False
        assert proto.calls == ["connection_made"]
        assert t.is_closing()
        assert not t.is_reading()
        assert await recv_until_eof(pair.peer) == b""
        await proto.wait_lost()
        await iterations()
        assert proto.calls == ["connection_made", "connection_lost"]
        assert proto.lost_with == [None]


async def test_write_after_connection_lost_is_dropped(edge_impl: Impl) -> None:
    """Edge only: after connection_lost a write is silently dropped, as asyncio's own
    selector transports do (they count and eventually log). uvloop differs on purpose
    here: once its handle is closed every method raises RuntimeError ("unable to perform
    operation ... the handler is closed"), so this is not a shared contract."""
    async with open_pair(edge_impl) as pair:
        t, proto = pair.transport, pair.proto
        t.close()
        await proto.wait_lost()
        t.write(b"dropped")
        t.write(bytearray(b"dropped too"))
        assert t.get_write_buffer_size() == 0
        assert await recv_until_eof(pair.peer) == b""
        assert proto.count("connection_lost") == 1


# --- 5. abort --------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_abort(impl: Impl, side: str) -> None:
    """abort() with data buffered: connection_lost once (not inside abort), the buffer is
    dropped, the peer sees the connection end."""
    async with open_pair(impl, side=side, small_buffers=True) as pair:
        t, proto = pair.transport, pair.proto
        t.write(b"a" * MIB)
        assert t.get_write_buffer_size() > 0
        proto.closing_now = True
        t.abort()
        proto.closing_now = False
        assert t.is_closing()
        assert not proto.lost_inside_close
        await connection_ends(pair.peer)
        await proto.wait_lost()
        t.abort()
        t.close()
        await iterations()
        assert proto.count("connection_lost") == 1
        assert proto.lost_with == [None]
        assert t.get_write_buffer_size() == 0


# --- 6. peer half-close ----------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("answer", [None, False])
async def test_peer_eof_closes_when_eof_received_is_falsy(
    impl: Impl, side: str, answer: bool | None
) -> None:
    """The peer shuts down its write side: data first, then eof_received once; a false
    answer closes the transport (the peer sees EOF) and connection_lost(None) follows."""
    async with open_pair(impl, side=side, make=lambda: Recorder(eof_answer=answer)) as pair:
        proto = pair.proto
        await impl.loop.sock_sendall(pair.peer, b"last words")
        pair.peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(asyncio.shield(proto.eof), TIMEOUT)
        assert bytes(proto.received) == b"last words"
        await proto.wait_lost()
        assert await recv_until_eof(pair.peer) == b""
        assert proto.calls == [
            "connection_made",
            "data_received",
            "eof_received",
            "connection_lost",
        ]
        assert proto.lost_with == [None]


@pytest.mark.parametrize("side", SIDES)
async def test_peer_eof_keeps_open_when_eof_received_is_true(impl: Impl, side: str) -> None:
    """eof_received returning True keeps the transport open for writing: a reply
    written after the peer's EOF reaches the peer, then close() ends the connection."""
    async with open_pair(impl, side=side, make=lambda: Recorder(eof_answer=True)) as pair:
        t, proto = pair.transport, pair.proto
        pair.peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(asyncio.shield(proto.eof), TIMEOUT)
        await iterations()
        assert not t.is_closing()
        assert "connection_lost" not in proto.calls
        reply = b"r" * (300 * KIB)
        t.write(reply)
        t.close()
        assert await recv_until_eof(pair.peer) == reply
        await proto.wait_lost()
        assert proto.calls == ["connection_made", "eof_received", "connection_lost"]
        assert proto.lost_with == [None]


# --- 7. peer reset ---------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("busy", [False, True], ids=["idle", "writing"])
async def test_peer_reset(impl: Impl, side: str, busy: bool) -> None:
    """The peer closes with an RST (idle, or while the transport has data buffered for
    it): connection_lost is called exactly once, with None or an OSError (both
    implementations report ConnectionResetError or similar)."""
    async with open_pair(impl, side=side, small_buffers=busy) as pair:
        t, proto = pair.transport, pair.proto
        if busy:
            t.write(b"b" * MIB)
            assert t.get_write_buffer_size() > 0
        reset(pair.peer)
        await proto.wait_lost()
        await iterations()
        assert proto.count("connection_lost") == 1
        exc = proto.lost_with[0]
        assert exc is None or isinstance(exc, OSError), repr(exc)
        assert t.is_closing()
        assert t.get_write_buffer_size() == 0


# --- 8. pause_reading / resume_reading -------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_pause_and_resume_reading(impl: Impl, side: str) -> None:
    """While paused no data_received is called, however much the peer sends; on resume
    everything arrives in order; is_reading() follows; pausing or resuming twice is
    harmless."""
    loop = impl.loop
    async with open_pair(impl, side=side) as pair:
        t, proto = pair.transport, pair.proto
        expected = bytearray()
        for round_ in range(2):
            t.pause_reading()
            t.pause_reading()
            assert not t.is_reading()
            for i in range(5):
                piece = bytes([65 + round_ * 5 + i]) * (1000 * (i + 1))
                expected += piece
                await loop.sock_sendall(pair.peer, piece)
                await asyncio.sleep(0.01)  # time for the loop to (not) deliver it
            assert len(proto.received) == len(expected) - sum(1000 * (i + 1) for i in range(5))
            t.resume_reading()
            t.resume_reading()
            assert t.is_reading()
            assert await proto.wait_bytes(len(expected)) == bytes(expected)
        await iterations()
        assert bytes(proto.received) == bytes(expected)
        assert "connection_lost" not in proto.calls


@pytest.mark.parametrize("unread", [b"", b"unread"], ids=["idle", "with-unread-data"])
async def test_paused_transport_sees_peer_reset(edge_impl: Impl, unread: bytes) -> None:
    """Edge only: a paused transport whose peer resets still gets connection_lost (epoll
    reports the error whatever the registered events), also when the peer sent data the
    paused transport has not read (the usual back-pressure case), without spinning:
    little CPU is used while the loop waits. uvloop stops polling a paused stream, so it
    only notices after resume_reading: not a shared contract."""
    async with open_pair(edge_impl) as pair:
        t, proto = pair.transport, pair.proto
        t.pause_reading()
        if unread:
            await edge_impl.loop.sock_sendall(pair.peer, unread)
            await asyncio.sleep(0.05)  # the loop sees the data while paused
        else:
            await iterations()
        assert proto.calls == ["connection_made"]
        reset(pair.peer)
        cpu = time.process_time()
        await asyncio.sleep(0.3)
        assert time.process_time() - cpu < 0.2
        await proto.wait_lost(timeout=1)
        assert proto.count("connection_lost") == 1
        assert isinstance(proto.lost_with[0], OSError)


# --- 9. write_eof ----------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
async def test_write_eof(impl: Impl, side: str) -> None:
    """write_eof() with data buffered: the peer reads every byte, then EOF; writing
    afterwards raises RuntimeError; the transport still reads what the peer sends."""
    async with open_pair(impl, side=side, small_buffers=True) as pair:
        t, proto = pair.transport, pair.proto
        assert t.can_write_eof() is True
        payload = random.Random(9).randbytes(MIB)
        t.write(payload)
        assert t.get_write_buffer_size() > 0
        t.write_eof()
        with pytest.raises(RuntimeError):
            t.write(b"x")
        assert await recv_until_eof(pair.peer) == payload
        await impl.loop.sock_sendall(pair.peer, b"still listening")
        assert await proto.wait_bytes(15) == b"still listening"
        assert not t.is_closing()
        t.close()
        await proto.wait_lost()
        assert proto.lost_with == [None]


async def test_empty_write_after_write_eof_raises(edge_impl: Impl) -> None:
    """Edge against the reference: uvloop (and asyncio's selector transports) raise
    RuntimeError for any write after write_eof(), even an empty one."""
    async with open_pair(edge_impl) as pair:
        pair.transport.write_eof()
        with pytest.raises(RuntimeError):
            pair.transport.write(b"")


async def test_empty_write_after_write_eof_raises_on_loop() -> None:
    """The reference behaviour the test above holds edge to (uvloop raises)."""
    loop = asyncio.get_running_loop()
    async with open_pair(Impl("loop", loop, None)) as pair:
        pair.transport.write_eof()
        with pytest.raises(RuntimeError):
            pair.transport.write(b"")


# --- 10. exceptions in protocol callbacks ----------------------------------------------


class Exploding(Recorder):
    """data_received raises (a bug in the protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.error = RuntimeError("protocol bug")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        raise self.error


async def test_exception_in_data_received(impl: Impl) -> None:
    """An exception escaping data_received goes to the loop's exception handler (with
    the exception), the transport closes, connection_lost is called once, with it."""
    loop = impl.loop
    with exception_contexts(loop) as contexts:
        async with open_pair(impl, make=Exploding) as pair:
            t, proto = pair.transport, pair.proto
            assert isinstance(proto, Exploding)
            await loop.sock_sendall(pair.peer, b"boom")
            await proto.wait_lost()
            assert t.is_closing()
            await connection_ends(pair.peer)
            await iterations()
            assert proto.count("data_received") == 1
            assert proto.count("connection_lost") == 1
            assert proto.lost_with == [proto.error]
            assert [c.get("exception") for c in contexts] == [proto.error]
            assert contexts[0].get("protocol", proto) is proto


class ExplodingEof(Recorder):
    """eof_received raises."""

    def __init__(self) -> None:
        super().__init__()
        self.error = ValueError("eof bug")

    def eof_received(self) -> bool | None:
        super().eof_received()
        raise self.error


class ExplodingMade(Recorder):
    """connection_made raises."""

    def __init__(self) -> None:
        super().__init__()
        self.error = ValueError("made bug")

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        raise self.error


@contextlib.contextmanager
def exception_contexts(loop: asyncio.AbstractEventLoop) -> Iterator[list[dict[str, Any]]]:
    """The contexts the loop's exception handler gets meanwhile (restored after)."""
    contexts: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: contexts.append(context))
    try:
        yield contexts
    finally:
        loop.set_exception_handler(previous)


async def test_exception_in_eof_received(impl: Impl) -> None:
    """An exception escaping eof_received: reported to the loop's exception handler,
    the connection closes (the peer sees EOF), connection_lost once, with it."""
    with exception_contexts(impl.loop) as contexts:
        async with open_pair(impl, make=ExplodingEof) as pair:
            proto = pair.proto
            assert isinstance(proto, ExplodingEof)
            pair.peer.shutdown(socket.SHUT_WR)
            await proto.wait_lost()
            await connection_ends(pair.peer)
            await iterations()
            assert proto.calls == ["connection_made", "eof_received", "connection_lost"]
            assert proto.lost_with == [proto.error]
            assert [c.get("exception") for c in contexts] == [proto.error]


async def test_exception_in_connection_made_aborts(edge_impl: Impl) -> None:
    """Edge only: an exception escaping connection_made is reported and aborts the
    connection (the peer sees it end; connection_lost follows with the exception), as
    for every other protocol callback. uvloop deliberately differs: it reports the
    exception as a failed callback and leaves the transport open (asyncio's selector
    transports do the same), so there is no shared contract here."""
    with exception_contexts(edge_impl.loop) as contexts:
        async with open_pair(edge_impl, make=ExplodingMade) as pair:
            proto = pair.proto
            assert isinstance(proto, ExplodingMade)
            await proto.wait_lost()
            await connection_ends(pair.peer)
            assert proto.calls == ["connection_made", "connection_lost"]
            assert proto.lost_with == [proto.error]
            assert [c.get("exception") for c in contexts] == [proto.error]


@pytest.mark.parametrize("side", SIDES)
async def test_nodelay_and_socket_extra_info(impl: Impl, side: str) -> None:
    """Both set TCP_NODELAY on their TCP connections (a proxy must not add Nagle
    delays); get_extra_info("socket") gives a socket-like object on the connection."""
    async with open_pair(impl, side=side) as pair:
        sock = pair.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getpeername() == pair.peer.getsockname()
        assert sock.family == pair.peer.family


async def test_writelines(impl: Impl) -> None:
    """writelines sends the pieces (bytes, bytearray, memoryview) in order."""
    async with open_pair(impl) as pair:
        pair.transport.writelines([b"ab", bytearray(b"cd"), memoryview(b"ef")])
        pair.transport.writelines([])
        assert await recv_exactly(pair.peer, 6) == b"abcdef"


# --- 11. set_protocol ------------------------------------------------------------------


async def test_set_protocol_switches_receiver(impl: Impl) -> None:
    """After set_protocol(new) the new protocol gets the data, the EOF and
    connection_lost; the old one hears nothing more."""
    async with open_pair(impl) as pair:
        t, old = pair.transport, pair.proto
        await impl.loop.sock_sendall(pair.peer, b"for old")
        await old.wait_bytes(7)
        new = Recorder()
        t.set_protocol(new)
        assert t.get_protocol() is new
        await impl.loop.sock_sendall(pair.peer, b"for new")
        assert await new.wait_bytes(7) == b"for new"
        pair.peer.shutdown(socket.SHUT_WR)
        await new.wait_lost()
        assert new.calls == ["data_received", "eof_received", "connection_lost"]
        assert old.calls == ["connection_made", "data_received"]
        assert bytes(old.received) == b"for old"


# --- 12. connecting --------------------------------------------------------------------


async def test_connect_refused(impl: Impl) -> None:
    """A port nothing listens on: ConnectionRefusedError, no descriptor left behind, no
    protocol method called."""
    port = free_port()
    factory = Factory()
    before = baseline_fd_count()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(impl.connect(factory, "127.0.0.1", port), TIMEOUT)
    await iterations()
    assert await settled_fd_count(before) == before
    assert all(p.calls == [] for p in factory.made)


async def test_cancelled_connect_leaks_nothing(impl: Impl) -> None:
    """A connect cancelled right after it started (a connect timeout firing): the
    CancelledError propagates, the socket is closed (no descriptor left) and no protocol
    method is ever called, even after the kernel completed the handshake."""
    loop = impl.loop
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    factory = Factory()
    try:
        before = baseline_fd_count()
        for _ in range(20):
            task = loop.create_task(impl.connect(factory, "127.0.0.1", port))
            await asyncio.sleep(0)  # the task runs its first step: the connect is under way
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.05)  # let any late connect event arrive
        assert await settled_fd_count(before) == before
        assert all(p.calls == [] for p in factory.made)
    finally:
        listener.close()


async def test_connect_cancelled_after_connection_made_ends_with_connection_lost(
    edge_impl: Impl,
) -> None:
    """Edge only: the connect completes (connection_made runs) and the connecting task is
    cancelled before it resumes (a connect timeout firing in that same loop pass). The
    connection is closed as any other: the protocol that saw connection_made hears
    connection_lost once, and no descriptor is left. (uvloop leaves such a protocol
    without connection_lost.)"""
    loop = edge_impl.loop
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    tasks: list[asyncio.Task[Any]] = []

    class CancelOnMade(Recorder):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            tasks[0].cancel()  # before the waiter's result reaches the task

    factory = Factory(CancelOnMade)
    try:
        before = baseline_fd_count()
        tasks.append(loop.create_task(edge_impl.connect(factory, "127.0.0.1", port)))
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        (proto,) = factory.made
        await proto.wait_lost()
        assert proto.calls == ["connection_made", "connection_lost"]
        assert proto.lost_with == [None]
        assert await settled_fd_count(before) == before
    finally:
        listener.close()


# --- 13. descriptor hygiene ------------------------------------------------------------


async def test_many_connections_leave_no_descriptors(impl: Impl) -> None:
    """200 connections, 20 at a time, ended by close(), abort(), the peer's FIN or the
    peer's RST: every protocol gets connection_lost once, and afterwards the process has
    the descriptors it had before (and, edge, the epoll set only the listener)."""
    loop = impl.loop
    factory = Factory()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    addr = listener.getsockname()
    server = await impl.serve(factory, listener)
    try:
        await iterations()
        before = baseline_fd_count()
        base = impl.edge.connections if impl.edge is not None else 0
        if impl.edge is not None:
            assert base >= 1  # the listener

        async def one(i: int) -> Recorder:
            peer = socket.socket()
            peer.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(peer, addr), TIMEOUT)
                await loop.sock_sendall(peer, b"hello %d" % i)
                proto = await factory.for_peer(peer)
                await proto.wait_bytes(1)
                how = i % 4
                if how == 0:
                    proto.transport.close()
                elif how == 1:
                    proto.transport.abort()
                elif how == 2:
                    peer.shutdown(socket.SHUT_WR)
                else:
                    reset(peer)
                await proto.wait_lost()
                if how != 3:
                    await connection_ends(peer)
                return proto
            finally:
                peer.close()

        protos: list[Recorder] = []
        for batch in range(10):
            protos += await asyncio.gather(*(one(batch * 20 + k) for k in range(20)))
        await iterations()
        assert len(factory.made) == 200
        assert all(p.count("connection_lost") == 1 for p in factory.made)
        assert await settled_fd_count(before) == before
        if impl.edge is not None:
            assert impl.edge.connections == base
    finally:
        server.close()


# --- 14. server close ------------------------------------------------------------------


async def test_server_close(impl: Impl) -> None:
    """Closing the server: it stops serving, the listening socket is closed (new
    connects are refused, its descriptor is gone) while an accepted connection keeps
    working both ways until it is closed itself."""
    loop = impl.loop
    base = baseline_fd_count()
    async with open_pair(impl) as pair:
        server, t, proto = pair.server, pair.transport, pair.proto
        addr = t.get_extra_info("sockname")  # before counting: edge may dup the socket
        listening = baseline_fd_count()
        assert server.is_serving()
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        assert await settled_fd_count(listening - 1) == listening - 1
        with pytest.raises(ConnectionRefusedError):
            c = socket.socket()
            try:
                c.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(c, addr), TIMEOUT)
            finally:
                c.close()
        t.write(b"still here")
        assert await recv_exactly(pair.peer, 10) == b"still here"
        await loop.sock_sendall(pair.peer, b"me too")
        assert await proto.wait_bytes(6) == b"me too"
        t.close()
        await proto.wait_lost()
        assert await recv_until_eof(pair.peer) == b""
    assert await settled_fd_count(base) == base


# --- 15. fastedge.transports -----------------------------------------------------------


def test_use_edge_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    """loop and TLS never use edge; auto follows availability; edge where it cannot run
    is a RuntimeError (said at start, not silently ignored)."""
    assert transports.use_edge("loop", tls=False) is False
    assert transports.use_edge("loop", tls=True) is False
    assert transports.use_edge("auto", tls=True) is False
    assert transports.use_edge("edge", tls=True) is False
    assert transports.use_edge("auto", tls=False) == transports.edge_available()
    monkeypatch.setattr(transports, "_edgeio", None)
    assert transports.edge_available() is False
    assert transports.use_edge("auto", tls=False) is False
    assert transports.use_edge("loop", tls=False) is False
    with pytest.raises(RuntimeError, match=r"server\.io = 'edge'"):
        transports.use_edge("edge", tls=False)


@needs_edge
def test_use_edge_when_available() -> None:
    """With the compiled core, edge and auto on plain TCP pick fastedge's transports."""
    assert transports.use_edge("edge", tls=False) is True
    assert transports.use_edge("auto", tls=False) is True


@pytest.fixture
def fresh_edges(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, Any]]:
    """An empty registry of epoll sets for this test (closed at the end)."""
    edges: dict[int, Any] = {}
    monkeypatch.setattr(transports, "_edges", edges)
    yield edges
    for edge in edges.values():
        edge.close()


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _round_trip(host: str, port: int, *, edge: bool = False) -> str:
    """Connect with transports.create_connection, exchange a message; the transport's
    type name."""
    factory = Factory()
    t, proto = await asyncio.wait_for(
        transports.create_connection(factory, host, port, edge=edge), TIMEOUT
    )
    try:
        t.write(b"ping")
        assert await proto.wait_bytes(4) == b"ping"
        await proto.wait_lost()
    finally:
        t.close()
    return type(t).__name__


async def test_create_connection_without_edge_loop_uses_loop(
    fresh_edges: dict[int, Any],
) -> None:
    """Without ``edge`` (server.io = "loop"), create_connection is the loop's, even
    where an epoll set already serves this loop."""
    server, port = await _echo_server()
    try:
        assert transports.edge_loop(asyncio.get_running_loop()) is None
        name = await _round_trip("127.0.0.1", port)
        assert name != "EdgeTransport"
        assert fresh_edges == {}
        if transports.edge_available():
            transports.edge_loop(asyncio.get_running_loop(), create=True)
            assert await _round_trip("127.0.0.1", port) != "EdgeTransport"
    finally:
        server.close()


@needs_edge
async def test_create_connection_through_edge_loop(fresh_edges: dict[int, Any]) -> None:
    """With ``edge``: a numeric address goes through the loop's epoll set (made on first
    use: an EdgeTransport); a host name goes to loop.create_connection (the loop
    resolves it) and still works."""
    loop = asyncio.get_running_loop()
    server, port = await _echo_server()
    try:
        assert transports.edge_loop(loop) is None
        assert await _round_trip("127.0.0.1", port, edge=True) == "EdgeTransport"
        edge = transports.edge_loop(loop)
        assert edge is not None and edge.loop is loop
        assert transports.edge_loop(loop, create=True) is edge
        assert await _round_trip("localhost", port, edge=True) != "EdgeTransport"
        assert edge.connections == 0
    finally:
        server.close()


class _StaleEdge:
    """A registry entry left by a closed loop (uvloop's loops are keyed by id(), which a
    new loop can reuse)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def close(self) -> None:
        pass


@needs_edge
async def test_edge_loop_ignores_entries_of_closed_loops(fresh_edges: dict[int, Any]) -> None:
    """An entry under this loop's id that belongs to another (closed) loop is not this
    loop's epoll set: edge_loop() says None, edge_loop(create=True) makes a new one and
    drops every closed loop's entry."""
    loop = asyncio.get_running_loop()
    dead = uvloop.new_event_loop()
    dead.close()
    fresh_edges[id(loop)] = _StaleEdge(dead)
    fresh_edges[id(dead)] = _StaleEdge(dead)
    assert transports.edge_loop(loop) is None
    edge = transports.edge_loop(loop, create=True)
    assert edge is not None and type(edge).__name__ == "EdgeLoop"
    assert edge.loop is loop
    assert fresh_edges == {id(loop): edge}


@needs_edge
async def test_serve_edge_listens_and_owns_the_socket(fresh_edges: dict[int, Any]) -> None:
    """serve_edge on a bound socket that is not listening yet: it listens, accepts with
    EdgeTransports, and closing the server closes the socket."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    factory = Factory()
    server = transports.serve_edge(loop, factory, sock)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        r, w = await asyncio.open_connection(*sock.getsockname())
        proto = await factory.next()
        assert type(proto.transport).__name__ == "EdgeTransport"
        proto.transport.write(b"hi")
        assert await asyncio.wait_for(r.readexactly(2), TIMEOUT) == b"hi"
        w.close()
        await proto.wait_lost()
        await w.wait_closed()
    finally:
        server.close()
    assert sock.fileno() == -1


# --- 16. random operation sequences (Hypothesis) ---------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 48 * KIB), st.integers(0, 2)),
        st.tuples(st.just("pause"), st.just(0), st.just(0)),
        st.tuples(st.just("resume"), st.just(0), st.just(0)),
        st.tuples(st.just("peer_read"), st.integers(1, 64 * KIB), st.just(0)),
        st.tuples(st.just("peer_send"), st.integers(1, 16 * KIB), st.just(0)),
        st.tuples(st.just("yield"), st.just(0), st.just(0)),
    ),
    max_size=30,
)


async def _run_ops(name: str, ops: list[tuple[str, int, int]], seed: int) -> None:
    """Apply ``ops`` to a fresh connection of implementation ``name``, then drain and
    check both directions arrived whole and in order."""
    loop = asyncio.get_running_loop()
    edge = edgeio.EdgeLoop(loop) if name == "edge" else None
    try:
        impl = Impl(name, loop, edge)
        rng = random.Random(seed)
        async with open_pair(impl, small_buffers=True) as pair:
            t, proto, peer = pair.transport, pair.proto, pair.peer
            t.set_write_buffer_limits(high=16 * KIB)
            sent, got, peer_sent = bytearray(), bytearray(), bytearray()
            for op, size, kind in ops:
                if op == "write":
                    data = rng.randbytes(size)
                    t.write(_as_kind(data, kind))
                    sent += data
                elif op == "pause":
                    t.pause_reading()
                elif op == "resume":
                    t.resume_reading()
                elif op == "peer_read":
                    await asyncio.sleep(0)
                    with contextlib.suppress(BlockingIOError):
                        got += peer.recv(size)
                elif op == "peer_send":
                    data = rng.randbytes(size)
                    await asyncio.wait_for(loop.sock_sendall(peer, data), TIMEOUT)
                    peer_sent += data
                else:
                    await asyncio.sleep(0)
            t.resume_reading()
            got += await recv_exactly(peer, len(sent) - len(got))
            assert got == sent
            assert await proto.wait_bytes(len(peer_sent)) == bytes(peer_sent)
            assert t.get_write_buffer_size() == 0
            t.close()
            assert await recv_until_eof(peer) == b""
            await proto.wait_lost()
            assert proto.lost_with == [None]
            assert proto.count("pause_writing") == proto.count("resume_writing")
    finally:
        if edge is not None:
            edge.close()


@pytest.mark.parametrize("name", [pytest.param("edge", marks=needs_edge), "loop"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, seed=st.integers(0, 2**32 - 1))
def test_random_operation_sequences(name: str, ops: list[tuple[str, int, int]], seed: int) -> None:
    """Random interleavings of writes (bytes/bytearray/memoryview, random sizes),
    pause/resume reading, partial peer reads and peer sends: the peer receives exactly
    the concatenation of the writes, the protocol exactly what the peer sent, the write
    buffer ends empty and pause/resume_writing calls pair up."""
    run(_run_ops(name, ops, seed))


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on a fresh uvloop (Hypothesis examples are synchronous)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# --- 17. the proxy end to end ----------------------------------------------------------


async def _exchange(server: ProxyServer) -> tuple[list[tuple[int, bytes]], list[str]]:
    """A GET and a POST on one keep-alive connection: (status, body) of each, and the
    type names of the server's client-side transports while the connection is open."""
    client = await Client.open(server.port)
    try:
        answers = []
        await client.send(b"GET /bytes/200000 HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = await client.read_response()
        answers.append((resp.status, resp.body))
        body = random.Random(3).randbytes(300 * KIB)
        await client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        resp = await client.read_response(method=b"POST")
        answers.append((resp.status, resp.body))
        doc = json.loads(resp.body)
        assert doc["body_length"] == len(body)
        assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
        kinds = [type(conn.transport).__name__ for conn in server.connections]
        return answers, kinds
    finally:
        await client.close()


def _comparable(answers: list[tuple[int, bytes]]) -> list[tuple[int, Any]]:
    """The answers without the one thing that differs between two proxies: the request
    id the proxy adds to the request the origin echoes."""
    out: list[tuple[int, Any]] = []
    for status, body in answers:
        if body.startswith(b"{"):
            doc = json.loads(body)
            doc["headers"] = [h for h in doc["headers"] if h[0] != "x-request-id"]
            out.append((status, doc))
        else:
            out.append((status, body))
    return out


@needs_edge
async def test_proxy_answers_the_same_on_edge_and_loop(
    origin_port: int, fresh_edges: dict[int, Any]
) -> None:
    """The proxy with server.io = "edge" and with "loop" answers a GET and a POST alike;
    with edge its client connections really are EdgeTransports (and its upstream
    connection goes through the same epoll set), with loop they are not."""
    results = {}
    for mode in ("loop", "edge"):
        server = ProxyServer(gateway_config(origin_port, "auto", io=mode))
        await server.start()
        try:
            answers, kinds = await _exchange(server)
            results[mode] = answers
            if mode == "edge":
                assert kinds == ["EdgeTransport"]
                edge = transports.edge_loop(asyncio.get_running_loop())
                assert edge is not None
            else:
                assert len(kinds) == 1 and kinds[0] != "EdgeTransport"
        finally:
            await server.shutdown(drain_timeout=1)
    edge_answers, loop_answers = results["edge"], results["loop"]
    assert [s for s, _ in edge_answers] == [200, 200]
    assert len(edge_answers[0][1]) == 200000
    assert _comparable(edge_answers) == _comparable(loop_answers)


@needs_edge
async def test_proxy_upstream_goes_through_edge(
    origin_port: int, fresh_edges: dict[int, Any]
) -> None:
    """With server.io = "edge" the upstream connection to a numeric target is in the
    epoll set too: listener + client connection + pooled upstream connection."""
    server = ProxyServer(gateway_config(origin_port, "auto", io="edge"))
    await server.start()
    try:
        client = await Client.open(server.port)
        try:
            await client.send(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
            resp = await client.read_response()
            assert resp.status == 200
            assert len(resp.body) == 10
            edge = transports.edge_loop(asyncio.get_running_loop())
            assert edge is not None
            assert edge.connections == 3
        finally:
            await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


@needs_edge
async def test_listen_by_name_is_served_by_edge(
    origin_port: int, fresh_edges: dict[int, Any]
) -> None:
    """A listen host that is a name ("localhost") is resolved once at start-up and every
    address it names is served by the edge transports (not handed to the loop)."""
    server = ProxyServer(gateway_config(origin_port, "auto", io="edge", listen="localhost:0"))
    await server.start()
    try:
        srv = server._server
        assert type(srv).__name__ == "EdgeServer"
        assert srv.sockets and all(s.getsockname()[0] in ("127.0.0.1", "::1") for s in srv.sockets)
        sock = next(s for s in srv.sockets if s.family == socket.AF_INET)
        client = await Client.open(sock.getsockname()[1])
        try:
            await client.send(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
            resp = await client.read_response()
            assert resp.status == 200 and len(resp.body) == 10
            (conn,) = server.connections
            assert type(conn.transport).__name__ == "EdgeTransport"
        finally:
            await client.close()
    finally:
        await server.shutdown(drain_timeout=1)
    assert all(s.fileno() == -1 for s in srv.sockets)  # the server closed them


def test_config_io_choices() -> None:
    """server.io accepts auto, edge and loop (auto by default); anything else is a
    config error naming the key and the choices."""
    upstreams = {"origin": {"targets": ["http://127.0.0.1:9"]}}
    routes = [{"prefix": "/", "upstream": "origin"}]
    assert parse_config({"upstreams": upstreams, "routes": routes}).server.io == "auto"
    for mode in ("auto", "edge", "loop"):
        doc = {"server": {"io": mode}, "upstreams": upstreams, "routes": routes}
        assert parse_config(doc).server.io == mode
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"io": "bogus"}, "upstreams": upstreams, "routes": routes})
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith(
        "server.io: must be one of 'auto', 'edge', 'loop', got 'bogus'"
    )
    with pytest.raises(ConfigError) as info:
        parse_config({"server": {"io": 1}, "upstreams": upstreams, "routes": routes})
    assert info.value.errors[0].startswith("server.io: expected a string")


# --- out of descriptors ----------------------------------------------------------------

_EMFILE_SCRIPT = r"""
import asyncio, os, resource, socket, subprocess, sys
import uvloop
from fastedge._core import edgeio

CLIENT = '''
import socket, sys
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(30)]
print("connected", flush=True)
sys.stdin.readline()
'''

async def main() -> None:
    loop = asyncio.get_running_loop()
    messages = []
    loop.set_exception_handler(lambda l, ctx: messages.append(ctx["message"]))
    edge = edgeio.EdgeLoop(loop)
    made = []

    class P(asyncio.Protocol):
        def connection_made(self, t):
            made.append(t)

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    server = edgeio.EdgeServer(edge, P, [lsock])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    child = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(lsock.getsockname()[1])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 10, hard))
    assert child.stdout.readline().strip() == "connected"
    await asyncio.sleep(0.3)
    before = len(made)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await asyncio.sleep(1.6)
    print(before, len(made), messages.count("socket.accept() out of system resource"))
    for t in made:
        t.close()
    child.stdin.write("\n")
    child.stdin.close()
    child.wait()
    server.close()

uvloop.run(main())
"""


@needs_edge
def test_out_of_descriptors_pauses_accepting_then_takes_the_backlog() -> None:
    """Edge only (in a subprocess: it lowers RLIMIT_NOFILE): with 30 clients waiting and
    room for ~10 descriptors, the listener accepts what fits, reports EMFILE once to the
    loop's exception handler and stops accepting instead of spinning; once descriptors
    are available again it takes every waiting client within asyncio's 1 s retry."""
    out = subprocess.run(
        [sys.executable, "-c", _EMFILE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    before, after, reported = (int(v) for v in out)
    assert 0 < before < 30
    assert after == 30
    assert reported >= 1
