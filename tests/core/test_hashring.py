"""HashRing on both implementations: golden agreement with uhashring's ketama ring, the
C MD5 against hashlib, failover order, bounded loads, bad input and leaks."""

from __future__ import annotations

import gc
import hashlib
import math
import sys
import tracemalloc
from collections import Counter
from typing import Any

import pytest
import uhashring  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import IMPLS, load


@pytest.fixture
def mod(impl: str) -> Any:
    return load("hashring", impl)


def _uhashring(nodes: Any, vnodes: int = 160) -> Any:
    # uhashring's ketama mode counts digests ("vnodes" there), four points each.
    return uhashring.HashRing(nodes, hash_fn="ketama", vnodes=vnodes // 4)


def test_compiled_module_is_really_compiled() -> None:
    assert str(load("hashring", "compiled").__file__).endswith((".so", ".pyd"))


# -- the C MD5 and the key hash ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000])
def test_c_md5_matches_hashlib_at_block_edges(size: int) -> None:
    data = bytes((i * 7 + size) % 256 for i in range(size))
    digest = hashlib.md5(data).digest()
    expected = tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(4))
    assert load("hashring", "compiled")._md5_words(data) == expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_c_md5_matches_hashlib(data: bytes) -> None:
    digest = hashlib.md5(data).digest()
    expected = tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(4))
    assert load("hashring", "compiled")._md5_words(data) == expected


@settings(max_examples=200, deadline=None)
@given(impl=st.sampled_from(IMPLS), key=st.text(max_size=80))
def test_key_hash_is_ketamas(impl: str, key: str) -> None:
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: both twins refuse alike
        with pytest.raises(UnicodeEncodeError):
            load("hashring", impl).key_hash(key)
        return
    ring = _uhashring(["a"])
    assert load("hashring", impl).key_hash(key) == ring.hashi(key)
    assert load("hashring", impl).key_hash(raw) == ring.hashi(key)  # bytes: same bytes


# -- golden: placement and lookup agree with uhashring (ketama) ---------------------------

NODE_SETS: list[Any] = [
    ["cache-1", "cache-2", "cache-3"],
    [f"10.0.0.{i}:11211" for i in range(1, 11)],
    {"a": 1, "b": 2, "c": 5},
    {"eu-west": 3, "us-east": 3, "ap-south": 1, "sa-east": 2},
    ["only"],
    {f"node{i}": 1 + i % 4 for i in range(25)},
]


@pytest.mark.parametrize("nodes", NODE_SETS)
@pytest.mark.parametrize("vnodes", [160, 40, 400])
def test_golden_agreement_with_uhashring(mod: Any, nodes: Any, vnodes: int) -> None:
    ring = mod.HashRing(nodes, vnodes=vnodes)
    reference = _uhashring(nodes, vnodes)
    assert ring.points() == sorted(set(reference.get_points()))
    keys = [f"user:{i}" for i in range(3000)] + [f"/img/{i}.png" for i in range(2000)]
    keys += ["", "ünïcødé-ключ", "\U0001f600" * 3]
    for key in keys:
        assert ring.get(key) == reference.get_node(key), key
    for key in keys[:500]:
        size = min(3, len(ring))
        assert ring.get_n(key, 3) == [c["nodename"] for c in reference.range(key, size)]


def test_golden_agreement_after_add_and_remove(mod: Any) -> None:
    ring = mod.HashRing(["a", "b", "c"])
    reference = _uhashring(["a", "b", "c"])
    ring.add("d", 2)
    reference.add_node("d", {"weight": 2})
    ring.remove("a")
    reference.remove_node("a")
    ring.add("b", 3)  # a weight change keeps b's place
    reference.add_node("b", {"weight": 3})
    assert ring.nodes == {"b": 3, "c": 1, "d": 2}
    for i in range(3000):
        assert ring.get(f"k{i}") == reference.get_node(f"k{i}")


# -- semantics ---------------------------------------------------------------------------


def test_bytes_keys_hash_their_raw_bytes(mod: Any) -> None:
    ring = mod.HashRing(["a", "b", "c", "d"])
    for i in range(200):
        assert ring.get(f"key{i}".encode()) == ring.get(f"key{i}")


