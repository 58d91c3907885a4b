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
from fastedge.traffic import in_cohort

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
        {
            "prefix": "/api/products",
            "upstream": "products",
            "strip_prefix": True,
            # Blue-green: [traffic.products] weights, shifted with PUT /traffic/products;
            # users in the new-pricing cohort go to the canary version.
            "traffic": "products",
            "flags": ["new-pricing"],
            # Edge cache: max-age=5, stale-while-revalidate=30 (Cache-Status, Age).
            "cache": "products",
        },
        {"prefix": "/api/auth", "upstream": "auth", "strip_prefix": True},
        {
            # Batching: concurrent GETs within 5 ms go to products as one POST /batch.
            "prefix": "/api/prices",
            "upstream": "products",
            "strip_prefix": True,
            "batch": {"path": "/batch", "max_size": 10, "max_wait": "5ms"},
        },
    ]
    doc: dict[str, Any] = {
        "server": {"listen": listen, "http": http, "access_log": access_log},
        "admin": {"listen": admin} if admin else {"enabled": False},
        "upstreams": {
            name: {"targets": [f"http://127.0.0.1:{ports[name]}"]}
            for name in ("users", "products", "auth", "products-green", "products-canary")
        },
        # "products" is the blue version; the demo starts 100% blue.
        "traffic": {
            "products": {
                "versions": {"blue": "products", "green": "products-green"},
                "weights": {"blue": 100, "green": 0},
            }
        },
        "flags": {
            "new-pricing": {
                "percent": 10,
                # The verified JWT subject on routes with auth, else the X-User-Id header.
                "user": ["claim:sub", "header:X-User-Id"],
                "upstream": "products-canary",
                "header": "X-Feature-Flags",
            }
        },
        # The products service says the same in its Cache-Control; the route imposes it
        # anyway, so the demo's caching does not depend on the service.
        "caches": {
            "products": {
                "max_bytes": "16MiB",
                "override": "max-age=5, stale-while-revalidate=30",
            }
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


def _cohort_user(inside: bool) -> str:
    """A demo user id that is (or is not) in the new-pricing flag's 10% cohort."""
    return next(
        f"user{i}" for i in range(1, 1000) if in_cohort("new-pricing", f"user{i}", 10) == inside
    )


def instructions(gateway: str, admin: str | None, token: str) -> str:
    """What to try, as curl lines."""
    g = f"http://{gateway}"
    lines = [
        "fastedge demo is running. Try:",
        f"  curl -i {g}/api/products                     # X-Version: blue",
        f"  for i in 1 2; do curl -s -o /dev/null -D - {g}/api/products "
        "| grep -iE '^(cache-status|age):'; done   # a miss (stored), then a hit with Age",
        f"  curl -i -H 'X-User-Id: {_cohort_user(True)}' {g}/api/products"
        "   # in the new-pricing 10% cohort: X-Version: canary",
        f"  curl -i -H 'X-User-Id: {_cohort_user(False)}' {g}/api/products   # not in it: blue",
        f"  curl -i {g}/api/users                        # 401: a token is required",
        f'  TOKEN=$(curl -s -X POST {g}/api/auth/token -d \'{{"sub": "alice"}}\' '
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])')",
        f'  curl -i -H "Authorization: Bearer $TOKEN" {g}/api/users/alice',
        f'  for i in $(seq 25); do curl -s -o /dev/null -w "%{{http_code}} " '
        f'-H "Authorization: Bearer $TOKEN" {g}/api/users; done; echo   # 200 x20, then 429',
        f'  MALLORY=$(curl -s -X POST {g}/api/auth/token -d \'{{"sub": "mallory"}}\' '
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])')",
        f'  curl -i -H "Authorization: Bearer $MALLORY" {g}/api/users   # 403: account disabled',
        f"  curl -s {g}/api/prices/1 & curl -s {g}/api/prices/2 & wait; echo"
        "   # one batch call for both",
        f"  curl -i {g}/nowhere                          # 404 JSON",
    ]
    if admin:
        a = f"http://{admin}"
        lines += [
            f"  curl {a}/healthz",
            f"  curl -H 'Authorization: Bearer {token}' {a}/metrics",
            f"  curl -H 'Authorization: Bearer {token}' {a}/config",
            f"  curl -H 'Authorization: Bearer {token}' '{a}/traces?limit=5'   # recent spans",
            f"  curl -H 'Authorization: Bearer {token}' {a}/traffic",
            f"  curl -X PUT -H 'Authorization: Bearer {token}' {a}/traffic/products "
            """-d '{"blue": 90, "green": 10}'   # shift 10% to green, at once, no restart""",
            f"  curl -X PUT -H 'Authorization: Bearer {token}' {a}/flags/new-pricing "
            """-d '{"percent": 20}'   # widen the canary; the first 10% stay in""",
            f"Dashboard (live charts, traffic controls): {a}/?token={token}",
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
        "127.0.0.1",
        DEMO_PORTS if service_ports is None else service_ports,
        product_versions=("blue", "green", "canary"),
        jwt_secret=secret,
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
