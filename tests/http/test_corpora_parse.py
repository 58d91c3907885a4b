"""Both engines against the shared request corpora (llhttp's test suite and the HTTP
Garden's parser-bug trophies, see shared/corpora/README.md).

For every item, on both engines: no exception (only events), the same events whether the
bytes come whole or one at a time, and the same verdict and the same accepted requests
(method, target, fields, body) on h11 and on fast. Items are also replayed with a ``Host``
field added (most llhttp cases have none, which RFC 9112 §3.2 makes a 400), so that the
accepted paths are compared too.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from fastedge.http.engine import END, Engine, Limits, get_engine
from tests.http.conftest import bytewise, describe, serve


def corpora_dir() -> Path:
    """shared/corpora beside the clone (CI keeps a copy there), else $FASTEDGE_CORPORA.
    A missing corpus is an error, never a skip."""
    beside = Path(__file__).resolve().parents[3] / "shared" / "corpora"
    if beside.is_dir():
        return beside
    env = os.environ.get("FASTEDGE_CORPORA")
    if env and Path(env).is_dir():
        return Path(env)
    raise FileNotFoundError(f"request corpora not found at {beside} nor in $FASTEDGE_CORPORA")


def load(name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads((corpora_dir() / name).read_text())
    return items


LLHTTP = load("llhttp_requests.json")
GARDEN = load("garden_trophies.json")
ITEMS = {item["id"]: item for item in LLHTTP + GARDEN}
LIMITS = Limits()


def raw(item_id: str) -> bytes:
    return base64.b64decode(ITEMS[item_id]["raw_b64"])


def with_host(data: bytes) -> bytes:
    """``data`` with a Host field after the first HTTP/1.1 request line, if it has none."""
    if re.search(rb"\nhost:", data, re.IGNORECASE) or b" HTTP/1.1\r\n" not in data:
        return data
    return data.replace(b" HTTP/1.1\r\n", b" HTTP/1.1\r\nHost: corpus\r\n", 1)


def run(engine: Engine, data: bytes, *, one_by_one: bool = False) -> list[object]:
    """The events (comparable form) of ``data`` served as the proxy would."""
    return describe(serve(engine.server(LIMITS), bytewise(data) if one_by_one else [data]))


def rejected(events: list[object]) -> bool:
    return any(isinstance(e, tuple) and e[0] == "error" for e in events)


# Where the engines cannot agree. llhttp accepts an RTSP/ICE request line for the RTSP
# methods and for SOURCE/OPTIONS/GET/POST and httptools does not expose the protocol
# name, so the fast engine takes these as HTTP/1.0 requests, while h11 refuses anything
# but ``HTTP/``. Detecting it would cost a scan of every request on the hot path, and
# nothing is ambiguous: the framing rules are HTTP's and the proxy writes its own
# request line upstream.
DIVERGENT = {
    "llhttp-method-375": "SOURCE ... ICE/1.0 accepted by llhttp as a 1.0 request",
    "llhttp-method-405": "OPTIONS ... RTSP/1.0 accepted by llhttp as a 1.0 request",
    "llhttp-method-433": "ANNOUNCE ... RTSP/1.0 accepted by llhttp as a 1.0 request",
}
# The same, for the replay with a Host field added.
DIVERGENT_WITH_HOST = {
    **DIVERGENT,
    # llhttp takes "POST /  HTTP/1.1" (two spaces) as target "/"; h11 requires exactly
    # one SP (RFC 9112 §3). Harmless: the proxy writes its own request line.
    "garden-transducer-4": "double SP after the request-target accepted by llhttp",
}

# Where fastedge refuses what the corpus says llhttp accepts, and why.
NO_HOST = "HTTP/1.1 request without Host: 400 (RFC 9112 §3.2)"
LENIENT = "llhttp accepts it only with a leniency flag; fastedge never enables one"
INCOMPLETE = (
    "the stream ends inside a message: fastedge reads the end of input as the client "
    "closing mid-request (400); llhttp's test never signals the end"
)
OBS_FOLD = "obs-fold in a field value: RFC 9112 §5.2 lets a server reject it, fastedge does"
CODING = "a transfer coding other than one final chunked: fastedge decodes no other (§6.1)"
STRICTER_THAN_LLHTTP = {
    "llhttp-connection-9": NO_HOST,
    "llhttp-connection-37": NO_HOST,
    "llhttp-connection-159": INCOMPLETE,
    "llhttp-connection-239": NO_HOST,
    "llhttp-connection-267": NO_HOST,
    "llhttp-connection-456": NO_HOST,
    "llhttp-content-length-7": NO_HOST,
    "llhttp-content-length-44": NO_HOST,
    "llhttp-content-length-232": LENIENT,
    "llhttp-content-length-293": INCOMPLETE,
    "llhttp-content-length-320": INCOMPLETE,
    "llhttp-content-length-447": INCOMPLETE,
    "llhttp-content-length-522": LENIENT,
    "llhttp-finish-9": NO_HOST,
    "llhttp-finish-33": INCOMPLETE,
    "llhttp-finish-58": INCOMPLETE,
    "llhttp-invalid-571": LENIENT,
    "llhttp-invalid-690": LENIENT,
    "llhttp-lenient-header-value-relaxed-13": LENIENT,
    "llhttp-lenient-headers-9": LENIENT,
    "llhttp-lenient-headers-37": LENIENT,
    "llhttp-lenient-headers-112": LENIENT,
    "llhttp-lenient-version-7": LENIENT,
    "llhttp-method-7": NO_HOST,
    "llhttp-pipelining-7": NO_HOST,
    "llhttp-sample-9": NO_HOST,
    "llhttp-sample-47": NO_HOST,
    "llhttp-sample-171": NO_HOST,
    "llhttp-sample-199": NO_HOST,
    "llhttp-sample-222": NO_HOST,
    "llhttp-sample-294": NO_HOST,
    "llhttp-sample-317": "an HTTP/0.9 request line: fastedge speaks HTTP/1.0 and 1.1 only",
    "llhttp-sample-336": OBS_FOLD,
    "llhttp-sample-458": LENIENT,
    "llhttp-sample-481": NO_HOST,
    "llhttp-sample-511": NO_HOST,
    "llhttp-sample-541": NO_HOST,
    "llhttp-sample-576": OBS_FOLD,
    "llhttp-transfer-encoding-9": INCOMPLETE,
    "llhttp-transfer-encoding-36": NO_HOST,
    "llhttp-transfer-encoding-73": NO_HOST,
    "llhttp-transfer-encoding-110": NO_HOST,
    "llhttp-transfer-encoding-147": NO_HOST,
    "llhttp-transfer-encoding-189": NO_HOST,
    "llhttp-transfer-encoding-241": INCOMPLETE,
    "llhttp-transfer-encoding-369": INCOMPLETE,
    "llhttp-transfer-encoding-539": LENIENT,
    "llhttp-transfer-encoding-683": LENIENT,
    "llhttp-transfer-encoding-716": LENIENT,
    "llhttp-transfer-encoding-754": CODING,
    "llhttp-transfer-encoding-796": CODING,
    "llhttp-transfer-encoding-1029": LENIENT,
    "llhttp-transfer-encoding-1144": LENIENT,
    "llhttp-transfer-encoding-1218": LENIENT,
    "llhttp-uri-7": NO_HOST,
    "llhttp-uri-32": NO_HOST,
    "llhttp-uri-55": NO_HOST,
    "llhttp-uri-78": NO_HOST,
    "llhttp-uri-105": NO_HOST,
    "llhttp-uri-128": NO_HOST,
    "llhttp-uri-168": NO_HOST,
    "llhttp-uri-225": NO_HOST,
}
# Where llhttp reports an error and fastedge does not.
LAXER_THAN_LLHTTP = {
    # RFC 9112 §9.6: bytes after a ``close`` request are not read at all (not an error).
    "llhttp-connection-84": "data after a closing request is ignored",
    "llhttp-connection-297": "data after a closing request is ignored",
    "llhttp-connection-347": "data after a closing request is ignored",
    # llhttp "pauses" on an upgrade; fastedge reports the request with ``upgrade`` set.
    "llhttp-connection-756": "upgrade request: reported, the rest is tunnel data",
}

ALL_IDS = sorted(ITEMS)


@pytest.mark.parametrize("item_id", ALL_IDS)
def test_whole_equals_byte_at_a_time(engine: Engine, item_id: str) -> None:
    for data in {raw(item_id), with_host(raw(item_id))}:
        assert run(engine, data) == run(engine, data, one_by_one=True)


@pytest.mark.parametrize("item_id", ALL_IDS)
def test_engines_agree(item_id: str) -> None:
    h11, fast = get_engine("h11"), get_engine("fast")
    for data, divergent in (
        (raw(item_id), DIVERGENT),
        (with_host(raw(item_id)), DIVERGENT_WITH_HOST),
    ):
        same = run(h11, data) == run(fast, data)
        # A stale entry in the lists fails too: they must stay exact.
        assert same is (item_id not in divergent), item_id


@pytest.mark.parametrize("item_id", [item["id"] for item in LLHTTP])
def test_differences_from_llhttp_are_explained(item_id: str) -> None:
    item = ITEMS[item_id]
    ours = rejected(run(get_engine("fast"), raw(item_id)))
    theirs = item["llhttp_error"] is not None
    if ours and not theirs:
        assert item_id in STRICTER_THAN_LLHTTP
    elif theirs and not ours:
        assert item_id in LAXER_THAN_LLHTTP
    else:
        assert item_id not in STRICTER_THAN_LLHTTP
        assert item_id not in LAXER_THAN_LLHTTP


@pytest.mark.parametrize("item_id", [item["id"] for item in GARDEN])
def test_garden_trophy_framing_is_unambiguous(engine: Engine, item_id: str) -> None:
    # Each trophy is refused, or what is accepted is complete requests only: every head
    # is followed by its body and END before the next head or the verdict.
    events = run(engine, with_host(raw(item_id)))
    in_message = False
    for event in events:
        if isinstance(event, tuple) and event[0] == "request":
            assert not in_message
            in_message = True
        elif event is END:
            assert in_message
            in_message = False
        elif isinstance(event, bytes):
            assert in_message
        else:
            assert event == events[-1]  # the verdict is last
