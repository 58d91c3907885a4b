"""W3C Trace Context parsing and formatting (https://www.w3.org/TR/trace-context/)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastedge.observe.tracecontext import (
    TraceContext,
    format_traceparent,
    format_tracestate,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    parse_tracestate,
)

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
SID = "00f067aa0ba902b7"
VALID = f"00-{TID}-{SID}-01"


def test_parses_the_spec_example() -> None:
    ctx = parse_traceparent(VALID)
    assert ctx == TraceContext(TID, SID, 1, (), remote=True)
    assert ctx is not None and ctx.sampled
    unsampled = parse_traceparent(f"00-{TID}-{SID}-00")
    assert unsampled is not None and not unsampled.sampled


def test_accepts_bytes_and_surrounding_whitespace() -> None:
    assert parse_traceparent(f" {VALID}\t".encode()) == parse_traceparent(VALID)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        f"00-{TID}-{SID}-0",  # short flags
        f"00-{TID}-{SID}-01-",  # version 00 must be exactly 55 chars
        f"00-{TID}-{SID}-01-extra",
        f"00-{TID.upper()}-{SID}-01",  # HEXDIGLC only
        f"00-{TID}-{SID.upper()}-01",
        f"00-{TID}-{SID}-0A",
        f"00-{'0' * 32}-{SID}-01",  # all-zero trace-id
        f"00-{TID}-{'0' * 16}-01",  # all-zero parent-id
        f"ff-{TID}-{SID}-01",  # version ff is forbidden
        f"0g-{TID}-{SID}-01",
        f"00_{TID}-{SID}-01",
        f"00-{TID[:-1]}-{SID}-01",
        f"00-{TID}x-{SID}-01",
        f"cc-{TID}-{SID}-01x",  # future version: after 55 chars must come "-"
        f"00-{TID}-{SID}-01".replace("a", "\u0430"),  # non-ASCII look-alike
    ],
)
def test_rejects_invalid_traceparent(value: str) -> None:
    assert parse_traceparent(value) is None


def test_future_version_is_parsed_from_its_first_55_chars() -> None:
    # §4.3: a higher version is read as version 00 would be, ignoring what follows a "-".
    ctx = parse_traceparent(f"cc-{TID}-{SID}-01-what-the-future-will-be-like")
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == (TID, SID, True)
    assert parse_traceparent(f"01-{TID}-{SID}-00") is not None
    # ...and we answer with the version we implement.
    assert format_traceparent(ctx) == f"00-{TID}-{SID}-01"


def test_non_ascii_bytes_are_invalid() -> None:
    assert parse_traceparent(VALID.encode() + b"\xff") is None
    assert parse_traceparent(b"\xff" * 55) is None


def test_format_keeps_flags() -> None:
    assert format_traceparent(TraceContext(TID, SID, 0)) == f"00-{TID}-{SID}-00"
    assert format_traceparent(TraceContext(TID, SID, 0x03)) == f"00-{TID}-{SID}-03"


def test_new_ids_are_valid_and_distinct() -> None:
    ids = {new_trace_id() for _ in range(100)}
    assert len(ids) == 100
    for tid in ids:
        ctx = parse_traceparent(f"00-{tid}-{new_span_id()}-01")
        assert ctx is not None and ctx.trace_id == tid


def test_child_keeps_trace_and_state() -> None:
    parent = TraceContext(TID, SID, 1, (("rojo", "00f067aa0ba902b7"),), remote=True)
    child = parent.child()
    assert child.trace_id == TID and child.span_id != SID and len(child.span_id) == 16
    assert child.sampled and child.tracestate == parent.tracestate and not child.remote
    assert not parent.child(sampled=False).sampled


# -- tracestate ------------------------------------------------------------------------------


def test_tracestate_spec_examples() -> None:
    assert parse_tracestate("congo=t61rcWkgMzE") == (("congo", "t61rcWkgMzE"),)
    state = parse_tracestate("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert state == (("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE"))
    assert format_tracestate(state) == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


def test_tracestate_multi_tenant_keys_and_whitespace() -> None:
    state = parse_tracestate(" fw529a3039@dt=abc ,  , vendor@sys=x y\t,")
    assert state == (("fw529a3039@dt", "abc"), ("vendor@sys", "x y"))


def test_tracestate_combines_header_lines_in_order() -> None:
    state = parse_tracestate([b"a=1,b=2", b"c=3"])
    assert state == (("a", "1"), ("b", "2"), ("c", "3"))


@pytest.mark.parametrize(
    "member",
    [
        "A=1",  # upper-case key
        "1a=1",  # simple key must start with lcalpha
        "a=",  # empty value
        "a=1\x00",  # control characters are not chr
        "a=b=c",  # "=" not allowed in a value
        "a",  # no "="
        "=1",
        "a@=1",  # empty system-id
        "@b=1",  # empty tenant-id
        "a@1b=1",  # system-id starts with lcalpha
        "a@abcdefghijklmno=1",  # system-id at most 14 chars
        "k" * 257 + "=1",  # key at most 256 chars
        "a=" + "v" * 257,  # value at most 256 chars
        "a=\x7f",
        "a=caf\u00e9",
    ],
)
def test_tracestate_drops_invalid_members(member: str) -> None:
    assert parse_tracestate(f"x=1,{member},y=2") == (("x", "1"), ("y", "2"))


def test_tracestate_boundary_lengths_are_valid() -> None:
    key = "k" * 256
    value = "v" * 256
    assert parse_tracestate(f"{key}={value}") == ((key, value),)
    tenant = "t" * 241 + "@" + "s" * 14
    assert parse_tracestate(f"{tenant}=1") == ((tenant, "1"),)


def test_tracestate_value_may_contain_inner_spaces_and_punctuation() -> None:
    assert parse_tracestate("a=x y!~") == (("a", "x y!~"),)


def test_tracestate_keeps_first_of_duplicate_keys() -> None:
    assert parse_tracestate("a=1,b=2,a=3") == (("a", "1"), ("b", "2"))


def test_tracestate_keeps_at_most_32_members() -> None:
    header = ",".join(f"k{i}=v{i}" for i in range(40))
    state = parse_tracestate(header)
    assert len(state) == 32
    assert state[0] == ("k0", "v0") and state[-1] == ("k31", "v31")


def test_tracestate_empty_header() -> None:
    assert parse_tracestate("") == ()
    assert parse_tracestate(" , ,") == ()
    assert parse_tracestate(b"\xff=1") == ()


# -- properties ------------------------------------------------------------------------------

trace_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32).filter(
    lambda s: s != "0" * 32
)
span_ids = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16).filter(
    lambda s: s != "0" * 16
)
keys = st.from_regex(r"[a-z][a-z0-9_\-*/]{0,20}", fullmatch=True) | st.from_regex(
    r"[a-z0-9][a-z0-9_\-*/]{0,10}@[a-z][a-z0-9_\-*/]{0,13}", fullmatch=True
)
values = st.from_regex(
    r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,30}[\x21-\x2b\x2d-\x3c\x3e-\x7e]", fullmatch=True
)
states = st.lists(st.tuples(keys, values), max_size=32, unique_by=lambda kv: kv[0]).map(tuple)


@given(st.one_of(st.text(), st.binary()))
def test_parse_traceparent_never_raises(value: str | bytes) -> None:
    ctx = parse_traceparent(value)
    if ctx is not None:
        assert len(ctx.trace_id) == 32 and len(ctx.span_id) == 16


@given(st.one_of(st.text(), st.binary(), st.lists(st.one_of(st.text(), st.binary()))))
def test_parse_tracestate_never_raises(value: str | bytes | list[str | bytes]) -> None:
    state = parse_tracestate(value)
    assert len(state) <= 32
    assert parse_tracestate(format_tracestate(state)) == state


@given(trace_ids, span_ids, st.integers(0, 255))
def test_traceparent_round_trip(trace_id: str, span_id: str, flags: int) -> None:
    ctx = TraceContext(trace_id, span_id, flags, remote=True)
    assert parse_traceparent(format_traceparent(ctx)) == ctx


@given(states)
def test_tracestate_round_trip(state: tuple[tuple[str, str], ...]) -> None:
    assert parse_tracestate(format_tracestate(state)) == state


def test_forked_child_does_not_repeat_the_parents_ids() -> None:
    import os

    new_span_id()  # the parent's pool holds unused random bytes now
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the next id and leave at once
        os.write(write_fd, new_span_id().encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        child_id = pipe.read().decode()
    os.waitpid(pid, 0)
    assert len(child_id) == 16 and child_id != new_span_id()
