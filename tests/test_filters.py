"""The filter phases through the real proxy: sync and async decisions, header edits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from fastedge import config as config_mod
from fastedge import filters
from fastedge.config import parse_config
from fastedge.errors import Kind, ProxyError
from fastedge.filters import FilterContext
from fastedge.server import ProxyServer
from tests.conftest import Client, get


class GateFilter:
    """Test policy: ``mode`` decides; adds a header each way when it lets a request pass."""

    name = "gate"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def on_request(self, ctx: FilterContext) -> Any:
        if ctx.header(b"x-deny") is not None:
            return ProxyError(
                Kind.FORBIDDEN, "gate", detail="denied", headers=[(b"x-why", b"asked")]
            )
        ctx.set_upstream_header(b"x-gate", self.mode.encode())
        ctx.remove_upstream_header(b"x-secret")
        if self.mode == "async":
            return self._later(ctx)
        return None

    async def _later(self, ctx: FilterContext) -> ProxyError | None:
        await asyncio.sleep(0.01)  # stands in for a Redis round trip
        if ctx.header(b"x-deny-later") is not None:
            return ProxyError(Kind.RATE_LIMITED, "gate", headers=[(b"retry-after", b"1")])
        return None

    def on_response(self, ctx: FilterContext, status: int, headers: list[Any]) -> None:
        headers.append((b"x-gate-status", str(status).encode()))


def convert_gate(ctx: Any, path: str, value: object) -> Any:
    if value not in ("sync", "async"):
        return ctx.error(path, "expected 'sync' or 'async'")
    return value


def build_gate(value: Any, route: Any, config: Any, runtime: Any) -> GateFilter:
    return GateFilter(value)


@pytest.fixture
def gate_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(config_mod.EXTENSION_ROUTE_KEYS, "gate", f"{__name__}:convert_gate")
    monkeypatch.setitem(filters.FILTER_BUILDERS, "gate", f"{__name__}:build_gate")
    yield


def gate_config(origin: int, engine: str, mode: str) -> Any:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin}"]}},
            "routes": [
                {"prefix": "/gated", "upstream": "o", "gate": mode, "rewrite": "/echo"},
                {"prefix": "/", "upstream": "o"},
            ],
        }
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_filter_passes_and_edits_headers(
    gate_registered: None, origin_port: int, engine_name: str, mode: str
) -> None:
    server = ProxyServer(gate_config(origin_port, engine_name, mode))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(get("/gated", extra="X-Secret: s3cret\r\n"))
        resp = await client.read_response()
        assert resp.status == 200
        seen = {n.lower(): v for n, v in json.loads(resp.body)["headers"]}
        assert seen["x-gate"] == mode and "x-secret" not in seen
        assert resp.header("x-gate-status") == b"200"
        # ungated routes carry no chain at all
        await client.send(get("/plain"))
        plain = await client.read_response()
        assert plain.status == 200 and plain.header("x-gate-status") is None
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


@pytest.mark.parametrize(
    ("mode", "header", "status"),
    [
        ("sync", "X-Deny", 403),
        ("async", "X-Deny", 403),
        ("async", "X-Deny-Later", 429),
    ],
)
async def test_filter_answers_without_forwarding(
    gate_registered: None,
    origin_port: int,
    engine_name: str,
    mode: str,
    header: str,
    status: int,
) -> None:
    server = ProxyServer(gate_config(origin_port, engine_name, mode))
    await server.start()
    try:
        client = await Client.open(server.port)
        await client.send(get("/gated", extra=f"{header}: 1\r\n"))
        resp = await client.read_response()
        assert resp.status == status
        assert json.loads(resp.body)["status"] == status
        assert resp.header("x-why") == b"asked" or resp.header("retry-after") == b"1"
        # the connection stays usable after a policy answer
        await client.send(get("/gated"))
        assert (await client.read_response()).status == 200
        await client.close()
    finally:
        await server.shutdown(drain_timeout=1)


def test_route_key_errors_carry_the_key_path(gate_registered: None) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        gate_config(1, "fast", "sometimes")
    assert "routes[0].gate: expected 'sync' or 'async'" in str(err.value)
