"""The proxy server: listeners, the current gateway, reload and graceful shutdown.

Lifecycle, as ordered steps (the uvicorn way):

* start: build the gateway from the config → bind the listener(s) → start the admin
  listener → ready.
* reload (``SIGHUP``): load and validate the new config → build a new gateway → swap it in
  (new requests use it; requests in flight finish on the old one) → after the drain
  timeout, close the old gateway's idle upstream connections. An invalid config is
  refused with its errors logged and the old gateway keeps serving.
* shutdown (``SIGTERM``/``SIGINT``): stop accepting → not ready → close idle keep-alive
  connections and mark busy ones to close after their response → wait for in-flight
  requests up to the drain timeout → abort leftovers → close pools, admin, access log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib
import logging
import signal
import socket
import ssl
from typing import Any, Literal, cast
from urllib.parse import parse_qs

from fastedge.admin.api import AdminError, AdminRequest, AdminResponse, admin_token
from fastedge.config import Config, ConfigError, load_config, redacted
from fastedge.filters import Runtime
from fastedge.gateway import Gateway, build_gateway, make_runtime, redis_url
from fastedge.http.engine import Engine
from fastedge.listen import bind_all, bind_numeric
from fastedge.observe.collectors import ServerCollector, process_families
from fastedge.observe.logging import AccessLog
from fastedge.observe.metrics import MetricFamily, Metrics
from fastedge.observe.tracing import Tracer
from fastedge.observe.tracing_config import Tracing, build_tracing
from fastedge.proxy import ClientConnection, ExpressLane
from fastedge.transports import serve_edge, use_edge

log = logging.getLogger("fastedge.server")

# Admin endpoints owned by feature modules: "module:function" taking the ProxyServer and
# returning {(method, path pattern): handler} (see fastedge.admin.api). Imported when the
# admin listener starts, so a feature's module loads only where the admin API runs.
ADMIN_EXTENSIONS: list[str] = [
    "fastedge.admin.dashboard:admin_routes",
    "fastedge.admin.traffic:admin_routes",
    "fastedge.admin.cache:admin_routes",
    "fastedge.admin.upstreams:upstream_routes",
]


class ProxyServer:
    """One fastedge process: a listener, its connections and the current gateway."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        engine: Engine | None = None,
        config_path: str | None = None,
        admin_token: str | None = None,
        sock: socket.socket | None = None,
        http_override: str | None = None,
        reuse_port: bool = False,
    ) -> None:
        # `fastedge run --http X` beats the file's server.http, on every reload too.
        self.http_override = http_override
        config = self._with_overrides(config)
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.engine = engine
        self.connections: set[Any] = set()
        self.per_ip: dict[bytes, int] = {}  # open client connections by address
        self.loop = asyncio.get_running_loop()
        self.access_log = AccessLog(config.server.access_log) if config.server.access_log else None
        self.runtime: Runtime = make_runtime(config, self.metrics)
        # Process-wide like the access log: it owns the exporter's queue and connection.
        self.tracing: Tracing | None = build_tracing(config.sections.get("tracing"), self.metrics)
        self.gateway: Gateway = build_gateway(
            config,
            metrics=self.metrics,
            access_log=self.access_log,
            engine=engine,
            runtime=self.runtime,
            tracer=self.tracer,
        )
        # The express lane's view of the current gateway (fastedge.proxy.ExpressLane).
        self.express_lane = ExpressLane()
        self.express_lane.install(self.gateway)
        self.metrics.add_collector(self.express_lane.collect)
        self._server: asyncio.Server | None = None
        self._sock = sock
        # SO_REUSEPORT on the listener: each `--workers` process binds its own socket to
        # the same address and the kernel spreads new connections (fastedge.workers).
        self._reuse_port = reuse_port
        self._admin: Any = None
        self._admin_token = admin_token
        self._ready = False
        self._stopped = asyncio.Event()
        self._retired: list[Gateway] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.metrics.add_collector(self._pool_gauges)
        self.metrics.add_collector(ServerCollector(self))  # limiter keys, span store size
        self.metrics.add_collector(process_families)

    # --- start --------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the proxy listener and the admin listener; then the server is ready."""
        srv = self.config.server
        ssl_ctx = _server_ssl_context(self.config) if srv.tls else None
        proto = b"https" if ssl_ctx else b"http"

        def factory() -> asyncio.Protocol:
            # A compiled class implementing asyncio.Protocol's methods (see proxy.pxd).
            return cast(asyncio.Protocol, ClientConnection(self, proto))

        # fastedge's own transports where they run (fastedge.transports), else the loop's.
        edge = use_edge(srv.io, tls=ssl_ctx is not None)
        host, port = srv.listen
        owned = self._sock is None  # sockets bound here are closed here if serving fails
        socks: list[socket.socket] | None = None
        if not owned:
            socks = [cast(socket.socket, self._sock)]
        else:
            # Bound here when it can be: create_server would start resolver threads. A
            # name (or several addresses) is resolved once here for our transports, which
            # have no resolver of their own, and left to create_server otherwise.
            sock = bind_numeric(host, port, backlog=srv.backlog, reuse_port=self._reuse_port)
            if sock is not None:
                socks = [sock]
            elif edge:
                socks = bind_all(host, port, backlog=srv.backlog, reuse_port=self._reuse_port)
        if socks is None:
            self._server = await self.loop.create_server(
                factory,
                host,
                port,
                ssl=ssl_ctx,
                backlog=srv.backlog,
                reuse_address=True,
                reuse_port=self._reuse_port or None,
            )
        else:
            try:
                if edge:
                    self._server = serve_edge(self.loop, factory, socks)
                else:
                    self._server = await self.loop.create_server(
                        factory, sock=socks[0], ssl=ssl_ctx, backlog=srv.backlog
                    )
            except BaseException:
                if owned:
                    for s in socks:
                        s.close()
                raise
        try:
            await self._start_admin()
        except BaseException:
            # A half-started server (listener bound, feature services running) must not
            # outlive the failure: release everything, then report it.
            await self.shutdown(drain_timeout=0)
            raise
        self._ready = True

    async def _start_admin(self) -> None:
        admin = self.config.admin
        if admin.listen is not None:
            from fastedge.admin.api import AdminServer

            token = admin_token(admin, log, self._admin_token)
            host, port = admin.listen
            self._admin = AdminServer(
                host,
                port,
                metrics=self.metrics,
                ready=lambda: self._ready,
                config_view=lambda: redacted(self.config),
                token=token,
                extra_routes=self._admin_routes(),
            )
            await self._admin.start()

    @property
    def tracer(self) -> Tracer | None:
        """The process's tracer, or ``None`` without ``[tracing]``."""
        return None if self.tracing is None else self.tracing.tracer

    @property
    def port(self) -> int:
        """The proxy listener's bound port (useful with port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        """The admin listener's bound port, or ``None`` when disabled."""
        return None if self._admin is None else int(self._admin.port)

    # --- reload -------------------------------------------------------------------------
    def reload(self, config: Config | None = None) -> bool:
        """Swap in a new config (or re-read ``config_path``). Returns whether it applied.

        Listener, admin and access-log settings need a restart; the rest (routes,
        upstreams, limits, timeouts, engine) applies to the next request.
        """
        try:
            if config is None:
                if self.config_path is None:
                    log.warning("reload requested but the config did not come from a file")
                    return False
                config = load_config(self.config_path)
            config = self._with_overrides(config)
            if redis_url(config) != self.runtime.redis_url:
                log.warning("[redis] changed: takes effect on restart")
            if config.sections.get("tracing") != self.config.sections.get("tracing"):
                log.warning("[tracing] changed: takes effect on restart")
            new = build_gateway(
                config,
                metrics=self.metrics,
                access_log=self.access_log,
                engine=self.engine,
                runtime=self.runtime,
                tracer=self.tracer,
            )
        except ConfigError as err:
            log.error("reload refused, the running config stays:\n%s", err)
            self.metrics.inc("fastedge_config_reloads_total", (("result", "failure"),))
            return False
        except Exception:
            log.exception("reload failed, the running config stays")
            self.metrics.inc("fastedge_config_reloads_total", (("result", "failure"),))
            return False
        if config.server.listen != self.config.server.listen:
            log.warning("server.listen changed: takes effect on restart")
        old = self.gateway
        self.gateway = new
        self.express_lane.install(new)
        self.config = config
        self._retired.append(old)
        # In-flight requests keep using the old gateway's pools; close them after the drain.
        self.loop.call_later(config.server.drain_timeout, self._retire, old)
        self.metrics.inc("fastedge_config_reloads_total", (("result", "success"),))
        log.info("config reloaded (%d routes)", len(config.routes))
        return True

    def _with_overrides(self, config: Config) -> Config:
        if self.http_override is None or config.server.http == self.http_override:
            return config
        http = cast("Literal['auto', 'h11', 'fast']", self.http_override)  # argparse choices
        server = dataclasses.replace(config.server, http=http)
        return dataclasses.replace(config, server=server)

    def _retire(self, gw: Gateway) -> None:
        if gw in self._retired:
            self._retired.remove(gw)
            task = self.loop.create_task(gw.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # --- shutdown -----------------------------------------------------------------------
    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Graceful stop (see the module docstring for the order)."""
        if drain_timeout is None:
            drain_timeout = self.config.server.drain_timeout
        self._ready = False
        # 1. stop accepting
        if self._server is not None:
            self._server.close()
        # 2. idle connections close now; busy ones after their current response; requests
        #    held back by a filter (a batch window) go out now
        for conn in list(self.connections):
            conn.shutdown()
        for gw in [self.gateway, *self._retired]:
            for route in gw.router.routes:
                if route.filters is not None:
                    route.filters.begin_drain()
        # 3. drain in-flight requests
        deadline = self.loop.time() + drain_timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        # 4. abort what is left
        for conn in list(self.connections):
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abort()
        self.connections.clear()
        if self._server is not None:
            await self._server.wait_closed()
        # 5. upstream pools, admin, access log
        for gw in [self.gateway, *self._retired]:
            await gw.aclose()
        self._retired.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._admin is not None:
            await self._admin.close()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracing is not None:
            await self.tracing.aclose()
        await self.runtime.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`shutdown` completed."""
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        """``SIGHUP`` reloads; ``SIGTERM``/``SIGINT`` shut down gracefully."""
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(
                sig, lambda: self.loop.create_task(self.shutdown()) and None
            )

    def _admin_routes(self) -> dict[tuple[str, str], Any]:
        routes: dict[tuple[str, str], Any] = {("GET", "/traces"): self._traces}
        for spec in ADMIN_EXTENSIONS:
            module, _, name = spec.partition(":")
            provider = getattr(importlib.import_module(module), name)
            for key, handler in provider(self).items():
                if key in routes:
                    raise ValueError(f"admin route {key} registered twice")
                routes[key] = handler
        return routes

    async def _traces(self, request: AdminRequest) -> AdminResponse:
        """Admin ``GET /traces[?limit=N&trace_id=ID]``: the most recent spans."""
        sink = None if self.tracing is None else self.tracing.sink
        if sink is None:
            raise AdminError(404, "no in-process span store ([tracing] memory_spans)")
        query = parse_qs(request.query)
        try:
            limit = int(query.get("limit", ["100"])[0])
        except ValueError:
            raise AdminError(400, "limit must be an integer") from None
        trace_id = query.get("trace_id", [None])[0]
        return AdminResponse.json({"spans": sink.recent(max(1, min(limit, 1000)), trace_id)})

    # --- admission ----------------------------------------------------------------------
    def admit(self, ip: bytes) -> bool:
        """Count a new client connection from ``ip``; False when a limit refuses it
        (``server.max_connections``, ``server.max_connections_per_ip``)."""
        gw = self.gateway
        if len(self.connections) >= gw.max_connections:
            self.metrics.inc("fastedge_connections_refused_total", (("reason", "max_connections"),))
            return False
        count = self.per_ip.get(ip, 0)
        if gw.max_connections_per_ip and count >= gw.max_connections_per_ip:
            self.metrics.inc("fastedge_connections_refused_total", (("reason", "per_ip"),))
            return False
        self.per_ip[ip] = count + 1
        return True

    def release_ip(self, ip: bytes) -> None:
        """A connection admitted by :meth:`admit` closed."""
        count = self.per_ip.get(ip, 0) - 1
        if count > 0:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)

    # --- metrics ------------------------------------------------------------------------
    def _pool_gauges(self) -> list[MetricFamily]:
        samples: list[tuple[str, dict[str, str], float]] = []
        for up in self.gateway.upstreams.values():
            for target in up.targets:
                for state, value in target.pool.stats().items():
                    samples.append(
                        (
                            "fastedge_upstream_connections",
                            {"upstream": up.name, "target": target.name, "state": state},
                            value,
                        )
                    )
        samples.append(("fastedge_client_connections", {}, len(self.connections)))
        return [
            MetricFamily(
                "fastedge_upstream_connections",
                "gauge",
                "Upstream connections per target: idle, active (checked out or connecting), "
                "waiting (requests queued for a connection).",
                samples[:-1],
            ),
            MetricFamily(
                "fastedge_client_connections",
                "gauge",
                "Open client connections.",
                samples[-1:],
            ),
        ]


