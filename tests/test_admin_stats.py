"""The dashboard's per-second statistics: quantile estimates and the sampler (no sleeping:
clocks are injected and requests are recorded straight into a real Metrics registry)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastedge.admin.stats import StatsSampler, estimate_quantile
from fastedge.observe.metrics import DURATION_BUCKETS, Metrics

BOUNDS = (0.001, 0.01, 0.1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 10 requests in (0.001, 0.01]: the median is halfway through that bucket.
    assert estimate_quantile(0.5, [0, 10, 0, 0], BOUNDS) == pytest.approx(0.0055)
    # 100 in the first bucket (0, 0.001]: p99 = 0.99 of the way up from 0.
    assert estimate_quantile(0.99, [100, 0, 0, 0], BOUNDS) == pytest.approx(0.00099)
    # 90 fast, 10 slow: p50 in the first bucket, p99 in the (0.01, 0.1] bucket.
    buckets = [90, 0, 10, 0]
    assert estimate_quantile(0.5, buckets, BOUNDS) == pytest.approx(0.001 * 50 / 90)
    assert estimate_quantile(0.99, buckets, BOUNDS) == pytest.approx(0.01 + 0.09 * 9 / 10)


def test_quantile_of_nothing_and_of_the_overflow() -> None:
    assert estimate_quantile(0.5, [0, 0, 0, 0], BOUNDS) is None
    # Above the last bound all we know is "more than 0.1": PromQL answers the bound too.
    assert estimate_quantile(0.99, [0, 0, 0, 5], BOUNDS) == 0.1


@given(
    st.lists(st.integers(0, 50), min_size=len(BOUNDS) + 1, max_size=len(BOUNDS) + 1),
    st.floats(0.01, 0.99),
    st.floats(0.01, 0.99),
)
def test_quantile_is_monotonic_and_inside_the_holding_bucket(
    buckets: list[int], q1: float, q2: float
) -> None:
    lo, hi = sorted((q1, q2))
    a, b = estimate_quantile(lo, buckets, BOUNDS), estimate_quantile(hi, buckets, BOUNDS)
    if sum(buckets) == 0:
        assert a is None and b is None
        return
    assert a is not None and b is not None
    assert 0 <= a <= b + 1e-12 <= BOUNDS[-1] + 1e-12


def test_sampler_turns_counter_deltas_into_rates_and_quantiles() -> None:
    metrics = Metrics()
    clock, wall = FakeClock(), FakeClock()
    sampler = StatsSampler(metrics, clock=clock, wall_clock=wall)
    for _ in range(30):
        metrics.observe_request("r", "GET", 200, 0.0004, 0.0003)
    for _ in range(10):
        metrics.observe_request("r", "GET", 503, 0.2, None)
    clock.now += 2.0
    wall.now = 1_700_000_000.0
    point = sampler.sample()
    assert point is not None
    assert point.rps == pytest.approx(20.0)  # 40 requests in 2 s
    assert point.errors == pytest.approx(5.0)  # 10 answers of 5xx in 2 s
    assert point.t == 1_700_000_000.0
    # p50: rank 20 of 40, inside the 30 requests of the (0, 0.5 ms] bucket.
    assert point.p50 is not None and 0 < point.p50 <= DURATION_BUCKETS[0]
    # p99: rank 39.6, inside the 10 requests of the (0.1, 0.25] bucket.
    assert point.p99 is not None and 0.1 < point.p99 <= 0.25

    # The next second only counts what happened since: nothing.
    clock.now += 1.0
    quiet = sampler.sample()
    assert quiet is not None
    assert quiet.rps == 0 and quiet.errors == 0
    assert quiet.p50 is None and quiet.p99 is None


def test_sampler_ignores_a_sample_without_elapsed_time() -> None:
    metrics = Metrics()
    clock = FakeClock()
    sampler = StatsSampler(metrics, clock=clock)
    assert sampler.sample() is None
    assert list(sampler.points) == []


def test_snapshot_keeps_a_bounded_window_and_reports_totals() -> None:
    metrics = Metrics()
    clock = FakeClock()
    sampler = StatsSampler(metrics, window=5, clock=clock, wall_clock=clock)
    statuses = [200, 200, 404, 500, 302]
    for second in range(8):
        metrics.observe_request("r", "GET", statuses[second % 5], 0.003, 0.002)
        clock.now += 1.0
        sampler.sample()
    snap = sampler.snapshot()
    assert snap["window"] == 5 and snap["interval"] == 1.0
    assert len(snap["points"]) == 5  # the oldest three were dropped
    times = [p["t"] for p in snap["points"]]
    assert times == sorted(times) and times[-1] == clock.now
    assert all(p["rps"] == 1.0 for p in snap["points"])
    assert snap["points"][-1]["p50_ms"] == pytest.approx(3.75)  # middle of (2.5, 5] ms
    assert snap["totals"]["requests"] == 8
    assert snap["totals"]["by_class"] == {"1xx": 0, "2xx": 4, "3xx": 1, "4xx": 2, "5xx": 1}
    assert len(sampler.snapshot(2)["points"]) == 2
    assert sampler.snapshot(0)["points"] == []


def test_request_totals_match_the_exposition() -> None:
    """The sampler's source adds up exactly what /metrics reports per route."""
    metrics = Metrics()
    rng = random.Random(7)
    for _ in range(500):
        route = rng.choice(["a", "b", "c"])
        status = rng.choice([200, 201, 301, 404, 429, 502, 503, 99, 600])
        metrics.observe_request(route, "GET", status, rng.expovariate(50), None)
    totals = metrics.request_totals()
    assert totals.requests == 500 == sum(totals.by_class)
    assert sum(totals.duration_buckets) == 500
    text = metrics.render().decode()
    five = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fastedge_requests_total{") and 'status="5' in line
    )
    assert totals.by_class[5] == five
    sums = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fastedge_request_duration_seconds_sum")
    )
    assert totals.duration_sum == pytest.approx(sums)


