"""RequestBatcher: batching by size and time, per-item outcomes, back-pressure, closing,
and the failure modes of a naive batcher (stale timers, cancelled callers, lost errors)."""

from __future__ import annotations

import asyncio

import pytest

from fastedge.batching import (
    BatcherClosed,
    BatcherFull,
    BatchResultError,
    RequestBatcher,
)
from tests.batch_recorder import Recorder, gated


async def test_fifty_concurrent_submits_make_five_batches() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=10, max_wait=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    assert results == [i * 2 for i in range(50)]
    assert len(handler.batches) == 5
    assert all(len(b) == 10 for b in handler.batches)
    assert sorted(i for b in handler.batches for i in b) == list(range(50))
    assert batcher.batches_sent == 5
    await batcher.aclose()


async def test_time_based_flush_sends_a_partial_batch() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=100, max_wait=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    assert results == [0, 2, 4]
    assert handler.batches == [[0, 1, 2]]
    await batcher.aclose()


async def test_zero_wait_flushes_on_the_next_loop_iteration() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=100, max_wait=0)
    assert await batcher.submit(7) == 14
    assert handler.batches == [[7]]
    await batcher.aclose()


async def test_stale_timer_does_not_flush_the_next_batch() -> None:
    # The race: the time-flush callback of batch 1 was already queued by the loop when a
    # size flush sent batch 1. Without the epoch it would flush batch 2 (one item, just
    # submitted) at once instead of after batch 2's own max_wait.
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=2, max_wait=60)
    first = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)  # both submitted: a size flush at epoch 0 -> 1
    assert await asyncio.gather(*first) == [2, 4]
    third = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    assert batcher.queued == 1
    batcher._on_timer(0)  # the stale callback of the first batch runs now
    await asyncio.sleep(0)
    assert batcher.queued == 1, "a stale timer flushed the next batch early"
    assert handler.batches == [[1, 2]]
    # The next item completes batch 2 by size, with both items together.
    fourth = asyncio.create_task(batcher.submit(4))
    assert list(await asyncio.gather(third, fourth)) == [6, 8]
    assert handler.batches == [[1, 2], [3, 4]]
    await batcher.aclose()


async def test_size_flush_cancels_the_timer_of_the_sent_batch() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=2, max_wait=60)
    await asyncio.gather(batcher.submit(1), batcher.submit(2))
    assert batcher._timer is None
    await batcher.aclose()


async def test_exception_in_one_position_fails_only_that_item() -> None:
    async def handler(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {i}") if i == 2 else i for i in items]

    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=4, max_wait=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert results[0] == 0 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad 2"
    await batcher.aclose()


async def test_handler_exception_fails_its_batch_only() -> None:
    calls = 0

    async def handler(items: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("backend down")
        return list(items)

    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=2, max_wait=10)
    first = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in first)
    second = await asyncio.gather(batcher.submit(3), batcher.submit(4))
    assert list(second) == [3, 4]
    await batcher.aclose()


async def test_wrong_number_of_results_fails_the_batch_clearly() -> None:
    async def handler(items: list[int]) -> list[int | BaseException]:
        return list(items[:-1])

    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=3, max_wait=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    for r in results:
        assert isinstance(r, BatchResultError)
        assert "2 results for 3 items" in str(r)
    await batcher.aclose()


async def test_cancelled_caller_before_send_is_removed_from_the_batch() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=3, max_wait=60)
    a = asyncio.create_task(batcher.submit(1))
    b = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert batcher.queued == 1
    c = asyncio.create_task(batcher.submit(3))
    d = asyncio.create_task(batcher.submit(4))
    assert list(await asyncio.gather(a, c, d)) == [2, 6, 8]
    assert handler.batches == [[1, 3, 4]]  # 2 never reached the handler
    await batcher.aclose()


async def test_cancelling_the_only_queued_item_disarms_the_timer() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=3, max_wait=60)
    a = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    assert batcher._timer is not None
    a.cancel()
    with pytest.raises(asyncio.CancelledError):
        await a
    assert batcher.queued == 0 and batcher._timer is None
    await batcher.aclose()
    assert handler.batches == []


