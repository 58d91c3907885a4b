"""CacheStore (variants, streaming fill, bounds, purges) and CoalescingLocks."""

from __future__ import annotations

import asyncio

import pytest

from fastedge.cache.control import CacheControl, parse_cache_control
from fastedge.cache.policy import decide, primary_key
from fastedge.cache.store import ENTRY_OVERHEAD, CacheStore, CoalescingLocks, Entry

T0 = 1_700_000_000.0
Headers = list[tuple[bytes, bytes]]
CC = parse_cache_control([b"max-age=60"])


def store(max_bytes: int = 1 << 20, max_object_size: int = 64 << 10) -> CacheStore:
    return CacheStore(max_bytes, max_object_size=max_object_size, clock=lambda: T0)


def url(path: str) -> bytes:
    return primary_key(b"GET", b"https", b"example.test", path.encode())


def put(
    s: CacheStore,
    path: str,
    body: bytes = b"hello",
    *,
    headers: Headers | None = None,
    request: Headers | None = None,
    cc: CacheControl = CC,
) -> bool:
    return s.put(
        url(path),
        request or [],
        status=200,
        headers=headers or [(b"content-type", b"text/plain")],
        body=body,
        cc=cc,
        lifetime=60,
        request_time=T0,
        response_time=T0,
        keep=60,
    )


def test_put_lookup_and_decide() -> None:
    s = store()
    assert s.lookup(url("/a"), []) is None
    assert put(s, "/a")
    entry = s.lookup(url("/a"), [])
    assert entry is not None and entry.body == [b"hello"] and entry.status == 200
    assert isinstance(entry, Entry)
    assert decide(entry, parse_cache_control([]), T0 + 1).__class__.__name__ == "Fresh"
    stats = s.stats()
    assert stats["hits"] == 1 and stats["urls"] == 1 and stats["fills_committed"] == 1


def test_streaming_fill_commit() -> None:
    s = store()
    filler = s.begin_fill(
        url("/s"),
        [],
        status=200,
        headers=[],
        cc=CC,
        lifetime=60,
        request_time=T0,
        response_time=T0,
    )
    assert filler is not None
    assert s.lookup(url("/s"), []) is None  # nothing visible while filling
    for part in (b"ab", b"", b"cd"):
        assert filler.append(part)
    assert filler.commit(keep=60)
    entry = s.lookup(url("/s"), [])
    assert entry is not None and b"".join(entry.body) == b"abcd" and entry.body_length == 4
    assert not filler.append(b"more")  # a committed fill takes nothing more


def test_fill_beyond_max_object_size_aborts_and_drops() -> None:
    s = store(max_object_size=ENTRY_OVERHEAD + 100)
    filler = s.begin_fill(
        url("/big"),
        [],
        status=200,
        headers=[],
        cc=CC,
        lifetime=60,
        request_time=T0,
        response_time=T0,
    )
    assert filler is not None
    assert filler.append(b"x" * 60)
    assert not filler.append(b"x" * 60)  # passes the limit: aborted
    assert filler.state == "aborted" and not filler.active
    assert not filler.commit(keep=60)
    assert s.lookup(url("/big"), []) is None
    assert s.stats()["fills_too_large"] == 1
    # a known Content-Length beyond the limit never even starts a fill
    assert (
        s.begin_fill(
            url("/big"),
            [],
            status=200,
            headers=[],
            cc=CC,
            lifetime=60,
            request_time=T0,
            response_time=T0,
            content_length=10_000,
        )
        is None
    )


def test_abort_drops_partial() -> None:
    s = store()
    filler = s.begin_fill(
        url("/x"),
        [],
        status=200,
        headers=[],
        cc=CC,
        lifetime=60,
        request_time=T0,
        response_time=T0,
    )
    assert filler is not None
    filler.append(b"partial")
    filler.abort()
    assert not filler.commit(keep=60)
    assert s.lookup(url("/x"), []) is None and len(s) == 0


def test_vary_variants_and_vary_change() -> None:
    s = store()
    vary = [(b"vary", b"Accept-Encoding")]
    assert put(s, "/v", b"gz", headers=vary, request=[(b"accept-encoding", b"gzip")])
    assert put(s, "/v", b"br", headers=vary, request=[(b"accept-encoding", b"br")])
    gz = s.lookup(url("/v"), [(b"accept-encoding", b"GZIP")])
    br = s.lookup(url("/v"), [(b"accept-encoding", b"br")])
    assert gz is not None and gz.body == [b"gz"]
    assert br is not None and br.body == [b"br"]
    assert s.lookup(url("/v"), []) is None  # absent field: a different variant
    # a newer response varying on something else replaces the variant set (§4.1)
    assert put(s, "/v", b"lang", headers=[(b"vary", b"accept-language")])
    assert s.lookup(url("/v"), [(b"accept-language", b"en")]) is None
    lang = s.lookup(url("/v"), [(b"accept-encoding", b"gzip")])  # now selected on language
    assert lang is not None and lang.body == [b"lang"]
    variants = s.variants(url("/v"))
    assert variants is not None and len(variants.keys) == 1 and len(s) == 1
    # Vary: * is never stored
    assert not put(s, "/star", headers=[(b"vary", b"*")])


