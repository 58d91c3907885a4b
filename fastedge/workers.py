"""Several processes on one port: ``fastedge run --workers N`` (config ``server.workers``).

One Python process runs one event loop on one core; ``--workers N`` runs N of them behind
one address, the way nginx runs worker processes under a master.

Processes::

    supervisor (the process you start)         worker 0 … N-1 (python -m fastedge.workers)
    ─ reserves the listen address              ─ a whole ProxyServer on its own uvloop
    ─ starts, watches and restarts workers     ─ its own listener on the same address
    ─ the instance's one admin listener          (SO_REUSEPORT: the kernel spreads new
    ─ forwards SIGHUP / SIGTERM / SIGINT          connections across the workers)
                                               ─ a private admin on 127.0.0.1:<ephemeral>

**Why spawn, not fork.** Workers are fresh interpreters started with
``sys.executable -m fastedge.workers`` (the ``spawn`` model). Forking is only safe
before any event loop, thread or socket exists, but the supervisor must also restart a
worker *while* its own loop serves the admin API and watches the other workers; a child
forked from there would inherit a running loop, its epoll descriptor, signal wake-up fd
and the admin's sockets. A spawned worker imports fastedge afresh (~0.3 s), creates its
loop in ``main``, and shares nothing with the supervisor but the inherited environment and
one status socket.

**The listen address.** The supervisor binds (without ``listen()``) a socket with
``SO_REUSEPORT`` on the configured address before starting anyone: a port that is taken
fails at once with a clear error, port ``0`` becomes one concrete port all workers use,
and no other program can take the port while a worker restarts. Only listening sockets
receive connections, so the reservation never gets any. Each worker then binds its own
listening socket with ``SO_REUSEPORT`` (Linux 3.9+; the kernel hashes each new connection
to one listener, which balances accepts across processes without a shared accept lock).

**The config.** The supervisor validates the file and writes the accepted bytes to a
private snapshot (a ``0700`` temporary directory); workers only ever read the snapshot, so
every worker, including one restarted hours later, runs exactly the config the supervisor
accepted, and relative paths still resolve against the original file's directory.

**Signals.** ``SIGHUP``: the supervisor re-reads and validates the file; an invalid
config is refused once, by the supervisor, and every worker keeps the old one; a valid one
is snapshotted and every worker is sent ``SIGHUP`` and reloads it (requests in flight
finish on the old gateway, as in one process). ``SIGTERM``/``SIGINT``: every worker shuts
down gracefully (stop accepting, drain, close) and the supervisor exits 0 once all have;
a worker still running ``drain_timeout`` + 5 s later is killed and the exit status is 1.
A worker that dies otherwise is restarted after a back-off (logged, counted in
``fastedge_worker_restarts_total``). If the workers cannot start at all, the supervisor
stops and exits 1. If the supervisor dies, each worker sees its status socket close and
shuts down gracefully, so no orphan keeps serving.

**Admin.** The supervisor runs the admin listener (with the same token rules). It answers
``/healthz``, ``/readyz``, ``/config`` and ``GET /workers`` itself, ``GET /metrics`` by
scraping every worker and summing (:mod:`fastedge.observe.aggregate`) plus the
``fastedge_workers`` gauge, ``GET /traces`` by merging the workers' recent spans and
``GET /stats`` (the dashboard's time series) by adding their rates (:func:`merge_stats`).
Any other request is relayed (:mod:`fastedge.admin.relay`): ``GET``/``HEAD`` to one
worker; a change (``PUT``, ``POST``, ``DELETE``, ...) to **every** worker, answered with
the first worker's answer, or 502 naming the workers that failed. Successful ``PUT`` and
``DELETE`` requests are remembered (the last one per path) and replayed to a worker that
(re)starts later, so a restarted worker has the same runtime state as the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs

import orjson

from fastedge.admin.api import (
    AdminError,
    AdminRequest,
    AdminResponse,
    AdminServer,
    admin_token,
)
from fastedge.admin.relay import RelayError, relay
from fastedge.config import Config, ConfigError, parse_config, redacted
from fastedge.observe.aggregate import ExpositionError, merge_expositions
from fastedge.observe.metrics import CONTENT_TYPE, MetricFamily, Metrics

__all__ = [
    "ConfigSnapshot",
    "Supervisor",
    "cpu_count",
    "merge_stats",
    "read_config_file",
    "worker_main",
]

log = logging.getLogger("fastedge.workers")

WORKER_START_TIMEOUT = 60.0
"""Seconds from spawning a worker to its "ready": an interpreter start, imports and the
gateway build take ~0.5 s on an idle machine; 60 s tolerates a badly overloaded one."""

RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 30.0
"""A worker that died is restarted after 0.1 s (systemd's default ``RestartSec=100ms``),
doubling for each further crash in a row up to 30 s, so a crash loop costs little CPU
while the other workers keep serving."""

STABLE_AFTER = 10.0
"""A worker that served this many seconds before dying resets its back-off: it was not a
crash loop."""

STOP_GRACE = 5.0
"""Seconds beyond ``server.drain_timeout`` a worker may take to exit before SIGKILL."""

ADMIN_RELAY_TIMEOUT = 10.0
"""Bound on one relayed admin request (and on each worker's part of a scrape)."""

_STATUS_FD_ENV = "FASTEDGE_WORKER_STATUS_FD"


def cpu_count() -> int:
    """CPUs this process may run on (honours ``taskset``/cgroup cpusets), at most 64."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, 64))


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True, slots=True)
class ConfigSnapshot:
    """The accepted config as the workers read it: TOML text from a file, or a JSON
    document (``fastedge reverse-proxy``, which has no file)."""

    data: bytes
    kind: Literal["toml", "json"]

    @property
    def generation(self) -> str:
        """A short fingerprint: workers report which snapshot they run."""
        return hashlib.sha256(self.data).hexdigest()[:16]

    @property
    def filename(self) -> str:
        """The snapshot's file name in the private directory (its suffix is its kind)."""
        return f"config.{self.kind}"

    def parse(self, source: str | None) -> Config:
        """Validate into a :class:`Config`; relative paths resolve against ``source``'s
        directory. Raises :class:`ConfigError` (naming ``source``) on any problem."""
        name = source or "config"
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{name}: not UTF-8 text: {exc}"], source=source) from None
        try:
            doc = tomllib.loads(text) if self.kind == "toml" else orjson.loads(text)
        except (tomllib.TOMLDecodeError, orjson.JSONDecodeError) as exc:
            raise ConfigError(
                [f"{name}: invalid {self.kind.upper()}: {exc}"], source=source
            ) from None
        return parse_config(doc, source=source)

    def write(self, directory: Path) -> Path:
        """Write atomically (a worker never reads half a config); returns the path."""
        path = directory / self.filename
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(self.data)
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> ConfigSnapshot:
        """Read a snapshot written by :meth:`write`."""
        return cls(path.read_bytes(), "json" if path.suffix == ".json" else "toml")

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ConfigSnapshot:
        """A snapshot of a config document built in memory."""
        return cls(orjson.dumps(doc), "json")


def read_config_file(path: str) -> tuple[ConfigSnapshot, Config]:
    """Read and validate a config file once, returning the exact bytes accepted with the
    config they make (the same errors as :func:`fastedge.config.load_config`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"], source=path) from None
    snapshot = ConfigSnapshot(data, "toml")
    return snapshot, snapshot.parse(path)


def _worker_config(config: Config, port: int) -> Config:
    """What a worker runs: the listen port made concrete (port 0 was resolved by the
    supervisor) and the admin listener moved to a private loopback port."""
    host, _ = config.server.listen
    server = dataclasses.replace(config.server, listen=(host, port))
    admin = config.admin
    if admin.listen is not None:
        admin = dataclasses.replace(admin, listen=("127.0.0.1", 0))
    return dataclasses.replace(config, server=server, admin=admin)


def _with_http_override(config: Config, http_override: str | None) -> Config:
    if http_override is None or config.server.http == http_override:
        return config
    http = cast("Literal['auto', 'h11', 'fast']", http_override)  # argparse choices
    return dataclasses.replace(config, server=dataclasses.replace(config.server, http=http))


# --------------------------------------------------------------------------- the worker


class _StatusChannel:
    """The worker's end of its status socket: JSON lines to the supervisor; EOF from the
    supervisor means it is gone."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock)

    def send(self, **message: Any) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))

    async def wait_closed_by_peer(self) -> None:
        """Return when the supervisor's end is closed (it exited or was killed)."""
        assert self._reader is not None
        with contextlib.suppress(OSError):
            while await self._reader.read(4096):
                pass

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                await self._writer.drain()
            self._writer.close()


