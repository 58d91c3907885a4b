"""Policy filters on the express lane, end to end, against the general path.

A route whose filters are JWT auth and/or a local rate limit, and a gateway with
``[tracing]``, may now take the express lane (``ClientConnection._express``,
``FilterChain.express_admit``, ``fastedge.filters.express``). The lane must stay invisible:
each scenario runs the same requests with ``server.express`` on and off over real
loopback sockets and compares the bytes the origin received (trace and span ids
normalised: they are random), the bytes the client received, the ``fastedge_auth_*`` and
``fastedge_ratelimit_*`` counters, and which lane served (``server.express_lane``).

The auth and rate-limit clocks are pinned (the filters' injectable clocks, as in
tests/test_auth.py and tests/test_ratelimit_filter.py), so tokens expire on command and a
429's ``Retry-After`` is the same in both runs. Every run first warms the upstream pool
and the auth verification cache with one request on a route with auth only (no limit),
so no rate-limit token is spent on the warm-up.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest

from fastedge.filters.auth import AuthFilter
from fastedge.filters.ratelimit import RateLimitFilter
from fastedge.observe.tracing import TraceIdRatio
from fastedge.server import ProxyServer
from tests import test_express_proxy
from tests.conftest import Response
from tests.raw_client import RawClient
from tests.test_auth import ENV, NOW, OTHER_SECRET, SECRET
from tests.test_express_proxy import ScriptedOrigin, lane_counts, pool_stats, request

MakeProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]
NewOrigin = Callable[[], Awaitable[ScriptedOrigin]]

# The scripted origins and the no-ERROR-logged check of tests/test_express_proxy.py
# (pytest finds fixtures by their module-level names).
new_origin = test_express_proxy.new_origin
no_errors_logged = test_express_proxy.no_errors_logged


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


# --- tokens, clocks, config --------------------------------------------------------------


def token(sub: str = "alice", secret: str = SECRET, ttl: int = 300, **extra: Any) -> str:
    """An HS256 token issued at the pinned ``NOW``."""
    payload: dict[str, Any] = {"sub": sub, "iat": int(NOW), "exp": int(NOW) + ttl, **extra}
    return jwt.encode(payload, secret, algorithm="HS256")


ALICE = token()
BOB = token("bob")


def bearer(tok: str) -> str:
    return f"Authorization: Bearer {tok}\r\n"


class Clock:
    """The auth policy's wall clock and the rate limiter's monotonic clock, pinned."""

    def __init__(self) -> None:
        self.now = NOW
        self.mono = 1000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


@dataclass(frozen=True)
class Advance:
    """A step between requests: both pinned clocks move on by ``seconds``."""

    seconds: float


Step = tuple[bytes, bytes] | Advance

PER_USER: dict[str, Any] = {
    "algorithm": "sliding_window",
    "limit": 1000,
    "window": "60s",
    "key": "claim:sub",
}


def chain_document(
    port: int,
    *,
    express: bool,
    auth: dict[str, Any] | None = None,
    rate: dict[str, Any] | None = PER_USER,
    sample_ratio: float | None = 0.0,
    access_log: Path | None = None,
    upstream: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``/warm``: auth only (the warm-up); everything else: auth, then the ``per_user``
    rate limit (``rate``), with ``[tracing]`` at ``sample_ratio`` (None: no tracing);
    ``upstream``: more keys of the upstream."""
    chain: dict[str, Any] = {"prefix": "/", "upstream": "origin", "auth": "jwt", "name": "chain"}
    if rate is not None:
        chain["rate_limit"] = "per_user"
    doc: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1:0",
            "http": "fast",
            "access_log": str(access_log) if access_log is not None else False,
            "express": express,
        },
        "admin": {"enabled": False},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{port}"], **(upstream or {})}},
        "auth": {
            "jwt": {
                "algorithms": ["HS256"],
                "keys": [{"algorithm": "HS256", "secret_env": ENV}],
                **(auth or {}),
            }
        },
        "routes": [
            {"prefix": "/warm", "upstream": "origin", "auth": "jwt", "name": "warm"},
            chain,
        ],
    }
    if rate is not None:
        doc["rate_limits"] = {"per_user": rate}
    if sample_ratio is not None:
        doc["tracing"] = {"sample_ratio": sample_ratio, "memory_spans": 2000}
    return doc


