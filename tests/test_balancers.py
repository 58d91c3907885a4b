"""Balancing strategies: distribution, affinity, bounded load and priority failover.
Seeded RNGs, no clocks read."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastedge.upstream.balancer import SmoothRoundRobin
from fastedge.upstream.balancers import (
    ConsistentHash,
    LeastConnections,
    PowerOfTwoEWMA,
    PriorityGroups,
)

# ---------------------------------------------------------------- LeastConnections


def test_least_connections_idle_split_follows_weights_smoothly() -> None:
    lc = LeastConnections(["a", "b", "c"], [5, 1, 1])
    picks = [lc.pick() for _ in range(7)]
    assert picks == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's smooth order


def test_least_connections_prefers_fewest_inflight_per_weight() -> None:
    lc = LeastConnections(["a", "b", "c"], [2, 1, 1])
    for t in ["a", "a", "b"]:
        lc.acquire(t)
    # loads: a 2/2 = 1, b 1/1 = 1, c 0 -> c
    assert lc.candidates() == ["c", "a", "b"]
    lc.acquire("c")
    lc.acquire("c")
    # a 1, b 1, c 2: a and b tie, c is the last resort
    assert lc.candidates()[-1] == "c"
    lc.release("c")
    lc.release("c")
    assert lc.inflight("c") == 0
    with pytest.raises(ValueError):
        lc.release("c")


def test_least_connections_weights_under_concurrency() -> None:
    """60 requests in flight, a random one finishes after each new one (random lengths):
    traffic and in-flight load both follow the weights."""
    rng = random.Random(7)
    lc = LeastConnections(["a", "b", "c"], [3, 2, 1])
    open_requests: list[str] = []
    counts: Counter[str] = Counter()
    for _ in range(30_000):
        target = lc.candidates()[0]
        lc.acquire(target)
        counts[target] += 1
        open_requests.append(target)
        if len(open_requests) > 60:
            lc.release(open_requests.pop(rng.randrange(len(open_requests))))
    total = sum(counts.values())
    for target, weight in [("a", 3), ("b", 2), ("c", 1)]:
        assert counts[target] / total == pytest.approx(weight / 6, rel=0.1)
        assert lc.inflight(target) == pytest.approx(60 * weight / 6, abs=2)


def test_least_connections_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        LeastConnections([])
    with pytest.raises(ValueError):
        LeastConnections(["a", "b"], [1])
    with pytest.raises(ValueError):
        LeastConnections(["a", "a"])
    with pytest.raises(ValueError):
        LeastConnections(["a"], [0])


# ---------------------------------------------------------------- PowerOfTwoEWMA


def test_p2c_avoids_the_slow_target() -> None:
    p2c = PowerOfTwoEWMA(["fast1", "fast2", "slow"], random.Random(3), decay=10.0)
    for t, latency in [("fast1", 0.010), ("fast2", 0.012), ("slow", 0.500)]:
        p2c.observe(t, latency, now=0.0)
    counts = Counter(p2c.pick(now=0.0) for _ in range(3000))
    # slow is chosen only if drawn... never: any pair with slow has a faster partner
    assert counts["slow"] == 0
    assert counts["fast1"] > counts["fast2"] > 0
    assert p2c.candidates(now=0.0)[-1] == "slow"
    assert p2c.failover_order("slow", now=0.0) == ["slow", "fast1", "fast2"]


def test_p2c_inflight_spreads_load_between_equal_targets() -> None:
    p2c = PowerOfTwoEWMA(["a", "b", "c", "d"], random.Random(11))
    for t in "abcd":
        p2c.observe(t, 0.020, now=0.0)
    for _ in range(400):  # requests that never finish: the least-loaded of two wins
        p2c.acquire(p2c.pick(now=0.0))
    loads = [p2c.inflight(t) for t in "abcd"]
    assert max(loads) - min(loads) <= 2  # two choices keep the spread tiny
    for t in "abcd":
        for _ in range(p2c.inflight(t)):
            p2c.release(t)
    with pytest.raises(ValueError):
        p2c.release("a")


def test_p2c_peak_ewma_reacts_at_once_and_forgets_slowly() -> None:
    p2c = PowerOfTwoEWMA(["a", "b"], random.Random(1), decay=10.0, default_latency=0.03)
    assert p2c.cost("a", now=0.0) == pytest.approx(0.03)  # not observed yet
    p2c.observe("a", 0.010, now=0.0)
    p2c.observe("a", 1.000, now=1.0)  # a peak replaces the estimate
    assert p2c.cost("a", now=1.0) == pytest.approx(1.0)
    p2c.observe("a", 0.010, now=11.0)  # one decay constant later: weight 1/e on the old
    assert p2c.cost("a", now=11.0) == pytest.approx(math.exp(-1) + 0.01 * (1 - math.exp(-1)))
    # no samples for a long time: the estimate fades so the target gets tried again
    assert p2c.cost("a", now=111.0) < 0.001
    idle_cost = p2c.cost("a", now=11.0)
    p2c.acquire("a")
    assert p2c.cost("a", now=11.0) == pytest.approx(2 * idle_cost)  # x (inflight + 1)
    with pytest.raises(ValueError):
        p2c.observe("a", -1.0, now=12.0)


def test_p2c_single_target_and_bad_input() -> None:
    p2c = PowerOfTwoEWMA(["only"], random.Random(0), clock=lambda: 5.0)
    assert p2c.candidates() == ["only"]
    p2c.observe("only", 0.2)
    assert p2c.cost("only") == pytest.approx(0.2)
    with pytest.raises(ValueError):
        PowerOfTwoEWMA(["a"], random.Random(0), decay=0)
    with pytest.raises(ValueError):
        PowerOfTwoEWMA(["a", "a"], random.Random(0))


def test_p2c_picks_two_distinct_targets_uniformly() -> None:
    """With equal costs the first drawn wins: each target ~1/n of the picks."""
    p2c = PowerOfTwoEWMA(list("abcde"), random.Random(99))
    counts = Counter(p2c.pick(now=0.0) for _ in range(10_000))
    for t in "abcde":
        assert counts[t] == pytest.approx(2000, rel=0.1)


# ---------------------------------------------------------------- ConsistentHash

KEYS = [f"user:{i}" for i in range(20_000)]


def test_consistent_hash_same_key_same_target_and_full_failover_list() -> None:
    ch = ConsistentHash([f"t{i}" for i in range(5)], bounded_load_c=None)
    for key in KEYS[:500]:
        order = ch.candidates(key)
        assert order[0] == ch.get(key) == ch.candidates(key)[0]
        assert sorted(order) == [f"t{i}" for i in range(5)]  # every target, once


def test_consistent_hash_removing_a_target_moves_only_its_keys() -> None:
    names = [f"10.0.0.{i}:8080" for i in range(8)]
    before = ConsistentHash(names, bounded_load_c=None)
    after = ConsistentHash([n for n in names if n != names[3]], bounded_load_c=None)
    moved = 0
    for key in KEYS:
        old = before.get(key)
        new = after.get(key)
        if old != new:
            moved += 1
            assert old == names[3]  # only the removed target's keys move...
            # ...and they go to their next target in the old ring order (the failover)
            assert new == before.candidates(key)[1]
    assert moved / len(KEYS) == pytest.approx(1 / len(names), rel=0.25)


def test_consistent_hash_weights() -> None:
    ch = ConsistentHash(["a", "b", "c"], [2, 1, 1], bounded_load_c=None)
    counts = Counter(ch.get(k) for k in KEYS)
    assert counts["a"] / len(KEYS) == pytest.approx(0.5, rel=0.1)
    assert counts["b"] / len(KEYS) == pytest.approx(0.25, rel=0.15)


class Server:
    """A target that is not a string: the ring name comes from ``name=``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"Server({self.url})"


