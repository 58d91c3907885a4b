"""A gateway: everything one config generation needs to serve requests.

Built once per config load (startup and every reload) and never mutated afterwards; a
client connection picks up the current gateway at the start of each request, so a reload
applies to new requests while in-flight ones finish on the gateway they started with.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import random
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from fastedge.config import Config, TargetConfig, UpstreamConfig
from fastedge.errors import Kind, ProxyError
from fastedge.filters import Response, Runtime, build_route_filters
from fastedge.http.engine import Engine, Limits, get_engine
from fastedge.observe.logging import AccessLog
from fastedge.observe.metrics import Metrics
from fastedge.observe.tracing import Tracer
from fastedge.router import Route, Router
from fastedge.upstream.balancer import SmoothRoundRobin
from fastedge.upstream.balancers import ConsistentHash, LeastConnections, PowerOfTwoEWMA
from fastedge.upstream.pool import ConnectionPool

if TYPE_CHECKING:
    from fastedge.proxy import Exchange, UpstreamConnection


class Target:
    """One upstream server and its connection pool."""

    __slots__ = (
        "authority",
        "host",
        "name",
        "pool",
        "port",
        "server_hostname",
        "ssl",
        "upstream_name",
        "weight",
    )

    def __init__(
        self, cfg: TargetConfig, upstream: UpstreamConfig, ssl_ctx: ssl.SSLContext | None
    ) -> None:
        self.name = cfg.url
        self.upstream_name = upstream.name
        self.host = cfg.host
        self.port = cfg.port
        self.weight = cfg.weight
        default_port = 443 if cfg.scheme == "https" else 80
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self.authority = (host if cfg.port == default_port else f"{host}:{cfg.port}").encode()
        self.ssl = ssl_ctx
        self.server_hostname = (upstream.tls_server_name or cfg.host) if ssl_ctx else None
        pool = upstream.pool
        self.pool: ConnectionPool[UpstreamConnection] = ConnectionPool(
            cfg.url,
            self.connect,
            max_connections=pool.max_connections,
            idle_timeout=pool.idle_timeout,
            wait_timeout=pool.wait_timeout,
            connect_timeout=pool.connect_timeout,
        )

    async def connect(self) -> UpstreamConnection:
        """Open one connection to this target (TLS when the target is https)."""
        from fastedge.proxy import UpstreamConnection

        loop = asyncio.get_running_loop()
        # The protocol classes are compiled (Cython cdef classes cannot subclass
        # asyncio.Protocol); they implement its methods, which is all the loop needs.
        _, proto = await loop.create_connection(
            lambda: cast(asyncio.Protocol, UpstreamConnection(self)),
            self.host,
            self.port,
            ssl=self.ssl,
            server_hostname=self.server_hostname,
        )
        return cast("UpstreamConnection", proto)


class Upstream:
    """A named group of targets with a balancer."""

    __slots__ = (
        "balance",
        "balancer",
        "hash_key",
        "host_header",
        "keyed",
        "load_aware",
        "name",
        "resilient",
        "response_timeout",
        "retry_statuses",
        "targets",
    )

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.name = cfg.name
        ctx = _client_ssl_context(cfg) if any(t.scheme == "https" for t in cfg.targets) else None
        self.targets = [Target(t, cfg, ctx if t.scheme == "https" else None) for t in cfg.targets]
        weights = [t.weight for t in self.targets]
        self.balance = cfg.balance
        self.hash_key = cfg.hash_key
        # round_robin needs no per-request bookkeeping; the others count requests in
        # flight (acquire at send, release when the exchange lets go of the connection).
        self.load_aware = cfg.balance != "round_robin"
        self.keyed = cfg.balance == "consistent_hash"  # candidates depend on a request key
        self.balancer: Any
        if cfg.balance == "least_conn":
            self.balancer = LeastConnections(self.targets, weights)
        elif cfg.balance == "p2c_ewma":
            self.balancer = PowerOfTwoEWMA(self.targets, random.Random())
        elif cfg.balance == "consistent_hash":
            self.balancer = ConsistentHash(self.targets, weights, name=_target_name)
        else:
            self.balancer = SmoothRoundRobin(self.targets, weights)
        self.host_header = cfg.host_header.encode() if cfg.host_header else None
        self.response_timeout = cfg.pool.response_timeout
        # Health checks, breakers, priority groups or retries configured: the proxy then
        # asks candidates()/admit()/report()/retry_delay() (see the resilience contract).
        self.resilient = False
        self.retry_statuses: frozenset[int] = frozenset()

    # --- the resilience contract (used by the proxy when ``resilient`` is true) ---------
    def record_request(self) -> None:
        """One original request arrived (the retry budget's denominator)."""

    def candidates(self, key: bytes | None) -> list[Target]:
        """Targets for one request in preference order, only those available (healthy,
        not ejected, breaker not open), the highest-priority group with an available
        target first. ``key`` is the consistent-hash key when ``keyed``. Empty: none."""
        if self.keyed and key is not None:
            return list(self.balancer.candidates(key))
        first = self.balancer.pick()
        return list(self.balancer.failover_order(first))

    def admit(self, target: Target) -> int | None:
        """Ask ``target``'s breaker: a generation to pass to :meth:`report`, or ``None``
        when it refuses (open, or no half-open probe slot left)."""
        return 0

    def report(
        self,
        target: Target,
        generation: int,
        ok: bool,
        *,
        status: int = 0,
        connect_error: bool = False,
        timeout: bool = False,
    ) -> None:
        """The outcome of one attempt on ``target`` (breaker, outlier detection)."""

    def abandon(self, target: Target, generation: int) -> None:
        """The client left before the attempt on ``target`` had an outcome."""

    def retry_delay(
        self,
        method: bytes,
        attempt: int,
        *,
        status: int = 0,
        connect_error: bool = False,
        timeout: bool = False,
    ) -> float | None:
        """Seconds to wait before another attempt, or ``None`` for no retry.

        ``attempt`` counts the attempts made so far. All flags false means the attempt
        failed after the request may have reached the upstream (reset, bad response):
        retry only idempotent methods. Returning a delay spends retry budget.
        """
        return None

    def unavailable(self) -> ProxyError | Response | Upstream:
        """The answer when no target is available: a 503 error (with ``Retry-After``),
        a static response, or a fallback upstream to send the request to."""
        return ProxyError(
            Kind.UNAVAILABLE,
            "upstream",
            detail=f"no available target in upstream {self.name!r}",
            headers=[(b"retry-after", b"1")],
        )

    def close(self) -> None:
        """Close every target's idle connections."""
        for target in self.targets:
            target.pool.close()


def _target_name(target: Target) -> str:
    return target.name


def _client_ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.tls_ca)
    if not cfg.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(eq=False)
