"""The ``rate_limit`` filter: named policies (``[rate_limits.NAME]``) applied per route.

A route names one policy or several (``rate_limit = ["per_ip", "per_user"]``); they run in
that order and all must allow. A policy counts requests per *key* (client IP, a header, a
JWT claim, or the whole route) with a sliding-window counter or a token bucket:

* ``backend = "local"``: the compiled ``SlidingWindow`` / ``TokenBucket`` of
  :mod:`fastedge.core`, in this process. The decision is synchronous (no task, no await);
* ``backend = "redis"``: one atomic Lua script per decision on the ``[redis]`` server
  (:mod:`fastedge.filters.ratelimit_redis`), so every instance sharing that Redis
  enforces one limit; optionally ``lease`` units are pre-allocated per round trip.

Answers: a refused request gets 429 with ``Retry-After`` and the ``RateLimit-Policy`` /
``RateLimit`` fields; ``headers = "always"`` adds the latter two to allowed responses.
When Redis cannot answer (``[redis].timeout``), ``on_redis_error`` decides: ``"allow"``
(fail open) or ``"deny"`` (503). Every decision is counted in
``fastedge_ratelimit_total{policy,result}``; fallback decisions also in
``fastedge_ratelimit_redis_errors_total{policy}``. The full schema: ``docs/config.md``.

State lives per policy, shared by every route of one config generation that names it
(so ``per_user`` on two routes is one quota per user); ``key = "route"`` splits it per
route. A reload starts local counters afresh; Redis-backed ones carry on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from fastedge.config import (
    _INVALID,
    _TOKEN_RE,
    _build,
    _choice,
    _Context,
    _did_you_mean,
    _duration_at_least,
    _field,
    _integer,
    _join,
    _Key,
    _named_tables,
    _read_table,
    _Schema,
    _section_names,
    _show,
    _string,
    _type_name,
)
from fastedge.core import SlidingWindow, TokenBucket
from fastedge.errors import Kind, ProxyError
from fastedge.filters import Decision, Filter, FilterContext, Headers, Runtime
from fastedge.filters.express import ExpressContext, ExpressPolicyBase
from fastedge.filters.ratelimit_redis import Grant, LeaseBook, RedisLimiter, RedisUnavailable
from fastedge.redis_config import RedisConfig

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig

__all__ = [
    "build_rate_limit_filter",
    "convert_rate_limits_section",
    "convert_route_rate_limit",
]

log = logging.getLogger("fastedge.ratelimit")

Algorithm: TypeAlias = Literal["sliding_window", "token_bucket"]
Clock: TypeAlias = Callable[[], float]

RATELIMIT_TOTAL: Final = "fastedge_ratelimit_total"
REDIS_ERRORS_TOTAL: Final = "fastedge_ratelimit_redis_errors_total"

#: After a failed Redis call a policy decides without Redis (``on_redis_error``) for this
#: long, then tries again: during an outage one request per second pays the timeout,
#: not every request (a tiny circuit breaker, so a blackholed Redis cannot pile up
#: thousands of pending connects).
REDIS_RETRY_INTERVAL: Final = 1.0
#: Redis failures are logged at most once per this many seconds per policy (with the
#: number of fallback decisions since), never once per request.
REDIS_LOG_INTERVAL: Final = 10.0
#: Header values and claims longer than this are hashed into the key, so a client sending
#: 8 KiB header values cannot make each of ``max_keys`` entries 8 KiB.
_MAX_KEY_BYTES: Final = 64

_MAX_COUNT: Final = 1_000_000_000


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """One ``[rate_limits.NAME]`` table.

    ``limit``/``window`` are set for ``sliding_window``, ``rate``/``burst`` for
    ``token_bucket``. ``key`` is ``"ip"``, ``"route"``, ``"header:<name>"`` (lower-cased)
    or ``"claim:<name>"``.
    """

    name: str
    algorithm: Algorithm
    limit: int | None = None
    window: float | None = None
    rate: float | None = None
    burst: int | None = None
    key: str = "ip"
    backend: Literal["local", "redis"] = "local"
    on_redis_error: Literal["allow", "deny"] = "allow"
    headers: Literal["limited", "always"] = "limited"
    lease: int = 0
    max_keys: int = 100_000


def _rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number (per second), got {_type_name(value)}")
    rate = float(value)
    if not (0.0 < rate <= _MAX_COUNT and math.isfinite(rate)):
        raise ValueError(f"must be a number > 0 and at most {_MAX_COUNT}, got {value!r}")
    return rate


def _key_source(value: object) -> str:
    text = _string(value)
    if text in ("ip", "route"):
        return text
    kind, sep, name = text.partition(":")
    if sep and kind == "header":
        if _TOKEN_RE.fullmatch(name) is None:
            raise ValueError(f"header name must be an HTTP token, got {_show(name)}")
        return f"header:{name.lower()}"
    if sep and kind == "claim":
        if not name:
            raise ValueError("claim name must not be empty")
        return text
    raise ValueError(
        "must be 'ip', 'route', 'header:<name>' or 'claim:<name>', got "
        + _show(text)
        + _did_you_mean(text, ["ip", "route"])
    )


_POLICY_SCHEMA: Final[_Schema] = {
    "algorithm": _Key(_field(_choice("sliding_window", "token_bucket")), required=True),
    "limit": _Key(_field(_integer(1, _MAX_COUNT))),
    "window": _Key(_field(_duration_at_least(0.001, inclusive=True))),
    "rate": _Key(_field(_rate)),
    "burst": _Key(_field(_integer(1, _MAX_COUNT))),
    "key": _Key(_field(_key_source)),
    "backend": _Key(_field(_choice("local", "redis"))),
    "on_redis_error": _Key(_field(_choice("allow", "deny"))),
    "headers": _Key(_field(_choice("limited", "always"))),
    "lease": _Key(_field(_integer(0, 10_000))),
    "max_keys": _Key(_field(_integer(1, 10_000_000))),
}

_ALGORITHM_KEYS: Final[Mapping[str, tuple[str, str]]] = {
    "sliding_window": ("limit", "window"),
    "token_bucket": ("rate", "burst"),
}


def _policy(ctx: _Context, path: str, name: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _POLICY_SCHEMA)
    if table is None:
        return _INVALID
    values = table.values
    algorithm = values.get("algorithm")
    if algorithm is None:
        return _INVALID  # missing or invalid: already reported
    raw = value if isinstance(value, Mapping) else {}
    ok = table.complete
    needed = _ALGORITHM_KEYS[algorithm]
    for other_algorithm, keys in _ALGORITHM_KEYS.items():
        for key in keys:
            if other_algorithm != algorithm and key in raw:
                ctx.error(_join(path, key), f"only for algorithm = '{other_algorithm}'")
                ok = False
    for key in needed:
        if key not in raw:
            ctx.error(_join(path, key), f"required for algorithm = '{algorithm}'")
        if key not in values:
            ok = False
    backend = values.get("backend", "local")
    if backend == "redis" and "redis" not in ctx.names:
        ctx.error(_join(path, "backend"), "backend 'redis' needs a [redis] section")
        ok = False
    if backend == "local":
        for key in ("on_redis_error", "lease"):
            if key in raw:
                ctx.error(_join(path, key), "only applies to backend = 'redis'")
                ok = False
    lease = values.get("lease", 0)
    capacity = values.get("limit") if algorithm == "sliding_window" else values.get("burst")
    if lease and capacity is not None and lease > capacity:
        unit = "limit" if algorithm == "sliding_window" else "burst"
        ctx.error(_join(path, "lease"), f"must not exceed {unit} ({capacity}), got {lease}")
        ok = False
    if not ok:
        return _INVALID
    return _build(table, RateLimitPolicy, name=name)


def convert_rate_limits_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[rate_limits.NAME]`` tables (``EXTENSION_SECTIONS``).

    Returns ``{name: RateLimitPolicy}`` (``_INVALID`` when not a table); every problem
    is recorded in ``ctx`` with its key path (``rate_limits.per_user.window: ...``).
    """
    return _named_tables(
        ctx, path, value, _policy, bad_name="a rate limit name is 1-64 letters, digits, '_' or '-'"
    )


