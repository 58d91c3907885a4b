"""Target selection for an upstream.

The balancer returns an *ordered list of candidates* (Pingora's way): the first is the
choice, the rest are the failover order, so retrying on another target is natural.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SmoothRoundRobin(Generic[T]):
    """Weighted round robin, nginx's "smooth" variant.

    Each pick adds every target's weight to its current score, takes the highest score and
    subtracts the total weight from it. With weights 5,1,1 the order is a,a,b,a,c,a,a —
    spread out, never five a's in a row (nginx ``ngx_http_upstream_round_robin.c``).
    """

    __slots__ = ("_current", "_last", "_n", "_single", "_targets", "_total", "_weights")

    def __init__(self, targets: Sequence[T], weights: Sequence[int]) -> None:
        if not targets:
            raise ValueError("a balancer needs at least one target")
        if len(targets) != len(weights) or any(w < 1 for w in weights):
            raise ValueError("one weight >= 1 per target is required")
        self._targets = list(targets)
        self._weights = list(weights)
        self._current = [0] * len(targets)
        self._total = sum(weights)
        self._n = len(targets)
        self._single = self._n == 1
        self._last = -1  # the index the last pick() chose, until unpick()

    def pick(self) -> T:
        """The next target."""
        if self._single:
            return self._targets[0]
        current = self._current
        best = 0
        best_score = -(1 << 62)
        for i in range(self._n):
            score = current[i] + self._weights[i]
            current[i] = score
            if score > best_score:
                best, best_score = i, score
        current[best] -= self._total
        self._last = best
        return self._targets[best]

    def unpick(self) -> None:
        """Take back the last :meth:`pick` (called before any other pick): the scores are
        as if it never happened. The express lane uses it when it picked a target and
        then left the request to the general path, which picks again. Without a pick to
        take back (a single target, or already taken back), nothing changes."""
        best = self._last
        if best < 0:
            return
        self._last = -1
        current = self._current
        current[best] += self._total
        for i in range(self._n):
            current[i] -= self._weights[i]

    def candidates(self) -> list[T]:
        """The next target first, then the others in list order (failover order)."""
        return self.failover_order(self.pick())

    def failover_order(self, first: T) -> list[T]:
        """``first``, then the other targets in list order (for retries elsewhere)."""
        if self._single:
            return [first]
        return [first, *(t for t in self._targets if t is not first)]
