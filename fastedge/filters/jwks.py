"""JSON Web Key Sets fetched in the background, and the small HTTP(S) GET client for it.

:class:`JwksKeySource` keeps the verification keys an identity provider publishes at a
``jwks_url`` (RFC 7517 §5). The keys are fetched off the request path and cached:

* a refresh starts in the background when the keys are older than ``refresh`` (checked on
  each uncached verification, so an idle proxy makes no calls) — the request in hand goes
  on with the cached keys;
* a token whose ``kid`` is unknown may start a refresh at once (key rotation without a
  restart), at most once per ``min_refresh``, and its request waits for that fetch at most
  ``timeout`` seconds;
* a failed fetch keeps the cached keys (the IdP being down must not lock everybody out),
  and the next attempt waits ``min_refresh``.

Every key is pinned to exactly one algorithm (RFC 8725 §3.1): its ``alg`` member, or, when
the JWK has none, the only algorithm of the policy that fits its key type; a key that fits
several is skipped. Symmetric (``kty = "oct"``) and private keys in a JWKS are refused:
a shared secret must never travel over the network to a verifier.

:func:`http_get` is a deliberately small HTTP/1.1 client (:mod:`fastedge.bounded_get`:
asyncio streams + h11): one request per connection, an overall timeout, a body size cap,
https through ``ssl.create_default_context()``. It is used here and by the account check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from fastedge.bounded_get import FetchError, HttpResponse, get_once

__all__ = [
    "FetchError",
    "HttpResponse",
    "JwksKeySource",
    "VerificationKey",
    "check_public_key",
    "http_get",
    "jwk_to_key",
    "parse_jwks",
]

log = logging.getLogger("fastedge.auth")

_USER_AGENT: Final = b"fastedge-auth/1"
# A JWKS of a few dozen RSA keys is ~20 KiB; 1 MiB leaves room and still bounds memory.
DEFAULT_MAX_BODY: Final = 1024 * 1024
# Key type (RFC 7518 §6.1) -> the JWS algorithm families it can verify (RFC 7518 §3.1).
_KTY_ALGORITHMS: Final[Mapping[str, frozenset[str]]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
# Private-key members of RSA, EC and OKP JWKs (RFC 7518 §6.2.2, §6.3.2; RFC 8037 §2).
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


async def http_get(
    url: str,
    *,
    timeout: float,
    max_body: int = DEFAULT_MAX_BODY,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """GET ``url`` (``http://`` or ``https://``) within ``timeout`` seconds, all included.

    Raises :class:`FetchError` for every failure (connect, TLS, timeout, a response h11
    rejects, a body over ``max_body`` bytes). Redirects are not followed: a key or status
    endpoint that moves is a configuration change, not something to chase silently.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"unsupported URL {url!r}")
    host = parts.hostname
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise FetchError(f"invalid port in {url!r}") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    tls: ssl.SSLContext | None = None
    if scheme == "https":
        tls = ssl_context or ssl.create_default_context()
    fields = [
        (b"host", authority.encode("ascii")),
        (b"user-agent", _USER_AGENT),
        (b"accept", b"application/json"),
        (b"connection", b"close"),
    ]
    return await get_once(
        host,
        port,
        target.encode("ascii"),
        fields,
        tls=tls,
        server_hostname=host,
        timeout=timeout,
        max_head=16 * 1024,
        max_body=max_body,
        label=f"GET {url}",
    )


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key a token may be verified with: pinned to exactly one algorithm."""

    algorithm: str
    key: Any  # what PyJWT's algorithm takes: HMAC bytes or a cryptography public key
    kid: str | None = None
    source: str = "config"  # "config" or "jwks"


def parse_jwks(data: bytes, algorithms: Sequence[str]) -> list[VerificationKey]:
    """The usable signature keys of a JWKS document (RFC 7517 §5); skips the others.

    Raises :class:`ValueError` when ``data`` is not a JWK Set at all.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWK Set (expected {"keys": [...]})')
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(doc["keys"]):
        try:
            keys.append(jwk_to_key(jwk, algorithms, source="jwks"))
        except ValueError as exc:
            log.warning("JWKS key %d skipped: %s", index, exc)
    return keys


def jwk_algorithm(jwk: Mapping[str, Any], algorithms: Sequence[str]) -> str:
    """The one algorithm ``jwk`` is pinned to, given a policy's ``algorithms``."""
    kty = jwk.get("kty")
    if kty == "oct":
        raise ValueError("symmetric ('oct') keys are not accepted from a JWK")
    family = _KTY_ALGORITHMS.get(kty) if isinstance(kty, str) else None
    if family is None:
        raise ValueError(f"unsupported key type {kty!r} (use RSA, EC or OKP)")
    if _PRIVATE_MEMBERS.intersection(jwk):
        raise ValueError("contains private key members; publish only the public key")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"'use' is {use!r}, not 'sig'")
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in family:
            raise ValueError(f"'alg' {alg!r} does not fit key type {kty}")
        if alg not in algorithms:
            raise ValueError(f"'alg' {alg} is not one of the policy's algorithms")
        return alg
    fitting = [a for a in algorithms if a in family]
    if len(fitting) != 1:
        # RFC 8725 §3.1: one key, one algorithm. Guessing between RS256 and PS256 would
        # let the token header choose, which is what pinning exists to prevent.
        raise ValueError(f"no 'alg' and the policy allows {len(fitting)} algorithms for {kty}")
    return fitting[0]


