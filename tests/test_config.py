"""Configuration: value parsers, validation with key paths, loading, redaction."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastedge.config import (
    AdminConfig,
    Config,
    ConfigError,
    PoolConfig,
    RouteConfig,
    ServerConfig,
    TargetConfig,
    TLSConfig,
    UpstreamConfig,
    format_listen,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
    parse_size,
    redacted,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastedge.toml"

UPSTREAM = {"users": {"targets": ["http://127.0.0.1:9001"]}}


def errors_of(data: dict[str, Any], **kwargs: Any) -> list[str]:
    """The errors parse_config reports for *data* (fails if it is accepted)."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value.errors


def only_error(data: dict[str, Any]) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return errors[0]


def with_route(**route: Any) -> dict[str, Any]:
    return {"upstreams": UPSTREAM, "routes": [{"prefix": "/", "upstream": "users", **route}]}


def with_upstream(**upstream: Any) -> dict[str, Any]:
    return {"upstreams": {"users": {"targets": ["http://127.0.0.1:9001"], **upstream}}}


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("0s", 0.0),
        ("10 s", 10.0),
        (30, 30.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-5s", "duration must not be negative, got '-5s'"),
        (-1, "duration must not be negative, got -1"),
        ("5", "duration '5' needs a unit, e.g. '5s'"),
        ("5x", "unknown duration unit 'x' in '5x' (use ms, s, m, h, d)"),
        ("5S", "unknown duration unit 'S' in '5S' (use ms, s, m, h, d)"),
        ("abc", "invalid duration 'abc' (use e.g. '250ms', '5s', '1.5m')"),
        ("", "invalid duration '' (use e.g. '250ms', '5s', '1.5m')"),
        ("1e3s", "invalid duration '1e3s' (use e.g. '250ms', '5s', '1.5m')"),
        (math.nan, "duration must be a number, got nan"),
        (math.inf, "duration is too large"),
        (10**400, "duration is too large"),
        ("9" * 400 + "d", "duration is too large"),
        (True, "expected a duration like '5s' or '250ms' (or a number of seconds), got boolean"),
    ],
)
def test_parse_duration_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_parse_duration_error_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"^server\.header_timeout: duration must not"):
        parse_duration("-1s", key="server.header_timeout")


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("1GiB", 2**30),
        ("512KiB", 512 * 1024),
        ("10MB", 10 * 10**6),
        ("1KB", 1000),
        ("100B", 100),
        ("1.5KiB", 1536),
        ("2 TiB", 2 * 2**40),
        ("3gb", 3 * 10**9),
        ("0B", 0),
        (100, 100),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "64M",
            "unknown size unit 'M' in '64M' (use B, KB, MB, GB, TB for powers of 1000 "
            "or KiB, MiB, GiB, TiB for 1024)",
        ),
        ("10", "size '10' needs a unit, e.g. '10B' or '10KiB'"),
        ("-1B", "size must not be negative, got '-1B'"),
        (-3, "size must not be negative, got -3"),
        ("0.3B", "size '0.3B' is not a whole number of bytes"),
        ("lots", "invalid size 'lots' (use e.g. '512KiB', '64MiB', '10MB')"),
        (1.5, "expected a size like '64MiB' (or a number of bytes), got float"),
        (False, "expected a size like '64MiB' (or a number of bytes), got boolean"),
    ],
)
def test_parse_size_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value) == message


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["B", "KiB", "MiB", "KB"]))
def test_parse_size_scales_integers(number: int, unit: str) -> None:
    scale = {"B": 1, "KiB": 1024, "MiB": 2**20, "KB": 1000}[unit]
    assert parse_size(f"{number}{unit}") == number * scale


# --------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:443", ("::", 443)),
        (":8080", ("0.0.0.0", 8080)),
        ("*:80", ("0.0.0.0", 80)),
        ("LocalHost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(text: str, address: tuple[str, int]) -> None:
    assert parse_listen(text) == address
    assert parse_listen(format_listen(address)) == address


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "missing port in '8080' (use e.g. '127.0.0.1:8080' or ':8080')"),
        ("127.0.0.1:", "missing port in '127.0.0.1:'"),
        ("[::1]", "missing port in '[::1]'"),
        ("::1:8080", "IPv6 addresses need brackets, e.g. '[::1]:8080', got '::1:8080'"),
        ("h:70000", "port must be between 0 and 65535, got 70000"),
        ("h:http", "invalid port 'http' in 'h:http'"),
        ("h:-1", "invalid port '-1' in 'h:-1'"),
        ("1.2.3.999:80", "invalid IPv4 address '1.2.3.999'"),
        ("a b:80", "invalid host name 'a b'"),
        ("[zz]:80", "invalid IPv6 address 'zz' in '[zz]:80'"),
        (8080, "expected an address like '127.0.0.1:8080', got integer"),
    ],
)
def test_parse_listen_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(value)
    assert str(info.value) == message


