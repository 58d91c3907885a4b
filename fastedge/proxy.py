"""The data path: client connections, upstream connections and one exchange between them.

Everything here is callback-driven ``asyncio.Protocol`` code (no streams, no task per
request on the common path): on uvloop that is what keeps the per-request cost near the
cost of parsing. The shape of one exchange:

1. the client's bytes go through the engine's :class:`~fastedge.http.engine.ServerCodec`;
   events are queued on the connection and pumped in order (pipelining);
2. a request head is routed, its headers rewritten, and an upstream connection taken
   from the target's pool — synchronously when an idle one exists, otherwise in a task
   that connects (or waits for a free slot);
3. request body pieces are relayed as they arrive (buffered only until the upstream
   connection exists); response events are relayed back through the server codec;
4. both directions have flow control: a full write buffer on one side pauses reading on
   the other;
5. when the response ended and the request was fully read, the upstream connection goes
   back to the pool (if reusable), the exchange is logged, and the next queued request
   starts.

Failures become a :class:`~fastedge.errors.ProxyError` answered through
:func:`~fastedge.errors.error_response` when no response byte was sent yet; after that,
the client connection is closed so a truncated body is never presented as complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Coroutine
from time import time_ns
from typing import TYPE_CHECKING, Any, cast

from fastedge.core import PrefixRouter
from fastedge.errors import Kind, ProxyError, error_response
from fastedge.filters import FilterChain, FilterContext, Response
from fastedge.filters.express import ExpressContext, admit
from fastedge.http.engine import (
    END,
    ClientCodec,
    ProtocolError,
    RequestEvent,
    RequestHead,
    ResponseHead,
    ServerCodec,
)
from fastedge.http.headers import (
    new_request_id,
    rewrite_request_headers,
    rewrite_response_headers,
)
from fastedge.observe.metrics import MetricFamily
from fastedge.observe.tracing import (
    ParentBased,
    Span,
    SpanKind,
    StatusCode,
    TraceIdRatio,
    Tracer,
)
from fastedge.upstream.pool import PooledBase

if TYPE_CHECKING:
    # Aliased: the compiled build cimports the class under its own name (proxy.pxd).
    from fastedge._core import ExpressRequest as _ExpressRequest
    from fastedge._core import new_root_trace, scan_request, scan_response_start
    from fastedge._core.express_py import monotonic
else:
    # Not through the fastedge._core selector: a compiled proxy (a .so is imported
    # whatever FASTEDGE_NO_EXTENSIONS says) is typed against the compiled scanners'
    # ExpressRequest (proxy.pxd), so it must use them; only a pure-Python build, which
    # has no compiled scanners, takes the twin.
    try:
        from fastedge._core.express import (
            monotonic,
            new_root_trace,
            scan_request,
            scan_response_start,
        )
    except ImportError:
        from fastedge._core.express_py import (
            monotonic,
            new_root_trace,
            scan_request,
            scan_response_start,
        )

if TYPE_CHECKING:
    from fastedge.gateway import Gateway, Target, Upstream
    from fastedge.observe.metrics import RouteStats  # noqa: F401 (in a type comment)
    from fastedge.router import Route

log = logging.getLogger("fastedge.proxy")

# Request body bytes held while the upstream connection is being opened; past this the
# client is paused (the same size as nginx's default proxy buffers: 8 x 8 KiB).
PENDING_BODY_LIMIT = 64 * 1024
# Bytes a client may send ahead (pipelining) while its current request waits for the
# response; past this we stop reading from it.
PIPELINE_AHEAD_LIMIT = 64 * 1024

# Reasons a client transport's reading is paused (a bit each; reading resumes at 0).
_PAUSE_UPSTREAM = 1  # the upstream's write buffer is full (request body backpressure)
_PAUSE_PIPELINE = 2  # too much sent ahead of the current request
_PAUSE_PENDING = 4  # body buffered while connecting

_TRACE_FIELDS = frozenset({b"traceparent", b"tracestate"})

# The client's Host, dropped on the lane for an upstream with its own host_header.
_HOST_ONLY = (b"host",)
# With a body, content-length moves too: Exchange.start appends it after the Host.
_HOST_AND_LENGTH = (b"host", b"content-length")


_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_ERROR_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


# The event loop keeps only weak references to tasks; the data path's few tasks (connect,
# await a filter) are held here until they finish so none is collected mid-flight.
_TASKS: set[asyncio.Task[None]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
    task = loop.create_task(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


def _cookie(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` from the request's Cookie fields (RFC 6265 §5.4)."""
    for field, value in headers:
        if field != b"cookie":
            continue
        for pair in value.split(b";"):
            key, sep, val = pair.strip().partition(b"=")
            if sep and key == name:
                return val
    return None


def raw_error(status: int, message: str, request_id: bytes, *, retry_after: int = 0) -> bytes:
    """A complete ``Connection: close`` error response built without a codec.

    Used when the request could not be parsed, so no codec state describes it.
    """
    import orjson

    body = orjson.dumps({"error": message, "status": status, "request_id": request_id.decode()})
    reason = _ERROR_REASONS.get(status, b"Error")
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: %s\r\n" % request_id,
            b"retry-after: %d\r\n" % retry_after if retry_after else b"",
            b"connection: close\r\n\r\n",
            body,
        )
    )


class UpstreamConnection(PooledBase):
    """One connection to an upstream target; carries one exchange at a time."""

    # transport and _dead are PooledBase's, with is_usable().
    __slots__ = ("codec", "exchange", "idle_since", "read_paused", "target", "xclient")

    def __init__(self, target: Target) -> None:
        super().__init__()  # no transport yet, not dead
        self.target = target
        # The client connection whose express request this connection carries.
        self.xclient: ClientConnection | None = None
        self.exchange: Exchange | None = None
        self.codec: ClientCodec | None = None  # the last exchange's codec, for recycling
        self.idle_since = 0.0
        self.read_paused = False

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        xc = self.xclient
        if xc is not None:
            try:
                xc.express_response(data)
            except Exception:
                log.exception("internal error while relaying an express response")
                if xc.xreq is not None:
                    xc.express_promote()
                xc.internal_error()
            return
        ex = self.exchange
        if ex is not None:
            try:
                ex.on_upstream_data(data)
            except Exception:
                log.exception("internal error while relaying a response")
                ex.conn.internal_error()
        else:
            # Bytes while idle: the upstream broke framing; never reuse this connection.
            self._dead = True
            self.close()

    def eof_received(self) -> bool:
        self._dead = True
        if self.xclient is not None:
            self.xclient.express_promote()
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_lost(None)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        if self.xclient is not None:
            self.xclient.express_promote()
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_lost(exc)
        else:
            self.target.pool.discard(self)

    def pause_writing(self) -> None:
        if self.xclient is not None:
            self.xclient.express_promote()
        ex = self.exchange
        if ex is not None:
            ex.conn.set_pause(_PAUSE_UPSTREAM, True)

    def resume_writing(self) -> None:
        if self.xclient is not None:
            self.xclient.express_promote()
        ex = self.exchange
        if ex is not None:
            ex.conn.set_pause(_PAUSE_UPSTREAM, False)

    # --- pool protocol (is_usable: PooledBase's) -----------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._dead = True
        if self.transport is not None:
            self.transport.close()

    def resume_reading(self) -> None:
        """Undo a pause made for client backpressure."""
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()


class ExpressRoute:
    """A route as the express lane reads it per request, in C fields: what
    :class:`~fastedge.router.Route` holds that the lane needs, its policy chain's express
    entry points, and its cell of request metrics. The lane's own router (in
    :class:`ExpressSettings`) matches to these, so a request costs no attribute lookups
    on the route. The upstream is read through at each request, never copied: its
    balancer and targets change at runtime (health checks, traffic shifts)."""

    __slots__ = (
        "answer",
        "chain",
        "name",
        "plain",
        "policies",
        "route",
        "stats",
        "upstream",
        "view",
    )

    def __init__(self, route, stats):  # type: (Route[Upstream], RouteStats) -> None
        # Types as comments: annotations here would clash with proxy.pxd.
        self.route = route
        self.name = route.name
        self.upstream = route.upstream
        # The upstream's C view, updated in place as the upstream changes (never stale).
        self.view = route.upstream.lane_view
        chain = route.filters
        self.chain = chain
        # The chain's policy filters when the lane may decide them (auth, limits): its
        # express_admit is admit() over them, which the lane calls itself, as a C call.
        self.policies = None  # type: tuple[Any, ...] | None
        if chain is not None and chain.express_admit is not None:
            self.policies = chain.filters
        # The chain's lone answer from memory (a cache hit): FilterChain.express.
        self.answer = chain.express if chain is not None else None
        # No strip_prefix or rewrite: the request-target goes upstream unchanged.
        self.plain = not route.strip_prefix and route.rewrite_bytes is None
        self.stats = stats

    def forward_target(self, path: bytes, query: bytes) -> bytes:
        """:meth:`Route.forward_target <fastedge.router.Route.forward_target>`."""
        if self.plain:
            return path + query if query else path
        target: bytes = self.route.forward_target(path, query)
        return target


