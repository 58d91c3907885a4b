"""The ``traffic`` and ``flags`` route filters, and their config sections.

* ``traffic = "<split>"`` picks a version of the split ``[traffic.<split>]`` for each
  request (by the split's current weights) and sends the request to that version's
  upstream (``ctx.upstream``).
* ``flags = ["new-pricing", ...]`` evaluates each ``[flags.<name>]`` for the request's
  user. For a user in the cohort, a flag with ``upstream`` sends the request there (the
  first such flag in the route's list wins, and it wins over ``traffic``, which runs
  before), and a flag with ``header`` adds its name to that request field
  (``X-Feature-Flags: new-pricing,dark-mode``, comma-joined in the route's order).
  Client-sent copies of every flag header of the route are always removed first, so a
  client cannot switch a feature on for itself by sending the header.

Both read the process-wide :class:`fastedge.traffic.TrafficStore` (one dict lookup; the
values are immutable and swapped whole by the admin API or a Redis update) and record
the choice for later filters in ``ctx.state``: ``"traffic"`` = ``(split, version)`` and
``"flags"`` = the tuple of flags the user is in. Versions and flag settings come from
the config generation the filter was built for; only weights and percentages are
runtime values. Semantics, persistence and the admin API: ``docs/traffic.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from fastedge.config import (
    _INVALID,
    _NAME_RE,
    _TOKEN_RE,
    _Context,
    _did_you_mean,
    _duration_at_least,
    _field,
    _join,
    _Key,
    _named_tables,
    _new_file,
    _one_or_array,
    _read_table,
    _Schema,
    _section_names,
    _show,
    _string,
    _type_name,
    _upstream_name,
)
from fastedge.filters import Filter, FilterContext, Runtime
from fastedge.traffic import (
    BUCKETS,
    MAX_WEIGHT,
    FlagConfig,
    SplitConfig,
    TrafficStateConfig,
    TrafficStore,
    check_percent,
    store_for,
)

if TYPE_CHECKING:
    from fastedge.config import Config, RouteConfig

__all__ = [
    "FlagsFilter",
    "TrafficFilter",
    "build_flags_filter",
    "build_traffic_filter",
    "convert_flags_section",
    "convert_route_flags",
    "convert_route_traffic",
    "convert_traffic_section",
    "convert_traffic_state_section",
]

# --------------------------------------------------------------------------- config


def _versions(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, Mapping):
        return ctx.error(
            path,
            "expected a table of version = upstream, e.g. "
            f'{{blue = "products-blue", green = "products-green"}}, got {_type_name(value)}',
        )
    if not value:
        return ctx.error(path, "a split needs at least one version")
    out: dict[str, str] = {}
    ok = True
    known = sorted(ctx.upstream_names)
    for version, upstream in value.items():
        item_path = _join(path, version)
        if not isinstance(version, str) or _NAME_RE.fullmatch(version) is None:
            ctx.error(item_path, "invalid version name (use 1-64 letters, digits, '_', '-')")
            ok = False
        elif not isinstance(upstream, str):
            ctx.error(item_path, f"expected an upstream name, got {_type_name(upstream)}")
            ok = False
        elif upstream not in ctx.upstream_names:
            ctx.error(
                item_path, f"unknown upstream {_show(upstream)}{_did_you_mean(upstream, known)}"
            )
            ok = False
        else:
            out[version] = upstream
    return out if ok else _INVALID


def _weights(ctx: _Context, path: str, value: object) -> Any:
    if not isinstance(value, Mapping):
        return ctx.error(
            path,
            f"expected a table of version = weight, e.g. {{blue = 100, green = 0}}, "
            f"got {_type_name(value)}",
        )
    out: dict[str, int] = {}
    ok = True
    for version, weight in value.items():
        item_path = _join(path, version)
        if isinstance(weight, bool) or not isinstance(weight, int):
            ctx.error(item_path, f"expected an integer weight, got {_type_name(weight)}")
            ok = False
        elif not 0 <= weight <= MAX_WEIGHT:
            ctx.error(item_path, f"must be between 0 and {MAX_WEIGHT}, got {weight}")
            ok = False
        else:
            out[str(version)] = weight
    return out if ok else _INVALID


_SPLIT_SCHEMA: Final[_Schema] = {
    "versions": _Key(_versions, required=True),
    "weights": _Key(_weights, required=True),
}


def _split(ctx: _Context, path: str, name: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _SPLIT_SCHEMA)
    if table is None or not table.complete:
        return _INVALID
    versions: dict[str, str] = table.values["versions"]
    weights: dict[str, int] | None = table.values.get("weights")
    if weights is None:
        return _INVALID
    ok = True
    listed = ", ".join(repr(v) for v in versions)
    for version in weights:
        if version not in versions:
            ctx.error(
                _join(_join(path, "weights"), version),
                f"unknown version {_show(version)} (versions: {listed})"
                + _did_you_mean(version, list(versions)),
            )
            ok = False
    if ok and not any(weights.values()):
        ctx.error(_join(path, "weights"), "at least one weight must be positive (all are 0)")
        ok = False
    if not ok:
        return _INVALID
    # Versions the weights leave out get 0: listed in config order, every one present.
    return SplitConfig(
        name=name,
        versions=dict(versions),
        weights={v: weights.get(v, 0) for v in versions},
    )


def convert_traffic_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[traffic.NAME]`` tables (``EXTENSION_SECTIONS["traffic"]``):
    ``{name: SplitConfig}``. Versions must name upstreams of this config; weights are
    integers from 0 to ``MAX_WEIGHT`` for listed versions, not all zero."""
    return _named_tables(
        ctx, path, value, _split, expected="a table of traffic splits ([traffic.NAME])"
    )


