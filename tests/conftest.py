"""Shared fixtures: real origin processes, a proxy per engine, an OTLP receiver and a strict
HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import h11
import pytest
import uvloop

from fastedge.config import Config, parse_config
from fastedge.server import ProxyServer
from tests.otlp_receiver import Receiver

ROOT = Path(__file__).resolve().parents[1]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Async tests run on uvloop, as fastedge does in production."""
    return {"uvloop": uvloop.new_event_loop}


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (containers without IPv6 cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def start_server_process(module: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    """Start ``python -m module args`` (a test server that prints ``PORT <n>`` once it
    listens: tests/origin.py, cache_origin.py, batch_origin.py, faulty_origin.py) as its
    own process; return it and its port. Stop it with :func:`stop_origin`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        stop_origin(proc)
        raise RuntimeError(f"{module} did not start: {line!r}")
    return proc, int(line.split()[1])


def start_origin(port: int = 0) -> tuple[subprocess.Popen[str], int]:
    """Start ``tests/origin.py`` as its own process (on ``port``, 0 = any free one);
    return it and its port."""
    return start_server_process("tests.origin", "--port", str(port))


def stop_origin(proc: subprocess.Popen[str]) -> None:
    """Kill a process of :func:`start_server_process` and release its pipe."""
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="session")
def origin_port() -> Iterator[int]:
    """Port of a long-lived origin process (shared by tests that don't break it)."""
    proc, port = start_origin()
    try:
        yield port
    finally:
        stop_origin(proc)


@pytest.fixture(scope="module")
def batch_port() -> Iterator[int]:
    """Port of a batch-endpoint process (tests/batch_origin.py) shared by the module's
    tests (each test uses its own batch path, so their counters never mix)."""
    proc, port = start_server_process("tests.batch_origin", "--port", "0")
    try:
        yield port
    finally:
        stop_origin(proc)


def free_port() -> int:
    """A loopback port nothing listens on right now (connects to it are refused; a
    server may bind it a moment later: loopback, so only this machine can race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: every socket stays bound until all are,
    so the kernel cannot hand out one port twice (two free_port() calls in a row can
    return the same one, which a config with two listeners then refuses)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


async def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Wait (bounded) until ``proc`` accepts connections on ``port``; raises if it exits
    first, with its stderr when that is a pipe."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr is not None else None
            detail = f": {err.decode(errors='replace')}" if err else ""
            raise RuntimeError(f"process exited with {proc.returncode}{detail}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        await w.wait_closed()
        return
    raise TimeoutError(f"port {port} did not open")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real, private redis-server on a free loopback port (Debian's redis-server;
    .ci/run installs it). Nothing is persisted; the server dies with the session."""
    import shutil
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver listening on a free loopback port; held answers are released at the end."""
    rec = Receiver()
    server = await asyncio.start_server(rec.handle, "127.0.0.1", 0)
    rec.port = server.sockets[0].getsockname()[1]
    try:
        yield rec
    finally:
        rec.release.set()
        server.close()
        await server.wait_closed()


@pytest.fixture(params=["h11", "fast"])
def engine_name(request: pytest.FixtureRequest) -> str:
    """Every protocol test runs on both engines."""
    return str(request.param)


def gateway_config(origin: int, engine: str, **server: Any) -> Config:
    """A config routing ``/`` and a few prefixes to the origin at ``origin``."""
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False, **server},
        "admin": {"enabled": False},
        "upstreams": {
            "origin": {"targets": [f"http://127.0.0.1:{origin}"]},
        },
        "routes": [
            {"prefix": "/", "upstream": "origin"},
            {"prefix": "/api/users", "upstream": "origin", "strip_prefix": True},
            {"prefix": "/v1", "upstream": "origin", "rewrite": "/echo"},
        ],
    }
    return parse_config(doc)


@pytest.fixture
async def proxy(origin_port: int, engine_name: str) -> AsyncIterator[ProxyServer]:
    """A started proxy in this test's event loop, in front of the shared origin."""
    server = ProxyServer(gateway_config(origin_port, engine_name))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(drain_timeout=1)


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[ProxyServer]]]:
    """``await make_proxy(doc)``: a started proxy for the config document ``doc``, in this
    test's event loop. Every one is shut down at the end, its auth policies' background
    work (JWKS fetches) stopped first."""
    servers: list[ProxyServer] = []

    async def start(doc: dict[str, Any]) -> ProxyServer:
        server = ProxyServer(parse_config(doc))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        auth = server.config.sections.get("auth")
        close = getattr(auth, "aclose", None)
        if close is not None:
            await close()
        await server.shutdown(drain_timeout=1)


@contextlib.asynccontextmanager
async def running_demo(admin_token: str | None = None) -> AsyncIterator[ProxyServer]:
    """``fastedge demo`` in this test's loop: its services and gateway on free loopback
    ports, no access log, the admin API on with ``admin_token`` (off without one); all
    shut down at the end."""
    from fastedge.demo import start_demo

    server, services, _ = await start_demo(
        gateway="127.0.0.1:0",
        admin=None if admin_token is None else "127.0.0.1:0",
        service_ports={},
        access_log=False,
        admin_token=admin_token,
    )
    try:
        yield server
    finally:
        await server.shutdown(drain_timeout=1)
        await services.close()


@dataclass
class Response:
    """A response as a strict client (h11) parsed it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> bytes | None:
        key = name.lower().encode()
        for n, v in self.headers:
            if n == key:
                return v
        return None

    def header_all(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n == key]


class Client:
    """A raw-socket HTTP/1.1 client parsing responses with h11 (a strict reference).

    Writes exactly the bytes given, so tests control framing, pipelining and malformed
    input; reads responses one by one off the same connection.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, *, method: bytes = b"GET", timeout: float = 10) -> Response:
        """Parse one response (any 1xx are collected first)."""
        # h11 must know a request was sent to parse its response; fake the client side.
        if self.conn.our_state is h11.IDLE:
            self.conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            self.conn.send(h11.EndOfMessage())
        resp: Response | None = None
        infos: list[int] = []
        chunks: list[bytes] = []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                infos.append(event.status_code)
            elif isinstance(event, h11.Response):
                resp = Response(event.status_code, list(event.headers), informational=infos)
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert resp is not None
                resp.body = b"".join(chunks)
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return resp
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connection closed before a complete response")

    async def read_raw_until_close(self, timeout: float = 10) -> bytes:
        out = b""
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return out
            out += data

    async def is_closed(self, timeout: float = 5) -> bool:
        """True when the server closed the connection (EOF or reset) within ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionResetError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def get(path: str, host: str = "example.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def call_sync(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, Message, bytes]:
    """One request with the stdlib client (an independent HTTP implementation), blocking:
    for a server running in another process or thread (else use :func:`call`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


async def call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, Message, bytes]:
    """One request with the stdlib client (an independent HTTP implementation), in a
    thread so the server under test keeps running on this loop."""
    return await asyncio.to_thread(call_sync, port, method, path, headers, body)
