"""Pool bookkeeping without sockets (PoolState), and the balancer's order."""

from __future__ import annotations

from collections import Counter

import pytest

from fastedge.upstream.balancer import SmoothRoundRobin
from fastedge.upstream.pool import PoolState


class FakeConn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.idle_since = 0.0
        self.usable = True
        self.closed = False

    def is_usable(self) -> bool:
        return self.usable and not self.closed

    def close(self) -> None:
        self.closed = True


def test_checkout_reserves_slots_up_to_the_limit() -> None:
    state: PoolState[FakeConn] = PoolState(max_connections=2, idle_timeout=60)
    assert state.checkout() == (None, True, [])
    assert state.checkout() == (None, True, [])
    assert state.checkout() == (None, False, [])  # full: the caller must wait
    assert state.total == 2


def test_reuse_is_most_recent_first_and_skips_dead() -> None:
    state: PoolState[FakeConn] = PoolState(max_connections=4, idle_timeout=60)
    a, b, c = FakeConn("a"), FakeConn("b"), FakeConn("c")
    for _ in (a, b, c):
        state.checkout()
    for t, conn in enumerate((a, b, c)):
        keep, freed = state.checkin(conn, True, now=float(t))
        assert keep is conn and not freed
        state.idle.append(conn)
    c.usable = False  # the upstream closed it while idle
    conn, may_connect, dead = state.checkout()
    assert conn is b and not may_connect and dead == [c]
    assert state.busy == 1 and list(state.idle) == [a]


def test_unreusable_checkin_frees_the_slot() -> None:
    state: PoolState[FakeConn] = PoolState(max_connections=1, idle_timeout=60)
    state.checkout()
    conn = FakeConn("x")
    keep, freed = state.checkin(conn, False, now=0)
    assert keep is None and freed
    assert state.total == 0
    assert state.checkout() == (None, True, [])


def test_failed_connect_frees_the_slot() -> None:
    state: PoolState[FakeConn] = PoolState(max_connections=1, idle_timeout=60)
    state.checkout()
    assert state.checkin(None, True, now=0) == (None, True)
    assert state.busy == 0


def test_expire_removes_only_old_idle_connections() -> None:
    state: PoolState[FakeConn] = PoolState(max_connections=4, idle_timeout=10)
    old, new = FakeConn("old"), FakeConn("new")
    old.idle_since, new.idle_since = 0.0, 8.0
    state.idle.extend([old, new])
    assert state.expire(now=12.0) == [old]
    assert list(state.idle) == [new]


def test_bad_limit() -> None:
    with pytest.raises(ValueError):
        PoolState(max_connections=0, idle_timeout=1)


def test_smooth_round_robin_spreads_by_weight() -> None:
    rr = SmoothRoundRobin(["a", "b", "c"], [5, 1, 1])
    seq = [rr.pick() for _ in range(7)]
    assert seq == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's smooth order
    counts = Counter(rr.pick() for _ in range(700))
    assert counts == {"a": 500, "b": 100, "c": 100}


def test_candidates_put_the_choice_first_then_failover_order() -> None:
    rr = SmoothRoundRobin(["a", "b", "c"], [1, 1, 1])
    assert rr.candidates() == ["a", "b", "c"]
    assert rr.candidates() == ["b", "a", "c"]
    with pytest.raises(ValueError):
        SmoothRoundRobin([], [])
    with pytest.raises(ValueError):
        SmoothRoundRobin(["a"], [0])