def _user_source(value: object) -> str:
    text = _string(value)
    kind, sep, name = text.partition(":")
    if sep and kind in ("header", "cookie"):
        if _TOKEN_RE.fullmatch(name) is None:
            raise ValueError(f"{kind} name must be an HTTP token, got {_show(name)}")
        return f"header:{name.lower()}" if kind == "header" else text
    if sep and kind == "claim":
        if not name:
            raise ValueError("claim name must not be empty")
        return text
    raise ValueError(
        f"must be 'header:<name>', 'cookie:<name>' or 'claim:<name>', got {_show(text)}"
    )


def _user(ctx: _Context, path: str, value: object) -> Any:
    items = _one_or_array(
        ctx,
        path,
        value,
        expected="a user id source like 'header:X-User-Id' or an array of them",
        empty="must name at least one user id source",
    )
    if items is _INVALID:
        return _INVALID
    sources: list[str] = []
    ok = True
    for item_path, item in items:
        try:
            source = _user_source(item)
        except ValueError as exc:
            ctx.error(item_path, str(exc))
            ok = False
            continue
        if source in sources:
            ctx.error(item_path, f"{_show(source)} is listed twice")
            ok = False
        sources.append(source)
    return tuple(sources) if ok else _INVALID


def _percent(value: object) -> int | float:
    return check_percent(value)


def _header_name(value: object) -> str:
    text = _string(value)
    if _TOKEN_RE.fullmatch(text) is None:
        raise ValueError(f"must be an HTTP field name (a token), got {_show(text)}")
    if text.lower() in ("host", "content-length", "transfer-encoding", "connection"):
        raise ValueError(f"{_show(text)} is a framing or routing field, not a flag header")
    return text


_FLAG_SCHEMA: Final[_Schema] = {
    "percent": _Key(_field(_percent)),
    "user": _Key(_user, required=True),
    "upstream": _Key(_upstream_name),
    "header": _Key(_field(_header_name)),
}


def _flag(ctx: _Context, path: str, name: str, value: object) -> Any:
    table = _read_table(ctx, path, value, _FLAG_SCHEMA)
    if table is None:
        return _INVALID
    raw = value if isinstance(value, Mapping) else {}
    if "upstream" not in raw and "header" not in raw:
        ctx.error(
            path, "a flag needs 'upstream' and/or 'header' (what being in the cohort changes)"
        )
        return _INVALID
    if not table.complete or len(table.values) != len(raw):
        return _INVALID
    return FlagConfig(name=name, **table.values)


