"""Metrics registry: recording, and the exposition text parsed back and checked."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import pytest

from fastedge.observe.metrics import DURATION_BUCKETS, MetricFamily, Metrics

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\\n]|\\.)*\",?)*)\})?"
    r" (?P<value>\S+)$"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse_exposition(text: str) -> dict[str, dict[str, object]]:
    """Parse Prometheus text 0.0.4 strictly enough to catch format mistakes.

    Returns ``{family: {"help": str, "type": str, "samples": [(name, labels, value)]}}``.
    Every sample must belong to the family declared by the preceding HELP/TYPE lines.
    """
    assert text.endswith("\n")
    families: dict[str, dict[str, object]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP ") :].partition(" ")
            assert name not in families, f"family {name} repeated"
            families[name] = {"help": help_text, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, mtype = line[len("# TYPE ") :].partition(" ")
            assert name == current, "TYPE must follow its HELP"
            assert mtype in {"counter", "gauge", "histogram", "summary", "untyped"}
            families[name]["type"] = mtype
        else:
            match = _SAMPLE_RE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert current is not None
            name = match["name"]
            assert name == current or name in {
                f"{current}_bucket",
                f"{current}_sum",
                f"{current}_count",
            }, f"{name} outside its family {current}"
            labels = {k: _unescape(v) for k, v in _LABEL_RE.findall(match["labels"] or "")}
            value = float(match["value"])
            samples = families[current]["samples"]
            assert isinstance(samples, list)
            samples.append((name, labels, value))
    for name, family in families.items():
        assert "type" in family, f"{name} has no TYPE"
    return families


def check_histogram(family: dict[str, object]) -> dict[str, tuple[list[float], float, float]]:
    """Assert bucket cumulativity and ``+Inf == count``; return per-route (buckets, sum, count)."""
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    samples = family["samples"]
    assert isinstance(samples, list)
    for name, labels, value in samples:
        key = labels["route"]
        if name.endswith("_bucket"):
            le = labels["le"]
            buckets[key].append((math.inf if le == "+Inf" else float(le), value))
        elif name.endswith("_sum"):
            sums[key] = value
        else:
            counts[key] = value
    out = {}
    for key, series in buckets.items():
        bounds = [b for b, _ in series]
        values = [v for _, v in series]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf
        assert values == sorted(values), "buckets must be cumulative"
        assert values[-1] == counts[key], "+Inf bucket must equal _count"
        out[key] = (values, sums[key], counts[key])
    return out


def test_observe_request_renders_counters_and_histograms() -> None:
    m = Metrics()
    m.observe_request("users", "GET", 200, 0.003, 0.002)
    m.observe_request("users", "GET", 200, 0.2, 0.19)
    m.observe_request("users", "POST", 201, 11.0, None)
    m.observe_request("products", "GET", 404, 0.0001, None)
    families = parse_exposition(m.render().decode())

    requests = families["fastedge_requests_total"]
    assert requests["type"] == "counter"
    assert requests["help"]
    got = {
        (labels["route"], labels["method"], labels["status"]): value
        for _, labels, value in requests["samples"]  # type: ignore[attr-defined]
    }
    assert got == {
        ("products", "GET", "404"): 1,
        ("users", "GET", "200"): 2,
        ("users", "POST", "201"): 1,
    }

    total = families["fastedge_request_duration_seconds"]
    assert total["type"] == "histogram"
    hist = check_histogram(total)
    values, total_sum, count = hist["users"]
    assert count == 3
    assert total_sum == pytest.approx(11.203)
    # 0.003 falls in le=0.005, 0.2 in le=0.25, 11.0 only in +Inf.
    le = dict(zip([*DURATION_BUCKETS, math.inf], values, strict=True))
    assert le[0.0025] == 0 and le[0.005] == 1 and le[0.25] == 2 and le[10.0] == 2
    assert le[math.inf] == 3
    assert hist["products"][0][0] == 1  # 0.0001 <= 0.0005

    upstream = check_histogram(families["fastedge_upstream_duration_seconds"])
    assert set(upstream) == {"users"}  # products never reached an upstream
    assert upstream["users"][2] == 2


def test_bucket_bounds_are_inclusive() -> None:
    # Prometheus buckets count observations <= le.
    m = Metrics()
    m.observe_request("r", "GET", 200, 0.005, None)
    hist = check_histogram(
        parse_exposition(m.render().decode())["fastedge_request_duration_seconds"]
    )
    values = hist["r"][0]
    assert values[DURATION_BUCKETS.index(0.005)] == 1
    assert values[DURATION_BUCKETS.index(0.0025)] == 0


def test_unknown_methods_are_bounded() -> None:
    m = Metrics()
    for method in ("BREW", "PROPFIND", "get"):
        m.observe_request("r", method, 200, 0.01, None)
    samples = parse_exposition(m.render().decode())["fastedge_requests_total"]["samples"]
    assert [(s[1]["method"], s[2]) for s in samples] == [("OTHER", 3)]  # type: ignore[attr-defined]


def test_label_values_are_escaped() -> None:
    m = Metrics()
    tricky = 'a"b\\c\nd'
    m.inc("fastedge_test_total", (("upstream", tricky),))
    text = m.render().decode()
    assert 'upstream="a\\"b\\\\c\\nd"' in text
    samples = parse_exposition(text)["fastedge_test_total"]["samples"]
    assert samples == [("fastedge_test_total", {"upstream": tricky}, 1.0)]


def test_inc_and_describe() -> None:
    m = Metrics()
    labels = (("upstream", "users"), ("kind", "connect"))
    m.inc("fastedge_upstream_errors_total", labels)
    m.inc("fastedge_upstream_errors_total", labels, 2)
    m.describe("fastedge_cache_hits_total", "counter", "Cache hits.\nBy cache.")
    m.inc("fastedge_cache_hits_total", (("cache", "edge"),))
    text = m.render().decode()
    assert "# HELP fastedge_cache_hits_total Cache hits.\\nBy cache." in text
    families = parse_exposition(text)
    assert families["fastedge_upstream_errors_total"]["samples"] == [
        ("fastedge_upstream_errors_total", {"upstream": "users", "kind": "connect"}, 3.0)
    ]
    assert families["fastedge_upstream_errors_total"]["type"] == "counter"


def test_invalid_names_are_rejected() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="invalid metric name"):
        m.inc("bad-name")
    with pytest.raises(ValueError, match="invalid metric name"):
        m.describe("1abc", "counter", "x")


def test_collectors_gauges_and_failures(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    state = {"idle": 3, "active": 1}

    def pool() -> list[MetricFamily]:
        return [
            MetricFamily(
                "fastedge_upstream_connections",
                "gauge",
                "Pooled upstream connections.",
                [
                    (
                        "fastedge_upstream_connections",
                        {"upstream": "users", "target": "127.0.0.1:9001", "state": s},
                        n,
                    )
                    for s, n in state.items()
                ],
            )
        ]

    def broken() -> list[MetricFamily]:
        raise RuntimeError("collector bug")

    def bad_label() -> list[MetricFamily]:
        return [MetricFamily("fastedge_bad", "gauge", "x", [("fastedge_bad", {"a-b": "1"}, 1)])]

    m.add_collector(pool)
    m.add_collector(broken)
    m.add_collector(bad_label)
    families = parse_exposition(m.render().decode())
    gauge = families["fastedge_upstream_connections"]
    assert gauge["type"] == "gauge"
    assert {s[1]["state"]: s[2] for s in gauge["samples"]} == {"idle": 3, "active": 1}  # type: ignore[attr-defined]
    assert "fastedge_bad" not in families
    assert "collector bug" in caplog.text

    state["idle"] = 0  # computed at scrape time
    m.remove_collector(broken)
    families = parse_exposition(m.render().decode())
    samples = families["fastedge_upstream_connections"]["samples"]
    assert {s[1]["state"]: s[2] for s in samples} == {"idle": 0, "active": 1}  # type: ignore[attr-defined]


def test_render_is_stable_and_sorted() -> None:
    m = Metrics()
    m.observe_request("b", "GET", 200, 0.01, None)
    m.observe_request("a", "GET", 500, 0.01, None)
    m.inc("fastedge_z_total")
    m.inc("fastedge_a_total")
    first = m.render()
    assert first == m.render()
    names = [line.split()[2] for line in first.decode().splitlines() if line.startswith("# TYPE")]
    assert names == sorted(names)
    routes = [
        s[1]["route"]
        for s in parse_exposition(first.decode())["fastedge_requests_total"]["samples"]  # type: ignore[attr-defined]
    ]
    assert routes == ["a", "b"]


def test_empty_registry_still_valid() -> None:
    families = parse_exposition(Metrics().render().decode())
    assert families["fastedge_requests_total"]["samples"] == []
