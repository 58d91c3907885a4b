"""TokenBucket and SlidingWindow micro benchmarks against the ``limits`` library.

Peers: ``limits`` (pure Python) with its in-process ``MemoryStorage`` and the
``MovingWindowRateLimiter`` (exact log of hits), ``FixedWindowRateLimiter`` and
``SlidingWindowCounterRateLimiter`` (the same algorithm as our SlidingWindow). Every
contender reads its own clock (our ``now=None``), as in production.

Each round runs a batch of ``OPS`` calls, so the per-call time is the reported time divided
by ``OPS`` (Python loop overhead included for every contender). Limits are set high so
every call is allowed (the steady state of a healthy service). Run:
``pytest bench/test_bench_ratelimit.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from limits import parse, storage, strategies

from fastedge._core import ratelimit as compiled_ratelimit
from fastedge._core import ratelimit_py

OPS = 1000  # calls per benchmark round
KEYS = 1000  # distinct keys in the "many keys" benchmarks
BIG = 10**12  # a limit no benchmark reaches


def _ours(kind: str, module: Any) -> Callable[..., Any]:
    if kind == "bucket":
        return module.TokenBucket(float(BIG), BIG).acquire  # type: ignore[no-any-return]
    return module.SlidingWindow(BIG, 60.0).hit  # type: ignore[no-any-return]


def _limits(strategy: type[strategies.RateLimiter]) -> Callable[[Any], Any]:
    limiter = strategy(storage.MemoryStorage())
    item = parse(f"{BIG}/minute")

    def hit(key: Any) -> bool:
        return limiter.hit(item, key)

    return hit


CONTENDERS: dict[str, Callable[[], Callable[[Any], Any]]] = {
    "fastedge-bucket-compiled": lambda: _ours("bucket", compiled_ratelimit),
    "fastedge-bucket-python": lambda: _ours("bucket", ratelimit_py),
    "fastedge-window-compiled": lambda: _ours("window", compiled_ratelimit),
    "fastedge-window-python": lambda: _ours("window", ratelimit_py),
    "limits-moving-window": lambda: _limits(strategies.MovingWindowRateLimiter),
    "limits-fixed-window": lambda: _limits(strategies.FixedWindowRateLimiter),
    "limits-sliding-counter": lambda: _limits(strategies.SlidingWindowCounterRateLimiter),
}


@pytest.fixture(params=list(CONTENDERS))
def call(request: pytest.FixtureRequest) -> Callable[[Any], Any]:
    return CONTENDERS[request.param]()


@pytest.mark.benchmark(group="ratelimit-hot-key")
def test_hot_key(benchmark: Any, call: Callable[[Any], Any]) -> None:
    """One busy client: the same key every call."""
    keys = ["user:12345"] * OPS

    def run() -> None:
        for key in keys:
            call(key)

    benchmark(run)


@pytest.mark.benchmark(group="ratelimit-many-keys")
def test_many_keys(benchmark: Any, call: Callable[[Any], Any]) -> None:
    """A thousand clients in turn (every key already known after the first round)."""
    keys = [f"user:{(i * 7919) % KEYS}" for i in range(OPS)]

    def run() -> None:
        for key in keys:
            call(key)

    benchmark(run)


@pytest.mark.benchmark(group="ratelimit-explicit-now")
@pytest.mark.parametrize("kind", ["bucket", "window"])
@pytest.mark.parametrize("module", [compiled_ratelimit, ratelimit_py], ids=["compiled", "python"])
def test_explicit_now(benchmark: Any, kind: str, module: Any) -> None:
    """Our limiters with an injected clock (no clock read): the pure bookkeeping cost."""
    method = _ours(kind, module)
    keys = [f"user:{(i * 7919) % KEYS}" for i in range(OPS)]

    def run() -> None:
        for key in keys:
            method(key, 1, 1000.0)

    benchmark(run)
