"""The admin listener: health, readiness, metrics, configuration, and room for more.

Built-in endpoints:

====================  =====  ==================================================
``GET /healthz``      open   200 ``{"status": "ok"}`` while the process serves
``GET /readyz``       open   200 ``{"status": "ready"}`` or 503 from ``ready()``
``GET /metrics``      token  Prometheus text format 0.0.4
``GET /config``       token  JSON of ``config_view()`` (the caller redacts secrets)
====================  =====  ==================================================

Health and readiness are open because orchestrator probes (Kubernetes ``httpGet`` probes,
load-balancer health checks) cannot easily send a bearer token and reveal nothing but one
bit. Everything else requires ``Authorization: Bearer <token>`` when a token is set, since
metrics and configuration describe the deployment and later endpoints change it. A browser
opening the dashboard (``GET /?token=...``) gets a session cookie instead; state changes
authenticated by that cookie also need the ``X-Fastedge-Admin`` header (CSRF protection):
see :mod:`fastedge.admin.session`. Without a token, state-changing requests from another
origin (a web page) are still refused.

Later features add endpoints through ``extra_routes``: ``{("PUT", "/traffic/{name}"):
handler}``. A path segment written ``{name}`` matches any one segment and is passed in
:attr:`AdminRequest.params`. Every error uses the house shape
``{"error": "...", "status": N, "request_id": "..."}``.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import unquote

import orjson

from fastedge.admin import session
from fastedge.minihttp import HttpServer, Limits, Request, Response, start_server
from fastedge.observe.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from fastedge.config import AdminConfig

__all__ = [
    "AdminError",
    "AdminRequest",
    "AdminResponse",
    "AdminServer",
    "Handler",
    "admin_token",
]

AdminResponse: TypeAlias = Response
"""What an admin handler returns; build it with ``AdminResponse.json(...)``,
``AdminResponse.text(...)`` or ``AdminResponse.error(...)``."""


class AdminError(Exception):
    """Raise from a handler to answer ``status`` with the house error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """A request routed to an admin handler.

    ``params`` holds the ``{placeholder}`` segments of the matched route, percent-decoded.
    """

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    request_id: str
    params: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def json(self) -> Any:
        """The body as JSON; raises :class:`AdminError` (400) if it is not valid JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise AdminError(400, "request body is not valid JSON") from None


Handler: TypeAlias = Callable[[AdminRequest], Awaitable[AdminResponse]]
"""An admin endpoint."""

# Paths answered without a token (see the module docstring for why).
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})

# Admin answers describe live state: never let a proxy or browser cache them.
_NO_STORE = ("cache-control", "no-store")

# Methods that never change state (RFC 9110 §9.2.1), so a session cookie alone may send them.
_SAFE_METHODS = frozenset({"GET", "HEAD"})


# Listener hosts that only this machine can reach: no token is needed there.
_LOOPBACK = ("127.", "::1", "localhost")


def admin_token(admin: AdminConfig, log: logging.Logger, preset: str | None = None) -> str | None:
    """The token of the admin listener ``admin.listen``: ``preset`` when given, else the
    ``admin.token_env`` environment variable; ``None`` (no authentication) when neither
    is set, with a warning on ``log`` unless the listener is on loopback."""
    token = preset or os.environ.get(admin.token_env) or None
    if token is None and admin.listen is not None:
        host, port = admin.listen
        if not host.startswith(_LOOPBACK):
            log.warning(
                "admin listener on %s:%d has no token (set %s): anyone who can reach "
                "it can read the config and metrics",
                host,
                port,
                admin.token_env,
            )
    return token


def _is_login(request: Request) -> bool:
    """Whether ``request`` opens the dashboard with ``?token=`` (``GET``/``HEAD /`` only)."""
    return (
        request.path == "/"
        and request.method in _SAFE_METHODS
        and session.query_token(request.query) is not None
    )


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    segments: tuple[str, ...]
    handler: Handler

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for pattern, actual in zip(self.segments, segments, strict=True):
            if pattern.startswith("{") and pattern.endswith("}"):
                if not actual:
                    return None
                params[pattern[1:-1]] = unquote(actual)
            elif pattern != actual:
                return None
        return params


def _split(path: str) -> list[str]:
    return path.strip("/").split("/") if path != "/" else []


class AdminServer:
    """The admin HTTP listener.

    ``ready`` and ``config_view`` are called per request, so they must be cheap and
    non-blocking. ``token=None`` disables authentication (only sensible on loopback).
    ``extra_routes`` maps ``(method, path pattern)`` to a handler; it may not replace a
    built-in endpoint. ``HEAD`` is answered for every ``GET`` route. ``fallback``, when
    given, answers authenticated requests that match no route (otherwise 404).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        ready: Callable[[], bool],
        config_view: Callable[[], dict[str, Any]],
        token: str | None,
        extra_routes: Mapping[tuple[str, str], Handler] | None = None,
        limits: Limits | None = None,
        fallback: Handler | None = None,
    ) -> None:
        self.host = host
        # Answers an authenticated request that matches no route (instead of 404): the
        # `--workers` supervisor relays those to its workers (fastedge.workers).
        self._fallback = fallback
        self._requested_port = port
        self._metrics = metrics
        self._ready = ready
        self._config_view = config_view
        self._token = token.encode() if token else None
        # 16 KiB head / 1 MiB body: see Limits for where the numbers come from.
        self._limits = limits or Limits()
        self._server: HttpServer | None = None
        builtin: dict[tuple[str, str], Handler] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics_text,
            ("GET", "/config"): self._config,
        }
        for key in extra_routes or {}:
            if key in builtin:
                raise ValueError(f"extra route {key} would replace a built-in endpoint")
        self._routes = [
            _Route(method.upper(), tuple(_split(path)), handler)
            for (method, path), handler in {**builtin, **(extra_routes or {})}.items()
        ]

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`; useful with port 0)."""
        if self._server is None:
            raise RuntimeError("AdminServer.start() has not been awaited")
        return self._server.port

    async def start(self) -> None:
        """Bind and start serving."""
        self._server = await start_server(
            self._handle, self.host, self._requested_port, limits=self._limits
        )

    async def close(self) -> None:
        """Stop accepting, finish in-flight requests, close connections."""
        if self._server is not None:
            await self._server.close()

    # -- dispatch ------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        # Authenticate before routing, so an anonymous client cannot map which admin
        # endpoints exist (404 vs 405 vs 401).
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        response = await self._route(request)
        if self._token is not None and self._valid_login(request):
            # The dashboard was opened with ?token=: from now on the cookie stands in for
            # the token (see fastedge.admin.session), and no Referer may carry the URL.
            cookie = session.make_session(self._token)
            response.headers.append(session.session_cookie_header(cookie))
            response.headers.append(("referrer-policy", "no-referrer"))
        return response

    async def _route(self, request: Request) -> Response:
        rid = request.request_id
        segments = _split(request.path)
        method = "GET" if request.method == "HEAD" else request.method
        allowed: set[str] = set()
        for route in self._routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method != method:
                allowed.add(route.method)
                continue
            return await self._call(route.handler, request, params)
        if allowed:
            if "GET" in allowed:
                allowed.add("HEAD")
            return Response.error(
                405, "method not allowed", rid, [("allow", ", ".join(sorted(allowed))), _NO_STORE]
            )
        if self._fallback is not None:
            return await self._call(self._fallback, request, {})
        return Response.error(404, "not found", rid, [_NO_STORE])

    async def _call(self, handler: Handler, request: Request, params: dict[str, str]) -> Response:
        admin_request = AdminRequest(
            request.method,
            request.path,
            request.query,
            request.headers,
            request.body,
            request.request_id,
            params,
        )
        try:
            response = await handler(admin_request)
        except AdminError as exc:
            return Response.error(exc.status, exc.message, request.request_id, [_NO_STORE])
        if not any(name.lower() == "cache-control" for name, _ in response.headers):
            response.headers.append(_NO_STORE)
        return response

    def _valid_login(self, request: Request) -> bool:
        """Whether ``request`` is ``GET``/``HEAD /?token=`` with the right token."""
        if self._token is None or not _is_login(request):
            return False
        given = session.query_token(request.query) or ""
        return hmac.compare_digest(given.encode(), self._token)

    def _refusal(self, request: Request) -> Response | None:
        """``None`` when ``request`` may proceed, else the 401/403 answer.

        Accepted: the bearer token; on ``GET``/``HEAD /`` a ``?token=`` query parameter;
        a dashboard session cookie, for state-changing methods only with the CSRF header
        from the listener's own origin (see :mod:`fastedge.admin.session`).
        """
        rid = request.request_id
        safe = request.method in _SAFE_METHODS
        if self._token is None or request.path in _OPEN_PATHS:
            if safe or not session.cross_origin(request.header):
                return None
            # No token to steal, but a web page must still not drive the API from a browser.
            return Response.error(403, "cross-origin admin requests are refused", rid, [_NO_STORE])
        value = request.header("authorization") or ""
        scheme, _, credentials = value.partition(" ")
        # Constant-time comparisons: the token must not leak through response timing.
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self._token
        ):
            return None
        if self._valid_login(request):
            return None
        cookie = session.cookie_value(request.headers)
        if cookie is not None and session.valid_session(self._token, cookie):
            if safe:
                return None
            if request.header(session.CSRF_HEADER) is None or session.cross_origin(request.header):
                return Response.error(
                    403,
                    "a change authenticated by the session cookie needs the "
                    "X-Fastedge-Admin header from the admin origin (CSRF protection)",
                    rid,
                    [_NO_STORE],
                )
            return None
        return Response.error(
            401,
            "missing or invalid admin token",
            rid,
            [("www-authenticate", 'Bearer realm="fastedge-admin"'), _NO_STORE],
        )

    # -- built-in endpoints ---------------------------------------------------------------------

    async def _healthz(self, request: AdminRequest) -> Response:
        return Response.json({"status": "ok"})

    async def _readyz(self, request: AdminRequest) -> Response:
        if self._ready():
            return Response.json({"status": "ready"})
        return Response.error(503, "not ready", request.request_id)

    async def _metrics_text(self, request: AdminRequest) -> Response:
        return Response(200, [("content-type", CONTENT_TYPE)], self._metrics.render())

    async def _config(self, request: AdminRequest) -> Response:
        return Response.json(self._config_view())
