"""The express lane's per-route cells, each checked against the path it replaces.

A. ``RouteStats`` (``Metrics.route(name)``): recording through a route's cell must be
   indistinguishable from ``Metrics.observe_request`` (same scrape bytes, same
   ``request_totals``), whatever the mix of the two, however the cell's cached
   (method, status) series switches; checked also against counts computed here.
B. ``ExpressSettings.match``: the lane's own router must pick the ``ExpressRoute`` of the
   very ``Route`` that ``gateway.router.match`` picks (or ``None`` with it), and an
   ``ExpressRoute`` must forward what its ``Route`` forwards.
C. ``ConnectionPool.take_idle`` through ``PooledBase`` / ``_usable``: a ``PooledBase``
   subclass and any object with ``is_usable`` are taken alike.

The compiled modules ship with their pure-Python sources, so A, B and C run on both
(the ``.py`` source is loaded under another name, as in tests/test_metrics_cells.py).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import math
import sys
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

import fastedge.observe.metrics as metrics_module
import fastedge.proxy as proxy_module
import fastedge.upstream.pool as pool_module
from fastedge.config import parse_config
from fastedge.observe.metrics import DURATION_BUCKETS
from fastedge.router import Route, Router
from fastedge.server import ProxyServer


def _source_twin(compiled: ModuleType, name: str) -> ModuleType:
    """The ``.py`` source next to ``compiled``, loaded as module ``name`` (once)."""
    if name in sys.modules:
        return sys.modules[name]
    assert compiled.__file__ is not None
    source = Path(compiled.__file__).parent / (compiled.__name__.rsplit(".", 1)[-1] + ".py")
    spec = importlib.util.spec_from_file_location(name, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


METRICS = {
    "compiled": metrics_module,
    "python": _source_twin(metrics_module, "_route_cells_metrics_twin"),
}
PROXIES = {
    "compiled": proxy_module,
    "python": _source_twin(proxy_module, "_route_cells_proxy_twin"),
}
POOLS = {
    "compiled": pool_module,
    "python": _source_twin(pool_module, "_route_cells_pool_twin"),
}
metrics_impls = pytest.mark.parametrize("mod", list(METRICS.values()), ids=list(METRICS))
proxy_impls = pytest.mark.parametrize("mod", list(PROXIES.values()), ids=list(PROXIES))
pool_impls = pytest.mark.parametrize("mod", list(POOLS.values()), ids=list(POOLS))


def test_the_compiled_modules_are_the_extensions() -> None:
    """The "compiled" runs below use the extensions, not a silent fallback."""
    for mod in (metrics_module, proxy_module, pool_module):
        assert mod.__file__ is not None and mod.__file__.endswith(".so")


# =========================================================================== A. RouteStats

ROUTES = ["/", "api", 'odd"name', "back\\slash", "new\nline", "", "é-route"]
METHODS = ["GET", "HEAD", "POST", "BREW", "get"]
KNOWN = {"GET", "HEAD", "POST"}  # of METHODS, those labelled as given
STATUSES = [200, 404, 503, 99, 600]
_EDGES = [0.0, 10.5, 1e6]
for _bound in DURATION_BUCKETS:
    _EDGES += [_bound, math.nextafter(_bound, math.inf)]
SECONDS = st.sampled_from(_EDGES) | st.floats(0, 20, allow_nan=False)
OBSERVATIONS = st.lists(
    st.tuples(
        st.sampled_from(ROUTES),
        st.sampled_from(METHODS),
        st.sampled_from(STATUSES),
        SECONDS,
        st.none() | SECONDS,
        st.booleans(),  # in the mixed registry: through the cell (else observe_request)
    ),
    max_size=40,
)

Obs = tuple[str, str, int, float, float | None, bool]


@metrics_impls
@settings(max_examples=200, deadline=None)
@given(obs=OBSERVATIONS)
def test_route_cells_record_what_observe_request_records(mod: ModuleType, obs: list[Obs]) -> None:
    """Three registries see the same requests: one through ``observe_request``, one
    through each route's cell (taken once, reused), one through a random mix of both.
    Their scrapes and request totals are identical, and the series hold the counts
    computed here (unknown methods as OTHER; an upstream histogram only for routes that
    had an upstream time)."""
    by_call, by_cell, mixed = mod.Metrics(), mod.Metrics(), mod.Metrics()
    cells: dict[str, Any] = {}
    for route, method, status, total, upstream, through_cell in obs:
        by_call.observe_request(route, method, status, total, upstream)
        if route not in cells:
            cells[route] = by_cell.route(route)
        cells[route].observe(method, status, total, upstream)
        if through_cell:
            mixed.route(route).observe(method, status, total, upstream)
        else:
            mixed.observe_request(route, method, status, total, upstream)
    assert by_cell.render() == by_call.render()
    assert mixed.render() == by_call.render()
    assert by_cell.request_totals() == by_call.request_totals()
    assert mixed.request_totals() == by_call.request_totals()

    expected = Tally((r, m if m in KNOWN else "OTHER", s) for r, m, s, *_ in obs)
    for registry in (by_call, by_cell, mixed):
        assert {k: c.value for k, c in registry._requests.items()} == expected
        assert set(registry._total) == {o[0] for o in obs}
        assert set(registry._upstream) == {o[0] for o in obs if o[4] is not None}
        for route, hist in registry._total.items():
            buckets = Tally(bisect_left(DURATION_BUCKETS, o[3]) for o in obs if o[0] == route)
            assert [c.value for c in hist[:-1]] == [buckets[i] for i in range(len(hist) - 1)]
    totals = by_call.request_totals()
    assert totals.requests == len(obs)
    assert totals.by_class[0] == sum(1 for o in obs if o[2] in (99, 600))


@metrics_impls
def test_switching_series_on_one_cell_counts_each_exactly(mod: ModuleType) -> None:
    """The cell remembers its last (method, status) series: alternating methods,
    statuses and routes must still count each series exactly ("get" and "BREW" are both
    OTHER, yet are different methods as given)."""
    m = mod.Metrics()
    a, b = m.route("a"), m.route("b")
    sequence = [
        (a, "GET", 200),
        (a, "GET", 200),
        (b, "GET", 200),
        (a, "HEAD", 200),
        (a, "GET", 200),
        (a, "GET", 404),
        (a, "GET", 200),
        (a, "get", 200),
        (a, "BREW", 200),
        (a, "get", 200),
        (a, "POST", 200),
        (a, "BREW", 404),
        (b, "GET", 200),
        (a, "GET", 200),
    ]
    for stats, method, status in sequence:
        stats.observe(method, status, 0.0, None)
    assert {k: c.value for k, c in m._requests.items()} == {
        ("a", "GET", 200): 5,
        ("a", "HEAD", 200): 1,
        ("a", "GET", 404): 1,
        ("a", "OTHER", 200): 3,
        ("a", "POST", 200): 1,
        ("a", "OTHER", 404): 1,
        ("b", "GET", 200): 2,
    }
    m.observe_request("a", "GET", 404, 0.0, None)  # the registry's path, same cells
    assert m._requests[("a", "GET", 404)].value == 2
    assert m.request_totals().requests == len(sequence) + 1


@metrics_impls
def test_route_returns_one_cell_per_name(mod: ModuleType) -> None:
    """``route(name)`` is the same object every time, before and after
    ``observe_request`` used it; another name is another cell."""
    m = mod.Metrics()
    stats = m.route("x")
    assert isinstance(stats, mod.RouteStats)
    assert stats.name == "x" and stats.metrics is m
    assert m.route("x") is stats
    assert m.route("y") is not stats
    m.observe_request("x", "GET", 200, 0.5, 0.25)
    assert m.route("x") is stats
    assert stats.total is m._total["x"] and stats.upstream is m._upstream["x"]
    stats.observe("GET", 200, 0.5, None)
    assert m._requests[("x", "GET", 200)].value == 2
    m2 = mod.Metrics()
    m2.observe_request("z", "GET", 200, 0.5, None)  # observe_request creates the cell
    assert m2.route("z") is m2.route("z")
    assert m2.route("z").total is m2._total["z"]


UPSTREAM_BUCKET = 'fastedge_upstream_duration_seconds_bucket{route="x"'


@metrics_impls
def test_no_upstream_series_before_an_upstream_time(mod: ModuleType) -> None:
    """A route answered without an upstream (cache hit, 401, ...) has request-duration
    series but no upstream-duration series, until a request of it reaches the upstream."""
    m = mod.Metrics()
    stats = m.route("x")
    stats.observe("GET", 200, 0.01, None)
    m.observe_request("x", "GET", 401, 0.02, None)
    text = m.render().decode()
    assert 'fastedge_request_duration_seconds_count{route="x"} 2' in text
    assert UPSTREAM_BUCKET not in text
    assert "x" not in m._upstream and stats.upstream is None
    stats.observe("GET", 200, 0.01, 0.0)  # an upstream time of zero still counts
    text = m.render().decode()
    assert 'fastedge_upstream_duration_seconds_count{route="x"} 1' in text
    assert 'fastedge_upstream_duration_seconds_bucket{route="x",le="0.0005"} 1' in text


LE = ["0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5"]
LE += ["1", "2.5", "5", "10", "+Inf"]


def _family_lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def _histogram_lines(name: str, cumulative: list[int], total: str) -> list[str]:
    """Route ``r``'s scrape lines of histogram ``name``, written out."""
    return [
        *(
            f'{name}_bucket{{route="r",le="{le}"}} {n}'
            for le, n in zip(LE, cumulative, strict=True)
        ),
        f'{name}_sum{{route="r"}} {total}',
        f'{name}_count{{route="r"}} {cumulative[-1]}',
    ]


