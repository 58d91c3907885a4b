"""Hypothesis harnesses for the JWT auth filter (:mod:`fastedge.filters.auth`).

The filter's ``on_request`` is fed with

* arbitrary ``Authorization`` values (bytes and text: huge, non-ASCII, control
  characters, many dots, ``Bearer`` prefixes, valid tokens with junk around them);
* structured-but-mutated JWTs: valid tokens whose segments are truncated, swapped,
  duplicated or re-spelled with other base64 alphabets, and tokens re-signed over header
  and payload JSON with wrong types for ``exp``/``nbf``/``iat``/``iss``/``aud``/``kid``/
  ``alg``/``crit``, nested objects, huge numbers, ``NaN``/``Infinity`` and NaN-like strings;
* tokens signed with the wrong key or algorithm (other secret, other RSA key, HS256 keyed
  with the RSA public key, ``none``, algorithms outside the policy).

The contract checked every time: the outcome is ``None`` (verified) or a
:class:`~fastedge.errors.ProxyError` with status 401 (400 only for a duplicated
``Authorization`` field, as the module documents); nothing raises; the filter never falls
into its internal-error catch-all (which hides an exception as a 401 and logs a traceback);
a second identical request (a cache hit when the first was verified) gets the same answer;
and ``None`` comes back exactly when the token is genuinely valid. The oracle,
:func:`oracle_valid`, is written independently of the module: RFC 6750 token syntax,
PyJWT's signature check with the one right key and its pinned algorithm, and the policy's
claim rules restated from docs/config.md (NumericDates must be finite JSON numbers: JSON
has no ``NaN``/``Infinity``, RFC 8259 §6).

Runs are bounded (200 examples each). For a long run, use the ``long`` profile, as for
tests/test_fuzz.py::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz_jwt.py -p no:randomly
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import math
import re
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import event, example, given
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from fastedge.config import _Context
from fastedge.errors import ProxyError
from fastedge.filters import FilterContext, Runtime
from fastedge.filters.auth import AuthFilter, AuthPolicies, AuthState, convert_auth_section
from fastedge.observe.metrics import Metrics
from tests.test_fuzz import FUZZ  # the shared budget; HYPOTHESIS_PROFILE=long scales it

SECRET = "fastedge-fuzz-secret-0123456789-abcdefghijkl"  # >= 32 bytes for HS256
OTHER_SECRET = "another-fuzz-secret-that-is-long-enough-for-hs256"
ENV = "FASTEDGE_FUZZ_JWT_SECRET"
NOW = 1_800_000_000.0  # the injected wall clock: examples never depend on real time
ISSUER = "https://issuer.test"
AUDIENCES = ("api", "api-2")
MAX_AGE = 600.0
LEEWAY = 30.0
RSA_KID = "rsa1"


# --------------------------------------------------------------------------- keys, filter


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    """The policy's RS256 signing key (generated once per session: 2048-bit is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def other_rsa_key() -> rsa.RSAPrivateKey:
    """An RSA key the policy does not know."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def policy_doc() -> dict[str, Any]:
    """One policy with an HS256 key (no kid) and an RS256 key (kid ``rsa1``, inline JWK),
    and every claim rule switched on, so the fuzzer reaches each of them."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key().public_key()))
    return {
        "algorithms": ["HS256", "RS256"],
        "issuer": ISSUER,
        "audience": list(AUDIENCES),
        "max_age": MAX_AGE,
        "leeway": LEEWAY,
        "forward_claims": {"sub": "x-user-id", "role": "x-role"},
        "keys": [
            {"algorithm": "HS256", "secret_env": ENV},
            {"algorithm": "RS256", "kid": RSA_KID, "jwk": jwk},
        ],
    }


