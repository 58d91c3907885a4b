"""A small, strict asyncio HTTP/1.1 server for fastedge's *internal* listeners.

The admin API (:mod:`fastedge.admin.api`) and the demo's upstream services
(:mod:`fastedge.demo_services`) need a real HTTP server, but not the proxy's data path:
this module favours clarity over speed. It is an :class:`asyncio.Protocol` around
httptools' ``HttpRequestParser`` (llhttp) that

* buffers each request body fully, bounded by :class:`Limits` (413 / 431 on excess),
  accepting both ``Content-Length`` and ``chunked`` framing (RFC 9112 §6);
* answers ``Expect: 100-continue`` so curl does not stall a second before uploading;
* serves requests on a connection strictly in order (keep-alive and pipelining), pausing
  reads while a request is being handled so a pipelining client cannot make it buffer
  without bound;
* writes responses with ``Content-Length``, or ``Transfer-Encoding: chunked`` when the
  body is an async iterator, honouring transport flow control;
* answers ``HEAD`` with the ``GET`` headers and no body (RFC 9110 §9.3.2);
* answers malformed input with 400 and closes the connection (DESIGN.md §6).

Handlers are ``async def handler(request: Request) -> Response``. An exception escaping a
handler becomes a logged 500; the connection survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import re
import secrets
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson

from fastedge.listen import bind_numeric

__all__ = [
    "Handler",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "error_body",
    "start_server",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-request and per-connection limits.

    Defaults: an 8 KiB request target is nginx's per-line buffer (``large_client_header_buffers
    4 8k``; longer lines get 414); a 16 KiB head is the common "large header" ceiling (nginx's
    ``large_client_header_buffers`` is 4 x 8 KiB, Node's ``--max-http-header-size`` 16 KiB);
    100 fields is Apache's ``LimitRequestFields`` default; 1 MiB is nginx's default
    ``client_max_body_size``; 75 s idle is nginx's ``keepalive_timeout``.
    """

    max_head_bytes: int = 16 * 1024
    max_uri_bytes: int = 8 * 1024
    max_header_count: int = 100
    max_body_bytes: int = 1024 * 1024
    idle_timeout: float = 75.0


@dataclass(slots=True)
class Request:
    """One fully received request.

    ``path`` and ``query`` come from the request target, undecoded (``query`` without the
    ``?``, empty when absent). ``headers`` keep order and duplicates; names are lower-case.
    ``request_id`` is the client's ``X-Request-Id`` when it is a sane token, otherwise a
    fresh random one; it is echoed on the response and put in error bodies.
    """

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    request_id: str
    client: str | None = None
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def json(self) -> Any:
        """The body decoded as JSON; raises :class:`orjson.JSONDecodeError` if it is not."""
        return orjson.loads(self.body)


