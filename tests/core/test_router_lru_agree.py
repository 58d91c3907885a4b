"""Hypothesis drives the compiled and Python twins side by side with the same operations
and requires identical answers, exceptions, statistics and callback records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from .conftest import load

compiled_lru = load("lru", "compiled")
python_lru = load("lru", "python")
compiled_router = load("router", "compiled")
python_router = load("router", "python")


class Refused(Exception):
    """Raised by the test's on_evict callback for some keys."""


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """A comparable record of a call: its result or its exception type and message."""
    try:
        return ("ok", call())
    except ExceptionGroup as group:
        return ("group", [(type(e), str(e)) for e in group.exceptions])
    except Exception as exc:
        return ("raised", (type(exc), str(exc)))


def same(fn: Callable[[Any], Any], pair: tuple[Any, Any]) -> Any:
    first, second = outcome(lambda: fn(pair[0])), outcome(lambda: fn(pair[1]))
    assert first == second
    return first


keys = st.integers(0, 12)
sizes = st.integers(0, 6) | st.just(-1)
ttls = st.none() | st.integers(1, 20) | st.floats(0.5, 20.0) | st.just(0)


class LRUAgree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.expiries: list[float] = []
        self.records: tuple[list[Any], list[Any]] = ([], [])
        self.caches: tuple[Any, Any] = ()  # type: ignore[assignment]

    @precondition(lambda self: not self.caches)
    @rule(
        maxsize=st.none() | st.integers(1, 6),
        max_bytes=st.none() | st.integers(1, 15),
        refuse=st.sets(keys, max_size=3),
    )
    def create(self, maxsize: int | None, max_bytes: int | None, refuse: set[int]) -> None:
        def recorder(log: list[Any]) -> Callable[[Any, Any], None]:
            def on_evict(key: Any, value: Any) -> None:
                log.append((key, value))
                if key in refuse:
                    raise Refused(key)

            return on_evict

        self.caches = (
            compiled_lru.LRUCache(maxsize, max_bytes=max_bytes, on_evict=recorder(self.records[0])),
            python_lru.LRUCache(maxsize, max_bytes=max_bytes, on_evict=recorder(self.records[1])),
        )

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys, value=st.integers(), size=sizes, ttl=ttls)
    def set(self, key: int, value: int, size: int, ttl: float | None) -> None:
        kind, _ = same(lambda c: c.set(key, value, size=size, ttl=ttl, now=self.now), self.caches)
        if kind != "raised" and ttl is not None:
            self.expiries.append(self.now + float(ttl))

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys, value=st.integers())
    def setitem(self, key: int, value: int) -> None:
        same(lambda c: c.__setitem__(key, value), self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys)
    def get(self, key: int) -> None:
        same(lambda c: c.get(key, "default", now=self.now), self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys)
    def getitem_without_ttl_clock(self, key: int) -> None:
        # [] reads time.monotonic(), so only for keys whose answer cannot depend on it:
        # absent ones (a miss at any time) and ones without a TTL (a hit at any time).
        cache = self.caches[0]
        never_expires = cache.peek(key, now=1e300) is not None
        absent = cache.peek(key, now=-1e300) is None
        if never_expires or absent:
            same(lambda c: c[key], self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys)
    def peek(self, key: int) -> None:
        same(lambda c: c.peek(key, now=self.now), self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys, with_default=st.booleans())
    def pop(self, key: int, with_default: bool) -> None:
        if with_default:
            same(lambda c: c.pop(key, "d", now=self.now), self.caches)
        else:
            same(lambda c: c.pop(key, now=self.now), self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule(key=keys)
    def delitem(self, key: int) -> None:
        same(lambda c: c.__delitem__(key), self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule()
    def expire(self) -> None:
        same(lambda c: c.expire(now=self.now), self.caches)

    @precondition(lambda self: bool(self.caches))
    @rule()
    def clear(self) -> None:
        same(lambda c: c.clear(), self.caches)

    @rule(dt=st.floats(0, 8) | st.integers(0, 3))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(data=st.data())
    def advance_to_an_expiry(self, data: st.DataObject) -> None:
        # Land exactly on an expiry instant: the boundary where ">=" vs ">" differ.
        ahead = sorted(t for t in self.expiries if t > self.now)
        if ahead:
            self.now = data.draw(st.sampled_from(ahead))

    @invariant()
    def agree(self) -> None:
        if not self.caches:
            return
        same(lambda c: c.items(now=self.now), self.caches)
        same(lambda c: c.stats(), self.caches)
        same(len, self.caches)
        assert self.records[0] == self.records[1]
        stats = self.caches[0].stats()
        if stats["maxsize"] is not None:
            assert stats["len"] <= stats["maxsize"]
        if stats["max_bytes"] is not None:
            assert stats["bytes"] <= stats["max_bytes"]


segments = st.sampled_from(["a", "ab", "b", "api", "users", "user", "x", ""])
prefixes = st.lists(segments, max_size=4).map(lambda s: "/" + "/".join(s)) | st.sampled_from(
    ["/", "//", "/a/", "api", "/a?x"]
)
paths = st.lists(segments, max_size=6).map(lambda s: "/" + "/".join(s)) | st.sampled_from(
    ["", "*", "/", "//", "/a//b", "/api/users/"]
)
route_hosts = st.sampled_from(
    [None, "a.com", "A.COM:80", "*.a.com", "*.b.a.com", "x.b.a.com", "*", "", "*.com"]
)
request_hosts = st.sampled_from(
    [None, "a.com", "b.a.com", "x.b.a.com", "y.b.a.com:8080", "Z.A.COM.", "other.org", "com"]
)
method_sets = st.none() | st.sets(st.sampled_from(["GET", "POST", "PUT", "get"]), max_size=3)
methods = st.none() | st.sampled_from(["GET", "POST", "PUT", "DELETE", "get"])


class RouterAgree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.routers = (compiled_router.PrefixRouter(), python_router.PrefixRouter())
        self.counter = 0

    @rule(prefix=prefixes, host=route_hosts, names=method_sets)
    def add(self, prefix: str, host: str | None, names: set[str] | None) -> None:
        self.counter += 1
        value = self.counter
        same(lambda r: r.add(prefix, value, host=host, methods=names), self.routers)

    @rule(prefix=prefixes, host=route_hosts)
    def remove(self, prefix: str, host: str | None) -> None:
        same(lambda r: r.remove(prefix, host=host), self.routers)

    @rule(path=paths, host=request_hosts, method=methods)
    def match(self, path: str, host: str | None, method: str | None) -> None:
        kind, result = same(lambda r: r.match(path, host, method), self.routers)
        assert kind == "ok"
        if result is not None:
            _value, prefix = result
            # The matched prefix is the path itself or ends on a segment boundary.
            assert prefix == "/" or path == prefix or path.startswith(prefix + "/")

    @invariant()
    def agree(self) -> None:
        same(len, self.routers)


LRUAgree.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
RouterAgree.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestLRUAgree = LRUAgree.TestCase
TestRouterAgree = RouterAgree.TestCase
