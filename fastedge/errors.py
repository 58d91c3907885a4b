"""The one error type of the data path and the one place that maps it to a response.

Every failure a client can see is a :class:`ProxyError` with a *kind*; :func:`error_response`
turns it into a status code and the JSON body ``{"error", "status", "request_id"}``
(DESIGN.md §6). Nothing else in fastedge chooses an error status.
"""

from __future__ import annotations

import enum

import orjson


# Kinds are named, not numbered: several kinds share a status (two 502s), and enum members
# with equal values would silently merge.
class Kind(enum.StrEnum):
    """Error kinds (distinct names); :data:`STATUS` maps each to its HTTP status."""

    BAD_REQUEST = "bad request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NO_ROUTE = "no route"
    METHOD_NOT_ALLOWED = "method not allowed"
    BODY_TOO_LARGE = "request body too large"
    URI_TOO_LONG = "request URI too long"
    RATE_LIMITED = "rate limited"
    HEAD_TOO_LARGE = "request header fields too large"
    INTERNAL = "internal error"
    NOT_IMPLEMENTED = "not implemented"
    UPSTREAM_UNREACHABLE = "upstream unreachable"
    UPSTREAM_BAD_RESPONSE = "bad upstream response"
    UNAVAILABLE = "service unavailable"
    UPSTREAM_TIMEOUT = "upstream timeout"


STATUS: dict[Kind, int] = {
    Kind.BAD_REQUEST: 400,
    Kind.UNAUTHORIZED: 401,
    Kind.FORBIDDEN: 403,
    Kind.NO_ROUTE: 404,
    Kind.METHOD_NOT_ALLOWED: 405,
    Kind.BODY_TOO_LARGE: 413,
    Kind.URI_TOO_LONG: 414,
    Kind.RATE_LIMITED: 429,
    Kind.HEAD_TOO_LARGE: 431,
    Kind.INTERNAL: 500,
    Kind.NOT_IMPLEMENTED: 501,
    Kind.UPSTREAM_UNREACHABLE: 502,
    Kind.UPSTREAM_BAD_RESPONSE: 502,
    Kind.UNAVAILABLE: 503,
    Kind.UPSTREAM_TIMEOUT: 504,
}


class ProxyError(Exception):
    """A failure with a client-visible answer.

    ``kind`` chooses the status; ``source`` says which part failed (``"client"``,
    ``"upstream"``, ``"router"``, ...); ``retryable`` tells the retry layer whether another
    attempt may succeed; ``detail`` is a human message (never secrets); ``headers`` are extra
    response headers (``Retry-After``, ``WWW-Authenticate``, ...).
    """

    __slots__ = ("detail", "headers", "kind", "retryable", "source")

    def __init__(
        self,
        kind: Kind,
        source: str = "proxy",
        *,
        retryable: bool = False,
        detail: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(detail or kind.value)
        self.kind = kind
        self.source = source
        self.retryable = retryable
        self.detail = detail
        self.headers = headers or []

    @property
    def status(self) -> int:
        """The HTTP status this error is answered with."""
        return STATUS[self.kind]


def error_response(
    err: ProxyError, request_id: str, *, status: int | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Map a :class:`ProxyError` to ``(status, headers, body)``; the only such mapping.

    ``status`` overrides the kind's status where the protocol layer already chose one
    (a codec's 408/413/431 verdict).
    """
    if status is None:
        status = STATUS[err.kind]
    body = orjson.dumps(
        {"error": err.detail or err.kind.value, "status": status, "request_id": request_id}
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *err.headers,
    ]
    return status, headers, body
