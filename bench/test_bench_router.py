"""PrefixRouter.match micro benchmarks against a linear regex scan (Starlette-style: one
compiled ``^prefix(/|$)`` per route, tried longest first) at 10, 100 and 1,000 routes.

Each round matches ``len(PATHS)`` = 100 paths, so the per-call time is the reported time
divided by 100. Run: ``pytest bench/test_bench_router.py --benchmark-only``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

import pytest

from fastedge._core import router as compiled_router
from fastedge._core import router_py

WORDS = ["api", "users", "products", "v1", "v2", "auth", "orders", "items", "admin", "static"]
CALLS = 100  # matches per benchmark round


def make_routes(count: int) -> tuple[list[str], list[str]]:
    """``count`` prefixes of 1-3 segments and ``CALLS`` request paths below them
    (a tenth match nothing), deterministic."""
    rng = random.Random(count)
    prefixes: set[str] = set()
    while len(prefixes) < count:
        depth = rng.randint(1, 3)
        prefixes.add(
            "/" + "/".join(f"{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(depth))
        )
    ordered = sorted(prefixes)
    paths = [p + "/42/detail" for p in rng.choices(ordered, k=CALLS - CALLS // 10)]
    paths += [f"/nothing/{i}/here" for i in range(CALLS // 10)]
    rng.shuffle(paths)
    return ordered, paths


def regex_matcher(prefixes: list[str]) -> Callable[[str], Any]:
    patterns = [
        (re.compile("^" + re.escape(p) + "(/|$)"), p)
        for p in sorted(prefixes, key=len, reverse=True)
    ]

    def match(path: str) -> Any:
        for pattern, prefix in patterns:
            if pattern.match(path):
                return prefix, prefix
        return None

    return match


def router_matcher(cls: Any, prefixes: list[str]) -> Callable[[str], Any]:
    router = cls()
    for prefix in prefixes:
        router.add(prefix, prefix)
    return router.match  # type: ignore[no-any-return]


IMPLS = ["fastedge-compiled", "fastedge-python", "regex-scan"]


@pytest.mark.parametrize("count", [10, 100, 1000])
@pytest.mark.parametrize("impl", IMPLS)
def test_match(benchmark: Any, impl: str, count: int) -> None:
    benchmark.group = f"router-match-{count}-routes"
    prefixes, paths = make_routes(count)
    if impl == "regex-scan":
        match = regex_matcher(prefixes)
    else:
        match = router_matcher(
            compiled_router.PrefixRouter if impl == "fastedge-compiled" else router_py.PrefixRouter,
            prefixes,
        )

    def run() -> None:
        for path in paths:
            match(path)

    benchmark(run)
    # All three agree on what they matched.
    expected = regex_matcher(prefixes)
    assert [match(p) for p in paths] == [expected(p) for p in paths]


@pytest.mark.parametrize("impl", ["fastedge-compiled", "fastedge-python"])
def test_match_with_host_and_method(benchmark: Any, impl: str) -> None:
    """1,000 routes with host and method filters in play: the proxy's real call."""
    benchmark.group = "router-match-host-method-1000-routes"
    cls = compiled_router.PrefixRouter if impl == "fastedge-compiled" else router_py.PrefixRouter
    prefixes, paths = make_routes(1000)
    router = cls()
    for i, prefix in enumerate(prefixes):
        router.add(prefix, prefix, host="api.example.com" if i % 3 == 0 else None)
        if i % 5 == 0:
            router.add(prefix, "write", methods={"POST", "PUT"})
    router.add("/", "wild", host="*.example.com")
    match = router.match

    def run() -> None:
        for path in paths:
            match(path, "API.example.com:443", "GET")

    benchmark(run)