def test_consistent_hash_bounded_load_spills_hot_keys_to_ring_neighbours() -> None:
    servers = [Server(f"http://s{i}") for i in range(4)]
    ch = ConsistentHash(servers, bounded_load_c=1.25, name=lambda s: s.url)
    key = "hot-key"
    owner = ch.get(key)
    assert ch.candidates(key)[0] is owner
    ring_order = ConsistentHash(servers, bounded_load_c=None, name=lambda s: s.url).candidates(key)
    # the owner holds 10 requests, the rest none: capacity ceil(1.25 * 11 / 4) = 4
    for _ in range(10):
        ch.acquire(owner)
    order = ch.candidates(key)
    assert order[0] is ring_order[1]  # the next target on the ring takes it
    assert sorted(s.url for s in order) == sorted(s.url for s in servers)
    # explicit loads override the in-flight counts
    assert ch.candidates(key, loads={})[0] is owner
    for _ in range(10):
        ch.release(owner)
    assert ch.inflight(owner) == 0
    with pytest.raises(ValueError):
        ch.release(owner)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 8),
    c=st.sampled_from([1.0, 1.25, 1.5, 2.0]),
    keys=st.lists(st.sampled_from(["a", "b", "c", "hot", "x1", "x2"]), min_size=1, max_size=80),
)
def test_consistent_hash_bounded_load_never_exceeds_capacity(
    n: int, c: float, keys: list[str]
) -> None:
    """Requests that stay open: each new one lands where load + 1 <= ceil(c * avg)."""
    ch = ConsistentHash([f"n{i}" for i in range(n)], bounded_load_c=c)
    for total, key in enumerate(keys, start=1):
        target = ch.candidates(key)[0]
        ch.acquire(target)
        assert ch.inflight(target) <= math.ceil(c * total / n)
        assert max(ch.inflight(f"n{i}") for i in range(n)) <= math.ceil(c * total / n)