def convert_route_rate_limit(ctx: _Context, path: str, value: object) -> Any:
    """Converter for a route's ``rate_limit`` key (``EXTENSION_ROUTE_KEYS``).

    A policy name or a non-empty array of distinct names, each a ``[rate_limits.NAME]``
    of this file; returns the names as a tuple, in order.
    """
    return _section_names(ctx, path, value, "rate_limits", "rate limit")


# --------------------------------------------------------------------------- keys


def _long(key: bytes) -> bytes:
    if len(key) <= _MAX_KEY_BYTES:
        return key
    return b"#" + hashlib.blake2b(key, digest_size=16).digest()


KeySource: TypeAlias = FilterContext | ExpressContext
"""What a key is read from: the general path's context or the express lane's (both
answer ``client_ip``, ``route``, ``header()`` and ``claims``)."""


def _key_function(source: str) -> Callable[[KeySource], bytes]:
    """``ctx -> key``. A missing header or claim falls back to the client IP (documented):
    refusing would turn a missing credential into a 500 or an unlimited bucket, and the
    IP is what an anonymous caller is. Prefixes (``h=``, ``c=``, ``r=``) contain no
    character an IP address can start with, so no source can collide with the IP keys.
    """
    if source == "ip":
        return lambda ctx: ctx.client_ip
    if source == "route":
        return lambda ctx: b"r=" + ctx.route.encode()
    kind, _, name = source.partition(":")
    if kind == "header":
        field_name = name.encode()

        def by_header(ctx: KeySource) -> bytes:
            value = ctx.header(field_name)
            return ctx.client_ip if value is None else _long(b"h=" + value)

        return by_header

    claim_key = _claim_key_function(source)
    assert claim_key is not None

    def by_claim(ctx: KeySource) -> bytes:
        key = claim_key(ctx.claims)
        return ctx.client_ip if key is None else key

    return by_claim


