"""Browser sessions for the admin listener: how the dashboard authenticates.

A browser cannot send ``Authorization: Bearer`` when the user opens a URL, so the
dashboard is opened once as ``http://ADMIN/?token=TOKEN``:

1. ``GET /`` (and only ``GET``/``HEAD`` of ``/``) with a valid ``token`` query parameter
   is served like a bearer-authenticated request, and the answer sets the session cookie
   ``fastedge_admin`` (``HttpOnly; SameSite=Strict; Path=/; Max-Age=43200``). The page's
   script then removes the token from the address bar (``history.replaceState``), and the
   answer carries ``Referrer-Policy: no-referrer``, so the token does not linger in the URL
   or leak in a ``Referer``. The page is answered directly rather than redirected, because
   a ``SameSite=Strict`` cookie set during a navigation that started on another site is
   not sent on the redirected request.
2. Later requests authenticate with the cookie. Its value is not the token but
   ``EXPIRY.HMAC-SHA256(token, "fastedge-admin-session:" EXPIRY)``: it expires after 12
   hours, stops working when the token changes, and never reveals the token — which
   matters because browsers do not isolate cookies by port, so the cookie is also sent to
   other services on the same host name (the gateway itself, for one).
3. CSRF: a cookie-authenticated request that changes state (any method but ``GET`` and
   ``HEAD``) must carry the ``X-Fastedge-Admin`` header and, when it has an ``Origin``,
   come from the admin listener's own origin. A page on another origin cannot add a
   custom header without a CORS preflight, which the admin server never grants, and
   ``SameSite=Strict`` already keeps the cookie off cross-site requests; the header closes
   the gap SameSite leaves open (other ports of the same host are "same-site").

Bearer-token requests (``curl``, scripts) are unaffected. Every comparison with the token
or a cookie MAC is constant-time (:func:`hmac.compare_digest`); nothing here logs.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "CSRF_HEADER",
    "SESSION_COOKIE",
    "SESSION_LIFETIME",
    "cookie_value",
    "cross_origin",
    "make_session",
    "query_token",
    "session_cookie_header",
    "valid_session",
]

SESSION_COOKIE = "fastedge_admin"
CSRF_HEADER = "x-fastedge-admin"
SESSION_LIFETIME = 12 * 3600
"""Seconds a dashboard session lasts: a working day; reopen the ``?token=`` URL after."""

_MAC_CONTEXT = b"fastedge-admin-session:"


def _mac(token: bytes, expires: int) -> str:
    return hmac.new(token, _MAC_CONTEXT + str(expires).encode(), hashlib.sha256).hexdigest()


def make_session(token: bytes, *, now: float | None = None) -> str:
    """A fresh cookie value for ``token``, valid for :data:`SESSION_LIFETIME` seconds."""
    expires = int(time.time() if now is None else now) + SESSION_LIFETIME
    return f"{expires}.{_mac(token, expires)}"


def valid_session(token: bytes, value: str, *, now: float | None = None) -> bool:
    """Whether ``value`` is an unexpired session cookie made for ``token``."""
    expires_text, dot, mac = value.partition(".")
    if not dot or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if expires <= (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac.encode(), _mac(token, expires).encode())


def session_cookie_header(value: str) -> tuple[str, str]:
    """The ``Set-Cookie`` header carrying session ``value``."""
    return (
        "set-cookie",
        f"{SESSION_COOKIE}={value}; Path=/; Max-Age={SESSION_LIFETIME}; HttpOnly; SameSite=Strict",
    )


def cookie_value(headers: Iterable[tuple[str, str]], name: str = SESSION_COOKIE) -> str | None:
    """The value of cookie ``name`` in the request's ``Cookie`` header(s) (RFC 6265 §5.4:
    ``name=value`` pairs separated by ``;``), or ``None``."""
    for key, value in headers:
        if key != "cookie":
            continue
        for pair in value.split(";"):
            cname, eq, cvalue = pair.strip().partition("=")
            if eq and cname == name:
                return cvalue.strip().strip('"')
    return None


def query_token(query: str) -> str | None:
    """The ``token`` query parameter (the first one), or ``None``."""
    values = parse_qs(query, keep_blank_values=True).get("token")
    return values[0] if values else None


def cross_origin(header: Callable[[str], str | None]) -> bool:
    """True when a browser says the request came from another origin.

    ``Origin`` (sent by browsers on every non-GET fetch) must name the same host and port
    as ``Host``; ``Sec-Fetch-Site`` other than ``same-origin``/``none`` also counts as
    cross-origin. Requests without either header (curl, scripts) are not cross-origin.
    """
    site = header("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = header("origin")
    if origin is None:
        return False
    if origin == "null":  # sandboxed frames, file: pages, some redirects
        return True
    parts = urlsplit(origin)
    host = header("host")
    return host is None or parts.netloc.lower() != host.lower()
