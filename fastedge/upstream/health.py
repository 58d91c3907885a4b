"""Target health: active HTTP checks and passive outlier detection.

* :class:`HealthChecker` probes every target with ``GET <path>`` on its own socket every
  ``interval`` and flips a target's health after ``rise`` passes in a row or ``fall``
  failures in a row (HAProxy's ``check inter 2s rise 2 fall 3``). The thresholds live in
  :class:`HealthState`, plain synchronous bookkeeping; the checker only does the I/O
  (the ``upstream/pool.py`` split).
* :class:`OutlierDetector` watches real traffic: ``consecutive_failures`` failures in a
  row eject a target for a time that grows with each ejection (Envoy's outlier detection:
  ``consecutive_5xx`` 5, ``base_ejection_time`` 30 s, ``max_ejection_time`` 300 s). It is
  nginx's ``max_fails``/``fail_timeout`` idea with a memory: nginx always waits the same
  ``fail_timeout`` (10 s), so a target that keeps failing keeps getting traffic every 10 s.

What counts as a failure for the detector is the caller's call; Envoy counts 5xx (and
connect errors and timeouts as 503-equivalent), which is what the proxy should report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Container, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("fastedge.health")

T = TypeVar("T", bound=Hashable)

# A status line longer than this is not HTTP we want to read (nginx's default
# ``large_client_header_buffers`` line limit is 8 KiB; a status line is far shorter).
_MAX_STATUS_LINE = 8192


class HealthState:
    """Rise/fall thresholds for one target (no I/O).

    ``record(ok)`` returns the new health when this result flipped it, else ``None``.
    """

    __slots__ = ("checks", "failures", "fall", "healthy", "last_error", "rise", "successes")

    def __init__(self, rise: int, fall: int, healthy: bool) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be >= 1")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.successes = 0  # consecutive passes
        self.failures = 0  # consecutive failures
        self.checks = 0
        self.last_error: str | None = None

    def record(self, ok: bool, error: str | None = None) -> bool | None:
        """One probe result; the new health if it changed."""
        self.checks += 1
        if ok:
            self.successes += 1
            self.failures = 0
            self.last_error = None
            if not self.healthy and self.successes >= self.rise:
                self.healthy = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            self.last_error = error
            if self.healthy and self.failures >= self.fall:
                self.healthy = False
                return False
        return None


class HealthChecker(Generic[T]):
    """Active HTTP health checks over real sockets, one asyncio task per target.

    ``address(target)`` gives ``(host, port)`` to connect to; ``tls(target)``, when given,
    an ``SSLContext`` for https targets (``None`` for plain ones), and ``server_name``
    the name to send as SNI and verify (default: the host). A probe passes when a
    connection is made, ``GET path HTTP/1.1`` is written and a status line with a status in
    ``expected_statuses`` comes back within ``timeout`` — nginx Plus's default ``match``
    (2xx and 3xx). Only the status line is read; the connection is then closed.

    Targets start ``initially_healthy`` (nginx Plus without ``mandatory``: a fresh proxy
    sends traffic at once rather than refusing it until the first checks pass).
    ``on_change(callback)`` registers ``callback(target, healthy)``, called on every flip.
    Defaults: HAProxy's ``inter 2s rise 2 fall 3``; a 1 s timeout (HAProxy's ``timeout
    check`` falls back to ``inter``; a health endpoint slower than 1 s is itself a sign).
    """

    def __init__(
        self,
        targets: Sequence[T],
        address: Callable[[T], tuple[str, int]],
        *,
        path: str = "/healthz",
        interval: float = 2.0,
        timeout: float = 1.0,
        expected_statuses: Container[int] = range(200, 400),
        rise: int = 2,
        fall: int = 3,
        initially_healthy: bool = True,
        host_header: Callable[[T], str] | None = None,
        tls: Callable[[T], ssl.SSLContext | None] | None = None,
        server_name: Callable[[T], str | None] | None = None,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError("interval and timeout must be > 0")
        if not path.startswith("/") or any(c in path for c in "\r\n "):
            raise ValueError("path must start with '/' and hold no spaces or line breaks")
        self.targets = list(targets)
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self.expected_statuses = expected_statuses
        self._address = address
        self._host_header = host_header
        self._tls = tls
        self._server_name = server_name
        self._states = {t: HealthState(rise, fall, initially_healthy) for t in self.targets}
        self._callbacks: list[Callable[[T, bool], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def is_healthy(self, target: T) -> bool:
        """The target's current health (``KeyError`` for an unknown target)."""
        return self._states[target].healthy

    def state(self, target: T) -> HealthState:
        """The target's counters (for the admin API and metrics)."""
        return self._states[target]

    @property
    def states(self) -> Mapping[T, HealthState]:
        """Every target's counters, live (read-only use: the express lane's pick)."""
        return self._states

    def on_change(self, callback: Callable[[T, bool], None]) -> None:
        """Call ``callback(target, healthy)`` whenever a target's health flips."""
        self._callbacks.append(callback)

    def start(self) -> None:
        """Start probing (one task per target, in the running loop)."""
        if self._closed:
            raise RuntimeError("health checker is closed")
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(t), name=f"health-check {t!r}") for t in self.targets
        ]

    def stop(self) -> None:
        """Stop probing now (the tasks are cancelled; :meth:`aclose` waits for them)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()

    @property
    def running(self) -> bool:
        """Whether probe tasks are still alive (not yet finished after a stop)."""
        return any(not task.done() for task in self._tasks)

    async def aclose(self) -> None:
        """Stop probing and wait for the probe tasks to end."""
        self.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> HealthChecker[T]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def check(self, target: T) -> bool:
        """Probe ``target`` once now, record the result and return whether it passed."""
        error: str | None = None
        try:
            async with asyncio.timeout(self.timeout):
                status = await self._probe(target)
        except TimeoutError:
            ok, error = False, f"no answer within {self.timeout}s"
        except (OSError, ssl.SSLError, ValueError, EOFError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        else:
            ok = status in self.expected_statuses
            if not ok:
                error = f"status {status}"
        changed = self._states[target].record(ok, error)
        if changed is not None:
            log.warning(
                "target %r is now %s%s",
                target,
                "healthy" if changed else "unhealthy",
                "" if error is None else f" ({error})",
            )
            for callback in list(self._callbacks):
                try:
                    callback(target, changed)
                except Exception:  # one bad listener must not stop the checks
                    log.exception("health on_change callback failed")
        return ok

    async def _run(self, target: T) -> None:
        while True:
            try:
                await self.check(target)
            except Exception:  # never let one surprise end the checks for good
                log.exception("health check of %r failed unexpectedly", target)
            await asyncio.sleep(self.interval)

    async def _probe(self, target: T) -> int:
        """Connect, send one GET and return the response status."""
        host, port = self._address(target)
        ctx = self._tls(target) if self._tls is not None else None
        sni: str | None = None
        if ctx is not None:
            sni = self._server_name(target) if self._server_name is not None else None
            sni = sni or host
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni)
        try:
            if self._host_header is not None:
                authority = self._host_header(target)
            else:
                authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            writer.write(
                f"GET {self.path} HTTP/1.1\r\nHost: {authority}\r\n"
                "User-Agent: fastedge-health-check\r\nAccept: */*\r\n"
                "Connection: close\r\n\r\n".encode("ascii")
            )
            await writer.drain()
            line = await reader.readuntil(b"\n")
            return parse_status_line(line)
        except asyncio.IncompleteReadError as exc:
            raise EOFError("connection closed before a status line") from exc
        except asyncio.LimitOverrunError as exc:
            raise ValueError("status line too long") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


def parse_status_line(line: bytes) -> int:
    """The status code of an HTTP/1.x status line (RFC 9112 §4), ``ValueError`` if it is
    not one."""
    if len(line) > _MAX_STATUS_LINE:
        raise ValueError("status line too long")
    parts = line.rstrip(b"\r\n").split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError(f"not an HTTP/1.x status line: {line[:64]!r}")
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise ValueError(f"bad status code: {code[:16]!r}")
    return int(code)


class OutlierDetector(Generic[T]):
    """Passive outlier detection from real responses (Envoy's consecutive-5xx detector).

    ``consecutive_failures`` failures in a row eject a target for ``base_ejection * k``
    seconds, where ``k`` counts its ejections, capped at ``max_ejection`` (Envoy:
    ``base_ejection_time`` x number of ejections, ``max_ejection_time``). ``k`` is
    forgotten step by step while a target behaves: one step per ``base_ejection`` seconds
    spent back in rotation without another ejection (Envoy decrements it every
    ``interval`` the host stays healthy). When the ejection ends the target is back with
    a clean failure count: the next request is its probe.

    Which targets to skip is the caller's choice via :meth:`is_ejected`; keep Envoy's
    ``max_ejection_percent`` spirit by never skipping *every* target (see
    :class:`~fastedge.upstream.balancers.PriorityGroups`' panic mode).
    """

    __slots__ = (
        "_consecutive",
        "_ejected_until",
        "_ejections",
        "_returned_at",
        "base_ejection",
        "consecutive_failures",
        "max_ejection",
    )

    def __init__(
        self,
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 < base_ejection <= max_ejection:
            raise ValueError("need 0 < base_ejection <= max_ejection")
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self._consecutive: dict[T, int] = {}
        self._ejections: dict[T, int] = {}  # the multiplier k
        self._ejected_until: dict[T, float] = {}
        self._returned_at: dict[T, float] = {}  # when the last ejection ended

    def record(self, target: T, success: bool, now: float) -> bool:
        """One response outcome; ``True`` when this failure ejected the target."""
        if self.is_ejected(target, now):
            return False  # late results of requests sent before the ejection
        if success:
            self._consecutive.pop(target, None)
            return False
        count = self._consecutive.get(target, 0) + 1
        if count < self.consecutive_failures:
            self._consecutive[target] = count
            return False
        self._consecutive.pop(target, None)
        k = self._decayed_multiplier(target, now) + 1
        self._ejections[target] = k
        self._ejected_until[target] = now + min(self.base_ejection * k, self.max_ejection)
        return True

    def is_ejected(self, target: T, now: float) -> bool:
        """Whether ``target`` is out of rotation at ``now``."""
        until = self._ejected_until.get(target)
        if until is None:
            return False
        if now < until:
            return True
        del self._ejected_until[target]  # the ejection is over: back in rotation
        self._returned_at[target] = until
        return False

    def ejected_until(self, target: T) -> float | None:
        """When the current ejection ends (``None`` if not ejected as of the last call)."""
        return self._ejected_until.get(target)

    def ejections(self, target: T, now: float) -> int:
        """The multiplier the target's next ejection builds on (0: never ejected, or
        forgiven)."""
        if self.is_ejected(target, now):
            return self._ejections[target]
        return self._decayed_multiplier(target, now)

    def _decayed_multiplier(self, target: T, now: float) -> int:
        k = self._ejections.get(target, 0)
        returned = self._returned_at.get(target)
        if k and returned is not None:
            k = max(0, k - int((now - returned) // self.base_ejection))
        return k