def test_parse_listen_error_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"^admin\.listen: missing port"):
        parse_listen("localhost", key="admin.listen")


# --------------------------------------------------------------------------- defaults


def test_empty_document_gives_defaults() -> None:
    config = parse_config({})
    assert config == Config()
    assert config.server == ServerConfig()
    assert config.server.listen == ("127.0.0.1", 8080)
    assert config.server.max_body_bytes == 2**30
    assert config.server.max_requests_per_connection == 1000
    assert config.admin == AdminConfig(listen=("127.0.0.1", 9901))
    assert config.upstreams == {}
    assert config.routes == ()


def test_config_is_frozen() -> None:
    config = parse_config({})
    with pytest.raises(AttributeError):
        config.server.workers = 2  # type: ignore[misc]


def test_full_server_section() -> None:
    config = parse_config(
        {
            "server": {
                "listen": "[::1]:0",
                "http": "fast",
                "workers": 4,
                "header_timeout": "2s",
                "keepalive_timeout": 0,
                "body_timeout": "1m",
                "drain_timeout": "0s",
                "max_head_size": "32KiB",
                "max_uri_size": 4096,
                "max_headers": 50,
                "max_body_size": "10MB",
                "max_connections": 5,
                "max_requests_per_connection": 0,
                "access_log": False,
                "backlog": 16,
                "proxy_name": "edge-1",
            }
        }
    )
    assert config.server == ServerConfig(
        listen=("::1", 0),
        http="fast",
        workers=4,
        header_timeout=2.0,
        keepalive_timeout=0.0,
        body_timeout=60.0,
        drain_timeout=0.0,
        max_head_bytes=32 * 1024,
        max_uri_bytes=4096,
        max_headers=50,
        max_body_bytes=10**7,
        max_connections=5,
        max_requests_per_connection=0,
        access_log=None,
        backlog=16,
        proxy_name="edge-1",
    )


@pytest.mark.parametrize("value", [0, "0B", "unlimited"])
def test_max_body_size_zero_means_unlimited(value: Any) -> None:
    assert parse_config({"server": {"max_body_size": value}}).server.max_body_bytes is None


@pytest.mark.parametrize(("value", "expected"), [("-", "-"), (True, "-"), ("off", None)])
def test_access_log_forms(value: Any, expected: str | None) -> None:
    assert parse_config({"server": {"access_log": value}}).server.access_log == expected


def test_access_log_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    source = tmp_path / "fastedge.toml"
    config = parse_config({"server": {"access_log": "logs/access.log"}}, source=str(source))
    assert config.server.access_log == str(tmp_path / "logs" / "access.log")


def test_access_log_directory_must_exist(tmp_path: Path) -> None:
    assert only_error({"server": {"access_log": str(tmp_path / "nope" / "a.log")}}) == (
        f"server.access_log: directory does not exist: {tmp_path / 'nope'}"
    )


@pytest.mark.parametrize(
    ("admin", "listen"),
    [
        ({"enabled": False}, None),
        ({"enabled": False, "listen": "127.0.0.1:9999"}, None),
        ({"listen": "off"}, None),
        ({"listen": False}, None),
        ({"enabled": True, "listen": ":9902"}, ("0.0.0.0", 9902)),
    ],
)
def test_admin_can_be_disabled(admin: dict[str, Any], listen: tuple[str, int] | None) -> None:
    assert parse_config({"admin": admin}).admin.listen == listen


def test_admin_token_env() -> None:
    assert parse_config({"admin": {"token_env": "MY_TOKEN"}}).admin.token_env == "MY_TOKEN"


# --------------------------------------------------------------------------- TLS files


