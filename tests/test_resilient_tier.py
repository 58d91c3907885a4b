"""``ResilientTier`` (the express lane's C contract for one tier of round robin) held to
``Upstream``'s own methods.

``fastedge/upstream/resilient_tier.py`` replaces, on the express lane, three calls of the
resilience contract for an upstream with one priority tier of round robin and any mix of
health checks, breaker, outlier detection and retries:

* ``tier.attempt()`` for ``upstream.express_attempt(None)``,
* ``tier.record_request()`` for ``upstream.record_request()``,
* ``tier.report(target, gen, status)`` for
  ``upstream.report(target, gen, status < 500, status=status)``.

Each must give the same answer and leave the same state behind: the round robin's scores
and last pick, ``PriorityGroups._picked``, every breaker's state, generation, probe
slots, open time and rolling counts, the outlier detector's four tables, the retry
budget's counts, and the ejection's log line and metric. The tests here run twin
upstreams built from one config, one driven through the tier and the other through the
reference methods, on one fake clock (``fastedge.gateway``'s and
``fastedge.upstream.resilient_tier``'s ``time.monotonic`` and every breaker's
``_clock``), and compare everything after every step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

import fastedge.gateway as gateway_module
import fastedge.upstream.resilient_tier as resilient_tier_module
from fastedge.config import parse_config, parse_targets
from fastedge.gateway import Target, Upstream
from fastedge.observe.metrics import Metrics
from fastedge.upstream.breaker import CircuitBreaker, RollingCounts
from fastedge.upstream.resilient_tier import ResilientTier
from tests.test_express_resilience import FakeClock, names, on_clock

# Never dialled: only the upstreams' choices and bookkeeping are used.
URLS = [f"http://127.0.0.1:{i}" for i in range(1, 9)]
STATUSES = (200, 404, 499, 500, 503)  # 499/500: either side of the 5xx boundary
TICKS = (0.0, 0.5, 1.0, 2.5, 5.0, 6.0, 10.0, 11.0, 20.0, 40.0)  # open_for 5 s, ejection 10 s

Choice = tuple[Target, int] | None


# --- building twins ------------------------------------------------------------------------


@contextmanager
def fake_time() -> Iterator[FakeClock]:
    """A :class:`FakeClock` read by ``Upstream`` and ``ResilientTier`` (breakers are put
    on it per upstream with :func:`on_clock`)."""
    clock = FakeClock()
    shim = SimpleNamespace(monotonic=clock.monotonic)
    with (
        mock.patch.object(gateway_module, "time", shim),
        mock.patch.object(resilient_tier_module, "time", shim),
    ):
        yield clock


def make(metrics: Metrics | None = None, **main: Any) -> Upstream:
    """Upstream ``u`` from ``main`` (targets default to two URLs); an upstream
    ``backup`` exists for ``fallback``. Needs a running loop (the pools)."""
    main.setdefault("targets", URLS[:2])
    cfg = parse_config(
        {
            "upstreams": {"u": main, "backup": {"targets": [URLS[7]]}},
            "routes": [{"prefix": "/", "upstream": "u"}],
        }
    )
    return Upstream(cfg.upstreams["u"], metrics=metrics)


@dataclass(frozen=True)
class Shape:
    """One resilient round-robin upstream's config (one priority tier)."""

    weights: tuple[int, ...]
    health_check: bool = False
    breaker: tuple[int, int] | None = None  # (min_requests, half_open_probes)
    outlier: int | None = None  # consecutive_failures
    retry: bool = False
    fallback_response: bool = False

    def config(self) -> dict[str, Any]:
        main: dict[str, Any] = {
            "targets": [{"url": URLS[i], "weight": w} for i, w in enumerate(self.weights)]
        }
        if self.health_check:
            main["health_check"] = {}
        if self.breaker is not None:
            main["breaker"] = {
                "min_requests": self.breaker[0],
                "failure_ratio": 0.5,
                "open_for": "5s",
                "open_for_max": "20s",
                "half_open_probes": self.breaker[1],
            }
        if self.outlier is not None:
            main["outlier"] = {
                "consecutive_failures": self.outlier,
                "base_ejection": "10s",
                "max_ejection": "40s",
            }
        if self.retry:
            main["retry"] = {}
        if self.fallback_response:
            main["fallback_response"] = {"status": 503, "body": "none left"}
        return main