@cache
def auth_filter() -> AuthFilter:
    """The filter under test, built like tests/test_auth.py does: the section converted
    by ``convert_auth_section``, then ``AuthState`` with an injected clock.

    Shared by every example on purpose: verified tokens stay in its cache, so later
    examples also exercise the cache-hit path against the same oracle.
    """
    ctx = _Context(
        errors=[], base_dir="", upstream_names=frozenset(), names={"auth": frozenset({"p"})}
    )
    with pytest.MonkeyPatch.context() as mp:  # the secret is read at conversion only
        mp.setenv(ENV, SECRET)
        policies = convert_auth_section(ctx, "auth", {"p": policy_doc()})
    assert not ctx.errors, ctx.errors
    assert isinstance(policies, AuthPolicies)
    state = AuthState(
        policies["p"], Runtime(metrics=Metrics()), clock=lambda: NOW, monotonic=lambda: 1000.0
    )
    return AuthFilter(state)


def fctx(*authorization: bytes) -> FilterContext:
    headers = [(b"host", b"example.test")] + [(b"authorization", v) for v in authorization]
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


class _Records(logging.Handler):
    """Collects ERROR records of ``fastedge.auth``: the catch-all logs its traceback there.

    (caplog is function-scoped, which Hypothesis refuses to share between examples.)"""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def internal_errors() -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    logger = logging.getLogger("fastedge.auth")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


async def _await(pending: Awaitable[ProxyError | None]) -> ProxyError | None:
    return await pending


def decide(*authorization: bytes) -> ProxyError | None:
    """``on_request`` for a request with these Authorization fields; awaited if it
    returns an awaitable (the uncached paths may)."""
    decision = auth_filter().on_request(fctx(*authorization))
    if decision is None or isinstance(decision, ProxyError):
        return decision
    assert inspect.isawaitable(decision), decision
    return asyncio.run(_await(decision))


def outcome(error: ProxyError | None) -> int | None:
    return None if error is None else error.status


def check(*authorization: bytes) -> int | None:
    """The contract of every example; returns the outcome (None or the status)."""
    with internal_errors() as records:
        first = decide(*authorization)
        second = decide(*authorization)  # a cache hit when the first was verified
    assert first is None or isinstance(first, ProxyError), first
    allowed = {400, 401} if len(authorization) > 1 else {401}
    assert outcome(first) in {None, *allowed}, first
    assert outcome(second) == outcome(first), (first, second)
    # Shown by --hypothesis-show-statistics: the share of examples that were accepted.
    if currently_in_test_context():  # event() only works inside a Hypothesis test
        event("accepted" if first is None else f"refused {outcome(first)}")
    assert not records, f"the auth catch-all fired: {records[0].getMessage()} {records[0].exc_info}"
    return outcome(first)


# --------------------------------------------------------------------------- the oracle

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token.
_B64TOKEN = rb"[A-Za-z0-9\-._~+/]+=*"
_BEARER_RE = re.compile(rb"\s*[Bb][Ee][Aa][Rr][Ee][Rr] +(" + _B64TOKEN + rb") *\s*")


def _strict_json(data: bytes) -> Any:
    """A JOSE header as I-JSON (RFC 7493): no NaN/Infinity (not JSON at all), no number
    beyond an IEEE double (RFC 8259 §6 lets a parser limit the range), no lone surrogate.
    The filter may refuse such headers; claims are judged by the rules below instead."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON (RFC 8259 §6)")

    def double(text: str) -> float:
        number = float(text)  # float("1e999") is inf: out of the double range
        if not math.isfinite(number):
            raise ValueError(f"{text} is beyond an IEEE double")
        return number

    value = json.loads(data, parse_constant=no_constant, parse_int=double, parse_float=double)
    # RFC 7493 §2.1: no lone surrogates ("\ud800"), which have no UTF-8 form; encoding
    # raises UnicodeEncodeError, a ValueError.
    json.dumps(value, ensure_ascii=False).encode("utf-8")
    return value


def _finite_number(value: object) -> float | None:
    """A NumericDate (RFC 7519 §2) as a float, or None: a JSON number, not a boolean,
    and finite (JSON has no NaN or Infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def oracle_valid(token: bytes) -> bool:
    """Whether the policy of :func:`policy_doc` must accept ``token`` at ``NOW``."""
    if re.fullmatch(_B64TOKEN, token) is None:
        return False
    text = token.decode("ascii")
    if text.count(".") != 2:
        return False
    try:
        header = _strict_json(base64.urlsafe_b64decode(text.split(".")[0] + "=="))
    except ValueError:  # also binascii.Error and UnicodeDecodeError
        return False
    if not isinstance(header, dict) or "crit" in header:
        return False  # RFC 7515 §4.1.11: the policy understands no extension
    alg, kid = header.get("alg"), header.get("kid")
    # Key selection: kid "rsa1" is the RS256 key only; any other (string) kid falls back
    # to the keys without a kid, i.e. the HS256 secret; no kid: the key of the alg.
    key: Any
    if kid is not None and not isinstance(kid, str):
        return False
    if kid == RSA_KID:
        if alg != "RS256":
            return False
        key = rsa_key().public_key()
    elif alg == "HS256":
        key = SECRET
    elif alg == "RS256" and kid is None:
        key = rsa_key().public_key()
    else:
        return False
    try:
        claims = jwt.decode(
            text,
            key,
            algorithms=[alg],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
                "verify_sub": False,
                "verify_jti": False,
            },
        )
    except Exception:  # the oracle only needs "PyJWT accepts the signature": yes or no
        return False
    return claims_valid(claims)


