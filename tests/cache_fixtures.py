"""Shared pieces of the cache integration tests: the controllable origin process, a
proxy with a cache in front of it, a movable clock and small request helpers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from fastedge.cache.edge import SERVICE, EdgeCache
from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import call, start_server_process, stop_origin


def start_cache_origin() -> tuple[subprocess.Popen[str], int]:
    """``tests/cache_origin.py`` as its own process; the process and its port."""
    return start_server_process("tests.cache_origin", "--port", "0")


def cache_origin_process() -> Iterator[int]:
    """Body of the test modules' ``cache_origin`` fixture: a cache origin shared by the
    module (tests use unique paths), killed at the end."""
    proc, port = start_cache_origin()
    try:
        yield port
    finally:
        stop_origin(proc)


class Clock:
    """Wall-clock time plus a manual offset: ``advance(s)`` ages every stored response
    by ``s`` seconds without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def unique(name: str) -> str:
    """A path no other test (or engine parametrisation) uses."""
    return f"/{name}-{uuid.uuid4().hex[:10]}"


def q(**params: str | int) -> str:
    """A query string for the cache origin (values percent-encoded)."""
    return "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())


@dataclass
class CachedProxy:
    """A started proxy with a cache named ``edge`` on every route."""

    server: ProxyServer
    origin: int
    clock: Clock

    @property
    def port(self) -> int:
        assert self.server._server is not None
        return int(self.server._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def edge(self) -> EdgeCache:
        cache: EdgeCache = self.server.runtime.services[SERVICE].caches["edge"]
        return cache

    async def get(
        self, target: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, Any, bytes]:
        return await call(self.port, method, target, headers)

    async def count(self, target: str) -> int:
        """How many requests for ``target`` reached the origin."""
        return int((await self.origin_log(target))["count"])

    async def origin_log(self, target: str) -> dict[str, Any]:
        status, _, body = await call(self.origin, "GET", "/__count?target=" + quote(target))
        assert status == 200
        data: dict[str, Any] = orjson.loads(body)
        return data

    async def origin_set(self, target: str, **params: str | int) -> None:
        """Override what the origin answers for ``target`` from now on."""
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in params.items())
        status, _, _ = await call(
            self.origin, "GET", "/__set?target=" + quote(target, safe="") + "&" + query
        )
        assert status == 200

    async def wait_for_count(self, target: str, n: int, timeout: float = 10.0) -> None:
        """Poll the origin until ``target`` was requested ``n`` times (bounded)."""
        deadline = time.monotonic() + timeout
        while await self.count(target) < n:
            assert time.monotonic() < deadline, f"origin never saw {n} requests for {target}"
            await asyncio.sleep(0.02)


def cache_doc(
    origin: int,
    engine: str = "fast",
    *,
    cache: dict[str, Any] | None = None,
    admin: bool = False,
    extra: dict[str, Any] | None = None,
    response_timeout: str = "10s",
) -> dict[str, Any]:
    """A config document: everything under ``/`` to the origin through cache ``edge``."""
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
        "admin": {"listen": "127.0.0.1:0"} if admin else {"enabled": False},
        "upstreams": {
            "origin": {
                "targets": [f"http://127.0.0.1:{origin}"],
                "pool": {"response_timeout": response_timeout},
            }
        },
        "caches": {"edge": {"max_bytes": "4MiB", **(cache or {})}},
        "routes": [{"prefix": "/", "upstream": "origin", "cache": "edge"}],
    }
    doc.update(extra or {})
    return doc


@contextlib.asynccontextmanager
async def cached_proxy(
    origin: int,
    engine: str = "fast",
    *,
    admin_token: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[CachedProxy]:
    """Start a proxy with cache ``edge`` (settings in ``cache=``) in front of ``origin``."""
    server = ProxyServer(
        parse_config(cache_doc(origin, engine, admin=admin_token is not None, **kwargs)),
        admin_token=admin_token,
    )
    await server.start()
    proxy = CachedProxy(server, origin, Clock())
    proxy.edge.clock = proxy.clock
    try:
        yield proxy
    finally:
        await server.shutdown(drain_timeout=1)
