"""fastedge.listen.bind_numeric: listeners bound without uvloop's resolver threads.

uvloop's ``create_server(host, port)`` resolves even ``"127.0.0.1"`` on libuv's thread
pool, whose threads then live for the whole process and turn glibc's single-threaded
shortcuts off. ``bind_numeric`` binds numeric hosts itself; the proxy listener
(ProxyServer.start) and every minihttp server (fastedge.minihttp.start_server, so the
admin API too) use it. These tests check the socket it makes, its error, the fallback for
names, and, in a fresh process, that a running proxy stays at one thread.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import pytest
import uvloop

import fastedge.minihttp
import fastedge.server
from fastedge.config import parse_config
from fastedge.listen import bind_all, bind_numeric
from fastedge.minihttp import Request, Response, start_server
from fastedge.server import ProxyServer
from tests.conftest import ROOT, has_ipv6_loopback

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts threads in /proc/<pid>/task"
)


def _listening(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def _busy_listener() -> socket.socket:
    """A loopback listener holding its port (as another server would)."""
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    return busy


class _RecordingSocket(socket.socket):
    """A socket that remembers it was made, and the options set on it."""

    made: list[_RecordingSocket] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options: list[tuple[Any, ...]] = []
        _RecordingSocket.made.append(self)

    def setsockopt(self, *args: Any) -> None:
        self.options.append(args)
        super().setsockopt(*args)


# --- the socket ---------------------------------------------------------------------------


def test_ipv4_literal_gives_a_nonblocking_listening_socket_with_reuseaddr() -> None:
    sock = bind_numeric("127.0.0.1", 0)
    assert sock is not None
    with sock:
        assert sock.family == socket.AF_INET
        assert sock.type == socket.SOCK_STREAM
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert _listening(sock)
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        # It accepts: a client connects to it.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


def test_reuse_port_sets_so_reuseport_and_a_second_socket_can_share_the_port() -> None:
    first = bind_numeric("127.0.0.1", 0, reuse_port=True)
    assert first is not None
    with first:
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        port = first.getsockname()[1]
        # What `--workers` relies on: each worker binds the same address.
        second = bind_numeric("127.0.0.1", port, reuse_port=True)
        assert second is not None
        with second:
            assert second.getsockname() == ("127.0.0.1", port)
            assert _listening(second)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_literal_gives_an_ipv6_only_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux makes a socket bound to one IPv6 address (not ::) v6-only by itself, so the
    # option read back on ::1 cannot show whether bind_numeric set it (as create_server
    # does, which matters on ::): the options it sets are recorded too.
    _RecordingSocket.made = []
    monkeypatch.setattr(socket, "socket", _RecordingSocket)
    sock = bind_numeric("::1", 0)
    monkeypatch.undo()
    assert sock is not None
    with sock:
        [recorded] = _RecordingSocket.made
        assert recorded is sock
        assert (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1) in recorded.options
        assert sock.family == socket.AF_INET6
        assert sock.getsockname()[0] == "::1"
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert _listening(sock) and sock.getblocking() is False


@pytest.mark.parametrize(
    "host",
    [
        "localhost",  # a name: create_server resolves it
        None,  # every interface: two families
        "",  # ditto
        "example.invalid",  # a name that does not resolve: still create_server's error
        "[::1]",  # brackets are config syntax, not an address
        " 127.0.0.1",  # not a literal
    ],
)
def test_names_and_multi_address_hosts_are_left_to_create_server(host: str | None) -> None:
    assert bind_numeric(host, 0) is None


# --- the error ----------------------------------------------------------------------------


def test_busy_port_raises_eaddrinuse_like_create_server_and_closes_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = _busy_listener()
    port = busy.getsockname()[1]

    async def create_server_error() -> OSError:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(asyncio.Protocol, "127.0.0.1", port)
        except OSError as exc:
            return exc
        server.close()
        raise AssertionError("create_server bound a busy port")

    _RecordingSocket.made = []
    monkeypatch.setattr(socket, "socket", _RecordingSocket)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(OSError) as info:
                bind_numeric("127.0.0.1", port)
            ours = info.value
            del info
            gc.collect()
        monkeypatch.undo()
        theirs = uvloop.run(create_server_error())
    finally:
        busy.close()

    assert ours.errno == errno.EADDRINUSE
    assert ours.strerror == (
        f"error while attempting to bind on address ('127.0.0.1', {port}): address already in use"
    )
    # The same text uvloop's create_server gives for the same busy port.
    assert theirs.errno == ours.errno
    assert str(theirs) == str(ours)
    # The socket it made is closed, not left to the garbage collector.
    assert len(_RecordingSocket.made) == 1
    assert _RecordingSocket.made[0].fileno() == -1
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# --- the callers --------------------------------------------------------------------------


class _SpyBind:
    """Wraps bind_numeric and remembers what it returned."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.socks: list[socket.socket | None] = []

    def __call__(
        self, host: str | None, port: int, *, backlog: int = 100, reuse_port: bool = False
    ) -> socket.socket | None:
        self.calls.append((host, port, backlog, reuse_port))
        sock = bind_numeric(host, port, backlog=backlog, reuse_port=reuse_port)
        self.socks.append(sock)
        return sock


