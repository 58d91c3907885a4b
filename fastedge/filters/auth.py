"""Zero-trust JWT authentication as a per-route filter (``[auth.NAME]``, route ``auth``).

Every request on an ``auth`` route must carry ``Authorization: Bearer <JWT>`` (RFC 6750
§2.1). The token is verified here, at the edge, so upstreams receive only requests from
known subjects, with the verified claims as headers (``X-User-Id``) and never a
client-forged copy of those headers.

What is checked, and why:

* **Algorithm pinning** (RFC 8725 §3.1, §2.1): every key is pinned to one algorithm in the
  config (or by its JWK ``alg``). The token's ``alg`` header only selects among keys pinned
  to that algorithm; it never decides how a key is used, so an RSA public key can never
  become an HMAC secret (the classic HS/RS confusion) and ``none`` is refused outright.
* **Key selection**: by ``kid`` when the token has one (RFC 7515 §4.1.4), falling back to
  keys configured without a ``kid``; otherwise every key pinned to the token's ``alg``.
  ``jku``/``x5u``/``jwk`` headers are ignored: keys come from the config, never from the
  token (RFC 8725 §3.10). Tokens with a ``crit`` header are refused (RFC 7515 §4.1.11: we
  understand no extension).
* **Claims** (RFC 7519 §4.1): ``exp`` (reject on or after it), ``nbf``, ``iat`` not in the
  future and, with ``max_age``, not older than that; ``iss`` and ``aud`` (RFC 8725 §3.8,
  §3.9); required claims. ``leeway`` absorbs clock skew in every time comparison.
* **Account status** (optional, :mod:`fastedge.filters.account`): a valid token of a
  disabled account is refused with 403.

Failures are 401 with ``WWW-Authenticate: Bearer error="invalid_token",
error_description="..."`` (RFC 6750 §3.1), or ``Bearer realm="fastedge"`` alone when no
token was sent (§3: no error code then); never a 500.

Verified tokens are cached by a keyed digest of the token (SipHash-2-4-128 under a
random per-process key; the raw token is never kept) until
``exp``: a repeated token costs a hash and a dictionary hit, synchronously, instead of a
signature check. ``nbf``/``max_age`` and the account status are re-checked on every hit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives import serialization

from fastedge.config import (
    _INVALID,
    _TOKEN_RE,
    _boolean,
    _choice,
    _Context,
    _did_you_mean,
    _duration_at_least,
    _env_name,
    _existing_file,
    _field,
    _integer,
    _join,
    _Key,
    _named_tables,
    _read_table,
    _string,
    _type_name,
)
from fastedge.core import LRUCache, siphash128
from fastedge.errors import Kind, ProxyError
from fastedge.filters import FilterContext, Runtime
from fastedge.filters.account import AccountCheckConfig, AccountChecker, AccountUnavailable
from fastedge.filters.express import ExpressContext, ExpressPolicyBase
from fastedge.filters.jwks import (
    JwksKeySource,
    VerificationKey,
    check_public_key,
    jwk_to_key,
)

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig

__all__ = [
    "AuthFilter",
    "AuthPolicies",
    "AuthPolicy",
    "AuthState",
    "KeyConfig",
    "Rejection",
    "Verified",
    "build_auth_filter",
    "convert_auth_section",
    "convert_route_auth",
    "token_digest",
]

log = logging.getLogger("fastedge.auth")

# The token cache's key: SipHash-2-4-128 of the token under this process's random key
# (fastedge/_core/siphash.pyx says why not SHA-256). Nothing outside the process knows
# the key, so no one can make a token that lands on another's entry; the cache and a
# memory dump hold digests, never tokens.
_TOKEN_KEY: Final = os.urandom(16)


def token_digest(token: bytes) -> bytes:
    """The verification cache's key for ``token``: 16 bytes, meaningful in this process
    only (the hot paths call ``siphash128`` inline)."""
    return siphash128(_TOKEN_KEY, token)


# --------------------------------------------------------------------------- algorithms

# Minimum HMAC secret length per algorithm: RFC 7518 §3.2 ("a key of the same size as the
# hash output ... or larger MUST be used").
_HMAC_MIN_BYTES: Final[Mapping[str, int]] = {"HS256": 32, "HS384": 48, "HS512": 64}
ALGORITHMS: Final[tuple[str, ...]] = (
    *_HMAC_MIN_BYTES,
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

METRIC: Final = "fastedge_auth_total"
REALM: Final = "fastedge"

# --------------------------------------------------------------------------- config model


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One ``[[auth.NAME.keys]]`` entry, pinned to ``algorithm``.

    Exactly one of ``secret`` (HS*, read from ``secret_env`` at load) and ``public_key``
    (an SPKI PEM, from ``public_key_file`` or the inline ``jwk``) is set.
    """

    algorithm: str
    kid: str | None = None
    secret_env: str | None = None
    secret: str | None = None  # the variable's value; "***" in the admin GET /config
    public_key_file: str | None = None
    jwk: Mapping[str, Any] | None = None
    public_key: str | None = None


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """One ``[auth.NAME]`` policy; docs/config.md lists every key and default."""

    name: str
    algorithms: tuple[str, ...]
    keys: tuple[KeyConfig, ...] = ()
    issuer: str | None = None
    audience: tuple[str, ...] | None = None
    required_claims: tuple[str, ...] = ("sub", "exp")
    max_age: float | None = None
    leeway: float = 30.0
    # RFC 7519 §4.1.4 allows "a small leeway, usually no more than a few minutes"; 30s
    # covers NTP-synchronised hosts with room to spare.
    forward_claims: Mapping[str, str] = field(default_factory=lambda: {"sub": "x-user-id"})
    strip_authorization: bool = True
    # The upstream trusts the forwarded claims; handing it the bearer token as well would
    # let it (or its logs) replay the caller's identity elsewhere.
    cache_size: int = 10_000
    # Verified tokens remembered; ~1 KiB each with claims, so 10k is ~10 MiB at most.
    jwks_url: str | None = None
    jwks_refresh: float = 600.0
    # Auth0 and Okta rotate signing keys rarely and publish the next key ahead of use;
    # 10 minutes keeps load on the IdP negligible, and an unknown kid refreshes at once.
    jwks_min_refresh: float = 30.0
    # The floor between two fetches, whatever the tokens' kids say (abuse guard).
    jwks_timeout: float = 2.0
    # How long one fetch, and a request waiting for it, may take.
    account_check: AccountCheckConfig | None = None