@metrics_impls
def test_a_small_example_renders_exactly(mod: ModuleType) -> None:
    """Exact scrape lines, written out by hand. Times are binary fractions, so the sums
    are exact: 2**-10 s (le 0.001), 2**-8 s (le 0.005), 12 s (+Inf); upstream 2**-9 s."""
    m = mod.Metrics()
    stats = m.route("r")
    stats.observe("GET", 200, 2**-10, None)
    stats.observe("GET", 200, 2**-8, 2**-9)
    m.observe_request("r", "BREW", 503, 12.0, None)
    text = m.render().decode()
    assert _family_lines(text, "fastedge_requests_total") == [
        'fastedge_requests_total{route="r",method="GET",status="200"} 2',
        'fastedge_requests_total{route="r",method="OTHER",status="503"} 1',
    ]
    total = [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    assert _family_lines(text, "fastedge_request_duration_seconds_") == _histogram_lines(
        "fastedge_request_duration_seconds", total, "12.0048828125"
    )
    upstream = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert _family_lines(text, "fastedge_upstream_duration_seconds_") == _histogram_lines(
        "fastedge_upstream_duration_seconds", upstream, "0.001953125"
    )
    totals = m.request_totals()
    assert totals.requests == 3
    assert totals.by_class == (0, 0, 2, 0, 0, 1)
    assert totals.duration_buckets == (0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    assert totals.duration_sum == 12.0048828125


# =========================================================================== B. lane router

DOC: dict[str, Any] = {
    "server": {"listen": "127.0.0.1:0", "access_log": False},
    "admin": {"enabled": False},
    "upstreams": {n: {"targets": [f"http://127.0.0.1:{p}"]} for n, p in (("a", 1), ("b", 2))},
    "rate_limits": {
        "per_ip": {"algorithm": "sliding_window", "limit": 1000, "window": "1s", "key": "ip"}
    },
    "routes": [
        {"name": "root", "prefix": "/", "upstream": "a"},
        {"name": "api", "prefix": "/api/", "upstream": "a", "strip_prefix": True},
        {"name": "users", "prefix": "/api/users", "upstream": "b", "rewrite": "/v2"},
        {"name": "users-head", "prefix": "/api/users/admin/", "upstream": "b", "methods": ["HEAD"]},
        {"name": "api-host", "prefix": "/api", "host": "api.example.com", "upstream": "b"},
        {"name": "admin-get", "prefix": "/admin", "upstream": "b", "methods": ["GET"]},
        {"name": "admin-any", "prefix": "/admin/", "upstream": "a", "rewrite": "/internal"},
        # The same router key twice ("/dup/" is "/dup"): the later one replaces it.
        {"name": "dup-first", "prefix": "/dup", "upstream": "a"},
        {"name": "dup-second", "prefix": "/dup/", "upstream": "b", "strip_prefix": True},
        {"name": "limited", "prefix": "/limited", "upstream": "a", "rate_limit": "per_ip"},
    ],
}


def _with_wildcards(gw: Any) -> Any:
    """A copy of ``gw`` whose router also has wildcard-host routes. The config refuses
    ``host = "*.example.com"``, but Router and PrefixRouter take it, so the lane's router
    must match those alike too; one of them replaces ``api-host`` (same host, any case)."""
    ups = gw.upstreams
    extra = [
        Route("wild", "/", ups["a"], host="*.example.com"),
        Route("wild-static", "/static/", ups["b"], strip_prefix=True, host="*.EXAMPLE.com"),
        Route("wild-deep", "/x", ups["a"], rewrite="/y", host="*.a.example.com"),
        Route("api-host-2", "/api/", ups["a"], host="API.example.com", methods=frozenset({"GET"})),
    ]
    wide = copy.copy(gw)
    wide.router = Router([*gw.router.routes, *extra])
    return wide


@pytest.fixture(scope="module")
def server() -> Iterator[ProxyServer]:
    """A ProxyServer of DOC, built under a running uvloop (never started: no sockets)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:

        async def build() -> ProxyServer:
            return ProxyServer(parse_config(DOC))

        yield runner.run(build())


@pytest.fixture(scope="module", params=["config", "wildcards"])
def gateway(request: pytest.FixtureRequest, server: ProxyServer) -> Any:
    return server.gateway if request.param == "config" else _with_wildcards(server.gateway)


SEGMENTS = ["api", "API", "users", "usersfoo", "admin", "static", "dup", "limited", "x", ""]
PATHS = st.lists(st.sampled_from(SEGMENTS), max_size=5).map(lambda s: "/" + "/".join(s)) | (
    st.sampled_from(["", "*", "api", "//", "/api//users", "/dup/", "http://a/api"])
)
HOST_NAMES = ["api.example.com", "example.com", "a.example.com", "b.a.example.com"]
HOST_NAMES += ["other.org", "127.0.0.1", "[::1]", "api.example.com.evil"]


@st.composite
def hosts(draw: st.DrawFn) -> str | None:
    """Host values as clients send them: any case, a port, a trailing dot, or none."""
    if draw(st.integers(0, 9)) == 0:
        return None
    name = draw(st.sampled_from(HOST_NAMES))
    if draw(st.booleans()):
        name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
    if not name.startswith("[") and draw(st.booleans()):
        name += "."
    if draw(st.booleans()):
        name += draw(st.sampled_from([":80", ":8080", ":443"]))
    return name


def _check(settings_: Any, gw: Any, path: str, host: str | None, method: str) -> None:
    """The lane's match agrees with the gateway's for this request, plan and all."""
    route = gw.router.match(path, host, method)
    found = settings_.match(path, host, method)
    if route is None:
        assert found is None
        return
    assert found is not None
    plan, prefix = found
    assert plan.route is route
    assert prefix == gw.router.prefix_router.match(path, host, method)[1]
    assert plan.name == route.name
    assert plan.upstream is route.upstream
    assert plan.stats is gw.metrics.route(route.name)
    assert plan.chain is route.filters
    raw = path.encode("latin-1")
    for query in (b"", b"?a=1"):
        assert plan.forward_target(raw, query) == route.forward_target(raw, query)


@proxy_impls
@settings(max_examples=200, deadline=None)
@given(path=PATHS, host=hosts(), method=st.sampled_from(["GET", "HEAD"]))
def test_lane_router_matches_the_gateway_router(
    mod: ModuleType, gateway: Any, path: str, host: str | None, method: str
) -> None:
    """A fresh ExpressSettings of the gateway picks the same route as the gateway."""
    _check(mod.ExpressSettings(gateway), gateway, path, host, method)


@settings(max_examples=200, deadline=None)
@given(path=PATHS, host=hosts(), method=st.sampled_from(["GET", "HEAD"]))
def test_the_installed_lane_matches_the_gateway_router(
    server: ProxyServer, path: str, host: str | None, method: str
) -> None:
    """The settings the server installed (ExpressLane.install) too."""
    lane = server.express_lane.settings
    assert lane is not None
    _check(lane, server.gateway, path, host, method)


CASES = [
    ("/", None, "GET", "root", b"/?a=1"),
    ("/api", "other.org", "GET", "api", b"/?a=1"),
    ("/api/users/42", None, "GET", "users", b"/v2/42?a=1"),
    ("/api/usersfoo", None, "HEAD", "api", b"/usersfoo?a=1"),
    ("/api/users/admin/x", None, "HEAD", "users-head", b"/api/users/admin/x?a=1"),
    ("/api/users/admin/x", None, "GET", "users", b"/v2/admin/x?a=1"),
    ("/api/users", "API.Example.COM.:8080", "GET", "api-host", b"/api/users?a=1"),
    ("/admin/x", None, "GET", "admin-get", b"/admin/x?a=1"),
    ("/admin", None, "HEAD", "admin-any", b"/internal?a=1"),
    ("/dup/z", None, "GET", "dup-second", b"/z?a=1"),
    ("/dup", None, "GET", "dup-second", b"/?a=1"),
    ("/limited/1", None, "GET", "limited", b"/limited/1?a=1"),
]


@proxy_impls
@pytest.mark.parametrize(("path", "host", "method", "name", "target"), CASES)
def test_known_requests_pick_the_expected_plan(
    mod: ModuleType,
    server: ProxyServer,
    path: str,
    host: str | None,
    method: str,
    name: str,
    target: bytes,
) -> None:
    """Hand-written expectations (route name and request-target sent upstream)."""
    found = mod.ExpressSettings(server.gateway).match(path, host, method)
    assert found is not None
    plan = found[0]
    assert plan.name == name
    assert plan.forward_target(path.encode(), b"?a=1") == target
    assert plan.plain is (target == path.encode() + b"?a=1")


@proxy_impls
def test_a_policy_route_carries_its_chain_entry_points(
    mod: ModuleType, server: ProxyServer
) -> None:
    """The plan of a rate-limited route holds its chain's express entry points."""
    found = mod.ExpressSettings(server.gateway).match("/limited", None, "GET")
    assert found is not None
    plan = found[0]
    assert plan.chain is not None and plan.chain is plan.route.filters
    # The lane decides this chain itself (express_admit), over the chain's own filters.
    assert plan.chain.express_admit is not None
    assert plan.policies is plan.chain.filters
    assert plan.answer is plan.chain.express
    root = mod.ExpressSettings(server.gateway).match("/", None, "GET")
    assert root is not None
    assert (root[0].chain, root[0].policies, root[0].answer) == (None, None, None)


# =========================================================================== C. pool


class PlainConn:
    """Not a PooledBase: only the pool protocol's methods."""

    def __init__(self, usable: bool) -> None:
        self.usable = usable
        self.closed = False
        self.idle_since = 0.0

    def is_usable(self) -> bool:
        return self.usable

    def close(self) -> None:
        self.closed = True


def _based(mod: ModuleType, usable: bool) -> Any:
    """A pure-Python PooledBase subclass overriding ``is_usable``."""

    class BasedConn(mod.PooledBase):  # type: ignore[name-defined,misc]
        def __init__(self, usable: bool) -> None:
            self.usable = usable
            self.closed = False
            self.idle_since = 0.0

        def is_usable(self) -> bool:
            return bool(self.usable)

        def close(self) -> None:
            self.closed = True

    return BasedConn(usable)


def _pool(mod: ModuleType) -> Any:
    async def connect() -> Any:
        raise AssertionError("take_idle never connects")

    return mod.ConnectionPool(
        "t", connect, max_connections=4, idle_timeout=60, wait_timeout=1, connect_timeout=1
    )


@pool_impls
@pytest.mark.parametrize("kind", ["based", "plain"])
async def test_take_idle_asks_is_usable(mod: ModuleType, kind: str) -> None:
    """The top of the idle stack is taken when usable (and counted busy); when not, the
    answer is None and nothing moves or closes; once usable again it is taken."""
    make = (lambda u: _based(mod, u)) if kind == "based" else PlainConn
    pool = _pool(mod)
    below, top = make(True), make(False)
    pool.state.idle.extend([below, top])
    assert pool.take_idle() is None
    assert pool.state.idle == [below, top] and pool.state.busy == 0
    assert not top.closed and not below.closed
    top.usable = True
    assert pool.take_idle() is top
    assert pool.state.idle == [below] and pool.state.busy == 1
    assert pool.take_idle() is below
    assert pool.take_idle() is None
    assert pool.state.busy == 2 and not top.closed


@pool_impls
async def test_pooled_base_is_usable_only_with_an_open_transport(mod: ModuleType) -> None:
    """``PooledBase.is_usable``: a transport, not closing, and not marked dead. A
    subclass that keeps it is taken from the idle stack only then; otherwise
    ``take_idle`` leaves the stack as it was."""

    class Transport:
        def __init__(self) -> None:
            self.closing = False

        def is_closing(self) -> bool:
            return self.closing

    class Plain(mod.PooledBase):  # type: ignore[name-defined,misc]
        pass

    conn = Plain()
    assert conn.transport is None and not conn.is_usable()
    pool = _pool(mod)
    pool.state.idle.append(conn)
    assert pool.take_idle() is None
    assert pool.state.idle == [conn] and pool.state.busy == 0
    conn.transport = transport = Transport()
    assert conn.is_usable()
    transport.closing = True
    assert not conn.is_usable() and pool.take_idle() is None
    transport.closing = False
    conn._dead = True
    assert not conn.is_usable() and pool.take_idle() is None
    conn._dead = False
    assert pool.take_idle() is conn
    assert pool.state.idle == [] and pool.state.busy == 1


def test_upstream_connection_is_a_pooled_base() -> None:
    """The proxy's upstream connection takes the C-call path of the compiled pool."""
    assert issubclass(proxy_module.UpstreamConnection, pool_module.PooledBase)
