"""Upstream connection pool, one per target (scheme, host, port).

Bookkeeping is kept apart from I/O (the httpcore way): :class:`PoolState` is plain
synchronous code that decides — reuse this idle connection, open a new one, or wait — and
returns what to do; :class:`ConnectionPool` does the asyncio part (connecting, waking
waiters, timers). ``PoolState`` is tested without sockets.

Rules:

* keep-alive reuse, most recently used first (warm connections, and idle ones at the cold
  end of the stack time out and close);
* at most ``max_connections`` per target (active + connecting + idle); beyond that a
  request waits in FIFO order for up to ``wait_timeout``, then fails with 503;
* a connection goes back to the pool only when its previous response was read to the end
  and the upstream allows keep-alive (the caller says so in :meth:`release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, Protocol

from fastedge.errors import Kind, ProxyError


class PooledConnection(Protocol):
    """What the pool needs from a connection."""

    idle_since: float

    def is_usable(self) -> bool:
        """Open, and no stray bytes or EOF arrived while idle."""

    def close(self) -> None:
        """Close the transport."""


class PooledBase:
    """A connection over a transport, which the pool asks :meth:`is_usable` as a C call:
    the compiled pool (pool.pxd) takes one from the idle stack per request on the proxy's
    express lane. Any other object with :class:`PooledConnection`'s methods works too."""

    __slots__ = ("_dead", "transport")

    def __init__(self) -> None:
        # Types as comments: annotations here would clash with pool.pxd.
        self.transport = None  # type: Any
        # Set when the connection must never be reused: stray bytes or EOF while idle,
        # closed by us, or lost.
        self._dead = False

    def is_usable(self) -> bool:
        """Open, and no stray bytes or EOF arrived while idle."""
        t = self.transport
        return not self._dead and t is not None and not t.is_closing()


def _usable(conn):  # type: (Any) -> bool
    """``conn.is_usable()``: a C call when ``conn`` is a :class:`PooledBase`."""
    if isinstance(conn, PooledBase):
        base = conn  # compiled: typed PooledBase (pool.pxd), so the call is a C call
        return base.is_usable()
    return bool(conn.is_usable())


# The pool holds whatever its connect function makes (the proxy's UpstreamConnection;
# fakes in tests), typed Any where it hands one out. The classes are not Generic: the
# compiled build makes them C structs (pool.pxd), and an extension type cannot derive
# from typing.Generic; the express lane checks a connection out and back in per request.


class PoolState:
    """The pool's bookkeeping: idle stack, counts and the wait queue, no I/O."""

    __slots__ = ("busy", "idle", "idle_timeout", "max_connections", "waiters")

    def __init__(self, max_connections: int, idle_timeout: float) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        # Types as comments: annotations here would clash with pool.pxd.
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.idle = []  # type: list[Any]
        self.busy = 0  # checked out or connecting
        self.waiters = deque()  # type: deque[asyncio.Future[Any]]

    @property
    def total(self) -> int:
        """Connections counted against ``max_connections``."""
        return self.busy + len(self.idle)

    def checkout(self) -> tuple[Any, bool, list[Any]]:
        """Decide how to serve one request.

        Returns ``(conn, may_connect, to_close)``: a reusable idle connection, or
        ``may_connect`` True when a new connection may be opened (the slot is reserved),
        or neither (the caller must wait). ``to_close`` are dead idle connections found on
        the way, to be closed by the caller.
        """
        to_close: list[Any] = []
        idle = self.idle
        while idle:
            conn = idle.pop()  # most recently used first
            if conn.is_usable():
                self.busy += 1
                return conn, False, to_close
            to_close.append(conn)
        if self.busy < self.max_connections:
            self.busy += 1
            return None, True, to_close
        return None, False, to_close

    def checkin(
        self, conn: PooledConnection | None, reusable: bool, now: float
    ) -> tuple[Any, bool]:
        """A checked-out slot comes back (``conn`` None: a connect attempt failed).

        Returns ``(handoff, freed)``: a waiter to give ``conn`` to directly is handled by
        the caller; here we only say whether ``conn`` should be kept (``handoff`` is the
        connection to keep or give) and whether a slot was freed (so a waiter may connect).
        """
        self.busy -= 1
        if conn is not None and reusable and conn.is_usable():
            conn.idle_since = now
            return conn, False
        return None, True

    def expire(self, now: float) -> list[Any]:
        """Remove and return idle connections past ``idle_timeout`` (oldest are leftmost)."""
        idle = self.idle
        n = 0
        while n < len(idle) and (
            now - idle[n].idle_since >= self.idle_timeout or not idle[n].is_usable()
        ):
            n += 1
        out = idle[:n]
        del idle[:n]
        return out

    def discard_idle(self, conn: PooledConnection) -> bool:
        """An idle connection died (upstream closed it); forget it."""
        try:
            self.idle.remove(conn)
        except ValueError:
            return False
        return True


