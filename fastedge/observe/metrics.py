"""Prometheus metrics: cheap recording on the hot path, aggregation at scrape time.

Recording a request is a handful of dict and list operations (no locks, no label objects,
no string formatting): fastedge runs one event loop per process, so plain ``dict`` and
``int`` updates are safe, and everything costly — cumulating histogram buckets, escaping
label values, formatting numbers — happens in :meth:`Metrics.render`, which a scrape calls
every few seconds at most.

Output is the Prometheus text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/): families sorted by name,
samples in a stable order, so two scrapes of the same state are byte-identical.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "Counter",
    "Labels",
    "MetricFamily",
    "MetricType",
    "Metrics",
    "RequestTotals",
    "RouteStats",
    "Sample",
]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of :meth:`Metrics.render` output."""

Labels: TypeAlias = Mapping[str, str] | tuple[tuple[str, str], ...]
"""Label pairs, as a mapping or as a tuple of pairs (hashable; the hot-path form)."""

Sample: TypeAlias = tuple[str, Labels, float]
"""``(sample name, labels, value)``; the name is the family name or, for histograms and
summaries, the family name plus ``_bucket`` / ``_sum`` / ``_count``."""

MetricType: TypeAlias = Literal["counter", "gauge", "histogram", "summary", "untyped"]

DURATION_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the duration histograms: the Prometheus client defaults
(5 ms … 10 s) extended down to 0.5 ms, because a proxy hop is often well below 5 ms."""


# A type comment: the compiled build declares it cpdef on a C double (metrics.pxd).
def _bucket(seconds):  # type: (float) -> int
    """``bisect_left(DURATION_BUCKETS, seconds)``, scanning up from the smallest bound:
    a proxy hop mostly lands in the first buckets, and compiled, the comparisons are C
    doubles (bisect compares Python floats)."""
    i = 0
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return i
        i += 1
    return i


# Methods from RFC 9110 §9 plus PATCH (RFC 5789). Anything else is recorded as "OTHER" so a
# client inventing methods cannot create unbounded label sets.
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

REQUESTS_TOTAL = "fastedge_requests_total"
REQUEST_DURATION = "fastedge_request_duration_seconds"
UPSTREAM_DURATION = "fastedge_upstream_duration_seconds"


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One metric family as a collector reports it at scrape time.

    Example (a pool's gauges)::

        MetricFamily(
            "fastedge_upstream_connections", "gauge", "Pooled upstream connections.",
            [("fastedge_upstream_connections",
              {"upstream": "users", "target": "127.0.0.1:9001", "state": "idle"}, 3)],
        )
    """

    name: str
    type: MetricType
    help: str
    samples: Sequence[Sample]


@dataclass(frozen=True, slots=True)
class RequestTotals:
    """Process-wide request counters at one moment (see :meth:`Metrics.request_totals`).

    ``by_class[k]`` counts ``k``xx answers (index 0: statuses outside 100-599);
    ``duration_buckets[i]`` counts requests that took at most ``DURATION_BUCKETS[i]``
    seconds and more than the previous bound (non-cumulative), the last entry those above
    the last bound; ``duration_sum`` is their total time in seconds.
    """

    requests: int
    by_class: tuple[int, ...]
    duration_buckets: tuple[int, ...]
    duration_sum: float


def _check_metric_name(name: str) -> None:
    if not _METRIC_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")


def _escape_label_value(value: str) -> str:
    # Exposition format: backslash, double quote and line feed are escaped in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    # HELP text escapes only backslash and line feed.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _format_labels(labels: Labels) -> str:
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    if not pairs:
        return ""
    parts = []
    for key, value in pairs:
        if not _LABEL_NAME_RE.fullmatch(key):
            raise ValueError(f"invalid label name {key!r}")
        parts.append(f'{key}="{_escape_label_value(str(value))}"')
    return "{" + ",".join(parts) + "}"


