"""Public, embeddable API of fastedge's compiled core.

    from fastedge.core import LRUCache, TokenBucket, SlidingWindow, HashRing, PrefixRouter
    from fastedge.core import siphash128, siphash64

``USING_EXTENSIONS`` is ``True`` when the compiled (Cython) implementations are loaded and
``False`` when the pure-Python twins serve (``FASTEDGE_NO_EXTENSIONS=1`` or no build).
See docs/core.md.
"""

from __future__ import annotations

from fastedge._core import (
    USING_EXTENSIONS,
    HashRing,
    LRUCache,
    PrefixRouter,
    SlidingWindow,
    TokenBucket,
    siphash64,
    siphash128,
)

__all__ = [
    "USING_EXTENSIONS",
    "HashRing",
    "LRUCache",
    "PrefixRouter",
    "SlidingWindow",
    "TokenBucket",
    "siphash64",
    "siphash128",
]
