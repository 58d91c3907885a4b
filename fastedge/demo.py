"""``fastedge demo``: the gateway in front of three demo services, all in one process.

The demo is the embedded default and the first thing a newcomer sees (DESIGN.md §7):
gateway on 127.0.0.1:8080, admin on 127.0.0.1:9901, the users, products and auth
services on 9001-9003, each routed by prefix with the prefix stripped. Each feature
adds itself here, so the demo always shows what fastedge can do.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Mapping
from typing import Any

from fastedge.config import Config, parse_config
from fastedge.demo_services import DEMO_PORTS, DemoServices, start_demo_services
from fastedge.server import ProxyServer, tune_gc

GATEWAY = "127.0.0.1:8080"
ADMIN = "127.0.0.1:9901"


def demo_config(
    ports: Mapping[str, int],
    *,
    listen: str = GATEWAY,
    admin: str | None = ADMIN,
    http: str = "auto",
    access_log: str | bool = "-",
) -> Config:
    """The demo gateway's config for services listening on ``ports``."""
    doc: dict[str, Any] = {
        "server": {"listen": listen, "http": http, "access_log": access_log},
        "admin": {"listen": admin} if admin else {"enabled": False},
        "upstreams": {
            name: {"targets": [f"http://127.0.0.1:{ports[name]}"]}
            for name in ("users", "products", "auth")
        },
        "routes": [
            {"prefix": f"/api/{name}", "upstream": name, "strip_prefix": True}
            for name in ("users", "products", "auth")
        ],
    }
    return parse_config(doc, source=None)


def instructions(gateway: str, admin: str | None, token: str) -> str:
    """What to try, as curl lines."""
    g = f"http://{gateway}"
    lines = [
        "fastedge demo is running. Try:",
        f"  curl -i {g}/api/users",
        f"  curl -i {g}/api/users/alice",
        f"  curl -i {g}/api/products",
        f"  curl -i {g}/api/products/1",
        f'  curl -i -X POST {g}/api/auth/token -d \'{{"sub": "alice"}}\'',
        f"  curl -i {g}/nowhere                       # 404 JSON",
    ]
    if admin:
        a = f"http://{admin}"
        lines += [
            f"  curl {a}/healthz",
            f"  curl -H 'Authorization: Bearer {token}' {a}/metrics",
            f"  curl -H 'Authorization: Bearer {token}' {a}/config",
        ]
    lines.append("Ctrl-C stops it.")
    return "\n".join(lines)


async def start_demo(
    *,
    gateway: str = GATEWAY,
    admin: str | None = ADMIN,
    service_ports: Mapping[str, int] | None = None,
    http: str = "auto",
    access_log: str | bool = "-",
    admin_token: str | None = None,
) -> tuple[ProxyServer, DemoServices, str]:
    """Start the services and the gateway; returns them and the admin token."""
    services = await start_demo_services(
        "127.0.0.1", DEMO_PORTS if service_ports is None else service_ports
    )
    token = admin_token or os.environ.get("FASTEDGE_ADMIN_TOKEN") or secrets.token_urlsafe(18)
    try:
        config = demo_config(
            services.ports, listen=gateway, admin=admin, http=http, access_log=access_log
        )
        server = ProxyServer(config, admin_token=token)
        await server.start()
    except BaseException:
        await services.close()
        raise
    return server, services, token


async def run_demo(*, http: str = "auto") -> int:
    """The ``fastedge demo`` command: run until SIGINT/SIGTERM."""
    server, services, token = await start_demo(http=http)
    server.install_signal_handlers()
    tune_gc()
    print(instructions(GATEWAY, ADMIN, token), flush=True)
    try:
        await server.wait_stopped()
    finally:
        await services.close()
    await asyncio.sleep(0)
    return 0
