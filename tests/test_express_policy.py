"""The express-lane policy protocol on its own: which chains offer ``express_admit``,
what ``admit`` runs and in which order, auth's and the local rate limit's checks against
their general-path ``on_request``, auth keeping no raw token, ``new_root_trace`` on both
implementations, and ``Tracer.start_span(trace_id=...)``.

Nothing here opens a socket: requests are real :class:`ExpressRequest` objects from
``scan_request``, and the auth and rate-limit clocks are injected (as in
tests/test_auth.py and tests/test_ratelimit_filter.py), so tokens expire and buckets
refill on command.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import example, given, reject, settings
from hypothesis import strategies as st

import fastedge._core.express as compiled_express
import fastedge._core.express_py as python_express
from fastedge._core import scan_request
from fastedge.bounded_get import HttpResponse
from fastedge.config import Config, parse_config
from fastedge.errors import ProxyError
from fastedge.filters import FilterChain, FilterContext, Runtime, build_route_filters
from fastedge.filters.account import AccountChecker
from fastedge.filters.auth import AuthFilter, AuthState, Verified, _bearer, token_digest
from fastedge.filters.express import ExpressContext, ExpressPolicyBase, admit
from fastedge.filters.ratelimit import RateLimitFilter, build_rate_limit_filter
from fastedge.observe.metrics import Metrics
from fastedge.observe.tracecontext import FLAG_SAMPLED, TraceContext
from fastedge.observe.tracing import ParentBased, TraceIdRatio, Tracer
from tests.test_auth import ENV, NOW, SECRET, Clock, claims, hs
from tests.test_ratelimit_filter import FakeClock

CLIENT_IP = b"10.0.0.1"
ROUTE = "/r"
HS_POLICY: dict[str, Any] = {
    "algorithms": ["HS256"],
    "keys": [{"algorithm": "HS256", "secret_env": ENV}],
}
SW2 = {"algorithm": "sliding_window", "limit": 2, "window": "10s"}


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


# --------------------------------------------------------------------------- helpers


def config(
    route: dict[str, Any],
    *,
    auth: dict[str, Any] | None = None,
    rate_limits: dict[str, Any] | None = None,
    **sections: Any,
) -> Config:
    """One route ``/r`` with the policy keys in ``route``; ``[auth.p]`` is ``auth``."""
    doc: dict[str, Any] = {
        "admin": {"enabled": False},
        "upstreams": {"o": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [{"prefix": ROUTE, "upstream": "o", **route}],
        **sections,
    }
    if auth is not None:
        doc["auth"] = {"p": auth}
    if rate_limits is not None:
        doc["rate_limits"] = rate_limits
    return parse_config(doc)


def scan(*fields: tuple[bytes, bytes], target: bytes = b"/r") -> Any:
    """A real express request (``ExpressRequest``) for a GET with ``fields`` after Host."""
    lines = b"".join(b"%s: %s\r\n" % f for f in fields)
    data = b"GET %s HTTP/1.1\r\nHost: example.test\r\n%s\r\n" % (target, lines)
    req = scan_request(data, CLIENT_IP, b"http", b"1.1 fastedge", 8192, 8192, 100)
    assert req is not None, data
    return req


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + token.encode())


def general_ctx(req: Any) -> FilterContext:
    """The general path's context for the same request: the client's fields, and the
    same list as the (not yet rewritten) forwarded fields the filters edit."""
    headers = req.headers()
    return FilterContext(
        method=req.method,
        path=req.path,
        query=req.query,
        host=req.host,
        client_ip=CLIENT_IP,
        headers=headers,
        upstream_headers=list(headers),
        route=ROUTE,
        request_id=b"rid",
    )


def counters(metrics: Metrics) -> dict[str, float]:
    """Every auth and rate-limit counter sample, by its Prometheus series."""
    out: dict[str, float] = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith(("fastedge_auth_total{", "fastedge_ratelimit_total{")):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What changed between two :func:`counters` snapshots (zero changes left out)."""
    keys = before.keys() | after.keys()
    changed = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in changed.items() if v}


def auth_series(result: str) -> str:
    return f'fastedge_auth_total{{policy="p",result="{result}"}}'


def limit_series(result: str, policy: str = "l") -> str:
    return f'fastedge_ratelimit_total{{policy="{policy}",result="{result}"}}'


def auth_filter(cfg: Config, rt: Runtime, clock: Clock) -> AuthFilter:
    """Policy ``p`` of ``cfg`` with the test clock (build_auth_filter uses the real one)."""
    state = AuthState(cfg.sections["auth"]["p"], rt, clock=clock.wall, monotonic=clock.monotonic)
    return AuthFilter(state)


def limit_filter(cfg: Config, rt: Runtime, clock: FakeClock) -> RateLimitFilter:
    route = cfg.routes[0]
    f = build_rate_limit_filter(route.policies["rate_limit"], route, cfg, rt, clock=clock)
    assert isinstance(f, RateLimitFilter)
    return f


def cache_token(f: AuthFilter, token: str) -> None:
    """Put ``token`` in the verification cache the way the general path does (verify,
    remember), without counting and without an account lookup."""
    state = f.state
    now = state.clock()
    entry = state.verify(token, now)
    assert isinstance(entry, Verified), entry
    state.remember(token_digest(token.encode()), entry, now)


def apply_edits(headers: list[tuple[bytes, bytes]], x: ExpressContext) -> list[tuple[bytes, bytes]]:
    """The forwarded fields the lane's decisions describe: ``drop`` removed, ``fields``
    appended (what ``compose(target, drop, extra)`` does to the field block)."""
    return [h for h in headers if h[0] not in x.drop] + list(x.fields)


# --------------------------------------------------------------------------- 1. eligibility


@pytest.mark.parametrize(
    ("route", "filters"),
    [
        ({"auth": "p"}, ["AuthFilter"]),
        ({"rate_limit": "l"}, ["RateLimitFilter"]),
        ({"auth": "p", "rate_limit": "l"}, ["AuthFilter", "RateLimitFilter"]),
    ],
    ids=["auth", "local-limit", "auth+local-limit"],
)
def test_policy_chains_offer_express_admit(route: dict[str, Any], filters: list[str]) -> None:
    """Auth with its cache, a local limit, and both: the chain offers ``admit`` bound to
    its own filters, in phase order."""
    cfg = config(route, auth=HS_POLICY, rate_limits={"l": SW2})
    chain = build_route_filters(cfg.routes[0], cfg, Runtime(metrics=Metrics()))
    assert chain is not None
    assert [type(f).__name__ for f in chain.filters] == filters
    assert chain.express_admit is not None
    assert chain.express_admit.func is admit  # type: ignore[attr-defined]
    assert chain.express_admit.args == (chain.filters,)  # type: ignore[attr-defined]


TRAFFIC = {
    "products": {"versions": {"blue": "o", "green": "o"}, "weights": {"blue": 100, "green": 0}}
}