def claims_valid(claims: dict[str, Any]) -> bool:
    """The policy's claim rules (docs/config.md ``[auth.NAME]``), restated."""
    for name in ("sub", "exp", "iat"):  # required_claims default + iat for max_age
        if claims.get(name) is None:
            return False
    times: dict[str, float] = {}
    for name in ("exp", "nbf", "iat"):
        if claims.get(name) is not None:
            number = _finite_number(claims[name])
            if number is None:
                return False
            times[name] = number
    if not isinstance(claims["sub"], str):
        return False
    if claims.get("iss") != ISSUER:
        return False
    aud = claims.get("aud")
    auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(isinstance(a, str) and a in AUDIENCES for a in auds):
        return False
    if times["exp"] + LEEWAY <= NOW:
        return False
    if "nbf" in times and times["nbf"] > NOW + LEEWAY:
        return False
    if times["iat"] > NOW + LEEWAY:
        return False
    return NOW - times["iat"] <= MAX_AGE + LEEWAY


# --------------------------------------------------------------------------- signing


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def sign(header: bytes, payload: bytes, alg: str, key: Any) -> bytes:
    """A compact JWS over raw header/payload JSON bytes (RFC 7515 §7.1), signed by hand:
    PyJWT's encoder refuses the malformed headers the fuzzer wants to send."""
    signing_input = b64(header) + b"." + b64(payload)
    if alg == "none":
        return signing_input + b"."
    algorithm = jwt.algorithms.get_default_algorithms()[alg]
    if isinstance(key, bytes):  # an HMAC secret, used raw (also the RSA-PEM forgery)
        prepared: Any = key
    else:
        prepared = algorithm.prepare_key(key)
    return signing_input + b"." + b64(algorithm.sign(signing_input, prepared))


def good_claims() -> dict[str, Any]:
    return {
        "sub": "alice",
        "iss": ISSUER,
        "aud": "api",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 300,
        "role": "admin",
    }


def good_token(alg: str = "HS256") -> bytes:
    if alg == "HS256":
        header = {"alg": "HS256", "typ": "JWT"}
        return sign(json.dumps(header).encode(), json.dumps(good_claims()).encode(), alg, SECRET)
    header = {"alg": "RS256", "typ": "JWT", "kid": RSA_KID}
    return sign(json.dumps(header).encode(), json.dumps(good_claims()).encode(), alg, rsa_key())


# --------------------------------------------------------------------------- strategies