class AuthPolicies(Mapping[str, AuthPolicy]):
    """The ``[auth]`` section: policy name -> :class:`AuthPolicy`.

    It also keeps one :class:`AuthState` per policy for its config generation, so routes
    sharing a policy share its token cache and JWKS keys.
    """

    def __init__(self, policies: Mapping[str, AuthPolicy]) -> None:
        self._policies = dict(policies)
        self._states: dict[tuple[str, int], AuthState] = {}

    def __getitem__(self, name: str) -> AuthPolicy:
        return self._policies[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)

    def __repr__(self) -> str:
        return f"AuthPolicies({sorted(self._policies)!r})"

    def state(self, name: str, runtime: Runtime) -> AuthState:
        """The shared runtime state of policy ``name`` (created on first use)."""
        key = (name, id(runtime))
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = AuthState(self._policies[name], runtime)
        return state

    async def aclose(self) -> None:
        """Stop background work of every policy state."""
        for state in self._states.values():
            await state.aclose()


# --------------------------------------------------------------------------- converters


def _algorithm(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an algorithm name, got {_type_name(value)}")
    if value.lower() == "none":
        # RFC 8725 §3.1/§3.2: an unsigned token proves nothing; never accept "none".
        raise ValueError("'none' is never accepted: unsigned tokens prove nothing (RFC 8725)")
    if value not in ALGORITHMS:
        hint = _did_you_mean(value, [*ALGORITHMS])
        raise ValueError(f"unknown algorithm {value!r}{hint} (use one of {', '.join(ALGORITHMS)})")
    return value


def _algorithms(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, list | tuple):
        return ctx.error(path, f"expected an array of algorithm names, got {_type_name(value)}")
    if not value:
        return ctx.error(path, "must list at least one algorithm")
    out: list[str] = []
    ok = True
    for index, item in enumerate(value):
        try:
            alg = _algorithm(item)
        except ValueError as exc:
            ctx.error(f"{path}[{index}]", str(exc))
            ok = False
            continue
        if alg not in out:
            out.append(alg)
    return tuple(out) if ok else _INVALID


def _string_list(what: str) -> Callable[[object], tuple[str, ...]]:
    def parse(value: object) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected an array of {what}, got {_type_name(value)}")
        out: list[str] = []
        for index, item in enumerate(value):
            try:
                text = _string(item)
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from None
            if text not in out:
                out.append(text)
        return tuple(out)

    return parse


def _audience(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_string(value),)
    audiences = _string_list("audience strings")(value)
    if not audiences:
        raise ValueError("must not be empty (leave the key out to skip the aud check)")
    return audiences


# Fields that frame or route the forwarded request: a claim must never set them.
_RESERVED_HEADERS: Final = frozenset(
    {
        "authorization",
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _forward_claims(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, Mapping):
        return ctx.error(path, f"expected a table of claim = header name, got {_type_name(value)}")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    ok = True
    for claim, header in value.items():
        item_path = _join(path, claim)
        try:
            name = _string(header).lower()
        except ValueError as exc:
            ctx.error(item_path, str(exc))
            ok = False
            continue
        if _TOKEN_RE.fullmatch(name) is None:
            ctx.error(item_path, f"not an HTTP field name (RFC 9110 §5.1): {header!r}")
            ok = False
        elif name in _RESERVED_HEADERS:
            ctx.error(item_path, f"{header!r} cannot carry a claim (it frames the request)")
            ok = False
        elif name in seen:
            ctx.error(item_path, f"header {header!r} already carries claim {seen[name]!r}")
            ok = False
        else:
            seen[name] = claim
            out[claim] = name
    return out if ok else _INVALID


def _http_url(*, needs_sub: bool) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _string(value)
        if not text.isascii() or any(c.isspace() for c in text):
            raise ValueError(f"invalid URL {text!r} (no spaces or non-ASCII characters)")
        probe = text.replace("{sub}", "x")
        try:
            parts = urlsplit(probe)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"invalid URL {text!r}: {exc}") from None
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(f"URL scheme must be 'http' or 'https', got {text!r}")
        if not parts.hostname:
            raise ValueError(f"missing host in {text!r}")
        if "@" in parts.netloc:
            raise ValueError(f"user info ('user:password@') is not allowed in {text!r}")
        if needs_sub and "{sub}" not in text:
            raise ValueError(f"must contain '{{sub}}' (replaced by the subject), got {text!r}")
        return text

    return parse


def _jwk_table(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, Mapping):
        return ctx.error(path, f"expected a JWK table, got {_type_name(value)}")
    return dict(value)


_KEY_SCHEMA: Final[Mapping[str, _Key]] = {
    "kid": _Key(_field(_string)),
    "algorithm": _Key(_field(_algorithm)),
    "secret_env": _Key(_field(_env_name)),
    "public_key_file": _Key(_existing_file),
    "jwk": _Key(_jwk_table),
}


def _pem(key: Any) -> str:
    data: bytes = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data.decode("ascii")


def _key(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _KEY_SCHEMA)
    if table is None:
        return _INVALID
    v = table.values
    raw: Mapping[Any, Any] = value if isinstance(value, Mapping) else {}
    materials = [k for k in ("secret_env", "public_key_file", "jwk") if k in v]
    raw_materials = [k for k in ("secret_env", "public_key_file", "jwk") if k in raw]
    if len(raw_materials) != 1:
        which = ", ".join(raw_materials) if raw_materials else "none"
        return ctx.error(
            path, f"needs exactly one of secret_env, public_key_file, jwk (got {which})"
        )
    if len(materials) != 1 or len(v) != len(raw):
        return _INVALID  # the bad value is already reported
    algorithm: str | None = v.get("algorithm")
    kid: str | None = v.get("kid")
    if "jwk" in v:
        jwk: dict[str, Any] = v["jwk"]
        jwk_alg = jwk.get("alg")
        if algorithm is None:
            if jwk_alg is None:
                return ctx.error(path, "needs an algorithm (set `algorithm` or the JWK's alg)")
            try:
                algorithm = _algorithm(jwk_alg)
            except ValueError as exc:
                return ctx.error(_join(_join(path, "jwk"), "alg"), str(exc))
        elif jwk_alg is not None and jwk_alg != algorithm:
            return ctx.error(
                _join(path, "algorithm"), f"{algorithm} differs from the JWK's alg {jwk_alg!r}"
            )
        if algorithm in _HMAC_MIN_BYTES:
            return ctx.error(
                _join(path, "jwk"),
                "HMAC secrets are accepted only through secret_env, never inline",
            )
        jwk_kid = jwk.get("kid")
        if kid is not None and jwk_kid is not None and kid != jwk_kid:
            return ctx.error(_join(path, "kid"), f"{kid!r} differs from the JWK's kid {jwk_kid!r}")
        try:
            # The pinned algorithm must fit the JWK's key type (checked by jwk_to_key).
            parsed = jwk_to_key({**jwk, "alg": algorithm}, (algorithm,))
        except ValueError as exc:
            return ctx.error(_join(path, "jwk"), str(exc))
        return KeyConfig(
            algorithm=algorithm,
            kid=kid if kid is not None else parsed.kid,
            jwk=jwk,
            public_key=_pem(parsed.key),
        )
    if algorithm is None:
        return ctx.error(_join(path, "algorithm"), "required key is missing")
    if "secret_env" in v:
        env: str = v["secret_env"]
        if algorithm not in _HMAC_MIN_BYTES:
            # RFC 8725 §2.1: the algorithm decides the key's type, never the other way.
            return ctx.error(
                _join(path, "secret_env"),
                f"{algorithm} verifies with a public key (public_key_file or jwk), "
                "not a shared secret",
            )
        secret = os.environ.get(env)
        if secret is None:
            return ctx.error(_join(path, "secret_env"), f"environment variable {env} is not set")
        need = _HMAC_MIN_BYTES[algorithm]
        if len(secret.encode()) < need:
            return ctx.error(
                _join(path, "secret_env"),
                f"the secret in {env} has {len(secret.encode())} bytes; {algorithm} needs "
                f"at least {need} (RFC 7518 §3.2)",
            )
        return KeyConfig(algorithm=algorithm, kid=kid, secret_env=env, secret=secret)
    file: str = v["public_key_file"]
    if algorithm in _HMAC_MIN_BYTES:
        # The HS/RS confusion attack, refused at load: a public key is public, so using it
        # as an HMAC secret lets anyone sign (RFC 8725 §2.1).
        return ctx.error(
            _join(path, "public_key_file"),
            f"{algorithm} needs secret_env; a public key is never used as an HMAC secret",
        )
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return ctx.error(_join(path, "public_key_file"), f"cannot read {file}: {exc.strerror}")
    if b"PRIVATE KEY" in data:
        return ctx.error(
            _join(path, "public_key_file"),
            f"{file} holds a private key; give the proxy only the public key",
        )
    try:
        public = serialization.load_pem_public_key(data)
        check_public_key(algorithm, public)
    except ValueError as exc:
        return ctx.error(_join(path, "public_key_file"), f"{file}: {exc}")
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm etc.
        return ctx.error(_join(path, "public_key_file"), f"{file}: not a PEM public key ({exc})")
    return KeyConfig(algorithm=algorithm, kid=kid, public_key_file=file, public_key=_pem(public))


def _keys(ctx: _Context, path: str, value: object) -> Any:
    """The keys array: a tuple with ``None`` in place of each invalid key (already
    reported), so the policy can still check the valid ones against each other."""
    if not isinstance(value, list | tuple):
        return ctx.error(
            path, f"expected an array of tables ([[...keys]]), got {_type_name(value)}"
        )
    keys: list[KeyConfig | None] = []
    for index, item in enumerate(value):
        key = _key(ctx, f"{path}[{index}]", item)
        keys.append(None if key is _INVALID else key)
    return tuple(keys)


_ACCOUNT_SCHEMA: Final[Mapping[str, _Key]] = {
    "redis_set": _Key(_field(_string)),
    "url": _Key(_field(_http_url(needs_sub=True))),
    "disabled_field": _Key(_field(_string)),
    # 0 = ask the backend on every request.
    "cache_ttl": _Key(_field(_duration_at_least(0, inclusive=True))),
    "timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "on_error": _Key(_field(_choice("deny", "allow"))),
}


def _account_check(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _ACCOUNT_SCHEMA)
    if table is None:
        return _INVALID
    v = table.values
    raw = value if isinstance(value, Mapping) else {}
    backends = [k for k in ("redis_set", "url") if k in raw]
    if len(backends) != 1:
        return ctx.error(path, "needs exactly one of redis_set, url")
    if "disabled_field" in raw and "url" not in raw:
        return ctx.error(_join(path, "disabled_field"), "only applies with url")
    if "redis_set" in raw and "redis" not in ctx.names:
        return ctx.error(_join(path, "redis_set"), "needs a [redis] section")
    if len(v) != len(raw):
        return _INVALID
    # Redis answers in well under a millisecond and is shared by every instance, so a
    # short TTL makes a ban effective quickly; an HTTP status service is costlier.
    v.setdefault("cache_ttl", 5.0 if "redis_set" in v else 30.0)
    return AccountCheckConfig(**v)


_POLICY_SCHEMA: Final[Mapping[str, _Key]] = {
    "algorithms": _Key(_algorithms, required=True),
    "issuer": _Key(_field(_string)),
    "audience": _Key(_field(_audience)),
    "required_claims": _Key(_field(_string_list("claim names"))),
    "max_age": _Key(_field(_duration_at_least(0, inclusive=False))),
    # "A few minutes" at most (RFC 7519 §4.1.4): more turns expiry into a suggestion.
    "leeway": _Key(_field(_duration_at_least(0, inclusive=True))),
    "forward_claims": _Key(_forward_claims),
    "strip_authorization": _Key(_field(_boolean)),
    "cache_size": _Key(_field(_integer(0, 10_000_000))),
    "keys": _Key(_keys),
    "jwks_url": _Key(_field(_http_url(needs_sub=False))),
    "jwks_refresh": _Key(_field(_duration_at_least(1, inclusive=True))),
    "jwks_min_refresh": _Key(_field(_duration_at_least(0, inclusive=True))),
    "jwks_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "account_check": _Key(_account_check),
}
_MAX_LEEWAY: Final = 300.0


def _policy(ctx: _Context, path: str, name: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _POLICY_SCHEMA)
    if table is None:
        return _INVALID
    v = table.values
    raw = value if isinstance(value, Mapping) else {}
    ok = table.complete and len(v) == len(raw)
    if v.get("leeway", 0.0) > _MAX_LEEWAY:
        ok = False
        ctx.error(_join(path, "leeway"), "must be at most 5m (RFC 7519 §4.1.4)")
    keys: tuple[KeyConfig | None, ...] = v.get("keys", ())
    if None in keys or ("keys" in raw and "keys" not in v):
        ok = False
    if not keys and "jwks_url" not in raw:
        ok = False
        ctx.error(path, "needs keys ([[auth.NAME.keys]]) or jwks_url")
    if "jwks_url" not in raw:
        for option in ("jwks_refresh", "jwks_min_refresh", "jwks_timeout"):
            if option in raw:
                ok = False
                ctx.error(_join(path, option), "set, but jwks_url is not")
    algorithms: tuple[str, ...] = v.get("algorithms", ())
    kids: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key is None:
            continue
        key_path = f"{_join(path, 'keys')}[{index}]"
        if algorithms and key.algorithm not in algorithms:
            ok = False
            ctx.error(
                _join(key_path, "algorithm"),
                f"{key.algorithm} is not in this policy's algorithms ({', '.join(algorithms)})",
            )
        if key.kid is not None:
            if key.kid in kids:
                ok = False
                ctx.error(
                    _join(key_path, "kid"), f"duplicate kid {key.kid!r} (see keys[{kids[key.kid]}])"
                )
            kids.setdefault(key.kid, index)
    if not ok:
        return _INVALID
    v["keys"] = tuple(k for k in keys if k is not None)
    return AuthPolicy(name=name, **v)


def convert_auth_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter of the ``[auth]`` section: ``[auth.NAME]`` tables -> :class:`AuthPolicies`."""
    policies = _named_tables(
        ctx,
        path,
        value,
        _policy,
        expected="a table of policies ([auth.NAME])",
        bad_name="invalid policy name (use 1-64 letters, digits, '_', '-')",
    )
    return _INVALID if policies is _INVALID else AuthPolicies(policies)


def convert_route_auth(ctx: _Context, path: str, value: object) -> Any:
    """Converter of the route key ``auth``: the name of a defined ``[auth.NAME]``."""
    try:
        name = _string(value)
    except ValueError as exc:
        return ctx.error(path, str(exc))
    defined = sorted(ctx.defined("auth"))
    if name not in defined:
        hint = _did_you_mean(name, defined) if defined else " (no [auth.NAME] policy is defined)"
        return ctx.error(path, f"unknown auth policy {name!r}{hint}")
    return name


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a token was refused: a metric ``result`` and an RFC 6750 error description."""

    result: str  # "invalid" | "expired"
    description: str  # fixed ASCII text: it goes into a quoted-string, never token data


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified token: its claims and what the cache-hit path must re-check."""

    claims: dict[str, Any]
    sub: str | None
    exp: float | None
    nbf: float | None
    iat: float | None
    headers: tuple[tuple[bytes, bytes], ...]  # the forwarded claim fields
    wire: bytes = b""  # the same as field lines, for the proxy's express lane
    # The express lane's time test (AuthState.fresh_window): inside, check_times accepts.
    # Empty unless set: an entry made any other way is never accepted on the lane.
    fresh_from: float = math.inf
    fresh_until: float = -math.inf
    # Values other policies derive from these claims alone (a rate-limit key by claim),
    # kept as long as the entry: the express lane's ExpressContext.memo.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)


_EXPIRED: Final = Rejection("expired", "token expired")
_TOO_OLD: Final = Rejection("expired", "token too old")
_NOT_YET: Final = Rejection("invalid", "token not yet valid")
_FUTURE_IAT: Final = Rejection("invalid", "token issued in the future")
_MALFORMED: Final = Rejection("invalid", "malformed token")
_BAD_SIGNATURE: Final = Rejection("invalid", "signature verification failed")
_BAD_ALG: Final = Rejection("invalid", "algorithm not allowed")
_UNKNOWN_KID: Final = Rejection("invalid", "unknown key id")
_NO_KEY: Final = Rejection("invalid", "no key for this algorithm")
_CRIT: Final = Rejection("invalid", "unsupported critical header")
_WRONG_ISS: Final = Rejection("invalid", "wrong issuer")
_WRONG_AUD: Final = Rejection("invalid", "wrong audience")
_INTERNAL: Final = Rejection("invalid", "token could not be verified")

# Signature only: the claims are checked below with an injectable clock and one set of
# rules shared with the cache-hit path.
_DECODE_OPTIONS: Final[Any] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}
# How far the express lane's time window (AuthState.fresh_window) stays inside the
# nbf/iat/max_age bounds: far more than float rounding of NumericDates before year 30000.
_EDGE: Final = 1e-3
# A token without exp is cached this long at most (a removed key or a disabled account
# must take effect eventually); tokens with exp stay until they expire.
_MAX_CACHE_TTL: Final = 300.0
# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_RE: Final = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")


def _token_header(token: str) -> dict[str, Any] | None:
    """The JOSE header of a JWS compact token (RFC 7515 §7.1), or ``None`` if malformed.

    Only the header is decoded, just enough to pick the key; PyJWT parses and checks the
    whole token afterwards. (``jwt.get_unverified_header`` decodes all three parts and
    costs ~14 µs; this costs ~2.)
    """
    head, dot, rest = token.partition(".")
    if not dot or rest.count(".") != 1:
        return None
    try:
        header = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, orjson.JSONDecodeError):  # binascii.Error is a ValueError
        return None
    if not isinstance(header, dict):
        return None
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    return header


def _numeric(value: object) -> bool:
    # RFC 7519 §2 NumericDate: a JSON number (fractions allowed); booleans are not. NaN
    # and infinities (Python's JSON reader accepts them) and numbers beyond the float
    # range are not dates: NaN compares false both ways and would never expire.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number)


def _header_value(value: object) -> bytes | None:
    """A claim rendered as a field value, or ``None`` if it cannot travel safely."""
    if isinstance(value, str):
        try:
            data = value.encode()
        except UnicodeEncodeError:  # a lone surrogate from the JSON payload
            return None
    else:
        try:  # numbers, booleans, arrays and objects travel as compact JSON
            data = orjson.dumps(value)
        except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
            return None
    # No CR/LF/NUL or other controls: a claim must not be able to inject fields.
    if any(b < 0x20 or b == 0x7F for b in data) or len(data) > 4096:
        return None
    return data


class AuthState:
    """One policy's keys, caches, clock and metrics; shared by the routes using it.

    ``clock`` (wall time, for claims and the token cache) and ``monotonic`` (JWKS refresh
    and account-status TTLs) are injectable so tests never sleep.
    """

    def __init__(
        self,
        policy: AuthPolicy,
        runtime: Runtime,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.name = policy.name
        self.clock = clock  # wall-clock seconds: claims are NumericDates (RFC 7519 §2)
        self.metrics = runtime.metrics
        runtime.metrics.describe(METRIC, "counter", "JWT authentications by policy and result.")
        self.algorithms = frozenset(policy.algorithms)
        required = dict.fromkeys(policy.required_claims)
        if policy.max_age is not None:
            required["iat"] = None  # freshness needs the issue time
        if policy.account_check is not None:
            required["sub"] = None  # the account check needs a subject
        self.required = tuple(required)
        self.leeway = policy.leeway
        self.max_age = policy.max_age
        self.issuer = policy.issuer
        self.audience = frozenset(policy.audience) if policy.audience is not None else None
        self.forward = tuple(
            (claim, name.encode()) for claim, name in policy.forward_claims.items()
        )
        drop = {name for _, name in self.forward}
        if policy.strip_authorization:
            drop.add(b"authorization")
        self.drop_headers = frozenset(drop)
        self.drop_names = tuple(sorted(drop))  # the same, as the express lane takes them
        self.cache = LRUCache(policy.cache_size) if policy.cache_size else None
        # Keys: by kid, and by algorithm for tokens without a (known) kid.
        self.keys = tuple(_load_key(k) for k in policy.keys)
        self.by_kid = {k.kid: k for k in self.keys if k.kid is not None}
        self.unkeyed: dict[str, tuple[VerificationKey, ...]] = {}
        self.by_alg: dict[str, tuple[VerificationKey, ...]] = {}
        for key in self.keys:
            self.by_alg[key.algorithm] = (*self.by_alg.get(key.algorithm, ()), key)
            if key.kid is None:
                self.unkeyed[key.algorithm] = (*self.unkeyed.get(key.algorithm, ()), key)
        self.jwks: JwksKeySource | None = None
        if policy.jwks_url is not None:
            self.jwks = JwksKeySource(
                policy.jwks_url,
                policy.algorithms,
                refresh=policy.jwks_refresh,
                min_refresh=policy.jwks_min_refresh,
                timeout=policy.jwks_timeout,
                clock=monotonic,
            )
            with contextlib.suppress(RuntimeError):  # no running loop: first use fetches
                asyncio.get_running_loop()
                self.jwks.start()
        self.account: AccountChecker | None = None
        if policy.account_check is not None:
            redis = runtime.redis() if policy.account_check.redis_set is not None else None
            self.account = AccountChecker(policy.account_check, redis=redis, clock=monotonic)
        self.labels = {
            result: (("policy", self.name), ("result", result))
            for result in ("ok", "invalid", "expired", "disabled", "missing", "unavailable")
        }
        self.ok_counter = runtime.metrics.counter(METRIC, self.labels["ok"])  # the lane's

    async def aclose(self) -> None:
        """Cancel a JWKS fetch in flight."""
        if self.jwks is not None:
            await self.jwks.aclose()

    # -- the checks ------------------------------------------------------------------------

    def check_times(self, entry: Verified, now: float) -> Rejection | None:
        """The time rules of RFC 7519 §4.1.4-§4.1.6 (and ``max_age``), with leeway."""
        leeway = self.leeway
        if entry.exp is not None and now >= entry.exp + leeway:
            return _EXPIRED  # §4.1.4: "on or after" the exp time it MUST NOT be accepted
        if entry.nbf is not None and now + leeway < entry.nbf:
            return _NOT_YET  # §4.1.5
        if entry.iat is not None:
            if now + leeway < entry.iat:
                return _FUTURE_IAT
            if self.max_age is not None and now - entry.iat > self.max_age + leeway:
                return _TOO_OLD
        return None

    def verify(
        self, token: str, now: float
    ) -> Verified | Rejection | Awaitable[Verified | Rejection]:
        """Verify an uncached token: synchronous unless a JWKS refresh must be awaited."""
        header = _token_header(token)
        if header is None:
            return _MALFORMED
        alg = header.get("alg")
        # The allow-list is the policy's, not the token's (RFC 8725 §3.1); "none" is never
        # in it because the config refuses it.
        if not isinstance(alg, str) or alg not in self.algorithms:
            return _BAD_ALG
        if "crit" in header:
            return _CRIT  # RFC 7515 §4.1.11: we understand no critical extension
        kid = header.get("kid")
        if self.jwks is not None:
            self.jwks.maybe_refresh()
        candidates = self._candidates(alg, kid)
        if isinstance(candidates, Rejection):
            return candidates
        if not candidates:
            if self.jwks is not None:
                task = self.jwks.refresh_for_unknown_kid()
                if task is not None:
                    return self._verify_after_refresh(task, token, alg, kid, now)
            return _UNKNOWN_KID if kid is not None else _NO_KEY
        return self._decode(token, candidates, now)

    def _candidates(self, alg: str, kid: object) -> Sequence[VerificationKey] | Rejection:
        jwks = self.jwks
        if isinstance(kid, str):
            key = self.by_kid.get(kid)
            if key is None and jwks is not None:
                key = jwks.by_kid.get(kid)
            if key is not None:
                # The kid names a key pinned to another algorithm: refuse, don't adapt.
                return (key,) if key.algorithm == alg else _BAD_ALG
            return self.unkeyed.get(alg, ())
        keys = self.by_alg.get(alg, ())
        if jwks is not None:
            keys = (*keys, *jwks.by_alg.get(alg, ()))
        return keys

    async def _verify_after_refresh(
        self, task: asyncio.Task[None], token: str, alg: str, kid: object, now: float
    ) -> Verified | Rejection:
        assert self.jwks is not None
        # Shielded: this request giving up must not cancel the fetch others wait for.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.jwks.timeout)
        candidates = self._candidates(alg, kid)
        if isinstance(candidates, Rejection):
            return candidates
        if not candidates:
            return _UNKNOWN_KID if kid is not None else _NO_KEY
        return self._decode(token, candidates, now)

    def _decode(
        self, token: str, candidates: Sequence[VerificationKey], now: float
    ) -> Verified | Rejection:
        for key in candidates:
            try:
                # algorithms=[the key's pinned algorithm]: PyJWT also refuses a token whose
                # alg differs, and HMAC refuses PEM-looking secrets (defence in depth).
                claims = jwt.decode(
                    token, key.key, algorithms=[key.algorithm], options=_DECODE_OPTIONS
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue  # try the next key pinned to this algorithm
            except jwt.InvalidTokenError:
                return _MALFORMED
            return self.validate(claims, now)
        return _BAD_SIGNATURE

    def validate(self, claims: dict[str, Any], now: float) -> Verified | Rejection:
        """Check the claims of a token whose signature is valid (RFC 7519 §4.1)."""
        for name in self.required:
            if claims.get(name) is None:
                return Rejection("invalid", f"missing required claim {_safe(name)}")
        times: list[float | None] = []
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is not None and not _numeric(value):
                return Rejection("invalid", f"claim {name} is not a NumericDate")
            times.append(value)
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            return Rejection("invalid", "claim sub is not a string")  # §4.1.2 StringOrURI
        if self.issuer is not None and claims.get("iss") != self.issuer:
            return _WRONG_ISS
        if self.audience is not None:
            aud = claims.get("aud")
            # §4.1.3: a single string or an array; one of ours must be in it.
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(a, str) and a in self.audience for a in auds):
                return _WRONG_AUD
        headers: list[tuple[bytes, bytes]] = []
        for claim, field_name in self.forward:
            rendered = _header_value(claims[claim]) if claims.get(claim) is not None else None
            if rendered is not None:
                headers.append((field_name, rendered))
        wire = b"".join(b"%s: %s\r\n" % h for h in headers)
        entry = Verified(claims, sub, times[0], times[1], times[2], tuple(headers), wire)
        why = self.check_times(entry, now)
        if why is not None:
            return why
        fresh_from, fresh_until = self.fresh_window(entry)
        return replace(entry, fresh_from=fresh_from, fresh_until=fresh_until)

    def fresh_window(self, entry: Verified) -> tuple[float, float]:
        """``[from, until)``: times at which :meth:`check_times` accepts ``entry``, for the
        express lane's two comparisons. Empty when no such time is found.

        Each rule accepts a set closed upwards (nbf, iat not in the future) or downwards
        (exp, ``max_age``) in time, since float addition is monotonic; so if both ends
        pass, every time between does. The bounds from nbf and iat are pulled in by a
        millisecond against the rounding of the sums; the exp bound is the very sum
        ``check_times`` compares with. A request at an edge takes the general path, which
        decides exactly.
        """
        leeway = self.leeway
        lo, hi = -math.inf, math.inf
        if entry.exp is not None:
            hi = entry.exp + leeway
        if entry.nbf is not None:
            lo = entry.nbf - leeway + _EDGE
        if entry.iat is not None:
            lo = max(lo, entry.iat - leeway + _EDGE)
            if self.max_age is not None:
                hi = min(hi, entry.iat + self.max_age + leeway - _EDGE)
        if not (
            lo < hi
            and self.check_times(entry, lo) is None
            and self.check_times(entry, math.nextafter(hi, -math.inf)) is None
        ):
            return math.inf, -math.inf
        return lo, hi

    def remember(self, digest: bytes, entry: Verified, now: float) -> None:
        """Cache a verified token until it expires (at most ``_MAX_CACHE_TTL`` without exp)."""
        if self.cache is None:
            return
        ttl = _MAX_CACHE_TTL if entry.exp is None else entry.exp + self.leeway - now
        if ttl > 0:
            self.cache.set(digest, entry, ttl=min(ttl, 86400.0 * 365), now=now)


def _safe(text: str) -> str:
    """Text for a quoted-string (RFC 9110 §5.6.4): printable ASCII without '"' and '\\'."""
    return "".join(c for c in text if 0x20 <= ord(c) < 0x7F and c not in '"\\')[:100]


def _load_key(config: KeyConfig) -> VerificationKey:
    if config.secret is not None:
        key: Any = config.secret.encode()
    else:
        assert config.public_key is not None
        key = serialization.load_pem_public_key(config.public_key.encode())
    return VerificationKey(algorithm=config.algorithm, key=key, kid=config.kid)


# --------------------------------------------------------------------------- the filter

_MISSING_CHALLENGE: Final = (b"www-authenticate", f'Bearer realm="{REALM}"'.encode())


def _challenge(error: str, description: str) -> tuple[bytes, bytes]:
    value = f'Bearer error="{error}", error_description="{_safe(description)}"'
    return (b"www-authenticate", value.encode())


def _bearer(value: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` value, or ``None`` when no
    bearer token is presented (another scheme, or ``Bearer`` alone)."""
    scheme, _, rest = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":  # RFC 7235 §2.1: the scheme is case-insensitive
        return None  # RFC 6750 §3.1: another method = no error code
    return rest.strip(b" ") or None


class AuthFilter(ExpressPolicyBase):
    """The ``auth`` filter of one route (see the module docstring)."""

    # Compiled, a C struct (auth.pxd) whose express lane methods are C methods.
    __slots__ = ("express_ready", "state")

    name = "auth"
    # The express lane (fastedge.filters.ExpressPolicy) serves tokens found in the
    # verification cache; anything else takes the general path.
    express_consumes = False

    def __init__(self, state: AuthState) -> None:
        self.state = state
        # Claim fields named like trace fields would be dropped after the tracer adds its
        # own on the general path; the lane adds those after the policy's drops.
        self.express_ready = state.cache is not None and not (
            state.drop_headers & {b"traceparent", b"tracestate"}
        )

    def express_check(self, x: ExpressContext) -> bool:
        """Whether the request's token is cached, in time, and its account known enabled
        (the general path's cache-hit acceptance); nothing counted."""
        value: bytes | None = x.request.authorization
        if value is None:  # none, or several: the general path answers
            return False
        n = len(value)
        # "Bearer <token>" as clients write it, without a call: what _bearer returns
        # for it (the token starts and ends with no space). _bearer has the rest.
        if n > 7 and value[n - 1] > 32 and value[7] != 32 and value.startswith(b"Bearer "):
            token: bytes | None = value[7:n]  # [7:n], not [7:]: compiled, a C copy
        else:
            token = _bearer(value)
        state = self.state
        cache = state.cache
        if token is None or cache is None:
            return False
        now: float = state.clock()
        # The digest each time: remembering token -> digest would keep raw tokens.
        entry: Verified | None = cache.get(siphash128(_TOKEN_KEY, token), now=now)
        if entry is None or not entry.fresh_from <= now < entry.fresh_until:
            return False  # not cached, or at or past the edge of its window (exactly: §4.1)
        account = state.account
        if account is not None and entry.sub is not None and account.cached(entry.sub) is not False:
            return False
        x.auth = entry
        x.claims = entry.claims
        x.memo = entry.memo
        return True

    def express_apply(self, x: ExpressContext) -> None:
        """What ``_apply`` does to a forwarded request, for the express lane."""
        state = self.state
        entry: Verified = x.auth
        x.drop += state.drop_names
        x.fields += entry.headers
        x.extra += entry.wire
        state.ok_counter.inc()

    def on_request(self, ctx: FilterContext) -> ProxyError | Awaitable[ProxyError | None] | None:
        """Verify the bearer token; synchronous on a cache hit."""
        try:
            return self._check(ctx)
        except Exception:  # never a 500 from auth: log it and refuse the token
            log.exception("auth policy %s failed", self.state.name)
            return self._reject(_INTERNAL)

    async def aclose(self) -> None:
        """Stop the policy's background work."""
        await self.state.aclose()

    def _check(self, ctx: FilterContext) -> ProxyError | Awaitable[ProxyError | None] | None:
        state = self.state
        value: bytes | None = None
        for n, v in ctx.headers:
            if n == b"authorization":
                if value is not None:
                    # RFC 6750 §3.1 invalid_request: more than one way of sending a token.
                    return self._count(
                        "invalid",
                        ProxyError(
                            Kind.BAD_REQUEST,
                            "auth",
                            detail="more than one Authorization field",
                            headers=[
                                _challenge("invalid_request", "more than one Authorization field")
                            ],
                        ),
                    )
                value = v
        token = None if value is None else _bearer(value)
        if token is None:
            return self._missing()
        now = state.clock()
        digest = siphash128(_TOKEN_KEY, token)
        cache = state.cache
        if cache is not None:
            # Only verified tokens are cached, so a hit is well-formed: the syntax check
            # below is for the (rarer, costlier) verification path.
            entry: Verified | None = cache.get(digest, now=now)
            if entry is not None:
                why = state.check_times(entry, now)
                return self._reject(why) if why is not None else self._accept(ctx, entry)
        if _B64TOKEN_RE.fullmatch(token) is None:
            return self._reject(_MALFORMED)
        result = state.verify(token.decode("ascii"), now)
        if inspect.isawaitable(result):
            return self._finish(ctx, result, digest, now)
        if isinstance(result, Rejection):
            return self._reject(result)
        state.remember(digest, result, now)
        return self._accept(ctx, result)

    async def _finish(
        self,
        ctx: FilterContext,
        pending: Awaitable[Verified | Rejection],
        digest: bytes,
        now: float,
    ) -> ProxyError | None:
        try:
            result = await pending
            if isinstance(result, Rejection):
                return self._reject(result)
            self.state.remember(digest, result, now)
            decision = self._accept(ctx, result)
            if inspect.isawaitable(decision):
                return await decision
            return decision
        except Exception:
            log.exception("auth policy %s failed", self.state.name)
            return self._reject(_INTERNAL)

    def _accept(
        self, ctx: FilterContext, entry: Verified
    ) -> ProxyError | Awaitable[ProxyError | None] | None:
        account = self.state.account
        if account is not None and entry.sub is not None:
            disabled = account.cached(entry.sub)
            if disabled is None:
                return self._account_later(ctx, entry, account)
            if disabled:
                return self._disabled()
        self._apply(ctx, entry)
        return None

    async def _account_later(
        self, ctx: FilterContext, entry: Verified, account: AccountChecker
    ) -> ProxyError | None:
        assert entry.sub is not None
        try:
            disabled = await account.lookup(entry.sub)
        except AccountUnavailable as exc:
            if account.config.on_error == "allow":
                log.warning("account check failed, allowing %r: %s", entry.sub, exc)
                self._apply(ctx, entry)
                return None
            log.warning("account check failed, denying %r: %s", entry.sub, exc)
            return self._count(
                "unavailable",
                ProxyError(Kind.UNAVAILABLE, "auth", detail="account check unavailable"),
            )
        if disabled:
            return self._disabled()
        self._apply(ctx, entry)
        return None

    def _apply(self, ctx: FilterContext, entry: Verified) -> None:
        state = self.state
        ctx.user = entry.sub
        ctx.claims = entry.claims
        # One pass drops the Authorization field (per policy) and every client-sent copy
        # of a claim header: an upstream must never see a spoofed X-User-Id.
        drop = state.drop_headers
        up = ctx.upstream_headers
        up[:] = [h for h in up if h[0] not in drop]
        up.extend(entry.headers)
        state.metrics.inc(METRIC, state.labels["ok"])

    def _count(self, result: str, error: ProxyError) -> ProxyError:
        self.state.metrics.inc(METRIC, self.state.labels[result])
        return error

    def _missing(self) -> ProxyError:
        return self._count(
            "missing",
            ProxyError(
                Kind.UNAUTHORIZED,
                "auth",
                detail="missing bearer token",
                headers=[_MISSING_CHALLENGE],
            ),
        )

    def _reject(self, why: Rejection) -> ProxyError:
        return self._count(
            why.result,
            ProxyError(
                Kind.UNAUTHORIZED,
                "auth",
                detail=f"invalid token: {why.description}",
                headers=[_challenge("invalid_token", why.description)],
            ),
        )

    def _disabled(self) -> ProxyError:
        return self._count(
            "disabled", ProxyError(Kind.FORBIDDEN, "auth", detail="account disabled")
        )


def build_auth_filter(
    value: Any, route: RouteConfig, config: Config, runtime: Runtime
) -> AuthFilter:
    """Filter builder for the route key ``auth`` (``value`` is the policy name)."""
    policies = config.sections.get("auth")
    if not isinstance(policies, AuthPolicies) or value not in policies:
        raise ValueError(f"route {route.name!r}: unknown auth policy {value!r}")
    return AuthFilter(policies.state(value, runtime))