class ExpressSettings:
    """One config generation's settings as the express lane reads them per request, in
    C fields. An express request keeps the settings it started with, as a general-path
    exchange keeps its gateway across a reload."""

    __slots__ = (
        "access_log",
        "enabled",
        "gateway",
        "horizon",
        "keepalive",
        "keepalive_off",
        "loop_time",
        "match",
        "max_body",
        "max_head",
        "max_headers",
        "max_requests",
        "max_uri",
        "metrics",
        "trace_bound",
        "tracer",
        "via",
    )

    def __init__(self, gw: Gateway) -> None:
        self.gateway = gw
        self.enabled = gw.express
        self.via = gw.via
        self.max_head = gw.limits.max_head_bytes
        self.max_uri = gw.limits.max_uri_bytes
        self.max_headers = gw.limits.max_headers
        body_cap = gw.limits.max_body_bytes
        self.max_body = -1 if body_cap is None else body_cap  # -1: no limit
        # The shortest upstream response timeout: how soon an express request may time out.
        self.horizon = gw.express_horizon
        self.max_requests = gw.max_requests_per_connection  # 0: unlimited
        self.keepalive = gw.keepalive_timeout
        self.keepalive_off = not gw.keepalive_timeout
        self.loop_time: Any = gw.loop.time
        self.access_log = gw.access_log_enabled
        self.metrics = gw.metrics
        # A compiled PrefixRouter of the generation's routes (added as Router adds them,
        # so it matches alike) whose match gives (ExpressRoute, prefix) or None.
        router = PrefixRouter()
        for route in gw.router.routes:
            plan = ExpressRoute(route, gw.metrics.route(route.name))
            router.add(route.prefix, plan, host=route.host, methods=route.methods)
        self.match: Any = router.match
        # With [tracing], express requests carry an unsampled span's context; the
        # sampler's decision for a new trace id (ParentBased(TraceIdRatio), as
        # tracing_config builds it) says which ones the general path must record.
        self.tracer = gw.tracer
        self.trace_bound: Any = None
        if gw.tracer is not None:
            sampler = gw.tracer.sampler
            if isinstance(sampler, ParentBased) and isinstance(sampler.root, TraceIdRatio):
                self.trace_bound = sampler.root.bound
            else:  # another sampler: no traced request takes the lane
                self.enabled = False


class ExpressLane:
    """A server's express lane: the current generation's :class:`ExpressSettings`
    (installed at start and by every reload) and how many requests the lane took and
    handed on, counted in C fields and read at scrape time."""

    __slots__ = ("promoted", "served", "settings")

    def __init__(self) -> None:
        self.settings: ExpressSettings | None = None
        self.served = 0  # requests taken on the express lane (sent upstream or answered)
        self.promoted = 0  # of those, handed to the general path after being sent

    def install(self, gw: Gateway) -> None:
        """Serve new requests with ``gw`` (start-up and every reload)."""
        self.settings = ExpressSettings(gw)

    @property
    def enabled(self) -> bool:
        """Whether new requests may take the lane (the current config allows it)."""
        return self.settings is not None and self.settings.enabled

    def collect(self) -> list[MetricFamily]:
        """The lane's counters as metric families."""
        return [
            MetricFamily(
                "fastedge_express_requests_total",
                "counter",
                "Requests taken on the express lane (scanned in C; sent upstream, or "
                "answered by a lone filter from memory such as a fresh cache hit).",
                [("fastedge_express_requests_total", {}, float(self.served))],
            ),
            MetricFamily(
                "fastedge_express_promoted_total",
                "counter",
                "Express requests handed to the general path after being sent (a response "
                "in pieces or not plainly framed, a timeout, the client sending more).",
                [("fastedge_express_promoted_total", {}, float(self.promoted))],
            ),
        ]