class _WorkerTag(logging.Filter):
    """Appends ``[worker N]`` to the logger name of every record."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[worker {index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastedge.workers",
        description="One fastedge worker process (started by the --workers supervisor).",
    )
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--source", default=None, help="the original config file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--http", choices=["auto", "h11", "fast"], default=None)
    parser.add_argument("--log-level", default="info")
    return parser


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of a worker process (``python -m fastedge.workers``)."""
    from fastedge import server
    from fastedge.observe.logging import setup_logging

    args = _worker_parser().parse_args(argv)
    setup_logging(args.log_level)
    # Several processes share stderr: every line says which worker wrote it.
    tag = _WorkerTag(args.index)
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    sock = socket.socket(fileno=args.status_fd)
    return int(server.run(_serve_worker(args, sock)))


async def _serve_worker(args: argparse.Namespace, sock: socket.socket) -> int:
    from fastedge.server import ProxyServer, tune_gc

    channel = _StatusChannel(sock)
    await channel.open()
    try:
        snapshot = ConfigSnapshot.read(args.snapshot)
        config = _worker_config(snapshot.parse(args.source), args.port)
        server = ProxyServer(
            config, config_path=args.source, http_override=args.http, reuse_port=True
        )
        await server.start()
    except Exception as exc:
        # Anything here (an access log that cannot be opened, an extension failing to
        # build) would fail in every worker alike: report it, the supervisor gives up.
        log.exception("worker %d could not start", args.index)
        channel.send(event="failed", error=f"{type(exc).__name__}: {exc}")
        await channel.close()
        return 1
    loop = asyncio.get_running_loop()
    tune_gc()

    def reload() -> None:
        try:
            snap = ConfigSnapshot.read(args.snapshot)
            new = _worker_config(snap.parse(args.source), args.port)
        except (ConfigError, OSError) as exc:
            # The supervisor validated this snapshot; failing here means the environment
            # changed under us (a file the config names vanished). Same rule: keep serving.
            log.error("reload refused, the running config stays:\n%s", exc)
            server.metrics.inc("fastedge_config_reloads_total", (("result", "failure"),))
            channel.send(event="reload", ok=False, generation="")
            return
        ok = server.reload(new)
        channel.send(event="reload", ok=ok, generation=snap.generation)

    stopping: list[asyncio.Task[None]] = []  # the one shutdown task, once started

    def stop() -> None:
        # One graceful shutdown, whoever asks first: the supervisor's SIGTERM, a terminal's
        # SIGINT reaching the whole process group, or the supervisor vanishing.
        if not stopping:
            channel.send(event="stopping")
            stopping.append(loop.create_task(server.shutdown()))

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    channel.send(
        event="ready",
        pid=os.getpid(),
        admin_port=server.admin_port,
        generation=snapshot.generation,
    )
    log.debug("worker %d ready (pid %d)", args.index, os.getpid())
    lifeline = loop.create_task(channel.wait_closed_by_peer())
    lifeline.add_done_callback(lambda _: stop())
    await server.wait_stopped()
    lifeline.cancel()
    await channel.close()
    return 0