def test_consistent_hash_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        ConsistentHash(["a"], bounded_load_c=0.5)
    with pytest.raises(ValueError):
        ConsistentHash(["a", "b"], name=lambda _: "same")
    with pytest.raises(ValueError):
        ConsistentHash([])
    assert ConsistentHash(["solo"]).candidates("k") == ["solo"]


# ---------------------------------------------------------------- PriorityGroups


def test_priority_groups_fail_over_tier_by_tier() -> None:
    down: set[str] = set()
    pg = PriorityGroups(
        [["eu1", "eu2"], ["us1", "us2"], ["backup"]],
        lambda ts: SmoothRoundRobin(ts, [1] * len(ts)),
        healthy=lambda t: t not in down,
    )
    assert pg.active_group() == 0
    assert [pg.candidates()[0] for _ in range(4)] == ["eu1", "eu2", "eu1", "eu2"]
    assert pg.candidates()[2:] == ["us1", "us2", "backup"]
    down.add("eu1")
    assert [pg.candidates()[0] for _ in range(3)] == ["eu2"] * 3
    assert pg.candidates() == ["eu2", "us1", "us2", "backup"]
    down.add("eu2")
    assert pg.active_group() == 1
    assert sorted(pg.candidates()[:2]) == ["us1", "us2"]
    assert pg.candidates()[2:] == ["backup"]
    down.update({"us1", "us2"})
    assert pg.candidates() == ["backup"]
    assert pg.group_of("backup") == 2
    down.discard("eu1")  # the primary is back: traffic returns to it
    assert pg.candidates() == ["eu1", "backup"]


def test_priority_groups_panic_when_nothing_is_healthy() -> None:
    pg = PriorityGroups([["a", "b"], ["c"]], LeastConnections, healthy=lambda t: False)
    assert pg.active_group() is None
    assert sorted(pg.candidates()[:2]) == ["a", "b"]
    assert pg.candidates()[2:] == ["c"]


def test_priority_groups_pass_keys_and_expose_balancers() -> None:
    pg = PriorityGroups(
        [["a", "b", "c"], ["d"]],
        lambda ts: ConsistentHash(ts, bounded_load_c=None),
        healthy=lambda t: t != "b",
    )
    for key in KEYS[:200]:
        ring = pg.balancers[0].candidates(key)
        assert pg.candidates(key) == [t for t in ring if t != "b"] + ["d"]
    with pytest.raises(KeyError):
        pg.group_of("zzz")
    with pytest.raises(ValueError):
        PriorityGroups([["a"], []], LeastConnections, healthy=lambda t: True)


# --- taking a pick back (the express lane's decline) -----------------------------------


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    steps=st.lists(st.sampled_from(["pick", "pick+unpick", "pick+unpick+unpick"]), max_size=60),
)
def test_unpick_leaves_round_robin_as_if_the_pick_never_happened(
    weights: list[int], steps: list[str]
) -> None:
    """A pick taken back changes nothing: the picks that stay equal those of a twin that
    never made the others; a second unpick, or one before any pick, does nothing."""
    names = [f"t{i}" for i in range(len(weights))]
    rr = SmoothRoundRobin(names, weights)
    twin = SmoothRoundRobin(names, weights)
    rr.unpick()
    for step in steps:
        if step == "pick":
            assert rr.pick() == twin.pick()
        else:
            rr.pick()
            for _ in range(step.count("unpick")):
                rr.unpick()
    assert [rr.pick() for _ in range(2 * sum(weights))] == [
        twin.pick() for _ in range(2 * sum(weights))
    ]


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    down=st.lists(st.booleans(), min_size=4, max_size=4),
    undo=st.lists(st.booleans(), min_size=1, max_size=30),
)
def test_priority_groups_unpick_takes_back_the_active_groups_pick(
    weights: list[int], down: list[bool], undo: list[bool]
) -> None:
    """``PriorityGroups.unpick`` reverts the pick of the group balancer its last
    ``candidates`` asked (the first group, or a lower one when the first is down)."""
    names = [f"t{i}" for i in range(len(weights))]
    half = len(names) // 2
    groups = [names[:half], names[half:]]
    health = dict(zip(names, [not d for d in down], strict=False))

    def make(ts: list[str]) -> SmoothRoundRobin[str]:
        return SmoothRoundRobin(ts, [weights[names.index(t)] for t in ts])

    pg = PriorityGroups(groups, make, lambda t: health[t], panic=True)
    twin = PriorityGroups(groups, make, lambda t: health[t], panic=True)
    for taken_back in undo:
        if taken_back:
            pg.candidates()
            pg.unpick()
        else:
            assert pg.candidates() == twin.candidates()
    assert [pg.candidates() for _ in range(6)] == [twin.candidates() for _ in range(6)]