def test_lookup_wraps_around_past_the_last_point(mod: Any) -> None:
    ring = mod.HashRing(["a", "b", "c"])
    points = ring.points()
    first_owner = points[0][1]
    # Find keys hashing above the last point (a ~1/480 chance each).
    above = [f"w{i}" for i in range(20_000) if mod.key_hash(f"w{i}") >= points[-1][0]]
    assert above
    assert all(ring.get(key) == first_owner for key in above)


def test_get_n_is_distinct_in_ring_order_and_starts_with_get(mod: Any) -> None:
    ring = mod.HashRing({"a": 1, "b": 1, "c": 2, "d": 1})
    for i in range(300):
        order = ring.get_n(f"k{i}", 4)
        assert sorted(order) == ["a", "b", "c", "d"]
        assert order[0] == ring.get(f"k{i}")
        assert ring.get_n(f"k{i}", 2) == order[:2]
        assert ring.get_n(f"k{i}", 99) == order  # capped at the node count


def test_removing_a_node_moves_only_its_keys(mod: Any) -> None:
    """Equal weights keep every other node's points where they are (ketama's counts
    depend on n*w/W, which stays 1), so only the removed node's keys move."""
    ring = mod.HashRing([f"n{i}" for i in range(8)])
    before = {f"k{i}": ring.get(f"k{i}") for i in range(4000)}
    ring.remove("n3")
    for key, node in before.items():
        if node != "n3":
            assert ring.get(key) == node
        else:
            assert ring.get(key) == ring.get_n(key, 1)[0] != "n3"
    ring.add("n3")
    assert {key: ring.get(key) for key in before} == before


def test_distribution_follows_weight(mod: Any) -> None:
    ring = mod.HashRing({"small": 1, "medium": 2, "large": 4})
    counts = Counter(ring.get(f"req-{i}") for i in range(70_000))
    for node, weight in {"small": 1, "medium": 2, "large": 4}.items():
        assert counts[node] / 70_000 == pytest.approx(weight / 7, rel=0.2)