async def _get(port: int, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def _hello(request: Request) -> Response:
    return Response.text(f"hello {request.path}")


async def test_minihttp_start_server_listens_on_a_bind_numeric_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _SpyBind()
    monkeypatch.setattr(fastedge.minihttp, "bind_numeric", spy)
    server = await start_server(_hello, "127.0.0.1", 0)
    try:
        assert spy.calls == [("127.0.0.1", 0, 100, False)]
        bound = spy.socks[0]
        assert bound is not None
        listener = server.server.sockets[0]
        assert listener.fileno() == bound.fileno()
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        answer = await _get(server.port)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"hello /hello")
    finally:
        await server.close(grace=1)


async def test_minihttp_start_server_on_a_name_falls_back_to_create_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = _SpyBind()
    monkeypatch.setattr(fastedge.minihttp, "bind_numeric", spy)
    server = await start_server(_hello, "localhost", 0)
    try:
        assert spy.calls == [("localhost", 0, 100, False)] and spy.socks == [None]
        assert server.server.sockets
        host = server.server.sockets[0].getsockname()[0]
        answer = await _get(server.port, host)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"hello /hello")
    finally:
        await server.close(grace=1)


async def test_minihttp_start_server_on_a_busy_port_raises_the_asyncio_message() -> None:
    busy = _busy_listener()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(OSError, match=r"address already in use") as info:
            await start_server(_hello, "127.0.0.1", port)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        busy.close()


def _proxy_config(upstream_port: int, **server: Any) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "access_log": False, **server},
        "admin": {"enabled": False},
        "upstreams": {"o": {"targets": [f"http://127.0.0.1:{upstream_port}"]}},
        "routes": [{"prefix": "/", "upstream": "o"}],
    }


@pytest.mark.parametrize("reuse_port", [False, True])
async def test_proxy_listener_is_the_bind_numeric_socket_with_the_workers_options(
    monkeypatch: pytest.MonkeyPatch, origin_port: int, reuse_port: bool
) -> None:
    spy = _SpyBind()
    monkeypatch.setattr(fastedge.server, "bind_numeric", spy)
    config = parse_config(_proxy_config(origin_port, backlog=77))
    server = ProxyServer(config, reuse_port=reuse_port)
    await server.start()
    try:
        assert spy.calls == [("127.0.0.1", 0, 77, reuse_port)]
        bound = spy.socks[0]
        assert bound is not None
        assert server._server is not None
        listener = server._server.sockets[0]
        assert listener.fileno() == bound.fileno()
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == int(reuse_port)
        answer = await _get(server.port)
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        await server.shutdown(drain_timeout=1)


# --- the point: one thread ----------------------------------------------------------------

