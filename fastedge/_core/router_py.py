"""PrefixRouter, pure-Python twin of ``router.pyx``: the readable specification.

Maps a request's (path, host, method) to the value of the most specific route.

Matching rules (both implementations follow them exactly):

* **Prefixes match on ``/`` segment boundaries.** A route for ``/api/users`` matches
  ``/api/users``, ``/api/users/`` and ``/api/users/42``, never ``/api/usersfoo``. A
  trailing ``/`` on a registered prefix is dropped (``/api/`` is ``/api``); ``/`` matches
  every path. The path is given without its query string; a path that does not start
  with ``/`` (``*``, absolute-form) matches nothing. Matching is case-sensitive and
  byte-exact: callers normalise (percent-decoding, dot segments) before matching.
* **Host first, then the longest prefix** — the nginx ``server_name`` / Envoy virtual
  host order. The routes of the exact host are tried first (longest prefix wins among
  them), then those of the wildcard hosts from the most specific (``*.b.example.com``)
  to the least (``*.com``), then the routes registered without a host. A tier with no
  matching route falls through to the next. Hosts compare case-insensitively, with any
  ``:port`` and a trailing ``.`` ignored (RFC 9110 §4.2.3, RFC 1034 §3.1);
  ``*.example.com`` matches any name below ``example.com`` but not ``example.com``.
* **Methods narrow.** A route added with ``methods={"GET"}`` matches only ``GET``; a
  request with another method falls through to a route without a method filter at the
  same prefix, then to shorter prefixes. Method names are case-sensitive
  (RFC 9110 §9.1). ``match(..., method=None)`` considers only routes without a filter.
* **Adding replaces.** Adding the same (prefix, host) again replaces the route for the
  methods it names: with ``methods=None`` the unfiltered route, otherwise each listed
  method's binding. So routes with disjoint method sets coexist, and overlapping ones
  are taken over method by method by the newest.

Cost: one dict probe per ``/`` boundary of the path that is no longer than the longest
registered prefix of the tier — O(path length), independent of the number of routes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["PrefixRouter"]


def _normalize_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
    if not prefix.startswith("/"):
        raise ValueError(f"prefix must start with '/', got {prefix!r}")
    if "?" in prefix or "#" in prefix:
        raise ValueError(f"prefix must be a path without query or fragment, got {prefix!r}")
    return prefix.rstrip("/") or "/"


def _normalize_host(host: str) -> str:
    """Lower-case, without ``:port`` and without a trailing dot."""
    host = host.lower()
    if host.startswith("["):  # IPv6 literal: the port, if any, follows the "]"
        end = host.find("]")
        if end != -1:
            host = host[: end + 1]
    else:
        colon = host.rfind(":")
        if colon != -1:
            host = host[:colon]
    if host.endswith("."):
        host = host[:-1]
    return host


def _route_host(host: object) -> tuple[bool, str]:
    """``(is_wildcard, key)`` of a host given to ``add``/``remove``; a wildcard's key is
    its suffix with the leading dot (``*.example.com`` -> ``.example.com``)."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str or None, not {type(host).__name__}")
    name = _normalize_host(host)
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[1:]
    if "*" in name or name in ("", ".") or (name.startswith(".") and not wildcard):
        raise ValueError(
            f"host must be a name or '*.suffix' (use host=None for any host), got {host!r}"
        )
    return wildcard, name


def _check_methods(methods: object) -> frozenset[str] | None:
    if methods is None:
        return None
    if isinstance(methods, str) or not isinstance(methods, Iterable):
        raise TypeError('methods must be an iterable of str such as {"GET"}, or None')
    names = frozenset(methods)
    if not names:
        raise ValueError("methods must not be empty (use None for every method)")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"each method must be a non-empty str, got {name!r}")
    return names


class _RouteSet:
    """The routes of one (prefix, host): one per method plus an unfiltered one.

    Results are stored as ready-made ``(value, prefix)`` tuples so a match allocates
    nothing.
    """

    __slots__ = ("any", "by_method")

    def __init__(self) -> None:
        self.any: tuple[Any, str] | None = None
        self.by_method: dict[str, tuple[Any, str]] = {}

    def lookup(self, method: str | None) -> tuple[Any, str] | None:
        if method is not None and self.by_method:
            found = self.by_method.get(method)
            if found is not None:
                return found
        return self.any