def convert_flags_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[flags.NAME]`` tables (``EXTENSION_SECTIONS["flags"]``):
    ``{name: FlagConfig}``."""
    return _named_tables(
        ctx, path, value, _flag, expected="a table of feature flags ([flags.NAME])"
    )


def _state_file(ctx: _Context, path: str, value: object) -> Any:
    if isinstance(value, bool):
        return value
    return _new_file(ctx, path, value, "a file path, or false for in-memory only")


_STATE_SCHEMA: Final[_Schema] = {
    "file": _Key(_state_file),
    # Above 0: a resync loop without a pause would hammer Redis.
    "resync_interval": _Key(_field(_duration_at_least(0.01, inclusive=True))),
}


def convert_traffic_state_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[traffic_state]`` (``EXTENSION_SECTIONS["traffic_state"]``)."""
    table = _read_table(ctx, path, value, _STATE_SCHEMA)
    if table is None:
        return _INVALID
    if "file" in table.values and "redis" in ctx.names and table.values["file"] is not False:
        ctx.error(
            _join(path, "file"),
            "not used with [redis]: splits and flags live in Redis (remove it or set false)",
        )
        return _INVALID
    return TrafficStateConfig(**table.values)


def convert_route_traffic(ctx: _Context, path: str, value: object) -> Any:
    """Route key ``traffic = "<split>"``: the name of a ``[traffic.NAME]`` of this file."""
    try:
        name = _string(value)
    except ValueError as exc:
        return ctx.error(path, f"{exc} (the name of a [traffic.NAME] split)")
    known = sorted(ctx.defined("traffic"))
    if name not in known:
        return ctx.error(path, f"unknown traffic split {_show(name)}" + _did_you_mean(name, known))
    return name


def convert_route_flags(ctx: _Context, path: str, value: object) -> Any:
    """Route key ``flags``: a ``[flags.NAME]`` name or an array of distinct names; returns
    them as a tuple, in order."""
    return _section_names(ctx, path, value, "flags", "flag")


# --------------------------------------------------------------------------- user ids


UserId = Callable[[FilterContext], bytes | None]

_COOKIE_SPLIT: Final = re.compile(rb";\s*")


def user_id_function(sources: tuple[str, ...]) -> UserId:
    """``ctx -> user id bytes`` trying ``sources`` in order; ``None`` when none has one
    (the request is then out of the flag's cohort). Empty values count as absent."""
    getters = [_source(s) for s in sources]
    if len(getters) == 1:
        return getters[0]

    def first(ctx: FilterContext) -> bytes | None:
        for get in getters:
            value = get(ctx)
            if value is not None:
                return value
        return None

    return first


def _source(source: str) -> UserId:
    kind, _, name = source.partition(":")
    if kind == "header":
        field_name = name.encode()

        def by_header(ctx: FilterContext) -> bytes | None:
            return ctx.header(field_name) or None

        return by_header
    if kind == "cookie":
        prefix = name.encode() + b"="

        def by_cookie(ctx: FilterContext) -> bytes | None:
            # RFC 6265 §5.4: one Cookie field of "name=value; name=value"; HTTP/1.1
            # clients may still send several lines, so every line is searched.
            for n, v in ctx.headers:
                if n == b"cookie":
                    for pair in _COOKIE_SPLIT.split(v.strip()):
                        if pair.startswith(prefix):
                            value = pair[len(prefix) :].strip(b'" ')
                            if value:
                                return value
            return None

        return by_cookie

    def by_claim(ctx: FilterContext) -> bytes | None:
        claims = ctx.claims
        value = claims.get(name) if claims else None
        if isinstance(value, str) and value:
            return value.encode("utf-8", "surrogatepass")
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value).encode()
        return None

    return by_claim


# --------------------------------------------------------------------------- filters


class TrafficFilter:
    """Route key ``traffic``: send each request to the version its split picks."""

    __slots__ = ("name", "split", "store", "upstreams")

    def __init__(self, cfg: SplitConfig, store: TrafficStore) -> None:
        self.name = "traffic"
        self.split = cfg.name
        self.store = store
        # This generation's topology: a version the store names that this config does not
        # know (mid-reload) keeps the route's upstream.
        self.upstreams = dict(cfg.versions)

    def on_request(self, ctx: FilterContext) -> None:
        """Pick a version; redirect ``ctx.upstream``; count the request."""
        split = self.store.splits.get(self.split)
        if split is None:
            return None
        i = split.pick()
        version = split.versions[i]
        upstream = ctx.upstreams.get(self.upstreams.get(version, ""))
        if upstream is None:
            return None
        ctx.upstream = upstream
        ctx.state["traffic"] = (self.split, version)
        counts = self.store.split_requests
        labels = split.labels[i]
        counts[labels] = counts.get(labels, 0) + 1
        return None