NAN_LIKE = st.sampled_from(
    ["NaN", "nan", "Infinity", "-Infinity", "1e309", "", " ", "1800000000", "0x10", "\ud800"]
)
WEIRD_NUMBERS = st.one_of(
    st.integers(int(NOW) - 2000, int(NOW) + 2000),  # around the leeway/max_age edges
    st.floats(NOW - 2000, NOW + 2000),
    st.integers(),
    st.floats(),  # includes NaN and ±Infinity: json.dumps writes them, PyJWT reads them
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**20, 10**308, 10**309, 10**400, -(10**400)]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), WEIRD_NUMBERS, NAN_LIKE, st.text(max_size=20), st.just(ISSUER)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=8,
)
CLAIM_NAMES = st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "role", "jti"])
HEADER_NAMES = st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jku", "jwk", "x5u", "cty"])
ALGS = st.sampled_from(
    ["HS256", "RS256", "HS384", "HS512", "RS384", "PS256", "ES256", "none", "None", "hs256", ""]
)
SEGMENT_ALPHABET = "ABCxyz019-_+/=.~!% \t\x00é"


@st.composite
def mutated_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Good claims with some replaced by arbitrary JSON values or removed."""
    claims = good_claims()
    for name in draw(st.lists(CLAIM_NAMES, max_size=4)):
        if draw(st.booleans()):
            claims[name] = draw(JSON_VALUES)
        else:
            claims.pop(name, None)
    if draw(st.booleans()):  # aud as an array, maybe with our audience among junk
        claims["aud"] = draw(
            st.lists(st.sampled_from(["api", "api-2", "other", 1, None]), max_size=3)
        )
    return claims


@st.composite
def mutated_header(draw: st.DrawFn) -> tuple[dict[str, Any], str, Any]:
    """A header (maybe with wrong types) plus the algorithm and key that sign it."""
    alg = draw(st.sampled_from(["HS256", "RS256"]))
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if alg == "RS256" and draw(st.booleans()):
        header["kid"] = RSA_KID
    for name in draw(st.lists(HEADER_NAMES, max_size=3)):
        header[name] = draw(st.one_of(JSON_VALUES, ALGS, st.just(RSA_KID)))
    key: Any = SECRET if alg == "HS256" else rsa_key()
    return header, alg, key


def mutate_segments(token: bytes, data: st.DataObject) -> bytes:
    """Segment-level damage: truncation, swaps, duplication, alphabet changes, dots."""
    parts = token.split(b".")
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(
            st.sampled_from(
                ["truncate", "swap", "dup", "drop", "char", "std-b64", "pad", "dots", "empty"]
            )
        )
        i = data.draw(st.integers(0, len(parts) - 1))  # split() never gives []
        if op == "truncate":
            parts[i] = parts[i][: data.draw(st.integers(0, max(0, len(parts[i]))))]
        elif op == "swap" and len(parts) > 1:
            j = data.draw(st.integers(0, len(parts) - 1))
            parts[i], parts[j] = parts[j], parts[i]
        elif op == "dup":
            parts.insert(i, parts[i])
        elif op == "drop" and len(parts) > 1:
            del parts[i]
        elif op == "char":
            seg = parts[i]
            at = data.draw(st.integers(0, len(seg)))
            ch = data.draw(st.sampled_from(SEGMENT_ALPHABET)).encode()
            parts[i] = seg[:at] + ch + seg[at + 1 :]
        elif op == "std-b64":  # the standard alphabet instead of base64url
            parts[i] = parts[i].replace(b"-", b"+").replace(b"_", b"/")
        elif op == "pad":
            parts[i] += b"=" * data.draw(st.integers(1, 3))
        elif op == "dots":
            parts[i] += b"." * data.draw(st.integers(1, 50))
        elif op == "empty":
            parts[i] = b""
    return b".".join(parts)


HUGE = st.builds(
    lambda unit, n: unit * n,
    st.sampled_from([b"A", b".", b"a.b.", b"\xff", b"Bearer "]),
    st.integers(1000, 200_000),
)
AUTH_VALUES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=200).map(lambda t: b"Bearer " + t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda scheme, body: scheme + body,
        st.sampled_from([b"Bearer ", b"bearer ", b"BEARER  ", b"Bearer\t", b"Basic ", b" Bearer "]),
        st.binary(max_size=200) | st.text(alphabet=".", max_size=300).map(str.encode),
    ),
    HUGE,
    HUGE.map(lambda v: b"Bearer " + v),
)


# --------------------------------------------------------------------------- the harnesses


@FUZZ
@given(value=AUTH_VALUES)
@example(value=b"Bearer " + b"." * 100_000)
@example(value=b"Bearer \xe2\x82\xac.\x00.\x7f")
def test_arbitrary_authorization_values(value: bytes) -> None:
    """Any Authorization value: None only for a genuinely valid bearer token, else 401."""
    result = check(value)
    if result is None:
        match = _BEARER_RE.fullmatch(value)
        assert match is not None and oracle_valid(match.group(1)), value


@FUZZ
@given(
    alg=st.sampled_from(["HS256", "RS256"]),
    prefix=st.sampled_from([b"Bearer ", b"bearer ", b"Bearer   ", b"BeArEr "]),
    suffix=st.sampled_from([b"", b" ", b"  \t", b"x", b".", b"=", b"\x00", b" junk"]),
)
def test_valid_tokens_with_junk_around(alg: str, prefix: bytes, suffix: bytes) -> None:
    """A valid token with whitespace or junk around it: accepted exactly when the field
    is still ``Bearer <b64token>`` and that token is valid (``=`` padding is b64token
    syntax and PyJWT ignores it, so ``token=`` is the same valid token)."""
    value = prefix + good_token(alg) + suffix
    result = check(value)
    match = _BEARER_RE.fullmatch(value)
    assert (result is None) == (match is not None and oracle_valid(match.group(1))), value


@FUZZ
@given(alg=st.sampled_from(["HS256", "RS256"]), data=st.data())
def test_mutated_token_segments(alg: str, data: st.DataObject) -> None:
    """Valid tokens damaged segment by segment: accepted exactly when still valid."""
    token = mutate_segments(good_token(alg), data)
    result = check(b"Bearer " + token)
    assert (result is None) == oracle_valid(token), (result, token)


@FUZZ
@given(header=mutated_header(), claims=mutated_claims(), mode=st.integers(0, 3))
def test_resigned_tokens_with_mutated_json(
    header: tuple[dict[str, Any], str, Any], claims: dict[str, Any], mode: int
) -> None:
    """Correctly signed tokens over mutated header/payload JSON (wrong types, NaN,
    huge numbers, nested objects, crit, foreign kid): accepted exactly when valid."""
    fields, alg, key = header
    head = json.dumps(fields).encode()
    payload = json.dumps(claims).encode()
    if mode == 1:  # payload not an object, or not JSON at all
        payload = json.dumps([claims]).encode()
    elif mode == 2:
        payload = payload[: len(payload) // 2]
    token = sign(head, payload, alg, key)
    result = check(b"Bearer " + token)
    assert (result is None) == oracle_valid(token), (result, fields, claims)


@FUZZ
@given(
    alg=st.sampled_from(["HS256", "RS256"]),
    claim=st.sampled_from(["exp", "nbf", "iat"]),
    value=st.one_of(WEIRD_NUMBERS, JSON_VALUES),
)
def test_time_claims_of_any_value(alg: str, claim: str, value: object) -> None:
    """An otherwise valid token with one of ``exp``/``nbf``/``iat`` set to any JSON value
    (numbers around the leeway and ``max_age`` edges, huge, fractional, NaN, Infinity,
    strings, booleans, arrays, objects): accepted exactly when the oracle says so."""
    claims = {**good_claims(), claim: value}
    header = {"alg": alg, "typ": "JWT", **({"kid": RSA_KID} if alg == "RS256" else {})}
    key: Any = SECRET if alg == "HS256" else rsa_key()
    token = sign(json.dumps(header).encode(), json.dumps(claims).encode(), alg, key)
    result = check(b"Bearer " + token)
    assert (result is None) == oracle_valid(token), (result, claim, value)


WRONG_KEYS: list[tuple[str, str]] = [
    ("HS256", "other-secret"),
    ("RS256", "other-rsa"),
    ("HS256", "rsa-public-pem"),  # the HS/RS confusion forgery
    ("HS384", "secret"),
    ("HS512", "secret"),
    ("RS384", "rsa"),
    ("PS256", "rsa"),
    ("none", "none"),
    ("HS256", "secret"),  # right key: only the header's alg/kid decide
    ("RS256", "rsa"),
]


@FUZZ
@given(
    signing=st.sampled_from(WRONG_KEYS),
    header_alg=st.one_of(st.none(), ALGS),
    kid=st.sampled_from([None, RSA_KID, "other", 5, "", ["rsa1"]]),
    claims=st.one_of(st.just(good_claims()), mutated_claims()),
)
def test_wrong_key_or_algorithm(
    signing: tuple[str, str], header_alg: str | None, kid: object, claims: dict[str, Any]
) -> None:
    """Signed with another key or algorithm, or an alg/kid header that lies: refused
    unless the one right key and its pinned algorithm verify it."""
    alg, which = signing
    keys: dict[str, Any] = {
        "other-secret": OTHER_SECRET,
        "other-rsa": other_rsa_key(),
        "rsa-public-pem": public_pem(rsa_key()),
        "secret": SECRET.encode(),
        "rsa": rsa_key(),
        "none": None,
    }
    fields: dict[str, Any] = {"alg": header_alg if header_alg is not None else alg, "typ": "JWT"}
    if kid is not None:
        fields["kid"] = kid
    token = sign(json.dumps(fields).encode(), json.dumps(claims).encode(), alg, keys[which])
    result = check(b"Bearer " + token)
    assert (result is None) == oracle_valid(token), (result, fields, signing)
    if which not in ("secret", "rsa"):
        assert result == 401  # nothing signed by another key is ever accepted


@FUZZ
@given(
    values=st.lists(st.one_of(AUTH_VALUES, st.just(b"Bearer " + b"x.y.z")), min_size=2, max_size=3)
)
def test_duplicate_authorization_fields(values: list[bytes]) -> None:
    """More than one Authorization field: always refused (400 invalid_request)."""
    result = check(*values)
    assert result == 400


# --------------------------------------------------------------------------- findings


def test_good_tokens_are_accepted() -> None:
    """Sanity: the harness's valid tokens pass the filter and the oracle."""
    for alg in ("HS256", "RS256"):
        assert oracle_valid(good_token(alg))
        assert check(b"Bearer " + good_token(alg)) is None


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_numericdate_is_refused(claim: str, value: str) -> None:
    """``exp``/``nbf``/``iat`` of ``NaN`` or ``Infinity`` (not JSON, but what PyJWT's
    ``json.loads`` reads from a signed payload) must not make a token valid: a NaN
    compares false with everything, so every time check would pass and the token would
    never expire."""
    payload = json.dumps(good_claims())
    payload = payload.replace(f'"{claim}": {good_claims().get(claim, 0)}', f'"{claim}": {value}')
    if f'"{claim}": {value}' not in payload:  # nbf is not in the good claims: add it
        payload = payload[:-1] + f', "{claim}": {value}}}'
    token = sign(b'{"alg":"HS256","typ":"JWT"}', payload.encode(), "HS256", SECRET)
    assert not oracle_valid(token)
    assert check(b"Bearer " + token) == 401


@pytest.mark.parametrize("claim", ["exp", "iat"])
def test_huge_numericdate_does_not_hit_the_catch_all(claim: str) -> None:
    """``exp``/``iat`` beyond the float range (e.g. 10**400, a valid JSON number) must be
    judged by the claim rules, not crash them into the internal-error catch-all."""
    claims = {**good_claims(), claim: 10**400}
    token = sign(b'{"alg":"HS256","typ":"JWT"}', json.dumps(claims).encode(), "HS256", SECRET)
    check(b"Bearer " + token)  # asserts the catch-all did not fire


def test_lone_surrogate_in_forwarded_claim_does_not_hit_the_catch_all() -> None:
    """A forwarded claim (``sub``) holding a lone surrogate (``"\\ud800"``, which PyJWT's
    ``json.loads`` accepts) must be dropped or refused, not crash the header rendering."""
    claims = {**good_claims(), "sub": "\ud800"}
    token = sign(b'{"alg":"HS256","typ":"JWT"}', json.dumps(claims).encode(), "HS256", SECRET)
    check(b"Bearer " + token)  # asserts the catch-all did not fire