def test_server_tls_files(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    source = str(tmp_path / "fastedge.toml")
    config = parse_config(
        {"server": {"tls": {"cert": "cert.pem", "key": str(tmp_path / "key.pem")}}},
        source=source,
    )
    assert config.server.tls == TLSConfig(
        cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem")
    )


def test_server_tls_files_must_exist(tmp_path: Path) -> None:
    source = str(tmp_path / "fastedge.toml")
    errors = errors_of({"server": {"tls": {"cert": "missing.pem"}}}, source=source)
    assert errors == [
        f"server.tls.cert: file not found: {tmp_path / 'missing.pem'}",
        "server.tls.key: required key is missing",
    ]


def test_upstream_tls_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("ca")
    data = {"upstreams": {"u": {"targets": ["https://u.internal"], "tls_ca": "ca.pem"}}}
    config = parse_config(data, source=str(tmp_path / "f.toml"))
    assert config.upstreams["u"].tls_ca == str(tmp_path / "ca.pem")


# --------------------------------------------------------------------------- upstreams


def test_upstream_targets_and_defaults() -> None:
    config = parse_config(
        {
            "upstreams": {
                "users": {
                    "targets": [
                        "http://127.0.0.1:9001",
                        {"url": "HTTPS://Users.Internal", "weight": 3},
                        "http://[::1]/",
                    ]
                }
            }
        }
    )
    assert config.upstreams["users"] == UpstreamConfig(
        name="users",
        targets=(
            TargetConfig("http://127.0.0.1:9001", "http", "127.0.0.1", 9001),
            TargetConfig("https://users.internal:443", "https", "users.internal", 443, 3),
            TargetConfig("http://[::1]:80", "http", "::1", 80),
        ),
    )
    upstream = config.upstreams["users"]
    assert upstream.balance == "round_robin"
    assert upstream.pool == PoolConfig()
    assert upstream.tls_verify is True
    assert upstream.host_header is None


def test_upstream_every_key() -> None:
    config = parse_config(
        {
            "upstreams": {
                "p": {
                    "targets": ["https://10.0.0.1:8443"],
                    "balance": "p2c_ewma",
                    "pool": {
                        "max_connections": 7,
                        "idle_timeout": "30s",
                        "wait_timeout": "100ms",
                        "connect_timeout": 2,
                        "response_timeout": "2m",
                    },
                    "tls_verify": False,
                    "tls_server_name": "P.internal",
                    "host_header": "p.example.com:8443",
                }
            }
        }
    )
    upstream = config.upstreams["p"]
    assert upstream.balance == "p2c_ewma"
    assert upstream.pool == PoolConfig(7, 30.0, 0.1, 2.0, 120.0)
    assert upstream.tls_verify is False
    assert upstream.tls_server_name == "p.internal"
    assert upstream.host_header == "p.example.com:8443"


@pytest.mark.parametrize("host", ["[::1]", "[::1]:8080", "api", "1.2.3.4:80"])
def test_host_header_forms(host: str) -> None:
    assert parse_config(with_upstream(host_header=host)).upstreams["users"].host_header == host


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("ftp://h", "URL scheme must be 'http' or 'https', got 'ftp' in 'ftp://h'"),
        ("127.0.0.1:9001", "missing scheme in '127.0.0.1:9001' (use e.g. 'http://127.0.0.1:9001')"),
        ("localhost:9001", "missing scheme in 'localhost:9001' (use e.g. 'http://localhost:9001')"),
        ("://h", "URL scheme must be 'http' or 'https', got '' in '://h'"),
        ("http://u:pw@h", "user info ('user:password@') is not allowed in 'http://u:pw@h'"),
        ("http://h/api", "a target is scheme://host:port, without a path, got 'http://h/api'"),
        ("http://h/?a=1", "a target has no query or fragment, got 'http://h/?a=1'"),
        ("http://h#top", "a target has no query or fragment, got 'http://h#top'"),
        ("http://h:0", "port must be between 1 and 65535, got 0"),
        ("http://h:99999", "port must be between 1 and 65535, got 99999"),
        ("http://h:", "missing port in 'http://h:'"),
        ("http://:80", "missing host in 'http://:80'"),
        ("http://[::1", "invalid URL 'http://[::1': Invalid IPv6 URL"),
        (
            "http://[zz]:80",
            "invalid URL 'http://[zz]:80': 'zz' does not appear to be an IPv4 or IPv6 address",
        ),
        ("http://a b", "invalid URL 'http://a b' (no spaces or non-ASCII characters)"),
        ("http://bad_host", "invalid host name 'bad_host'"),
        ("", "must not be empty"),
        (5, "expected a URL string or a table, got integer"),
    ],
)
def test_bad_targets(target: Any, message: str) -> None:
    assert only_error({"upstreams": {"users": {"targets": [target]}}}) == (
        f"upstreams.users.targets[0]: {message}"
    )


