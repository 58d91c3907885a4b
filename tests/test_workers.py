"""``fastedge run --workers N``: a supervisor and N worker processes on one port.

Integration tests run real ``fastedge run --workers 2`` subprocesses on loopback in front
of real origin processes (``tests/origin.py``), with the load client and the "zero
failed requests" definition of ``tests/test_lifecycle_load.py`` (read its docstring).
Unit tests cover the pieces: merging expositions, relaying admin requests, the
``--workers`` / ``server.workers`` values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastedge.admin.relay import RelayError, relay
from fastedge.cli import _build_parser
from fastedge.config import ConfigError, parse_config
from fastedge.minihttp import Request, Response, start_server
from fastedge.observe.aggregate import ExpositionError, merge_expositions
from fastedge.observe.metrics import MetricFamily, Metrics
from fastedge.workers import ConfigSnapshot, cpu_count, merge_stats, read_config_file
from tests.conftest import ROOT, call, free_port, free_ports, start_origin, stop_origin
from tests.test_lifecycle_load import (
    REQUEST_TIMEOUT,
    Tally,
    assert_reloads_lost_nothing,
    assert_shutdown_lost_nothing,
    probe_generation,
    sigterm_under_load,
    start_load,
    wait_exit,
    write_atomically,
)
from tests.test_lifecycle_load import config_text as lifecycle_config

TOKEN = "workers-test-token-0123456789"
DRAIN = 5.0  # seconds: the drain_timeout of every instance here
START_TIMEOUT = 30.0  # a supervisor and two interpreters on a loaded 2-core machine


# --- the instance under test -----------------------------------------------------------


def config_text(
    port: int, admin_port: int, origin_port: int, gen: str = "gen-a", extra: str = ""
) -> str:
    """tests/test_lifecycle_load.py's config (``/svc`` rewrites to ``/<gen>``, so a
    response names the generation that routed it), with the admin API on."""
    admin = f'listen = "127.0.0.1:{admin_port}"\ntoken_env = "FASTEDGE_TEST_ADMIN_TOKEN"'
    return lifecycle_config(port, origin_port, None, gen, f"{DRAIN:g}s", admin=admin, extra=extra)


@dataclass
class Instance:
    """A running supervisor: its process, ports and stderr."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    cfg: Path
    stderr_path: Path
    worker_pids: set[int] = field(default_factory=set)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def admin(
        self, method: str, path: str, body: Any = None, *, token: bool = True
    ) -> tuple[int, Message, bytes]:
        headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        return await call(self.admin_port, method, path, headers, data)

    async def workers(self) -> list[dict[str, Any]]:
        status, _, body = await self.admin("GET", "/workers")
        assert status == 200, body
        workers: list[dict[str, Any]] = json.loads(body)["workers"]
        self.worker_pids.update(w["pid"] for w in workers if w["pid"])
        return workers

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed strictly (prometheus_client); sample name + sorted
        labels → value."""
        status, headers, body = await self.admin("GET", "/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                key = sample.name + json.dumps(sorted(sample.labels.items()))
                out[key] = out.get(key, 0.0) + sample.value
        return out


def total(metrics: dict[str, float], name: str) -> float:
    """Sum of every sample named ``name`` (any labels)."""
    return sum(v for k, v in metrics.items() if k.startswith(name + "["))


@pytest.fixture
async def instances() -> AsyncIterator[list[Instance]]:
    """Every instance a test starts: stopped at the end (SIGTERM, then SIGKILL), and any
    worker it ever had killed by pid, so nothing outlives the test."""
    started: list[Instance] = []
    yield started
    for inst in started:
        if inst.proc.poll() is None:
            inst.proc.send_signal(signal.SIGTERM)
            if await wait_exit(inst.proc, DRAIN + 10) is None:
                inst.proc.kill()
        inst.proc.wait()
        for pid in inst.worker_pids:
            if is_our_worker(pid, inst.port):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def is_our_worker(pid: int, port: int) -> bool:
    """Whether ``pid`` is still a worker of the instance on ``port`` (a pid of a worker
    that exited may have been reused by an unrelated process: never signal that)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"fastedge.workers" in argv and str(port).encode() in argv


