"""RetryPolicy decisions and backoff, RetryBudget limits: injected RNG and clock."""

from __future__ import annotations

import random

import pytest

from fastedge.upstream.retry import IDEMPOTENT_METHODS, RetryBudget, RetryPolicy


class FixedRng:
    """An RNG that returns the given values in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_idempotent_methods_retry_on_gateway_errors_and_timeouts(method: str) -> None:
    p = RetryPolicy(attempts=3)
    assert p.should_retry(method, 1, status=502)
    assert p.should_retry(method.lower(), 2, status=503)
    assert p.should_retry(method, 1, status=504)
    assert p.should_retry(method, 1, timeout=True)
    assert not p.should_retry(method, 1, status=500)  # the application's own answer
    assert not p.should_retry(method, 1, status=200)
    assert not p.should_retry(method, 1)  # no failure given
    assert not p.should_retry(method, 3, status=502)  # the third attempt was the last


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PURGE"])
def test_non_idempotent_only_on_connect_errors_unless_opted_in(method: str) -> None:
    p = RetryPolicy(attempts=2)
    assert p.should_retry(method, 1, connect_error=True)  # nothing was sent
    assert not p.should_retry(method, 1, status=503)
    assert not p.should_retry(method, 1, timeout=True)
    assert not p.should_retry(method, 2, connect_error=True)  # attempts still bound it
    opted = RetryPolicy(attempts=2, retry_non_idempotent=True)
    assert opted.should_retry(method, 1, status=503)
    assert opted.should_retry(method, 1, timeout=True)


def test_custom_statuses_and_timeout_switch() -> None:
    p = RetryPolicy(attempts=5, retry_on_statuses=[429, 500], retry_on_timeout=False)
    assert p.should_retry("GET", 4, status=429)
    assert p.should_retry("GET", 1, status=500)
    assert not p.should_retry("GET", 1, status=502)
    assert not p.should_retry("GET", 1, timeout=True)
    assert p.should_retry("GET", 1, connect_error=True)
    assert isinstance(p.retry_on_statuses, frozenset)
    assert not RetryPolicy(attempts=1).should_retry("GET", 1, connect_error=True)


def test_backoff_full_jitter_uses_the_exponential_ceiling() -> None:
    p = RetryPolicy(backoff_base=0.1, backoff_max=1.0, jitter="full")
    # ceilings: 0.1, 0.2, 0.4, 0.8, 1.0 (capped), 1.0 ...
    rng = FixedRng(0.5, 0.5, 0.5, 0.5, 0.5, 0.999)
    got = [p.backoff(a, rng) for a in range(1, 7)]
    assert got == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.999])


def test_backoff_equal_and_no_jitter() -> None:
    equal = RetryPolicy(backoff_base=0.1, backoff_max=1.0, jitter="equal")
    assert equal.backoff(3, FixedRng(0.0)) == pytest.approx(0.2)  # ceiling 0.4: [0.2, 0.4)
    assert equal.backoff(3, FixedRng(0.5)) == pytest.approx(0.3)
    none = RetryPolicy(backoff_base=0.1, backoff_max=1.0, jitter="none")
    assert [none.backoff(a, FixedRng()) for a in (1, 2, 5, 1000)] == pytest.approx(
        [0.1, 0.2, 1.0, 1.0]
    )


def test_backoff_full_jitter_spread_with_seeded_rng() -> None:
    p = RetryPolicy(backoff_base=0.025, backoff_max=0.25)
    rng = random.Random(1234)
    for attempt, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)]:
        waits = [p.backoff(attempt, rng) for _ in range(2000)]
        assert all(0 <= w < ceiling for w in waits)
        # uniform on [0, ceiling): mean ceiling/2, and both halves well used
        assert sum(waits) / len(waits) == pytest.approx(ceiling / 2, rel=0.05)
        assert sum(w < ceiling / 2 for w in waits) == pytest.approx(1000, rel=0.1)


@pytest.mark.parametrize(
    "kw",
    [
        {"attempts": 0},
        {"backoff_base": -1.0},
        {"backoff_base": 2.0, "backoff_max": 1.0},
        {"backoff_max": float("inf")},
        {"jitter": "decorrelated"},
    ],
)
def test_policy_rejects_bad_settings(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kw)  # type: ignore[arg-type]


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().backoff(0, FixedRng(0.5))


def test_budget_floor_allows_retries_on_a_quiet_service() -> None:
    b = RetryBudget(ratio=0.2, min_per_second=1, window=10)  # floor: 10 retries per 10 s
    assert b.available(0.0) == 10
    assert all(b.try_acquire_retry(0.0) for _ in range(10))
    assert not b.try_acquire_retry(0.5)
    assert b.available(0.5) == 0
    # after the window the spent retries are forgotten
    assert b.try_acquire_retry(10.0)


def test_budget_ratio_of_requests() -> None:
    b = RetryBudget(ratio=0.2, min_per_second=0, window=10)
    assert not b.try_acquire_retry(0.0)  # no requests, no floor: no retries
    for _ in range(50):
        b.record_request(1.0)
    granted = sum(b.try_acquire_retry(1.0) for _ in range(100))
    assert granted == 10  # 20 % of 50
    b.record_request(2.0)
    b.record_request(2.0)
    b.record_request(2.0)
    b.record_request(2.0)
    b.record_request(2.0)
    assert b.try_acquire_retry(2.0)  # 55 requests: 11 retries
    assert not b.try_acquire_retry(2.0)


def test_budget_caps_amplification_during_an_outage() -> None:
    """Every request fails and wants 2 retries: the budget keeps the extra load near 20 %."""
    policy = RetryPolicy(attempts=3)
    budget = RetryBudget(ratio=0.2, min_per_second=10, window=10)
    sent = requests = 0
    for tick in range(600):  # 60 s at 100 requests per second, 10 per 0.1 s tick
        now = tick / 10
        for _ in range(10):
            requests += 1
            budget.record_request(now)
            sent += 1
            attempt = 1
            while policy.should_retry("GET", attempt, status=503) and budget.try_acquire_retry(now):
                sent += 1
                attempt += 1
    # without a budget: 3x the requests; with it: at most 1.2x plus the floor (10/s)
    assert requests == 6000
    assert sent <= requests * 1.2 + 10 * 60 + 10 * 10
    assert sent > requests * 1.2  # and the budget is actually used


def test_budget_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=-0.1)
    with pytest.raises(ValueError):
        RetryBudget(min_per_second=-1)
    with pytest.raises(ValueError):
        RetryBudget(window=0)
