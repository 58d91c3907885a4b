"""Blue-green splits and feature flags through real proxies, to real origin processes
(each answers with its port in ``X-Origin-Port``): shifts under load, refused changes,
cohorts, the state file across restarts and a full disk, two instances on one Redis."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastedge.config import Config, parse_config
from fastedge.server import ProxyServer
from fastedge.traffic import in_cohort
from tests.conftest import (
    ROOT,
    Client,
    call,
    free_port,
    free_ports,
    get,
    running_demo,
    start_origin,
    stop_origin,
    wait_port,
)

TOKEN = "traffic-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
VERSIONS = ("blue", "green", "canary")


@pytest.fixture(scope="module")
def origins() -> Iterator[dict[str, int]]:
    """One origin process per version: blue, green and canary."""
    started = {name: start_origin() for name in VERSIONS}
    try:
        yield {name: port for name, (_, port) in started.items()}
    finally:
        for proc, _ in started.values():
            stop_origin(proc)


def traffic_config(
    origins: dict[str, int],
    engine: str = "fast",
    *,
    weights: dict[str, int] | None = None,
    percent: float = 10,
    source: str | None = None,
    **extra: Any,
) -> Config:
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {
            name: {"targets": [f"http://127.0.0.1:{port}"]} for name, port in origins.items()
        },
        "traffic": {
            "products": {
                "versions": {"blue": "blue", "green": "green"},
                "weights": weights or {"blue": 100, "green": 0},
            }
        },
        "flags": {
            "new-pricing": {
                "percent": percent,
                "user": ["claim:sub", "header:X-User-Id"],
                "upstream": "canary",
                "header": "X-Feature-Flags",
            }
        },
        "routes": [
            {
                "prefix": "/flagged",
                "upstream": "blue",
                "strip_prefix": True,
                "flags": "new-pricing",
            },
            {"prefix": "/", "upstream": "blue", "traffic": "products"},
        ],
        **extra,
    }
    return parse_config(doc, source=source)


@pytest.fixture
async def servers() -> AsyncIterator[list[ProxyServer]]:
    """Proxies started by a test, shut down after it."""
    started: list[ProxyServer] = []
    yield started
    for server in started:
        await server.shutdown(drain_timeout=1)


async def start(servers: list[ProxyServer], config: Config) -> ProxyServer:
    server = ProxyServer(config, admin_token=TOKEN)
    await server.start()
    servers.append(server)
    return server


async def admin(
    server: ProxyServer, method: str, path: str, body: object = None
) -> tuple[int, Any]:
    port = server.admin_port
    assert port is not None
    data = None if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
    status, _, raw = await call(port, method, path, AUTH, data)
    return status, orjson.loads(raw) if raw else None


async def served_by(client: Client, path: str = "/x", extra: str = "") -> int:
    await client.send(get(path, extra=extra))
    resp = await client.read_response()
    assert resp.status == 200, resp
    return int(resp.header("x-origin-port") or 0)


# --------------------------------------------------------------------------- shifting


@dataclass
class LoadRun:
    applied: int = 0  # PUTs answered: a request sent after this sees at least these weights
    started: int = 0  # PUTs sent: a request answered before this saw at most those weights
    results: list[tuple[int, int, int, int]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)


async def test_shift_from_blue_to_green_under_load_fails_no_request(
    origins: dict[str, int], engine_name: str, servers: list[ProxyServer]
) -> None:
    server = await start(servers, traffic_config(origins, engine_name))
    plan = [
        {"blue": 100, "green": 0},
        {"blue": 90, "green": 10},
        {"blue": 50, "green": 50},
        {"blue": 10, "green": 90},
        {"blue": 0, "green": 100},
    ]
    port_of = {origins["blue"]: "blue", origins["green"]: "green"}
    run = LoadRun()
    stop = asyncio.Event()

    async def worker() -> None:
        client = await Client.open(server.port)
        try:
            while not stop.is_set():
                lo = run.applied
                await client.send(get("/x"))
                resp = await client.read_response()
                port = int(resp.header("x-origin-port") or 0)
                run.results.append((lo, run.started, resp.status, port))
        except Exception as exc:
            run.failures.append(exc)
        finally:
            await client.close()

    async def answered(n: int) -> None:
        target = len(run.results) + n
        while len(run.results) < target and not run.failures:
            await asyncio.sleep(0.005)

    async with asyncio.timeout(60):
        workers = [asyncio.create_task(worker()) for _ in range(6)]
        for step, weights in enumerate(plan[1:], start=1):
            await answered(250)
            run.started = step
            status, body = await admin(server, "PUT", "/traffic/products", weights)
            assert status == 200, body
            assert body == {
                "name": "products",
                "weights": weights,
                "versions": {"blue": "blue", "green": "green"},
                "persisted": False,  # no config file: in memory only
            }
            run.applied = step
        await answered(250)
        stop.set()
        await asyncio.gather(*workers)

    assert run.failures == []
    assert {status for _, _, status, _ in run.results} == {200}  # zero failed requests
    seen: dict[int, set[str]] = {}
    for lo, hi, _, port in run.results:
        version = port_of[port]
        # Served under the weights of some step from the last answered PUT to the last
        # sent one, never a version weighing 0 in all of them.
        assert any(plan[k][version] > 0 for k in range(lo, hi + 1)), (lo, hi, version)
        if lo == hi:
            seen.setdefault(lo, set()).add(version)
    assert seen[0] == {"blue"}
    assert seen[2] == {"blue", "green"}
    assert seen[len(plan) - 1] == {"green"}  # the answers really moved
    # Every request was counted per version, and the gauges show the last shift.
    status, _, text = await call(server.admin_port or 0, "GET", "/metrics", AUTH)
    lines = text.decode().splitlines()
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith('fastedge_traffic_requests_total{split="products"')
    )
    assert counted == len(run.results)
    assert 'fastedge_traffic_weight{split="products",version="green"} 100' in lines


async def test_refused_changes_leave_the_split_as_it_was(
    origins: dict[str, int], servers: list[ProxyServer]
) -> None:
    server = await start(servers, traffic_config(origins, weights={"blue": 70, "green": 30}))
    before = {
        "name": "products",
        "versions": {"blue": "blue", "green": "green"},
        "weights": {"blue": 70, "green": 30},
    }
    assert await admin(server, "GET", "/traffic") == (200, {"splits": [before]})
    for body, message in [
        ({"blue": -1, "green": 1}, "must not be negative"),
        ({"blue": 0, "green": 0}, "at least one weight must be positive"),
        ({"purple": 10}, "unknown version 'purple'"),
        ({"blue": 1.5}, "must be an integer"),
        ({"blue": "50"}, "must be an integer"),
        ([70, 30], "expected an object"),
        (b"{not json", "not valid JSON"),
    ]:
        status, error = await admin(server, "PUT", "/traffic/products", body)
        assert status == 400, (body, error)
        assert set(error) == {"error", "status", "request_id"} and error["status"] == 400
        assert message in error["error"], error
        assert await admin(server, "GET", "/traffic/products") == (200, before)
    assert server.runtime.services["traffic"].splits["products"].weights_dict() == {
        "blue": 70,
        "green": 30,
    }
    status, error = await admin(server, "PUT", "/traffic/nope", {"blue": 1})
    assert status == 404 and error["error"] == "no traffic split named 'nope'"
    assert (await admin(server, "PUT", "/traffic/nope", b"{bad"))[0] == 404  # name first
    assert (await admin(server, "PUT", "/flags/nope", {"percent": 1}))[0] == 404
    assert (await admin(server, "GET", "/traffic/nope"))[0] == 404
    assert (await admin(server, "GET", "/flags/nope"))[0] == 404
    for body in ({"percent": 101}, {"percent": "5"}, {"pct": 5}, {"percent": 5, "user": "x"}, []):
        status, error = await admin(server, "PUT", "/flags/new-pricing", body)
        assert status == 400, (body, error)
    assert (await admin(server, "GET", "/flags/new-pricing"))[1]["percent"] == 10
    # Without the token nothing is shown or changed.
    port = server.admin_port or 0
    assert (await call(port, "PUT", "/traffic/products", None, b'{"blue": 1}'))[0] == 401
    assert (await call(port, "GET", "/traffic", None))[0] == 401


async def test_flag_cohort_grows_monotonically_and_its_header_reaches_the_upstream(
    origins: dict[str, int], servers: list[ProxyServer]
) -> None:
    server = await start(servers, traffic_config(origins, percent=10))
    users = [f"user{i}" for i in range(300)]

    async def cohort() -> set[str]:
        client = await Client.open(server.port)
        inside: set[str] = set()
        try:
            for user in users:
                # Every client claims the flag: only fastedge's decision may reach upstream.
                extra = f"X-User-Id: {user}\r\nX-Feature-Flags: new-pricing,forged\r\n"
                await client.send(get("/flagged/echo", extra=extra))
                resp = await client.read_response()
                assert resp.status == 200
                sent = json.loads(resp.body)["headers"]
                flags = [v for n, v in sent if n.lower() == "x-feature-flags"]
                port = int(resp.header("x-origin-port") or 0)
                if port == origins["canary"]:
                    inside.add(user)
                    assert flags == ["new-pricing"], (user, sent)
                else:
                    assert port == origins["blue"]
                    assert flags == [], (user, sent)
        finally:
            await client.close()
        return inside

    at10 = await cohort()
    assert at10 == {u for u in users if in_cohort("new-pricing", u, 10)}
    assert 15 <= len(at10) <= 45  # ~10% of 300
    status, body = await admin(server, "PUT", "/flags/new-pricing", {"percent": 20})
    assert status == 200
    assert body == {
        "name": "new-pricing",
        "percent": 20,
        "user": "claim:sub, header:x-user-id",
        "upstream": "canary",
        "header": "X-Feature-Flags",
        "persisted": False,
    }
    at20 = await cohort()
    assert at10 < at20  # everyone in at 10% stays in at 20%, and more join
    assert at20 == {u for u in users if in_cohort("new-pricing", u, 20)}
    # No user id: out of every flag.
    client = await Client.open(server.port)
    assert await served_by(client, "/flagged/x") == origins["blue"]
    await client.close()
    status, listing = await admin(server, "GET", "/flags")
    assert status == 200 and [f["percent"] for f in listing["flags"]] == [20]


# --------------------------------------------------------------------------- persistence


async def test_state_file_keeps_the_last_shift_across_a_restart_and_a_reload(
    origins: dict[str, int], tmp_path: Path, servers: list[ProxyServer]
) -> None:
    source = str(tmp_path / "fastedge.toml")  # the state file goes beside it by default
    config = traffic_config(origins, source=source)
    first = await start(servers, config)
    status, body = await admin(first, "PUT", "/traffic/products", {"blue": 0, "green": 100})
    assert status == 200 and body["persisted"] is True
    status, body = await admin(first, "PUT", "/flags/new-pricing", {"percent": 35})
    assert status == 200 and body["persisted"] is True
    on_disk = json.loads((tmp_path / "fastedge-state.json").read_text())
    assert on_disk["splits"] == {"products": {"weights": {"blue": 0, "green": 100}}}
    servers.remove(first)
    await first.shutdown(drain_timeout=1)

    second = await start(servers, config)  # a new process on the same file
    assert (await admin(second, "GET", "/traffic/products"))[1]["weights"] == {
        "blue": 0,
        "green": 100,
    }
    assert (await admin(second, "GET", "/flags/new-pricing"))[1]["percent"] == 35
    client = await Client.open(second.port)
    assert {await served_by(client) for _ in range(20)} == {origins["green"]}
    # A reload whose config changes the initial weights: the runtime shift still wins.
    assert second.reload(traffic_config(origins, weights={"blue": 50, "green": 50}, source=source))
    assert {await served_by(client) for _ in range(20)} == {origins["green"]}
    await client.close()


def _can_mount_tmpfs(mnt: Path) -> bool:
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=16k tmpfs "$0"', str(mnt)],
        capture_output=True,
        timeout=10,
    )
    return probe.returncode == 0


async def test_disk_full_keeps_serving_and_says_not_persisted(
    origins: dict[str, int], tmp_path: Path
) -> None:
    """A real ENOSPC: ``fastedge run`` in its own mount namespace with the state file on a
    64 KiB tmpfs, which the test fills up through /proc/PID/root."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("unshare") is None or not _can_mount_tmpfs(mnt):
        # Needs a kernel that allows unprivileged user+mount namespaces (CI's does); where
        # it refuses, test_traffic.py's injected-ENOSPC test still covers the same code.
        pytest.skip("kernel refuses unprivileged mount namespaces (unshare -rm)")
    port, admin_port = free_ports(2)
    cfg = tmp_path / "fastedge.toml"
    upstreams = "".join(
        f'[upstreams.{n}]\ntargets = ["http://127.0.0.1:{p}"]\n' for n, p in origins.items()
    )
    cfg.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\naccess_log = false\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f"{upstreams}"
        '[traffic.products]\nversions = {blue = "blue", green = "green"}\n'
        "weights = {blue = 100, green = 0}\n"
        f'[traffic_state]\nfile = "{mnt}/state.json"\n'
        '[[routes]]\nprefix = "/"\nupstream = "blue"\ntraffic = "products"\n'
    )
    proc = subprocess.Popen(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$1" -m fastedge run -c "$2"',
            str(mnt),
            sys.executable,
            str(cfg),
        ],
        cwd=ROOT,
        env={**os.environ, "FASTEDGE_ADMIN_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_port(admin_port, proc, timeout=20)
        await wait_port(port, proc, timeout=20)
        inside = Path(f"/proc/{proc.pid}/root{mnt}")  # the tmpfs, seen from outside

        async def put(weights: dict[str, int]) -> dict[str, Any]:
            status, _, body = await call(
                admin_port, "PUT", "/traffic/products", AUTH, orjson.dumps(weights)
            )
            assert status == 200, body
            result: dict[str, Any] = orjson.loads(body)
            return result

        assert (await put({"blue": 90, "green": 10}))["persisted"] is True
        assert json.loads((inside / "state.json").read_text())["splits"]["products"] == {
            "weights": {"blue": 90, "green": 10}
        }
        with open(inside / "fill", "wb", buffering=0) as fill:  # fill it to the last byte
            try:
                while True:
                    fill.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        answer = await put({"blue": 0, "green": 100})
        assert answer["persisted"] is False and answer["weights"] == {"blue": 0, "green": 100}
        # Serving follows the change at once, from memory.
        client = await Client.open(port)
        assert {await served_by(client) for _ in range(10)} == {origins["green"]}
        await client.close()
        text = (await call(admin_port, "GET", "/metrics", AUTH))[2]
        assert b"fastedge_state_write_errors_total 1" in text
        # The old file is intact (never half-written), no temporary file is left over.
        assert json.loads((inside / "state.json").read_text())["splits"]["products"] == {
            "weights": {"blue": 90, "green": 10}
        }
        assert sorted(os.listdir(inside)) == ["fill", "state.json"]
        (inside / "fill").unlink()  # space again: the next change persists
        assert (await put({"blue": 20, "green": 80}))["persisted"] is True
        assert json.loads((inside / "state.json").read_text())["splits"]["products"] == {
            "weights": {"blue": 20, "green": 80}
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert "cannot write the traffic state file" in err.decode()
    assert "No space left on device" in err.decode()


# --------------------------------------------------------------------------- Redis


def redis_config(origins: dict[str, int], url: str, prefix: str, resync: str) -> Config:
    return traffic_config(
        origins,
        redis={"url": url, "key_prefix": prefix},
        traffic_state={"resync_interval": resync},
    )


async def eventually(check: Any, timeout: float = 10.0) -> float:
    """Poll ``check()`` (an async predicate) until true; the seconds it took."""
    loop = asyncio.get_running_loop()
    start_time = loop.time()
    while not await check():
        if loop.time() - start_time > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return loop.time() - start_time


async def test_two_instances_on_one_redis_follow_a_change(
    origins: dict[str, int], redis_url: str, servers: list[ProxyServer]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    # A resync far beyond the test: only the pub/sub message can carry the change.
    a = await start(servers, redis_config(origins, redis_url, prefix, "60s"))
    b = await start(servers, redis_config(origins, redis_url, prefix, "60s"))
    for server in (a, b):
        await asyncio.wait_for(server.runtime.services["traffic"].backend.synced.wait(), 5)
    status, body = await admin(a, "PUT", "/traffic/products", {"blue": 0, "green": 100})
    assert status == 200 and body["persisted"] is True

    async def b_follows() -> bool:
        weights = (await admin(b, "GET", "/traffic/products"))[1]["weights"]
        return bool(weights == {"blue": 0, "green": 100})

    took = await eventually(b_follows)
    print(f"instance B applied the split change after {took * 1000:.1f} ms")
    client = await Client.open(b.port)
    assert {await served_by(client) for _ in range(10)} == {origins["green"]}
    await client.close()
    status, _ = await admin(b, "PUT", "/flags/new-pricing", {"percent": 45})
    assert status == 200

    async def a_follows() -> bool:
        return bool((await admin(a, "GET", "/flags/new-pricing"))[1]["percent"] == 45)

    await eventually(a_follows)
    # A third instance starting now reads the shared state.
    c = await start(servers, redis_config(origins, redis_url, prefix, "60s"))
    await asyncio.wait_for(c.runtime.services["traffic"].backend.synced.wait(), 5)
    assert (await admin(c, "GET", "/traffic/products"))[1]["weights"]["green"] == 100
    assert (await admin(c, "GET", "/flags/new-pricing"))[1]["percent"] == 45


async def test_a_missed_message_heals_at_the_next_resync(
    origins: dict[str, int], redis_url: str, servers: list[ProxyServer]
) -> None:
    import redis.asyncio as aioredis

    from fastedge.state import RedisCoordinator
    from fastedge.traffic_sync import _next_revision

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    server = await start(servers, redis_config(origins, redis_url, prefix, "100ms"))
    client = aioredis.Redis.from_url(redis_url)
    try:
        coord = RedisCoordinator(client, key_prefix=f"{prefix}state:")

        def change(doc: dict[str, Any]) -> dict[str, Any]:
            doc["splits"]["products"] = {"weights": {"blue": 25, "green": 75}}
            return doc

        # Stored, never published: as if the message was lost.
        await coord.update("traffic", lambda old: _next_revision(old, change))

        async def healed() -> bool:
            weights = (await admin(server, "GET", "/traffic/products"))[1]["weights"]
            return bool(weights == {"blue": 25, "green": 75})

        await eventually(healed)
    finally:
        await client.aclose()


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (.ci/run installs it)")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("redis-server did not start")


async def test_redis_down_keeps_the_last_values_and_recovers(
    origins: dict[str, int], tmp_path: Path, servers: list[ProxyServer]
) -> None:
    port = free_port()
    redis_proc = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        a = await start(servers, redis_config(origins, url, "d:", "200ms"))
        b = await start(servers, redis_config(origins, url, "d:", "200ms"))
        for server in (a, b):
            await asyncio.wait_for(server.runtime.services["traffic"].backend.synced.wait(), 5)
        assert (await admin(a, "PUT", "/traffic/products", {"blue": 0, "green": 100}))[0] == 200

        async def b_at(green: int) -> bool:
            return bool(
                (await admin(b, "GET", "/traffic/products"))[1]["weights"]["green"] == green
            )

        await eventually(lambda: b_at(100))
        redis_proc.kill()
        redis_proc.wait()
        # Down: both keep serving the last known split; a change is refused, not half-made.
        status, error = await admin(a, "PUT", "/traffic/products", {"blue": 100, "green": 0})
        assert status == 503 and "nothing changed" in error["error"]
        for server in (a, b):
            client = await Client.open(server.port)
            assert {await served_by(client) for _ in range(5)} == {origins["green"]}
            await client.close()
            assert (await admin(server, "GET", "/traffic/products"))[1]["weights"]["green"] == 100

        async def sync_errors() -> bool:
            text = (await call(b.admin_port or 0, "GET", "/metrics", AUTH))[2]
            return b"fastedge_traffic_sync_errors_total" in text

        await eventually(sync_errors)
        # Back (empty, as after a data loss): the next change starts a new epoch that
        # every instance adopts once its subscription reconnects.
        redis_proc = _start_redis(port, tmp_path)

        async def change_accepted() -> bool:
            status, _ = await admin(a, "PUT", "/traffic/products", {"blue": 60, "green": 40})
            return status == 200

        await eventually(change_accepted, timeout=15)
        await eventually(lambda: b_at(40), timeout=15)
    finally:
        redis_proc.kill()
        redis_proc.wait()


async def test_redis_unreachable_from_the_start_serves_the_config(
    origins: dict[str, int], servers: list[ProxyServer]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = await start(servers, redis_config(origins, url, "x:", "100ms"))
    client = await Client.open(server.port)
    assert {await served_by(client) for _ in range(5)} == {origins["blue"]}
    await client.close()
    assert (await admin(server, "GET", "/traffic/products"))[1]["weights"]["blue"] == 100
    status, error = await admin(server, "PUT", "/traffic/products", {"green": 1})
    assert status == 503 and error["error"].startswith("shared traffic state unavailable")
    assert (await admin(server, "GET", "/traffic/products"))[1]["weights"]["blue"] == 100


# --------------------------------------------------------------------------- demo


async def test_demo_starts_blue_has_a_canary_cohort_and_shifts() -> None:
    from fastedge.demo import _cohort_user, instructions

    async with running_demo(TOKEN) as server:
        client = await Client.open(server.port)

        async def version(n: int, extra: str = "") -> bytes | None:
            # A distinct query per request: never an answer from a cache.
            await client.send(get(f"/api/products?n={n}", extra=extra))
            resp = await client.read_response()
            assert resp.status == 200
            return resp.header("x-version")

        assert {await version(i) for i in range(10)} == {b"blue"}
        inside, outside = _cohort_user(True), _cohort_user(False)
        assert await version(10, f"X-User-Id: {inside}\r\n") == b"canary"
        assert await version(11, f"X-User-Id: {outside}\r\n") == b"blue"
        status, body = await admin(server, "PUT", "/traffic/products", {"blue": 0, "green": 100})
        assert status == 200 and body["weights"] == {"blue": 0, "green": 100}
        assert {await version(20 + i) for i in range(10)} == {b"green"}
        await client.close()
        text = instructions("127.0.0.1:8080", "127.0.0.1:9901", "t")
        assert "PUT" in text and "/traffic/products" in text and f"X-User-Id: {inside}" in text