async def wait_ready(inst: Instance, timeout: float = START_TIMEOUT) -> None:
    """Until the supervisor's ``/readyz`` says every worker is ready (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if inst.proc.poll() is not None:
            raise AssertionError(f"exited with {inst.proc.returncode}:\n{inst.stderr()}")
        with contextlib.suppress(OSError):
            status, _, _ = await call(inst.admin_port, "GET", "/readyz")
            if status == 200:
                await inst.workers()
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not ready after {timeout}s:\n{inst.stderr()}")


async def start_instance(
    instances: list[Instance],
    tmp_path: Path,
    text: str,
    port: int,
    admin_port: int,
    *args: str,
) -> Instance:
    cfg = tmp_path / "fastedge.toml"
    write_atomically(cfg, text)
    err = tmp_path / "stderr.log"
    env = {**os.environ, "FASTEDGE_TEST_ADMIN_TOKEN": TOKEN}
    with err.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastedge", "run", "-c", str(cfg), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            env=env,
        )
    inst = Instance(proc, port, admin_port, cfg, err)
    instances.append(inst)
    await wait_ready(inst)
    return inst


async def two_workers(
    instances: list[Instance], tmp_path: Path, origin_port: int, extra: str = ""
) -> Instance:
    port, admin_port = free_ports(2)
    text = config_text(port, admin_port, origin_port, extra=extra)
    return await start_instance(instances, tmp_path, text, port, admin_port, "--workers", "2")


async def fresh_requests(port: int, n: int, path: str = "/plain") -> list[tuple[int, Message]]:
    """``n`` GETs, each on a new connection (so SO_REUSEPORT spreads them), 8 at a time."""
    gate = asyncio.Semaphore(8)

    async def one() -> tuple[int, Message]:
        async with gate:
            status, headers, _ = await call(port, "GET", path)
            return status, headers

    return await asyncio.gather(*(one() for _ in range(n)))


async def wait_for_log(inst: Instance, text: str, count: int, timeout: float = 15.0) -> None:
    """Until ``text`` appears ``count`` times on the supervisor's stderr (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while inst.stderr().count(text) < count:
        assert loop.time() < deadline, f"{text!r} x{count} not logged:\n{inst.stderr()}"
        await asyncio.sleep(0.05)


