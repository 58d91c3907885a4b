"""TokenBucket and SlidingWindow on both implementations: semantics, bounds, bad input,
eviction and leaks. Time is always injected (``now=``); nothing sleeps."""

from __future__ import annotations

import gc
import math
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import IMPLS, load


@pytest.fixture
def mod(impl: str) -> Any:
    return load("ratelimit", impl)


def test_compiled_module_is_really_compiled() -> None:
    """A normal (built) checkout must not silently test the Python twin twice."""
    assert str(load("ratelimit", "compiled").__file__).endswith((".so", ".pyd"))


# -- TokenBucket ----------------------------------------------------------------------


def test_bucket_starts_full_and_drains(mod: Any) -> None:
    tb = mod.TokenBucket(2.0, 3)
    assert tb.acquire("k", now=10.0) == (True, 2, 0.0)
    assert tb.acquire("k", now=10.0) == (True, 1, 0.0)
    assert tb.acquire("k", now=10.0) == (True, 0, 0.0)
    assert tb.acquire("k", now=10.0) == (False, 0, 0.5)  # 1 token at 2/s
    assert tb.acquire("k", 2, now=10.0) == (False, 0, 1.0)
    assert (tb.rate, tb.burst, tb.max_keys, len(tb)) == (2.0, 3, 100_000, 1)


def test_bucket_refills_continuously_up_to_burst(mod: Any) -> None:
    tb = mod.TokenBucket(4.0, 8)
    assert tb.acquire("k", 8, now=0.0) == (True, 0, 0.0)
    assert tb.acquire("k", 1, now=0.25) == (True, 0, 0.0)  # 0.25 s * 4/s = 1 token
    assert tb.acquire("k", 3, now=0.75) == (False, 2, 0.25)  # 2 tokens, 1 short
    assert tb.acquire("k", 3, now=1.0) == (True, 0, 0.0)
    assert tb.acquire("k", 1, now=1000.0) == (True, 7, 0.0)  # capped at burst


def test_bucket_keys_are_independent(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 1)
    assert tb.acquire("a", now=0.0)[0]
    assert not tb.acquire("a", now=0.0)[0]
    assert tb.acquire("b", now=0.0)[0]
    assert tb.acquire(("tuple", 1), now=0.0)[0]  # any hashable key


def test_bucket_cost_above_burst_is_never_allowed_and_changes_nothing(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 5)
    assert tb.acquire("k", 6, now=0.0) == (False, 5, math.inf)
    assert len(tb) == 0  # no state was created for an impossible request
    tb.acquire("k", 2, now=0.0)
    assert tb.acquire("k", 10**40, now=1.0) == (False, 4, math.inf)  # huge ints too
    assert tb.acquire("k", 4, now=1.0) == (True, 0, 0.0)


def test_bucket_peek_does_not_take_or_touch(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 3, max_keys=2)
    assert tb.peek("new", now=0.0) == (True, 3, 0.0)
    assert len(tb) == 0
    tb.acquire("a", 3, now=0.0)
    tb.acquire("b", now=0.0)
    assert tb.peek("a", 2, now=1.0) == (False, 1, 1.0)
    assert tb.peek("a", 1, now=1.0) == (True, 1, 0.0)
    assert tb.peek("a", 9, now=1.0) == (False, 1, math.inf)
    tb.acquire("c", now=1.0)  # "a" stays least recently used despite the peeks
    assert tb.reset("a") is False and tb.reset("b") is True


def test_bucket_reset_and_clear(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 2)
    tb.acquire("k", 2, now=0.0)
    assert tb.reset("k") is True
    assert tb.reset("k") is False
    assert tb.acquire("k", 2, now=0.0) == (True, 0, 0.0)
    tb.acquire("j", now=0.0)
    tb.clear()
    assert len(tb) == 0
    assert tb.acquire("j", 2, now=0.0) == (True, 0, 0.0)


def test_bucket_clock_going_back_adds_nothing(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 2)
    tb.acquire("k", 2, now=100.0)
    assert tb.acquire("k", now=50.0) == (False, 0, 1.0)
    assert tb.acquire("k", now=101.0) == (True, 0, 0.0)  # refill counts from 100.0


def test_bucket_default_clock_is_monotonic(mod: Any) -> None:
    tb = mod.TokenBucket(1e-9, 1)
    assert tb.acquire("k") == (True, 0, 0.0)
    allowed, _, retry = tb.acquire("k")
    assert not allowed and retry > 1e8


