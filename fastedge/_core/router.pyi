"""Typed contract of the compiled ``PrefixRouter`` (``router.pyx``); ``router_py.py`` is
the readable specification (full matching rules in its docstring) and behaves identically.

* Prefixes match on ``/`` segment boundaries; the longest wins; ``/`` matches every path
  that starts with ``/``; a trailing ``/`` on a registered prefix is ignored.
* Host tiers first: the exact host, then wildcards (``*.b.example.com`` before
  ``*.example.com``), then routes without a host; each tier falls through when it has no
  match. Hosts compare case-insensitively, ignoring ``:port`` and a trailing dot.
* ``methods`` narrow a route; a request with another method (or ``method=None``) falls
  through to the unfiltered route at the same prefix, then to shorter prefixes.
* ``match`` costs O(len(path)), independent of the number of routes.
"""

from collections.abc import Iterable
from typing import Any

__all__ = ["PrefixRouter"]

class PrefixRouter:
    """Longest-prefix router with host and method filters."""

    def __init__(self) -> None: ...
    def add(
        self,
        prefix: str,
        value: Any,
        *,
        host: str | None = None,
        methods: Iterable[str] | None = None,
    ) -> None:
        """Route ``prefix`` (optionally only for ``host`` and ``methods``) to ``value``.

        ``prefix`` must be a ``str`` starting with ``/`` without ``?``/``#``
        (``TypeError``/``ValueError``). ``host`` is a name or ``*.suffix``. Adding an
        existing (prefix, host) replaces it for the given methods (``None``: the
        unfiltered route), so disjoint method sets coexist.
        """
    def remove(self, prefix: str, *, host: str | None = None) -> None:
        """Remove every route of (prefix, host); ``KeyError`` if there is none."""
    def match(
        self, path: str, host: str | None = None, method: str | None = None
    ) -> tuple[Any, str] | None:
        """``(value, matched_prefix)`` of the most specific route, or ``None``.

        ``path`` is the request path without query; ``matched_prefix`` is normalised
        (no trailing ``/``, except the root ``/``).
        """
    def __len__(self) -> int:
        """The number of (prefix, host) pairs with at least one route."""
