"""Consistent-hash ring, ketama-compatible: the pure-Python twin of ``hashring.pyx``.

Placement is libketama's, as ``uhashring.HashRing(nodes, hash_fn="ketama")`` does it:
each node gets ``ks`` groups of 4 points; group ``g`` is the MD5 digest of the UTF-8
bytes ``f"{node}-{g}"`` cut into four little-endian 32-bit words. With ``n`` nodes of
total weight ``W``, a node of weight ``w`` gets ``ks = (vnodes * n * w) // (4 * W)``
groups, so ``vnodes`` is the number of points of an average-weight node. That is
uhashring's formula ``(vnodes_u * n * w) // W`` with ``vnodes_u = vnodes / 4`` (uhashring
counts groups, ketama's default 40 = our default 160 points). One deliberate difference:
a node always gets at least one group, where ketama would give a node of tiny relative
weight none at all and so never choose it.

A key is hashed like ketama: the first four bytes of MD5(key) as a little-endian 32-bit
integer. Its node is the owner of the first point strictly greater than the hash,
wrapping around to the first point. Two points that collide keep the node placed last
(later in insertion order), as uhashring's point dict does.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from hashlib import md5

__all__ = ["HashRing"]

#: Points per MD5 digest: 16 bytes = four 32-bit words (libketama).
POINTS_PER_DIGEST = 4

#: Keeps the compiled twin's arithmetic in 64 bits; 16M points per node is no real ring.
MAX_VNODES = 1 << 24


def _check_weight(node: str, weight: object) -> int:
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise TypeError(f"weight of {node!r} must be an int, got {type(weight).__name__}")
    if weight < 1:
        raise ValueError(f"weight of {node!r} must be >= 1, got {weight!r}")
    return weight


def _check_node(node: object) -> str:
    if not isinstance(node, str):
        raise TypeError(f"node names must be str, got {type(node).__name__}")
    return node


def key_hash(key: str | bytes) -> int:
    """Ketama hash of a key: MD5's first 4 bytes, little-endian. ``str`` is UTF-8 encoded;
    ``bytes`` are hashed as they are."""
    if isinstance(key, str):
        data = key.encode("utf-8")
    elif isinstance(key, bytes):
        data = key
    else:
        raise TypeError(f"key must be str or bytes, got {type(key).__name__}")
    return int.from_bytes(md5(data).digest()[:4], "little")


class HashRing:
    """A ketama consistent-hash ring over named, weighted nodes.

    ``nodes`` is an iterable of names (weight 1 each) or a mapping name -> weight.
    """

    __slots__ = ("_names", "_owners", "_points", "_vnodes", "_weights")

    def __init__(self, nodes: Iterable[str] | Mapping[str, int] = (), *, vnodes: int = 160) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int):
            raise TypeError(f"vnodes must be an int, got {type(vnodes).__name__}")
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes!r}")
        if vnodes > MAX_VNODES:
            raise ValueError(f"vnodes must be <= {MAX_VNODES}, got {vnodes!r}")
        if isinstance(nodes, str):
            raise TypeError("nodes must be an iterable of names, not a single str")
        self._vnodes = vnodes
        weights: dict[str, int] = {}
        if isinstance(nodes, Mapping):
            for node, weight in nodes.items():
                weights[_check_node(node)] = _check_weight(node, weight)
        else:
            for node in nodes:
                weights[_check_node(node)] = 1
        self._weights = weights
        self._names: list[str] = []
        self._points: list[int] = []
        self._owners: list[int] = []  # index into _names of each point's node
        self._rebuild()

    def _rebuild(self) -> None:
        """Place every node's points; all move when ``n`` or ``W`` change (ketama)."""
        names = list(self._weights)
        n = len(names)
        total = sum(self._weights.values())
        owner_of: dict[int, int] = {}
        for index, name in enumerate(names):
            groups = (self._vnodes * n * self._weights[name]) // (POINTS_PER_DIGEST * total)
            for group in range(max(1, groups)):
                digest = md5(f"{name}-{group}".encode()).digest()
                for word in range(POINTS_PER_DIGEST):
                    point = int.from_bytes(digest[4 * word : 4 * word + 4], "little")
                    owner_of[point] = index  # a collision keeps the later node
        points = sorted(owner_of)
        self._names = names
        self._points = points
        self._owners = [owner_of[p] for p in points]

    def _start(self, key: str | bytes) -> int:
        if not self._points:
            raise LookupError("the hash ring has no nodes")
        position = bisect_right(self._points, key_hash(key))
        return 0 if position == len(self._points) else position

    def get(self, key: str | bytes) -> str:
        """The node owning ``key``. ``LookupError`` if the ring is empty."""
        return self._names[self._owners[self._start(key)]]

    def get_n(self, key: str | bytes, n: int) -> list[str]:
        """Up to ``n`` distinct nodes in ring order from ``key``'s point (``get(key)``
        first): the failover order. Fewer when the ring has fewer nodes."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        start = self._start(key)
        want = min(n, len(self._names))
        found: list[str] = []
        seen: set[int] = set()
        count = len(self._points)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner not in seen:
                seen.add(owner)
                found.append(self._names[owner])
                if len(found) == want:
                    break
        return found

    def get_bounded(self, key: str | bytes, loads: Mapping[str, float], c: float = 1.25) -> str:
        """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

        ``loads`` maps node -> current load (missing nodes count 0). With ``total`` the
        sum of the ring nodes' loads, a node may take the key while its load is below
        ``capacity = ceil(c * (total + 1) / len(ring))``, so after taking it the load is
        at most ``capacity``. The first such node in ring order from the key's point
        wins. ``c >= 1`` guarantees one exists (not all loads can reach the capacity).
        """
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"c must be a number, got {type(c).__name__}")
        if not (c >= 1.0 and math.isfinite(c)):
            raise ValueError(f"c must be a finite number >= 1, got {c!r}")
        start = self._start(key)
        node_loads = [float(loads.get(name, 0)) for name in self._names]
        total = 0.0
        for load in node_loads:
            total += load
        capacity = math.ceil(float(c) * (total + 1.0) / float(len(self._names)))
        count = len(self._points)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if node_loads[owner] < capacity:
                return self._names[owner]
        # Unreachable for c >= 1 (a pigeonhole argument); kept as a safe answer.
        return self._names[self._owners[start]]

    def add(self, node: str, weight: int = 1) -> None:
        """Add ``node`` (or change its weight, keeping its place in insertion order)."""
        _check_weight(_check_node(node), weight)
        self._weights[node] = weight
        self._rebuild()

    def remove(self, node: str) -> None:
        """Remove ``node``; ``KeyError`` if it is not on the ring."""
        del self._weights[_check_node(node)]
        self._rebuild()

    @property
    def nodes(self) -> dict[str, int]:
        """A copy of node name -> weight, in insertion order."""
        return dict(self._weights)

    @property
    def vnodes(self) -> int:
        """Points of an average-weight node."""
        return self._vnodes

    def points(self) -> list[tuple[int, str]]:
        """The sorted ring: ``(point, node)`` pairs, as uhashring's ``get_points()``."""
        return [(p, self._names[o]) for p, o in zip(self._points, self._owners, strict=True)]

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __repr__(self) -> str:
        return f"HashRing({self._weights!r}, vnodes={self._vnodes})"
