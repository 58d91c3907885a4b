"""The express lane's side of a resilient upstream's contract, in C, for its usual shape.

:class:`fastedge.gateway.Upstream` states the resilience contract in Python objects:
``candidates`` (the healthy, not ejected, breaker-closed targets in balancer order),
``admit`` (the breaker's consent), ``record_request`` (the retry budget's denominator)
and ``report`` (the breaker's and the outlier detector's verdict). On the express lane
that bookkeeping cost more than the rest of the request (27k instructions against 17k
for a plain one, session 17).

For an upstream with one priority tier of round robin and any mix of health checks,
breaker, outlier detection and retries, :class:`ResilientTier` makes the same decisions
with the same side effects, reading the breakers, health verdicts and budget as C
structs (their ``.pxd`` files) and skipping the outlier detector when it holds nothing.
Its clock is this module's ``time.monotonic``, read where ``Upstream`` reads its own.
``tests/test_resilient_tier.py`` holds it to ``Upstream``'s own methods.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastedge.upstream.breaker import CircuitBreaker
from fastedge.upstream.health import HealthState
from fastedge.upstream.retry import RetryBudget

if TYPE_CHECKING:
    from fastedge.gateway import Target, Upstream


class ResilientTier:
    """One tier of round robin over ``targets`` (``groups``: the upstream's
    :class:`~fastedge.upstream.balancers.PriorityGroups` holding it, ``tier`` its
    balancer), and the per-target state the contract reads."""

    __slots__ = (
        "_ok",
        "breakers",
        "budget",
        "groups",
        "n",
        "names",
        "outlier",
        "states",
        "targets",
        "tier",
        "upstream",
    )

    def __init__(
        self,
        upstream: Upstream,
        targets: list[Target],
        groups: Any,
        states: list[HealthState | None],
    ) -> None:
        self.upstream = upstream
        self.targets = list(targets)
        self.n = len(self.targets)
        self.groups = groups
        self.tier = groups.balancers[0]
        self.states = list(states)
        self.breakers: list[CircuitBreaker | None] = [t.breaker for t in self.targets]
        self.names = [t.name for t in self.targets]
        self.outlier = upstream.outlier
        self.budget: RetryBudget | None = upstream.budget
        self._ok = [False] * self.n  # each target's availability, for one attempt()

    def _scan(self, now: float, ejection: bool) -> bool:
        """Fill ``_ok`` with each target's availability at ``now`` (``Upstream._available``;
        ``ejection``: whether outlier ejections count); whether any target is available."""
        ok = self._ok
        states = self.states
        breakers = self.breakers
        od = self.outlier
        # An empty ejection table ejects nobody, and OutlierDetector.is_ejected then has
        # no side effect: skip the calls.
        if od is not None and not (ejection and od._ejected_until):
            od = None
        found = False
        for i in range(self.n):
            state = states[i]
            available = state is None or state.healthy
            b = breakers[i]
            if available and b is not None and b._state == "open":
                available = b.retry_after(now) <= 0
            if available and od is not None:
                available = not od.is_ejected(self.names[i], now)
            ok[i] = available
            found = found or available
        return found

    def attempt(self) -> tuple[Target, int] | None:
        """``Upstream.express_attempt(None)``: the first of the candidates that its
        breaker admits, with the breaker's generation; ``None`` when none is (with the
        round robin's pick taken back, as there)."""
        now = time.monotonic()
        groups = self.groups
        if not self._scan(now, True):
            # PriorityGroups.candidates found no active group: nothing picked. Passive
            # ejection never takes out every target (Upstream.candidates).
            groups._picked = None
            if self.outlier is None or not self._scan(now, False):
                return None
        first = self.tier.pick()
        groups._picked = self.tier
        ok = self._ok
        targets = self.targets
        # The tier's failover order: its pick, then the others in list order.
        for i in range(self.n):
            if targets[i] is first:
                if ok[i]:
                    found = self._admit(i)
                    if found is not None:
                        return found
                break
        for i in range(self.n):
            target = targets[i]
            if target is not first and ok[i]:
                found = self._admit(i)
                if found is not None:
                    return found
        groups.unpick()  # every breaker refused: the general path asks again
        return None

    # Type comments, not annotations: the .pxd gives ``i`` and the others C types.
    def _admit(self, i):  # type: (int) -> tuple[Target, int] | None
        """``Upstream.admit`` for target ``i``: its generation, or ``None``."""
        b = self.breakers[i]
        if b is None:
            return self.targets[i], 0
        if b.allow(None):
            return self.targets[i], b.generation
        return None

    def record_request(self) -> None:
        """``Upstream.record_request``: one original request (the budget's denominator)."""
        budget = self.budget
        if budget is not None:
            budget.record_request(time.monotonic())

    def report(self, target, generation, status):  # type: (Target, int, int) -> None
        """``Upstream.report(target, generation, status < 500, status=status)``: the
        outcome of an attempt that got a response with ``status``."""
        ok = status < 500
        b: CircuitBreaker | None = target.breaker
        if b is not None and generation == b.generation:
            b.record_outcome(ok, b._clock(), generation)
        od = self.outlier
        # A success with no failure streak and no ejection anywhere changes nothing
        # (OutlierDetector.record would only find that out).
        if (
            od is not None
            and not (ok and not od._consecutive and not od._ejected_until)
            and od.record(target.name, ok, time.monotonic())
        ):
            self.upstream.ejected(target, status=status)