def jwk_to_key(
    jwk: object, algorithms: Sequence[str], *, source: str = "config"
) -> VerificationKey:
    """Turn one public JWK into a :class:`VerificationKey` (``ValueError`` if unusable)."""
    if not isinstance(jwk, Mapping):
        raise ValueError("a JWK must be a JSON object")
    algorithm = jwk_algorithm(jwk, algorithms)
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("'kid' must be a string")
    try:
        parsed = jwt.PyJWK(dict(jwk), algorithm=algorithm)
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"invalid JWK: {exc}") from None
    check_public_key(algorithm, parsed.key)
    return VerificationKey(algorithm=algorithm, key=parsed.key, kid=kid, source=source)


# JWS curve per ECDSA algorithm (RFC 7518 §3.4).
_EC_CURVES: Final[Mapping[str, str]] = {
    "ES256": "secp256r1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
}


def check_public_key(algorithm: str, key: object) -> None:
    """Refuse a key that does not fit ``algorithm`` or is too weak (``ValueError``)."""
    if algorithm.startswith(("RS", "PS")):
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError(f"{algorithm} needs an RSA public key")
        if key.key_size < 2048:
            # RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used".
            raise ValueError(f"RSA key has {key.key_size} bits; at least 2048 are required")
    elif algorithm.startswith("ES"):
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"{algorithm} needs an EC public key")
        if key.curve.name != _EC_CURVES[algorithm]:
            raise ValueError(
                f"{algorithm} needs curve {_EC_CURVES[algorithm]}, got {key.curve.name}"
            )
    elif algorithm == "EdDSA":
        if not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            raise ValueError("EdDSA needs an Ed25519 or Ed448 public key")
    else:
        raise ValueError(f"{algorithm} does not use a public key")


class JwksKeySource:
    """The cached keys of one ``jwks_url`` and the rules for refreshing them.

    ``fetch`` and ``clock`` are injectable for tests (defaults: :func:`http_get` and
    ``time.monotonic``). Nothing runs until :meth:`start` or the first lookup; there is
    no long-lived task, so a retired config generation leaves nothing behind once its
    last fetch (bounded by ``timeout``) ends, and :meth:`aclose` cancels even that.
    """

    def __init__(
        self,
        url: str,
        algorithms: Sequence[str],
        *,
        refresh: float,
        min_refresh: float,
        timeout: float,
        fetch: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.algorithms = tuple(algorithms)
        self.refresh_interval = refresh
        self.min_refresh = min_refresh
        self.timeout = timeout
        self._fetch = fetch or http_get
        self._clock = clock
        self.by_kid: dict[str, VerificationKey] = {}
        self.by_alg: dict[str, tuple[VerificationKey, ...]] = {}
        self.fetches = 0  # attempts started (tests and metrics)
        self.loaded = False
        self._last_success = -float("inf")
        self._last_attempt = -float("inf")
        self._task: asyncio.Task[None] | None = None

    # -- lookups (synchronous) -----------------------------------------------------------

    def maybe_refresh(self) -> None:
        """Start a background refresh when the keys are stale (never waits)."""
        now = self._clock()
        if (
            self._task is None
            and now - self._last_success >= self.refresh_interval
            and now - self._last_attempt >= self.min_refresh
        ):
            self._start(now)

    def refresh_for_unknown_kid(self) -> asyncio.Task[None] | None:
        """The fetch to wait for after an unknown ``kid`` (or no key at all), or ``None``
        when one ran less than ``min_refresh`` ago. The ``kid`` is attacker-chosen (RFC
        8725 §3.10): random kids must not turn the proxy into a JWKS hammer."""
        if self._task is not None:
            return self._task
        now = self._clock()
        if now - self._last_attempt < self.min_refresh:
            return None
        return self._start(now)

    def start(self) -> None:
        """Fetch now in the background if nothing was fetched yet (needs a running loop)."""
        if not self.loaded and self._task is None:
            self._start(self._clock())

    async def aclose(self) -> None:
        """Cancel a fetch in flight."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- fetching ------------------------------------------------------------------------

    def _start(self, now: float) -> asyncio.Task[None]:
        self._last_attempt = now
        self.fetches += 1
        task = asyncio.get_running_loop().create_task(self._refresh())
        self._task = task
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None

    async def _refresh(self) -> None:
        try:
            response = await self._fetch(self.url, timeout=self.timeout)
            if not 200 <= response.status < 300:
                raise FetchError(f"GET {self.url}: status {response.status}")
            keys = parse_jwks(response.body, self.algorithms)
        except (FetchError, ValueError) as exc:
            log.warning("JWKS refresh failed, keeping %d cached keys: %s", len(self.by_kid), exc)
            return
        except Exception:  # never lose it: a refresh must not kill the source
            log.exception("JWKS refresh failed, keeping the cached keys")
            return
        self._install(keys)
        self._last_success = self._clock()
        self.loaded = True

    def _install(self, keys: list[VerificationKey]) -> None:
        # Replace, don't merge: a key the IdP withdrew is revoked here too (rotation).
        by_alg: dict[str, list[VerificationKey]] = {}
        by_kid: dict[str, VerificationKey] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, key)
            by_alg.setdefault(key.algorithm, []).append(key)
        self.by_kid = by_kid
        self.by_alg = {alg: tuple(ks) for alg, ks in by_alg.items()}