def test_target_table_errors_have_their_own_paths() -> None:
    errors = errors_of(
        {
            "upstreams": {
                "users": {
                    "targets": [
                        "http://a",
                        {"url": "http://b", "weight": 0},
                        {"weight": 2},
                        {"url": "http://c", "wieght": 2},
                        {"url": "http://d", "weight": "2"},
                    ]
                }
            }
        }
    )
    assert errors == [
        "upstreams.users.targets[1].weight: must be between 1 and 256, got 0",
        "upstreams.users.targets[2].url: required key is missing",
        "upstreams.users.targets[3].wieght: unknown key (did you mean 'weight'?)",
        "upstreams.users.targets[4].weight: expected an integer, got string",
    ]


def test_duplicate_targets() -> None:
    data = {"upstreams": {"users": {"targets": ["http://a", "http://A:80/"]}}}
    assert only_error(data) == (
        "upstreams.users.targets[1]: duplicate target http://a:80 "
        "(same as upstreams.users.targets[0]; raise its weight instead)"
    )


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ({"targets": []}, "upstreams.users.targets: an upstream needs at least one target"),
        ({}, "upstreams.users.targets: required key is missing"),
        (
            {"targets": "http://a"},
            "upstreams.users.targets: expected an array of targets, got string",
        ),
        (
            {"targets": ["http://a"], "balance": "roundrobin"},
            "upstreams.users.balance: must be one of 'round_robin', 'least_conn', 'p2c_ewma', "
            "'consistent_hash', got 'roundrobin' (did you mean 'round_robin'?)",
        ),
        (
            {"targets": ["http://a"], "pool": {"max_conections": 5}},
            "upstreams.users.pool.max_conections: unknown key (did you mean 'max_connections'?)",
        ),
        (
            {"targets": ["http://a"], "pool": {"connect_timeout": "0s"}},
            "upstreams.users.pool.connect_timeout: must be greater than 0s, got '0s'",
        ),
        (
            {"targets": ["http://a"], "pool": {"max_connections": 0}},
            "upstreams.users.pool.max_connections: must be between 1 and 100000, got 0",
        ),
        (
            {"targets": ["http://a"], "pool": 5},
            "upstreams.users.pool: expected a table, got integer",
        ),
        (
            {"targets": ["http://a"], "tls_verify": "yes"},
            "upstreams.users.tls_verify: expected a boolean, got string",
        ),
        (
            {"targets": ["http://a"], "tls_verify": False},
            "upstreams.users.tls_verify: set, but no target of this upstream uses https",
        ),
        (
            {"targets": ["http://a"], "host_header": "a:b"},
            "upstreams.users.host_header: invalid port 'b' in 'a:b'",
        ),
        (
            {"targets": ["http://a"], "connect_timeout": "5s"},
            "upstreams.users.connect_timeout: unknown key",
        ),
        ("http://a", "upstreams.users: expected a table, got string"),
    ],
)
def test_bad_upstreams(upstream: Any, message: str) -> None:
    assert only_error({"upstreams": {"users": upstream}}) == message


def test_bad_upstream_names() -> None:
    errors = errors_of({"upstreams": {"a b": {"targets": ["http://a"]}, "ok": []}})
    assert errors == [
        "upstreams.\"a b\": invalid upstream name (use 1-64 letters, digits, '_', '-')",
        "upstreams.ok: expected a table, got array",
    ]


# --------------------------------------------------------------------------- routes


def test_routes() -> None:
    config = parse_config(
        {
            "upstreams": UPSTREAM,
            "routes": [
                {"prefix": "/api/users", "upstream": "users", "strip_prefix": True},
                {
                    "prefix": "/api/users",
                    "host": "Admin.Example.com",
                    "upstream": "users",
                    "methods": ["get", "POST", "GET"],
                    "rewrite": "/v2/users",
                    "name": "admin-users",
                },
            ],
        }
    )
    assert config.routes == (
        RouteConfig(prefix="/api/users", upstream="users", strip_prefix=True, name="/api/users"),
        RouteConfig(
            prefix="/api/users",
            upstream="users",
            host="admin.example.com",
            methods=frozenset({"GET", "POST"}),
            rewrite="/v2/users",
            name="admin-users",
        ),
    )


