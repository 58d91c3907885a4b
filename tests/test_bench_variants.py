"""Issue 9's additions to ``make bench-load``: the fastedge variants, the ratio table and
the memory scenario (``bench/load/variants.py``, ``bench/load/memory.py``).

Unit tests check the generated configs against fastedge's own validator and the ratio
arithmetic on made-up rounds; the smoke test runs the real harness briefly with every
variant and a small memory scenario (it needs nginx and wrk, like the harness's own
smoke test in ``tests/test_bench_harness.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jwt
import pytest

from bench.load import memory, run, variants
from fastedge.config import parse_config
from fastedge.gateway import Upstream
from fastedge.router import Route, Router
from tests.test_bench_harness import run_harness


def _toml(text: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(text)


def test_routes_config_has_1000_routes_and_matches_the_bench_paths() -> None:
    config = parse_config(_toml(variants.routes_config(8080, 9000)))
    assert len(config.routes) == variants.ROUTES == 1000
    router = Router([Route(r.name, r.prefix, r.upstream) for r in config.routes])
    for path in ("/small", "/64k"):
        match = router.match(path, "bench", "GET")
        assert match is not None and match.prefix == path
    assert router.match("/api/v7/items/1", "bench", "GET").prefix == "/api/v7/items"  # type: ignore[union-attr]


def test_chain_config_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variants.JWT_SECRET_ENV, variants.JWT_SECRET)
    config = parse_config(_toml(variants.chain_config(8080, 9000)))
    (route,) = config.routes
    assert set(route.policies) == {"auth", "rate_limit"}
    assert config.sections["tracing"].sample_ratio == 0.01
    assert config.server.access_log is None and config.admin.listen is None
    claims = jwt.decode(variants.bench_token(), variants.JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bench-user" and claims["exp"] > claims["iat"]


async def test_health_config_checks_the_origin_and_routes_to_it() -> None:
    """``fastedge-hc``: a valid config whose upstream has health checks and no other
    resilience feature (resilient, yet express-eligible), probing a path the origin
    answers."""
    cfg = parse_config(_toml(variants.health_config(8080, 9000)))
    upstream = cfg.upstreams["origin"]
    assert upstream.health_check is not None and upstream.health_check.path == "/small"
    assert upstream.resilient
    assert Upstream(upstream).express
    assert [r.prefix for r in cfg.routes] == ["/"]
    assert run.PROXIES["fastedge-hc"].runs("small") and not run.PROXIES["fastedge-hc"].runs("64KiB")


async def test_resilient_config_adds_every_feature_of_one_tier() -> None:
    """``fastedge-resilient``: health checks, a breaker, outlier detection and retries,
    all defaults, on the express lane; the route is unchanged."""
    cfg = parse_config(_toml(variants.resilient_config(8080, 9000)))
    upstream = cfg.upstreams["origin"]
    assert upstream.health_check is not None and upstream.health_check.path == "/small"
    assert upstream.breaker is not None and upstream.outlier is not None
    assert upstream.retry is not None and upstream.retry.statuses == (502, 503, 504)
    live = Upstream(upstream)
    assert live.express and live.verdicts and live.express_health is None
    assert [r.prefix for r in cfg.routes] == ["/"]
    assert run.PROXIES["fastedge-resilient"].runs("small")
    assert not run.PROXIES["fastedge-resilient"].runs("64KiB")


def test_memory_config_leaves_room_for_the_connections() -> None:
    config = parse_config(_toml(variants.memory_config(8080, 9000, 10_000)))
    assert config.server.max_connections > 10_000


def test_variant_commands(tmp_path: Path) -> None:
    argv = variants.workers_command(tmp_path, 8080, 9000, {})
    assert argv[-2:] == ["--workers", "2"]
    argv = variants.chain_command(tmp_path, 8080, 9000, {})
    assert argv[0] == "env" and argv[1].startswith(f"{variants.JWT_SECRET_ENV}=")
    assert (tmp_path / "fastedge.toml").is_file()
    spec = run.PROXIES["fastedge-chain"]
    assert spec.runs("small") and not spec.runs("64KiB")
    assert spec.wrk_headers[0].startswith("Authorization: Bearer ")
    assert run.PROXIES["fastedge-w2"].cpus == f"{run.PROXY_CPU},{run.LOAD_CPU}"
    plain = ("small", "64KiB")
    assert all(run.PROXIES[name].runs(s) for name in ("nginx", "fastedge") for s in plain)


def _result(rps: float, p99: float) -> run.WrkResult:
    return run.WrkResult(
        requests=int(rps), requests_per_sec=rps, p50_us=p99 / 2, p99_us=p99,
        socket_errors=0, status_errors=0,
    )  # fmt: skip


def _bench(tmp_path: Path) -> run.Bench:
    bench = run.Bench(
        duration=1,
        rounds=2,
        connections=64,
        proxies=["nginx", "fastedge", "fastedge-w2"],
        tools={tool: "/bin/true" for tool in ("nginx", "haproxy", "wrk")},  # versions()
        processes=run.Processes(pin=False, taskset=None),
        workdir=tmp_path,
    )
    rounds = {
        0: {"nginx": (100.0, 1000.0), "fastedge": (50.0, 2000.0), "fastedge-w2": (90.0, 900.0)},
        1: {"nginx": (200.0, 1000.0), "fastedge": (80.0, 1000.0), "fastedge-w2": (100.0, 800.0)},
    }
    for index, by_proxy in rounds.items():
        for name, (rps, p99) in by_proxy.items():
            result = _result(rps, p99)
            bench.by_round[(name, "small", index)] = result
            bench.results.setdefault((name, "small"), []).append(result)
    return bench


def test_same_round_ratios_and_the_comparison_table(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    # Round ratios 0.5 and 0.4 -> median 0.45; w2 over plain: 1.8 and 1.25 -> 1.525.
    assert run.same_round_ratio(bench, "fastedge", "nginx", "small") == pytest.approx(0.45)
    assert run.same_round_ratio(bench, "fastedge-w2", "fastedge", "small") == pytest.approx(1.525)
    assert run.same_round_ratio(bench, "fastedge", "nginx", "small", "p99") == pytest.approx(1.5)
    assert run.same_round_ratio(bench, "fastedge", "haproxy", "small") is None
    table = run.comparisons_table(bench)
    assert "| plain proxy vs nginx (`fastedge` / `nginx`, req/s) | small | 0.45x | >= 1.0x |" in (
        table
    )
    assert "| --workers 2 vs --workers 1 (`fastedge-w2` / `fastedge`, req/s) | small | 1.52x |" in (
        table
    )
    assert "haproxy" not in table and "64KiB" not in table  # not measured: no row
    rows = run.summarise(bench)
    assert {(r.proxy, r.scenario) for r in rows if r.failure is None} == {
        ("nginx", "small"),
        ("fastedge", "small"),
        ("fastedge-w2", "small"),
    }
    text = run.report(bench, rows, "cmd", None, ["EXTRA BLOCK"])
    assert "Issue 9 ratios" in text and text.rstrip().endswith("EXTRA BLOCK")


def test_memory_helpers() -> None:
    assert memory.tree_rss_kib(os.getpid()) > 1000
    assert memory.tree_rss_kib(2**22 + 12345) == 0  # no such process
    allowed = memory.connections_within_limit(100)
    assert allowed == 100
    result = memory.MemoryResult("p", 100, 100, 1000, 1500)
    assert result.per_connection_kib == 5.0
    table = memory.markdown([result], {"nginx": "boom | bang"})
    assert "| p | 100 of 100 | 1,000 KiB | 1,500 KiB | 5.00 KiB |" in table
    assert "boom \\| bang" in table


@pytest.mark.slow
def test_harness_runs_the_variants_and_the_memory_scenario(tmp_path: Path) -> None:
    missing = [tool for tool in ("nginx", "wrk", "taskset") if not run.find_tool(tool)]
    if missing:
        pytest.fail(f"needs {', '.join(missing)} (.ci/run installs them)")
    results = tmp_path / "RESULTS.md"
    proxies = ["nginx", "fastedge", "fastedge-w2", "fastedge-1k-routes", "fastedge-chain"]
    done = run_harness(proxies, results, memory_connections=300, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for name in proxies:
        for scenario in run.SCENARIOS:
            if run.PROXIES[name].runs(scenario):
                assert f"| {name} | {scenario} | " in done.stdout, output
    for label in ("full policy chain vs nginx plain", "1,000 routes vs 1 route", "--workers 2"):
        assert label in done.stdout, output
    assert "| nginx | 300 of 300 |" in done.stdout, output
    assert "| fastedge | 300 of 300 |" in done.stdout, output
    written = results.read_text()
    assert "Issue 9 ratios" in written and "| fastedge | 300 of 300 |" in written


async def test_proxy_loop_drives_the_plain_path_and_the_full_chain() -> None:
    """The instruction-count driver (bench/proxy_loop.py) relays through both configs:
    a 401 or a stuck exchange would leave ``client.requests`` short and fail its assert."""
    from bench.proxy_loop import drive

    await drive(20)
    await drive(20, chain=True)
    await drive(20, post=True)  # a POST with a body: one write upstream per request
    await drive(20, routes=True)  # 1,000 routes: still every request upstream


def test_routes_document_matches_the_load_variant() -> None:
    """``--routes`` has as many routes as the fastedge-1k-routes variant, the matched one
    last (so the lane's router really holds the other 999)."""
    from bench.load.variants import ROUTES
    from bench.proxy_loop import routes_document

    routes = routes_document()["routes"]
    assert len(routes) == ROUTES
    assert routes[-1]["prefix"] == "/"
    assert len({r["prefix"] for r in routes}) == ROUTES
