"""The whole ``/metrics`` scrape of a real proxy: valid Prometheus text (two independent
parsers) and names that follow the Prometheus conventions, with the families issue 7 asks
for present and plausible (requests, latency, rate limits, auth, tracing, process)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import call, running_demo
from tests.test_metrics import parse_exposition

TOKEN = "metrics-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_ENV = "FASTEDGE_TEST_METRICS_JWT_SECRET"

# Prometheus naming (https://prometheus.io/docs/practices/naming/): one application
# prefix, snake_case, base units, `_total` only on counters, a unit suffix on histograms.
_NAME_RE = re.compile(r"(fastedge|process)_[a-z][a-z0-9_]*[a-z0-9]")
_LABEL_RE = re.compile(r"[a-z][a-z0-9_]*")
_NON_BASE_UNITS = ("_ms", "_milliseconds", "_microseconds", "_us", "_kb", "_kib", "_mb", "_mib")
_TIME_WORDS = ("duration", "latency", "_time", "_seconds", "elapsed", "_age")


class OtlpReceiver:
    """A minimal OTLP/HTTP endpoint: answers 200 to every POST and counts them."""

    def __init__(self) -> None:
        self.posts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.posts += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
                writer.write(b"content-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def stack(
    origin_port: int, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[ProxyServer, OtlpReceiver]]:
    monkeypatch.setenv(SECRET_ENV, "x" * 32)
    receiver = OtlpReceiver()
    otlp_port = await receiver.start()
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "access_log": False},
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "auth": {
                "jwt": {
                    "algorithms": ["HS256"],
                    "keys": [{"algorithm": "HS256", "secret_env": SECRET_ENV}],
                }
            },
            "rate_limits": {
                "per_ip": {"algorithm": "sliding_window", "limit": 3, "window": "1m", "key": "ip"}
            },
            "tracing": {
                "sample_ratio": 1.0,
                "memory_spans": 50,
                "otlp_endpoint": f"http://127.0.0.1:{otlp_port}/v1/traces",
            },
            "routes": [
                {"prefix": "/limited", "upstream": "origin", "rate_limit": "per_ip"},
                {"prefix": "/private", "upstream": "origin", "auth": "jwt"},
                {"prefix": "/", "upstream": "origin"},
            ],
        }
    )
    server = ProxyServer(config, admin_token=TOKEN)
    await server.start()
    try:
        yield server, receiver
    finally:
        await server.shutdown(drain_timeout=1)
        await receiver.close()


def _samples(
    families: dict[str, dict[str, Any]], name: str
) -> list[tuple[str, dict[str, str], float]]:
    family = families[name]
    samples = family["samples"]
    assert isinstance(samples, list)
    return samples


def check_conventions(families: dict[str, dict[str, Any]]) -> None:
    """Prometheus naming rules, for every family of a scrape."""
    for name, family in families.items():
        mtype = family["type"]
        assert _NAME_RE.fullmatch(name), f"{name}: not snake_case with the fastedge_ prefix"
        assert not any(unit in name for unit in _NON_BASE_UNITS), f"{name}: use base units"
        if mtype == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
        else:
            assert not name.endswith("_total"), f"{mtype} {name} must not end in _total"
        # A time is in seconds and a size in bytes, said by the last word of the name.
        if any(word in name for word in _TIME_WORDS) and mtype != "counter":
            assert name.endswith("_seconds"), f"{name} measures time: end it in _seconds"
        if "bytes" in name:
            assert name.endswith(("_bytes", "_bytes_total")), f"{name}: bytes go last"
        help_text = family["help"]
        assert isinstance(help_text, str)
        assert help_text and help_text != name.replace("_", " "), f"{name}: no HELP text"
        for sample_name, labels, value in _samples(families, name):
            assert value >= 0 or mtype == "gauge", (sample_name, value)
            for label in labels:
                assert _LABEL_RE.fullmatch(label), f"{sample_name}: label {label}"
                assert label != "le" or sample_name.endswith("_bucket")
        samples = _samples(families, name)
        if mtype == "histogram" and samples:  # a family may have no series yet
            buckets = [s for s in samples if s[0].endswith("_bucket")]
            assert buckets and all("le" in s[1] for s in buckets), f"{name}: no buckets"


async def test_the_scrape_is_valid_and_follows_the_conventions(
    stack: tuple[ProxyServer, OtlpReceiver],
) -> None:
    server, receiver = stack
    port = server.port
    for _ in range(5):  # 3 allowed, 2 limited
        await call(port, "GET", "/limited/x")
    assert (await call(port, "GET", "/private/x"))[0] == 401  # auth: missing token
    for _ in range(3):
        assert (await call(port, "GET", "/ok"))[0] == 200
    assert (await call(port, "GET", "/status/503"))[0] == 503
    # Let the exporter ship a batch so its counters exist (bounded wait, not a timing test).
    for _ in range(100):
        if receiver.posts:
            break
        await asyncio.sleep(0.05)
    assert receiver.posts > 0

    status, headers, body = await call(server.admin_port or 0, "GET", "/metrics", AUTH)
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()

    # 1. Two independent parsers accept it: prometheus_client's and our strict one.
    reference = {f.name: f for f in text_string_to_metric_families(text)}
    families = parse_exposition(text)
    assert len(reference) == len(families) >= 15

    # 2. Conventions, for every family whoever registered it.
    check_conventions(families)

    # 3. The families issue 7 asks for, with the values this traffic must produce.
    requests = {
        (s[1]["route"], s[1]["method"], s[1]["status"]): s[2]
        for s in _samples(families, "fastedge_requests_total")
    }
    assert requests[("/", "GET", "200")] == 3
    assert requests[("/", "GET", "503")] == 1
    assert requests[("/limited", "GET", "429")] == 2
    for histogram in ("fastedge_request_duration_seconds", "fastedge_upstream_duration_seconds"):
        assert families[histogram]["type"] == "histogram"
        counts = {
            s[1]["route"]: s[2] for s in _samples(families, histogram) if s[0].endswith("_count")
        }
        assert counts["/"] == 4
    limits = {s[1]["result"]: s[2] for s in _samples(families, "fastedge_ratelimit_total")}
    assert limits == {"allowed": 3, "limited": 2}
    keys = _samples(families, "fastedge_ratelimit_keys")
    assert keys == [("fastedge_ratelimit_keys", {"policy": "per_ip", "backend": "local"}, 1)]
    auth = {s[1]["result"]: s[2] for s in _samples(families, "fastedge_auth_total")}
    assert auth["missing"] == 1

    status, _, traces = await call(server.admin_port or 0, "GET", "/traces?limit=1000", AUTH)
    held = len(orjson.loads(traces)["spans"])
    memory = _samples(families, "fastedge_trace_memory_spans")[0][2]
    # Requests may finish spans between the two reads; never more than the bound.
    assert 0 < memory <= 50 and held <= 50
    assert _samples(families, "fastedge_trace_spans_exported_total")[0][2] > 0
    assert families["fastedge_trace_export_queue_spans"]["type"] == "gauge"

    process = {
        name: _samples(families, name)[0][2] for name in families if name.startswith("process_")
    }
    assert process["process_resident_memory_bytes"] > 1 << 20
    assert process["process_open_fds"] > 0
    assert process["process_cpu_seconds_total"] > 0
    assert process["process_max_fds"] >= process["process_open_fds"]


async def test_reference_parser_reads_the_same_values(
    stack: tuple[ProxyServer, OtlpReceiver],
) -> None:
    """prometheus_client and our parser agree sample by sample."""
    server, _ = stack
    for path in ("/a", "/b", "/limited/c"):
        await call(server.port, "GET", path)
    _, _, body = await call(server.admin_port or 0, "GET", "/metrics", AUTH)
    text = body.decode()
    parsed = parse_exposition(text)
    ours = {
        (name, tuple(sorted(labels.items()))): value
        for family_name in parsed
        for name, labels, value in _samples(parsed, family_name)
    }
    theirs = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert theirs[key] == pytest.approx(value), key
    assert ours[("fastedge_requests_total", (("method", "GET"), ("route", "/"), ("status", "200")))]


async def test_every_family_of_the_demo_follows_the_conventions() -> None:
    """The demo enables every feature (auth, limits, splits, flags, cache, batching,
    tracing), so its scrape holds the families of all of them, whoever added them."""
    async with running_demo(TOKEN) as server:
        for path in ("/api/products", "/api/prices/1", "/api/users", "/nowhere"):
            await call(server.port, "GET", path)
        status, _, body = await call(server.admin_port or 0, "GET", "/metrics", AUTH)
        assert status == 200
        text = body.decode()
        reference = {f.name for f in text_string_to_metric_families(text)}
        families = parse_exposition(text)
        assert len(reference) == len(families)
        check_conventions(families)
        for name in (
            "fastedge_requests_total",
            "fastedge_request_duration_seconds",
            "fastedge_upstream_duration_seconds",
            "fastedge_auth_total",
            "fastedge_trace_memory_spans",
            "process_cpu_seconds_total",
        ):
            assert name in families, name


async def test_redis_rate_limit_leases_are_counted(origin_port: int, redis_url: str) -> None:
    """``fastedge_ratelimit_keys`` for a Redis policy counts the keys holding leases."""
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "access_log": False},
            "admin": {"listen": "127.0.0.1:0"},
            "redis": {"url": redis_url, "key_prefix": "metrics-families:"},
            "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin_port}"]}},
            "rate_limits": {
                "leased": {
                    "algorithm": "sliding_window",
                    "limit": 100,
                    "window": "1m",
                    "key": "header:X-Client",
                    "backend": "redis",
                    "lease": 10,
                },
                "plain": {
                    "algorithm": "token_bucket",
                    "rate": 100,
                    "burst": 100,
                    "key": "header:X-Client",
                    "backend": "redis",
                },
            },
            "routes": [{"prefix": "/", "upstream": "origin", "rate_limit": ["leased", "plain"]}],
        }
    )
    server = ProxyServer(config, admin_token=TOKEN)
    await server.start()
    try:
        for client in ("a", "b", "b"):
            status, _, _ = await call(server.port, "GET", "/x", {"X-Client": client})
            assert status == 200
        _, _, body = await call(server.admin_port or 0, "GET", "/metrics", AUTH)
        families = parse_exposition(body.decode())
        check_conventions(families)
        keys = {
            s[1]["policy"]: (s[1]["backend"], s[2])
            for s in _samples(families, "fastedge_ratelimit_keys")
        }
        assert keys == {"leased": ("redis", 2), "plain": ("redis", 0)}
    finally:
        await server.shutdown(drain_timeout=1)