@pytest.mark.parametrize(
    ("route", "auth", "rate_limits", "sections"),
    [
        ({"rate_limit": "l"}, None, {"l": {**SW2, "headers": "always"}}, {}),
        ({"auth": "p", "rate_limit": "l"}, HS_POLICY, {"l": {**SW2, "headers": "always"}}, {}),
        ({"rate_limit": ["l", "m"]}, None, {"l": SW2, "m": SW2}, {}),
        ({"auth": "p"}, {**HS_POLICY, "cache_size": 0}, None, {}),
        ({"auth": "p"}, {**HS_POLICY, "forward_claims": {"sub": "traceparent"}}, None, {}),
        ({"auth": "p"}, {**HS_POLICY, "forward_claims": {"sid": "tracestate"}}, None, {}),
        ({"cache": "edge"}, None, None, {"caches": {"edge": {"max_bytes": "4MiB"}}}),
        ({"auth": "p", "cache": "edge"}, HS_POLICY, None, {"caches": {"edge": {}}}),
        ({"traffic": "products"}, None, None, {"traffic": TRAFFIC}),
        ({"auth": "p", "traffic": "products"}, HS_POLICY, None, {"traffic": TRAFFIC}),
    ],
    ids=[
        "limit-headers-always",
        "auth+limit-headers-always",
        "two-limits",
        "auth-cache-size-0",
        "auth-claim-as-traceparent",
        "auth-claim-as-tracestate",
        "cache",
        "auth+cache",
        "traffic",
        "auth+traffic",
    ],
)
def test_chains_the_lane_cannot_decide_have_no_express_admit(
    route: dict[str, Any],
    auth: dict[str, Any] | None,
    rate_limits: dict[str, Any] | None,
    sections: dict[str, Any],
) -> None:
    """Any filter that cannot decide from memory (or adds response fields, or is not a
    policy at all) keeps the whole route on the general path."""
    cfg = config(route, auth=auth, rate_limits=rate_limits, **sections)
    chain = build_route_filters(cfg.routes[0], cfg, Runtime(metrics=Metrics()))
    assert chain is not None
    assert chain.express_admit is None


def test_a_redis_limit_builds_without_connecting_and_stays_off_the_lane() -> None:
    """A Redis-backed policy (config only: no server, no event loop) builds, and its
    route, alone or behind auth, has no ``express_admit``."""
    redis_limit = {"l": {**SW2, "backend": "redis"}}
    redis = {"redis": {"url": "redis://127.0.0.1:9/0"}}
    for route in ({"rate_limit": "l"}, {"auth": "p", "rate_limit": "l"}):
        cfg = config(route, auth=HS_POLICY, rate_limits=redis_limit, **redis)
        rt = Runtime(metrics=Metrics())
        chain = build_route_filters(cfg.routes[0], cfg, rt)
        assert chain is not None
        limit = chain.filters[-1]
        assert isinstance(limit, RateLimitFilter) and limit.express_ready is False
        assert chain.express_admit is None
        assert rt._redis is None  # no client was even created, let alone connected


class Fake:
    """A filter with the ExpressPolicy attributes; records its calls in ``log``."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        ready: bool = True,
        consumes: bool = False,
        check: bool = True,
    ) -> None:
        self.name = name
        self.log = log
        self.express_ready = ready
        self.express_consumes = consumes
        self.answer = check

    def on_request(self, ctx: FilterContext) -> None:
        return None

    def express_check(self, x: ExpressContext) -> bool:
        self.log.append(f"check {self.name}")
        return self.answer

    def express_apply(self, x: ExpressContext) -> None:
        self.log.append(f"apply {self.name}")
        x.drop += (self.name.encode(),)


class FakeWithResponse(Fake):
    def on_response(self, ctx: FilterContext, status: int, headers: list[Any]) -> None:
        return None


class FakeWithError(Fake):
    def on_error(self, ctx: FilterContext, err: Exception) -> None:
        return None


class FakeWithBody(Fake):
    def on_response_end(self, ctx: FilterContext) -> None:
        return None


def test_chain_rules_for_protocol_filters() -> None:
    """Eligibility with filters that only have the protocol's attributes: a consuming
    check only last, every filter ready, and no response, body or error phase."""
    log: list[str] = []

    def offered(*filters: Any) -> bool:
        return FilterChain(list(filters)).express_admit is not None

    assert offered(Fake("a", log), Fake("b", log, consumes=True))
    assert offered(Fake("a", log, consumes=True))
    assert not offered(Fake("a", log, consumes=True), Fake("b", log))
    assert not offered(Fake("a", log, consumes=True), Fake("b", log, consumes=True))
    assert not offered(Fake("a", log), Fake("b", log, ready=False))
    assert not offered(FakeWithResponse("a", log))
    assert not offered(FakeWithError("a", log))
    assert not offered(FakeWithBody("a", log))
    assert not offered()  # an empty chain has nothing to decide
    assert log == []  # deciding eligibility runs no check


# --------------------------------------------------------------------------- 2. admit


def test_admit_runs_every_check_before_any_apply() -> None:
    """Checks in order, then applies in order; the context carries what they decided."""
    log: list[str] = []
    chain = FilterChain([Fake("a", log), Fake("b", log), Fake("c", log, consumes=True)])
    assert chain.express_admit is not None
    req = scan()
    x = chain.express_admit(req, CLIENT_IP, ROUTE)
    assert log == ["check a", "check b", "check c", "apply a", "apply b", "apply c"]
    assert isinstance(x, ExpressContext)
    assert (x.request, x.client_ip, x.route) == (req, CLIENT_IP, ROUTE)
    assert x.drop == (b"a", b"b", b"c")


@pytest.mark.parametrize("refuser", [0, 1, 2])
def test_admit_stops_at_the_first_false_check(refuser: int) -> None:
    """A ``False`` check ends the lane there: no later check and no apply at all."""
    log: list[str] = []
    fakes = [Fake(name, log, check=i != refuser) for i, name in enumerate("abc")]
    assert admit(tuple(fakes), scan(), CLIENT_IP, ROUTE) is None
    assert log == [f"check {name}" for name in "abc"[: refuser + 1]]


class BasedFake(Fake, ExpressPolicyBase):
    """``Fake`` deriving from the C base too: admit calls it through the base's C
    methods, which must still reach ``Fake``'s Python methods."""


@pytest.mark.parametrize("refuser", [None, 0, 1, 2])
def test_admit_calls_base_subclasses_and_protocol_filters_alike(refuser: int | None) -> None:
    """Subclasses of ExpressPolicyBase (called as C methods) and protocol-only filters
    (called the Python way) mixed in one chain: the same order, the same stop."""
    log: list[str] = []
    filters = (
        BasedFake("a", log, check=refuser != 0),
        Fake("b", log, check=refuser != 1),
        BasedFake("c", log, check=refuser != 2),
    )
    x = admit(filters, scan(), CLIENT_IP, ROUTE)
    if refuser is None:
        assert log == ["check a", "check b", "check c", "apply a", "apply b", "apply c"]
        assert x is not None and x.drop == (b"a", b"b", b"c")
    else:
        assert x is None
        assert log == [f"check {name}" for name in "abc"[: refuser + 1]]


def test_express_policy_base_alone_declines_everything() -> None:
    """The base is the policy that decides nothing on the lane: its check declines (the
    general path decides), its apply changes nothing, so a chain holding it never admits
    on the lane and checks nothing after it. The built-in policy filters are
    subclasses (so admit calls them in C)."""
    x = ExpressContext(scan(), CLIENT_IP, ROUTE)
    base = ExpressPolicyBase()
    assert base.express_check(x) is False
    base.express_apply(x)
    assert (x.drop, x.fields, x.extra, x.claims, x.auth) == ((), (), b"", None, None)
    log: list[str] = []
    assert admit((base, Fake("b", log)), scan(), CLIENT_IP, ROUTE) is None
    assert log == []
    assert admit((Fake("a", log), base), scan(), CLIENT_IP, ROUTE) is None
    assert log == ["check a"]
    assert issubclass(AuthFilter, ExpressPolicyBase)
    assert issubclass(RateLimitFilter, ExpressPolicyBase)


