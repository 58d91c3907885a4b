"""A gateway: everything one config generation needs to serve requests.

Built once per config load (startup and every reload) and never mutated afterwards; a
client connection picks up the current gateway at the start of each request, so a reload
applies to new requests while in-flight ones finish on the gateway they started with.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import random
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from fastedge.config import Config, TargetConfig, UpstreamConfig
from fastedge.errors import Kind, ProxyError
from fastedge.filters import Response, Runtime, build_route_filters
from fastedge.http.engine import Engine, Limits, get_engine
from fastedge.observe.logging import AccessLog
from fastedge.observe.metrics import Metrics
from fastedge.observe.tracing import Tracer
from fastedge.router import Route, Router
from fastedge.transports import create_connection, upstream_edge
from fastedge.upstream.balancer import SmoothRoundRobin
from fastedge.upstream.balancers import (
    ConsistentHash,
    LeastConnections,
    PowerOfTwoEWMA,
    PriorityGroups,
)
from fastedge.upstream.breaker import CircuitBreaker
from fastedge.upstream.express_view import ExpressView
from fastedge.upstream.health import HealthChecker, HealthState, OutlierDetector
from fastedge.upstream.pool import ConnectionPool
from fastedge.upstream.registry import UpstreamRegistry
from fastedge.upstream.resilient_tier import ResilientTier
from fastedge.upstream.retry import RetryBudget, RetryPolicy

if TYPE_CHECKING:
    from fastedge.proxy import Exchange, UpstreamConnection

log = logging.getLogger("fastedge.gateway")


class Target:
    """One upstream server, its connection pool and (when configured) its breaker."""

    __slots__ = (
        "authority",
        "breaker",
        "edge_io",
        "host",
        "name",
        "pool",
        "port",
        "priority",
        "server_hostname",
        "ssl",
        "upstream_name",
        "weight",
    )

    def __init__(
        self, cfg: TargetConfig, upstream: UpstreamConfig, ssl_ctx: ssl.SSLContext | None
    ) -> None:
        self.name = cfg.url
        self.upstream_name = upstream.name
        self.host = cfg.host
        self.port = cfg.port
        self.weight = cfg.weight
        self.priority = cfg.priority
        default_port = 443 if cfg.scheme == "https" else 80
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.authority = (host if cfg.port == default_port else f"{host}:{cfg.port}").encode()
        self.ssl = ssl_ctx
        self.server_hostname = (upstream.tls_server_name or cfg.host) if ssl_ctx else None
        self.breaker: CircuitBreaker | None = None  # set by a resilient Upstream
        # fastedge's own transports for its connections (server.io; set by Upstream).
        self.edge_io = False
        pool = upstream.pool
        self.pool = ConnectionPool(
            cfg.url,
            self.connect,
            max_connections=pool.max_connections,
            idle_timeout=pool.idle_timeout,
            wait_timeout=pool.wait_timeout,
            connect_timeout=pool.connect_timeout,
        )

    def __repr__(self) -> str:
        return f"<Target {self.upstream_name} {self.name}>"

    async def connect(self) -> UpstreamConnection:
        """Open one connection to this target (TLS when the target is https)."""
        from fastedge.proxy import UpstreamConnection

        # The protocol classes are compiled (Cython cdef classes cannot subclass
        # asyncio.Protocol); they implement its methods, which is all a transport needs.
        # Through fastedge's own transports when server.io allows (edge_io, per gateway).
        _, proto = await create_connection(
            lambda: cast(asyncio.Protocol, UpstreamConnection(self)),
            self.host,
            self.port,
            ssl=self.ssl,
            server_hostname=self.server_hostname,
            edge=self.edge_io,
        )
        return cast("UpstreamConnection", proto)


class Upstream:
    """A named group of targets with a balancer, and its resilience state.

    Without health checks, outlier detection, breakers, retries, a fallback or more than
    one priority group (``resilient`` false) the proxy uses ``balancer`` directly and
    nothing here runs per request. Otherwise the proxy follows the resilience contract:
    :meth:`record_request` once per request, :meth:`candidates` for the order,
    :meth:`admit` on the target it is about to use, :meth:`report` once per attempt (or
    :meth:`abandon`), :meth:`retry_delay` after a failed attempt and
    :meth:`unavailable` when no target is left (docs/resilience.md has the semantics).
    """

    __slots__ = (
        "_ignore_ejection",
        "_now",
        "_rng",
        "_ssl_ctx",
        "_started",
        "_stopped_checkers",
        "balance",
        "balancer",
        "budget",
        "checker",
        "config",
        "edge_io",
        "express",
        "express_health",
        "express_plain",
        "express_resilient",
        "express_tier",
        "fallback",
        "fallback_response",
        "hash_key",
        "host_field",
        "host_header",
        "keyed",
        "lane_view",
        "load_aware",
        "metrics",
        "name",
        "outlier",
        "resilient",
        "response_timeout",
        "retry_policy",
        "retry_statuses",
        "targets",
        "verdicts",
    )

    def __init__(
        self,
        cfg: UpstreamConfig,
        *,
        metrics: Metrics | None = None,
        previous: Upstream | None = None,
        edge_io: bool = False,
    ) -> None:
        """``previous``: the same upstream of the config generation being replaced;
        breakers, health verdicts, ejections and the retry budget of targets with the
        same URL (and the same settings) carry over from it. ``edge_io``: connect with
        fastedge's own transports (fastedge.transports.upstream_edge)."""
        self.edge_io = edge_io
        self.name = cfg.name
        self.config = cfg
        self.metrics = metrics
        # The express lane's C view of this upstream (kept in step by _install).
        self.lane_view = ExpressView()
        self.balance = cfg.balance
        self.hash_key = cfg.hash_key
        # round_robin needs no per-request bookkeeping; the others count requests in
        # flight (acquire at send, release when the exchange lets go of the connection).
        self.load_aware = cfg.balance != "round_robin"
        self.keyed = cfg.balance == "consistent_hash"  # candidates depend on a request key
        self.host_header = cfg.host_header.encode() if cfg.host_header else None
        # The same as the field line the express lane appends (after the request id).
        self.host_field = b"host: " + self.host_header + b"\r\n" if self.host_header else None
        self.response_timeout = cfg.pool.response_timeout
        self._ssl_ctx: ssl.SSLContext | None = None
        self._rng = random.Random()
        self._now = 0.0  # the clock reading candidates() is working with
        self._ignore_ejection = False
        self._started = False
        self._stopped_checkers: list[HealthChecker[Target]] = []
        prev = previous if previous is not None and previous.name == cfg.name else None
        # Per-upstream state; carried over a reload when configured identically.
        self.outlier: OutlierDetector[str] | None = None
        if cfg.outlier is not None:
            if prev is not None and prev.outlier is not None and prev.config.outlier == cfg.outlier:
                self.outlier = prev.outlier  # keyed by target URL: valid across generations
            else:
                o = cfg.outlier
                self.outlier = OutlierDetector(
                    o.consecutive_failures, o.base_ejection, o.max_ejection
                )
        self.retry_policy: RetryPolicy | None = None
        self.budget: RetryBudget | None = None
        if cfg.retry is not None:
            r = cfg.retry
            self.retry_policy = RetryPolicy(
                attempts=r.attempts,
                backoff_base=r.backoff_base,
                backoff_max=r.backoff_max,
                jitter=r.jitter,
                retry_on_statuses=r.statuses,
                retry_non_idempotent=r.non_idempotent,
                retry_on_timeout=r.on_timeout,
            )
            if prev is not None and prev.budget is not None and prev.config.retry == r:
                self.budget = prev.budget
            else:
                self.budget = RetryBudget(r.budget_ratio, r.budget_min_per_second)
        self.retry_statuses: frozenset[int] = (
            frozenset(self.retry_policy.retry_on_statuses) if self.retry_policy else frozenset()
        )
        # Whether an attempt's outcome changes anything (report(), record_request()): a
        # breaker, outlier detection or a retry policy (and its budget) is configured.
        self.verdicts = cfg.breaker is not None or cfg.outlier is not None or cfg.retry is not None
        self.fallback: Upstream | None = None  # resolved by build_gateway (same generation)
        self.fallback_response = cfg.fallback_response
        old_targets = {t.name: t for t in prev.targets} if prev is not None else {}
        targets: list[Target] = []
        for tcfg in cfg.targets:
            target = self._new_target(tcfg)
            old = old_targets.get(tcfg.url)
            if (
                old is not None
                and old.breaker is not None
                and target.breaker is not None
                and prev is not None
                and prev.config.breaker == cfg.breaker
            ):
                target.breaker = old.breaker  # the same server: its breaker state holds
            targets.append(target)
        seed: dict[str, HealthState] = {}
        if (
            prev is not None
            and prev.checker is not None
            and prev.config.health_check == cfg.health_check
        ):
            seed = {t.name: prev.checker.state(t) for t in prev.targets}
        self.targets: list[Target] = []
        self.balancer: Any = None
        self.checker: HealthChecker[Target] | None = None
        self.resilient = False
        self.express = False
        self.express_plain = False
        self.express_health: Mapping[Target, HealthState] | None = None
        self.express_tier: Any = None
        self.express_resilient: ResilientTier | None = None
        self._install(targets, seed)

    # --- building -------------------------------------------------------------------------
    def _new_target(self, tcfg: TargetConfig) -> Target:
        cfg = self.config
        ctx: ssl.SSLContext | None = None
        if tcfg.scheme == "https":
            if self._ssl_ctx is None:
                self._ssl_ctx = _client_ssl_context(cfg)
            ctx = self._ssl_ctx
        target = Target(tcfg, cfg, ctx)
        target.edge_io = self.edge_io
        b = cfg.breaker
        if b is not None:
            target.breaker = CircuitBreaker(
                failure_ratio=b.failure_ratio,
                min_requests=b.min_requests,
                window=b.window,
                open_for=b.open_for,
                open_for_max=b.open_for_max,
                half_open_probes=b.half_open_probes,
            )
        return target

    def _make_balancer(self, targets: list[Target]) -> Any:
        weights = [t.weight for t in targets]
        if self.balance == "least_conn":
            return LeastConnections(targets, weights)
        if self.balance == "p2c_ewma":
            return PowerOfTwoEWMA(targets, self._rng)
        if self.balance == "consistent_hash":
            return ConsistentHash(targets, weights, name=_target_name)
        return SmoothRoundRobin(targets, weights)

    def _install(self, targets: list[Target], seed: dict[str, HealthState]) -> None:
        """Make ``targets`` the live set: balancer, health checker and the resilient
        flag, assigned together with no await in between (requests never see a mix)."""
        cfg = self.config
        resilient = cfg.resilient or len({t.priority for t in targets}) > 1
        balancer: Any
        if resilient:
            levels = sorted({t.priority for t in targets})
            tiers = [[t for t in targets if t.priority == level] for level in levels]
            balancer = PriorityGroups(tiers, self._make_balancer, self._available, panic=False)
        else:
            balancer = self._make_balancer(targets)
        checker: HealthChecker[Target] | None = None
        hc = cfg.health_check
        if hc is not None:
            checker = HealthChecker(
                targets,
                address=_target_address,
                path=hc.path,
                interval=hc.interval,
                timeout=hc.timeout,
                expected_statuses=hc.statuses(),
                rise=hc.rise,
                fall=hc.fall,
                host_header=self._probe_host,
                tls=_target_tls,
                server_name=_target_sni,
            )
            for t in targets:
                old = seed.get(t.name)
                if old is not None:  # keep the verdict and the counts toward rise/fall
                    state = checker.state(t)
                    state.healthy = old.healthy
                    state.successes = old.successes
                    state.failures = old.failures
                    state.checks = old.checks
                    state.last_error = old.last_error
        old_balancer = self.balancer
        if old_balancer is not None and self.load_aware:
            # Requests in flight release on the new balancer: give it their counts.
            known = set(self.targets)
            for t in targets:
                if t in known:
                    for _ in range(old_balancer.inflight(t)):
                        balancer.acquire(t)
        # Resilient only through active health checks, in one tier: the resilience
        # contract then reduces to "the balancer's pick among healthy targets" (no
        # breaker to admit, nothing to report, no budget, no retry but the connect
        # failover, which the lane never needs: it only uses idle pooled connections).
        checked_only = (
            checker is not None
            and cfg.balance == "round_robin"  # express_pick's failover is list order
            and cfg.outlier is None
            and cfg.breaker is None
            and cfg.retry is None
            and cfg.fallback is None
            and cfg.fallback_response is None
            and len({t.priority for t in targets}) == 1
        )
        self.targets = targets
        self.balancer = balancer
        self.checker = checker
        self.resilient = resilient
        self.express_health = checker.states if checked_only and checker is not None else None
        self.express_tier = balancer.balancers[0] if checked_only else None
        # A resilient upstream with one tier of round robin (health checks only
        # included): express_attempt() and express_pick() in C
        # (fastedge/upstream/resilient_tier.py).
        self.express_resilient = None
        if resilient and cfg.balance == "round_robin" and len({t.priority for t in targets}) == 1:
            states = [checker.state(t) if checker is not None else None for t in targets]
            self.express_resilient = ResilientTier(self, targets, balancer, states)
        # Plain enough for the express lane: a synchronous pick (the balancer's, or for a
        # resilient upstream express_pick() or express_attempt()), with a request key
        # the lane has at hand (fastedge.proxy, _express): not a header, cookie or claim.
        self.express = not self.keyed or self.hash_key in ("ip", "path")
        # The lane's commonest case: the balancer's pick and nothing else per request.
        self.express_plain = not (
            resilient or self.load_aware or self.keyed or self.host_header is not None
        )
        view = self.lane_view
        view.express = self.express
        view.plain = self.express_plain
        view.resilient = resilient
        view.keyed = self.keyed
        view.load_aware = self.load_aware
        view.verdicts = self.verdicts
        view.p2c = self.balance == "p2c_ewma"
        view.host_field = self.host_field
        view.balancer = balancer
        view.tier = self.express_resilient
        view.response_timeout = self.response_timeout

    def _probe_host(self, target: Target) -> str:
        hc = self.config.health_check
        if hc is not None and hc.host is not None:
            return hc.host
        if self.host_header is not None:
            return self.host_header.decode("latin-1")
        return target.authority.decode("latin-1")

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the active health checks (needs the running loop)."""
        self._started = True
        if self.checker is not None:
            self.checker.start()

    def stop_checks(self) -> None:
        """Stop the health checks now (a newer generation took over, or shutdown)."""
        self._started = False
        if self.checker is not None:
            self.checker.stop()
            self._stopped_checkers.append(self.checker)

    @property
    def checks_running(self) -> bool:
        """Whether any health-check task of this upstream is still alive."""
        checkers = [*self._stopped_checkers, *([self.checker] if self.checker else [])]
        return any(c.running for c in checkers)

    async def aclose(self) -> None:
        """Stop the health checks (waiting for their tasks) and close idle connections."""
        self.stop_checks()
        checkers, self._stopped_checkers = self._stopped_checkers, []
        for checker in checkers:
            await checker.aclose()
        self.close()

    def close(self) -> None:
        """Close every target's idle connections."""
        for target in self.targets:
            target.pool.close()

    def set_targets(self, configs: Sequence[TargetConfig]) -> None:
        """Replace the targets at runtime without dropping requests.

        Targets whose URL stays keep their pool, breaker and health state (weight and
        priority are updated); new ones start healthy; removed ones are drained: their
        idle connections close now, requests in flight on them finish. The change
        lasts until the next config load.
        """
        if not configs:
            raise ValueError("an upstream needs at least one target")
        urls = [c.url for c in configs]
        if len(set(urls)) != len(urls):
            raise ValueError("duplicate target URL")
        current = {t.name: t for t in self.targets}
        targets: list[Target] = []
        for c in configs:
            target = current.get(c.url)
            if target is None:
                target = self._new_target(c)
            else:
                target.weight = c.weight
                target.priority = c.priority
            targets.append(target)
        kept = set(urls)
        removed = [t for t in self.targets if t.name not in kept]
        old_checker = self.checker
        seed: dict[str, HealthState] = {}
        if old_checker is not None:
            seed = {t.name: old_checker.state(t) for t in self.targets}
        self._install(targets, seed)
        if self._started:
            if old_checker is not None:
                old_checker.stop()
                self._stopped_checkers.append(old_checker)
            if self.checker is not None:
                self.checker.start()
        for target in removed:
            target.pool.drain()
        log.info("upstream %s: targets now %s", self.name, ", ".join(urls))

    # --- state for the admin API and metrics ----------------------------------------------
    def is_healthy(self, target: Target) -> bool:
        """The active health check's verdict (``True`` without health checks)."""
        return self.checker is None or self.checker.is_healthy(target)

    def is_ejected(self, target: Target, now: float | None = None) -> bool:
        """Whether passive outlier detection has ``target`` out of rotation."""
        od = self.outlier
        return od is not None and od.is_ejected(
            target.name, time.monotonic() if now is None else now
        )

    def breaker_state(self, target: Target, now: float | None = None) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` (an open breaker whose time is up
        reads ``"half_open"``: the next request is its probe)."""
        b = target.breaker
        if b is None:
            return "closed"
        state = b.state
        if state == "open" and b.retry_after(time.monotonic() if now is None else now) <= 0:
            return "half_open"
        return state

    def describe(self) -> dict[str, Any]:
        """The ``GET /upstreams`` entry of this upstream."""
        now = time.monotonic()
        balancer = self.balancer
        out = []
        for t in self.targets:
            inflight = balancer.inflight(t) if self.load_aware else t.pool.stats()["active"]
            out.append(
                {
                    "url": t.name,
                    "weight": t.weight,
                    "priority": t.priority,
                    "healthy": self.is_healthy(t),
                    "ejected": self.is_ejected(t, now),
                    "breaker": self.breaker_state(t, now),
                    "inflight": inflight,
                    "pool": t.pool.stats(),
                }
            )
        return {"name": self.name, "balance": self.balance, "targets": out}

    # --- the resilience contract (used by the proxy when ``resilient`` is true) ---------
    def _available(self, target: Target) -> bool:
        """Healthy, not ejected, breaker not open (as of ``self._now``)."""
        checker = self.checker
        if checker is not None and not checker.is_healthy(target):
            return False
        b = target.breaker
        if b is not None and b.state == "open" and b.retry_after(self._now) > 0:
            return False
        od = self.outlier
        return od is None or self._ignore_ejection or not od.is_ejected(target.name, self._now)

    def express_pick(self) -> Target | None:
        """The express lane's target for a health-checked upstream (``express_health``
        set): exactly ``candidates(None)[0]``, and ``None`` when that is empty, without
        building the failover list. The round robin advances only when some target is
        healthy, as in :meth:`PriorityGroups.candidates`."""
        tier = self.express_resilient
        assert tier is not None and self.express_health is not None
        # Without breakers every candidate is admitted (generation 0): the first.
        found = tier.attempt()
        return None if found is None else found[0]

    def express_attempt(self, key: bytes | None = None) -> tuple[Target, int] | None:
        """The express lane's first attempt on a resilient upstream: the first of
        :meth:`candidates` that :meth:`admit` lets through and its generation, exactly as
        the proxy's first resilient attempt chooses (``key``: the consistent-hash key
        when ``keyed``); ``None`` when none is (the general path then answers: a
        fallback, a static answer or 503). The caller reports the attempt's outcome, or
        abandons it when it does not send the request."""
        for candidate in self.candidates(key):
            generation = self.admit(candidate)
            if generation is not None:
                return candidate, generation
        # Every breaker refused (half-open probes all taken): the general path asks
        # candidates() again, so the round robin's pick is taken back.
        self.balancer.unpick()
        return None

    def express_decline(self, target: Target, generation: int) -> None:
        """The express lane chose ``target`` (``generation``: the breaker's from
        :meth:`express_attempt`, ``-1`` for a plain upstream) and then left the request
        to the general path, which chooses again: free the breaker's admission and take
        the balancer's pick back, so the general path chooses as if the lane had never
        looked (else round robin over two targets would hand the general path the other
        one, every time)."""
        if generation > -1:
            self.abandon(target, generation)
        # A resilient upstream's PriorityGroups passes it to the tier it picked from.
        self.balancer.unpick()

    def record_request(self) -> None:
        """One original request arrived (the retry budget's denominator)."""
        if self.budget is not None:
            self.budget.record_request(time.monotonic())

    def candidates(self, key: bytes | None) -> list[Target]:
        """Targets for one request in preference order, only those available (healthy,
        not ejected, breaker not open), the highest-priority group with an available
        target first. ``key`` is the consistent-hash key when ``keyed``. Empty: none."""
        if not self.resilient:
            if self.keyed and key is not None:
                return list(self.balancer.candidates(key))
            first = self.balancer.pick()
            return list(self.balancer.failover_order(first))
        self._now = time.monotonic()
        args = (key if key is not None else b"",) if self.keyed else ()
        order: list[Target] = self.balancer.candidates(*args)
        if not order and self.outlier is not None:
            # Passive ejection never takes out every target (Envoy's panic spirit): a
            # burst of 5xx everywhere is more likely the application than every server.
            self._ignore_ejection = True
            try:
                order = self.balancer.candidates(*args)
            finally:
                self._ignore_ejection = False
        return order

    def admit(self, target: Target) -> int | None:
        """Ask ``target``'s breaker: a generation to pass to :meth:`report`, or ``None``
        when it refuses (open, or no half-open probe slot left)."""
        b = target.breaker
        if b is None:
            return 0
        if b.allow():
            return b.generation
        return None

    def report(
        self,
        target: Target,
        generation: int,
        ok: bool,
        *,
        status: int = 0,
        connect_error: bool = False,
        timeout: bool = False,
    ) -> None:
        """The outcome of one attempt on ``target`` (breaker, outlier detection)."""
        b = target.breaker
        if b is not None:
            b.record(ok, generation=generation)
        od = self.outlier
        if od is not None and od.record(target.name, ok, time.monotonic()):
            self.ejected(target, status=status, timeout=timeout)

    def ejected(self, target: Target, *, status: int = 0, timeout: bool = False) -> None:
        """Outlier detection has just ejected ``target``: log it and count it."""
        od = self.outlier
        assert od is not None
        why = f"status {status}" if status else ("timeout" if timeout else "connect error")
        log.warning(
            "upstream %s: target %s ejected after %d consecutive failures (last: %s)",
            self.name,
            target.name,
            od.consecutive_failures,
            why,
        )
        if self.metrics is not None:
            self.metrics.inc(
                "fastedge_upstream_ejections_total",
                (("upstream", self.name), ("target", target.name)),
            )

    def abandon(self, target: Target, generation: int) -> None:
        """The client left before the attempt on ``target`` had an outcome."""
        b = target.breaker
        if b is not None:
            b.abandon(generation=generation)

    def retry_delay(
        self,
        method: bytes,
        attempt: int,
        *,
        status: int = 0,
        connect_error: bool = False,
        timeout: bool = False,
    ) -> float | None:
        """Seconds to wait before another attempt, or ``None`` for no retry.

        ``attempt`` counts the attempts made so far. All flags false means the attempt
        failed after the request may have reached the upstream (reset, bad response):
        retry only idempotent methods. Returning a delay spends retry budget.
        """
        policy = self.retry_policy
        if policy is None:
            # No [retry]: what the plain path does, fail over on connect errors only
            # (nothing was sent), once through the targets, without delay or budget.
            return 0.0 if connect_error and attempt < len(self.targets) else None
        if not policy.should_retry(
            method.decode("latin-1"),
            attempt,
            connect_error=connect_error,
            timeout=timeout,
            reset=not (connect_error or timeout or status),
            status=status or None,
        ):
            return None
        budget = self.budget
        if budget is not None and not budget.try_acquire_retry(time.monotonic()):
            if self.metrics is not None:
                self.metrics.inc(
                    "fastedge_retry_budget_exhausted_total", (("upstream", self.name),)
                )
            return None
        return policy.backoff(attempt, self._rng)

    def unavailable(self) -> ProxyError | Response | Upstream:
        """The answer when no target is available: a 503 error (with ``Retry-After``),
        a static response, or a fallback upstream to send the request to."""
        if self.fallback is not None:
            return self.fallback
        fr = self.fallback_response
        if fr is not None:
            return Response(
                fr.status, [(b"content-type", fr.content_type.encode())], fr.body.encode()
            )
        return ProxyError(
            Kind.UNAVAILABLE,
            "upstream",
            detail=f"no available target in upstream {self.name!r}",
            headers=[(b"retry-after", b"%d" % self.retry_after())],
        )

    def retry_after(self, now: float | None = None) -> int:
        """Whole seconds until some target may take requests again (at least 1): the
        shortest of each target's longest wait (open breaker, ejection, the passes its
        health check still needs)."""
        if now is None:
            now = time.monotonic()
        best: float | None = None
        checker = self.checker
        od = self.outlier
        for t in self.targets:
            wait = 0.0
            b = t.breaker
            if b is not None and b.state != "closed":
                wait = max(wait, b.retry_after(now))
            if checker is not None and not checker.is_healthy(t):
                state = checker.state(t)
                wait = max(wait, max(1, state.rise - state.successes) * checker.interval)
            if od is not None and od.is_ejected(t.name, now):
                until = od.ejected_until(t.name)
                if until is not None:
                    wait = max(wait, until - now)
            best = wait if best is None else min(best, wait)
        return max(1, math.ceil(best or 0.0))


def _target_name(target: Target) -> str:
    return target.name


def _target_address(target: Target) -> tuple[str, int]:
    return target.host, target.port


def _target_tls(target: Target) -> ssl.SSLContext | None:
    return target.ssl


def _target_sni(target: Target) -> str | None:
    return target.server_hostname


def _client_ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.tls_ca)
    if not cfg.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(eq=False)
class Gateway:
    """Runtime state of one config generation (see module docstring)."""

    config: Config
    loop: asyncio.AbstractEventLoop
    engine: Engine
    limits: Limits
    router: Router[Upstream]
    upstreams: dict[str, Upstream]
    metrics: Metrics
    access_log: AccessLog | None
    via: bytes
    header_timeout: float
    keepalive_timeout: float
    body_timeout: float
    max_requests_per_connection: int
    max_connections: int
    max_connections_per_ip: int
    tracer: Tracer | None = None
    express: bool = False
    """Simple exchanges on plain routes take the express lane (see fastedge.proxy)."""
    express_horizon: float = 60.0
    """The shortest upstream response timeout: how soon an express request may time out."""

    @property
    def access_log_enabled(self) -> bool:
        """Whether access-log records are written."""
        return self.access_log is not None

    def log_access(self, record: dict[str, Any]) -> None:
        """Write one access-log record (a timestamp is added here)."""
        if self.access_log is not None:
            record["ts"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
            self.access_log.log(record)

    def response_timeout_for(self, ex: Exchange) -> float:
        """Upstream response (read) timeout for this exchange."""
        up = ex.upstream
        return up.response_timeout if up is not None else 60.0

    def close(self) -> None:
        """Close idle upstream connections (a reload retired this gateway)."""
        for up in self.upstreams.values():
            up.close()

    async def aclose(self) -> None:
        """Stop health checks, close pools and release what the routes' filters hold."""
        for up in self.upstreams.values():
            await up.aclose()
        self.close()
        for route in self.router.routes:
            if route.filters is not None:
                await route.filters.aclose()


def build_gateway(
    config: Config,
    *,
    metrics: Metrics,
    access_log: AccessLog | None,
    engine: Engine | None = None,
    runtime: Runtime | None = None,
    tracer: Tracer | None = None,
) -> Gateway:
    """Resolve a validated :class:`Config` into a ready :class:`Gateway` (needs a loop)."""
    loop = asyncio.get_running_loop()
    if runtime is None:
        runtime = make_runtime(config, metrics)
    srv = config.server
    # Process-wide: which generation's upstreams are live (health checks, metrics), and
    # the state a new generation inherits (breakers, health, ejections, retry budget).
    registry: UpstreamRegistry = runtime.service(
        "fastedge.upstreams", lambda: UpstreamRegistry(metrics)
    )
    edge_io = upstream_edge(srv.io)
    upstreams = {
        name: Upstream(cfg, metrics=metrics, previous=registry.current.get(name), edge_io=edge_io)
        for name, cfg in config.upstreams.items()
    }
    for up in upstreams.values():
        if up.config.fallback is not None:
            up.fallback = upstreams[up.config.fallback]
    routes = [
        Route(
            name=r.name or r.prefix,
            prefix=r.prefix,
            upstream=upstreams[r.upstream],
            strip_prefix=r.strip_prefix,
            rewrite=r.rewrite,
            host=r.host,
            methods=r.methods,
            filters=build_route_filters(r, config, runtime),
        )
        for r in config.routes
    ]
    gateway = Gateway(
        config=config,
        loop=loop,
        engine=engine or get_engine(srv.http),
        limits=Limits(
            max_head_bytes=srv.max_head_bytes,
            max_uri_bytes=srv.max_uri_bytes,
            max_headers=srv.max_headers,
            max_body_bytes=srv.max_body_bytes,
        ),
        router=Router(routes),
        upstreams=upstreams,
        metrics=metrics,
        access_log=access_log,
        via=b"1.1 " + srv.proxy_name.encode(),
        header_timeout=srv.header_timeout,
        keepalive_timeout=srv.keepalive_timeout,
        body_timeout=srv.body_timeout,
        max_requests_per_connection=srv.max_requests_per_connection,
        max_connections=srv.max_connections,
        max_connections_per_ip=srv.max_connections_per_ip,
        tracer=tracer,
    )
    # The express lane skips the engine's codecs, so it needs the fast engine; routes
    # with filters, non-plain upstreams and sampled or continued traces are checked per
    # request (fastedge.proxy.ClientConnection._express).
    gateway.express = srv.express and gateway.engine.name == "fast"
    gateway.express_horizon = min((up.response_timeout for up in upstreams.values()), default=60.0)
    # Last, once nothing can fail: this generation's health checks start and the
    # previous generation's stop (its draining requests keep their last verdicts).
    registry.install(upstreams)
    return gateway


def make_runtime(config: Config, metrics: Metrics) -> Runtime:
    """Process-wide services for ``config`` (the Redis client settings from ``[redis]``)."""
    section = config.sections.get("redis")
    timeout = getattr(section, "timeout", None)
    return Runtime(
        metrics=metrics,
        redis_url=redis_url(config),
        redis_timeout=timeout if isinstance(timeout, float) else 0.25,
    )


def redis_url(config: Config) -> str | None:
    """The ``[redis]`` URL when the section is configured."""
    section = config.sections.get("redis")
    url = getattr(section, "url", None)
    return url if isinstance(url, str) else None