async def test_sampler_task_samples_and_stops() -> None:
    metrics = Metrics()
    sampler = StatsSampler(metrics, interval=0.01)
    sampler.start()
    task = sampler._task
    sampler.start()  # idempotent: still one task
    assert sampler._task is task is not None
    metrics.observe_request("r", "GET", 200, 0.001, 0.001)
    for _ in range(500):  # bounded: ~5 s at most on a loaded machine
        if sampler.points and sampler.snapshot()["totals"]["requests"] == 1:
            break
        await asyncio.sleep(0.01)
    assert sampler.snapshot()["totals"]["requests"] == 1
    await sampler.aclose()
    assert task.cancelled() and sampler._task is None
    await sampler.aclose()  # idempotent


# --- the endpoints on a real proxy's admin listener -----------------------------------------

TOKEN = "stats-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_dashboard_endpoints_and_sampler_lifecycle(origin_port: int) -> None:
    import orjson

    from fastedge.config import parse_config
    from fastedge.server import ProxyServer
    from tests.conftest import call

    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "access_log": False},
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "routes": [
                {"prefix": "/api", "upstream": "origin", "strip_prefix": True, "name": "api"},
                {"prefix": "/", "upstream": "origin", "host": "a.test", "methods": ["GET"]},
            ],
        }
    )
    server = ProxyServer(config, admin_token=TOKEN)
    await server.start()
    sampler = server.runtime.services["admin.stats"]
    assert isinstance(sampler, StatsSampler)
    task = sampler._task
    assert task is not None and not task.done()
    admin = server.admin_port or 0
    try:
        for _ in range(4):
            assert (await call(server.port, "GET", "/api/x"))[0] == 200
        # The sampler runs on its own; wait (bounded) for a second that saw the requests.
        for _ in range(100):
            status, _, body = await call(admin, "GET", "/stats", AUTH)
            stats = orjson.loads(body)
            if stats["totals"]["requests"] == 4 and any(p["rps"] > 0 for p in stats["points"]):
                break
            await asyncio.sleep(0.05)
        assert status == 200
        assert stats["totals"]["requests"] == 4 and stats["totals"]["by_class"]["2xx"] == 4
        busy = [p for p in stats["points"] if p["rps"] > 0]
        assert busy and busy[-1]["p50_ms"] is not None and busy[-1]["p99_ms"] is not None
        assert set(busy[-1]) == {"t", "rps", "errors", "p50_ms", "p99_ms"}

        status, _, body = await call(admin, "GET", "/stats?seconds=1", AUTH)
        assert status == 200 and len(orjson.loads(body)["points"]) <= 1
        for bad in ("abc", "-1", "601"):
            status, _, body = await call(admin, "GET", f"/stats?seconds={bad}", AUTH)
            assert status == 400, bad
            assert set(orjson.loads(body)) == {"error", "status", "request_id"}

        status, _, body = await call(admin, "GET", "/routes", AUTH)
        assert status == 200
        assert orjson.loads(body)["routes"] == [
            {
                "name": "api",
                "prefix": "/api",
                "host": None,
                "methods": None,
                "upstream": "origin",
                "strip_prefix": True,
                "rewrite": None,
                "policies": {},
            },
            {
                "name": "/",
                "prefix": "/",
                "host": "a.test",
                "methods": ["GET"],
                "upstream": "origin",
                "strip_prefix": False,
                "rewrite": None,
                "policies": {},
            },
        ]

        status, headers, body = await call(admin, "GET", "/", AUTH)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert b'src="/dashboard/dashboard.js"' in body
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert headers["x-frame-options"] == "DENY"
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            status, headers, body = await call(admin, "GET", f"/dashboard/{name}", AUTH)
            assert status == 200 and headers["content-type"].startswith(kind) and body
        for missing in ("index.html", "nope.js", "..%2fapi.py"):
            status, _, _ = await call(admin, "GET", f"/dashboard/{missing}", AUTH)
            assert status == 404, missing
        status, _, _ = await call(admin, "GET", "/stats")
        assert status == 401  # like every admin endpoint
    finally:
        await server.shutdown(drain_timeout=1)
    # Runtime.close() stopped the sampler: no task is left behind.
    assert sampler._task is None and task.cancelled()
