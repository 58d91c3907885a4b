"""Zero-trust JWT auth (fastedge.filters.auth): through the real proxy on both engines, and
the verifier, JWKS source and account check on their own with injected clocks."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastedge.config import ConfigError, _Context, parse_config
from fastedge.errors import ProxyError
from fastedge.filters import FilterContext, Runtime
from fastedge.filters.auth import (
    AuthFilter,
    AuthPolicies,
    AuthPolicy,
    AuthState,
    convert_auth_section,
)
from fastedge.filters.jwks import FetchError, http_get
from fastedge.observe.metrics import Metrics
from fastedge.server import ProxyServer
from tests.conftest import Client, Response, free_port, get

SECRET = "fastedge-test-secret-0123456789-abcdefghijkl"  # 44 bytes: >= 32 for HS256
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256!"
ENV = "FASTEDGE_TEST_JWT_SECRET"
NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- keys, tokens


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_jwk(key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(extra)
    return jwk


@pytest.fixture
def pem_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "rsa.pub.pem"
    path.write_bytes(public_pem(rsa_key))
    return path


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)


def claims(now: float, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sub": "alice", "iat": int(now), "exp": int(now) + 300}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def hs(payload: dict[str, Any], secret: str | bytes = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def unsigned(payload: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def hs_with_public_key_as_secret(payload: dict[str, Any], pem: bytes) -> str:
    """The HS/RS key-confusion forgery: HS256 keyed with the RSA *public* key bytes.
    PyJWT refuses to do this itself, so sign by hand (RFC 7515 §5.1)."""
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + b"."
        + b64(json.dumps(payload).encode())
    )
    sig = hmac.new(pem, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(sig)).decode()


# --------------------------------------------------------------------------- policy helpers


def make_policies(
    policies: dict[str, Any], *, base_dir: str = "", with_redis: bool = False
) -> AuthPolicies:
    names = {"auth": frozenset(policies)}
    if with_redis:
        names["redis"] = frozenset({"url"})
    ctx = _Context(errors=[], base_dir=base_dir, upstream_names=frozenset(), names=names)
    result = convert_auth_section(ctx, "auth", policies)
    assert not ctx.errors, ctx.errors
    assert isinstance(result, AuthPolicies)
    return result


def make_policy(**policy: Any) -> AuthPolicy:
    with_redis = "redis_set" in policy.get("account_check", {})
    return make_policies({"p": policy}, with_redis=with_redis)["p"]


HS_POLICY: dict[str, Any] = {
    "algorithms": ["HS256"],
    "keys": [{"algorithm": "HS256", "secret_env": ENV}],
}


class Clock:
    """An injectable clock: wall time for claims, a monotonic one for TTLs and refreshes."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.mono = 1000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


def make_filter(
    policy: AuthPolicy, clock: Clock, *, runtime: Runtime | None = None
) -> tuple[AuthFilter, Metrics]:
    runtime = runtime or Runtime(metrics=Metrics())
    state = AuthState(policy, runtime, clock=clock.wall, monotonic=clock.monotonic)
    return AuthFilter(state), runtime.metrics


def fctx(token: str | None = None, *extra: tuple[bytes, bytes]) -> FilterContext:
    headers = [(b"host", b"example.test"), *extra]
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    return FilterContext(
        method=b"GET",
        path=b"/x",
        query=b"",
        host=b"example.test",
        client_ip=b"127.0.0.1",
        headers=list(headers),
        upstream_headers=list(headers),
        route="r",
        request_id=b"rid",
    )


async def run(f: AuthFilter, ctx: FilterContext) -> ProxyError | None:
    decision = f.on_request(ctx)
    if decision is None or isinstance(decision, ProxyError):
        return decision
    return await decision


def challenge(err: ProxyError | None) -> bytes:
    assert err is not None
    return dict(err.headers)[b"www-authenticate"]


def auth_total(metrics: Metrics, result: str, policy: str = "p") -> str:
    """The counter line for one result in the Prometheus text."""
    for line in metrics.render().decode().splitlines():
        if (
            line.startswith("fastedge_auth_total{")
            and f'result="{result}"' in line
            and f'policy="{policy}"' in line
        ):
            return line.rsplit(" ", 1)[1]
    return "0"


# --------------------------------------------------------------------------- tiny servers


