"""Dashboard sessions on the admin listener: ``/?token=`` login, the session cookie, and
CSRF protection for cookie-authenticated changes (real admin listener, stdlib client)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from fastedge.admin import session
from fastedge.admin.api import AdminRequest, AdminResponse, AdminServer
from fastedge.observe.metrics import Metrics
from tests.conftest import call

TOKEN = "dashboard-s3cret-token"


class Recorder:
    """Extra admin routes that record what reached them."""

    def __init__(self) -> None:
        self.puts: list[bytes] = []

    async def page(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse.text("<html>dashboard</html>", content_type="text/html")

    async def put(self, request: AdminRequest) -> AdminResponse:
        self.puts.append(request.body)
        return AdminResponse.json({"ok": True})

    async def post(self, request: AdminRequest) -> AdminResponse:
        self.puts.append(request.body)
        return AdminResponse.json({"ok": True})


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


async def _start(recorder: Recorder, token: str | None) -> AdminServer:
    server = AdminServer(
        "127.0.0.1",
        0,
        metrics=Metrics(),
        ready=lambda: True,
        config_view=dict,
        token=token,
        extra_routes={
            ("GET", "/"): recorder.page,
            ("PUT", "/traffic/{name}"): recorder.put,
            ("POST", "/traffic/{name}"): recorder.post,
        },
    )
    await server.start()
    return server


@pytest.fixture
async def admin(recorder: Recorder) -> AsyncIterator[AdminServer]:
    server = await _start(recorder, TOKEN)
    yield server
    await server.close()


def _error(body: bytes, status: int) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(body)
    assert set(data) == {"error", "status", "request_id"} and data["status"] == status
    return data


async def _login(admin: AdminServer) -> str:
    status, headers, body = await call(admin.port, "GET", f"/?token={TOKEN}")
    assert status == 200 and body == b"<html>dashboard</html>"
    cookie = headers["set-cookie"]
    name_value, *attributes = [part.strip() for part in cookie.split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
    assert f"Max-Age={session.SESSION_LIFETIME}" in attributes
    name, _, value = name_value.partition("=")
    assert name == session.SESSION_COOKIE
    assert TOKEN not in value  # a MAC of the token, never the token itself
    assert headers["referrer-policy"] == "no-referrer"
    return name_value


# --- the cookie value ----------------------------------------------------------------------


def test_session_values_expire_and_bind_to_the_token() -> None:
    token = TOKEN.encode()
    value = session.make_session(token, now=1000)
    assert session.valid_session(token, value, now=1000)
    assert session.valid_session(token, value, now=1000 + session.SESSION_LIFETIME - 1)
    assert not session.valid_session(token, value, now=1000 + session.SESSION_LIFETIME)
    assert not session.valid_session(b"another-token", value, now=1000)
    expires, _, mac = value.partition(".")
    # Moving the expiry forward breaks the MAC; so does any edit of the MAC.
    assert not session.valid_session(token, f"{int(expires) + 3600}.{mac}", now=1000)
    assert not session.valid_session(token, f"{expires}.{mac[:-1]}0", now=1000)
    for junk in ("", ".", "abc.def", "12", "-5.ab", "9" * 40 + ".00"):
        assert not session.valid_session(token, junk, now=1000)


def test_cookie_parsing() -> None:
    headers = [("cookie", 'a=1; fastedge_admin="v.1" ; b=2'), ("cookie", "c=3")]
    assert session.cookie_value(headers) == "v.1"
    assert session.cookie_value(headers, "c") == "3"
    assert session.cookie_value([("cookie", "fastedge_adminx=1; xfastedge_admin=2")]) is None
    assert session.cookie_value([]) is None


def test_cross_origin_rules() -> None:
    def check(**headers: str) -> bool:
        table = {k.replace("_", "-"): v for k, v in headers.items()}
        return session.cross_origin(table.get)

    assert not check(host="127.0.0.1:9901")  # curl: no Origin, no Sec-Fetch-Site
    assert not check(host="127.0.0.1:9901", origin="http://127.0.0.1:9901")
    assert not check(host="127.0.0.1:9901", sec_fetch_site="same-origin")
    assert check(host="127.0.0.1:9901", origin="http://127.0.0.1:8080")  # other port
    assert check(host="127.0.0.1:9901", origin="http://evil.example")
    assert check(host="127.0.0.1:9901", origin="null")
    assert check(host="127.0.0.1:9901", sec_fetch_site="same-site")
    assert check(host="127.0.0.1:9901", sec_fetch_site="cross-site")
    assert check(origin="http://127.0.0.1:9901")  # no Host to compare with


# --- the admin listener --------------------------------------------------------------------


async def test_the_page_needs_the_token(admin: AdminServer) -> None:
    for path in ("/", "/?token=", "/?token=wrong", f"/?token={TOKEN}x", f"/?x={TOKEN}"):
        status, headers, body = await call(admin.port, "GET", path)
        assert status == 401, path
        assert "set-cookie" not in headers
        _error(body, 401)
    # ?token= is a login only for GET /; elsewhere it is refused like no token at all.
    status, _, _ = await call(admin.port, "GET", f"/metrics?token={TOKEN}")
    assert status == 401
    status, _, _ = await call(admin.port, "PUT", f"/traffic/x?token={TOKEN}", body=b"{}")
    assert status == 401


async def test_login_sets_a_session_cookie_that_reads(admin: AdminServer) -> None:
    cookie = await _login(admin)
    status, headers, body = await call(admin.port, "GET", "/metrics", {"Cookie": cookie})
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    status, _, body = await call(admin.port, "GET", "/", {"Cookie": cookie})
    assert status == 200 and body == b"<html>dashboard</html>"
    # Bearer requests and the cookie-refreshing login are independent of each other.
    status, headers, _ = await call(admin.port, "GET", "/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "set-cookie" not in headers


async def test_forged_or_foreign_cookies_are_refused(
    admin: AdminServer, recorder: Recorder
) -> None:
    other = session.make_session(b"the-token-of-another-deployment")
    expired = session.make_session(TOKEN.encode(), now=0)
    for value in (other, expired, "1.2", TOKEN):
        cookie = f"{session.SESSION_COOKIE}={value}"
        status, _, body = await call(admin.port, "GET", "/metrics", {"Cookie": cookie})
        assert status == 401, value
        _error(body, 401)


async def test_cookie_changes_need_the_csrf_header_and_the_same_origin(
    admin: AdminServer, recorder: Recorder
) -> None:
    cookie = await _login(admin)
    host = f"127.0.0.1:{admin.port}"
    refused = [
        # What a form or a no-cors fetch from another page can send: the cookie alone.
        {"Cookie": cookie},
        {"Cookie": cookie, "Origin": f"http://{host}"},
        # The header, but from another origin (another port of the same host counts).
        {"Cookie": cookie, "X-Fastedge-Admin": "1", "Origin": "http://127.0.0.1:1"},
        {"Cookie": cookie, "X-Fastedge-Admin": "1", "Sec-Fetch-Site": "same-site"},
    ]
    for headers in refused:
        for method in ("PUT", "POST"):
            status, _, body = await call(
                admin.port, method, "/traffic/products", headers, b'{"blue": 0}'
            )
            assert status == 403, (method, headers)
            assert "CSRF" in _error(body, 403)["error"]
    assert recorder.puts == []  # nothing reached the handler

    ok = {"Cookie": cookie, "X-Fastedge-Admin": "dashboard", "Origin": f"http://{host}"}
    status, _, body = await call(admin.port, "PUT", "/traffic/products", ok, b'{"blue": 1}')
    assert status == 200 and orjson.loads(body) == {"ok": True}
    assert recorder.puts == [b'{"blue": 1}']


async def test_bearer_changes_are_unaffected(admin: AdminServer, recorder: Recorder) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://elsewhere.example"}
    status, _, _ = await call(admin.port, "PUT", "/traffic/products", headers, b"{}")
    assert status == 200
    assert recorder.puts == [b"{}"]


async def test_without_a_token_cross_origin_changes_are_still_refused(
    recorder: Recorder,
) -> None:
    admin = await _start(recorder, None)
    try:
        status, _, body = await call(
            admin.port, "PUT", "/traffic/x", {"Origin": "http://evil.example"}, b"{}"
        )
        assert status == 403
        _error(body, 403)
        status, _, _ = await call(admin.port, "GET", "/", {"Origin": "http://evil.example"})
        assert status == 200  # reads stay open without a token
        status, _, _ = await call(admin.port, "PUT", "/traffic/x", body=b"{}")
        assert status == 200  # curl and scripts send no Origin
        assert recorder.puts == [b"{}"]
    finally:
        await admin.close()


async def test_the_token_never_reaches_the_logs(
    admin: AdminServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _login(admin)
    await call(admin.port, "GET", f"/?token={TOKEN}x")
    await call(admin.port, "GET", f"/nope?token={TOKEN}")
    assert TOKEN not in caplog.text
