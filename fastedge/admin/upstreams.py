"""Admin endpoints for upstreams: state, and runtime target changes.

====================================  ==================================================
``GET /upstreams``                    every upstream of the live config: targets with
                                      weight, priority, health, ejection, breaker state,
                                      requests in flight and pool gauges
``PUT /upstreams/{name}/targets``     replace the targets of one upstream at runtime
====================================  ==================================================

``GET /upstreams`` answers::

    {"upstreams": [{"name": "users", "balance": "round_robin", "targets": [
        {"url": "http://127.0.0.1:9001", "weight": 1, "priority": 0, "healthy": true,
         "ejected": false, "breaker": "closed", "inflight": 0,
         "pool": {"idle": 2, "active": 0, "waiting": 0}}]}]}

``PUT /upstreams/{name}/targets`` takes ``{"targets": [{"url": "http://10.0.0.5:80",
"weight": 2, "priority": 0}, ...]}`` (a plain URL string is a target of weight 1,
priority 0), validated by the config file's rules. Targets whose URL stays keep their
connections, breaker and health state; new ones start healthy; removed ones drain (no
request is dropped). An invalid body is refused with 400 and nothing changes. The
change lasts until the next config reload, which applies the file's targets again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastedge.admin.api import AdminError, AdminRequest, AdminResponse, Handler
from fastedge.config import ConfigError, parse_targets

if TYPE_CHECKING:
    from fastedge.gateway import Upstream
    from fastedge.server import ProxyServer


def upstream_routes(server: ProxyServer) -> dict[tuple[str, str], Handler]:
    """The endpoints, for ``fastedge.server.ADMIN_EXTENSIONS``."""

    async def list_upstreams(request: AdminRequest) -> AdminResponse:
        upstreams = server.gateway.upstreams
        return AdminResponse.json({"upstreams": [up.describe() for up in upstreams.values()]})

    async def put_targets(request: AdminRequest) -> AdminResponse:
        upstream = _upstream(server, request.params["name"])
        body: Any = request.json()
        if not isinstance(body, dict) or set(body) != {"targets"}:
            raise AdminError(400, 'expected a JSON object {"targets": [...]}')
        try:
            targets = parse_targets(body["targets"])
        except ConfigError as err:
            raise AdminError(400, "; ".join(err.errors)) from None
        upstream.set_targets(targets)
        return AdminResponse.json({"upstream": upstream.describe()})

    return {
        ("GET", "/upstreams"): list_upstreams,
        ("PUT", "/upstreams/{name}/targets"): put_targets,
    }


def _upstream(server: ProxyServer, name: str) -> Upstream:
    upstream = server.gateway.upstreams.get(name)
    if upstream is None:
        raise AdminError(404, f"no upstream named {name!r}")
    return upstream