#: Per flag, user ids whose bucket was computed are remembered (the hash is most of a
#: flag's cost, ~1 us, and most requests come from returning users). The bucket depends
#: only on the flag and the user, never on the percentage, so a change needs no flush.
#: Bounded: the memo is emptied when it reaches this many ids (~6 MB worst case, when
#: clients send a new id each time).
BUCKET_MEMO_SIZE: Final = 65_536


class _FlagEntry:
    __slots__ = (
        "buckets",
        "header",
        "in_labels",
        "name",
        "out_labels",
        "upstream",
        "user",
        "user_key",
    )

    def __init__(self, cfg: FlagConfig, user: UserId) -> None:
        self.name = cfg.name
        self.user = user
        self.user_key = cfg.user
        self.upstream = cfg.upstream
        self.header = cfg.header.lower().encode() if cfg.header else None
        self.in_labels = (("flag", cfg.name), ("cohort", "in"))
        self.out_labels = (("flag", cfg.name), ("cohort", "out"))
        self.buckets: dict[bytes, int] = {}


class FlagsFilter:
    """Route key ``flags``: canary routing and flag headers for users in a cohort."""

    __slots__ = ("entries", "headers", "name", "store")

    def __init__(self, flags: list[FlagConfig], store: TrafficStore) -> None:
        self.name = "flags"
        self.store = store
        functions: dict[tuple[str, ...], UserId] = {}
        entries = []
        for cfg in flags:
            if cfg.user not in functions:
                functions[cfg.user] = user_id_function(cfg.user)
            entries.append(_FlagEntry(cfg, functions[cfg.user]))
        self.entries = tuple(entries)
        self.headers = frozenset(e.header for e in entries if e.header is not None)

    def on_request(self, ctx: FilterContext) -> None:
        """Evaluate each flag for the request's user; redirect and/or set headers."""
        forwarded = ctx.upstream_headers
        managed = self.headers
        if managed:
            for n, _ in forwarded:
                if n in managed:
                    # Never forward a client's own claim to be in a cohort.
                    forwarded[:] = [(k, v) for k, v in forwarded if k not in managed]
                    break
        rollouts = self.store.rollouts
        counts = self.store.flag_requests
        on: list[_FlagEntry] | None = None
        source: tuple[str, ...] | None = None
        uid: bytes | None = None
        for entry in self.entries:
            if entry.user_key is not source:  # flags sharing a source: look it up once
                source = entry.user_key
                uid = entry.user(ctx)
            rollout = rollouts.get(entry.name)
            inside = False
            if rollout is not None and uid is not None:
                threshold = rollout.threshold
                if threshold >= BUCKETS:
                    inside = True
                elif threshold > 0:
                    memo = entry.buckets
                    bucket = memo.get(uid)
                    if bucket is None:
                        bucket = rollout.bucket(uid)
                        if len(memo) >= BUCKET_MEMO_SIZE:
                            memo.clear()
                        memo[uid] = bucket
                    inside = bucket < threshold
            if inside:
                if on is None:
                    on = []
                on.append(entry)
                labels = entry.in_labels
            else:
                labels = entry.out_labels
            counts[labels] = counts.get(labels, 0) + 1
        if on is None:
            return None
        redirected = False
        values: dict[bytes, list[bytes]] = {}
        for entry in on:
            if entry.upstream is not None and not redirected:
                upstream = ctx.upstreams.get(entry.upstream)
                if upstream is not None:
                    ctx.upstream = upstream
                    redirected = True
            if entry.header is not None:
                values.setdefault(entry.header, []).append(entry.name.encode())
        for header, names in values.items():
            forwarded.append((header, b",".join(names)))
        ctx.state["flags"] = tuple(e.name for e in on)
        return None


def build_traffic_filter(
    value: str, route: RouteConfig, config: Config, runtime: Runtime
) -> Filter:
    """The filter for a route's converted ``traffic`` value (``FILTER_BUILDERS``)."""
    store = store_for(runtime, config)
    assert store is not None  # the route names a split, so the config defines one
    return TrafficFilter(config.sections["traffic"][value], store)


def build_flags_filter(
    value: tuple[str, ...], route: RouteConfig, config: Config, runtime: Runtime
) -> Filter:
    """The filter for a route's converted ``flags`` value (``FILTER_BUILDERS``)."""
    store = store_for(runtime, config)
    assert store is not None
    section: Mapping[str, FlagConfig] = config.sections["flags"]
    return FlagsFilter([section[name] for name in value], store)