@dataclass(slots=True)
class Response:
    """A response to write.

    ``body`` is either ``bytes`` (sent with ``Content-Length``) or an async iterable of
    ``bytes`` (sent chunked, each non-empty item as one chunk). Do not put framing headers
    (``Content-Length``, ``Transfer-Encoding``, ``Connection``) in ``headers``: the server
    owns framing.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] = b""

    @classmethod
    def json(
        cls, data: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        """A JSON response (orjson; non-JSON values are rendered with ``str``)."""
        return cls(
            status,
            [("content-type", "application/json"), *(headers or [])],
            orjson.dumps(data, default=str),
        )

    @classmethod
    def text(
        cls,
        text: str,
        status: int = 200,
        content_type: str = "text/plain; charset=utf-8",
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        """A text response encoded as UTF-8."""
        return cls(status, [("content-type", content_type), *(headers or [])], text.encode())

    @classmethod
    def error(
        cls,
        status: int,
        message: str,
        request_id: str,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        """The house error shape ``{"error", "status", "request_id"}`` (DESIGN.md §2)."""
        return cls(
            status,
            [("content-type", "application/json"), *(headers or [])],
            error_body(status, message, request_id),
        )


Handler = Callable[[Request], Awaitable[Response]]
"""What a server calls for every request."""


def error_body(status: int, message: str, request_id: str) -> bytes:
    """Encode the house error body."""
    return orjson.dumps({"error": message, "status": status, "request_id": request_id})


# A client-supplied request id is only trusted when it cannot smuggle anything into logs or
# headers: 1-64 visible token characters.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")

# Framing headers a handler must not set: the server decides framing (RFC 9112 §6).
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})

# How long a refused client may keep sending before we close anyway (nginx: lingering_time
# 30 s, lingering_timeout 5 s; an internal listener needs far less).
_LINGER_SECONDS = 2.0

# Statuses that never carry a body (RFC 9110 §6.4.1).
_NO_BODY_STATUSES = frozenset({204, 304})


def _new_request_id() -> str:
    return secrets.token_hex(8)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Reject(Exception):
    """Raised inside parser callbacks to answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Connection(asyncio.Protocol):
    """One client connection: parse, queue, handle in order, write."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._limits = server.limits
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        self._parser = httptools.HttpRequestParser(self)
        # The request being parsed.
        self._url = bytearray()
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._body = bytearray()
        self._method = ""
        self._keep_alive = True
        self._version = "1.1"
        # Parsed requests waiting for the handler task, with their keep-alive verdict.
        self._pending: deque[tuple[Request, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing_after_pending = False
        # An error answer for input that arrived behind still-queued requests.
        self._deferred_reject: bytes | None = None
        self._busy = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        # Transport flow control for streamed bodies.
        self._can_write = asyncio.Event()
        self._can_write.set()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it, so this
        # is a cast, not an isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._client = f"{peer[0]}:{peer[1]}"
        self._server._connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._cancel_idle_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._can_write.set()  # wake a streaming writer so it notices and stops
        self._pending.clear()
        if self._task is not None and not self._task.done():
            # The client is gone: nobody can receive the answer.
            self._task.cancel()
        self._server._connection_closed()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        if self._closing_after_pending:
            return  # after an error or Upgrade, the rest of the stream is not HTTP to us
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Reject):
                self._reject(ctx.status, ctx.reason)
            else:
                logger.exception("internal error while parsing a request")
                self._reject(500, "internal error")
        except httptools.HttpParserUpgrade:
            # Requests before the upgrade are complete and queued; we speak no other
            # protocol, so answer them and close instead of switching.
            self._closing_after_pending = True
            self._kick()
        except httptools.HttpParserError as exc:
            self._reject(400, f"malformed request: {exc}")

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish what is queued, then close (returning True
        # keeps our write side open meanwhile).
        self._closing_after_pending = True
        if not self._busy and not self._pending:
            return None
        return True

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._head_bytes = 0
        self._body.clear()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_uri_bytes:
            raise _Reject(414, "request URI too long")
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools calls on_header with complete (possibly joined) name and value.
        self._count_head(len(name) + len(value) + 4)
        if len(self._headers) >= self._limits.max_header_count:
            raise _Reject(431, "too many header fields")
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._method = parser.get_method().decode("ascii", "replace")
        self._version = parser.get_http_version()
        self._keep_alive = parser.should_keep_alive()
        length = None
        expect_continue = False
        for name, value in self._headers:
            if name == "content-length":
                # llhttp has already rejected malformed and conflicting lengths; this guard
                # only keeps a surprise from becoming a 500.
                try:
                    length = int(value)
                except ValueError:
                    raise _Reject(400, "invalid content-length") from None
            elif name == "expect" and value.lower() == "100-continue":
                expect_continue = True
        if length is not None and length > self._limits.max_body_bytes:
            raise _Reject(413, "request body too large")
        idle = not (self._busy or self._pending)
        if expect_continue and idle and self._version == "1.1" and self._transport is not None:
            # RFC 9110 §10.1.1: tell the client to send the body we are willing to take. Not
            # while an earlier pipelined response is being written: the interim response
            # would land inside it (the client then simply sends after its own timeout).
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > self._limits.max_body_bytes:
            raise _Reject(413, "request body too large")
        self._body += body

    def on_message_complete(self) -> None:
        try:
            parsed = httptools.parse_url(bytes(self._url))
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400, "invalid request target") from None
        request_id = ""
        for name, value in self._headers:
            if name == "x-request-id" and _REQUEST_ID_RE.fullmatch(value):
                request_id = value
                break
        request = Request(
            method=self._method,
            path=(parsed.path or b"/").decode("latin-1"),
            query=(parsed.query or b"").decode("latin-1"),
            headers=self._headers,
            body=bytes(self._body),
            request_id=request_id or _new_request_id(),
            client=self._client,
            http_version=self._version,
        )
        self._pending.append((request, self._keep_alive))
        if not self._keep_alive:
            self._closing_after_pending = True
        self._kick()

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._limits.max_head_bytes:
            raise _Reject(431, "request header fields too large")

    # -- request handling -------------------------------------------------------------------

    def _kick(self) -> None:
        """Start the handler task if requests are waiting and none is running."""
        if self._pending and (self._task is None or self._task.done()):
            self._cancel_idle_timer()
            self._busy = True
            if self._transport is not None:
                # Backpressure: read nothing more until the queue is served.
                self._transport.pause_reading()
            self._task = asyncio.get_running_loop().create_task(self._serve_pending())

    async def _serve_pending(self) -> None:
        transport = self._transport
        assert transport is not None
        while self._pending:
            request, keep_alive = self._pending.popleft()
            # The last request before an EOF or Upgrade gets "connection: close". Before a
            # refused request it does not: the error answer that follows carries the close.
            if self._closing_after_pending and not self._pending and self._deferred_reject is None:
                keep_alive = False
            response = await self._call_handler(request)
            try:
                await self._write_response(request, response, keep_alive)
            except Exception:
                # A bad header value or a failing body iterator: part of the response may
                # already be on the wire, so the only honest answer is to drop the connection.
                logger.exception(
                    "writing the response to %s %s failed", request.method, request.path
                )
                transport.abort()
                return
            if not keep_alive or transport.is_closing():
                self._finish()
                return
        self._busy = False
        if self._closing_after_pending or self._server._shutting_down:
            self._finish()
            return
        transport.resume_reading()
        self._arm_idle_timer()

    async def _call_handler(self, request: Request) -> Response:
        try:
            return await self._server.handler(request)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("handler failed for %s %s", request.method, request.path)
            return Response.error(500, "internal error", request.request_id)

    async def _write_response(self, request: Request, response: Response, keep_alive: bool) -> None:
        transport = self._transport
        assert transport is not None
        status = response.status
        lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
        for name, value in response.headers:
            if name.lower() not in _FRAMING:
                lines.append(f"{name}: {value}\r\n")
        lines.append(f"x-request-id: {request.request_id}\r\n")
        body = response.body
        head_only = request.method == "HEAD" or status in _NO_BODY_STATUSES
        streamed = not isinstance(body, bytes)
        if status in _NO_BODY_STATUSES:
            pass  # no framing headers at all (RFC 9110 §8.6, RFC 9112 §6.1)
        elif streamed:
            lines.append("transfer-encoding: chunked\r\n")
        else:
            assert isinstance(body, bytes)
            lines.append(f"content-length: {len(body)}\r\n")
        if not keep_alive:
            lines.append("connection: close\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        if not streamed:
            assert isinstance(body, bytes)
            transport.write(head if head_only else head + body)
            return
        assert isinstance(body, AsyncIterable)
        transport.write(head)
        if head_only:
            await _close_iterable(body)
            return
        try:
            async for chunk in body:
                if transport.is_closing():
                    return
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await self._can_write.wait()
            transport.write(b"0\r\n\r\n")
        finally:
            await _close_iterable(body)

    def _reject(self, status: int, reason: str) -> None:
        """Answer a request we could not parse or accept, then close (DESIGN.md §6).

        Anything already queued is answered first, so a pipelined good request before the
        bad one still gets its response.
        """
        self._closing_after_pending = True
        request_id = _new_request_id()
        body = error_body(status, reason, request_id)
        raw = (
            f"HTTP/1.1 {status} {_reason(status)}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            f"x-request-id: {request_id}\r\n"
            "connection: close\r\n\r\n"
        ).encode("latin-1") + body
        self._deferred_reject = raw
        # With requests queued, the handler task writes it after their responses and closes.
        if not (self._busy or self._pending):
            self._finish()

    def _finish(self) -> None:
        """Write a pending error answer, if any, and close the connection."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._deferred_reject is not None:
            transport.write(self._deferred_reject)
            self._deferred_reject = None
            if transport.can_write_eof():
                # Lingering close, as nginx's lingering_close: the client may still be
                # sending (a body we refused), and closing with unread input makes the kernel
                # answer with RST, which can destroy our error response before the client
                # reads it. Half-close, discard input until the client closes, give up after
                # a short while.
                transport.write_eof()
                transport.resume_reading()
                loop = asyncio.get_running_loop()
                self._linger_timer = loop.call_later(_LINGER_SECONDS, transport.close)
                return
        transport.close()

    # -- idle handling ----------------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        self._cancel_idle_timer()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._limits.idle_timeout, self._on_idle_timeout)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle_timeout(self) -> None:
        # A whole request must arrive within the idle timeout: this also bounds slow-header
        # (slowloris) clients, which never complete a request.
        self._idle_timer = None
        if self._transport is not None and not self._busy:
            self._transport.close()

    def close_if_idle(self) -> bool:
        """Close now if no request is in progress; report whether it was idle."""
        if self._busy or self._pending:
            return False
        if self._transport is not None:
            self._transport.close()
        return True

    def abort(self) -> None:
        """Drop the connection without waiting for anything."""
        if self._transport is not None:
            self._transport.abort()