def test_admit_refused_by_auth_takes_no_limiter_token() -> None:
    """Auth refusing on the lane (an uncached token) leaves every counter and the
    limiter untouched: the limit of 2 is still whole afterwards."""
    cfg = config({"auth": "p", "rate_limit": "l"}, auth=HS_POLICY, rate_limits={"l": SW2})
    rt, clock, lclock = Runtime(metrics=Metrics()), Clock(), FakeClock()
    auth, limit = auth_filter(cfg, rt, clock), limit_filter(cfg, rt, lclock)
    chain = FilterChain([auth, limit])
    assert chain.express_admit is not None
    cached, uncached = hs(claims(NOW)), hs(claims(NOW, sub="bob"))
    cache_token(auth, cached)
    before = counters(rt.metrics)
    for _ in range(5):
        assert chain.express_admit(scan(bearer(uncached)), CLIENT_IP, ROUTE) is None
    assert counters(rt.metrics) == before
    # The limit is per client IP: both admitted requests below share the refused ones' key.
    assert chain.express_admit(scan(bearer(cached)), CLIENT_IP, ROUTE) is not None
    assert chain.express_admit(scan(bearer(cached)), CLIENT_IP, ROUTE) is not None
    assert chain.express_admit(scan(bearer(cached)), CLIENT_IP, ROUTE) is None
    assert delta(before, counters(rt.metrics)) == {auth_series("ok"): 2, limit_series("allowed"): 2}


def test_admit_refused_by_the_limit_counts_nothing() -> None:
    """The limit refusing last: auth's check passed but counted nothing (it counts in
    apply), the limiter counted no refusal; the general path then answers 429 and
    counts that request once, as it would have without the lane."""
    cfg = config(
        {"auth": "p", "rate_limit": "l"},
        auth=HS_POLICY,
        rate_limits={"l": {**SW2, "limit": 1}},
    )
    rt, clock = Runtime(metrics=Metrics()), Clock()
    chain = FilterChain([auth_filter(cfg, rt, clock), limit_filter(cfg, rt, FakeClock())])
    assert chain.express_admit is not None
    token = hs(claims(NOW))
    cache_token(chain.filters[0], token)  # type: ignore[arg-type]
    assert chain.express_admit(scan(bearer(token)), CLIENT_IP, ROUTE) is not None
    before = counters(rt.metrics)
    assert chain.express_admit(scan(bearer(token)), CLIENT_IP, ROUTE) is None
    assert counters(rt.metrics) == before
    err = chain.run_request(general_ctx(scan(bearer(token))))
    assert isinstance(err, ProxyError) and err.status == 429
    assert delta(before, counters(rt.metrics)) == {auth_series("ok"): 1, limit_series("limited"): 1}


def test_admit_true_applies_every_filter() -> None:
    """An admitted request carries auth's drops and claim fields, every filter counted
    once, and composes into a request without the token or a client-sent claim field."""
    cfg = config({"auth": "p", "rate_limit": "l"}, auth=HS_POLICY, rate_limits={"l": SW2})
    rt, clock = Runtime(metrics=Metrics()), Clock()
    auth = auth_filter(cfg, rt, clock)
    chain = FilterChain([auth, limit_filter(cfg, rt, FakeClock())])
    assert chain.express_admit is not None
    token = hs(claims(NOW))
    cache_token(auth, token)
    before = counters(rt.metrics)
    req = scan(bearer(token), (b"x-user-id", b"forged"), (b"accept", b"*/*"))
    x = chain.express_admit(req, CLIENT_IP, ROUTE)
    assert x is not None
    assert delta(before, counters(rt.metrics)) == {auth_series("ok"): 1, limit_series("allowed"): 1}
    assert x.claims is not None and x.claims["sub"] == "alice"
    assert set(x.drop) == {b"authorization", b"x-user-id"}
    assert x.fields == ((b"x-user-id", b"alice"),)
    assert x.extra == b"x-user-id: alice\r\n"
    sent = req.compose(req.target, x.drop, x.extra)
    assert b"authorization" not in sent and b"forged" not in sent
    assert sent.count(b"x-user-id: ") == 1 and sent.endswith(b"x-user-id: alice\r\n\r\n")
    assert b"accept: */*\r\n" in sent


# --------------------------------------------------------------------------- 3. auth


@pytest.mark.parametrize(
    "policy",
    [
        HS_POLICY,
        {**HS_POLICY, "strip_authorization": False},
        {**HS_POLICY, "forward_claims": {"sub": "x-user-id", "role": "x-role", "n": "x-n"}},
        {**HS_POLICY, "forward_claims": {}},
    ],
    ids=["default", "keep-authorization", "several-claims", "no-claims"],
)
def test_auth_lane_edits_and_counts_what_on_request_does(policy: dict[str, Any]) -> None:
    """For a cached token, check+apply on the lane and ``on_request`` on the general
    path count the same and make the same edits to the forwarded fields."""
    cfg = config({"auth": "p"}, auth=policy)
    rt, clock = Runtime(metrics=Metrics()), Clock()
    f = auth_filter(cfg, rt, clock)
    token = hs(claims(NOW, role="admin", n=7))
    cache_token(f, token)
    req = scan(
        (b"accept", b"*/*"),
        bearer(token),
        (b"x-user-id", b"forged"),
        (b"x-role", b"root"),
    )
    s0 = counters(rt.metrics)
    ctx = general_ctx(req)
    assert f.on_request(ctx) is None  # a cache hit: synchronous
    s1 = counters(rt.metrics)
    x = ExpressContext(req, CLIENT_IP, ROUTE)
    assert f.express_check(x)
    assert counters(rt.metrics) == s1  # the check counts nothing
    f.express_apply(x)
    s2 = counters(rt.metrics)
    assert delta(s0, s1) == delta(s1, s2) == {auth_series("ok"): 1}
    assert apply_edits(req.headers(), x) == ctx.upstream_headers
    assert x.claims == ctx.claims
    assert x.extra == b"".join(b"%s: %s\r\n" % field for field in x.fields)


@pytest.mark.parametrize(
    "case",
    ["none", "two-fields", "basic", "bearer-alone", "uncached", "expired", "too-old"],
)
def test_auth_lane_refuses_without_counting(case: str) -> None:
    """Every request the cache cannot settle by itself is refused by the check, which
    counts nothing and decides nothing; the general path answers it."""
    cfg = config({"auth": "p"}, auth={**HS_POLICY, "max_age": "10m"})
    rt, clock = Runtime(metrics=Metrics()), Clock()
    f = auth_filter(cfg, rt, clock)
    token = hs(claims(NOW, exp=int(NOW) + 3600))
    cache_token(f, token)
    fields: list[tuple[bytes, bytes]] = [bearer(token)]
    if case == "none":
        fields = []
    elif case == "two-fields":
        fields = [bearer(token), bearer(token)]
    elif case == "basic":
        fields = [(b"authorization", b"Basic YWxpY2U6cHc=")]
    elif case == "bearer-alone":
        fields = [(b"authorization", b"Bearer")]
    elif case == "uncached":
        fields = [bearer(hs(claims(NOW, sub="bob")))]
    elif case == "expired":
        clock.advance(3600 + 30)  # exp + leeway: "on or after" is refused
    elif case == "too-old":
        clock.advance(600 + 30 + 1)  # beyond max_age + leeway, still before exp
    req = scan(*fields)
    before = counters(rt.metrics)
    x = ExpressContext(req, CLIENT_IP, ROUTE)
    assert f.express_check(x) is False
    assert counters(rt.metrics) == before
    assert x.claims is None and x.drop == () and x.fields == () and x.extra == b""
    if case != "uncached":
        # The general path refuses these (and counts there); an uncached valid token it
        # verifies and accepts instead.
        assert isinstance(f.on_request(general_ctx(req)), ProxyError)
    # The refused check evicted nothing: the cached token still passes while in time.
    if case not in ("expired", "too-old"):
        assert f.express_check(ExpressContext(scan(bearer(token)), CLIENT_IP, ROUTE))


