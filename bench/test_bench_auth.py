"""JWT auth micro benchmarks: what ``AuthFilter.on_request`` costs per request.

* ``cached``: a token seen before — SHA-256 of the token, an ``LRUCache`` hit, the time
  rules, the header edits; synchronous.
* ``uncached-HS256`` / ``uncached-RS256``: a first-seen token — header parse, key
  selection, signature check (PyJWT + cryptography), claim validation, cache insert. The
  cache is disabled (``cache_size = 0``) so every call pays the full price.
* ``pyjwt-decode-*``: a bare ``jwt.decode`` for reference.

Run: ``pytest bench/test_bench_auth.py --benchmark-only``.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fastedge.config import _Context
from fastedge.filters import FilterContext, Runtime
from fastedge.filters.auth import AuthFilter, AuthPolicies, AuthState, convert_auth_section
from fastedge.observe.metrics import Metrics

SECRET = "bench-secret-0123456789-abcdefghijklmnop"
ENV = "FASTEDGE_BENCH_JWT_SECRET"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def make_filter(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, rsa_key: rsa.RSAPrivateKey) -> Any:
    monkeypatch.setenv(ENV, SECRET)
    pem = tmp_path / "rsa.pub.pem"
    pem.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )

    def make(cache_size: int) -> AuthFilter:
        policy = {
            "algorithms": ["HS256", "RS256"],
            "cache_size": cache_size,
            "keys": [
                {"algorithm": "HS256", "secret_env": ENV},
                {"algorithm": "RS256", "public_key_file": str(pem)},
            ],
        }
        ctx = _Context(errors=[], base_dir="", upstream_names=frozenset(), names={})
        policies = convert_auth_section(ctx, "auth", {"p": policy})
        assert not ctx.errors and isinstance(policies, AuthPolicies)
        return AuthFilter(AuthState(policies["p"], Runtime(metrics=Metrics())))

    return make


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 3600}


def _ctx(token: str) -> FilterContext:
    headers = [
        (b"host", b"example.test"),
        (b"user-agent", b"bench"),
        (b"accept", b"*/*"),
        (b"authorization", b"Bearer " + token.encode()),
    ]
    return FilterContext(
        method=b"GET",
        path=b"/api/users",
        query=b"",
        host=b"example.test",
        client_ip=b"127.0.0.1",
        headers=headers,
        upstream_headers=list(headers),
        route="r",
        request_id=b"rid",
    )


def _run(f: AuthFilter, token: str) -> Any:
    ctx = _ctx(token)
    decision = f.on_request(ctx)
    assert decision is None and ctx.user == "alice"
    return decision


@pytest.mark.benchmark(group="auth")
def test_baseline_context_only(benchmark: Any) -> None:
    """Building the FilterContext, which every other row includes (the proxy pays it too)."""
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    benchmark(_ctx, token)


@pytest.mark.benchmark(group="auth")
def test_cached_token(benchmark: Any, make_filter: Any) -> None:
    f = make_filter(10_000)
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    _run(f, token)  # warm the cache
    benchmark(_run, f, token)


@pytest.mark.benchmark(group="auth")
def test_uncached_hs256(benchmark: Any, make_filter: Any) -> None:
    f = make_filter(0)
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    benchmark(_run, f, token)


@pytest.mark.benchmark(group="auth")
def test_uncached_rs256(benchmark: Any, make_filter: Any, rsa_key: rsa.RSAPrivateKey) -> None:
    f = make_filter(0)
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256")
    benchmark(_run, f, token)


@pytest.mark.benchmark(group="auth")
def test_pyjwt_decode_hs256(benchmark: Any) -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    key = SECRET.encode()
    benchmark(jwt.decode, token, key, algorithms=["HS256"])


@pytest.mark.benchmark(group="auth")
def test_pyjwt_decode_rs256(benchmark: Any, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256")
    public = rsa_key.public_key()
    benchmark(jwt.decode, token, public, algorithms=["RS256"])
