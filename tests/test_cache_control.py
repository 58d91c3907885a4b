"""Cache-Control and HTTP-date parsing (RFC 9111 §5.2, §5.3, §5.1; RFC 9110 §5.6.7)."""

from __future__ import annotations

import calendar
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastedge.cache.control import (
    DELTA_SECONDS_MAX,
    CacheControl,
    format_http_date,
    parse_age,
    parse_cache_control,
    parse_expires,
    parse_http_date,
)

SUNDAY = float(calendar.timegm((1994, 11, 6, 8, 49, 37, 0, 0, 0)))


def cc(*values: str) -> CacheControl:
    return parse_cache_control([v.encode("latin-1") for v in values])


def test_flags_and_deltas() -> None:
    c = cc("public, max-age=60, s-maxage=30, must-revalidate, no-transform, immutable")
    assert c.public and c.must_revalidate and c.no_transform and c.immutable
    assert (c.max_age, c.s_maxage) == (60, 30)
    assert not c.no_store and not c.private and not c.no_cache
    assert c.has_explicit_freshness


def test_names_are_case_insensitive_and_ows_tolerated() -> None:
    c = cc("  NO-STORE ,Max-Age = 5 ,, PRIVATE")
    assert c.no_store and c.private and c.private_fields == ()
    assert c.max_age == 5


def test_quoted_delta_seconds_accepted() -> None:
    # RFC 9111 §5.2: recipients accept both token and quoted-string forms.
    assert cc('max-age="10"').max_age == 10


def test_several_field_lines_combine() -> None:
    c = cc("max-age=10", "no-cache", "stale-while-revalidate=30")
    assert c.max_age == 10 and c.no_cache and c.stale_while_revalidate == 30


@pytest.mark.parametrize("value", ["max-age=abc", "max-age=-1", "max-age=", "max-age=1.5"])
def test_invalid_max_age_is_stale(value: str) -> None:
    # RFC 9111 §4.2.1: an invalid max-age makes the response stale (0), not "no max-age".
    assert cc(value).max_age == 0


def test_conflicting_duplicates_are_stale_identical_ones_kept() -> None:
    assert cc("max-age=10, max-age=20").max_age == 0
    assert cc("s-maxage=10", "s-maxage=20").s_maxage == 0
    assert cc("max-age=10, max-age=10").max_age == 10


def test_huge_delta_is_capped() -> None:
    # RFC 9111 §1.2.2: a delta-seconds too large is read as 2^31.
    assert cc("max-age=99999999999999999999").max_age == DELTA_SECONDS_MAX


def test_max_stale_and_min_fresh() -> None:
    assert cc("max-stale").max_stale == math.inf  # any staleness (§5.2.1.2)
    assert cc("max-stale=30").max_stale == 30
    assert cc("max-stale=x").max_stale == 0  # invalid: no staleness allowed
    assert cc("max-stale=30, max-stale=5").max_stale == 5  # the stricter
    assert cc("min-fresh=5, min-fresh=9").min_fresh == 9
    assert cc("min-fresh=bad").min_fresh is None


def test_rfc5861_extensions() -> None:
    c = cc("max-age=5, stale-while-revalidate=30, stale-if-error=600")
    assert (c.stale_while_revalidate, c.stale_if_error) == (30, 600)
    assert cc("stale-if-error=oops").stale_if_error == 0


def test_qualified_no_cache_and_private() -> None:
    c = cc('no-cache="Set-Cookie, X-Foo", private="Authorization-Info"')
    assert c.no_cache and c.no_cache_fields == ("set-cookie", "x-foo")
    assert c.private and c.private_fields == ("authorization-info",)
    # a bare form anywhere covers the whole message
    assert cc('no-cache="a"', "no-cache").no_cache_fields == ()
    # an empty or malformed list is read as the bare (stricter) form
    assert cc('no-cache=""').no_cache and cc('no-cache=""').no_cache_fields == ()
    # lists from several occurrences are united
    assert cc('private="a", private="b, a"').private_fields == ("a", "b")


def test_quoted_string_with_comma_and_escapes() -> None:
    c = cc(r'foo="a, b\"c", max-age=3')
    assert c.extensions == {"foo": 'a, b"c'}
    assert c.max_age == 3


def test_unknown_extensions_preserved() -> None:
    c = cc("community=UCI, x-flag, Ext=Token")
    assert dict(c.extensions) == {"community": "UCI", "x-flag": None, "ext": "Token"}


def test_flag_with_argument_still_counts() -> None:
    assert cc("no-store=1").no_store


def test_serialize_round_trip() -> None:
    c = cc('max-age=300, stale-while-revalidate=3600, no-cache="x", public, foo="a b"')
    again = parse_cache_control([c.serialize()])
    assert again == c


@given(st.lists(st.binary(max_size=80), max_size=4))
def test_never_raises_on_arbitrary_bytes(values: list[bytes]) -> None:
    c = parse_cache_control(values)
    for v in (c.max_age, c.s_maxage, c.min_fresh, c.stale_while_revalidate):
        assert v is None or 0 <= v <= DELTA_SECONDS_MAX
    parse_cache_control([c.serialize()])


@given(st.binary(max_size=60))
def test_dates_never_raise(value: bytes) -> None:
    parse_http_date(value)
    parse_http_date(value, now=SUNDAY)
    parse_expires([value])
    parse_age([value])


def test_three_http_date_formats() -> None:
    # RFC 9110 §5.6.7's example, in all three formats
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == SUNDAY
    assert parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == SUNDAY
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == SUNDAY


def test_rfc850_two_digit_year_window() -> None:
    now = float(calendar.timegm((2026, 1, 1, 0, 0, 0, 0, 0, 0)))
    # 2077 would be more than 50 years ahead of 2026: read as 1977
    assert parse_http_date(b"Saturday, 01-Jan-77 00:00:00 GMT", now=now) == float(
        calendar.timegm((1977, 1, 1, 0, 0, 0, 0, 0, 0))
    )
    assert parse_http_date(b"Friday, 01-Jan-27 00:00:00 GMT", now=now) == float(
        calendar.timegm((2027, 1, 1, 0, 0, 0, 0, 0, 0))
    )


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"0",
        b"-1",
        b"Sun, 06 Nov 1994 08:49:37 UTC",
        b"Sun, 31 Feb 1994 08:49:37 GMT",
        b"Sun, 06 Foo 1994 08:49:37 GMT",
        b"Sun, 06 Nov 1994 25:49:37 GMT",
        b"\xff\xfe",
    ],
)
def test_invalid_dates(value: bytes) -> None:
    assert parse_http_date(value) is None


def test_format_http_date_round_trips() -> None:
    assert format_http_date(SUNDAY) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert parse_http_date(format_http_date(1_700_000_000)) == 1_700_000_000


def test_expires_invalid_is_already_expired() -> None:
    # RFC 9111 §5.3: invalid dates, "especially the value 0", are in the past.
    assert parse_expires([]) is None
    assert parse_expires([b"0"]) == 0.0
    assert parse_expires([b"Sun, 06 Nov 1994 08:49:37 GMT"]) == SUNDAY
    # two different values: stale
    assert parse_expires([b"Sun, 06 Nov 1994 08:49:37 GMT", b"Mon, 07 Nov 1994 08:49:37 GMT"]) == 0


def test_age() -> None:
    assert parse_age([]) is None
    assert parse_age([b"12"]) == 12
    assert parse_age([b"12", b"12"]) == 12
    assert parse_age([b"abc"]) == DELTA_SECONDS_MAX  # cannot prove its age: maximally old