class JsonServer:
    """A real loopback HTTP server answering ``GET path`` from ``self.routes``
    (path -> (status, JSON-able)); counts requests per path; one request per connection."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, Any]] = {}
        self.hits: dict[str, int] = {}
        self.server: asyncio.Server | None = None
        self.port = 0
        self.hang = False

    async def start(self, port: int = 0) -> JsonServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.hits[path] = self.hits.get(path, 0) + 1
            if self.hang:
                await reader.read()  # until the client gives up
                return
            status, doc = self.routes.get(path, (404, {"error": "not found"}))
            body = json.dumps(doc).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def json_server() -> AsyncIterator[JsonServer]:
    server = await JsonServer().start()
    try:
        yield server
    finally:
        await server.stop()


# --------------------------------------------------------------------------- through the proxy


def proxy_config(origin: int, engine: str, policy: dict[str, Any], **doc: Any) -> Any:
    return parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "http": engine, "access_log": False},
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": [f"http://127.0.0.1:{origin}"]}},
            "routes": [
                {"prefix": "/secure", "upstream": "o", "auth": "default", "rewrite": "/echo"},
                {"prefix": "/", "upstream": "o"},
            ],
            "auth": {"default": policy},
            **doc,
        }
    )


async def fetch(server: ProxyServer, token: str | None = None, extra: str = "") -> Response:
    client = await Client.open(server.port)
    try:
        if token is not None:
            extra += f"Authorization: Bearer {token}\r\n"
        await client.send(get("/secure", extra=extra))
        return await client.read_response()
    finally:
        await client.close()


def upstream_headers(resp: Response) -> dict[str, str]:
    assert resp.status == 200, resp.body
    return {n.lower(): v for n, v in json.loads(resp.body)["headers"]}


async def stop(server: ProxyServer) -> None:
    auth = server.config.sections.get("auth")
    if isinstance(auth, AuthPolicies):
        await auth.aclose()
    await server.shutdown(drain_timeout=1)


@pytest.fixture
def full_policy(pem_file: Path) -> dict[str, Any]:
    """HS256 and RS256 both allowed, so key confusion is really attempted."""
    return {
        "algorithms": ["HS256", "RS256"],
        "issuer": "fastedge-demo",
        "audience": "api",
        "max_age": "10m",
        "keys": [
            {"algorithm": "HS256", "secret_env": ENV},
            {"algorithm": "RS256", "public_key_file": str(pem_file)},
        ],
    }


async def test_valid_hs256_forwards_the_subject_and_strips_authorization(
    origin_port: int, engine_name: str, full_policy: dict[str, Any]
) -> None:
    server = ProxyServer(proxy_config(origin_port, engine_name, full_policy))
    await server.start()
    try:
        token = hs(claims(time.time(), iss="fastedge-demo", aud="api"))
        for _ in range(2):  # the second one is a cache hit
            seen = upstream_headers(
                await fetch(server, token, extra="X-User-Id: mallory\r\nx-user-id: root\r\n")
            )
            assert seen["x-user-id"] == "alice"  # the spoofed copies are gone
            assert "authorization" not in seen
        # a route without auth is untouched
        client = await Client.open(server.port)
        await client.send(get("/echo", extra="X-User-Id: bob\r\n"))
        plain = await client.read_response()
        await client.close()
        assert {n.lower(): v for n, v in json.loads(plain.body)["headers"]}["x-user-id"] == "bob"
        assert auth_total(server.metrics, "ok", "default") == "2"
    finally:
        await stop(server)


async def test_rs256_pem_through_the_proxy(
    origin_port: int, engine_name: str, full_policy: dict[str, Any], rsa_key: rsa.RSAPrivateKey
) -> None:
    server = ProxyServer(proxy_config(origin_port, engine_name, full_policy))
    await server.start()
    try:
        token = jwt.encode(
            claims(time.time(), iss="fastedge-demo", aud=["other", "api"]),
            rsa_key,
            algorithm="RS256",
        )
        assert upstream_headers(await fetch(server, token))["x-user-id"] == "alice"
    finally:
        await stop(server)


@pytest.mark.parametrize("value", [None, "Basic YWxpY2U6cHc=", "Bearer"])
async def test_missing_token_is_a_bare_challenge(
    origin_port: int, engine_name: str, full_policy: dict[str, Any], value: str | None
) -> None:
    server = ProxyServer(proxy_config(origin_port, engine_name, full_policy))
    await server.start()
    try:
        extra = f"Authorization: {value}\r\n" if value is not None else ""
        resp = await fetch(server, extra=extra)
        assert resp.status == 401
        # RFC 6750 §3.1: no error code when no token was presented at all
        assert resp.header("www-authenticate") == b'Bearer realm="fastedge"'
        body = json.loads(resp.body)
        assert body["status"] == 401 and body["error"] == "missing bearer token"
        assert body["request_id"]
        assert auth_total(server.metrics, "missing", "default") == "1"
    finally:
        await stop(server)


def tampered(now: float) -> str:
    """A valid token whose payload was swapped for another subject's (signature kept)."""
    head, _, sig = hs(claims(now, iss="fastedge-demo", aud="api")).split(".")
    forged = hs(claims(now, iss="fastedge-demo", aud="api", sub="admin")).split(".")[1]
    return f"{head}.{forged}.{sig}"