def pin_clocks(server: ProxyServer, clock: Clock) -> None:
    """Point every auth policy and local rate-limit policy of ``server`` at ``clock``."""
    pinned = 0
    for route in server.gateway.router.routes:
        chain = route.filters
        if chain is None:
            continue
        for f in chain.filters:
            if isinstance(f, AuthFilter):
                f.state.clock = clock.wall
                pinned += 1
            elif isinstance(f, RateLimitFilter):
                for policy in f.policies:
                    policy.clock = clock.monotonic
                pinned += 1
    assert pinned >= 2  # both routes have auth at least


# --- running a scenario ------------------------------------------------------------------


@dataclass
class ChainRun:
    """What one proxy (express on or off) did with a sequence of requests (the warm-up
    excluded from ``responses``, ``raw`` and ``heads``)."""

    responses: list[Response]
    raw: list[bytes]
    heads: list[tuple[int, bytes]]
    stream: list[bytes]
    served: int
    promoted: int
    counters: dict[str, float]
    log: list[dict[str, Any]]
    server: ProxyServer
    origin: ScriptedOrigin


def policy_counters(server: ProxyServer) -> dict[str, float]:
    """Every ``fastedge_auth_*`` and ``fastedge_ratelimit_*`` sample, from the registry."""
    out: dict[str, float] = {}
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(("fastedge_auth_", "fastedge_ratelimit_")):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


async def run_chain(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    steps: list[Step],
    *,
    express: bool,
    warm_token: str = ALICE,
    log_dir: Path | None = None,
    **doc: Any,
) -> ChainRun:
    """Warm the pool and the verification cache (``GET /warm`` with ``warm_token``), then
    send ``steps`` one after the other on one client connection (a new one after a
    response that closes it), moving the pinned clocks at each :class:`Advance`."""
    origin = await new_origin()
    log = None if log_dir is None else log_dir / f"access-{express}.log"
    proxy = await make_proxy(chain_document(origin.port, express=express, access_log=log, **doc))
    assert proxy.express_lane.enabled is express
    clock = Clock()
    pin_clocks(proxy, clock)
    client = await RawClient.open(proxy.port)
    responses: list[Response] = []
    raws: list[bytes] = []
    try:
        # The warm-up: the first request finds the pool empty (general path); after it
        # one idle upstream connection waits and the token is in the verification cache.
        resp, raw = await client.exchange(request("/warm", "warm-0", bearer(warm_token)))
        assert resp.status == 200, resp.body
        assert pool_stats(proxy)[0]["idle"] == 1
        responses.append(resp)
        raws.append(raw)
        for step in steps:
            if isinstance(step, Advance):
                clock.now += step.seconds
                clock.mono += step.seconds
                continue
            data, method = step
            client, resp, raw = await client.exchange_on(proxy.port, data, method=method)
            responses.append(resp)
            raws.append(raw)
    finally:
        await client.close()
    lines: list[dict[str, Any]] = []
    if log is not None:
        assert proxy.access_log is not None
        proxy.access_log.flush()
        lines = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    served, promoted = lane_counts(proxy)
    return ChainRun(
        responses[1:],
        raws[1:],
        origin.heads()[1:],
        origin.stream(),
        served,
        promoted,
        policy_counters(proxy),
        lines,
        proxy,
        origin,
    )


TRACEPARENT = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\r\n")


def norm(data: bytes) -> bytes:
    """``data`` with the random trace and span ids of every traceparent replaced (the
    sampled flag is kept)."""
    return TRACEPARENT.sub(rb"traceparent: 00-<trace>-<span>-\3\r\n", data)


def no_traceparent(data: bytes) -> bytes:
    """``data`` without its traceparent lines: at a ratio between 0 and 1 the two runs
    sample different requests, and a sampled request's traceparent is its CLIENT span's,
    written after the claim fields instead of before them."""
    return TRACEPARENT.sub(b"", data)


