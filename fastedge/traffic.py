"""Blue-green traffic splits and feature flags: the model and the process-wide store.

No proxy code lives here: the filters (:mod:`fastedge.filters.traffic`) read the store on
every request, the admin API (:mod:`fastedge.admin.traffic`) changes it, and a state
backend (:mod:`fastedge.traffic_sync`) persists it (a local file) or shares it between
instances (Redis).

**Splits** (``[traffic.NAME]``) map named versions to upstreams with integer weights.
Each request picks a version by a *random weighted pick*: one ``random()`` and a
``bisect`` over the cumulative weights. We chose it over smooth weighted round robin
(what ``round_robin`` upstreams use) because a pick then needs no state at all: a
:class:`Split` is immutable, so a weight change is one swap of the object in the store's
dict and no request can ever see half of a change, nothing has to be reset or locked, and
instances need not agree on a position in a sequence. The price is sampling noise over
short windows (a 1% canary may see none of the first 50 requests); over many requests the
shares converge to the weights, which is what a rollout needs.

**Flags** (``[flags.NAME]``) roll a feature out to a percentage of users. A user is *in*
when ``bucket(flag, user) < percent * 100`` where the bucket is BLAKE2b-64 of the user id,
keyed with the flag name, modulo :data:`BUCKETS` (10,000: a resolution of 0.01%). The hash
is stable across processes, machines and releases (never Python's salted ``hash``), and
raising the percentage only adds buckets, so a user who is in at 10% stays in at 20%
(monotonic rollout). Keying by the flag name gives each flag its own, independent cohort.
A request without a user id is *out* of every flag: there is nothing stable to hash, and
"off" is the safe default for an unproven feature.

**Runtime values and config.** The config gives each split's versions (always from the
config: topology is configuration) and *initial* weights and percentages. Runtime changes
(admin ``PUT``) are *overrides* kept in one small JSON document, which the state backend
persists and which wins over the config's initial values, on restart and on reload alike.
An override is re-checked against the current config: versions it does not mention weigh
0 (a version added later starts without traffic); if it names a version the config no
longer has, or leaves every weight at 0, it is ignored (logged) and the config's weights
apply. Flags' percentages override the same way.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from fastedge.observe.metrics import MetricFamily, Metrics

if TYPE_CHECKING:
    from fastedge.config import Config
    from fastedge.filters import Runtime

__all__ = [
    "BUCKETS",
    "MAX_WEIGHT",
    "FlagConfig",
    "Rollout",
    "Split",
    "SplitConfig",
    "StateBackend",
    "TrafficStateConfig",
    "TrafficStore",
    "TrafficUnavailable",
    "UnknownName",
    "check_percent",
    "check_weights",
    "cohort_bucket",
    "in_cohort",
    "make_split",
    "store_for",
]

log = logging.getLogger("fastedge.traffic")

BUCKETS: Final = 10_000
"""Cohort buckets per flag: percentages have a resolution of 0.01."""

MAX_WEIGHT: Final = 1_000_000
"""Largest weight of one version (any scale works: 90/10 and 900/100 are one split)."""

SERVICE: Final = "traffic"
"""The store's name in ``Runtime.services``."""

Document: TypeAlias = dict[str, Any]
"""The overrides document: ``{"format": 1, "splits": {NAME: {"weights": {VERSION: N}}},
"flags": {NAME: {"percent": P}}}`` (plus ``epoch``/``rev`` when it lives in Redis)."""

Labels: TypeAlias = tuple[tuple[str, str], ...]

FORMAT: Final = 1


class UnknownName(LookupError):
    """No split or flag of that name is configured."""