def test_byte_bound_evicts_and_keeps_index_consistent() -> None:
    s = store(max_bytes=4 * (ENTRY_OVERHEAD + 200), max_object_size=ENTRY_OVERHEAD + 200)
    for i in range(10):
        assert put(s, f"/{i}", b"x" * 100, headers=[])
    stats = s.stats()
    assert stats["len"] == 4 and stats["urls"] == 4 and stats["evictions"] == 6
    assert stats["bytes"] is not None and stats["bytes"] <= 4 * (ENTRY_OVERHEAD + 200)
    assert s.lookup(url("/0"), []) is None and s.lookup(url("/9"), []) is not None


def test_expiry_by_keep() -> None:
    s = store()
    put(s, "/e")
    assert s.lookup(url("/e"), [], now=T0 + 59) is not None
    assert s.lookup(url("/e"), [], now=T0 + 61) is None
    assert s.variants(url("/e")) is None


def test_refresh_after_304() -> None:
    s = store()
    put(s, "/r")
    entry = s.lookup(url("/r"), [])
    assert entry is not None
    new_cc = parse_cache_control([b"max-age=600"])
    assert s.refresh(
        entry,
        headers=[(b"etag", b'"2"')],
        cc=new_cc,
        lifetime=600,
        request_time=T0 + 50,
        response_time=T0 + 50,
        keep=600,
        now=T0 + 50,
    )
    again = s.lookup(url("/r"), [], now=T0 + 500)
    assert again is entry and again.lifetime == 600 and again.headers == [(b"etag", b'"2"')]
    s.purge(url("/r"))
    assert not s.refresh(
        entry, headers=[], cc=new_cc, lifetime=1, request_time=T0, response_time=T0, keep=1
    )


def test_purge_exact_and_prefix() -> None:
    s = store()
    for p in ("/api/a", "/api/b", "/api/b?x=1", "/other"):
        put(s, p)
    put(s, "/api/v", headers=[(b"vary", b"x")], request=[(b"x", b"1")])
    put(s, "/api/v", headers=[(b"vary", b"x")], request=[(b"x", b"2")])
    v1 = s.lookup(url("/api/v"), [(b"x", b"1")])
    assert v1 is not None
    assert s.purge(v1.key) == 1  # one variant by its full key
    assert s.lookup(url("/api/v"), [(b"x", b"2")]) is not None
    assert s.purge(url("/api/a")) == 1
    assert s.purge(url("/nothing")) == 0
    assert s.purge_prefix(b"https://example.test/api/") == 3  # b, b?x=1, v (x=2)
    assert s.lookup(url("/other"), []) is not None
    assert s.stats()["urls"] == 1 and s.stats()["purged"] == 5


def test_bad_bounds() -> None:
    with pytest.raises(ValueError):
        CacheStore(100, max_object_size=200)
    with pytest.raises(ValueError):
        CacheStore(100, max_object_size=0)


# --- coalescing ---------------------------------------------------------------------------


async def test_fifty_concurrent_misses_one_upstream_fetch() -> None:
    s = store()
    locks = CoalescingLocks()
    fetches = 0
    release = asyncio.Event()

    async def fetch() -> bytes:
        nonlocal fetches
        fetches += 1
        await release.wait()  # every other request arrives while this one is in flight
        return b"origin"

    async def request() -> tuple[str, bytes]:
        key = url("/hot")
        entry = s.lookup(key, [])
        if entry is not None:
            return "hit", b"".join(entry.body)
        async with locks.fill(key, wait=30) as leader:
            if not leader:
                entry = s.lookup(key, [])
                if entry is not None:
                    return "collapsed", b"".join(entry.body)
            body = await fetch()
            put(s, "/hot", body)
            return "fetched", body

    tasks = [asyncio.create_task(request()) for _ in range(50)]
    while fetches == 0 or len(locks) == 0:
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)  # let all 50 reach the lock
    release.set()
    results = await asyncio.gather(*tasks)
    assert fetches == 1
    assert sorted(r[0] for r in results) == ["collapsed"] * 49 + ["fetched"]
    assert all(body == b"origin" for _, body in results)
    assert locks.coalesced == 49 and len(locks) == 0


async def test_followers_give_up_after_wait_and_go_upstream() -> None:
    locks = CoalescingLocks()
    leader_in = asyncio.Event()
    hold = asyncio.Event()

    async def leader() -> bool:
        async with locks.fill("k") as is_leader:
            leader_in.set()
            await hold.wait()
            return is_leader

    lead = asyncio.create_task(leader())
    await leader_in.wait()
    async with locks.fill("k", wait=0.01) as is_leader:
        assert not is_leader  # released by the bound, not by the leader
    assert locks.timed_out == 1
    hold.set()
    assert await lead
    assert len(locks) == 0


async def test_leader_failure_releases_followers() -> None:
    locks = CoalescingLocks()
    started = asyncio.Event()

    async def failing_leader() -> None:
        async with locks.fill("k"):
            started.set()
            await asyncio.sleep(0)
            raise ConnectionError("upstream down")

    task = asyncio.create_task(failing_leader())
    await started.wait()
    async with locks.fill("k", wait=30) as is_leader:
        assert not is_leader
    with pytest.raises(ConnectionError):
        await task
    async with locks.fill("k") as is_leader:
        assert is_leader  # the next miss leads a new fill