def twins(shape: Shape, clock: FakeClock, **kw: Any) -> tuple[Upstream, Upstream]:
    """Two upstreams from ``shape`` on ``clock``: the first has a ``ResilientTier``."""
    a, b = make(**kw, **shape.config()), make(**kw, **shape.config())
    on_clock(clock, a, b)
    assert a.express_resilient is not None and b.express_resilient is not None
    return a, b


def tier_of(up: Upstream) -> ResilientTier:
    """The upstream's current tier (the lane reads it per call, as here)."""
    tier = up.express_resilient
    assert tier is not None
    return tier


# --- comparing twins -----------------------------------------------------------------------


def counts(c: RollingCounts, now: float) -> tuple[Any, ...]:
    """A rolling window: its sums at ``now`` and its raw buckets."""
    return c.sums(now), list(c._epochs), list(c._totals), list(c._hits)


def breaker_view(b: CircuitBreaker | None, now: float) -> tuple[Any, ...] | None:
    """Everything a breaker holds."""
    if b is None:
        return None
    return (
        b._state,
        b.generation,
        b._probes_inflight,
        b._probe_successes,
        b._opened_at,
        b._open_for_now,
        b.trips,
        counts(b._counts, now),
    )


def snapshot(up: Upstream, known: list[Target], now: float) -> dict[str, Any]:
    """The state ``attempt``, ``record_request`` and ``report`` read or write, read
    without side effects (``known``: every target the upstream ever had, in order of
    appearance, so that removed targets' breakers count too)."""
    groups = up.balancer
    tiers = groups.balancers
    picked = groups._picked
    od = up.outlier
    budget = up.budget
    checker = up.checker
    return {
        "targets": [(t.name, t.weight) for t in up.targets],
        "round_robin": [(list(rr._current), rr._last) for rr in tiers],
        # the group balancer PriorityGroups.unpick() would take back (-1: a stranger)
        "picked": None
        if picked is None
        else next((i for i, rr in enumerate(tiers) if rr is picked), -1),
        "health": None if checker is None else [checker.state(t).healthy for t in up.targets],
        "breakers": [breaker_view(t.breaker, now) for t in known],
        "outlier": None
        if od is None
        else (
            dict(od._consecutive),
            dict(od._ejected_until),
            dict(od._ejections),
            dict(od._returned_at),
        ),
        "budget": None
        if budget is None
        else (counts(budget._requests, now), counts(budget._retries, now)),
    }


def attempt_both(a: Upstream, b: Upstream) -> tuple[Choice, Choice]:
    """The lane's attempt on ``a`` (the tier) and on ``b`` (``express_attempt``): the
    same target (by position and URL) and the same breaker generation."""
    got, want = tier_of(a).attempt(), b.express_attempt(None)
    assert names(got) == names(want)
    if got is not None and want is not None:
        assert a.targets.index(got[0]) == b.targets.index(want[0])
        assert got[1] == want[1]
    return got, want


def report_both(a: Upstream, b: Upstream, got: Choice, want: Choice, status: int) -> None:
    """Report ``status`` for an attempt: through the tier on ``a``, ``Upstream.report``
    on ``b``."""
    assert got is not None and want is not None
    tier_of(a).report(got[0], got[1], status)
    b.report(want[0], want[1], status < 500, status=status)


def same(a: Upstream, b: Upstream, now: float) -> dict[str, Any]:
    """Assert the twins hold the same state; return it."""
    view = snapshot(a, list(a.targets), now)
    assert view == snapshot(b, list(b.targets), now)
    return view


def situation(up: Upstream, now: float) -> str:
    """What an attempt is about to face (read-only, for ``event()``)."""
    checker = up.checker
    od = up.outlier
    live = [
        t
        for t in up.targets
        if (checker is None or checker.state(t).healthy)
        and not (
            t.breaker is not None and t.breaker._state == "open" and t.breaker.retry_after(now) > 0
        )
    ]
    if not live:
        return "none available"
    if od is not None:
        if all(now < od._ejected_until.get(t.name, now) for t in live):
            return "panic: every available target ejected"
        live = [t for t in live if not now < od._ejected_until.get(t.name, now)]
    if all(
        t.breaker is not None
        and t.breaker._state == "half_open"
        and t.breaker._probes_inflight + t.breaker._probe_successes >= t.breaker.half_open_probes
        for t in live
    ):
        return "every breaker refuses"
    return "some target admits"


