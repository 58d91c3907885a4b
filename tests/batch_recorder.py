"""A recording handler for :class:`fastedge.batching.RequestBatcher` tests (shared by
tests/test_batching.py and test_batching_nowait.py), and :func:`until`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastedge.batching import RequestBatcher


class Recorder:
    """A handler that records its batches and doubles each item; optionally gated (each
    call waits for ``gate``); tracks how many calls run at once."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []  # as called
        self.done: list[list[int]] = []  # as the calls ended
        self.gate = gate
        self.started = asyncio.Event()
        self.running = 0
        self.max_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return [i * 2 for i in items]
        finally:
            self.running -= 1
            self.done.append(list(items))


def gated(**options: Any) -> tuple[asyncio.Event, Recorder, RequestBatcher[int, int]]:
    """A batcher (``options`` passed on) over a :class:`Recorder` whose calls wait for the
    returned gate: ``gate, handler, batcher``."""
    gate = asyncio.Event()
    handler = Recorder(gate)
    batcher: RequestBatcher[int, int] = RequestBatcher(handler, **options)
    return gate, handler, batcher


async def until(predicate: Any, limit: int = 1000) -> None:
    """Let the loop run until ``predicate()`` holds (bounded, no wall-clock assertion)."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")