_PROXY_SCRIPT = textwrap.dedent(
    """
    import asyncio, errno, json, os, socket

    import uvloop

    from fastedge.config import parse_config
    from fastedge.listen import bind_all, bind_numeric
    from fastedge.server import ProxyServer


    def threads():
        return len(os.listdir(f"/proc/{os.getpid()}/task"))


    class Upstream(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = b""

        def data_received(self, data):
            self.buf += data
            if b"\\r\\n\\r\\n" in self.buf:
                self.buf = b""
                self.transport.write(
                    b"HTTP/1.1 200 OK\\r\\nContent-Length: 11\\r\\n\\r\\nupstream-ok"
                )


    async def raw_get(port, path):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # Not loop.sock_connect: uvloop resolves its address on the resolver threads
            # too, and this client must not start the threads the proxy is said not to.
            err = sock.connect_ex(("127.0.0.1", port))
            if err == errno.EINPROGRESS:
                writable = loop.create_future()
                loop.add_writer(sock, writable.set_result, None)
                try:
                    await asyncio.wait_for(writable, 10)
                finally:
                    loop.remove_writer(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            request = f"GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n"
            await loop.sock_sendall(sock, request.encode())
            data = b""
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                if not chunk:
                    return data.decode("latin-1")
                data += chunk
        finally:
            sock.close()


    async def main():
        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(Upstream, sock=bind_numeric("127.0.0.1", 0))
        upstream_port = upstream.sockets[0].getsockname()[1]
        server = ProxyServer(parse_config({
            "server": {"listen": "127.0.0.1:0", "access_log": False},
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{upstream_port}"]}},
            "routes": [{"prefix": "/", "upstream": "o"}],
        }))
        await server.start()
        started = threads()
        try:
            proxied = await raw_get(server.port, "/anything")
            admin = await raw_get(server.admin_port, "/healthz")
            return {
                "proxy_status": proxied.split("\\r\\n", 1)[0],
                "proxy_body": proxied.rpartition("\\r\\n\\r\\n")[2],
                "admin_status": admin.split("\\r\\n", 1)[0],
                "threads_after_start": started,
                "threads": threads(),
            }
        finally:
            await server.shutdown(drain_timeout=1)
            upstream.close()


    print(json.dumps(uvloop.run(main())))
    """
)

_CONTROL_SCRIPT = textwrap.dedent(
    """
    import asyncio, os

    import uvloop


    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        print(len(os.listdir(f"/proc/{os.getpid()}/task")))
        server.close()


    uvloop.run(main())
    """
)


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@linux_only
def test_a_running_proxy_with_admin_stays_single_threaded() -> None:
    # Control: the way it was before listen.py, uvloop starts libuv's resolver threads
    # for a numeric host, so counting threads does tell the two apart.
    assert int(_run(_CONTROL_SCRIPT)) > 1

    result = json.loads(_run(_PROXY_SCRIPT))
    assert result["proxy_status"].startswith("HTTP/1.1 200")
    assert result["proxy_body"] == "upstream-ok"  # it went through the proxy to the upstream
    assert result["admin_status"].startswith("HTTP/1.1 200")
    assert result["threads_after_start"] == 1
    assert result["threads"] == 1


def test_bind_all_binds_every_address_of_a_name() -> None:
    """A name is resolved once, each address bound once (duplicates in the resolver's
    answer skipped), every socket listening and non-blocking."""
    socks = bind_all("localhost", 0, backlog=16)
    try:
        assert socks
        addresses = [(s.family, s.getsockname()[0]) for s in socks]
        assert len(addresses) == len(set(addresses))
        assert (socket.AF_INET, "127.0.0.1") in addresses
        for s in socks:
            assert _listening(s)
            assert s.getblocking() is False
    finally:
        for s in socks:
            s.close()


def test_bind_all_closes_what_it_bound_when_one_address_fails() -> None:
    """A bind error on one of a name's addresses closes the sockets already bound (no
    descriptor left, nothing listening on the other address) and says which address
    failed, as bind_numeric does."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    before = len(os.listdir("/proc/self/fd"))
    try:
        with pytest.raises(OSError, match="error while attempting to bind on address"):
            bind_all("localhost", port)
        assert len(os.listdir("/proc/self/fd")) == before
        if has_ipv6_loopback():
            with socket.socket(socket.AF_INET6) as probe:
                assert probe.connect_ex(("::1", port)) != 0  # ::1 was not left listening
    finally:
        taken.close()


def test_bind_all_unknown_name() -> None:
    with pytest.raises(socket.gaierror):
        bind_all("no-such-host.invalid", 0)
