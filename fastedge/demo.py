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
# The demo auth service signs HS256 tokens with this secret; the gateway reads it from
# the environment like any HS secret (never inline in config).
SECRET_ENV = "FASTEDGE_DEMO_JWT_SECRET"


def demo_config(
    ports: Mapping[str, int],
    *,
    listen: str = GATEWAY,
    admin: str | None = ADMIN,
    http: str = "auto",
    access_log: str | bool = "-",
) -> Config:
    """The demo gateway's config for services listening on ``ports``."""
    routes: list[dict[str, Any]] = [
        {
            # Zero trust: a verified token, an active account, 20 requests per 10 s each.
            "prefix": "/api/users",
            "upstream": "users",
            "strip_prefix": True,
            "auth": "demo",
            "rate_limit": "per_user",
        },
        {"prefix": "/api/products", "upstream": "products", "strip_prefix": True},
        {"prefix": "/api/auth", "upstream": "auth", "strip_prefix": True},
    ]
    doc: dict[str, Any] = {
        "server": {"listen": listen, "http": http, "access_log": access_log},
        "admin": {"listen": admin} if admin else {"enabled": False},
        "upstreams": {
            name: {"targets": [f"http://127.0.0.1:{ports[name]}"]}
            for name in ("users", "products", "auth")
        },
        "auth": {
            "demo": {
                "algorithms": ["HS256"],
                "max_age": "5m",
                "keys": [{"algorithm": "HS256", "secret_env": SECRET_ENV}],
                # The users service knows who is disabled (mallory): a cached HTTP check.
                "account_check": {
                    "url": f"http://127.0.0.1:{ports['users']}/{{sub}}",
                    "disabled_field": "disabled",
                    "cache_ttl": "30s",
                },
            }
        },
        "rate_limits": {
            "per_user": {
                "algorithm": "sliding_window",
                "limit": 20,
                "window": "10s",
                "key": "claim:sub",
                "headers": "always",
            }
        },
        # Every demo request is traced into the in-process store behind GET /traces.
        "tracing": {"sample_ratio": 1.0, "memory_spans": 1000},
        "routes": routes,
    }
    return parse_config(doc, source=None)


def instructions(gateway: str, admin: str | None, token: str) -> str:
    """What to try, as curl lines."""
    g = f"http://{gateway}"
    lines = [
        "fastedge demo is running. Try:",
        f"  curl -i {g}/api/products                     # X-Version: blue",
        f"  curl -i {g}/api/users                        # 401: a token is required",
        f'  TOKEN=$(curl -s -X POST {g}/api/auth/token -d \'{{"sub": "alice"}}\' '
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])')",
        f'  curl -i -H "Authorization: Bearer $TOKEN" {g}/api/users/alice',
        f'  for i in $(seq 25); do curl -s -o /dev/null -w "%{{http_code}} " '
        f'-H "Authorization: Bearer $TOKEN" {g}/api/users; done; echo   # 200 x20, then 429',
        f'  MALLORY=$(curl -s -X POST {g}/api/auth/token -d \'{{"sub": "mallory"}}\' '
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])')",
        f'  curl -i -H "Authorization: Bearer $MALLORY" {g}/api/users   # 403: account disabled',
        f"  curl -i {g}/nowhere                          # 404 JSON",
    ]
    if admin:
        a = f"http://{admin}"
        lines += [
            f"  curl {a}/healthz",
            f"  curl -H 'Authorization: Bearer {token}' {a}/metrics",
            f"  curl -H 'Authorization: Bearer {token}' {a}/config",
            f"  curl -H 'Authorization: Bearer {token}' '{a}/traces?limit=5'   # recent spans",
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
    secret = os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
    os.environ[SECRET_ENV] = secret  # read by the gateway's [auth.demo] key
    services = await start_demo_services(
        "127.0.0.1", DEMO_PORTS if service_ports is None else service_ports, jwt_secret=secret
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
