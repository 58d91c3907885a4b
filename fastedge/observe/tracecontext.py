"""W3C Trace Context: the ``traceparent`` and ``tracestate`` request headers.

Reference: W3C Recommendation "Trace Context" (Level 1),
https://www.w3.org/TR/trace-context/ — section numbers below refer to it.

Parsing never raises: a header that does not follow the grammar yields ``None``
(``traceparent``) or has its bad members dropped (``tracestate``), and the caller starts a
new trace (§4.2 "restart the trace"). Ids are kept as lower-case hex strings because that
is what both the headers and the OTLP/JSON export need, so the hot path never converts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "FLAG_SAMPLED",
    "INVALID_SPAN_ID",
    "INVALID_TRACE_ID",
    "TraceContext",
    "TraceState",
    "format_traceparent",
    "format_tracestate",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
    "parse_tracestate",
]

TraceState = tuple[tuple[str, str], ...]
"""Ordered ``tracestate`` list-members, leftmost (most recently updated) first (§3.3)."""

FLAG_SAMPLED = 0x01
"""``trace-flags`` bit 0: the caller may have recorded this trace (§3.2.2.5.1)."""

INVALID_TRACE_ID = "0" * 32  # §3.2.2.3: all zeroes is forbidden
INVALID_SPAN_ID = "0" * 16  # §3.2.2.4: all zeroes is forbidden

# §3.2.2: version-format for version 00 is exactly
#   version "-" trace-id "-" parent-id "-" trace-flags   (2+1+32+1+16+1+2 = 55 chars)
# with HEXDIGLC = DIGIT / "a"-"f": upper-case hex is invalid.
_TRACEPARENT_LEN = 55
_V00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# §4.3 (versioning): for a higher version, parse the first 55 characters as version 00
# would; anything after them must start with "-".
_FUTURE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)

# §3.3 tracestate, "key" (Level 1 grammar):
#   simple-key       = lcalpha 0*255( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
#   multi-tenant-key = tenant-id "@" system-id
#   tenant-id        = ( lcalpha / DIGIT ) 0*240( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
#   system-id        = lcalpha 0*13( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )
_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"
)
# §3.3 tracestate, "value" = 0*255(chr) nblk-chr; nblk-chr = %x21-2B / %x2D-3C / %x3E-7E (printable
# ASCII except "," and "="); chr = %x20 / nblk-chr. So no trailing space, at most 256 chars.
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_MAX_MEMBERS = 32  # §3.3 "There can be a maximum of 32 list-members in a list."
_OWS = " \t"  # RFC 9110 §5.6.3 optional whitespace around list members


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One position in a distributed trace: what ``traceparent``/``tracestate`` carry.

    ``span_id`` is the *parent-id* of the header — the span of whoever sent it (or, for a
    context we inject, our own span). ``remote`` is true for a context extracted from a
    request rather than created here.
    """

    trace_id: str  # 32 lower-case hex digits, not all zero
    span_id: str  # 16 lower-case hex digits, not all zero
    flags: int = 0  # trace-flags; bit 0 = sampled
    tracestate: TraceState = ()
    remote: bool = False

    @property
    def sampled(self) -> bool:
        """The ``sampled`` flag (§3.2.2.5.1)."""
        return bool(self.flags & FLAG_SAMPLED)

    def child(self, span_id: str | None = None, *, sampled: bool | None = None) -> TraceContext:
        """A context for a new span under this one: same trace and ``tracestate``, a new
        span id, and the sampled flag inherited unless given."""
        flags = self.flags if sampled is None else (FLAG_SAMPLED if sampled else 0)
        return TraceContext(
            self.trace_id, span_id or new_span_id(), flags & FLAG_SAMPLED, self.tracestate
        )


# Ids come from os.urandom, drawn 4 KiB at a time: one getrandom() system call per 256
# span ids instead of one per id (it dominated the cost of an unsampled span). A forked
# child must not hand out the ids its parent will also use, so it starts a fresh pool.
_POOL_SIZE = 4096
_pool = b""
_pool_pos = 0