def test_zero_routes_is_valid() -> None:
    assert parse_config({"upstreams": UPSTREAM, "routes": []}).routes == ()


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"prefix": "api"}, "routes[0].prefix: must start with '/', got 'api'"),
        (
            {"prefix": "/a?b"},
            "routes[0].prefix: must be a path without query or fragment, got '/a?b'",
        ),
        (
            {"prefix": "/a b"},
            "routes[0].prefix: must contain only URL path characters "
            "(percent-encode others), got '/a b'",
        ),
        (
            {"prefix": "/a\nb"},
            "routes[0].prefix: must not contain control characters, got '/a\\nb'",
        ),
        (
            {"upstream": "userz"},
            "routes[0].upstream: unknown upstream 'userz' (did you mean 'users'?)",
        ),
        ({"upstream": "billing"}, "routes[0].upstream: unknown upstream 'billing'"),
        (
            {"methods": []},
            "routes[0].methods: must not be empty (leave the key out to allow every method)",
        ),
        (
            {"methods": ["GET", "BAD METHOD"]},
            "routes[0].methods: item 1 is not an HTTP method token: 'BAD METHOD'",
        ),
        ({"methods": "GET"}, "routes[0].methods: expected an array of method names, got string"),
        ({"strip_prefix": 1}, "routes[0].strip_prefix: expected a boolean, got integer"),
        ({"rewrite": "v2"}, "routes[0].rewrite: must start with '/', got 'v2'"),
        (
            {"strip_prefix": True, "rewrite": "/v2"},
            "routes[0].rewrite: cannot be combined "
            "with strip_prefix = true (strip_prefix is rewrite = '/')",
        ),
        ({"host": "exa mple.com"}, "routes[0].host: invalid host name 'exa mple.com'"),
        ({"name": ""}, "routes[0].name: must not be empty"),
        ({"cache": "edge"}, "routes[0].cache: unknown cache 'edge'"),
        ({"upsteam": "users"}, "routes[0].upsteam: unknown key (did you mean 'upstream'?)"),
    ],
)
def test_bad_routes(route: dict[str, Any], message: str) -> None:
    errors = errors_of(with_route(**route))
    # A misspelt required key also reports the real key as missing.
    assert errors[0] == message


def test_route_required_keys() -> None:
    assert errors_of({"upstreams": UPSTREAM, "routes": [{}]}) == [
        "routes[0].prefix: required key is missing",
        "routes[0].upstream: required key is missing",
    ]


def test_routes_must_be_an_array_of_tables() -> None:
    assert only_error({"routes": {"prefix": "/"}}) == (
        "routes: expected an array of tables ([[routes]]), got table"
    )
    assert only_error({"routes": ["/"]}) == "routes[0]: expected a table, got string"


def test_duplicate_routes() -> None:
    data = {
        "upstreams": UPSTREAM,
        "routes": [
            {"prefix": "/a", "upstream": "users"},
            {"prefix": "/a", "upstream": "users", "host": "x.example"},
            {"prefix": "/a", "upstream": "users", "methods": ["GET"]},
            {"prefix": "/a", "upstream": "users", "host": "X.example"},
        ],
    }
    assert errors_of(data) == [
        "routes[2].prefix: duplicate route: prefix '/a' is already used by routes[0]",
        "routes[3].prefix: duplicate route: prefix '/a' and host 'x.example' "
        "is already used by routes[1]",
    ]


def test_route_may_name_an_upstream_defined_later_in_the_document() -> None:
    document = """
[[routes]]
prefix = "/"
upstream = "late"

[upstreams.late]
targets = ["http://127.0.0.1:9000"]
"""
    config = parse_config(tomllib.loads(document))
    assert config.routes[0].upstream == "late"