def _claim_key_function(source: str) -> Callable[[dict[str, Any] | None], bytes | None] | None:
    """For a ``claim:NAME`` source, ``claims -> key``, or ``None`` when the claim gives
    none (the caller falls back to the client IP); ``None`` for other sources. The key
    depends on the claims alone, so the express lane keeps it with the verified token."""
    kind, _, name = source.partition(":")
    if kind != "claim":
        return None

    def claim_key(claims: dict[str, Any] | None) -> bytes | None:
        value = claims.get(name) if claims else None
        if isinstance(value, str) and value:
            return _long(b"c=" + value.encode("utf-8", "surrogatepass"))
        if isinstance(value, int) and not isinstance(value, bool):
            return b"c=" + str(value).encode()
        return None

    return claim_key


# --------------------------------------------------------------------------- policies


def _seconds(value: float) -> int:
    """Delay-seconds for ``Retry-After`` / ``t``: whole seconds, rounded up, at least 1."""
    if not math.isfinite(value):
        return 86400
    return max(1, math.ceil(value))


class _Policy:
    """What local and Redis policies share: keys, answers, headers, metrics."""

    __slots__ = (
        "_limited_labels",
        "allowed_counter",
        "allowed_labels",
        "always",
        "claim_key",
        "clock",
        "config",
        "key_of",
        "metrics",
        "name",
        "policy_header",
    )

    def __init__(self, cfg: RateLimitPolicy, runtime: Runtime, clock: Clock) -> None:
        self.config = cfg
        self.name = cfg.name
        self.clock = clock
        self.metrics = runtime.metrics
        self.key_of = _key_function(cfg.key)
        self.claim_key = _claim_key_function(cfg.key)
        self.always = cfg.headers == "always"
        self.allowed_labels = (("policy", cfg.name), ("result", "allowed"))
        self._limited_labels = (("policy", cfg.name), ("result", "limited"))
        self.allowed_counter = runtime.metrics.counter(RATELIMIT_TOTAL, self.allowed_labels)
        # draft-ietf-httpapi-ratelimit-headers-08..-11 (the current syntax): each field is
        # a Structured-Field List whose items are the policy name as an sf-string with
        # parameters: RateLimit-Policy q (quota) and w (window, whole seconds, optional);
        # RateLimit r (remaining) and t (seconds until the quota resets). A token bucket
        # advertises its burst as q and the time to refill an empty bucket as w.
        if cfg.algorithm == "sliding_window":
            assert cfg.limit is not None and cfg.window is not None
            quota, window = cfg.limit, cfg.window
        else:
            assert cfg.rate is not None and cfg.burst is not None
            quota, window = cfg.burst, cfg.burst / cfg.rate
        value = f'"{cfg.name}";q={quota}'
        if window >= 1:
            value += f";w={math.ceil(window)}"
        self.policy_header = value.encode()

    def reset_seconds(self, remaining: int, seconds: float) -> float:
        """``t`` for an allowed answer: the window's end, or a full bucket again."""
        cfg = self.config
        if cfg.algorithm == "sliding_window":
            return seconds
        assert cfg.rate is not None and cfg.burst is not None
        return (cfg.burst - remaining) / cfg.rate

    def allowed(self, ctx: FilterContext, remaining: int, seconds: float) -> Decision:
        self.allowed_counter.inc()
        if self.always:
            t = math.ceil(self.reset_seconds(remaining, seconds))
            ctx.response_headers.extend(self._fields(remaining, t))
        return None

    def limited(self, remaining: int, seconds: float) -> ProxyError:
        self.metrics.inc(RATELIMIT_TOTAL, self._limited_labels)
        retry = _seconds(seconds)
        # The draft asks RateLimit's t to name the same moment as Retry-After.
        headers: Headers = [(b"retry-after", b"%d" % retry), *self._fields(remaining, retry)]
        return ProxyError(
            Kind.RATE_LIMITED,
            "rate_limit",
            detail=f"rate limit {self.name!r} exceeded",
            headers=headers,
        )

    def _fields(self, remaining: int, t: int) -> Headers:
        return [
            (b"ratelimit-policy", self.policy_header),
            (b"ratelimit", b'"%s";r=%d;t=%d' % (self.name.encode(), remaining, t)),
        ]