def test_membership_and_views(mod: Any) -> None:
    ring = mod.HashRing({"a": 2, "b": 1}, vnodes=80)
    assert len(ring) == 2 and "a" in ring and "z" not in ring and 3 not in ring
    assert ring.nodes == {"a": 2, "b": 1}
    ring.nodes["c"] = 1  # a copy: the ring is untouched
    assert "c" not in ring and ring.vnodes == 80
    assert len(ring.points()) == 4 * (80 * 2 * 2 // 12 + 80 * 2 * 1 // 12)  # floor per node
    assert "HashRing" in repr(ring)


def test_tiny_weight_still_gets_points(mod: Any) -> None:
    """Where ketama would give a node no point (vnodes*n*w < 4*W), we give it one digest."""
    ring = mod.HashRing({"heavy": 1000, "light": 1})
    assert sum(1 for _, node in ring.points() if node == "light") == 4
    assert "light" in ring.get_n("anything", 2)


def test_empty_ring(mod: Any) -> None:
    ring = mod.HashRing()
    assert len(ring) == 0 and ring.points() == []
    with pytest.raises(LookupError):
        ring.get("k")
    with pytest.raises(LookupError):
        ring.get_n("k", 1)
    with pytest.raises(LookupError):
        ring.get_bounded("k", {})
    ring.add("a")
    assert ring.get("k") == "a"
    ring.remove("a")
    with pytest.raises(LookupError):
        ring.get("k")


# -- bounded loads -------------------------------------------------------------------------


def test_bounded_with_no_load_is_plain_get(mod: Any) -> None:
    ring = mod.HashRing(["a", "b", "c"])
    for i in range(500):
        assert ring.get_bounded(f"k{i}", {}) == ring.get(f"k{i}")


def test_bounded_skips_full_nodes_in_ring_order(mod: Any) -> None:
    ring = mod.HashRing(["a", "b", "c", "d"])
    key = "session-42"
    order = ring.get_n(key, 4)
    # total 12 -> capacity ceil(1.25 * 13 / 4) = 5: the first two are full.
    loads = {order[0]: 5, order[1]: 7, order[2]: 0, order[3]: 0}
    assert ring.get_bounded(key, loads) == order[2]
    assert ring.get_bounded(key, loads, c=2.0) == order[0]  # capacity 7 now


@settings(max_examples=40, deadline=None)
@given(
    impl=st.sampled_from(IMPLS),
    nodes=st.integers(1, 9),
    keys=st.integers(1, 400),
    c=st.floats(1.0, 3.0),
)
def test_bounded_loads_never_exceed_the_bound(impl: str, nodes: int, keys: int, c: float) -> None:
    ring = load("hashring", impl).HashRing([f"n{i}" for i in range(nodes)])
    loads = dict.fromkeys(ring.nodes, 0)
    for i in range(keys):
        node = ring.get_bounded(f"key-{i}", loads, c)
        loads[node] += 1
        assert loads[node] <= math.ceil(c * (i + 1) / nodes)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (("abc",), {}, TypeError),  # a str is not a list of names
        (([1, 2],), {}, TypeError),
        (({"a": 0},), {}, ValueError),
        (({"a": 1.5},), {}, TypeError),
        (({"a": True},), {}, TypeError),
        ((["a"],), {"vnodes": 0}, ValueError),
        ((["a"],), {"vnodes": 2**25}, ValueError),
        ((["a"],), {"vnodes": 16.0}, TypeError),
        ((42,), {}, TypeError),
    ],
)
def test_bad_construction(
    mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        mod.HashRing(*args, **kwargs)


def test_bad_calls_raise_and_leave_the_ring_alone(mod: Any) -> None:
    ring = mod.HashRing(["a", "b"])
    before = ring.points()
    bad: list[tuple[Any, type[Exception]]] = [
        (lambda: ring.get(42), TypeError),
        (lambda: ring.get(None), TypeError),
        (lambda: ring.get("\ud800"), UnicodeEncodeError),
        (lambda: ring.get_n("k", 0), ValueError),
        (lambda: ring.get_n("k", 1.0), TypeError),
        (lambda: ring.get_bounded("k", {}, c=0.5), ValueError),
        (lambda: ring.get_bounded("k", {}, c=math.nan), ValueError),
        (lambda: ring.get_bounded("k", {}, c="2"), TypeError),
        (lambda: ring.get_bounded("k", {"a": "x"}), ValueError),
        (lambda: ring.add(1), TypeError),
        (lambda: ring.add("c", 0), ValueError),
        (lambda: ring.add("c", 2.0), TypeError),
        (lambda: ring.remove("zz"), KeyError),
        (lambda: ring.remove(b"a"), TypeError),
    ]
    for call, error in bad:
        with pytest.raises(error):
            call()
    assert ring.points() == before and ring.nodes == {"a": 1, "b": 1}


# -- references and memory -------------------------------------------------------------------


def test_no_reference_leaks(mod: Any) -> None:
    name = "node-name-" + "x" * 30
    key = "some-key-" + "y" * 30
    ring = mod.HashRing([name, "other"])
    base_name, base_key = sys.getrefcount(name), sys.getrefcount(key)
    for _ in range(1000):
        ring.get(key)
        ring.get_n(key, 2)
        ring.get_bounded(key, {name: 1})
        ring.points()
    assert sys.getrefcount(name) == base_name
    assert sys.getrefcount(key) == base_key
    del ring
    gc.collect()
    assert sys.getrefcount(name) == base_name - 2  # the ring held its name twice


def test_memory_stays_flat_over_rebuilds(mod: Any) -> None:
    ring = mod.HashRing([f"n{i}" for i in range(4)], vnodes=40)
    tracemalloc.start()
    try:
        for i in range(10):  # warm up while traced
            ring.add(f"extra{i % 3}")
            ring.remove(f"extra{i % 3}")
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            ring.add(f"extra{i % 3}", 1 + i % 2)
            ring.get_n(f"k{i}", 5)
            ring.remove(f"extra{i % 3}")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes kept after 200 rebuilds"
