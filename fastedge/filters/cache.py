"""The ``cache`` filter: an RFC 9111 shared cache in front of a route's upstream.

Configuration: ``[caches.NAME]`` sections (size bounds, route policy, coalescing; see
:class:`CacheSettings` and docs/cache-and-state.md) and a route key ``cache = "NAME"``.
Routes naming one cache share its storage (:mod:`fastedge.cache.edge`), which lives as
long as the process: a reload keeps what is stored.

What one request goes through (the decisions are :mod:`fastedge.cache.policy`'s):

* **GET/HEAD** — look up the stored variant (URL + the request fields its ``Vary``
  names) and :func:`~fastedge.cache.policy.decide`:

  - fresh (or within the client's ``max-stale``) → answered from storage, with ``Age``;
    a client conditional that matches → 304;
  - within ``stale-while-revalidate`` → answered stale at once, and one background
    refresh per key (:mod:`fastedge.cache.fetch`, through the upstream's balancer);
  - otherwise forwarded. A stale entry's validators go along (``If-None-Match`` /
    ``If-Modified-Since``); a 304 is merged into the stored headers and the client gets
    the stored response (or a 304 when its own conditional matches). A miss waits
    behind one leader per URL (request coalescing, bounded by ``coalesce_wait``);
    with ``[redis]`` the leader also coordinates with other instances
    (:mod:`fastedge.cache.shared`).
  - ``only-if-cached`` and nothing usable → 504.

* **The response** — storable (RFC 9111 §3; a route ``override`` replaces the
  upstream's freshness directives) → stored while it streams to the client; beyond
  ``max_object_size`` the fill is dropped and the response passes through. Within
  ``stale-if-error``, an error status or an unreachable upstream → the stale response.

* **Unsafe methods** — a 2xx/3xx invalidates the URL and same-origin ``Location`` /
  ``Content-Location`` (RFC 9111 §4.4).

Every answer on a cached route carries ``Cache-Status`` (RFC 9211); every answer from
storage carries ``Age`` (RFC 9111 §5.1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from fastedge.cache.control import (
    KNOWN_DIRECTIVES,
    CacheControl,
    parse_cache_control,
    parse_http_date,
)
from fastedge.cache.edge import SERVICE, EdgeCache, EdgeCaches
from fastedge.cache.fetch import FetchError, fetch
from fastedge.cache.policy import (
    SAFE_METHODS,
    Decision,
    Fresh,
    Miss,
    StaleIfError,
    StaleWhileRevalidate,
    cache_status,
    current_age,
    decide,
    entry_age,
    field_values,
    freshness_lifetime,
    invalidate_on_unsafe,
    is_storable,
    keep_for,
    merge_304,
    primary_key,
    revalidation_headers,
    route_cache_control,
    storable_headers,
)
from fastedge.cache.shared import SharedFills
from fastedge.cache.store import Entry, Filler
from fastedge.config import (
    _INVALID,
    _boolean,
    _build,
    _choice,
    _Context,
    _did_you_mean,
    _duration_at_least,
    _field,
    _join,
    _Key,
    _named_tables,
    _read_table,
    _Schema,
    _size_between,
    _type_name,
)
from fastedge.errors import Kind, ProxyError, error_response
from fastedge.filters import (
    Answer,
    ExpressReply,
    Filter,
    FilterContext,
    Headers,
    Response,
    Runtime,
)
from fastedge.http.fast_engine import status_line
from fastedge.redis_config import RedisConfig
from fastedge.state import LockToken

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig

__all__ = [
    "CacheFilter",
    "CacheSettings",
    "build_cache_filter",
    "convert_caches_section",
    "convert_route_cache",
]

log = logging.getLogger("fastedge.cache")

_KIB: Final = 1024
_MIB: Final = 1024 * _KIB

#: ``max_bytes`` default. A cache is an explicit memory budget; 64 MiB holds tens of
#: thousands of API answers and is small next to a proxy host's memory (nginx has no
#: default: ``proxy_cache_path ... max_size`` is unbounded until set).
DEFAULT_MAX_BYTES: Final = 64 * _MIB
#: ``max_object_size`` default: Squid's ``maximum_object_size`` (4 MB). Larger answers
#: (downloads, media) stream through uncached instead of evicting thousands of small ones.
DEFAULT_MAX_OBJECT_SIZE: Final = 4 * _MIB
#: ``coalesce_wait`` default: nginx's ``proxy_cache_lock_timeout`` (5 s). After it, a
#: waiting request goes upstream itself (nginx does the same, uncached).
DEFAULT_COALESCE_WAIT: Final = 5.0
#: How long a stale entry with validators (ETag / Last-Modified) is kept for
#: revalidation after its lifetime and stale windows: nginx's ``proxy_cache_path
#: inactive`` default (10 minutes). The LRU still evicts it first when space is short.
REVALIDATE_KEEP: Final = 600.0
#: RFC 5861 §4: stale-if-error applies when "an error is encountered", "a 500, 502, 503,
#: or 504 status code" among them.
DEFAULT_STALE_IF_ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})

# Directives that only make sense on requests (RFC 9111 §5.2.1): a route override is a
# response policy, so these are refused there instead of silently ignored.
_REQUEST_ONLY: Final = frozenset({"max-stale", "min-fresh", "only-if-cached"})

_STATE: Final = "cache"  # the FilterContext.state key of a request's _Pending
_NO_DIRECTIVES: Final = CacheControl()  # most requests send no Cache-Control
_NO_FIELDS: Final[Headers] = []  # no Vary: the request's fields select nothing
# Normalised "GET scheme://host" key prefixes by (scheme, Host), so a hit does not redo
# the host normalisation; bounded because Host values come from clients.
_PREFIX_CACHE_SIZE: Final = 1024
_GET: Final = b"GET"
_HEAD: Final = b"HEAD"
# Client conditionals the cache evaluates itself on a stored response (RFC 9111 §4.3.2)
# and therefore does not forward on a cacheable GET: the upstream must send the full
# response so it can be stored (nginx's proxy_cache does the same).
_CLIENT_CONDITIONALS: Final = (b"if-none-match", b"if-modified-since")
# Fields never stored with an entry besides the hop-by-hop ones: our per-request id,
# and framing (the stored body's length is what counts when it is served).
_NOT_STORED: Final = frozenset({b"x-request-id", b"content-length"})
# Fields a 304 answer repeats from the 200 it stands for (RFC 9110 §15.4.5).
_NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """One ``[caches.NAME]`` table (docs/cache-and-state.md has the reference).

    ``override`` is a response Cache-Control the route imposes over the upstream's
    (``"max-age=300, stale-while-revalidate=3600"``; the upstream's ``no-store`` and
    ``private`` always survive). ``coalesce``: ``"auto"`` = across instances when
    ``[redis]`` is configured, else in-process; ``"local"``; ``"redis"``; ``"off"``.
    """

    name: str
    max_bytes: int = DEFAULT_MAX_BYTES
    max_object_size: int | None = None  # None: DEFAULT_MAX_OBJECT_SIZE, at most max_bytes
    default_ttl: float = 0.0
    heuristic: bool = False
    override: str | None = None
    coalesce: Literal["auto", "local", "redis", "off"] = "auto"
    coalesce_wait: float = DEFAULT_COALESCE_WAIT
    stale_if_error_statuses: frozenset[int] = DEFAULT_STALE_IF_ERROR_STATUSES

    @property
    def object_limit(self) -> int:
        """The effective ``max_object_size``."""
        if self.max_object_size is not None:
            return self.max_object_size
        return min(DEFAULT_MAX_OBJECT_SIZE, self.max_bytes)


def _override(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a Cache-Control string, got {_type_name(value)}")
    cc = parse_cache_control([value.encode("latin-1", "replace")])
    unknown = [name for name in cc.extensions if name not in KNOWN_DIRECTIVES]
    if unknown:
        raise ValueError(
            f"unknown Cache-Control directive {unknown[0]!r}"
            + _did_you_mean(unknown[0], sorted(KNOWN_DIRECTIVES - _REQUEST_ONLY))
        )
    request_only = sorted(
        d for d in _REQUEST_ONLY if getattr(cc, d.replace("-", "_")) not in (None, False)
    )
    if request_only:
        raise ValueError(f"{request_only[0]!r} is a request directive, not a route policy")
    if cc == CacheControl():
        raise ValueError("must contain at least one directive, e.g. 'max-age=60'")
    return value


def _statuses(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty array of status codes, got {_type_name(value)}")
    out: set[int] = set()
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 400 <= item <= 599:
            raise ValueError(f"each status must be an integer from 400 to 599, got {item!r}")
        out.add(item)
    return frozenset(out)


_MAX_SIZE: Final = 1 << 40  # 1 TiB: a typo guard, not a policy

_CACHE_SCHEMA: Final[_Schema] = {
    "max_bytes": _Key(_field(_size_between(64 * _KIB, _MAX_SIZE))),
    "max_object_size": _Key(_field(_size_between(1, _MAX_SIZE))),
    "default_ttl": _Key(_field(_duration_at_least(0.0, inclusive=True))),
    "heuristic": _Key(_field(_boolean)),
    "override": _Key(_field(_override)),
    "coalesce": _Key(_field(_choice("auto", "local", "redis", "off"))),
    "coalesce_wait": _Key(_field(_duration_at_least(0.001, inclusive=True))),
    "stale_if_error_statuses": _Key(_field(_statuses)),
}


def _cache(ctx: _Context, path: str, name: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _CACHE_SCHEMA)
    if table is None:
        return _INVALID
    values = table.values
    ok = table.complete
    max_bytes = values.get("max_bytes", DEFAULT_MAX_BYTES)
    object_size = values.get("max_object_size")
    if object_size is not None and object_size > max_bytes:
        ctx.error(
            _join(path, "max_object_size"),
            f"must not exceed max_bytes ({max_bytes} bytes), got {object_size} bytes",
        )
        ok = False
    if values.get("coalesce") == "redis" and "redis" not in ctx.names:
        ctx.error(_join(path, "coalesce"), "coalesce = 'redis' needs a [redis] section")
        ok = False
    if not ok:
        return _INVALID
    return _build(table, CacheSettings, name=name)


def convert_caches_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[caches.NAME]`` tables (``EXTENSION_SECTIONS``): returns
    ``{name: CacheSettings}``; every problem is recorded with its key path."""
    return _named_tables(
        ctx, path, value, _cache, bad_name="a cache name is 1-64 letters, digits, '_' or '-'"
    )