# --- 1. eligibility --------------------------------------------------------------------------

TIERED: dict[str, dict[str, Any]] = {
    "health": {"health_check": {}},
    "breaker": {"breaker": {}},
    "outlier": {"outlier": {}},
    "retry": {"retry": {}},
    "breaker+outlier+retry": {"breaker": {}, "outlier": {}, "retry": {}},
    "health+breaker": {"health_check": {}, "breaker": {}},
    "health+outlier": {"health_check": {}, "outlier": {}},
    "health+retry": {"health_check": {}, "retry": {}},
    "health+all": {"health_check": {}, "breaker": {}, "outlier": {}, "retry": {}},
    "health+fallback_response": {"health_check": {}, "fallback_response": {}},
    "breaker+fallback": {"breaker": {}, "fallback": "backup"},
    "one target": {"targets": URLS[:1], "breaker": {}},
    "one tier, not priority 0": {
        "targets": [
            {"url": URLS[0], "priority": 2, "weight": 3},
            {"url": URLS[1], "priority": 2},
            {"url": URLS[2], "priority": 2, "weight": 2},
        ],
        "outlier": {},
    },
}

UNTIERED: dict[str, dict[str, Any]] = {
    "least_conn": {"balance": "least_conn", "breaker": {}},
    "least_conn+health": {"balance": "least_conn", "health_check": {}},
    "p2c_ewma": {"balance": "p2c_ewma", "outlier": {}, "retry": {}},
    "consistent_hash": {"balance": "consistent_hash", "health_check": {}, "retry": {}},
    "two priorities": {
        "targets": [{"url": URLS[0]}, {"url": URLS[1], "priority": 1}],
        "breaker": {},
        "outlier": {},
    },
    "two priorities, health only": {
        "targets": [{"url": URLS[0]}, {"url": URLS[1], "priority": 1}],
        "health_check": {},
    },
}


def assert_wired(up: Upstream) -> ResilientTier:
    """``up``'s tier is built over its live targets, balancer and state."""
    tier = up.express_resilient
    assert isinstance(tier, ResilientTier)
    assert tier.upstream is up
    assert tier.targets == up.targets and tier.n == len(up.targets)
    assert tier.names == [t.name for t in up.targets]
    assert tier.groups is up.balancer
    assert tier.tier is up.balancer.balancers[0] and len(up.balancer.balancers) == 1
    assert all(b is t.breaker for b, t in zip(tier.breakers, up.targets, strict=True))
    checker = up.checker
    if checker is None:
        assert tier.states == [None] * len(up.targets)
    else:
        assert all(s is checker.state(t) for s, t in zip(tier.states, up.targets, strict=True))
    assert tier.outlier is up.outlier and tier.budget is up.budget
    cfg = up.config
    checked_only = checker is not None and not (
        cfg.outlier or cfg.breaker or cfg.retry or cfg.fallback or cfg.fallback_response
    )
    if checked_only:  # express_pick's state too (it asks the tier)
        assert checker is not None and up.express_health is checker.states
        assert up.express_tier is tier.tier
    else:
        assert up.express_health is None and up.express_tier is None
    return tier


@pytest.mark.parametrize("main", TIERED.values(), ids=TIERED.keys())
async def test_one_tier_of_round_robin_gets_a_tier(main: dict[str, Any]) -> None:
    """Round robin in one priority tier with a breaker, outlier detection, retries or
    a fallback (with or without health checks): ``express_resilient`` is a tier wired
    to the upstream's own targets, balancer, health states, breakers, detector and
    budget."""
    up = make(**main)
    assert up.resilient
    assert_wired(up)