class TrafficUnavailable(Exception):
    """The shared state (Redis) could not take the change; nothing changed."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class SplitConfig:
    """``[traffic.NAME]``: versions (name → upstream, in config order) and their initial
    weights (every version present, not all zero)."""

    name: str
    versions: Mapping[str, str]
    weights: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class FlagConfig:
    """``[flags.NAME]``.

    ``user`` lists where the user id comes from, tried in order: ``header:<name>``
    (lower-cased), ``cookie:<name>`` or ``claim:<name>`` (a claim verified by the route's
    ``auth``). ``upstream`` is where users in the cohort are sent (optional); ``header``
    names a request field that lists the flags a user is in (optional; at least one of
    the two is set).
    """

    name: str
    user: tuple[str, ...]
    percent: int | float = 0
    upstream: str | None = None
    header: str | None = None


@dataclass(frozen=True, slots=True)
class TrafficStateConfig:
    """``[traffic_state]``: where runtime changes persist without ``[redis]``.

    ``file``: ``True`` = ``fastedge-state.json`` beside the config file (in memory when
    the config did not come from a file), ``False`` = in memory only, or a path.
    ``resync_interval``: with ``[redis]``, how often the state is re-read in case a
    pub/sub message was missed.
    """

    file: str | bool = True
    resync_interval: float = 5.0


DEFAULT_STATE_FILE: Final = "fastedge-state.json"


# --------------------------------------------------------------------------- validation


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def check_weights(versions: Sequence[str], raw: object) -> dict[str, int]:
    """Validate a weights object against a split's ``versions``; return every version's
    weight in version order (a version not mentioned weighs 0).

    Raises :class:`ValueError` for a non-object, an unknown version, a weight that is not
    an integer (``10.5``, ``"10"``, ``true``), negative or above :data:`MAX_WEIGHT`, or
    weights that are all zero.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(
            'expected an object of version weights like {"blue": 90, "green": 10}, '
            f"got {_json_type(raw)}"
        )
    known = ", ".join(repr(v) for v in versions)
    for version, weight in raw.items():
        if version not in versions:
            raise ValueError(f"unknown version {version!r} (versions: {known})")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(
                f"weight of {version!r} must be an integer, got {_json_type(weight)} {weight!r}"
            )
        if weight < 0:
            raise ValueError(f"weight of {version!r} must not be negative, got {weight}")
        if weight > MAX_WEIGHT:
            raise ValueError(f"weight of {version!r} must be at most {MAX_WEIGHT}, got {weight}")
    weights = {v: int(raw.get(v, 0)) for v in versions}
    if not any(weights.values()):
        raise ValueError("at least one weight must be positive (all are 0)")
    return weights


