"""Configuration: a TOML file in, a validated, typed, immutable :class:`Config` out.

The flow is ``load_config(path)`` → ``tomllib`` → :func:`parse_config` → :class:`Config`.
Validation never stops at the first problem: every error is collected with its key path
(``routes[2].upstream: unknown upstream 'userz'``) in document order, table by table, and
raised together as one :class:`ConfigError` so ``fastedge check`` can print them all and
exit 2 (DESIGN.md §6).

How the code is laid out, so a new section is a small, local change:

* value parsers (:func:`parse_duration`, :func:`parse_size`, :func:`parse_listen`, and
  private ones for integers, choices, paths, URLs) turn one raw value into a typed one or
  raise :class:`ValueError` with a message that does not repeat the key;
* a *converter* is ``(ctx, path, raw) -> value | _INVALID`` and records its own errors;
  :func:`_field` wraps a value parser into one;
* a *schema* is a ``{toml_key: _Key}`` dict; :func:`_read_table` walks a table in
  document order, runs each key's converter, reports unknown keys (with a ``difflib``
  suggestion) and missing required keys;
* each section has a dataclass, a schema and one short converter that adds its
  cross-field checks; :data:`_TOP_LEVEL` lists the sections.

The full schema, every default and where it comes from, is in ``docs/config.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from fractions import Fraction
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "AdminConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "FallbackResponseConfig",
    "HealthCheckConfig",
    "OutlierConfig",
    "PoolConfig",
    "RetryConfig",
    "RouteConfig",
    "ServerConfig",
    "TLSConfig",
    "TargetConfig",
    "UpstreamConfig",
    "format_listen",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_listen",
    "parse_size",
    "parse_targets",
    "redacted",
]

HttpEngine: TypeAlias = Literal["auto", "h11", "fast"]
IoMode: TypeAlias = Literal["auto", "edge", "loop"]
Balance: TypeAlias = Literal["round_robin", "least_conn", "p2c_ewma", "consistent_hash"]

_KIB: Final = 1024
_MIB: Final = 1024 * _KIB
_GIB: Final = 1024 * _MIB


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds every problem found.

    Each error reads ``"key.path: message"`` (for example
    ``"server.workers: expected an integer, got string"``); ``str()`` joins them with
    newlines, which is exactly what ``fastedge check`` prints on stderr.
    """

    def __init__(self, errors: list[str], *, source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """``[server.tls]``: serve HTTPS with this PEM certificate chain and private key."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: the client-facing listener and its protection limits."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)
    # Loopback by default: exposing a proxy is a decision, not an accident.
    http: HttpEngine = "auto"
    workers: int = 1
    # Processes sharing the listener (fastedge.workers); "auto" = one per usable CPU.
    io: IoMode = "auto"
    # Whose transports carry plain-TCP connections (fastedge.transports): "edge" =
    # fastedge's own epoll set, "loop" = the event loop's; "auto" = edge where it runs.
    express: bool = True
    # The express lane (fastedge._core.express): simple GET/HEAD exchanges on plain routes
    # are scanned and rewritten in C. Off only to compare against the general path.
    tls: TLSConfig | None = None
    header_timeout: float = 10.0
    # Time to receive the whole request head (slowloris). nginx client_header_timeout is
    # 60s; HAProxy's "timeout http-request" is commonly set to 10s, which we follow.
    keepalive_timeout: float = 75.0
    # Idle time between requests on a client connection: nginx keepalive_timeout 75s.
    body_timeout: float = 60.0
    # Idle time between two reads of a request body: nginx client_body_timeout 60s.
    drain_timeout: float = 30.0
    # Graceful shutdown/reload: how long in-flight requests may finish. Kubernetes'
    # default terminationGracePeriodSeconds is 30s, so a drain fits inside it.
    max_head_bytes: int = 16 * _KIB
    # Request line + header fields. Node.js --max-http-header-size and h11's
    # max_incomplete_event_size are both 16 KiB; nginx allows 4 x 8k buffers.
    max_uri_bytes: int = 8 * _KIB
    # nginx large_client_header_buffers 8k (a request line must fit one buffer);
    # RFC 9112 §3 asks for at least 8000 octets.
    max_headers: int = 100
    # Apache LimitRequestFields 100; HAProxy tune.http.maxhdr 101.
    max_body_bytes: int | None = 1 * _GIB
    # None = unlimited. nginx's client_max_body_size 1m breaks ordinary uploads behind a
    # gateway; 1 GiB still stops an endless body. Routes can be stricter later.
    max_connections: int = 10_000
    # Concurrent client connections. nginx worker_connections 512 counts upstream sides
    # too and is sized for small hosts; 10k clients need ~20k fds with their upstreams.
    max_connections_per_ip: int = 0
    # Concurrent connections from one client address; 0 = no limit. nginx (limit_conn)
    # and HAProxy (src_conn_cur) leave it off by default too: behind NAT or a carrier-grade
    # NAT, thousands of users share an address, so a default would refuse real traffic.
    max_requests_per_connection: int = 1000
    # nginx keepalive_requests 1000 (since 1.19.10): bounds per-connection state and lets
    # an L4 balancer in front rebalance long-lived clients. 0 = unlimited.
    access_log: str | None = "-"
    # "-" = stdout, otherwise a file path; None = off.
    backlog: int = 1024
    # listen(2) backlog: between nginx's 511 and uvicorn's 2048; the kernel caps it at
    # net.core.somaxconn (4096 since Linux 5.4).
    proxy_name: str = "fastedge"
    # Our pseudonym in Via (RFC 9110 §7.6.3).


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the admin API/dashboard listener; ``listen`` None = disabled."""

    listen: tuple[str, int] | None = ("127.0.0.1", 9901)
    # Envoy's conventional admin port, on loopback only.
    token_env: str = "FASTEDGE_ADMIN_TOKEN"
    # The *name* of the environment variable holding the bearer token; the token itself
    # never appears in a config file.


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One upstream server; ``url`` is normalised to ``scheme://host:port``."""

    url: str
    scheme: Literal["http", "https"]
    host: str
    port: int
    weight: int = 1
    priority: int = 0
    # Priority group: 0 takes the traffic while it has an available target, then 1, and
    # so on (Envoy's priority levels, 0 = highest). Only used by resilient upstreams.


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """``[upstreams.NAME.pool]``: connection pool and timeouts, applied per target."""

    max_connections: int = 100
    # Per target, idle + busy. Envoy's circuit-breaker max_connections default is 1024 per
    # cluster; 100 per target keeps one slow backend from eating the fd budget.
    idle_timeout: float = 60.0
    # nginx upstream keepalive_timeout 60s. Keep it below the upstream's own idle timeout
    # (nginx 75s, Node.js 5s!) or we will reuse connections the server is closing.
    wait_timeout: float = 5.0
    # How long a request waits for a free connection when the pool is full → 503.
    connect_timeout: float = 5.0
    # nginx proxy_connect_timeout is 60s; a healthy LAN connect takes milliseconds, and
    # 5s (Envoy's cluster connect_timeout default) fails over while the client still waits.
    response_timeout: float = 60.0
    # Time to the response head and between reads: nginx proxy_read_timeout 60s.


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """``[upstreams.NAME.health_check]``: active HTTP checks of every target."""

    path: str = "/healthz"
    interval: float = 2.0
    # HAProxy "check inter 2s".
    timeout: float = 1.0
    # A health endpoint slower than 1 s is itself a sign (HAProxy's "timeout check" falls
    # back to inter; nginx Plus health_check uses proxy_connect/read_timeout).
    expected_statuses: tuple[str, ...] = ("2xx", "3xx")
    # nginx Plus's default match: any 2xx or 3xx passes. Items are "Nxx" or a code.
    rise: int = 2
    fall: int = 3
    # HAProxy "rise 2 fall 3": 2 passes bring a target back, 3 failures take it out.
    host: str | None = None  # Host of the probes; None = host_header, else the target's

    def statuses(self) -> frozenset[int]:
        """The expected statuses as a set of codes."""
        out: set[int] = set()
        for item in self.expected_statuses:
            if item.endswith("xx"):
                base = int(item[0]) * 100
                out.update(range(base, base + 100))
            else:
                out.add(int(item))
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """``[upstreams.NAME.outlier]``: passive ejection of targets that keep failing."""

    consecutive_failures: int = 5
    # Envoy outlier_detection consecutive_5xx 5 (5xx, connect errors and timeouts count).
    base_ejection: float = 30.0
    # Envoy base_ejection_time 30s, multiplied by the number of ejections...
    max_ejection: float = 300.0
    # ...up to Envoy's max_ejection_time 300s.


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """``[upstreams.NAME.breaker]``: a circuit breaker per target."""

    failure_ratio: float = 0.5
    # Hystrix circuitBreaker.errorThresholdPercentage 50.
    min_requests: int = 20
    # Hystrix circuitBreaker.requestVolumeThreshold 20 (outcomes in the window).
    window: float = 10.0
    # Hystrix metrics.rollingStats.timeInMilliseconds 10000 (10 buckets).
    open_for: float = 5.0
    # Hystrix circuitBreaker.sleepWindowInMilliseconds 5000.
    open_for_max: float = 60.0
    # A failed half-open probe doubles the open time up to this (Resilience4j's
    # exponential waitDurationInOpenState, capped at 60 s).
    half_open_probes: int = 1
    # Hystrix lets a single trial request through.


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``[upstreams.NAME.retry]``: retry policy and retry budget."""

    attempts: int = 3
    # Counts the first try (gRPC maxAttempts): up to two retries.
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    # Envoy's retry back-off: 25 ms base interval, capped at 10x.
    jitter: Literal["full", "equal", "none"] = "full"
    # "Exponential Backoff And Jitter" (AWS architecture blog, 2015) recommends full.
    statuses: tuple[int, ...] = (502, 503, 504)
    # Envoy retry_on "gateway-error".
    on_timeout: bool = True
    non_idempotent: bool = False
    # nginx >= 1.9.13 retries non-idempotent requests only with "non_idempotent".
    budget_ratio: float = 0.2
    budget_min_per_second: float = 10.0
    # Finagle RetryBudget(): retries <= 20% of requests + 10/s over a 10 s window.


@dataclass(frozen=True, slots=True)
class FallbackResponseConfig:
    """``[upstreams.NAME.fallback_response]``: a static answer when no target can serve."""

    status: int = 503
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``[upstreams.NAME]``: a named group of targets and how to reach them."""

    name: str
    targets: tuple[TargetConfig, ...]
    balance: Balance = "round_robin"
    pool: PoolConfig = field(default_factory=PoolConfig)
    tls_ca: str | None = None  # None = the system trust store
    tls_verify: bool = True
    tls_server_name: str | None = None  # None = the target's host (SNI + verification)
    host_header: str | None = None  # None = pass the client's Host through
    hash_key: str = "ip"
    # consistent_hash only: what a request's affinity key is — "ip", "path",
    # "header:NAME", "cookie:NAME" or "claim:NAME" (a verified JWT claim; else the IP).
    # Resilience (docs/resilience.md); None = not configured.
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig | None = None
    breaker: BreakerConfig | None = None
    retry: RetryConfig | None = None
    fallback: str | None = None  # another upstream's name: takes requests none can serve
    fallback_response: FallbackResponseConfig | None = None  # or a static answer

    @property
    def resilient(self) -> bool:
        """Whether requests go through the resilient path (health, breakers, priority
        groups, retries, fallback); otherwise the plain fast path is used."""
        return (
            self.health_check is not None
            or self.outlier is not None
            or self.breaker is not None
            or self.retry is not None
            or self.fallback is not None
            or self.fallback_response is not None
            or len({t.priority for t in self.targets}) > 1
        )


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One ``[[routes]]`` entry: which requests go to which upstream, and the path sent."""

    prefix: str
    upstream: str
    host: str | None = None  # None = any Host
    methods: frozenset[str] | None = None  # None = any method
    strip_prefix: bool = False
    rewrite: str | None = None  # replaces the matched prefix
    name: str = ""  # defaults to the prefix when loaded from TOML
    policies: Mapping[str, Any] = field(default_factory=dict)
    # Route keys owned by feature modules (auth, rate_limit, ...): key -> converted value.


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; ``source`` is the file it came from."""

    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    source: str | None = None
    sections: Mapping[str, Any] = field(default_factory=dict)
    # Top-level sections owned by feature modules ([redis], [auth.NAME], ...): name ->
    # converted value. See EXTENSION_SECTIONS.


# --------------------------------------------------------------------------- value parsers


def _type_name(value: object) -> str:
    """The TOML name of a value's type, for "expected X, got Y" messages."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__  # datetime, date, time


def _expected(what: str, value: object) -> ValueError:
    return ValueError(f"expected {what}, got {_type_name(value)}")


def _with_key(key: str, exc: ValueError) -> ValueError:
    return ValueError(f"{key}: {exc}" if key else str(exc))


_DURATION_RE: Final = re.compile(r"([0-9]+(?:[.][0-9]+)?)[ ]?([a-zA-Z]+)")
_DURATION_UNITS: Final[Mapping[str, float]] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def _duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _expected("a duration like '5s' or '250ms' (or a number of seconds)", value)
    if isinstance(value, str):
        if value.startswith("-"):
            raise ValueError(f"duration must not be negative, got {value!r}")
        match = _DURATION_RE.fullmatch(value)
        if match is None:
            if re.fullmatch(r"[0-9]+(?:[.][0-9]+)?", value):
                # "5" is ambiguous (seconds? milliseconds?), so a string needs a unit.
                raise ValueError(f"duration {value!r} needs a unit, e.g. '{value}s'")
            raise ValueError(f"invalid duration {value!r} (use e.g. '250ms', '5s', '1.5m')")
        number, unit = match.groups()
        if unit not in _DURATION_UNITS:
            units = ", ".join(_DURATION_UNITS)
            raise ValueError(f"unknown duration unit {unit!r} in {value!r} (use {units})")
        seconds = float(number) * _DURATION_UNITS[unit]
    else:
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("duration is too large") from None
        if math.isnan(seconds):
            raise ValueError("duration must be a number, got nan")
        if seconds < 0:
            raise ValueError(f"duration must not be negative, got {value}")
    if not math.isfinite(seconds):
        raise ValueError("duration is too large")
    return seconds


def parse_duration(value: str | int | float, *, key: str = "") -> float:
    """Parse a duration into seconds.

    Strings carry a unit: ``"250ms"``, ``"5s"``, ``"1.5s"``, ``"5m"``, ``"1h"``, ``"2d"``.
    TOML numbers are seconds (``30``, ``0.5``). Negative, non-finite, unit-less strings
    (``"5"`` — seconds or milliseconds?) and garbage raise :class:`ValueError`; its
    message starts with ``key: `` when *key* is given.
    """
    try:
        return _duration(value)
    except ValueError as exc:
        raise _with_key(key, exc) from None


_SIZE_RE: Final = re.compile(r"([0-9]+(?:[.][0-9]+)?)[ ]?([a-zA-Z]+)")
_SIZE_UNITS: Final[Mapping[str, int]] = {
    # Decimal units are powers of 1000 and binary units powers of 1024 (IEC 80000-13),
    # matched case-insensitively; nginx-style "64m" is refused as ambiguous.
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _expected("a size like '64MiB' (or a number of bytes)", value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if value.startswith("-"):
        raise ValueError(f"size must not be negative, got {value!r}")
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        if re.fullmatch(r"[0-9]+(?:[.][0-9]+)?", value):
            raise ValueError(f"size {value!r} needs a unit, e.g. '{value}B' or '{value}KiB'")
        raise ValueError(f"invalid size {value!r} (use e.g. '512KiB', '64MiB', '10MB')")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(
            f"unknown size unit {unit!r} in {value!r} "
            "(use B, KB, MB, GB, TB for powers of 1000 or KiB, MiB, GiB, TiB for 1024)"
        )
    size = Fraction(number) * multiplier
    if size.denominator != 1:
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(size)


def parse_size(value: str | int, *, key: str = "") -> int:
    """Parse a size into bytes.

    ``"100B"``, ``"1KB"`` (1000), ``"10MB"`` (10**6), ``"512KiB"`` (512 * 1024),
    ``"64MiB"``, ``"1.5GiB"``; a TOML integer is a number of bytes. Units are
    case-insensitive; ``"64M"`` is refused (MB or MiB?). Bad input raises
    :class:`ValueError`, prefixed with ``key: `` when *key* is given.
    """
    try:
        return _size(value)
    except ValueError as exc:
        raise _with_key(key, exc) from None


# A DNS name (RFC 1123 labels); the last label is not all-digits, so "10.0.0.256" is
# judged as an IPv4 address (and refused) rather than accepted as a name.
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"(?:[A-Za-z0-9-]*[A-Za-z-][A-Za-z0-9-]*)(?<!-)\.?"
)


def _hostname(value: str) -> str:
    """Validate an IPv4 address or DNS name (not bracketed IPv6); return it lower-cased."""
    if re.fullmatch(r"[0-9.]+", value):
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"invalid IPv4 address {value!r}") from None
    if _HOSTNAME_RE.fullmatch(value) is None or value.startswith("-"):
        raise ValueError(f"invalid host name {value!r}")
    return value.lower()


def _port(text: str, original: str, *, minimum: int) -> int:
    if not text:
        raise ValueError(f"missing port in {original!r}")
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise ValueError(f"invalid port {text!r} in {original!r}")
    port = int(text)
    if not minimum <= port <= 65535:
        raise ValueError(f"port must be between {minimum} and 65535, got {port}")
    return port


def _listen(value: object) -> tuple[str, int]:
    if not isinstance(value, str):
        raise _expected("an address like '127.0.0.1:8080'", value)
    if value.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", value, re.DOTALL)
        if match is None:
            raise ValueError(f"invalid address {value!r} (use e.g. '[::1]:8080')")
        host_text, port_text = match.group(1), match.group(2)
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host_text!r} in {value!r}") from None
        return host, _port(port_text or "", value, minimum=0)
    host_text, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"missing port in {value!r} (use e.g. '127.0.0.1:8080' or ':8080')")
    if ":" in host_text:
        raise ValueError(f"IPv6 addresses need brackets, e.g. '[::1]:8080', got {value!r}")
    # ":8080" (and nginx-style "*:8080") means every IPv4 interface.
    host = "0.0.0.0" if host_text in ("", "*") else _hostname(host_text)
    return host, _port(port_text, value, minimum=0)


def parse_listen(value: str, *, key: str = "") -> tuple[str, int]:
    """Parse a listen address into ``(host, port)``.

    ``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``; ``"[::1]:8080"`` → ``("::1", 8080)``;
    ``":8080"`` → ``("0.0.0.0", 8080)`` (all interfaces); host names are allowed. Port
    0 asks the OS for an ephemeral port (tests use it). Bad input raises
    :class:`ValueError`, prefixed with ``key: `` when *key* is given.
    """
    try:
        return _listen(value)
    except ValueError as exc:
        raise _with_key(key, exc) from None


def format_listen(address: tuple[str, int]) -> str:
    """The inverse of :func:`parse_listen`: ``("::1", 8080)`` → ``"[::1]:8080"``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- schema machinery


class _Invalid:
    """Marker for "this value was bad; its error is already recorded"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "_INVALID"


_INVALID: Final = _Invalid()


@dataclass(slots=True)
class _Context:
    """What converters share while one document is validated."""

    errors: list[str]
    base_dir: str  # relative file paths are resolved against the config file's directory
    upstream_names: frozenset[str]  # known before routes are read, whatever the order
    names: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Sub-table names of every top-level table ("auth" -> {"default", ...}), so a route
    # key can check a reference to a section defined later in the file.

    def defined(self, section: str) -> frozenset[str]:
        """Names defined under ``[section.NAME]`` in this document."""
        return self.names.get(section, frozenset())

    def error(self, path: str, message: str) -> _Invalid:
        self.errors.append(f"{path}: {message}")
        return _INVALID


Converter: TypeAlias = Callable[[_Context, str, object], Any]
"""``(ctx, key_path, raw_value) -> value | _INVALID``; records its own errors in ctx."""


@dataclass(frozen=True, slots=True)
class _Key:
    """One key of a table schema: its converter, dataclass attribute, and if required."""

    convert: Converter
    attr: str | None = None  # None = same as the TOML key
    required: bool = False


_Schema: TypeAlias = Mapping[str, _Key]

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: str, key: object) -> str:
    """Extend a key path, quoting keys that are not TOML bare keys."""
    text = key if isinstance(key, str) and _BARE_KEY_RE.fullmatch(key) else _quote(key)
    return f"{path}.{text}" if path else text


def _quote(key: object) -> str:
    if isinstance(key, str):
        escaped = key.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if c.isprintable() else repr(c)[1:-1] for c in escaped) + '"'
    return repr(key)


def _show(value: str) -> str:
    """A user value in a message: quoted, with control characters made visible."""
    return repr(value)


def _did_you_mean(word: object, options: list[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(slots=True)
class _Table:
    """A converted table: values keyed by dataclass attribute; ``complete`` is False when
    a required key is missing or invalid (so the dataclass cannot be built)."""

    values: dict[str, Any]
    complete: bool


def _read_table(ctx: _Context, path: str, value: object, schema: _Schema) -> _Table | None:
    """Convert a table by *schema*, in document order; None if *value* is not a table.

    Unknown keys (with a suggestion), bad values and missing required keys are recorded
    in *ctx*; the valid values are still returned so callers can run their cross-field
    checks and report those problems too.
    """
    if not isinstance(value, Mapping):
        ctx.error(path or "(document)", f"expected a table, got {_type_name(value)}")
        return None
    out: dict[str, Any] = {}
    for key, raw in value.items():
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            ctx.error(_join(path, key), "unknown key" + _did_you_mean(key, list(schema)))
            continue
        converted = spec.convert(ctx, _join(path, key), raw)
        if converted is not _INVALID:
            out[spec.attr or key] = converted
    complete = True
    for key, spec in schema.items():
        if spec.required and key not in value:
            ctx.error(_join(path, key), "required key is missing")
        if spec.required and (spec.attr or key) not in out:
            complete = False
    return _Table(out, complete)


def _build(table: _Table | None, cls: Callable[..., Any], **extra: Any) -> Any:
    """Build the section dataclass from a complete table, else _INVALID."""
    if table is None or not table.complete:
        return _INVALID
    return cls(**table.values, **extra)


def _field(parse: Callable[[object], Any]) -> Converter:
    """Lift a value parser (raising ValueError) into a converter."""

    def convert(ctx: _Context, path: str, value: object) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            return ctx.error(path, str(exc))

    return convert


def _one_or_array(ctx: _Context, path: str, value: object, *, expected: str, empty: str) -> Any:
    """A value that is one string or a non-empty array of items, as a list of
    ``(key path, item)``; else ``_INVALID`` with "expected *expected*, got ..." (or
    *empty* for an empty array) recorded."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, list):
        if not value:
            return ctx.error(path, empty)
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return ctx.error(path, f"expected {expected}, got {_type_name(value)}")


def _section_names(ctx: _Context, path: str, value: object, section: str, what: str) -> Any:
    """Converter body for a route key naming ``[section.NAME]`` tables of this document:
    one name or a non-empty array of distinct names, returned as a tuple in order.
    *what* is how messages call one ("rate limit", "flag")."""
    items = _one_or_array(
        ctx,
        path,
        value,
        expected=f"a {what} name or an array of names",
        empty=f"must name at least one {what}",
    )
    if items is _INVALID:
        return _INVALID
    known = sorted(ctx.defined(section))
    names: list[str] = []
    ok = True
    for item_path, item in items:
        if not isinstance(item, str):
            ctx.error(item_path, f"expected a {what} name, got {_type_name(item)}")
            ok = False
        elif item not in known:
            ctx.error(item_path, f"unknown {what} {_show(item)}" + _did_you_mean(item, known))
            ok = False
        elif item in names:
            ctx.error(item_path, f"{what} {_show(item)} is listed twice")
            ok = False
        else:
            names.append(item)
    return tuple(names) if ok else _INVALID


def _integer(minimum: int, maximum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected("an integer", value)
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _expected("a boolean", value)
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    if not value:
        raise ValueError("must not be empty")
    if not value.isprintable():
        raise ValueError(f"must not contain control characters, got {_show(value)}")
    return value


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str):
            raise _expected("a string", value)
        if value not in options:
            listed = ", ".join(repr(o) for o in options)
            raise ValueError(
                f"must be one of {listed}, got {_show(value)}" + _did_you_mean(value, [*options])
            )
        return value

    return parse


def _duration_at_least(minimum: float, *, inclusive: bool) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = _duration(value)
        if seconds < minimum or (not inclusive and seconds == minimum):
            relation = "at least" if inclusive else "greater than"
            raise ValueError(f"must be {relation} {minimum:g}s, got {value!r}")
        return seconds

    return parse


def _size_between(minimum: int, maximum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        size = _size(value)
        if not minimum <= size <= maximum:
            raise ValueError(
                f"must be between {minimum} and {maximum} bytes, got {value!r} ({size} bytes)"
            )
        return size

    return parse


def _hostname_value(value: object) -> str:
    return _hostname(_string(value))


def _host_and_port(value: object) -> str:
    """A Host header value: ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``."""
    text = _string(value)
    if text.startswith("["):
        bracketed, _, port_text = text.partition("]")
        try:
            host = str(ipaddress.IPv6Address(bracketed[1:]))
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {_show(text)}") from None
        if not port_text:
            return f"[{host}]"
        if not port_text.startswith(":"):
            raise ValueError(f"invalid host {_show(text)}")
        return f"[{host}]:{_port(port_text[1:], text, minimum=1)}"
    name, sep, port_text = text.rpartition(":")
    if not sep:
        return _hostname(text)
    return f"{_hostname(name)}:{_port(port_text, text, minimum=1)}"


def _existing_file(ctx: _Context, path: str, value: object) -> Any:
    """A path to a file that must exist; relative paths start at the config's directory."""
    try:
        text = _string(value)
    except ValueError as exc:
        return ctx.error(path, str(exc))
    resolved = os.path.join(ctx.base_dir, os.path.expanduser(text))
    if not os.path.isfile(resolved):
        return ctx.error(path, f"file not found: {resolved}")
    if not os.access(resolved, os.R_OK):
        return ctx.error(path, f"file is not readable: {resolved}")
    return resolved


# --------------------------------------------------------------------------- [server]


def _new_file(ctx: _Context, path: str, value: object, hint: str) -> Any:
    """A file fastedge writes (created if missing): its path resolved against the config
    file's directory, which must exist. *hint* ends a "not a string" message with what
    else the key takes."""
    try:
        text = _string(value)
    except ValueError as exc:
        return ctx.error(path, f"{exc} ({hint})")
    resolved = os.path.join(ctx.base_dir, os.path.expanduser(text))
    directory = os.path.dirname(resolved) or "."
    if not os.path.isdir(directory):
        return ctx.error(path, f"directory does not exist: {directory}")
    return resolved


def _access_log(ctx: _Context, path: str, value: object) -> Any:
    if value is False or value == "off":
        return None
    if value is True or value == "-":
        return "-"
    return _new_file(ctx, path, value, "use '-' for stdout, a file path, or false")


def _max_body(value: object) -> int | None:
    # 0 and "unlimited" turn the limit off, like nginx's client_max_body_size 0.
    if value == "unlimited":
        return None
    size = _size(value)
    return size or None


def _proxy_name(value: object) -> str:
    text = _string(value)
    if _TOKEN_RE.fullmatch(text) is None:
        raise ValueError(f"must be an HTTP token (RFC 9110 §5.6.2), got {_show(text)}")
    return text


def _tls(ctx: _Context, path: str, value: object) -> Any:
    return _build(_read_table(ctx, path, value, _TLS_SCHEMA), TLSConfig)


_TLS_SCHEMA: Final[_Schema] = {
    "cert": _Key(_existing_file, required=True),
    "key": _Key(_existing_file, required=True),
}

_WORKER_COUNT: Final = _integer(1, 64)


def _workers(value: object) -> int:
    # "auto": one worker per CPU this process may run on (fastedge.workers.cpu_count).
    if value == "auto":
        from fastedge.workers import cpu_count  # not at import time: workers imports config

        return cpu_count()
    return _WORKER_COUNT(value)


_SERVER_SCHEMA: Final[_Schema] = {
    "listen": _Key(_field(_listen)),
    "http": _Key(_field(_choice("auto", "h11", "fast"))),
    "workers": _Key(_field(_workers)),
    "io": _Key(_field(_choice("auto", "edge", "loop"))),
    "express": _Key(_field(_boolean)),
    "tls": _Key(_tls),
    "header_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    # 0 turns keep-alive off (nginx keepalive_timeout 0); 0 drain = close at once.
    "keepalive_timeout": _Key(_field(_duration_at_least(0, inclusive=True))),
    "body_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "drain_timeout": _Key(_field(_duration_at_least(0, inclusive=True))),
    # Below 1 KiB not even common browser requests fit; above 1 MiB a head is an attack.
    "max_head_size": _Key(_field(_size_between(_KIB, _MIB)), attr="max_head_bytes"),
    "max_uri_size": _Key(_field(_size_between(64, _MIB)), attr="max_uri_bytes"),
    "max_headers": _Key(_field(_integer(1, 10_000))),
    "max_body_size": _Key(_field(_max_body), attr="max_body_bytes"),
    "max_connections": _Key(_field(_integer(1, 1_000_000))),
    "max_connections_per_ip": _Key(_field(_integer(0, 1_000_000))),
    "max_requests_per_connection": _Key(_field(_integer(0, 2**31 - 1))),
    "access_log": _Key(_access_log),
    "backlog": _Key(_field(_integer(1, 65535))),
    "proxy_name": _Key(_field(_proxy_name)),
}


_DEFAULT_SERVER: Final = ServerConfig()


def _server(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _SERVER_SCHEMA)
    if table is None:
        return _INVALID
    uri = table.values.get("max_uri_bytes", _DEFAULT_SERVER.max_uri_bytes)
    head = table.values.get("max_head_bytes", _DEFAULT_SERVER.max_head_bytes)
    if uri > head:
        # The request line is part of the head, so a larger URI limit could never apply.
        table.complete = False
        ctx.error(_join(path, "max_uri_size"), f"must not exceed max_head_size ({uri} > {head})")
    return _build(table, ServerConfig)


# --------------------------------------------------------------------------- [admin]


def _admin_listen(value: object) -> tuple[str, int] | None:
    if value == "off" or value is False:
        return None
    return _listen(value)


_ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(value: object) -> str:
    text = _string(value)
    if _ENV_NAME_RE.fullmatch(text) is None:
        raise ValueError(f"must be an environment variable name, got {_show(text)}")
    return text


_ADMIN_SCHEMA: Final[_Schema] = {
    "enabled": _Key(_field(_boolean)),
    "listen": _Key(_field(_admin_listen)),
    "token_env": _Key(_field(_env_name)),
}


def _admin(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _ADMIN_SCHEMA)
    if table is not None and table.values.pop("enabled", True) is False:
        table.values["listen"] = None
    return _build(table, AdminConfig)


# --------------------------------------------------------------------------- [upstreams.*]


def _target_url(value: object) -> TargetConfig:
    text = _string(value)
    if not text.isascii() or any(c.isspace() for c in text):
        raise ValueError(f"invalid URL {_show(text)} (no spaces or non-ASCII characters)")
    if "://" not in text:
        raise ValueError(f"missing scheme in {_show(text)} (use e.g. 'http://{text}')")
    try:
        parts: SplitResult = urlsplit(text)
    except ValueError as exc:  # e.g. "http://[::1"
        raise ValueError(f"invalid URL {_show(text)}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(
            f"URL scheme must be 'http' or 'https', got {parts.scheme!r} in {_show(text)}"
        )
    if "@" in parts.netloc:
        # Credentials in a config file leak into logs and the admin API, and a proxy
        # that silently sent them as Basic auth would surprise; set headers instead.
        raise ValueError(f"user info ('user:password@') is not allowed in {_show(text)}")
    if parts.path not in ("", "/"):
        raise ValueError(f"a target is scheme://host:port, without a path, got {_show(text)}")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError(f"a target has no query or fragment, got {_show(text)}")
    netloc = parts.netloc
    if netloc.startswith("["):
        host_text, _, port_text = netloc[1:].partition("]")
        try:
            host = str(ipaddress.IPv6Address(host_text))
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host_text!r} in {_show(text)}") from None
        if port_text and not port_text.startswith(":"):
            raise ValueError(f"invalid URL {_show(text)}")
        explicit_port = port_text[1:] if port_text else None
    else:
        host_text, sep, port_text = netloc.partition(":")
        if not host_text:
            raise ValueError(f"missing host in {_show(text)}")
        host = _hostname(host_text)
        explicit_port = port_text if sep else None
    scheme: Literal["http", "https"] = "https" if parts.scheme.lower() == "https" else "http"
    default_port = 443 if scheme == "https" else 80
    port = default_port if explicit_port is None else _port(explicit_port, text, minimum=1)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{shown_host}:{port}"
    return TargetConfig(url=url, scheme=scheme, host=host, port=port)


_TARGET_SCHEMA: Final[_Schema] = {
    "url": _Key(_field(_target_url), required=True),
    # HAProxy's weight range; it also bounds the consistent-hash ring (points per weight).
    "weight": _Key(_field(_integer(1, 256))),
    # Envoy's priority levels are 0 (highest) and up; 127 groups is more than plenty.
    "priority": _Key(_field(_integer(0, 127))),
}


def _target(ctx: _Context, path: str, value: object) -> Any:
    if isinstance(value, str):
        return _field(_target_url)(ctx, path, value)
    if not isinstance(value, Mapping):
        return ctx.error(path, f"expected a URL string or a table, got {_type_name(value)}")
    table = _read_table(ctx, path, value, _TARGET_SCHEMA)
    if table is None or not table.complete:
        return _INVALID
    target: TargetConfig = table.values["url"]
    return dataclasses.replace(
        target, weight=table.values.get("weight", 1), priority=table.values.get("priority", 0)
    )


def _targets(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, list | tuple):
        return ctx.error(path, f"expected an array of targets, got {_type_name(value)}")
    if not value:
        return ctx.error(path, "an upstream needs at least one target")
    targets: list[TargetConfig] = []
    seen: dict[str, int] = {}
    ok = True
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        target = _target(ctx, item_path, item)
        if target is _INVALID:
            ok = False
            continue
        if target.url in seen:
            ok = False
            ctx.error(
                item_path,
                f"duplicate target {target.url} (same as {path}[{seen[target.url]}]; "
                "raise its weight instead)",
            )
            continue
        seen[target.url] = index
        targets.append(target)
    return tuple(targets) if ok else _INVALID


_POOL_SCHEMA: Final[_Schema] = {
    "max_connections": _Key(_field(_integer(1, 100_000))),
    "idle_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "wait_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "connect_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "response_timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
}


def _pool(ctx: _Context, path: str, value: object) -> Any:
    return _build(_read_table(ctx, path, value, _POOL_SCHEMA), PoolConfig)


def parse_targets(value: object, *, path: str = "targets") -> tuple[TargetConfig, ...]:
    """Validate a ``targets`` array outside a config file (the admin API's runtime
    target change): the same rules as ``[upstreams.NAME] targets``, every problem
    reported with its key path in one :class:`ConfigError`."""
    ctx = _Context(errors=[], base_dir="", upstream_names=frozenset())
    targets = _targets(ctx, path, value)
    if ctx.errors or targets is _INVALID:
        raise ConfigError(ctx.errors)
    result: tuple[TargetConfig, ...] = targets
    return result


# Resilience sub-tables of an upstream (docs/resilience.md). Defaults and their sources
# are on the dataclasses above.


def _fraction(low: float, high: float) -> Callable[[object], float]:
    """A number in (low, high]."""

    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expected("a number", value)
        number = float(value)
        if not (low < number <= high):
            raise ValueError(f"must be greater than {low:g} and at most {high:g}, got {value}")
        return number

    return parse


def _non_negative(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected("a number", value)
    number = float(value)
    if not (number >= 0 and math.isfinite(number)):
        raise ValueError(f"must be a finite number >= 0, got {value}")
    return number


def _status_specs(value: object) -> tuple[str, ...]:
    """Expected health-check statuses: codes (200) and classes ("2xx")."""
    if not isinstance(value, list | tuple):
        raise _expected('an array of status codes or classes like "2xx"', value)
    if not value:
        raise ValueError("must not be empty")
    out: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            out.append(str(item))
        elif isinstance(item, str) and re.fullmatch(r"[1-5]xx", item.lower()):
            out.append(item.lower())
        else:
            shown = _show(item) if isinstance(item, str) else repr(item)
            raise ValueError(f"item {index} is not a status 100-599 or a class like '2xx': {shown}")
    return tuple(out)


def _retry_statuses(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise _expected("an array of status codes", value)
    out: list[int] = []
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
            raise ValueError(f"item {index} is not a status code 100-599: {item!r}")
        out.append(item)
    return tuple(sorted(set(out)))


def _health_path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/") or not text.isascii() or any(c.isspace() for c in text):
        raise ValueError(f"must be a path starting with '/', without spaces, got {_show(text)}")
    return text


def _text(value: object) -> str:
    """Any string, empty allowed (a response body)."""
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


_HEALTH_CHECK_SCHEMA: Final[_Schema] = {
    "path": _Key(_field(_health_path)),
    "interval": _Key(_field(_duration_at_least(0, inclusive=False))),
    "timeout": _Key(_field(_duration_at_least(0, inclusive=False))),
    "expected_statuses": _Key(_field(_status_specs)),
    "rise": _Key(_field(_integer(1, 100))),
    "fall": _Key(_field(_integer(1, 100))),
    "host": _Key(_field(_host_and_port)),
}

_OUTLIER_SCHEMA: Final[_Schema] = {
    "consecutive_failures": _Key(_field(_integer(1, 1000))),
    "base_ejection": _Key(_field(_duration_at_least(0, inclusive=False))),
    "max_ejection": _Key(_field(_duration_at_least(0, inclusive=False))),
}

_BREAKER_SCHEMA: Final[_Schema] = {
    "failure_ratio": _Key(_field(_fraction(0.0, 1.0))),
    "min_requests": _Key(_field(_integer(1, 1_000_000))),
    "window": _Key(_field(_duration_at_least(0, inclusive=False))),
    "open_for": _Key(_field(_duration_at_least(0, inclusive=False))),
    "open_for_max": _Key(_field(_duration_at_least(0, inclusive=False))),
    "half_open_probes": _Key(_field(_integer(1, 1000))),
}

_RETRY_SCHEMA: Final[_Schema] = {
    "attempts": _Key(_field(_integer(1, 10))),
    "backoff_base": _Key(_field(_duration_at_least(0, inclusive=True))),
    "backoff_max": _Key(_field(_duration_at_least(0, inclusive=True))),
    "jitter": _Key(_field(_choice("full", "equal", "none"))),
    "statuses": _Key(_field(_retry_statuses)),
    "on_timeout": _Key(_field(_boolean)),
    "non_idempotent": _Key(_field(_boolean)),
    "budget_ratio": _Key(_field(_non_negative)),
    "budget_min_per_second": _Key(_field(_non_negative)),
}

_FALLBACK_RESPONSE_SCHEMA: Final[_Schema] = {
    "status": _Key(_field(_integer(200, 599))),
    "body": _Key(_field(_text)),
    "content_type": _Key(_field(_string)),
}


def _ordered(
    ctx: _Context, path: str, table: _Table, low: str, high: str, default: tuple[float, float]
) -> None:
    """``table[low] <= table[high]`` (with the dataclass defaults for missing keys)."""
    lo = table.values.get(low, default[0])
    hi = table.values.get(high, default[1])
    if lo > hi:
        table.complete = False
        ctx.error(_join(path, high), f"must be at least {low} ({hi:g}s < {lo:g}s)")


def _health_check(ctx: _Context, path: str, value: object) -> Any:
    return _build(_read_table(ctx, path, value, _HEALTH_CHECK_SCHEMA), HealthCheckConfig)


def _outlier(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _OUTLIER_SCHEMA)
    if table is not None:
        d = OutlierConfig()
        limits = (d.base_ejection, d.max_ejection)
        _ordered(ctx, path, table, "base_ejection", "max_ejection", limits)
    return _build(table, OutlierConfig)


def _breaker(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _BREAKER_SCHEMA)
    if table is not None:
        d = BreakerConfig()
        _ordered(ctx, path, table, "open_for", "open_for_max", (d.open_for, d.open_for_max))
    return _build(table, BreakerConfig)


def _retry(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _RETRY_SCHEMA)
    if table is not None:
        d = RetryConfig()
        _ordered(ctx, path, table, "backoff_base", "backoff_max", (d.backoff_base, d.backoff_max))
    return _build(table, RetryConfig)


def _fallback_response(ctx: _Context, path: str, value: object) -> Any:
    return _build(_read_table(ctx, path, value, _FALLBACK_RESPONSE_SCHEMA), FallbackResponseConfig)


def _upstream_name(ctx: _Context, path: str, value: object) -> Any:
    """Converter for a key naming an ``[upstreams.NAME]`` of this document (a route's
    ``upstream``, an upstream's ``fallback``, a flag's ``upstream``)."""
    try:
        name = _string(value)
    except ValueError as exc:
        return ctx.error(path, str(exc))
    if name not in ctx.upstream_names:
        hint = _did_you_mean(name, sorted(ctx.upstream_names))
        return ctx.error(path, f"unknown upstream {_show(name)}{hint}")
    return name


def _hash_key(value: object) -> str:
    text = _string(value)
    kind, _, arg = text.partition(":")
    if text in ("ip", "path") or (kind in ("header", "cookie", "claim") and arg):
        return text.lower() if kind == "header" else text
    raise ValueError(
        f"expected 'ip', 'path', 'header:NAME', 'cookie:NAME' or 'claim:NAME', got {_show(text)}"
    )


_UPSTREAM_SCHEMA: Final[_Schema] = {
    "targets": _Key(_targets, required=True),
    "balance": _Key(_field(_choice("round_robin", "least_conn", "p2c_ewma", "consistent_hash"))),
    "pool": _Key(_pool),
    "tls_ca": _Key(_existing_file),
    "tls_verify": _Key(_field(_boolean)),
    "tls_server_name": _Key(_field(_hostname_value)),
    "host_header": _Key(_field(_host_and_port)),
    "hash_key": _Key(_field(_hash_key)),
    "health_check": _Key(_health_check),
    "outlier": _Key(_outlier),
    "breaker": _Key(_breaker),
    "retry": _Key(_retry),
    "fallback": _Key(_upstream_name),
    "fallback_response": _Key(_fallback_response),
}

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _upstream(ctx: _Context, path: str, name: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _UPSTREAM_SCHEMA)
    if table is None:
        return _INVALID
    if "hash_key" in table.values and table.values.get("balance") != "consistent_hash":
        table.complete = False
        ctx.error(_join(path, "hash_key"), "only used with balance = 'consistent_hash'")
    targets: tuple[TargetConfig, ...] | None = table.values.get("targets")
    if targets is not None and not any(t.scheme == "https" for t in targets):
        # TLS settings without an https target would be silently ignored.
        for key in ("tls_ca", "tls_verify", "tls_server_name"):
            if key in table.values:
                table.complete = False
                ctx.error(_join(path, key), "set, but no target of this upstream uses https")
    values = table.values
    if values.get("fallback") == name:
        table.complete = False
        ctx.error(_join(path, "fallback"), "an upstream cannot be its own fallback")
    if "fallback" in values and "fallback_response" in values:
        table.complete = False
        ctx.error(_join(path, "fallback_response"), "set both fallback and fallback_response")
    if ("fallback" in values or "fallback_response" in values) and not (
        "health_check" in values or "breaker" in values
    ):
        # The fallback answers when no target is available; without health checks or
        # breakers every target always is (outlier ejection never takes them all out).
        key = "fallback" if "fallback" in values else "fallback_response"
        table.complete = False
        ctx.error(_join(path, key), "needs health_check or breaker (else never used)")
    return _build(table, UpstreamConfig, name=name)


def _named_tables(
    ctx: _Context,
    path: str,
    value: object,
    convert: Callable[[_Context, str, str, object], Any],
    *,
    expected: str = "a table",
    bad_name: str = "invalid name (use 1-64 letters, digits, '_', '-')",
) -> Any:
    """Convert a section of named tables (``[upstreams.NAME]``, ``[caches.NAME]``, ...).

    Returns ``{NAME: convert(ctx, "section.NAME", NAME, table)}`` in document order for
    every name that is valid (1-64 letters, digits, '_', '-'; else *bad_name* is
    recorded) and whose table converts; ``_INVALID`` when *value* is not a table
    ("expected *expected*, got ..."). Problems are recorded in *ctx*, so the valid
    entries are still there for the caller's cross-entry checks.
    """
    if not isinstance(value, Mapping):
        return ctx.error(path, f"expected {expected}, got {_type_name(value)}")
    out: dict[str, Any] = {}
    for name, item in value.items():
        item_path = _join(path, name)
        if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
            ctx.error(item_path, bad_name)
            continue
        converted = convert(ctx, item_path, name, item)
        if converted is not _INVALID:
            out[name] = converted
    return out


def _upstreams(ctx: _Context, path: str, value: object) -> Any:
    upstreams = _named_tables(
        ctx,
        path,
        value,
        _upstream,
        expected="a table of upstreams",
        bad_name="invalid upstream name (use 1-64 letters, digits, '_', '-')",
    )
    if upstreams is _INVALID:
        return _INVALID
    for name, upstream in upstreams.items():
        # A fallback chain must end: a -> b -> a would pass a request around forever.
        seen = [name]
        nxt = upstream.fallback
        while nxt is not None and nxt in upstreams and nxt not in seen:
            seen.append(nxt)
            nxt = upstreams[nxt].fallback
        if nxt == name:
            chain = " -> ".join([*seen, name])
            ctx.error(_join(_join(path, name), "fallback"), f"fallback cycle: {chain}")
    return upstreams


# --------------------------------------------------------------------------- [[routes]]

# RFC 9110 §5.6.2 token characters (methods and Via pseudonyms are tokens).
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What may appear in a path prefix as sent on the wire: visible ASCII, no query/fragment.
_PATH_RE: Final = re.compile(r"/[!$&'()*+,;=:@%/0-9A-Za-z._~-]*")


def _path_prefix(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {_show(text)}")
    if "?" in text or "#" in text:
        raise ValueError(f"must be a path without query or fragment, got {_show(text)}")
    if _PATH_RE.fullmatch(text) is None:
        raise ValueError(
            f"must contain only URL path characters (percent-encode others), got {_show(text)}"
        )
    return text


def _methods(value: object) -> frozenset[str]:
    if not isinstance(value, list | tuple):
        raise _expected("an array of method names", value)
    if not value:
        raise ValueError("must not be empty (leave the key out to allow every method)")
    methods: set[str] = set()
    for index, item in enumerate(value):
        if not isinstance(item, str) or _TOKEN_RE.fullmatch(item) is None:
            shown = _show(item) if isinstance(item, str) else _type_name(item)
            raise ValueError(f"item {index} is not an HTTP method token: {shown}")
        methods.add(item.upper())
    return frozenset(methods)


_ROUTE_SCHEMA: Final[_Schema] = {
    "prefix": _Key(_field(_path_prefix), required=True),
    "upstream": _Key(_upstream_name, required=True),
    "host": _Key(_field(_hostname_value)),
    "methods": _Key(_field(_methods)),
    "strip_prefix": _Key(_field(_boolean)),
    "rewrite": _Key(_field(_path_prefix)),
    "name": _Key(_field(_string)),
}


def _route(ctx: _Context, path: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _route_schema())
    if table is None:
        return _INVALID
    if table.values.get("strip_prefix") and "rewrite" in table.values:
        table.complete = False
        ctx.error(
            _join(path, "rewrite"),
            "cannot be combined with strip_prefix = true (strip_prefix is rewrite = '/')",
        )
    if "prefix" in table.values:
        table.values.setdefault("name", table.values["prefix"])
    policies = _split_extensions(table.values, "policy:")
    return _build(table, RouteConfig, policies=policies)


def _routes(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, list | tuple):
        return ctx.error(path, f"expected an array of tables ([[routes]]), got {_type_name(value)}")
    routes: list[RouteConfig] = []
    seen: dict[tuple[str, str | None], int] = {}
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        route = _route(ctx, item_path, item)
        if route is _INVALID:
            continue
        key = (route.prefix, route.host)
        if key in seen:
            where = f" and host {route.host!r}" if route.host else ""
            ctx.error(
                _join(item_path, "prefix"),
                f"duplicate route: prefix {route.prefix!r}{where} "
                f"is already used by {path}[{seen[key]}]",
            )
            continue
        seen[key] = index
        routes.append(route)
    return tuple(routes)


# --------------------------------------------------------------------------- the document

# Top-level sections: TOML key → (converter, Config attribute). A new section is a
# dataclass, a schema, a converter, and one line here.
_TOP_LEVEL: Final[_Schema] = {
    "server": _Key(_server),
    "admin": _Key(_admin),
    "upstreams": _Key(_upstreams),
    "routes": _Key(_routes),
}

# Sections and route keys owned by feature modules, as "module:function" converters with
# the Converter signature. They are imported when a document is parsed (not when this
# module is), so feature modules can build on this module's toolkit without an import
# cycle. Converted values land in Config.sections / RouteConfig.policies.
EXTENSION_SECTIONS: Final[dict[str, str]] = {
    "redis": "fastedge.redis_config:convert_redis_section",
    "auth": "fastedge.filters.auth:convert_auth_section",
    "rate_limits": "fastedge.filters.ratelimit:convert_rate_limits_section",
    "tracing": "fastedge.observe.tracing_config:convert_tracing_section",
    "traffic": "fastedge.filters.traffic:convert_traffic_section",
    "flags": "fastedge.filters.traffic:convert_flags_section",
    "traffic_state": "fastedge.filters.traffic:convert_traffic_state_section",
    "caches": "fastedge.filters.cache:convert_caches_section",
}
EXTENSION_ROUTE_KEYS: Final[dict[str, str]] = {
    "auth": "fastedge.filters.auth:convert_route_auth",
    "rate_limit": "fastedge.filters.ratelimit:convert_route_rate_limit",
    "traffic": "fastedge.filters.traffic:convert_route_traffic",
    "flags": "fastedge.filters.traffic:convert_route_flags",
    "cache": "fastedge.filters.cache:convert_route_cache",
    "batch": "fastedge.filters.batch:convert_route_batch",
}


def _load_converter(spec: str) -> Converter:
    module, _, name = spec.partition(":")
    converter: Converter = getattr(importlib.import_module(module), name)
    return converter


def _extension_section(section: str) -> Converter:
    def convert(ctx: _Context, path: str, value: object) -> Any:
        return _load_converter(EXTENSION_SECTIONS[section])(ctx, path, value)

    return convert


def _top_level_schema() -> _Schema:
    schema = dict(_TOP_LEVEL)
    for section in EXTENSION_SECTIONS:
        schema[section] = _Key(_extension_section(section), attr=f"section:{section}")
    return schema


def _route_schema() -> _Schema:
    schema = dict(_ROUTE_SCHEMA)
    for key, spec in EXTENSION_ROUTE_KEYS.items():
        schema[key] = _Key(_wrap_route_key(spec), attr=f"policy:{key}")
    return schema


def _wrap_route_key(spec: str) -> Converter:
    def convert(ctx: _Context, path: str, value: object) -> Any:
        return _load_converter(spec)(ctx, path, value)

    return convert


def _split_extensions(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Move ``prefix:name`` entries out of a converted table into their own mapping."""
    out = {k.partition(":")[2]: values.pop(k) for k in list(values) if k.startswith(prefix)}
    return out


def parse_config(data: Mapping[str, Any], *, source: str | None = None) -> Config:
    """Validate a parsed TOML document and build the :class:`Config`.

    Every problem is collected (with its key path, in document order) and raised together
    as one :class:`ConfigError`. Relative file paths (TLS files, access log) are resolved
    against the directory of *source* when given, else the current directory.
    """
    raw_upstreams = data.get("upstreams") if isinstance(data, Mapping) else None
    names = frozenset(
        name
        for name in (raw_upstreams if isinstance(raw_upstreams, Mapping) else ())
        if isinstance(name, str) and _NAME_RE.fullmatch(name)
    )
    base_dir = os.path.dirname(os.path.abspath(source)) if source is not None else ""
    sections = {
        key: frozenset(k for k in value if isinstance(k, str))
        for key, value in (data.items() if isinstance(data, Mapping) else ())
        if isinstance(key, str) and isinstance(value, Mapping)
    }
    ctx = _Context(errors=[], base_dir=base_dir, upstream_names=names, names=sections)
    table = _read_table(ctx, "", data, _top_level_schema())
    if table is not None:
        _check_cross_section(ctx, table.values)
    if ctx.errors or table is None:
        raise ConfigError(ctx.errors, source=source)
    extensions = _split_extensions(table.values, "section:")
    config: Config = _build(table, Config, source=source, sections=extensions)
    return config


def _check_cross_section(ctx: _Context, out: Mapping[str, Any]) -> None:
    server: ServerConfig = out.get("server", ServerConfig())
    admin: AdminConfig = out.get("admin", AdminConfig())
    if admin.listen is not None and admin.listen == server.listen and admin.listen[1] != 0:
        ctx.error("admin.listen", f"same address as server.listen ({format_listen(admin.listen)})")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file.

    A missing or unreadable file, a non-UTF-8 file or a TOML syntax error (with its line
    and column) raises :class:`ConfigError` naming the file; otherwise see
    :func:`parse_config`.
    """
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read: {exc.strerror or exc}"], source=source
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text: {exc}"], source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"], source=source) from None
    return parse_config(data, source=source)


# --------------------------------------------------------------------------- redaction

_REDACTED: Final = "***"
_SECRET_FIELD_RE: Final = re.compile(r"(?:^|_)(?:password|secret|token)$")


def redacted(config: Config) -> dict[str, Any]:
    """A JSON-able view of *config* for the admin ``GET /config``, without secrets.

    Passwords and user info in URLs (``redis://:pw@host`` → ``redis://:***@host``),
    fields named ``*password``, ``*secret`` or ``*token`` and the current value of every
    ``token_env`` variable wherever it appears become ``"***"``. File paths (TLS key
    included) and environment variable *names* are shown. Addresses read ``host:port``.
    """
    secrets = []
    value = os.environ.get(config.admin.token_env)
    # Very short values would blank unrelated text; a real token is long.
    if value and len(value) >= 4:
        secrets.append(value)
    result = _jsonable(config, secrets)
    assert isinstance(result, dict)
    return result


def _jsonable(value: object, secrets: list[str], name: str = "") -> Any:
    if _SECRET_FIELD_RE.search(name) and value is not None:
        return _REDACTED
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), secrets, f.name) for f in fields(value)}
    if name == "listen" and isinstance(value, tuple):
        return format_listen(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, secrets) for k, v in value.items()}
    if isinstance(value, frozenset):
        return sorted(_jsonable(v, secrets) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v, secrets) for v in value]
    if isinstance(value, str):
        return _redact_text(value, secrets)
    return value


def _redact_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@]*)@", text)
    if match:
        user, colon, _ = match.group(2).partition(":")
        # "user:pw@" keeps the user; a lone "token@" is usually a credential itself.
        userinfo = f"{user}:{_REDACTED}" if colon else _REDACTED
        text = f"{match.group(1)}{userinfo}@{text[match.end() :]}"
    return text