async def both(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    steps: list[Step],
    *,
    normalise: Callable[[bytes], bytes] = norm,
    **kw: Any,
) -> tuple[ChainRun, ChainRun]:
    """The same steps with express off (the reference) and on; asserts that the origin's
    bytes (normalised), the client's bytes and the policy counters are identical, and
    that the general-path run served nothing on the lane."""
    general = await run_chain(make_proxy, new_origin, steps, express=False, **kw)
    express = await run_chain(make_proxy, new_origin, steps, express=True, **kw)
    assert general.served == 0
    assert [(i, normalise(h)) for i, h in express.heads] == [
        (i, normalise(h)) for i, h in general.heads
    ]
    assert [normalise(s) for s in express.stream] == [normalise(s) for s in general.stream]
    assert len(express.raw) == len(general.raw)
    for i, (got, want) in enumerate(zip(express.raw, general.raw, strict=True)):
        assert got == want, (i, got, want)
    assert express.counters == general.counters
    return express, general


def fields(head: bytes) -> list[bytes]:
    """The field lines of a request head (no request line, no blank line)."""
    return head.split(b"\r\n")[1:-2]


def rid_of(head: bytes) -> str:
    for line in fields(head):
        if line.startswith(b"x-request-id: "):
            return line[14:].decode()
    raise AssertionError(f"no x-request-id in {head!r}")


def traceparent_of(head: bytes) -> tuple[str, str, str]:
    """(trace id, span id, flags) of the one traceparent sent upstream."""
    found = TRACEPARENT.findall(head)
    assert len(found) == 1, head
    trace, span, flags = found[0]
    return trace.decode(), span.decode(), flags.decode()


def counter(run: ChainRun, family: str, **labels: str) -> float:
    """One counter sample of ``run`` (0 when never counted)."""
    for series, value in run.counters.items():
        name, _, rest = series.partition("{")
        if name == family and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    return 0.0


# --- 1. auth + per-user limit + tracing on the lane --------------------------------------