class _LocalPolicy(_Policy):
    """A policy on the compiled in-process limiter: synchronous, ~1 µs."""

    __slots__ = ("limiter", "store")

    def __init__(self, cfg: RateLimitPolicy, runtime: Runtime, clock: Clock) -> None:
        super().__init__(cfg, runtime, clock)
        if cfg.algorithm == "sliding_window":
            assert cfg.limit is not None and cfg.window is not None
            window = SlidingWindow(cfg.limit, cfg.window, max_keys=cfg.max_keys)
            self.store: SlidingWindow | TokenBucket = window
            self.limiter: Callable[[bytes, int, float], tuple[bool, int, float]] = window.hit
        else:
            assert cfg.rate is not None and cfg.burst is not None
            bucket = TokenBucket(cfg.rate, cfg.burst, max_keys=cfg.max_keys)
            self.store = bucket
            self.limiter = bucket.acquire

    def tracked_keys(self) -> int:
        """Keys with limiter state in memory (bounded by ``max_keys``); scrape time only."""
        return len(self.store)

    def check(self, ctx: FilterContext) -> Decision:
        allowed, remaining, seconds = self.limiter(self.key_of(ctx), 1, self.clock())
        if allowed:
            return self.allowed(ctx, remaining, seconds)
        return self.limited(remaining, seconds)


