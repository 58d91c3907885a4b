"""Policy filters on the proxy's express lane: the context they decide on, and the order.

The express lane (``fastedge.proxy``, *The express lane* in docs/architecture.md) scans a
plain GET/HEAD in C and sends it upstream without the general path's exchange, header
lists or :class:`~fastedge.filters.FilterContext`. A route with policy filters can take
it too when every filter can decide such a request from memory (:class:`ExpressPolicy`):
JWT auth from its verification cache, a local rate limit. This module is compiled with
the data path (setup.py) since it runs for each such request.
"""

from __future__ import annotations

from typing import Any, Protocol  # noqa: F401 (Any is used in type comments)

__all__ = ["ExpressContext", "ExpressPolicy", "ExpressPolicyBase", "admit"]


class ExpressContext:
    """What policy filters see of a request on the proxy's express lane (see
    :class:`ExpressPolicy`): the scanned request and what the policies decided.

    It answers the questions a rate-limit key asks of a :class:`FilterContext`
    (``client_ip``, ``route``, ``claims``, ``header()``), and collects what the request
    sent upstream must lose (``drop``: lower-case field names) and gain (``fields``, the
    same as whole lines in ``extra``). ``memo`` is a dict that lives as long as the
    verified credential, for values derived from its claims alone (a rate-limit key).
    """

    __slots__ = (
        "auth",
        "claims",
        "client_ip",
        "drop",
        "extra",
        "fields",
        "memo",
        "request",
        "route",
    )

    # Compiled, a C struct (express.pxd): the lane makes one per request, and the
    # policies read and extend it without dictionary lookups.
    def __init__(self, request, client_ip, route):  # type: (Any, bytes, str) -> None
        # Types as comments: annotations here would clash with express.pxd.
        self.request = request  # fastedge._core.ExpressRequest
        self.client_ip = client_ip
        self.route = route
        # Set by auth's check: the verified claims, and its entry (until its apply).
        self.claims = None  # type: dict[str, Any] | None
        self.auth = None  # type: Any
        # Values derived from the verified claims alone, kept with them by auth
        # (Verified.memo) so that later policies compute them once per token.
        self.memo = None  # type: dict[Any, Any] | None
        self.drop = ()  # type: tuple[bytes, ...]
        self.fields = ()  # type: tuple[tuple[bytes, bytes], ...]
        self.extra = b""

    def header(self, name: bytes) -> bytes | None:
        """The client's first field named ``name`` (lower-case), or ``None``."""
        fields: list[tuple[bytes, bytes]] = self.request.headers()
        for n, v in fields:
            if n == name:
                return v
        return None


class ExpressPolicy(Protocol):
    """A filter that can decide a plain request on the proxy's express lane.

    A filter offers it by setting ``express_ready`` (per route, at build time: a local
    rate limit can, a Redis one cannot). The lane asks every filter of the chain, in
    order, ``express_check(x)``, then calls ``express_apply(x)`` on each. ``False`` from a
    check sends the request to the general path, which runs ``on_request`` as usual, so a
    check that says ``False`` must leave no trace (nothing counted, nothing consumed), and
    one that says ``True`` must mean that ``on_request`` would let the request through.
    Side effects belong in ``express_apply`` (counters, the fields to drop and add),
    except for a filter whose decision *is* its side effect (a limiter taking a token):
    it sets ``express_consumes`` and may only be the chain's last filter. The request
    sent upstream must be byte for byte what the general path would send.
    """

    express_ready: bool
    express_consumes: bool

    def express_check(self, x: ExpressContext) -> bool: ...

    def express_apply(self, x: ExpressContext) -> None: ...


class ExpressPolicyBase:
    """A base for :class:`ExpressPolicy` filters that :func:`admit` calls as C calls:
    compiled, it is a C struct whose ``express_check`` and ``express_apply`` are C
    methods (express.pxd), and a filter deriving from it in a compiled module with its
    own declarations (auth's, the rate limit's) overrides them as C methods too. A filter
    that only implements the protocol is called the Python way.

    On its own it is the policy that decides nothing on the lane: its check declines
    every request (the general path's ``on_request`` then decides, as for any refusal),
    and its apply changes nothing."""

    __slots__ = ()

    def express_check(self, x: ExpressContext) -> bool:
        """Decline: the general path decides (see :class:`ExpressPolicy`)."""
        return False

    def express_apply(self, x: ExpressContext) -> None:
        """Nothing to add or drop (see :class:`ExpressPolicy`)."""


# A type comment: the compiled build declares admit cpdef in express.pxd.
def admit(filters, request, client_ip, route):  # type: (tuple[ExpressPolicy, ...], Any, bytes, str) -> ExpressContext | None
    """Decide ``request`` on the express lane: every filter's check in order, then every
    filter's apply; the decisions, or ``None`` for the general path (nothing happened).

    A route's :class:`~fastedge.filters.FilterChain` offers this as ``express_admit``
    when all its filters are :class:`ExpressPolicy` ones.
    """
    x = ExpressContext(request, client_ip, route)
    for f in filters:
        if isinstance(f, ExpressPolicyBase):
            p = f  # compiled: typed ExpressPolicyBase (express.pxd), so a C call
            if not p.express_check(x):
                return None
        elif not f.express_check(x):
            return None
    for f in filters:
        if isinstance(f, ExpressPolicyBase):
            p = f
            p.express_apply(x)
        else:
            f.express_apply(x)
    return x
