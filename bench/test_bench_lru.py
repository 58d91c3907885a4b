"""LRUCache micro benchmarks against lru-dict (C) and cachetools (pure Python).

Each round runs a batch of ``OPS`` operations, so the per-call time is the reported
time divided by ``OPS``. Run: ``pytest bench/test_bench_lru.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cachetools
import pytest
from lru import LRU

from fastedge._core import lru as compiled_lru
from fastedge._core import lru_py

OPS = 1000  # operations per benchmark round
SIZE = 1000  # cache capacity

FACTORIES: dict[str, Callable[[int], Any]] = {
    "fastedge-compiled": compiled_lru.LRUCache,
    "fastedge-python": lru_py.LRUCache,
    "lru-dict": LRU,
    "cachetools": cachetools.LRUCache,
}


@pytest.fixture(params=list(FACTORIES))
def cache(request: pytest.FixtureRequest) -> Any:
    cache = FACTORIES[request.param](SIZE)
    for key in range(SIZE):
        cache[key] = key
    return cache


@pytest.mark.benchmark(group="lru-get-hit")
def test_get_hit(benchmark: Any, cache: Any) -> None:
    get = cache.get
    keys = [(i * 7919) % SIZE for i in range(OPS)]  # spread over the list, not just the head

    def run() -> None:
        for key in keys:
            get(key)

    benchmark(run)
    assert get(keys[0]) == keys[0]


@pytest.mark.benchmark(group="lru-getitem-hit")
def test_getitem_hit(benchmark: Any, cache: Any) -> None:
    keys = [(i * 7919) % SIZE for i in range(OPS)]

    def run() -> None:
        for key in keys:
            cache[key]

    benchmark(run)


@pytest.mark.benchmark(group="lru-get-miss")
def test_get_miss(benchmark: Any, cache: Any) -> None:
    get = cache.get
    keys = list(range(SIZE, SIZE + OPS))

    def run() -> None:
        for key in keys:
            get(key)

    benchmark(run)


@pytest.mark.benchmark(group="lru-set-evict")
def test_set_with_eviction(benchmark: Any, cache: Any) -> None:
    # Two disjoint key ranges alternate, so every set inserts a new key and evicts one.
    batches = [list(range(SIZE, SIZE + OPS)), list(range(OPS))]
    state = {"turn": 0}

    def run() -> None:
        keys = batches[state["turn"] & 1]
        state["turn"] += 1
        for key in keys:
            cache[key] = key

    benchmark(run)
    assert len(cache) == SIZE


@pytest.mark.benchmark(group="lru-set-update")
def test_set_existing(benchmark: Any, cache: Any) -> None:
    keys = [(i * 7919) % SIZE for i in range(OPS)]

    def run() -> None:
        for key in keys:
            cache[key] = key

    benchmark(run)
