"""Resilience through the real proxy, against real upstream processes on loopback.

Targets are ``tests/origin.py`` processes (killed and restarted on the same port to
simulate a crash and a recovery) and ``tests/faulty_origin.py`` ones (a fixed 5xx for
everything, counting the attempts that reach them).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest

import fastedge.server as server_module
from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import Client, call, free_port, get, start_origin, stop_origin
from tests.faulty_origin import start_faulty

TOKEN = "resilience-test-token"


class Processes:
    """Upstream processes started by one test, all killed at its end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def origin(self) -> tuple[subprocess.Popen[str], int]:
        proc, port = start_origin()
        self.procs.append(proc)
        return proc, port

    def origin_on(self, port: int) -> subprocess.Popen[str]:
        proc, _ = start_origin(port)  # a target coming back
        self.procs.append(proc)
        return proc

    def faulty(self, *args: str) -> tuple[subprocess.Popen[str], int]:
        proc, port = start_faulty(*args)
        self.procs.append(proc)
        return proc, port

    def kill(self, proc: subprocess.Popen[str]) -> None:
        stop_origin(proc)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                stop_origin(proc)
            elif proc.stdout is not None and not proc.stdout.closed:
                proc.stdout.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.close()


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def make_config(upstreams: dict[str, Any], *, engine: str = "fast", admin: bool = False) -> Any:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
            "admin": {"listen": "127.0.0.1:0"} if admin else {"enabled": False},
            "upstreams": upstreams,
            "routes": [{"prefix": "/", "upstream": "main"}],
        }
    )