async def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    """Poll an async predicate until true (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# --- integration: serving, metrics, admin ------------------------------------------------


async def test_both_workers_serve_and_metrics_add_up(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """120 requests on fresh connections: both workers answer some (distinct pids, per-
    worker counts from ``GET /workers``); ``GET /metrics`` is one valid exposition whose
    request counter and latency histogram count exactly the 120 requests."""
    inst = await two_workers(instances, tmp_path, origin_port)
    workers = await inst.workers()
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and inst.proc.pid not in pids
    assert [w["state"] for w in workers] == ["ready", "ready"]

    answers = await fresh_requests(inst.port, 120)
    assert [status for status, _ in answers] == [200] * 120

    workers = await inst.workers()
    served = [w["requests"] for w in workers]
    assert all(n > 0 for n in served), served  # SO_REUSEPORT spread the connections
    assert sum(served) == 120

    metrics = await inst.metrics()
    assert total(metrics, "fastedge_requests_total") == 120
    ok_key = 'fastedge_requests_total[["method", "GET"], ["route", "/"], ["status", "200"]]'
    assert metrics[ok_key] == 120
    assert total(metrics, "fastedge_request_duration_seconds_count") == 120
    inf_key = 'fastedge_request_duration_seconds_bucket[["le", "+Inf"], ["route", "/"]]'
    assert metrics[inf_key] == 120
    assert metrics["fastedge_workers[]"] == 2
    # Gauges add up too: both workers' pools report their targets' connections.
    assert total(metrics, "fastedge_upstream_connections") > 0

    # The dashboard's series covers the instance: each worker samples once a second.
    async def stats_total() -> bool:
        status, _, body = await inst.admin("GET", "/stats?seconds=5")
        assert status == 200, body
        doc = json.loads(body)
        assert doc["workers"] == 2
        return bool(doc["totals"]["requests"] == 120)

    await wait_for(stats_total, timeout=10)


async def test_admin_health_auth_and_config(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """The supervisor's admin: open health probes reflecting the workers, token auth in
    front of everything else, ``/config`` redacted, reads relayed to a worker."""
    inst = await two_workers(instances, tmp_path, origin_port)
    status, _, body = await inst.admin("GET", "/healthz", token=False)
    assert status == 200
    assert json.loads(body)["workers"] == {"ready": 2, "total": 2}
    status, _, body = await inst.admin("GET", "/readyz", token=False)
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    for path in ("/metrics", "/workers", "/config", "/upstreams"):
        status, _, body = await inst.admin("GET", path, token=False)
        assert status == 401, (path, body)
        assert json.loads(body)["error"] == "missing or invalid admin token"
    status, _, body = await inst.admin("GET", "/config")
    assert status == 200 and json.loads(body)["server"]["listen"] == f"127.0.0.1:{inst.port}"
    # Relayed to a worker (the supervisor has no /upstreams of its own).
    status, headers, body = await inst.admin("GET", "/upstreams")
    assert status == 200, body
    assert [u["name"] for u in json.loads(body)["upstreams"]] == ["origin"]
    assert headers["x-request-id"]
    # An unknown path: the worker's 404 in the house shape, with the supervisor's id.
    status, headers, body = await inst.admin("GET", "/no-such-endpoint")
    doc = json.loads(body)
    assert (status, doc["status"], doc["error"]) == (404, 404, "not found")
    assert doc["request_id"] == headers["x-request-id"]


async def test_admin_change_reaches_every_worker_and_survives_a_restart(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """``PUT /traffic/products`` through the supervisor applies in both workers (every
    fresh connection, whichever worker takes it, reaches the new version); after a worker
    is killed, its replacement gets the change replayed; a bad body is refused by all."""
    green_proc, green_port = start_origin()
    try:
        extra = f"""
[upstreams.green]
targets = ["http://127.0.0.1:{green_port}"]

[traffic.products]
versions = {{ blue = "origin", green = "green" }}
weights = {{ blue = 100, green = 0 }}

