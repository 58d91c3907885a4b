"""Every HTTP engine test runs on both engines: h11 (the reference) and fast (llhttp)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from fastedge.http.engine import (
    END,
    Engine,
    Limits,
    ProtocolError,
    RequestEvent,
    RequestHead,
    ResponseEvent,
    ServerCodec,
    get_engine,
)

ENGINES = ["h11", "fast"]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Engine:
    """The engine under test, by name (``"h11"`` or ``"fast"``) through ``get_engine``."""
    return get_engine(str(request.param))


def merge_bytes(events: Iterable[RequestEvent | ResponseEvent]) -> list[object]:
    """Events with consecutive body pieces joined (engines may split bodies differently)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] = out[-1] + event
        else:
            out.append(event)
    return out


def describe(events: Iterable[RequestEvent | ResponseEvent]) -> list[object]:
    """Comparable form of events: heads as tuples, errors as ``("error", status)``."""
    out: list[object] = []
    for event in merge_bytes(events):
        if isinstance(event, ProtocolError):
            out.append(("error", event.status))
        elif isinstance(event, RequestHead):
            out.append(
                (
                    "request",
                    event.method,
                    event.target,
                    event.http_version,
                    tuple(event.headers),
                    event.keep_alive,
                    event.content_length,
                    event.chunked,
                    event.expect_continue,
                    event.upgrade,
                )
            )
        else:
            out.append(event)
    return out


def serve(codec: ServerCodec, pieces: Iterable[bytes], *, eof: bool = True) -> list[RequestEvent]:
    """Drive ``codec`` as the proxy does: feed the pieces, answer each request with an
    empty 200 as soon as its END arrives, continue with ``next_cycle`` while the
    connection stays alive. Returns every event, in order."""
    seen: list[RequestEvent] = []
    queue: list[RequestEvent] = []
    open_ = True

    def drain(events: list[RequestEvent]) -> None:
        nonlocal open_
        queue.extend(events)
        while queue and open_:
            event = queue.pop(0)
            seen.append(event)
            if event is END:
                codec.response_head(200, b"", [(b"content-length", b"0")])
                codec.end()
                if codec.keep_alive:
                    queue.extend(codec.next_cycle())
                else:
                    open_ = False
            elif isinstance(event, ProtocolError):
                open_ = False

    for piece in pieces:
        if not open_:
            break
        drain(codec.feed(piece))
    if eof and open_:
        drain(codec.feed(b""))
    return seen


def bytewise(data: bytes) -> list[bytes]:
    """``data`` one byte at a time."""
    return [data[i : i + 1] for i in range(len(data))]


DEFAULT_LIMITS = Limits()
