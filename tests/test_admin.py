"""Admin listener over real loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from fastedge.admin import AdminError, AdminRequest, AdminResponse, AdminServer, Handler
from fastedge.minihttp import Limits
from fastedge.observe.metrics import Metrics
from tests.conftest import call
from tests.test_metrics import check_histogram, parse_exposition

TOKEN = "s3cret-token"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


class State:
    def __init__(self) -> None:
        self.ready = False
        self.metrics = Metrics()
        self.config: dict[str, Any] = {"server": {"listen": "127.0.0.1:8080"}, "routes": []}


@pytest.fixture
def state() -> State:
    return State()


async def _traffic(request: AdminRequest) -> AdminResponse:
    if request.method == "PUT":
        data = request.json()
        if not isinstance(data, dict) or "blue" not in data:
            raise AdminError(422, "need weights")
        return AdminResponse.json({"name": request.params["name"], "weights": data})
    return AdminResponse.json({"name": request.params["name"]})


EXTRA: dict[tuple[str, str], Handler] = {
    ("PUT", "/traffic/{name}"): _traffic,
    ("GET", "/traffic/{name}"): _traffic,
}


@pytest.fixture
async def admin(state: State) -> AsyncIterator[AdminServer]:
    server = AdminServer(
        "127.0.0.1",
        0,
        metrics=state.metrics,
        ready=lambda: state.ready,
        config_view=lambda: state.config,
        token=TOKEN,
        extra_routes=EXTRA,
        limits=Limits(max_head_bytes=4096, max_body_bytes=1024),
    )
    await server.start()
    yield server
    await server.close()


def _error(body: bytes, status: int) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(body)
    assert set(data) == {"error", "status", "request_id"}
    assert data["status"] == status
    assert data["request_id"]
    return data


async def test_healthz_open_without_token(admin: AdminServer) -> None:
    status, headers, body = await call(admin.port, "GET", "/healthz")
    assert status == 200
    assert orjson.loads(body) == {"status": "ok"}
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"


async def test_readyz_flips(admin: AdminServer, state: State) -> None:
    status, _, body = await call(admin.port, "GET", "/readyz")
    assert status == 503
    _error(body, 503)
    state.ready = True
    status, _, body = await call(admin.port, "GET", "/readyz")
    assert status == 200
    assert orjson.loads(body) == {"status": "ready"}


async def test_metrics_requires_token(admin: AdminServer, state: State) -> None:
    status, headers, body = await call(admin.port, "GET", "/metrics")
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    _error(body, 401)
    for bad in ("Bearer wrong", f"Basic {TOKEN}", TOKEN, "Bearer", f"Bearer {TOKEN}x"):
        status, _, _ = await call(admin.port, "GET", "/metrics", {"Authorization": bad})
        assert status == 401, bad

    state.metrics.observe_request("/api/users", "GET", 200, 0.004, 0.003)
    status, headers, body = await call(admin.port, "GET", "/metrics", AUTH)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = parse_exposition(body.decode())
    assert check_histogram(families["fastedge_request_duration_seconds"])["/api/users"][2] == 1


async def test_config_view(admin: AdminServer, state: State) -> None:
    assert (await call(admin.port, "GET", "/config"))[0] == 401
    status, _, body = await call(admin.port, "GET", "/config", {"authorization": f"bearer {TOKEN}"})
    assert status == 200
    assert orjson.loads(body) == state.config


async def test_unknown_path_and_wrong_method(admin: AdminServer) -> None:
    status, _, body = await call(admin.port, "GET", "/nope", AUTH)
    assert status == 404
    _error(body, 404)
    status, headers, body = await call(admin.port, "POST", "/metrics", AUTH, b"")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    _error(body, 405)
    status, headers, _ = await call(admin.port, "DELETE", "/traffic/products", AUTH)
    assert status == 405
    assert headers["allow"] == "GET, HEAD, PUT"


async def test_head_is_get_without_body(admin: AdminServer) -> None:
    status, headers, body = await call(admin.port, "HEAD", "/healthz")
    assert status == 200
    assert body == b""
    assert headers["content-length"] == str(len(b'{"status":"ok"}'))


async def test_extra_routes_with_params(admin: AdminServer) -> None:
    payload = orjson.dumps({"blue": 90, "green": 10})
    status, _, body = await call(admin.port, "PUT", "/traffic/products", AUTH, payload)
    assert status == 200
    assert orjson.loads(body) == {"name": "products", "weights": {"blue": 90, "green": 10}}
    assert (await call(admin.port, "PUT", "/traffic/products", None, payload))[0] == 401
    status, _, body = await call(admin.port, "PUT", "/traffic/products", AUTH, b"{not json")
    assert status == 400
    assert _error(body, 400)["error"] == "request body is not valid JSON"
    status, _, body = await call(admin.port, "PUT", "/traffic/products", AUTH, b"[]")
    _error(body, 422)
    status, _, body = await call(admin.port, "GET", "/traffic/a%20b", AUTH)
    assert orjson.loads(body) == {"name": "a b"}
    assert (await call(admin.port, "GET", "/traffic/a/b", AUTH))[0] == 404


async def test_request_limits(admin: AdminServer) -> None:
    status, headers, body = await call(admin.port, "PUT", "/traffic/x", AUTH, b"x" * 2048)
    assert status == 413
    assert headers["connection"] == "close"
    _error(body, 413)
    status, _, body = await call(admin.port, "GET", "/healthz", {"x-big": "y" * 5000})
    assert status == 431
    _error(body, 431)


async def test_request_id_is_echoed(admin: AdminServer) -> None:
    _, headers, body = await call(admin.port, "GET", "/nope", {"X-Request-Id": "abc-123"})
    assert headers["x-request-id"] == "abc-123"
    assert _error(body, 401)["request_id"] == "abc-123"
    # Unsafe ids are replaced, never reflected.
    _, headers, _ = await call(admin.port, "GET", "/healthz", {"X-Request-Id": "a b<script>"})
    assert headers["x-request-id"] != "a b<script>"


async def test_no_token_means_open(state: State) -> None:
    server = AdminServer(
        "127.0.0.1", 0, metrics=state.metrics, ready=lambda: True, config_view=dict, token=None
    )
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.start()
    try:
        status, _, body = await call(server.port, "GET", "/config")
        assert status == 200
        assert orjson.loads(body) == {}
    finally:
        await server.close()


def test_extra_routes_cannot_replace_builtins(state: State) -> None:
    with pytest.raises(ValueError, match="built-in"):
        AdminServer(
            "127.0.0.1",
            0,
            metrics=state.metrics,
            ready=lambda: True,
            config_view=dict,
            token=None,
            extra_routes={("GET", "/metrics"): _traffic},
        )