BAD_TOKENS: list[tuple[str, Callable[[float, bytes], str], str, str]] = [
    ("garbage", lambda now, pem: "not-a-jwt", "malformed token", "invalid"),
    ("malformed-base64", lambda now, pem: "e!!!.e$$$.s%%%", "malformed token", "invalid"),
    (
        "tampered-payload",
        lambda now, pem: tampered(now),
        "signature verification failed",
        "invalid",
    ),
    ("three-garbage-parts", lambda now, pem: "a.b.c", "malformed token", "invalid"),
    (
        "expired",
        lambda now, pem: hs(claims(now, iss="fastedge-demo", aud="api", exp=int(now) - 60)),
        "token expired",
        "expired",
    ),
    (
        "not-yet-valid",
        lambda now, pem: hs(claims(now, iss="fastedge-demo", aud="api", nbf=int(now) + 600)),
        "token not yet valid",
        "invalid",
    ),
    (
        "too-old",
        lambda now, pem: hs(
            claims(now, iss="fastedge-demo", aud="api", iat=int(now) - 3600, exp=int(now) + 60)
        ),
        "token too old",
        "expired",
    ),
    (
        "wrong-iss",
        lambda now, pem: hs(claims(now, iss="evil", aud="api")),
        "wrong issuer",
        "invalid",
    ),
    (
        "wrong-aud",
        lambda now, pem: hs(claims(now, iss="fastedge-demo", aud=["web", "admin"])),
        "wrong audience",
        "invalid",
    ),
    (
        "missing-claim",
        lambda now, pem: hs(claims(now, iss="fastedge-demo", aud="api", sub=None)),
        "missing required claim sub",
        "invalid",
    ),
    (
        "alg-none",
        lambda now, pem: unsigned(claims(now, iss="fastedge-demo", aud="api")),
        "algorithm not allowed",
        "invalid",
    ),
    (
        "wrong-secret",
        lambda now, pem: hs(claims(now, iss="fastedge-demo", aud="api"), OTHER_SECRET),
        "signature verification failed",
        "invalid",
    ),
    (
        "hs-rs-confusion",
        lambda now, pem: hs_with_public_key_as_secret(
            claims(now, iss="fastedge-demo", aud="api"), pem
        ),
        "signature verification failed",
        "invalid",
    ),
]


@pytest.mark.parametrize(
    ("make", "description", "result"),
    [pytest.param(m, d, r, id=i) for i, m, d, r in BAD_TOKENS],
)
async def test_bad_tokens_are_401_with_an_invalid_token_challenge(
    origin_port: int,
    engine_name: str,
    full_policy: dict[str, Any],
    pem_file: Path,
    make: Callable[[float, bytes], str],
    description: str,
    result: str,
) -> None:
    server = ProxyServer(proxy_config(origin_port, engine_name, full_policy))
    await server.start()
    try:
        resp = await fetch(server, make(time.time(), pem_file.read_bytes()))
        assert resp.status == 401
        assert resp.header("www-authenticate") == (
            f'Bearer error="invalid_token", error_description="{description}"'.encode()
        )
        body = json.loads(resp.body)
        assert body == {
            "error": f"invalid token: {description}",
            "status": 401,
            "request_id": body["request_id"],
        }
        assert auth_total(server.metrics, result, "default") == "1"
    finally:
        await stop(server)


async def test_duplicate_authorization_fields_are_an_invalid_request(
    origin_port: int, engine_name: str, full_policy: dict[str, Any]
) -> None:
    server = ProxyServer(proxy_config(origin_port, engine_name, full_policy))
    await server.start()
    try:
        token = hs(claims(time.time(), iss="fastedge-demo", aud="api"))
        resp = await fetch(server, token, extra=f"Authorization: Bearer {token}\r\n")
        assert resp.status == 400
        assert b'error="invalid_request"' in (resp.header("www-authenticate") or b"")
    finally:
        await stop(server)