async def test_auth_limit_and_tracing_on_the_lane(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """A cached valid token on an auth + local-limit route with unsampled tracing: every
    request takes the lane, the origin sees the general path's bytes (the claim field,
    no Authorization, client-forged claim fields dropped, a traceparent with flag 00
    right after X-Request-Id), and the counters match."""
    auth = bearer(ALICE)
    steps: list[Step] = [
        (request("/a", "c-1", auth), b"GET"),
        (request("/a?q=1&r=%20", "c-2", auth + "Accept: */*\r\n"), b"GET"),
        (
            request(
                "/spoof",
                "c-3",
                "X-User-Id: mallory\r\nx-user-id: root\r\n" + auth + "X-Kept: 1\r\n",
            ),
            b"GET",
        ),
        (request("/head", "c-4", auth, method="HEAD"), b"HEAD"),
        # lower-case scheme, extra blanks: still the cached token (RFC 7235 §2.1)
        (request("/case", "c-5", f"authorization: bearer   {ALICE}  \r\n"), b"GET"),
        (request("/hdrs", "c-6", auth), b"GET"),
        (request("/bye", "c-7", auth + "Connection: close\r\n"), b"GET"),
        (request("/after", "c-8", auth), b"GET"),
    ]
    express, general = await both(make_proxy, new_origin, steps)
    assert [r.status for r in express.responses] == [200] * len(steps)
    assert (express.served, express.promoted) == (len(steps), 0)
    assert {i for i, _ in express.heads} == {0}  # all on the warm-up's connection
    for _, head in express.heads:
        lines = fields(head)
        assert not any(line.lower().startswith(b"authorization:") for line in lines), head
        at = next(i for i, line in enumerate(lines) if line.startswith(b"x-request-id: "))
        # The order the general path writes: ..., x-request-id, traceparent, claims.
        assert TRACEPARENT.fullmatch(lines[at + 1] + b"\r\n") is not None, head
        assert lines[at + 1].endswith(b"-00")
        assert lines[at + 2 :] == [b"x-user-id: alice"], head
        assert sum(line.lower().startswith(b"x-user-id:") for line in lines) == 1
    spoofed = {rid_of(h): h for _, h in express.heads}["c-3"]
    assert b"\r\nx-kept: 1\r\n" in spoofed
    assert b"mallory" not in spoofed and b"root" not in spoofed
    assert counter(express, "fastedge_auth_total", result="ok") == len(steps) + 1
    assert counter(express, "fastedge_ratelimit_total", result="allowed") == len(steps)
    assert counter(express, "fastedge_ratelimit_total", result="limited") == 0
    # sample_ratio 0: nothing recorded on either lane
    for run in (express, general):
        assert run.server.tracing is not None and run.server.tracing.sink is not None
        assert len(run.server.tracing.sink) == 0


# --- 2. refused tokens: the general path answers, identically ----------------------------


async def test_refused_tokens_are_answered_by_the_general_path(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """Missing, other-scheme, empty, duplicated, badly signed, expired and too old (once
    cached) tokens get the same 401/400 on both lanes; only cached valid tokens took the
    lane, and the auth counters are the same (the lane counted nothing extra)."""
    soon = token(ttl=60)  # with the default 30 s leeway: refused from NOW + 90
    forged = token(secret=OTHER_SECRET)
    # max_age 10m: refused from NOW + 630 although cached until NOW + 3630, so only the
    # lane's own time check can send it to the general path.
    old = token("dave", ttl=3600)
    steps: list[Step] = [
        (request("/none", "r-1"), b"GET"),
        (request("/basic", "r-2", "Authorization: Basic YWxpY2U6cHc=\r\n"), b"GET"),
        (request("/bare", "r-3", "Authorization: Bearer\r\n"), b"GET"),
        (request("/empty", "r-4", "Authorization:\r\n"), b"GET"),
        (request("/dup", "r-5", bearer(ALICE) + bearer(ALICE)), b"GET"),
        (request("/forged", "r-6", bearer(forged)), b"GET"),
        (request("/ok", "r-7", bearer(ALICE)), b"GET"),  # lane
        (request("/soon", "r-8", bearer(soon)), b"GET"),  # verified, cached: general
        (request("/soon", "r-9", bearer(soon)), b"GET"),  # cached: lane
        Advance(100.0),
        (request("/soon", "r-10", bearer(soon)), b"GET"),  # expired: general, 401
        (request("/ok", "r-11", bearer(ALICE)), b"GET"),  # lane
        (request("/forged", "r-12", bearer(forged)), b"GET"),  # never cached: general
        (request("/old", "r-13", bearer(old)), b"GET"),  # verified, cached: general
        (request("/old", "r-14", bearer(old)), b"GET"),  # cached: lane
        Advance(600.0),
        (request("/old", "r-15", bearer(old)), b"GET"),  # cached, too old: general, 401
    ]
    express, general = await both(make_proxy, new_origin, steps, auth={"max_age": "10m"})
    statuses = [r.status for r in express.responses]
    assert statuses == [401, 401, 401, 401, 400, 401, 200, 200, 200, 401, 200, 401, 200, 200, 401]
    by_rid = {f"r-{i + 1}": r for i, r in enumerate(express.responses)}
    assert by_rid["r-1"].header("www-authenticate") == b'Bearer realm="fastedge"'
    assert b"invalid_request" in (by_rid["r-5"].header("www-authenticate") or b"")
    assert b"token expired" in (by_rid["r-10"].header("www-authenticate") or b"")
    assert b"signature" in (by_rid["r-6"].header("www-authenticate") or b"")
    assert b"token too old" in (by_rid["r-15"].header("www-authenticate") or b"")
    # r-7, r-9, r-11, r-14: the only requests the lane could take.
    assert (express.served, express.promoted) == (4, 0)
    reached = ["r-7", "r-8", "r-9", "r-11", "r-13", "r-14"]
    assert [rid_of(h) for _, h in express.heads] == reached
    assert counter(express, "fastedge_auth_total", result="ok") == 7  # warm-up included
    assert counter(express, "fastedge_auth_total", result="missing") == 4
    assert counter(express, "fastedge_auth_total", result="invalid") == 3
    assert counter(express, "fastedge_auth_total", result="expired") == 2
    assert counter(express, "fastedge_ratelimit_total", result="allowed") == 6
    assert general.counters == express.counters


# --- 3. the rate limit: exactly ``limit`` allowed on both lanes --------------------------


@pytest.mark.parametrize(
    "rate",
    [
        {"algorithm": "sliding_window", "limit": 3, "window": "60s", "key": "claim:sub"},
        {"algorithm": "token_bucket", "rate": 0.05, "burst": 3, "key": "claim:sub"},
        {"algorithm": "sliding_window", "limit": 3, "window": "60s"},  # per client IP
    ],
    ids=["sliding_window_per_user", "token_bucket_per_user", "sliding_window_per_ip"],
)
async def test_local_limit_allows_exactly_the_limit(
    make_proxy: MakeProxy, new_origin: NewOrigin, rate: dict[str, Any]
) -> None:
    """Six requests against a limit of three: three 200s (taken on the lane), three 429s
    (the lane's check refused, the general path answered with the same Retry-After and
    RateLimit fields), then another user (another bucket, unless the key is the IP)."""
    steps: list[Step] = [(request(f"/l{i}", f"l-{i}", bearer(ALICE)), b"GET") for i in range(6)]
    steps += [(request(f"/b{i}", f"b-{i}", bearer(BOB)), b"GET") for i in range(2)]
    express, _ = await both(make_proxy, new_origin, steps, rate=rate)
    per_user = rate.get("key") == "claim:sub"
    statuses = [r.status for r in express.responses]
    bob = [200, 200] if per_user else [429, 429]
    assert statuses == [200, 200, 200, 429, 429, 429, *bob]
    limited = express.responses[3]
    assert limited.header("retry-after") is not None
    assert limited.header("ratelimit-policy") is not None
    assert express.responses[0].header("ratelimit") is None  # headers = "limited"
    # Alice's three allowed ones on the lane; Bob's first token is verified (general
    # path), his second is cached (lane); a 429 never counts as served.
    assert express.served == (3 + 1 if per_user else 3)
    assert express.promoted == 0
    allowed = 5 if per_user else 3
    assert counter(express, "fastedge_ratelimit_total", result="allowed") == allowed
    assert counter(express, "fastedge_ratelimit_total", result="limited") == 8 - allowed
    assert counter(express, "fastedge_auth_total", result="ok") == 9
    assert len(express.heads) == allowed  # a refused request never reaches the origin


# --- 4. headers = "always": not for the lane ---------------------------------------------


async def test_always_headers_keep_the_route_off_the_lane(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """A policy that adds RateLimit fields to allowed responses cannot be decided on the
    lane (it writes no response fields): the route stays on the general path, answers
    are right and the same."""
    rate = {"algorithm": "sliding_window", "limit": 3, "window": "60s", "headers": "always"}
    steps: list[Step] = [(request(f"/w{i}", f"w-{i}", bearer(ALICE)), b"GET") for i in range(4)]
    express, _ = await both(make_proxy, new_origin, steps, rate=rate)
    assert (express.served, express.promoted) == (0, 0)
    assert [r.status for r in express.responses] == [200, 200, 200, 429]
    remaining = [r.header("ratelimit") or b"" for r in express.responses[:3]]
    assert [v.partition(b";t=")[0] for v in remaining] == [
        b'"per_user";r=2',
        b'"per_user";r=1',
        b'"per_user";r=0',
    ]
    assert len({i for i, _ in express.heads}) == 1  # the pool was warm: refused, not cold
    assert counter(express, "fastedge_ratelimit_total", result="allowed") == 3
    assert counter(express, "fastedge_ratelimit_total", result="limited") == 1


# --- 5. sampled requests: recorded by the general path under the lane's id ---------------


async def test_sample_ratio_one_records_everything_off_the_lane(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """sample_ratio 1.0: every request is sampled, so none takes the lane, and every one
    is recorded under the trace id the upstream received."""
    steps: list[Step] = [(request(f"/s{i}", f"s-{i}", bearer(ALICE)), b"GET") for i in range(6)]
    express, general = await both(make_proxy, new_origin, steps, sample_ratio=1.0)
    assert (express.served, express.promoted) == (0, 0)
    for run in (express, general):
        assert run.server.tracing is not None and run.server.tracing.sink is not None
        spans = run.server.tracing.sink.recent(1000)
        servers = {
            s["attributes"]["fastedge.request_id"]: s for s in spans if s["kind"] == "server"
        }
        clients = {s["span_id"]: s for s in spans if s["kind"] == "client"}
        assert len(servers) == len(steps) + 1  # the warm-up too
        for _, head in run.heads:
            trace, span, flags = traceparent_of(head)
            assert flags == "01"
            assert servers[rid_of(head)]["trace_id"] == trace
            # The upstream's parent is the recorded CLIENT span of that SERVER span.
            assert clients[span]["parent_span_id"] == servers[rid_of(head)]["span_id"]


def _sampling_report(run: ChainRun) -> tuple[int, int]:
    """Checks one run at a ratio in (0, 1) and returns (sampled, unsampled) counts: each
    request's upstream trace id is the access log's, a sampled one is recorded under it
    (and only those), and the flag is the sampler's decision for that very id."""
    assert run.server.tracing is not None and run.server.tracing.sink is not None
    ratio = TraceIdRatio(0.5)
    recorded = {
        s["attributes"]["fastedge.request_id"]: s["trace_id"]
        for s in run.server.tracing.sink.recent(2000)
        if s["kind"] == "server"
    }
    logged = {line["request_id"]: line["trace_id"] for line in run.log}
    sampled = unsampled = 0
    for _, head in run.heads:
        rid = rid_of(head)
        trace, _, flags = traceparent_of(head)
        assert logged[rid] == trace, rid
        assert (flags == "01") == ratio.should_sample(trace, None), rid
        if flags == "01":
            sampled += 1
            assert recorded[rid] == trace, rid
        else:
            unsampled += 1
            assert rid not in recorded, rid
    return sampled, unsampled


async def test_half_sampled_keeps_the_lane_trace_id(
    make_proxy: MakeProxy, new_origin: NewOrigin, tmp_path: Path
) -> None:
    """sample_ratio 0.5 over 200 requests: the lane draws each id; an unsampled one is
    served on the lane, a sampled one is recorded by the general path *under that id*.
    So the lane served exactly the unsampled ones, every trace id the upstream got is
    the access log's and (when sampled) the recorded span's, and about half are
    sampled (were the drawn id dropped, the general path would sample a quarter)."""
    count = 200
    steps: list[Step] = [(request(f"/h{i}", f"h-{i}", bearer(ALICE)), b"GET") for i in range(count)]
    express, general = await both(
        make_proxy, new_origin, steps, sample_ratio=0.5, log_dir=tmp_path, normalise=no_traceparent
    )
    for run in (express, general):
        sampled, unsampled = _sampling_report(run)
        assert sampled + unsampled == count
        # Binomial(200, 0.5): sd ~7.1; the bounds are 4.2 sd away.
        assert 70 <= sampled <= 130, (run.served, sampled)
        if run is express:
            assert run.served == unsampled
        else:
            assert run.served == 0
    # The warm-up and every request: one access-log line each, on both lanes.
    assert len(express.log) == len(general.log) == count + 1


async def test_requests_off_the_lane_are_sampled_at_the_ratio(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """Requests the lane's policies refuse (here: no token, 401) are sampled at the
    configured ratio with the lane on, as with it off."""
    count = 400
    steps: list[Step] = [(request(f"/n{i}", f"n-{i}"), b"GET") for i in range(count)]
    express, general = await both(
        make_proxy, new_origin, steps, sample_ratio=0.5, normalise=no_traceparent
    )
    for run in (general, express):
        assert run.served == 0
        assert [r.status for r in run.responses] == [401] * count
        assert run.server.tracing is not None and run.server.tracing.sink is not None
        spans = run.server.tracing.sink.recent(2000)
        sampled = sum(
            s["attributes"]["fastedge.request_id"] != "warm-0"
            for s in spans
            if s["kind"] == "server"
        )
        # Binomial(400, 0.5): 200, sd 10; drawing again off the lane would make it
        # Binomial(400, 0.75): 300, sd 8.7. The bounds are 5 sd from the one and 5.7 sd
        # from the other.
        assert 150 <= sampled <= 250, ("express" if run is express else "general", sampled)


# --- 6. a caller's trace context: the general path continues it --------------------------

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{CALLER_TRACE}-00f067aa0ba902b7"


async def test_caller_trace_context_takes_the_general_path(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """A request carrying traceparent (or only tracestate) goes to the general path, which
    continues the caller's trace; requests around it still take the lane."""
    auth = bearer(ALICE)
    steps: list[Step] = [
        (request("/t1", "t-1", auth), b"GET"),  # lane
        (request("/t2", "t-2", auth + f"traceparent: {CALLER}-01\r\n"), b"GET"),
        (request("/t3", "t-3", auth + f"Traceparent: {CALLER}-00\r\ntracestate: a=1\r\n"), b"GET"),
        (request("/t4", "t-4", auth + "tracestate: a=1\r\n"), b"GET"),
        (request("/t5", "t-5", auth), b"GET"),  # lane
    ]
    express, _ = await both(make_proxy, new_origin, steps)
    assert [r.status for r in express.responses] == [200] * len(steps)
    assert (express.served, express.promoted) == (2, 0)
    heads = {rid_of(h): h for _, h in express.heads}
    for rid, flags in (("t-2", "01"), ("t-3", "00")):
        trace, span, sent_flags = traceparent_of(heads[rid])
        assert trace == CALLER_TRACE and sent_flags == flags
        assert span != CALLER.split("-")[2]  # this hop's span is the upstream's parent
    assert b"\r\ntracestate: a=1\r\n" in heads["t-3"]
    # tracestate without traceparent: a new trace, the orphan tracestate not forwarded
    assert traceparent_of(heads["t-4"])[0] != CALLER_TRACE
    assert b"tracestate" not in heads["t-4"]
    assert express.server.tracing is not None and express.server.tracing.sink is not None
    recorded = {s["trace_id"] for s in express.server.tracing.sink.recent(100)}
    assert recorded == {CALLER_TRACE}  # only the caller's sampled trace


# --- 7. promotion on a route with policies ---------------------------------------------


async def test_promotion_keeps_the_policies_and_the_trace(
    make_proxy: MakeProxy, new_origin: NewOrigin, tmp_path: Path
) -> None:
    """Split, HEAD-chunked and stale (closed without an answer, so retried) responses on
    the auth + limit + tracing route (a whole chunked body stays on the lane, re-framed):
    the general path takes over after the lane sent the
    request; the client gets the same bytes, the retry resends exactly what the lane had
    sent (its policy edits and traceparent included), and each access-log line carries
    the trace id the upstream was sent."""
    auth = bearer(ALICE)
    steps: list[Step] = [
        (request("/chunked/a", "p-1", auth), b"GET"),
        (request("/chunkedsplit/b", "p-2", auth), b"GET"),
        (request("/chunked/c", "p-3", auth, method="HEAD"), b"HEAD"),
        (request("/plain", "p-4", auth), b"GET"),
        (request("/stale", "p-5", auth), b"GET"),
        (request("/after", "p-6", auth), b"GET"),
    ]
    express, general = await both(make_proxy, new_origin, steps, log_dir=tmp_path)
    assert [r.status for r in express.responses] == [200] * len(steps)
    assert express.responses[0].body == b"fixed body"
    assert express.responses[1].body == b"fixed body"
    assert (express.served, express.promoted) == (len(steps), 3)
    rids = [rid_of(h) for _, h in express.heads]
    assert rids == ["p-1", "p-2", "p-3", "p-4", "p-5", "p-5", "p-6"]
    (c0, stale), (c1, retried) = express.heads[4:6]
    assert (c0, c1) == (0, 1)
    assert stale == retried  # byte for byte, ids included
    assert b"\r\nx-user-id: alice\r\n\r\n" in retried and b"authorization" not in retried
    for run in (express, general):
        logged = {line["request_id"]: line["trace_id"] for line in run.log}
        for _, head in run.heads:
            assert logged[rid_of(head)] == traceparent_of(head)[0]
    assert counter(express, "fastedge_ratelimit_total", result="allowed") == len(steps)


async def test_policies_with_an_upstream_host_header(
    make_proxy: MakeProxy, new_origin: NewOrigin, tmp_path: Path
) -> None:
    """An upstream with its own ``host_header`` behind auth + limit + tracing: the lane
    drops the client's Host along with the policy's fields and writes the upstream's
    after the request id, before the trace context and the claim fields; promoted and
    retried requests resend exactly that."""
    auth = bearer(ALICE)
    steps: list[Step] = [
        (request("/plain", "h-1", auth), b"GET"),
        (request("/chunkedsplit/b", "h-2", auth), b"GET"),
        (request("/stale", "h-3", auth), b"GET"),
        (request("/after", "h-4", auth), b"GET"),
    ]
    express, _ = await both(
        make_proxy, new_origin, steps, log_dir=tmp_path, upstream={"host_header": "api.internal"}
    )
    assert [r.status for r in express.responses] == [200] * len(steps)
    assert (express.served, express.promoted) == (len(steps), 2)
    heads = [h for _, h in express.heads]
    for head in heads:
        assert head.count(b"\r\nhost: ") == 1
        assert norm(head).endswith(
            b"\r\nx-request-id: " + rid_of(head).encode() + b"\r\nhost: api.internal\r\n"
            b"traceparent: 00-<trace>-<span>-00\r\nx-user-id: alice\r\n\r\n"
        )
    (c0, stale), (c1, retried) = express.heads[2:4]
    assert (c0, c1) == (0, 1) and stale == retried


# --- 8. custom claim fields, Authorization kept ----------------------------------------


async def test_custom_claims_and_kept_authorization(
    make_proxy: MakeProxy, new_origin: NewOrigin
) -> None:
    """``forward_claims`` names other fields (a missing claim adds none, yet client copies
    are still dropped) and ``strip_authorization = false`` forwards the token: the lane
    writes exactly what the general path does."""
    policy = {
        "forward_claims": {"sub": "X-Subject", "tenant": "x-tenant", "roles": "X-Roles"},
        "strip_authorization": False,
    }
    full = token(tenant="acme", roles=["admin", "ops"])
    partial = token("carol")
    spoof = "X-Tenant: evil\r\nX-Subject: mallory\r\nX-User-Id: kept\r\n"
    steps: list[Step] = [
        (request("/f1", "f-1", spoof + bearer(full)), b"GET"),
        (request("/f2", "f-2", bearer(full) + "X-Roles: root\r\n"), b"GET"),
        (request("/f3", "f-3", spoof + bearer(partial)), b"GET"),  # verified: general
        (request("/f4", "f-4", spoof + bearer(partial)), b"GET"),  # cached: lane
    ]
    express, _ = await both(
        make_proxy, new_origin, steps, auth=policy, warm_token=full, sample_ratio=None
    )
    assert [r.status for r in express.responses] == [200] * len(steps)
    assert (express.served, express.promoted) == (3, 0)
    heads = {rid_of(h): h for _, h in express.heads}
    assert heads["f-1"].endswith(
        b"\r\nx-user-id: kept\r\nauthorization: Bearer " + full.encode() + b"\r\n"
        b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n"
        b"x-forwarded-host: example.test\r\nvia: 1.1 fastedge\r\nx-request-id: f-1\r\n"
        b'x-subject: alice\r\nx-tenant: acme\r\nx-roles: ["admin","ops"]\r\n\r\n'
    )
    assert b"evil" not in heads["f-1"] and b"mallory" not in heads["f-1"]
    assert b"root" not in heads["f-2"]
    for rid in ("f-3", "f-4"):
        assert heads[rid].endswith(
            b"x-request-id: " + rid.encode() + b"\r\nx-subject: carol\r\n\r\n"
        )
        assert b"x-tenant" not in heads[rid]  # no claim, and the client's copy dropped
    assert counter(express, "fastedge_auth_total", result="ok") == len(steps) + 1
