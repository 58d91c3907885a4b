"""HashRing micro benchmarks against uhashring's ketama ring (pure Python, the reference
our placement is golden-tested against).

Each round runs a batch of ``OPS`` lookups, so the per-call time is the reported time
divided by ``OPS`` (Python loop overhead included for every contender). Run:
``pytest bench/test_bench_hashring.py --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import uhashring  # type: ignore[import-untyped]

from fastedge._core import hashring as compiled_hashring
from fastedge._core import hashring_py

OPS = 1000  # lookups per benchmark round
NODES = {f"10.0.0.{i}:8080": 1 + i % 3 for i in range(1, 11)}  # 10 weighted nodes
KEYS = [f"session:{i * 7919}" for i in range(OPS)]


def _uhashring() -> Any:
    return uhashring.HashRing(NODES, hash_fn="ketama")  # 40 digests = our 160 points


RINGS: dict[str, Callable[[], Any]] = {
    "fastedge-compiled": lambda: compiled_hashring.HashRing(NODES),
    "fastedge-python": lambda: hashring_py.HashRing(NODES),
    "uhashring-ketama": _uhashring,
}


@pytest.fixture(params=list(RINGS))
def ring(request: pytest.FixtureRequest) -> Any:
    return RINGS[request.param]()


def _getter(ring: Any) -> Callable[[str], str]:
    if isinstance(ring, uhashring.HashRing):
        return ring.get_node  # type: ignore[no-any-return]
    return ring.get  # type: ignore[no-any-return]


@pytest.mark.benchmark(group="hashring-get")
def test_get(benchmark: Any, ring: Any) -> None:
    get = _getter(ring)

    def run() -> None:
        for key in KEYS:
            get(key)

    benchmark(run)
    assert get(KEYS[0]) == _uhashring().get_node(KEYS[0])


@pytest.mark.benchmark(group="hashring-get-n3")
def test_get_n(benchmark: Any, ring: Any) -> None:
    """Three distinct nodes in ring order (primary + two failovers)."""
    if isinstance(ring, uhashring.HashRing):

        def get_n(key: str) -> list[str]:
            return [conf["nodename"] for conf in ring.range(key, 3)]
    else:

        def get_n(key: str) -> list[str]:
            return ring.get_n(key, 3)  # type: ignore[no-any-return]

    def run() -> None:
        for key in KEYS:
            get_n(key)

    benchmark(run)


@pytest.mark.benchmark(group="hashring-build")
@pytest.mark.parametrize("name", list(RINGS))
def test_build(benchmark: Any, name: str) -> None:
    """Building a 10-node, 1,600-point ring (what add/remove cost, too)."""
    benchmark(RINGS[name])
