"""LRUCache on both implementations: recency, bounds, TTL, callbacks, bad input, leaks."""

from __future__ import annotations

import gc
import math
import sys
from typing import Any

import pytest

from .conftest import load


@pytest.fixture
def cls(impl: str) -> Any:
    return load("lru", impl).LRUCache


# -- recency and entry bound -----------------------------------------------------------


def test_get_set_and_recency_order(cls: Any) -> None:
    cache = cls(3)
    cache["a"] = 1
    cache["b"] = 2
    cache["c"] = 3
    assert cache.items() == [("c", 3), ("b", 2), ("a", 1)]  # most recent first
    assert cache.get("a") == 1
    assert cache.items()[0] == ("a", 1)
    cache["d"] = 4  # evicts the least recent: "b"
    assert "b" not in cache
    assert [k for k, _ in cache.items()] == ["d", "a", "c"]
    assert len(cache) == 3


def test_peek_does_not_bump_or_count(cls: Any) -> None:
    cache = cls(2)
    cache["a"] = 1
    cache["b"] = 2
    assert cache.peek("a") == 1
    assert cache.peek("zz", "dflt") == "dflt"
    cache["c"] = 3  # "a" is still least recent
    assert "a" not in cache
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (0, 0)


def test_set_existing_key_replaces_and_bumps(cls: Any) -> None:
    evicted: list[tuple[Any, Any]] = []
    cache = cls(2, on_evict=lambda k, v: evicted.append((k, v)))
    cache["a"] = 1
    cache["b"] = 2
    assert cache.set("a", 10) is True
    cache["c"] = 3
    assert evicted == [("b", 2)]  # replacing "a" neither evicted it nor reported it
    assert cache.items() == [("c", 3), ("a", 10)]


def test_getitem_missing_raises_and_counts_a_miss(cls: Any) -> None:
    cache = cls()
    with pytest.raises(KeyError):
        cache["nope"]
    cache["x"] = 1
    assert cache["x"] == 1
    assert cache.get("nope", 5) == 5
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (1, 2)


def test_pop_and_del(cls: Any) -> None:
    cache = cls()
    cache.set("a", 1, size=7)
    cache["b"] = 2
    assert cache.pop("a") == 1
    assert cache.stats()["bytes"] == 1
    assert cache.pop("a", None) is None
    with pytest.raises(KeyError):
        cache.pop("a")
    del cache["b"]
    with pytest.raises(KeyError):
        del cache["b"]
    assert len(cache) == 0
    assert cache.stats()["bytes"] == 0


def test_clear_keeps_statistics(cls: Any) -> None:
    cache = cls(1)
    cache["a"] = 1
    cache["b"] = 2
    cache.get("b")
    cache.clear()
    assert len(cache) == 0
    assert cache.items() == []
    stats = cache.stats()
    assert stats == {
        "hits": 1,
        "misses": 0,
        "evictions": 1,
        "expired": 0,
        "len": 0,
        "bytes": 0,
        "maxsize": 1,
        "max_bytes": None,
    }
    cache["c"] = 3  # still usable after clear
    assert cache.items() == [("c", 3)]


def test_keys_are_any_hashable(cls: Any) -> None:
    cache = cls()
    keys: list[Any] = [1, "1", (1, 2), frozenset({3}), None, 1.5, b"k"]
    for i, key in enumerate(keys):
        cache[key] = i
    assert [cache[k] for k in keys] == list(range(len(keys)))
    with pytest.raises(TypeError):
        cache[[1, 2]] = 1
    with pytest.raises(TypeError):
        cache.get({})


# -- byte bound ------------------------------------------------------------------------


def test_byte_bound_evicts_least_recent_until_it_fits(cls: Any) -> None:
    evicted: list[Any] = []
    cache = cls(max_bytes=100, on_evict=lambda k, v: evicted.append(k))
    cache.set("a", "A", size=40)
    cache.set("b", "B", size=40)
    cache.get("a")
    cache.set("c", "C", size=50)  # 130 > 100: evict "b" (least recent) -> 90
    assert evicted == ["b"]
    assert cache.stats()["bytes"] == 90
    cache.set("a", "A2", size=100)  # grows in place: "c" goes, "a" stays
    assert evicted == ["b", "c"]
    assert cache.items() == [("a", "A2")]
    assert cache.stats()["bytes"] == 100


def test_item_larger_than_max_bytes_is_not_stored(cls: Any) -> None:
    evicted: list[Any] = []
    cache = cls(max_bytes=10, on_evict=lambda k, v: evicted.append(k))
    cache.set("small", 1, size=5)
    cache.set("big", 1, size=3)
    assert cache.set("big", 2, size=11) is False  # the old "big" must not be served
    assert "big" not in cache
    assert cache.items() == [("small", 1)]
    assert cache.stats()["bytes"] == 5
    assert evicted == []