async def test_health_checks_only_get_a_tier_that_express_pick_asks() -> None:
    """Health checks alone: a tier, and ``express_pick``'s state too; ``express_pick``
    (which asks the tier) answers ``candidates(None)[0]`` of a twin, ``None`` when no
    target is healthy, and leaves the same state behind."""
    with fake_time() as clock:
        a, b = twins(Shape((3, 1, 2), health_check=True), clock)
        assert a.checker is not None and b.checker is not None
        assert a.express_health is a.checker.states
        assert_wired(a)
        flips = [None, 1, 0, None, 2, 1, 0, None, 2, 0, None, 1, 2]
        for flip in flips:
            if flip is not None:
                for up in (a, b):
                    assert up.checker is not None
                    state = up.checker.state(up.targets[flip])
                    state.healthy = not state.healthy
            for _ in range(3):
                order = b.candidates(None)
                got = a.express_pick()
                want = order[0] if order else None
                assert (got and got.name) == (want and want.name)
                same(a, b, clock.now)


@pytest.mark.parametrize("main", UNTIERED.values(), ids=UNTIERED.keys())
async def test_other_shapes_get_no_tier(main: dict[str, Any]) -> None:
    """Least connections, power of two, consistent hash or several priority tiers:
    no tier (and no ``express_pick`` either)."""
    up = make(**main)
    assert up.resilient
    assert up.express_resilient is None
    assert up.express_health is None


async def test_a_plain_upstream_gets_no_tier() -> None:
    """Nothing resilient: the plain lane, no tier."""
    up = make()
    assert not up.resilient and up.express_plain
    assert up.express_resilient is None and up.express_health is None


async def test_set_targets_rebuilds_the_tier_or_drops_it() -> None:
    """``set_targets`` builds a new tier over the new targets (the kept target keeps
    its breaker and health verdict, the tier reads the new checker's states); targets
    in two priorities drop it, one priority again brings it back. The rebuilt tier
    chooses as ``express_attempt`` does."""
    with fake_time() as clock:
        a, b = twins(Shape((1, 1), health_check=True, breaker=(1, 1), outlier=2), clock)
        first = assert_wired(a)
        kept = a.targets[1]
        kept_breaker = kept.breaker
        assert a.checker is not None
        a.checker.state(kept).healthy = False
        for up in (a, b):
            up.set_targets(parse_targets([{"url": URLS[1], "weight": 2}, URLS[2], URLS[3]]))
        on_clock(clock, a, b)
        second = assert_wired(a)
        assert second is not first
        assert a.targets[0] is kept and kept.breaker is kept_breaker
        assert second.states[0] is not None and not second.states[0].healthy
        assert b.checker is not None
        b.checker.state(b.targets[0]).healthy = False
        for _ in range(5):
            got, _ = attempt_both(a, b)
            assert got is not None and got[0] is not kept
            same(a, b, clock.now)
        # Two priorities: no tier, and no express_pick.
        a.set_targets(parse_targets([URLS[1], {"url": URLS[2], "priority": 1}]))
        assert a.express_resilient is None and a.express_health is None
        # One priority again: a tier again.
        a.set_targets(parse_targets([{"url": URLS[2], "priority": 1}, URLS[4]]))
        assert a.express_resilient is None  # priorities 1 and 0
        a.set_targets(
            parse_targets([{"url": URLS[2], "priority": 1}, {"url": URLS[4], "priority": 1}])
        )
        assert_wired(a)
    # Health checks only: two priorities take the tier and express_pick away too.
    h = make(health_check={})
    h.set_targets(parse_targets([URLS[0], {"url": URLS[1], "priority": 1}]))
    assert h.express_resilient is None and h.express_health is None
    h.set_targets(parse_targets(URLS[:3]))
    assert_wired(h)


# --- 2. the twin walk ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of the walk (``a``, ``b``: its numbers; ``seconds``: a tick)."""

    kind: str
    a: int = 0
    b: int = 0
    seconds: float = 0.0


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    n = draw(st.sampled_from([1, 2, 2, 3, 4]))
    weights = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    hc, outlier, retry, fallback = (draw(st.booleans()) for _ in range(4))
    breaker = draw(st.sampled_from([True, True, False]))
    if not (hc or breaker or outlier or retry or fallback):
        hc = True  # nothing resilient: no tier
    if fallback and not (hc or breaker):
        hc = True  # the config wants a way for targets to be unavailable
    return Shape(
        weights,
        health_check=hc,
        breaker=(draw(st.integers(1, 3)), draw(st.integers(1, 2))) if breaker else None,
        outlier=draw(st.integers(1, 3)) if outlier else None,
        retry=retry,
        fallback_response=fallback,
    )


