"""Traffic splits and feature flags without a proxy: validation, atomic swaps, cohorts,
split distribution, config errors, the filters on a bare context, the state file."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastedge.config import Config, ConfigError, parse_config
from fastedge.filters import FilterContext, Runtime
from fastedge.filters.traffic import FlagsFilter, TrafficFilter
from fastedge.observe.metrics import Metrics
from fastedge.traffic import (
    BUCKETS,
    Rollout,
    TrafficStore,
    check_percent,
    check_weights,
    cohort_bucket,
    in_cohort,
    make_split,
    store_for,
)
from fastedge.traffic_sync import WRITE_ERRORS, FileBackend, write_atomic

UPSTREAMS = {
    name: {"targets": [f"http://127.0.0.1:{port}"]}
    for name, port in (("blue", 1), ("green", 2), ("canary", 3))
}


def make_config(
    *,
    weights: dict[str, int] | None = None,
    percent: float = 10,
    state: dict[str, Any] | None = None,
    source: str | None = None,
    **extra: Any,
) -> Config:
    doc: dict[str, Any] = {
        "upstreams": UPSTREAMS,
        "traffic": {
            "products": {
                "versions": {"blue": "blue", "green": "green"},
                "weights": weights or {"blue": 100, "green": 0},
            }
        },
        "flags": {
            "new-pricing": {
                "percent": percent,
                "user": ["claim:sub", "header:X-User-Id", "cookie:uid"],
                "upstream": "canary",
                "header": "X-Feature-Flags",
            },
            "dark-mode": {"percent": 100, "user": "header:x-user-id", "header": "X-Feature-Flags"},
        },
        "routes": [
            {
                "prefix": "/",
                "upstream": "blue",
                "traffic": "products",
                "flags": ["new-pricing", "dark-mode"],
            }
        ],
        **extra,
    }
    if state is not None:
        doc["traffic_state"] = state
    return parse_config(doc, source=source)


def metric(metrics: Metrics, name: str) -> float:
    for family in metrics.families():
        if family.name == name:
            return sum(value for _, _, value in family.samples)
    return 0.0


# --------------------------------------------------------------------------- validation


def test_weights_fill_missing_versions_with_zero_in_version_order() -> None:
    assert check_weights(("blue", "green"), {"green": 10}) == {"blue": 0, "green": 10}
    assert list(check_weights(("blue", "green"), {"green": 1, "blue": 3})) == ["blue", "green"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"blue": -1, "green": 5}, "must not be negative"),
        ({"blue": 0, "green": 0}, "at least one weight must be positive"),
        ({}, "at least one weight must be positive"),
        ({"purple": 5}, "unknown version 'purple'"),
        ({"blue": 1.5}, "must be an integer, got number 1.5"),
        ({"blue": 10.0}, "must be an integer"),
        ({"blue": "50"}, "must be an integer, got string"),
        ({"blue": True}, "must be an integer, got boolean"),
        ({"blue": None}, "must be an integer, got null"),
        ({"blue": 10**9}, "must be at most"),
        ([90, 10], "expected an object"),
        ("blue", "expected an object"),
    ],
)
def test_invalid_weights_are_refused(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_weights(("blue", "green"), raw)


@pytest.mark.parametrize("raw", [0, 100, 12.5, 0.01, 99.99, 50.0])
def test_valid_percents(raw: float) -> None:
    value = check_percent(raw)
    assert value == raw
    assert isinstance(value, int) == float(raw).is_integer()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (-1, "between 0 and 100"),
        (100.5, "between 0 and 100"),
        (math.nan, "between 0 and 100"),
        (math.inf, "between 0 and 100"),
        (1.234, "resolution of 0.01"),
        ("10", "a number from 0 to 100, got string"),
        (True, "got boolean"),
        (None, "got null"),
    ],
)
def test_invalid_percents_are_refused(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_percent(raw)


def test_config_errors_name_their_key_paths() -> None:
    bad: dict[str, Any] = {
        "upstreams": UPSTREAMS,
        "traffic": {
            "products": {
                "versions": {"blue": "bleu", "green": 3},
                "weights": {"blue": -1, "green": 1.5},
            },
            "other": {"versions": {"a": "blue"}, "weights": {"a": 0}},
            "typo": {"versions": {"a": "blue"}, "weights": {"b": 1}},
            "bare": {"versions": {"a": "blue"}},
        },
        "flags": {
            "f": {"percent": 101, "user": "ip"},
            "h": {"user": ["cookie:a", "cookie:a"], "header": "Host", "percent": 1.234},
            "u": {"user": "header:x", "upstream": "canry"},
        },
        "traffic_state": {"file": "/nonexistent/dir/state.json", "resync_interval": "0s"},
        "routes": [
            {"prefix": "/", "upstream": "blue", "traffic": "prodcts", "flags": ["f", "f", "zz"]},
            {"prefix": "/b", "upstream": "blue", "traffic": 3, "flags": []},
        ],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    errors = info.value.errors
    expected = [
        "traffic.products.versions.blue: unknown upstream 'bleu' (did you mean 'blue'?)",
        "traffic.products.versions.green: expected an upstream name, got integer",
        "traffic.products.weights.blue: must be between 0 and 1000000, got -1",
        "traffic.products.weights.green: expected an integer weight, got float",
        "traffic.other.weights: at least one weight must be positive (all are 0)",
        "traffic.typo.weights.b: unknown version 'b' (versions: 'a')",
        "traffic.bare.weights: required key is missing",
        "flags.f.percent: percent must be between 0 and 100, got 101",
        "flags.f.user: must be 'header:<name>', 'cookie:<name>' or 'claim:<name>', got 'ip'",
        "flags.f: a flag needs 'upstream' and/or 'header' (what being in the cohort changes)",
        "flags.h.user[1]: 'cookie:a' is listed twice",
        "flags.h.header: 'Host' is a framing or routing field, not a flag header",
        "flags.h.percent: percent has a resolution of 0.01, got 1.234",
        "flags.u.upstream: unknown upstream 'canry' (did you mean 'canary'?)",
        "traffic_state.file: directory does not exist: /nonexistent/dir",
        "traffic_state.resync_interval: must be at least 0.01s, got '0s'",
        "routes[0].traffic: unknown traffic split 'prodcts' (did you mean 'products'?)",
        "routes[0].flags[1]: flag 'f' is listed twice",
        "routes[0].flags[2]: unknown flag 'zz'",
        "routes[1].traffic: expected a string, got integer (the name of a [traffic.NAME] split)",
        "routes[1].flags: must name at least one flag",
    ]
    assert errors == expected


def test_state_file_with_redis_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"traffic_state\.file: not used with \[redis\]"):
        make_config(state={"file": "state.json"}, redis={"url": "redis://127.0.0.1:6379/0"})
    config = make_config(state={"file": False}, redis={"url": "redis://127.0.0.1:6379/0"})
    assert config.sections["traffic_state"].file is False


def test_converted_config() -> None:
    config = make_config(weights={"green": 3})
    split = config.sections["traffic"]["products"]
    assert dict(split.weights) == {"blue": 0, "green": 3}
    flag = config.sections["flags"]["new-pricing"]
    assert flag.user == ("claim:sub", "header:x-user-id", "cookie:uid")
    assert (flag.percent, flag.upstream, flag.header) == (10, "canary", "X-Feature-Flags")
    assert config.routes[0].policies == {
        "traffic": "products",
        "flags": ("new-pricing", "dark-mode"),
    }


# --------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    "weights",
    [
        {"blue": 90, "green": 10},
        {"a": 1, "b": 2, "c": 7},
        {"blue": 0, "green": 100},
        {"a": 50, "b": 0, "c": 50},
        {"a": 0, "b": 0, "c": 1, "d": 0},
    ],
)
def test_split_distribution_follows_weights(weights: dict[str, int]) -> None:
    split = make_split("s", weights, rng=random.Random(42).random)
    n = 100_000
    counts = dict.fromkeys(weights, 0)
    for _ in range(n):
        counts[split.versions[split.pick()]] += 1
    total = sum(weights.values())
    for version, weight in weights.items():
        if weight == 0:
            assert counts[version] == 0, version  # never, not "rarely"
        else:
            assert abs(counts[version] / n - weight / total) < 0.01, (version, counts)


def test_split_with_one_positive_weight_never_draws() -> None:
    def no_draw() -> float:
        raise AssertionError("a single positive weight needs no random number")

    split = make_split("s", {"blue": 0, "green": 7, "canary": 0}, rng=no_draw)
    assert {split.pick() for _ in range(10)} == {1}


async def test_a_change_swaps_a_whole_new_split_and_a_refused_one_changes_nothing() -> None:
    store = TrafficStore(Metrics())
    store.configure(make_config())
    before = store.splits["products"]
    assert before.weights_dict() == {"blue": 100, "green": 0}
    bad: object
    for bad in ({"blue": -5}, {"blue": 0, "green": 0}, {"purple": 1}, {"blue": 0.5}, []):
        with pytest.raises(ValueError):
            await store.set_weights("products", bad)
        assert store.splits["products"] is before  # the very same object: nothing moved
    split, persisted = await store.set_weights("products", {"blue": 90, "green": 10})
    assert persisted is False  # in memory only
    assert store.splits["products"] is split is not before
    assert split.weights_dict() == {"blue": 90, "green": 10}
    # A request that picked up the old split keeps a consistent, unchanged value.
    assert before.weights_dict() == {"blue": 100, "green": 0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.weights = (1, 1)  # type: ignore[misc]
    # The dict of splits is replaced whole too: a reader holding the old one is unaffected.
    old_dict = store.splits
    await store.set_weights("products", {"green": 1})
    assert old_dict["products"] is split and store.splits is not old_dict


async def test_unknown_split_and_flag() -> None:
    from fastedge.traffic import UnknownName

    store = TrafficStore(Metrics())
    store.configure(make_config())
    with pytest.raises(UnknownName):
        await store.set_weights("nope", {"blue": 1})
    with pytest.raises(UnknownName):
        await store.set_percent("nope", 5)


# --------------------------------------------------------------------------- cohorts

_FLAG_NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
_PERCENTS = st.integers(0, BUCKETS).map(lambda b: b / 100)


@settings(max_examples=300, deadline=None)
@given(flag=_FLAG_NAMES, user=st.binary(max_size=80), p1=_PERCENTS, p2=_PERCENTS)
def test_cohorts_are_monotonic(flag: str, user: bytes, p1: float, p2: float) -> None:
    low, high = min(p1, p2), max(p1, p2)
    if in_cohort(flag, user, low):
        assert in_cohort(flag, user, high)
    # The filter's fast path (a copied keyed hasher) agrees with the reference function.
    assert Rollout.of(flag, low).includes(user) == in_cohort(flag, user, low)
    assert Rollout.of(flag, high).includes(user) == in_cohort(flag, user, high)


_USERS = [f"user-{i}".encode() for i in range(20_000)]


@settings(max_examples=40, deadline=None)
@given(percent=_PERCENTS, flag=st.sampled_from(["new-pricing", "dark-mode", "x"]))
def test_the_share_of_users_in_is_the_percentage(percent: float, flag: str) -> None:
    rollout = Rollout.of(flag, percent)
    share = sum(rollout.includes(u) for u in _USERS) / len(_USERS)
    # 20,000 users: the binomial standard deviation is at most 0.35 points.
    assert abs(share - percent / 100) < 0.015, (percent, share)


def test_cohort_edges_and_stability() -> None:
    assert not any(Rollout.of("f", 0).includes(u) for u in _USERS[:1000])
    assert all(Rollout.of("f", 100).includes(u) for u in _USERS[:1000])
    # Stable across processes and releases: the documented formula, and a golden value
    # (changing the hash would silently reshuffle every cohort of every deployment).
    digest = hashlib.blake2b(b"alice", digest_size=8, key=b"new-pricing").digest()
    assert cohort_bucket("new-pricing", b"alice") == int.from_bytes(digest, "big") % 10_000
    assert cohort_bucket("new-pricing", b"alice") == 9826, "the cohort hash changed"


def test_each_flag_has_its_own_cohort() -> None:
    a, b = Rollout.of("new-pricing", 50), Rollout.of("dark-mode", 50)
    both = sum(a.includes(u) and b.includes(u) for u in _USERS) / len(_USERS)
    assert abs(both - 0.25) < 0.015  # independent, not the same half of the users


# --------------------------------------------------------------------------- filters


def context(
    headers: list[tuple[bytes, bytes]],
    *,
    claims: dict[str, Any] | None = None,
    upstreams: dict[str, object] | None = None,
) -> FilterContext:
    ups: dict[str, object] = upstreams or {n: f"<{n}>" for n in ("blue", "green", "canary")}
    ctx = FilterContext(
        method=b"GET",
        path=b"/",
        query=b"",
        host=b"example.test",
        client_ip=b"127.0.0.1",
        headers=headers,
        upstream_headers=list(headers),
        route="/",
        request_id=b"r",
        upstream=ups["blue"],
        upstreams=ups,
    )
    ctx.claims = claims
    return ctx


def flags_filter(percent: float = 10) -> tuple[FlagsFilter, TrafficStore]:
    config = make_config(percent=percent)
    store = TrafficStore(Metrics())
    store.configure(config)
    section = config.sections["flags"]
    return FlagsFilter([section["new-pricing"], section["dark-mode"]], store), store


def user_in(percent: float, inside: bool, flag: str = "new-pricing") -> str:
    return next(
        f"u{i}" for i in range(10_000) if in_cohort(flag, f"u{i}".encode(), percent) == inside
    )


def test_flag_routes_the_cohort_and_tells_the_upstream() -> None:
    flt, store = flags_filter()
    inside, outside = user_in(10, True), user_in(10, False)
    ctx = context([(b"x-user-id", inside.encode())])
    flt.on_request(ctx)
    assert ctx.upstream == "<canary>"
    assert [v for n, v in ctx.upstream_headers if n == b"x-feature-flags"] == [
        b"new-pricing,dark-mode"  # both flags on, comma-joined in the route's order
    ]
    assert ctx.state["flags"] == ("new-pricing", "dark-mode")
    # Out of new-pricing, still in dark-mode (100%): header only, no canary.
    ctx = context([(b"x-user-id", outside.encode()), (b"x-feature-flags", b"new-pricing")])
    flt.on_request(ctx)
    assert ctx.upstream == "<blue>"
    # The client's forged field is gone; only what fastedge decided is forwarded.
    assert [v for n, v in ctx.upstream_headers if n == b"x-feature-flags"] == [b"dark-mode"]
    assert store.flag_requests[(("flag", "new-pricing"), ("cohort", "in"))] == 1
    assert store.flag_requests[(("flag", "new-pricing"), ("cohort", "out"))] == 1


def test_no_user_id_means_out_and_a_forged_header_is_dropped() -> None:
    flt, _ = flags_filter(percent=100)
    ctx = context([(b"x-feature-flags", b"new-pricing"), (b"x-user-id", b"")])
    flt.on_request(ctx)
    assert ctx.upstream == "<blue>"
    assert not any(n == b"x-feature-flags" for n, _ in ctx.upstream_headers)
    assert "flags" not in ctx.state


def test_user_id_sources_in_order_claim_then_header_then_cookie() -> None:
    flt, _ = flags_filter()
    inside, outside = user_in(10, True), user_in(10, False)
    # The verified claim wins over a header naming someone else.
    ctx = context([(b"x-user-id", outside.encode())], claims={"sub": inside})
    flt.on_request(ctx)
    assert ctx.upstream == "<canary>"
    ctx = context([(b"x-user-id", inside.encode())], claims={"sub": outside})
    flt.on_request(ctx)
    assert ctx.upstream == "<blue>"
    # Cookie, among others, on any of several Cookie lines.
    cookies = [(b"cookie", b"a=1; b=2"), (b"cookie", b"theme=dark; uid=" + inside.encode())]
    ctx = context(cookies)
    flt.on_request(ctx)
    assert ctx.upstream == "<canary>"
    ctx = context([(b"cookie", b"xuid=" + inside.encode())])  # another cookie's name
    flt.on_request(ctx)
    assert ctx.upstream == "<blue>"
    # An integer claim is a user id too.
    numeric = next(i for i in range(10_000) if in_cohort("new-pricing", str(i), 10))
    ctx = context([], claims={"sub": numeric})
    flt.on_request(ctx)
    assert ctx.upstream == "<canary>"


def test_bucket_memo_is_bounded_and_never_changes_a_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fastedge.filters.traffic as module

    monkeypatch.setattr(module, "BUCKET_MEMO_SIZE", 8)
    flt, store = flags_filter(percent=10)
    entry = flt.entries[0]
    for round_ in range(2):  # the second round reads the memo for the last ids
        for i in range(30):
            user = f"m{i}"
            ctx = context([(b"x-user-id", user.encode())])
            flt.on_request(ctx)
            expected = in_cohort("new-pricing", user, store.rollouts["new-pricing"].percent)
            assert (ctx.upstream == "<canary>") == expected, (round_, user)
            assert len(entry.buckets) <= 8
        # A new percentage (as from Redis) keeps the memo: buckets do not depend on it.
        store.apply_document({"format": 1, "splits": {}, "flags": {"new-pricing": {"percent": 60}}})


def test_traffic_filter_routes_and_counts() -> None:
    config = make_config(weights={"blue": 0, "green": 1})
    store = TrafficStore(Metrics())
    store.configure(config)
    flt = TrafficFilter(config.sections["traffic"]["products"], store)
    for _ in range(3):
        ctx = context([])
        flt.on_request(ctx)
        assert ctx.upstream == "<green>"
        assert ctx.state["traffic"] == ("products", "green")
    assert store.split_requests == {(("split", "products"), ("version", "green")): 3}
    # A version this generation cannot resolve keeps the route's upstream.
    ctx = context([], upstreams={"blue": "<blue>"})
    flt.on_request(ctx)
    assert ctx.upstream == "<blue>"


def test_metrics_collector() -> None:
    metrics = Metrics()
    store = TrafficStore(metrics)
    store.configure(make_config(weights={"blue": 90, "green": 10}, percent=12.5))
    text = metrics.render().decode()
    assert 'fastedge_traffic_weight{split="products",version="blue"} 90' in text
    assert 'fastedge_traffic_weight{split="products",version="green"} 10' in text
    assert 'fastedge_flag_percent{flag="new-pricing"} 12.5' in text
    assert "# TYPE fastedge_traffic_requests_total counter" in text


# --------------------------------------------------------------------------- overrides


async def test_overrides_win_over_config_and_are_rechecked_on_reload() -> None:
    store = TrafficStore(Metrics())
    store.configure(make_config())
    await store.set_weights("products", {"blue": 30, "green": 70})
    await store.set_percent("new-pricing", 25)
    # A reload with other initial values: the runtime values stay.
    store.configure(make_config(weights={"blue": 50, "green": 50}, percent=5))
    assert store.splits["products"].weights_dict() == {"blue": 30, "green": 70}
    assert store.rollouts["new-pricing"].percent == 25
    assert store.rollouts["dark-mode"].percent == 100  # never overridden: the config's
    # A version added later starts at 0 under the override.
    doc = make_config().sections["traffic"]
    three = dict(doc["products"].versions, canary="canary")
    cfg = parse_config(
        {
            "upstreams": UPSTREAMS,
            "traffic": {"products": {"versions": three, "weights": {"blue": 1}}},
        }
    )
    store.configure(cfg)
    assert store.splits["products"].weights_dict() == {"blue": 30, "green": 70, "canary": 0}
    # A version removed from the config: the override no longer fits; the config wins.
    cfg = parse_config(
        {
            "upstreams": UPSTREAMS,
            "traffic": {"products": {"versions": {"blue": "blue"}, "weights": {"blue": 1}}},
        }
    )
    store.configure(cfg)
    assert store.splits["products"].weights_dict() == {"blue": 1}


# --------------------------------------------------------------------------- state file


def test_write_atomic_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(str(path), b"one")
    write_atomic(str(path), b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["state.json"]


async def test_state_file_round_trip_and_default_location(tmp_path: Path) -> None:
    source = tmp_path / "fastedge.toml"
    config = make_config(source=str(source))
    runtime = Runtime(metrics=Metrics())
    store = store_for(runtime, config)
    assert store is not None and isinstance(store.backend, FileBackend)
    assert store.backend.path == str(tmp_path / "fastedge-state.json")  # beside the config
    _, persisted = await store.set_weights("products", {"blue": 40, "green": 60})
    assert persisted is True
    _, persisted = await store.set_percent("new-pricing", 20)
    assert persisted is True
    saved = json.loads((tmp_path / "fastedge-state.json").read_text())
    assert saved == {
        "format": 1,
        "splits": {"products": {"weights": {"blue": 40, "green": 60}}},
        "flags": {"new-pricing": {"percent": 20}},
    }
    await runtime.close()
    # A new process: the file's values win over the config's initial ones.
    runtime = Runtime(metrics=Metrics())
    store = store_for(runtime, config)
    assert store is not None
    assert store.splits["products"].weights_dict() == {"blue": 40, "green": 60}
    assert store.rollouts["new-pricing"].percent == 20
    await runtime.close()
    # No config file, no file setting: in memory only.
    runtime = Runtime(metrics=Metrics())
    store = store_for(runtime, make_config())
    assert store is not None and store.backend.kind == "memory"
    await runtime.close()


async def test_a_corrupt_state_file_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"format": 1, "splits": {')
    runtime = Runtime(metrics=Metrics())
    with caplog.at_level(logging.ERROR, "fastedge.traffic"):
        store = store_for(runtime, make_config(state={"file": str(path)}))
    assert store is not None
    assert store.splits["products"].weights_dict() == {"blue": 100, "green": 0}
    assert (tmp_path / "state.json.corrupt").exists() and not path.exists()
    assert "not valid JSON" in caplog.text
    await runtime.close()


async def test_unwritable_state_file_keeps_serving_counts_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real OSError: the state file's directory disappears under the running proxy."""
    directory = tmp_path / "state"
    directory.mkdir()
    runtime = Runtime(metrics=Metrics())
    store = store_for(runtime, make_config(state={"file": str(directory / "s.json")}))
    assert store is not None
    assert (await store.set_weights("products", {"blue": 1, "green": 1}))[1] is True
    (directory / "s.json").unlink()
    directory.rmdir()
    with caplog.at_level(logging.ERROR, "fastedge.traffic"):
        split, persisted = await store.set_weights("products", {"blue": 0, "green": 1})
        assert persisted is False
        assert store.splits["products"] is split  # the change serves anyway
        assert split.weights_dict() == {"blue": 0, "green": 1}
        rollout, persisted = await store.set_percent("new-pricing", 30)
        assert persisted is False and rollout.percent == 30
    assert metric(runtime.metrics, WRITE_ERRORS) == 2
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # rate-limited: the second failure is counted, not logged
    assert "cannot write the traffic state file" in errors[0].getMessage()
    await runtime.close()


async def test_enospc_at_fsync_is_handled_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected ENOSPC at the fsync (the real one is in test_traffic_proxy.py, on a full
    tmpfs): the temporary file goes, the old state file stays intact."""
    path = tmp_path / "s.json"
    runtime = Runtime(metrics=Metrics())
    store = store_for(runtime, make_config(state={"file": str(path)}))
    assert store is not None
    await store.set_weights("products", {"blue": 2, "green": 1})
    good = path.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    _, persisted = await store.set_weights("products", {"blue": 1, "green": 2})
    assert persisted is False
    assert store.splits["products"].weights_dict() == {"blue": 1, "green": 2}
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["s.json"]
    monkeypatch.undo()
    await runtime.close()