[[routes]]
prefix = "/products"
upstream = "origin"
traffic = "products"
"""
        inst = await two_workers(instances, tmp_path, origin_port, extra)

        async def origin_ports(n: int) -> set[str]:
            answers = await fresh_requests(inst.port, n, "/products/1")
            assert {status for status, _ in answers} == {200}
            return {headers["x-origin-port"] for _, headers in answers}

        assert await origin_ports(20) == {str(origin_port)}
        before = [w["requests"] for w in await inst.workers()]

        status, _, body = await inst.admin("PUT", "/traffic/products", {"blue": 0, "green": 100})
        assert status == 200, body
        assert json.loads(body)["weights"] == {"blue": 0, "green": 100}
        assert await origin_ports(40) == {str(green_port)}
        after = [w["requests"] for w in await inst.workers()]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

        # Invalid: every worker says 400, the supervisor passes that answer on.
        status, _, body = await inst.admin("PUT", "/traffic/products", {"blue": -1})
        assert status == 400, body
        assert await origin_ports(10) == {str(green_port)}

        # A killed worker comes back with the change replayed.
        victim = (await inst.workers())[0]
        os.kill(victim["pid"], signal.SIGKILL)

        async def replaced() -> bool:
            w = (await inst.workers())[0]
            return w["pid"] != victim["pid"] and w["state"] == "ready"

        await wait_for(replaced)
        status, _, body = await inst.admin("GET", "/readyz", token=False)
        assert status == 200
        before = [w["requests"] for w in await inst.workers()]
        assert before[0] == 0  # the new process starts counting from zero
        assert await origin_ports(40) == {str(green_port)}
        after = [w["requests"] for w in await inst.workers()]
        assert after[0] > 0, after  # the restarted worker served some of them
        status, _, body = await inst.admin("GET", "/traffic/products")
        assert json.loads(body)["weights"] == {"blue": 0, "green": 100}
    finally:
        stop_origin(green_proc)


async def test_killed_worker_is_restarted_and_counted(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """SIGKILL a worker: the supervisor logs it, restarts it, counts the restart, and
    the instance keeps serving throughout."""
    inst = await two_workers(instances, tmp_path, origin_port)
    first = await inst.workers()
    os.kill(first[1]["pid"], signal.SIGKILL)

    async def restarted() -> bool:
        w = (await inst.workers())[1]
        return w["pid"] != first[1]["pid"] and w["state"] == "ready"

    await wait_for(restarted)
    workers = await inst.workers()
    assert workers[0]["pid"] == first[0]["pid"]  # the other one was left alone
    assert workers[1]["restarts"] == 1
    assert f"worker 1 (pid {first[1]['pid']}) stopped unexpectedly (killed by SIGKILL)" in (
        inst.stderr()
    )
    metrics = await inst.metrics()
    assert metrics["fastedge_worker_restarts_total[]"] == 1
    assert [s for s, _ in await fresh_requests(inst.port, 20)] == [200] * 20


async def test_workers_exit_when_the_supervisor_dies(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """No orphans: SIGKILL the supervisor and the workers shut down by themselves."""
    inst = await two_workers(instances, tmp_path, origin_port)
    pids = {w["pid"] for w in await inst.workers()}
    inst.proc.kill()
    inst.proc.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"  # a zombie has exited (our init may be slow to reap it)

    async def all_gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await wait_for(all_gone, timeout=DRAIN + 10)


# --- integration: reload and shutdown under load ------------------------------------------


async def test_reload_under_load_applies_in_every_worker(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """SIGHUP to the supervisor under load (16 keep-alive clients): valid configs are
    loaded by both workers (20 fresh connections all see the new routes), an invalid
    one is refused once and the old config keeps serving; no request fails."""
    inst = await two_workers(instances, tmp_path, origin_port)

    def config(gen: str) -> str:
        return config_text(inst.port, inst.admin_port, origin_port, gen)

    async def everywhere(gen: str) -> bool:
        seen = {await probe_generation(inst.port) for _ in range(20)}
        return seen == {gen}

    tally = Tally()
    stop = asyncio.Event()
    tasks = start_load(inst.port, tally, stop, slow_workers=0, budget=40)
    try:
        await asyncio.sleep(0.5)  # pacing: let the load build up before the first reload
        current = "gen-a"
        done = 0
        for gen in ["gen-b", "invalid", "gen-a", "gen-b"]:
            if gen == "invalid":
                bad = config(current).replace('upstream = "origin"', 'upstream = "nowhere"', 1)
                write_atomically(inst.cfg, bad)
                inst.proc.send_signal(signal.SIGHUP)
                await wait_for_log(inst, "reload refused", 1)
                assert await everywhere(current)
            else:
                write_atomically(inst.cfg, config(gen))
                inst.proc.send_signal(signal.SIGHUP)
                done += 1
                await wait_for_log(inst, "config reloaded: 2 of 2 workers", done)
                assert await everywhere(gen), f"reload to {gen} not applied everywhere"
                current = gen
            await asyncio.sleep(0.5)  # pacing: load runs on the new config for a while
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT + 5)

    assert inst.proc.poll() is None, inst.stderr()
    assert_reloads_lost_nothing(tally)
    # Refused by the supervisor alone: the workers never saw the invalid file.
    assert inst.stderr().count("reload refused") == 1
    metrics = await inst.metrics()
    assert metrics['fastedge_config_reloads_total[["result", "failure"]]'] == 1
    assert metrics['fastedge_config_reloads_total[["result", "success"]]'] == 2 * 3
    inst.proc.send_signal(signal.SIGTERM)
    assert await wait_exit(inst.proc, DRAIN + 10) == 0, inst.stderr()


async def test_shutdown_under_load_loses_no_request(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """SIGTERM to the supervisor under load: both workers drain; no request fails (in
    flight ones complete with ``connection: close``), every client ends refused, and the
    supervisor exits 0 after its workers."""
    inst = await two_workers(instances, tmp_path, origin_port)
    pids = {w["pid"] for w in await inst.workers()}
    tally, term_at = await sigterm_under_load(inst.proc, inst.port, budget=30, drain=DRAIN)
    code = await wait_exit(inst.proc, DRAIN + 10)

    assert_shutdown_lost_nothing(tally, term_at)
    assert code == 0, inst.stderr()
    for pid in pids:
        assert f"(pid {pid}) exited (exit status 0)" in inst.stderr()


# --- integration: start-up ------------------------------------------------------------------


async def test_workers_that_cannot_start_make_the_supervisor_fail(
    origin_port: int, tmp_path: Path
) -> None:
    """A worker failing at start (its access log path is a directory, which only opening
    it reveals) stops the instance with status 1 and the reason on stderr; a taken port
    fails before any worker starts."""
    port, admin_port = free_ports(2)
    (tmp_path / "logs").mkdir()
    text = config_text(port, admin_port, origin_port).replace(
        "access_log = false", f'access_log = "{tmp_path / "logs"}"'
    )
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    run = [sys.executable, "-m", "fastedge", "run", "-c", str(cfg), "--workers", "2"]
    done = await asyncio.to_thread(
        subprocess.run, run, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert "could not start: IsADirectoryError" in done.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg.write_text(config_text(busy, admin_port, origin_port))
        done = await asyncio.to_thread(
            subprocess.run, run, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{busy}: Address already in use" in done.stderr
    assert "worker 0" not in done.stderr  # no worker was started


async def test_one_worker_is_the_single_process_path(
    origin_port: int, tmp_path: Path, instances: list[Instance]
) -> None:
    """``--workers 1`` (and the default) serve in the process itself: no children, the
    admin API is the process's own (no ``/workers``)."""
    port, admin_port = free_ports(2)
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(port, admin_port, origin_port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastedge", "run", "-c", str(cfg), "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FASTEDGE_TEST_ADMIN_TOKEN": TOKEN},
    )
    inst = Instance(proc, port, admin_port, cfg, tmp_path / "none.log")
    instances.append(inst)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError):
            if (await call(admin_port, "GET", "/readyz"))[0] == 200:
                break
        assert loop.time() < deadline and inst.proc.poll() is None
        await asyncio.sleep(0.05)
    children = Path(f"/proc/{inst.proc.pid}/task/{inst.proc.pid}/children").read_text()
    assert children.strip() == ""
    assert (await inst.admin("GET", "/workers"))[0] == 404
    assert [s for s, _ in await fresh_requests(port, 5)] == [200] * 5


