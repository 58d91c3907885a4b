"""The live admin dashboard: ``GET /`` on the admin listener, and the JSON it reads.

Endpoints added to the admin API (``fastedge.server.ADMIN_EXTENSIONS``):

=========================  ===================================================================
``GET /``                  the page (``fastedge/admin/dashboard/index.html``)
``GET /dashboard/{file}``  its script and stylesheet (package data; no CDN, no build step)
``GET /stats``             the last ten minutes, per second: request rate, 5xx rate, p50/p99
                           latency (``?seconds=N`` for the last N points only)
``GET /routes``            the current routes: name, prefix, host, methods, upstream, policies
=========================  ===================================================================

Every one of them is token-protected like the rest of the admin API; a browser opens the
page once as ``/?token=TOKEN`` and then holds a session cookie
(:mod:`fastedge.admin.session`). The page also reads ``GET /upstreams``, ``GET /traffic``,
``GET /flags`` and ``GET /traces`` and changes splits and flags with ``PUT /traffic/{name}``
and ``PUT /flags/{name}``; a section whose endpoint answers 404 says "not configured".

Statistics come from a :class:`~fastedge.admin.stats.StatsSampler` that reads the metric
counters once per second; it is a process-wide runtime service, so ``Runtime.close`` stops
it at shutdown and the request path pays nothing for it.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from fastedge.admin.api import AdminError, AdminRequest, AdminResponse, Handler
from fastedge.admin.stats import WINDOW, StatsSampler
from fastedge.config import redacted

if TYPE_CHECKING:
    from fastedge.server import ProxyServer

__all__ = ["STATIC_FILES", "admin_routes"]

STATIC_FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
"""The files of ``fastedge/admin/dashboard/`` and their content types."""

# The page runs only its own script and talks only to its own origin: no inline script,
# no framing (the traffic controls must not be clickjacked), no referrer.
_PAGE_HEADERS: list[tuple[str, str]] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
]

_ROUTE_FIELDS = ("name", "prefix", "host", "methods", "upstream", "strip_prefix", "rewrite")


def _load_static() -> dict[str, bytes]:
    folder = resources.files("fastedge").joinpath("admin", "dashboard")
    return {name: folder.joinpath(name).read_bytes() for name in STATIC_FILES}


def admin_routes(server: ProxyServer) -> dict[tuple[str, str], Handler]:
    """The dashboard's admin endpoints for ``server`` (an ``ADMIN_EXTENSIONS`` provider).

    Starts the process's stats sampler (once; it outlives config reloads).
    """
    static = _load_static()  # read once: a missing file fails at startup, not on a click
    sampler: StatsSampler = server.runtime.service(
        "admin.stats", lambda: StatsSampler(server.metrics)
    )
    sampler.start()

    def serve(name: str) -> AdminResponse:
        return AdminResponse(
            200, [("content-type", STATIC_FILES[name]), *_PAGE_HEADERS], static[name]
        )

    async def page(request: AdminRequest) -> AdminResponse:
        return serve("index.html")

    async def asset(request: AdminRequest) -> AdminResponse:
        name = request.params["file"]
        if name not in STATIC_FILES or name == "index.html":
            raise AdminError(404, "not found")
        return serve(name)

    async def stats(request: AdminRequest) -> AdminResponse:
        values = parse_qs(request.query).get("seconds")
        seconds: int | None = None
        if values:
            try:
                seconds = int(values[0])
            except ValueError:
                raise AdminError(400, "seconds must be an integer") from None
            if not 0 <= seconds <= WINDOW:
                raise AdminError(400, f"seconds must be between 0 and {WINDOW}")
        return AdminResponse.json(sampler.snapshot(seconds))

    async def routes(request: AdminRequest) -> AdminResponse:
        return AdminResponse.json({"routes": route_view(server)})

    return {
        ("GET", "/"): page,
        ("GET", "/dashboard/{file}"): asset,
        ("GET", "/stats"): stats,
        ("GET", "/routes"): routes,
    }


def route_view(server: ProxyServer) -> list[dict[str, Any]]:
    """The current generation's routes as JSON (secrets redacted like ``GET /config``)."""
    view = redacted(server.gateway.config)
    out = []
    for route in view["routes"]:
        item = {key: route.get(key) for key in _ROUTE_FIELDS}
        item["policies"] = route.get("policies", {})
        out.append(item)
    return out
