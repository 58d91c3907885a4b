"""More load-balancing strategies, each returning an ordered list of candidates.

Like :class:`fastedge.upstream.balancer.SmoothRoundRobin`, every balancer answers
``candidates(...) -> list[T]``: the choice first, then the failover order (Pingora's way),
so a retry or a connect failure simply moves on to the next entry.

* :class:`LeastConnections` — fewest requests in flight relative to weight (nginx
  ``least_conn``);
* :class:`PowerOfTwoEWMA` — two random choices, the lower peak-EWMA latency * load wins
  (Finagle's and Linkerd's default balancer);
* :class:`ConsistentHash` — key affinity on the compiled ketama ring with bounded loads;
* :class:`PriorityGroups` — tiers of targets, traffic to the first tier that has healthy
  targets (Envoy priority levels: global load balancing and DR failover).

Balancers that weigh load keep in-flight counts: the caller calls ``acquire(target)`` when
it sends a request to a target and ``release(target)`` when the exchange ends, on the
target it actually used (``candidates`` itself changes no counts, so failover attempts
that never connect cost nothing). Targets must be hashable; they are compared by ``==``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from fastedge.core import HashRing

T = TypeVar("T")


def _check_weights(targets: Sequence[Any], weights: Sequence[int] | None) -> list[int]:
    if not targets:
        raise ValueError("a balancer needs at least one target")
    if len(set(targets)) != len(targets):
        raise ValueError("targets must be distinct")
    if weights is None:
        return [1] * len(targets)
    if len(targets) != len(weights) or any(w < 1 for w in weights):
        raise ValueError("one weight >= 1 per target is required")
    return list(weights)


class LeastConnections(Generic[T]):
    """Fewest in-flight requests per unit of weight wins (nginx ``least_conn``).

    Loads are compared as ``inflight / weight`` (cross-multiplied, no division). Ties —
    including the idle start, where every load is 0 — are broken by smooth weighted round
    robin among the tied targets, as nginx's ``ngx_http_upstream_get_least_conn_peer``
    does, so with no concurrency the traffic split equals the weights.
    """

    __slots__ = ("_current", "_index", "_inflight", "_last", "_n", "_targets", "_weights")

    def __init__(self, targets: Sequence[T], weights: Sequence[int] | None = None) -> None:
        self._weights = _check_weights(targets, weights)
        self._targets = list(targets)
        self._n = len(self._targets)
        self._index = {t: i for i, t in enumerate(self._targets)}
        self._inflight = [0] * self._n
        self._current = [0] * self._n  # smooth-WRR scores for tie breaking
        # The last pick's tie break (tied indexes, winner, their total weight), until
        # unpick(); None when it changed no score.
        self._last: tuple[list[int], int, int] | None = None

    def pick(self) -> T:
        """The target to use next (changes only the tie-breaking scores)."""
        inflight, weights = self._inflight, self._weights
        tied: list[int] = []
        best_c, best_w = 0, 1
        for i in range(self._n):
            c, w = inflight[i], weights[i]
            if not tied or c * best_w < best_c * w:
                tied = [i]
                best_c, best_w = c, w
            elif c * best_w == best_c * w:
                tied.append(i)
        if len(tied) == 1:
            self._last = None
            return self._targets[tied[0]]
        current = self._current
        total = 0
        best = tied[0]
        best_score = -(1 << 62)
        for i in tied:
            score = current[i] + weights[i]
            current[i] = score
            total += weights[i]
            if score > best_score:
                best, best_score = i, score
        current[best] -= total
        self._last = (tied, best, total)
        return self._targets[best]

    def unpick(self) -> None:
        """Take back the last :meth:`pick`'s tie-breaking scores (called before any
        other pick; see :meth:`fastedge.upstream.balancer.SmoothRoundRobin.unpick`)."""
        last, self._last = self._last, None
        if last is None:
            return
        tied, best, total = last
        current, weights = self._current, self._weights
        current[best] += total
        for i in tied:
            current[i] -= weights[i]

    def candidates(self) -> list[T]:
        """The pick first, then the other targets from least to most loaded."""
        return self.failover_order(self.pick())

    def failover_order(self, first: T) -> list[T]:
        """``first``, then the others by ascending load (stable on list order)."""
        inflight, weights = self._inflight, self._weights
        rest = sorted(
            (i for i in range(self._n) if self._targets[i] != first),
            key=lambda i: inflight[i] / weights[i],
        )
        return [first, *(self._targets[i] for i in rest)]

    def acquire(self, target: T) -> None:
        """A request is now in flight to ``target`` (ignored for a target this balancer
        does not know: one removed by a runtime target change after it was chosen)."""
        i = self._index.get(target)
        if i is not None:
            self._inflight[i] += 1

    def release(self, target: T) -> None:
        """A request to ``target`` ended (whatever the outcome); unknown targets (see
        :meth:`acquire`) are ignored."""
        i = self._index.get(target)
        if i is None:
            return
        if self._inflight[i] <= 0:
            raise ValueError(f"release() without acquire() for {target!r}")
        self._inflight[i] -= 1

    def inflight(self, target: T) -> int:
        """Requests in flight to ``target``."""
        return self._inflight[self._index[target]]


class PowerOfTwoEWMA(Generic[T]):
    """Power of two random choices over a peak-sensitive EWMA of latency.

    Two distinct targets are drawn at random; the one with the lower
    ``ewma_latency * (inflight + 1)`` wins (Mitzenmacher's "power of two choices": an
    exponential improvement over one random choice, without the herding of always picking
    the global best). The cost is Finagle's ``PeakEwma`` (also Linkerd's): a latency above
    the estimate replaces it at once (react fast to a slowdown), a lower one is blended in
    with weight ``1 - exp(-elapsed / decay)``, so old samples fade with time constant
    ``decay`` (Finagle's default 10 s). The estimate also decays toward 0 while a target
    gets no samples, so a target that was slow is tried again later. A target not yet
    observed costs ``default_latency`` (Linkerd's default RTT estimate, 30 ms).
    """

    __slots__ = (
        "_clock",
        "_ewma",
        "_index",
        "_inflight",
        "_n",
        "_rng",
        "_stamp",
        "_targets",
        "decay",
    )

    def __init__(
        self,
        targets: Sequence[T],
        rng: random.Random,
        decay: float = 10.0,
        *,
        default_latency: float = 0.030,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_weights(targets, None)
        if not decay > 0:
            raise ValueError("decay must be > 0 seconds")
        self._targets = list(targets)
        self._n = len(self._targets)
        self._index = {t: i for i, t in enumerate(self._targets)}
        self._rng = rng
        self.decay = decay
        self._clock = clock
        self._inflight = [0] * self._n
        self._ewma = [float(default_latency)] * self._n
        self._stamp: list[float | None] = [None] * self._n  # last sample time per target

    def _cost(self, i: int, now: float) -> float:
        stamp = self._stamp[i]
        ewma = self._ewma[i]
        if stamp is not None and now > stamp:
            ewma *= math.exp(-(now - stamp) / self.decay)
        return ewma * (self._inflight[i] + 1)

    def cost(self, target: T, now: float | None = None) -> float:
        """The score a choice compares: decayed EWMA latency * (in flight + 1)."""
        return self._cost(self._index[target], self._clock() if now is None else now)

    def pick(self, now: float | None = None) -> T:
        """Two random choices; the cheaper one."""
        n = self._n
        if n == 1:
            return self._targets[0]
        if now is None:
            now = self._clock()
        a = self._rng.randrange(n)
        b = self._rng.randrange(n - 1)
        if b >= a:  # distinct without rejection sampling
            b += 1
        return self._targets[a if self._cost(a, now) <= self._cost(b, now) else b]

    def unpick(self) -> None:
        """Nothing to take back: a pick changes no state but the random generator's,
        whose extra draws leave the choices' distribution unchanged."""

    def candidates(self, now: float | None = None) -> list[T]:
        """The pick first, then the others by ascending cost."""
        if now is None:
            now = self._clock()
        return self.failover_order(self.pick(now), now)

    def failover_order(self, first: T, now: float | None = None) -> list[T]:
        """``first``, then the others by ascending cost (built only when needed: the
        proxy's fast path uses :meth:`pick` alone)."""
        if now is None:
            now = self._clock()
        rest = sorted(
            (i for i in range(self._n) if self._targets[i] != first),
            key=lambda i: self._cost(i, now),
        )
        return [first, *(self._targets[i] for i in rest)]

    def observe(self, target: T, latency_s: float, now: float | None = None) -> None:
        """Feed one measured latency (seconds, e.g. time to response head) for ``target``."""
        if latency_s < 0:
            raise ValueError("latency must be >= 0")
        i = self._index.get(target)
        if i is None:  # removed at runtime while the request was in flight
            return
        if now is None:
            now = self._clock()
        stamp = self._stamp[i]
        ewma = self._ewma[i]
        if stamp is None or latency_s > ewma:
            ewma = latency_s  # first sample, or a peak: take it at once
        else:
            w = math.exp(-max(0.0, now - stamp) / self.decay)
            ewma = ewma * w + latency_s * (1.0 - w)
        self._ewma[i] = ewma
        self._stamp[i] = now

    def acquire(self, target: T) -> None:
        """A request is now in flight to ``target`` (ignored for a target this balancer
        does not know: one removed by a runtime target change after it was chosen)."""
        i = self._index.get(target)
        if i is not None:
            self._inflight[i] += 1

    def release(self, target: T) -> None:
        """A request to ``target`` ended; unknown targets (see :meth:`acquire`) are
        ignored."""
        i = self._index.get(target)
        if i is None:
            return
        if self._inflight[i] <= 0:
            raise ValueError(f"release() without acquire() for {target!r}")
        self._inflight[i] -= 1

    def inflight(self, target: T) -> int:
        """Requests in flight to ``target``."""
        return self._inflight[self._index[target]]


class ConsistentHash(Generic[T]):
    """Key affinity on the compiled ketama ring (:class:`fastedge.core.HashRing`).

    ``name`` turns a target into its ring node name (``str`` by default; the gateway's
    targets would pass ``lambda t: t.name``, their URL). With ``bounded_load_c`` set
    (HAProxy's ``hash-balance-factor`` 125 is c = 1.25), the first candidate is
    ``HashRing.get_bounded``'s: the first target in ring order from the key whose load is
    below ``ceil(c * (total + 1) / n)`` (Mirrokni, Thorup, Zadimoghaddam, SODA 2018), so a
    hot key spills to its ring neighbours instead of overloading one target. With ``None``
    it is plain ``get``. The rest of the list is ``get_n`` ring order: the targets the key
    would move to if its owner went away, which keeps failover affine too.
    """

    __slots__ = ("_by_name", "_inflight", "_n", "_name", "_ring", "bounded_load_c")

    def __init__(
        self,
        targets: Sequence[T],
        weights: Sequence[int] | None = None,
        vnodes: int = 160,
        bounded_load_c: float | None = 1.25,
        *,
        name: Callable[[T], str] = str,
    ) -> None:
        weights = _check_weights(targets, weights)
        if bounded_load_c is not None and not (
            bounded_load_c >= 1 and math.isfinite(bounded_load_c)
        ):
            raise ValueError("bounded_load_c must be a finite number >= 1, or None")
        self._name = name
        self._by_name: dict[str, T] = {}
        for t in targets:
            key = name(t)
            if key in self._by_name:
                raise ValueError(f"two targets share the ring name {key!r}")
            self._by_name[key] = t
        self._ring = HashRing(
            {name(t): w for t, w in zip(targets, weights, strict=True)}, vnodes=vnodes
        )
        self._n = len(self._by_name)
        self._inflight: dict[str, int] = dict.fromkeys(self._by_name, 0)
        self.bounded_load_c = bounded_load_c

    def candidates(self, key: str | bytes, loads: Mapping[T, float] | None = None) -> list[T]:
        """The key's target first, then its ring successors (every target, once).

        ``loads`` (target → current load) overrides the balancer's own in-flight counts
        for the bounded-load choice; ignored when ``bounded_load_c`` is ``None``.
        """
        order = self._ring.get_n(key, self._n)
        c = self.bounded_load_c
        if c is not None and self._n > 1:
            named: Mapping[str, float]
            if loads is None:
                named = self._inflight
            else:
                named = {self._name(t): v for t, v in loads.items()}
            first = self._ring.get_bounded(key, named, c)
            if first != order[0]:
                order.remove(first)
                order.insert(0, first)
        by_name = self._by_name
        return [by_name[n] for n in order]

    def unpick(self) -> None:
        """Nothing to take back: :meth:`candidates` changes no state."""

    def get(self, key: str | bytes) -> T:
        """The key's owner on the ring, ignoring load."""
        return self._by_name[self._ring.get(key)]

    def acquire(self, target: T) -> None:
        """A request is now in flight to ``target`` (ignored for a target not on this
        ring: one removed by a runtime target change after it was chosen)."""
        key = self._name(target)
        if key in self._inflight:
            self._inflight[key] += 1

    def release(self, target: T) -> None:
        """A request to ``target`` ended; unknown targets are ignored (see acquire)."""
        key = self._name(target)
        if key not in self._inflight:
            return
        if self._inflight[key] <= 0:
            raise ValueError(f"release() without acquire() for {target!r}")
        self._inflight[key] -= 1

    def inflight(self, target: T) -> int:
        """Requests in flight to ``target``."""
        return self._inflight[self._name(target)]


class Balancer(Protocol[T]):
    """Anything with an ordered ``candidates(...)`` — all balancers here and
    :class:`~fastedge.upstream.balancer.SmoothRoundRobin`."""

    def candidates(self, *args: Any, **kwargs: Any) -> list[T]:
        """The choice first, then the failover order."""
        ...


B = TypeVar("B", bound=Balancer[Any])


class PriorityGroups(Generic[T, B]):
    """Tiers of targets: traffic goes to the highest-priority group with a healthy target.

    ``groups[0]`` is the primary tier (say, the local region), ``groups[1]`` the first
    fallback, and so on; each group has its own balancer from ``make_balancer(targets)``.
    ``candidates(*args)`` (the arguments go to the group balancer: a key for
    :class:`ConsistentHash`) lists the healthy targets of the first group that has any,
    in that balancer's order, then the healthy targets of the lower tiers, in tier order —
    the failover path. Unhealthy targets are left out.

    When no target in any tier is healthy, health is ignored and the primary tier's full
    order is returned, then the others: Envoy's "panic mode" — health checks that fail
    everywhere more likely report a problem of their own (or a shared dependency) than a
    total outage, and refusing all traffic would turn it into one. With ``panic=False``
    the answer is then an empty list instead (the gateway answers 503 or a fallback).

    Load-aware group balancers are reached through this object too: ``acquire``,
    ``release``, ``inflight`` and ``observe`` go to the balancer of the target's group
    (and are ignored for a target of no group).
    """

    __slots__ = ("_balancers", "_groups", "_owner", "_picked", "healthy", "panic")

    def __init__(
        self,
        groups: Sequence[Sequence[T]],
        make_balancer: Callable[[list[T]], B],
        healthy: Callable[[T], bool],
        *,
        panic: bool = True,
    ) -> None:
        if not groups or any(not g for g in groups):
            raise ValueError("need at least one group, and no empty group")
        self._groups = [list(g) for g in groups]
        self._balancers = [make_balancer(list(g)) for g in self._groups]
        self._owner: dict[T, Any] = {}
        for group, balancer in zip(self._groups, self._balancers, strict=True):
            for t in group:
                if t in self._owner:
                    raise ValueError(f"target {t!r} is in two groups")
                self._owner[t] = balancer
        self.healthy = healthy
        self.panic = panic
        self._picked: Any = None  # the group balancer the last candidates() asked

    def unpick(self) -> None:
        """Take back the group balancer's choice made by the last :meth:`candidates`
        (for a group balancer with ``unpick``, e.g. smooth round robin); see
        :meth:`fastedge.upstream.balancer.SmoothRoundRobin.unpick`."""
        picked, self._picked = self._picked, None
        if picked is not None and hasattr(picked, "unpick"):
            picked.unpick()

    @property
    def balancers(self) -> list[B]:
        """The per-group balancers, primary first (for ``acquire``/``release``)."""
        return list(self._balancers)

    def group_of(self, target: T) -> int:
        """The priority (index) of the group holding ``target``."""
        for level, group in enumerate(self._groups):
            if target in group:
                return level
        raise KeyError(target)

    def acquire(self, target: T) -> None:
        """A request is now in flight to ``target`` (its group balancer counts it)."""
        balancer = self._owner.get(target)
        if balancer is not None and hasattr(balancer, "acquire"):
            balancer.acquire(target)

    def release(self, target: T) -> None:
        """A request to ``target`` ended."""
        balancer = self._owner.get(target)
        if balancer is not None and hasattr(balancer, "release"):
            balancer.release(target)

    def inflight(self, target: T) -> int:
        """Requests in flight to ``target`` as its group balancer counts them (0 for a
        balancer that does not count)."""
        balancer = self._owner.get(target)
        if balancer is None or not hasattr(balancer, "inflight"):
            return 0
        count: int = balancer.inflight(target)
        return count

    def observe(self, target: T, latency_s: float, now: float | None = None) -> None:
        """A latency sample for ``target`` (for latency-aware group balancers)."""
        balancer = self._owner.get(target)
        if balancer is not None and hasattr(balancer, "observe"):
            balancer.observe(target, latency_s, now)

    def pick(self) -> T:
        """The first candidate (for callers that want one target, e.g. a background
        fetch); the primary group's first target when none is healthy."""
        order = self.candidates()
        return order[0] if order else self._groups[0][0]

    def failover_order(self, first: T) -> list[T]:
        """``first``, then the other healthy candidates in order."""
        return [first, *(t for t in self.candidates() if t != first)]

    def active_group(self) -> int | None:
        """The priority that takes traffic now, ``None`` when nothing is healthy (panic)."""
        healthy = self.healthy
        for level, group in enumerate(self._groups):
            if any(healthy(t) for t in group):
                return level
        return None

    def candidates(self, *args: Any, **kwargs: Any) -> list[T]:
        """Healthy targets, active group's balancer order first, then lower tiers."""
        healthy = self.healthy
        active = self.active_group()
        if active is None:  # panic: ignore health rather than refuse everything
            self._picked = None
            if not self.panic:
                return []
            self._picked = self._balancers[0]
            out: list[T] = list(self._balancers[0].candidates(*args, **kwargs))
            for group in self._groups[1:]:
                out.extend(group)
            return out
        self._picked = self._balancers[active]
        out = [t for t in self._balancers[active].candidates(*args, **kwargs) if healthy(t)]
        for group in self._groups[active + 1 :]:
            out.extend(t for t in group if healthy(t))
        return out