# --- unit: merging expositions ---------------------------------------------------------------


def _exposition(requests: int, seconds: float, conns: int) -> bytes:
    metrics = Metrics()
    for _ in range(requests):
        metrics.observe_request("api", "GET", 200, seconds, seconds / 2)
    metrics.inc("fastedge_upstream_errors_total", (("upstream", "u"), ("kind", "connect")))
    metrics.add_collector(
        lambda: [
            MetricFamily(
                "fastedge_client_connections",
                "gauge",
                "Open.",
                [("fastedge_client_connections", {}, conns)],
            )
        ]
    )
    return metrics.render()


def test_merge_sums_counters_histograms_and_gauges() -> None:
    merged = merge_expositions(
        [_exposition(3, 0.002, 4), _exposition(5, 0.2, 1)],
        [MetricFamily("fastedge_workers", "gauge", "Workers.", [("fastedge_workers", (), 2)])],
    ).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    route = (("route", "api"),)
    assert (
        samples[
            ("fastedge_requests_total", (("method", "GET"), ("route", "api"), ("status", "200")))
        ]
        == 8
    )
    assert samples[("fastedge_request_duration_seconds_count", route)] == 8
    assert samples[("fastedge_request_duration_seconds_sum", route)] == pytest.approx(
        3 * 0.002 + 5 * 0.2
    )
    # Buckets stay cumulative: 3 fast requests by 2.5 ms, all 8 by 0.25 s.
    assert samples[("fastedge_request_duration_seconds_bucket", (("le", "0.0025"), *route))] == 3
    assert samples[("fastedge_request_duration_seconds_bucket", (("le", "0.25"), *route))] == 8
    assert samples[("fastedge_request_duration_seconds_bucket", (("le", "+Inf"), *route))] == 8
    assert (
        samples[("fastedge_upstream_errors_total", (("kind", "connect"), ("upstream", "u")))] == 2
    )
    assert samples[("fastedge_client_connections", ())] == 5
    assert samples[("fastedge_workers", ())] == 2
    assert families["fastedge_request_duration_seconds"].type == "histogram"
    # Same layout as Metrics.render: families sorted, HELP before TYPE before samples.
    names = [line.split()[2] for line in merged.splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)
    assert merged.endswith("\n")


