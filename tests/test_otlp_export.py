"""OTLPExporter on the RequestBatcher, against a real loopback OTLP/HTTP receiver that can
hold its answers: one POST at a time, a slow collector gets fuller batches, the bound
counts spans being sent, cancelling a flush or close loses nothing, and every span ends
up exported or dropped — never silently gone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastedge.observe import otlp
from fastedge.observe.metrics import Metrics
from fastedge.observe.otlp import DROPPED_TOTAL, EXPORTED_TOTAL, QUEUE_GAUGE, OTLPExporter
from fastedge.observe.tracing import Span, Tracer
from tests.batch_recorder import until
from tests.otlp_receiver import Receiver


def spans(tracer: Tracer, names: list[str]) -> None:
    for name in names:
        tracer.start_span(name).end()


async def test_one_post_at_a_time_and_the_backlog_goes_in_full_batches(
    receiver: Receiver,
) -> None:
    receiver.hold = True
    exporter = OTLPExporter(receiver.url, max_batch=5, flush_interval=0.005)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["s0"])
    await asyncio.wait_for(receiver.got_request.wait(), 5)  # POST [s0] is held by the receiver
    spans(tracer, [f"s{i}" for i in range(1, 13)])  # size-due batches wait their turn
    await asyncio.sleep(0.03)  # several flush intervals: still no second POST
    assert receiver.active == 1 and exporter.queued == 13
    receiver.release.set()
    await until(lambda: len(receiver.posts) == 4, limit=2000)
    await exporter.aclose()
    assert [len(p) for p in receiver.posts] == [1, 5, 5, 2]
    assert receiver.names() == [f"s{i}" for i in range(13)]  # in order, none twice
    assert receiver.max_active == 1 and receiver.connections == 1
    assert exporter.exported == 13 and exporter.dropped == 0 and exporter.queued == 0


async def test_spans_arriving_during_a_slow_post_are_sent_together(receiver: Receiver) -> None:
    receiver.hold = True
    exporter = OTLPExporter(receiver.url, max_batch=512, flush_interval=0.002)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["first"])
    await asyncio.wait_for(receiver.got_request.wait(), 5)
    for i in range(6):
        spans(tracer, [f"later{i}"])
        await asyncio.sleep(0.004)  # each after the previous one's flush interval
    receiver.release.set()
    await exporter.force_flush()
    assert receiver.posts == [["first"], [f"later{i}" for i in range(6)]]
    await exporter.aclose()


async def test_the_bound_counts_spans_being_sent(receiver: Receiver) -> None:
    receiver.hold = True
    metrics = Metrics()
    exporter = OTLPExporter(receiver.url, max_queue=4, flush_interval=0.005, metrics=metrics)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["a"])
    await asyncio.wait_for(receiver.got_request.wait(), 5)
    spans(tracer, ["b", "c", "d", "e", "f"])  # room for 3 besides the one in the POST
    assert exporter.queued == 4 and exporter.dropped == 2
    text = metrics.render().decode()
    assert f"{QUEUE_GAUGE} 4" in text
    assert f'{DROPPED_TOTAL}{{reason="queue_full"}} 2' in text
    receiver.release.set()
    await exporter.aclose()
    assert receiver.names() == ["a", "b", "c", "d"]
    assert exporter.exported == 4 and exporter.dropped == 2
    assert f"{EXPORTED_TOTAL} 4" in metrics.render().decode()


async def test_cancelling_force_flush_or_aclose_loses_nothing(receiver: Receiver) -> None:
    receiver.hold = True
    exporter = OTLPExporter(receiver.url, flush_interval=3600)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["a", "b"])
    flushing = asyncio.create_task(exporter.force_flush())
    await asyncio.wait_for(receiver.got_request.wait(), 5)
    flushing.cancel()  # e.g. a caller's timeout
    with pytest.raises(asyncio.CancelledError):
        await flushing
    spans(tracer, ["c"])
    closing = asyncio.create_task(exporter.aclose())
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    receiver.release.set()
    await exporter.aclose()  # idempotent: finishes the close
    assert receiver.posts == [["a", "b"], ["c"]]
    assert exporter.exported == 3 and exporter.dropped == 0
    spans(tracer, ["late"])  # closed: counted, never raised
    assert exporter.dropped == 1


async def test_a_batch_cancelled_by_loop_teardown_is_counted(receiver: Receiver) -> None:
    receiver.hold = True
    metrics = Metrics()
    exporter = OTLPExporter(receiver.url, flush_interval=0.005, metrics=metrics)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["a", "b", "c"])
    await asyncio.wait_for(receiver.got_request.wait(), 5)
    # What asyncio.run does to leftover tasks at exit: cancel them.
    tasks = list(exporter._batcher._tasks)
    assert len(tasks) == 1
    tasks[0].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert exporter.dropped == 3 and exporter.exported == 0 and exporter.queued == 0
    assert f'{DROPPED_TOTAL}{{reason="cancelled"}} 3' in metrics.render().decode()
    await exporter.aclose()


async def test_an_unexpected_error_drops_and_counts_the_batch_and_export_goes_on(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = otlp.encode_spans
    calls = 0

    def broken_once(batch: list[Span], *args: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TypeError("a bug in encoding")
        return real(batch, *args)

    monkeypatch.setattr(otlp, "encode_spans", broken_once)
    metrics = Metrics()
    exporter = OTLPExporter(receiver.url, flush_interval=3600, metrics=metrics)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["lost1", "lost2"])
    await exporter.force_flush()
    spans(tracer, ["kept"])
    await exporter.aclose()
    assert receiver.names() == ["kept"]
    assert exporter.exported == 1 and exporter.dropped == 2
    assert f'{DROPPED_TOTAL}{{reason="export_failed"}} 2' in metrics.render().decode()


async def test_spans_ended_before_the_loop_are_held_then_sent(receiver: Receiver) -> None:
    exporter = OTLPExporter(receiver.url, max_queue=2, flush_interval=3600)
    tracer = Tracer(exporter=exporter)
    # A thread has no running loop: like spans ended while the process starts up.
    await asyncio.to_thread(spans, tracer, ["early1", "early2", "early3"])
    assert exporter.queued == 2 and exporter.dropped == 1  # bounded like the queue
    await exporter.aclose()
    assert receiver.names() == ["early1", "early2"]
    assert exporter.exported == 2


async def test_force_flush_sends_now_and_returns_when_answered(receiver: Receiver) -> None:
    exporter = OTLPExporter(receiver.url, max_batch=2, flush_interval=3600)
    tracer = Tracer(exporter=exporter)
    spans(tracer, ["a", "b", "c"])  # [a, b] by size; [c] would wait an hour
    await exporter.force_flush()
    assert receiver.posts == [["a", "b"], ["c"]] and exporter.exported == 3
    assert exporter.queued == 0
    await exporter.aclose()
