"""Tests for the ``make bench-load`` harness (``bench/load/run.py``).

The wrk parser and the results-file rewrite are unit-tested on captured text. The smoke
test runs the real harness for ~20 s against nginx, HAProxy, the aiohttp proxy and
fastedge. It needs nginx, haproxy and wrk installed: ``.ci/run`` installs them from
Debian. Tests never apt-get themselves (``--no-install``) — a test run that silently
installs system packages would be a surprise — and a missing tool is a failure with
that explanation, not a skip, so CI cannot pass without having run the harness.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import run

REPO_ROOT = Path(__file__).resolve().parents[1]

# Captured from `wrk -t1 -c64 -d1s --latency` against nginx: microseconds, no errors.
# wrk prints the "Socket errors" and "Non-2xx" lines only when they are non-zero.
WRK_CLEAN = """\
Running 1s test @ http://127.0.0.1:18090/small
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   433.84us  182.82us   2.91ms   75.61%
    Req/Sec   111.01k     5.81k  116.89k    70.00%
  Latency Distribution
     50%  438.00us
     75%  564.00us
     90%  617.00us
     99%  774.00us
  110118 requests in 1.00s, 18.06MB read
Requests/sec: 109882.85
Transfer/sec:     18.02MB
"""

# Same layout with milliseconds and seconds, socket errors and non-2xx responses.
WRK_ERRORS = """\
Running 10s test @ http://127.0.0.1:8080/64k
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.21ms   40.01ms   1.99s    98.01%
    Req/Sec     4.12k   310.55     4.51k    80.00%
  Latency Distribution
     50%   11.15ms
     75%   12.02ms
     90%   13.50ms
     99%    1.21s
  41006 requests in 10.01s, 2.51GB read
  Socket errors: connect 0, read 3, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:   4096.50
Transfer/sec:    256.49MB
"""


def test_parse_wrk_microseconds_and_no_errors() -> None:
    result = run.parse_wrk(WRK_CLEAN)
    assert result.requests == 110118
    assert result.requests_per_sec == pytest.approx(109882.85)
    assert result.p50_us == pytest.approx(438.0)
    assert result.p99_us == pytest.approx(774.0)
    assert result.socket_errors == 0
    assert result.status_errors == 0
    assert result.errors == 0


def test_parse_wrk_milliseconds_seconds_and_errors() -> None:
    result = run.parse_wrk(WRK_ERRORS)
    assert result.requests == 41006
    assert result.requests_per_sec == pytest.approx(4096.5)
    assert result.p50_us == pytest.approx(11_150.0)
    assert result.p99_us == pytest.approx(1_210_000.0)
    assert result.socket_errors == 15
    assert result.status_errors == 5
    assert result.errors == 20


def test_parse_wrk_k_suffixed_rate() -> None:
    # wrk's thread stats use SI suffixes; accept them on the totals too.
    text = WRK_CLEAN.replace("Requests/sec: 109882.85", "Requests/sec:    12.50k")
    assert run.parse_wrk(text).requests_per_sec == pytest.approx(12_500.0)


@pytest.mark.parametrize(
    ("value", "unit", "micros"),
    [
        ("812.00", "us", 812.0),
        ("1.30", "ms", 1_300.0),
        ("2.00", "s", 2_000_000.0),
        ("1.50", "m", 90_000_000.0),
    ],
)
def test_parse_duration_units(value: str, unit: str, micros: float) -> None:
    assert run.parse_duration_us(value, unit) == pytest.approx(micros)


@pytest.mark.parametrize(
    ("value", "suffix", "number"),
    [("97.62", "k", 97_620.0), ("1.20", "M", 1_200_000.0), ("310.55", "", 310.55)],
)
def test_parse_metric_units(value: str, suffix: str, number: float) -> None:
    assert run.parse_metric(value, suffix) == pytest.approx(number)


def test_parse_wrk_rejects_output_without_latency() -> None:
    without_latency = "\n".join(
        line for line in WRK_CLEAN.splitlines() if "%" not in line or "Latency" in line
    )
    with pytest.raises(ValueError, match="unrecognised wrk output"):
        run.parse_wrk(without_latency)
    with pytest.raises(ValueError):
        run.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_format_latency() -> None:
    assert run.format_latency(812.4) == "812us"
    assert run.format_latency(1_300.0) == "1.30ms"
    assert run.format_latency(2_500_000.0) == "2.50s"


def test_post_scenario_runs_on_nginx_haproxy_and_plain_fastedge_only() -> None:
    """The POST scenario is opt-in: the three proxies of the plain comparison name it, the
    variants (measured against plain fastedge on GETs) and the others do not."""
    runners = {name for name, spec in run.PROXIES.items() if spec.runs("post")}
    assert runners == {"nginx", "haproxy", "fastedge"}
    assert all(spec.runs("small") for name, spec in run.PROXIES.items() if name in runners)
    assert not run.PROXIES["fastedge-cache"].runs("post")
    assert "post" in run.OPT_IN_SCENARIOS and run.SCENARIOS["post"] == "/small"
    # wrk's Lua: a POST with a JSON body (wrk adds its Content-Length).
    assert 'wrk.method = "POST"' in run.POST_SCRIPT
    assert f"wrk.body = '{run.POST_BODY}'" in run.POST_SCRIPT


def test_write_results_creates_then_replaces_only_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    run.write_results(results, "first run")
    created = results.read_text()
    assert run.RESULTS_HEADING in created
    assert f"{run.RESULTS_START}\nfirst run\n{run.RESULTS_END}" in created

    # Someone else's section before and after ours must survive a rewrite untouched.
    results.write_text(
        "# Results\n\n## Micro\n\nmicro table\n\n" + created.split("\n", 1)[1] + "\n## Later\n"
    )
    run.write_results(results, "second run")
    text = results.read_text()
    assert "first run" not in text
    assert f"{run.RESULTS_START}\nsecond run\n{run.RESULTS_END}" in text
    assert text.startswith("# Results\n\n## Micro\n\nmicro table\n")
    assert text.rstrip().endswith("## Later")
    assert text.count(run.RESULTS_START) == 1
    assert text.count(run.RESULTS_HEADING) == 1


def _table_rows(output: str) -> dict[tuple[str, str], list[str]]:
    """(proxy, scenario) → cells of the harness's Markdown results table."""
    rows: dict[tuple[str, str], list[str]] = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 7 and cells[0] in run.PROXIES:
            rows[(cells[0], cells[1])] = cells
    return rows


