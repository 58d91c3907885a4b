"""Cache-Control and the date-valued fields, parsed the way a shared cache must read them.

Bytes in, a frozen :class:`CacheControl` out; nothing here raises on bad input (a
Hypothesis test feeds arbitrary bytes). Where a value is malformed the answer is the
*conservative* one, the reading that makes the cache serve less from storage:

* an invalid or duplicated-and-conflicting ``max-age`` / ``s-maxage`` reads as ``0``,
  i.e. the response is stale at once (RFC 9111 §4.2.1: "either the first occurrence
  should be used or the response should be considered stale"; §1.2.2 for delta-seconds);
* an invalid ``max-stale`` / ``stale-while-revalidate`` / ``stale-if-error`` reads as
  ``0`` (no staleness allowed); an invalid ``min-fresh`` is ignored (RFC 9111 §5.2:
  "a cache SHOULD ignore" a directive it cannot understand; ignoring can only make the
  cache *less* eager here, never serve something staler);
* an invalid ``Expires`` means "already expired" (RFC 9111 §5.3);
* an invalid ``Age`` makes the response maximally old (a cache cannot prove its age).

Directive names are case-insensitive (RFC 9111 §5.2); arguments may be a token or a
quoted-string, and recipients accept both forms even for delta-seconds (§5.2).
Unknown directives are preserved in :attr:`CacheControl.extensions` (§5.2.3).
"""

from __future__ import annotations

import calendar
import functools
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

__all__ = [
    "DELTA_SECONDS_MAX",
    "CacheControl",
    "format_http_date",
    "parse_age",
    "parse_cache_control",
    "parse_expires",
    "parse_http_date",
]

# RFC 9111 §1.2.2: a delta-seconds too large to represent is sent/read as 2^31.
DELTA_SECONDS_MAX: Final = 2_147_483_648

# Directives whose argument is a delta-seconds (RFC 9111 §5.2.1, §5.2.2; RFC 5861).
_DELTA_DIRECTIVES: Final = frozenset(
    {"max-age", "s-maxage", "max-stale", "min-fresh", "stale-while-revalidate", "stale-if-error"}
)
# Directives that take no argument; given one anyway, they still count as present.
_FLAG_DIRECTIVES: Final = frozenset(
    {
        "no-store",
        "no-transform",
        "only-if-cached",
        "must-revalidate",
        "proxy-revalidate",
        "must-understand",
        "public",
        "immutable",
    }
)
# The two directives with an optional field-list argument (§5.2.2.4, §5.2.2.7).
_FIELD_DIRECTIVES: Final = frozenset({"no-cache", "private"})
KNOWN_DIRECTIVES: Final = _DELTA_DIRECTIVES | _FLAG_DIRECTIVES | _FIELD_DIRECTIVES