def test_both_bounds_at_once(cls: Any) -> None:
    cache = cls(2, max_bytes=10)
    cache.set("a", 1, size=4)
    cache.set("b", 2, size=4)
    cache.set("c", 3, size=1)  # entry bound
    assert [k for k, _ in cache.items()] == ["c", "b"]
    cache.set("d", 4, size=10)  # byte bound: both others go
    assert cache.items() == [("d", 4)]
    assert cache.stats()["evictions"] == 3


def test_zero_size_entries(cls: Any) -> None:
    cache = cls(max_bytes=1)
    for i in range(5):
        cache.set(i, i, size=0)
    assert len(cache) == 5
    assert cache.stats()["bytes"] == 0


# -- TTL -------------------------------------------------------------------------------


def test_ttl_expires_on_access_without_on_evict(cls: Any) -> None:
    evicted: list[Any] = []
    cache = cls(on_evict=lambda k, v: evicted.append(k))
    cache.set("k", "v", ttl=10, now=100.0)
    assert cache.get("k", now=109.9) == "v"
    assert cache.peek("k", now=110.0) is None  # peek: a miss, but nothing removed
    assert len(cache) == 1
    assert cache.get("k", "gone", now=110.0) == "gone"
    assert len(cache) == 0
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["expired"]) == (1, 1, 1)
    assert evicted == []


def test_set_without_ttl_clears_a_previous_ttl(cls: Any) -> None:
    cache = cls()
    cache.set("k", 1, ttl=1, now=0)
    cache.set("k", 2)
    assert cache.get("k", now=1e9) == 2


def test_items_pop_and_expire_respect_ttl(cls: Any) -> None:
    cache = cls()
    cache.set("a", 1, ttl=5, now=0)
    cache.set("b", 2, ttl=50, now=0)
    cache.set("c", 3)
    assert cache.items(now=10) == [("c", 3), ("b", 2)]
    assert cache.pop("a", "x", now=10) == "x"
    cache.set("a", 1, ttl=5, now=0)
    assert cache.expire(now=100) == 2
    assert cache.items(now=100) == [("c", 3)]
    assert cache.stats()["expired"] == 3


def test_expired_entry_at_the_lru_end_counts_as_an_eviction(cls: Any) -> None:
    evicted: list[Any] = []
    cache = cls(1, on_evict=lambda k, v: evicted.append(k))
    cache.set("old", 1, ttl=1, now=0)
    cache.set("new", 2, now=5)
    assert evicted == ["old"]


def test_contains_uses_the_monotonic_clock(cls: Any) -> None:
    cache = cls()
    cache.set("k", 1, ttl=3600)  # now defaults to time.monotonic()
    assert "k" in cache
    cache.set("j", 1, ttl=1, now=-1e9)  # long expired on the monotonic clock
    assert "j" not in cache


# -- callbacks -------------------------------------------------------------------------


class Boom(Exception):
    pass


def test_callback_exception_propagates_and_cache_stays_consistent(cls: Any) -> None:
    def on_evict(key: Any, value: Any) -> None:
        raise Boom(key)

    cache = cls(2, on_evict=on_evict)
    cache["a"] = 1
    cache["b"] = 2
    with pytest.raises(Boom) as info:
        cache["c"] = 3
    assert info.value.args == ("a",)
    assert cache.items() == [("c", 3), ("b", 2)]  # the set itself completed
    assert cache.stats()["evictions"] == 1
    assert len(cache) == 2


def test_several_failing_callbacks_are_all_reported(cls: Any) -> None:
    seen: list[Any] = []

    def on_evict(key: Any, value: Any) -> None:
        seen.append(key)
        raise Boom(key)

    cache = cls(max_bytes=3, on_evict=on_evict)
    for key in "abc":
        cache.set(key, key, size=1)
    with pytest.raises(ExceptionGroup) as info:
        cache.set("d", "d", size=3)
    assert seen == ["a", "b", "c"]
    assert [e.args for e in info.value.exceptions] == [("a",), ("b",), ("c",)]
    assert cache.items() == [("d", "d")]


def test_callback_may_reenter_the_cache(cls: Any) -> None:
    cache: Any = None

    def on_evict(key: Any, value: Any) -> None:
        cache.set(("evicted", key), value, size=0)

    cache = cls(max_bytes=2, on_evict=on_evict)
    cache.set("a", 1, size=1)
    cache.set("b", 2, size=2)
    assert cache.items() == [(("evicted", "a"), 1), ("b", 2)]


def test_value_finalizer_reentering_during_clear_is_safe(cls: Any) -> None:
    cache: Any = cls()

    class Reenter:
        def __del__(self) -> None:
            cache.set("from-del", 1)
            cache.get("x")

    for i in range(50):
        cache[i] = Reenter()
    cache.clear()
    assert cache.items() == [("from-del", 1)]
    for i in range(50):
        cache[i] = Reenter()
    del cache[3]
    cache.pop(4)


