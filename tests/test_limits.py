"""Connection limits (503 when full, per client address) and keep-alive off."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import Client, get


def limits_config(origin: int, engine: str, **server: Any) -> Any:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False, **server},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin}"]}},
            "routes": [{"prefix": "/", "upstream": "o"}],
        }
    )


async def open_from(port: int, source: str) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return Client(reader, writer)


async def refused_with_503(client: Client) -> bool:
    raw = await client.read_raw_until_close()
    await client.close()
    if not raw.startswith(b"HTTP/1.1 503"):
        return False
    head, _, body = raw.partition(b"\r\n\r\n")
    return b"retry-after: 1" in head.lower() and json.loads(body)["status"] == 503


async def test_max_connections_answers_503_and_frees_slots(
    origin_port: int, engine_name: str
) -> None:
    server = ProxyServer(limits_config(origin_port, engine_name, max_connections=2))
    await server.start()
    try:
        first, second = await Client.open(server.port), await Client.open(server.port)
        await first.send(get("/a"))
        assert (await first.read_response()).status == 200
        await second.send(get("/b"))
        assert (await second.read_response()).status == 200
        third = await Client.open(server.port)
        assert await refused_with_503(third)
        await first.close()
        for _ in range(100):  # the server notices the close asynchronously
            if len(server.connections) < 2:
                break
            await asyncio.sleep(0.01)
        again = await Client.open(server.port)
        await again.send(get("/c"))
        assert (await again.read_response()).status == 200
        await again.close()
        await second.close()
        assert b'fastedge_connections_refused_total{reason="max_connections"} 1' in (
            server.metrics.render()
        )
    finally:
        await server.shutdown(drain_timeout=1)


async def test_max_connections_per_ip(origin_port: int, engine_name: str) -> None:
    server = ProxyServer(limits_config(origin_port, engine_name, max_connections_per_ip=1))
    await server.start()
    try:
        one = await open_from(server.port, "127.0.0.1")
        await one.send(get("/a"))
        assert (await one.read_response()).status == 200
        assert await refused_with_503(await open_from(server.port, "127.0.0.1"))
        # another client address on the loopback network is not affected
        other = await open_from(server.port, "127.0.0.2")
        await other.send(get("/b"))
        assert (await other.read_response()).status == 200
        await other.close()
        await one.close()
        for _ in range(100):
            if not server.per_ip.get(b"127.0.0.1"):
                break
            await asyncio.sleep(0.01)
        assert server.per_ip == {}
    finally:
        await server.shutdown(drain_timeout=1)


async def test_per_ip_slot_is_released_when_a_tunnel_closes(
    origin_port: int, engine_name: str
) -> None:
    server = ProxyServer(limits_config(origin_port, engine_name, max_connections_per_ip=1))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(
            b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        assert server.per_ip == {b"127.0.0.1": 1}  # the tunnel still holds the slot
        await client.close()
        for _ in range(200):
            if not server.per_ip:
                break
            await asyncio.sleep(0.01)
        assert server.per_ip == {}
    finally:
        await server.shutdown(drain_timeout=1)


async def test_keepalive_timeout_zero_turns_keep_alive_off(
    origin_port: int, engine_name: str
) -> None:
    server = ProxyServer(limits_config(origin_port, engine_name, keepalive_timeout=0))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(get("/once"))
        resp = await client.read_response()
        assert resp.status == 200 and resp.header("connection") == b"close"
        assert await client.is_closed()
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


async def test_absolute_form_for_another_host_is_refused(
    origin_port: int, engine_name: str
) -> None:
    server = ProxyServer(limits_config(origin_port, engine_name))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        same = await client.read_response()
        assert same.status == 200 and same.header("x-origin-path") == b"/x"
        await client.send(b"GET http://evil.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        other = await client.read_response()
        assert other.status == 400 and other.header("connection") == b"close"
        assert b"another host" in other.body
        assert await client.is_closed()
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)