_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The directives of one message's ``Cache-Control`` field lines.

    Delta-second directives are ``None`` when absent. ``max_stale`` is ``inf`` for a bare
    ``max-stale`` (any staleness, RFC 9111 §5.2.1.2). ``no_cache``/``private`` are
    ``True`` for both the bare and the qualified form; ``no_cache_fields`` /
    ``private_fields`` list the lower-cased field names of the qualified form (empty for
    the bare form, which then applies to the whole message).
    """

    max_age: int | None = None
    s_maxage: int | None = None
    max_stale: float | None = None
    min_fresh: int | None = None
    stale_while_revalidate: int | None = None
    stale_if_error: int | None = None
    no_cache: bool = False
    no_cache_fields: tuple[str, ...] = ()
    private: bool = False
    private_fields: tuple[str, ...] = ()
    no_store: bool = False
    no_transform: bool = False
    only_if_cached: bool = False
    must_revalidate: bool = False
    proxy_revalidate: bool = False
    must_understand: bool = False
    public: bool = False
    immutable: bool = False
    extensions: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def has_explicit_freshness(self) -> bool:
        """Whether the directives alone give a freshness lifetime (§4.2.1)."""
        return self.max_age is not None or self.s_maxage is not None

    def serialize(self) -> bytes:
        """The directives as one ``Cache-Control`` field value (canonical order)."""
        parts: list[str] = []
        for name in (
            "no-store",
            "no-transform",
            "only-if-cached",
            "must-revalidate",
            "proxy-revalidate",
            "must-understand",
            "public",
            "immutable",
        ):
            if getattr(self, name.replace("-", "_")):
                parts.append(name)
        for name, fields in (("no-cache", self.no_cache_fields), ("private", self.private_fields)):
            if getattr(self, name.replace("-", "_")):
                parts.append(f'{name}="{", ".join(fields)}"' if fields else name)
        for name in (
            "max-age",
            "s-maxage",
            "max-stale",
            "min-fresh",
            "stale-while-revalidate",
            "stale-if-error",
        ):
            value = getattr(self, name.replace("-", "_"))
            if value is None:
                continue
            if value == float("inf"):
                parts.append(name)
            else:
                parts.append(f"{name}={int(value)}")
        for name, arg in self.extensions.items():
            parts.append(name if arg is None else f"{name}={_quote_if_needed(arg)}")
        return ", ".join(parts).encode("latin-1", "replace")


def parse_cache_control(values: Iterable[bytes]) -> CacheControl:
    """Parse every ``Cache-Control`` field line of one message (never raises).

    Field lines are combined as one comma-separated list (RFC 9110 §5.3). Duplicates:
    a delta-seconds directive given twice with different values is treated
    conservatively (``max-age``/``s-maxage``/stale extensions → 0; ``max-stale`` → the
    smaller; ``min-fresh`` → the larger); for the field-list forms the lists are united,
    and a bare ``no-cache``/``private`` anywhere wins over a qualified one.
    """
    found: dict[str, list[str | None]] = {}
    for value in values:
        for name, arg in _split_directives(value.decode("latin-1")):
            found.setdefault(name, []).append(arg)

    deltas: dict[str, float | None] = {}
    for name in _DELTA_DIRECTIVES:
        args = found.get(name)
        if args is not None:
            deltas[name] = _resolve_delta(name, args)

    def fields_of(name: str) -> tuple[bool, tuple[str, ...]]:
        args = found.get(name)
        if args is None:
            return False, ()
        if any(a is None for a in args):
            return True, ()  # the bare form covers the whole message
        names: list[str] = []
        for a in args:
            assert a is not None
            for part in a.split(","):
                part = part.strip().lower()
                if part and _is_token(part) and part not in names:
                    names.append(part)
        if not names:
            # `no-cache=""` or garbage: conservatively the bare (whole-message) form
            return True, ()
        return True, tuple(names)

    no_cache, no_cache_fields = fields_of("no-cache")
    private, private_fields = fields_of("private")
    extensions = {name: args[0] for name, args in found.items() if name not in KNOWN_DIRECTIVES}

    def delta(name: str) -> int | None:
        v = deltas.get(name)
        return None if v is None else int(v)

    max_stale = deltas.get("max-stale")
    return CacheControl(
        max_age=delta("max-age"),
        s_maxage=delta("s-maxage"),
        max_stale=max_stale,
        min_fresh=delta("min-fresh"),
        stale_while_revalidate=delta("stale-while-revalidate"),
        stale_if_error=delta("stale-if-error"),
        no_cache=no_cache,
        no_cache_fields=no_cache_fields,
        private=private,
        private_fields=private_fields,
        no_store="no-store" in found,
        no_transform="no-transform" in found,
        only_if_cached="only-if-cached" in found,
        must_revalidate="must-revalidate" in found,
        proxy_revalidate="proxy-revalidate" in found,
        must_understand="must-understand" in found,
        public="public" in found,
        immutable="immutable" in found,
        extensions=MappingProxyType(extensions),
    )


def _resolve_delta(name: str, args: list[str | None]) -> float | None:
    parsed = [_delta_seconds(a) for a in args]
    if name == "max-stale":
        # bare max-stale = any staleness (§5.2.1.2); an invalid value allows none
        values = [
            float("inf") if a is None else (0.0 if p is None else float(p))
            for a, p in zip(args, parsed, strict=True)
        ]
        return min(values)
    if name == "min-fresh":
        valid = [p for p in parsed if p is not None]
        return float(max(valid)) if valid else None
    # max-age, s-maxage, stale-while-revalidate, stale-if-error
    if any(p is None for p in parsed) or len(set(parsed)) > 1:
        return 0.0  # invalid or conflicting: stale / no stale use (§4.2.1)
    first = parsed[0]
    assert first is not None
    return float(first)


def _delta_seconds(arg: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds (``1*DIGIT``), capped at 2^31; ``None`` if invalid."""
    if arg is None or not arg or not arg.isascii() or not arg.isdigit():
        return None
    if len(arg) > 10:
        return DELTA_SECONDS_MAX
    return min(int(arg), DELTA_SECONDS_MAX)


def _split_directives(text: str) -> list[tuple[str, str | None]]:
    """``a, b=1, c="x, y"`` → ``[("a", None), ("b", "1"), ("c", "x, y")]``.

    Commas inside quoted-strings do not split; a quoted-string's backslash escapes are
    undone (RFC 9110 §5.6.4). Names are lower-cased; malformed members are skipped.
    """
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        # skip OWS and empty list members (RFC 9110 §5.6.1)
        while i < n and text[i] in " \t,":
            i += 1
        start = i
        while i < n and text[i] not in "=,":
            i += 1
        name = text[start:i].strip(" \t").lower()
        arg: str | None = None
        if i < n and text[i] == "=":
            i += 1
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] == '"':
                i += 1
                chars: list[str] = []
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        i += 1
                    chars.append(text[i])
                    i += 1
                i += 1  # the closing quote (or past the end when unterminated)
                arg = "".join(chars)
                while i < n and text[i] != ",":  # junk after the quoted-string
                    i += 1
            else:
                start = i
                while i < n and text[i] != ",":
                    i += 1
                arg = text[start:i].strip(" \t")
        if name and _is_token(name):
            out.append((name, arg))
    return out


def _is_token(s: str) -> bool:
    return all(c in _TOKEN_CHARS for c in s)


