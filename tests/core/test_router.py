"""PrefixRouter on both implementations: segment boundaries, hosts, methods, bad input."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

from .conftest import load


@pytest.fixture
def cls(impl: str) -> Any:
    return load("router", impl).PrefixRouter


# -- prefixes --------------------------------------------------------------------------


def test_longest_prefix_on_segment_boundaries(cls: Any) -> None:
    router = cls()
    router.add("/api", "api")
    router.add("/api/user", "user")
    router.add("/api/users", "users")
    assert router.match("/api/users") == ("users", "/api/users")
    assert router.match("/api/users/42") == ("users", "/api/users")
    assert router.match("/api/users/") == ("users", "/api/users")
    assert router.match("/api/user/7") == ("user", "/api/user")
    assert router.match("/api/usersx") == ("api", "/api")  # not a segment boundary
    assert router.match("/api") == ("api", "/api")
    assert router.match("/apix") is None
    assert router.match("/") is None
    assert len(router) == 3


def test_root_matches_everything(cls: Any) -> None:
    router = cls()
    router.add("/", "root")
    router.add("/static", "static")
    assert router.match("/") == ("root", "/")
    assert router.match("/anything/at/all") == ("root", "/")
    assert router.match("/static/app.js") == ("static", "/static")
    assert router.match("//double") == ("root", "/")


def test_paths_not_starting_with_slash_match_nothing(cls: Any) -> None:
    router = cls()
    router.add("/", "root")
    assert router.match("*") is None
    assert router.match("") is None
    assert router.match("http://example.com/") is None


def test_trailing_slash_of_a_prefix_is_ignored(cls: Any) -> None:
    router = cls()
    router.add("/api/", "a")
    assert router.match("/api") == ("a", "/api")
    router.add("/api", "b")  # the same route: replaced
    assert router.match("/api/x") == ("b", "/api")
    assert len(router) == 1
    router.add("//", "root")
    assert router.match("/zzz") == ("root", "/")


def test_empty_segments_and_deep_paths(cls: Any) -> None:
    router = cls()
    router.add("/a", "a")
    router.add("/a/b/c", "abc")
    assert router.match("/a//b/c") == ("a", "/a")
    assert router.match("/a/b/c/d/e/f/g") == ("abc", "/a/b/c")
    assert router.match("/a/b") == ("a", "/a")
    assert router.match("/a" + "/x" * 1000) == ("a", "/a")


def test_matching_is_case_sensitive_and_non_ascii(cls: Any) -> None:
    router = cls()
    router.add("/Café", "cafe")
    router.add("/日本", "jp")
    assert router.match("/Café/menu") == ("cafe", "/Café")
    assert router.match("/café/menu") is None
    assert router.match("/日本/東京") == ("jp", "/日本")


def test_remove(cls: Any) -> None:
    router = cls()
    router.add("/a", 1)
    router.add("/a/b", 2)
    router.add("/a/b", 3, host="x.com")
    router.remove("/a/b/")
    assert router.match("/a/b/c") == (1, "/a")
    assert router.match("/a/b/c", "x.com") == (3, "/a/b")
    router.remove("/a/b", host="X.COM")
    assert router.match("/a/b/c", "x.com") == (1, "/a")
    assert len(router) == 1
    with pytest.raises(KeyError):
        router.remove("/a/b")
    with pytest.raises(KeyError):
        router.remove("/a", host="x.com")
    router.remove("/a")
    assert router.match("/a") is None
    assert len(router) == 0


def test_remove_the_longest_route_still_matches_shorter_ones(cls: Any) -> None:
    router = cls()
    router.add("/a", 1)
    router.add("/a/very/long/prefix", 2)
    router.remove("/a/very/long/prefix")
    assert router.match("/a/very/long/prefix/x") == (1, "/a")


# -- hosts -----------------------------------------------------------------------------


def test_exact_host_beats_wildcard_beats_any(cls: Any) -> None:
    router = cls()
    router.add("/", "any")
    router.add("/", "wild", host="*.example.com")
    router.add("/", "deeper", host="*.b.example.com")
    router.add("/", "exact", host="a.example.com")
    assert router.match("/x", "a.example.com") == ("exact", "/")
    assert router.match("/x", "c.example.com") == ("wild", "/")
    assert router.match("/x", "a.b.example.com") == ("deeper", "/")
    assert router.match("/x", "example.com") == ("any", "/")  # a wildcard needs a label
    assert router.match("/x", "other.org") == ("any", "/")
    assert router.match("/x") == ("any", "/")


def test_host_is_chosen_before_prefix_length_and_falls_through(cls: Any) -> None:
    router = cls()
    router.add("/api/users", "any-users")
    router.add("/api", "host-api", host="h.com")
    # The host's own routes win even though the any-host prefix is longer (nginx order)
    assert router.match("/api/users/1", "h.com") == ("host-api", "/api")
    # ... and when the host has no matching route, less specific tiers are tried
    assert router.match("/other", "h.com") is None
    router.add("/", "any-root")
    assert router.match("/other", "h.com") == ("any-root", "/")


def test_host_normalisation(cls: Any) -> None:
    router = cls()
    router.add("/", "ex", host="Example.COM")
    router.add("/", "v6", host="[::1]")
    for host in ("example.com", "EXAMPLE.com:8443", "example.com.", "example.com.:80"):
        assert router.match("/", host) == ("ex", "/"), host
    assert router.match("/", "[::1]:8080") == ("v6", "/")
    assert router.match("/", "[::1]") == ("v6", "/")
    assert router.match("/", "example.org") is None


def test_host_with_port_at_add_is_the_same_route(cls: Any) -> None:
    router = cls()
    router.add("/", 1, host="a.com:80")
    router.add("/", 2, host="A.com")
    assert len(router) == 1
    assert router.match("/", "a.com") == (2, "/")


# -- methods ---------------------------------------------------------------------------


def test_method_filter_narrows_and_falls_through(cls: Any) -> None:
    router = cls()
    router.add("/api", "api")
    router.add("/api/items", "read", methods={"GET", "HEAD"})
    router.add("/api/items", "write", methods=["POST"])  # disjoint: coexists
    assert router.match("/api/items/1", method="GET") == ("read", "/api/items")
    assert router.match("/api/items/1", method="HEAD") == ("read", "/api/items")
    assert router.match("/api/items/1", method="POST") == ("write", "/api/items")
    assert router.match("/api/items/1", method="DELETE") == ("api", "/api")
    assert router.match("/api/items/1", method="get") == ("api", "/api")  # RFC 9110 §9.1
    assert router.match("/api/items/1") == ("api", "/api")  # no method: unfiltered only
    assert len(router) == 2


def test_unfiltered_route_at_the_same_prefix_is_the_fallback(cls: Any) -> None:
    router = cls()
    router.add("/x", "only-get", methods={"GET"})
    router.add("/x", "any")
    assert router.match("/x", method="GET") == ("only-get", "/x")
    assert router.match("/x", method="PUT") == ("any", "/x")


def test_overlapping_method_sets_are_taken_over_method_by_method(cls: Any) -> None:
    router = cls()
    router.add("/x", "old", methods={"GET", "POST"})
    router.add("/x", "new", methods={"POST", "PUT"})
    assert router.match("/x", method="GET") == ("old", "/x")
    assert router.match("/x", method="POST") == ("new", "/x")
    assert router.match("/x", method="PUT") == ("new", "/x")
    router.remove("/x")
    assert router.match("/x", method="GET") is None


def test_hosts_and_methods_together(cls: Any) -> None:
    router = cls()
    router.add("/", "fallback")
    router.add("/api", "host-get", host="*.svc.local", methods={"GET"})
    assert router.match("/api/a", "a.svc.local", "GET") == ("host-get", "/api")
    assert router.match("/api/a", "a.svc.local", "POST") == ("fallback", "/")


# -- bad arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "kwargs", "error"),
    [
        ("api", {}, ValueError),
        ("", {}, ValueError),
        ("/a?b=1", {}, ValueError),
        ("/a#frag", {}, ValueError),
        (b"/api", {}, TypeError),
        (None, {}, TypeError),
        ("/a", {"host": 3}, TypeError),
        ("/a", {"host": ""}, ValueError),
        ("/a", {"host": "*"}, ValueError),
        ("/a", {"host": "a.*.com"}, ValueError),
        ("/a", {"host": "*."}, ValueError),
        ("/a", {"host": ".example.com"}, ValueError),
        ("/a", {"methods": "GET"}, TypeError),
        ("/a", {"methods": set()}, ValueError),
        ("/a", {"methods": [1]}, TypeError),
        ("/a", {"methods": [""]}, TypeError),
        ("/a", {"methods": 5}, TypeError),
    ],
)
def test_bad_add_arguments(cls: Any, prefix: Any, kwargs: dict[str, Any], error: type) -> None:
    router = cls()
    with pytest.raises(error):
        router.add(prefix, "v", **kwargs)
    assert len(router) == 0
    assert router.match("/a/b") is None


@pytest.mark.parametrize(
    "args",
    [(b"/x",), (None,), ("/x", 1), ("/x", None, 1), ("/x", b"host")],
)
def test_bad_match_arguments(cls: Any, args: tuple[Any, ...]) -> None:
    router = cls()
    router.add("/", 1)
    with pytest.raises(TypeError):
        router.match(*args)


def test_bad_remove_arguments(cls: Any) -> None:
    router = cls()
    with pytest.raises(ValueError):
        router.remove("x")
    with pytest.raises(TypeError):
        router.remove("/x", host=1)


def test_repr(cls: Any) -> None:
    router = cls()
    router.add("/a", 1)
    assert repr(router) == "<PrefixRouter routes=1>"


# -- references ------------------------------------------------------------------------


def test_no_reference_leaks(cls: Any) -> None:
    value = object()
    path = "/svc/leak-probe/item"

    def churn() -> None:
        router = cls()
        for i in range(300):
            router.add(f"/svc/{i}", value, host=None if i % 2 else f"h{i % 5}.com")
            router.add(f"/svc/{i}", value, host="*.w.com", methods={"GET"})
        for i in range(2000):
            router.match(path)
            router.match(f"/svc/{i % 400}/x", f"h{i % 7}.com:80", "GET")
            router.match(f"/svc/{i % 400}", "a.w.com", "PUT")
        for i in range(0, 300, 2):
            router.remove(f"/svc/{i}", host=f"h{i % 5}.com")

    churn()
    gc.collect()
    value_refs = sys.getrefcount(value)
    path_refs = sys.getrefcount(path)
    objects = len(gc.get_objects())
    for _ in range(3):
        churn()
    gc.collect()
    assert sys.getrefcount(value) == value_refs
    assert sys.getrefcount(path) == path_refs
    assert len(gc.get_objects()) <= objects + 10


def test_many_distinct_hosts(cls: Any) -> None:
    """More distinct Host values than any internal cache holds: answers stay right."""
    router = cls()
    router.add("/", "any")
    router.add("/", "even", host="*.even.test")
    for i in range(1000):
        host = f"h{i}.even.test:{i}" if i % 2 == 0 else f"H{i}.odd.test"
        expected = "even" if i % 2 == 0 else "any"
        assert router.match("/p", host) == (expected, "/"), host
        assert router.match("/p", host) == (expected, "/"), host