class ClientConnection:
    """One client connection: parses requests, runs exchanges in order, writes responses."""

    __slots__ = (
        "_deadline_at",
        "_deadline_handle",
        "_pumping",
        "admitted",
        "ahead_bytes",
        "client_ip",
        "closing",
        "codec",
        "eof",
        "exchange",
        "gateway",
        "head_started",
        "lane",
        "last_read",
        "paused",
        "proto",
        "queue",
        "requests",
        "server",
        "transport",
        "write_paused",
        "xadmit",
        "xbody",
        "xclose",
        "xdue",
        "xfull",
        "xgen",
        "xleft",
        "xreq",
        "xreuse",
        "xroute",
        "xsent",
        "xset",
        "xspan",
        "xstart",
        "xstatus",
        "xtarget",
        "xtrace",
        "xup",
    )

    def __init__(self, server: Any, proto: bytes) -> None:
        self.server = server  # fastedge.server.ProxyServer: current gateway + conn registry
        self.proto = proto
        self.gateway: Gateway = server.gateway
        self.transport: asyncio.Transport | None = None
        self.codec: ServerCodec = self.gateway.engine.server(self.gateway.limits)
        self.exchange: Exchange | None = None
        self.queue: deque[RequestEvent] = deque()
        self.client_ip = b"-"
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.admitted = False  # counted by server.admit (per-IP bookkeeping)
        self.eof = False
        self.requests = 0
        self.ahead_bytes = 0
        self.last_read = 0.0
        self._pumping = False
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        # When the first byte of a not-yet-parsed request head arrived (0: none pending).
        # The header timeout counts from here, not from the last byte, so a head trickled
        # one byte at a time (slowloris) still times out.
        self.head_started = 0.0
        # The express request in flight (see _express): the scanned request, its route,
        # target and upstream connection, when it started (monotonic) and was sent
        # (loop time), and its response deadline (loop time).
        lane = getattr(server, "express_lane", None)
        self.lane: ExpressLane | None = lane if isinstance(lane, ExpressLane) else None
        self.xset: ExpressSettings | None = None  # the settings it started with
        self.xreq: _ExpressRequest | None = None
        self.xroute: ExpressRoute | None = None
        self.xtarget: Target | None = None
        self.xup: UpstreamConnection | None = None
        self.xstart = 0.0
        self.xsent = 0.0
        self.xdue = 0.0
        self.xgen = -1  # the breaker generation of a resilient upstream's attempt
        self.xfull = False  # its upstream is not plain round robin (express_plain)
        # A Content-Length body being relayed (_express_more): the bytes still to come,
        # and what its head said (status, upstream reusable, body length, client close).
        self.xleft = 0
        self.xstatus = 0
        self.xreuse = False
        self.xbody = 0
        self.xclose = False
        # What its policy filters decided (fastedge.filters.ExpressContext), and its
        # unsampled span's (trace id, span id), when the route and config have them.
        self.xadmit: ExpressContext | None = None
        self.xspan: tuple[str, str] | None = None
        # A new trace id the lane drew and sampled: the general path's span takes it.
        self.xtrace: str | None = None

    # --- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        if not self.server.admit(self.client_ip):
            # Over a connection limit: a clear 503 and close (DESIGN §6), nothing read.
            self.closing = True
            self.transport.write(
                raw_error(503, "too many connections", new_request_id(), retry_after=1)
            )
            self.transport.close()
            return
        self.admitted = True
        self.server.connections.add(self)
        self.last_read = self.server.loop.time()
        self.rearm()

    def data_received(self, data: bytes) -> None:
        lane = self.lane.settings if self.lane is not None else None
        # The loop's clock, through the settings' bound method when there are settings
        # (the same loop; no attribute lookups on the server).
        self.last_read = now = lane.loop_time() if lane is not None else self.server.loop.time()
        if self.xreq is not None:
            # Bytes while an express request is in flight (pipelining, an early next
            # request): the general path takes over, in order.
            self.express_promote()
        elif (
            self.exchange is None
            and lane is not None
            and lane.enabled
            and not self.queue
            and not self.paused
            and not self.write_paused  # a client that does not read gets nothing more
            and not self.closing
            and self.codec.express_ready()
            and self._express(data, now)
        ):
            return
        ex = self.exchange
        if (ex is None or ex.request_complete) and not self.head_started:
            self.head_started = now  # bytes of a new request head: its clock starts
            if ex is None:
                self.rearm()
        if ex is not None and ex.request_complete:
            # Pipelined bytes for a later request: bound what we accept ahead.
            self.ahead_bytes += len(data)
            if self.ahead_bytes > PIPELINE_AHEAD_LIMIT:
                self.set_pause(_PAUSE_PIPELINE, True)
        events = self.codec.feed(data)
        if events:
            self.queue.extend(events)
            self.pump()

    def eof_received(self) -> bool:
        self.eof = True
        if self.xreq is not None:
            self.express_promote()
        events = self.codec.feed(b"")
        if events:
            self.queue.extend(events)
            self.pump()
        # Nothing in flight: close now. Otherwise keep the half-closed connection open;
        # the client may still read the response it is owed.
        return self.exchange is not None or bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.xreq is not None:
            self.express_promote()
        self.server.connections.discard(self)
        if self.admitted:
            self.admitted = False
            self.server.release_ip(self.client_ip)
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        ex = self.exchange
        if ex is not None:
            ex.abort_client_gone()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.xreq is not None:
            self.express_promote()
        ex = self.exchange
        if ex is not None and ex.up is not None and ex.up.transport is not None:
            ex.up.read_paused = True
            ex.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.exchange
        if ex is not None and ex.up is not None:
            ex.up.resume_reading()

    # --- request pump -------------------------------------------------------------------
    def pump(self) -> None:
        """Process queued events in order until the current exchange must wait."""
        if self._pumping:
            return
        self._pumping = True
        try:
            q = self.queue
            while q:
                ex = self.exchange
                if ex is None:
                    t = self.transport
                    if t is None or t.is_closing():
                        q.clear()  # closed after the last answer: serve nothing more
                        return
                    ev = q.popleft()
                    if type(ev) is RequestHead:
                        self._start(ev)
                    elif isinstance(ev, ProtocolError):
                        self._protocol_error(ev)
                        q.clear()
                        return
                    # (bytes/END without a head cannot come from a codec; ignore)
                elif not ex.request_complete:
                    ev = q.popleft()
                    if type(ev) is bytes:
                        ex.on_request_body(ev)
                    elif ev is END:
                        ex.on_request_end()
                    elif isinstance(ev, ProtocolError):
                        ex.on_request_error(ev)
                else:
                    break  # wait for the response to this request
        except Exception:
            # A bug must cost one request, not the connection's silence: log it, answer
            # 500 if nothing was sent, and close.
            log.exception("internal error while handling a request")
            self.internal_error()
        finally:
            self._pumping = False

    def internal_error(self) -> None:
        """Answer 500 to the current exchange (or close) after an unexpected exception."""
        self.queue.clear()
        ex = self.exchange
        t = self.transport
        if ex is not None and not ex.finished:
            ex.keep_alive = False
            try:
                ex.fail(ProxyError(Kind.INTERNAL, "proxy", detail="internal error"))
                return
            except Exception:
                log.exception("internal error while answering an internal error")
        if t is not None:
            t.abort()

    def _start(self, head: RequestHead) -> None:
        # A reload swaps server.gateway; the next request on a kept connection uses it.
        self.gateway = self.server.gateway
        self.requests += 1
        self.ahead_bytes = 0
        self.head_started = 0.0
        self.exchange = ex = Exchange(self, head)
        if head.has_body:
            self.rearm()  # the body idle timeout applies from now
        ex.begin()

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        """The response was written and the request fully read (or abandoned)."""
        self.exchange = None
        self.set_pause(_PAUSE_PIPELINE | _PAUSE_PENDING | _PAUSE_UPSTREAM, False)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        limit = self.gateway.max_requests_per_connection
        if not keep_alive or self.closing or (limit and self.requests >= limit):
            transport.close()
            return
        if self.eof and not self.queue:  # the client half-closed and is owed nothing more
            transport.close()
            return
        self.last_read = self.server.loop.time()
        more = self.codec.next_cycle()
        if more:
            self.queue.extend(more)
        if self.queue:
            self.pump()
        if self.exchange is None:
            self.rearm()  # idle again: keep-alive (or a pending head's) timeout

    def must_close(self) -> bool:
        """Whether the response being started must be the connection's last: shutting
        down, or the per-connection request limit is reached (said in the response, so
        the client reconnects cleanly instead of finding the connection gone)."""
        gw = self.gateway
        limit = gw.max_requests_per_connection
        return (
            self.closing
            or bool(limit and self.requests >= limit)
            or not gw.keepalive_timeout  # keepalive_timeout = 0: keep-alive off, as nginx
        )

    def _protocol_error(self, err: ProtocolError) -> None:
        """Malformed input: answer (400/413/414/431/501) and close; nothing forwarded."""
        gw = self.gateway
        gw.metrics.inc("fastedge_client_errors_total", (("status", str(err.status)),))
        rid = new_request_id()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw_error(err.status, err.reason, rid))
            self.transport.close()
        gw.log_access(
            {
                "request_id": rid.decode(),
                "client": self.client_ip.decode(),
                "status": err.status,
                "error": err.reason,
            }
        )

    # --- flow control and timers ------------------------------------------------------
    def set_pause(self, bits: int, on: bool) -> None:
        """Pause reading while any reason bit is set; resume when none is."""
        before = self.paused
        after = (before | bits) if on else (before & ~bits)
        if after == before or self.transport is None:
            self.paused = after
            return
        self.paused = after
        if before == 0:
            self.transport.pause_reading()
        elif after == 0:
            self.transport.resume_reading()
            self.rearm()  # reading again: the body idle timeout applies again

    def _due(self) -> float:
        """The client-side deadline for the connection's current state (0: none).

        * a request head has started arriving: ``header_timeout`` from its first byte;
        * idle between requests: ``keepalive_timeout`` from the last response (before the
          first request, ``header_timeout`` from the connect);
        * reading a request body: ``body_timeout`` from the last byte read (an idle
          timeout, as nginx's client_body_timeout), unless reading is paused by us;
        * otherwise (waiting for the upstream, writing the response): none; the
          upstream's own timeout applies.
        """
        gw = self.gateway
        if self.xreq is not None:
            return self.xdue  # the express request's upstream response deadline
        ex = self.exchange
        if ex is None:
            if self.head_started:
                return self.head_started + gw.header_timeout
            if self.requests:
                return self.last_read + gw.keepalive_timeout
            return self.last_read + gw.header_timeout
        if not ex.request_complete and not ex.response_started and not self.paused:
            return self.last_read + gw.body_timeout
        return 0.0

    def rearm(self) -> None:
        """Make sure the timer fires no later than the current state's deadline.

        Called on state changes; cheap when the armed timer is already early enough
        (a later deadline is handled by re-checking when the timer fires).
        """
        due = self._due()
        if not due:
            return
        lane = self.lane.settings if self.lane is not None else None
        if lane is not None and lane.enabled and self.xreq is None:
            # Fire no later than an express request starting now could time out, so that
            # starting one (every request, on a busy connection) never re-arms the timer;
            # firing early only re-checks (once per response timeout, per connection).
            due = min(due, self.server.loop.time() + lane.horizon)
        handle = self._deadline_handle
        if handle is not None:
            if self._deadline_at <= due + 0.001:
                return
            handle.cancel()
        self._deadline_at = due
        self._deadline_handle = self.server.loop.call_at(due, self._check_deadline)

    def _check_deadline(self) -> None:
        """Act on an expired client-side deadline, or re-arm for the current one."""
        self._deadline_handle = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        due = self._due()
        if not due:
            return  # no client-side deadline now; the next state change re-arms
        if self.server.loop.time() < due:
            self.rearm()
            return
        if self.xreq is not None:
            # The upstream did not answer in time: the general path answers 504.
            late = self.express_promote()
            late._cancel_timer()
            late._check_timeout()
            return
        ex = self.exchange
        if ex is None:
            transport.close()  # idle, or a head that never completed: close quietly
            return
        ex.fail(
            ProxyError(Kind.BAD_REQUEST, "client", detail="request body timeout"),
            status_override=408,
        )

    # --- the express lane -----------------------------------------------------------
    # The commonest exchange, served without the codecs, the Exchange object or the
    # header lists: a GET/HEAD head that arrives whole on an idle connection, for a
    # route without filters (or only policy filters) with an idle pooled connection,
    # answered by a response whose head arrives whole: a Content-Length body relayed as
    # it comes (_express_more), or a whole chunked body re-framed as the general path
    # frames it. fastedge._core.express scans and rewrites both in C, byte for byte what
    # the general path would send (tests/core/test_express.py,
    # tests/test_express_proxy.py). Anything else, at any point, goes to the general
    # path: before the request is sent the bytes are simply parsed by the codec instead;
    # after, express_promote() builds the Exchange the general path would have built at
    # that point (request sent, or response head and some of the body written) and
    # hands it whatever happened.
    def _express(self, data: bytes, now: float) -> bool:
        """Serve ``data``, read at loop time ``now``, on the express lane; False: it is not
        for the express lane."""
        assert self.lane is not None
        lane = self.lane.settings
        assert lane is not None
        gw = lane.gateway
        req = scan_request(
            data,
            self.client_ip,
            self.proto,
            lane.via,
            lane.max_head,
            lane.max_uri,
            lane.max_headers,
            lane.max_body,
        )
        if req is None:
            return False
        found = lane.match(req.path.decode("latin-1"), req.host.decode("latin-1"), req.method_name)
        if found is None:
            return False
        plan = found[0]
        chain = plan.chain
        tracer = lane.tracer
        if chain is not None and plan.policies is None:
            # A lone filter answering from memory (a fresh cache hit), or the general path
            # (a traced request's span would need it too).
            answer = plan.answer
            if answer is None or tracer is not None or not req.get_or_head or req.body_length:
                # (A cache answers GET and HEAD; any other method may invalidate it.)
                return False
            reply = answer(req, self.proto, plan.upstream)
            if reply is None:
                return False
            self._express_answer(lane, req, plan, reply)
            return True
        upstream = plan.upstream
        view = plan.view
        if not view.express:
            return False
        extra = None
        span_ids = None
        if tracer is not None:
            if req.traced:
                return False  # the caller's trace context: the general path continues it
            trace_id, span_id, extra = new_root_trace(lane.trace_bound)
            # From here, a request the lane gives up on keeps the trace id drawn (and so
            # the sampler's decision for it): the general path's span takes it. Drawing
            # again would sample what the lane turns down at p + (1 - p) * p.
            self.xtrace = trace_id
            if span_id is None:
                return False  # sampled: the general path records it, under this id
            span_ids = (trace_id, span_id)
        # The attempt's breaker generation on a resilient upstream (-1: not resilient),
        # what Exchange._attempt_resilient records for its first attempt.
        gen = -1
        tier = None  # a resilient upstream's ResilientTier, when the lane asked it
        # The commonest upstream (round robin, nothing else) costs one attribute lookup;
        # the others (``full``) are read field by field.
        full = not view.plain
        if not full:
            target = view.balancer.pick()
        elif not view.resilient:
            if view.keyed:  # Exchange.forward: the key's target, with bounded load
                target = view.balancer.candidates(self._express_key(upstream, req))[0]
            else:
                target = view.balancer.pick()
        else:
            tier = view.tier
            if tier is not None:
                # One tier of round robin: express_attempt's choice, in C (with health
                # checks only, express_pick's: every target admitted, generation 0).
                attempt = tier.attempt()
            else:
                attempt = upstream.express_attempt(
                    self._express_key(upstream, req) if view.keyed else None
                )
            if attempt is None:
                return False  # nothing available: a fallback, a static answer or a 503
            target, gen = attempt
        pool = target.pool
        conn = pool.take_idle()
        if conn is None:
            upstream.express_decline(target, gen)
            return False  # the general path connects (in a task) or waits
        admitted = None
        drop = None
        if chain is not None:
            # Policy filters (auth from its verification cache, a local rate limit).
            admitted = admit(plan.policies, req, self.client_ip, plan.name)
            if admitted is None:
                pool.give_back(conn, True)
                upstream.express_decline(target, gen)
                return False
            drop = admitted.drop
            extra = admitted.extra if extra is None else extra + admitted.extra
        if full:
            host_field = view.host_field
            if host_field is not None:
                # The upstream's own Host (Exchange.start): the client's is dropped and
                # ours follows the request id (then the content-length, when there is
                # one), before the trace context and the filters' fields.
                length = req.length_field
                if length is None:
                    drop = _HOST_ONLY if drop is None else drop + _HOST_ONLY
                else:
                    host_field = host_field + length
                    drop = _HOST_AND_LENGTH if drop is None else drop + _HOST_AND_LENGTH
                extra = host_field if extra is None else host_field + extra
            if gen > -1 and view.verdicts:
                # The retry budget's denominator (forward()).
                if tier is not None:
                    tier.record_request()
                else:
                    upstream.record_request()
            if view.load_aware:  # in flight from now (Exchange.attach)
                view.balancer.acquire(target)
        self.xfull = full
        transport = conn.transport
        self.xtrace = None
        self.lane.served += 1
        self.gateway = gw
        self.xset = lane
        self.requests += 1
        self.head_started = 0.0
        self.xreq = req
        self.xroute = plan
        self.xtarget = target
        self.xup = conn
        self.xadmit = admitted
        self.xspan = span_ids
        self.xgen = gen
        conn.xclient = self
        self.xstart = monotonic()
        self.xsent = now
        self.xdue = now + view.response_timeout
        transport.write(req.compose(plan.forward_target(req.path, req.query), drop, extra))
        if self._deadline_handle is None or self._deadline_at > self.xdue + 0.001:
            self.rearm()
        return True

    def _express_key(self, upstream: Upstream, req: _ExpressRequest) -> bytes:
        """A consistent-hash upstream's key on the lane (Exchange._affinity_key): the
        client's address, or the path (``Upstream.express`` admits no other key)."""
        if upstream.hash_key == "ip":
            return self.client_ip
        return req.target.partition(b"?")[0]

    def express_response(self, data: bytes) -> None:
        """Upstream bytes for the express request in flight."""
        if self.xleft:
            self._express_more(data)
            return
        req = self.xreq
        lane = self.xset
        assert req is not None and lane is not None
        # must_close(), from the settings the request started with.
        close = (
            not req.keep_alive
            or self.closing
            or lane.keepalive_off
            or (lane.max_requests > 0 and self.requests >= lane.max_requests)
        )
        found = scan_response_start(data, req.is_head, lane.via, req.request_id, close)
        if found is None:
            self.express_promote().on_upstream_data(data)
            return
        status, reusable, body_length, out, left = found
        up = self.xup
        target = self.xtarget
        plan = self.xroute
        assert up is not None and target is not None and plan is not None
        if self.xgen > -1:
            view = plan.view
            if view.verdicts:
                upstream = plan.upstream
                if status in upstream.retry_statuses:
                    # A status the retry policy may retry: the general path decides
                    # (report, budget, another attempt) exactly as for its own attempt.
                    self.express_promote().on_upstream_data(data)
                    return
                # The attempt's verdict (Exchange.on_upstream_data: a 5xx is a failure).
                tier = view.tier
                if tier is not None:
                    tier.report(target, self.xgen, status)
                else:
                    upstream.report(target, self.xgen, status < 500, status=status)
        if left:
            # The head and the body so far: the rest is relayed as it arrives
            # (_express_more). Set before the write: a client that does not read makes
            # the write promote the request in mid-body (pause_writing).
            self.xleft = left
            self.xstatus = status
            self.xreuse = reusable
            self.xbody = body_length
            self.xclose = close
            self._express_heard(lane, plan)
            transport = self.transport
            assert transport is not None
            transport.write(out)
            return
        self._express_end(req, lane, plan, up, target, status, reusable, body_length, out, close)

    def _express_heard(self, lane: ExpressSettings, plan: ExpressRoute) -> None:
        """The upstream sent part of a body now: its last activity, from which its
        response timeout counts again (an idle timeout, as the general path's)."""
        self.xsent = now = lane.loop_time()
        self.xdue = now + plan.view.response_timeout

    def _express_more(self, data: bytes) -> None:
        """More of a ``Content-Length`` body the lane is relaying: written as it comes;
        its last byte ends the exchange. Bytes after it (nobody asked for them) are not
        relayed, and the upstream connection is not reused (the codec's ``stray``)."""
        lane = self.xset
        plan = self.xroute
        req = self.xreq
        assert lane is not None and plan is not None and req is not None
        left = self.xleft
        n = len(data)
        transport = self.transport
        assert transport is not None
        if n < left:
            self.xleft = left - n  # before the write, which may promote (see above)
            self._express_heard(lane, plan)
            transport.write(data)
            return
        self.xleft = 0
        up = self.xup
        target = self.xtarget
        assert up is not None and target is not None
        self._express_end(
            req,
            lane,
            plan,
            up,
            target,
            self.xstatus,
            self.xreuse and n == left,
            self.xbody,
            data if n == left else data[:left],
            self.xclose or self.closing,
        )

    # A type comment, not annotations: the .pxd gives status and body_length C types,
    # which Cython's reading of an ``int`` annotation (a Python int) would contradict.
    def _express_end(self, req, lane, plan, up, target, status, reusable, body_length, out, close):  # type: (_ExpressRequest, ExpressSettings, ExpressRoute, UpstreamConnection, Target, int, bool, int, bytes, bool) -> None
        """Write ``out``, the response's last bytes, and end the express exchange: the
        upstream connection back to its pool, metrics, the access log, then the client
        connection idle again (or closed)."""
        span_ids = self.xspan
        # Done before the write: the write may call pause_writing (a client that does
        # not read), which must find no express request left to promote.
        self.xreq = None
        self.xset = None
        self.xup = None
        self.xtarget = None
        self.xroute = None
        self.xadmit = None
        self.xspan = None
        up.xclient = None
        transport = self.transport
        assert transport is not None  # a lost client promotes the request first
        transport.write(out)
        pool = target.pool
        pool.give_back(up, reusable)
        elapsed = monotonic() - self.xstart
        if self.xfull:
            view = plan.view
            if view.load_aware:  # the exchange's end (Exchange._release_load)
                balancer = view.balancer
                balancer.release(target)
                if view.p2c:
                    balancer.observe(target, elapsed)
        plan.stats.observe(req.method_name, status, elapsed, elapsed)
        if lane.access_log:
            self._express_log(
                req,
                plan,
                target.name,
                status,
                body_length,
                elapsed,
                elapsed,
                span_ids[0] if span_ids is not None else None,
            )
        if close:
            transport.close()
            return
        self._express_idle(lane)

    def _express_answer(
        self, lane: ExpressSettings, req: _ExpressRequest, plan: ExpressRoute, reply: Any
    ) -> None:
        """Write a filter's whole answer (an :class:`~fastedge.filters.ExpressReply`) to
        an express request, exactly as the general path's Exchange._answer would."""
        start = monotonic()
        assert self.lane is not None
        self.lane.served += 1
        self.gateway = lane.gateway
        self.requests += 1
        self.head_started = 0.0
        status, head, body = reply
        close = (
            not req.keep_alive
            or self.closing
            or lane.keepalive_off
            or (lane.max_requests > 0 and self.requests >= lane.max_requests)
        )
        # The codec's framing: no body for HEAD, 1xx, 204 and 304.
        send_body = not req.is_head and status >= 200 and status != 204 and status != 304
        transport = self.transport
        assert transport is not None
        transport.write(
            b"".join(
                (
                    head,
                    b"x-request-id: ",
                    req.request_id,
                    b"\r\nconnection: close\r\n\r\n" if close else b"\r\n\r\n",
                    body if send_body else b"",
                )
            )
        )
        elapsed = monotonic() - start
        plan.stats.observe(req.method_name, status, elapsed, None)
        if lane.access_log:
            self._express_log(req, plan, None, status, len(body), elapsed, None, None)
        if close:
            transport.close()
            return
        self._express_idle(lane)

    def _express_idle(self, lane: ExpressSettings) -> None:
        """The connection is idle again after an express response: the keep-alive
        deadline counts from now. The armed timer usually fires before it already (it is
        capped at an express request's deadline), which needs no re-arming."""
        now = self.last_read = lane.loop_time()
        if self._deadline_handle is None or self._deadline_at > now + lane.keepalive:
            self.rearm()

    def _express_log(
        self,
        req: _ExpressRequest,
        plan: ExpressRoute,
        target: str | None,
        status: int,
        bytes_out: int,
        elapsed: float,
        upstream_s: float | None,
        trace_id: str | None,
    ) -> None:
        """The access-log line Exchange._log writes for the same exchange."""
        self.gateway.log_access(
            {
                "request_id": req.request_id.decode(),
                "client": self.client_ip.decode(),
                "method": req.method_name,
                "path": req.target.decode("latin-1"),
                "route": plan.name,
                "upstream": plan.upstream.name,
                "target": target,
                "status": status,
                "bytes_in": req.body_length,
                "bytes_out": bytes_out,
                "duration_ms": round(elapsed * 1000, 3),
                "upstream_ms": round(upstream_s * 1000, 3) if upstream_s else None,
                "error": None,
                "trace_id": trace_id,
            }
        )

    def express_promote(self) -> Exchange:
        """Turn the express request in flight into the Exchange the general path would
        have made at this point (request sent, nothing received), and return it."""
        req = self.xreq
        plan = self.xroute
        target = self.xtarget
        up = self.xup
        assert req is not None and plan is not None and target is not None and up is not None
        route = plan.route
        self.xreq = None
        self.xset = None
        self.xroute = None
        self.xtarget = None
        self.xup = None
        admitted = self.xadmit
        span_ids = self.xspan
        self.xadmit = None
        self.xspan = None
        up.xclient = None
        if self.lane is not None:
            self.lane.promoted += 1
        gw = self.gateway
        events = self.codec.feed(req.data)
        head = events[0] if events else None
        if type(head) is not RequestHead:  # the scanner and llhttp disagree: a bug
            raise RuntimeError(f"express request not parsed alike: {events!r}")
        upstream = route.upstream
        self.exchange = ex = Exchange(self, head)
        ex.start = self.xstart
        ex.route = route
        ex.upstream = upstream
        ex.target = target
        ex.request_id = req.request_id
        ex.up_target = plan.forward_target(req.path, req.query)
        headers, _, _ = rewrite_request_headers(
            head.headers, client_ip=self.client_ip, proto=self.proto, via=gw.via
        )
        # The id the upstream was sent is the express one (the last field appended).
        headers[-1] = (b"x-request-id", req.request_id)
        if upstream.host_header is not None:  # as Exchange.start: ours replaces the client's
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.append((b"host", upstream.host_header))
        if head.content_length is not None:
            # Re-emitted as Exchange.start does: a retry resends these fields.
            headers.append((b"content-length", b"%d" % head.content_length))
        if span_ids is not None:
            # The unsampled span whose context the upstream was sent (Exchange.start).
            ex.span = span = Span(
                head.method.decode("latin-1"),
                trace_id=span_ids[0],
                span_id=span_ids[1],
                parent_span_id=None,
                kind=SpanKind.SERVER,
                start_ns=time_ns(),
                recording=False,
            )
            headers += Tracer.inject(span)
        if admitted is not None:  # what the policy filters did to the request (Exchange.start)
            if admitted.drop:
                headers = [h for h in headers if h[0] not in admitted.drop]
            headers.extend(admitted.fields)
        ex.up_headers = headers
        ex.request_complete = True
        ex.request_sent = True
        ex.bytes_in = req.body_length  # the body went with the head
        ex.reused = True
        ex.up = up
        up.exchange = ex
        ex.cc = up.codec = gw.engine.client(head.method, None)
        ex.up_start = self.xstart
        left = self.xleft
        if left:
            # In mid-body: the lane wrote the head and some of the body. The codecs are
            # brought to where the general path's would be (their output, already sent,
            # discarded): the upstream's expects exactly the bytes still to come, with
            # the upstream's keep-alive verdict; the client's writes that many more.
            self.xleft = 0
            status = self.xstatus
            ex.cc.feed(
                b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n"
                % (status, left, b"" if self.xreuse else b"connection: close\r\n")
            )
            self.codec.response_head(
                status, b"", [(b"content-length", b"%d" % left)], close=self.xclose
            )
            ex.response_started = True
            ex.status = status
            ex.bytes_out = self.xbody - left
            if self.xclose:
                ex.keep_alive = False
        if upstream.load_aware:
            ex.load_target = target  # counted in flight since the lane sent the request
        if self.xgen > -1:
            # A resilient upstream: the attempt _attempt_resilient would have recorded,
            # so the general path reports, abandons or retries it as its own (in
            # mid-body it was reported at the head, as on_upstream_data does).
            ex.attempt = 1
            ex.gen = self.xgen
            ex.gen_target = None if left else target
            ex.tried = [target]
        ex.last_up_activity = self.xsent
        loop = gw.loop
        ex._timer = loop.call_at(self.xdue, ex._check_timeout)
        return ex

    def shutdown(self) -> None:
        """Graceful stop: close now when idle, else after the current response."""
        self.closing = True
        if self.exchange is None and self.xreq is None and self.transport is not None:
            self.transport.close()