def _quote_if_needed(arg: str) -> str:
    if arg and _is_token(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- HTTP-date (RFC 9110 §5.6.7) -------------------------------------------------------

_MONTHS: Final = {
    m: i
    for i, m in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES: Final = tuple(m.capitalize() for m in _MONTHS)
_TIME = r"(\d\d):(\d\d):(\d\d)"
# IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
_IMF: Final = re.compile(rf"[A-Za-z]{{3}}, (\d\d) ([A-Za-z]{{3}}) (\d{{4}}) {_TIME} GMT", re.ASCII)
# obsolete RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
_RFC850: Final = re.compile(
    rf"[A-Za-z]{{6,9}}, (\d\d)-([A-Za-z]{{3}})-(\d\d) {_TIME} GMT", re.ASCII
)
# obsolete asctime: Sun Nov  6 08:49:37 1994
_ASCTIME: Final = re.compile(
    rf"[A-Za-z]{{3}} ([A-Za-z]{{3}}) ([ \d]\d) {_TIME} (\d{{4}})", re.ASCII
)


def parse_http_date(value: bytes, *, now: float | None = None) -> float | None:
    """An HTTP-date as POSIX seconds, or ``None`` when it is not one (never raises).

    Accepts the three formats of RFC 9110 §5.6.7 (IMF-fixdate and, as recipients must,
    the obsolete RFC 850 and asctime forms). A two-digit RFC 850 year more than 50 years
    in the future of ``now`` (default: the year 2000 pivot applied as 1950-2049 when
    ``now`` is ``None``) is read as the most recent past year with those digits.
    """
    if now is None:
        return _parse_http_date_cached(value)
    return _parse_http_date(value, now)


# A stored response's Date / Last-Modified is read again on every hit (its age); the
# same few values come back, so remembering them turns a regex + timegm (~6 µs) into a
# dict probe. Bounded: the values are the origins' (and clients'), not ours.
@functools.lru_cache(maxsize=4096)
def _parse_http_date_cached(value: bytes) -> float | None:
    return _parse_http_date(value, None)


def _parse_http_date(value: bytes, now: float | None) -> float | None:
    try:
        text = value.decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        return None
    if m := _IMF.fullmatch(text):
        day, mon, year, hh, mm, ss = m.groups()
        return _epoch(int(year), mon, int(day), int(hh), int(mm), int(ss))
    if m := _RFC850.fullmatch(text):
        day, mon, yy, hh, mm, ss = m.groups()
        return _epoch(_full_year(int(yy), now), mon, int(day), int(hh), int(mm), int(ss))
    if m := _ASCTIME.fullmatch(text):
        mon, day, hh, mm, ss, year = m.groups()
        return _epoch(int(year), mon, int(day.strip() or "0"), int(hh), int(mm), int(ss))
    return None


def _full_year(yy: int, now: float | None) -> int:
    if now is None:
        return 1900 + yy if yy >= 50 else 2000 + yy
    this_year = _year_of(now)
    year = this_year - this_year % 100 + yy
    if year > this_year + 50:  # RFC 9110 §5.6.7: "more than 50 years in the future"
        year -= 100
    return year


def _year_of(ts: float) -> int:
    try:
        return time.gmtime(ts).tm_year
    except (OverflowError, OSError, ValueError):
        return 2000


def _epoch(year: int, mon: str, day: int, hh: int, mm: int, ss: int) -> float | None:
    month = _MONTHS.get(mon.lower())
    if month is None or not 1 <= day <= 31 or hh > 23 or mm > 59 or ss > 60:
        return None
    if not 1 <= year <= 9999 or day > calendar.monthrange(year, month)[1]:
        return None
    # a leap second (:60) is read as the next second's start
    return float(calendar.timegm((year, month, day, hh, mm, 0, 0, 0, 0)) + ss)


def format_http_date(ts: float) -> bytes:
    """POSIX seconds as an IMF-fixdate (what a cache writes in ``Date``)."""
    t = time.gmtime(int(ts))
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTH_NAMES[t.tm_mon - 1]} {t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    ).encode("ascii")


def parse_expires(values: list[bytes], *, now: float | None = None) -> float | None:
    """The ``Expires`` time, ``None`` when absent; invalid or several → ``0.0`` (epoch).

    RFC 9111 §5.3: "A cache recipient MUST interpret invalid date formats, especially
    the value '0', as representing a time in the past (i.e., 'already expired')." Two
    different values are treated as stale as well (§4.2.1).
    """
    if not values:
        return None
    parsed = {parse_http_date(v, now=now) for v in values}
    if None in parsed or len(parsed) != 1:
        return 0.0
    return parsed.pop()


def parse_age(values: list[bytes]) -> int | None:
    """The ``Age`` in seconds (RFC 9111 §5.1), ``None`` when absent.

    An invalid value reads as the maximum (2^31): a cache that cannot tell how old a
    response is must not think it fresh. Several identical lines are accepted.
    """
    if not values:
        return None
    ages = set()
    for v in values:
        for part in v.split(b","):
            d = _delta_seconds(part.strip(b" \t").decode("latin-1"))
            ages.add(DELTA_SECONDS_MAX if d is None else d)
    return max(ages) if ages else DELTA_SECONDS_MAX
