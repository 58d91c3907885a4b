"""The resilience keys of ``[upstreams.NAME]``: defaults, parsing and errors with key paths."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fastedge.config import (
    BreakerConfig,
    ConfigError,
    FallbackResponseConfig,
    HealthCheckConfig,
    OutlierConfig,
    RetryConfig,
    TargetConfig,
    parse_config,
    parse_targets,
    redacted,
)


def upstreams(**main: Any) -> dict[str, Any]:
    return {
        "upstreams": {
            "main": {"targets": ["http://127.0.0.1:9001"], **main},
            "backup": {"targets": ["http://127.0.0.1:9002"]},
        }
    }


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return info.value.errors


def test_empty_tables_turn_features_on_with_their_defaults() -> None:
    config = parse_config(
        upstreams(health_check={}, outlier={}, breaker={}, retry={}, fallback="backup")
    )
    main = config.upstreams["main"]
    assert main.health_check == HealthCheckConfig()
    assert main.outlier == OutlierConfig()
    assert main.breaker == BreakerConfig()
    assert main.retry == RetryConfig()
    assert main.fallback == "backup"
    assert main.resilient
    assert not config.upstreams["backup"].resilient
    # The sources' numbers (HAProxy, Envoy, Hystrix, Finagle; see the dataclasses).
    assert (main.health_check.interval, main.health_check.rise, main.health_check.fall) == (
        2.0,
        2,
        3,
    )
    assert main.health_check.statuses() == frozenset(range(200, 400))
    assert (main.outlier.consecutive_failures, main.outlier.base_ejection) == (5, 30.0)
    assert (main.breaker.failure_ratio, main.breaker.min_requests) == (0.5, 20)
    assert main.breaker.open_for == 5.0
    assert main.retry.statuses == (502, 503, 504)
    assert (main.retry.budget_ratio, main.retry.budget_min_per_second) == (0.2, 10.0)


def test_every_key() -> None:
    config = parse_config(
        upstreams(
            targets=[
                {"url": "http://a:1", "weight": 2, "priority": 0},
                {"url": "http://b:2", "priority": 3},
            ],
            health_check={
                "path": "/ready?deep=1",
                "interval": "50ms",
                "timeout": "20ms",
                "expected_statuses": [200, "3xx", 404],
                "rise": 1,
                "fall": 4,
                "host": "users.internal",
            },
            outlier={"consecutive_failures": 2, "base_ejection": "1s", "max_ejection": "5s"},
            breaker={
                "failure_ratio": 0.25,
                "min_requests": 4,
                "window": "2s",
                "open_for": "300ms",
                "open_for_max": "3s",
                "half_open_probes": 2,
            },
            retry={
                "attempts": 4,
                "backoff_base": "10ms",
                "backoff_max": "40ms",
                "jitter": "equal",
                "statuses": [503, 500],
                "on_timeout": False,
                "non_idempotent": True,
                "budget_ratio": 0.5,
                "budget_min_per_second": 0,
            },
            fallback_response={"status": 200, "body": "", "content_type": "application/json"},
        )
    )
    main = config.upstreams["main"]
    assert main.targets[0] == TargetConfig("http://a:1", "http", "a", 1, weight=2, priority=0)
    assert main.targets[1].priority == 3
    assert main.health_check == HealthCheckConfig(
        "/ready?deep=1", 0.05, 0.02, ("200", "3xx", "404"), 1, 4, "users.internal"
    )
    assert main.health_check.statuses() == frozenset({200, 404, *range(300, 400)})
    assert main.outlier == OutlierConfig(2, 1.0, 5.0)
    assert main.breaker == BreakerConfig(0.25, 4, 2.0, 0.3, 3.0, 2)
    assert main.retry == RetryConfig(4, 0.01, 0.04, "equal", (500, 503), False, True, 0.5, 0.0)
    assert main.fallback_response == FallbackResponseConfig(200, "", "application/json")


def test_priorities_alone_make_an_upstream_resilient() -> None:
    config = parse_config(
        upstreams(targets=[{"url": "http://a:1"}, {"url": "http://b:1", "priority": 1}])
    )
    assert config.upstreams["main"].resilient
    same = parse_config(upstreams(targets=[{"url": "http://a:1", "priority": 2}, "http://b"]))
    assert same.upstreams["main"].resilient  # 2 and the default 0: two groups
    flat = parse_config(upstreams(targets=[{"url": "http://a:1", "priority": 1}]))
    assert not flat.upstreams["main"].resilient


@pytest.mark.parametrize(
    ("main", "message"),
    [
        (
            {"targets": [{"url": "http://a", "priority": 128}]},
            "upstreams.main.targets[0].priority: must be between 0 and 127, got 128",
        ),
        (
            {"health_check": {"intervall": "1s"}},
            "upstreams.main.health_check.intervall: unknown key (did you mean 'interval'?)",
        ),
        (
            {"health_check": {"interval": "0s"}},
            "upstreams.main.health_check.interval: must be greater than 0s, got '0s'",
        ),
        (
            {"health_check": {"path": "healthz"}},
            "upstreams.main.health_check.path: must be a path starting with '/'",
        ),
        (
            {"health_check": {"expected_statuses": ["2xx", 700]}},
            "upstreams.main.health_check.expected_statuses: item 1 is not a status",
        ),
        (
            {"health_check": {"expected_statuses": []}},
            "upstreams.main.health_check.expected_statuses: must not be empty",
        ),
        (
            {"health_check": {"fall": 0}},
            "upstreams.main.health_check.fall: must be between 1 and 100, got 0",
        ),
        (
            {"outlier": {"base_ejection": "10s", "max_ejection": "5s"}},
            "upstreams.main.outlier.max_ejection: must be at least base_ejection",
        ),
        (
            {"outlier": {"consecutive_failures": 0}},
            "upstreams.main.outlier.consecutive_failures: must be between 1 and 1000",
        ),
        (
            {"breaker": {"failure_ratio": 0}},
            "upstreams.main.breaker.failure_ratio: must be greater than 0 and at most 1",
        ),
        (
            {"breaker": {"failure_ratio": 1.5}},
            "upstreams.main.breaker.failure_ratio: must be greater than 0 and at most 1",
        ),
        (
            {"breaker": {"failure_ratio": True}},
            "upstreams.main.breaker.failure_ratio: expected a number, got boolean",
        ),
        (
            {"breaker": {"open_for": "90s"}},
            "upstreams.main.breaker.open_for_max: must be at least open_for (60s < 90s)",
        ),
        (
            {"retry": {"attempts": 0}},
            "upstreams.main.retry.attempts: must be between 1 and 10, got 0",
        ),
        (
            {"retry": {"backoff_base": "1s"}},
            "upstreams.main.retry.backoff_max: must be at least backoff_base",
        ),
        (
            {"retry": {"statuses": [503, "504"]}},
            "upstreams.main.retry.statuses: item 1 is not a status code 100-599: '504'",
        ),
        (
            {"retry": {"jitter": "fuLL"}},
            "upstreams.main.retry.jitter: must be one of 'full', 'equal', 'none'",
        ),
        (
            {"retry": {"budget_ratio": -0.1}},
            "upstreams.main.retry.budget_ratio: must be a finite number >= 0, got -0.1",
        ),
        (
            {"fallback": "bakup", "breaker": {}},
            "upstreams.main.fallback: unknown upstream 'bakup' (did you mean 'backup'?)",
        ),
        (
            {"fallback": "main", "breaker": {}},
            "upstreams.main.fallback: an upstream cannot be its own fallback",
        ),
        (
            {"fallback": "backup"},
            "upstreams.main.fallback: needs health_check or breaker (else never used)",
        ),
        (
            {"fallback_response": {"status": 200}, "outlier": {}},
            "upstreams.main.fallback_response: needs health_check or breaker",
        ),
        (
            {"fallback": "backup", "fallback_response": {}, "breaker": {}},
            "upstreams.main.fallback_response: set both fallback and fallback_response",
        ),
        (
            {"fallback_response": {"status": 104}, "breaker": {}},
            "upstreams.main.fallback_response.status: must be between 200 and 599, got 104",
        ),
        (
            {"fallback_response": {"body": 3}, "breaker": {}},
            "upstreams.main.fallback_response.body: expected a string, got integer",
        ),
    ],
)
def test_errors_name_the_key_path(main: dict[str, Any], message: str) -> None:
    found = errors(upstreams(**main))
    assert any(e.startswith(message) for e in found), found


def test_a_fallback_cycle_is_refused() -> None:
    doc = {
        "upstreams": {
            "a": {"targets": ["http://a"], "breaker": {}, "fallback": "b"},
            "b": {"targets": ["http://b"], "breaker": {}, "fallback": "c"},
            "c": {"targets": ["http://c"], "breaker": {}, "fallback": "a"},
            "d": {"targets": ["http://d"], "breaker": {}, "fallback": "a"},  # leads in only
        }
    }
    assert errors(doc) == [
        "upstreams.a.fallback: fallback cycle: a -> b -> c -> a",
        "upstreams.b.fallback: fallback cycle: b -> c -> a -> b",
        "upstreams.c.fallback: fallback cycle: c -> a -> b -> c",
    ]


def test_parse_targets_uses_the_file_rules() -> None:
    assert parse_targets(["http://a", {"url": "https://b", "weight": 2, "priority": 1}]) == (
        TargetConfig("http://a:80", "http", "a", 80),
        TargetConfig("https://b:443", "https", "b", 443, 2, 1),
    )
    with pytest.raises(ConfigError) as info:
        parse_targets([{"url": "http://a", "wieght": 2}, "http://a:80", 5])
    assert info.value.errors == [
        "targets[0].wieght: unknown key (did you mean 'weight'?)",
        "targets[1]: duplicate target http://a:80 (same as targets[0]; raise its weight instead)",
        "targets[2]: expected a URL string or a table, got integer",
    ]
    with pytest.raises(ConfigError):
        parse_targets("http://a")


def test_the_admin_config_view_stays_readable() -> None:
    config = parse_config(upstreams(health_check={}, retry={}))
    view = orjson.loads(orjson.dumps(redacted(config)))
    assert view["upstreams"]["main"]["health_check"]["expected_statuses"] == ["2xx", "3xx"]
    assert view["upstreams"]["main"]["retry"]["statuses"] == [502, 503, 504]
    assert view["upstreams"]["main"]["targets"][0]["priority"] == 0
