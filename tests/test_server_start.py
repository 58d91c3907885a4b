"""A server whose start fails part-way releases what it had started."""

from __future__ import annotations

import socket
from typing import Any

import pytest

import fastedge.server
from fastedge.config import parse_config
from fastedge.server import ProxyServer

_MADE: list[_Service] = []


class _Service:
    def __init__(self) -> None:
        self.closed = False
        _MADE.append(self)

    async def aclose(self) -> None:
        self.closed = True


def broken_admin_routes(server: ProxyServer) -> dict[Any, Any]:
    """An admin extension that registers a service, then fails (a missing asset, say)."""
    server.runtime.service("test.broken", _Service)
    raise FileNotFoundError("dashboard asset missing")


async def test_failed_admin_start_closes_the_listener_and_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        fastedge.server,
        "ADMIN_EXTENSIONS",
        ["tests.test_server_start:broken_admin_routes"],
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "access_log": False},
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"o": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [{"prefix": "/", "upstream": "o"}],
        }
    )
    server = ProxyServer(config, sock=sock)
    _MADE.clear()
    with pytest.raises(FileNotFoundError, match="dashboard asset missing"):
        await server.start()
    # The proxy listener was bound before the admin failed: it is closed again.
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
    assert len(_MADE) == 1 and _MADE[0].closed  # runtime services were closed
    assert not server.runtime.services
