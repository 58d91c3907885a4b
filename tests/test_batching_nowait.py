"""RequestBatcher's non-waiting entry points and flow control: ``put_nowait`` (fire and
forget), ``submit_nowait`` (a future, never waits), ``max_in_flight``, ``flush()``, and
what cancelling ``flush``/``aclose`` must not do. What the span exporter relies on."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import Any

import pytest

from fastedge.batching import BatcherClosed, BatcherFull, RequestBatcher
from tests.batch_recorder import Recorder, gated, until


@pytest.fixture
async def loop_errors() -> Any:
    """Whatever reaches the loop's exception handler ("Future exception was never
    retrieved", "Task exception was never retrieved") is collected here."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    loop.set_exception_handler(None)


# -- put_nowait ------------------------------------------------------------------------------


async def test_put_nowait_batches_by_size_without_futures() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=10, max_wait=3600)
    for i in range(50):
        assert batcher.put_nowait(i) is None  # synchronous, nothing to await
    await until(lambda: len(handler.done) == 5)
    assert handler.batches == [list(range(k, k + 10)) for k in range(0, 50, 10)]
    assert batcher.outstanding == 0 and batcher.queued == 0
    await batcher.aclose()


async def test_put_nowait_partial_batch_goes_after_max_wait() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=100, max_wait=0.01)
    for i in range(3):
        batcher.put_nowait(i)
    await asyncio.wait_for(handler.started.wait(), 5)
    assert handler.batches == [[0, 1, 2]]
    await batcher.aclose()


async def test_put_nowait_raises_batcher_full_at_once_counting_items_in_flight() -> None:
    gate, handler, batcher = gated(max_batch=2, max_wait=3600, max_queued=3, on_full="wait")
    batcher.put_nowait(1)
    batcher.put_nowait(2)  # a size flush: [1, 2] goes to the handler
    await handler.started.wait()
    batcher.put_nowait(3)  # queued; 3 outstanding (2 in flight + 1 queued)
    assert batcher.outstanding == 3 and batcher.queued == 1
    with pytest.raises(BatcherFull):  # on_full="wait" does not apply: it never waits
        batcher.put_nowait(4)
    gate.set()
    await until(lambda: batcher.outstanding == 1)  # the batch ended: its room is back
    batcher.put_nowait(4)  # completes the batch [3, 4]
    await until(lambda: len(handler.done) == 2)
    assert handler.batches == [[1, 2], [3, 4]]
    await batcher.aclose()


async def test_put_nowait_yields_to_callers_waiting_for_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate, handler, batcher = gated(max_batch=1, max_wait=3600, max_queued=1)
    batcher.put_nowait(1)
    await handler.started.wait()
    waiter = asyncio.create_task(batcher.submit(2))
    await until(lambda: bool(batcher._room_waiters))
    # The room freed by batch [1] is handed to the waiter before the waiter runs again: a
    # put_nowait in that very step must not take it.
    in_between: list[BaseException | None] = []
    release = batcher._release_room

    def release_then_put(n: int) -> None:
        release(n)
        if not in_between:
            try:
                batcher.put_nowait(3)
                in_between.append(None)
            except BatcherFull as exc:
                in_between.append(exc)

    monkeypatch.setattr(batcher, "_release_room", release_then_put)
    gate.set()
    assert await waiter == 4
    assert len(in_between) == 1 and isinstance(in_between[0], BatcherFull)
    assert handler.batches == [[1], [2]]
    await batcher.aclose()


async def test_put_nowait_after_aclose_is_refused_and_queued_items_are_flushed() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=10, max_wait=3600)
    for i in range(3):
        batcher.put_nowait(i)
    await batcher.aclose()
    assert handler.done == [[0, 1, 2]]
    with pytest.raises(BatcherClosed):
        batcher.put_nowait(9)
    assert batcher.outstanding == 0


def test_put_nowait_without_a_loop_accepts_nothing() -> None:
    async def handler(items: list[int]) -> list[int]:
        return items

    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=10, max_wait=1)
    with pytest.raises(RuntimeError):
        batcher.put_nowait(1)  # the first item arms the timer: it needs the loop
    assert batcher.queued == 0 and batcher.outstanding == 0


async def test_put_nowait_handler_failure_is_logged_not_lost(
    caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    calls = 0

    async def handler(items: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("backend down")
        # per-item exceptions for fire-and-forget items: the handler's own business
        return [ValueError("bad") if i == 4 else i for i in items]

    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=2, max_wait=3600)
    with caplog.at_level(logging.ERROR, logger="fastedge.batching"):
        for i in range(4):
            batcher.put_nowait(i + 1)
        await batcher.aclose()
    errors = [r for r in caplog.records if r.name == "fastedge.batching"]
    assert len(errors) == 1
    assert "2 fire-and-forget items lost" in errors[0].getMessage()
    assert errors[0].exc_info is not None and "backend down" in str(errors[0].exc_info[1])
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []  # no "Future/Task exception was never retrieved"
    assert calls == 2 and batcher.outstanding == 0


async def test_mixed_batch_delivers_to_futures_and_skips_fire_and_forget() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=3, max_wait=3600)
    batcher.put_nowait(1)
    waited = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    future = batcher.submit_nowait(3)  # the third item: a size flush
    assert await waited == 4 and await future == 6
    assert handler.batches == [[1, 2, 3]]
    await batcher.aclose()