FAILING = st.sampled_from([3, 3, 4, 2])  # STATUSES indices: mostly 5xx

steps = st.one_of(
    # the lane's attempt, kept in flight (the budget counts it)
    st.builds(Step, st.just("attempt")),
    # the lane's attempt answered at once with STATUSES[b]
    st.builds(Step, st.just("answer"), b=FAILING),
    st.builds(Step, st.just("answer"), b=st.integers(0, len(STATUSES) - 1)),
    # a storm: a attempts answered 5xx at once (trips breakers, ejects targets)
    st.builds(Step, st.just("storm"), st.integers(2, 8), st.sampled_from([3, 4])),
    # a burst of a kept attempts (fills half-open probe slots)
    st.builds(Step, st.just("burst"), st.integers(2, 5)),
    # the lane's attempt taken back (no idle connection, a policy refused)
    st.builds(Step, st.just("decline")),
    # answer the pending attempt number a % len with STATUSES[b]
    st.builds(Step, st.just("report"), st.integers(0, 7), st.integers(0, len(STATUSES) - 1)),
    st.builds(
        Step,
        st.just("tick"),
        seconds=st.one_of(st.sampled_from(TICKS), st.floats(0, 40, allow_nan=False)),
    ),
    st.builds(Step, st.just("flip"), st.integers(0, 7)),
    # target a % n reports STATUSES[b] with a generation 1 + a // 4 behind its breaker's
    st.builds(Step, st.just("late"), st.integers(0, 7), st.integers(0, len(STATUSES) - 1)),
    # set_targets: the URLs of bit mask a (over URLS[:4]), weights from b
    st.builds(Step, st.just("retarget"), st.integers(1, 15), st.integers(0, 80)),
)


def walk(shape: Shape, plan: list[Step]) -> None:
    """Run ``plan`` on twins of ``shape``: ``a`` through the tier, ``b`` through the
    reference methods; compare answers and state after every step."""
    with fake_time() as clock:
        a, b = twins(shape, clock)
        known_a, known_b = list(a.targets), list(b.targets)
        pending: list[tuple[Choice, Choice]] = []

        def check(step: Step) -> None:
            now = clock.now
            assert snapshot(a, known_a, now) == snapshot(b, known_b, now), step

        for step in plan:
            kind = step.kind
            answering: tuple[Choice, Choice] | None = None
            if kind in ("attempt", "answer", "decline"):
                before = situation(b, clock.now)
                got, want = attempt_both(a, b)
                event(f"attempt: {before} -> {'None' if got is None else 'a target'}")
                if got is not None and want is not None:
                    if kind == "decline":
                        a.express_decline(*got)
                        b.express_decline(*want)
                    else:
                        if a.verdicts:
                            tier_of(a).record_request()
                            b.record_request()
                        if kind == "attempt":
                            pending.append((got, want))
                        else:
                            answering = got, want
            elif kind in ("burst", "storm"):
                for _ in range(step.a):
                    before = situation(b, clock.now)
                    got, want = attempt_both(a, b)
                    event(f"attempt: {before} -> {'None' if got is None else 'a target'}")
                    if got is not None:
                        if a.verdicts:
                            tier_of(a).record_request()
                            b.record_request()
                        if kind == "burst":
                            pending.append((got, want))
                        else:
                            report_both(a, b, got, want, STATUSES[step.b])
                    check(step)
            elif kind == "report" and pending:
                answering = pending.pop(step.a % len(pending))
            if answering is not None:
                ejected = len(a.outlier._ejected_until) if a.outlier is not None else 0
                trips = sum(t.breaker.trips for t in known_a if t.breaker is not None)
                report_both(a, b, *answering, STATUSES[step.b])
                if a.outlier is not None and len(a.outlier._ejected_until) > ejected:
                    event("report: ejected a target")
                if sum(t.breaker.trips for t in known_a if t.breaker is not None) > trips:
                    event("report: tripped a breaker")
            elif kind == "tick":
                clock.advance(step.seconds)
            elif kind == "flip" and a.checker is not None and b.checker is not None:
                i = step.a % len(a.targets)
                for up in (a, b):
                    assert up.checker is not None
                    state = up.checker.state(up.targets[i])
                    state.healthy = not state.healthy
            elif kind == "late":
                i = step.a % len(a.targets)
                ta, tb = a.targets[i], b.targets[i]
                gen = (ta.breaker.generation if ta.breaker is not None else 0) - 1 - step.a // 4
                status = STATUSES[step.b]
                report_both(a, b, (ta, gen), (tb, gen), status)
            elif kind == "retarget":
                chosen = [
                    {"url": URLS[i], "weight": 1 + (step.b >> i) % 3}
                    for i in range(4)
                    if step.a >> i & 1
                ]
                for up, known in ((a, known_a), (b, known_b)):
                    up.set_targets(parse_targets(chosen))
                    known.extend(t for t in up.targets if t not in known)
                on_clock(clock, a, b)
                assert_wired(a)
            check(step)
        # No trace left: the next choices agree however the twins got here.
        for _ in range(8):
            got, want = attempt_both(a, b)
            if got is None:
                break
            report_both(a, b, got, want, 200)
            check(Step("final"))


