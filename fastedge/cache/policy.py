"""Shared-cache decisions (RFC 9111, RFC 5861, RFC 9211) as pure functions.

Nothing here does I/O or reads a clock: every time is an argument (POSIX seconds, the
same timeline as ``Date``), so each rule is tested by table. The cache filter strings
them together:

1. request: :func:`cache_key` → ``CacheStore.lookup`` → :func:`decide`;
2. response: :func:`is_storable` → :func:`freshness_lifetime` (after an optional
   :func:`route_cache_control`) → ``CacheStore.begin_fill`` with
   :func:`storable_headers`;
3. a 304 to a revalidation (:func:`revalidation_headers`) → :func:`merge_304`;
4. an unsafe method's success → :func:`invalidate_on_unsafe` → ``CacheStore.purge``;
5. every answer carries :func:`cache_status`.

Headers are ``list[tuple[bytes, bytes]]`` with lower-case names, as the engines give them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, TypeAlias
from urllib.parse import urljoin, urlsplit

from fastedge.cache.control import (
    CacheControl,
    parse_age,
    parse_cache_control,
    parse_expires,
    parse_http_date,
)

if TYPE_CHECKING:
    from fastedge.cache.store import Entry

__all__ = [
    "CACHE_NAME",
    "Decision",
    "Fresh",
    "Miss",
    "MustRevalidate",
    "StaleIfError",
    "StaleWhileRevalidate",
    "cache_key",
    "cache_status",
    "current_age",
    "decide",
    "field_values",
    "freshness_lifetime",
    "invalidate_on_unsafe",
    "is_storable",
    "merge_304",
    "primary_key",
    "revalidation_headers",
    "route_cache_control",
    "secondary_key",
    "storable_headers",
    "vary_fields",
]

Headers: TypeAlias = list[tuple[bytes, bytes]]

CACHE_NAME: Final = "fastedge"  # the cache's name in Cache-Status (RFC 9211 §2)

# RFC 9110 §15.1: status codes "heuristically cacheable" (cacheable by default).
CACHEABLE_BY_DEFAULT: Final = frozenset(
    {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}
)
# Statuses this cache understands well enough to store at all (RFC 9111 §3: "the
# response status code is final" and understood). 206 is left out: storing partial
# content needs range bookkeeping this cache does not do.
UNDERSTOOD_STATUSES: Final = frozenset(
    {200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 451, 501}
)
# RFC 9110 §9.2.1: the safe methods; a success to anything else invalidates (§4.4).
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
STORABLE_METHODS: Final = frozenset({b"GET", b"HEAD"})
# RFC 9111 §4.2.2 suggests 10% of the time since Last-Modified; capped at a day, as
# Squid's refresh_pattern default and Varnish's shortlived practice do.
HEURISTIC_FRACTION: Final = 0.1
HEURISTIC_MAX: Final = 86_400.0
# RFC 9110 §7.6.1 hop-by-hop fields: never stored nor updated from a 304 (§3.1, §3.2).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Fields whose values compare case-insensitively when building the Vary key (their
# grammars are tokens/language tags/origins, all case-insensitive: RFC 9110 §12.5,
# RFC 4647 §2, RFC 6454 §4).
_CASELESS_FIELDS: Final = frozenset(
    {b"accept", b"accept-encoding", b"accept-charset", b"accept-language", b"origin"}
)


def field_values(headers: Headers, name: bytes) -> list[bytes]:
    """Every value of field ``name`` (lower-case), in order."""
    return [v for n, v in headers if n == name]


def _first(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def vary_fields(headers: Headers) -> tuple[bytes, ...] | None:
    """The response's ``Vary`` field names, lower-cased, sorted, unique; ``None`` for
    ``Vary: *`` (a response that can never be reused, RFC 9111 §4.1)."""
    names: set[bytes] = set()
    for value in field_values(headers, b"vary"):
        for part in value.split(b","):
            name = part.strip(b" \t").lower()
            if name == b"*":
                return None
            if name:
                names.add(name)
    return tuple(sorted(names))


# --- storing (RFC 9111 §3) --------------------------------------------------------------


def is_storable(
    method: bytes,
    status: int,
    req_cc: CacheControl,
    resp_cc: CacheControl,
    resp_headers: Headers,
    *,
    has_authorization: bool,
    default_ttl: float,
) -> bool:
    """Whether a shared cache may store this response (RFC 9111 §3).

    ``default_ttl`` > 0 is the route's own freshness for responses that carry none: it
    makes the statuses cacheable by default (RFC 9110 §15.1) storable without explicit
    freshness, as a heuristic lifetime would (§4.2.2).
    """
    if method not in STORABLE_METHODS or status not in UNDERSTOOD_STATUSES:
        return False
    # §3: no-store in the request or the response; §5.2.2.7: private, for a shared
    # cache (the qualified private="f" form only forbids storing those fields).
    if req_cc.no_store or resp_cc.no_store:
        return False
    if resp_cc.private and not resp_cc.private_fields:
        return False
    # §3.5: a request with Authorization is stored by a shared cache only when the
    # response explicitly allows it.
    if has_authorization and not (
        resp_cc.public or resp_cc.must_revalidate or resp_cc.s_maxage is not None
    ):
        return False
    # §4.1: Vary: * always fails to match; storing it is pointless.
    if vary_fields(resp_headers) is None:
        return False
    # §3: and one of: Expires, max-age, s-maxage, a cache extension that allows it,
    # a status cacheable by default, or public.
    if resp_cc.has_explicit_freshness or field_values(resp_headers, b"expires"):
        return True
    if resp_cc.public:
        return True
    if status in CACHEABLE_BY_DEFAULT:
        return default_ttl > 0 or _first(resp_headers, b"last-modified") is not None
    return False


def storable_headers(headers: Headers, resp_cc: CacheControl) -> Headers:
    """The fields a shared cache keeps: without hop-by-hop fields (and those named by
    ``Connection``, RFC 9111 §3.1), ``private="f"`` fields (§5.2.2.7: a shared cache
    MUST NOT store them) and ``no-cache="f"`` fields (§5.2.2.4: not to be sent without
    revalidation; dropping them is the simple way to honour that)."""
    drop = set(HOP_BY_HOP)
    for value in field_values(headers, b"connection"):
        drop.update(p.strip(b" \t").lower() for p in value.split(b","))
    drop.update(f.encode("latin-1") for f in resp_cc.private_fields)
    drop.update(f.encode("latin-1") for f in resp_cc.no_cache_fields)
    return [(n, v) for n, v in headers if n not in drop]


# --- freshness and age (RFC 9111 §4.2) --------------------------------------------------


def freshness_lifetime(
    resp_cc: CacheControl,
    headers: Headers,
    *,
    default_ttl: float,
    heuristic: bool = False,
    response_time: float | None = None,
) -> float:
    """The response's freshness lifetime in seconds (RFC 9111 §4.2.1, shared cache).

    First match wins: ``s-maxage``, ``max-age``, ``Expires - Date`` (``Date`` missing →
    ``response_time``, RFC 9110 §6.6.1), then — only without explicit expiration —
    the heuristic 10% of ``Date - Last-Modified`` (when ``heuristic``, §4.2.2, capped
    at a day), else ``default_ttl``.
    """
    if resp_cc.s_maxage is not None:
        return float(resp_cc.s_maxage)
    if resp_cc.max_age is not None:
        return float(resp_cc.max_age)
    expires = parse_expires(field_values(headers, b"expires"))
    date = _date_value(headers, response_time)
    if expires is not None:
        if date is None:
            return 0.0
        return max(0.0, expires - date)
    if heuristic:
        last_modified = _header_date(headers, b"last-modified")
        if last_modified is not None and date is not None and date > last_modified:
            return min(HEURISTIC_MAX, (date - last_modified) * HEURISTIC_FRACTION)
    return max(0.0, float(default_ttl))


def _header_date(headers: Headers, name: bytes) -> float | None:
    value = _first(headers, name)
    return None if value is None else parse_http_date(value)


def _date_value(headers: Headers, fallback: float | None) -> float | None:
    date = _header_date(headers, b"date")
    return fallback if date is None else date


def entry_age(entry: Entry, now: float) -> float:
    """:func:`current_age` of a stored entry; the part that depends only on what was
    stored (the parsed ``Age`` and ``Date``, the response delay) is computed once per
    stored head, not on every hit."""
    memo = entry.initial_age
    headers = entry.headers
    response_time = entry.response_time
    request_time = entry.request_time
    if (
        memo is None
        or memo[0] is not headers
        or memo[1] != response_time
        or memo[2] != request_time
    ):
        initial = current_age(headers, response_time, request_time, response_time)
        memo = entry.initial_age = (headers, response_time, request_time, initial)
    resident_time = now - response_time
    return memo[3] + resident_time if resident_time > 0.0 else memo[3]


def current_age(headers: Headers, response_time: float, request_time: float, now: float) -> float:
    """The stored response's current age in seconds (RFC 9111 §4.2.3).

    ``request_time``: when the cache sent the request that got this response;
    ``response_time``: when the response arrived; ``now``: the time of the decision.
    A missing or invalid ``Date`` counts as ``response_time`` (no apparent age).
    """
    age_value = parse_age(field_values(headers, b"age")) or 0
    date_value = _date_value(headers, response_time)
    assert date_value is not None
    apparent_age = max(0.0, response_time - date_value)
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = max(0.0, now - response_time)
    return corrected_initial_age + resident_time


# --- keys (RFC 9111 §2, §4.1) -----------------------------------------------------------

_DEFAULT_PORTS: Final = {b"http": b"80", b"https": b"443"}


def primary_key(method: bytes, scheme: bytes, host: bytes, path_query: bytes) -> bytes:
    """``METHOD scheme://host/path?query`` — the primary cache key (RFC 9111 §2).

    The host is lower-cased, loses a trailing dot and a default port (RFC 9110 §4.2.3
    URI normalisation); the path and query are kept exactly (percent-encodings are not
    decoded: two spellings are two keys, which is safe). HEAD and GET are separate keys.
    """
    scheme = scheme.lower()
    h = host.lower()
    port = b""
    if h.startswith(b"["):  # an IPv6 literal: [::1]:8080
        end = h.find(b"]")
        name = h if end == -1 else h[: end + 1]
        if end != -1 and h[end + 1 : end + 2] == b":":
            port = h[end + 2 :]
    else:
        name, sep, p = h.rpartition(b":")
        if sep:
            port = p
        else:
            name = h
        name = name.rstrip(b".")
    h = name if port in (b"", _DEFAULT_PORTS.get(scheme)) else name + b":" + port
    return b"%s %s://%s%s" % (method, scheme, h, path_query or b"/")


def _normalise_field(name: bytes, values: list[bytes]) -> bytes:
    # RFC 9111 §4.1: selecting fields match after "adding or removing whitespace where
    # allowed, combining multiple field lines with the same name, normalizing both
    # header field values in a way that is known to have identical semantics".
    members: list[bytes] = []
    for value in values:
        for part in value.split(b","):
            member = b" ".join(part.split())  # OWS trimmed, inner whitespace runs → one
            if member:
                members.append(member.lower() if name in _CASELESS_FIELDS else member)
    return b",".join(members)


def secondary_key(vary: Iterable[bytes], request_headers: Headers) -> bytes:
    """The ``Vary`` part of a key: for each varied field (sorted), ``name=value`` with the
    normalised value (see ``_normalise_field``), or ``name`` alone when absent (an
    absent field matches only an absent one, §4.1). Empty for no ``Vary``."""
    parts: list[bytes] = []
    for name in sorted(set(vary)):
        values = field_values(request_headers, name)
        if values:
            parts.append(name + b"=" + _normalise_field(name, values))
        else:
            parts.append(name)
    return b"\n".join(parts)


def cache_key(
    method: bytes,
    scheme: bytes,
    host: bytes,
    path_query: bytes,
    vary_fields: Iterable[bytes],
    request_headers: Headers,
) -> bytes:
    """The full key of one stored variant: :func:`primary_key` + ``\\0`` +
    :func:`secondary_key`. ``vary_fields`` must not contain ``*`` (``ValueError``)."""
    vary = tuple(vary_fields)
    if b"*" in vary:
        raise ValueError("Vary: * responses have no cache key")
    return (
        primary_key(method, scheme, host, path_query) + b"\0" + secondary_key(vary, request_headers)
    )


# --- reuse decisions (RFC 9111 §4, RFC 5861) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Fresh:
    """Serve the stored response. ``ttl`` = lifetime - age (negative when a client's
    ``max-stale`` let a stale one through: then ``stale`` is true and the answer should
    carry it — RFC 9111 §4.2.4)."""

    age: float
    ttl: float
    stale: bool = False


@dataclass(frozen=True, slots=True)
class StaleWhileRevalidate:
    """Serve the stale response now and revalidate in the background (RFC 5861 §3)."""

    age: float
    ttl: float


@dataclass(frozen=True, slots=True)
class StaleIfError:
    """Revalidate; if the upstream fails (unreachable, 500, 502, 503, 504) serve the
    stale response instead of the error (RFC 5861 §4)."""

    age: float
    ttl: float


@dataclass(frozen=True, slots=True)
class MustRevalidate:
    """Forward a conditional request (:func:`revalidation_headers`); a stale response
    must not be served on failure: answer the error, or 504 if unreachable (§4.2.4)."""

    age: float
    ttl: float


@dataclass(frozen=True, slots=True)
class Miss:
    """Nothing usable: forward the request. ``only_if_cached``: the client forbade that,
    answer 504 Gateway Timeout instead (RFC 9111 §5.2.1.7)."""

    only_if_cached: bool = False


Decision: TypeAlias = Fresh | StaleWhileRevalidate | StaleIfError | MustRevalidate | Miss


def decide(entry: Entry | None, request: CacheControl, now: float) -> Decision:
    """How to answer a request from ``entry`` (the stored variant, or ``None``).

    In order: no entry → :class:`Miss`; request ``no-cache`` or response bare
    ``no-cache`` → revalidate (§5.2.1.4, §5.2.2.4); fresh and within the client's
    ``max-age``/``min-fresh`` → :class:`Fresh`; fresh by the server but not by the
    client's limits → revalidate; stale with ``must-revalidate``/``proxy-revalidate``/
    ``s-maxage`` → revalidate, never stale (§5.2.2.2, §5.2.2.8, §5.2.2.10); within the
    client's ``max-stale`` → stale :class:`Fresh`; within ``stale-while-revalidate`` →
    :class:`StaleWhileRevalidate`; within ``stale-if-error`` (response or request) →
    :class:`StaleIfError`; else :class:`MustRevalidate`. ``only-if-cached`` turns every
    answer that would contact the upstream into ``Miss(only_if_cached=True)``.
    """
    if entry is None:
        return Miss(request.only_if_cached)
    resp = entry.cc
    age = entry_age(entry, now)
    lifetime = entry.lifetime
    ttl = lifetime - age
    upstream = _via_upstream_only_if_cached if request.only_if_cached else _via_upstream
    if request.no_cache or (resp.no_cache and not resp.no_cache_fields):
        return upstream(MustRevalidate(age, ttl))
    fresh = lifetime > age  # §4.2: response_is_fresh = freshness_lifetime > current_age
    if fresh:
        if (request.max_age is None or age <= request.max_age) and (
            request.min_fresh is None or ttl >= request.min_fresh
        ):
            return Fresh(age, ttl)
        return upstream(MustRevalidate(age, ttl))
    staleness = age - lifetime
    if resp.must_revalidate or resp.proxy_revalidate or resp.s_maxage is not None:
        return upstream(MustRevalidate(age, ttl))
    # A client's max-age bounds the age it accepts even when it also allows staleness.
    within_client_age = request.max_age is None or age <= request.max_age
    if request.max_stale is not None and staleness <= request.max_stale and within_client_age:
        return Fresh(age, ttl, stale=True)
    if (
        resp.stale_while_revalidate is not None
        and staleness <= resp.stale_while_revalidate
        and within_client_age
        and request.min_fresh is None
    ):
        return StaleWhileRevalidate(age, ttl)
    sie = max(
        resp.stale_if_error if resp.stale_if_error is not None else -1,
        request.stale_if_error if request.stale_if_error is not None else -1,
    )
    if staleness <= sie:
        return upstream(StaleIfError(age, ttl))
    return upstream(MustRevalidate(age, ttl))


def _via_upstream(decision: Decision) -> Decision:
    """An answer that contacts the upstream, as decided."""
    return decision


def _via_upstream_only_if_cached(decision: Decision) -> Decision:
    """``only-if-cached``: an answer that would contact the upstream is a miss."""
    return Miss(True)


def keep_for(lifetime: float, resp_cc: CacheControl) -> float:
    """How long a store should keep an entry: its lifetime plus the stale windows in
    which it may still be served or revalidated (RFC 5861); at least one second."""
    extra = max(resp_cc.stale_while_revalidate or 0, resp_cc.stale_if_error or 0)
    return max(1.0, lifetime + extra)


# --- validation (RFC 9111 §4.3) ---------------------------------------------------------


def revalidation_headers(entry: Entry) -> Headers:
    """Conditional request fields for revalidating ``entry`` (§4.3.1): ``If-None-Match``
    with its ``ETag`` and ``If-Modified-Since`` with its ``Last-Modified``."""
    out: Headers = []
    etag = _first(entry.headers, b"etag")
    if etag is not None:
        out.append((b"if-none-match", etag))
    last_modified = _first(entry.headers, b"last-modified")
    if last_modified is not None:
        out.append((b"if-modified-since", last_modified))
    return out


def merge_304(entry_headers: Headers, not_modified_headers: Headers) -> Headers:
    """The stored fields updated by a 304 (RFC 9111 §4.3.4, §3.2).

    Each field in the 304 replaces every stored field of that name, except hop-by-hop
    fields (and those named by its ``Connection``) and ``Content-Length`` (the 304 has
    no body; §3.2 exempts it). Order: the stored fields not replaced, then the new ones.
    """
    skip = set(HOP_BY_HOP) | {b"content-length"}
    for value in field_values(not_modified_headers, b"connection"):
        skip.update(p.strip(b" \t").lower() for p in value.split(b","))
    updates = [(n, v) for n, v in not_modified_headers if n not in skip]
    replaced = {n for n, _ in updates}
    return [(n, v) for n, v in entry_headers if n not in replaced] + updates


# --- invalidation (RFC 9111 §4.4) -------------------------------------------------------


def invalidate_on_unsafe(
    method: bytes,
    status: int,
    request_uri: bytes,
    location: bytes | None,
    content_location: bytes | None,
    same_origin: bool = True,
) -> list[bytes]:
    """The primary keys (GET and HEAD) to purge after an unsafe request (§4.4).

    Only for a non-error status (2xx, 3xx) to a method that is not safe. The target URI
    (absolute, ``scheme://host/path?query``) is always invalidated; ``Location`` and
    ``Content-Location`` (resolved against it) too, but with ``same_origin`` (the
    default) only when their origin is the request's — §4.4: "a cache MUST NOT
    invalidate a URI ... from a different origin", against denial-of-service via a
    forged Location. ``same_origin=False`` ignores those two fields altogether.
    """
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    base = request_uri.decode("latin-1")
    uris = [base]
    if same_origin:
        origin = _origin(base)
        for extra in (location, content_location):
            if extra:
                target = urljoin(base, extra.decode("latin-1").strip())
                if _origin(target) == origin and target not in uris:
                    uris.append(target)
    keys: list[bytes] = []
    for uri in uris:
        parts = urlsplit(uri)
        path_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for m in (b"GET", b"HEAD"):
            keys.append(
                primary_key(
                    m,
                    parts.scheme.encode("latin-1"),
                    parts.netloc.encode("latin-1"),
                    path_query.encode("latin-1"),
                )
            )
    return keys


def _origin(uri: str) -> tuple[str, str, int | None]:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return ("", "", None)
    scheme = parts.scheme.lower()
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme)
    return (scheme, (parts.hostname or "").rstrip("."), port)


# --- route policy -----------------------------------------------------------------------


def route_cache_control(upstream: CacheControl, override: str | CacheControl) -> CacheControl:
    """The route's Cache-Control imposed over the upstream's (e.g.
    ``"max-age=300, stale-while-revalidate=3600"``).

    The override replaces the upstream's directives, except that the upstream's
    ``no-store`` and ``private`` always survive: a route policy must never make a
    response its origin marked personal or unstorable shareable.
    """
    imposed = (
        parse_cache_control([override.encode("latin-1")]) if isinstance(override, str) else override
    )
    private = imposed.private or upstream.private
    bare = (imposed.private and not imposed.private_fields) or (
        upstream.private and not upstream.private_fields
    )
    fields = () if bare else tuple(dict.fromkeys(imposed.private_fields + upstream.private_fields))
    return replace(
        imposed,
        no_store=imposed.no_store or upstream.no_store,
        private=private,
        private_fields=fields,
    )


# --- Cache-Status (RFC 9211) ------------------------------------------------------------

_FWD_REASONS: Final = frozenset(
    {"bypass", "method", "uri-miss", "vary-miss", "miss", "request", "stale", "partial"}
)


def cache_status(
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    ttl: float | None = None,
    stored: bool = False,
    collapsed: bool = False,
    key: str | None = None,
    detail: str | None = None,
) -> bytes:
    """This cache's member of the ``Cache-Status`` field (RFC 9211 §2).

    ``hit`` (§2.1) and ``fwd`` (§2.2: ``bypass``, ``method``, ``uri-miss``,
    ``vary-miss``, ``miss``, ``request``, ``stale``, ``partial``) are exclusive;
    ``ttl`` (§2.4) is rounded towards -∞ (negative = stale); ``stored`` (§2.5),
    ``collapsed`` (§2.6), ``key`` (§2.7) and ``detail`` (§2.8; a token, else a string).
    """
    if hit and fwd is not None:
        raise ValueError("hit and fwd are exclusive (RFC 9211 §2.1)")
    if fwd is not None and fwd not in _FWD_REASONS:
        raise ValueError(f"unknown fwd reason {fwd!r}")
    parts = [CACHE_NAME]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={int(fwd_status)}")
    if ttl is not None and math.isfinite(ttl):
        parts.append(f"ttl={math.floor(ttl)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if key is not None:
        parts.append(f"key={_sf_string(key)}")
    if detail is not None:
        parts.append(f"detail={_sf_token_or_string(detail)}")
    return "; ".join(parts).encode("ascii")


def _sf_string(s: str) -> str:
    # RFC 8941 §3.3.3: printable ASCII only, with \" and \\ escaped.
    clean = "".join(c if " " <= c <= "~" else "?" for c in s)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sf_token_or_string(s: str) -> str:
    # RFC 8941 §3.3.4: a token starts with ALPHA or "*", then tchar / ":" / "/".
    if (
        s
        and (s[0].isascii() and (s[0].isalpha() or s[0] == "*"))
        and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~:/") for c in s)
    ):
        return s
    return _sf_string(s)
