"""Request batching: many concurrent callers, one handler call per batch.

:class:`RequestBatcher` collects items submitted by independent callers and hands them to
an async handler in lists, flushing when ``max_batch`` items are waiting (size) or when
the oldest waiting item has waited ``max_wait`` seconds (time), whichever comes first.
Each caller awaits its own answer: result ``i`` of the handler goes to the caller of item
``i``.

Three ways in:

* ``await submit(item)`` — wait for room if full (or fail, per ``on_full``), then for the
  item's result. Batch routes use this.
* ``submit_nowait(item) -> Future`` — never waits: :class:`BatcherFull` at once when full.
  The caller owns the future (awaiting it, or cancelling it to withdraw the item).
* ``put_nowait(item)`` — fire and forget: no future is created, so nobody has to retrieve
  an outcome; the handler does its own accounting (what it *raises* is logged, since no
  caller will see it). O(1), synchronous, never waits: what the span exporter calls on
  the request path.

What a naive batcher gets wrong, and what this one does instead:

* **The stale timer.** A size-triggered flush leaves the time-flush timer of the batch it
  just sent behind. If that timer later fires it would flush whatever is queued *now* —
  the next batch, long before its own ``max_wait``. Every flush therefore starts a new
  *epoch*; the timer carries the epoch it was armed for and does nothing when it no longer
  matches. (The handle is cancelled too; the epoch also covers the callback that the loop
  had already dequeued when the cancel came.)
* **Cancelled callers.** A caller cancelled before its item was sent has the item removed
  from the queue (the handler never sees it); one cancelled after sending has its result
  discarded. Neither affects the other items of the batch.
* **Cancelled closers.** Cancelling :meth:`~RequestBatcher.aclose` or
  :meth:`~RequestBatcher.flush` only stops *that* wait: accepted items are still sent and
  answered. (Only cancelling a batch task itself — loop teardown — abandons work.)
* **Lost exceptions.** Every outcome lands on a future its caller awaits, or — when the
  caller is gone — is skipped explicitly, or — for ``put_nowait`` items — is the
  handler's business (a raised exception is logged); the batch task itself never raises,
  so nothing ends in "Task exception was never retrieved".
* **Unbounded memory.** ``max_queued`` bounds items accepted but not yet answered
  (queued plus in flight): further callers wait for room (``on_full="wait"``), or fail
  fast with :class:`BatcherFull` (``on_full="error"``, and always for the ``*_nowait``
  methods).

``max_in_flight`` (default: unlimited) caps the batches handed to the handler at once.
At the cap, a batch that is due (full, or its wait over) waits for a running one to end,
and meanwhile keeps gathering items up to ``max_batch`` — a backend that is slow gets
fewer, fuller batches. ``max_in_flight=1`` gives one call at a time, in order (the span
exporter: one keep-alive connection to the collector).

Handler contract: given ``list[T]`` return ``list[R | BaseException]`` (any sequence) of
the same length. An exception *in position i* fails only item ``i``; an exception *raised* by the
handler fails every item of that batch (later batches are unaffected); a result list of
the wrong length fails the batch with :class:`BatchResultError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Literal, TypeVar

__all__ = [
    "BatchResultError",
    "BatcherClosed",
    "BatcherError",
    "BatcherFull",
    "RequestBatcher",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherError(Exception):
    """Base class of the batcher's own errors."""


class BatcherFull(BatcherError):
    """``max_queued`` items are outstanding and the caller cannot wait (``on_full="error"``,
    :meth:`RequestBatcher.submit_nowait`, :meth:`RequestBatcher.put_nowait`)."""


class BatcherClosed(BatcherError):
    """The batcher is closing or closed and accepts no new items."""


class BatchResultError(BatcherError):
    """The handler broke its contract (wrong number of results, or not a sequence)."""