def test_auth_lane_expiry_boundary() -> None:
    """One second before ``exp + leeway`` the lane accepts; at it, the lane refuses and
    the general path answers 401 expired."""
    cfg = config({"auth": "p"}, auth=HS_POLICY)
    rt, clock = Runtime(metrics=Metrics()), Clock()
    f = auth_filter(cfg, rt, clock)
    token = hs(claims(NOW))  # exp = NOW + 300, leeway 30
    cache_token(f, token)
    clock.advance(329)
    assert f.express_check(ExpressContext(scan(bearer(token)), CLIENT_IP, ROUTE))
    clock.advance(1)
    assert not f.express_check(ExpressContext(scan(bearer(token)), CLIENT_IP, ROUTE))
    err = f.on_request(general_ctx(scan(bearer(token))))
    assert isinstance(err, ProxyError) and err.status == 401


async def test_auth_lane_needs_an_account_known_enabled() -> None:
    """With ``account_check``: a cached token passes only while its subject's status is
    cached as enabled; unknown, disabled, or a status past its TTL → the general path."""
    policy = {
        **HS_POLICY,
        "account_check": {"url": "http://127.0.0.1:9/u/{sub}", "cache_ttl": "30s"},
    }
    cfg = config({"auth": "p"}, auth=policy)
    rt, clock = Runtime(metrics=Metrics()), Clock()
    f = auth_filter(cfg, rt, clock)
    statuses = {"alice": 200, "mallory": 404}  # 404 = disabled (an unknown user)

    async def fetch(url: str, *, timeout: float) -> HttpResponse:
        return HttpResponse(statuses[url.rsplit("/", 1)[1]], [], b"")

    assert f.state.account is not None
    account = AccountChecker(f.state.account.config, fetch=fetch, clock=clock.monotonic)
    f.state.account = account
    tokens = {sub: hs(claims(NOW, sub=sub)) for sub in ("alice", "mallory", "bob")}
    for token in tokens.values():
        cache_token(f, token)

    def lane(sub: str) -> bool:
        return bool(f.express_check(ExpressContext(scan(bearer(tokens[sub])), CLIENT_IP, ROUTE)))

    before = counters(rt.metrics)
    assert not lane("alice")  # status not looked up yet
    assert await account.lookup("alice") is False
    assert await account.lookup("mallory") is True
    assert lane("alice")
    assert not lane("mallory")  # disabled
    assert not lane("bob")  # never looked up
    assert counters(rt.metrics) == before
    clock.advance(31)  # the status TTL ends; the token is still in time
    assert not lane("alice")
    assert account.backend_calls == 2


# --------------------------------------------------------------------------- 4. no raw tokens


def test_the_lane_keeps_no_raw_token() -> None:
    """The verification cache is keyed by the token's digest (SipHash-2-4-128 under the
    process's key, token_digest), and nothing on the auth
    state holds the token itself after the lane's check (docs/config.md: the raw token is
    never stored)."""
    cfg = config({"auth": "p"}, auth=HS_POLICY)
    f = auth_filter(cfg, Runtime(metrics=Metrics()), Clock())
    token = hs(claims(NOW))
    cache_token(f, token)
    x = ExpressContext(scan(bearer(token)), CLIENT_IP, ROUTE)
    assert f.express_check(x)
    state = f.state
    assert state.cache is not None
    assert state.cache.get(token_digest(token.encode()), now=state.clock()) is not None
    raw = token.encode()
    for name in dir(state):
        value = getattr(state, name, None)
        if isinstance(value, dict | list | tuple | bytes | str):
            assert raw not in repr(value).encode(), name


# --------------------------------------------------------------------------- 5. rate limit


def test_limit_lane_allows_exactly_the_limit() -> None:
    """Limit 2: True, True, False; only the two allowed are counted, and the general
    path afterwards refuses too (the lane's tokens were really taken)."""
    cfg = config({"rate_limit": "l"}, rate_limits={"l": SW2})
    rt = Runtime(metrics=Metrics())
    f = limit_filter(cfg, rt, FakeClock())
    assert f.express_ready and f.express_consumes
    answers = [f.express_check(ExpressContext(scan(), CLIENT_IP, ROUTE)) for _ in range(3)]
    assert answers == [True, True, False]
    after = counters(rt.metrics)
    assert after.get(limit_series("allowed")) == 2
    assert after.get(limit_series("limited"), 0.0) == 0
    f.express_apply(ExpressContext(scan(), CLIENT_IP, ROUTE))  # counts nothing more
    assert counters(rt.metrics) == after
    err = f.on_request(general_ctx(scan()))
    assert isinstance(err, ProxyError) and err.status == 429
    assert counters(rt.metrics)[limit_series("limited")] == 1


def test_limit_lane_refusals_take_no_token() -> None:
    """Token bucket, burst 2, 1 per second: refusals on the lane spend nothing, so one
    second later exactly one request passes again (a spent refusal would leave none)."""
    cfg = config(
        {"rate_limit": "l"},
        rate_limits={"l": {"algorithm": "token_bucket", "rate": 1.0, "burst": 2}},
    )
    rt, clock = Runtime(metrics=Metrics()), FakeClock()
    f = limit_filter(cfg, rt, clock)

    def lane() -> bool:
        return bool(f.express_check(ExpressContext(scan(), CLIENT_IP, ROUTE)))

    assert [lane() for _ in range(7)] == [True, True, False, False, False, False, False]
    clock.now += 1.0
    assert [lane(), lane()] == [True, False]
    # The limiter's own answer agrees: nothing left, one token a second from now.
    policy = f.policies[0]
    allowed, remaining, _ = policy.limiter(CLIENT_IP, 1, clock.now)  # type: ignore[union-attr]
    assert (allowed, remaining) == (False, 0)
    assert counters(rt.metrics) == {limit_series("allowed"): 3}  # no "limited" series at all


def test_limit_lane_keys_by_the_claims_auth_checked() -> None:
    """``key = "claim:sub"`` behind auth: the limit reads the claims auth's check put on
    the context (before any apply), so each subject has its own quota from one IP."""
    cfg = config(
        {"auth": "p", "rate_limit": "l"},
        auth=HS_POLICY,
        rate_limits={"l": {**SW2, "limit": 1, "key": "claim:sub"}},
    )
    rt, clock = Runtime(metrics=Metrics()), Clock()
    auth = auth_filter(cfg, rt, clock)
    chain = FilterChain([auth, limit_filter(cfg, rt, FakeClock())])
    assert chain.express_admit is not None
    alice, bob = hs(claims(NOW)), hs(claims(NOW, sub="bob"))
    cache_token(auth, alice)
    cache_token(auth, bob)
    x = chain.express_admit(scan(bearer(alice)), CLIENT_IP, ROUTE)
    assert x is not None
    limit = chain.filters[1]
    assert isinstance(limit, RateLimitFilter)
    assert limit.policies[0].key_of(x) == b"c=alice"
    assert chain.express_admit(scan(bearer(alice)), CLIENT_IP, ROUTE) is None
    assert chain.express_admit(scan(bearer(bob)), CLIENT_IP, ROUTE) is not None
    assert chain.express_admit(scan(bearer(bob)), CLIENT_IP, ROUTE) is None


