"""The ``rate_limit`` filter with local limiters: config, keys, answers, headers, metrics.

The clock is injected (``build_rate_limit_filter(..., clock=...)``), so nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fastedge.config import Config, ConfigError, parse_config, redacted
from fastedge.errors import Kind, ProxyError
from fastedge.filters import Filter, FilterContext, Runtime
from fastedge.filters.ratelimit import RATELIMIT_TOTAL, RateLimitPolicy, build_rate_limit_filter
from fastedge.observe.metrics import Metrics
from fastedge.redis_config import RedisConfig
from fastedge.server import ProxyServer
from tests.conftest import Client, get


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def document(policies: dict[str, Any], rate_limit: Any = "p", **extra: Any) -> dict[str, Any]:
    return {
        "admin": {"enabled": False},
        "upstreams": {"o": {"targets": ["http://127.0.0.1:9"]}},
        "rate_limits": policies,
        "routes": [
            {"prefix": "/a", "upstream": "o", "rate_limit": rate_limit},
            {"prefix": "/b", "upstream": "o", "rate_limit": rate_limit},
        ],
        **extra,
    }


SW = {"algorithm": "sliding_window", "limit": 3, "window": "10s"}
TB = {"algorithm": "token_bucket", "rate": 2.0, "burst": 2}


def build(
    policies: dict[str, Any], rate_limit: Any = "p", route: int = 0, **extra: Any
) -> tuple[Filter, FakeClock, Runtime, Config]:
    cfg = parse_config(document(policies, rate_limit, **extra))
    clock = FakeClock()
    rt = Runtime(metrics=Metrics())
    r = cfg.routes[route]
    return (
        build_rate_limit_filter(r.policies["rate_limit"], r, cfg, rt, clock=clock),
        clock,
        rt,
        cfg,
    )


def request(
    ip: bytes = b"10.0.0.1",
    headers: list[tuple[bytes, bytes]] | None = None,
    claims: dict[str, Any] | None = None,
    route: str = "/a",
) -> FilterContext:
    ctx = FilterContext(
        method=b"GET",
        path=b"/a",
        query=b"",
        host=b"example.com",
        client_ip=ip,
        headers=headers or [],
        upstream_headers=[],
        route=route,
        request_id=b"r",
    )
    ctx.claims = claims
    return ctx


def decide(f: Filter, ctx: FilterContext | None = None) -> ProxyError | None:
    """Local decisions are synchronous: never an awaitable."""
    result = f.on_request(ctx if ctx is not None else request())
    assert result is None or isinstance(result, ProxyError)
    return result


def allowed_count(f: Filter, n: int, **kw: Any) -> int:
    return sum(decide(f, request(**kw)) is None for _ in range(n))


def counter(rt: Runtime, **labels: str) -> float:
    for family in rt.metrics.families():
        if family.name == RATELIMIT_TOTAL:
            return sum(v for _, lb, v in family.samples if dict(lb) == labels)
    return 0.0


# --------------------------------------------------------------------------- config


def test_defaults() -> None:
    cfg = parse_config(document({"p": SW}))
    policy = cfg.sections["rate_limits"]["p"]
    assert policy == RateLimitPolicy(name="p", algorithm="sliding_window", limit=3, window=10.0)
    assert cfg.routes[0].policies["rate_limit"] == ("p",)
    assert parse_config(document({"p": SW, "q": TB}, ["q", "p"])).routes[0].policies[
        "rate_limit"
    ] == ("q", "p")


def test_redis_section_and_redaction() -> None:
    cfg = parse_config(
        document(
            {"p": {**SW, "backend": "redis"}}, redis={"url": "rediss://u:s3cret@r.internal:6380/2"}
        )
    )
    assert cfg.sections["redis"] == RedisConfig(url="rediss://u:s3cret@r.internal:6380/2")
    assert cfg.sections["redis"].timeout == 0.25
    shown = redacted(cfg)["sections"]["redis"]
    assert shown["url"] == "rediss://u:***@r.internal:6380/2"
    assert "s3cret" not in json.dumps(redacted(cfg))
    unix = parse_config(
        document({"p": SW}, redis={"url": "unix:///run/redis.sock", "timeout": "1s"})
    )
    assert unix.sections["redis"].timeout == 1.0


@pytest.mark.parametrize(
    ("policies", "rate_limit", "extra", "errors"),
    [
        (
            {"p": {"limit": 3}},
            "p",
            {},
            ["rate_limits.p.algorithm: required key is missing"],
        ),
        (
            {"p": {**SW, "algorithm": "leaky"}},
            "p",
            {},
            [
                "rate_limits.p.algorithm: must be one of 'sliding_window', 'token_bucket', "
                "got 'leaky'"
            ],
        ),
        (
            {"p": {"algorithm": "sliding_window", "limit": 0, "rate": 1}},
            "p",
            {},
            [
                "rate_limits.p.limit: must be between 1 and 1000000000, got 0",
                "rate_limits.p.rate: only for algorithm = 'token_bucket'",
                "rate_limits.p.window: required for algorithm = 'sliding_window'",
            ],
        ),
        (
            {"p": {"algorithm": "token_bucket", "rate": -1, "burst": 2, "window": "1s"}},
            "p",
            {},
            [
                "rate_limits.p.rate: must be a number > 0 and at most 1000000000, got -1",
                "rate_limits.p.window: only for algorithm = 'sliding_window'",
            ],
        ),
        (
            {"p": {**SW, "key": "cookie:x", "headers": "sometimes", "windw": 1}},
            "p",
            {},
            [
                "rate_limits.p.key: must be 'ip', 'route', 'header:<name>' or "
                "'claim:<name>', got 'cookie:x'",
                "rate_limits.p.headers: must be one of 'limited', 'always', got 'sometimes'",
                "rate_limits.p.windw: unknown key (did you mean 'window'?)",
            ],
        ),
        (
            {"p": {**SW, "key": "header:bad name"}},
            "p",
            {},
            ["rate_limits.p.key: header name must be an HTTP token, got 'bad name'"],
        ),
        (
            {"p": {**SW, "backend": "redis"}},
            "p",
            {},
            ["rate_limits.p.backend: backend 'redis' needs a [redis] section"],
        ),
        (
            {"p": {**SW, "on_redis_error": "deny", "lease": 2}},
            "p",
            {},
            [
                "rate_limits.p.on_redis_error: only applies to backend = 'redis'",
                "rate_limits.p.lease: only applies to backend = 'redis'",
            ],
        ),
        (
            {"p": {**SW, "backend": "redis", "lease": 4, "on_redis_error": "maybe"}},
            "p",
            {"redis": {"url": "redis://127.0.0.1"}},
            [
                "rate_limits.p.on_redis_error: must be one of 'allow', 'deny', got 'maybe'",
                "rate_limits.p.lease: must not exceed limit (3), got 4",
            ],
        ),
        (
            {"p": SW, "per_user": SW},
            "per_usr",
            {},
            [
                "routes[0].rate_limit: unknown rate limit 'per_usr' (did you mean 'per_user'?)",
            ],
        ),
        (
            {"p": SW},
            ["p", 3, "p", "x"],
            {},
            [
                "routes[0].rate_limit[1]: expected a rate limit name, got integer",
                "routes[0].rate_limit[2]: rate limit 'p' is listed twice",
                "routes[0].rate_limit[3]: unknown rate limit 'x'",
            ],
        ),
        ({"p": SW}, [], {}, ["routes[0].rate_limit: must name at least one rate limit"]),
        (
            {"p": SW, "bad name": SW},
            {"p": 1},
            {},
            [
                "rate_limits.\"bad name\": a rate limit name is 1-64 letters, digits, '_' or '-'",
                "routes[0].rate_limit: expected a rate limit name or an array of names, got table",
            ],
        ),
        (
            {"p": SW},
            "p",
            {"redis": {"url": "http://r:6379", "timeout": 0, "db": 1}},
            [
                "redis.url: URL scheme must be 'redis://', 'rediss://', 'unix://', got 'http' "
                "in 'http://r:6379'",
                "redis.timeout: must be greater than 0s, got 0",
                "redis.db: unknown key",
            ],
        ),
        (
            {"p": SW},
            "p",
            {"redis": {"url": "redis://r:99999/x"}},
            ["redis.url: invalid URL 'redis://r:99999/x': Port out of range 0-65535"],
        ),
        (
            {"p": SW},
            "p",
            {"redis": {"url": "redis:///0"}},
            ["redis.url: URL needs a host, got 'redis:///0'"],
        ),
        (
            {"p": SW},
            "p",
            {"redis": {"url": "redis://r/zero"}},
            ["redis.url: the path must be a database number ('/0'), got '/zero'"],
        ),
        ({"p": SW}, "p", {"redis": {"timeout": "1s"}}, ["redis.url: required key is missing"]),
    ],
)
def test_config_errors_carry_their_key_paths(
    policies: dict[str, Any], rate_limit: Any, extra: dict[str, Any], errors: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(document(policies, rate_limit, **extra))
    # routes[1] names the same policies as routes[0] and repeats its errors
    found = [e for e in err.value.errors if e.startswith(("rate_limits", "routes[0]", "redis"))]
    assert found == errors


# --------------------------------------------------------------------------- algorithms


def test_sliding_window_refuses_with_retry_after_and_headers() -> None:
    f, clock, rt, _ = build({"p": SW})
    assert allowed_count(f, 3) == 3
    refused = decide(f)
    assert refused is not None and refused.kind is Kind.RATE_LIMITED and refused.status == 429
    # at t=1000 the 10 s window started now: curr=3, so the hit passes once this window's
    # hits have decayed to 2 in the next window: 10 + 10 * (1 - 2/3) = 13.33 s
    assert refused.headers == [
        (b"retry-after", b"14"),
        (b"ratelimit-policy", b'"p";q=3;w=10'),
        (b"ratelimit", b'"p";r=0;t=14'),
    ]
    clock.now += 13.4
    assert decide(f) is None
    assert decide(f) is not None
    assert counter(rt, policy="p", result="allowed") == 4
    assert counter(rt, policy="p", result="limited") == 2


def test_token_bucket_refills() -> None:
    f, clock, _, _ = build({"p": TB})
    assert allowed_count(f, 5) == 2
    refused = decide(f)
    assert refused is not None and dict(refused.headers)[b"retry-after"] == b"1"  # 0.5 s up
    assert dict(refused.headers)[b"ratelimit-policy"] == b'"p";q=2;w=1'
    clock.now += 0.5
    assert allowed_count(f, 3) == 1


def test_retry_after_is_at_least_one_second() -> None:
    f, _, _, _ = build({"p": {"algorithm": "token_bucket", "rate": 100.0, "burst": 1}})
    assert decide(f) is None
    refused = decide(f)
    assert refused is not None and dict(refused.headers)[b"retry-after"] == b"1"  # 10 ms


def test_headers_always_on_allowed_responses() -> None:
    f, clock, _, _ = build({"p": {**SW, "headers": "always"}})
    ctx = request()
    assert decide(f, ctx) is None
    assert ctx.response_headers == [
        (b"ratelimit-policy", b'"p";q=3;w=10'),
        (b"ratelimit", b'"p";r=2;t=10'),
    ]
    clock.now += 2.5
    ctx = request()
    decide(f, ctx)
    assert ctx.response_headers[1] == (b"ratelimit", b'"p";r=1;t=8')  # ceil(7.5)
    bucket, _, _, _ = build({"p": {**TB, "headers": "always"}})
    ctx = request()
    decide(bucket, ctx)
    assert ctx.response_headers[1] == (b"ratelimit", b'"p";r=1;t=1')  # 1 token at 2/s


def test_headers_limited_leaves_allowed_responses_alone() -> None:
    f, _, _, _ = build({"p": SW})
    ctx = request()
    assert decide(f, ctx) is None and ctx.response_headers == []


def test_sub_second_window_has_no_w_parameter() -> None:
    f, _, _, _ = build({"p": {"algorithm": "sliding_window", "limit": 1, "window": "500ms"}})
    decide(f)
    refused = decide(f)
    assert refused is not None
    assert dict(refused.headers)[b"ratelimit-policy"] == b'"p";q=1'


# --------------------------------------------------------------------------- keys


def test_key_ip() -> None:
    f, _, _, _ = build({"p": SW})
    assert allowed_count(f, 5, ip=b"10.0.0.1") == 3
    assert allowed_count(f, 5, ip=b"10.0.0.2") == 3


def test_key_header_with_fallback_to_ip() -> None:
    f, _, _, _ = build({"p": {**SW, "key": "header:X-Api-Key"}})
    k1 = [(b"x-api-key", b"k1")]
    assert allowed_count(f, 5, headers=k1, ip=b"10.0.0.1") == 3
    assert allowed_count(f, 5, headers=k1, ip=b"10.0.0.2") == 0  # same key, other IP
    assert allowed_count(f, 5, headers=[(b"x-api-key", b"k2")]) == 3
    # no header: the client's IP is the key (its own bucket, not the header buckets)
    assert allowed_count(f, 5, ip=b"10.0.0.1") == 3
    assert allowed_count(f, 5, ip=b"10.0.0.3") == 3
    # a header value that looks like an IP does not share that IP's bucket
    assert allowed_count(f, 5, headers=[(b"x-api-key", b"10.0.0.9")], ip=b"10.0.0.9") == 3
    assert allowed_count(f, 5, ip=b"10.0.0.9") == 3


def test_long_header_values_are_hashed_but_distinct() -> None:
    f, _, _, _ = build({"p": {**SW, "key": "header:x-api-key"}})
    long_a, long_b = b"a" * 8000, b"a" * 7999 + b"b"
    assert allowed_count(f, 5, headers=[(b"x-api-key", long_a)]) == 3
    assert allowed_count(f, 5, headers=[(b"x-api-key", long_b)]) == 3


def test_key_claim_with_fallback_to_ip() -> None:
    f, _, _, _ = build({"p": {**SW, "key": "claim:sub"}})
    assert allowed_count(f, 5, claims={"sub": "alice"}, ip=b"10.0.0.1") == 3
    assert allowed_count(f, 5, claims={"sub": "alice"}, ip=b"10.0.0.2") == 0
    assert allowed_count(f, 5, claims={"sub": "bob"}, ip=b"10.0.0.1") == 3
    assert allowed_count(f, 5, claims={"sub": 42}) == 3  # numeric subjects
    # no auth on the route (claims None), no such claim, or an unusable one: per IP
    assert allowed_count(f, 5, claims=None, ip=b"10.0.0.5") == 3
    assert allowed_count(f, 5, claims={"iss": "x"}, ip=b"10.0.0.6") == 3
    assert allowed_count(f, 5, claims={"sub": ["a"]}, ip=b"10.0.0.6") == 0


def test_key_route_is_one_bucket_per_route() -> None:
    policies = {"p": {**SW, "key": "route"}}
    cfg = parse_config(document(policies))
    rt = Runtime(metrics=Metrics())
    clock = FakeClock()
    fa, fb = (
        build_rate_limit_filter(r.policies["rate_limit"], r, cfg, rt, clock=clock)
        for r in cfg.routes
    )
    assert allowed_count(fa, 5, ip=b"10.0.0.1", route="/a") == 3
    assert allowed_count(fa, 5, ip=b"10.0.0.2", route="/a") == 0  # whatever the client
    assert allowed_count(fb, 5, ip=b"10.0.0.1", route="/b") == 3


def test_routes_naming_one_policy_share_its_quota() -> None:
    cfg = parse_config(document({"p": SW}))
    rt = Runtime(metrics=Metrics())
    clock = FakeClock()
    fa, fb = (
        build_rate_limit_filter(r.policies["rate_limit"], r, cfg, rt, clock=clock)
        for r in cfg.routes
    )
    assert allowed_count(fa, 2) == 2
    assert allowed_count(fb, 5) == 1


# --------------------------------------------------------------------------- several policies


def test_several_policies_all_must_allow_in_order() -> None:
    policies = {
        "per_ip": {"algorithm": "sliding_window", "limit": 5, "window": "10s"},
        "per_user": {
            "algorithm": "sliding_window",
            "limit": 2,
            "window": "10s",
            "key": "claim:sub",
        },
    }
    f, _, rt, _ = build(policies, ["per_ip", "per_user"])
    alice = {"sub": "alice"}
    assert allowed_count(f, 3, claims=alice) == 2
    refused = decide(f, request(claims=alice))
    assert refused is not None and b'"per_user"' in dict(refused.headers)[b"ratelimit"]
    # bob from the same IP: per_user has room, but per_ip has now counted 4 of 5
    assert allowed_count(f, 3, claims={"sub": "bob"}) == 1
    refused = decide(f, request(claims={"sub": "carol"}))
    assert refused is not None and dict(refused.headers)[b"ratelimit"].startswith(b'"per_ip"')
    assert counter(rt, policy="per_ip", result="limited") == 3
    assert counter(rt, policy="per_user", result="limited") == 2


def test_several_policies_each_add_headers_when_always() -> None:
    policies = {
        "a": {**SW, "headers": "always"},
        "b": {**TB, "headers": "always"},
    }
    f, _, _, _ = build(policies, ["a", "b"])
    ctx = request()
    assert decide(f, ctx) is None
    assert [v for n, v in ctx.response_headers if n == b"ratelimit"] == [
        b'"a";r=2;t=10',
        b'"b";r=1;t=1',
    ]


# --------------------------------------------------------------------------- end to end


@pytest.fixture
async def limited_proxy(origin_port: int, engine_name: str) -> AsyncIterator[ProxyServer]:
    cfg = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine_name, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "rate_limits": {
                "two": {
                    "algorithm": "sliding_window",
                    "limit": 2,
                    "window": "1h",
                    "headers": "always",
                }
            },
            "routes": [
                {"prefix": "/limited", "upstream": "o", "rate_limit": "two", "rewrite": "/echo"},
                {"prefix": "/", "upstream": "o"},
            ],
        }
    )
    server = ProxyServer(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(drain_timeout=1)


async def test_through_the_proxy(limited_proxy: ProxyServer) -> None:
    client = await Client.open(limited_proxy.port)
    try:
        for remaining in (1, 0):
            await client.send(get("/limited"))
            resp = await client.read_response()
            assert resp.status == 200
            assert resp.header("ratelimit-policy") == b'"two";q=2;w=3600'
            assert (resp.header("ratelimit") or b"").startswith(b'"two";r=%d;t=' % remaining)
        await client.send(get("/limited"))
        resp = await client.read_response()
        assert resp.status == 429
        body = json.loads(resp.body)
        assert body["status"] == 429 and body["error"] == "rate limit 'two' exceeded"
        retry_after = resp.header("retry-after") or b"0"
        assert int(retry_after) >= 1
        assert resp.header("ratelimit") == b'"two";r=0;t=' + retry_after
        # other routes are not limited, and the connection stays usable
        await client.send(get("/other"))
        assert (await client.read_response()).status == 200
    finally:
        await client.close()