class RequestBatcher(Generic[T, R]):
    """Collect concurrent :meth:`submit` calls into batches for one async ``handler``.

    ``max_batch`` (default 64) caps a batch's size; ``max_wait`` (default 5 ms — about one
    proxy hop, so batching adds at most one hop of latency) caps how long the first item
    of a batch waits for company; ``max_queued`` (default 1024) caps outstanding items;
    ``max_in_flight`` (default ``None``: no cap) caps batches in the handler at once.
    ``max_queued`` is what bounds the work in flight. All methods must be called from the
    event loop's thread.
    """

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 64,
        max_wait: float = 0.005,
        max_queued: int = 1024,
        on_full: Literal["wait", "error"] = "wait",
        max_in_flight: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must not be negative")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if on_full not in ("wait", "error"):
            raise ValueError('on_full must be "wait" or "error"')
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (or None for no cap)")
        self._handler = handler
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._on_full = on_full
        self._max_in_flight = max_in_flight
        # Room: one unit per outstanding item (queued or in flight). A hand-rolled
        # semaphore rather than asyncio.Semaphore because the *_nowait methods need a
        # synchronous "take a unit if one is free" that never jumps ahead of waiters.
        self._max_queued = max_queued
        self._outstanding = 0
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        # Accepted, not yet sent: items and their futures side by side (None for
        # put_nowait). Two deques rather than one of entry objects so that fire and
        # forget costs two appends and no allocation on the request path.
        self._items: deque[T] = deque()
        self._futures: deque[asyncio.Future[R] | None] = deque()
        self._tasks: dict[asyncio.Task[None], int] = {}  # batch in flight -> its number
        self._in_flight = 0  # batches whose handler call has not ended
        self._timer: asyncio.TimerHandle | None = None
        self._epoch = 0  # incremented by every flush; see _on_timer
        self._overdue = False  # the queued batch's wait is over (held by max_in_flight)
        self._forced = 0  # the first _forced queued items are due now (flush())
        self._closed = False
        self.batches_sent = 0
        """How many times the handler has been called (for tests and metrics)."""

    # -- public API ---------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Items waiting for their batch to be sent."""
        return len(self._items)

    @property
    def outstanding(self) -> int:
        """Items accepted and not yet answered: queued plus in flight (at most
        ``max_queued``)."""
        return self._outstanding

    @property
    def in_flight(self) -> int:
        """Batches in the handler now."""
        return self._in_flight

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    async def submit(self, item: T) -> R:
        """Queue ``item`` and return its result (or raise its exception).

        Raises :class:`BatcherClosed` after :meth:`aclose`, :class:`BatcherFull` when full
        with ``on_full="error"``, and :class:`BatchResultError` when the handler broke its
        contract. Cancelling the caller removes an unsent item from its batch.
        """
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if not self._take_room():
            if self._on_full == "error":
                raise BatcherFull("batcher is full")
            await self._wait_for_room()  # cancel-safe; BatcherClosed if closed meanwhile
            if self._closed:  # closed just after our unit was handed over
                self._release_room(1)
                raise BatcherClosed("batcher is closed")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._enqueue(item, future)
        try:
            return await future
        except asyncio.CancelledError:
            # Unsent: taken out of the queue. Already sent: _run_batch skips the cancelled
            # future and frees the room when the batch completes (still in flight).
            self._withdraw(future)
            raise

    def submit_nowait(self, item: T) -> asyncio.Future[R]:
        """Queue ``item`` without waiting and return the future of its result.

        Raises :class:`BatcherClosed` after :meth:`aclose` and :class:`BatcherFull` when
        ``max_queued`` items are outstanding (or callers are waiting for room), whatever
        ``on_full`` says. Cancelling the future withdraws the item if it was not sent yet.
        The caller owns the future: an exception nobody retrieves is reported by asyncio
        ("Future exception was never retrieved"); use :meth:`put_nowait` for fire and forget.
        """
        loop = asyncio.get_running_loop()  # before any state changes: RuntimeError outside
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if not self._take_room():
            raise BatcherFull("batcher is full")
        future: asyncio.Future[R] = loop.create_future()
        self._enqueue(item, future)
        future.add_done_callback(self._on_nowait_done)
        return future

    def put_nowait(self, item: T) -> None:
        """Queue ``item`` for the handler, fire and forget: no future is created and the
        handler's result for it is discarded. O(1), synchronous, never waits.

        Raises :class:`BatcherClosed` after :meth:`aclose`, :class:`BatcherFull` when
        ``max_queued`` items are outstanding (or callers are waiting for room), and
        ``RuntimeError`` when a timer or a flush is due and no event loop runs — always
        before accepting the item. An exception the handler *raises* for a batch holding
        such items is logged (nobody else would see it).
        """
        if self._closed:
            raise BatcherClosed("batcher is closed")
        if self._outstanding >= self._max_queued or self._room_waiters:
            raise BatcherFull("batcher is full")
        items = self._items
        n = len(items) + 1
        if n == 1 or n >= self._max_batch:
            asyncio.get_running_loop()  # the timer or the flush below needs it: fail first
        # _take_room and _enqueue inlined: this is the span exporter's request-path call.
        self._outstanding += 1
        items.append(item)
        self._futures.append(None)
        if n >= self._max_batch:
            self._pump()
        elif n == 1:
            self._arm_timer()

    async def flush(self) -> None:
        """Send every item queued now without waiting for ``max_wait``, and return once
        each item accepted before this call is answered (items submitted meanwhile are not
        waited for, so a steady stream cannot keep ``flush`` from returning).

        ``max_in_flight`` still applies. Cancelling ``flush`` does not cancel the sends.
        """
        # Everything queued now is due. (Never lowers a count another flush() set:
        # _forced <= len(queue) always.)
        self._forced = len(self._items)
        while True:
            self._pump()
            if not self._forced or not self._tasks:
                break
            # max_in_flight holds some of our items back: wait for a batch to end (its
            # completion sends the next one).
            await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)
        # Our items are all in batches numbered below this one (FIFO), as are the batches
        # that were in flight when we were called.
        last = self.batches_sent
        waiting = [task for task, number in self._tasks.items() if number < last]
        if waiting:
            await asyncio.wait(waiting)

    def hurry(self) -> None:
        """Stop waiting for ``max_wait`` from now on (a draining server): what is queued
        is sent at once, later items on the next loop iteration. New items are still
        accepted, unlike after :meth:`aclose`. Idempotent."""
        self._max_wait = 0.0
        self._forced = len(self._items)
        self._cancel_timer()
        self._pump()

    async def aclose(self) -> None:
        """Refuse new items, send what is queued, and wait for every batch in flight.

        Callers waiting for room get :class:`BatcherClosed` at once. Idempotent.
        Cancelling ``aclose`` stops the wait only: what was accepted is still sent.
        """
        self._closed = True
        waiters, self._room_waiters = self._room_waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(BatcherClosed("batcher is closed"))
        self._cancel_timer()
        while True:
            self._pump()  # everything queued is due once closed (max_in_flight permitting)
            if not self._tasks:
                return
            # asyncio.wait, not gather: cancelling aclose must not cancel the batches.
            await asyncio.wait(list(self._tasks))

    # -- room (max_queued) ------------------------------------------------------------------

    def _take_room(self) -> bool:
        # Waiters were first: a free unit is theirs (it is being handed over).
        if self._outstanding < self._max_queued and not self._room_waiters:
            self._outstanding += 1
            return True
        return False

    async def _wait_for_room(self) -> None:
        """Wait until a unit of room is handed to us (counted in ``_outstanding``)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._room_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The unit was handed over just as we were cancelled: pass it on.
                self._release_room(1)
            else:  # still waiting (or refused by aclose): hold nothing, leave the line
                with contextlib.suppress(ValueError):
                    self._room_waiters.remove(waiter)
                self._release_room(0)  # a free unit we were first in line for goes on
            raise

    def _release_room(self, n: int) -> None:
        self._outstanding -= n
        waiters = self._room_waiters
        while waiters and self._outstanding < self._max_queued:
            waiter = waiters.popleft()
            if not waiter.done():
                self._outstanding += 1  # handed over: the waiter owns this unit now
                waiter.set_result(None)

    # -- queue --------------------------------------------------------------------------------

    def _enqueue(self, item: T, future: asyncio.Future[R] | None) -> None:
        items = self._items
        items.append(item)
        self._futures.append(future)
        if len(items) >= self._max_batch:
            self._pump()
        elif len(items) == 1:
            self._arm_timer()

    def _withdraw(self, future: asyncio.Future[R]) -> None:
        """Take an unsent item out so the handler never sees it, and give its room back;
        an item already sent (not in the queue) is left to its batch."""
        futures = self._futures
        try:
            i = futures.index(future)  # futures compare by identity
        except ValueError:
            return
        del futures[i]
        del self._items[i]
        if i < self._forced:
            self._forced -= 1
        self._release_room(1)
        if not futures:  # an empty batch needs no timer
            self._cancel_timer()
            self._overdue = False

    def _on_nowait_done(self, future: asyncio.Future[R]) -> None:
        if future.cancelled():
            self._withdraw(future)

    def _arm_timer(self) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._max_wait, self._on_timer, self._epoch)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self, epoch: int) -> None:
        # A timer armed for an earlier batch (one that a size flush already sent) must not
        # flush the batch forming now: it would cut that batch's wait short.
        if epoch != self._epoch:
            return
        self._timer = None
        if self._items:
            self._overdue = True  # sent now, or when max_in_flight lets it
            self._pump()

    def _pump(self) -> None:
        """Send every batch that is due, as far as ``max_in_flight`` allows."""
        items = self._items
        limit = self._max_in_flight
        while items and (limit is None or self._in_flight < limit):
            if not (self._closed or self._overdue or self._forced or len(items) >= self._max_batch):
                return
            self._flush()

    def _flush(self) -> None:
        """Send up to ``max_batch`` queued items as one batch; re-arm for the rest."""
        self._epoch += 1
        self._cancel_timer()
        self._overdue = False
        items, futures = self._items, self._futures
        n = min(len(items), self._max_batch)
        batch = [items.popleft() for _ in range(n)]
        batch_futures = [futures.popleft() for _ in range(n)]
        self._forced = max(self._forced - n, 0)
        if items and not self._closed:
            # Leftovers (more than max_batch queued at once) start a new batch with a
            # full wait of their own. While closing, every batch is due at once.
            self._arm_timer()
        number = self.batches_sent
        self.batches_sent += 1
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run_batch(batch, batch_futures))
        self._tasks[task] = number
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _run_batch(self, batch: list[T], futures: list[asyncio.Future[R] | None]) -> None:
        """Call the handler and deliver each outcome; never raises (see module doc)."""
        cancelled = False
        try:
            try:
                results = await self._handler(batch)
            except asyncio.CancelledError:
                # Only loop teardown cancels a batch task: the callers are cancelled too.
                cancelled = True
                for future in futures:
                    if future is not None:
                        future.cancel()
                raise
            except Exception as exc:
                self._fail(futures, exc)
                return
            if not isinstance(results, Sequence) or len(results) != len(batch):
                got = len(results) if isinstance(results, Sequence) else type(results).__name__
                self._fail(
                    futures,
                    BatchResultError(f"handler returned {got} results for {len(batch)} items"),
                )
                return
            for future, result in zip(futures, results, strict=True):
                # Fire and forget (the handler accounts for such items itself), or the
                # caller was cancelled: the result has nowhere to go.
                if future is None or future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._release_room(len(batch))
            # The next due batch (held back by max_in_flight) goes now — unless the loop
            # is tearing down, where a new task would be destroyed while pending.
            if not cancelled:
                self._pump()

    def _fail(self, futures: list[asyncio.Future[R] | None], exc: Exception) -> None:
        """The whole batch failed: each waiting caller gets ``exc``; items nobody waits
        for (``put_nowait``) are reported once, in the log."""
        untracked = 0
        for future in futures:
            if future is None:
                untracked += 1
            elif not future.done():
                future.set_exception(exc)
        if untracked:
            logger.error(
                "batch handler failed; %d fire-and-forget items lost",
                untracked,
                exc_info=exc,
            )