PANIC = Shape((1, 2), outlier=1)
REFUSED = Shape((1, 1, 1), health_check=True, breaker=(1, 1), retry=True)


@settings(max_examples=600, deadline=None)
@given(shape=shapes(), plan=st.lists(steps, min_size=5, max_size=45))
# Every target ejected: ejection is ignored (panic), the round robin picks among all.
@example(
    shape=PANIC,
    plan=[
        Step("attempt"),
        Step("report", 0, 3),
        Step("attempt"),
        Step("report", 0, 4),
        Step("attempt"),
        Step("attempt"),
        Step("decline"),
        Step("report", 0, 0),
        Step("tick", seconds=10.0),
        Step("attempt"),
        Step("attempt"),
    ],
)
# Every available breaker's half-open probe slot taken: nothing admitted, pick taken back.
@example(
    shape=REFUSED,
    plan=[
        *[Step("attempt"), Step("report", 0, 3)] * 3,
        Step("flip", 1),
        Step("tick", seconds=5.0),
        Step("attempt"),
        Step("attempt"),
        Step("attempt"),
        Step("decline"),
        Step("report", 0, 0),
        Step("attempt"),
        Step("report", 1, 4),
        Step("tick", seconds=5.0),
        Step("attempt"),
    ],
)
def test_the_tier_walks_in_step_with_the_reference(shape: Shape, plan: list[Step]) -> None:
    """Twin upstreams (1-4 weighted targets, a random mix of health checks, breaker,
    outlier detection, retries and a static fallback) take the same random steps:
    attempts (kept, with the budget's count), declines, reports of 2xx-5xx, late reports
    with stale generations, clock ticks, health flips and runtime target changes. One
    goes through ``ResilientTier``, the other through ``express_attempt``,
    ``record_request`` and ``report``: every answer and, after every step, the whole
    state (round robin, ``_picked``, breakers, outlier tables, budget) agree."""
    note(f"{shape}")
    asyncio.run(_walk(shape, plan))


async def _walk(shape: Shape, plan: list[Step]) -> None:
    walk(shape, plan)


# --- the two corners, step by step ---------------------------------------------------------


async def test_every_target_ejected_ignores_ejection_as_the_reference_does() -> None:
    """Outlier detection ejected every target: both choose by round robin among all of
    them (panic), while one ejection is still running, once it ends and after the
    last ends; then a success with nothing ejected or failing changes nothing."""
    with fake_time() as clock:
        a, b = twins(Shape((2, 1, 1), outlier=1), clock)
        od = a.outlier
        assert od is not None
        for step in range(3):  # one failure each ejects every target, 1 s apart
            got, want = attempt_both(a, b)
            assert got is not None and got[0].name not in od._ejected_until
            report_both(a, b, got, want, 502 if step else 500)
            same(a, b, clock.now)
            clock.advance(1.0)
        assert len(od._ejected_until) == 3
        seen = set()
        for _ in range(4):  # panic: every target in round-robin turn
            got, want = attempt_both(a, b)
            assert got is not None
            seen.add(got[0].name)
            view = same(a, b, clock.now)
            assert view["picked"] == 0
        assert seen == set(URLS[:3])
        clock.advance(7.5)  # the first ejection is over: only that target is available
        for _ in range(3):
            got, want = attempt_both(a, b)
            assert got is not None and got[0] is a.targets[0]
            same(a, b, clock.now)
        clock.advance(5.0)  # all over
        for _ in range(4):
            got, want = attempt_both(a, b)
            report_both(a, b, got, want, 200)
            same(a, b, clock.now)
        assert od._ejected_until == {} and len(od._returned_at) == 3