# -- bad arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"maxsize": 0}, ValueError),
        ({"maxsize": -1}, ValueError),
        ({"maxsize": 1.5}, TypeError),
        ({"maxsize": True}, TypeError),
        ({"maxsize": "3"}, TypeError),
        ({"maxsize": sys.maxsize + 1}, ValueError),
        ({"max_bytes": 0}, ValueError),
        ({"max_bytes": 2.0}, TypeError),
        ({"on_evict": 3}, TypeError),
    ],
)
def test_bad_constructor_arguments(cls: Any, kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size": -1}, ValueError),
        ({"size": sys.maxsize + 1}, ValueError),
        ({"size": -(2**70)}, ValueError),
        ({"size": 1.0}, TypeError),
        ({"size": True}, TypeError),
        ({"ttl": -1}, ValueError),
        ({"ttl": 0}, ValueError),
        ({"ttl": math.nan}, ValueError),
        ({"ttl": math.inf}, ValueError),
        ({"ttl": "5"}, TypeError),
        ({"ttl": 1, "now": "later"}, TypeError),
    ],
)
def test_bad_set_arguments_leave_the_cache_unchanged(
    cls: Any, kwargs: dict[str, Any], error: type
) -> None:
    cache = cls(2)
    cache["a"] = 1
    with pytest.raises(error):
        cache.set("b", 2, **kwargs)
    assert cache.items() == [("a", 1)]


def test_bad_now_on_read(cls: Any) -> None:
    cache = cls()
    cache.set("k", 1, ttl=5, now=0)
    with pytest.raises(TypeError):
        cache.get("k", now="soon")
    with pytest.raises(TypeError):
        cache.items(now=[1])


def test_total_bytes_cannot_overflow(cls: Any) -> None:
    cache = cls()
    cache.set("a", 1, size=sys.maxsize)
    with pytest.raises(ValueError):
        cache.set("b", 1, size=1)
    assert cache.stats()["bytes"] == sys.maxsize


def test_properties_and_repr(cls: Any) -> None:
    cache = cls(5, max_bytes=9)
    assert (cache.maxsize, cache.max_bytes) == (5, 9)
    assert repr(cache) == "<LRUCache len=0 bytes=0 maxsize=5 max_bytes=9>"


# -- references ------------------------------------------------------------------------


def test_no_reference_leaks(cls: Any) -> None:
    """Keys and values must be released exactly: counts return to their baseline."""
    value = object()
    key_base = ("leak-probe",)
    evicted: list[Any] = []

    def churn() -> None:
        cache = cls(8, max_bytes=40, on_evict=lambda k, v: evicted.append(k))
        for i in range(2000):
            key = (key_base, i % 16)
            cache.set(key, value, size=i % 7, ttl=5 if i % 3 else None, now=float(i % 11))
            cache.get(key)
            cache.get((key_base, i % 5), now=float(i))
            cache.peek(key)
            if i % 13 == 0:
                cache.pop(key, None)
            if i % 17 == 0:
                cache.set(key, value, size=41)  # rejected: too big
            if i % 19 == 0:
                cache.expire(now=float(i))
            cache.items(now=0.0)
            cache[key] = value
            del cache[key]
        cache.clear()
        evicted.clear()

    churn()  # warm up freelists and caches
    gc.collect()
    value_refs = sys.getrefcount(value)
    key_refs = sys.getrefcount(key_base)
    objects = len(gc.get_objects())
    for _ in range(5):
        churn()
    gc.collect()
    assert sys.getrefcount(value) == value_refs
    assert sys.getrefcount(key_base) == key_refs
    assert len(gc.get_objects()) <= objects + 10


def test_cache_in_a_reference_cycle_is_collected(cls: Any) -> None:
    import weakref

    class Holder:
        pass

    cache = cls()
    holder = Holder()
    holder.cache = cache  # type: ignore[attr-defined]
    cache["self"] = holder
    ref = weakref.ref(holder)
    del cache, holder
    gc.collect()
    assert ref() is None


def test_replaced_value_finalizer_sees_a_consistent_cache(cls: Any) -> None:
    cache: Any = cls(max_bytes=10)
    seen: list[Any] = []

    class Probe:
        def __del__(self) -> None:
            seen.append((cache.stats()["bytes"], cache.peek("k"), cache.pop("k", None)))

    cache.set("k", Probe(), size=5)
    cache.set("k", "new", size=2)
    assert seen == [(2, "new", "new")]
    assert cache.stats()["bytes"] == 0
    cache["j"] = Probe()
    cache["j"] = 1
    assert seen[-1] == (1, None, None)
    assert cache.items() == [("j", 1)]
