"""Balancing strategies through the real proxy, against several origin processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import Client, get, start_origin, stop_origin


@pytest.fixture(scope="module")
def origins() -> Iterator[list[int]]:
    started = [start_origin() for _ in range(3)]
    try:
        yield [port for _, port in started]
    finally:
        for proc, _ in started:
            stop_origin(proc)


def balanced(ports: list[int], engine: str, **upstream: Any) -> Any:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{p}" for p in ports], **upstream}},
            "routes": [{"prefix": "/", "upstream": "o"}],
        }
    )


async def served_by(port: int, path: str = "/x", extra: str = "") -> int:
    client = await Client.open(port)
    try:
        await client.send(get(path, extra=extra))
        resp = await client.read_response()
        assert resp.status == 200, resp
        return int(resp.header("x-origin-port") or 0)
    finally:
        await client.close()


def inflight(server: ProxyServer) -> list[int]:
    up = server.gateway.upstreams["o"]
    return [up.balancer.inflight(t) for t in up.targets]


async def test_consistent_hash_keeps_a_session_on_one_target(
    origins: list[int], engine_name: str
) -> None:
    server = ProxyServer(
        balanced(origins, engine_name, balance="consistent_hash", hash_key="header:X-Session")
    )
    await server.start()
    try:
        owners = {}
        # 24 sessions: with 6, all landing on one of 3 targets had a chance of ~0.4 %
        # (the targets' ports, and so their ring points, change per run).
        for session in [f"session-{n}" for n in range(24)]:
            seen = {
                await served_by(server.port, extra=f"X-Session: {session}\r\n") for _ in range(4)
            }
            assert len(seen) == 1, (session, seen)  # affinity
            owners[session] = seen.pop()
        assert len(set(owners.values())) > 1  # and yet spread over the targets
        assert inflight(server) == [0, 0, 0]
    finally:
        await server.shutdown(drain_timeout=1)


async def test_least_conn_avoids_the_busy_target(origins: list[int], engine_name: str) -> None:
    server = ProxyServer(balanced(origins[:2], engine_name, balance="least_conn"))
    await server.start()
    try:
        slow = asyncio.create_task(served_by(server.port, "/slow?ms=400"))
        for _ in range(100):  # wait until the slow request is in flight
            if sum(inflight(server)) == 1:
                break
            await asyncio.sleep(0.01)
        busy = inflight(server).index(1)
        fast = await served_by(server.port)
        assert fast == origins[1 - busy]
        assert await slow == origins[busy]
        assert inflight(server) == [0, 0]
    finally:
        await server.shutdown(drain_timeout=1)


async def test_p2c_ewma_serves_and_releases_its_counts(
    origins: list[int], engine_name: str
) -> None:
    server = ProxyServer(balanced(origins, engine_name, balance="p2c_ewma"))
    await server.start()
    try:
        ports = await asyncio.gather(*(served_by(server.port) for _ in range(20)))
        assert set(ports) <= set(origins)
        assert inflight(server) == [0, 0, 0]
    finally:
        await server.shutdown(drain_timeout=1)


async def test_counts_are_released_when_the_upstream_fails(
    origins: list[int], engine_name: str
) -> None:
    server = ProxyServer(balanced(origins[:2], engine_name, balance="least_conn"))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(get("/close"))  # the origin closes without answering: 502
        assert (await client.read_response()).status == 502
        await client.close()
        assert inflight(server) == [0, 0]
    finally:
        await server.shutdown(drain_timeout=1)


async def test_consistent_hash_on_a_cookie(origins: list[int], engine_name: str) -> None:
    server = ProxyServer(
        balanced(origins, engine_name, balance="consistent_hash", hash_key="cookie:sid")
    )
    await server.start()
    try:
        cookie = "Cookie: theme=dark; sid=abc123; lang=en\r\n"
        seen = {await served_by(server.port, extra=cookie) for _ in range(5)}
        assert len(seen) == 1
    finally:
        await server.shutdown(drain_timeout=1)


async def served_on(client: Client, path: str = "/x") -> int:
    """One request on an open keep-alive connection; the port of the origin that answered."""
    await client.send(get(path))
    resp = await client.read_response()
    assert resp.status == 200, resp
    return int(resp.header("x-origin-port") or 0)


@pytest.mark.parametrize(
    "upstream",
    [
        {},
        {"health_check": {"path": "/x", "interval": "60s"}},
        {"breaker": {}, "outlier": {}, "retry": {}},
        # Idle least_conn breaks its ties by smooth round robin: the same alternation.
        {"balance": "least_conn"},
        {"balance": "least_conn", "health_check": {"path": "/x", "interval": "60s"}},
    ],
    ids=["plain", "health-checked", "breaker-outlier-retry", "least_conn", "least_conn-checked"],
)
async def test_round_robin_alternates_while_the_pool_warms(
    origins: list[int], upstream: dict[str, Any]
) -> None:
    """The express lane picks a target, finds no idle connection to it (a cold pool) and
    leaves the request to the general path, which picks again: the lane must take its
    pick back. Else the two picks per request put every request on the same target of
    two (the lane always choosing the cold one, the general path the warm one)."""
    server = ProxyServer(balanced(origins[:2], "fast", **upstream))
    await server.start()
    client = await Client.open(server.port)
    try:
        ports = [await served_on(client) for _ in range(8)]
    finally:
        await client.close()
        await server.shutdown(drain_timeout=1)
    assert ports == [origins[0], origins[1]] * 4
    assert "balance" not in upstream or inflight(server) == [0, 0]  # released, once
    lane = server.express_lane
    # Requests 3 to 8 found a warm connection to their target: the lane served them.
    assert (int(lane.served), int(lane.promoted)) == (6, 0)