def convert_route_cache(ctx: _Context, path: str, value: object) -> Any:
    """Converter for a route's ``cache`` key: the name of a ``[caches.NAME]``."""
    if not isinstance(value, str):
        return ctx.error(path, f"expected a cache name, got {_type_name(value)}")
    known = sorted(ctx.defined("caches"))
    if value not in known:
        return ctx.error(path, f"unknown cache {value!r}" + _did_you_mean(value, known))
    return value


# --------------------------------------------------------------------------- per request


class _Pending:
    """What the cache remembers about one forwarded request (``ctx.state["cache"]``)."""

    __slots__ = (
        "bypass",
        "closed",
        "conditionals",
        "decision",
        "entry",
        "filler",
        "fwd",
        "head",
        "keep",
        "leading",
        "primary",
        "req_cc",
        "request_time",
        "revalidating",
        "token",
    )

    def __init__(self, primary: bytes, fwd: str) -> None:
        self.primary = primary
        self.fwd = fwd  # the RFC 9211 fwd reason
        self.bypass = False  # not a cacheable request: only Cache-Status (and §4.4)
        self.head = False
        self.req_cc = CacheControl()
        self.request_time = 0.0
        self.decision: Decision = Miss()
        self.entry: Entry | None = None  # the stored entry being revalidated
        self.revalidating = False  # our validators went upstream
        self.conditionals: Headers = []  # the client's own If-None-Match/If-Modified-Since
        self.leading = False  # holds the in-process fill lock of `primary`
        self.token: LockToken | None = None  # holds the cross-instance fill lock
        self.filler: Filler | None = None
        self.keep = 0.0
        self.closed = False  # the exchange ended (or will get no upstream response)