class Counter:
    """One counter series held as a cell (:meth:`Metrics.counter`).

    ``inc()`` adds one without the name and label lookups of :meth:`Metrics.inc`: the
    data path's per-request counters (auth results, rate-limit decisions) take a cell
    once when their filter is built. Compiled, it is a C double behind a C method.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self) -> None:
        """Add one."""
        self.value += 1


# A type comment: the compiled build declares it a C function (metrics.pxd).
def _record(hist, seconds):  # type: (list[Counter], float) -> None
    """Count ``seconds`` in a histogram of cells: one in its bucket, and into the sum."""
    cell = hist[_bucket(seconds)]
    cell.value += 1
    cell = hist[-1]
    cell.value += seconds


class RouteStats:
    """One route's built-in request metrics, held as a cell (:meth:`Metrics.route`).

    ``observe()`` records what :meth:`Metrics.observe_request` records for the route,
    without looking the route up: the proxy's express lane takes each route's cell once
    per config generation. It remembers the last (method, status) series it counted, so
    a run of alike requests (the common case) counts without building a label key.
    Compiled, a C struct behind a C method (metrics.pxd).
    """

    __slots__ = ("_cell", "_method", "_status", "metrics", "name", "total", "upstream")

    def __init__(self, metrics, name):  # type: (Metrics, str) -> None
        # Types as comments: annotations here would clash with metrics.pxd.
        self.metrics = metrics
        self.name = name
        # This route's histograms in metrics._total / metrics._upstream, once it has one:
        # a route appears in a histogram from its first observation.
        self.total = None  # type: list[Counter] | None
        self.upstream = None  # type: list[Counter] | None
        # The series counted last: the method as given, its status, and its cell.
        self._method = None  # type: str | None
        self._status = -1
        self._cell = None  # type: Counter | None

    def observe(self, method, status, total_seconds, upstream_seconds):  # type: (str, int, float, float | None) -> None
        """Record one answered request of this route (see :meth:`Metrics.observe_request`)."""
        cell = self._cell
        if cell is None or status != self._status or method != self._method:
            cell = self._series(method, status)
        cell.value += 1
        hist = self.total
        if hist is None:
            hist = self.total = self.metrics._histogram(self.metrics._total, self.name)
        _record(hist, total_seconds)
        if upstream_seconds is not None:
            hist = self.upstream
            if hist is None:
                hist = self.upstream = self.metrics._histogram(self.metrics._upstream, self.name)
            _record(hist, upstream_seconds)

    def _series(self, method, status):  # type: (str, int) -> Counter
        """The requests cell for (method, status), remembered as the last one."""
        label = method if method in _KNOWN_METHODS else "OTHER"
        requests = self.metrics._requests
        key = (self.name, label, status)
        cell = requests.get(key)
        if cell is None:
            cell = requests[key] = Counter()
        self._method = method
        self._status = status
        self._cell = cell
        return cell


class Metrics:
    """The process's metric registry.

    Built in: ``fastedge_requests_total{route,method,status}`` and the histograms
    ``fastedge_request_duration_seconds{route}`` / ``fastedge_upstream_duration_seconds{route}``
    (via :meth:`observe_request`); free-form counters via :meth:`inc`; anything computed at
    scrape time (gauges such as pool sizes) via :meth:`add_collector`.
    """

    __slots__ = (
        "_cells",
        "_collectors",
        "_counters",
        "_descriptions",
        "_requests",
        "_routes",
        "_total",
        "_upstream",
    )

    def __init__(self) -> None:
        # (route, method, status) -> count, as cells (RouteStats counts through them)
        self._requests: dict[tuple[str, str, int], Counter] = {}
        # route -> its RouteStats (see route())
        self._routes: dict[str, RouteStats] = {}
        # route -> [count per bucket ..., count above the last bound, sum], as cells: a
        # route's RouteStats holds its lists and adds to C doubles, allocating nothing.
        # Buckets are stored non-cumulative and cumulated when rendering.
        self._total: dict[str, list[Counter]] = {}
        self._upstream: dict[str, list[Counter]] = {}
        # name -> {labels -> value}
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        # name -> {labels -> Counter}: the same counters, held as cells (see counter())
        self._cells: dict[str, dict[tuple[tuple[str, str], ...], Counter]] = {}
        self._descriptions: dict[str, tuple[MetricType, str]] = {
            REQUESTS_TOTAL: ("counter", "Requests answered, by route, method and status."),
            REQUEST_DURATION: (
                "histogram",
                "Time from the first request byte to the last response byte, by route.",
            ),
            UPSTREAM_DURATION: (
                "histogram",
                "Time from sending the upstream request to its last response byte, by route.",
            ),
            "fastedge_upstream_errors_total": (
                "counter",
                "Failed upstream exchanges, by upstream and kind of failure.",
            ),
            # Counters the server and proxy record with inc(); described here so a scrape
            # shows real HELP text whichever of them happens first.
            "fastedge_upstream_retries_total": (
                "counter",
                "Upstream attempts made after a failed one (retries and failovers).",
            ),
            "fastedge_client_errors_total": (
                "counter",
                "Malformed or oversized requests answered with an error and closed, by status.",
            ),
            "fastedge_connections_refused_total": (
                "counter",
                "Client connections closed at accept by a connection limit, by reason.",
            ),
            "fastedge_config_reloads_total": (
                "counter",
                "Configuration reloads, by result (success, failure).",
            ),
        }
        self._collectors: list[Callable[[], Iterable[MetricFamily]]] = []

    # -- recording (hot path) ----------------------------------------------------------------

    # A type comment, not annotations: the compiled build declares this method cpdef in
    # metrics.pxd, and Cython refuses annotated arguments that differ from it.
    def observe_request(self, route, method, status, total_seconds, upstream_seconds):  # type: (str, str, int, float, float | None) -> None
        """Record one answered request.

        ``route`` must come from configuration (a route name or prefix, or a fixed
        placeholder for "no route"), never from the raw request path, to keep label sets
        bounded. Unknown methods are recorded as ``"OTHER"``. ``upstream_seconds`` is
        ``None`` when no upstream was contacted (cache hit, 401, 429, ...).
        """
        stats = self._routes.get(route)
        if stats is None:
            stats = self.route(route)
        stats.observe(method, status, total_seconds, upstream_seconds)

    def route(self, route: str) -> RouteStats:
        """The cell :meth:`observe_request` records ``route``'s requests through: record
        with its ``observe()`` to skip the route lookup (the same series either way)."""
        stats = self._routes.get(route)
        if stats is None:
            stats = self._routes[route] = RouteStats(self, route)
        return stats

    def _histogram(self, data, route):  # type: (dict[str, list[Counter]], str) -> list[Counter]
        """``route``'s histogram in ``data`` (``_total`` or ``_upstream``), made empty."""
        hist = data.get(route)
        if hist is None:
            hist = data[route] = [Counter() for _ in range(len(DURATION_BUCKETS) + 2)]
        return hist

    def inc(self, name: str, labels: tuple[tuple[str, str], ...] = (), value: float = 1) -> None:
        """Add ``value`` to counter ``name`` with ``labels`` (a tuple of pairs, in a fixed
        order chosen by the caller). Give it HELP text once with :meth:`describe`."""
        series = self._counters.get(name)
        if series is None:
            _check_metric_name(name)
            series = self._counters[name] = {}
        series[labels] = series.get(labels, 0) + value

    def counter(self, name: str, labels: tuple[tuple[str, str], ...] = ()) -> Counter:
        """Counter ``name`` with ``labels`` as a cell whose ``inc()`` adds one: the same
        series :meth:`inc` adds to (the two are summed when rendered). A series appears
        once it has counted something, as with :meth:`inc`."""
        cells = self._cells.get(name)
        if cells is None:
            _check_metric_name(name)
            cells = self._cells[name] = {}
        cell = cells.get(labels)
        if cell is None:
            cell = cells[labels] = Counter()
        return cell

    # -- registration --------------------------------------------------------------------------

    def describe(self, name: str, type: MetricType, help: str) -> None:
        """Set the HELP text and TYPE of a metric recorded with :meth:`inc`."""
        _check_metric_name(name)
        self._descriptions[name] = (type, help)

    def add_collector(self, fn: Callable[[], Iterable[MetricFamily]]) -> None:
        """Call ``fn`` at every scrape and expose the families it returns.

        A collector that raises is logged and skipped for that scrape; the rest of the
        scrape still succeeds.
        """
        self._collectors.append(fn)

    def remove_collector(self, fn: Callable[[], Iterable[MetricFamily]]) -> None:
        """Stop calling ``fn`` (e.g. when a pool is closed on reload)."""
        self._collectors.remove(fn)

    # -- scraping ------------------------------------------------------------------------------

    def request_totals(self) -> RequestTotals:
        """Every route added up: requests so far, by status class, and the request-duration
        histogram (non-cumulative counts per :data:`DURATION_BUCKETS` bound, then the count
        above the last bound).

        Scrape-level cost (one pass over the series, no collectors run): the admin
        dashboard's sampler calls it once per second and turns the differences between
        two calls into rates and latency quantiles, so the request path pays nothing.
        """
        by_class = [0, 0, 0, 0, 0, 0]  # index = status // 100 (0 for anything odd)
        for (_route, _method, status), cell in self._requests.items():
            cls = status // 100
            by_class[cls if 1 <= cls <= 5 else 0] += int(cell.value)
        buckets = [0] * (len(DURATION_BUCKETS) + 1)
        total_seconds = 0.0
        for hist in self._total.values():
            for i in range(len(buckets)):
                buckets[i] += int(hist[i].value)
            total_seconds += hist[-1].value
        return RequestTotals(sum(by_class), tuple(by_class), tuple(buckets), total_seconds)

    def families(self) -> list[MetricFamily]:
        """Every family, built-in then counters then collected, before sorting."""
        out = [
            self._describe_family(
                REQUESTS_TOTAL,
                [
                    (REQUESTS_TOTAL, (("route", r), ("method", m), ("status", str(s))), n.value)
                    for (r, m, s), n in sorted(self._requests.items())
                ],
            ),
            self._histogram_family(REQUEST_DURATION, self._total),
            self._histogram_family(UPSTREAM_DURATION, self._upstream),
        ]
        names = [*self._counters, *(n for n in self._cells if n not in self._counters)]
        for name in names:
            series: dict[tuple[tuple[str, str], ...], float] = dict(self._counters.get(name, {}))
            for labels, cell in self._cells.get(name, {}).items():
                if cell.value or labels in series:
                    series[labels] = series.get(labels, 0) + cell.value
            if series:
                out.append(
                    self._describe_family(
                        name, [(name, labels, v) for labels, v in sorted(series.items())]
                    )
                )
        for collector in self._collectors:
            try:
                out.extend(collector())
            except Exception:
                logger.exception("metrics collector %r failed", collector)
        return out

    def render(self) -> bytes:
        """The whole registry in Prometheus text format 0.0.4 (see :data:`CONTENT_TYPE`).

        Families are sorted by name; a name reported twice is rendered once (the first
        wins) and the duplicate is logged, since Prometheus rejects repeated families.
        """
        lines: list[str] = []
        seen: set[str] = set()
        for family in sorted(self.families(), key=lambda f: f.name):
            if family.name in seen:
                logger.error("duplicate metric family %s skipped", family.name)
                continue
            seen.add(family.name)
            try:
                body = [
                    f"{name}{_format_labels(labels)} {_format_value(value)}"
                    for name, labels, value in family.samples
                ]
                _check_metric_name(family.name)
            except ValueError:
                logger.exception("metric family %s is malformed; skipped", family.name)
                continue
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.type}")
            lines.extend(body)
        return ("\n".join(lines) + "\n").encode() if lines else b""

    def _describe_family(self, name: str, samples: list[Sample]) -> MetricFamily:
        mtype, help_text = self._descriptions.get(name, ("counter", name.replace("_", " ")))
        return MetricFamily(name, mtype, help_text, samples)

    def _histogram_family(self, name: str, data: dict[str, list[Counter]]) -> MetricFamily:
        samples: list[Sample] = []
        bounds = [_format_value(b) for b in DURATION_BUCKETS] + ["+Inf"]
        for route in sorted(data):
            hist = data[route]
            cumulative = 0
            for bound, count in zip(bounds, hist[:-1], strict=True):
                cumulative += int(count.value)
                samples.append((f"{name}_bucket", (("route", route), ("le", bound)), cumulative))
            samples.append((f"{name}_sum", (("route", route),), hist[-1].value))
            samples.append((f"{name}_count", (("route", route),), cumulative))
        return self._describe_family(name, samples)