def test_limit_lane_keys_by_header() -> None:
    """``key = "header:x-api-key"``: the lane reads the field through
    ``ExpressContext.header`` (first value); without it the client IP is the key."""
    cfg = config(
        {"rate_limit": "l"}, rate_limits={"l": {**SW2, "limit": 1, "key": "header:X-Api-Key"}}
    )
    f = limit_filter(cfg, Runtime(metrics=Metrics()), FakeClock())

    def lane(*fields: tuple[bytes, bytes]) -> bool:
        return bool(f.express_check(ExpressContext(scan(*fields), CLIENT_IP, ROUTE)))

    assert lane((b"X-Api-Key", b"k1"))
    assert not lane((b"x-api-key", b"k1"))  # field names are case-insensitive
    assert lane((b"X-API-KEY", b"k2"), (b"x-api-key", b"k1"))  # the first one counts
    assert lane()  # no key: the client IP's own quota
    assert not lane()


def test_express_context_header() -> None:
    """``header()`` answers as ``FilterContext.header`` does: lower-case name, first
    value, trimmed, ``None`` when absent."""
    req = scan((b"X-A", b"  one "), (b"x-a", b"two"), (b"Accept", b"*/*"))
    x = ExpressContext(req, CLIENT_IP, ROUTE)
    ctx = general_ctx(req)
    for name in (b"x-a", b"accept", b"host", b"x-missing"):
        assert x.header(name) == ctx.header(name)
    assert x.header(b"x-a") == b"one"
    assert x.header(b"x-missing") is None


# --------------------------------------------------------------------------- 6. new_root_trace

IMPLS = {"compiled": compiled_express, "python": python_express}
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")


