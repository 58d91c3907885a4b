"""The cache in operation: request coalescing (in one process and across instances
through Redis), admin purge and statistics, metrics, tracing, reloads, configuration
errors and ``fastedge reverse-proxy --cache``."""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from fastedge.config import ConfigError, parse_config
from fastedge.server import ProxyServer
from tests.cache_fixtures import (
    Clock,
    cache_doc,
    cache_origin_process,
    cached_proxy,
    q,
    unique,
)
from tests.conftest import ROOT, Client, call, free_port, get, running_demo, wait_port

TOKEN = "cache-admin-token"


@pytest.fixture(scope="module")
def cache_origin() -> Iterator[int]:
    """A cache origin process for this module."""
    yield from cache_origin_process()


async def fetch(
    port: int, target: str, host: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One GET on its own connection, without threads (so 100 can run at once)."""
    client = await Client.open(port)
    try:
        await client.send(get(target, host=host or f"127.0.0.1:{port}"))
        resp = await client.read_response(timeout=30)
    finally:
        await client.close()
    headers = {n.decode(): v.decode() for n, v in resp.headers}
    return resp.status, headers, resp.body


# --- request coalescing ----------------------------------------------------------------


async def test_100_concurrent_misses_make_exactly_one_origin_request(
    cache_origin: int, engine_name: str
) -> None:
    async with cached_proxy(cache_origin, engine_name) as p:
        # The origin takes a while, so the misses really overlap.
        t = unique("coalesce") + q(cc="max-age=60", delay_ms=300)
        answers = await asyncio.gather(*(fetch(p.port, t) for _ in range(100)))
        assert {status for status, _, _ in answers} == {200}
        assert len({body for _, _, body in answers}) == 1
        assert await p.count(t) == 1
        statuses = [h["cache-status"] for _, h, _ in answers]
        assert sum("stored" in s for s in statuses) == 1
        assert all("stored" in s or "hit" in s or "collapsed" in s for s in statuses)
        assert p.edge.locks.coalesced >= 1 and len(p.edge.locks) == 0


async def test_followers_go_upstream_when_the_response_is_not_storable(
    cache_origin: int,
) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("nocoalesce") + q(cc="no-store", delay_ms=100)
        answers = await asyncio.gather(*(fetch(p.port, t) for _ in range(5)))
        assert {status for status, _, _ in answers} == {200}
        assert await p.count(t) == 5  # each one fetched (none was left waiting)
        assert len(p.edge.locks) == 0


async def test_a_follower_gives_up_after_coalesce_wait(cache_origin: int) -> None:
    async with cached_proxy(
        cache_origin, cache={"coalesce_wait": "50ms"}, response_timeout="1s"
    ) as p:
        t = unique("giveup") + q(cc="max-age=60")
        await p.origin_set(t, mode="hang")
        leader = asyncio.ensure_future(fetch(p.port, t))
        await p.wait_for_count(t, 1)
        await p.origin_set(t, mode="ok")
        status, h, _ = await fetch(p.port, t)  # waited 50 ms, then went upstream itself
        assert status == 200 and "fwd=uri-miss" in h["cache-status"]
        assert p.edge.locks.timed_out == 1
        status, h, _ = await leader  # the hung leader ends by the upstream timeout
        assert status == 504 and "cache-status" in h
        assert len(p.edge.locks) == 0


async def test_a_leader_whose_client_leaves_lets_the_followers_go(cache_origin: int) -> None:
    async with cached_proxy(cache_origin, cache={"coalesce_wait": "30s"}) as p:
        t = unique("leave") + q(cc="max-age=60")
        await p.origin_set(t, mode="hang")
        client = await Client.open(p.port)
        await client.send(get(t, host=p.host))
        await p.wait_for_count(t, 1)
        assert len(p.edge.locks) == 1
        await p.origin_set(t, mode="ok")
        follower = asyncio.ensure_future(fetch(p.port, t))
        # The leader's client gives up with a reset (a FIN alone is a half-close the
        # proxy still answers): its fill will never come.
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()
        status, h, _ = await follower  # released at once, not after 30 s
        assert status == 200 and "stored" in h["cache-status"]
        assert len(p.edge.locks) == 0 and p.edge.locks.timed_out == 0


async def test_coalescing_across_instances_through_redis(cache_origin: int, redis_url: str) -> None:
    """Two fastedge instances (separate stores and locks) share a Redis: a burst of
    misses on both costs the origin one request."""
    prefix = f"fastedge-test:{unique('x')[1:]}:"
    extra: dict[str, Any] = {"redis": {"url": redis_url, "key_prefix": prefix}}
    t = unique("shared") + q(cc="max-age=60", delay_ms=300, vary="accept")
    async with (
        cached_proxy(cache_origin, extra=extra) as a,
        cached_proxy(cache_origin, extra=extra) as b,
    ):
        assert a.edge is not b.edge and a.edge.shared is not None
        # Behind a load balancer every instance sees the same Host: the same key.
        answers = await asyncio.gather(
            *(fetch(port, t, "shop.example") for port in [a.port, b.port] * 10)
        )
        assert {status for status, _, _ in answers} == {200}
        assert len({body for _, _, body in answers}) == 1
        assert await a.count(t) == 1
        # b stored what a published (or the reverse): both answer from storage now.
        for proxy in (a, b):
            _, h, _ = await fetch(proxy.port, t, "shop.example")
            assert h["cache-status"].startswith("fastedge; hit")


async def test_redis_down_means_local_coalescing_only(cache_origin: int) -> None:
    dead = free_port()
    extra = {"redis": {"url": f"redis://127.0.0.1:{dead}/0", "timeout": "100ms"}}
    async with cached_proxy(cache_origin, extra=extra) as p:
        t = unique("redisdown") + q(cc="max-age=60")
        status, _, _ = await fetch(p.port, t)
        assert status == 200
        _, h, _ = await fetch(p.port, t)
        assert h["cache-status"].startswith("fastedge; hit")
        assert p.edge.stats()["shared_failures"] >= 1


# --- admin ---------------------------------------------------------------------------------


async def admin(p: Any, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    port = p.server._admin.port
    headers = {"Authorization": f"Bearer {TOKEN}"}
    status, _, answer = await call(port, method, path, headers, body)
    return status, orjson.loads(answer)


async def test_admin_purge_by_url_and_prefix(cache_origin: int) -> None:
    async with cached_proxy(cache_origin, admin_token=TOKEN) as p:
        base = unique("purge")
        a, b, c = f"{base}/a", f"{base}/b?x=1", unique("keep")
        for t in (a, b, c):
            await p.origin_set(t, cc="max-age=600")
            await p.get(t)
        origin = f"http://{p.host}"
        status, data = await admin(p, "DELETE", f"/cache?url={origin}{a}")
        assert status == 200 and data == {"purged": 1, "caches": {"edge": 1}}
        assert b"n=2" in (await p.get(a))[2]
        # A prefix covers everything under it, query strings included.
        status, data = await admin(p, "DELETE", f"/cache?prefix={origin}{base}/&cache=edge")
        assert status == 200 and data["purged"] == 2
        assert b"n=2" in (await p.get(b))[2]
        assert b"n=1" in (await p.get(c))[2]  # untouched
        # Keys normalise scheme and host: HTTP://127.0.0.1:port is the same URL.
        status, data = await admin(p, "DELETE", f"/cache?url=HTTP://{p.host}{c}")
        assert data["purged"] == 1
        status, stats = await admin(p, "GET", "/cache")
        edge = stats["caches"]["edge"]
        assert edge["purged"] == 4 and edge["entries"] == 1  # only b was fetched again
        assert edge["requests"]["hit"] == 1 and edge["requests"]["miss"] == 5


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("", 400, "exactly one of"),
        ("?url=http://a/&prefix=http://a/", 400, "exactly one of"),
        ("?url=/relative", 400, "absolute"),
        ("?url=ftp://a/x", 400, "absolute"),
        ("?url=http://a/x&cache=nope", 404, "no cache named 'nope'"),
        ("?url=http://a/x&colour=red", 400, "unknown parameter 'colour'"),
    ],
)
async def test_admin_purge_refuses_bad_requests(
    cache_origin: int, query: str, status: int, message: str
) -> None:
    async with cached_proxy(cache_origin, admin_token=TOKEN) as p:
        got, data = await admin(p, "DELETE", "/cache" + query)
        assert got == status and message in data["error"]
        assert data["status"] == status and data["request_id"]


async def test_versions_of_a_traffic_split_are_cached_apart(cache_origin: int) -> None:
    """A request a split sent to another upstream than the route's is another resource:
    blue's stored answer is never served for green (and a shift shows at once)."""
    extra: dict[str, Any] = {
        "upstreams": {
            "origin": {"targets": [f"http://127.0.0.1:{cache_origin}"]},
            "origin-green": {"targets": [f"http://127.0.0.1:{cache_origin}"]},
        },
        "traffic": {
            "split": {
                "versions": {"blue": "origin", "green": "origin-green"},
                "weights": {"blue": 100, "green": 0},
            }
        },
        "routes": [{"prefix": "/", "upstream": "origin", "cache": "edge", "traffic": "split"}],
    }
    async with cached_proxy(cache_origin, admin_token=TOKEN, extra=extra) as p:
        route = p.server.gateway.router.routes[0]
        assert [f.name for f in route.filters.filters] == ["traffic", "cache"]  # type: ignore[union-attr]
        t = unique("split") + q(cc="max-age=600")
        await p.get(t)
        _, h, blue = await p.get(t)
        assert h["cache-status"].startswith("fastedge; hit")
        await admin(p, "PUT", "/traffic/split", b'{"green": 100}')
        _, h, green = await p.get(t)  # blue's entry is fresh, but this is green
        assert "fwd=uri-miss" in h["cache-status"] and green != blue
        _, h, _ = await p.get(t)
        assert h["cache-status"].startswith("fastedge; hit")
        # Purging the URL purges every version; so does an unsafe method.
        url = quote(f"http://{p.host}{t}", safe="")  # the URL is a query parameter
        _, data = await admin(p, "DELETE", f"/cache?url={url}")
        assert data["purged"] == 2
        await p.get(t)
        await p.get(t, method="DELETE")
        _, h, _ = await p.get(t)
        assert "fwd=uri-miss" in h["cache-status"]


# --- metrics, tracing, reloads -------------------------------------------------------------


async def test_metrics_families(cache_origin: int) -> None:
    async with cached_proxy(cache_origin, cache={"max_bytes": "64KiB"}) as p:
        t = unique("metrics") + q(cc="max-age=60", size=20_000)
        await p.get(t)
        await p.get(t)
        await p.get(t, method="POST")
        for i in range(4):  # 4 x 20 KB into 64 KiB: something must be evicted
            await p.get(unique(f"fill{i}") + q(cc="max-age=60", size=20_000))
        text = p.server.metrics.render().decode()
        assert 'fastedge_cache_requests_total{cache="edge",result="hit"} 1' in text
        assert 'fastedge_cache_requests_total{cache="edge",result="miss"} 5' in text
        assert 'fastedge_cache_requests_total{cache="edge",result="bypass"} 1' in text
        assert 'fastedge_cache_entries{cache="edge"} ' in text
        assert 'fastedge_cache_coalesced_total{cache="edge"} 0' in text
        evictions = next(
            line
            for line in text.splitlines()
            if line.startswith('fastedge_cache_evictions_total{cache="edge"}')
        )
        assert float(evictions.split()[-1]) >= 1
        size = p.edge.store.stats()["bytes"]
        assert size is not None and 0 < size <= 64 * 1024
        assert f'fastedge_cache_bytes{{cache="edge"}} {size}' in text


async def test_trace_attributes(cache_origin: int) -> None:
    doc = cache_doc(cache_origin, extra={"tracing": {"sample_ratio": 1.0, "memory_spans": 100}})
    server = ProxyServer(parse_config(doc))
    await server.start()
    try:
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        t = unique("traced") + q(cc="max-age=60")
        await call(port, "GET", t)
        await call(port, "GET", t)
        assert server.tracing is not None and server.tracing.sink is not None
        spans = server.tracing.sink.recent(50, None)
        results = [
            s["attributes"].get("fastedge.cache.result")
            for s in spans
            if "fastedge.cache.result" in s.get("attributes", {})
        ]
        assert sorted(results) == ["hit", "miss"]
        assert any(s["name"] == "fastedge.cache" for s in spans)
    finally:
        await server.shutdown(drain_timeout=1)


async def test_a_reload_keeps_the_stored_responses(cache_origin: int) -> None:
    async with cached_proxy(cache_origin) as p:
        t = unique("reload") + q(cc="max-age=60")
        await p.get(t)
        edge = p.edge
        assert p.server.reload(parse_config(cache_doc(cache_origin, cache={"default_ttl": "1s"})))
        _, h, body = await p.get(t)
        assert b"n=1" in body and h["cache-status"].startswith("fastedge; hit")
        assert p.edge is edge
        # New size bounds need a new store: it starts empty.
        assert p.server.reload(parse_config(cache_doc(cache_origin, cache={"max_bytes": "2MiB"})))
        p.edge.clock = Clock()
        _, _, body = await p.get(t)
        assert b"n=2" in body


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache", "route_cache", "error"),
    [
        (
            {"max_bytes": "1MiB", "max_object_size": "2MiB"},
            "edge",
            "caches.edge.max_object_size: must not exceed max_bytes",
        ),
        ({"max_bytes": "12"}, "edge", "caches.edge.max_bytes: size '12' needs a unit"),
        (
            {"override": "max-age=60, colour=red"},
            "edge",
            "caches.edge.override: unknown Cache-Control directive 'colour'",
        ),
        ({"override": "max-stale=60"}, "edge", "caches.edge.override: 'max-stale' is a request"),
        ({"override": ""}, "edge", "caches.edge.override: must contain at least one directive"),
        ({"coalesce": "redis"}, "edge", "caches.edge.coalesce: coalesce = 'redis' needs a [redis]"),
        ({"coalesce_wait": "0s"}, "edge", "caches.edge.coalesce_wait: must be at least"),
        (
            {"stale_if_error_statuses": [200]},
            "edge",
            "caches.edge.stale_if_error_statuses: each status must be an integer from 400 to 599",
        ),
        (
            {"heuristics": True},
            "edge",
            "caches.edge.heuristics: unknown key (did you mean 'heuristic'?)",
        ),
        ({}, "egde", "routes[0].cache: unknown cache 'egde' (did you mean 'edge'?)"),
    ],
)
def test_config_errors_name_the_key(cache: dict[str, Any], route_cache: str, error: str) -> None:
    doc = cache_doc(1, cache=cache)
    doc["routes"][0]["cache"] = route_cache
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert any(line.startswith(error) for line in info.value.errors), info.value.errors