# --------------------------------------------------------------------------- server errors


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"listn": ":80"}, "server.listn: unknown key (did you mean 'listen'?)"),
        ({"workers": "4"}, "server.workers: expected an integer, got string"),
        ({"workers": 0}, "server.workers: must be between 1 and 64, got 0"),
        ({"workers": 65}, "server.workers: must be between 1 and 64, got 65"),
        ({"workers": 2.0}, "server.workers: expected an integer, got float"),
        ({"workers": True}, "server.workers: expected an integer, got boolean"),
        (
            {"http": "h2"},
            "server.http: must be one of 'auto', 'h11', 'fast', got 'h2'",
        ),
        (
            {"http": "fats"},
            "server.http: must be one of 'auto', 'h11', 'fast', got 'fats' (did you mean 'fast'?)",
        ),
        (
            {"listen": "localhost"},
            "server.listen: missing port in 'localhost' (use e.g. '127.0.0.1:8080' or ':8080')",
        ),
        ({"header_timeout": "0s"}, "server.header_timeout: must be greater than 0s, got '0s'"),
        ({"body_timeout": "5"}, "server.body_timeout: duration '5' needs a unit, e.g. '5s'"),
        (
            {"keepalive_timeout": "-1s"},
            "server.keepalive_timeout: duration must not be negative, got '-1s'",
        ),
        (
            {"drain_timeout": [1]},
            "server.drain_timeout: expected a duration like '5s' or "
            "'250ms' (or a number of seconds), got array",
        ),
        (
            {"max_head_size": "512B"},
            "server.max_head_size: must be between 1024 and 1048576 bytes, got '512B' (512 bytes)",
        ),
        (
            {"max_uri_size": "32KiB"},
            "server.max_uri_size: must not exceed max_head_size (32768 > 16384)",
        ),
        (
            {"max_body_size": "64M"},
            "server.max_body_size: unknown size unit 'M' in '64M' "
            "(use B, KB, MB, GB, TB for powers of 1000 or KiB, MiB, GiB, TiB for 1024)",
        ),
        (
            {"max_body_bytes": 5},
            "server.max_body_bytes: unknown key (did you mean 'max_body_size'?)",
        ),
        (
            {"max_requests_per_connection": -1},
            "server.max_requests_per_connection: must be between 0 and 2147483647, got -1",
        ),
        ({"backlog": 0}, "server.backlog: must be between 1 and 65535, got 0"),
        (
            {"access_log": ""},
            "server.access_log: must not be empty (use '-' for stdout, a file path, or false)",
        ),
        (
            {"proxy_name": "fast edge"},
            "server.proxy_name: must be an HTTP token (RFC 9110 §5.6.2), got 'fast edge'",
        ),
        ({"tls": "yes"}, "server.tls: expected a table, got string"),
    ],
)
def test_bad_server(server: dict[str, Any], message: str) -> None:
    assert only_error({"server": server}) == message


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        (
            {"listen": "9901"},
            "admin.listen: missing port in '9901' (use e.g. '127.0.0.1:8080' or ':8080')",
        ),
        ({"enabled": "no"}, "admin.enabled: expected a boolean, got string"),
        (
            {"token_env": "MY-TOKEN"},
            "admin.token_env: must be an environment variable name, got 'MY-TOKEN'",
        ),
        ({"token": "s3cret"}, "admin.token: unknown key (did you mean 'token_env'?)"),
        (
            {"listen": "127.0.0.1:8080"},
            "admin.listen: same address as server.listen (127.0.0.1:8080)",
        ),
    ],
)
def test_bad_admin(admin: dict[str, Any], message: str) -> None:
    assert only_error({"admin": admin}) == message


def test_ephemeral_ports_may_coincide() -> None:
    config = parse_config({"server": {"listen": "127.0.0.1:0"}, "admin": {"listen": ":0"}})
    assert config.server.listen == ("127.0.0.1", 0)


@pytest.mark.parametrize("section", ["plugins", "listeners"])
def test_unknown_sections_are_refused(section: str) -> None:
    assert only_error({section: {}}).startswith(f"{section}: unknown key")


def test_unknown_top_level_key_suggestion() -> None:
    assert only_error({"upstream": {}}) == "upstream: unknown key (did you mean 'upstreams'?)"
    assert only_error({"route": []}) == "route: unknown key (did you mean 'routes'?)"


def test_weird_keys_are_quoted_in_paths() -> None:
    assert only_error({"server": {"a.b": 1}}) == 'server."a.b": unknown key'


# --------------------------------------------------------------------------- many errors