# --------------------------------------------------------------------------- supervisor


@dataclass
class _Worker:
    """One worker slot: the process currently filling it and its state."""

    index: int
    process: asyncio.subprocess.Process | None = None
    pid: int | None = None
    ready: bool = False
    admin_port: int | None = None
    generation: str = ""
    started_at: float = 0.0
    ready_at: float | None = None
    restarts: int = 0
    crashes_in_a_row: int = 0
    error: str | None = None
    watcher: asyncio.Task[None] | None = None
    restart: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _SupervisorAdmin(AdminServer):
    """The instance's admin listener: the built-in ``/healthz`` and ``/metrics`` answered
    for all workers (the other built-ins take the supervisor's callables)."""

    def __init__(self, supervisor: Supervisor, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._supervisor = supervisor

    async def _healthz(self, request: AdminRequest) -> AdminResponse:
        return self._supervisor.health(request.request_id)

    async def _metrics_text(self, request: AdminRequest) -> AdminResponse:
        return await self._supervisor.metrics_response(request.request_id)


class Supervisor:
    """Starts and keeps ``workers`` worker processes serving ``snapshot``; see the module
    docstring. ``config_path`` is the file ``SIGHUP`` re-reads (``None``: no reloads)."""

    def __init__(
        self,
        snapshot: ConfigSnapshot,
        config: Config,
        *,
        workers: int,
        workers_from_cli: bool = False,
        config_path: str | None = None,
        http_override: str | None = None,
        log_level: str = "info",
    ) -> None:
        self.snapshot = snapshot
        self.config = _with_http_override(config, http_override)
        self.config_path = config_path
        self.http_override = http_override
        self.log_level = log_level
        self.workers_from_cli = workers_from_cli
        self.metrics = Metrics()
        self.metrics.describe(
            "fastedge_worker_restarts_total",
            "counter",
            "Worker processes restarted after dying unexpectedly.",
        )
        self.metrics.describe(
            "fastedge_config_reloads_total",
            "counter",
            "Config reloads by result; with workers, each worker counts its own reload and "
            "the supervisor counts a config it refused once.",
        )
        self.slots = [_Worker(i) for i in range(workers)]
        self.port = 0
        self._loop = asyncio.get_running_loop()
        self._dir: Path | None = None
        self._snapshot_path: Path | None = None
        self._reserved: list[socket.socket] = []
        self._admin: AdminServer | None = None
        self._token: str | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        self._started = False
        # Admin changes to replay to a worker that starts later: (method, path) -> request.
        self._replay: dict[str, AdminRequest] = {}
        self._reload_waiting: set[int] = set()

    # --- lifecycle ----------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status of ``fastedge run --workers N``."""
        self._dir = Path(tempfile.mkdtemp(prefix="fastedge-workers-"))  # 0700
        try:
            try:
                self._reserve_listener()
            except OSError as exc:
                host, port = self.config.server.listen
                log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
                return 1
            self._snapshot_path = self.snapshot.write(self._dir)
            try:
                await self._start_admin()
            except OSError as exc:
                log.error("cannot start the admin listener: %s", exc.strerror or exc)
                return 1
            self._install_signal_handlers()
            for slot in self.slots:
                await self._spawn(slot)
            if not await self._wait_started():
                if self._stopping.is_set():  # asked to stop while starting: a clean stop
                    return await self._stop_workers()
                await self._stop_workers()
                return 1
            self._started = True
            host, _ = self.config.server.listen
            log.info(
                "fastedge listening on %s:%d with %d workers (pids %s)",
                host,
                self.port,
                len(self.slots),
                ", ".join(str(s.pid) for s in self.slots),
            )
            await self._stopping.wait()
            return await self._stop_workers()
        finally:
            if self._admin is not None:
                await self._admin.close()
            for sock in self._reserved:
                sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def _reserve_listener(self) -> None:
        host, port = self.config.server.listen
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple[int, Any]] = set()
        for family, type_, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, type_, proto)
            self._reserved.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio's create_server does, so the workers' sockets match.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Port 0: the first bind picks the port, every other address and worker uses it.
            sock.bind((address[0], self.port or port, *address[2:]))
            self.port = sock.getsockname()[1]

    async def _start_admin(self) -> None:
        admin = self.config.admin
        if admin.listen is None:
            return
        token = admin_token(admin, log)
        host, port = admin.listen
        self._token = token
        self._admin = _SupervisorAdmin(
            self,
            host,
            port,
            metrics=self.metrics,
            ready=self.ready,
            config_view=lambda: redacted(self.config),
            token=token,
            extra_routes={
                ("GET", "/workers"): self._workers_view,
                ("GET", "/traces"): self._traces,
                ("GET", "/stats"): self._stats,
            },
            fallback=self._relay,
        )
        await self._admin.start()

    @property
    def admin_port(self) -> int | None:
        """The admin listener's bound port, or ``None`` when disabled."""
        return None if self._admin is None else self._admin.port

    def _install_signal_handlers(self) -> None:
        self._loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        """Begin the graceful shutdown of every worker (SIGTERM/SIGINT)."""
        if self._stopping.is_set():
            log.info("already stopping")
            return
        log.info("stopping %d workers", len(self.slots))
        self._stopping.set()
        self._changed.set()

    async def _wait_started(self) -> bool:
        deadline = self._loop.time() + WORKER_START_TIMEOUT
        while True:
            # Cleared before looking, so a change while we look wakes the wait below.
            self._changed.clear()
            if self._stopping.is_set():
                return False
            failed = [s for s in self.slots if not s.running and (s.process or s.error is not None)]
            if failed:
                for slot in failed:
                    log.error(
                        "worker %d could not start: %s",
                        slot.index,
                        slot.error or "it exited before it was ready",
                    )
                return False
            if all(s.ready for s in self.slots):
                return True
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                late = [str(s.index) for s in self.slots if not s.ready]
                log.error("workers %s not ready after %gs", ", ".join(late), WORKER_START_TIMEOUT)
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _stop_workers(self) -> int:
        """SIGTERM every worker, wait for the drains, SIGKILL what is left."""
        self._stopping.set()
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
            if slot.running:
                assert slot.process is not None
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGTERM)
        watchers = [s.watcher for s in self.slots if s.watcher is not None and not s.watcher.done()]
        if not watchers:
            return 0
        limit = self.config.server.drain_timeout + STOP_GRACE
        _, pending = await asyncio.wait(watchers, timeout=limit)
        status = 0
        if pending:
            for slot in self.slots:
                if slot.running:
                    assert slot.process is not None
                    log.error(
                        "worker %d (pid %s) did not exit in %gs: killed",
                        slot.index,
                        slot.pid,
                        limit,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.kill()
            await asyncio.wait(pending, timeout=STOP_GRACE)
            status = 1
        log.info("all workers stopped")
        return status

    # --- worker processes ---------------------------------------------------------------
    async def _spawn(self, slot: _Worker) -> None:
        assert self._snapshot_path is not None
        parent, child = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "fastedge.workers",
            "--index",
            str(slot.index),
            "--snapshot",
            str(self._snapshot_path),
            "--port",
            str(self.port),
            "--status-fd",
            str(child.fileno()),
            "--log-level",
            self.log_level,
        ]
        if self.config_path is not None:
            argv += ["--source", os.path.abspath(self.config_path)]
        if self.http_override is not None:
            argv += ["--http", self.http_override]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=(child.fileno(),)
            )
        except OSError as exc:
            parent.close()
            slot.process = None
            slot.error = f"cannot start a process: {exc}"
            log.error("worker %d: %s", slot.index, slot.error)
            self._changed.set()
            if self._started:
                self._schedule_restart(slot, self._next_backoff(slot))
            return
        finally:
            child.close()
        slot.process = process
        slot.pid = process.pid
        slot.ready = False
        slot.ready_at = None
        slot.error = None
        slot.started_at = self._loop.time()
        slot.watcher = self._loop.create_task(self._watch(slot, process, parent))

    async def _watch(
        self, slot: _Worker, process: asyncio.subprocess.Process, sock: socket.socket
    ) -> None:
        """Follow one worker process: its status messages, then its exit."""
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            while line := await reader.readline():
                try:
                    message = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.error("worker %d sent an unreadable status line", slot.index)
                    continue
                await self._on_message(slot, message)
        except OSError:
            pass
        finally:
            writer.close()
        code = await process.wait()
        self._on_exit(slot, code)

    async def _on_message(self, slot: _Worker, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "ready":
            slot.ready = True
            slot.ready_at = self._loop.time()
            slot.admin_port = message.get("admin_port")
            slot.generation = str(message.get("generation", ""))
            log.info("worker %d ready (pid %s)", slot.index, slot.pid)
            self._changed.set()
            if slot.generation != self.snapshot.generation and slot.pid is not None:
                # It read the snapshot before a reload replaced it: catch it up.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGHUP)
            await self._replay_to(slot)
        elif event == "reload":
            self._on_reload_result(slot, bool(message.get("ok")), str(message.get("generation")))
        elif event == "stopping":
            slot.ready = False
            self._changed.set()
        elif event == "failed":
            slot.error = str(message.get("error", "unknown error"))

    def _on_exit(self, slot: _Worker, code: int) -> None:
        was_ready_at = slot.ready_at
        slot.ready = False
        self._changed.set()
        self._reload_waiting.discard(slot.index)
        if self._stopping.is_set():
            log.info("worker %d (pid %s) exited (%s)", slot.index, slot.pid, _describe_exit(code))
            return
        if not self._started:
            return  # _wait_started reports it and stops the instance
        served = 0.0 if was_ready_at is None else self._loop.time() - was_ready_at
        if served >= STABLE_AFTER:
            slot.crashes_in_a_row = 0
        delay = self._next_backoff(slot)
        detail = f": {slot.error}" if slot.error else ""
        log.warning(
            "worker %d (pid %s) stopped unexpectedly (%s%s); restarting in %gs",
            slot.index,
            slot.pid,
            _describe_exit(code),
            detail,
            delay,
        )
        self._schedule_restart(slot, delay)

    @staticmethod
    def _next_backoff(slot: _Worker) -> float:
        delay = RESTART_BACKOFF_FIRST * 2.0 ** min(slot.crashes_in_a_row, 16)
        slot.crashes_in_a_row += 1
        return min(delay, RESTART_BACKOFF_MAX)

    def _schedule_restart(self, slot: _Worker, delay: float) -> None:
        async def restart() -> None:
            await asyncio.sleep(delay)
            if self._stopping.is_set():
                return
            slot.restarts += 1
            self.metrics.inc("fastedge_worker_restarts_total")
            await self._spawn(slot)

        slot.restart = self._loop.create_task(restart())

    # --- reload -------------------------------------------------------------------------
    def reload(self) -> None:
        """``SIGHUP``: validate the file once here, then have every worker load it."""
        if self.config_path is None:
            log.warning("reload requested but the config did not come from a file")
            return
        try:
            snapshot, config = read_config_file(self.config_path)
        except ConfigError as err:
            log.error("reload refused, the running config stays:\n%s", err)
            self.metrics.inc("fastedge_config_reloads_total", (("result", "failure"),))
            return
        config = _with_http_override(config, self.http_override)
        old = self.config
        if config.server.listen != old.server.listen:
            log.warning("server.listen changed: takes effect on restart")
        if config.admin != old.admin:
            log.warning("[admin] changed: takes effect on restart")
        if config.server.workers != old.server.workers and not self.workers_from_cli:
            log.warning("server.workers changed: takes effect on restart")
        assert self._dir is not None
        self.snapshot = snapshot
        self.config = config
        snapshot.write(self._dir)
        self._reload_waiting = set()
        for slot in self.slots:
            if slot.ready and slot.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGHUP)
                    self._reload_waiting.add(slot.index)
            # A worker still starting reads the new snapshot, or is caught up when ready.
        log.info("reloading %d workers (config %s)", len(self._reload_waiting), snapshot.generation)

    def _on_reload_result(self, slot: _Worker, ok: bool, generation: str) -> None:
        slot.generation = generation if ok else slot.generation
        if not ok:
            log.error("worker %d refused the reload; it keeps its running config", slot.index)
        if slot.index in self._reload_waiting:
            self._reload_waiting.discard(slot.index)
            if not self._reload_waiting:
                current = sum(1 for s in self.slots if s.generation == self.snapshot.generation)
                log.info("config reloaded: %d of %d workers run it", current, len(self.slots))

    # --- admin --------------------------------------------------------------------------
    def ready(self) -> bool:
        """Readiness: every worker is ready (a worker restarting means reduced capacity,
        which a load balancer should know about) and no shutdown has begun."""
        return not self._stopping.is_set() and all(s.ready for s in self.slots)

    def _ready_slots(self) -> list[_Worker]:
        return [s for s in self.slots if s.ready and s.admin_port is not None]

    def health(self, request_id: str) -> AdminResponse:
        """``GET /healthz``: 200 while at least one worker serves, else 503."""
        ready = sum(1 for s in self.slots if s.ready)
        workers = {"ready": ready, "total": len(self.slots)}
        if ready:
            return AdminResponse.json({"status": "ok", "workers": workers})
        return AdminResponse.json(
            {
                "error": "no worker is serving",
                "status": 503,
                "request_id": request_id,
                "workers": workers,
            },
            status=503,
        )

    def _auth_headers(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")] if self._token else []

    async def _ask(self, slot: _Worker, method: str, target: str, request_id: str) -> AdminResponse:
        """The supervisor's own request to a worker's admin (authenticated with the
        instance token, which the workers share)."""
        assert slot.admin_port is not None
        return await relay(
            "127.0.0.1",
            slot.admin_port,
            method,
            target,
            headers=self._auth_headers(),
            request_id=request_id,
            timeout=ADMIN_RELAY_TIMEOUT,
        )

    async def _gather(
        self, slots: Sequence[_Worker], method: str, target: str, request_id: str
    ) -> list[AdminResponse | RelayError]:
        results = await asyncio.gather(
            *(self._ask(s, method, target, request_id) for s in slots), return_exceptions=True
        )
        out: list[AdminResponse | RelayError] = []
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, RelayError):
                raise result
            out.append(result)
        return out

    async def metrics_response(self, request_id: str) -> AdminResponse:
        """``GET /metrics``: every ready worker scraped and summed, plus the supervisor's
        own families. A worker that does not answer fails the scrape (502): a partial sum
        would look like counters going backwards."""
        slots = self._ready_slots()
        answers = await self._gather(slots, "GET", "/metrics", request_id)
        texts: list[bytes] = []
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, RelayError) or answer.status != 200:
                detail = answer if isinstance(answer, RelayError) else f"status {answer.status}"
                raise AdminError(502, f"worker {slot.index} (pid {slot.pid}): {detail}")
            assert isinstance(answer.body, bytes)
            texts.append(answer.body)
        texts.append(self.metrics.render())
        workers = MetricFamily(
            "fastedge_workers",
            "gauge",
            "Worker processes serving (ready), out of server.workers.",
            [("fastedge_workers", (), len(slots))],
        )
        try:
            body = merge_expositions(texts, [workers])
        except ExpositionError as exc:
            raise AdminError(502, f"a worker's metrics could not be read: {exc}") from None
        return AdminResponse(200, [("content-type", CONTENT_TYPE)], body)

    async def _workers_view(self, request: AdminRequest) -> AdminResponse:
        """``GET /workers``: each worker's pid, state, restarts and requests answered."""
        now = self._loop.time()
        slots = self._ready_slots()
        answers = await self._gather(slots, "GET", "/metrics", request.request_id)
        served: dict[int, int] = {}
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, AdminResponse) and isinstance(answer.body, bytes):
                served[slot.index] = _requests_total(answer.body)
        return AdminResponse.json(
            {
                "workers": [
                    {
                        "index": s.index,
                        "pid": s.pid,
                        "state": "ready" if s.ready else ("starting" if s.running else "down"),
                        "restarts": s.restarts,
                        "uptime_seconds": round(now - s.started_at, 3) if s.running else None,
                        "requests": served.get(s.index),
                    }
                    for s in self.slots
                ],
                "port": self.port,
            }
        )

    async def _traces(self, request: AdminRequest) -> AdminResponse:
        """``GET /traces``: the most recent spans of all workers, newest first."""
        query = parse_qs(request.query)
        try:
            limit = max(1, min(int(query.get("limit", ["100"])[0]), 1000))
        except ValueError:
            raise AdminError(400, "limit must be an integer") from None
        docs = await self._all_json(request)
        if isinstance(docs, AdminResponse):
            return docs
        spans: list[dict[str, Any]] = [span for doc in docs for span in doc.get("spans", [])]
        spans.sort(key=lambda span: int(span.get("start_unix_nano", 0)), reverse=True)
        return AdminResponse.json({"spans": spans[:limit]})

    async def _all_json(self, request: AdminRequest) -> list[Any] | AdminResponse:
        """Ask every ready worker the same ``GET``; their JSON bodies, or the answer to
        pass on when they do not all say 200 (e.g. 404: the feature is not configured)."""
        target = request.path + (f"?{request.query}" if request.query else "")
        slots = self._ready_slots()
        if not slots:
            raise AdminError(503, "no worker is ready")
        answers = await self._gather(slots, "GET", target, request.request_id)
        docs: list[Any] = []
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, RelayError):
                raise AdminError(502, f"worker {slot.index} (pid {slot.pid}): {answer}")
            if answer.status != 200:
                return answer
            assert isinstance(answer.body, bytes)
            docs.append(orjson.loads(answer.body))
        return docs

    async def _stats(self, request: AdminRequest) -> AdminResponse:
        """``GET /stats`` (the dashboard's time series) for the whole instance."""
        docs = await self._all_json(request)
        if isinstance(docs, AdminResponse):
            return docs
        return AdminResponse.json(merge_stats(docs))

    async def _relay(self, request: AdminRequest) -> AdminResponse:
        """Everything the supervisor does not answer itself (see the module docstring)."""
        slots = self._ready_slots()
        if not slots:
            raise AdminError(503, "no worker is ready")
        if request.method in ("GET", "HEAD"):
            failures: list[str] = []
            for slot in slots:  # a read can be answered by any worker
                try:
                    return _dedupe_login(await self._forward(slot, request), request)
                except RelayError as exc:
                    failures.append(f"worker {slot.index} (pid {slot.pid}): {exc}")
            raise AdminError(502, "; ".join(failures))
        answers = await asyncio.gather(
            *(self._forward(s, request) for s in slots), return_exceptions=True
        )
        failed: list[str] = []
        applied: list[str] = []
        for slot, answer in zip(slots, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, RelayError):
                    raise answer
                failed.append(f"worker {slot.index} (pid {slot.pid}): {answer}")
            elif answer.status >= 500:
                failed.append(f"worker {slot.index} (pid {slot.pid}): status {answer.status}")
            else:
                applied.append(str(slot.index))
        first = answers[0]
        if not failed:
            assert isinstance(first, AdminResponse)
            statuses = {a.status for a in answers if isinstance(a, AdminResponse)}
            if len(statuses) > 1:
                raise AdminError(
                    502,
                    "workers answered differently: "
                    + ", ".join(
                        f"worker {s.index} {a.status}"
                        for s, a in zip(slots, answers, strict=True)
                        if isinstance(a, AdminResponse)
                    ),
                )
            if 200 <= first.status < 300 and request.method in ("PUT", "DELETE"):
                self._remember(request)
                # A worker that became ready while this ran replayed the log before the
                # change was in it: bring it along now.
                for slot in self._ready_slots():
                    if slot not in slots:
                        await self._replay_to(slot, [request])
            return first
        where = f"; applied by worker {', '.join(applied)}" if applied else ""
        raise AdminError(502, f"failed in {'; '.join(failed)}{where}")

    async def _forward(self, slot: _Worker, request: AdminRequest) -> AdminResponse:
        assert slot.admin_port is not None
        target = request.path + (f"?{request.query}" if request.query else "")
        return await relay(
            "127.0.0.1",
            slot.admin_port,
            request.method,
            target,
            headers=request.headers,
            body=request.body,
            request_id=request.request_id,
            timeout=ADMIN_RELAY_TIMEOUT,
        )

    def _remember(self, request: AdminRequest) -> None:
        # PUT and DELETE are idempotent (RFC 9110 §9.2.2): the last one per path is the
        # state, so replaying it to a new worker reproduces what the others hold.
        self._replay.pop(request.path, None)
        self._replay[request.path] = request

    async def _replay_to(self, slot: _Worker, requests: Sequence[AdminRequest] = ()) -> None:
        """Send the remembered changes (or ``requests``) to a worker that just started."""
        for request in list(requests or self._replay.values()):
            # With the instance token, not the client's credentials (a dashboard cookie
            # expires) nor its browser headers (no Origin: this is not a web page).
            headers = [
                (name, value)
                for name, value in request.headers
                if name not in ("authorization", "cookie", "origin", "sec-fetch-site", "referer")
            ]
            replayed = dataclasses.replace(request, headers=headers + self._auth_headers())
            try:
                answer = await self._forward(slot, replayed)
            except RelayError as exc:
                log.error(
                    "worker %d: replaying %s %s failed: %s",
                    slot.index,
                    request.method,
                    request.path,
                    exc,
                )
                continue
            if not 200 <= answer.status < 300:
                log.error(
                    "worker %d: replaying %s %s answered %d",
                    slot.index,
                    request.method,
                    request.path,
                    answer.status,
                )


