"""Where runtime traffic changes live: a local state file, or Redis shared by instances.

Both keep the same JSON *overrides document* (see :data:`fastedge.traffic.Document`).

**File** (no ``[redis]``; ``[traffic_state] file``). A change is applied in memory first
(requests follow it at once), then the whole document is written atomically: a temporary
file in the same directory, ``fsync``, ``rename`` over the old file (``os.replace``,
atomic on POSIX), then ``fsync`` of the directory so the rename itself survives a power
loss. A reader (the next start) therefore sees the old or the new document, never a torn
one. Writes run in a worker thread (an ``fsync`` can take milliseconds; the event loop
must not wait for it) and one at a time, each writing the newest document, so the last
write always holds the last change. When the write fails (disk full, read-only or
removed directory, permissions), the change still serves from memory, the admin answer
says ``"persisted": false``, ``fastedge_state_write_errors_total`` counts it and the
error is logged at most once per :data:`LOG_INTERVAL` (with the number of failures in
between). A missing file at start means "no changes yet"; an unreadable or corrupt one is
logged, moved aside to ``<file>.corrupt`` and the config's values serve.

**Redis** (``[redis]``). The document is one state of
:class:`fastedge.state.RedisCoordinator` (key ``<prefix>state:data:traffic``) changed with
its atomic ``update`` (an optimistic compare-and-set), carrying an ``epoch`` (random, set
when the document is created) and a ``rev`` that every change increments. After a change
the new document is published on the channel ``<prefix>traffic``. Every instance runs one
subscriber task that applies a published document when it is newer than its own (same
epoch, higher rev; or another epoch: Redis lost its data and someone started afresh), and
re-reads the state every ``resync_interval`` and right after each (re)subscription, so a
missed message heals. The subscription's liveness is checked with a ``PING`` each
interval; no answer for two intervals means a dead connection and a reconnect. When Redis
is down, the last known values keep serving, failures are counted in
``fastedge_traffic_sync_errors_total`` and logged at most once per ``LOG_INTERVAL``, and
the task retries with a jittered backoff (0.1 s doubling to 2 s). An admin change while
Redis is down is refused (503) rather than applied locally, since one instance diverging
from the fleet silently is worse than a change that must be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from fastedge.state import RedisCoordinator, StateContention, StateUnavailable
from fastedge.traffic import (
    DEFAULT_STATE_FILE,
    Document,
    StateBackend,
    TrafficStateConfig,
    TrafficStore,
    TrafficUnavailable,
    clean_document,
    empty_document,
)

if TYPE_CHECKING:
    from fastedge.config import Config
    from fastedge.filters import Runtime
    from fastedge.observe.metrics import Metrics

__all__ = ["FileBackend", "RedisBackend", "open_backend", "write_atomic"]

log = logging.getLogger("fastedge.traffic")

WRITE_ERRORS: Final = "fastedge_state_write_errors_total"
SYNC_ERRORS: Final = "fastedge_traffic_sync_errors_total"

LOG_INTERVAL: Final = 60.0
"""Seconds between two log lines about the same failing state file or Redis; a disk that
stays full must not flood the log with one line per admin call or resync."""

STATE_KEY: Final = "traffic"
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0


def open_backend(config: Config, runtime: Runtime) -> StateBackend:
    """The backend ``config`` asks for: Redis with ``[redis]``, else the state file
    (``[traffic_state] file``), else memory."""
    from fastedge.traffic import _MemoryBackend

    state_cfg = config.sections.get("traffic_state")
    if not isinstance(state_cfg, TrafficStateConfig):
        state_cfg = TrafficStateConfig()
    redis_cfg = config.sections.get("redis")
    if redis_cfg is not None:
        return RedisBackend(
            runtime.redis(),
            key_prefix=redis_cfg.key_prefix,
            timeout=redis_cfg.timeout,
            resync_interval=state_cfg.resync_interval,
            metrics=runtime.metrics,
        )
    path = state_file_path(config, state_cfg)
    if path is None:
        return _MemoryBackend()
    return FileBackend(path, runtime.metrics)


def state_file_path(config: Config, state_cfg: TrafficStateConfig) -> str | None:
    """The state file ``config`` uses, or ``None`` (in memory)."""
    if state_cfg.file is False:
        return None
    if state_cfg.file is True:
        if config.source is None:
            return None  # an embedded or generated config: nowhere obvious to write
        return os.path.join(os.path.dirname(os.path.abspath(config.source)), DEFAULT_STATE_FILE)
    return state_cfg.file


class _RateLimitedLog:
    """Log a recurring failure once per ``interval`` with the count of those in between."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += " (%d similar failures not logged since the last report)"
            args = (*args, self.suppressed)
        log.error(message, *args)
        self.last = now
        self.suppressed = 0