class Exchange:
    """One request/response pair and its per-request context."""

    __slots__ = (
        "_timer",
        "attempt",
        "bytes_in",
        "bytes_out",
        "cc",
        "conn",
        "error",
        "fctx",
        "finished",
        "gen",
        "gen_target",
        "head",
        "hooks",
        "keep_alive",
        "last_up_activity",
        "load_target",
        "needs_host",
        "pending",
        "pending_bytes",
        "request_complete",
        "request_id",
        "request_sent",
        "response_done",
        "response_started",
        "retried",
        "reused",
        "route",
        "span",
        "start",
        "status",
        "target",
        "tried",
        "up",
        "up_headers",
        "up_span",
        "up_start",
        "up_target",
        "upstream",
    )

    def __init__(self, conn: ClientConnection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.start = monotonic()
        self.route: Route[Upstream] | None = None
        self.upstream: Upstream | None = None
        self.target: Target | None = None
        self.up: UpstreamConnection | None = None
        self.cc: ClientCodec | None = None
        self.request_id = b""
        self.up_target = b""
        self.up_headers: list[tuple[bytes, bytes]] = []
        self.pending: list[bytes] | None = None
        self.pending_bytes = 0
        self.request_complete = False
        self.request_sent = False
        self.response_started = False
        self.response_done = False
        self.keep_alive = True
        self.needs_host = False
        self.finished = False
        self.retried = False
        self.reused = False
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: str | None = None
        self.fctx: FilterContext | None = None
        self.span: Span | None = None
        self.up_start = 0.0
        self.last_up_activity = 0.0
        self.load_target: Target | None = None  # counted in flight by the balancer
        self._timer: asyncio.TimerHandle | None = None
        # Filters that watch the response body (a cache fill); None: no hooks to call.
        self.hooks: FilterChain | None = None
        # Resilient upstreams: attempts made, the breaker generation of the attempt in
        # flight and its target (None once its outcome was reported), targets tried.
        self.attempt = 0
        self.gen = 0
        self.gen_target: Target | None = None
        self.tried: list[Target] | None = None
        self.up_span: Span | None = None  # the upstream call's child span

    # --- request side -----------------------------------------------------------------
    def begin(self) -> None:
        """Route the request and start forwarding it."""
        head = self.head
        gw = self.conn.gateway
        target = head.target
        qpos = target.find(b"?")
        if qpos < 0:
            path, query = target, b""
        else:
            path, query = target[:qpos], target[qpos:]
        host: bytes | None = None
        if not path.startswith(b"/"):
            # absolute-form (RFC 9112 §3.2.2): route on its path and authority; fastedge
            # only ever forwards to configured upstreams, so this is never an open proxy.
            lower = path[:8].lower()
            if lower.startswith(b"http://") or lower.startswith(b"https://"):
                rest = path.split(b"://", 1)[1]
                slash = rest.find(b"/")
                host = rest if slash < 0 else rest[:slash]
                path = b"/" if slash < 0 else rest[slash:]
            elif head.method == b"OPTIONS" and path == b"*":
                path = b"/"
            else:
                self.request_id = new_request_id()
                self.keep_alive = False  # malformed: answer 400 and close (DESIGN §6)
                self.fail(
                    ProxyError(
                        Kind.METHOD_NOT_ALLOWED if head.method == b"CONNECT" else Kind.BAD_REQUEST,
                        "client",
                        detail="unsupported request-target form",
                    )
                )
                return
        headers, rid, host_hdr = rewrite_request_headers(
            head.headers,
            client_ip=self.conn.client_ip,
            proto=self.conn.proto,
            via=gw.via,
            keep_upgrade=head.upgrade is not None,
        )
        self.request_id = rid
        tracer = gw.tracer
        if tracer is not None:
            self._start_span(tracer, headers, host_hdr)
        if host is None:
            host = host_hdr
        elif host_hdr and host.lower() != host_hdr.lower():
            # An absolute-form target naming another host than Host: a forward-proxy
            # request. fastedge is never an open proxy; refuse rather than guess which
            # one to believe (RFC 9112 §3.2.2 would let a server prefer the target's).
            self.keep_alive = False
            self.fail(
                ProxyError(
                    Kind.BAD_REQUEST,
                    "client",
                    detail="absolute-form target for another host",
                )
            )
            return
        route = gw.router.match(
            path.decode("latin-1"),
            host.decode("latin-1") if host else None,
            head.method.decode("latin-1"),
        )
        if route is None:
            self.fail(ProxyError(Kind.NO_ROUTE, "router", detail="no route for this request"))
            return
        self.route = route
        upstream = route.upstream
        self.upstream = upstream
        self.up_target = route.forward_target(path, query)
        if upstream.host_header is not None:
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.append((b"host", upstream.host_header))
        elif not host_hdr:
            # An HTTP/1.0 client may omit Host; HTTP/1.1 to the upstream requires one
            # (RFC 9112 §3.2). Use the target's authority, as nginx's $proxy_host does.
            self.needs_host = True
        if head.content_length is not None:
            headers.append((b"content-length", b"%d" % head.content_length))
        elif head.chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        span = self.span
        if span is not None:
            if span.recording:  # unsampled spans only carry the context onwards
                # OTel HTTP conventions: name spans by route template, never by raw path.
                span.name = f"{head.method.decode('latin-1')} {route.name}"
                span.set_attribute("http.route", route.name)
                span.set_attribute("fastedge.upstream", upstream.name)
            # This hop's context replaces the caller's (W3C Trace Context §3).
            headers = [(n, v) for n, v in headers if n not in _TRACE_FIELDS]
            headers += Tracer.inject(span)
        self.up_headers = headers
        chain = route.filters
        if chain is not None:
            self.fctx = ctx = FilterContext(
                method=head.method,
                path=path,
                query=query,
                host=host or b"",
                client_ip=self.conn.client_ip,
                headers=head.headers,
                upstream_headers=headers,
                route=route.name,
                request_id=rid,
                scheme=self.conn.proto,
                target=self.up_target,
                upstream=upstream,
                upstreams=gw.upstreams,
                span=span,
            )
            decision = chain.run_request(ctx)
            if decision is not None:
                if isinstance(decision, ProxyError):
                    self.fail(decision)
                elif isinstance(decision, Response):
                    self.respond(decision)
                else:  # a filter must wait (Redis, JWKS): finish in a task
                    if chain.streams_body:
                        # A filter may already hold something for this request (a cache
                        # fill lock): if the client leaves while we wait, it must hear.
                        self.hooks = chain
                    _spawn(gw.loop, self._await_filters(decision))
                return
        self.forward()

    async def _await_filters(self, pending: Awaitable[ProxyError | Response | None]) -> None:
        try:
            decision = await pending
        except Exception:
            log.exception("a request filter failed")
            decision = ProxyError(Kind.INTERNAL, "filter", detail="internal error")
        if self.finished:
            return
        if decision is None:
            self.forward()
        elif isinstance(decision, Response):
            self.respond(decision)
        else:
            self.fail(decision)

    def respond(self, resp: Response) -> None:
        """Answer with a filter's :class:`Response` (a cache hit, a batched answer)."""
        if self.finished:
            return
        # A filter answering for the upstream (a replaced response): the body watchers
        # installed at forward() learn that no upstream body will come.
        self._abort_hooks()
        fctx = self.fctx
        headers = [(n, v) for n, v in resp.headers if n != b"x-request-id"]
        if fctx is not None and fctx.response_headers:
            headers.extend(fctx.response_headers)
        self._answer(resp.status, resp.reason, headers, resp.body)

    def _use_upstream(self, upstream: Upstream) -> None:
        """A filter sent the request elsewhere (blue-green, canary): switch upstreams."""
        old = self.upstream
        self.upstream = upstream
        if old is not None and old.host_header == upstream.host_header:
            return
        headers = [(n, v) for n, v in self.up_headers if n != b"host"]
        if upstream.host_header is not None:
            headers.append((b"host", upstream.host_header))
        else:
            client_host = next((v for n, v in self.head.headers if n == b"host"), None)
            if client_host is not None:
                headers.append((b"host", client_host))
            else:
                self.needs_host = True
        self.up_headers[:] = headers

    def forward(self) -> None:
        """Take an upstream connection and send the request."""
        gw = self.conn.gateway
        fctx = self.fctx
        if fctx is not None and self.hooks is None and self.route is not None:
            # Body watchers (a cache fill and its coalescing lock) are installed before
            # the request leaves, so every way this exchange can end reaches them: the
            # response's end, or an abort (error, timeout, client gone, a replacement).
            chain = self.route.filters
            if chain is not None and chain.streams_body:
                self.hooks = chain
        if fctx is not None and fctx.upstream is not self.upstream and fctx.upstream is not None:
            self._use_upstream(fctx.upstream)
            if self.span is not None:
                self.span.set_attribute("fastedge.upstream", fctx.upstream.name)
        upstream = self.upstream
        assert upstream is not None
        self.up_start = monotonic()
        if upstream.resilient:
            # Health, breakers, priority groups and retries: decided in a task, since any
            # attempt may need to wait (connect, backoff).
            upstream.record_request()
            _spawn(gw.loop, self._forward_resilient())
            return
        # The common case (an idle pooled connection to the balancer's pick) stays
        # synchronous; only connecting or waiting needs a task.
        balancer = upstream.balancer
        order: list[Target] | None = None
        if upstream.keyed:  # consistent hashing: the key decides, with bounded load
            order = balancer.candidates(self._affinity_key(upstream.hash_key))
            first = order[0]
        else:
            first = balancer.pick()
        conn, may_connect = first.pool.acquire_idle()
        if conn is not None:
            self.target = first
            self.attach(conn, reused=True)
            return
        if order is None:
            order = balancer.failover_order(first)
        _spawn(gw.loop, self._connect(order, reserved=may_connect))

    def _affinity_key(self, spec: str) -> bytes:
        """The request's consistent-hash key (``hash_key``); the client IP when absent."""
        head = self.head
        value: bytes | None = None
        if spec == "path":
            value = head.target.partition(b"?")[0]
        elif spec != "ip":
            kind, _, name = spec.partition(":")
            if kind == "header":
                wanted = name.encode("latin-1")
                value = next((v for n, v in head.headers if n == wanted), None)
            elif kind == "cookie":
                value = _cookie(head.headers, name.encode("latin-1"))
            elif kind == "claim" and self.fctx is not None and self.fctx.claims:
                claim = self.fctx.claims.get(name)
                value = None if claim is None else str(claim).encode()
        return value or self.conn.client_ip

    async def _connect(self, candidates: list[Target], *, reserved: bool) -> None:
        """Open (or wait for) a connection, failing over to the next target on connect
        errors — nothing was sent yet, so trying elsewhere is always safe."""
        last: ProxyError | None = None
        for i, target in enumerate(candidates):
            if self.finished:
                if reserved and i == 0:
                    target.pool.cancel_reserved()
                return
            try:
                if reserved and i == 0:
                    conn, reused = await target.pool.open_reserved(), False
                else:
                    conn, reused = await target.pool.acquire()
            except ProxyError as err:
                last = err
                self.conn.gateway.metrics.inc(
                    "fastedge_upstream_errors_total",
                    (("upstream", target.upstream_name), ("kind", err.kind.name.lower())),
                )
                if not err.retryable:
                    break
                continue
            except Exception as exc:  # never lose an unexpected error: log and answer 502
                log.exception("unexpected error connecting to %s", target.name)
                last = ProxyError(Kind.UPSTREAM_UNREACHABLE, "upstream", detail=str(exc))
                continue
            if self.finished:  # the client left while we connected
                target.pool.release(conn, True)
                return
            self.target = target
            try:
                self.attach(conn, reused=reused)
            except Exception:
                log.exception("internal error while sending a request upstream")
                self.conn.internal_error()
            return
        assert last is not None
        self.fail(last)

    # --- resilient upstreams (health checks, breakers, priority groups, retries) -------
    async def _forward_resilient(self) -> None:
        """One attempt on a resilient upstream: pick an available target whose breaker
        admits the request, connect, send; connect failures retry per the policy."""
        try:
            await self._attempt_resilient()
        except Exception:
            log.exception("internal error while forwarding %s", self.request_id.decode())
            self.conn.internal_error()

    async def _attempt_resilient(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        while not self.finished:
            key = self._affinity_key(upstream.hash_key) if upstream.keyed else None
            order = upstream.candidates(key)
            tried = self.tried
            if tried:  # a retry goes to a different target when there is one
                fresh = [t for t in order if t not in tried]
                if fresh:
                    order = fresh
            target: Target | None = None
            gen = 0
            for candidate in order:
                admitted = upstream.admit(candidate)
                if admitted is not None:
                    target, gen = candidate, admitted
                    break
            if target is None:
                self._no_target_available(upstream)
                return
            self.attempt += 1
            self.gen = gen
            self.gen_target = target
            if self.tried is None:
                self.tried = []
            self.tried.append(target)
            try:
                conn, reused = await target.pool.acquire()
            except ProxyError as err:
                self.conn.gateway.metrics.inc(
                    "fastedge_upstream_errors_total",
                    (("upstream", upstream.name), ("kind", err.kind.name.lower())),
                )
                self._report(False, connect_error=True)
                delay = upstream.retry_delay(self.head.method, self.attempt, connect_error=True)
                if delay is None or self.finished:
                    self.fail(err)
                    return
                self.conn.gateway.metrics.inc("fastedge_upstream_retries_total")
                if delay > 0:
                    await asyncio.sleep(delay)
                continue
            if self.finished:  # the client left while we connected
                target.pool.release(conn, True)
                self._abandon()
                return
            self.target = target
            self.attach(conn, reused=reused)
            return

    def _no_target_available(self, upstream: Upstream) -> None:
        """Every target is down, ejected or behind an open breaker."""
        answer = upstream.unavailable()
        if isinstance(answer, ProxyError):
            self.fail(answer)
        elif isinstance(answer, Response):
            self.respond(answer)
        else:  # a fallback upstream takes the request
            self._use_upstream(answer)
            if answer.resilient:
                answer.record_request()
                self.tried = None
                self.attempt = 0  # the fallback's own retry policy starts afresh
                _spawn(self.conn.gateway.loop, self._forward_resilient())
            else:
                self.up_start = monotonic()
                # candidates() also serves a keyed (consistent-hash) fallback, which has
                # no pick().
                key = self._affinity_key(answer.hash_key) if answer.keyed else None
                order = answer.candidates(key)
                _spawn(self.conn.gateway.loop, self._connect(order, reserved=False))

    def _report(
        self, ok: bool, *, status: int = 0, connect_error: bool = False, timeout: bool = False
    ) -> None:
        """Report the outcome of the attempt in flight (once) to its upstream."""
        target = self.gen_target
        upstream = self.upstream
        if target is None or upstream is None or not upstream.resilient:
            return
        self.gen_target = None
        upstream.report(
            target, self.gen, ok, status=status, connect_error=connect_error, timeout=timeout
        )

    def _abandon(self) -> None:
        target = self.gen_target
        upstream = self.upstream
        if target is None or upstream is None or not upstream.resilient:
            return
        self.gen_target = None
        upstream.abandon(target, self.gen)

    def _retry_resilient(
        self, *, status: int = 0, connect_error: bool = False, timeout: bool = False
    ) -> bool:
        """After a failed attempt that sent nothing to the client: start another attempt
        when the upstream's policy and budget allow (True), else False."""
        upstream = self.upstream
        if upstream is None or not upstream.resilient or self.response_started:
            return False
        if self.head.has_body:
            return False  # the body was streamed upstream and is gone: cannot resend
        delay = upstream.retry_delay(
            self.head.method,
            self.attempt,
            status=status,
            connect_error=connect_error,
            timeout=timeout,
        )
        if delay is None:
            return False
        self._end_up_span("retried")
        self._detach_upstream(reusable=False)
        self.conn.gateway.metrics.inc("fastedge_upstream_retries_total")
        self._attempt_again(delay)
        return True

    def _attempt_again(self, delay: float) -> None:
        """The upstream connection is gone and nothing was answered: reset the request
        side and run another resilient attempt after ``delay`` seconds."""
        self._cancel_timer()
        self.request_sent = False
        self.cc = None
        _spawn(self.conn.gateway.loop, self._retry_later(delay))

    async def _retry_later(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if not self.finished:
            await self._forward_resilient()

    def attach(self, conn: UpstreamConnection, *, reused: bool) -> None:
        """Send the request head (and any body received so far) on ``conn``."""
        head = self.head
        gw = self.conn.gateway
        self.up = conn
        self.reused = reused
        conn.exchange = self
        upstream = self.upstream
        if upstream is not None and upstream.load_aware and self.target is not None:
            upstream.balancer.acquire(self.target)
            self.load_target = self.target
        # Recycle the connection's last codec (and its parser) when the engine can.
        self.cc = cc = conn.codec = gw.engine.client(head.method, conn.codec)
        if self.needs_host and self.target is not None:
            self.needs_host = False
            self.up_headers.append((b"host", self.target.authority))
        span = self.span
        if span is not None and span.recording and self.target is not None:
            # One CLIENT span per attempt; the upstream sees it as its parent (OTel HTTP
            # client conventions), so its traceparent replaces the server span's.
            self.up_span = child = span.child("fastedge.upstream", SpanKind.CLIENT)
            child.set_attribute("server.address", self.target.host)
            child.set_attribute("server.port", self.target.port)
            child.set_attribute("fastedge.attempt", self.attempt or 1)
            self.up_headers[:] = [(n, v) for n, v in self.up_headers if n not in _TRACE_FIELDS]
            self.up_headers += Tracer.inject(child)
        parts = [cc.request_head(head.method, self.up_target, self.up_headers)]
        pending = self.pending
        if pending:
            for chunk in pending:
                parts.append(cc.body(chunk))
            self.pending = None
            self.pending_bytes = 0
            self.conn.set_pause(_PAUSE_PENDING, False)
        if self.request_complete:
            parts.append(cc.end())
            self.request_sent = True
        transport = conn.transport
        assert transport is not None
        transport.write(b"".join(parts))
        if head.expect_continue and not self.request_complete and not self.response_started:
            # We own Expect (it is not forwarded): invite the body now that it has somewhere
            # to go (RFC 9110 §10.1.1).
            ct = self.conn.transport
            if ct is not None:
                ct.write(self.conn.codec.informational(100))
        self.last_up_activity = gw.loop.time()
        self._timer = gw.loop.call_later(gw.response_timeout_for(self), self._check_timeout)

    def on_request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        up = self.up
        if up is not None and self.cc is not None and up.transport is not None:
            if self.response_done:
                return  # the upstream answered already; the rest of the body is dropped
            up.transport.write(self.cc.body(data))
            self.last_up_activity = self.conn.gateway.loop.time()
            return
        if self.finished:
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > PENDING_BODY_LIMIT:
            self.conn.set_pause(_PAUSE_PENDING, True)

    def on_request_end(self) -> None:
        self.request_complete = True
        up = self.up
        if up is not None and self.cc is not None and not self.request_sent:
            self.request_sent = True
            tail = self.cc.end()
            if tail and up.transport is not None and not self.response_done:
                up.transport.write(tail)
        if self.response_done:
            self._finish()

    def on_request_error(self, err: ProtocolError) -> None:
        """The request body turned out malformed or too large mid-stream."""
        self.request_complete = True
        self.keep_alive = False
        self._drop_upstream()
        kind = Kind.BODY_TOO_LARGE if err.status == 413 else Kind.BAD_REQUEST
        self.fail(ProxyError(kind, "client", detail=err.reason), status_override=err.status)

    # --- response side ----------------------------------------------------------------
    def on_upstream_data(self, data: bytes) -> None:
        cc = self.cc
        if cc is None or self.finished:
            return
        gw = self.conn.gateway
        self.last_up_activity = gw.loop.time()
        codec = self.conn.codec
        out: list[bytes] = []
        for ev in cc.feed(data):
            if type(ev) is bytes:
                self.bytes_out += len(ev)
                out.append(codec.body(ev))
                if self.hooks is not None:
                    self.hooks.response_body(self.fctx, ev)  # type: ignore[arg-type]  # set with fctx
            elif ev is END:
                out.append(codec.end())
                self._write_client(out)
                if self.hooks is not None:
                    hooks, self.hooks = self.hooks, None
                    hooks.response_end(self.fctx)  # type: ignore[arg-type]  # set with fctx
                self._response_end()
                return
            elif type(ev) is ResponseHead:
                if ev.status < 200:
                    if ev.status == 101 and self.head.upgrade is not None:
                        self._write_client(out)
                        self._report(True, status=101)  # else a half-open probe leaks
                        self._switch_protocols(ev)
                        return
                    continue  # 100/103 from the upstream: ours was sent already, drop
                if self.gen_target is not None:  # a resilient upstream's attempt
                    st = ev.status
                    self._report(st < 500, status=st)
                    upstream = self.upstream
                    if (
                        upstream is not None
                        and st in upstream.retry_statuses
                        and self._retry_resilient(status=st)
                    ):
                        return
                headers = rewrite_response_headers(
                    ev.headers,
                    via=gw.via,
                    request_id=self.request_id,
                    keep_length=ev.content_length is not None and not ev.chunked,
                )
                fctx = self.fctx
                chain = self.route.filters if self.route is not None else None
                if fctx is not None and chain is not None:
                    replacement = chain.run_response(fctx, ev.status, headers)
                    if replacement is not None:
                        # A filter answers instead (a 304 turned into the stored
                        # response, a stale one for a 5xx): this upstream response is
                        # not read further.
                        self._write_client(out)
                        self._cancel_timer()
                        self._drop_upstream()
                        self.respond(replacement)
                        return
                    if chain.streams_body:
                        self.hooks = chain
                self.response_started = True
                self.status = ev.status
                close = self.conn.must_close() or (not self.request_complete and self.head.has_body)
                if close:
                    self.keep_alive = False
                out.append(codec.response_head(ev.status, ev.reason, headers, close=close))
            elif isinstance(ev, ProtocolError):
                self._write_client(out)
                self._upstream_failed(
                    ProxyError(
                        Kind.UPSTREAM_BAD_RESPONSE, "upstream", detail="bad upstream response"
                    ),
                    ev.reason,
                )
                return
        if out:
            self._write_client(out)

    def _write_client(self, out: list[bytes]) -> None:
        t = self.conn.transport
        if out and t is not None and not t.is_closing():
            t.write(b"".join(out) if len(out) > 1 else out[0])

    def on_upstream_lost(self, exc: Exception | None) -> None:
        """The upstream connection closed under us."""
        if self.finished or self.response_done:
            return
        cc = self.cc
        if cc is not None:
            events = cc.feed(b"")  # ends a close-delimited body, else reports truncation
            if events:
                self.on_upstream_data_events_after_close(events)
                if self.finished or self.response_done:
                    return
        if (
            not self.response_started
            and self.reused
            and not self.retried
            and self.head.method in _IDEMPOTENT
            and not self.head.has_body
        ):
            # A pooled connection the upstream had closed before answering: the request
            # cannot have been processed, so one retry on a fresh connection is safe.
            self.retried = True
            self._detach_upstream(reusable=False)
            self.conn.gateway.metrics.inc("fastedge_upstream_retries_total")
            if self.gen_target is not None:
                # A resilient upstream chooses again (the dead connection says nothing
                # either way, so no verdict): a killed target is in ``tried`` and is
                # skipped when another is available; a fresh connect there is judged.
                self._abandon()
                self._attempt_again(0.0)
                return
            assert self.target is not None
            _spawn(self.conn.gateway.loop, self._connect([self.target], reserved=False))
            return
        self._upstream_failed(
            ProxyError(
                Kind.UPSTREAM_BAD_RESPONSE,
                "upstream",
                detail="upstream closed the connection before the response ended",
            ),
            str(exc) if exc else "upstream closed",
        )

    def on_upstream_data_events_after_close(self, events: list[Any]) -> None:
        codec = self.conn.codec
        out: list[bytes] = []
        for ev in events:
            if type(ev) is bytes:
                self.bytes_out += len(ev)
                out.append(codec.body(ev))
                if self.hooks is not None:
                    self.hooks.response_body(self.fctx, ev)  # type: ignore[arg-type]  # set with fctx
            elif ev is END:
                out.append(codec.end())
                self._write_client(out)
                if self.hooks is not None:
                    hooks, self.hooks = self.hooks, None
                    hooks.response_end(self.fctx)  # type: ignore[arg-type]  # set with fctx
                self.keep_alive = self.keep_alive and self.response_started
                self._response_end(reusable=False)
                return
        self._write_client(out)

    def _switch_protocols(self, ev: ResponseHead) -> None:
        """Upgrade accepted (101): tunnel raw bytes both ways from now on."""
        from fastedge.tunnel import start_tunnel

        gw = self.conn.gateway
        headers = rewrite_response_headers(
            ev.headers, via=gw.via, request_id=self.request_id, keep_length=False, keep_upgrade=True
        )
        self.status = 101
        self.response_started = True
        client_t = self.conn.transport
        up = self.up
        assert self.cc is not None and up is not None and up.transport is not None
        if client_t is None or client_t.is_closing():
            self._drop_upstream()
            return
        client_t.write(self.conn.codec.informational(101, headers))
        self._cancel_timer()
        client_rest = self.conn.codec.upgraded()
        up_rest = self.cc.upgraded()
        up.exchange = None
        self.up = None
        self._release_load()
        self.finished = True
        self.conn.exchange = None
        self.conn.queue.clear()
        # The HTTP connection object is done; the tunnel's client end takes its place in
        # the registry (gauge, graceful shutdown).
        self.conn.server.connections.discard(self.conn)
        # The tunnel's client end releases the per-IP slot when it closes.
        self.conn.admitted = False
        server, ip = self.conn.server, self.conn.client_ip
        start_tunnel(
            client_t,
            up.transport,
            client_rest,
            up_rest,
            server,
            on_client_close=lambda: server.release_ip(ip),
        )
        self._log()

    def _response_end(self, reusable: bool | None = None) -> None:
        self.response_done = True
        self._cancel_timer()
        cc = self.cc
        ok = cc.reusable if (reusable is None and cc is not None) else bool(reusable)
        # A connection whose request was not fully sent is mid-message: never reuse it.
        self._detach_upstream(reusable=ok and self.request_sent)
        if self.request_complete:
            self._finish()
        elif self.head.has_body:
            # Answered before the body was read (e.g. an early 413 from the upstream):
            # we will not read the rest, so the connection must close.
            self.keep_alive = False
            self._finish()
        # else: END of a bodiless request is already queued; on_request_end finishes.

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        self._log()
        self.conn.exchange_done(self, self.keep_alive and self.conn.codec.keep_alive)

    # --- failure ----------------------------------------------------------------------
    def fail(self, err: ProxyError, *, status_override: int | None = None) -> None:
        """Answer with an error if nothing was sent yet; otherwise abort the connection."""
        if self.finished:
            return
        self._cancel_timer()
        self._abandon()
        self._abort_hooks()
        # Before dropping the upstream: ending its span reads why it failed (a timeout).
        self.error = err.detail or err.kind.value
        self._drop_upstream()
        conn = self.conn
        t = conn.transport
        if self.response_started:
            # Part of a response is out: closing is the only honest signal of truncation.
            self.keep_alive = False
            self.finished = True
            self._log()
            if t is not None:
                t.abort()
            return
        fctx = self.fctx
        if fctx is not None and err.source == "upstream" and self.route is not None:
            chain = self.route.filters
            if chain is not None and chain.error_filters:
                replacement = chain.run_error(fctx, err)
                if replacement is not None:  # e.g. stale-if-error
                    self.respond(replacement)
                    return
        status, headers, body = error_response(
            err, self.request_id.decode(), status=status_override
        )
        self._answer(status, b"", headers, body)

    def _abort_hooks(self) -> None:
        hooks = self.hooks
        if hooks is not None:
            self.hooks = None
            hooks.response_abort(self.fctx)  # type: ignore[arg-type]  # set with fctx

    def _answer(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Write a complete response produced here (an error or a filter's answer)."""
        conn = self.conn
        t = conn.transport
        if status != 204 and status != 304 and not any(n == b"content-length" for n, _ in headers):
            headers.append((b"content-length", b"%d" % len(body)))
        headers.append((b"x-request-id", self.request_id))
        self.status = status
        self.response_started = True
        close = (
            not self.keep_alive
            or conn.must_close()
            or (not self.request_complete and self.head.has_body)
        )
        if close:
            self.keep_alive = False
        codec = conn.codec
        if t is not None and not t.is_closing():
            t.write(
                codec.response_head(status, reason, headers, close=close)
                + codec.body(body)
                + codec.end()
            )
        self.bytes_out = len(body)
        self.response_done = True
        if self.request_complete or self.head.has_body:
            self._finish()

    def _upstream_failed(self, err: ProxyError, why: str, *, timeout: bool = False) -> None:
        gw = self.conn.gateway
        if self.upstream is not None:
            gw.metrics.inc(
                "fastedge_upstream_errors_total",
                (("upstream", self.upstream.name), ("kind", err.kind.name.lower())),
            )
        log.debug("upstream failure on %s: %s", self.request_id.decode(), why)
        if self.gen_target is not None:
            self._report(False, timeout=timeout)
            if self._retry_resilient(timeout=timeout):
                return
        self.fail(err)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.finished or self.response_done:
            return
        gw = self.conn.gateway
        timeout = gw.response_timeout_for(self)
        idle = gw.loop.time() - self.last_up_activity
        if idle < timeout:
            self._timer = gw.loop.call_later(timeout - idle, self._check_timeout)
            return
        self._upstream_failed(
            ProxyError(Kind.UPSTREAM_TIMEOUT, "upstream", detail="upstream timed out"),
            "timeout",
            timeout=True,
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release_load(self) -> None:
        """End this exchange's in-flight count on a load-aware balancer (exactly once)."""
        target = self.load_target
        if target is None or self.upstream is None:
            return
        self.load_target = None
        balancer = self.upstream.balancer
        balancer.release(target)
        if self.upstream.balance == "p2c_ewma":
            balancer.observe(target, monotonic() - self.up_start)

    def _detach_upstream(self, *, reusable: bool) -> None:
        self._release_load()
        if self.up_span is not None:
            self._end_up_span(self.error)
        up = self.up
        if up is None:
            return
        self.up = None
        up.exchange = None
        up.resume_reading()
        if self.target is not None:
            self.target.pool.release(up, reusable)
        else:
            up.close()

    def _drop_upstream(self) -> None:
        self._detach_upstream(reusable=False)

    def _end_up_span(self, error: str | None) -> None:
        child = self.up_span
        if child is None:
            return
        self.up_span = None
        if self.status:
            child.set_attribute("http.response.status_code", self.status)
        # OTel HTTP conventions: for a CLIENT span a 4xx is an error too.
        if error or self.status >= 400:
            child.end_error(error or f"status {self.status}")
        else:
            child.end()

    def abort_client_gone(self) -> None:
        """The client disconnected mid-exchange: free the upstream side."""
        if self.finished:
            return
        self.finished = True
        self._cancel_timer()
        self._abandon()
        self._abort_hooks()
        if not self.response_done:
            self.status = self.status or 499  # nginx's "client closed request"
            self.error = self.error or "client closed connection"
            self._drop_upstream()
        self._log()

    def _start_span(self, tracer: Tracer, headers: list[tuple[bytes, bytes]], host: bytes) -> None:
        head = self.head
        method = head.method.decode("latin-1")
        # A new trace the express lane drew and sampled keeps its id (see _express).
        preset = self.conn.xtrace
        self.conn.xtrace = None
        self.span = span = tracer.start_span(method, tracer.extract(head.headers), trace_id=preset)
        if span.recording:  # attributes only for sampled spans: most are not, at 1%
            span.set_attributes(
                {
                    "http.request.method": method,
                    "url.path": head.target.partition(b"?")[0].decode("latin-1"),
                    "server.address": host.decode("latin-1"),
                    "network.peer.address": self.conn.client_ip.decode(),
                    "fastedge.request_id": self.request_id.decode(),
                }
            )

    def _end_span(self) -> None:
        span = self.span
        if span is None:
            return
        self.span = None
        if not span.recording:
            span.end()  # exports nothing; ends it for anyone holding a reference
            return
        span.set_attribute("http.response.status_code", self.status)
        if self.target is not None:
            span.set_attribute("fastedge.upstream.target", self.target.name)
        # OTel HTTP conventions: a SERVER span is an error for 5xx (or no answer at all),
        # never for a 4xx, which is the client's fault (a 401, a 429, a 499).
        status = self.status
        if status >= 500 or (self.error and not 400 <= status < 500):
            span.set_status(StatusCode.ERROR, self.error or "")
        span.end()

    def _log(self) -> None:
        gw = self.conn.gateway
        span = self.span
        trace_id = span.trace_id if span is not None else None
        self._end_span()
        now = monotonic()
        route = self.route.name if self.route is not None else "-"
        total = now - self.start
        upstream_s = (now - self.up_start) if self.up_start else None
        gw.metrics.observe_request(
            route, self.head.method.decode("latin-1"), self.status, total, upstream_s
        )
        if gw.access_log_enabled:
            gw.log_access(
                {
                    "request_id": self.request_id.decode(),
                    "client": self.conn.client_ip.decode(),
                    "method": self.head.method.decode("latin-1"),
                    "path": self.head.target.decode("latin-1"),
                    "route": route,
                    "upstream": self.upstream.name if self.upstream is not None else None,
                    "target": self.target.name if self.target is not None else None,
                    "status": self.status,
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                    "duration_ms": round(total * 1000, 3),
                    "upstream_ms": round(upstream_s * 1000, 3) if upstream_s else None,
                    "error": self.error,
                    "trace_id": trace_id,
                }
            )