async def test_every_breaker_refusing_takes_the_pick_back_as_the_reference_does() -> None:
    """Every available target's half-open probe slot is taken (one target unhealthy):
    both answer ``None``, take the round robin's pick back (scores as before, no last
    pick, nothing for ``unpick`` to take back) and stay in step."""
    with fake_time() as clock:
        a, b = twins(Shape((1, 2, 1), health_check=True, breaker=(1, 1), retry=True), clock)
        for _ in range(3):  # each target fails once: every breaker open
            got, want = attempt_both(a, b)
            assert got is not None
            tier_of(a).record_request()
            b.record_request()
            report_both(a, b, got, want, 503)
            same(a, b, clock.now)
        assert all(t.breaker is not None and t.breaker._state == "open" for t in a.targets)
        nobody, _ = attempt_both(a, b)
        assert nobody is None
        assert same(a, b, clock.now)["picked"] is None
        for up in (a, b):
            assert up.checker is not None
            up.checker.state(up.targets[2]).healthy = False
        clock.advance(5.0)
        probes = [attempt_both(a, b), attempt_both(a, b)]
        assert {names(got) for got, _ in probes} == set(URLS[:2])
        before = same(a, b, clock.now)
        got, want = attempt_both(a, b)
        assert got is None and want is None
        after = same(a, b, clock.now)
        assert after["picked"] is None
        assert after["round_robin"] == [(before["round_robin"][0][0], -1)]
        # A probe succeeds: its breaker closes and takes requests again.
        report_both(a, b, *probes[0], 200)
        same(a, b, clock.now)
        got, want = attempt_both(a, b)
        assert names(got) == names(probes[0][0])
        same(a, b, clock.now)


async def test_record_request_counts_what_the_reference_counts() -> None:
    """``record_request`` adds to the same budget buckets as ``Upstream.record_request``,
    at the tier module's clock reading; an upstream without a budget counts nothing."""
    with fake_time() as clock:
        a, b = twins(Shape((1, 1), retry=True), clock)
        for seconds in (0.0, 0.3, 1.0, 4.5, 9.9, 10.0, 25.0):
            clock.advance(seconds)
            tier_of(a).record_request()
            b.record_request()
            view = same(a, b, clock.now)
            assert view["budget"][0][0][0] >= 1
        assert a.budget is not None and a.budget._requests.sums(clock.now) == (1, 0)
        c, _ = twins(Shape((1,), breaker=(1, 1)), clock)
        tier_of(c).record_request()  # no budget: nothing to count, no error


async def test_a_success_after_an_ejection_ended_brings_the_target_back_as_the_reference() -> None:
    """The report's shortcut (a success with no failure streak and no ejection changes
    nothing) must not skip a success on a target whose ejection has just ended unseen
    (the target is unhealthy, so no attempt looked at it): ``OutlierDetector.record``
    then ends the ejection (``_returned_at``), which the next ejection's length
    depends on. Both twins end it, and eject it again for the same time."""
    with fake_time() as clock:
        a, b = twins(Shape((1, 1), health_check=True, outlier=1), clock)
        od = a.outlier
        assert od is not None
        got, want = attempt_both(a, b)
        assert got is not None and want is not None
        report_both(a, b, got, want, 503)
        assert list(od._ejected_until) == [URLS[0]]
        for up in (a, b):
            assert up.checker is not None
            up.checker.state(up.targets[0]).healthy = False
        clock.advance(10.0)  # the ejection is over, and nobody asks about the target
        for _ in range(2):
            attempt_both(a, b)
            same(a, b, clock.now)
        assert list(od._ejected_until) == [URLS[0]] and od._returned_at == {}
        report_both(a, b, (a.targets[0], 0), (b.targets[0], 0), 200)  # a late success
        view = same(a, b, clock.now)
        assert od._ejected_until == {} and URLS[0] in od._returned_at
        clock.advance(10.0)
        report_both(a, b, (a.targets[0], 0), (b.targets[0], 0), 500)
        assert same(a, b, clock.now) != view
        # One base_ejection back in rotation forgives one step: ejected for 10 s again.
        assert od._ejected_until == {URLS[0]: clock.now + 10.0}


