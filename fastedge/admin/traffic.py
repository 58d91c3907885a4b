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

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

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

_T = TypeVar("_T")


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


async def _change(invalid: str, change: Awaitable[_T]) -> _T:
    """Await a store change, answering its refusals: an unknown name is 404, a value the
    store rejects 400 (``"<invalid>: <why>"``), shared state that is down 503."""
    try:
        return await change
    except UnknownName as exc:
        raise AdminError(404, str(exc)) from None
    except ValueError as exc:
        raise AdminError(400, f"{invalid}: {exc}") from None
    except TrafficUnavailable as exc:
        raise AdminError(503, f"{exc}; nothing changed, try again") from None


def admin_routes(server: ProxyServer) -> dict[tuple[str, str], Handler]:
    """The traffic and flag endpoints for ``server``."""

    def store() -> TrafficStore | None:
        return store_for(server.runtime, server.gateway.config)

    def found(
        name: str, kind: str, get: Callable[[TrafficStore, str], _T]
    ) -> tuple[TrafficStore, _T]:
        """The store and ``get(store, name)`` (a split or flag); 404 when there is none."""
        current = store()
        if current is None:
            raise AdminError(404, f"no {kind} named {name!r}")
        try:
            return current, get(current, name)
        except UnknownName as exc:
            raise AdminError(404, str(exc)) from None

    async def list_splits(request: AdminRequest) -> AdminResponse:
        current = store()
        splits = []
        if current is not None:
            for name in current.split_configs:
                splits.append(split_view(*current.split(name)))
        return AdminResponse.json({"splits": splits})

    async def get_split(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        _, (cfg, split) = found(name, "traffic split", TrafficStore.split)
        return AdminResponse.json(split_view(cfg, split))

    async def put_split(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        current, _ = found(name, "traffic split", TrafficStore.split)  # 404 before the body
        body = request.json()
        split, persisted = await _change(
            f"invalid weights for {name!r}", current.set_weights(name, body)
        )
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
        _, (cfg, rollout) = found(name, "feature flag", TrafficStore.flag)
        return AdminResponse.json(flag_view(cfg, rollout))

    async def put_flag(request: AdminRequest) -> AdminResponse:
        name = request.params["name"]
        current, _ = found(name, "feature flag", TrafficStore.flag)  # 404 before the body
        body = request.json()
        if not isinstance(body, dict) or "percent" not in body:
            raise AdminError(400, 'expected a JSON object like {"percent": 20}')
        extra = sorted(set(body) - {"percent"})
        if extra:
            raise AdminError(
                400, f"only 'percent' can change at runtime (got {', '.join(map(repr, extra))})"
            )
        rollout, persisted = await _change(
            f"invalid flag {name!r}", current.set_percent(name, body["percent"])
        )
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