def _server_ssl_context(config: Config) -> ssl.SSLContext:
    tls = config.server.tls
    assert tls is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.set_alpn_protocols(["http/1.1"])  # HTTP/2 is not spoken here; say so in ALPN
    return ctx


def tune_gc() -> None:
    """Fewer, cheaper cyclic-GC passes for a long-running server process.

    The data path frees almost everything by reference counting, yet each request
    allocates a few dozen containers, so CPython's default young-generation threshold
    (700 allocations) ran a collection every ~20 requests and profiles showed ~15% of
    the time in the collector. Startup objects (modules, config, the router) are moved
    to the permanent generation so full collections stop re-walking them, and the
    young-generation threshold is raised to 10,000; cyclic garbage is still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def serve(
    config: Config, *, config_path: str | None = None, http_override: str | None = None
) -> int:
    """Run a server until SIGTERM/SIGINT; the ``fastedge run`` main loop."""
    server = ProxyServer(config, config_path=config_path, http_override=http_override)
    await server.start()
    tune_gc()
    server.install_signal_handlers()
    host, _ = config.server.listen
    engine = server.gateway.engine.name
    log.info("fastedge listening on %s:%d (engine %s)", host, server.port, engine)
    await server.wait_stopped()
    return 0


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop (asyncio's loop if uvloop is unavailable)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)
    return uvloop.run(coro)