def test_merge_keeps_distinct_labels_and_escaped_values_apart() -> None:
    a = (
        b'# HELP m_total A "help" with \\\\ and \\n.\n'
        b'# TYPE m_total counter\nm_total{k="a b} c"} 1\n'
    )
    b = b'# TYPE m_total counter\nm_total{k="a b} c"} 2\nm_total{k="x\\"y"} 0.5\nother 7\n'
    merged = merge_expositions([a, b]).decode()
    assert 'm_total{k="a b} c"} 3\n' in merged
    assert 'm_total{k="x\\"y"} 0.5\n' in merged
    assert '# HELP m_total A "help" with \\\\ and \\n.\n' in merged  # escapes survive
    assert "# TYPE other untyped\nother 7" in merged
    parsed = {f.name: f for f in text_string_to_metric_families(merged)}
    assert parsed["m"].documentation == 'A "help" with \\ and \n.'


@pytest.mark.parametrize(
    "bad",
    [b"# TYPE x gauges\n", b'x{a="1" 1\n', b"x not-a-number\n", b"justaname\n"],
)
def test_merge_rejects_broken_expositions(bad: bytes) -> None:
    with pytest.raises(ExpositionError):
        merge_expositions([bad])


def test_merge_of_nothing_is_empty() -> None:
    assert merge_expositions([]) == b""
    assert merge_expositions([b""]) == b""


def test_merge_stats_adds_rates_and_bounds_latency() -> None:
    def point(t: float, rps: float, p50: float | None, p99: float | None) -> dict[str, Any]:
        return {"t": t, "rps": rps, "errors": rps / 10, "p50_ms": p50, "p99_ms": p99}

    older = {  # a worker up for three seconds
        "interval": 1.0,
        "window": 600,
        "points": [point(10.0, 5, 1, 2), point(11.0, 10, 1, 3), point(12.0, 30, 2, 4)],
        "totals": {"requests": 45, "by_class": {"2xx": 40, "5xx": 5}},
    }
    newer = {  # restarted a second ago; its clock edge is a little later
        "interval": 1.0,
        "window": 600,
        "points": [point(12.01, 10, 4, 40)],
        "totals": {"requests": 10, "by_class": {"2xx": 10}},
    }
    merged = merge_stats([older, newer])
    assert merged["workers"] == 2 and merged["interval"] == 1.0
    assert merged["totals"] == {"requests": 55, "by_class": {"2xx": 50, "5xx": 5}}
    assert [p["t"] for p in merged["points"]] == [10.0, 11.0, 12.01]
    assert [p["rps"] for p in merged["points"]] == [5, 10, 40]
    assert merged["points"][-1]["errors"] == 4.0
    # p50: request-weighted (30 x 2 ms + 10 x 4 ms) / 40; p99: the worst worker's.
    assert merged["points"][-1]["p50_ms"] == 2.5
    assert merged["points"][-1]["p99_ms"] == 40
    idle = merge_stats([{"points": [point(1.0, 0, None, None)], "totals": {}}])
    assert idle["points"][0]["p50_ms"] is None and idle["totals"]["requests"] == 0
    assert merge_stats([])["points"] == []


