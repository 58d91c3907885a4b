"""What the express lane reads of an upstream per request, as C fields.

:class:`fastedge.gateway.Upstream` is a Python class: each of its attributes the lane
read per request (whether the lane may take it, its balancer, its response timeout, its
resilient tier ...) was a generic attribute lookup, about ten per request, a fifth of the
lane's own time in ``perf`` (session 18). The upstream keeps one :class:`ExpressView`
for its lifetime and updates it in place whenever those attributes change
(``Upstream._install``: construction and ``set_targets``), so the compiled proxy
(``fastedge/proxy.pxd`` cimports it) holds it in its express routes and reads C fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any  # noqa: F401 (type comments below)

if TYPE_CHECKING:
    from fastedge.upstream.resilient_tier import ResilientTier  # noqa: F401


class ExpressView:
    """The lane's per-request view of one upstream (see the module docstring).

    ``express``: the lane may take its requests; ``plain``: the balancer's pick and
    nothing else; ``resilient``, ``keyed``, ``load_aware``, ``verdicts`` (breaker,
    outlier detection or retries report verdicts), ``p2c`` (the balancer observes
    latencies): the upstream's flags of the same names; ``host_field``: its own Host
    line or ``None``; ``balancer``, ``tier`` (its ResilientTier or ``None``),
    ``response_timeout`` in seconds.
    """

    __slots__ = (
        "balancer",
        "express",
        "host_field",
        "keyed",
        "load_aware",
        "p2c",
        "plain",
        "resilient",
        "response_timeout",
        "tier",
        "verdicts",
    )

    def __init__(self) -> None:
        # Types in express_view.pxd (annotations here would clash with it).
        self.express = False
        self.plain = False
        self.resilient = False
        self.keyed = False
        self.load_aware = False
        self.verdicts = False
        self.p2c = False
        self.host_field = None  # type: bytes | None
        self.balancer = None  # type: Any
        self.tier = None  # type: ResilientTier | None
        self.response_timeout = 0.0
