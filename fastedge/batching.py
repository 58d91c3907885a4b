"""Request batching: many concurrent callers, one handler call per batch.

:class:`RequestBatcher` collects items submitted by independent callers and hands them to
an async handler in lists, flushing when ``max_batch`` items are waiting (size) or when
the oldest waiting item has waited ``max_wait`` seconds (time), whichever comes first.
Each caller awaits its own answer: result ``i`` of the handler goes to the caller of item
``i``.

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
* **Lost exceptions.** Every outcome lands on a future its caller awaits, or — when the
  caller is gone — is skipped explicitly; the batch task itself never raises, so nothing
  ends in "Task exception was never retrieved".
* **Unbounded memory.** ``max_queued`` bounds items accepted but not yet answered
  (queued plus in flight): further callers wait for room (``on_full="wait"``), or fail
  fast with :class:`BatcherFull` (``on_full="error"``).

Handler contract: given ``list[T]`` return ``list[R | BaseException]`` (any sequence) of
the same length. An exception *in position i* fails only item ``i``; an exception *raised* by the
handler fails every item of that batch (later batches are unaffected); a result list of
the wrong length fails the batch with :class:`BatchResultError`.
"""

from __future__ import annotations

import asyncio
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
    """``max_queued`` items are outstanding and the batcher was built with
    ``on_full="error"``."""


class BatcherClosed(BatcherError):
    """The batcher is closing or closed and accepts no new items."""


class BatchResultError(BatcherError):
    """The handler broke its contract (wrong number of results, or not a sequence)."""


class _Entry(Generic[T, R]):
    """One submitted item and the future its caller awaits."""

    __slots__ = ("future", "item", "sent")

    def __init__(self, item: T, future: asyncio.Future[R]) -> None:
        self.item = item
        self.future = future
        self.sent = False


class RequestBatcher(Generic[T, R]):
    """Collect concurrent :meth:`submit` calls into batches for one async ``handler``.

    ``max_batch`` (default 64) caps a batch's size; ``max_wait`` (default 5 ms — about one
    proxy hop, so batching adds at most one hop of latency) caps how long the first item
    of a batch waits for company; ``max_queued`` (default 1024) caps outstanding items.
    Batches run concurrently with each other; ``max_queued`` is what bounds the work in
    flight. All methods must be called from the event loop's thread.
    """

    def __init__(
        self,
        handler: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 64,
        max_wait: float = 0.005,
        max_queued: int = 1024,
        on_full: Literal["wait", "error"] = "wait",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_wait < 0:
            raise ValueError("max_wait must not be negative")
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if on_full not in ("wait", "error"):
            raise ValueError('on_full must be "wait" or "error"')
        self._handler = handler
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._on_full = on_full
        self._room = asyncio.Semaphore(max_queued)  # one unit per outstanding item
        self._queue: deque[_Entry[T, R]] = deque()  # accepted, not yet sent
        self._tasks: set[asyncio.Task[None]] = set()  # batches in flight
        self._timer: asyncio.TimerHandle | None = None
        self._epoch = 0  # incremented by every flush; see _on_timer
        self._closed = False
        self.batches_sent = 0
        """How many times the handler has been called (for tests and metrics)."""

    # -- public API ---------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Items waiting for their batch to be sent."""
        return len(self._queue)

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
        if self._on_full == "error" and self._room.locked():
            raise BatcherFull("batcher is full")
        # Cancelled here, the caller holds nothing: Semaphore.acquire is cancel-safe.
        await self._room.acquire()
        if self._closed:  # closed while we waited for room
            self._room.release()
            raise BatcherClosed("batcher is closed")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = _Entry(item, future)
        queue = self._queue
        queue.append(entry)
        if len(queue) >= self._max_batch:
            self._flush()
        elif len(queue) == 1:
            self._arm_timer()
        try:
            return await future
        except asyncio.CancelledError:
            if not entry.sent:
                # Still queued: take it out so the handler never sees it, and give its
                # room back. A batch that is now empty needs no timer.
                queue.remove(entry)
                self._room.release()
                if not queue:
                    self._cancel_timer()
            # Already sent: _run_batch skips the cancelled future and frees the room
            # when the batch completes (the item is still in flight until then).
            raise

    async def aclose(self) -> None:
        """Refuse new items, send what is queued, and wait for every batch in flight.

        Callers still waiting for room get :class:`BatcherClosed`. Idempotent.
        """
        self._closed = True
        while self._queue:
            self._flush()
        self._cancel_timer()
        while self._tasks:
            await asyncio.gather(*self._tasks)

    # -- internals ----------------------------------------------------------------------------

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
        if self._queue:
            self._flush()

    def _flush(self) -> None:
        """Send up to ``max_batch`` queued items as one batch; re-arm for the rest."""
        self._epoch += 1
        self._cancel_timer()
        queue = self._queue
        n = min(len(queue), self._max_batch)
        batch = [queue.popleft() for _ in range(n)]
        for entry in batch:
            entry.sent = True
        if queue and not self._closed:
            # Leftovers (more than max_batch queued at once) start a new batch with a
            # full wait of their own. While closing, aclose flushes them at once.
            self._arm_timer()
        self.batches_sent += 1
        task = asyncio.get_running_loop().create_task(self._run_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[_Entry[T, R]]) -> None:
        """Call the handler and deliver each outcome; never raises (see module doc)."""
        try:
            try:
                results = await self._handler([e.item for e in batch])
            except asyncio.CancelledError:
                # Only loop teardown cancels a batch task: the callers are cancelled too.
                for e in batch:
                    e.future.cancel()
                raise
            except Exception as exc:
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(exc)
                return
            if not isinstance(results, Sequence) or len(results) != len(batch):
                got = len(results) if isinstance(results, Sequence) else type(results).__name__
                err = BatchResultError(f"handler returned {got} results for {len(batch)} items")
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(err)
                return
            for e, result in zip(batch, results, strict=True):
                if e.future.done():  # its caller was cancelled: discard the result
                    continue
                if isinstance(result, BaseException):
                    e.future.set_exception(result)
                else:
                    e.future.set_result(result)
        finally:
            for _ in batch:
                self._room.release()
