"""Per-route policy filters (auth, rate limits, ...): the request and response phases.

The proxy's phase order (DESIGN.md §2, Envoy's filter chain simplified): ``on_request``
for each filter in :data:`FILTER_ORDER` → forward → ``on_response`` for each filter. A
filter implements only the phases it needs:

* ``on_request(ctx)`` returns ``None`` to continue or a :class:`~fastedge.errors.ProxyError`
  to answer now (401, 403, 429 ... with its headers: ``WWW-Authenticate``,
  ``Retry-After``); it may instead return an awaitable of either (a Redis round trip, a
  JWKS refresh). Synchronous answers keep the request on the proxy's fast callback path;
  only an awaitable costs a task.
* ``on_response(ctx, status, headers)`` may append response headers (``RateLimit``).

Chains are built once per config load (``build_route_filters``): a route without policies
has no chain at all, so a disabled feature costs nothing per request.

Feature modules plug in through :data:`FILTER_BUILDERS` (route key → ``"module:function"``
building a filter from the converted route value) next to their config converters in
``fastedge.config.EXTENSION_SECTIONS`` / ``EXTENSION_ROUTE_KEYS``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from fastedge.errors import ProxyError

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig
    from fastedge.observe.metrics import Metrics

Headers: TypeAlias = list[tuple[bytes, bytes]]
Decision: TypeAlias = ProxyError | None

# Phase order across features: who the caller is comes before how often they may call.
FILTER_ORDER: tuple[str, ...] = ("auth", "rate_limit")

# Route key -> "module:function" with the signature of FilterBuilder.
FILTER_BUILDERS: dict[str, str] = {
    "auth": "fastedge.filters.auth:build_auth_filter",
    "rate_limit": "fastedge.filters.ratelimit:build_rate_limit_filter",
}


class FilterContext:
    """What filters see and change for one request."""

    __slots__ = (
        "claims",
        "client_ip",
        "headers",
        "host",
        "method",
        "path",
        "query",
        "request_id",
        "response_headers",
        "route",
        "state",
        "upstream_headers",
        "user",
    )

    def __init__(
        self,
        *,
        method: bytes,
        path: bytes,
        query: bytes,
        host: bytes,
        client_ip: bytes,
        headers: Headers,
        upstream_headers: Headers,
        route: str,
        request_id: bytes,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self.client_ip = client_ip
        self.headers = headers  # the client's fields as received (lower-case names)
        self.upstream_headers = upstream_headers  # what will be forwarded; filters edit it
        self.route = route
        self.request_id = request_id
        self.user: str | None = None  # set by auth: the verified subject
        self.claims: dict[str, Any] | None = None  # set by auth: verified JWT claims
        self.response_headers: Headers = []  # appended to the final response
        self.state: dict[str, Any] = {}  # per-request scratch space shared by filters

    def header(self, name: bytes) -> bytes | None:
        """The client's first field named ``name`` (lower-case), or ``None``."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def set_upstream_header(self, name: bytes, value: bytes) -> None:
        """Replace (or add) a field on the forwarded request."""
        self.remove_upstream_header(name)
        self.upstream_headers.append((name, value))

    def remove_upstream_header(self, name: bytes) -> None:
        """Drop every field named ``name`` from the forwarded request."""
        self.upstream_headers[:] = [(n, v) for n, v in self.upstream_headers if n != name]


class Filter(Protocol):
    """A policy step; see the module docstring for the phases."""

    name: str

    def on_request(self, ctx: FilterContext) -> Decision | Awaitable[Decision]:
        """Continue (``None``), answer now (a ``ProxyError``), or either, later."""


@dataclass(slots=True)
class Runtime:
    """Process-wide services filters may use; outlives config reloads."""

    metrics: Metrics
    redis_url: str | None = None
    redis_timeout: float = 0.25  # [redis] timeout; see fastedge.redis_config
    _redis: Any = field(default=None, repr=False)

    def redis(self) -> Any:
        """A shared ``redis.asyncio.Redis`` client (created on first use), or ``None``."""
        if self.redis_url is None:
            return None
        if self._redis is None:
            import redis.asyncio as aioredis

            # Bounded connects and commands: a Redis outage must never hang a request.
            self._redis = aioredis.Redis.from_url(
                self.redis_url,
                socket_timeout=self.redis_timeout,
                socket_connect_timeout=self.redis_timeout,
            )
        return self._redis

    async def close(self) -> None:
        """Close shared clients."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


FilterBuilder: TypeAlias = Callable[[Any, "RouteConfig", "Config", Runtime], Filter]


class FilterChain:
    """The filters of one route, in phase order."""

    __slots__ = ("filters", "response_filters")

    def __init__(self, filters: list[Filter]) -> None:
        self.filters = tuple(filters)
        self.response_filters = tuple(f for f in filters if hasattr(f, "on_response"))

    def run_request(self, ctx: FilterContext) -> Decision | Awaitable[Decision]:
        """Run ``on_request`` in order; synchronous until a filter needs to wait."""
        filters = self.filters
        for i, f in enumerate(filters):
            decision = f.on_request(ctx)
            if decision is None:
                continue
            if inspect.isawaitable(decision):
                return self._finish_async(decision, ctx, i + 1)
            return decision
        return None

    async def _finish_async(
        self, pending: Awaitable[Decision], ctx: FilterContext, start: int
    ) -> Decision:
        decision = await pending
        if decision is not None:
            return decision
        for f in self.filters[start:]:
            result = f.on_request(ctx)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def aclose(self) -> None:
        """Release what filters hold (background JWKS fetches, ...)."""
        for f in self.filters:
            close = getattr(f, "aclose", None)
            if close is not None:
                await close()

    def run_response(self, ctx: FilterContext, status: int, headers: Headers) -> None:
        """Let filters append to the response headers (``headers`` is edited in place)."""
        for f in self.response_filters:
            f.on_response(ctx, status, headers)
        if ctx.response_headers:
            headers.extend(ctx.response_headers)


def build_route_filters(route: RouteConfig, config: Config, runtime: Runtime) -> FilterChain | None:
    """The chain for ``route`` from its policy keys, or ``None`` when it has none."""
    if not route.policies:
        return None
    filters: list[Filter] = []
    for key in sorted(route.policies, key=_phase_rank):
        spec = FILTER_BUILDERS.get(key)
        if spec is None:
            raise ValueError(f"no filter builder for route key {key!r}")
        module, _, name = spec.partition(":")
        builder: FilterBuilder = getattr(importlib.import_module(module), name)
        filters.append(builder(route.policies[key], route, config, runtime))
    return FilterChain(filters)


def _phase_rank(key: str) -> int:
    try:
        return FILTER_ORDER.index(key)
    except ValueError:
        return len(FILTER_ORDER)