class _RedisPolicy(_Policy):
    """A policy on Redis: one round trip per decision, or spending a local lease."""

    __slots__ = ("_down_until", "_errors_labels", "_last_log", "_unlogged", "leases", "redis")

    def __init__(
        self, cfg: RateLimitPolicy, runtime: Runtime, clock: Clock, redis_cfg: RedisConfig
    ) -> None:
        super().__init__(cfg, runtime, clock)
        if cfg.algorithm == "sliding_window":
            assert cfg.limit is not None and cfg.window is not None
            a, b = float(cfg.limit), cfg.window
        else:
            assert cfg.rate is not None and cfg.burst is not None
            a, b = cfg.rate, float(cfg.burst)
        self.redis = RedisLimiter(
            runtime.redis,
            policy=cfg.name,
            algorithm=cfg.algorithm,
            a=a,
            b=b,
            key_prefix=redis_cfg.key_prefix,
            timeout=redis_cfg.timeout,
        )
        self.leases: LeaseBook | None = None
        if cfg.lease > 1:
            self.leases = LeaseBook(
                self.redis,
                cfg.lease,
                lifetime=self._lease_lifetime,
                max_keys=cfg.max_keys,
                clock=clock,
            )
        self._down_until = -math.inf
        self._last_log = -math.inf
        self._unlogged = 0
        self._errors_labels = (("policy", cfg.name),)

    def tracked_keys(self) -> int:
        """Keys holding leased units in memory (0 without ``lease``); scrape time only."""
        return 0 if self.leases is None else self.leases.keys()

    def _lease_lifetime(self, grant: Grant) -> float:
        cfg = self.config
        if cfg.algorithm == "sliding_window":
            return grant.seconds  # the end of the fixed window Redis counted the batch in
        assert cfg.rate is not None
        return cfg.lease / cfg.rate  # the time the bucket takes to earn the batch back

    def check(self, ctx: FilterContext) -> Decision | Awaitable[Decision]:
        key = self.key_of(ctx)
        now = self.clock()
        leases = self.leases
        if leases is not None:
            got = leases.take_local(key, now)
            if got is not None:
                return self.allowed(ctx, got.remaining, got.seconds)
        if now < self._down_until:
            return self._fallback(now, None)
        return self._remote(ctx, key)

    async def _remote(self, ctx: FilterContext, key: bytes) -> Decision:
        try:
            if self.leases is not None:
                grant = await self.leases.acquire(key)
            else:
                grant = await self.redis.take(key)
        except RedisUnavailable as exc:
            now = self.clock()
            self._down_until = now + REDIS_RETRY_INTERVAL
            return self._fallback(now, exc)
        if grant.granted:
            return self.allowed(ctx, grant.remaining, grant.seconds)
        return self.limited(grant.remaining, grant.seconds)

    def _fallback(self, now: float, exc: RedisUnavailable | None) -> Decision:
        self.metrics.inc(REDIS_ERRORS_TOTAL, self._errors_labels)
        self._unlogged += 1
        if exc is not None and now - self._last_log >= REDIS_LOG_INTERVAL:
            log.warning(
                "rate limit %r: Redis unavailable (%s); %s requests (%d since the last report)",
                self.name,
                exc,
                "allowing" if self.config.on_redis_error == "allow" else "refusing",
                self._unlogged,
            )
            self._last_log = now
            self._unlogged = 0
        if self.config.on_redis_error == "allow":
            self.metrics.inc(RATELIMIT_TOTAL, self.allowed_labels)
            return None
        # 503, not 429: the client exceeded nothing, the limiter's store is down, and a
        # 429 would tell it to back off from a quota it never used.
        self.metrics.inc(RATELIMIT_TOTAL, self._limited_labels)
        return ProxyError(
            Kind.UNAVAILABLE,
            "rate_limit",
            detail="rate limiter unavailable",
            headers=[(b"retry-after", b"%d" % math.ceil(REDIS_RETRY_INTERVAL))],
        )


# --------------------------------------------------------------------------- filter


_AnyPolicy: TypeAlias = "_LocalPolicy | _RedisPolicy"