# -- submit_nowait ---------------------------------------------------------------------------


async def test_submit_nowait_returns_the_items_future() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=3, max_wait=3600)
    futures = [batcher.submit_nowait(i) for i in range(3)]
    assert list(await asyncio.gather(*futures)) == [0, 2, 4]
    assert handler.batches == [[0, 1, 2]]
    await batcher.aclose()


async def test_submit_nowait_full_raises_even_in_wait_mode() -> None:
    gate, handler, batcher = gated(max_batch=1, max_wait=3600, max_queued=1, on_full="wait")
    first = batcher.submit_nowait(1)
    await handler.started.wait()
    with pytest.raises(BatcherFull):
        batcher.submit_nowait(2)
    gate.set()
    assert await first == 2
    await batcher.aclose()
    with pytest.raises(BatcherClosed):
        batcher.submit_nowait(3)


async def test_cancelling_an_unsent_nowait_future_withdraws_the_item() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(
        handler, max_batch=3, max_wait=3600, max_queued=3
    )
    a = batcher.submit_nowait(1)
    b = batcher.submit_nowait(2)
    b.cancel()
    await asyncio.sleep(0)  # the done callback runs
    assert batcher.queued == 1 and batcher.outstanding == 1  # its room is back
    c = batcher.submit_nowait(3)
    d = batcher.submit_nowait(4)
    assert list(await asyncio.gather(a, c, d)) == [2, 6, 8]
    assert handler.batches == [[1, 3, 4]]
    await batcher.aclose()


async def test_cancelling_a_sent_nowait_future_discards_its_result(
    loop_errors: list[dict[str, Any]],
) -> None:
    gate = asyncio.Event()

    async def handler(items: list[int]) -> list[int | BaseException]:
        await gate.wait()
        return [RuntimeError("late") for _ in items]

    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=1, max_wait=3600)
    future = batcher.submit_nowait(1)
    await asyncio.sleep(0)  # sent
    future.cancel()
    gate.set()
    await batcher.aclose()
    gc.collect()
    await asyncio.sleep(0)
    assert future.cancelled() and loop_errors == []


# -- max_in_flight ---------------------------------------------------------------------------


async def test_max_in_flight_one_runs_batches_one_at_a_time_in_order() -> None:
    gate, handler, batcher = gated(max_batch=5, max_wait=0.005, max_queued=100, max_in_flight=1)
    batcher.put_nowait(0)
    await handler.started.wait()  # [0] went after max_wait and is held in the handler
    for i in range(1, 13):
        batcher.put_nowait(i)  # size-due batches wait for the one in flight
    await asyncio.sleep(0.02)  # several max_waits pass: still nothing else may start
    assert handler.batches == [[0]] and batcher.in_flight == 1 and batcher.queued == 12
    gate.set()
    await until(lambda: len(handler.done) == 4)
    assert handler.batches == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    assert handler.max_running == 1
    await batcher.aclose()


async def test_held_batch_keeps_filling_up_to_max_batch() -> None:
    # While the one slot is busy, the next batch is not cut at its max_wait: it gathers
    # everything that arrives (up to max_batch) and goes as one call.
    gate, handler, batcher = gated(max_batch=50, max_wait=0.001, max_in_flight=1)
    batcher.put_nowait(0)
    await handler.started.wait()
    for i in range(1, 8):
        batcher.put_nowait(i)
        await asyncio.sleep(0.002)  # each arrives after the previous one's max_wait
    gate.set()
    await until(lambda: len(handler.done) == 2)
    assert handler.batches == [[0], [1, 2, 3, 4, 5, 6, 7]]
    await batcher.aclose()


async def test_aclose_respects_max_in_flight_and_sends_everything() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(
        handler, max_batch=4, max_wait=3600, max_in_flight=1
    )
    for i in range(10):
        batcher.put_nowait(i)
    await batcher.aclose()
    assert handler.done == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert handler.max_running == 1 and batcher.outstanding == 0


def test_max_in_flight_must_be_positive() -> None:
    async def handler(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="max_in_flight"):
        RequestBatcher(handler, max_in_flight=0)


# -- flush -------------------------------------------------------------------------------------