class Gateway:
    """Runtime state of one config generation (see module docstring)."""

    config: Config
    loop: asyncio.AbstractEventLoop
    engine: Engine
    limits: Limits
    router: Router[Upstream]
    upstreams: dict[str, Upstream]
    metrics: Metrics
    access_log: AccessLog | None
    via: bytes
    header_timeout: float
    keepalive_timeout: float
    body_timeout: float
    max_requests_per_connection: int
    max_connections: int
    max_connections_per_ip: int
    tracer: Tracer | None = None

    @property
    def access_log_enabled(self) -> bool:
        """Whether access-log records are written."""
        return self.access_log is not None

    def log_access(self, record: dict[str, Any]) -> None:
        """Write one access-log record (a timestamp is added here)."""
        if self.access_log is not None:
            record["ts"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
            self.access_log.log(record)

    def response_timeout_for(self, ex: Exchange) -> float:
        """Upstream response (read) timeout for this exchange."""
        up = ex.upstream
        return up.response_timeout if up is not None else 60.0

    def close(self) -> None:
        """Close idle upstream connections (a reload retired this gateway)."""
        for up in self.upstreams.values():
            up.close()

    async def aclose(self) -> None:
        """Close pools and release what the routes' filters hold."""
        self.close()
        for route in self.router.routes:
            if route.filters is not None:
                await route.filters.aclose()


def build_gateway(
    config: Config,
    *,
    metrics: Metrics,
    access_log: AccessLog | None,
    engine: Engine | None = None,
    runtime: Runtime | None = None,
    tracer: Tracer | None = None,
) -> Gateway:
    """Resolve a validated :class:`Config` into a ready :class:`Gateway` (needs a loop)."""
    loop = asyncio.get_running_loop()
    if runtime is None:
        runtime = make_runtime(config, metrics)
    srv = config.server
    upstreams = {name: Upstream(cfg) for name, cfg in config.upstreams.items()}
    routes = [
        Route(
            name=r.name or r.prefix,
            prefix=r.prefix,
            upstream=upstreams[r.upstream],
            strip_prefix=r.strip_prefix,
            rewrite=r.rewrite,
            host=r.host,
            methods=r.methods,
            filters=build_route_filters(r, config, runtime),
        )
        for r in config.routes
    ]
    return Gateway(
        config=config,
        loop=loop,
        engine=engine or get_engine(srv.http),
        limits=Limits(
            max_head_bytes=srv.max_head_bytes,
            max_uri_bytes=srv.max_uri_bytes,
            max_headers=srv.max_headers,
            max_body_bytes=srv.max_body_bytes,
        ),
        router=Router(routes),
        upstreams=upstreams,
        metrics=metrics,
        access_log=access_log,
        via=b"1.1 " + srv.proxy_name.encode(),
        header_timeout=srv.header_timeout,
        keepalive_timeout=srv.keepalive_timeout,
        body_timeout=srv.body_timeout,
        max_requests_per_connection=srv.max_requests_per_connection,
        max_connections=srv.max_connections,
        max_connections_per_ip=srv.max_connections_per_ip,
        tracer=tracer,
    )


def make_runtime(config: Config, metrics: Metrics) -> Runtime:
    """Process-wide services for ``config`` (the Redis client settings from ``[redis]``)."""
    section = config.sections.get("redis")
    timeout = getattr(section, "timeout", None)
    return Runtime(
        metrics=metrics,
        redis_url=redis_url(config),
        redis_timeout=timeout if isinstance(timeout, float) else 0.25,
    )


def redis_url(config: Config) -> str | None:
    """The ``[redis]`` URL when the section is configured."""
    section = config.sections.get("redis")
    url = getattr(section, "url", None)
    return url if isinstance(url, str) else None
