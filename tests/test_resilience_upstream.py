"""The gateway's side of the resilience contract, without traffic: ``Upstream``'s
candidates, admission, reports, retry decisions, fallback answers, runtime target
changes and the registry that hands health checks over between config generations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fastedge.config import parse_config, parse_targets
from fastedge.errors import ProxyError
from fastedge.filters import Response
from fastedge.gateway import Target, Upstream, build_gateway, make_runtime
from fastedge.observe.metrics import Metrics
from fastedge.upstream.balancer import SmoothRoundRobin

URLS = [f"http://127.0.0.1:{9000 + i}" for i in range(8)]


def upstream_config(**main: Any) -> Any:
    main.setdefault("targets", URLS[:2])
    doc = {"upstreams": {"main": main, "backup": {"targets": [URLS[7]]}}}
    return parse_config(doc)


def make(metrics: Metrics | None = None, **main: Any) -> Upstream:
    return Upstream(upstream_config(**main).upstreams["main"], metrics=metrics)


def set_health(up: Upstream, target: Target, healthy: bool) -> None:
    assert up.checker is not None
    up.checker.state(target).healthy = healthy


def fail(up: Upstream, target: Target, times: int = 1, status: int = 503) -> None:
    for _ in range(times):
        gen = up.admit(target)
        assert gen is not None
        up.report(target, gen, False, status=status)


async def test_a_plain_upstream_keeps_the_fast_path() -> None:
    up = make()
    assert not up.resilient
    assert type(up.balancer) is SmoothRoundRobin
    assert up.checker is None and up.budget is None and up.outlier is None
    assert all(t.breaker is None for t in up.targets)
    assert up.retry_statuses == frozenset()


async def test_priority_groups_fail_over_and_back_and_refuse_when_none_is_left() -> None:
    up = make(
        targets=[
            {"url": URLS[0], "priority": 0},
            {"url": URLS[1], "priority": 0},
            {"url": URLS[2], "priority": 1},
        ],
        health_check={},
    )
    a, b, c = up.targets
    assert up.resilient
    # Tier 0 takes the traffic (round robin inside it); tier 1 is the failover path.
    assert up.candidates(None) == [a, b, c]
    assert up.candidates(None) == [b, a, c]
    set_health(up, a, False)
    assert up.candidates(None) == [b, c]
    set_health(up, b, False)
    assert up.candidates(None) == [c]
    set_health(up, c, False)
    assert up.candidates(None) == []
    answer = up.unavailable()
    assert isinstance(answer, ProxyError) and answer.status == 503
    # Two passes at the 2 s default interval before a target can come back.
    assert answer.headers == [(b"retry-after", b"4")]
    set_health(up, a, True)
    assert up.candidates(None)[0] is a


async def test_an_open_breaker_takes_a_target_out_and_sets_retry_after() -> None:
    up = make(breaker={"min_requests": 2, "open_for": "2.5s"})
    a, b = up.targets
    fail(up, a, 2)
    assert up.breaker_state(a) == "open"
    assert up.admit(a) is None
    assert up.candidates(None) == [b]
    fail(up, b, 2)
    assert up.candidates(None) == []
    answer = up.unavailable()
    assert isinstance(answer, ProxyError)
    assert answer.headers == [(b"retry-after", b"3")]  # 2.5 s, rounded up


async def test_stale_generations_do_not_move_the_breaker() -> None:
    up = make(breaker={"min_requests": 1, "open_for": "10ms"})
    a = up.targets[0]
    early = up.admit(a)
    assert early is not None
    fail(up, a)  # trips
    await asyncio.sleep(0.02)
    probe = up.admit(a)  # half-open: the one probe
    assert probe is not None and probe != early
    assert up.admit(a) is None  # no second probe
    up.report(a, early, False)  # a late failure from before the trip: ignored
    assert up.breaker_state(a) == "half_open"
    up.abandon(a, probe)  # the probe's client left: the slot is free again
    probe = up.admit(a)
    assert probe is not None
    up.report(a, probe, True)
    assert up.breaker_state(a) == "closed"


async def test_outlier_ejection_never_takes_out_every_target() -> None:
    metrics = Metrics()
    up = make(metrics, outlier={"consecutive_failures": 2})
    a, b = up.targets
    fail(up, a, 2)
    assert up.is_ejected(a)
    assert up.candidates(None) == [b]
    fail(up, b, 2)
    assert up.is_ejected(b)
    assert sorted(up.candidates(None), key=up.targets.index) == [a, b]  # both, anyway
    text = metrics.render().decode()
    assert f'fastedge_upstream_ejections_total{{upstream="main",target="{URLS[0]}"}} 1' in text


async def test_retry_decisions_without_a_retry_section() -> None:
    up = make(health_check={}, targets=URLS[:3])
    # Connect errors fail over once through the targets, at once; nothing else retries.
    assert up.retry_delay(b"POST", 1, connect_error=True) == 0.0
    assert up.retry_delay(b"GET", 2, connect_error=True) == 0.0
    assert up.retry_delay(b"GET", 3, connect_error=True) is None
    assert up.retry_delay(b"GET", 1, status=503) is None
    assert up.retry_delay(b"GET", 1, timeout=True) is None
    assert up.retry_delay(b"GET", 1) is None
    assert up.retry_statuses == frozenset()


async def test_retry_decisions_with_a_policy() -> None:
    up = make(retry={"attempts": 3, "backoff_base": "20ms", "backoff_max": "30ms"})
    assert up.retry_statuses == frozenset({502, 503, 504})

    def delay(method: bytes, attempt: int, **kw: Any) -> float | None:
        return up.retry_delay(method, attempt, **kw)

    first = delay(b"GET", 1, status=503)
    assert first is not None and 0 <= first < 0.02
    second = delay(b"GET", 2, status=503)
    assert second is not None and 0 <= second < 0.03  # 40 ms capped at 30 ms
    assert delay(b"GET", 3, status=503) is None  # three attempts made
    assert delay(b"GET", 1, status=500) is None  # not a chosen status
    assert delay(b"GET", 1) is not None  # reset before an answer: idempotent
    assert delay(b"PUT", 1, timeout=True) is not None
    assert delay(b"POST", 1, status=503) is None  # may have been processed
    assert delay(b"POST", 1) is None
    assert delay(b"POST", 1, connect_error=True) is not None  # nothing was sent
    opted = make(retry={"non_idempotent": True, "on_timeout": False})
    assert opted.retry_delay(b"POST", 1, status=503) is not None
    assert opted.retry_delay(b"GET", 1, timeout=True) is None


async def test_the_budget_refuses_retries_and_counts_it() -> None:
    metrics = Metrics()
    up = make(metrics, retry={"budget_ratio": 0.5, "budget_min_per_second": 0})
    for _ in range(4):
        up.record_request()
    granted = [up.retry_delay(b"GET", 1, status=503) is not None for _ in range(4)]
    assert granted == [True, True, False, False]  # 50% of 4 requests
    text = metrics.render().decode()
    assert 'fastedge_retry_budget_exhausted_total{upstream="main"} 2' in text


async def test_static_fallback_response() -> None:
    up = make(
        breaker={},
        fallback_response={"status": 200, "body": "[]", "content_type": "application/json"},
    )
    answer = up.unavailable()
    assert isinstance(answer, Response)
    assert (answer.status, answer.headers, answer.body) == (
        200,
        [(b"content-type", b"application/json")],
        b"[]",
    )


async def test_build_gateway_resolves_the_fallback_in_the_same_generation() -> None:
    config = upstream_config(breaker={}, fallback="backup")
    metrics = Metrics()
    gw = build_gateway(config, metrics=metrics, access_log=None)
    try:
        main = gw.upstreams["main"]
        assert main.unavailable() is gw.upstreams["backup"]
    finally:
        await gw.aclose()


async def test_set_targets_keeps_state_of_unchanged_targets_and_drains_removed_ones() -> None:
    up = make(balance="least_conn", breaker={"min_requests": 1}, health_check={})
    a, b = up.targets
    up.start()
    try:
        fail(up, b)
        assert up.breaker_state(b) == "open"
        set_health(up, b, False)
        up.balancer.acquire(a)  # a request in flight on each
        up.balancer.acquire(b)
        old_checker = up.checker
        up.set_targets(parse_targets([{"url": URLS[1], "weight": 3}, URLS[2]]))
        b2, c = up.targets
        assert b2 is b and b.weight == 3  # same object: pool, breaker, health kept
        assert up.breaker_state(b) == "open" and not up.is_healthy(b)
        assert up.is_healthy(c) and up.breaker_state(c) == "closed"
        assert up.checker is not old_checker
        await asyncio.sleep(0)
        assert old_checker is not None and not old_checker.running
        assert up.checker is not None and up.checker.running
        # The in-flight counts moved to the new balancer; releasing the removed target's
        # request is harmless.
        assert up.balancer.inflight(b) == 1 and up.balancer.inflight(c) == 0
        up.balancer.release(a)
        up.balancer.release(b)
        assert up.balancer.inflight(b) == 0
        assert a.pool._draining and not b.pool._draining
        with pytest.raises(ValueError, match="duplicate"):
            up.set_targets(parse_targets([URLS[3]]) * 2)
        with pytest.raises(ValueError, match="at least one"):
            up.set_targets([])
    finally:
        await up.aclose()
    assert not up.checks_running


async def test_consistent_hash_moves_only_the_leaving_nodes_keys() -> None:
    n = 5
    up = make(balance="consistent_hash", hash_key="header:x-session", targets=URLS[:n])
    keys = [f"session-{i}".encode() for i in range(5000)]
    before = {k: up.candidates(k) for k in keys}
    leaving = up.targets[2].name
    up.set_targets(parse_targets([u for u in URLS[:n] if u != leaving]))
    moved = 0
    for k in keys:
        after = up.candidates(k)[0].name
        old = [t.name for t in before[k]]
        if old[0] == leaving:
            assert after == old[1]  # to its ring successor, nowhere else
            moved += 1
        else:
            assert after == old[0]  # every other key stays put
    assert abs(moved / len(keys) - 1 / n) < 0.06  # ~1/N of the keys


async def test_consistent_hash_keys_survive_failover_in_a_resilient_upstream() -> None:
    up = make(
        balance="consistent_hash",
        hash_key="header:x-session",
        targets=URLS[:4],
        health_check={},
    )
    keys = [f"k{i}".encode() for i in range(1000)]
    owner = {k: up.candidates(k)[0] for k in keys}
    down = up.targets[1]
    set_health(up, down, False)
    for k in keys:
        order = up.candidates(k)
        assert down not in order
        if owner[k] is not down:
            assert order[0] is owner[k]


async def test_a_new_generation_inherits_state_and_takes_the_health_checks_over() -> None:
    config = upstream_config(breaker={"min_requests": 1}, outlier={}, health_check={}, retry={})
    metrics = Metrics()
    runtime = make_runtime(config, metrics)
    first = build_gateway(config, metrics=metrics, access_log=None, runtime=runtime)
    up1 = first.upstreams["main"]
    assert up1.checks_running
    fail(up1, up1.targets[0])
    set_health(up1, up1.targets[1], False)
    second = build_gateway(config, metrics=metrics, access_log=None, runtime=runtime)
    up2 = second.upstreams["main"]
    await asyncio.sleep(0)
    assert not up1.checks_running and up2.checks_running
    assert up2.targets[0] is not up1.targets[0]  # a new pool per generation...
    assert up2.targets[0].breaker is up1.targets[0].breaker  # ...the same breaker
    assert up2.breaker_state(up2.targets[0]) == "open"
    assert not up2.is_healthy(up2.targets[1])
    assert up2.outlier is up1.outlier and up2.budget is up1.budget
    text = metrics.render().decode()
    assert f'fastedge_upstream_target_healthy{{upstream="main",target="{URLS[1]}"}} 0' in text
    assert f'fastedge_breaker_state{{upstream="main",target="{URLS[0]}"}} 2' in text
    # Settings changed: nothing is inherited.
    changed = upstream_config(breaker={"min_requests": 2}, health_check={"path": "/h"})
    third = build_gateway(changed, metrics=metrics, access_log=None, runtime=runtime)
    up3 = third.upstreams["main"]
    assert up3.breaker_state(up3.targets[0]) == "closed"
    assert up3.is_healthy(up3.targets[1])
    for gw in (first, second, third):
        await gw.aclose()
    await runtime.close()
    assert not any(up.checks_running for up in (up1, up2, up3))


class FakeConnection:
    """Just what the pool needs from a connection."""

    def __init__(self) -> None:
        self.idle_since = 0.0
        self.closed = False

    def is_usable(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


async def test_a_drained_pool_closes_what_comes_back_but_still_connects() -> None:
    from fastedge.upstream.pool import ConnectionPool

    async def connect() -> FakeConnection:
        return FakeConnection()

    pool: ConnectionPool[FakeConnection] = ConnectionPool(
        "t", connect, max_connections=4, idle_timeout=60, wait_timeout=1, connect_timeout=1
    )
    idle, _ = await pool.acquire()
    busy, _ = await pool.acquire()
    pool.release(idle, True)
    assert pool.stats() == {"idle": 1, "active": 1, "waiting": 0}
    pool.drain()
    assert idle.closed and pool.stats() == {"idle": 0, "active": 1, "waiting": 0}
    late, reused = await pool.acquire()  # chose this target just before the change
    assert not reused and not late.closed
    pool.release(busy, True)
    pool.release(late, True)
    assert busy.closed and late.closed
    assert pool.stats() == {"idle": 0, "active": 0, "waiting": 0}


def test_priority_groups_without_panic_and_their_load_delegation() -> None:
    from fastedge.upstream.balancers import LeastConnections, PriorityGroups

    healthy = {"a": True, "b": True, "c": True}
    groups: PriorityGroups[str, LeastConnections[str]] = PriorityGroups(
        [["a", "b"], ["c"]], LeastConnections, healthy.__getitem__, panic=False
    )
    groups.acquire("a")
    assert groups.candidates() == ["b", "a", "c"]  # least loaded first within the tier
    assert (groups.inflight("a"), groups.inflight("b"), groups.inflight("zz")) == (1, 0, 0)
    groups.release("a")
    groups.release("zz")  # unknown: ignored
    for name in healthy:
        healthy[name] = False
    assert groups.candidates() == []  # no panic: nothing healthy, nothing offered
    assert groups.pick() == "a"  # a caller that insists gets the primary's first
    with pytest.raises(ValueError, match="two groups"):
        PriorityGroups([["a"], ["a"]], LeastConnections, healthy.__getitem__)