# --- 3. ejection's log line and metric --------------------------------------------------------


@pytest.mark.parametrize(("consecutive", "status"), [(1, 500), (2, 503), (3, 599)])
async def test_an_ejection_logs_and_counts_as_the_reference_does(
    consecutive: int, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Failures reported through the tier eject the target with the same warning line
    and the same ``fastedge_upstream_ejections_total`` series as through
    ``Upstream.report``; the 4xx before them is a success and logs nothing."""
    caplog.set_level(logging.INFO, logger="fastedge.gateway")
    with fake_time() as clock:
        ma, mb = Metrics(), Metrics()
        a, b = twins(Shape((1, 1), outlier=consecutive, breaker=(9, 1)), clock)
        a.metrics, b.metrics = ma, mb
        lines: list[list[str]] = []
        for up in (a, b):
            caplog.clear()
            target = up.targets[0]
            tier = up.express_resilient if up is a else None
            for s in [404, *[status] * consecutive]:
                gen = up.admit(target)
                assert gen is not None
                if tier is not None:
                    tier.report(target, gen, s)
                else:
                    up.report(target, gen, s < 500, status=s)
            lines.append([f"{r.levelname} {r.name} {r.getMessage()}" for r in caplog.records])
        assert lines[0] == lines[1]
        assert lines[0] == [
            f"WARNING fastedge.gateway upstream u: target {URLS[0]} ejected after "
            f"{consecutive} consecutive failures (last: status {status})"
        ]
        series = (("upstream", "u"), ("target", URLS[0]))
        assert ma._counters == mb._counters
        assert ma._counters["fastedge_upstream_ejections_total"] == {series: 1}
        assert ma.render() == mb.render()
        same(a, b, clock.now)


# --- 4. a late report on a removed target -----------------------------------------------------


async def test_a_late_report_after_set_targets_reaches_the_removed_targets_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attempt is in flight when ``set_targets`` removes its target (the tier is
    rebuilt without it): its failure, reported through the new tier, still trips that
    target's own breaker and counts toward its ejection, exactly as ``Upstream.report``
    does; the remaining targets are untouched."""
    caplog.set_level(logging.INFO, logger="fastedge.gateway")
    with fake_time() as clock:
        a, b = twins(Shape((1, 1, 1), breaker=(1, 1), outlier=1, retry=True), clock)
        gone_a, gone_b = a.targets[0], b.targets[0]
        got, want = attempt_both(a, b)
        assert got is not None and got[0] is gone_a
        old_tier = tier_of(a)
        for up in (a, b):
            up.set_targets(parse_targets(URLS[1:3]))
        on_clock(clock, a, b)
        new_tier = tier_of(a)
        assert new_tier is not old_tier and gone_a not in new_tier.targets
        assert gone_a.breaker is not None and gone_b.breaker is not None
        caplog.clear()
        report_both(a, b, got, want, 502)
        assert (gone_a.breaker._state, gone_a.breaker.trips) == ("open", 1)
        assert breaker_view(gone_a.breaker, clock.now) == breaker_view(gone_b.breaker, clock.now)
        assert snapshot(a, [gone_a, *a.targets], clock.now) == snapshot(
            b, [gone_b, *b.targets], clock.now
        )
        assert a.outlier is not None and URLS[0] in a.outlier._ejected_until
        assert [r.getMessage() for r in caplog.records].count(
            f"upstream u: target {URLS[0]} ejected after 1 consecutive failures (last: status 502)"
        ) == 2
        assert all(t.breaker is not None and t.breaker.trips == 0 for t in a.targets)