# --- unit: relaying admin requests ------------------------------------------------------------


async def test_relay_passes_method_headers_body_and_chunked_answers() -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"hello "
            yield b"world"

        if request.path == "/chunked":
            return Response(201, [("x-answer", "yes")], chunks())
        return Response.json({"method": request.method})

    server = await start_server(handler, "127.0.0.1", 0)
    try:
        answer = await relay(
            "127.0.0.1",
            server.port,
            "PUT",
            "/chunked?x=1",
            headers=[("Host", "admin.example:9901"), ("Connection", "keep-alive"), ("X-A", "1")],
            body=b'{"k": 1}',
            request_id="rid-1",
            timeout=5,
        )
        assert (answer.status, answer.body) == (201, b"hello world")
        assert ("x-answer", "yes") in answer.headers
        names = [name for name, _ in answer.headers]
        assert "transfer-encoding" not in names and "x-request-id" not in names
        request = seen[-1]
        assert (request.method, request.path, request.query, request.body) == (
            "PUT",
            "/chunked",
            "x=1",
            b'{"k": 1}',
        )
        assert request.request_id == "rid-1"
        assert request.header("host") == "admin.example:9901"  # kept for origin checks
        assert request.header("connection") == "close" and request.header("x-a") == "1"
        head = await relay("127.0.0.1", server.port, "HEAD", "/", request_id="r", timeout=5)
        assert seen[-1].method == "GET" and json.loads(head.body) == {"method": "GET"}
    finally:
        await server.close()


async def test_relay_errors_are_relay_errors() -> None:
    with pytest.raises(RelayError):
        await relay("127.0.0.1", free_port(), "GET", "/", request_id="r", timeout=5)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(RelayError, match="closed before the answer was complete"):
            await relay("127.0.0.1", port, "GET", "/", request_id="r", timeout=5)
    finally:
        server.close()
        await server.wait_closed()


# --- unit: the values ----------------------------------------------------------------------