class RateLimitFilter(ExpressPolicyBase):
    """The route's policies in order; synchronous unless a Redis round trip is needed."""

    # Compiled, a C struct (ratelimit.pxd) whose express lane methods are C methods.
    __slots__ = ("_only", "express_ready", "name", "policies")

    # On the express lane (fastedge.filters.ExpressPolicy) the check takes the token.
    express_consumes = True

    def __init__(self, policies: list[_AnyPolicy]) -> None:
        self.name = "rate_limit"
        self.policies = tuple(policies)
        self._only = policies[0] if len(policies) == 1 else None
        # The express lane: one local policy that adds no fields to allowed responses.
        only = self._only
        self.express_ready = isinstance(only, _LocalPolicy) and not only.always

    def express_check(self, x: ExpressContext) -> bool:
        """Take a token for the express lane; a refusal changes nothing (the limiters
        count only what they allow) and the general path answers it."""
        policy = self._only
        assert isinstance(policy, _LocalPolicy)
        claim_key = policy.claim_key
        memo = x.memo
        if claim_key is not None and memo is not None:
            # Keyed by a claim of a verified token: computed once per token (b"": the
            # token has no such claim, and the client IP is the key, as in by_claim).
            key = memo.get(claim_key)
            if key is None:
                key = memo[claim_key] = claim_key(x.claims) or b""
            if not key:
                key = x.client_ip
        else:
            key = policy.key_of(x)
        allowed, _, _ = policy.limiter(key, 1, policy.clock())
        if allowed:
            policy.allowed_counter.inc()
        return allowed

    def express_apply(self, x: ExpressContext) -> None:
        """Nothing left to do: the check counted."""

    def on_request(self, ctx: FilterContext) -> Decision | Awaitable[Decision]:
        """Ask each policy in order; the first refusal answers."""
        only = self._only
        if only is not None:
            return only.check(ctx)
        for i, policy in enumerate(self.policies):
            decision = policy.check(ctx)
            if decision is None:
                continue
            if isinstance(decision, ProxyError):
                return decision
            return self._rest(decision, ctx, i + 1)
        return None

    async def _rest(self, pending: Awaitable[Decision], ctx: FilterContext, start: int) -> Decision:
        decision = await pending
        if decision is not None:
            return decision
        for policy in self.policies[start:]:
            result = policy.check(ctx)
            if result is not None and not isinstance(result, ProxyError):
                result = await result
            if result is not None:
                return result
        return None


# Policy objects per (config generation, runtime, clock), so routes naming one policy
# share its counters. Keyed by id() with the objects kept in the entry (an id cannot be
# reused while its object is alive); the few most recent generations are kept (old
# gateways keep references to their own filters).
_REGISTRY: OrderedDict[tuple[int, int, int], tuple[object, dict[str, _AnyPolicy]]] = OrderedDict()
_REGISTRY_SIZE: Final = 8


def _policies_for(config: Config, runtime: Runtime, clock: Clock) -> dict[str, _AnyPolicy]:
    key = (id(config), id(runtime), id(clock))
    entry = _REGISTRY.get(key)
    if entry is not None:
        return entry[1]
    policies: dict[str, _AnyPolicy] = {}
    _REGISTRY[key] = ((config, runtime, clock), policies)
    while len(_REGISTRY) > _REGISTRY_SIZE:
        _REGISTRY.popitem(last=False)
    return policies


def build_rate_limit_filter(
    value: tuple[str, ...],
    route: RouteConfig,
    config: Config,
    runtime: Runtime,
    *,
    clock: Clock = time.monotonic,
) -> Filter:
    """The filter for a route's converted ``rate_limit`` value (``FILTER_BUILDERS``).

    ``clock`` (seconds, monotonic) is read once per local decision; tests inject one.
    Redis-backed policies use the Redis server's clock for decisions.
    """
    section: Mapping[str, RateLimitPolicy] = config.sections.get("rate_limits", {})
    runtime.metrics.describe(
        RATELIMIT_TOTAL, "counter", "Rate-limit decisions, by policy and result."
    )
    runtime.metrics.describe(
        REDIS_ERRORS_TOTAL,
        "counter",
        "Rate-limit decisions taken without Redis (unreachable or timed out), by policy.",
    )
    redis_cfg = config.sections.get("redis")
    shared = _policies_for(config, runtime, clock)
    policies: list[_AnyPolicy] = []
    for name in value:
        policy = shared.get(name)
        if policy is None:
            cfg = section[name]
            if cfg.backend == "local":
                policy = _LocalPolicy(cfg, runtime, clock)
            else:
                # validation guarantees [redis] for backend = "redis"
                assert isinstance(redis_cfg, RedisConfig)
                policy = _RedisPolicy(cfg, runtime, clock, redis_cfg)
            shared[name] = policy
        policies.append(policy)
    return RateLimitFilter(policies)
