"""Per-request cost of the ``rate_limit`` filter: local, Redis round trip, Redis with leases.

What is timed is ``Filter.on_request(ctx)`` as the proxy calls it (key extraction, the
limiter, metrics, headers), on a reused ``FilterContext``; limits are set high so every
call is allowed (the steady state). Local rounds are batches of ``OPS`` calls, so the
per-call time is the round time / ``OPS``. Redis rounds run ``REDIS_OPS`` sequential
decisions in the event loop against a private redis-server on loopback (the
``redis_url`` fixture of tests/conftest.py). Run:
``pytest bench/test_bench_ratelimit_filter.py --benchmark-only``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from fastedge.config import parse_config
from fastedge.errors import ProxyError
from fastedge.filters import Filter, FilterContext, Runtime
from fastedge.filters.ratelimit import build_rate_limit_filter
from fastedge.observe.metrics import Metrics
from tests.conftest import redis_url  # noqa: F401  (the fixture, for this module)

OPS = 1000
REDIS_OPS = 200
BIG = 10**9


def _filter(policy: dict[str, Any], runtime: Runtime, redis: str | None = None) -> Filter:
    doc: dict[str, Any] = {
        "admin": {"enabled": False},
        "upstreams": {"o": {"targets": ["http://127.0.0.1:9"]}},
        "rate_limits": {"p": policy},
        "routes": [{"prefix": "/", "upstream": "o", "rate_limit": "p"}],
    }
    if redis is not None:
        doc["redis"] = {"url": redis, "key_prefix": "bench:"}
    cfg = parse_config(doc)
    route = cfg.routes[0]
    return build_rate_limit_filter(route.policies["rate_limit"], route, cfg, runtime)


def _ctx() -> FilterContext:
    ctx = FilterContext(
        method=b"GET",
        path=b"/",
        query=b"",
        host=b"example.com",
        client_ip=b"203.0.113.7",
        headers=[(b"host", b"example.com"), (b"x-api-key", b"k-123"), (b"accept", b"*/*")],
        upstream_headers=[],
        route="/",
        request_id=b"r",
    )
    ctx.claims = {"sub": "alice"}
    return ctx


LOCAL = {
    "sliding_window ip": {"algorithm": "sliding_window", "limit": BIG, "window": "1m"},
    "token_bucket ip": {"algorithm": "token_bucket", "rate": float(BIG), "burst": BIG},
    "sliding_window header": {
        "algorithm": "sliding_window",
        "limit": BIG,
        "window": "1m",
        "key": "header:x-api-key",
    },
    "sliding_window claim": {
        "algorithm": "sliding_window",
        "limit": BIG,
        "window": "1m",
        "key": "claim:sub",
    },
    "sliding_window ip headers=always": {
        "algorithm": "sliding_window",
        "limit": BIG,
        "window": "1m",
        "headers": "always",
    },
}


@pytest.mark.parametrize("case", list(LOCAL))
def test_local(benchmark: Any, case: str) -> None:
    f = _filter(LOCAL[case], Runtime(metrics=Metrics()))
    ctx = _ctx()
    on_request = f.on_request
    response_headers = ctx.response_headers

    def run() -> None:
        for _ in range(OPS):
            on_request(ctx)
            response_headers.clear()

    benchmark(run)
    assert f.on_request(ctx) is None


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    ev = uvloop.new_event_loop()
    try:
        yield ev
    finally:
        ev.close()


@pytest.mark.parametrize("lease", [0, 20, 100])
def test_redis(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    redis_url: str,  # noqa: F811
    lease: int,
) -> None:
    runtime = Runtime(metrics=Metrics(), redis_url=redis_url)
    policy: dict[str, Any] = {
        "algorithm": "sliding_window",
        "limit": BIG,
        "window": "1h",
        "backend": "redis",
    }
    if lease:
        policy["lease"] = lease
    f = _filter(policy, runtime, redis_url)
    ctx = _ctx()

    async def batch() -> int:
        allowed = 0
        for _ in range(REDIS_OPS):
            result = f.on_request(ctx)
            if result is not None and not isinstance(result, ProxyError):
                result = await result
            allowed += result is None
        return allowed

    try:
        assert loop.run_until_complete(batch()) == REDIS_OPS  # warm: connection, script
        benchmark(lambda: loop.run_until_complete(batch()))
    finally:
        loop.run_until_complete(runtime.close())