def _reset_pool() -> None:
    global _pool, _pool_pos
    _pool, _pool_pos = b"", 0


os.register_at_fork(after_in_child=_reset_pool)


def _random_hex(n: int) -> str:
    global _pool, _pool_pos
    pos = _pool_pos
    if pos + n > len(_pool):
        _pool, pos = os.urandom(_POOL_SIZE), 0
    _pool_pos = pos + n
    return _pool[pos : pos + n].hex()


def new_trace_id() -> str:
    """A random trace id (§3.2.2.3 wants it globally unique, and Level 2 recommends the
    right-most 7 bytes be random: all 16 are, from ``os.urandom``)."""
    tid = _random_hex(16)
    # An all-zero id is invalid; with 128 random bits this never happens, but be exact.
    return tid if tid != INVALID_TRACE_ID else new_trace_id()


def new_span_id() -> str:
    """A random span id (8 bytes from ``os.urandom``), never all zero."""
    sid = _random_hex(8)
    return sid if sid != INVALID_SPAN_ID else new_span_id()


def _text(value: str | bytes) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value


def parse_traceparent(value: str | bytes) -> TraceContext | None:
    """Parse a ``traceparent`` header value, or return ``None`` when it is invalid.

    Rules (§3.2 and §4.3): version 00 is exactly 55 characters; hex is lower-case only;
    an all-zero trace-id or parent-id is invalid; version ``ff`` is invalid; a higher
    version is parsed from its first 55 characters and must be either exactly that long
    or continue with ``-``. Surrounding optional whitespace (RFC 9110 §5.6.3) is ignored.
    """
    text = _text(value)
    if text is None:
        return None
    text = text.strip(_OWS)
    if text.startswith("00"):
        m = _V00.fullmatch(text)
        if m is None:
            return None
        trace_id, span_id, flags_hex = m.groups()
    else:
        m = _FUTURE.fullmatch(text)
        if m is None or m.group(1) == "ff":  # §3.2.2.2: version ff is forbidden
            return None
        trace_id, span_id, flags_hex = m.group(2), m.group(3), m.group(4)
    if trace_id == INVALID_TRACE_ID or span_id == INVALID_SPAN_ID:
        return None
    return TraceContext(trace_id, span_id, int(flags_hex, 16), (), remote=True)


def format_traceparent(ctx: TraceContext) -> str:
    """The version-00 ``traceparent`` value for ``ctx`` (we always send the version we
    implement, §4.3)."""
    return f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.flags & 0xFF:02x}"


def parse_tracestate(values: str | bytes | Iterable[str | bytes]) -> TraceState:
    """Parse one ``tracestate`` value, or several header lines (combined as one
    comma-separated list, RFC 9110 §5.3 and §3.3).

    Empty and whitespace-only members are allowed and skipped (§3.3); members that
    break the key/value grammar are dropped (the spec lets a vendor discard invalid
    entries rather than the whole header); a repeated key keeps its first (most recent)
    occurrence (dropping duplicates is allowed since w3c/trace-context#477); at most 32
    members are kept, dropping from the end as the spec's truncation rule does. Order is preserved.
    """
    if isinstance(values, (str, bytes)):
        values = (values,)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in values:
        text = _text(raw)
        if text is None:
            continue
        for member in text.split(","):
            member = member.strip(_OWS)
            if not member:
                continue
            key, sep, val = member.partition("=")
            if not sep or key in seen or not _KEY.fullmatch(key) or not _VALUE.fullmatch(val):
                continue
            seen.add(key)
            out.append((key, val))
            if len(out) == _MAX_MEMBERS:
                return tuple(out)
    return tuple(out)


def format_tracestate(state: TraceState) -> str:
    """The ``tracestate`` header value: members joined by ``,`` in order (§3.3)."""
    return ",".join(f"{k}={v}" for k, v in state)
