"""Consistent-hash ring, ketama-compatible (compiled). ``hashring_py.py`` is the twin.

Placement is libketama's as ``uhashring.HashRing(nodes, hash_fn="ketama",
vnodes=vnodes // 4)`` does it: with ``n`` nodes of total weight ``W``, a node of weight
``w`` gets ``max(1, (vnodes * n * w) // (4 * W))`` MD5 digests of ``f"{node}-{g}"``, each
giving four little-endian 32-bit points. ``vnodes`` is thus the point count of an
average-weight node (ketama's 40 digests = 160 points). The ``max(1, ...)`` is the one
deliberate difference: ketama would give a node of tiny relative weight no point at all.

Keys (``str``, UTF-8 encoded, or ``bytes`` as they are; anything else is a ``TypeError``)
hash to MD5's first four bytes, little-endian; the key's node owns the first point
strictly above that hash, wrapping around. Points that collide keep the node added later.
Lookups on an empty ring raise ``LookupError``.
"""

from collections.abc import Iterable, Mapping
from typing import final

def key_hash(key: str | bytes) -> int:
    """Ketama hash of a key: MD5's first 4 bytes, little-endian."""

@final
class HashRing:
    """A ketama consistent-hash ring over named, weighted nodes.

    ``nodes``: an iterable of names (weight 1 each) or a mapping name -> weight (int
    >= 1). ``vnodes``: points of an average-weight node, an int in ``[1, 2**24]``.
    """

    def __init__(
        self, nodes: Iterable[str] | Mapping[str, int] = (), *, vnodes: int = 160
    ) -> None: ...
    def get(self, key: str | bytes) -> str:
        """The node owning ``key``. ``LookupError`` if the ring is empty."""
    def get_n(self, key: str | bytes, n: int) -> list[str]:
        """Up to ``n`` (an int >= 1) distinct nodes in ring order from ``key``'s point,
        ``get(key)`` first: the failover order. Fewer if the ring has fewer nodes."""
    def get_bounded(self, key: str | bytes, loads: Mapping[str, float], c: float = 1.25) -> str:
        """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

        ``loads``: node -> current load (missing nodes count 0). With ``total`` the ring
        nodes' summed load, the first node in ring order from the key's point whose load
        is below ``capacity = ceil(c * (total + 1) / len(ring))`` wins, so its load after
        taking the key is at most ``capacity``. ``c`` (a finite number >= 1) guarantees
        such a node exists.
        """
    def add(self, node: str, weight: int = 1) -> None:
        """Add ``node`` (or change its weight, keeping its place in insertion order).
        Every point is re-placed, as ketama's counts depend on ``n`` and total weight."""
    def remove(self, node: str) -> None:
        """Remove ``node``; ``KeyError`` if it is not on the ring."""
    @property
    def nodes(self) -> dict[str, int]:
        """A copy of node name -> weight, in insertion order."""
    @property
    def vnodes(self) -> int:
        """Points of an average-weight node."""
    def points(self) -> list[tuple[int, str]]:
        """The sorted ring: ``(point, node)`` pairs, as uhashring's ``get_points()``."""
    def __len__(self) -> int:
        """Number of nodes."""
    def __contains__(self, node: object) -> bool:
        """Whether ``node`` is on the ring."""