def _content_length(headers: Headers) -> int | None:
    for n, v in headers:
        if n == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _kept_headers(headers: Headers, cc: CacheControl) -> Headers | None:
    """The fields a response is stored with, or None when it must not be stored at all
    because it sets a cookie: someone's session must never be handed to everyone. Like
    nginx and Varnish (unless the origin drops the field for caches with
    ``private="set-cookie"`` / ``no-cache="..."``, which :func:`storable_headers` does)."""
    kept = [(n, v) for n, v in storable_headers(headers, cc) if n not in _NOT_STORED]
    if any(n == b"set-cookie" for n, _ in kept):
        return None
    return kept


def _keep(lifetime: float, cc: CacheControl, headers: Headers) -> float:
    """How long the store keeps an entry: its lifetime and stale windows
    (``policy.keep_for``), plus :data:`REVALIDATE_KEEP` when it has a validator, since a
    stale entry that can be revalidated still saves the body's transfer (a 304)."""
    keep = keep_for(lifetime, cc)
    if any(n == b"etag" or n == b"last-modified" for n, _ in headers):
        keep = max(keep, lifetime + REVALIDATE_KEEP)
    return keep


def _etags(value: bytes) -> list[bytes]:
    """The entity-tags of an ``If-None-Match`` list (RFC 9110 §13.1.2), ``*`` kept."""
    return [t.strip() for t in value.split(b",") if t.strip()]


def _weak_match(a: bytes, b: bytes) -> bool:
    # RFC 9110 §8.8.3.2 weak comparison: opaque-tags match, W/ ignored.
    return a.removeprefix(b"W/") == b.removeprefix(b"W/")


def not_modified(conditionals: Headers, entry: Entry) -> bool:
    """Whether the client's conditional GET is answered 304 by ``entry``
    (RFC 9110 §13.1.2, §13.1.3, in the precedence of §13.2.2)."""
    if entry.status not in (200, 203):
        return False  # conditionals only select among 2xx representations
    inm = [v for n, v in conditionals if n == b"if-none-match"]
    if inm:
        etag = next((v for n, v in entry.headers if n == b"etag"), None)
        tags = [t for value in inm for t in _etags(value)]
        if b"*" in tags:
            return True
        return etag is not None and any(_weak_match(t, etag.strip()) for t in tags)
    ims = next((v for n, v in conditionals if n == b"if-modified-since"), None)
    if ims is None:
        return False
    since = parse_http_date(ims)
    stamp = next((v for n, v in entry.headers if n == b"last-modified"), None)
    if since is None or stamp is None:
        return False
    modified = parse_http_date(stamp)
    return modified is not None and modified <= since


# --------------------------------------------------------------------------- the filter


