"""Health: rise/fall bookkeeping, active checks against real loopback servers (200, 500,
hang, close, not HTTP, refused, TLS) and passive outlier detection with an injected clock.

Checks run on a 50 ms interval; tests wait for a state with a bounded wait and never
assert elapsed time."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from fastedge.upstream.health import (
    HealthChecker,
    HealthState,
    OutlierDetector,
    parse_status_line,
)

Target = tuple[str, int]


class Origin:
    """A loopback server whose behaviour can be switched while it runs."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def target(self) -> Target:
        assert self.server is not None
        return ("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def start(self, tls: ssl.SSLContext | None = None) -> Origin:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=tls)
        return self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        try:
            mode = self.mode
            if mode == "close":
                return
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            if mode == "hang":
                await reader.read()  # until the checker gives up and closes
                return
            if mode == "garbage":
                writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            else:
                status = b"200 OK" if mode == "ok" else b"500 Internal Server Error"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            self.handlers.discard(task)

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()
        if self.handlers:
            await asyncio.gather(*self.handlers, return_exceptions=True)


MakeOrigin = Callable[..., Awaitable[Origin]]


@pytest.fixture
async def origins() -> AsyncIterator[MakeOrigin]:
    """A factory of started origins, all closed at the end of the test."""
    made: list[Origin] = []

    async def make(mode: str = "ok", tls: ssl.SSLContext | None = None) -> Origin:
        origin = Origin(mode)
        made.append(origin)
        return await origin.start(tls)

    yield make
    for origin in made:
        await origin.aclose()


async def started(make: MakeOrigin, *modes: str) -> list[Origin]:
    return [await make(mode) for mode in modes]


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def refused_target() -> Target:
    """A loopback port with nothing listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ("127.0.0.1", s.getsockname()[1])


def address(t: Target) -> Target:
    return t


# ---------------------------------------------------------------- bookkeeping


def test_health_state_rise_and_fall() -> None:
    s = HealthState(rise=2, fall=3, healthy=True)
    assert s.record(False, "x") is None
    assert s.record(False, "y") is None
    assert s.record(True) is None  # a pass resets the failure streak
    assert [s.record(False, "z") for _ in range(3)] == [None, None, False]
    assert not s.healthy and s.last_error == "z" and s.failures == 3
    assert s.record(False) is None  # already down: no second flip
    assert s.record(True) is None
    assert s.record(True) is True
    assert s.healthy and s.checks == 9
    with pytest.raises(ValueError):
        HealthState(0, 1, True)


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"HTTP/1.1 200 OK\r\n", 200), (b"HTTP/1.0 503\r\n", 503), (b"HTTP/1.1 404 Not Found\n", 404)],
)
def test_parse_status_line(line: bytes, status: int) -> None:
    assert parse_status_line(line) == status


@pytest.mark.parametrize(
    "line", [b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/2 200\r\n", b"HTTP/1.1\r\n"]
)
def test_parse_status_line_rejects(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_status_line(line)


def test_checker_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        HealthChecker([("h", 1)], address, interval=0)
    with pytest.raises(ValueError):
        HealthChecker([("h", 1)], address, path="/a b")
    with pytest.raises(ValueError):
        HealthChecker([("h", 1)], address, path="health")


# ---------------------------------------------------------------- active checks


async def test_single_checks_classify_each_failure(origins: MakeOrigin) -> None:
    ok, error, hang, close, garbage = await started(
        origins, "ok", "error", "hang", "close", "garbage"
    )
    refused = refused_target()
    targets = [ok.target, error.target, hang.target, close.target, garbage.target, refused]
    checker = HealthChecker(targets, address, timeout=0.2, path="/status?full=1")
    assert await checker.check(ok.target)
    assert ok.requests[0].startswith(b"GET /status?full=1 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{ok.target[1]}\r\n".encode() in ok.requests[0]
    assert not await checker.check(error.target)
    assert checker.state(error.target).last_error == "status 500"
    assert not await checker.check(hang.target)
    assert "no answer" in str(checker.state(hang.target).last_error)
    assert not await checker.check(close.target)
    # closed before answering: EOF, or a reset when our request was still unread
    message = str(checker.state(close.target).last_error)
    assert message.startswith(("EOFError", "ConnectionResetError", "BrokenPipeError")), message
    assert not await checker.check(garbage.target)
    assert "ValueError" in str(checker.state(garbage.target).last_error)
    assert not await checker.check(refused)
    assert "ConnectionRefusedError" in str(checker.state(refused).last_error)
    # single failures stay below fall=3: everything still counts as healthy
    assert all(checker.is_healthy(t) for t in targets)
    await checker.aclose()


async def test_checker_marks_down_and_up_with_callbacks(origins: MakeOrigin) -> None:
    good, bad, hang, close = await started(origins, "ok", "error", "hang", "close")
    refused = refused_target()
    targets = [good.target, bad.target, hang.target, close.target, refused]
    changes: list[tuple[Target, bool]] = []

    def broken_listener(_target: Target, _healthy: bool) -> None:
        raise RuntimeError("a bad listener must not stop the checks")

    checker = HealthChecker(targets, address, interval=0.05, timeout=0.2, rise=2, fall=3)
    checker.on_change(broken_listener)
    checker.on_change(lambda t, h: changes.append((t, h)))
    async with checker:
        await wait_until(lambda: all(not checker.is_healthy(t) for t in targets[1:]))
        assert checker.is_healthy(good.target)
        assert sorted(changes) == sorted((t, False) for t in targets[1:])
        assert checker.state(bad.target).failures >= 3
        # the failing target recovers: back after `rise` passes
        bad.mode = "ok"
        await wait_until(lambda: checker.is_healthy(bad.target))
        assert changes[-1] == (bad.target, True)
        assert checker.state(bad.target).successes >= 2
        # and the good one goes down when it starts failing
        good.mode = "error"
        await wait_until(lambda: not checker.is_healthy(good.target))
    assert (good.target, True) not in changes  # never flipped up: it started healthy
    assert good.requests  # probed over a real socket


async def test_checker_starts_unhealthy_when_asked(origins: MakeOrigin) -> None:
    (good,) = await started(origins, "ok")
    checker = HealthChecker([good.target], address, interval=0.05, initially_healthy=False)
    assert not checker.is_healthy(good.target)
    checker.start()
    checker.start()  # idempotent
    await wait_until(lambda: checker.is_healthy(good.target))
    await checker.aclose()
    with pytest.raises(RuntimeError):
        checker.start()


async def test_checker_over_tls(origins: MakeOrigin) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    origin = await origins("ok", server_ctx)
    checker = HealthChecker(
        [origin.target],
        address,
        timeout=2.0,
        tls=lambda t: client_ctx,
        host_header=lambda t: "api.internal",
    )
    assert await checker.check(origin.target)
    assert b"\r\nHost: api.internal\r\n" in origin.requests[0]
    # plain HTTP to a TLS port is not a pass
    plain = HealthChecker([origin.target], address, timeout=0.5)
    assert not await plain.check(origin.target)
    await checker.aclose()
    await plain.aclose()


# ---------------------------------------------------------------- passive outliers


def test_outlier_ejects_after_consecutive_failures() -> None:
    od: OutlierDetector[str] = OutlierDetector(consecutive_failures=3, base_ejection=30)
    assert not od.record("a", False, 0.0)
    assert not od.record("a", False, 1.0)
    assert not od.record("a", True, 2.0)  # a success breaks the streak
    assert [od.record("a", False, 3.0 + i) for i in range(3)] == [False, False, True]
    assert od.is_ejected("a", 5.0)
    assert od.ejected_until("a") == 35.0
    assert not od.record("a", False, 6.0)  # late results while ejected are ignored
    assert od.is_ejected("a", 34.9)
    assert not od.is_ejected("a", 35.0)  # back in rotation
    assert not od.is_ejected("b", 0.0)
    assert od.ejections("a", 35.0) == 1


def test_outlier_ejection_time_grows_capped_and_is_forgiven() -> None:
    od: OutlierDetector[str] = OutlierDetector(
        consecutive_failures=1, base_ejection=30, max_ejection=100
    )
    now = 0.0
    durations = []
    for _ in range(5):  # fails again as soon as it comes back
        assert od.record("a", False, now)
        until = od.ejected_until("a")
        assert until is not None
        durations.append(until - now)
        now = until
    assert durations == [30, 60, 90, 100, 100]  # base * k, capped at max_ejection
    assert od.ejections("a", now) == 5
    # back in rotation and well-behaved: one step forgiven per base_ejection seconds
    assert not od.is_ejected("a", now)
    assert od.ejections("a", now + 65) == 3
    od.record("a", False, now + 65)
    assert od.ejected_until("a") == now + 65 + min(4 * 30, 100)


def test_outlier_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        OutlierDetector(consecutive_failures=0)
    with pytest.raises(ValueError):
        OutlierDetector(base_ejection=0)
    with pytest.raises(ValueError):
        OutlierDetector(base_ejection=400, max_ejection=300)
