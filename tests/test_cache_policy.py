"""Shared-cache decisions (RFC 9111 §3, §4; RFC 5861; RFC 9211) as tables; no clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastedge.cache.control import CacheControl, format_http_date, parse_cache_control
from fastedge.cache.policy import (
    Fresh,
    Miss,
    MustRevalidate,
    StaleIfError,
    StaleWhileRevalidate,
    cache_key,
    cache_status,
    current_age,
    decide,
    freshness_lifetime,
    invalidate_on_unsafe,
    is_storable,
    keep_for,
    merge_304,
    primary_key,
    revalidation_headers,
    route_cache_control,
    secondary_key,
    storable_headers,
    vary_fields,
)
from fastedge.cache.store import Entry

T0 = 1_700_000_000.0
Headers = list[tuple[bytes, bytes]]


def cc(value: str = "") -> CacheControl:
    return parse_cache_control([value.encode()] if value else [])


def storable(
    resp: str = "",
    *,
    method: bytes = b"GET",
    status: int = 200,
    req: str = "",
    headers: Headers | None = None,
    auth: bool = False,
    default_ttl: float = 0,
) -> bool:
    return is_storable(
        method,
        status,
        cc(req),
        cc(resp),
        headers or [],
        has_authorization=auth,
        default_ttl=default_ttl,
    )


# --- is_storable ------------------------------------------------------------------------


def test_methods() -> None:
    assert storable("max-age=5")
    assert storable("max-age=5", method=b"HEAD")
    assert not storable("max-age=5", method=b"POST")
    assert not storable("max-age=5", method=b"get")  # methods are case-sensitive


def test_statuses_cacheable_by_default_need_some_freshness() -> None:
    # RFC 9110 §15.1 default-cacheable: with a route default or heuristics (Last-Modified)
    assert storable(status=404, default_ttl=10)
    assert storable(status=200, headers=[(b"last-modified", format_http_date(T0))])
    assert not storable(status=200)  # nothing to compute a lifetime from
    # not cacheable by default: only with explicit freshness
    assert not storable(status=302, default_ttl=10)
    assert storable("max-age=5", status=302)
    assert storable(status=302, headers=[(b"expires", format_http_date(T0))])
    assert not storable("max-age=5", status=206)  # partial content is not understood
    assert not storable("max-age=5", status=500)


def test_no_store_and_private() -> None:
    assert not storable("max-age=5, no-store")
    assert not storable("max-age=5", req="no-store")
    assert not storable("max-age=5, private")
    # the qualified form only keeps those fields out of storage (§5.2.2.7)
    assert storable('max-age=5, private="set-cookie"')


def test_authorization_rules() -> None:
    # RFC 9111 §3.5
    assert not storable("max-age=5", auth=True)
    assert storable("max-age=5, public", auth=True)
    assert storable("s-maxage=5", auth=True)
    assert storable("max-age=5, must-revalidate", auth=True)


def test_public_alone_is_enough() -> None:
    assert storable("public", status=200)


def test_vary_star_not_stored() -> None:
    assert not storable("max-age=5", headers=[(b"vary", b"Accept, *")])
    assert vary_fields([(b"vary", b"Accept-Encoding, accept"), (b"vary", b"X-A")]) == (
        b"accept",
        b"accept-encoding",
        b"x-a",
    )


def test_storable_headers_strips_hop_by_hop_and_qualified_fields() -> None:
    headers = [
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"set-cookie", b"a=1"),
        (b"x-secret", b"s"),
        (b"etag", b'"v1"'),
    ]
    kept = storable_headers(headers, cc('no-cache="set-cookie", private="x-secret"'))
    assert kept == [(b"etag", b'"v1"')]


# --- freshness and age ------------------------------------------------------------------


def date(ts: float) -> tuple[bytes, bytes]:
    return (b"date", format_http_date(ts))


def test_freshness_precedence() -> None:
    headers = [date(T0), (b"expires", format_http_date(T0 + 100))]
    assert freshness_lifetime(cc("s-maxage=7, max-age=5"), headers, default_ttl=1) == 7
    assert freshness_lifetime(cc("max-age=5"), headers, default_ttl=1) == 5
    assert freshness_lifetime(cc(), headers, default_ttl=1) == 100
    assert freshness_lifetime(cc(), [date(T0)], default_ttl=1) == 1


def test_expires_edge_cases() -> None:
    assert freshness_lifetime(cc(), [date(T0), (b"expires", b"0")], default_ttl=60) == 0
    past = [date(T0), (b"expires", format_http_date(T0 - 10))]
    assert freshness_lifetime(cc(), past, default_ttl=60) == 0
    # no Date: the time of receipt stands in (RFC 9110 §6.6.1)
    no_date = [(b"expires", format_http_date(T0 + 30))]
    assert freshness_lifetime(cc(), no_date, default_ttl=0, response_time=T0) == 30


def test_heuristic_freshness() -> None:
    headers = [date(T0), (b"last-modified", format_http_date(T0 - 1000))]
    assert freshness_lifetime(cc(), headers, default_ttl=5, heuristic=True) == 100
    assert freshness_lifetime(cc(), headers, default_ttl=5) == 5
    old = [date(T0), (b"last-modified", format_http_date(T0 - 10**8))]
    assert freshness_lifetime(cc(), old, default_ttl=0, heuristic=True) == 86_400


def test_current_age_rfc9111_4_2_3() -> None:
    # the origin stamped Date 2 s before we got it, an upstream cache says Age: 10,
    # the request took 1 s, and it has been stored for 5 s
    headers = [date(T0 - 2), (b"age", b"10")]
    age = current_age(headers, response_time=T0, request_time=T0 - 1, now=T0 + 5)
    assert age == 10 + 1 + 5  # corrected_age_value (11) > apparent_age (2)
    # apparent age dominates when larger
    headers = [date(T0 - 30)]
    assert current_age(headers, response_time=T0, request_time=T0, now=T0) == 30
    # a Date in the future gives no negative age
    assert current_age([date(T0 + 99)], response_time=T0, request_time=T0, now=T0) == 0


# --- keys --------------------------------------------------------------------------------


def test_primary_key_normalises_host() -> None:
    k = primary_key(b"GET", b"https", b"Example.COM.:443", b"/a?b=1")
    assert k == b"GET https://example.com/a?b=1"
    assert primary_key(b"GET", b"http", b"example.com:80", b"") == b"GET http://example.com/"
    assert primary_key(b"GET", b"http", b"example.com:8080", b"/") == (
        b"GET http://example.com:8080/"
    )
    assert primary_key(b"GET", b"https", b"[::1]:443", b"/") == b"GET https://[::1]/"
    assert primary_key(b"HEAD", b"https", b"a", b"/") != primary_key(b"GET", b"https", b"a", b"/")


def test_vary_key_normalisation() -> None:
    vary = (b"accept-encoding", b"x-tenant")
    a = secondary_key(vary, [(b"accept-encoding", b"GZIP,  br"), (b"x-tenant", b"A  b")])
    b = secondary_key(
        vary, [(b"accept-encoding", b"gzip"), (b"accept-encoding", b" br "), (b"x-tenant", b"A b")]
    )
    assert a == b  # combined lines, trimmed OWS, lower-cased caseless field
    assert secondary_key(vary, [(b"x-tenant", b"a b")]) != a  # x-tenant is case-sensitive
    # absent differs from empty
    assert secondary_key((b"x",), []) != secondary_key((b"x",), [(b"x", b"")])
    full = cache_key(b"GET", b"https", b"h", b"/p", vary, [(b"accept-encoding", b"gzip")])
    assert full.startswith(b"GET https://h/p\0")
    with pytest.raises(ValueError):
        cache_key(b"GET", b"https", b"h", b"/p", (b"*",), [])


# --- decide -------------------------------------------------------------------------------


def entry(
    resp: str = "max-age=10",
    *,
    age_at: float = T0,
    lifetime: float | None = None,
    headers: Headers | None = None,
) -> Entry:
    control = cc(resp)
    hdrs = [date(age_at), *(headers or [])]
    life = freshness_lifetime(control, hdrs, default_ttl=0) if lifetime is None else lifetime
    return Entry(
        key=b"k",
        primary=b"p",
        status=200,
        headers=hdrs,
        body=[b"x"],
        cc=control,
        lifetime=life,
        request_time=T0,
        response_time=T0,
        stored_at=T0,
    )


def test_decide_no_entry() -> None:
    assert decide(None, cc(), T0) == Miss()
    assert decide(None, cc("only-if-cached"), T0) == Miss(only_if_cached=True)


def test_decide_fresh_and_stale() -> None:
    e = entry("max-age=10")
    assert decide(e, cc(), T0 + 4) == Fresh(age=4, ttl=6)
    assert decide(e, cc(), T0 + 10) == MustRevalidate(age=10, ttl=0)  # fresh needs age < 10


def test_request_directives() -> None:
    e = entry("max-age=10")
    assert isinstance(decide(e, cc("no-cache"), T0 + 1), MustRevalidate)
    assert isinstance(decide(e, cc("max-age=3"), T0 + 4), MustRevalidate)
    assert isinstance(decide(e, cc("max-age=5"), T0 + 4), Fresh)
    assert isinstance(decide(e, cc("min-fresh=7"), T0 + 4), MustRevalidate)
    assert isinstance(decide(e, cc("min-fresh=6"), T0 + 4), Fresh)
    assert decide(e, cc("max-stale=5"), T0 + 14) == Fresh(age=14, ttl=-4, stale=True)
    assert decide(e, cc("max-stale"), T0 + 10_000) == Fresh(10_000, -9_990, stale=True)
    assert isinstance(decide(e, cc("max-stale=3"), T0 + 14), MustRevalidate)
    # only-if-cached: serve what is usable, else 504
    assert isinstance(decide(e, cc("only-if-cached"), T0 + 1), Fresh)
    assert decide(e, cc("only-if-cached"), T0 + 20) == Miss(only_if_cached=True)


def test_response_no_cache_always_revalidates() -> None:
    assert isinstance(decide(entry("max-age=10, no-cache"), cc(), T0 + 1), MustRevalidate)
    # the qualified form does not (its fields were not stored)
    assert isinstance(decide(entry('max-age=10, no-cache="x"'), cc(), T0 + 1), Fresh)


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=10"])
def test_revalidate_directives_forbid_stale(directive: str) -> None:
    e = entry(f"max-age=10, {directive}, stale-while-revalidate=60, stale-if-error=60")
    assert isinstance(decide(e, cc(), T0 + 5), Fresh)
    assert isinstance(decide(e, cc(), T0 + 15), MustRevalidate)
    assert isinstance(decide(e, cc("max-stale"), T0 + 15), MustRevalidate)


def test_stale_while_revalidate_window() -> None:
    e = entry("max-age=10, stale-while-revalidate=30")
    assert decide(e, cc(), T0 + 25) == StaleWhileRevalidate(age=25, ttl=-15)
    assert decide(e, cc(), T0 + 40) == StaleWhileRevalidate(age=40, ttl=-30)
    assert isinstance(decide(e, cc(), T0 + 41), MustRevalidate)
    # a client's max-age or min-fresh is not satisfied by serving stale
    assert isinstance(decide(e, cc("max-age=20"), T0 + 25), MustRevalidate)
    assert isinstance(decide(e, cc("min-fresh=1"), T0 + 25), MustRevalidate)


def test_stale_if_error_from_response_or_request() -> None:
    e = entry("max-age=10, stale-if-error=100")
    assert decide(e, cc(), T0 + 50) == StaleIfError(age=50, ttl=-40)
    assert isinstance(decide(e, cc(), T0 + 111), MustRevalidate)
    plain = entry("max-age=10")
    assert isinstance(decide(plain, cc("stale-if-error=60"), T0 + 50), StaleIfError)
    # swr first, then sie once swr is exhausted
    both = entry("max-age=10, stale-while-revalidate=5, stale-if-error=100")
    assert isinstance(decide(both, cc(), T0 + 12), StaleWhileRevalidate)
    assert isinstance(decide(both, cc(), T0 + 20), StaleIfError)
    assert decide(both, cc("only-if-cached"), T0 + 20) == Miss(only_if_cached=True)


DIRECTIVES = [
    "max-age=10",
    "s-maxage=20",
    "no-cache",
    "must-revalidate",
    "proxy-revalidate",
    "stale-while-revalidate=30",
    "stale-if-error=60",
    "max-stale=15",
    "max-stale",
    "min-fresh=3",
    "only-if-cached",
]


@given(
    st.lists(st.sampled_from(DIRECTIVES), max_size=4),
    st.lists(st.sampled_from(DIRECTIVES), max_size=4),
    st.floats(min_value=0, max_value=500),
)
def test_decide_invariants(resp: list[str], req: list[str], elapsed: float) -> None:
    e = entry(", ".join(resp))
    request = cc(", ".join(req))
    d = decide(e, request, T0 + elapsed)
    if isinstance(d, Fresh) and not d.stale:
        assert d.age < e.lifetime  # only a truly fresh response is served as fresh
    if isinstance(d, Fresh | StaleWhileRevalidate) and d.age >= e.lifetime:
        # serving stale is never allowed when the response forbids it (§4.2.4)
        assert not (e.cc.must_revalidate or e.cc.proxy_revalidate or e.cc.s_maxage is not None)
    if isinstance(d, Fresh | StaleWhileRevalidate):
        assert not request.no_cache and not e.cc.no_cache
    if request.only_if_cached:
        assert isinstance(d, Fresh | StaleWhileRevalidate | Miss)


def test_age_header_counts() -> None:
    e = entry("max-age=10", headers=[(b"age", b"8")])
    assert decide(e, cc(), T0 + 1) == Fresh(age=9, ttl=1)


def test_keep_for() -> None:
    assert keep_for(10, cc("stale-while-revalidate=30, stale-if-error=100")) == 110
    assert keep_for(0, cc()) == 1


# --- validation ----------------------------------------------------------------------------


def test_revalidation_headers() -> None:
    e = entry(headers=[(b"etag", b'"v1"'), (b"last-modified", b"Sun, 06 Nov 1994 08:49:37 GMT")])
    assert revalidation_headers(e) == [
        (b"if-none-match", b'"v1"'),
        (b"if-modified-since", b"Sun, 06 Nov 1994 08:49:37 GMT"),
    ]
    assert revalidation_headers(entry()) == []


def test_merge_304() -> None:
    stored = [
        (b"content-type", b"text/plain"),
        (b"content-length", b"5"),
        (b"cache-control", b"max-age=1"),
        (b"x-multi", b"a"),
        (b"x-multi", b"b"),
        (b"date", b"old"),
    ]
    nm = [
        (b"cache-control", b"max-age=60"),
        (b"content-length", b"0"),
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"x-multi", b"c"),
        (b"date", b"new"),
    ]
    assert merge_304(stored, nm) == [
        (b"content-type", b"text/plain"),
        (b"content-length", b"5"),  # §3.2: never from the 304
        (b"cache-control", b"max-age=60"),
        (b"x-multi", b"c"),  # all stored lines of a field are replaced
        (b"date", b"new"),
    ]


# --- invalidation --------------------------------------------------------------------------


def test_invalidate_on_unsafe() -> None:
    uri = b"https://shop.example/cart?x=1"
    keys = invalidate_on_unsafe(b"POST", 201, uri, b"/cart/7", b"https://evil.example/a", True)
    assert keys == [
        b"GET https://shop.example/cart?x=1",
        b"HEAD https://shop.example/cart?x=1",
        b"GET https://shop.example/cart/7",  # same origin: invalidated
        b"HEAD https://shop.example/cart/7",
    ]  # the other origin's URI is not (§4.4)
    assert invalidate_on_unsafe(b"GET", 200, uri, None, None) == []
    assert invalidate_on_unsafe(b"DELETE", 500, uri, None, None) == []  # errors: nothing
    assert invalidate_on_unsafe(b"DELETE", 404, uri, None, None) == []
    only_target = invalidate_on_unsafe(b"PUT", 204, uri, b"/other", None, same_origin=False)
    assert only_target == keys[:2]
    # explicit default port is the same origin
    port = invalidate_on_unsafe(b"PATCH", 200, uri, b"https://shop.example:443/z", None)
    assert b"GET https://shop.example/z" in port


# --- route override ----------------------------------------------------------------------


def test_route_cache_control_override() -> None:
    upstream = cc("max-age=5, must-revalidate")
    out = route_cache_control(upstream, "max-age=300, stale-while-revalidate=3600")
    assert (out.max_age, out.stale_while_revalidate, out.must_revalidate) == (300, 3600, False)
    # no-store and private from the origin always survive
    assert route_cache_control(cc("no-store"), "max-age=300").no_store
    kept = route_cache_control(cc('private="x"'), 'max-age=300, private="y"')
    assert kept.private and kept.private_fields == ("y", "x")
    assert route_cache_control(cc("private"), 'private="y"').private_fields == ()
    assert route_cache_control(cc(), cc("max-age=1")).max_age == 1


# --- Cache-Status ------------------------------------------------------------------------


def test_cache_status_rfc9211() -> None:
    assert cache_status(hit=True, ttl=12.7) == b"fastedge; hit; ttl=12"
    assert cache_status(hit=True, ttl=-3.2) == b"fastedge; hit; ttl=-4"
    assert cache_status(fwd="uri-miss", fwd_status=200, stored=True) == (
        b"fastedge; fwd=uri-miss; fwd-status=200; stored"
    )
    assert cache_status(fwd="stale", collapsed=True, detail="stale-if-error") == (
        b"fastedge; fwd=stale; collapsed; detail=stale-if-error"
    )
    assert cache_status(fwd="bypass", detail="too big", key='a"b') == (
        b'fastedge; fwd=bypass; key="a\\"b"; detail="too big"'
    )
    with pytest.raises(ValueError):
        cache_status(hit=True, fwd="miss")
    with pytest.raises(ValueError):
        cache_status(fwd="nope")