class ConnectionPool:
    """Asyncio side of a target's pool: connects, hands out and takes back connections."""

    __slots__ = (
        "_closed",
        "_connect",
        "_draining",
        "_expire_handle",
        "_loop",
        "connect_timeout",
        "name",
        "state",
        "wait_timeout",
    )

    def __init__(
        self,
        name: str,
        connect: Callable[[], Any],
        *,
        max_connections: int,
        idle_timeout: float,
        wait_timeout: float,
        connect_timeout: float,
    ) -> None:
        """``connect`` is a coroutine function opening one connection."""
        self.name = name
        self._connect = connect
        self.state = PoolState(max_connections, idle_timeout)
        self.wait_timeout = wait_timeout
        self.connect_timeout = connect_timeout
        self._loop = asyncio.get_running_loop()
        self._expire_handle = None  # type: asyncio.TimerHandle | None
        self._closed = False
        self._draining = False

    def acquire_idle(self) -> tuple[Any, bool]:
        """Synchronous fast path: ``(conn, may_connect)``; see :meth:`PoolState.checkout`."""
        conn, may_connect, to_close = self.state.checkout()
        for dead in to_close:
            dead.close()
        return conn, may_connect

    def take_idle(self) -> Any:
        """The express lane's checkout: the most recently used idle connection when it
        is usable, else ``None`` (nothing reserved or closed; the caller takes the
        general path, which does the full :meth:`acquire_idle`). Nobody waits while a
        connection is idle: a released connection goes to the first waiter."""
        state = self.state
        idle = state.idle
        if idle and not self._closed:
            conn = idle[-1]
            if _usable(conn):
                idle.pop()
                state.busy += 1
                return conn
        return None

    def give_back(self, conn: Any, reusable: bool) -> None:
        """:meth:`release` for the express lane: parks a reusable connection directly
        when nobody waits and the pool is open; anything else goes through release."""
        state = self.state
        # No is_usable() check: a connection that closed while carrying an express
        # request was handed to the general path, and one closing from now on is
        # discarded by its connection_lost (take_idle checks again anyway).
        if not reusable or self._closed or self._draining or state.waiters:
            self.release(conn, reusable)
            return
        state.busy -= 1
        conn.idle_since = monotonic()
        state.idle.append(conn)
        if self._expire_handle is None:
            self._schedule_expiry()

    async def acquire(self) -> tuple[Any, bool]:
        """A connection for one request: ``(conn, reused)``.

        Raises :class:`ProxyError` (502 connect failure/timeout, 503 pool wait timeout).
        """
        if self._closed:
            raise ProxyError(Kind.UNAVAILABLE, "pool", detail="upstream pool closed")
        conn, may_connect = self.acquire_idle()
        if conn is not None:
            return conn, True
        if not may_connect:
            waiter: asyncio.Future[Any] = self._loop.create_future()
            self.state.waiters.append(waiter)
            try:
                got = await asyncio.wait_for(waiter, self.wait_timeout)
            except TimeoutError:
                raise ProxyError(
                    Kind.UNAVAILABLE,
                    "pool",
                    retryable=True,
                    detail=f"no upstream connection available for {self.name}",
                ) from None
            except BaseException:
                # Cancelled after a connection or slot was handed to us: give it back,
                # or the pool would count it as busy forever.
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    handed = waiter.result()
                    if handed is None:
                        self._slot_freed()
                    else:
                        self.release(handed, True)
                raise
            finally:
                with contextlib.suppress(ValueError):  # still queued: timed out or cancelled
                    self.state.waiters.remove(waiter)
            if got is not None:
                return got, True
            # Woken with a free slot (got None): connect ourselves; the slot is reserved.
        return await self._open(), False

    async def open_reserved(self) -> Any:
        """Connect using the slot that :meth:`acquire_idle` reserved (``may_connect``)."""
        return await self._open()

    def cancel_reserved(self) -> None:
        """Give back a slot reserved by :meth:`acquire_idle` without connecting."""
        self._slot_freed()

    async def _open(self) -> Any:
        try:
            conn: Any = await asyncio.wait_for(self._connect(), self.connect_timeout)
        except TimeoutError:
            self._slot_freed()
            raise ProxyError(
                Kind.UPSTREAM_UNREACHABLE,
                "upstream",
                retryable=True,
                detail=f"connect to {self.name} timed out",
            ) from None
        except (OSError, ssl.SSLError) as exc:
            self._slot_freed()
            raise ProxyError(
                Kind.UPSTREAM_UNREACHABLE,
                "upstream",
                retryable=True,
                detail=f"connect to {self.name} failed: {exc.strerror or exc}"
                if isinstance(exc, OSError)
                else f"TLS handshake with {self.name} failed: {exc}",
            ) from None
        except BaseException:
            self._slot_freed()
            raise
        return conn

    def release(self, conn: PooledConnection, reusable: bool) -> None:
        """Give a connection back; kept only if ``reusable`` (response fully read,
        keep-alive) and still open."""
        keep, freed = self.state.checkin(
            conn, reusable and not self._closed and not self._draining, monotonic()
        )
        if keep is None:
            conn.close()
            if freed:
                self._wake_one_for_slot()
            return
        # Hand straight to the oldest waiter, else park it idle.
        waiters = self.state.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self.state.busy += 1
                waiter.set_result(keep)
                return
        self.state.idle.append(keep)
        self._schedule_expiry()

    def _slot_freed(self) -> None:
        self.state.busy -= 1
        self._wake_one_for_slot()

    def _wake_one_for_slot(self) -> None:
        waiters = self.state.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self.state.busy += 1  # reserve the slot for the woken waiter
                waiter.set_result(None)
                return

    def discard(self, conn: PooledConnection) -> None:
        """An idle connection was closed by the upstream."""
        self.state.discard_idle(conn)

    def _schedule_expiry(self) -> None:
        if self._expire_handle is None:
            self._expire_handle = self._loop.call_later(
                max(self.state.idle_timeout / 4, 0.05), self._expire
            )

    def _expire(self) -> None:
        self._expire_handle = None
        for conn in self.state.expire(monotonic()):
            conn.close()
        if self.state.idle:
            self._schedule_expiry()

    def stats(self) -> dict[str, int]:
        """Gauges for metrics: idle, active (checked out or connecting), waiting."""
        return {
            "idle": len(self.state.idle),
            "active": self.state.busy,
            "waiting": len(self.state.waiters),
        }

    def drain(self) -> None:
        """Keep no connection from now on (the target was removed at runtime): idle
        ones close now, busy ones when released. Unlike :meth:`close`, a request that
        chose this target just before still gets a connection."""
        self._draining = True
        if self._expire_handle is not None:
            self._expire_handle.cancel()
            self._expire_handle = None
        while self.state.idle:
            self.state.idle.pop().close()

    def close(self) -> None:
        """Close idle connections; busy ones close when released."""
        self._closed = True
        if self._expire_handle is not None:
            self._expire_handle.cancel()
            self._expire_handle = None
        while self.state.idle:
            self.state.idle.pop().close()
        while self.state.waiters:
            waiter = self.state.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    ProxyError(Kind.UNAVAILABLE, "pool", detail="upstream pool closed")
                )
