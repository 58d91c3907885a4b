"""Per-route policy filters (auth, rate limits, ...): the request and response phases.

The proxy's phase order (DESIGN.md §2, Envoy's filter chain simplified): ``on_request``
for each filter in :data:`FILTER_ORDER` → forward → ``on_response`` for each filter. A
filter implements only the phases it needs:

* ``on_request(ctx)`` returns ``None`` to continue or a :class:`~fastedge.errors.ProxyError`
  to answer now (401, 403, 429 ... with its headers: ``WWW-Authenticate``,
  ``Retry-After``); it may instead return an awaitable of either (a Redis round trip, a
  JWKS refresh). Synchronous answers keep the request on the proxy's fast callback path;
  only an awaitable costs a task.
  A filter may also answer with a :class:`Response` (a cache hit, a batched answer),
  or an awaitable of one.
* ``on_response(ctx, status, headers)`` may append response headers (``RateLimit``), or
  return a :class:`Response` that *replaces* the upstream's (a cache turning a 304 into
  the stored answer, or a 5xx into a stale one); the proxy then drops the upstream
  connection and sends the replacement.
* ``on_response_body(ctx, chunk)``, ``on_response_end(ctx)``, ``on_response_abort(ctx)``
  see the upstream's body as it streams to the client (a cache fill); they run only for
  chains that have such a filter. ``abort`` means the response did not complete; it is
  also called on the filters *before* one that answered the request itself (a refusal,
  a batched answer), since the upstream response they prepared for will not come.
* ``on_error(ctx, err)`` may return a :class:`Response` to send instead of the error
  answer for an upstream failure (stale-if-error), as long as nothing was sent yet.

Filters that must talk to the upstream themselves (background revalidation, batch
calls) find the route's upstream in ``ctx.upstream`` and every upstream of this config
generation in ``ctx.upstreams``. A filter that sets ``ctx.upstream`` to another
upstream (blue-green, canary) redirects the request there; later filters see the choice.

Chains are built once per config load (``build_route_filters``): a route without policies
has no chain at all, so a disabled feature costs nothing per request.

Feature modules plug in through :data:`FILTER_BUILDERS` (route key → ``"module:function"``
building a filter from the converted route value) next to their config converters in
``fastedge.config.EXTENSION_SECTIONS`` / ``EXTENSION_ROUTE_KEYS``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from fastedge.errors import ProxyError
from fastedge.filters.express import ExpressContext, ExpressPolicy, admit

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig
    from fastedge.observe.metrics import Metrics

_log = logging.getLogger("fastedge.filters")

Headers: TypeAlias = list[tuple[bytes, bytes]]


class Response:
    """A complete answer produced by a filter instead of the upstream's.

    ``headers`` are end-to-end fields (lower-case names); the proxy adds framing
    (``content-length`` when absent), ``x-request-id`` and ``ctx.response_headers``.
    ``body`` is sent as given (nothing for HEAD, 204 and 304).
    """

    __slots__ = ("body", "headers", "reason", "status")

    def __init__(
        self, status: int, headers: Headers, body: bytes = b"", reason: bytes = b""
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.reason = reason


Decision: TypeAlias = ProxyError | None
"""What a policy filter (auth, limits) decides: continue, or refuse with an error."""
Answer: TypeAlias = ProxyError | Response | None
"""What any filter may return from ``on_request``: a decision or a whole response."""

# Phase order across features: who the caller is comes before how often they may call;
# then where the request goes (traffic splits and flags), then whether it needs to go at
# all (cache), then how it goes (batching).
FILTER_ORDER: tuple[str, ...] = ("auth", "rate_limit", "traffic", "flags", "cache", "batch")

# Route key -> "module:function" with the signature of FilterBuilder.
FILTER_BUILDERS: dict[str, str] = {
    "auth": "fastedge.filters.auth:build_auth_filter",
    "rate_limit": "fastedge.filters.ratelimit:build_rate_limit_filter",
    "traffic": "fastedge.filters.traffic:build_traffic_filter",
    "flags": "fastedge.filters.traffic:build_flags_filter",
    "cache": "fastedge.filters.cache:build_cache_filter",
    "batch": "fastedge.filters.batch:build_batch_filter",
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
        "scheme",
        "span",
        "state",
        "target",
        "upstream",
        "upstream_headers",
        "upstreams",
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
        scheme: bytes = b"http",
        target: bytes = b"",
        upstream: Any = None,
        upstreams: Mapping[str, Any] | None = None,
        span: Any = None,
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
        self.scheme = scheme  # how the client reached us: b"http" or b"https"
        self.target = target  # the request-target sent upstream (path and query)
        # fastedge.gateway.Upstream: where the request goes; a filter may replace it.
        self.upstream = upstream
        self.upstreams: Mapping[str, Any] = upstreams or {}  # by name, this generation
        self.span = span  # the request's tracing span (None when not traced)

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

    def on_request(self, ctx: FilterContext) -> Answer | Awaitable[Answer]:
        """Continue (``None``), answer now (a ``ProxyError``), or either, later."""


@dataclass(slots=True)
class Runtime:
    """Process-wide services filters may use; outlives config reloads."""

    metrics: Metrics
    redis_url: str | None = None
    redis_timeout: float = 0.25  # [redis] timeout; see fastedge.redis_config
    _redis: Any = field(default=None, repr=False)
    # Process-wide feature state that must survive reloads (cache stores, traffic
    # splits), by name; see service().
    services: dict[str, Any] = field(default_factory=dict, repr=False)

    def service(self, name: str, factory: Callable[[], Any]) -> Any:
        """The process-wide object ``name``, made by ``factory()`` on first use.

        Objects with an ``async aclose()`` are closed by :meth:`close`.
        """
        obj = self.services.get(name)
        if obj is None:
            obj = self.services[name] = factory()
        return obj

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
        """Close feature services, then shared clients."""
        for name, obj in list(self.services.items()):
            close = getattr(obj, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    _log.exception("closing service %s failed", name)
        self.services.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


FilterBuilder: TypeAlias = Callable[[Any, "RouteConfig", "Config", Runtime], Filter]


ExpressReply: TypeAlias = tuple[int, bytes, bytes]
"""A filter's whole answer on the express lane, already serialised: ``(status, head,
body)``. ``head`` is the status line and every field the general path would send before
``X-Request-Id`` (the proxy appends that, ``Connection: close`` when closing, the blank
line and ``body``, which it leaves out for HEAD, 204 and 304). A plain tuple: it is made
for every answer."""


class ExpressAnswer(Protocol):
    """``filter.express_answer(request, scheme, upstream)``: the whole answer to a plain
    GET/HEAD from memory, or ``None``.

    Called by the proxy's express lane for a route whose only filter has it, before the
    general path builds anything; ``request`` is the scanned
    :class:`fastedge._core.ExpressRequest` (``method``, ``host``, ``path``, ``query``,
    ``headers()``, ``cache_sensitive``). ``None`` must leave no trace (nothing counted,
    nothing started): the general path then runs the filter's ``on_request`` as usual.
    A reply must be byte for byte what ``on_request`` would have answered, with the same
    side effects (its counters), so that the two paths cannot be told apart.
    """

    def __call__(self, request: Any, scheme: bytes, upstream: Any) -> ExpressReply | None: ...


class FilterChain:
    """The filters of one route, in phase order."""

    __slots__ = (
        "abort_filters",
        "body_filters",
        "end_filters",
        "error_filters",
        "express",
        "express_admit",
        "filters",
        "response_filters",
        "streams_body",
    )

    def __init__(self, filters: list[Filter]) -> None:
        self.filters = tuple(filters)
        self.response_filters = tuple(f for f in filters if hasattr(f, "on_response"))
        self.body_filters = tuple(f for f in filters if hasattr(f, "on_response_body"))
        self.end_filters = tuple(f for f in filters if hasattr(f, "on_response_end"))
        self.abort_filters = tuple(f for f in filters if hasattr(f, "on_response_abort"))
        self.error_filters = tuple(f for f in filters if hasattr(f, "on_error"))
        # Whether the proxy must call the body hooks at all (one test per response).
        self.streams_body = bool(self.body_filters or self.end_filters or self.abort_filters)
        # The proxy's express lane may ask a lone filter that answers from memory (a
        # cache hit) before building anything for the general path: see ExpressAnswer.
        self.express: ExpressAnswer | None = None
        if len(filters) == 1:
            self.express = getattr(filters[0], "express_answer", None)
        # Policy filters the express lane may run itself (ExpressPolicy): only when every
        # filter can, only request-phase ones, and a consuming check only last.
        # ``express_admit(request, client_ip, route)``: the decisions or None (see
        # fastedge.filters.express.admit).
        self.express_admit: Callable[[Any, bytes, str], ExpressContext | None] | None = None
        if (
            filters
            and all(getattr(f, "express_ready", False) for f in filters)
            and not any(getattr(f, "express_consumes", False) for f in filters[:-1])
            and not (self.response_filters or self.streams_body or self.error_filters)
        ):
            self.express_admit = partial(admit, cast("tuple[ExpressPolicy, ...]", self.filters))

    def run_request(self, ctx: FilterContext) -> Answer | Awaitable[Answer]:
        """Run ``on_request`` in order; synchronous until a filter needs to wait."""
        span = ctx.span
        if span is not None and span.recording:
            # Child spans only for sampled requests: an unsampled one (most, at a low
            # sampling ratio) would build and discard a span object per filter.
            return self._run_traced(ctx)
        filters = self.filters
        for i, f in enumerate(filters):
            decision = f.on_request(ctx)
            if decision is None:
                continue
            if inspect.isawaitable(decision):
                return self._finish_async(decision, ctx, i + 1)
            if i and self.abort_filters:
                self._abort_before(ctx, i)
            return decision
        return None

    def _run_traced(self, ctx: FilterContext) -> Answer | Awaitable[Answer]:
        """``run_request`` with a child span per filter (OTel: one span per operation)."""
        span = ctx.span
        for i, f in enumerate(self.filters):
            child = span.child(f"fastedge.{f.name}")
            try:
                decision = f.on_request(ctx)
            except BaseException:
                child.end_error("filter raised")
                raise
            # None (pass on) is the common answer: no awaitable check for it.
            if decision is not None and inspect.isawaitable(decision):
                return self._finish_async(decision, ctx, i + 1, child)
            _end_filter_span(child, decision)
            if decision is not None:
                if i and self.abort_filters:
                    self._abort_before(ctx, i)
                return decision
        return None

    async def _finish_async(
        self, pending: Awaitable[Answer], ctx: FilterContext, start: int, child: Any = None
    ) -> Answer:
        try:
            decision = await pending
        except BaseException:
            if child is not None:
                child.end_error("filter raised")
            raise
        if child is not None:
            _end_filter_span(child, decision)
        if decision is not None:
            if start > 1 and self.abort_filters:
                self._abort_before(ctx, start - 1)
            return decision
        span = ctx.span
        for i, f in enumerate(self.filters[start:], start):
            child = (
                span.child(f"fastedge.{f.name}") if span is not None and span.recording else None
            )
            try:
                result = f.on_request(ctx)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException:
                if child is not None:
                    child.end_error("filter raised")
                raise
            if child is not None:
                _end_filter_span(child, result)
            if result is not None:
                if self.abort_filters:
                    self._abort_before(ctx, i)
                return result
        return None

    def _abort_before(self, ctx: FilterContext, i: int) -> None:
        """Filter ``i`` answered the request itself (a batched answer, a refusal): the
        upstream response that filters before it prepared for will not come, so they
        get ``on_response_abort`` (a cache leading a fill lets its followers go)."""
        for f in self.filters[:i]:
            if f in self.abort_filters:
                try:
                    f.on_response_abort(ctx)  # type: ignore[attr-defined]
                except Exception:  # cleanup must not turn an answer into a 500
                    _log.exception("on_response_abort of %s failed", f.name)

    def begin_drain(self) -> None:
        """The server stopped accepting: filters holding requests back (a batch window)
        let them go now, so they finish within the drain timeout."""
        for f in self.filters:
            drain = getattr(f, "begin_drain", None)
            if drain is not None:
                drain()

    async def aclose(self) -> None:
        """Release what filters hold (background JWKS fetches, ...)."""
        for f in self.filters:
            close = getattr(f, "aclose", None)
            if close is not None:
                await close()

    def run_response(self, ctx: FilterContext, status: int, headers: Headers) -> Response | None:
        """Let filters append to the response headers (``headers`` is edited in place),
        or replace the response: the first :class:`Response` returned wins."""
        replacement: Response | None = None
        for f in self.response_filters:
            result = f.on_response(ctx, status, headers)
            if result is not None and replacement is None:
                replacement = result
                break
        if replacement is not None:
            return replacement  # the proxy's respond() adds ctx.response_headers
        if ctx.response_headers:
            headers.extend(ctx.response_headers)
        return None

    def response_body(self, ctx: FilterContext, chunk: bytes) -> None:
        """A body chunk of the upstream's response, as forwarded to the client."""
        for f in self.body_filters:
            f.on_response_body(ctx, chunk)

    def response_end(self, ctx: FilterContext) -> None:
        """The upstream's response ended completely."""
        for f in self.end_filters:
            f.on_response_end(ctx)

    def response_abort(self, ctx: FilterContext) -> None:
        """The response did not complete (upstream failure, client gone, timeout)."""
        for f in self.abort_filters:
            try:
                f.on_response_abort(ctx)
            except Exception:  # cleanup must not break the proxy's own cleanup
                _log.exception("on_response_abort of %s failed", f.name)

    def run_error(self, ctx: FilterContext, err: ProxyError) -> Response | None:
        """A replacement for an upstream failure's error answer, or ``None``."""
        for f in self.error_filters:
            result: Response | None = f.on_error(ctx, err)
            if result is not None:
                return result  # the proxy's respond() adds ctx.response_headers
        return None


def _end_filter_span(child: Any, decision: object) -> None:
    if isinstance(decision, ProxyError):
        child.set_attribute("http.response.status_code", decision.status)
        child.end_error(decision.detail or decision.kind.value)
    else:
        if isinstance(decision, Response):
            child.set_attribute("fastedge.answered", True)
        child.end()


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