class _Table:
    """The routes of one host tier entry, keyed by normalised prefix."""

    __slots__ = ("max_len", "routes")

    def __init__(self) -> None:
        self.routes: dict[str, _RouteSet] = {}
        # Longest registered prefix other than "/": longer path prefixes are not probed.
        self.max_len = 0

    def probe(self, path: str, method: str | None) -> tuple[Any, str] | None:
        """The most specific route for ``path`` (which starts with "/") in this table."""
        routes = self.routes
        n = len(path)
        if n <= self.max_len:
            found = self._lookup(path, method)
            if found is not None:
                return found
        # Every other candidate is path[:j] with path[j] == "/", longest first; j == 1
        # would give "/", which is probed once at the end.
        j = min(n - 1, self.max_len)
        while j > 1:
            if path[j] == "/":
                found = self._lookup(path[:j], method)
                if found is not None:
                    return found
            j -= 1
        root = routes.get("/")
        return None if root is None else root.lookup(method)

    def _lookup(self, prefix: str, method: str | None) -> tuple[Any, str] | None:
        entry = self.routes.get(prefix)
        return None if entry is None else entry.lookup(method)

    def recompute_max_len(self) -> None:
        self.max_len = max((len(p) for p in self.routes if p != "/"), default=0)


class PrefixRouter:
    """Longest-prefix router with host and method filters; see the module docstring."""

    __slots__ = ("_any", "_count", "_exact", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, _Table] = {}
        self._wild: dict[str, _Table] = {}
        self._any = _Table()
        self._count = 0

    def _table(self, host: object, create: bool) -> _Table | None:
        if host is None:
            return self._any
        wildcard, key = _route_host(host)
        tier = self._wild if wildcard else self._exact
        table = tier.get(key)
        if table is None and create:
            table = tier[key] = _Table()
        return table

    def add(
        self,
        prefix: str,
        value: Any,
        *,
        host: str | None = None,
        methods: Iterable[str] | None = None,
    ) -> None:
        """Route ``prefix`` (optionally only for ``host`` and ``methods``) to ``value``.

        ``host`` is an exact name or ``*.suffix``; ``methods`` an iterable of method
        names. Adding an existing (prefix, host) replaces it for the given methods.
        """
        key = _normalize_prefix(prefix)
        names = _check_methods(methods)
        table = self._table(host, create=True)
        assert table is not None
        entry = table.routes.get(key)
        if entry is None:
            entry = table.routes[key] = _RouteSet()
            self._count += 1
            if key != "/" and len(key) > table.max_len:
                table.max_len = len(key)
        result = (value, key)
        if names is None:
            entry.any = result
        else:
            for name in names:
                entry.by_method[name] = result

    def remove(self, prefix: str, *, host: str | None = None) -> None:
        """Remove every route of (prefix, host); ``KeyError`` if there is none."""
        key = _normalize_prefix(prefix)
        table = self._table(host, create=False)
        if table is None or key not in table.routes:
            raise KeyError((prefix, host))
        del table.routes[key]
        self._count -= 1
        table.recompute_max_len()
        if not table.routes and host is not None:
            wildcard, name = _route_host(host)
            del (self._wild if wildcard else self._exact)[name]

    def match(
        self, path: str, host: str | None = None, method: str | None = None
    ) -> tuple[Any, str] | None:
        """``(value, matched_prefix)`` of the most specific route, or ``None``.

        ``matched_prefix`` is the normalised prefix (no trailing ``/``), ready for
        stripping from ``path``.
        """
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, not {type(path).__name__}")
        if host is not None and not isinstance(host, str):
            raise TypeError(f"host must be a str or None, not {type(host).__name__}")
        if method is not None and not isinstance(method, str):
            raise TypeError(f"method must be a str or None, not {type(method).__name__}")
        if not path.startswith("/"):
            return None
        # Host tiers are consulted only when host-specific routes exist, so a router
        # without them pays nothing for the host argument.
        if host is not None and (self._exact or self._wild):
            name = _normalize_host(host)
            table = self._exact.get(name)
            if table is not None:
                found = table.probe(path, method)
                if found is not None:
                    return found
            if self._wild:
                # ".b.example.com", then ".example.com", then ".com": most specific first.
                dot = name.find(".", 1)
                while dot != -1:
                    table = self._wild.get(name[dot:])
                    if table is not None:
                        found = table.probe(path, method)
                        if found is not None:
                            return found
                    dot = name.find(".", dot + 1)
        return self._any.probe(path, method)

    def __len__(self) -> int:
        """The number of (prefix, host) pairs with at least one route."""
        return self._count

    def __repr__(self) -> str:
        return f"<PrefixRouter routes={self._count}>"