# --------------------------------------------------------------------------- verifier units


async def test_hs_rs_confusion_when_only_rs256_is_allowed(
    pem_file: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    policy = make_policy(
        algorithms=["RS256"], keys=[{"algorithm": "RS256", "public_key_file": str(pem_file)}]
    )
    f, _ = make_filter(policy, clock)
    forged = hs_with_public_key_as_secret(claims(clock.now), pem_file.read_bytes())
    err = await run(f, fctx(forged))
    assert err is not None and err.status == 401
    assert b"algorithm not allowed" in challenge(err)
    good = jwt.encode(claims(clock.now), rsa_key, algorithm="RS256")
    assert await run(f, fctx(good)) is None


async def test_inline_jwk_and_kid_selection(
    rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    policy = make_policy(
        algorithms=["RS256", "HS256"],
        keys=[
            {"jwk": public_jwk(rsa_key, kid="k1", alg="RS256")},
            {"algorithm": "RS256", "jwk": public_jwk(rsa_key2, kid="k2")},
            {"algorithm": "HS256", "secret_env": ENV, "kid": "h1"},
        ],
    )
    assert [k.kid for k in policy.keys] == ["k1", "k2", "h1"]
    f, _ = make_filter(policy, clock)
    for key, kid in ((rsa_key, "k1"), (rsa_key2, "k2")):
        token = jwt.encode(claims(clock.now), key, algorithm="RS256", headers={"kid": kid})
        ctx = fctx(token)
        assert await run(f, ctx) is None
        assert ctx.user == "alice" and ctx.claims is not None and ctx.claims["sub"] == "alice"
    # signed by k2 but naming k1: the kid selects the key, and it does not verify
    wrong = jwt.encode(claims(clock.now), rsa_key2, algorithm="RS256", headers={"kid": "k1"})
    assert b"signature verification failed" in challenge(await run(f, fctx(wrong)))
    # a kid pinned to RS256 cannot be used with HS256
    mixed = hs(claims(clock.now), kid="k1")
    assert b"algorithm not allowed" in challenge(await run(f, fctx(mixed)))
    # no kid: every key pinned to the token's alg is tried
    nokid = jwt.encode(claims(clock.now), rsa_key2, algorithm="RS256")
    assert await run(f, fctx(nokid)) is None
    unknown = hs(claims(clock.now), kid="nope")
    assert b"unknown key id" in challenge(await run(f, fctx(unknown)))


async def test_es256_inline_jwk() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    clock = Clock()
    f, _ = make_filter(
        make_policy(algorithms=["ES256"], keys=[{"jwk": {**jwk, "alg": "ES256"}}]), clock
    )
    assert await run(f, fctx(jwt.encode(claims(clock.now), key, algorithm="ES256"))) is None


async def test_cache_hit_skips_jwt_decode_and_stays_synchronous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real = jwt.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", spy)
    clock = Clock()
    f, metrics = make_filter(make_policy(**HS_POLICY), clock)
    token = hs(claims(clock.now))
    for _ in range(5):
        ctx = fctx(token, (b"x-user-id", b"spoof"))
        assert f.on_request(ctx) is None  # None itself, not an awaitable
        assert ctx.user == "alice"
        assert (b"x-user-id", b"alice") in ctx.upstream_headers
        assert (b"x-user-id", b"spoof") not in ctx.upstream_headers
        assert not any(n == b"authorization" for n, _ in ctx.upstream_headers)
    assert calls == 1
    assert auth_total(metrics, "ok") == "5"


async def test_cache_hits_recheck_the_time_rules() -> None:
    clock = Clock()
    f, _ = make_filter(make_policy(**HS_POLICY, max_age="2m", leeway="0s"), clock)
    token = hs(claims(clock.now, exp=int(clock.now) + 3600))
    assert f.on_request(fctx(token)) is None
    clock.advance(119)
    assert f.on_request(fctx(token)) is None
    clock.advance(2)  # older than max_age now: the cached entry is refused too
    assert b"token too old" in challenge(await run(f, fctx(token)))

    f, _ = make_filter(make_policy(**HS_POLICY, leeway="10s"), clock)
    token = hs(claims(clock.now, exp=int(clock.now) + 60))
    assert f.on_request(fctx(token)) is None
    clock.advance(65)  # past exp, inside the leeway
    assert f.on_request(fctx(token)) is None
    clock.advance(10)
    assert b"token expired" in challenge(await run(f, fctx(token)))


async def test_leeway_and_claim_edge_cases() -> None:
    clock = Clock()
    f, _ = make_filter(make_policy(**HS_POLICY, leeway="30s"), clock)
    now = int(clock.now)
    # nbf 20s ahead: inside the leeway
    assert await run(f, fctx(hs(claims(clock.now, nbf=now + 20)))) is None
    # exp exactly now - leeway: "on or after" is expired (RFC 7519 §4.1.4)
    assert b"token expired" in challenge(await run(f, fctx(hs(claims(clock.now, exp=now - 30)))))
    assert b"issued in the future" in challenge(
        await run(f, fctx(hs(claims(clock.now, iat=now + 600))))
    )
    assert b"exp is not a NumericDate" in challenge(
        await run(f, fctx(hs(claims(clock.now, exp="tomorrow"))))
    )
    assert b"sub is not a string" in challenge(await run(f, fctx(hs(claims(clock.now, sub=7)))))
    crit = hs(claims(clock.now), crit=["exp"])  # RFC 7515 §4.1.11: not understood
    assert b"unsupported critical header" in challenge(await run(f, fctx(crit)))
    assert b"malformed token" in challenge(await run(f, fctx("e30.e30")))  # two parts
    assert b"malformed token" in challenge(await run(f, fctx("W10.e30.AA")))  # header []


async def test_forward_claims_and_keeping_authorization() -> None:
    clock = Clock()
    policy = make_policy(
        **HS_POLICY,
        forward_claims={"sub": "X-User-Id", "roles": "X-Roles", "evil": "X-Evil"},
        strip_authorization=False,
    )
    f, _ = make_filter(policy, clock)
    token = hs(claims(clock.now, roles=["a", "b"], evil="x\r\nInjected: 1"))
    ctx = fctx(token, (b"x-roles", b"admin"))
    assert await run(f, ctx) is None
    up = dict(ctx.upstream_headers)
    assert up[b"x-roles"] == b'["a","b"]'
    assert b"x-evil" not in up  # a claim that would inject fields is not forwarded
    assert up[b"authorization"] == b"Bearer " + token.encode()


# --------------------------------------------------------------------------- JWKS


async def test_jwks_rotation_without_restart(
    origin_port: int,
    engine_name: str,
    json_server: JsonServer,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key2: rsa.RSAPrivateKey,
) -> None:
    json_server.routes["/jwks"] = (200, {"keys": [public_jwk(rsa_key, kid="k1", alg="RS256")]})
    # min_refresh 0: the rotation happens right after the start-up fetch in this test
    policy = {
        "algorithms": ["RS256"],
        "jwks_url": json_server.url("/jwks"),
        "jwks_min_refresh": "0s",
    }
    server = ProxyServer(proxy_config(origin_port, engine_name, policy))
    await server.start()
    try:
        t1 = jwt.encode(claims(time.time()), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert upstream_headers(await fetch(server, t1))["x-user-id"] == "alice"
        # The IdP rotates: k2 appears. A token naming k2 triggers one refresh and passes.
        json_server.routes["/jwks"] = (
            200,
            {"keys": [public_jwk(rsa_key2, kid="k2", alg="RS256")]},
        )
        before = json_server.hits["/jwks"]
        t2 = jwt.encode(
            claims(time.time(), sub="bob"), rsa_key2, algorithm="RS256", headers={"kid": "k2"}
        )
        assert upstream_headers(await fetch(server, t2))["x-user-id"] == "bob"
        assert json_server.hits["/jwks"] == before + 1
    finally:
        await stop(server)


async def test_jwks_down_keeps_cached_keys_and_unknown_kids_are_rate_limited(
    json_server: JsonServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    json_server.routes["/jwks"] = (200, {"keys": [public_jwk(rsa_key, kid="k1")]})
    policy = make_policy(
        algorithms=["RS256"],
        jwks_url=json_server.url("/jwks"),
        jwks_refresh="10m",
        jwks_min_refresh="30s",
        jwks_timeout="2s",
    )
    f, metrics = make_filter(policy, clock)
    try:
        t1 = jwt.encode(claims(clock.now), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        assert await run(f, fctx(t1)) is None  # the first request waits for the first fetch
        assert json_server.hits["/jwks"] == 1
        # Unknown kids: only one refresh per jwks_min_refresh, however many arrive.
        clock.advance(31)
        for i in range(5):
            bogus = jwt.encode(
                claims(clock.now), rsa_key, algorithm="RS256", headers={"kid": f"x{i}"}
            )
            assert b"unknown key id" in challenge(await run(f, fctx(bogus)))
        assert json_server.hits["/jwks"] == 2
        clock.advance(31)
        assert b"unknown key id" in challenge(await run(f, fctx(bogus)))
        assert json_server.hits["/jwks"] == 3
        # The JWKS endpoint goes away; cached keys keep verifying new tokens, and a stale
        # set triggers a background refresh that fails without harm.
        await json_server.stop()
        clock.advance(3600)
        fresh = jwt.encode(
            claims(clock.now, sub="carol"), rsa_key, algorithm="RS256", headers={"kid": "k1"}
        )
        ctx = fctx(fresh)
        assert await run(f, ctx) is None and ctx.user == "carol"
        jwks = f.state.jwks
        assert jwks is not None and jwks.fetches == 4
        await f.aclose()
        assert list(jwks.by_kid) == ["k1"]
        assert auth_total(metrics, "invalid") == "6"
    finally:
        await f.aclose()


async def test_jwks_key_selection_rules(rsa_key: rsa.RSAPrivateKey) -> None:
    from fastedge.filters.jwks import parse_jwks

    doc = {
        "keys": [
            public_jwk(rsa_key, kid="a"),  # no alg: the policy's only RSA alg pins it
            public_jwk(rsa_key, kid="b", use="enc"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "c"},
            {**public_jwk(rsa_key, kid="d"), "d": "private"},
            public_jwk(rsa_key, kid="e", alg="HS256"),
            "junk",
        ]
    }
    keys = parse_jwks(json.dumps(doc).encode(), ["RS256", "ES256"])
    assert [(k.kid, k.algorithm) for k in keys] == [("a", "RS256")]
    # two RSA algorithms allowed and no alg: ambiguous, so skipped (RFC 8725 §3.1)
    assert parse_jwks(json.dumps(doc).encode(), ["RS256", "PS256"]) == []
    with pytest.raises(ValueError, match="not a JWK Set"):
        parse_jwks(b"[]", ["RS256"])


async def test_http_get_timeout_and_errors(json_server: JsonServer) -> None:
    json_server.hang = True
    with pytest.raises(FetchError, match="no answer within"):
        await http_get(json_server.url("/slow"), timeout=0.2)
    json_server.hang = False
    with pytest.raises(FetchError):
        await http_get(f"http://127.0.0.1:{free_port()}/", timeout=2)
    json_server.routes["/ok"] = (200, {"a": 1})
    resp = await http_get(json_server.url("/ok"), timeout=2)
    assert resp.status == 200 and json.loads(resp.body) == {"a": 1}
    with pytest.raises(FetchError, match="larger than"):
        await http_get(json_server.url("/ok"), timeout=2, max_body=3)


# --------------------------------------------------------------------------- account check


async def test_account_check_with_redis_through_the_proxy(
    origin_port: int, engine_name: str, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    key = f"disabled_users_{engine_name}"
    await client.sadd(key, "mallory")
    policy = {**HS_POLICY, "account_check": {"redis_set": key, "cache_ttl": "0s"}}
    server = ProxyServer(proxy_config(origin_port, engine_name, policy, redis={"url": redis_url}))
    await server.start()
    try:
        ok = await fetch(server, hs(claims(time.time())))
        assert upstream_headers(ok)["x-user-id"] == "alice"
        denied = await fetch(server, hs(claims(time.time(), sub="mallory")))
        assert denied.status == 403
        assert json.loads(denied.body)["error"] == "account disabled"
        # re-enabled in Redis: with cache_ttl 0 the next request sees it at once
        await client.srem(key, "mallory")
        again = await fetch(server, hs(claims(time.time(), sub="mallory")))
        assert upstream_headers(again)["x-user-id"] == "mallory"
        assert auth_total(server.metrics, "disabled", "default") == "1"
    finally:
        await stop(server)
        await client.delete(key)
        await client.aclose()


@pytest.mark.parametrize(("on_error", "status"), [("deny", 503), ("allow", None)])
async def test_account_backend_unreachable(on_error: str, status: int | None) -> None:
    clock = Clock()
    policy = make_policy(
        **HS_POLICY,
        account_check={"redis_set": "disabled", "on_error": on_error, "timeout": "1s"},
    )
    runtime = Runtime(metrics=Metrics(), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        f, metrics = make_filter(policy, clock, runtime=runtime)
        err = await run(f, fctx(hs(claims(clock.now))))
        if status is None:
            assert err is None
        else:
            assert err is not None and err.status == status
            assert auth_total(metrics, "unavailable") == "1"
    finally:
        await runtime.close()


async def test_account_check_over_http_is_ttl_cached(json_server: JsonServer) -> None:
    json_server.routes["/status/alice"] = (200, {"name": "alice", "disabled": False})
    json_server.routes["/status/mallory"] = (200, {"name": "mallory", "disabled": True})
    json_server.routes["/status/broken"] = (500, {})
    clock = Clock()
    policy = make_policy(
        **HS_POLICY,
        account_check={
            "url": json_server.url("/status/{sub}"),
            "disabled_field": "disabled",
            "cache_ttl": "30s",
        },
    )
    f, _ = make_filter(policy, clock)
    alice = hs(claims(clock.now))
    first = f.on_request(fctx(alice))
    assert first is not None and not isinstance(first, ProxyError)  # a backend call
    assert await first is None
    assert f.on_request(fctx(alice)) is None  # token and status both cached: synchronous
    assert json_server.hits["/status/alice"] == 1
    clock.advance(31)
    assert await run(f, fctx(alice)) is None
    assert json_server.hits["/status/alice"] == 2

    mallory = hs(claims(clock.now, sub="mallory"))
    for _ in range(3):
        err = await run(f, fctx(mallory))
        assert err is not None and err.status == 403 and err.detail == "account disabled"
    assert json_server.hits["/status/mallory"] == 1
    # unknown user (404) = disabled; a 5xx = backend failure → fail closed
    assert (await run(f, fctx(hs(claims(clock.now, sub="nobody"))))).status == 403  # type: ignore[union-attr]
    broken = await run(f, fctx(hs(claims(clock.now, sub="broken"))))
    assert broken is not None and broken.status == 503


async def test_concurrent_account_misses_share_one_call(json_server: JsonServer) -> None:
    json_server.routes["/u/alice"] = (200, {})
    clock = Clock()
    policy = make_policy(**HS_POLICY, account_check={"url": json_server.url("/u/{sub}")})
    f, _ = make_filter(policy, clock)
    token = hs(claims(clock.now))
    results = await asyncio.gather(*(run(f, fctx(token)) for _ in range(5)))
    assert results == [None] * 5
    assert json_server.hits["/u/alice"] == 1


# --------------------------------------------------------------------------- config errors


def config_errors(policy: Any, route_auth: str = "default", **doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "upstreams": {"o": {"targets": ["http://127.0.0.1:9"]}},
                "routes": [{"prefix": "/", "upstream": "o", "auth": route_auth}],
                "auth": {"default": policy},
                **doc,
            }
        )
    return err.value.errors


def test_config_unknown_policy_in_a_route() -> None:
    errors = config_errors(HS_POLICY, route_auth="defualt")
    assert errors == ["routes[0].auth: unknown auth policy 'defualt' (did you mean 'default'?)"]


def test_config_errors_carry_their_key_paths(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    private = tmp_path / "rsa.key"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    errors = config_errors(
        {
            "algorithms": ["HS256", "none", "RS257", "RS256"],
            "keys": [
                {"algorithm": "HS256", "secret_env": "FASTEDGE_NO_SUCH_VARIABLE"},
                {"algorithm": "RS256", "public_key_file": str(tmp_path / "missing.pem")},
                {"algorithm": "HS256", "public_key_file": str(private)},
                {"algorithm": "RS256", "public_key_file": str(private)},
                {"algorithm": "ES256", "jwk": public_jwk(rsa_key)},
                {"algorithm": "HS256"},
            ],
            "leeway": "1h",
            "forward_claims": {"sub": "Content-Length"},
            "account_check": {"redis_set": "disabled"},
            "cache_sise": 5,
        }
    )
    assert errors == [
        "auth.default.algorithms[1]: 'none' is never accepted: unsigned tokens prove nothing "
        "(RFC 8725)",
        "auth.default.algorithms[2]: unknown algorithm 'RS257' (did you mean 'RS256'?) "
        "(use one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, "
        "ES384, ES512, EdDSA)",
        "auth.default.keys[0].secret_env: environment variable FASTEDGE_NO_SUCH_VARIABLE is "
        "not set",
        f"auth.default.keys[1].public_key_file: file not found: {tmp_path / 'missing.pem'}",
        "auth.default.keys[2].public_key_file: HS256 needs secret_env; a public key is never "
        "used as an HMAC secret",
        f"auth.default.keys[3].public_key_file: {private} holds a private key; give the proxy "
        "only the public key",
        "auth.default.keys[4].jwk: 'alg' 'ES256' does not fit key type RSA",
        "auth.default.keys[5]: needs exactly one of secret_env, public_key_file, jwk (got none)",
        "auth.default.forward_claims.sub: 'Content-Length' cannot carry a claim (it frames "
        "the request)",
        "auth.default.account_check.redis_set: needs a [redis] section",
        "auth.default.cache_sise: unknown key (did you mean 'cache_size'?)",
        "auth.default.leeway: must be at most 5m (RFC 7519 §4.1.4)",
    ]


def test_config_secret_strength_and_key_policy_agreement(
    monkeypatch: pytest.MonkeyPatch, pem_file: Path
) -> None:
    monkeypatch.setenv("SHORT_SECRET", "too-short")
    errors = config_errors(
        {
            "algorithms": ["HS256"],
            "keys": [
                {"algorithm": "HS256", "secret_env": "SHORT_SECRET"},
                {"algorithm": "RS256", "public_key_file": str(pem_file), "kid": "a"},
                {"algorithm": "HS256", "secret_env": ENV, "kid": "a"},
                {"algorithm": "RS256", "secret_env": ENV},
            ],
        }
    )
    assert errors == [
        "auth.default.keys[0].secret_env: the secret in SHORT_SECRET has 9 bytes; HS256 needs "
        "at least 32 (RFC 7518 §3.2)",
        "auth.default.keys[3].secret_env: RS256 verifies with a public key (public_key_file "
        "or jwk), not a shared secret",
        "auth.default.keys[1].algorithm: RS256 is not in this policy's algorithms (HS256)",
        "auth.default.keys[2].kid: duplicate kid 'a' (see keys[1])",
    ]
    assert config_errors({"algorithms": []}) == [
        "auth.default.algorithms: must list at least one algorithm",
        "auth.default: needs keys ([[auth.NAME.keys]]) or jwks_url",
    ]
    assert config_errors({"keys": []}) == [
        "auth.default.algorithms: required key is missing",
        "auth.default: needs keys ([[auth.NAME.keys]]) or jwks_url",
    ]
    assert config_errors(
        {**HS_POLICY, "jwks_refresh": "1m", "account_check": {"url": "http://x/status"}}
    ) == [
        "auth.default.account_check.url: must contain '{sub}' (replaced by the subject), got "
        "'http://x/status'",
        "auth.default.jwks_refresh: set, but jwks_url is not",
    ]


def test_config_redacts_secrets_and_routes_share_a_policy_state(origin_port: int) -> None:
    from fastedge.config import redacted

    config = proxy_config(origin_port, "fast", HS_POLICY)
    shown = json.dumps(redacted(config))
    assert SECRET not in shown and ENV in shown
    policies = config.sections["auth"]
    assert policies["default"].name == "default"
    runtime = Runtime(metrics=Metrics())
    assert policies.state("default", runtime) is policies.state("default", runtime)


async def test_demo_setup_marks_mallory_disabled_without_redis() -> None:
    """The demo's shape: the auth service's secret via an env var, the users service as
    the account status endpoint (``disabled_field``), no Redis."""
    from fastedge.demo_services import start_demo_services

    services = await start_demo_services(host="127.0.0.1", jwt_secret=SECRET)
    try:
        users = services.ports["users"]
        policy = make_policy(
            **HS_POLICY,
            account_check={
                "url": f"http://127.0.0.1:{users}/{{sub}}",
                "disabled_field": "disabled",
            },
        )
        clock = Clock(time.time())
        f, _ = make_filter(policy, clock)
        assert await run(f, fctx(hs(claims(clock.now, sub="alice")))) is None
        err = await run(f, fctx(hs(claims(clock.now, sub="mallory"))))
        assert err is not None and err.status == 403 and err.detail == "account disabled"
    finally:
        await services.close()


async def test_oversized_token_is_refused_without_a_crash(
    origin_port: int, engine_name: str, full_policy: dict[str, Any]
) -> None:
    # 12 KiB fits the 16 KiB head limit, so it reaches the auth filter; it must be a plain
    # 401, never a 500 or a hang (a larger one is refused by the engine with 431).
    server = ProxyServer(proxy_config(origin_port, engine_name, full_policy))
    await server.start()
    try:
        resp = await fetch(server, "a" * 4096 + "." + "b" * 4096 + "." + "c" * 4096)
        assert resp.status == 401
        assert (resp.header("www-authenticate") or b"").startswith(b'Bearer error="invalid_token"')
    finally:
        await stop(server)