def merge_stats(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine the workers' ``GET /stats`` documents (:mod:`fastedge.admin.stats`).

    Each worker samples its own counters once a second, so the n-th most recent point of
    every worker covers (nearly) the same second: points are aligned from the newest.
    Rates and error rates add up; totals add up. Latency quantiles cannot be merged from
    quantiles, so the instance's p50 is the request-weighted mean of the workers' p50s and
    its p99 the highest worker p99 (an upper bound: a slow worker is never averaged away).
    """
    series: list[list[Mapping[str, Any]]] = [list(doc.get("points", [])) for doc in docs]
    points: list[dict[str, Any]] = []
    for back in range(max((len(s) for s in series), default=0), 0, -1):
        group = [s[-back] for s in series if len(s) >= back]
        p50 = [(p["p50_ms"], p.get("rps", 0)) for p in group if p.get("p50_ms") is not None]
        p99 = [p["p99_ms"] for p in group if p.get("p99_ms") is not None]
        weight = sum(w for _, w in p50)
        points.append(
            {
                "t": max(p.get("t", 0) for p in group),
                "rps": round(sum(p.get("rps", 0) for p in group), 2),
                "errors": round(sum(p.get("errors", 0) for p in group), 2),
                "p50_ms": (
                    None
                    if not p50
                    else round(sum(v * w for v, w in p50) / weight, 3)
                    if weight > 0
                    else max(v for v, _ in p50)
                ),
                "p99_ms": max(p99) if p99 else None,
            }
        )
    by_class: dict[str, int] = {}
    for doc in docs:
        for key, count in doc.get("totals", {}).get("by_class", {}).items():
            by_class[key] = by_class.get(key, 0) + count
    first = docs[0] if docs else {}
    return {
        **first,
        "points": points,
        "totals": {
            "requests": sum(doc.get("totals", {}).get("requests", 0) for doc in docs),
            "by_class": by_class,
        },
        "workers": len(docs),
    }


def _requests_total(exposition: bytes) -> int:
    """The sum of ``fastedge_requests_total`` in one exposition."""
    total = 0.0
    for line in exposition.decode("utf-8", "replace").splitlines():
        if line.startswith("fastedge_requests_total"):
            with contextlib.suppress(ValueError):
                total += float(line.rpartition(" ")[2])
    return int(total)


def _dedupe_login(response: AdminResponse, request: AdminRequest) -> AdminResponse:
    """A worker answering a dashboard login (``GET /?token=``) also sets the session
    cookie; the supervisor's admin sets its own, so drop the worker's copy."""
    from fastedge.admin import session

    if session.query_token(request.query) is None:
        return response
    response.headers = [
        (name, value)
        for name, value in response.headers
        if not (name == "set-cookie" and value.startswith(f"{session.SESSION_COOKIE}="))
        and name != "referrer-policy"
    ]
    return response


# --------------------------------------------------------------------------- entry points


def run_supervisor(
    snapshot: ConfigSnapshot,
    config: Config,
    *,
    workers: int,
    workers_from_cli: bool,
    config_path: str | None,
    http_override: str | None,
    log_level: str,
) -> int:
    """Run a supervisor on uvloop until it stops; returns the process exit status."""
    from fastedge import server

    async def main() -> int:
        supervisor = Supervisor(
            snapshot,
            config,
            workers=workers,
            workers_from_cli=workers_from_cli,
            config_path=config_path,
            http_override=http_override,
            log_level=log_level,
        )
        return await supervisor.run()

    return int(server.run(main()))


if __name__ == "__main__":
    raise SystemExit(worker_main())