@pytest.fixture
async def serve(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start ProxyServers for a test (admin with only this feature's endpoints)."""
    monkeypatch.setattr(
        server_module, "ADMIN_EXTENSIONS", ["fastedge.admin.upstreams:upstream_routes"]
    )
    started: list[ProxyServer] = []

    async def start(config: Any) -> ProxyServer:
        server = ProxyServer(config, admin_token=TOKEN)
        await server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.shutdown(drain_timeout=1)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` (bounded: fails the test after ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def fetch(
    port: int, path: str = "/x", method: str = "GET", body: bytes = b"", headers: str = ""
) -> Any:
    client = await Client.open(port)
    try:
        extra = headers + (f"Content-Length: {len(body)}\r\n" if body else "")
        await client.send(get(path, extra=extra).replace(b"GET", method.encode(), 1) + body)
        return await client.read_response(method=method.encode())
    finally:
        await client.close()


async def load(
    port: int,
    total: int,
    connections: int,
    path: str = "/x",
    during: Callable[[int], Awaitable[None]] | None = None,
) -> list[Any]:
    """``total`` GETs over ``connections`` keep-alive connections; ``during(done)`` is
    awaited once, by the first connection, after a quarter of the requests."""
    results: list[Any] = []
    per = total // connections
    triggered = False

    async def worker(index: int) -> None:
        nonlocal triggered
        client = await Client.open(port)
        try:
            for _ in range(per):
                await client.send(get(path))
                resp = await client.read_response()
                results.append(resp)
                if during is not None and not triggered and len(results) >= total // 4:
                    triggered = True
                    await during(len(results))
        finally:
            await client.close()

    await asyncio.gather(*(worker(i) for i in range(connections)))
    return results


def origin_port(resp: Any) -> int:
    return int(resp.header("x-origin-port") or 0)


async def admin(server: ProxyServer, method: str, path: str, body: Any = None) -> Any:
    assert server.admin_port is not None
    data = orjson.dumps(body) if body is not None else None
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    status, _, raw = await call(server.admin_port, method, path, headers, data)
    return status, orjson.loads(raw) if raw else None


async def faulty_count(port: int) -> int:
    client = await Client.open(port)
    try:
        await client.send(get("/__count"))
        return int((await client.read_response()).body)
    finally:
        await client.close()


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("engine", ["h11", "fast"])
async def test_killing_a_target_under_load_fails_no_idempotent_request(
    procs: Processes, serve: Any, engine: str
) -> None:
    _, a = procs.origin()
    victim, b = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(a), url(b)],
                    "health_check": {"path": "/health", "interval": "50ms", "fall": 2},
                    "retry": {},
                    "outlier": {"consecutive_failures": 3},
                }
            },
            engine=engine,
        )
    )
    up = server.gateway.upstreams["main"]
    target_b = up.targets[1]

    async def kill(done: int) -> None:
        procs.kill(victim)

    results = await load(server.port, 400, 8, path="/slow?ms=3", during=kill)
    assert len(results) == 400
    assert [r.status for r in results if r.status != 200] == []
    served = [origin_port(r) for r in results]
    assert b in served  # b took traffic before it died
    assert served[-40:].count(a) == 40  # and a alone afterwards
    await wait_until(lambda: not up.is_healthy(target_b))


async def test_breaker_opens_answers_fast_503_and_recovers_via_half_open(
    procs: Processes, serve: Any
) -> None:
    _, a = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(a)],
                    "breaker": {"min_requests": 4, "failure_ratio": 0.5, "open_for": "600ms"},
                }
            },
            admin=True,
        )
    )
    up = server.gateway.upstreams["main"]
    target = up.targets[0]
    for _ in range(4):  # the origin answers 500: four failures trip the breaker
        assert (await fetch(server.port, "/status/500")).status == 500
    assert up.breaker_state(target) == "open"
    refused = await fetch(server.port, "/x")
    assert refused.status == 503
    assert refused.header("retry-after") == b"1"
    assert refused.header("x-origin-port") is None  # answered by the proxy itself
    error = orjson.loads(refused.body)
    assert error["status"] == 503 and "no available target" in error["error"]
    status, doc = await admin(server, "GET", "/upstreams")
    assert status == 200
    assert doc["upstreams"][0]["targets"][0]["breaker"] == "open"
    metrics = server.metrics.render().decode()
    assert 'fastedge_breaker_state{upstream="main",target="' + url(a) + '"} 2' in metrics
    # After open_for the next request is the half-open probe; a failed probe re-opens
    # (for twice as long), a successful one closes.
    await wait_until(lambda: up.breaker_state(target) == "half_open")
    assert (await fetch(server.port, "/status/500")).status == 500
    assert up.breaker_state(target) == "open"
    assert (await fetch(server.port, "/x")).status == 503
    await wait_until(lambda: up.breaker_state(target) == "half_open")
    ok = await fetch(server.port, "/x")
    assert ok.status == 200 and origin_port(ok) == a
    assert up.breaker_state(target) == "closed"
    assert (await fetch(server.port, "/x")).status == 200


async def test_failover_to_the_next_priority_group_and_back(procs: Processes, serve: Any) -> None:
    primary, a = procs.origin()
    _, b = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [{"url": url(a), "priority": 0}, {"url": url(b), "priority": 1}],
                    "health_check": {"path": "/health", "interval": "50ms", "rise": 2, "fall": 2},
                }
            },
            admin=True,
        )
    )
    up = server.gateway.upstreams["main"]
    target_a = up.targets[0]
    assert {origin_port(await fetch(server.port)) for _ in range(5)} == {a}
    procs.kill(primary)
    await wait_until(lambda: not up.is_healthy(target_a))
    assert {origin_port(await fetch(server.port)) for _ in range(5)} == {b}
    status, doc = await admin(server, "GET", "/upstreams")
    assert status == 200
    targets = doc["upstreams"][0]["targets"]
    assert [(t["priority"], t["healthy"]) for t in targets] == [(0, False), (1, True)]
    procs.origin_on(a)  # the primary region comes back
    await wait_until(lambda: up.is_healthy(target_a))
    assert {origin_port(await fetch(server.port)) for _ in range(5)} == {a}


async def test_a_retry_goes_to_a_different_target(procs: Processes, serve: Any) -> None:
    _, bad = procs.faulty("--status", "503")
    _, good = procs.origin()
    server = await serve(make_config({"main": {"targets": [url(bad), url(good)], "retry": {}}}))
    responses = [await fetch(server.port) for _ in range(10)]
    assert [(r.status, origin_port(r)) for r in responses] == [(200, good)] * 10
    # Every attempt on the bad target was retried once, on the good one. (A retry picks
    # again, which moves the round robin on, as nginx's next-upstream does: here the
    # first attempt alternates onto the bad target every time.)
    bad_attempts = await faulty_count(bad)
    assert bad_attempts >= 5
    text = server.metrics.render().decode()
    assert f"fastedge_upstream_retries_total {bad_attempts}" in text


async def test_the_retry_budget_caps_retries_during_a_total_outage(
    procs: Processes, serve: Any
) -> None:
    _, bad1 = procs.faulty("--status", "503")
    _, bad2 = procs.faulty("--status", "503")
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(bad1), url(bad2)],
                    # No floor: retries may add at most 20% to the requests.
                    "retry": {"attempts": 3, "budget_ratio": 0.2, "budget_min_per_second": 0},
                }
            }
        )
    )
    results = await load(server.port, 100, 4)
    assert {r.status for r in results} == {503}
    attempts = await faulty_count(bad1) + await faulty_count(bad2)
    # Without the budget: 300 attempts (3 each). With it: the 100 requests plus at
    # most 20% of them as retries.
    assert 100 <= attempts <= 120
    assert attempts > 100  # the budget did allow some retries
    text = server.metrics.render().decode()
    assert 'fastedge_retry_budget_exhausted_total{upstream="main"}' in text


async def test_post_is_not_retried_once_sent_but_is_after_a_connect_error(
    procs: Processes, serve: Any
) -> None:
    _, bad = procs.faulty("--status", "503")
    server = await serve(make_config({"main": {"targets": [url(bad)], "retry": {}}}))
    assert (await fetch(server.port, method="POST", body=b"{}")).status == 503
    assert (await fetch(server.port, method="POST")).status == 503  # no body either
    assert await faulty_count(bad) == 2  # one attempt each
    assert (await fetch(server.port, method="GET")).status == 503
    assert await faulty_count(bad) == 5  # GET: all three attempts
    await server.shutdown(drain_timeout=1)

    # Nothing was sent when the connect failed, so even a POST moves on.
    _, good = procs.origin()
    server = await serve(
        make_config({"main": {"targets": [url(free_port()), url(good)], "retry": {}}})
    )
    for _ in range(4):
        resp = await fetch(server.port, "/echo", method="POST", body=b'{"a": 1}')
        assert resp.status == 200 and orjson.loads(resp.body)["body_length"] == 8


async def test_a_timeout_is_retried_on_another_target(procs: Processes, serve: Any) -> None:
    _, hanging = procs.faulty("--hang")
    _, good = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(hanging), url(good)],
                    "pool": {"response_timeout": "200ms"},
                    "retry": {},
                }
            }
        )
    )
    for _ in range(2):  # round robin starts on the hanging target
        resp = await fetch(server.port)
        assert resp.status == 200 and origin_port(resp) == good
    hung = await faulty_count(hanging)
    assert hung >= 1
    assert f"fastedge_upstream_retries_total {hung}" in server.metrics.render().decode()
    text = server.metrics.render().decode()
    assert 'fastedge_upstream_errors_total{upstream="main",kind="upstream_timeout"}' in text


async def test_fallback_upstream_takes_over_when_no_target_is_available(
    procs: Processes, serve: Any
) -> None:
    _, backup = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(free_port())],
                    "health_check": {"interval": "50ms", "fall": 1},
                    "fallback": "backup",
                },
                "backup": {"targets": [url(backup)]},
            }
        )
    )
    up = server.gateway.upstreams["main"]
    await wait_until(lambda: not up.is_healthy(up.targets[0]))
    for _ in range(3):
        resp = await fetch(server.port, "/echo")
        assert resp.status == 200 and origin_port(resp) == backup


async def test_a_consistent_hash_fallback_keeps_affinity(procs: Processes, serve: Any) -> None:
    _, b1 = procs.origin()
    _, b2 = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(free_port())],
                    "health_check": {"interval": "50ms", "fall": 1},
                    "fallback": "backup",
                },
                "backup": {  # a plain (not resilient) upstream keyed on a header
                    "targets": [url(b1), url(b2)],
                    "balance": "consistent_hash",
                    "hash_key": "header:x-session",
                },
            }
        )
    )
    up = server.gateway.upstreams["main"]
    await wait_until(lambda: not up.is_healthy(up.targets[0]))
    owners = set()
    for session in ("alice", "bob", "carol", "dave"):
        seen = set()
        for _ in range(3):
            resp = await fetch(server.port, "/x", headers=f"X-Session: {session}\r\n")
            assert resp.status == 200
            seen.add(origin_port(resp))
        assert len(seen) == 1
        owners |= seen
    assert owners <= {b1, b2}


async def test_static_fallback_response(procs: Processes, serve: Any) -> None:
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(free_port())],
                    "health_check": {"interval": "50ms", "fall": 1},
                    "fallback_response": {
                        "status": 200,
                        "body": '{"items": [], "degraded": true}',
                        "content_type": "application/json",
                    },
                }
            }
        )
    )
    up = server.gateway.upstreams["main"]
    await wait_until(lambda: not up.is_healthy(up.targets[0]))
    resp = await fetch(server.port)
    assert resp.status == 200
    assert resp.header("content-type") == b"application/json"
    assert orjson.loads(resp.body) == {"items": [], "degraded": True}
    assert resp.header("x-request-id")


async def test_no_available_target_without_fallback_is_503_with_retry_after(
    serve: Any,
) -> None:
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(free_port())],
                    "health_check": {"interval": "2s", "fall": 1, "rise": 2},
                }
            }
        )
    )
    up = server.gateway.upstreams["main"]
    await wait_until(lambda: not up.is_healthy(up.targets[0]))
    resp = await fetch(server.port)
    assert resp.status == 503
    # Two passes at a 2 s interval are needed before it can serve again.
    assert resp.header("retry-after") == b"4"


@pytest.mark.parametrize(
    "upstream",
    [
        {},  # the plain fast path
        {"balance": "least_conn", "health_check": {"interval": "50ms"}, "retry": {}},
    ],
    ids=["plain", "resilient-least-conn"],
)
async def test_runtime_target_change_under_load_fails_nothing(
    procs: Processes, serve: Any, upstream: dict[str, Any]
) -> None:
    _, a = procs.origin()
    _, b = procs.origin()
    server = await serve(make_config({"main": {"targets": [url(a)], **upstream}}, admin=True))
    up = server.gateway.upstreams["main"]
    old_target = up.targets[0]
    changes: list[Any] = []

    async def change(done: int) -> None:
        changes.append(await admin(server, "PUT", "/upstreams/main/targets", {"targets": [url(b)]}))
        await asyncio.sleep(0.05)
        body = {"targets": [{"url": url(a), "weight": 2}, url(b)]}
        changes.append(await admin(server, "PUT", "/upstreams/main/targets", body))

    results = await load(server.port, 400, 8, path="/slow?ms=2", during=change)
    assert [s for s, _ in changes] == [200, 200]
    assert [r.status for r in results if r.status != 200] == []
    assert {origin_port(r) for r in results} == {a, b}
    assert [t.name for t in up.targets] == [url(a), url(b)]
    assert up.targets[0] is not old_target  # a was removed, then added back fresh
    assert old_target.pool.stats() == {"idle": 0, "active": 0, "waiting": 0}  # drained
    if up.load_aware:
        assert [up.balancer.inflight(t) for t in up.targets] == [0, 0]
    status, doc = await admin(server, "GET", "/upstreams")
    assert status == 200
    assert [(t["url"], t["weight"]) for t in doc["upstreams"][0]["targets"]] == [
        (url(a), 2),
        (url(b), 1),
    ]


async def test_invalid_target_change_is_refused_and_changes_nothing(
    procs: Processes, serve: Any
) -> None:
    _, a = procs.origin()
    server = await serve(make_config({"main": {"targets": [url(a)]}}, admin=True))
    before = (await admin(server, "GET", "/upstreams"))[1]
    bad_bodies = [
        ({"targets": []}, "targets: an upstream needs at least one target"),
        ({"targets": ["ftp://x"]}, "targets[0]: URL scheme must be 'http' or 'https'"),
        ({"targets": [{"url": url(a), "weight": 0}]}, "targets[0].weight: must be between"),
        ({"targets": [{"url": url(a), "priority": -1}]}, "targets[0].priority"),
        ({"targets": [url(a), url(a)]}, "targets[1]: duplicate target"),
        ({"targets": [url(a)], "extra": 1}, 'expected a JSON object {"targets": [...]}'),
        ([url(a)], 'expected a JSON object {"targets": [...]}'),
    ]
    for body, message in bad_bodies:
        status, doc = await admin(server, "PUT", "/upstreams/main/targets", body)
        assert status == 400, body
        assert message in doc["error"], (message, doc)
        assert set(doc) == {"error", "status", "request_id"}
    status, doc = await admin(server, "PUT", "/upstreams/nope/targets", {"targets": [url(a)]})
    assert status == 404 and "nope" in doc["error"]
    assert (await admin(server, "GET", "/upstreams"))[1] == before
    assert (await fetch(server.port)).status == 200


async def test_get_upstreams_shape(procs: Processes, serve: Any) -> None:
    _, a = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [
                        {"url": url(a), "weight": 3},
                        {"url": url(free_port()), "priority": 1},
                    ],
                    "balance": "least_conn",
                    "breaker": {},
                    "outlier": {},
                },
                "other": {"targets": [url(a)]},
            },
            admin=True,
        )
    )
    await fetch(server.port)
    status, doc = await admin(server, "GET", "/upstreams")
    assert status == 200
    main, other = doc["upstreams"]
    assert (main["name"], main["balance"], other["name"]) == ("main", "least_conn", "other")
    first = main["targets"][0]
    assert first == {
        "url": url(a),
        "weight": 3,
        "priority": 0,
        "healthy": True,
        "ejected": False,
        "breaker": "closed",
        "inflight": 0,
        "pool": {"idle": 1, "active": 0, "waiting": 0},
    }
    assert main["targets"][1]["priority"] == 1


async def test_a_reload_stops_the_old_health_checkers_and_keeps_their_verdicts(
    procs: Processes, serve: Any
) -> None:
    _, a = procs.origin()
    victim, b = procs.origin()
    config = make_config(
        {
            "main": {
                "targets": [url(a), url(b)],
                "health_check": {"path": "/health", "interval": "50ms", "fall": 1},
            }
        }
    )
    server = await serve(config)

    def checker_tasks() -> int:
        return sum(
            1
            for t in asyncio.all_tasks()
            if t.get_name().startswith("health-check") and not t.done()
        )

    old = server.gateway.upstreams["main"]
    assert checker_tasks() == 2
    procs.kill(victim)
    await wait_until(lambda: not old.is_healthy(old.targets[1]))
    for _ in range(3):
        assert server.reload(config)
    new = server.gateway.upstreams["main"]
    assert new is not old
    # Only the live generation probes: no task of the three old generations is left.
    await wait_until(lambda: checker_tasks() == 2)
    assert not old.checks_running and new.checks_running
    # What the old checker knew holds: b is still down, a up, without re-learning.
    assert [new.is_healthy(t) for t in new.targets] == [True, False]
    assert {origin_port(await fetch(server.port)) for _ in range(4)} == {a}
    await server.shutdown(drain_timeout=1)
    await wait_until(lambda: checker_tasks() == 0)


async def test_metrics_report_health_and_ejections(procs: Processes, serve: Any) -> None:
    _, bad = procs.faulty("--status", "500")
    _, good = procs.origin()
    server = await serve(
        make_config(
            {
                "main": {
                    "targets": [url(bad), url(good)],
                    "outlier": {"consecutive_failures": 2, "base_ejection": "30s"},
                }
            }
        )
    )
    up = server.gateway.upstreams["main"]
    statuses = [(await fetch(server.port)).status for _ in range(6)]
    # Round robin: bad, good, bad (ejected now), then good only.
    assert statuses == [500, 200, 500, 200, 200, 200]
    assert up.is_ejected(up.targets[0])
    text = server.metrics.render().decode()
    labels = f'upstream="main",target="{url(bad)}"'
    assert f"fastedge_upstream_ejections_total{{{labels}}} 1" in text
    assert f"fastedge_upstream_target_ejected{{{labels}}} 1" in text
    assert f"fastedge_upstream_target_healthy{{{labels}}} 1" in text