def run_harness(
    proxies: list[str],
    results: Path,
    *,
    memory_connections: int,
    timeout: float,
    extra: tuple[str, ...] = ("--rounds", "1"),
) -> subprocess.CompletedProcess[str]:
    """The real harness, one 1-second round over ``proxies`` (never installing anything),
    with ``memory_connections`` idle connections in the memory scenario (0 = skip it),
    writing its tables into ``results``; ``extra`` replaces the round count."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.load.run",
            "--duration",
            "1",
            *extra,
            "--only",
            ",".join(proxies),
            "--memory-connections",
            str(memory_connections),
            "--no-install",
            "--results",
            str(results),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_harness_smoke_run(tmp_path: Path) -> None:
    missing = [tool for tool in ("nginx", "haproxy", "wrk", "taskset") if not run.find_tool(tool)]
    if missing:
        pytest.fail(
            f"the bench-load smoke test needs {', '.join(missing)}: .ci/run installs them "
            "(apt-get install nginx haproxy wrk); tests never install system packages"
        )
    results = tmp_path / "RESULTS.md"
    proxies = ["nginx", "haproxy", "aiohttp", "fastedge", "nginx-cache", "fastedge-cache"]
    # The memory scenario has its own smoke test (tests/test_bench_variants.py).
    done = run_harness(proxies, results, memory_connections=0, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    rows = _table_rows(done.stdout)
    for proxy in proxies:
        for scenario in run.SCENARIOS:
            if not run.PROXIES[proxy].runs(scenario):
                continue
            cells = rows.get((proxy, scenario))
            assert cells is not None, f"no row for {proxy}/{scenario}:\n{output}"
            _, _, rate, _p50, _p99, errors, ratio = cells
            assert rate != "error", f"{proxy}/{scenario} failed: {errors}"
            assert float(rate.replace(",", "")) > 0, cells
            assert errors == "0", cells
            # (a cache-hit row has no plain-nginx reference: its ratio is the comparison's)
            assert ratio.endswith("x") or scenario in run.OPT_IN_SCENARIOS, cells
    assert rows[("nginx", "small")][6] == "1.00x"
    assert rows[("nginx", "post")][6] == "1.00x"
    assert "cache hits vs nginx proxy_cache hits" in done.stdout
    assert "POST with a small JSON body vs nginx" in done.stdout

    written = results.read_text()
    assert run.RESULTS_START in written and run.RESULTS_END in written
    assert "| fastedge | small |" in written
    assert "Versions: nginx" in written


@pytest.mark.slow
def test_harness_interleaved_run(tmp_path: Path) -> None:
    """``--interleave``: each proxy started once, measured every round, the ratio table
    filled from same-round pairs, and every process gone afterwards."""
    missing = [tool for tool in ("nginx", "wrk", "taskset") if not run.find_tool(tool)]
    if missing:
        pytest.fail(
            f"the interleaved smoke test needs {', '.join(missing)} (.ci/run installs them)"
        )
    results = tmp_path / "RESULTS.md"
    proxies = ["nginx", "fastedge", "fastedge-chain"]
    done = run_harness(
        proxies,
        results,
        memory_connections=0,
        timeout=180,
        extra=("--rounds", "2", "--interleave"),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Every proxy measured in both rounds (the harness logs each measured run).
    for proxy in proxies:
        runs = [
            line
            for line in done.stdout.splitlines()
            if line.split()[2:4] == [proxy, "small"] and "req/s" in line
        ]
        assert len(runs) == 2, (proxy, output)
    assert "round 2/2  nginx     64KiB" in done.stdout
    rows = _table_rows(done.stdout)
    assert rows[("nginx", "small")][6] == "1.00x"
    assert rows[("fastedge-chain", "small")][6].endswith("x")
    assert "interleave" in results.read_text()
