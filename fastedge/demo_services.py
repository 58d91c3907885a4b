"""The demo's upstream services: real HTTP servers on loopback (DESIGN.md §7).

* **users** — ``GET /`` lists alice, bob and mallory (disabled); ``GET /{name}`` one user
  or 404. When the request carries ``X-User-Id`` (set by the gateway's auth filter), the
  answer repeats it in an ``X-User-Id`` header so the demo can show who the gateway said
  was calling.
* **products** — ``GET /`` lists products with prices; ``GET /{id}`` one product or 404.
  Answers carry ``X-Version`` and ``Cache-Control: max-age=5, stale-while-revalidate=30``
  for the edge cache. One server runs per version (``product_versions``), which is what
  blue/green shifting and canaries route between.
* **auth** — ``POST /token`` with ``{"sub": "alice"}`` answers ``{"token": <HS256 JWT>}``
  with ``sub``, ``iat`` and ``exp`` (now + ``token_ttl``), signed with ``jwt_secret``.
  It issues a token for any subject: deciding whether the account may act (403 for the
  disabled ``mallory``) is the gateway's account check, which the demo wants to show.

Every service also answers, for the proxy's own tests:

* ``GET /healthz`` → ``{"status": "ok", "service": ..., "version": ...}``;
* ``GET /echo`` → JSON ``{"service", "version", "method", "path", "query", "client",
  "headers": [[name, value], ...]}`` (header order and duplicates kept);
* ``POST /echo`` (and ``PUT``) → the request body, with its ``Content-Type``;
* ``GET /bytes/{n}`` → ``n`` bytes of the repeating pattern :data:`BYTES_PATTERN`, sent
  chunked in pieces of at most 64 KiB (``n`` ≤ :data:`MAX_STREAM_BYTES`);
* ``POST /batch`` → the gateway's batch format (docs/batching.md): a JSON array of GET/HEAD
  requests, each answered by this service as if it came alone (the demo's batch route
  ``/api/prices`` uses it on products).

Errors use the house shape ``{"error", "status", "request_id"}``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import jwt
import orjson

from fastedge.filters.batch_wire import WireError, answer_entry, decode_requests, encode_answers
from fastedge.minihttp import HttpServer, Request, Response, error_body, start_server

__all__ = [
    "BYTES_PATTERN",
    "DEMO_PORTS",
    "MAX_STREAM_BYTES",
    "PRODUCTS",
    "USERS",
    "DemoServices",
    "start_demo_services",
]

DEMO_PORTS: dict[str, int] = {
    "users": 9001,
    "products-blue": 9002,
    "auth": 9003,
    "products-green": 9004,
    "products-canary": 9005,
}
"""The fixed ports ``fastedge demo`` uses (``start_demo_services(ports=DEMO_PORTS, ...)``)."""

BYTES_PATTERN = b"0123456789abcdef"
"""``GET /bytes/{n}`` answers this pattern repeated and cut to ``n`` bytes."""

MAX_STREAM_BYTES = 1 << 30
"""Largest ``n`` for ``GET /bytes/{n}`` (1 GiB: plenty for streaming tests, bounded)."""

_STREAM_CHUNK = 64 * 1024
# An item of a batch answer is held in memory whole: 1 MiB (nginx's client_max_body_size
# default) keeps one batch call bounded; larger answers are for unbatched requests.
_MAX_BATCH_ITEM_BYTES = 1024 * 1024

USERS: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "alice", "email": "alice@example.com", "disabled": False},
    {"id": 2, "name": "bob", "email": "bob@example.com", "disabled": False},
    {"id": 3, "name": "mallory", "email": "mallory@example.com", "disabled": True},
)

PRODUCTS: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "edge router", "price": 499.0, "currency": "EUR"},
    {"id": 2, "name": "rate limiter", "price": 99.0, "currency": "EUR"},
    {"id": 3, "name": "cache box", "price": 249.5, "currency": "EUR"},
)

_PRODUCT_CACHE_CONTROL = "max-age=5, stale-while-revalidate=30"

_Route = Callable[[Request, list[str]], Awaitable[Response | None]]


@dataclass
class DemoServices:
    """Running demo services.

    ``ports`` has ``"users"``, ``"auth"``, ``"products-<version>"`` for every product
    version, and ``"products"`` for the first version (the one the demo starts on).
    """

    ports: dict[str, int]
    jwt_secret: bytes
    product_versions: tuple[str, ...]
    _servers: list[HttpServer] = field(default_factory=list, init=False, repr=False)

    async def close(self) -> None:
        """Stop every service (graceful, see :meth:`HttpServer.close`)."""
        await asyncio.gather(*(server.close() for server in self._servers))
        self._servers.clear()


def _segments(path: str) -> list[str]:
    return [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []


def _make_service(
    name: str, version: str, routes: _Route
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a service's own routes with the endpoints every service has."""
    tag = [("x-service", name)]

    async def handle(request: Request) -> Response:
        segments = _segments(request.path)
        method = "GET" if request.method == "HEAD" else request.method
        response: Response | None = None
        if segments == ["healthz"]:
            if method != "GET":
                return _not_allowed(request, "GET, HEAD")
            response = Response.json({"status": "ok", "service": name, "version": version})
        elif segments == ["batch"] and request.method == "POST":
            response = await _batch(request, handle)
        elif segments == ["echo"]:
            response = _echo(request, name, version, method)
        elif len(segments) == 2 and segments[0] == "bytes":
            if method != "GET":
                return _not_allowed(request, "GET, HEAD")
            response = _bytes(request, segments[1])
        else:
            response = await routes(request, segments)
        if response is None:
            response = Response.error(404, "not found", request.request_id)
        response.headers.extend(tag)
        return response

    return handle


