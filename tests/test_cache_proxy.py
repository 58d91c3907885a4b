"""The cache filter through a real proxy, written from RFC 9111 (and RFC 5861, 9211).

Every test talks to a running proxy over loopback, in front of ``tests/cache_origin.py``
(its own process) which counts the requests it gets: "served from storage" means "the
origin's count did not move", never a timing. Stored responses are aged by moving the
cache's clock (``Clock.advance``), not by sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import pytest

from tests.cache_fixtures import (
    cache_origin_process,
    cached_proxy,
    q,
    start_cache_origin,
    unique,
)
from tests.conftest import stop_origin


@pytest.fixture(scope="module")
def cache_origin() -> Iterator[int]:
    """A cache origin process for this module."""
    yield from cache_origin_process()


def member(headers: object) -> str:
    value = headers.get("cache-status")  # type: ignore[attr-defined]
    assert value is not None, "every answer on a cached route carries Cache-Status"
    return str(value)


# --- §4.2 freshness, §5.1 Age, RFC 9211 Cache-Status ------------------------------------


async def test_fresh_response_is_served_from_storage_with_age(
    cache_origin: int, engine_name: str
) -> None:
    async with cached_proxy(cache_origin, engine_name) as p:
        t = unique("fresh") + q(cc="max-age=60")
        status, h, first = await p.get(t)
        assert status == 200
        assert member(h) == "fastedge; fwd=uri-miss; fwd-status=200; ttl=60; stored"
        assert h.get("age") is None  # not from storage
        p.clock.advance(10)
        status, h, body = await p.get(t)
        assert (status, body) == (200, first)
        assert h["age"] == "10"  # §4.2.3: resident time
        assert member(h) in ("fastedge; hit; ttl=50", "fastedge; hit; ttl=49")
        assert int(h["content-length"]) == len(body)
        assert await p.count(t) == 1


async def test_max_age_expiry_goes_to_the_origin_again(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("expiry") + q(cc="max-age=5")
        await p.get(t)
        p.clock.advance(6)
        status, h, body = await p.get(t)
        assert status == 200 and b"n=2" in body
        # Without validators a stale entry is useless: it was dropped when it expired.
        assert member(h).startswith("fastedge; fwd=uri-miss; fwd-status=200")
        assert await p.count(t) == 2


async def test_s_maxage_wins_over_max_age_in_a_shared_cache(cache_origin: int) -> None:
    # §4.2.1: a shared cache uses s-maxage before max-age.
    async with cached_proxy(cache_origin) as p:
        t = unique("smaxage") + q(cc="max-age=1, s-maxage=100")
        await p.get(t)
        p.clock.advance(50)
        _, h, _ = await p.get(t)
        assert member(h).startswith("fastedge; hit")
        assert await p.count(t) == 1


async def test_expires_minus_date_is_the_lifetime(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("expires") + q(expires=30)
        await p.get(t)
        p.clock.advance(20)
        _, h, _ = await p.get(t)
        assert member(h).startswith("fastedge; hit")
        p.clock.advance(20)
        _, h, body = await p.get(t)
        assert b"n=2" in body and "fwd=" in member(h)


async def test_no_explicit_freshness_is_not_stored_unless_the_route_sets_a_default(
    cache_origin: int,
) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("plain")
        await p.get(t)
        _, h, body = await p.get(t)
        assert b"n=2" in body and member(h) == "fastedge; fwd=uri-miss; fwd-status=200"
    async with cached_proxy(cache_origin, cache={"default_ttl": "30s"}) as p:
        t = unique("plain-ttl")
        await p.get(t)
        p.clock.advance(29)
        _, h, body = await p.get(t)
        assert b"n=1" in body and member(h).startswith("fastedge; hit")


async def test_route_override_imposes_its_policy(cache_origin: int) -> None:
    # The upstream says max-age=1; the route imposes max-age=300.
    async with cached_proxy(cache_origin, cache={"override": "max-age=300"}) as p:
        t = unique("override") + q(cc="max-age=1")
        await p.get(t)
        p.clock.advance(200)
        _, h, body = await p.get(t)
        assert b"n=1" in body and member(h).startswith("fastedge; hit")
        # ... but never over the origin's no-store.
        t2 = unique("override-nostore") + q(cc="no-store")
        await p.get(t2)
        _, h, body = await p.get(t2)
        assert b"n=2" in body


# --- §4.1 Vary ------------------------------------------------------------------------


async def test_vary_selects_a_variant_by_the_named_request_fields(
    cache_origin: int, engine_name: str
) -> None:
    async with cached_proxy(cache_origin, engine_name) as p:
        t = unique("vary") + q(cc="max-age=60", vary="Accept-Language")
        _, _, en = await p.get(t, {"Accept-Language": "en"})
        _, h, fr = await p.get(t, {"Accept-Language": "fr"})
        assert en != fr and "fwd=vary-miss" in member(h)
        # Normalised as §4.1 allows: case (a caseless field) and whitespace.
        _, h, again = await p.get(t, {"Accept-Language": "  EN "})
        assert again == en and member(h).startswith("fastedge; hit")
        _, h, none = await p.get(t)  # absent only matches absent
        assert none not in (en, fr)
        assert await p.count(t) == 3


async def test_vary_star_is_never_stored(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("varystar") + q(cc="max-age=60", vary="*")
        await p.get(t)
        await p.get(t)
        assert await p.count(t) == 2


# --- §4.3 validation ------------------------------------------------------------------


async def test_etag_revalidation_304_updates_the_stored_headers(
    cache_origin: int, engine_name: str
) -> None:
    async with cached_proxy(cache_origin, engine_name) as p:
        t = unique("etag") + q(cc="max-age=5", etag='"v1"', field="x-version: 1")
        _, _, first = await p.get(t)
        p.clock.advance(10)
        await p.origin_set(t, field="x-version: 2")  # the 304 will carry x-version: 2
        status, h, body = await p.get(t)
        # §4.3.4: the client gets the stored response with the 304's fields.
        assert (status, body) == (200, first)
        assert h["x-version"] == "2" and h["age"] == "0"
        assert member(h) == "fastedge; fwd=stale; fwd-status=304; ttl=5"
        sent = (await p.origin_log(t))["requests"][1]["headers"]
        assert ["if-none-match", '"v1"'] in sent
        # The refreshed entry is fresh again, with the new field.
        _, h, body = await p.get(t)
        assert body == first and h["x-version"] == "2" and member(h).startswith("fastedge; hit")
        assert await p.count(t) == 2


async def test_last_modified_revalidation(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("lm") + q(cc="max-age=5", lm=3600)
        _, _, first = await p.get(t)
        p.clock.advance(10)
        status, h, body = await p.get(t)
        assert (status, body) == (200, first) and "fwd-status=304" in member(h)
        sent = dict((await p.origin_log(t))["requests"][1]["headers"])
        assert "if-modified-since" in sent and "if-none-match" not in sent


async def test_client_conditional_is_answered_by_the_cache(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("cond") + q(cc="max-age=5", etag='"v1"')
        await p.get(t)
        # Fresh: evaluated against the stored response (RFC 9111 §4.3.2).
        status, h, body = await p.get(t, {"If-None-Match": 'W/"v1", "other"'})
        assert (status, body) == (304, b"") and h["etag"] == '"v1"' and "age" in h
        status, _, body = await p.get(t, {"If-None-Match": '"v0"'})
        assert status == 200 and body
        # Stale: we revalidate with our validators, then answer the client's 304.
        p.clock.advance(10)
        status, h, _ = await p.get(t, {"If-None-Match": '"v1"'})
        assert status == 304 and "fwd-status=304" in member(h)
        assert await p.count(t) == 2


async def test_a_changed_resource_replaces_the_stored_one(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("changed") + q(cc="max-age=5", etag='"v1"')
        await p.get(t)
        p.clock.advance(10)
        await p.origin_set(t, etag='"v2"')
        _, h, body = await p.get(t)
        assert b"n=2" in body and h["etag"] == '"v2"' and "stored" in member(h)
        _, h, body = await p.get(t)
        assert b"n=2" in body and member(h).startswith("fastedge; hit")


async def test_no_cache_response_is_always_revalidated(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("nocache") + q(cc="no-cache, max-age=600", etag='"v1"')
        _, _, first = await p.get(t)
        status, h, body = await p.get(t)
        assert (status, body) == (200, first) and "fwd-status=304" in member(h)
        assert await p.count(t) == 2


async def test_request_no_cache_and_max_age(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("reqcc") + q(cc="max-age=600", etag='"v1"')
        await p.get(t)
        _, h, _ = await p.get(t, {"Cache-Control": "no-cache"})
        assert member(h).startswith("fastedge; fwd=request; fwd-status=304")
        p.clock.advance(100)
        _, h, _ = await p.get(t, {"Cache-Control": "max-age=50"})  # too old for this client
        assert "fwd=request" in member(h)
        _, h, _ = await p.get(t, {"Cache-Control": "max-age=500"})
        assert member(h).startswith("fastedge; hit")
        assert await p.count(t) == 3


async def test_must_revalidate_never_serves_stale_and_max_stale_may(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("maxstale") + q(cc="max-age=5", etag='"v1"')
        await p.get(t)
        p.clock.advance(30)
        _, h, body = await p.get(t, {"Cache-Control": "max-stale=60"})
        assert b"n=1" in body and member(h).startswith("fastedge; hit; ttl=-26")
        t2 = unique("mustreval") + q(cc="max-age=5, must-revalidate", etag='"v1"')
        await p.get(t2)
        p.clock.advance(30)
        _, h, body = await p.get(t2, {"Cache-Control": "max-stale=60"})
        assert "fwd=stale; fwd-status=304" in member(h)  # revalidated, not served stale
        assert await p.count(t2) == 2


# --- §3 storing: no-store, private, Authorization, cookies ----------------------------


@pytest.mark.parametrize(
    ("cc", "stored"),
    [
        ("no-store, max-age=60", False),
        ("private, max-age=60", False),
        ('private="x-secret", max-age=60', True),
        ("public, max-age=60", True),
    ],
)
async def test_response_directives_that_forbid_storing(
    cache_origin: int, cc: str, stored: bool
) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("store") + q(cc=cc, field="x-secret: mine")
        await p.get(t)
        _, h, body = await p.get(t)
        assert (b"n=1" in body) is stored
        if stored and "private" in cc:
            assert "x-secret" not in h  # §5.2.2.7: the named field is not stored


async def test_request_no_store_is_not_stored(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("reqnostore") + q(cc="max-age=60")
        await p.get(t, {"Cache-Control": "no-store"})
        _, _, body = await p.get(t)
        assert b"n=2" in body


async def test_authorization_requires_explicit_permission(cache_origin: int) -> None:
    # §3.5: a shared cache stores a response to an authorised request only when
    # public, s-maxage or must-revalidate allow it.
    async with cached_proxy(cache_origin) as p:
        auth = {"Authorization": "Bearer alice"}
        t = unique("auth") + q(cc="max-age=60")
        await p.get(t, auth)
        await p.get(t, auth)
        assert await p.count(t) == 2
        t2 = unique("auth-public") + q(cc="public, max-age=60")
        await p.get(t2, auth)
        await p.get(t2, auth)
        assert await p.count(t2) == 1


async def test_a_response_setting_a_cookie_is_not_stored(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("cookie") + q(cc="max-age=60", set_cookie="session=abc")
        await p.get(t)
        _, h, body = await p.get(t)
        assert b"n=2" in body and h["set-cookie"] == "session=abc"


# --- §4.4 invalidation ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_unsafe_methods_invalidate_the_uri(cache_origin: int, method: str) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("unsafe") + q(cc="max-age=600")
        await p.get(t)
        status, h, _ = await p.get(t, method=method)
        assert status == 200 and member(h) == "fastedge; fwd=method; fwd-status=200"
        _, h, body = await p.get(t)
        assert b"n=3" in body and "fwd=uri-miss" in member(h)


async def test_unsafe_method_invalidates_location_and_content_location(
    cache_origin: int,
) -> None:
    async with cached_proxy(cache_origin) as p:
        a = unique("loc-a") + q(cc="max-age=600")
        b = unique("loc-b") + q(cc="max-age=600")
        other = unique("loc-other") + q(cc="max-age=600")
        for t in (a, b, other):
            await p.get(t)
        post = unique("poster") + q(
            location=a,
            content_location=f"http://{p.host}{b}",
        )
        await p.get(post, method="POST")
        # A Location on another origin must not invalidate anything here (§4.4).
        evil = unique("evil") + q(location=f"http://elsewhere.test{other}")
        await p.get(evil, method="POST")
        assert b"n=2" in (await p.get(a))[2]
        assert b"n=2" in (await p.get(b))[2]
        assert b"n=1" in (await p.get(other))[2]


async def test_an_error_answer_to_an_unsafe_method_invalidates_nothing(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("unsafe-err") + q(cc="max-age=600")
        await p.get(t)
        await p.origin_set(t, status=500)
        status, _, _ = await p.get(t, method="POST")
        assert status == 500
        _, h, _ = await p.get(t)
        assert member(h).startswith("fastedge; hit")


# --- RFC 5861 stale-while-revalidate and stale-if-error --------------------------------


async def test_stale_while_revalidate_answers_at_once_and_refreshes_once(
    cache_origin: int, engine_name: str
) -> None:
    async with cached_proxy(cache_origin, engine_name) as p:
        t = unique("swr") + q(cc="max-age=1, stale-while-revalidate=600")
        _, _, first = await p.get(t)
        p.clock.advance(10)
        # The origin now never answers: whoever waited for it would hang. Every one of
        # these requests is answered stale, and only one refresh is started.
        await p.origin_set(t, mode="hang")
        answers = [await p.get(t) for _ in range(10)]
        for status, h, body in answers:
            assert (status, body) == (200, first)
            # ttl = lifetime - age = 1 - 10.00x, rounded towards -inf (RFC 9211 §2.4)
            assert member(h) == "fastedge; hit; ttl=-10; detail=stale-while-revalidate"
            assert h["age"] == "10"
        await p.wait_for_count(t, 2)
        assert await p.count(t) == 2
        assert p.edge.refreshes == 1 and p.edge.stats()["requests"]["stale"] == 10


async def test_the_background_refresh_replaces_the_stale_entry(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("swr-refresh") + q(cc="max-age=1, stale-while-revalidate=600")
        await p.get(t)
        p.clock.advance(10)
        _, _, stale = await p.get(t)
        assert b"n=1" in stale
        await p.wait_for_count(t, 2)
        for _ in range(200):  # the refresh stores right after the origin answered
            _, h, body = await p.get(t)
            if b"n=2" in body:
                break
            await asyncio.sleep(0.01)
        assert b"n=2" in body and member(h).startswith("fastedge; hit; ttl=")
        assert await p.count(t) == 2


async def test_background_refresh_revalidates_with_the_stored_validators(
    cache_origin: int,
) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("swr-etag") + q(cc="max-age=1, stale-while-revalidate=600", etag='"v1"')
        await p.get(t)
        p.clock.advance(10)
        await p.get(t)
        await p.wait_for_count(t, 2)
        sent = (await p.origin_log(t))["requests"][1]["headers"]
        assert ["if-none-match", '"v1"'] in sent
        for _ in range(200):  # after the 304 is merged the entry is fresh again
            _, h, body = await p.get(t)
            if "detail=stale" not in member(h):
                break
            await asyncio.sleep(0.01)
        assert b"n=1" in body and member(h).startswith("fastedge; hit; ttl=")


async def test_stale_if_error_when_the_origin_is_down(engine_name: str) -> None:
    proc, port = start_cache_origin()
    try:
        async with cached_proxy(port, engine_name) as p:
            sie = unique("sie") + q(cc="max-age=1, stale-if-error=600")
            # (validators keep the two below stored after they expire, for revalidation)
            plain = unique("nosie") + q(cc="max-age=1", etag='"v1"')
            strict = unique("strict") + q(cc="max-age=1, must-revalidate", etag='"v1"')
            _, _, first = await p.get(sie)
            await p.get(plain)
            await p.get(strict)
            stop_origin(proc)  # the origin is gone: connections are refused
            p.clock.advance(10)
            status, h, body = await p.get(sie)
            assert (status, body) == (200, first)
            assert member(h) == "fastedge; hit; ttl=-10; detail=stale-if-error"
            assert h["age"] == "10"
            status, h, _ = await p.get(plain)
            assert status == 502 and "fwd=stale" in member(h)
            # §5.2.2.2: must-revalidate and no upstream → 504.
            status, h, _ = await p.get(strict)
            assert status == 504 and "fwd=stale" in member(h)
    finally:
        stop_origin(proc)


async def test_stale_if_error_on_a_5xx(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("sie5xx") + q(cc="max-age=1, stale-if-error=600")
        _, _, first = await p.get(t)
        p.clock.advance(10)
        await p.origin_set(t, status=503)
        status, h, body = await p.get(t)
        assert (status, body) == (200, first) and "detail=stale-if-error" in member(h)
        await p.origin_set(t, status=404)  # not an error stale-if-error covers
        status, h, _ = await p.get(t)
        assert status == 404 and "fwd-status=404" in member(h)
        assert await p.count(t) == 3


async def test_stale_if_error_from_the_request(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("sie-req") + q(cc="max-age=1", etag='"v1"')
        _, _, first = await p.get(t)
        p.clock.advance(10)
        await p.origin_set(t, status=500)
        status, _, body = await p.get(t, {"Cache-Control": "stale-if-error=60"})
        assert (status, body) == (200, first)


# --- §5.2.1.7 only-if-cached, HEAD ----------------------------------------------------


async def test_only_if_cached(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("oic") + q(cc="max-age=60")
        status, h, body = await p.get(t, {"Cache-Control": "only-if-cached"})
        assert status == 504 and b'"status":504' in body
        assert member(h) == "fastedge; detail=only-if-cached"
        assert await p.count(t) == 0
        await p.get(t)
        status, h, _ = await p.get(t, {"Cache-Control": "only-if-cached"})
        assert status == 200 and member(h).startswith("fastedge; hit")


async def test_head_is_answered_from_a_stored_get(cache_origin: int, engine_name: str) -> None:
    async with cached_proxy(cache_origin, engine_name) as p:
        t = unique("head") + q(cc="max-age=60")
        _, _, body = await p.get(t)
        status, h, head_body = await p.get(t, method="HEAD")
        assert (status, head_body) == (200, b"")
        assert int(h["content-length"]) == len(body) and member(h).startswith("fastedge; hit")
        assert await p.count(t) == 1
        # A HEAD miss goes upstream and stores nothing.
        t2 = unique("head-miss") + q(cc="max-age=60")
        status, h, _ = await p.get(t2, method="HEAD")
        assert status == 200 and "fwd=uri-miss" in member(h) and "stored" not in member(h)
        _, _, body = await p.get(t2)
        assert b"n=2" in body


# --- streaming fill and max_object_size -----------------------------------------------


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_large_responses_pass_through_uncached_and_intact(
    cache_origin: int, engine_name: str, chunked: str
) -> None:
    size = 300_000
    expected = hashlib.sha256((bytes(range(256)) * (size // 256 + 1))[:size]).hexdigest()
    async with cached_proxy(cache_origin, engine_name, cache={"max_object_size": "64KiB"}) as p:
        t = unique("large") + q(cc="max-age=60", size=size, chunked=chunked)
        for _ in range(2):
            status, _, body = await p.get(t)
            assert status == 200 and hashlib.sha256(body).hexdigest() == expected
        assert await p.count(t) == 2
        assert p.edge.stats()["fills"]["too_large"] == 2
        # A response that fits streams to the client and is stored on the way.
        small = unique("small") + q(cc="max-age=60", size=60_000, chunked=chunked)
        _, _, first = await p.get(small)
        _, h, second = await p.get(small)
        assert first == second and len(first) == 60_000 and "hit" in member(h)
