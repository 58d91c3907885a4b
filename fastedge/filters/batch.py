"""Batch routes: concurrent GETs on a route become one call to the upstream's batch endpoint.

A route with ``batch = { ... }`` collects its GET and HEAD requests (those without a body
or an ``Upgrade``) in a :class:`~fastedge.batching.RequestBatcher`: when ``max_size``
requests wait, or the first has waited ``max_wait``, they go to the upstream as **one**
``POST <path>`` whose JSON array lists every request, and the upstream's JSON array of
answers is fanned back out, each client getting its own answer. The wire format is in
:mod:`fastedge.filters.batch_wire` and ``docs/batching.md``. Other methods pass through
to the upstream untouched, one by one.

Failure is per item where it can be (DESIGN.md §6, house JSON errors):

* the batch call fails (cannot connect, connection reset, invalid HTTP, a non-2xx
  answer, an answer that is not a JSON array): every item of that call gets 502;
* the call exceeds ``timeout``: every item gets 504;
* one entry is missing from the answer or breaks the format: that item alone gets 502;
* ``max_queued`` requests are already accepted and not yet answered: 503 with
  ``Retry-After`` at once (waiting would only add latency to an overloaded route).

Every route has its own batcher and keep-alive client, built with the route's filter
chain (per config generation) and flushed when the chain is closed (reload, shutdown).
Metrics are process-wide: ``fastedge_batch_calls_total``, ``fastedge_batch_items_total``,
``fastedge_batch_size`` (histogram of items per call), ``fastedge_batch_rejected_total``,
``fastedge_batch_failures_total``.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from fastedge.batching import BatcherClosed, BatcherFull, RequestBatcher
from fastedge.config import (
    _INVALID,
    _build,
    _duration,
    _duration_at_least,
    _field,
    _integer,
    _join,
    _Key,
    _read_table,
    _Schema,
    _show,
    _size_between,
    _string,
    _type_name,
)
from fastedge.errors import Kind, ProxyError
from fastedge.filters import Answer, Filter, FilterContext, Headers, Response, Runtime
from fastedge.filters.batch_client import BatchCallError, BatchClient
from fastedge.filters.batch_wire import (
    ItemAnswer,
    WireError,
    decode_answers,
    encode_requests,
    headers_object,
)
from fastedge.http.headers import new_request_id, rewrite_response_headers
from fastedge.observe.metrics import MetricFamily, Metrics, Sample

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig
    from fastedge.gateway import Target, Upstream

__all__ = [
    "BatchFilter",
    "BatchRoute",
    "BatchStats",
    "build_batch_filter",
    "convert_route_batch",
]

log = logging.getLogger("fastedge.batch")

_MIB: Final = 1024 * 1024
_BATCHABLE: Final = frozenset({b"GET", b"HEAD"})
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_RETRY_AFTER: Final = (b"retry-after", b"1")  # the smallest delay-seconds (RFC 9110 §10.2.3)
_DEFAULT_MAX_SIZE: Final = 10


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class BatchRoute:
    """A route's converted ``batch`` value.

    Defaults: ``max_size`` 10 and ``max_wait`` 5 ms (about one proxy hop on a LAN, so
    batching adds at most one hop of latency: the RequestBatcher's own default);
    ``max_queued`` 1000 (100 full batches: deep enough to absorb bursts, small enough
    that a stuck upstream is noticed as 503s within a second or so of traffic);
    ``timeout`` ``None`` = the upstream's ``pool.response_timeout``, what the same GET
    would get unbatched; ``max_answer_size`` 16 MiB (1 MiB, nginx's default
    ``client_max_body_size``, per item of a default-sized batch, with room to spare).
    """

    path: str = "/batch"
    max_size: int = _DEFAULT_MAX_SIZE
    max_wait: float = 0.005
    max_queued: int = 1000
    timeout: float | None = None
    max_answer_size: int = 16 * _MIB


def _batch_path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {_show(text)}")
    if any(c in text for c in " #") or not text.isascii():
        raise ValueError(
            f"must be an origin-form request-target (ASCII, no spaces or '#'), got {_show(text)}"
        )
    return text


def _max_wait(value: object) -> float:
    seconds = _duration(value)
    if seconds > 10.0:  # a "window" of more than seconds is a misconfiguration, not a batch
        raise ValueError(f"must be at most 10s, got {value!r}")
    return seconds


_BATCH_SCHEMA: Final[_Schema] = {
    "path": _Key(_field(_batch_path)),
    "max_size": _Key(_field(_integer(1, 1000))),
    "max_wait": _Key(_field(_max_wait)),
    "max_queued": _Key(_field(_integer(1, 1_000_000))),
    "timeout": _Key(_field(_duration_at_least(0.001, inclusive=True))),
    "max_answer_size": _Key(_field(_size_between(1024, 1024 * _MIB))),
}


def convert_route_batch(ctx: Any, path: str, value: object) -> Any:
    """Converter of the route key ``batch`` (``EXTENSION_ROUTE_KEYS``).

    ``true`` (every default) or a table of :class:`BatchRoute` keys; ``false`` is
    refused (leave the key out instead) so a typo cannot silently disable batching.
    """
    if value is True:
        return BatchRoute()
    if not isinstance(value, Mapping):
        return ctx.error(path, f"expected a table or true, got {_type_name(value)}")
    table = _read_table(ctx, path, value, _BATCH_SCHEMA)
    if table is None:
        return _INVALID
    size = table.values.get("max_size", _DEFAULT_MAX_SIZE)
    queued = table.values.get("max_queued")
    if queued is not None and queued < size:
        # Fewer outstanding requests than a batch holds: batches could never fill.
        ctx.error(_join(path, "max_queued"), f"must be at least max_size ({size}), got {queued}")
        return _INVALID
    return _build(table, BatchRoute)


# --------------------------------------------------------------------------- metrics


class BatchStats:
    """Process-wide batch counters, rendered by a metrics collector at scrape time."""

    SIZE_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
    """Upper bounds of ``fastedge_batch_size`` (items per call; ``max_size`` ≤ 1000)."""

    def __init__(self, metrics: Metrics) -> None:
        self.calls: dict[str, int] = {}
        self.items: dict[str, int] = {}
        # route -> [count per bucket ..., count above the last bound, sum]
        self.sizes: dict[str, list[int]] = {}
        self.rejected: dict[tuple[str, str], int] = {}
        self.failures: dict[tuple[str, str], int] = {}
        metrics.add_collector(self.collect)

    def call(self, route: str, size: int) -> None:
        """One batch call with ``size`` items was started."""
        self.calls[route] = self.calls.get(route, 0) + 1
        self.items[route] = self.items.get(route, 0) + size
        hist = self.sizes.get(route)
        if hist is None:
            hist = self.sizes[route] = [0] * (len(self.SIZE_BUCKETS) + 2)
        hist[bisect_left(self.SIZE_BUCKETS, size)] += 1
        hist[-1] += size

    def reject(self, route: str, reason: str) -> None:
        """A request was refused before joining a batch (``queue_full``, ``closed``)."""
        key = (route, reason)
        self.rejected[key] = self.rejected.get(key, 0) + 1

    def fail(self, route: str, reason: str) -> None:
        """A batch call failed as a whole (``timeout``, ``connect``, ``status``, ...)."""
        key = (route, reason)
        self.failures[key] = self.failures.get(key, 0) + 1

    def collect(self) -> list[MetricFamily]:
        """The batch metric families (a :meth:`Metrics.add_collector` callback)."""
        size_samples: list[Sample] = []
        bounds = [str(b) for b in self.SIZE_BUCKETS] + ["+Inf"]
        for route in sorted(self.sizes):
            hist = self.sizes[route]
            cumulative = 0
            for bound, count in zip(bounds, hist[:-1], strict=True):
                cumulative += count
                size_samples.append(
                    ("fastedge_batch_size_bucket", (("route", route), ("le", bound)), cumulative)
                )
            size_samples.append(("fastedge_batch_size_sum", (("route", route),), hist[-1]))
            size_samples.append(("fastedge_batch_size_count", (("route", route),), cumulative))
        return [
            MetricFamily(
                "fastedge_batch_calls_total",
                "counter",
                "Batch calls made to upstream batch endpoints, by route.",
                [
                    ("fastedge_batch_calls_total", (("route", r),), n)
                    for r, n in sorted(self.calls.items())
                ],
            ),
            MetricFamily(
                "fastedge_batch_items_total",
                "counter",
                "Requests sent inside batch calls, by route.",
                [
                    ("fastedge_batch_items_total", (("route", r),), n)
                    for r, n in sorted(self.items.items())
                ],
            ),
            MetricFamily(
                "fastedge_batch_size",
                "histogram",
                "Requests per batch call, by route.",
                size_samples,
            ),
            MetricFamily(
                "fastedge_batch_rejected_total",
                "counter",
                "Requests refused by a batch route (queue_full: 503, closed: shutting down).",
                [
                    ("fastedge_batch_rejected_total", (("route", r), ("reason", why)), n)
                    for (r, why), n in sorted(self.rejected.items())
                ],
            ),
            MetricFamily(
                "fastedge_batch_failures_total",
                "counter",
                "Batch calls that failed as a whole, by route and reason.",
                [
                    ("fastedge_batch_failures_total", (("route", r), ("reason", why)), n)
                    for (r, why), n in sorted(self.failures.items())
                ],
            ),
        ]


# --------------------------------------------------------------------------- the filter


class _Item:
    """One request waiting in a batch: what goes on the wire and who gets the answer."""

    __slots__ = ("headers", "method", "request_id", "span", "target", "upstream")

    def __init__(self, ctx: FilterContext) -> None:
        upstream: Upstream = ctx.upstream
        self.method = ctx.method
        self.target = ctx.target or (ctx.path + ctx.query)
        fields = ctx.upstream_headers
        if upstream.host_header is not None:
            # A filter may have redirected the request (ctx.upstream); its Host rule wins,
            # as it does for a forwarded request.
            fields = [(n, v) for n, v in fields if n != b"host"]
            fields.append((b"host", upstream.host_header))
        # Taken now, after auth and the other filters edited the forwarded fields: the
        # claims headers of *this* request travel with this item only.
        self.headers = headers_object(fields)
        self.upstream = upstream
        self.request_id = ctx.request_id
        self.span = ctx.span


Outcome = Response | ProxyError


class BatchFilter:
    """The ``batch`` filter of one route (see the module docstring)."""

    __slots__ = ("batcher", "cfg", "client", "name", "route", "stats", "via")

    def __init__(self, cfg: BatchRoute, route: str, via: bytes, stats: BatchStats) -> None:
        self.name = "batch"
        self.cfg = cfg
        self.route = route
        self.via = via
        self.stats = stats
        self.client = BatchClient(max_answer_bytes=cfg.max_answer_size)
        self.batcher: RequestBatcher[_Item, Response] = RequestBatcher(
            self._handle,
            max_batch=cfg.max_size,
            max_wait=cfg.max_wait,
            max_queued=cfg.max_queued,
            on_full="error",
        )

    def on_request(self, ctx: FilterContext) -> Answer | Awaitable[Answer]:
        """Batch a GET/HEAD without a body; let everything else through (``None``)."""
        if ctx.method not in _BATCHABLE or ctx.upstream is None:
            return None
        for name, value in ctx.headers:
            if name == b"transfer-encoding" or name == b"upgrade":
                return None  # a body follows, or a protocol switch: not batchable
            if name == b"content-length" and value.strip() != b"0":
                return None
        return self._submit(_Item(ctx))

    async def _submit(self, item: _Item) -> Answer:
        try:
            return await self.batcher.submit(item)
        except ProxyError as err:
            return err
        except BatcherFull:
            self.stats.reject(self.route, "queue_full")
            return ProxyError(
                Kind.UNAVAILABLE,
                "batch",
                detail=(
                    f"batch route {self.route!r} is at capacity: "
                    f"{self.cfg.max_queued} requests are already waiting (max_queued)"
                ),
                headers=[_RETRY_AFTER],
            )
        except BatcherClosed:
            self.stats.reject(self.route, "closed")
            return ProxyError(
                Kind.UNAVAILABLE,
                "batch",
                detail=f"batch route {self.route!r} is shutting down",
                headers=[_RETRY_AFTER],
            )

    def begin_drain(self) -> None:
        """The server is shutting down: send waiting requests now, not after
        ``max_wait`` (which may be longer than the drain timeout)."""
        self.batcher.hurry()

    async def aclose(self) -> None:
        """Send what is queued, wait for the calls in flight, close idle connections."""
        await self.batcher.aclose()
        await self.client.aclose()

    # -- one batch --------------------------------------------------------------------

    async def _handle(self, items: list[_Item]) -> list[Response | BaseException]:
        """The batcher's handler: one call per upstream among ``items`` (a filter may
        have sent some requests elsewhere), all concurrently; one outcome per item."""
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.upstream), []).append(i)
        outcomes: list[Response | BaseException] = [_internal()] * len(items)
        calls = [
            self._call(items[idx[0]].upstream, [items[i] for i in idx]) for idx in groups.values()
        ]
        for idx, results in zip(groups.values(), await asyncio.gather(*calls), strict=True):
            for i, result in zip(idx, results, strict=True):
                outcomes[i] = result
        return outcomes

    async def _call(self, upstream: Upstream, items: list[_Item], depth: int = 0) -> list[Outcome]:
        """One batch call to ``upstream`` for ``items``; never raises."""
        try:
            return await self._call_unguarded(upstream, items, depth)
        except Exception:
            # A bug here must fail this batch's items, never the batcher.
            log.exception("batch call on route %r failed", self.route)
            return [_internal() for _ in items]

    async def _call_unguarded(
        self, upstream: Upstream, items: list[_Item], depth: int
    ) -> list[Outcome]:
        n = len(items)
        ids = [str(i) for i in range(n)]
        body = encode_requests(
            [(ids[i], it.method, it.target, it.headers) for i, it in enumerate(items)]
        )
        batch_id = new_request_id()
        headers: Headers = [
            (b"content-type", b"application/json"),
            (b"accept", b"application/json"),
            (b"x-request-id", batch_id),
            (b"via", self.via),
        ]
        if upstream.host_header is not None:
            headers.append((b"host", upstream.host_header))
        timeout = self.cfg.timeout if self.cfg.timeout is not None else upstream.response_timeout
        path = self.cfg.path.encode("ascii")
        self.stats.call(self.route, n)
        try:
            sent = await self._post(upstream, path, headers, body, timeout)
        except TimeoutError:
            self.stats.fail(self.route, "timeout")
            return [
                ProxyError(
                    Kind.UPSTREAM_TIMEOUT,
                    "upstream",
                    detail=f"batch call to upstream {upstream.name!r} timed out after {timeout:g}s",
                )
                for _ in items
            ]
        except BatchCallError as exc:
            self.stats.fail(self.route, exc.reason)
            kind = Kind.UPSTREAM_UNREACHABLE if exc.connect else Kind.UPSTREAM_BAD_RESPONSE
            return [_bad(f"batch call failed: {exc.detail}", kind) for _ in items]
        if isinstance(sent, _NoTarget):
            return await self._unavailable(upstream, items, depth)
        status, _, answer, target = sent
        self._annotate(items, batch_id, target)
        if not 200 <= status <= 299:
            self.stats.fail(self.route, "status")
            return [_bad(f"batch endpoint answered {status}") for _ in items]
        try:
            answers = decode_answers(answer, ids)
        except WireError as exc:
            self.stats.fail(self.route, "malformed")
            return [_bad(f"malformed batch answer: {exc}") for _ in items]
        out: list[Outcome] = []
        for item_id, item in zip(ids, items, strict=True):
            got = answers.get(item_id)
            if got is None:
                out.append(_bad(f"request is missing from the batch answer (id {item_id!r})"))
            elif isinstance(got, WireError):
                out.append(_bad(f"malformed batch answer: {got}"))
            else:
                out.append(self._response(item, got))
        return out

    async def _post(
        self, upstream: Upstream, path: bytes, headers: Headers, body: bytes, timeout: float
    ) -> tuple[int, Headers, bytes, Target] | _NoTarget:
        """POST the batch to the upstream's targets in the balancer's order: a target that
        cannot be connected to is skipped (nothing was sent), anything else is final.
        Raises ``TimeoutError`` after ``timeout`` seconds in all."""
        # With consistent hashing every batch of the route hashes on the batch path, so
        # the route's batches stay on one target while it is available.
        candidates = upstream.candidates(path if upstream.keyed else None)
        deadline = asyncio.get_running_loop().time() + timeout
        last: BatchCallError | None = None
        for target in candidates:
            gen = 0
            if upstream.resilient:
                admitted = upstream.admit(target)
                if admitted is None:
                    continue  # its breaker refuses: next target
                gen = admitted
            if upstream.load_aware:
                upstream.balancer.acquire(target)
            try:
                async with asyncio.timeout_at(deadline):
                    status, resp_headers, answer = await self.client.post(
                        target, path, headers, body
                    )
            except TimeoutError:
                self._report(upstream, target, gen, False, timeout=True)
                raise
            except BatchCallError as exc:
                self._report(upstream, target, gen, False, connect_error=exc.connect)
                if not exc.connect:
                    raise
                last = exc
                continue
            except BaseException:
                if upstream.resilient:
                    upstream.abandon(target, gen)
                raise
            finally:
                if upstream.load_aware:
                    upstream.balancer.release(target)
            self._report(upstream, target, gen, status < 500, status=status)
            return status, resp_headers, answer, target
        if last is not None:
            raise last
        return _NoTarget()

    @staticmethod
    def _report(
        upstream: Upstream,
        target: Target,
        gen: int,
        ok: bool,
        *,
        status: int = 0,
        connect_error: bool = False,
        timeout: bool = False,
    ) -> None:
        if upstream.resilient:
            upstream.report(
                target, gen, ok, status=status, connect_error=connect_error, timeout=timeout
            )

    async def _unavailable(
        self, upstream: Upstream, items: list[_Item], depth: int
    ) -> list[Outcome]:
        """No target is available: the upstream's own answer (503, a static response,
        or a fallback upstream, followed once)."""
        self.stats.fail(self.route, "unavailable")
        answer = upstream.unavailable()
        if isinstance(answer, ProxyError):
            return [
                ProxyError(answer.kind, answer.source, detail=answer.detail, headers=answer.headers)
                for _ in items
            ]
        if isinstance(answer, Response):
            return [
                Response(answer.status, list(answer.headers), answer.body, answer.reason)
                for _ in items
            ]
        if depth == 0:
            return await self._call(answer, items, depth + 1)
        return [
            ProxyError(
                Kind.UNAVAILABLE,
                "upstream",
                detail=f"no available target in upstream {upstream.name!r}",
                headers=[_RETRY_AFTER],
            )
            for _ in items
        ]

    def _response(self, item: _Item, got: ItemAnswer) -> Response:
        head = item.method == b"HEAD"
        headers = rewrite_response_headers(
            got.headers,
            via=self.via,
            request_id=item.request_id,
            # A HEAD answer's Content-Length describes the GET body (RFC 9110 §9.3.2);
            # for anything else the proxy frames the body it actually sends.
            keep_length=head,
        )
        body = b"" if head or got.status in _NO_BODY_STATUSES else got.body
        return Response(got.status, headers, body)

    def _annotate(self, items: list[_Item], batch_id: bytes, target: Target) -> None:
        """Record on each traced request which batch call served it."""
        size = len(items)
        for item in items:
            span = item.span
            if span is not None and span.recording:
                span.set_attribute("fastedge.batch.id", batch_id.decode())
                span.set_attribute("fastedge.batch.size", size)
                span.set_attribute("fastedge.upstream.target", target.name)


class _NoTarget:
    """Marker: the upstream had no available target for the call."""

    __slots__ = ()


def _bad(detail: str, kind: Kind = Kind.UPSTREAM_BAD_RESPONSE) -> ProxyError:
    return ProxyError(kind, "upstream", detail=detail)


def _internal() -> ProxyError:
    return ProxyError(Kind.INTERNAL, "batch", detail="internal error")


def build_batch_filter(
    value: BatchRoute, route: RouteConfig, config: Config, runtime: Runtime
) -> Filter:
    """The filter for a route's converted ``batch`` value (``FILTER_BUILDERS``)."""
    stats: BatchStats = runtime.service("batch.stats", lambda: BatchStats(runtime.metrics))
    via = b"1.1 " + config.server.proxy_name.encode()
    return BatchFilter(value, route.name or route.prefix, via, stats)
