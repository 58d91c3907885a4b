"""The compiled core and its pure-Python twins; this module alone chooses between them.

Each component exists twice with one API (the aio-libs/multidict way):
``router.pyx`` (compiled) and ``router_py.py`` (pure Python, the readable specification),
likewise ``lru``, ``ratelimit``, ``hashring``, ``siphash`` (the auth token cache's
keys) and ``express`` (the data path's express lane scanners).
``FASTEDGE_NO_EXTENSIONS=1`` forces the Python twins; ``USING_EXTENSIONS`` says whether
every compiled module was loaded.

``edgeio`` (fastedge's own epoll transports) is the exception: it has no twin, because
the event loop's own transports are its fallback and reference; ``fastedge.transports``
chooses between them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

NO_EXTENSIONS: bool = os.environ.get("FASTEDGE_NO_EXTENSIONS", "") not in ("", "0")

if TYPE_CHECKING:  # the .pyi stubs of the compiled modules are the typed contract
    from .express import ExpressRequest as ExpressRequest
    from .express import new_request_id as new_request_id
    from .express import new_root_trace as new_root_trace
    from .express import scan_request as scan_request
    from .express import scan_response as scan_response
    from .express import scan_response_start as scan_response_start
    from .hashring import HashRing as HashRing
    from .lru import LRUCache as LRUCache
    from .ratelimit import SlidingWindow as SlidingWindow
    from .ratelimit import TokenBucket as TokenBucket
    from .router import PrefixRouter as PrefixRouter
    from .siphash import siphash64 as siphash64
    from .siphash import siphash128 as siphash128

    USING_EXTENSIONS: bool
else:
    USING_EXTENSIONS = False
    if not NO_EXTENSIONS:
        try:
            from .express import (
                ExpressRequest,
                new_request_id,
                new_root_trace,
                scan_request,
                scan_response,
                scan_response_start,
            )
            from .hashring import HashRing
            from .lru import LRUCache
            from .ratelimit import SlidingWindow, TokenBucket
            from .router import PrefixRouter
            from .siphash import siphash64, siphash128

            USING_EXTENSIONS = True
        except ImportError:  # not compiled (e.g. a source checkout without build_ext)
            USING_EXTENSIONS = False
    if not USING_EXTENSIONS:
        from .express_py import (
            ExpressRequest,
            new_request_id,
            new_root_trace,
            scan_request,
            scan_response,
            scan_response_start,
        )
        from .hashring_py import HashRing
        from .lru_py import LRUCache
        from .ratelimit_py import SlidingWindow, TokenBucket
        from .router_py import PrefixRouter
        from .siphash_py import siphash64, siphash128

__all__ = [
    "NO_EXTENSIONS",
    "USING_EXTENSIONS",
    "ExpressRequest",
    "HashRing",
    "LRUCache",
    "PrefixRouter",
    "SlidingWindow",
    "TokenBucket",
    "new_request_id",
    "new_root_trace",
    "scan_request",
    "scan_response",
    "scan_response_start",
    "siphash64",
    "siphash128",
]