async def test_cancelled_caller_after_send_discards_its_result() -> None:
    gate, handler, batcher = gated(max_batch=2, max_wait=60, max_queued=2, on_full="error")
    a = asyncio.create_task(batcher.submit(1))
    b = asyncio.create_task(batcher.submit(2))
    await handler.started.wait()  # the batch [1, 2] is in the handler
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    # b's item is still in flight: its room is not given back until the batch ends.
    with pytest.raises(BatcherFull):
        await batcher.submit(9)
    gate.set()
    assert await a == 2
    assert handler.batches == [[1, 2]]
    await batcher.aclose()


async def test_failed_item_whose_caller_is_gone_is_not_reported_as_unretrieved() -> None:
    # filterwarnings=error and the loop's exception handler turn a lost exception into a
    # failure; a cancelled caller's error must simply be skipped.
    gate = asyncio.Event()
    seen: list[object] = []

    async def handler(items: list[int]) -> list[int | BaseException]:
        await gate.wait()
        raise RuntimeError("late failure")

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    try:
        batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=1, max_wait=60)
        t = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        gate.set()
        await batcher.aclose()
        import gc

        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert seen == []


async def test_back_pressure_waits_for_room() -> None:
    gate, handler, batcher = gated(max_batch=2, max_wait=60, max_queued=2)
    first = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await handler.started.wait()
    waiting = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    assert not waiting.done() and batcher.queued == 0  # blocked before queueing
    gate.set()
    assert await asyncio.gather(*first) == [2, 4]
    extra = asyncio.create_task(batcher.submit(4))  # completes the batch with 3
    assert list(await asyncio.gather(waiting, extra)) == [6, 8]
    assert handler.batches == [[1, 2], [3, 4]]
    await batcher.aclose()


async def test_back_pressure_error_mode_raises_batcher_full() -> None:
    gate, handler, batcher = gated(max_batch=2, max_wait=60, max_queued=2, on_full="error")
    first = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await handler.started.wait()
    with pytest.raises(BatcherFull):
        await batcher.submit(3)
    gate.set()
    assert await asyncio.gather(*first) == [2, 4]
    assert list(await asyncio.gather(batcher.submit(5), batcher.submit(6))) == [10, 12]
    await batcher.aclose()


async def test_cancelled_waiter_for_room_loses_nothing() -> None:
    gate, handler, batcher = gated(max_batch=1, max_wait=60, max_queued=1)
    a = asyncio.create_task(batcher.submit(1))
    await handler.started.wait()
    b = asyncio.create_task(batcher.submit(2))
    c = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    gate.set()
    assert list(await asyncio.gather(a, c)) == [2, 6]
    assert handler.batches == [[1], [3]]
    await batcher.aclose()


async def test_aclose_flushes_queued_items_and_refuses_new_ones() -> None:
    handler = Recorder()
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, max_batch=10, max_wait=60)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.aclose()
    assert [t.result() for t in tasks] == [0, 2, 4]
    assert handler.batches == [[0, 1, 2]]
    with pytest.raises(BatcherClosed):
        await batcher.submit(5)
    assert batcher.closed
    await batcher.aclose()  # idempotent


async def test_aclose_waits_for_batches_in_flight_and_rejects_room_waiters() -> None:
    gate, handler, batcher = gated(max_batch=1, max_wait=60, max_queued=1)
    a = asyncio.create_task(batcher.submit(1))
    await handler.started.wait()
    waiter = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    closing = asyncio.create_task(batcher.aclose())
    await asyncio.sleep(0)
    assert not closing.done()
    gate.set()
    await closing
    assert a.result() == 2
    with pytest.raises(BatcherClosed):
        await waiter
    assert handler.batches == [[1]]


def test_invalid_arguments_are_rejected() -> None:
    async def handler(items: list[int]) -> list[int | BaseException]:
        return list(items)

    with pytest.raises(ValueError):
        RequestBatcher(handler, max_batch=0)
    with pytest.raises(ValueError):
        RequestBatcher(handler, max_wait=-1)
    with pytest.raises(ValueError):
        RequestBatcher(handler, max_queued=0)
    with pytest.raises(ValueError):
        RequestBatcher(handler, on_full="drop")  # type: ignore[arg-type]