async def _batch(request: Request, handle: Callable[[Request], Awaitable[Response]]) -> Response:
    """``POST /batch``: the gateway's batch format (docs/batching.md); each item is served
    by this same service, as if it had come alone."""
    try:
        items = decode_requests(request.body)
    except WireError as exc:
        return Response.error(400, str(exc), request.request_id)
    entries = []
    for item in items:
        path, _, query = item.path.partition("?")
        headers = list(item.headers.items())
        rid = item.headers.get("x-request-id") or request.request_id
        sub = Request(
            method=item.method,
            path=path,
            query=query,
            headers=headers,
            body=b"",
            request_id=rid,
            client=request.client,
        )
        answer = await handle(sub)
        # A streamed body (/bytes/N) goes into the answer whole, so it is bounded.
        body = (
            answer.body
            if isinstance(answer.body, bytes)
            else await _collect(answer.body, _MAX_BATCH_ITEM_BYTES)
        )
        if body is None:
            limit = f"{_MAX_BATCH_ITEM_BYTES} bytes"
            answer = Response.error(500, f"answer exceeds the batch item limit ({limit})", rid)
            body = error_body(500, f"answer exceeds the batch item limit ({limit})", rid)
        entries.append(answer_entry(item.id, answer.status, answer.headers, body))
    return Response(200, [("content-type", "application/json")], encode_answers(entries))


