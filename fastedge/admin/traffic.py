"""Admin endpoints for traffic splits and feature flags (``fastedge.server.ADMIN_EXTENSIONS``).

=========================  ==============================================================
``GET /traffic``           ``{"splits": [{"name", "versions", "weights"}, ...]}``
``GET /traffic/{name}``    one split: ``{"name", "versions", "weights"}``
``PUT /traffic/{name}``    body ``{"blue": 90, "green": 10}`` → 200 ``{"name", "weights",
                           "versions", "persisted"}``; 400 invalid (the old split stays),
                           404 unknown, 503 shared state (Redis) down (nothing changed)
``GET /flags``             ``{"flags": [{"name", "percent", "user", "upstream", "header"}]}``
``GET /flags/{name}``      one flag
``PUT /flags/{name}``      body ``{"percent": 20}`` → 200 the flag and ``"persisted"``
=========================  ==============================================================

``versions`` maps version → upstream name; ``weights`` version → integer weight (every
version, in config order). ``user`` is the flag's user id sources joined with ``", "``
(``"claim:sub, header:x-user-id"``); ``upstream`` and ``header`` are ``null`` when unset.
``persisted`` tells whether the change reached the state file or Redis (``false`` when the
state lives in memory only or the file could not be written: the change serves anyway).
Token auth comes from the admin server; GET never changes anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastedge.admin.api import AdminError, AdminRequest, AdminResponse, Handler
from fastedge.traffic import (
    FlagConfig,
    Rollout,
    Split,
    SplitConfig,
    TrafficStore,
    TrafficUnavailable,
    UnknownName,
    store_for,
)

if TYPE_CHECKING:
    from fastedge.server import ProxyServer

__all__ = ["admin_routes", "flag_view", "split_view"]


def split_view(cfg: SplitConfig, split: Split) -> dict[str, Any]:
    """A split as the admin API shows it."""
    return {"name": cfg.name, "versions": dict(cfg.versions), "weights": split.weights_dict()}


def flag_view(cfg: FlagConfig, rollout: Rollout) -> dict[str, Any]:
    """A flag as the admin API shows it."""
    return {
        "name": cfg.name,
        "percent": rollout.percent,
        "user": ", ".join(cfg.user),
        "upstream": cfg.upstream,
        "header": cfg.header,
    }


def admin_routes(server: ProxyServer) -> dict[tuple[str, str], Handler]:
    """The traffic and flag endpoints for ``server``."""

    def store() -> TrafficStore | None:
        return store_for(server.runtime, server.gateway.config)

    def found(name: str, kind: str) -> TrafficStore:
        current = store()
        if current is None:
            raise AdminError(404, f"no {kind} named {name!r}")
        return current

    async def list_splits(request: AdminRequest) -> AdminResponse:
        current = store()
        splits = []
        if current is not None:
            for name in current.split_configs:
                splits.append(split_view(*current.split(name)))
        return AdminResponse.json({"splits": splits})

    async def get_split(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        try:
            return AdminResponse.json(split_view(*found(name, "traffic split").split(name)))
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None

    async def put_split(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        current = found(name, "traffic split")
        try:
            current.split(name)  # 404 before looking at the body
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None
        body = request.json()
        try:
            split, persisted = await current.set_weights(name, body)
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None
        except ValueError as exc:
            raise AdminError(400, f"invalid weights for {name!r}: {exc}") from None
        except TrafficUnavailable as exc:
            raise AdminError(503, f"{exc}; nothing changed, try again") from None
        cfg = current.split(name)[0]
        view = split_view(cfg, split)
        return AdminResponse.json(
            {
                "name": name,
                "weights": view["weights"],
                "versions": view["versions"],
                "persisted": persisted,
            }
        )

    async def list_flags(request: AdminRequest) -> AdminResponse:
        current = store()
        flags = []
        if current is not None:
            for name in current.flag_configs:
                flags.append(flag_view(*current.flag(name)))
        return AdminResponse.json({"flags": flags})

    async def get_flag(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        try:
            return AdminResponse.json(flag_view(*found(name, "feature flag").flag(name)))
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None

    async def put_flag(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        current = found(name, "feature flag")
        try:
            current.flag(name)  # 404 before looking at the body
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None
        body = request.json()
        if not isinstance(body, dict) or "percent" not in body:
            raise AdminError(400, 'expected a JSON object like {"percent": 20}')
        extra = sorted(set(body) - {"percent"})
        if extra:
            raise AdminError(
                400, f"only 'percent' can change at runtime (got {', '.join(map(repr, extra))})"
            )
        try:
            rollout, persisted = await current.set_percent(name, body["percent"])
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None
        except ValueError as exc:
            raise AdminError(400, f"invalid flag {name!r}: {exc}") from None
        except TrafficUnavailable as exc:
            raise AdminError(503, f"{exc}; nothing changed, try again") from None
        view = flag_view(current.flag(name)[0], rollout)
        view["persisted"] = persisted
        return AdminResponse.json(view)

    return {
        ("GET", "/traffic"): list_splits,
        ("GET", "/traffic/{name}"): get_split,
        ("PUT", "/traffic/{name}"): put_split,
        ("GET", "/flags"): list_flags,
        ("GET", "/flags/{name}"): get_flag,
        ("PUT", "/flags/{name}"): put_flag,
    }