# --------------------------------------------------------------------------- file


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring).
    Raises :class:`OSError`; the temporary file never outlives a failure."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastedge-state.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileBackend:
    """Overrides persisted in a local JSON file (see the module docstring)."""

    kind = "file"

    def __init__(self, path: str, metrics: Metrics) -> None:
        self.path = path
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._log = _RateLimitedLog()
        metrics.describe(
            WRITE_ERRORS,
            "counter",
            "Failed writes of the traffic state file (disk full, unwritable); the change "
            "kept serving from memory.",
        )

    def load(self) -> Document | None:
        """The document in the file, ``None`` when there is none (or it is unusable)."""
        try:
            with open(self.path, "rb") as file:
                raw = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the traffic state file %s: %s; using the config", self.path, exc)
            return None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self.path + ".corrupt"
            try:
                os.replace(self.path, aside)
                where = f"moved to {aside}"
            except OSError as move_exc:
                where = f"could not be moved aside: {move_exc}"
            log.error(
                "the traffic state file %s is not valid JSON (%s); %s; using the config",
                self.path,
                exc,
                where,
            )
            return None
        log.info("traffic state loaded from %s", self.path)
        return clean_document(data, self.path)

    def start(self, store: TrafficStore) -> None:
        pass

    async def commit(self, store: TrafficStore, change: Callable[[Document], Document]) -> bool:
        # Memory first: serving follows the change even when the disk cannot.
        store.apply_document(change(store.document()))
        return await self.save(store)

    async def save(self, store: TrafficStore) -> bool:
        """Write the store's current document; whether it reached the disk."""
        async with self._lock:
            # Serialised inside the lock: each write carries the newest document.
            data = json.dumps(store.document(), indent=1, sort_keys=True).encode() + b"\n"
            try:
                await asyncio.to_thread(write_atomic, self.path, data)
            except OSError as exc:
                self.metrics.inc(WRITE_ERRORS)
                self._log(
                    "cannot write the traffic state file %s: %s; the change serves from "
                    "memory and is lost on restart",
                    self.path,
                    exc.strerror or exc,
                )
                return False
        return True

    async def aclose(self) -> None:
        async with self._lock:  # let a write in progress finish
            pass


# --------------------------------------------------------------------------- Redis


def _next_revision(old: Any, change: Callable[[Document], Document]) -> Document:
    """The document after ``change``, with ``rev`` + 1 (a fresh ``epoch`` when the stored
    one is missing or malformed). Pure: the compare-and-set may run it several times."""
    if isinstance(old, dict) and isinstance(old.get("epoch"), str) and type(old.get("rev")) is int:
        doc = clean_document(old, "redis")
    else:
        doc = empty_document()
        doc["epoch"] = uuid.uuid4().hex
        doc["rev"] = 0
    new = change(doc)
    new["rev"] = doc["rev"] + 1
    new["epoch"] = doc["epoch"]
    return new


class RedisBackend:
    """Overrides shared through Redis (see the module docstring)."""

    kind = "redis"

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "fastedge:",
        timeout: float = 0.25,
        resync_interval: float = 5.0,
        metrics: Metrics,
    ) -> None:
        self.client = client
        self.coord = RedisCoordinator(client, key_prefix=f"{key_prefix}state:", timeout=timeout)
        self.channel = f"{key_prefix}traffic"
        self.timeout = timeout
        self.resync_interval = resync_interval
        self.metrics = metrics
        self.epoch: str | None = None
        self.rev = -1
        self.synced = asyncio.Event()  # set after the first successful read of Redis
        self._store: TrafficStore | None = None
        self._task: asyncio.Task[None] | None = None
        self._log = _RateLimitedLog(10.0)
        metrics.describe(
            SYNC_ERRORS,
            "counter",
            "Failed reads, writes or subscriptions of the shared traffic state in Redis.",
        )

    def load(self) -> Document | None:
        return None  # read by the sync task as soon as it runs

    def start(self, store: TrafficStore) -> None:
        self._store = store
        self._task = asyncio.get_running_loop().create_task(self._run())

    def accept(self, doc: Any) -> bool:
        """Apply ``doc`` when it is newer than what this instance has; whether it was."""
        if not isinstance(doc, dict):
            return False
        epoch, rev = doc.get("epoch"), doc.get("rev")
        if not isinstance(epoch, str) or type(rev) is not int:
            return False
        if epoch == self.epoch and rev <= self.rev:
            return False
        self.epoch, self.rev = epoch, rev
        assert self._store is not None
        self._store.apply_document(doc)
        return True

    async def commit(self, store: TrafficStore, change: Callable[[Document], Document]) -> bool:
        try:
            doc = await self.coord.update(STATE_KEY, lambda old: _next_revision(old, change))
        except (StateUnavailable, StateContention) as exc:
            self.metrics.inc(SYNC_ERRORS)
            raise TrafficUnavailable(f"shared traffic state unavailable ({exc})") from exc
        self.accept(doc)
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(self.channel, json.dumps(doc))
        except Exception as exc:  # stored already: the others catch up at their resync
            self.metrics.inc(SYNC_ERRORS)
            self._log("publishing a traffic change on Redis failed: %s", exc)
        return True

    async def resync(self) -> None:
        """Read the state from Redis and apply it if newer (a missed message heals)."""
        doc = await self.coord.get(STATE_KEY)
        if doc is not None:
            self.accept(doc)
        self.synced.set()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            pubsub = None
            try:
                pubsub = self.client.pubsub()
                async with asyncio.timeout(max(1.0, self.timeout * 4)):
                    await pubsub.subscribe(self.channel)
                # Subscribed first, then read: a change between the two is in both.
                await self.resync()
                backoff = BACKOFF_MIN
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.inc(SYNC_ERRORS)
                self._log(
                    "traffic state sync with Redis failed (%s); keeping the last known "
                    "values and retrying",
                    str(exc) or type(exc).__name__,
                )
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        interval = self.resync_interval
        next_resync = loop.time() + interval
        heard = loop.time()
        while True:
            wait = max(0.0, next_resync - loop.time())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            now = loop.time()
            if message is not None:
                heard = now
                if message.get("type") == "message":
                    try:
                        self.accept(json.loads(message["data"]))
                    except ValueError:
                        log.warning("ignoring a malformed traffic message on %s", self.channel)
            if now >= next_resync:
                if now - heard > 2 * interval + self.timeout:
                    raise StateUnavailable("no answer on the pub/sub connection")
                await pubsub.ping()  # its PONG arrives as a message: proof of life
                await self.resync()
                next_resync = now + interval

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