async def _collect(body: AsyncIterable[bytes], limit: int) -> bytes | None:
    """The whole streamed body, or ``None`` as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > limit:
            close = getattr(body, "aclose", None)  # an async generator: finish it now
            if close is not None:
                await close()
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _not_allowed(request: Request, allow: str) -> Response:
    return Response.error(405, "method not allowed", request.request_id, [("allow", allow)])


def _echo(request: Request, name: str, version: str, method: str) -> Response:
    if method == "GET":
        return Response.json(
            {
                "service": name,
                "version": version,
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "client": request.client,
                "headers": [[k, v] for k, v in request.headers],
            }
        )
    if method in ("POST", "PUT"):
        content_type = request.header("content-type") or "application/octet-stream"
        return Response(200, [("content-type", content_type)], request.body)
    return _not_allowed(request, "GET, HEAD, POST, PUT")


def _bytes(request: Request, count: str) -> Response:
    if not count.isdigit() or int(count) > MAX_STREAM_BYTES:
        return Response.error(
            400, f"n must be an integer from 0 to {MAX_STREAM_BYTES}", request.request_id
        )
    return Response(200, [("content-type", "application/octet-stream")], _pattern(int(count)))


async def _pattern(n: int) -> AsyncIterator[bytes]:
    # One 64 KiB block is built once; the last piece is cut from it. The block length is a
    # multiple of the pattern length, so the pattern continues seamlessly across chunks.
    block = BYTES_PATTERN * (_STREAM_CHUNK // len(BYTES_PATTERN))
    remaining = n
    while remaining > 0:
        piece = block if remaining >= len(block) else block[:remaining]
        remaining -= len(piece)
        yield piece


def _users_routes() -> _Route:
    by_name = {user["name"]: user for user in USERS}

    async def routes(request: Request, segments: list[str]) -> Response | None:
        if len(segments) > 1:
            return None
        if request.method not in ("GET", "HEAD"):
            return _not_allowed(request, "GET, HEAD")
        if not segments:
            response = Response.json(list(USERS))
        elif segments[0] in by_name:
            response = Response.json(by_name[segments[0]])
        else:
            return Response.error(404, f"no user {segments[0]!r}", request.request_id)
        caller = request.header("x-user-id")
        if caller is not None:
            response.headers.append(("x-user-id", caller))
        return response

    return routes


def _products_routes(version: str) -> _Route:
    by_id = {str(product["id"]): {**product, "version": version} for product in PRODUCTS}
    listing = list(by_id.values())
    headers = [("x-version", version), ("cache-control", _PRODUCT_CACHE_CONTROL)]

    async def routes(request: Request, segments: list[str]) -> Response | None:
        if len(segments) > 1:
            return None
        if request.method not in ("GET", "HEAD"):
            return _not_allowed(request, "GET, HEAD")
        if not segments:
            return Response.json(listing, headers=list(headers))
        product = by_id.get(segments[0])
        if product is None:
            return Response.error(
                404, f"no product {segments[0]!r}", request.request_id, [("x-version", version)]
            )
        return Response.json(product, headers=list(headers))

    return routes


def _auth_routes(secret: bytes, ttl: int) -> _Route:
    async def routes(request: Request, segments: list[str]) -> Response | None:
        if segments != ["token"]:
            return None
        if request.method != "POST":
            return _not_allowed(request, "POST")
        try:
            data = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return Response.error(400, "body must be JSON", request.request_id)
        sub = data.get("sub") if isinstance(data, dict) else None
        if not isinstance(sub, str) or not sub:
            return Response.error(
                400, 'body must be {"sub": "<non-empty string>"}', request.request_id
            )
        now = int(time.time())
        token = jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")
        return Response.json({"token": token, "token_type": "Bearer", "expires_in": ttl})

    return routes


async def start_demo_services(
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    *,
    product_versions: Sequence[str] = ("blue",),
    jwt_secret: str | bytes | None = None,
    token_ttl: int = 300,
) -> DemoServices:
    """Start users, auth and one products server per version on ``host``.

    ``ports`` may name ``"users"``, ``"auth"``, ``"products"`` (the first version) and
    ``"products-<version>"``; anything missing binds an ephemeral port (0), and keys for
    versions not started are ignored, so :data:`DEMO_PORTS` can always be passed.
    ``jwt_secret`` defaults to 32 random bytes, available as :attr:`DemoServices.jwt_secret`
    for the gateway to verify tokens with.
    """
    versions = tuple(product_versions)
    if not versions or len(set(versions)) != len(versions):
        raise ValueError("product_versions must be non-empty and distinct")
    known = {"users", "auth", "products"} | {k for k in (ports or {}) if k.startswith("products-")}
    unknown = set(ports or {}) - known
    if unknown:
        raise ValueError(f"unknown demo service(s) in ports: {sorted(unknown)}")
    requested = dict(ports or {})
    secret = (
        secrets.token_bytes(32)
        if jwt_secret is None
        else jwt_secret.encode()
        if isinstance(jwt_secret, str)
        else jwt_secret
    )
    if len(secret) < 32:
        # RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
        raise ValueError("jwt_secret must be at least 32 bytes (RFC 7518 §3.2)")
    plan: list[tuple[str, str, _Route, int]] = [
        ("users", "users", _users_routes(), requested.get("users", 0)),
        ("auth", "auth", _auth_routes(secret, token_ttl), requested.get("auth", 0)),
    ]
    for i, version in enumerate(versions):
        key = f"products-{version}"
        port = requested.get(key, requested.get("products", 0) if i == 0 else 0)
        plan.append((key, "products", _products_routes(version), port))

    services = DemoServices(ports={}, jwt_secret=secret, product_versions=versions)
    try:
        for key, name, routes, port in plan:
            version = key.removeprefix("products-") if name == "products" else "v1"
            server = await start_server(_make_service(name, version, routes), host, port)
            services._servers.append(server)
            services.ports[key] = server.port
    except BaseException:
        await services.close()
        raise
    services.ports["products"] = services.ports[f"products-{versions[0]}"]
    return services