async def _close_iterable(body: AsyncIterable[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


class HttpServer:
    """A listening server with an ordered, graceful shutdown. Create with :func:`start_server`."""

    def __init__(self, handler: Handler, limits: Limits) -> None:
        self.handler = handler
        self.limits = limits
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._shutting_down = False
        self._all_closed: asyncio.Event | None = None

    @property
    def server(self) -> asyncio.Server:
        """The underlying :class:`asyncio.Server`."""
        assert self._server is not None, "server not started"
        return self._server

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def _connection_closed(self) -> None:
        if self._all_closed is not None and not self._connections:
            self._all_closed.set()

    async def close(self, grace: float = 5.0) -> None:
        """Shut down in order: stop accepting, close idle connections, let in-flight
        requests finish for up to ``grace`` seconds, then abort whatever is left."""
        if self._shutting_down:
            return
        self._shutting_down = True
        # 1. Stop accepting new connections.
        self.server.close()
        # 2. Close idle keep-alive connections; busy ones close after their response.
        self._all_closed = asyncio.Event()
        for conn in list(self._connections):
            conn.close_if_idle()
        if not self._connections:
            self._all_closed.set()
        # 3. Drain: wait for in-flight requests to complete.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), grace)
        # 4. Abort leftovers (their handler tasks are cancelled by connection_lost).
        for conn in list(self._connections):
            conn.abort()
        await self.server.wait_closed()


async def start_server(
    handler: Handler, host: str, port: int, *, limits: Limits | None = None
) -> HttpServer:
    """Listen on ``host:port`` (``0`` = ephemeral) and serve ``handler``."""
    server = HttpServer(handler, limits or Limits())
    loop = asyncio.get_running_loop()
    # Bound here when it can be: create_server would start resolver threads (listen.py).
    sock = bind_numeric(host, port)
    if sock is None:
        server._server = await loop.create_server(lambda: _Connection(server), host, port)
        return server
    try:
        server._server = await loop.create_server(lambda: _Connection(server), sock=sock)
    except BaseException:
        sock.close()
        raise
    return server
