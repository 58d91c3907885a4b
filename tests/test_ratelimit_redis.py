"""The Redis rate-limit backend against a real redis-server (the ``redis_url`` fixture).

The Lua scripts are checked against the local limiters (their specification) on the same
hits, with the clock injected (``now``) so the comparison is exact; the production path
(Redis ``TIME``) is checked by counts only. Nothing here asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastedge._core import ratelimit_py
from fastedge.config import Config, parse_config
from fastedge.errors import Kind, ProxyError
from fastedge.filters import Filter, FilterContext, Runtime
from fastedge.filters.ratelimit import (
    RATELIMIT_TOTAL,
    REDIS_ERRORS_TOTAL,
    build_rate_limit_filter,
)
from fastedge.filters.ratelimit_redis import (
    SLIDING_WINDOW_LUA,
    TOKEN_BUCKET_LUA,
    LeaseBook,
    RedisLimiter,
    RedisUnavailable,
)
from fastedge.observe.metrics import Metrics
from fastedge.server import ProxyServer
from tests.conftest import ROOT, Client, free_port, free_ports, get, wait_port


@pytest.fixture(scope="module")
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing the server never meet."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def runtime(redis_url: str) -> AsyncIterator[Runtime]:
    rt = Runtime(metrics=Metrics(), redis_url=redis_url, redis_timeout=REDIS_TIMEOUT)
    try:
        yield rt
    finally:
        await rt.close()


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# A working Redis must never time out in these tests: on a loaded 2-CPU machine a burst
# of 50 first calls (the script load included) once took longer than 250 ms, and the
# fail-open fallback then allowed them all. Tests of the timeout itself pass a short one.
REDIS_TIMEOUT = 2.0


def config(
    redis_url: str,
    prefix: str,
    *,
    route_limit: Any = "p",
    timeout: str = f"{REDIS_TIMEOUT:g}s",
    **policy: Any,
) -> Config:
    spec: dict[str, Any] = {"algorithm": "sliding_window", "limit": 20, "window": "1h"}
    spec.update(backend="redis", **policy)
    if spec["algorithm"] == "token_bucket":
        spec.pop("limit", None)
        spec.pop("window", None)
    return parse_config(
        {
            "admin": {"enabled": False},
            "redis": {"url": redis_url, "key_prefix": prefix, "timeout": timeout},
            "upstreams": {"o": {"targets": ["http://127.0.0.1:9"]}},
            "rate_limits": {"p": spec},
            "routes": [{"prefix": "/", "upstream": "o", "rate_limit": route_limit}],
        }
    )


def make_filter(cfg: Config, rt: Runtime, clock: Any = None) -> Filter:
    route = cfg.routes[0]
    kw = {} if clock is None else {"clock": clock}
    return build_rate_limit_filter(route.policies["rate_limit"], route, cfg, rt, **kw)


def request(ip: bytes = b"10.0.0.1") -> FilterContext:
    return FilterContext(
        method=b"GET",
        path=b"/",
        query=b"",
        host=b"example.com",
        client_ip=ip,
        headers=[],
        upstream_headers=[],
        route="/",
        request_id=b"r",
    )


async def decide(f: Filter, ctx: FilterContext) -> ProxyError | None:
    result = f.on_request(ctx)
    if result is None or isinstance(result, ProxyError):
        return result
    return await result


def counter(rt: Runtime, name: str, **labels: str) -> float:
    for family in rt.metrics.families():
        if family.name == name:
            return sum(v for _, lb, v in family.samples if dict(lb) == labels)
    return 0.0


# --------------------------------------------------------------------------- scripts


hits = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=4.0), st.sampled_from([b"a", b"b"])),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=hits, limit=st.integers(1, 6), window=st.sampled_from([0.5, 1.0, 2.5, 10.0]))
def test_sliding_window_script_matches_the_local_limiter(
    sync_redis: redis.Redis, steps: list[tuple[float, bytes]], limit: int, window: float
) -> None:
    script = sync_redis.register_script(SLIDING_WINDOW_LUA)
    ns = f"h{uuid.uuid4().hex}:".encode()
    local = ratelimit_py.SlidingWindow(limit, window)
    now = 1_000_000.0
    for dt, key in steps:
        now += dt
        expected = local.hit(key, 1, now)
        granted, remaining, seconds = script(
            keys=[ns + key], args=[limit, repr(window), 1, repr(now)]
        )
        assert (bool(granted), int(remaining)) == expected[:2]
        assert float(seconds) == pytest.approx(expected[2], rel=1e-9, abs=1e-9)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=hits, burst=st.integers(1, 6), rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]))
def test_token_bucket_script_matches_the_local_limiter(
    sync_redis: redis.Redis, steps: list[tuple[float, bytes]], burst: int, rate: float
) -> None:
    script = sync_redis.register_script(TOKEN_BUCKET_LUA)
    ns = f"h{uuid.uuid4().hex}:".encode()
    local = ratelimit_py.TokenBucket(rate, burst)
    now = 1_000_000.0
    for dt, key in steps:
        now += dt
        expected = local.acquire(key, 1, now)
        granted, remaining, seconds = script(
            keys=[ns + key], args=[repr(rate), burst, 1, repr(now)]
        )
        assert (bool(granted), int(remaining)) == expected[:2]
        assert float(seconds) == pytest.approx(expected[2], rel=1e-9, abs=1e-9)


async def test_scripts_on_the_redis_clock_count_exactly(runtime: Runtime, prefix: str) -> None:
    window = RedisLimiter(
        runtime.redis,
        policy="w",
        algorithm="sliding_window",
        a=5,
        b=3600.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    answers = [await window.take(b"k") for _ in range(7)]
    assert [a.granted for a in answers] == [1] * 5 + [0] * 2
    assert [a.remaining for a in answers] == [4, 3, 2, 1, 0, 0, 0]
    assert all(a.seconds > 0 for a in answers)
    bucket = RedisLimiter(
        runtime.redis,
        policy="b",
        algorithm="token_bucket",
        a=0.001,
        b=3.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    answers = [await bucket.take(b"k") for _ in range(4)]
    assert [a.granted for a in answers] == [1, 1, 1, 0]
    assert answers[-1].seconds == pytest.approx(1000, rel=0.01)  # one token at 0.001/s


async def test_keys_expire_when_idle(
    runtime: Runtime, prefix: str, sync_redis: redis.Redis
) -> None:
    window = RedisLimiter(
        runtime.redis,
        policy="w",
        algorithm="sliding_window",
        a=5,
        b=10.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    bucket = RedisLimiter(
        runtime.redis,
        policy="b",
        algorithm="token_bucket",
        a=2.0,
        b=10.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    await window.take(b"k")
    await bucket.take(b"k", 4)
    # two windows at most (+1 s margin); the bucket until it is full again: 4 tokens / 2/s
    assert 0 < sync_redis.pttl(window.redis_key(b"k")) <= 21_000
    assert 0 < sync_redis.pttl(bucket.redis_key(b"k")) <= 3_000


async def test_batch_takes_what_is_left(runtime: Runtime, prefix: str) -> None:
    window = RedisLimiter(
        runtime.redis,
        policy="w",
        algorithm="sliding_window",
        a=7,
        b=3600.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    assert [(await window.take(b"k", 3)).granted for _ in range(4)] == [3, 3, 1, 0]


async def test_script_is_reloaded_after_script_flush(
    runtime: Runtime, prefix: str, sync_redis: redis.Redis
) -> None:
    window = RedisLimiter(
        runtime.redis,
        policy="w",
        algorithm="sliding_window",
        a=5,
        b=3600.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    assert (await window.take(b"k")).granted == 1
    sync_redis.script_flush()  # EVALSHA now fails with NOSCRIPT: SCRIPT LOAD, retry
    assert (await window.take(b"k")).granted == 1


# --------------------------------------------------------------------------- the filter


@pytest.mark.parametrize("algorithm", ["sliding_window", "token_bucket"])
async def test_fifty_concurrent_hits_limit_twenty(
    runtime: Runtime, redis_url: str, prefix: str, algorithm: str
) -> None:
    extra = {"rate": 0.001, "burst": 20} if algorithm == "token_bucket" else {}
    f = make_filter(config(redis_url, prefix, algorithm=algorithm, **extra), runtime)
    answers = await asyncio.gather(*(decide(f, request()) for _ in range(50)))
    assert sum(a is None for a in answers) == 20
    refused = [a for a in answers if a is not None]
    assert len(refused) == 30 and all(a.status == 429 for a in refused)
    assert counter(runtime, RATELIMIT_TOTAL, policy="p", result="allowed") == 20
    assert counter(runtime, RATELIMIT_TOTAL, policy="p", result="limited") == 30


async def test_two_instances_share_one_limit(redis_url: str, prefix: str) -> None:
    cfg = config(redis_url, prefix, limit=10)
    one, two = (
        Runtime(metrics=Metrics(), redis_url=redis_url, redis_timeout=REDIS_TIMEOUT),
        Runtime(metrics=Metrics(), redis_url=redis_url, redis_timeout=REDIS_TIMEOUT),
    )
    try:
        filters = [make_filter(cfg, one), make_filter(cfg, two)]
        answers = [await decide(filters[i % 2], request()) for i in range(25)]
    finally:
        await one.close()
        await two.close()
    assert sum(a is None for a in answers) == 10
    limited = answers[10]
    assert limited is not None and limited.kind is Kind.RATE_LIMITED
    headers = dict(limited.headers)
    assert int(headers[b"retry-after"]) >= 1
    assert headers[b"ratelimit-policy"] == b'"p";q=10;w=3600'
    assert headers[b"ratelimit"].startswith(b'"p";r=0;t=')


async def test_lease_mode_spends_locally_and_stays_within_its_bound(
    redis_url: str, prefix: str
) -> None:
    limit, lease, instances = 20, 5, 2
    cfg = config(redis_url, prefix, limit=limit, lease=lease)
    runtimes = [
        Runtime(metrics=Metrics(), redis_url=redis_url, redis_timeout=REDIS_TIMEOUT)
        for _ in range(instances)
    ]
    try:
        filters = [make_filter(cfg, rt) for rt in runtimes]
        synchronous = allowed = 0
        for i in range(60):
            result = filters[i % instances].on_request(request())
            if result is None:
                synchronous += 1  # spent from a local lease: no round trip
            elif not isinstance(result, ProxyError):
                result = await result
            allowed += result is None
        # Never more than the limit (leases are counted in Redis when taken, and spent in
        # the window they were counted in); at most instances*(lease-1) leased units are
        # stranded unspent.
        assert limit - instances * (lease - 1) <= allowed <= limit
        assert synchronous >= allowed - allowed // lease - instances
    finally:
        for rt in runtimes:
            await rt.close()


async def test_concurrent_requests_share_one_lease_round_trip(
    runtime: Runtime, prefix: str
) -> None:
    limiter = RedisLimiter(
        runtime.redis,
        policy="w",
        algorithm="sliding_window",
        a=100,
        b=3600.0,
        key_prefix=prefix,
        timeout=1.0,
    )
    book = LeaseBook(limiter, 10, lifetime=lambda g: 60.0, max_keys=100, clock=lambda: 0.0)
    grants = await asyncio.gather(*(book.acquire(b"k") for _ in range(10)))
    assert all(g.granted == 1 for g in grants)
    # all ten came from one batch of ten: Redis counted exactly ten
    assert (await limiter.take(b"k")).remaining == 100 - 11
    assert book.leased(b"k", 0.0) == 0


@pytest.mark.parametrize(("mode", "status"), [("allow", None), ("deny", 503)])
async def test_redis_down_follows_on_redis_error(
    prefix: str, mode: str, status: int | None
) -> None:
    url = closed_port_url()
    cfg = config(url, prefix, on_redis_error=mode)
    rt = Runtime(metrics=Metrics(), redis_url=url)
    now = [0.0]
    try:
        f = make_filter(cfg, rt, clock=lambda: now[0])
        first = await decide(f, request())
        # within the retry interval the fallback is decided synchronously, no Redis call
        second = f.on_request(request())
        assert second is None or isinstance(second, ProxyError)
        now[0] += 5.0
        third = await decide(f, request())
    finally:
        await rt.close()
    for answer in (first, second, third):
        assert (answer.status if answer is not None else None) == status
    if status is not None:
        assert first is not None and dict(first.headers)[b"retry-after"] == b"1"
    assert counter(rt, REDIS_ERRORS_TOTAL, policy="p") == 3


async def test_silent_redis_is_bounded_by_the_timeout(prefix: str) -> None:
    # A peer that accepts and never answers (a hung Redis): the configured timeout, not
    # the kernel's, ends the call.
    peers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: peers.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    rt = Runtime(metrics=Metrics(), redis_url=url)
    try:
        limiter = RedisLimiter(
            rt.redis,
            policy="w",
            algorithm="sliding_window",
            a=5,
            b=10.0,
            key_prefix=prefix,
            timeout=0.05,
        )
        with pytest.raises(RedisUnavailable, match="timed out"):
            await limiter.take(b"k")
        f = make_filter(config(url, prefix, on_redis_error="deny", timeout="250ms"), rt)
        answer = await decide(f, request())
        assert answer is not None and answer.kind is Kind.UNAVAILABLE
    finally:
        await rt.close()
        for peer in peers:
            peer.close()
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- end to end


async def test_through_the_proxy(
    redis_url: str, prefix: str, origin_port: int, engine_name: str
) -> None:
    cfg = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine_name, "access_log": False},
            "admin": {"enabled": False},
            "redis": {"url": redis_url, "key_prefix": prefix},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "rate_limits": {
                "per_key": {
                    "algorithm": "token_bucket",
                    "rate": 0.001,
                    "burst": 3,
                    "backend": "redis",
                    "key": "header:X-Api-Key",
                    "headers": "always",
                }
            },
            "routes": [{"prefix": "/", "upstream": "o", "rate_limit": "per_key"}],
        }
    )
    server = ProxyServer(cfg)
    await server.start()
    try:
        client = await Client.open(server.port)
        statuses = []
        for _ in range(5):
            await client.send(get("/echo", extra="X-Api-Key: k1\r\n"))
            resp = await client.read_response()
            statuses.append(resp.status)
        assert statuses == [200, 200, 200, 429, 429]
        assert resp.header("ratelimit") == b'"per_key";r=0;t=1000'
        assert json.loads(resp.body)["status"] == 429
        await client.send(get("/echo", extra="X-Api-Key: k2\r\n"))
        other = await client.read_response()
        assert other.status == 200
        assert other.header("ratelimit-policy") == b'"per_key";q=3;w=3000'
        assert other.header("ratelimit") == b'"per_key";r=2;t=1000'
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


def _write_config(path: Path, port: int, origin: int, redis_url: str, prefix: str) -> None:
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
access_log = false

[admin]
enabled = false

[redis]
url = "{redis_url}"
key_prefix = "{prefix}"

[upstreams.origin]
targets = ["http://127.0.0.1:{origin}"]

[rate_limits.global]
algorithm = "sliding_window"
limit = 12
window = "1h"
key = "route"
backend = "redis"

[[routes]]
prefix = "/"
upstream = "origin"
rate_limit = "global"
"""
    )


async def test_two_fastedge_processes_enforce_one_global_limit(
    tmp_path: Path, origin_port: int, redis_url: str, prefix: str
) -> None:
    """The issue's acceptance test: N allowed in total across both, the rest 429."""
    n, m = 12, 30
    ports = free_ports(2)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, port in enumerate(ports):
            path = tmp_path / f"edge{i}.toml"
            _write_config(path, port, origin_port, redis_url, prefix)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fastedge", "run", "-c", str(path)],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        for port, proc in zip(ports, procs, strict=True):
            await wait_port(port, proc)
        clients = [await Client.open(port) for port in ports]
        statuses: list[int] = []
        for i in range(m):
            client = clients[i % 2]
            await client.send(get("/echo"))
            resp = await client.read_response()
            statuses.append(resp.status)
            if resp.status == 429:
                retry_after = resp.header("retry-after")
                assert retry_after is not None and int(retry_after) >= 1
        for client in clients:
            await client.close()
        assert statuses.count(200) == n
        assert statuses.count(429) == m - n
        assert statuses[:n] == [200] * n
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
