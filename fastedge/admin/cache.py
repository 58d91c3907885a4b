"""Admin endpoints of the edge cache.

==============================================  ===========================================
``GET /cache``                                  per-cache statistics (entries, bytes,
                                                evictions, answers by result, coalescing)
``DELETE /cache?url=<absolute URL>``            purge that URL (every variant, every
                                                upstream a traffic split sent it to)
``DELETE /cache?prefix=<absolute URL prefix>``  purge every stored URL starting with it
``...&cache=<name>``                            only in that cache (default: all of them)
==============================================  ===========================================

URLs are what clients asked for, as the cache keys them: ``scheme://host[:port]/path?query``
with the ``Host`` the client sent (``http://127.0.0.1:8080/api/products``). Scheme and
host are normalised the way keys are (lower case, default port dropped), the path and
query are compared exactly. A purge answers ``{"purged": N, "caches": {name: n}}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from fastedge.admin.api import AdminError, AdminRequest, AdminResponse, Handler
from fastedge.cache.edge import SERVICE, EdgeCache, EdgeCaches
from fastedge.cache.policy import primary_key

if TYPE_CHECKING:
    from fastedge.server import ProxyServer

__all__ = ["admin_routes", "normalise_url"]


def normalise_url(url: str) -> bytes:
    """``url`` as the cache keys it, without the method: ``b"http://host/path?q"``.

    Raises :class:`AdminError` (400) unless it is an absolute ``http``/``https`` URL.
    As a prefix it may stop anywhere in the path (``http://h/api/pro``); without a
    path it covers the whole host (``http://h`` → ``http://h/``).
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise AdminError(400, f"invalid URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise AdminError(400, f"expected an absolute http(s) URL, got {url!r}")
    if parts.fragment:
        raise AdminError(400, "a URL to purge has no #fragment (it is never sent)")
    # An empty path is "/" (RFC 9110 §4.2.3), so a bare-host prefix covers the host.
    path_query = parts.path or "/"
    if parts.query or url.endswith("?"):
        path_query += "?" + parts.query
    key = primary_key(
        b"GET",
        scheme.encode("latin-1"),
        parts.netloc.rpartition("@")[2].encode("latin-1"),
        path_query.encode("latin-1"),
    )
    return key.partition(b" ")[2]


def _selected(caches: dict[str, EdgeCache], name: str | None) -> list[EdgeCache]:
    if name is None:
        return list(caches.values())
    cache = caches.get(name)
    if cache is None:
        known = ", ".join(sorted(caches)) or "none"
        raise AdminError(404, f"no cache named {name!r} (caches: {known})")
    return [cache]


def admin_routes(server: ProxyServer) -> dict[tuple[str, str], Handler]:
    """The cache's admin endpoints (``fastedge.server.ADMIN_EXTENSIONS``)."""

    def registry() -> dict[str, EdgeCache]:
        # The registry exists once a route uses a cache (built with the gateway).
        caches = server.runtime.services.get(SERVICE)
        return caches.caches if isinstance(caches, EdgeCaches) else {}

    async def stats(request: AdminRequest) -> AdminResponse:
        caches = registry()
        return AdminResponse.json(
            {"caches": {name: cache.stats() for name, cache in sorted(caches.items())}}
        )

    async def purge(request: AdminRequest) -> AdminResponse:
        query = parse_qs(request.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"url", "prefix", "cache"})
        if unknown:
            raise AdminError(400, f"unknown parameter {unknown[0]!r} (use url, prefix, cache)")
        for key, values in query.items():
            if len(values) > 1:
                raise AdminError(400, f"parameter {key!r} given more than once")
        url = query.get("url", [None])[0]
        prefix = query.get("prefix", [None])[0]
        if (url is None) == (prefix is None):
            raise AdminError(400, "give exactly one of url=<absolute URL> or prefix=<URL prefix>")
        selected = _selected(registry(), query.get("cache", [None])[0])
        counts: dict[str, int] = {}
        if url is not None:
            target = normalise_url(url)
            for cache in selected:
                store = cache.store
                n = store.purge(b"GET " + target) + store.purge(b"HEAD " + target)
                # Variants a traffic split or flag sent to another upstream: "<url> @name".
                n += store.purge_prefix(target + b" @")
                counts[cache.name] = n
        else:
            assert prefix is not None
            target = normalise_url(prefix)
            for cache in selected:
                counts[cache.name] = cache.store.purge_prefix(target)
        return AdminResponse.json({"purged": sum(counts.values()), "caches": counts})

    return {("GET", "/cache"): stats, ("DELETE", "/cache"): purge}