def test_config_defaults() -> None:
    doc = cache_doc(1)
    doc["caches"]["edge"] = {"max_bytes": "1MiB"}
    settings = parse_config(doc).sections["caches"]["edge"]
    assert settings.object_limit == 1024 * 1024  # at most max_bytes
    assert settings.coalesce_wait == 5.0 and settings.default_ttl == 0.0
    assert settings.stale_if_error_statuses == frozenset({500, 502, 503, 504})


# --- fastedge reverse-proxy --cache -------------------------------------------------------


async def test_reverse_proxy_cache_flag(cache_origin: int) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastedge",
            "reverse-proxy",
            "--from",
            f"127.0.0.1:{port}",
            "--to",
            f"http://127.0.0.1:{cache_origin}",
            "--cache",
            "8MiB",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_port(port, proc)
        t = unique("cli") + q(cc="max-age=60")
        first = await fetch(port, t)
        second = await fetch(port, t)
        assert "stored" in first[1]["cache-status"]
        assert second[1]["cache-status"].startswith("fastedge; hit") and second[2] == first[2]
        uncacheable = unique("cli-plain")  # no freshness: RFC 9111 defaults store nothing
        await fetch(port, uncacheable)
        _, h, _ = await fetch(port, uncacheable)
        assert "hit" not in h["cache-status"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


def test_reverse_proxy_cache_flag_refuses_a_bad_size() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastedge",
            "reverse-proxy",
            "--to",
            "http://127.0.0.1:1",
            "--cache",
            "lots",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "--cache" in out.stderr and "invalid size" in out.stderr


# --- the demo --------------------------------------------------------------------------------


async def test_demo_products_are_cached() -> None:
    async with running_demo() as server:
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        status, first, body = await fetch(port, "/api/products")
        assert status == 200 and first["x-version"] == "blue"
        assert first["cache-status"] == "fastedge; fwd=uri-miss; fwd-status=200; ttl=5; stored"
        status, again, cached = await fetch(port, "/api/products")
        assert (status, cached) == (200, body) and again["cache-status"].startswith("fastedge; hit")
        assert again["age"] == "0"