def test_all_errors_are_reported_together_in_document_order() -> None:
    document = """
[server]
listn = "127.0.0.1:8080"
workers = "4"
header_timeout = "-1s"

[upstreams.users]
targets = []

[upstreams.products]
targets = ["http://127.0.0.1:9002", "ftp://x"]
balance = "random"

[[routes]]
prefix = "/api/users"
upstream = "users"

[[routes]]
prefix = "api/products"
upstream = "products"

[[routes]]
prefix = "/api/orders"
upstream = "userz"
strip_prefix = true
rewrite = "/v2"

[flags]
new_pricing = 10
"""
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(document), source="fastedge.toml")
    expected = [
        "server.listn: unknown key (did you mean 'listen'?)",
        "server.workers: expected an integer, got string",
        "server.header_timeout: duration must not be negative, got '-1s'",
        "upstreams.users.targets: an upstream needs at least one target",
        "upstreams.products.targets[1]: URL scheme must be 'http' or 'https', got 'ftp' "
        "in 'ftp://x'",
        "upstreams.products.balance: must be one of 'round_robin', 'least_conn', "
        "'p2c_ewma', 'consistent_hash', got 'random'",
        "routes[1].prefix: must start with '/', got 'api/products'",
        "routes[2].upstream: unknown upstream 'userz' (did you mean 'users'?)",
        "routes[2].rewrite: cannot be combined with strip_prefix = true "
        "(strip_prefix is rewrite = '/')",
        "flags.new_pricing: expected a table, got integer",
    ]
    assert info.value.errors == expected
    assert str(info.value) == "\n".join(expected)
    assert info.value.source == "fastedge.toml"


def test_document_must_be_a_table() -> None:
    assert errors_of([]) == ["(document): expected a table, got array"]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- loading


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: cannot read: No such file or directory"]


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:8080"\nworkers = = 2\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (error,) = info.value.errors
    assert error.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in error
    assert "column" in error


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nproxy_name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_load_records_source_and_resolves_paths(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("c")
    (tmp_path / "k.pem").write_text("k")
    path = tmp_path / "fastedge.toml"
    path.write_text('[server.tls]\ncert = "c.pem"\nkey = "k.pem"\n')
    config = load_config(path)
    assert config.source == str(path)
    assert config.server.tls == TLSConfig(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert set(config.upstreams) == {"users", "products", "catalog-snapshot"}
    assert config.upstreams["products"].fallback == "catalog-snapshot"
    assert [r.name for r in config.routes] == ["users", "products-v1", "users-admin", "/"]
    assert config.routes[0].strip_prefix
    assert config.routes[1].rewrite == "/v2/products"
    assert config.routes[1].methods == frozenset({"GET", "HEAD"})
    assert config.routes[2].host == "admin.example.com"
    assert config.upstreams["users"].targets[1].weight == 2
    assert config.upstreams["products"].pool.connect_timeout == 2.0


def test_example_file_uses_every_key(tmp_path: Path) -> None:
    """With its commented-out TLS files enabled, the example sets every key there is."""
    text = EXAMPLE.read_text()
    for line in ("[server.tls]", 'cert = "certs/', 'key = "certs/', 'tls_ca = "certs/'):
        assert f"# {line}" in text
        text = text.replace(f"# {line}", line)
    (tmp_path / "certs").mkdir()
    for name in ("fastedge.pem", "fastedge-key.pem", "internal-ca.pem"):
        (tmp_path / "certs" / name).write_text("pem")
    path = tmp_path / "fastedge.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.server.tls is not None
    assert config.upstreams["products"].tls_ca == str(tmp_path / "certs" / "internal-ca.pem")

    data = tomllib.loads(text)
    from fastedge import config as module

    def keys_used(table: Any, schema: Any) -> set[str]:
        return set(table) & set(schema)

    assert keys_used(data["server"], module._SERVER_SCHEMA) == set(module._SERVER_SCHEMA)
    assert set(data["admin"]) == set(module._ADMIN_SCHEMA)
    upstream_keys = set(data["upstreams"]["users"]) | set(data["upstreams"]["products"])
    assert upstream_keys == set(module._UPSTREAM_SCHEMA)
    assert set(data["upstreams"]["users"]["pool"]) == set(module._POOL_SCHEMA)
    route_keys = set().union(*(set(r) for r in data["routes"]))
    assert route_keys == set(module._ROUTE_SCHEMA)


# --------------------------------------------------------------------------- redaction


def test_redacted_is_json_and_readable() -> None:
    view = redacted(load_config(EXAMPLE))
    assert json.loads(json.dumps(view)) == view
    assert view["server"]["listen"] == "127.0.0.1:8080"
    assert view["admin"] == {"listen": "127.0.0.1:9901", "token_env": "FASTEDGE_ADMIN_TOKEN"}
    assert view["routes"][1]["methods"] == ["GET", "HEAD"]
    assert view["upstreams"]["users"]["targets"][0]["url"] == "http://127.0.0.1:9001"


def test_redacted_hides_the_admin_token_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_TOKEN", "tok-4f9c2e")
    config = parse_config(
        {
            "admin": {"token_env": "EDGE_TOKEN"},
            "upstreams": UPSTREAM,
            "routes": [{"prefix": "/tok-4f9c2e", "upstream": "users"}],
        }
    )
    view = redacted(config)
    assert "tok-4f9c2e" not in json.dumps(view)
    assert view["routes"][0]["prefix"] == "/***"
    assert view["admin"]["token_env"] == "EDGE_TOKEN"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("http://user:pw@h/x", "http://user:***@h/x"),
        ("https://tokenonly@h", "https://***@h"),
        ("http://h/a@b", "http://h/a@b"),
        ("plain text", "plain text"),
    ],
)
def test_urls_lose_their_credentials(text: str, shown: str) -> None:
    from fastedge.config import _redact_text

    assert _redact_text(text, []) == shown