def check_percent(raw: object) -> int | float:
    """Validate a flag percentage: a number from 0 to 100 with at most two decimals (the
    resolution of :data:`BUCKETS`). Whole numbers come back as ``int``."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"percent must be a number from 0 to 100, got {_json_type(raw)}")
    if not (math.isfinite(raw) and 0 <= raw <= 100):
        raise ValueError(f"percent must be between 0 and 100, got {raw!r}")
    scaled = raw * (BUCKETS // 100)
    if abs(scaled - round(scaled)) > 1e-6:
        raise ValueError(f"percent has a resolution of 0.01, got {raw!r}")
    return int(raw) if float(raw).is_integer() else float(raw)


# --------------------------------------------------------------------------- runtime values


@dataclass(frozen=True, slots=True, eq=False)
class Split:
    """One split's current weights. Immutable: a change builds a new ``Split`` and the
    store swaps it in whole (see the module docstring). Build with :func:`make_split`."""

    name: str
    versions: tuple[str, ...]
    weights: tuple[int, ...]
    total: int
    # Cumulative weights without the last: bisect_right(bounds, x) for x in [0, total)
    # is the chosen index, and never lands on a zero-weight version.
    bounds: tuple[int, ...]
    only: int  # the index of the one version with weight, or -1 (then draw)
    labels: tuple[Labels, ...]  # per version: the request counter's labels
    rng: Callable[[], float] = field(repr=False)

    def pick(self) -> int:
        """The index (into :attr:`versions`) of the version for one request."""
        only = self.only
        if only >= 0:
            return only
        return bisect_right(self.bounds, self.rng() * self.total)

    def weights_dict(self) -> dict[str, int]:
        """``{"blue": 90, "green": 10}``, in version order."""
        return dict(zip(self.versions, self.weights, strict=True))


def make_split(
    name: str,
    weights: Mapping[str, int],
    *,
    rng: Callable[[], float] = random.random,
) -> Split:
    """A :class:`Split` from validated weights (see :func:`check_weights`), in their
    order. ``rng`` returns floats in ``[0, 1)``; tests inject a seeded one."""
    versions = tuple(weights)
    values = tuple(weights[v] for v in versions)
    total = sum(values)
    if total <= 0:
        raise ValueError("at least one weight must be positive")
    cumulative: list[int] = []
    running = 0
    for w in values[:-1]:
        running += w
        cumulative.append(running)
    positive = [i for i, w in enumerate(values) if w > 0]
    return Split(
        name=name,
        versions=versions,
        weights=values,
        total=total,
        bounds=tuple(cumulative),
        only=positive[0] if len(positive) == 1 else -1,
        labels=tuple((("split", name), ("version", v)) for v in versions),
        rng=rng,
    )


def cohort_bucket(flag: str, user_id: bytes) -> int:
    """The user's bucket in ``[0, BUCKETS)`` for ``flag``: BLAKE2b-64 of the user id keyed
    with the flag name (at most 64 bytes), as a big-endian integer, modulo ``BUCKETS``."""
    digest = hashlib.blake2b(user_id, digest_size=8, key=flag.encode()).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def in_cohort(flag: str, user_id: bytes | str, percent: float) -> bool:
    """Whether ``user_id`` is in ``flag``'s cohort at ``percent`` (0-100)."""
    uid = user_id.encode() if isinstance(user_id, str) else user_id
    return cohort_bucket(flag, uid) < round(percent * (BUCKETS // 100))


@dataclass(frozen=True, slots=True, eq=False)
class Rollout:
    """A flag's current percentage. Immutable, swapped whole like :class:`Split`."""

    name: str
    percent: int | float
    threshold: int  # buckets below this are in
    _hasher: Any = field(repr=False)  # blake2b keyed with the name; copied per request

    @classmethod
    def of(cls, name: str, percent: int | float) -> Rollout:
        """The rollout of flag ``name`` at ``percent``."""
        hasher = hashlib.blake2b(digest_size=8, key=name.encode())
        return cls(name, percent, round(percent * (BUCKETS // 100)), hasher)

    def bucket(self, user_id: bytes) -> int:
        """``cohort_bucket(self.name, user_id)``, with the keyed hasher prepared once."""
        h = self._hasher.copy()
        h.update(user_id)
        return int.from_bytes(h.digest(), "big") % BUCKETS

    def includes(self, user_id: bytes) -> bool:
        """Whether ``user_id`` is in the cohort (same as :func:`in_cohort`)."""
        threshold = self.threshold
        if threshold <= 0:
            return False
        if threshold >= BUCKETS:
            return True
        return self.bucket(user_id) < threshold


# --------------------------------------------------------------------------- the store


class StateBackend(Protocol):
    """Where overrides persist or are shared (see :mod:`fastedge.traffic_sync`)."""

    kind: str  # "memory", "file" or "redis"

    def load(self) -> Document | None:
        """The persisted document at startup (``None``: nothing persisted)."""

    def start(self, store: TrafficStore) -> None:
        """Begin background work (the Redis subscription); called once."""

    async def commit(self, store: TrafficStore, change: Callable[[Document], Document]) -> bool:
        """Apply ``change`` (pure: ``old document -> new document``) to the store and
        persist it; whether it was persisted. Raises :class:`TrafficUnavailable` when
        the change could not be made at all."""

    async def aclose(self) -> None:
        """Stop background work and finish pending writes."""


def empty_document() -> Document:
    """A document without overrides."""
    return {"format": FORMAT, "splits": {}, "flags": {}}


def clean_document(raw: object, origin: str) -> Document:
    """A well-formed document from untrusted JSON (a file, Redis): malformed entries are
    dropped with a warning; a wrong ``format`` drops everything."""
    doc = empty_document()
    if raw is None:
        return doc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        log.error("%s: not a fastedge traffic state (format %d); ignored", origin, FORMAT)
        return doc
    for key in ("epoch", "rev"):
        if key in raw:
            doc[key] = raw[key]
    for section, field_name in (("splits", "weights"), ("flags", "percent")):
        entries = raw.get(section, {})
        if not isinstance(entries, dict):
            log.warning("%s: %r is not an object; ignored", origin, section)
            continue
        for name, entry in entries.items():
            if isinstance(name, str) and isinstance(entry, dict) and field_name in entry:
                doc[section][name] = {field_name: entry[field_name]}
            else:
                log.warning("%s: %s entry %r is malformed; ignored", origin, section, name)
    return doc


class _MemoryBackend:
    """No persistence: changes live until the process exits."""

    kind = "memory"

    def load(self) -> Document | None:
        return None

    def start(self, store: TrafficStore) -> None:
        pass

    async def commit(self, store: TrafficStore, change: Callable[[Document], Document]) -> bool:
        store.apply_document(change(store.document()))
        return False

    async def aclose(self) -> None:
        pass


class TrafficStore:
    """The process-wide splits and flags: what the filters read on every request.

    :attr:`splits` and :attr:`rollouts` map names to immutable values; a change replaces
    one value (or the whole dict) in a single assignment, so a request sees either the
    old or the new value, never a mixture. Lives in ``Runtime.service("traffic")`` so a
    config reload keeps runtime changes.
    """

    def __init__(
        self,
        metrics: Metrics,
        backend: StateBackend | None = None,
        *,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.metrics = metrics
        self.backend: StateBackend = backend or _MemoryBackend()
        self.rng = rng
        self.splits: dict[str, Split] = {}
        self.rollouts: dict[str, Rollout] = {}
        self.split_configs: Mapping[str, SplitConfig] = {}
        self.flag_configs: Mapping[str, FlagConfig] = {}
        # Requests counted by the filters (a dict update per request, exposed at scrape).
        self.split_requests: dict[Labels, int] = {}
        self.flag_requests: dict[Labels, int] = {}
        self._config: object = None
        self._settings: tuple[object, object] | None = None
        self._doc: Document = empty_document()
        self._started = False
        metrics.add_collector(self.collect)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the persisted document and start the backend's background work."""
        if self._started:
            return
        self._started = True
        loaded = self.backend.load()
        if loaded is not None:
            self.apply_document(loaded)
        self.backend.start(self)

    async def aclose(self) -> None:
        """Stop syncing, finish pending writes, unregister the metrics collector."""
        await self.backend.aclose()
        with contextlib.suppress(ValueError):  # closed twice
            self.metrics.remove_collector(self.collect)

    # -- configuration -----------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take the versions and initial values of ``config`` (every config generation
        calls this; the same config object twice is a no-op)."""
        if config is self._config:
            return
        self._config = config
        settings = (config.sections.get("traffic_state"), config.sections.get("redis"))
        if self._settings is None:
            self._settings = settings
        elif settings != self._settings:
            log.warning("[traffic_state] or [redis] changed: takes effect on restart")
            self._settings = settings
        self.split_configs = dict(config.sections.get("traffic") or {})
        self.flag_configs = dict(config.sections.get("flags") or {})
        self._rebuild()

    # -- reading -------------------------------------------------------------------------------

    def document(self) -> Document:
        """A copy of the current overrides document."""
        return copy.deepcopy(self._doc)

    def split(self, name: str) -> tuple[SplitConfig, Split]:
        """The config and current value of split ``name``; :class:`UnknownName` if none."""
        cfg = self.split_configs.get(name)
        current = self.splits.get(name)
        if cfg is None or current is None:
            raise UnknownName(f"no traffic split named {name!r}")
        return cfg, current

    def flag(self, name: str) -> tuple[FlagConfig, Rollout]:
        """The config and current rollout of flag ``name``; :class:`UnknownName` if none."""
        cfg = self.flag_configs.get(name)
        current = self.rollouts.get(name)
        if cfg is None or current is None:
            raise UnknownName(f"no feature flag named {name!r}")
        return cfg, current

    # -- changing ------------------------------------------------------------------------------

    async def set_weights(self, name: str, raw: object) -> tuple[Split, bool]:
        """Validate and apply new weights for split ``name``: ``(split, persisted)``.

        Raises :class:`UnknownName`, :class:`ValueError` (invalid; nothing changed) or
        :class:`TrafficUnavailable` (Redis could not take it; nothing changed).
        """
        cfg, _ = self.split(name)
        weights = check_weights(tuple(cfg.versions), raw)

        def change(doc: Document) -> Document:
            new = copy.deepcopy(doc)
            new.setdefault("splits", {})[name] = {"weights": weights}
            return new

        persisted = await self.backend.commit(self, change)
        return self.split(name)[1], persisted

    async def set_percent(self, name: str, raw: object) -> tuple[Rollout, bool]:
        """Validate and apply a new percentage for flag ``name``: ``(rollout, persisted)``.
        Raises like :meth:`set_weights`."""
        self.flag(name)
        percent = check_percent(raw)

        def change(doc: Document) -> Document:
            new = copy.deepcopy(doc)
            new.setdefault("flags", {})[name] = {"percent": percent}
            return new

        persisted = await self.backend.commit(self, change)
        return self.flag(name)[1], persisted

    def apply_document(self, doc: Document) -> None:
        """Replace the overrides (a change, a loaded file, a Redis update) and rebuild."""
        self._doc = clean_document(doc, "traffic state")
        self._rebuild()

    def _rebuild(self) -> None:
        splits: dict[str, Split] = {}
        overrides = self._doc.get("splits", {})
        for name, cfg in self.split_configs.items():
            weights: Mapping[str, int] = cfg.weights
            override = overrides.get(name)
            if override is not None:
                try:
                    weights = check_weights(tuple(cfg.versions), override.get("weights"))
                except ValueError as exc:
                    log.warning(
                        "traffic split %r: the runtime weights do not fit the config (%s); "
                        "using the config's weights",
                        name,
                        exc,
                    )
            splits[name] = self._reuse(name, weights)
        rollouts: dict[str, Rollout] = {}
        flag_overrides = self._doc.get("flags", {})
        for name, fcfg in self.flag_configs.items():
            percent = fcfg.percent
            override = flag_overrides.get(name)
            if override is not None:
                try:
                    percent = check_percent(override.get("percent"))
                except ValueError as exc:
                    log.warning("flag %r: ignoring the runtime percent (%s)", name, exc)
            old = self.rollouts.get(name)
            if old is None or old.percent != percent:
                old = Rollout.of(name, percent)
            rollouts[name] = old
        # One assignment each: a request reads either the old or the new dict.
        self.splits = splits
        self.rollouts = rollouts

    def _reuse(self, name: str, weights: Mapping[str, int]) -> Split:
        old = self.splits.get(name)
        if old is not None and old.weights_dict() == dict(weights):
            return old  # unchanged: keep the object (and its identity)
        return make_split(name, weights, rng=self.rng)

    # -- metrics -------------------------------------------------------------------------------

    def collect(self) -> list[MetricFamily]:
        """Gauges of the current weights and percentages, and the request counters."""
        weights = [
            ("fastedge_traffic_weight", {"split": s.name, "version": v}, float(w))
            for s in self.splits.values()
            for v, w in zip(s.versions, s.weights, strict=True)
        ]
        percents = [
            ("fastedge_flag_percent", {"flag": r.name}, float(r.percent))
            for r in self.rollouts.values()
        ]
        return [
            MetricFamily(
                "fastedge_traffic_weight",
                "gauge",
                "Current weight of each version of a traffic split.",
                weights,
            ),
            MetricFamily(
                "fastedge_flag_percent",
                "gauge",
                "Current rollout percentage of each feature flag.",
                percents,
            ),
            MetricFamily(
                "fastedge_traffic_requests_total",
                "counter",
                "Requests sent to each version of a traffic split.",
                [("fastedge_traffic_requests_total", k, v) for k, v in self.split_requests.items()],
            ),
            MetricFamily(
                "fastedge_flag_requests_total",
                "counter",
                "Requests evaluated by each feature flag, by cohort (in or out).",
                [("fastedge_flag_requests_total", k, v) for k, v in self.flag_requests.items()],
            ),
        ]


def store_for(runtime: Runtime, config: Config) -> TrafficStore | None:
    """The process's store, configured for ``config``; created on first use. ``None``
    when no store exists yet and ``config`` defines no split or flag."""
    store: TrafficStore | None = runtime.services.get(SERVICE)
    if store is None:
        if not config.sections.get("traffic") and not config.sections.get("flags"):
            return None
        from fastedge.traffic_sync import open_backend

        def factory() -> TrafficStore:
            return TrafficStore(runtime.metrics, open_backend(config, runtime))

        store = runtime.service(SERVICE, factory)
        assert store is not None
        store.configure(config)
        store.start()
        return store
    store.configure(config)
    return store
