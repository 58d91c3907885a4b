"""Typed contract of the compiled express-lane scanners (``express.pyx``); ``express_py.py``
is the readable specification (full acceptance rules in its docstring) and behaves
identically.

The scanners accept only the commonest exchange: a simple request whole in one read (a
head, and a ``Content-Length`` body) and a simple response (a ``Content-Length`` or
chunked body, or none). Anything else returns ``None`` and the proxy takes its general
path. What they accept becomes
exactly the bytes the general path (``FastServerCodec``/``FastClientCodec`` and
``fastedge.http.headers``) would send.
"""

__all__ = [
    "ExpressRequest",
    "new_request_id",
    "new_root_trace",
    "scan_request",
    "scan_response",
    "scan_response_start",
]

def new_request_id() -> bytes:
    """A process-unique request id: 12 hex digits of per-process randomness
    (``os.urandom(6)`` at import), then a counter from 1 as at least 10 lower-case hex
    digits (``b"%s%010x" % (prefix, n)``)."""

def new_root_trace(bound: int) -> tuple[str, str | None, bytes | None]:
    """A new trace for a request without a caller's context, sampled as
    ``TraceIdRatio`` with this ``bound`` (``round(ratio * 2**64)``) would: when the trace
    id's right-most 8 bytes, big-endian, are below it. ``(trace_id, None, None)`` when
    sampled; else ``(trace_id, span_id, line)``, ``line`` being the ``traceparent`` field
    line (CRLF included) of an unsampled span without a parent. Ids are random (from
    ``os.urandom``), lower-case hex, never all zero."""

class ExpressRequest:
    """One simple request head, scanned and rewritten for the upstream; created by
    :func:`scan_request` only, every attribute read-only."""

    @property
    def method(self) -> bytes:
        """One of ``GET HEAD POST PUT PATCH DELETE OPTIONS``."""
    @property
    def target(self) -> bytes:
        """The request-target as sent (origin-form)."""
    @property
    def path(self) -> bytes:
        """``target`` before the first ``?``."""
    @property
    def query(self) -> bytes:
        """``target`` from the first ``?`` (included) to its end, or ``b""``."""
    @property
    def host(self) -> bytes:
        """The ``Host`` value (trimmed, non-empty)."""
    @property
    def request_id(self) -> bytes:
        """The client's first valid ``X-Request-Id`` (1-200 visible ASCII bytes), else a
        fresh :func:`new_request_id`."""
    @property
    def keep_alive(self) -> bool:
        """``False`` when a ``Connection`` field said ``close``."""
    @property
    def cache_sensitive(self) -> bool:
        """A field a cache must look at is present: ``Cache-Control``, ``If-None-Match``
        or ``If-Modified-Since`` (forwarded like any other field)."""
    @property
    def data(self) -> bytes:
        """The bytes scanned: the whole request."""
    @property
    def authorization(self) -> bytes | None:
        """The ``Authorization`` value (trimmed) when exactly one was sent, else
        ``None`` (none, or more than one: the general path answers those)."""
    @property
    def traced(self) -> bool:
        """A ``traceparent`` or ``tracestate`` field was sent (kept like any other)."""
    @property
    def method_name(self) -> str:
        """``method``, decoded."""
    @property
    def is_head(self) -> bool:
        """``method`` is ``HEAD`` (no response body follows)."""
    @property
    def get_or_head(self) -> bool:
        """``method`` is ``GET`` or ``HEAD`` (what a cache may answer)."""
    @property
    def body_length(self) -> int:
        """The ``Content-Length`` (0 without one)."""
    @property
    def length_field(self) -> bytes | None:
        """The ``content-length`` line the rewritten fields end with (re-emitted from the
        number), or ``None`` without that field."""
    @property
    def body(self) -> bytes:
        """The body: the ``body_length`` bytes of ``data`` after the head."""
    def compose(
        self, target: bytes, drop: tuple[bytes, ...] | None = None, extra: bytes | None = None
    ) -> bytes:
        """The upstream request head for ``target``: ``METHOD target HTTP/1.1``, the
        rewritten fields (hop-by-hop ones dropped; ``x-forwarded-for``,
        ``x-forwarded-proto``, ``x-forwarded-host``, ``via``, ``x-request-id`` appended)
        except those named in ``drop`` (lower-case names), then ``extra`` (whole field
        lines, each ending in CRLF: what an auth policy or a tracer adds), the blank
        line and the body."""

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every field as the codec would report it: ``(lower-cased name, trimmed value)``
        in order, hop-by-hop ones included (for filters that answer from memory)."""

def scan_request(
    data: bytes,
    client_ip: bytes,
    proto: bytes,
    via: bytes,
    max_head: int,
    max_uri: int,
    max_headers: int,
    max_body: int = -1,
) -> ExpressRequest | None:
    """An :class:`ExpressRequest` when ``data`` is exactly one simple request (``GET``,
    ``HEAD``, ``POST``, ``PUT``, ``PATCH``, ``DELETE`` or ``OPTIONS``; a ``Content-Length``
    body whole, or none) within the limits (head bytes, target bytes, field count, the
    latter capped at 100; body bytes unless ``max_body`` < 0), else ``None``.
    ``client_ip``/``proto`` feed ``X-Forwarded-For``/``-Proto``; ``via`` is this hop's
    ``Via`` entry."""

def scan_response(
    data: bytes, head_request: bool, via: bytes, request_id: bytes, close: bool
) -> tuple[int, bool, int, bytes] | None:
    """``(status, reusable, body_length, bytes for the client)`` when ``data`` is exactly
    one simple response (status 200-599, ``Content-Length`` body or none for HEAD/204/304),
    else ``None``. ``request_id`` is sent when the upstream gave none; ``close`` adds
    ``connection: close``; ``reusable`` is false when the upstream said ``close``."""

def scan_response_start(
    data: bytes, head_request: bool, via: bytes, request_id: bytes, close: bool
) -> tuple[int, bool, int, bytes, int] | None:
    """:func:`scan_response`, and also a response whose ``Content-Length`` body has only
    begun to arrive: ``(status, reusable, body_length, bytes for the client, bytes of the
    body still to come)``, else ``None``."""

def monotonic() -> float:
    """``time.perf_counter()`` as the compiled data path reads it (no float object)."""