@pytest.fixture(params=sorted(IMPLS))
def express_impl(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    yield IMPLS[request.param]


def test_compiled_module_is_compiled() -> None:
    """The compiled twin is really the extension (a missing build must not pass as it)."""
    assert compiled_express.__file__ is not None and compiled_express.__file__.endswith(".so")


def test_new_root_trace_bound_zero_never_samples(express_impl: ModuleType) -> None:
    """Bound 0: never sampled; the span id and the unsampled ``traceparent`` line come
    with the id, which are well-formed and fresh every call."""
    seen: set[str] = set()
    spans: set[str] = set()
    for _ in range(500):
        trace_id, span_id, line = express_impl.new_root_trace(0)
        assert HEX32.fullmatch(trace_id) and trace_id != "0" * 32
        assert span_id is not None and HEX16.fullmatch(span_id) and span_id != "0" * 16
        assert line == b"traceparent: 00-%s-%s-00\r\n" % (trace_id.encode(), span_id.encode())
        seen.add(trace_id)
        spans.add(span_id)
    assert len(seen) == len(spans) == 500


def test_new_root_trace_line_is_what_inject_writes(express_impl: ModuleType) -> None:
    """The line is the field ``Tracer.inject`` writes for an unsampled root span."""
    trace_id, span_id, line = express_impl.new_root_trace(0)
    ((name, value),) = Tracer.inject(TraceContext(trace_id, span_id, 0))
    assert line == name + b": " + value + b"\r\n"


def test_new_root_trace_full_bound_always_samples(express_impl: ModuleType) -> None:
    """Bound 2**64: every draw is sampled, with only the (fresh) trace id."""
    seen: set[str] = set()
    for _ in range(500):
        trace_id, span_id, line = express_impl.new_root_trace(2**64)
        assert HEX32.fullmatch(trace_id) and trace_id != "0" * 32
        assert span_id is None and line is None
        seen.add(trace_id)
    assert len(seen) == 500


def test_new_root_trace_decides_as_trace_id_ratio(express_impl: ModuleType) -> None:
    """With the bound of ratio 0.5, each draw's flag is ``TraceIdRatio(0.5)``'s decision
    for its id, and about half are sampled."""
    sampler = TraceIdRatio(0.5)
    bound = round(0.5 * 2**64)
    assert sampler.bound == bound
    sampled = 0
    for _ in range(1000):
        trace_id, span_id, line = express_impl.new_root_trace(bound)
        decided = span_id is None
        assert decided == (line is None)
        assert decided == sampler.should_sample(trace_id, None), trace_id
        sampled += decided
    # Binomial(1000, 0.5): sd ~16; 380..620 is beyond 7 sd either way.
    assert 380 <= sampled <= 620


# --------------------------------------------------------------------------- 7. start_span


def test_start_span_uses_a_given_trace_id_for_a_new_trace() -> None:
    """No parent: the span is in trace ``X``, a root, and sampled as the sampler says
    for ``X`` (low bits below the ratio's bound or not)."""
    tracer = Tracer(ParentBased(TraceIdRatio(0.5)))
    low = "00000000000000ab" + "0000000000000001"
    high = "00000000000000ab" + "ffffffffffffffff"
    for trace_id, recording in ((low, True), (high, False)):
        span = tracer.start_span("GET /r", trace_id=trace_id)
        assert span.trace_id == trace_id
        assert span.parent_span_id is None
        assert span.recording is recording
        assert HEX16.fullmatch(span.span_id)


def test_start_span_parent_trace_wins_over_a_given_trace_id() -> None:
    """With a parent (remote context or local span), ``trace_id`` is ignored: the span
    joins the parent's trace and follows its sampled flag."""
    tracer = Tracer(ParentBased(TraceIdRatio(0.5)))
    given = "0" * 15 + "1" + "0" * 16  # would be sampled as a root
    parent_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    remote = TraceContext(parent_id, "00f067aa0ba902b7", 0, remote=True)
    span = tracer.start_span("GET /r", remote, trace_id=given)
    assert span.trace_id == parent_id
    assert span.parent_span_id == "00f067aa0ba902b7"
    assert span.recording is False  # the parent's flag, not the ratio's answer for ``given``
    sampled = TraceContext(parent_id, "00f067aa0ba902b7", FLAG_SAMPLED, remote=True)
    local = tracer.start_span("GET /r", sampled)
    child = tracer.start_span("inner", local, trace_id=given)
    assert child.trace_id == parent_id and child.parent_span_id == local.span_id
    assert child.recording is True


# --------------------------------------------------------------------------- 8. session 14:
# the lane's time window (Verified.fresh_from/fresh_until), its inline "Bearer <token>"
# parse, and Verified.memo (a claim-keyed rate limit's key computed once per token).

_ORDINARY_TIMES = st.integers(1_600_000_000, 1_900_000_000) | st.floats(1.6e9, 1.9e9)
_ODD_TIMES = st.sampled_from(
    [0, 0.0, 1, -5.0, 1e-300, 1e15, 1e15 + 0.5, 2.0**53, 2**53 + 1, 1e300, -1e300]
) | st.floats(-1e20, 1e20)
_TIMES = st.none() | _ORDINARY_TIMES | _ODD_TIMES
_LEEWAYS = st.sampled_from([0, 0.0, 30, 60, 300, 0.001]) | st.floats(0, 300)
_MAX_AGES = st.none() | st.sampled_from([1, 600, 1e5, 1e-6]) | st.floats(1e-9, 1e5)


def auth_state(leeway: float, max_age: float | None) -> AuthState:
    """Policy ``p`` with ``leeway`` and ``max_age`` set through its configuration."""
    policy: dict[str, Any] = {**HS_POLICY, "leeway": leeway}
    if max_age is not None:
        policy["max_age"] = max_age
    cfg = config({"auth": "p"}, auth=policy)
    return auth_filter(cfg, Runtime(metrics=Metrics()), Clock()).state


def entry_with(exp: float | None, nbf: float | None, iat: float | None) -> Verified:
    """A verified entry with only these times (the window is not set on it)."""
    return Verified({}, None, exp, nbf, iat, ())


def edge_times(state: AuthState, entry: Verified) -> list[float]:
    """The window's ends, each rule's exact edge, and the floats next to all of them."""
    lo, hi = state.fresh_window(entry)
    leeway = state.leeway
    edges = [lo, hi]
    if math.isfinite(lo) and math.isfinite(hi):
        edges.append(lo + (hi - lo) / 2)
    if entry.exp is not None:
        edges.append(entry.exp + leeway)
    if entry.nbf is not None:
        edges.append(entry.nbf - leeway)
    if entry.iat is not None:
        edges.append(entry.iat - leeway)
        if state.max_age is not None:
            edges.append(entry.iat + state.max_age + leeway)
    out: list[float] = []
    for t in edges:
        t = float(t)
        out += [t, math.nextafter(t, -math.inf), math.nextafter(t, math.inf)]
    return [t for t in out if math.isfinite(t)]


@settings(max_examples=400, deadline=None)
@given(
    exp=_TIMES,
    nbf=_TIMES,
    iat=_TIMES,
    leeway=_LEEWAYS,
    max_age=_MAX_AGES,
    more=st.lists(_ORDINARY_TIMES | _ODD_TIMES, max_size=8),
)
def test_fresh_window_is_inside_what_check_times_accepts(
    exp: float | None,
    nbf: float | None,
    iat: float | None,
    leeway: float,
    max_age: float | None,
    more: list[float],
) -> None:
    """Soundness of the lane's two comparisons: every ``now`` with ``lo <= now < hi``
    is a time ``check_times`` accepts (so the lane never serves a token the general
    path would refuse), at the ends, next to them, at every rule's edge and anywhere.
    An empty window is ``(inf, -inf)``."""
    state = auth_state(leeway, max_age)
    entry = entry_with(exp, nbf, iat)
    lo, hi = state.fresh_window(entry)
    assert lo < hi or (lo, hi) == (math.inf, -math.inf)
    for now in [*edge_times(state, entry), *map(float, more)]:
        if lo <= now < hi:
            assert state.check_times(entry, now) is None, (now, lo, hi)


@settings(max_examples=300, deadline=None)
@given(
    iat=_ORDINARY_TIMES,
    lifetime=st.integers(1, 10**6) | st.floats(1, 1e6),
    nbf_before=st.none() | st.floats(0, 3600),
    leeway=_LEEWAYS,
    max_age=st.none() | st.floats(1, 1e5),
    offset=st.floats(-1e4, 2e6),
)
def test_fresh_window_misses_only_the_last_millisecond_of_realistic_tokens(
    iat: float,
    lifetime: float,
    nbf_before: float | None,
    leeway: float,
    max_age: float | None,
    offset: float,
) -> None:
    """Tokens of today's dates: any ``now`` that ``check_times`` accepts and that is more
    than 2 ms from every rule's edge is inside the window (the lane serves it); edges
    themselves are for the general path."""
    state = auth_state(leeway, max_age)
    entry = entry_with(iat + lifetime, None if nbf_before is None else iat - nbf_before, iat)
    lo, hi = state.fresh_window(entry)
    now = iat + offset
    edges = [t for t in edge_times(state, entry) if t not in (lo, hi)]
    if state.check_times(entry, now) is None and all(abs(now - t) > 0.002 for t in edges):
        assert lo <= now < hi, (now, lo, hi)


@pytest.mark.parametrize("leeway", [0, 60])
@pytest.mark.parametrize("max_age", [None, 600])
@pytest.mark.parametrize("now", [NOW, 1_700_000_000.25, 1_700_000_001])
def test_fresh_window_of_an_ordinary_token(leeway: int, max_age: int | None, now: float) -> None:
    """``exp = iat + 3600``, issued 10 s ago: a window that holds the present and the
    middle of the token's life, which ``check_times`` accepts; without max_age its upper
    end is the exact exp rule, where ``check_times`` refuses."""
    state = auth_state(leeway, max_age)
    iat = now - 10
    entry = entry_with(iat + 3600, None, iat)
    lo, hi = state.fresh_window(entry)
    assert lo < hi
    middle = lo + (hi - lo) / 2
    for t in (middle, now, lo, math.nextafter(hi, -math.inf)):
        assert lo <= t < hi
        assert state.check_times(entry, t) is None, t
    if max_age is None:
        assert state.check_times(entry, hi) is not None  # exp's end is exact: refused there
    # The lower end is the issue time (less leeway) and a millisecond.
    assert lo == pytest.approx(iat - leeway + 0.001, abs=1e-6)


def cached_hour_token(policy: dict[str, Any]) -> tuple[AuthFilter, Clock, str, Verified]:
    """Auth policy ``p`` (``policy``) with a token valid for an hour from ``NOW`` in its
    verification cache, put there by the general path: the filter, its clock, the token
    and the cached entry."""
    clock = Clock()
    f = auth_filter(config({"auth": "p"}, auth=policy), Runtime(metrics=Metrics()), clock)
    token = hs(claims(NOW, exp=int(NOW) + 3600))
    cache_token(f, token)
    assert f.state.cache is not None
    entry = f.state.cache.get(token_digest(token.encode()), now=NOW)
    assert isinstance(entry, Verified)
    return f, clock, token, entry


def test_validated_entries_carry_their_window_and_the_lane_uses_it() -> None:
    """``validate`` stores ``fresh_window``'s answer on the entry it caches; the lane
    accepts at ``fresh_from`` and just below ``fresh_until``, and refuses just outside
    (where the general path still decides, here accepting)."""
    f, clock, token, entry = cached_hour_token({**HS_POLICY, "max_age": "10m"})
    state = f.state
    assert (entry.fresh_from, entry.fresh_until) == state.fresh_window(entry)
    assert entry.fresh_from <= NOW < entry.fresh_until

    def lane_at(t: float) -> bool:
        clock.now = t
        return bool(f.express_check(ExpressContext(scan(bearer(token)), CLIENT_IP, ROUTE)))

    assert lane_at(entry.fresh_from)
    assert lane_at(math.nextafter(entry.fresh_until, -math.inf))
    assert not lane_at(math.nextafter(entry.fresh_from, -math.inf))
    # Just below the lane's window, check_times still accepts: the general path does.
    assert state.check_times(entry, clock.now) is None
    assert f.on_request(general_ctx(scan(bearer(token)))) is None
    assert not lane_at(entry.fresh_until)


class AuthOnly:
    """A request as ``AuthFilter.express_check`` reads it: its Authorization value
    only, any bytes (the scanner would refuse many; this checks the parse alone)."""

    __slots__ = ("authorization",)

    def __init__(self, authorization: bytes | None) -> None:
        self.authorization = authorization


_TOKEN = hs(claims(NOW)).encode()
_SCHEMES = st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"BeArEr", b"Basic", b"Bearerx", b""])
_SPACES = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t", b"\t ", b"   "])
_TOKENS = st.sampled_from(
    [
        _TOKEN,
        _TOKEN[:-1],
        _TOKEN + b"x",
        _TOKEN + b" x",
        b"x " + _TOKEN,
        _TOKEN.replace(b".", b" "),
        b"",
        b"a.b.c",
        b"Basic x",
        b"Bearer",
    ]
)
_WIRE_VALUES = st.builds(
    lambda lead, scheme, sep, token, trail: lead + scheme + sep + token + trail,
    _SPACES,
    _SCHEMES,
    _SPACES,
    _TOKENS,
    _SPACES,
) | st.sampled_from([b"Basic x", b"Bearer", b"Bearer ", b"", _TOKEN, b"Bearer " + _TOKEN])
_ODD_BYTES = st.sampled_from(
    [b"\x0b", b"\x0c", b"\r", b"\n", b"\x00", b"\x1f", b"\x7f", b"\x85", b"\xa0", b"\xff"]
)
_ANY_VALUES = (
    _WIRE_VALUES
    | st.builds(
        lambda odd, v, where: odd + v if where else v + odd, _ODD_BYTES, _WIRE_VALUES, st.booleans()
    )
    | st.builds(
        lambda scheme, odd, token: scheme + odd + token, _SCHEMES, _ODD_BYTES | _SPACES, _TOKENS
    )
    | st.binary(max_size=20)
    | st.binary(max_size=20).map(lambda b: b"Bearer " + b)
)


