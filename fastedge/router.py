"""Service routing: request path (and host, method) → route → upstream, plus path rewriting.

Matching is the compiled core's :class:`~fastedge.core.PrefixRouter` (longest prefix on
``/`` segment boundaries; exact host beats wildcard beats any host; method filters
narrow). This module turns config routes into router entries and rewrites the forwarded
request-target (``strip_prefix``/``rewrite``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from fastedge.core import PrefixRouter

if TYPE_CHECKING:
    from fastedge.filters import FilterChain

U = TypeVar("U")


@dataclass(slots=True, eq=False)
class Route(Generic[U]):
    """One configured route, resolved: its upstream object is attached."""

    name: str
    prefix: str
    upstream: U
    strip_prefix: bool = False
    rewrite: str | None = None
    host: str | None = None
    methods: frozenset[str] | None = None
    filters: FilterChain | None = None  # policy filters (auth, rate limits); None = none
    prefix_len: int = field(init=False)
    rewrite_bytes: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        # A prefix "/" or "/x/" contributes no characters past its last segment boundary;
        # the path remainder after it must still start with "/".
        self.prefix_len = len(self.prefix.rstrip("/"))
        self.rewrite_bytes = self.rewrite.rstrip("/").encode() if self.rewrite else None

    def forward_target(self, path: bytes, query: bytes) -> bytes:
        """The request-target sent upstream for a request whose path matched this route.

        ``/api/users/42?x=1`` with prefix ``/api/users``: strip → ``/42?x=1``; rewrite to
        ``/v2`` → ``/v2/42?x=1``; neither → unchanged.
        """
        if not self.strip_prefix and self.rewrite_bytes is None:
            return path + query
        rest = path[self.prefix_len :]  # "" or "/..." (the match is on a segment boundary)
        if self.rewrite_bytes is not None:
            rest = self.rewrite_bytes + rest
        if not rest:
            rest = b"/"
        return rest + query


class Router(Generic[U]):
    """Routes of one config generation, matched through the compiled core."""

    __slots__ = ("_router", "routes")

    def __init__(self, routes: list[Route[U]]) -> None:
        self.routes = routes
        self._router = PrefixRouter()
        for route in routes:
            self._router.add(route.prefix, route, host=route.host, methods=route.methods)

    @property
    def prefix_router(self) -> PrefixRouter:
        """The compiled router: its ``match`` returns ``(route, prefix)`` or ``None``."""
        return self._router

    def match(self, path: str, host: str | None, method: str) -> Route[U] | None:
        """The route for this request, or ``None`` (answered 404)."""
        found = self._router.match(path, host, method)
        if found is None:
            return None
        route: Route[U] = found[0]
        return route