async def test_flush_sends_now_and_waits_for_the_answers() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=100, max_wait=3600)
    for i in range(3):
        batcher.put_nowait(i)
    await batcher.flush()
    assert handler.done == [[0, 1, 2]]
    assert batcher.outstanding == 0
    await batcher.flush()  # nothing queued: returns at once
    await batcher.aclose()


async def test_flush_waits_for_batches_in_flight_and_held_ones_but_not_later_items() -> None:
    gate, handler, batcher = gated(max_batch=2, max_wait=3600, max_in_flight=1)
    for i in range(3):  # [0, 1] in flight (size flush); [2] queued
        batcher.put_nowait(i)
    await handler.started.wait()
    flushing = asyncio.create_task(batcher.flush())
    await asyncio.sleep(0.01)
    assert not flushing.done()  # [0, 1] is still in the handler
    batcher.put_nowait(3)  # after flush() was called: rides along in [2, 3] (size)
    batcher.put_nowait(4)  # ... and this one is left for its own max_wait
    gate.set()
    await asyncio.wait_for(flushing, 5)
    assert handler.done == [[0, 1], [2, 3]]
    assert batcher.queued == 1  # 4 was not waited for
    await batcher.flush()
    assert handler.done[-1] == [4] and batcher.outstanding == 0
    await batcher.aclose()


async def test_flush_under_a_steady_stream_returns() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(
        handler, max_batch=3, max_wait=3600, max_in_flight=1
    )
    for i in range(4):
        batcher.put_nowait(i)
    stop = asyncio.Event()

    async def stream() -> None:
        i = 100
        while not stop.is_set():
            with contextlib.suppress(BatcherFull):
                batcher.put_nowait(i)
            i += 1
            await asyncio.sleep(0)

    feeder = asyncio.create_task(stream())
    await asyncio.wait_for(batcher.flush(), 5)  # returns although items keep coming
    stop.set()
    await feeder
    assert [i for b in handler.done for i in b][:4] == [0, 1, 2, 3]
    await batcher.aclose()


# -- cancelling the waiters, not the work --------------------------------------------------------


async def test_cancelling_flush_or_aclose_does_not_cancel_the_batches() -> None:
    gate, handler, batcher = gated(max_batch=10, max_wait=3600, max_in_flight=1)
    batcher.put_nowait(1)
    flushing = asyncio.create_task(batcher.flush())
    await handler.started.wait()
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    batcher.put_nowait(2)
    closing = asyncio.create_task(batcher.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert handler.running == 1  # the batch [1] is still being handled
    gate.set()
    await batcher.aclose()  # idempotent: waits for what is left
    assert handler.done == [[1], [2]]


async def test_aclose_refuses_room_waiters_at_once() -> None:
    gate, handler, batcher = gated(max_batch=1, max_wait=3600, max_queued=1)
    first = asyncio.create_task(batcher.submit(1))
    await handler.started.wait()
    waiter = asyncio.create_task(batcher.submit(2))
    await until(lambda: bool(batcher._room_waiters))
    closing = asyncio.create_task(batcher.aclose())
    await until(waiter.done)  # while batch [1] is still held in the handler
    with pytest.raises(BatcherClosed):
        waiter.result()
    assert not closing.done()
    gate.set()
    await closing
    assert first.result() == 2 and batcher.outstanding == 0


async def test_cancelled_room_waiter_passes_a_handed_over_unit_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate, handler, batcher = gated(max_batch=1, max_wait=3600, max_queued=1)
    first = asyncio.create_task(batcher.submit(1))
    await handler.started.wait()
    b = asyncio.create_task(batcher.submit(2))
    c = asyncio.create_task(batcher.submit(3))
    await until(lambda: len(batcher._room_waiters) == 2)
    # b is cancelled in the same step in which the room freed by [1] is handed to it:
    # it must pass the unit on to c instead of leaking it (c would wait forever).
    release = batcher._release_room
    cancelled: list[bool] = []

    def release_then_cancel(n: int) -> None:
        release(n)
        if not cancelled:
            cancelled.append(b.cancel())

    monkeypatch.setattr(batcher, "_release_room", release_then_cancel)
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert cancelled == [True]
    assert await first == 2
    assert await asyncio.wait_for(c, 5) == 6
    assert handler.batches == [[1], [3]] and batcher.outstanding == 0
    await batcher.aclose()


# -- hurry (a draining server) ---------------------------------------------------------------


async def test_hurry_sends_what_waits_now_and_stops_waiting_for_max_wait() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=10, max_wait=3600)
    first = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)  # queued, waiting for an hour-long window
    assert batcher.queued == 3 and not handler.batches
    batcher.hurry()
    assert await asyncio.gather(*first) == [0, 2, 4]  # the recorder doubles
    late = await asyncio.wait_for(batcher.submit(7), 5)  # still accepted; no hour wait
    assert late == 14
    assert handler.batches == [[0, 1, 2], [7]]
    batcher.hurry()  # idempotent
    await batcher.aclose()