def test_workers_values_on_the_command_line_and_in_the_config() -> None:
    parser = _build_parser()
    assert parser.parse_args(["run", "--workers", "3"]).workers == 3
    assert parser.parse_args(["run", "--workers", "auto"]).workers == cpu_count()
    assert parser.parse_args(["run"]).workers is None  # the config decides
    assert parser.parse_args(["reverse-proxy", "--to", "http://x:1"]).workers == 1
    for bad in ("0", "65", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--workers", bad])
    assert parse_config({"server": {"workers": "auto"}}).server.workers == cpu_count()
    assert 1 <= cpu_count() <= 64
    with pytest.raises(ConfigError, match=r"server\.workers: expected an integer, got string"):
        parse_config({"server": {"workers": "many"}})


def test_snapshot_round_trip_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text('[server]\nlisten = "127.0.0.1:0"\nworkers = 2\n')
    snapshot, config = read_config_file(str(cfg))
    assert config.server.workers == 2
    copy = ConfigSnapshot.read(snapshot.write(tmp_path))
    assert copy == snapshot and copy.generation == snapshot.generation
    assert copy.parse(str(cfg)).server.workers == 2
    doc = ConfigSnapshot.from_document({"server": {"workers": 3}})
    assert ConfigSnapshot.read(doc.write(tmp_path)).parse(None).server.workers == 3
    cfg.write_text("[server\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        read_config_file(str(cfg))
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(str(tmp_path / "missing.toml"))


# --- unit: the supervisor's relay of admin changes ---------------------------------------------


async def test_relay_of_changes_reports_failing_and_disagreeing_workers() -> None:
    """Without processes: two fake worker admins (minihttp servers) behind a Supervisor's
    relay. All agree → the first answer, remembered for replay; one fails → 502 naming
    it and which applied; answers differ → 502; a read fails over to the next worker."""
    from fastedge.admin.api import AdminError, AdminRequest
    from fastedge.workers import Supervisor

    seen: dict[int, list[tuple[str, str, bytes]]] = {0: [], 1: []}
    status = {0: 200, 1: 200}

    def worker(index: int) -> Any:
        async def handler(request: Request) -> Response:
            seen[index].append((request.method, request.path, request.body))
            return Response.json({"worker": index}, status=status[index])

        return handler

    servers = [await start_server(worker(i), "127.0.0.1", 0) for i in (0, 1)]
    config = parse_config({"server": {"listen": "127.0.0.1:0"}})
    snapshot = ConfigSnapshot.from_document({})
    supervisor = Supervisor(snapshot, config, workers=2)
    for slot, server in zip(supervisor.slots, servers, strict=True):
        slot.ready, slot.admin_port, slot.pid = True, server.port, 1000 + slot.index

    def put(path: str, body: bytes = b"{}") -> AdminRequest:
        return AdminRequest("PUT", path, "", [("host", "admin")], body, "rid-9")

    try:
        answer = await supervisor._relay(put("/traffic/a", b'{"blue": 1}'))
        assert (answer.status, json.loads(answer.body)) == (200, {"worker": 0})  # type: ignore[arg-type]
        assert seen[0][-1] == seen[1][-1] == ("PUT", "/traffic/a", b'{"blue": 1}')

        status[1] = 500
        with pytest.raises(AdminError) as info:
            await supervisor._relay(put("/traffic/b"))
        assert info.value.status == 502
        assert (
            info.value.message == "failed in worker 1 (pid 1001): status 500; applied by worker 0"
        )

        status[1] = 404
        with pytest.raises(
            AdminError, match="workers answered differently: worker 0 200, worker 1 404"
        ):
            await supervisor._relay(put("/traffic/c"))

        await servers[0].close()  # worker 0 gone: a read is answered by worker 1
        read = AdminRequest("GET", "/traffic", "", [], b"", "rid-10")
        status[1] = 200
        answer = await supervisor._relay(read)
        assert json.loads(answer.body) == {"worker": 1}  # type: ignore[arg-type]
        with pytest.raises(AdminError) as info:
            await supervisor._relay(put("/traffic/d"))
        assert info.value.status == 502 and info.value.message.startswith("failed in worker 0")
        assert info.value.message.endswith("applied by worker 1")

        # Only the change every worker accepted is remembered, and replayed with the
        # instance's credentials to a worker that starts later.
        seen[1].clear()
        await supervisor._replay_to(supervisor.slots[1])
        assert seen[1] == [("PUT", "/traffic/a", b'{"blue": 1}')]
    finally:
        for server in servers:
            await server.close()


def test_restart_back_off_doubles_up_to_its_cap() -> None:
    from fastedge.workers import RESTART_BACKOFF_MAX, Supervisor, _Worker

    slot = _Worker(0)
    delays = [Supervisor._next_backoff(slot) for _ in range(12)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == RESTART_BACKOFF_MAX == 30.0
    slot.crashes_in_a_row = 10_000  # a long crash loop must not overflow the float
    assert Supervisor._next_backoff(slot) == RESTART_BACKOFF_MAX