def lane_filter() -> AuthFilter:
    """Policy ``p`` on the test clock with ``_TOKEN`` cached."""
    cfg = config({"auth": "p"}, auth=HS_POLICY)
    f = auth_filter(cfg, Runtime(metrics=Metrics()), Clock())
    cache_token(f, _TOKEN.decode())
    return f


@settings(max_examples=500, deadline=None)
@given(value=_ANY_VALUES)
@example(value=b"Bearer " + _TOKEN)
@example(value=b"Bearer  " + _TOKEN)
@example(value=b"Bearer " + _TOKEN + b" ")
@example(value=b"Bearer " + _TOKEN + b"\x0b")
@example(value=b"Bearer " + _TOKEN + b"\x1f")
@example(value=b"Bearer \t" + _TOKEN)
@example(value=b"Bearer \x0b" + _TOKEN)
@example(value=b"bearer " + _TOKEN)
@example(value=b" Bearer " + _TOKEN)
@example(value=b"Bearer")
@example(value=b"Bearer ")
@example(value=b"Bearer x")
def test_inline_bearer_parse_is_bearer(value: bytes) -> None:
    """Any Authorization bytes: the lane accepts exactly when ``_bearer`` finds the
    cached token in them (the inline ``"Bearer <token>"`` parse and the fallback to
    ``_bearer`` together are ``_bearer``)."""
    f = lane_filter()
    x = ExpressContext(AuthOnly(value), CLIENT_IP, ROUTE)
    assert f.express_check(x) is (_bearer(value) == _TOKEN)


@settings(max_examples=300, deadline=None)
@given(value=_WIRE_VALUES)
def test_lane_and_general_path_read_the_same_token(value: bytes) -> None:
    """Through the real scanner (values it refuses are skipped): the lane accepts
    exactly when ``_bearer`` of the value, as sent or as scanned, is the cached token;
    and whatever the lane accepts, the general path accepts too."""
    data = b"GET /r HTTP/1.1\r\nHost: example.test\r\nAuthorization: %s\r\n\r\n" % value
    req = scan_request(data, CLIENT_IP, b"http", b"1.1 fastedge", 8192, 8192, 100)
    if req is None:
        reject()  # the scanner refuses it: the general path has it all
    assert req.authorization is not None  # one Authorization field
    f = lane_filter()
    expected = _bearer(value) == _TOKEN
    assert (_bearer(req.authorization) == _TOKEN) is expected
    accepted = f.express_check(ExpressContext(req, CLIENT_IP, ROUTE))
    assert accepted is expected
    if accepted:
        assert f.on_request(general_ctx(req)) is None
    elif _bearer(value) is None:
        assert isinstance(f.on_request(general_ctx(req)), ProxyError)


def test_the_inline_parse_covers_the_usual_form() -> None:
    """The common spelling is accepted, and every near miss resolves like ``_bearer``."""
    f = lane_filter()

    def lane(value: bytes) -> bool:
        return bool(f.express_check(ExpressContext(AuthOnly(value), CLIENT_IP, ROUTE)))

    assert lane(b"Bearer " + _TOKEN)
    assert lane(b"bearer " + _TOKEN)  # the scheme is case-insensitive (fallback)
    assert lane(b"Bearer  " + _TOKEN)  # extra spaces before the token (fallback)
    assert lane(b"Bearer " + _TOKEN + b"  ")  # trailing spaces (fallback)
    assert lane(b"Bearer " + _TOKEN + b"\t")  # trailing whitespace, stripped
    assert not lane(b"Bearer \t" + _TOKEN)  # a tab inside is part of the token
    assert not lane(b"Bearer\t" + _TOKEN)  # the scheme ends at a space
    assert not lane(b"Bearer")
    assert not lane(b"Bearer ")
    assert not lane(b"Basic " + _TOKEN)
    assert not lane(b"Bearer " + _TOKEN + b"x")


# -- a rate limit keyed by a claim, behind auth


def ctx_from(req: Any, client_ip: bytes) -> FilterContext:
    """:func:`general_ctx` from another client address."""
    ctx = general_ctx(req)
    ctx.client_ip = client_ip
    return ctx


IP_A, IP_B, IP_C = b"10.0.0.1", b"10.0.0.2", b"10.0.0.3"


def claim_keyed(limit: int, key: str = "claim:sub") -> tuple[FilterChain, AuthFilter]:
    """Auth ``p`` (only ``exp`` required, so tokens without ``sub`` pass) and a local
    limit of ``limit`` per 10 s keyed by ``key``; fresh clocks and counters."""
    cfg = config(
        {"auth": "p", "rate_limit": "l"},
        auth={**HS_POLICY, "required_claims": ["exp"]},
        rate_limits={"l": {**SW2, "limit": limit, "key": key}},
    )
    rt = Runtime(metrics=Metrics())
    auth = auth_filter(cfg, rt, Clock())
    chain = FilterChain([auth, limit_filter(cfg, rt, FakeClock())])
    assert chain.express_admit is not None
    return chain, auth


def on_lane(chain: FilterChain, token: str, ip: bytes) -> bool:
    assert chain.express_admit is not None
    return chain.express_admit(scan(bearer(token)), ip, ROUTE) is not None


def on_general_path(chain: FilterChain, token: str, ip: bytes) -> bool:
    answer = chain.run_request(ctx_from(scan(bearer(token)), ip))
    if answer is None:
        return True
    assert isinstance(answer, ProxyError) and answer.status == 429, answer
    return False


def decisions(
    path: Any, limit: int, steps: list[tuple[str, bytes]], key: str = "claim:sub"
) -> list[bool]:
    """``path``'s answers for ``(token, client ip)`` steps on a fresh chain, tokens cached."""
    chain, auth = claim_keyed(limit, key)
    for token in {token for token, _ in steps}:
        cache_token(auth, token)
    return [path(chain, token, ip) for token, ip in steps]


ALICE = hs(claims(NOW))
NO_SUB = hs(claims(NOW, sub=None))


def test_claim_keyed_limit_shares_one_bucket_across_addresses() -> None:
    """A token with ``sub``: its requests from A and B take from one bucket of 2, on
    the lane as on the general path."""
    steps = [(ALICE, IP_A), (ALICE, IP_B), (ALICE, IP_A), (ALICE, IP_B), (ALICE, IP_C)]
    expected = [True, True, False, False, False]
    assert decisions(on_lane, 2, steps) == expected
    assert decisions(on_general_path, 2, steps) == expected