@dataclass(frozen=True)
class _FutureSection:
    password: str | None
    api_token: str
    token_env: str
    listen: tuple[str, int]


def test_secret_named_fields_are_hidden() -> None:
    from fastedge.config import _jsonable

    section = _FutureSection(None, "t", "X", ("::1", 1))
    assert _jsonable(_FutureSection("pw", "t", "X", ("::1", 1)), []) == {
        "password": "***",
        "api_token": "***",
        "token_env": "X",
        "listen": "[::1]:1",
    }
    assert _jsonable(section, [])["password"] is None


def test_upstream_names_are_not_mistaken_for_secrets() -> None:
    config = parse_config({"upstreams": {"token": {"targets": ["http://a"]}}})
    assert redacted(config)["upstreams"]["token"]["name"] == "token"


# --------------------------------------------------------------------------- never crash

KNOWN_KEYS = [
    "server",
    "admin",
    "upstreams",
    "routes",
    "listen",
    "http",
    "workers",
    "tls",
    "cert",
    "key",
    "header_timeout",
    "max_head_size",
    "max_uri_size",
    "max_body_size",
    "access_log",
    "enabled",
    "token_env",
    "users",
    "targets",
    "url",
    "weight",
    "balance",
    "pool",
    "connect_timeout",
    "tls_ca",
    "tls_verify",
    "tls_server_name",
    "host_header",
    "prefix",
    "upstream",
    "host",
    "methods",
    "strip_prefix",
    "rewrite",
    "name",
    "proxy_name",
]
INTERESTING_STRINGS = [
    "5s",
    "-1s",
    "250ms",
    "64MiB",
    "0",
    "unlimited",
    "off",
    "-",
    "127.0.0.1:8080",
    ":0",
    "[::1]:80",
    "http://127.0.0.1:9001",
    "https://[::1]",
    "http://u:p@h",
    "/",
    "/api",
    "users",
    "GET",
    "auto",
    "round_robin",
    "\x00",
    "",
]

toml_scalars = (
    st.text(max_size=12)
    | st.sampled_from(INTERESTING_STRINGS)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.booleans()
    | st.floats()
)
toml_keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=8)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(toml_keys, children, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(toml_keys, toml_values, max_size=5))
def test_parse_config_never_crashes(data: dict[str, Any]) -> None:
    try:
        config = parse_config(data)
    except ConfigError as exc:
        assert exc.errors
        assert all(": " in error for error in exc.errors)
    else:
        assert isinstance(config, Config)
        json.dumps(redacted(config))


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "upstreams": st.dictionaries(st.sampled_from(["users", "a b"]), toml_values),
            "routes": st.lists(st.dictionaries(toml_keys, toml_values, max_size=4), max_size=3),
        }
    )
)
def test_parse_config_never_crashes_on_shaped_documents(data: dict[str, Any]) -> None:
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.errors


def test_cwd_independent_when_source_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "k.pem").write_text("k")
    monkeypatch.chdir(os.path.dirname(tmp_path))
    config = parse_config(
        {"server": {"tls": {"cert": "k.pem", "key": "k.pem"}}},
        source=str(tmp_path / "f.toml"),
    )
    assert config.server.tls is not None
    assert os.path.isabs(config.server.tls.cert)