@settings(max_examples=60, deadline=None)
@given(
    impl=st.sampled_from(IMPLS),
    rate=st.floats(0.1, 100.0),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(1, 25)), max_size=60),
)
def test_bucket_never_exceeds_burst_plus_refill(
    impl: str, rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    tb = load("ratelimit", impl).TokenBucket(rate, burst)
    now = 0.0
    granted = 0
    for dt, cost in steps:
        now += dt
        allowed, remaining, retry = tb.acquire("k", cost, now=now)
        assert 0 <= remaining <= burst
        if allowed:
            granted += cost
            assert retry == 0.0
        else:
            assert retry > 0.0
            # Waiting the advertised time is enough (a hair more for float rounding).
            wait = now + retry * (1 + 1e-9) + 1e-9
            assert cost > burst or tb.peek("k", cost, now=wait)[0]
    assert granted <= burst + rate * now + 1e-6


# -- SlidingWindow --------------------------------------------------------------------


def test_window_counts_within_one_window(mod: Any) -> None:
    sw = mod.SlidingWindow(3, 10.0)
    assert sw.hit("k", now=100.0) == (True, 2, 10.0)
    assert sw.hit("k", now=102.5) == (True, 1, 7.5)
    assert sw.hit("k", now=105.0) == (True, 0, 5.0)
    # Refused: only once this window ends does `curr` start to decay (to 2 at 3.33 s in).
    allowed, remaining, retry = sw.hit("k", now=105.0)
    assert (allowed, remaining) == (False, 0)
    assert retry == pytest.approx(5.0 + 10.0 / 3)
    assert (sw.limit, sw.window, len(sw)) == (3, 10.0, 1)


def test_window_weights_previous_window(mod: Any) -> None:
    sw = mod.SlidingWindow(10, 1.0)
    assert sw.hit("k", 10, now=0.0)[0]
    # Half-way through the next window the estimate is 10 * 0.5 = 5.
    assert sw.peek("k", now=1.5) == (True, 5, 0.5)
    assert sw.hit("k", 5, now=1.5) == (True, 0, 0.5)
    allowed, remaining, retry = sw.hit("k", 1, now=1.5)
    assert (allowed, remaining) == (False, 0)
    assert retry == pytest.approx(0.1)  # at 1.6 the previous share is 4: 4 + 5 + 1 = 10
    assert sw.hit("k", 1, now=1.6 + 1e-9)[0]
    # Two windows later everything is forgotten.
    assert sw.hit("k", 10, now=3.0) == (True, 0, 1.0)


def test_window_denied_hits_do_not_count(mod: Any) -> None:
    sw = mod.SlidingWindow(2, 1.0)
    sw.hit("k", 2, now=0.0)
    for _ in range(5):
        assert not sw.hit("k", now=0.5)[0]
    assert sw.peek("k", 2, now=2.0)[0]  # the prev window holds 2, not 7
    assert sw.peek("k", 1, now=1.5) == (True, 1, 0.5)


def test_window_cost_above_limit(mod: Any) -> None:
    sw = mod.SlidingWindow(5, 1.0)
    assert sw.hit("k", 6, now=0.0) == (False, 5, math.inf)
    assert len(sw) == 0
    assert sw.hit("k", 10**30, now=0.0) == (False, 5, math.inf)


def test_window_clock_going_back_holds(mod: Any) -> None:
    sw = mod.SlidingWindow(2, 1.0)
    sw.hit("k", 2, now=5.5)
    allowed, _, retry = sw.hit("k", now=3.0)  # an earlier window: counted as 5.0
    assert not allowed and retry == pytest.approx(1.5)


def test_window_reset_and_clear(mod: Any) -> None:
    sw = mod.SlidingWindow(1, 1.0)
    sw.hit("k", now=0.0)
    assert sw.reset("k") is True and sw.reset("k") is False
    assert sw.hit("k", now=0.0)[0]
    sw.clear()
    assert len(sw) == 0


@settings(max_examples=60, deadline=None)
@given(
    impl=st.sampled_from(IMPLS),
    limit=st.integers(1, 12),
    steps=st.lists(st.tuples(st.floats(0.0, 0.7), st.integers(1, 6)), max_size=80),
)
def test_window_error_bound(impl: str, limit: int, steps: list[tuple[float, int]]) -> None:
    """No true sliding window ever holds 2*limit; curr never exceeds limit; the
    advertised wait is enough."""
    window = 1.0
    sw = load("ratelimit", impl).SlidingWindow(limit, window)
    now = 0.0
    allowed_at: list[tuple[float, int]] = []
    for dt, cost in steps:
        now += dt
        allowed, remaining, seconds = sw.hit("k", cost, now=now)
        assert 0 <= remaining <= limit
        if allowed:
            allowed_at.append((now, cost))
            true_count = sum(c for t, c in allowed_at if t > now - window)
            assert true_count < 2 * limit
            current = sum(c for t, c in allowed_at if t >= math.floor(now) * window)
            assert current <= limit
            assert 0.0 < seconds <= window
        elif cost <= limit:
            wait = now + seconds * (1 + 1e-9) + 1e-9
            assert sw.peek("k", cost, now=wait)[0]


def test_window_passes_evenly_spread_traffic_under_the_limit(mod: Any) -> None:
    """Evenly spread hits are what the estimate assumes: 9/s against 10/s is never
    refused (the estimate stays at 8.5 + 1), while 11/s is cut to 9-10/s."""
    sw = mod.SlidingWindow(10, 1.0)
    refused = sum(not sw.hit("a", now=(i + 0.5) / 9)[0] for i in range(180))
    assert refused == 0
    allowed = sum(sw.hit("b", now=(i + 0.5) / 11)[0] for i in range(220))
    assert 170 <= allowed <= 200


# -- bounded memory and eviction -------------------------------------------------------


@pytest.mark.parametrize("kind", ["bucket", "window"])
def test_max_keys_bound(mod: Any, kind: str) -> None:
    if kind == "bucket":
        limiter = mod.TokenBucket(1.0, 5, max_keys=50)
    else:
        limiter = mod.SlidingWindow(5, 60.0, max_keys=50)
    call = limiter.acquire if kind == "bucket" else limiter.hit
    for i in range(1000):
        call(f"key-{i}", 2, now=i * 1e-3)  # nobody has decayed back to fresh
        assert len(limiter) <= 50
    assert len(limiter) == 50
    # The survivors are the 50 most recent keys, with their state intact.
    assert call("key-999", 2, now=1.0)[1] == 1
    assert limiter.reset("key-949") is False
    assert limiter.reset("key-950") is True


def test_bucket_prefers_dropping_keys_that_are_full_again(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 2, max_keys=3)
    tb.acquire("idle", 2, now=0.0)  # full again at t=2
    tb.acquire("busy1", 2, now=9.5)
    tb.acquire("busy2", 2, now=9.5)
    tb.acquire("new", now=10.0)  # "idle" is refilled: dropping it loses nothing
    assert len(tb) == 3
    assert tb.reset("busy1") and tb.reset("busy2") and not tb.reset("idle")


def test_bucket_evicts_least_recent_when_nobody_is_full(mod: Any) -> None:
    tb = mod.TokenBucket(1.0, 10, max_keys=2)
    tb.acquire("a", 5, now=0.0)
    tb.acquire("b", 5, now=0.0)
    tb.acquire("a", 1, now=0.0)  # "b" is now least recent
    tb.acquire("c", 1, now=0.0)
    assert tb.peek("a", now=0.0)[1] == 4
    assert not tb.reset("b")
    assert tb.peek("b", now=0.0)[1] == 10  # came back fresh: the cost of a small table


def test_idle_keys_are_pruned_on_new_inserts(mod: Any) -> None:
    tb = mod.TokenBucket(10.0, 1)
    sw = mod.SlidingWindow(1, 1.0)
    for i in range(8):
        tb.acquire(i, now=0.0)
        sw.hit(i, now=0.0)
    tb.acquire("late", now=100.0)
    sw.hit("late", now=100.0)
    # At most 4 stale keys are dropped per insert, keeping each call's work bounded.
    assert len(tb) == 5 and len(sw) == 5
    tb.acquire("later", now=100.0)
    sw.hit("later", now=100.0)
    assert len(tb) == 2 and len(sw) == 2


def test_window_prunes_only_empty_keys(mod: Any) -> None:
    sw = mod.SlidingWindow(5, 1.0, max_keys=10)
    sw.hit("old", now=0.0)
    sw.hit("recent", now=1.2)
    sw.hit("new", now=1.5)  # "old" still weighs in as the previous window: kept
    assert len(sw) == 4 - 1
    sw.hit("newer", now=2.2)  # "old" (window 0) is empty from window 2 on; "recent" not
    assert len(sw) == 3 and not sw.reset("old") and sw.reset("recent")


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((0, 1), {}, ValueError),
        ((-1.0, 1), {}, ValueError),
        ((math.inf, 1), {}, ValueError),
        ((math.nan, 1), {}, ValueError),
        (("1", 1), {}, TypeError),
        ((True, 1), {}, TypeError),
        ((1.0, 0), {}, ValueError),
        ((1.0, 1.5), {}, TypeError),
        ((1.0, 2**53 + 1), {}, ValueError),
        ((1.0, 1), {"max_keys": 0}, ValueError),
        ((1.0, 1), {"max_keys": None}, TypeError),
    ],
)
def test_bucket_rejects_bad_construction(
    mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        mod.TokenBucket(*args, **kwargs)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, 1.0), ValueError),
        ((1, 0.0), ValueError),
        ((1, -2), ValueError),
        ((1.0, 1.0), TypeError),
        ((1, "1"), TypeError),
        ((1, math.nan), ValueError),
    ],
)
def test_window_rejects_bad_construction(
    mod: Any, args: tuple[Any, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        mod.SlidingWindow(*args)


@pytest.mark.parametrize(
    ("cost", "now", "error"),
    [
        (0, 1.0, ValueError),
        (-3, 1.0, ValueError),
        (-(10**30), 1.0, ValueError),
        (1.0, 1.0, TypeError),
        (True, 1.0, TypeError),
        ("1", 1.0, TypeError),
        (1, "1.0", TypeError),
        (1, math.nan, ValueError),
        (1, math.inf, ValueError),
    ],
)
def test_bad_calls_raise_and_leave_state_alone(
    mod: Any, cost: Any, now: Any, error: type[Exception]
) -> None:
    tb = mod.TokenBucket(1.0, 3)
    sw = mod.SlidingWindow(3, 1.0)
    tb.acquire("k", 2, now=0.0)
    sw.hit("k", 2, now=0.0)
    for call in (tb.acquire, tb.peek, sw.hit, sw.peek):
        with pytest.raises(error):
            call("k", cost, now)
    with pytest.raises(TypeError):
        tb.acquire(["unhashable"], now=0.0)
    with pytest.raises(TypeError):
        sw.hit(["unhashable"], now=0.0)
    assert tb.peek("k", now=0.0) == (True, 1, 0.0)
    assert sw.peek("k", now=0.0) == (True, 1, 1.0)
    assert len(tb) == len(sw) == 1


# -- references and memory -------------------------------------------------------------


def test_no_reference_leaks(mod: Any) -> None:
    """Keys are released on eviction, reset, clear and when the limiter dies."""
    key = "a-key-object-" + "x" * 20
    base = sys.getrefcount(key)
    for which in range(2):
        limiter, call = _limiters(mod, max_keys=4)[which]
        for i in range(100):
            call(key, 1, now=float(i))
            call(f"other-{i}", 1, now=float(i))  # churn: `key` gets evicted and re-added
        call(key, 1, now=200.0)
        # The table's references: the dict key plus the entry's (compiled) or the
        # OrderedDict's link (Python) -- and no more, however often it was re-added.
        assert sys.getrefcount(key) == base + 2
        limiter.reset(key)
        assert sys.getrefcount(key) == base
        call(key, 1, now=201.0)
        limiter.clear()
        assert sys.getrefcount(key) == base
        call(key, 1, now=202.0)
        del limiter, call
        gc.collect()
        assert sys.getrefcount(key) == base


def test_memory_stays_flat_under_churn(mod: Any) -> None:
    limiters = _limiters(mod, max_keys=1000)

    def churn(start: int) -> None:
        for i in range(start, start + 20_000):
            for _, call in limiters:
                call(i, 1 + i % 3, now=i * 1e-3)
                call(i % 7, 1, now=i * 1e-3)

    tracemalloc.start()
    try:
        # Fill the tables to max_keys while traced (so the baseline counts the entries).
        churn(0)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        churn(20_000)
        churn(40_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes kept after 160k calls on full tables"
    assert all(len(limiter) <= 1000 for limiter, _ in limiters)


def _limiters(mod: Any, max_keys: int) -> list[tuple[Any, Any]]:
    tb = mod.TokenBucket(5.0, 3, max_keys=max_keys)
    sw = mod.SlidingWindow(3, 1.0, max_keys=max_keys)
    return [(tb, tb.acquire), (sw, sw.hit)]