def test_without_the_claim_each_address_has_its_bucket() -> None:
    """A token without ``sub`` keys by the client address of each request, not of the
    first one: the same token from A and B has two buckets of 1 (on the lane, the memo
    must hold "no claim", not A's address)."""
    steps = [(NO_SUB, IP_A), (NO_SUB, IP_B), (NO_SUB, IP_A), (NO_SUB, IP_B), (NO_SUB, IP_C)]
    expected = [True, True, False, False, True]
    assert decisions(on_lane, 1, steps) == expected
    assert decisions(on_general_path, 1, steps) == expected


def test_with_and_without_the_claim_from_one_address() -> None:
    """From one address, the token with ``sub`` (key ``c=alice``) and the one without
    (key: the address) do not share a bucket; a second address shares alice's."""
    steps = [(NO_SUB, IP_A), (ALICE, IP_A), (ALICE, IP_B), (NO_SUB, IP_B), (NO_SUB, IP_A)]
    expected = [True, True, False, True, False]
    assert decisions(on_lane, 1, steps) == expected
    assert decisions(on_general_path, 1, steps) == expected


def test_lane_and_general_path_take_from_the_same_buckets() -> None:
    """Alternating paths on one chain: the lane's key is the general path's key, byte
    for byte, with and without the claim (each refuses what the other spent)."""
    chain, auth = claim_keyed(1)
    cache_token(auth, ALICE)
    cache_token(auth, NO_SUB)
    assert on_lane(chain, NO_SUB, IP_A)
    assert on_general_path(chain, NO_SUB, IP_B)
    assert not on_lane(chain, NO_SUB, IP_B)
    assert not on_general_path(chain, NO_SUB, IP_A)
    assert on_general_path(chain, ALICE, IP_C)
    assert not on_lane(chain, ALICE, IP_A)


@pytest.mark.parametrize(
    ("tenant", "shared"),
    [("acme", True), (7, True), ("", False), (True, False), (None, False), (["x"], False)],
    ids=["string", "int", "empty", "bool", "absent", "list"],
)
def test_claim_keys_by_value_type(tenant: Any, shared: bool) -> None:
    """``claim:tenant``: a non-empty string or an int is the key (one bucket across
    addresses); anything else falls back to each request's address; lane = general."""
    token = hs(claims(NOW, tenant=tenant))
    steps = [(token, IP_A), (token, IP_B), (token, IP_A), (token, IP_C)]
    expected = [True, False, False, False] if shared else [True, True, False, True]
    assert decisions(on_lane, 1, steps, "claim:tenant") == expected
    assert decisions(on_general_path, 1, steps, "claim:tenant") == expected


# -- Verified.memo


def cached_entry(auth: AuthFilter, token: str) -> Verified:
    state = auth.state
    assert state.cache is not None
    entry = state.cache.get(token_digest(token.encode()), now=state.clock())
    assert isinstance(entry, Verified)
    return entry


def test_memo_lives_with_the_verified_entry() -> None:
    """One admit: the context's memo is the cached entry's, holding one key for the
    claim-keyed policy (``c=alice``; ``b""`` for a token without the claim). Each token
    has its own; more requests add nothing; the general path leaves it alone."""
    chain, auth = claim_keyed(10)
    bob = hs(claims(NOW, sub="bob"))
    for token in (ALICE, bob, NO_SUB):
        cache_token(auth, token)
    limit = chain.filters[1]
    assert isinstance(limit, RateLimitFilter)
    claim_key = limit.policies[0].claim_key
    assert claim_key is not None
    alice_entry = cached_entry(auth, ALICE)
    assert alice_entry.memo == {}
    assert chain.express_admit is not None
    x = chain.express_admit(scan(bearer(ALICE)), IP_A, ROUTE)
    assert x is not None
    assert x.auth is alice_entry and x.memo is alice_entry.memo
    assert alice_entry.memo == {claim_key: b"c=alice"}
    bob_entry = cached_entry(auth, bob)
    assert bob_entry.memo == {} and bob_entry.memo is not alice_entry.memo
    assert on_lane(chain, bob, IP_B)
    assert bob_entry.memo == {claim_key: b"c=bob"}
    assert alice_entry.memo == {claim_key: b"c=alice"}
    assert on_lane(chain, NO_SUB, IP_A)
    assert cached_entry(auth, NO_SUB).memo == {claim_key: b""}
    for ip in (IP_A, IP_B, IP_C):
        assert on_lane(chain, ALICE, ip)
        assert on_general_path(chain, ALICE, ip)
    assert alice_entry.memo == {claim_key: b"c=alice"}
    assert cached_entry(auth, NO_SUB).memo == {claim_key: b""}


def test_the_lane_keys_by_the_memo() -> None:
    """The lane reads the key from the memo, not the claims, once it is there: a memo
    holding bob's key makes alice's next request spend bob's bucket."""
    chain, auth = claim_keyed(1)
    bob = hs(claims(NOW, sub="bob"))
    cache_token(auth, ALICE)
    cache_token(auth, bob)
    assert on_lane(chain, ALICE, IP_A)  # fills the memo (and spends alice's only token)
    entry = cached_entry(auth, ALICE)
    (claim_key,) = entry.memo
    entry.memo[claim_key] = b"c=bob"
    assert on_lane(chain, ALICE, IP_A)  # bob's bucket, not alice's spent one
    assert not on_lane(chain, bob, IP_B)


@pytest.mark.parametrize(
    ("route", "rate_limits"),
    [
        ({"auth": "p"}, None),
        ({"auth": "p", "rate_limit": "l"}, {"l": SW2}),
        ({"auth": "p", "rate_limit": "l"}, {"l": {**SW2, "key": "header:x-api-key"}}),
    ],
    ids=["auth-only", "ip-keyed", "header-keyed"],
)
def test_memo_stays_empty_without_a_claim_keyed_policy(
    route: dict[str, Any], rate_limits: dict[str, Any] | None
) -> None:
    """Only a claim-keyed limit writes to the memo; the lane still admits."""
    cfg = config(route, auth=HS_POLICY, rate_limits=rate_limits)
    rt = Runtime(metrics=Metrics())
    auth = auth_filter(cfg, rt, Clock())
    filters: list[Any] = [auth]
    if rate_limits is not None:
        filters.append(limit_filter(cfg, rt, FakeClock()))
    chain = FilterChain(filters)
    assert chain.express_admit is not None
    cache_token(auth, ALICE)
    x = chain.express_admit(scan(bearer(ALICE)), CLIENT_IP, ROUTE)
    assert x is not None and x.memo is cached_entry(auth, ALICE).memo
    assert x.memo == {}


def test_an_entry_cached_without_its_window_is_never_served_on_the_lane() -> None:
    """``Verified``'s window is empty unless ``validate`` sets it: an entry cached any
    other way (here: built directly, times and all in order) takes the general path,
    which checks the times itself and accepts it."""
    f, clock, token, good = cached_hour_token(HS_POLICY)
    state = f.state
    assert state.cache is not None
    digest = token_digest(token.encode())
    bare = Verified(good.claims, good.sub, good.exp, good.nbf, good.iat, good.headers, good.wire)
    assert bare.fresh_from > bare.fresh_until  # empty
    state.cache.set(digest, bare, ttl=3600, now=NOW)
    clock.now = NOW
    assert not f.express_check(ExpressContext(scan(bearer(token)), CLIENT_IP, ROUTE))
    assert state.check_times(bare, NOW) is None
    assert f.on_request(general_ctx(scan(bearer(token)))) is None
