"""The compiled limiters and ring agree with their Python twins, operation by operation.

Hypothesis drives both implementations with the same random operations (keys, costs,
forward and backward clock steps, tiny ``max_keys`` to force eviction, ring membership
changes) and requires identical answers. Floats are compared exactly: both twins compute
every float with the same expression in the same order.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from .conftest import load

KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f", 7, ("t", 1)])
COSTS = st.integers(1, 12) | st.sampled_from([10**20])
# Mostly forward, sometimes a backward clock, sometimes a large idle gap.
STEPS = st.floats(0.0, 1.5) | st.sampled_from([-0.7, 0.0, 10.0, 1e-12])


def _same(twins: list[Any], method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``method`` on both twins, requiring equal results (or equal exception types)."""
    outcomes: list[Any] = []
    for twin in twins:
        try:
            outcomes.append(("ok", getattr(twin, method)(*args, **kwargs)))
        except Exception as exc:  # the twins must fail alike too
            outcomes.append(("error", type(exc)))
    assert outcomes[0] == outcomes[1], outcomes
    return outcomes[0][1]


class LimiterAgreement(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.buckets: list[Any] = []
        self.windows: list[Any] = []

    @initialize(
        rate=st.floats(0.05, 20.0),
        burst=st.integers(1, 10),
        limit=st.integers(1, 10),
        window=st.floats(0.1, 5.0),
        max_keys=st.integers(1, 5),
    )
    def build(self, rate: float, burst: int, limit: int, window: float, max_keys: int) -> None:
        for impl in ("compiled", "python"):
            module = load("ratelimit", impl)
            self.buckets.append(module.TokenBucket(rate, burst, max_keys=max_keys))
            self.windows.append(module.SlidingWindow(limit, window, max_keys=max_keys))

    @rule(step=STEPS)
    def tick(self, step: float) -> None:
        self.now += step

    @rule(key=KEYS, cost=COSTS)
    def acquire(self, key: Any, cost: int) -> None:
        _same(self.buckets, "acquire", key, cost, now=self.now)

    @rule(key=KEYS, cost=COSTS)
    def hit(self, key: Any, cost: int) -> None:
        _same(self.windows, "hit", key, cost, now=self.now)

    @rule(key=KEYS, cost=COSTS)
    def peek(self, key: Any, cost: int) -> None:
        _same(self.buckets, "peek", key, cost, now=self.now)
        _same(self.windows, "peek", key, cost, now=self.now)

    @rule(key=KEYS)
    def reset(self, key: Any) -> None:
        _same(self.buckets, "reset", key)
        _same(self.windows, "reset", key)

    @rule(seed=st.integers(0, 2**32), count=st.integers(1, 80))
    def storm(self, seed: int, count: int) -> None:
        """A burst of pseudo-random calls: Hypothesis favours round numbers, while the
        float agreement needs arbitrary time steps and costs too."""
        rng = random.Random(seed)
        for _ in range(count):
            self.now += rng.choice([rng.uniform(0.0, 0.4), rng.expovariate(0.5), -0.01])
            key, cost = rng.randrange(12), rng.randint(1, 12)
            _same(self.buckets, "acquire", key, cost, now=self.now)
            _same(self.windows, "hit", key, cost, now=self.now)

    @rule(cost=st.sampled_from([0, -1, 1.5, True, "1"]))
    def bad_cost(self, cost: Any) -> None:
        _same(self.buckets, "acquire", "a", cost, now=self.now)
        _same(self.windows, "hit", "a", cost, now=self.now)

    @invariant()
    def same_size(self) -> None:
        if self.buckets:
            assert len(self.buckets[0]) == len(self.buckets[1]) <= self.buckets[0].max_keys
            assert len(self.windows[0]) == len(self.windows[1]) <= self.windows[0].max_keys


NODES = st.sampled_from(["n1", "n2", "n3", "n4", "n5", "cache-a", "cache-b", "ü"])
RING_KEYS = st.text(max_size=12) | st.binary(max_size=12) | st.integers(0, 3)


class RingAgreement(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rings: list[Any] = []

    @initialize(
        nodes=st.dictionaries(NODES, st.integers(1, 4), max_size=4),
        vnodes=st.sampled_from([1, 4, 40, 160]),
    )
    def build(self, nodes: dict[str, int], vnodes: int) -> None:
        self.rings = [
            load("hashring", impl).HashRing(nodes, vnodes=vnodes) for impl in ("compiled", "python")
        ]

    @rule(node=NODES, weight=st.integers(0, 4))
    def add(self, node: str, weight: int) -> None:
        _same(self.rings, "add", node, weight)

    @rule(node=NODES)
    def remove(self, node: str) -> None:
        _same(self.rings, "remove", node)

    @rule(key=RING_KEYS, n=st.integers(0, 6))
    def lookup(self, key: Any, n: int) -> None:
        _same(self.rings, "get", key)
        _same(self.rings, "get_n", key, n)

    @rule(seed=st.integers(0, 2**32))
    def storm(self, seed: int) -> None:
        """Many pseudo-random keys and loads per step (see LimiterAgreement.storm)."""
        rng = random.Random(seed)
        for _ in range(50):
            key = rng.randbytes(rng.randrange(20)).hex()
            loads = {
                node: rng.choice([rng.randrange(30), rng.uniform(0, 30)])
                for node in rng.sample(sorted(self.rings[0].nodes), k=len(self.rings[0]))
            }
            c, n = rng.uniform(1.0, 3.0), rng.randrange(1, 6)
            _same(self.rings, "get", key)
            _same(self.rings, "get_n", key, n)
            _same(self.rings, "get_bounded", key, loads, c)

    @rule(
        key=RING_KEYS,
        loads=st.dictionaries(NODES, st.integers(0, 20) | st.floats(0.0, 20.0)),
        c=st.floats(0.5, 3.0),
    )
    def bounded(self, key: Any, loads: dict[str, float], c: float) -> None:
        _same(self.rings, "get_bounded", key, loads, c)

    @invariant()
    def same_ring(self) -> None:
        if self.rings:
            compiled, python = self.rings
            assert compiled.nodes == python.nodes and len(compiled) == len(python)
            assert compiled.points() == python.points()


TestLimiterAgreement = LimiterAgreement.TestCase
TestLimiterAgreement.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestRingAgreement = RingAgreement.TestCase
TestRingAgreement.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
