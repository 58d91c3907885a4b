"""CircuitBreaker: state transitions driven by an injected clock, and invariants checked by
a Hypothesis state machine. Nothing sleeps."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastedge.upstream.breaker import CircuitBreaker, RollingCounts


def state(b: CircuitBreaker) -> str:
    """The state as a plain str (mypy would narrow the Literal across calls)."""
    return b.state


def tripped(min_requests: int = 4, **kw: float) -> CircuitBreaker:
    """A breaker that opened at t=0 (``min_requests`` failures)."""
    b = CircuitBreaker(min_requests=min_requests, **kw)  # type: ignore[arg-type]
    for _ in range(min_requests):
        assert b.allow(0.0)
        b.record(False, 0.0)
    assert state(b) == "open"
    return b


def test_rolling_counts_forget_old_buckets() -> None:
    c = RollingCounts(window=10.0, buckets=10)
    c.add(0.5, 1, 1)
    c.add(3.2, 2, 0)
    assert c.sums(3.5) == (3, 1)
    assert c.sums(10.4) == (2, 0)  # bucket [0, 1) left the window at t=10
    assert c.sums(12.9) == (2, 0)  # the window is the current bucket and the 9 before
    assert c.sums(13.0) == (0, 0)
    c.add(25.0, 1, 1)  # the slot of bucket 5 (t in [5, 6)) is reused for bucket 25
    assert c.sums(25.0) == (1, 1)
    c.clear()
    assert c.sums(25.0) == (0, 0)
    with pytest.raises(ValueError):
        RollingCounts(0.0)
    with pytest.raises(ValueError):
        RollingCounts(1.0, 0)


def test_closed_trips_on_ratio_with_enough_requests() -> None:
    b = CircuitBreaker(failure_ratio=0.5, min_requests=10)
    for i in range(9):
        b.record(i % 2 == 0, 1.0)  # 4 failures of 9: below min_requests anyway
    assert state(b) == "closed"
    b.record(True, 1.0)  # 10 requests, 4 failures: 40 % < 50 %
    assert state(b) == "closed"
    b.record(False, 1.0)  # 11 requests, 5 failures: 45 %
    assert state(b) == "closed"
    b.record(False, 1.0)  # 12 requests, 6 failures: 50 % reaches the ratio
    assert state(b) == "open"
    assert not b.allow(1.0)
    assert b.trips == 1


def test_few_requests_never_trip() -> None:
    b = CircuitBreaker(min_requests=20)
    for _ in range(19):
        b.record(False, 0.0)
    assert state(b) == "closed" and b.allow(0.0)


def test_failures_leave_the_window() -> None:
    b = CircuitBreaker(min_requests=4, failure_ratio=0.5, window=10.0)
    for _ in range(3):
        b.record(False, 0.0)
    # 10 s later those failures are gone: 3 successes + 1 failure is 25 %
    for _ in range(3):
        b.record(True, 10.5)
    b.record(False, 10.5)
    assert state(b) == "closed"
    assert b.stats(10.5)["requests"] == 4


def test_open_then_half_open_then_closed() -> None:
    b = tripped(open_for=5.0, half_open_probes=2)
    assert b.retry_after(1.0) == pytest.approx(4.0)
    assert not b.allow(4.999)
    assert b.allow(5.0)  # the first probe
    assert state(b) == "half_open"
    assert b.allow(5.0)  # the second probe
    assert not b.allow(5.0)  # no third while two are out
    assert b.retry_after(5.0) == 5.0
    b.record(True, 5.1)
    assert state(b) == "half_open"
    assert not b.allow(5.1)  # two probes per half-open period, not two at a time
    b.record(True, 5.2)
    assert state(b) == "closed"
    assert b.retry_after(5.2) == 0.0
    assert b.stats(5.2)["requests"] == 0  # a fresh window after closing


def test_probe_failure_reopens_with_growing_capped_time() -> None:
    b = tripped(open_for=5.0, open_for_max=12.0)
    t = 0.0
    expected = [10.0, 12.0, 12.0]  # 5 -> 10 -> 20 capped at 12
    for open_for in [5.0, *expected]:
        assert not b.allow(t + open_for - 0.01)
        assert b.allow(t + open_for)
        t += open_for
        b.record(False, t)
        assert state(b) == "open"
    assert b.stats(t)["open_for"] == 12.0
    # a successful probe closes and resets the open time
    assert b.allow(t + 12.0)
    b.record(True, t + 12.0)
    assert state(b) == "closed"
    for _ in range(4):
        b.record(False, t + 13.0)
    assert state(b) == "open"
    assert b.retry_after(t + 13.0) == 5.0


def test_results_while_open_are_ignored_and_abandon_frees_a_probe() -> None:
    b = tripped(open_for=5.0)
    b.record(True, 1.0)  # a request from before the trip finishing late
    assert state(b) == "open"
    assert b.allow(5.0)
    assert not b.allow(5.0)
    b.abandon()  # the probe's client went away: let another request probe
    assert b.allow(5.0)
    b.record(True, 5.5)
    assert state(b) == "closed"


def test_stale_generation_results_are_ignored() -> None:
    b = CircuitBreaker(min_requests=2, open_for=5.0)
    slow = b.generation  # a slow request admitted while closed
    assert b.allow(0.0)
    b.record(False, 0.0)
    b.record(False, 0.0)
    assert state(b) == "open"
    assert b.allow(6.0)
    probe = b.generation
    assert probe != slow and state(b) == "half_open"
    b.abandon(generation=slow)  # must not free the probe's slot
    assert not b.allow(6.0)
    b.record(False, 6.1, generation=slow)  # nor re-open the breaker
    assert state(b) == "half_open"
    b.record(True, 6.2, generation=probe)
    assert state(b) == "closed"


def test_injected_clock_and_stats() -> None:
    now = [100.0]
    b = CircuitBreaker(min_requests=2, open_for=3.0, clock=lambda: now[0])
    b.record(False)
    b.record(False)
    assert state(b) == "open"
    now[0] = 102.0
    assert not b.allow()
    assert b.retry_after() == pytest.approx(1.0)
    stats = b.stats()
    assert stats["state"] == "open" and stats["failures"] == 2 and stats["trips"] == 1
    now[0] = 103.0
    assert b.allow()
    assert b.stats()["probes_inflight"] == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"min_requests": 0},
        {"open_for": 0.0},
        {"open_for": 10.0, "open_for_max": 5.0},
        {"half_open_probes": 0},
    ],
)
def test_rejects_bad_settings(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kw)  # type: ignore[arg-type]


PROBES = 2
OPEN_FOR = 2.0
OPEN_FOR_MAX = 8.0
MIN_REQUESTS = 4


class BreakerMachine(RuleBasedStateMachine):
    """Random traffic against one breaker, checked against what the model can prove."""

    def __init__(self) -> None:
        super().__init__()
        self.b = CircuitBreaker(
            failure_ratio=0.5,
            min_requests=MIN_REQUESTS,
            window=10.0,
            buckets=5,
            open_for=OPEN_FOR,
            open_for_max=OPEN_FOR_MAX,
            half_open_probes=PROBES,
        )
        self.now = 0.0
        # (generation, half-open period) of each request let through
        self.outstanding: list[tuple[int, int]] = []
        self.period = 0  # half-open periods seen so far (0: none yet)
        self.admitted_in_period = 0
        self.opened_at: float | None = None
        self.recorded_since_close = 0

    def _after(self, before: str) -> None:
        after = self.b.state
        if after == "open" and before != "open":
            self.opened_at = self.now
            if before == "closed":
                # tripping from closed needs min_requests outcomes since the last close
                assert self.recorded_since_close >= MIN_REQUESTS
        if after == "closed" and before != "closed":
            self.recorded_since_close = 0

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.75, 2.0, 3.0, 7.75, 8.0, 12.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: self.b.state == "open" and self.opened_at is not None)
    @rule(offset=st.sampled_from([-0.25, 0.0, 0.25, OPEN_FOR_MAX - OPEN_FOR]))
    def jump_near_reopen(self, offset: float) -> None:
        """Time right around the end of the base open time, where bugs would hide."""
        assert self.opened_at is not None
        self.now = max(self.now, self.opened_at + OPEN_FOR + offset)

    @rule()
    def allow(self) -> None:
        before = self.b.state
        if before == "closed":
            assert self.b.allow(self.now)
            self.outstanding.append((self.b.generation, 0))
            return
        if before == "open":
            assert self.opened_at is not None
            elapsed = self.now - self.opened_at
            # never admits before open_for; always admits once open_for_max passed
            expect: bool | None = (
                False if elapsed < OPEN_FOR else True if elapsed >= OPEN_FOR_MAX else None
            )
            got = self.b.allow(self.now)
            if expect is not None:
                assert got is expect
            if self.b.state == "half_open":
                self.period += 1
                self.admitted_in_period = 0
        else:
            got = self.b.allow(self.now)
        if got:
            assert self.b.state == "half_open"
            self.admitted_in_period += 1
            self.outstanding.append((self.b.generation, self.period))
        self._after(before)

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), success=st.booleans())
    def complete(self, data: st.DataObject, success: bool) -> None:
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        generation, _ = self.outstanding.pop(i)
        before = self.b.state
        if before == "closed" and generation == self.b.generation:
            self.recorded_since_close += 1
        self.b.record(success, self.now, generation=generation)
        self._after(before)

    @precondition(lambda self: self.outstanding)
    @rule(success=st.booleans())
    def complete_latest(self, success: bool) -> None:
        """The newest request finishes: in half-open, most likely a probe."""
        generation, _ = self.outstanding.pop()
        before = self.b.state
        if before == "closed" and generation == self.b.generation:
            self.recorded_since_close += 1
        self.b.record(success, self.now, generation=generation)
        self._after(before)

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.outstanding) - 1))
        generation, period = self.outstanding.pop(i)
        if self.b.state == "half_open" and generation == self.b.generation:
            assert period == self.period
            self.admitted_in_period -= 1
        self.b.abandon(generation=generation)

    @invariant()
    def probes_bounded(self) -> None:
        if self.b.state == "half_open":
            in_flight = sum(1 for g, _ in self.outstanding if g == self.b.generation)
            assert in_flight <= self.admitted_in_period <= PROBES
            assert int(self.b.stats(self.now)["probes_inflight"]) <= PROBES

    @invariant()
    def retry_after_consistent(self) -> None:
        ra = self.b.retry_after(self.now)
        assert 0.0 <= ra <= OPEN_FOR_MAX
        if self.b.state == "closed":
            assert ra == 0.0
        if self.b.state == "open" and self.opened_at is not None:
            assert ra == pytest.approx(
                max(0.0, self.opened_at + float(self.b.stats(self.now)["open_for"]) - self.now)
            )


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_breaker_state_machine = BreakerMachine.TestCase