class CacheFilter:
    """The ``cache`` phase of one route (see the module docstring)."""

    __slots__ = (
        "_cc_override",
        "_hot",
        "_prefixes",
        "_route_upstream",
        "_sie_statuses",
        "cache",
        "name",
        "settings",
        "shared",
    )

    def __init__(
        self,
        settings: CacheSettings,
        cache: EdgeCache,
        *,
        route_upstream: str,
        shared: SharedFills | None = None,
    ) -> None:
        self.name = "cache"
        self.settings = settings
        self.cache = cache
        self.shared = shared
        self._route_upstream = route_upstream
        self._prefixes: dict[tuple[bytes, bytes], bytes] = {}
        # The express lane's last hit: (scheme, host, target, store generation, full key).
        self._hot: tuple[bytes, bytes, bytes, int, bytes] | None = None
        self._sie_statuses = settings.stale_if_error_statuses
        self._cc_override = (
            parse_cache_control([settings.override.encode("latin-1", "replace")])
            if settings.override
            else None
        )

    # -- request ------------------------------------------------------------------

    def _primary(self, ctx: FilterContext) -> bytes:
        """The URL's primary key (always the GET one: HEAD is served from GET)."""
        return self._primary_key(ctx.scheme, ctx.host, ctx.path, ctx.query, ctx.upstream)

    def _primary_key(self, scheme: bytes, host: bytes, path: bytes, query: bytes, up: Any) -> bytes:
        origin = (scheme, host)
        prefix = self._prefixes.get(origin)
        if prefix is None:
            if len(self._prefixes) >= _PREFIX_CACHE_SIZE:
                self._prefixes.clear()
            # primary_key normalises scheme and host; "/" is cut off again.
            prefix = self._prefixes[origin] = primary_key(_GET, scheme, host, b"/")[:-1]
        key = prefix + (path + query or b"/")
        if up is not None and up.name != self._route_upstream:
            # An earlier filter (traffic split, flag) sent this request to another
            # upstream: its answers are another resource and must not be mixed.
            key += b" @" + up.name.encode()
        return key

    def on_request(self, ctx: FilterContext) -> Answer | Awaitable[Answer]:
        """Answer from storage, or prepare the forwarded request (see the module doc)."""
        method = ctx.method
        if (method != _GET and method != _HEAD) or ctx.header(b"upgrade") is not None:
            pending = _Pending(b"", "method" if method not in SAFE_METHODS else "bypass")
            pending.bypass = True
            ctx.state[_STATE] = pending
            return None
        cache = self.cache
        now = cache.clock()
        values = field_values(ctx.headers, b"cache-control")
        req_cc = parse_cache_control(values) if values else _NO_DIRECTIVES
        primary = self._primary(ctx)
        store = cache.store
        entry = store.lookup(primary, ctx.headers, now=now)
        decision = decide(entry, req_cc, now)
        if type(decision) is Fresh or type(decision) is StaleWhileRevalidate:
            assert entry is not None
            if type(decision) is StaleWhileRevalidate:
                self._refresh_later(ctx, entry)
            return self._serve(ctx, entry, decision, now)
        if entry is None:
            fwd = "uri-miss" if store.variants(primary) is None else "vary-miss"
        elif req_cc.no_cache or getattr(decision, "ttl", 0) > 0:
            fwd = "request"  # usable, but the client asked for a fresher one
        else:
            fwd = "stale"
        if type(decision) is Miss and decision.only_if_cached:
            return self._only_if_cached(fwd)
        pending = _Pending(primary, fwd)
        pending.req_cc = req_cc
        pending.decision = decision
        pending.request_time = now
        ctx.state[_STATE] = pending
        if method == _HEAD:
            pending.head = True  # forwarded as it came; HEAD answers are not stored
            return None
        self._prepare_forward(ctx, pending, entry)
        if self.settings.coalesce == "off":
            return None
        if cache.locks.lead(primary):
            pending.leading = True
            if self.shared is not None:
                return self._lead_shared(ctx, pending)
            return None
        return self._follow(ctx, pending)

    def express_answer(self, req: Any, scheme: bytes, upstream: Any) -> ExpressReply | None:
        """A fresh hit for a plain GET/HEAD, byte for byte as :meth:`on_request` and the
        proxy's general path serve it, or ``None`` with nothing counted (the proxy's
        express lane; see :class:`~fastedge.filters.ExpressAnswer`).

        Only the plainest case: no request ``Cache-Control`` and no conditional
        (``req.cache_sensitive``), a fresh stored response. Everything else (stale,
        revalidation, misses and their coalescing) is on_request's.
        """
        if req.cache_sensitive:
            return None
        cache = self.cache
        store = cache.store
        now = store.clock()
        # Peeked first: a declined request must not touch recency or hit statistics,
        # which on_request's own lookup then updates.
        hot = self._hot
        if (
            hot is not None
            and hot[3] == store.generation
            and hot[2] == req.target
            and hot[1] == req.host
            and hot[0] == scheme
        ):
            # The same URL as the last hit, and no stored key changed since: the same
            # full key (no Vary), without building the primary key again.
            key = hot[4]
            entry = store.peek_key(key, now)
            if entry is None:
                return None
        else:
            primary = self._primary_key(scheme, req.host, req.path, req.query, upstream)
            found = store.peek_request(primary, req, now)
            if found is None:
                return None
            key, entry = found
            if not entry.vary:  # else the key depends on the request's fields too
                self._hot = (scheme, req.host, req.target, store.generation, key)
        resp = entry.cc
        if resp.no_cache and not resp.no_cache_fields:
            return None  # decide(): revalidate first
        age = entry_age(entry, now)
        ttl = entry.lifetime - age
        if ttl <= 0:
            return None  # stale: decide() chooses among SWR, stale-if-error, revalidation
        store.touch(key, now)
        cache.count("hit")
        # What _from_entry + Exchange.respond/_answer send: the stored fields without
        # Age and X-Request-Id (serialised once per stored head), then Age, our
        # Cache-Status member and the length; the proxy adds X-Request-Id.
        wire = entry.wire
        if wire is None or wire[0] is not entry.headers:
            parts = [status_line(entry.status, b"")]
            for name, value in entry.headers:
                if name != b"age" and name != b"x-request-id":
                    parts += (name, b": ", value, b"\r\n")
            wire = entry.wire = (entry.headers, b"".join(parts))
        body = entry.body
        if len(body) > 1:
            entry.body = body = [b"".join(body)]
        data = body[0] if body else b""
        whole_age = min(int(age), 2_147_483_648)
        whole_ttl = math.floor(ttl)
        memo = entry.hit_head
        if memo is not None and memo[0] is wire and memo[1] == whole_age and memo[2] == whole_ttl:
            head = memo[3]
        else:
            if entry.status != 204 and entry.status != 304:
                tail = (
                    b"age: %d\r\ncache-status: fastedge; hit; ttl=%d\r\ncontent-length: %d\r\n"
                    % (
                        whole_age,
                        whole_ttl,
                        len(data),
                    )
                )
            else:
                tail = b"age: %d\r\ncache-status: fastedge; hit; ttl=%d\r\n" % (
                    whole_age,
                    whole_ttl,
                )
            head = wire[1] + tail
            entry.hit_head = (wire, whole_age, whole_ttl, head)
        return (entry.status, head, data)

    def _prepare_forward(self, ctx: FilterContext, pending: _Pending, entry: Entry | None) -> None:
        """Swap the client's conditionals for the stored entry's validators."""
        conditionals = [(n, v) for n, v in ctx.headers if n in _CLIENT_CONDITIONALS]
        pending.conditionals = conditionals
        if conditionals or pending.revalidating:
            # The client's, or our validators of an earlier attempt (a follower that
            # goes upstream after all may find another entry, or none).
            for name in _CLIENT_CONDITIONALS:
                ctx.remove_upstream_header(name)
        pending.entry = entry
        pending.revalidating = False
        if entry is not None:
            validators = revalidation_headers(entry)
            for name, value in validators:
                ctx.set_upstream_header(name, value)
            pending.revalidating = bool(validators)

    async def _follow(self, ctx: FilterContext, pending: _Pending) -> Answer:
        """Another request is fetching this URL: wait for it (bounded), then answer
        from what it stored, or go upstream after all."""
        cache = self.cache
        await cache.locks.follow(pending.primary, self.settings.coalesce_wait)
        now = cache.clock()
        entry = cache.store.lookup(pending.primary, ctx.headers, now=now)
        decision = decide(entry, pending.req_cc, now)
        if entry is not None and (
            type(decision) is Fresh or type(decision) is StaleWhileRevalidate
        ):
            return self._serve(ctx, entry, decision, now, collapsed=True)
        # The leader failed, was too slow, or its answer was not storable: on our own
        # (no lock: queueing behind each other would serialise an uncacheable URL).
        pending.decision = decision
        pending.request_time = now
        self._prepare_forward(ctx, pending, entry)
        return None

    async def _lead_shared(self, ctx: FilterContext, pending: _Pending) -> Answer:
        """Leader in this process: coordinate with the other instances (module
        :mod:`fastedge.cache.shared`)."""
        shared = self.shared
        assert shared is not None
        token = await shared.acquire(pending.primary)
        if token is None:
            return None  # Redis down or the other instance too slow: fetch ourselves
        if pending.closed:  # the client left while we waited
            await shared.release(token)
            return None
        pending.token = token
        published = await shared.load(pending.primary)
        if published is None:
            return None  # we hold the lock and fetch; the fill publishes at its end
        cache = self.cache
        now = cache.clock()
        cache.store.put(
            pending.primary,
            published.vary_request,
            status=published.status,
            headers=published.headers,
            body=published.body,
            cc=published.cc,
            lifetime=published.lifetime,
            request_time=published.request_time,
            response_time=published.response_time,
            keep=published.keep,
            now=now,
        )
        entry = cache.store.lookup(pending.primary, ctx.headers, now=now)
        decision = decide(entry, pending.req_cc, now)
        if entry is None or not (type(decision) is Fresh or type(decision) is StaleWhileRevalidate):
            return None  # another variant, or stale already: fetch (holding the lock)
        self._release(pending)
        return self._serve(ctx, entry, decision, now, collapsed=True)

    def _only_if_cached(self, fwd: str) -> ProxyError:
        self.cache.count("miss")
        # RFC 9111 §5.2.1.7: "respond using a stored response ... or respond with a
        # 504 (Gateway Timeout) status code".
        return ProxyError(
            Kind.UPSTREAM_TIMEOUT,
            "cache",
            detail="only-if-cached: no stored response can be used",
            headers=[(b"cache-status", cache_status(detail="only-if-cached"))],
        )

    # -- answering from storage -------------------------------------------------------

    def _serve(
        self,
        ctx: FilterContext,
        entry: Entry,
        decision: Fresh | StaleWhileRevalidate,
        now: float,
        *,
        collapsed: bool = False,
    ) -> Response:
        stale = decision.ttl <= 0
        if collapsed:
            member = cache_status(
                fwd="uri-miss", fwd_status=entry.status, ttl=decision.ttl, collapsed=True
            )
        elif type(decision) is StaleWhileRevalidate:
            member = cache_status(hit=True, ttl=decision.ttl, detail="stale-while-revalidate")
        else:
            # cache_status(hit=True, ttl=...), spelled out: this is the hot path.
            member = b"fastedge; hit; ttl=%d" % math.floor(decision.ttl)
        result = "stale" if stale else "hit"
        self.cache.count(result)
        if ctx.span is not None:
            self._trace(ctx, result)
        conditionals = [(n, v) for n, v in ctx.headers if n in _CLIENT_CONDITIONALS]
        return self._from_entry(ctx, entry, decision.age, member, conditionals)

    def _from_entry(
        self,
        ctx: FilterContext | None,
        entry: Entry,
        age: float,
        member: bytes,
        conditionals: Headers,
    ) -> Response:
        """The stored response (or a 304 for a matching client conditional), with
        ``Age`` (``age``: RFC 9111 §4.2.3's current age; sent as whole seconds, §5.1)
        and our ``Cache-Status`` member."""
        age_field = (b"age", b"%d" % min(int(age), 2_147_483_648))
        if conditionals and not_modified(conditionals, entry):
            headers = [(n, v) for n, v in entry.headers if n in _NOT_MODIFIED_FIELDS]
            headers.append(age_field)
            headers.append((b"cache-status", member))
            return Response(304, headers)
        headers = [(n, v) for n, v in entry.headers if n != b"age"]
        headers.append(age_field)
        headers.append((b"cache-status", member))
        body = entry.body
        if len(body) > 1:
            # Joined once and kept joined: the next hits send one buffer as it is.
            entry.body = body = [b"".join(body)]
        data = body[0] if body else b""
        if entry.status != 204 and entry.status != 304:
            headers.append((b"content-length", b"%d" % len(data)))
        return Response(entry.status, headers, data)

    # -- response ---------------------------------------------------------------------

    def on_response(self, ctx: FilterContext, status: int, headers: Headers) -> Response | None:
        """Store, merge a 304, serve stale for an error status, or invalidate."""
        pending: _Pending | None = ctx.state.get(_STATE)
        if pending is None:
            return None
        if pending.bypass:
            if pending.fwd == "method":
                self._invalidate(ctx, status, headers)
            self.cache.count("bypass")
            self._trace(ctx, "bypass")
            headers.append((b"cache-status", cache_status(fwd=pending.fwd, fwd_status=status)))
            return None
        cache = self.cache
        now = cache.clock()
        entry = pending.entry
        if status == 304 and pending.revalidating and entry is not None:
            return self._revalidated(ctx, pending, entry, headers, now)
        if (
            entry is not None
            and type(pending.decision) is StaleIfError
            and status in self._sie_statuses
        ):
            self._release(pending)
            return self._stale_if_error(ctx, entry, now)
        filler = None if pending.head else self._begin_fill(ctx, pending, status, headers, now)
        if filler is None:
            # Nothing to wait for: followers go upstream themselves right away.
            self._release(pending)
        cache.count("miss")
        self._trace(ctx, "miss")
        ttl = filler.entry.lifetime if filler is not None else None
        member = cache_status(
            fwd=pending.fwd, fwd_status=status, ttl=ttl, stored=filler is not None
        )
        headers.append((b"cache-status", member))
        return None

    def _begin_fill(
        self, ctx: FilterContext, pending: _Pending, status: int, headers: Headers, now: float
    ) -> Filler | None:
        cc = self._response_cc(headers)
        has_authorization = ctx.header(b"authorization") is not None
        if not self._storable(status, pending.req_cc, cc, headers, has_authorization):
            return None
        kept = _kept_headers(headers, cc)
        if kept is None:
            return None
        lifetime = self._lifetime(cc, kept, now)
        if lifetime <= 0 and not (cc.stale_while_revalidate or cc.stale_if_error):
            return None  # stale on arrival and no stale window: storing buys nothing
        filler = self.cache.store.begin_fill(
            pending.primary,
            ctx.headers,
            status=status,
            headers=kept,
            cc=cc,
            lifetime=lifetime,
            request_time=pending.request_time,
            response_time=now,
            content_length=_content_length(headers),
        )
        if filler is not None:
            pending.filler = filler
            pending.keep = _keep(lifetime, cc, kept)
        return filler

    def _response_cc(self, headers: Headers) -> CacheControl:
        """The response's ``Cache-Control`` with this route's override applied."""
        resp_cc = parse_cache_control(field_values(headers, b"cache-control"))
        override = self._cc_override
        return route_cache_control(resp_cc, override) if override is not None else resp_cc

    def _storable(
        self,
        status: int,
        req_cc: CacheControl,
        cc: CacheControl,
        headers: Headers,
        has_authorization: bool,
    ) -> bool:
        """Whether a response to a GET may be stored (RFC 9111 §3) under these settings."""
        return is_storable(
            _GET,
            status,
            req_cc,
            cc,
            headers,
            has_authorization=has_authorization,
            default_ttl=self.settings.default_ttl,
        )

    def _lifetime(self, cc: CacheControl, headers: Headers, now: float) -> float:
        """The freshness lifetime (RFC 9111 §4.2.1) of a response received at ``now``."""
        settings = self.settings
        return freshness_lifetime(
            cc,
            headers,
            default_ttl=settings.default_ttl,
            heuristic=settings.heuristic,
            response_time=now,
        )

    def _revalidated(
        self, ctx: FilterContext, pending: _Pending, entry: Entry, headers: Headers, now: float
    ) -> Response:
        """A 304 to our validators: update the stored headers (RFC 9111 §4.3.4) and
        answer with the stored response instead of the 304."""
        self._release(pending)
        self._merge_304(entry, headers, pending.request_time, now)
        self.cache.count("revalidated")
        self._trace(ctx, "revalidated")
        member = cache_status(fwd=pending.fwd, fwd_status=304, ttl=entry.lifetime)
        age = current_age(entry.headers, entry.response_time, entry.request_time, now)
        return self._from_entry(ctx, entry, age, member, pending.conditionals)

    def _merge_304(self, entry: Entry, headers: Headers, request_time: float, now: float) -> None:
        update = [(n, v) for n, v in headers if n not in _NOT_STORED and n != b"cache-status"]
        merged = merge_304(entry.headers, update)
        cc = self._response_cc(merged)
        lifetime = self._lifetime(cc, merged, now)
        store = self.cache.store
        if cc.no_store:
            store.purge(entry.key)  # the origin withdrew permission to store it
            entry.headers = merged
            return
        if not store.refresh(
            entry,
            headers=merged,
            cc=cc,
            lifetime=lifetime,
            request_time=request_time,
            response_time=now,
            keep=_keep(lifetime, cc, merged),
            now=now,
        ):
            # Purged or evicted meanwhile: still answer with what we hold.
            entry.headers = merged
            entry.lifetime = lifetime

    def _stale_if_error(self, ctx: FilterContext, entry: Entry, now: float) -> Response:
        age = current_age(entry.headers, entry.response_time, entry.request_time, now)
        member = cache_status(hit=True, ttl=entry.lifetime - age, detail="stale-if-error")
        self.cache.count("stale")
        self._trace(ctx, "stale")
        return self._from_entry(ctx, entry, age, member, [])

    def on_response_body(self, ctx: FilterContext, chunk: bytes) -> None:
        """Keep a chunk of the response being stored (it streams to the client anyway)."""
        pending: _Pending | None = ctx.state.get(_STATE)
        if pending is None:
            return
        filler = pending.filler
        if filler is not None and not filler.append(chunk):
            # Beyond max_object_size: a pass-through from here on.
            pending.filler = None
            self._release(pending)

    def on_response_end(self, ctx: FilterContext) -> None:
        """The response is complete: store it, wake the followers, publish it."""
        pending: _Pending | None = ctx.state.get(_STATE)
        if pending is None:
            return
        filler = pending.filler
        pending.filler = None
        committed = filler is not None and filler.commit(keep=pending.keep, now=self.cache.clock())
        token = pending.token
        shared = self.shared
        if committed and token is not None and shared is not None:
            assert filler is not None
            pending.token = None
            self.cache.spawn(
                shared.publish_and_release(
                    token, pending.primary, filler.entry, pending.keep, list(ctx.headers)
                )
            )
        self._release(pending)

    def on_response_abort(self, ctx: FilterContext) -> None:
        """The exchange ended without a complete response: drop the fill, let go."""
        pending: _Pending | None = ctx.state.get(_STATE)
        if pending is None:
            return
        pending.closed = True
        filler = pending.filler
        if filler is not None:
            pending.filler = None
            filler.abort()
        self._release(pending)

    def on_error(self, ctx: FilterContext, err: ProxyError) -> Response | None:
        """An upstream failure before any response byte: stale-if-error, or the error
        answer with ``Cache-Status`` (504 when must-revalidate forbids stale, §5.2.2.2)."""
        pending: _Pending | None = ctx.state.get(_STATE)
        if pending is None:
            return None
        self._release(pending)
        entry = pending.entry
        now = self.cache.clock()
        if entry is not None and type(pending.decision) is StaleIfError:
            return self._stale_if_error(ctx, entry, now)
        status: int | None = None
        if (
            entry is not None
            and err.kind is Kind.UPSTREAM_UNREACHABLE
            and (
                entry.cc.must_revalidate
                or entry.cc.proxy_revalidate
                or entry.cc.s_maxage is not None
            )
        ):
            # RFC 9111 §5.2.2.2 (and §5.2.2.8, §5.2.2.10): a disconnected cache "MUST
            # generate an error response rather than reuse the stale response. The
            # generated status code SHOULD be 504 (Gateway Timeout)".
            status = 504
        code, headers, body = error_response(err, ctx.request_id.decode(), status=status)
        self.cache.count("bypass" if pending.bypass else "miss")
        self._trace(ctx, "bypass" if pending.bypass else "miss")
        headers.append(
            (b"cache-status", cache_status(fwd=pending.fwd, detail=err.kind.name.lower()))
        )
        return Response(code, headers, body)

    # -- helpers ----------------------------------------------------------------------

    def _release(self, pending: _Pending) -> None:
        """Let the followers of this request's fill go (idempotent)."""
        if pending.leading:
            pending.leading = False
            self.cache.locks.release(pending.primary)
        token = pending.token
        if token is not None and self.shared is not None:
            pending.token = None
            self.cache.spawn(self.shared.release(token))

    def _invalidate(self, ctx: FilterContext, status: int, headers: Headers) -> None:
        """RFC 9111 §4.4: an unsafe method's success invalidates the target URI and the
        same-origin ``Location`` / ``Content-Location`` (every upstream's variants)."""
        location = next((v for n, v in headers if n == b"location"), None)
        content_location = next((v for n, v in headers if n == b"content-location"), None)
        uri = b"%s://%s%s" % (ctx.scheme, ctx.host, ctx.path + ctx.query)
        keys = invalidate_on_unsafe(ctx.method, status, uri, location, content_location)
        store = self.cache.store
        names = [b" @" + name.encode() for name in ctx.upstreams]
        for key in keys:
            if key.startswith(b"HEAD "):
                continue  # HEAD is never stored separately (served from GET)
            store.purge(key)
            for suffix in names:
                store.purge(key + suffix)

    def _refresh_later(self, ctx: FilterContext, entry: Entry) -> None:
        """Start the one background revalidation of ``entry`` (RFC 5861 §3)."""
        cache = self.cache
        if entry.key in cache.refreshing or ctx.upstream is None:
            return
        cache.refreshing.add(entry.key)
        cache.refreshes += 1
        cache.spawn(
            self._refresh(
                entry,
                ctx.upstream,
                ctx.target,
                ctx.path,
                list(ctx.upstream_headers),
                list(ctx.headers),
            )
        )

    async def _refresh(
        self,
        entry: Entry,
        upstream: Any,
        target_uri: bytes,
        path: bytes,
        headers: Headers,
        request_headers: Headers,
    ) -> None:
        cache = self.cache
        try:
            candidates = upstream.candidates(path if upstream.keyed else None)
            if not candidates:
                raise FetchError("no available target")
            request_time = cache.clock()
            got = await fetch(
                candidates[0],
                target_uri,
                headers,
                validators=revalidation_headers(entry),
                timeout=upstream.response_timeout,
                max_body=cache.store.max_object_size,
            )
            now = cache.clock()
            if got.status == 304:
                self._merge_304(entry, got.headers, request_time, now)
                return
            cc = self._response_cc(got.headers)
            has_authorization = any(n == b"authorization" for n, _ in request_headers)
            if not self._storable(got.status, CacheControl(), cc, got.headers, has_authorization):
                if got.status < 500:
                    cache.store.purge(entry.key)  # replaced by something not storable
                return
            kept = _kept_headers(got.headers, cc)
            if kept is None:
                return
            lifetime = self._lifetime(cc, kept, now)
            cache.store.put(
                entry.primary,
                request_headers,
                status=got.status,
                headers=kept,
                body=got.body,
                cc=cc,
                lifetime=lifetime,
                request_time=request_time,
                response_time=now,
                keep=_keep(lifetime, cc, kept),
                now=now,
            )
        except FetchError as exc:
            cache.refresh_failures += 1
            log.debug("cache %r: background refresh failed: %s", cache.name, exc)
        except Exception:
            cache.refresh_failures += 1
            log.exception("cache %r: background refresh failed", cache.name)
        finally:
            cache.refreshing.discard(entry.key)

    def _trace(self, ctx: FilterContext, result: str) -> None:
        span = ctx.span
        if span is not None:
            span.set_attribute("fastedge.cache.result", result)
            span.set_attribute("fastedge.cache.name", self.cache.name)


# --------------------------------------------------------------------------- building


def build_cache_filter(value: str, route: RouteConfig, config: Config, runtime: Runtime) -> Filter:
    """The filter for a route's ``cache = "NAME"`` (``FILTER_BUILDERS``)."""
    settings: CacheSettings = config.sections["caches"][value]
    caches: EdgeCaches = runtime.service(SERVICE, lambda: EdgeCaches(runtime.metrics))
    cache = caches.get(
        settings.name, max_bytes=settings.max_bytes, max_object_size=settings.object_limit
    )
    shared: SharedFills | None = None
    redis_cfg = config.sections.get("redis")
    mode = settings.coalesce
    if mode == "redis" or (mode == "auto" and isinstance(redis_cfg, RedisConfig)):
        assert isinstance(redis_cfg, RedisConfig)  # validation guarantees it for "redis"
        shared = cache.shared
        if shared is None or shared.wait != settings.coalesce_wait:
            shared = cache.shared = SharedFills(
                runtime.redis(),
                name=settings.name,
                key_prefix=redis_cfg.key_prefix,
                timeout=redis_cfg.timeout,
                wait=settings.coalesce_wait,
            )
    return CacheFilter(settings, cache, route_upstream=route.upstream, shared=shared)
