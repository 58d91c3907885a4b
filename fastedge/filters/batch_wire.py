"""The batch wire format: many GET/HEAD requests in one POST, their answers in one array.

Specified in ``docs/batching.md``; summary:

* **Request** (``POST <path>``, ``Content-Type: application/json``): a JSON array of
  items ``{"id": "0", "method": "GET", "path": "/a?x=1", "headers": {"name": "value"}}``.
  ``id`` is a string unique within the call (fastedge uses the item's position, ``"0"``,
  ``"1"``, ...); ``path`` is the request-target the upstream would have received;
  ``headers`` are the forwarded end-to-end fields with lower-case names, repeated fields
  combined into one value (``", "``; ``"; "`` for ``cookie``, RFC 9110 §5.3 /
  RFC 6265 §5.4). Items carry no body.
* **Answer** (2xx, a JSON array, any order): ``{"id", "status", "headers", "body"}`` or
  ``"body_b64"`` instead of ``"body"`` (standard base64 with padding, RFC 4648 §4);
  neither means an empty body. ``headers`` values are strings, or arrays of strings for
  repeated fields (``set-cookie``). Unknown keys are ignored.

Both directions are here: :func:`encode_requests` / :func:`decode_answers` for the proxy,
:func:`decode_requests` / :func:`encode_answers` for Python batch endpoints (the demo).
Everything an upstream sends is validated as strictly as a response head would be:
header names must be tokens and values must not contain CR, LF or NUL, since they are
written verbatim into the client's response.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

__all__ = [
    "BatchItem",
    "ItemAnswer",
    "WireError",
    "answer_entry",
    "decode_answers",
    "decode_requests",
    "encode_answers",
    "encode_requests",
    "headers_object",
]

Headers: TypeAlias = list[tuple[bytes, bytes]]

# RFC 9110 §5.6.2 token; §5.5 field-value: VCHAR / obs-text / SP / HTAB (no CR, LF, NUL).
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE_RE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Fields about the framing of the batch call or of one hop, never meaningful per item.
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
MAX_ITEM_HEADERS: Final = 100
"""Most header fields accepted in one answer entry (Apache's ``LimitRequestFields``
default, the same bound the proxy puts on a request head)."""


class WireError(ValueError):
    """A batch document, or one entry of it, breaks the format."""


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a batch, as a batch endpoint receives it."""

    id: str
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class ItemAnswer:
    """One validated answer entry: what goes to the waiting client."""

    status: int
    headers: Headers
    body: bytes


# --------------------------------------------------------------------------- proxy side


def headers_object(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The forwarded fields of one item as a JSON object (see the module docstring).

    Framing fields are dropped (items have no body); repeated names are combined in
    order, ``cookie`` with ``"; "`` and everything else with ``", "``.
    """
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        if raw_name in _FRAMING:
            continue
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        previous = out.get(name)
        if previous is None:
            out[name] = value
        else:
            out[name] = previous + ("; " if name == "cookie" else ", ") + value
    return out


def encode_requests(items: Sequence[tuple[str, bytes, bytes, Mapping[str, str]]]) -> bytes:
    """The body of one batch call: ``(id, method, path, headers)`` per item."""
    return orjson.dumps(
        [
            {
                "id": item_id,
                "method": method.decode("latin-1"),
                "path": path.decode("latin-1"),
                "headers": dict(headers),
            }
            for item_id, method, path, headers in items
        ]
    )


def decode_answers(body: bytes, ids: Collection[str]) -> dict[str, ItemAnswer | WireError]:
    """Parse a batch answer for the items ``ids``.

    Raises :class:`WireError` when the document as a whole is unusable (not JSON, not an
    array). Otherwise returns, per id that has an entry, the validated answer or the
    :class:`WireError` that makes that one entry unusable (an id answered twice is such
    an error). Ids without an entry are absent. Entries without a string ``id`` of this
    batch cannot be attributed to anyone and are ignored.
    """
    doc = _json_array(body, "batch answer")
    out: dict[str, ItemAnswer | WireError] = {}
    for entry in doc:
        if not isinstance(entry, dict):
            continue
        item_id = entry.get("id")
        if not isinstance(item_id, str) or item_id not in ids:
            continue
        if item_id in out:
            out[item_id] = WireError(f"item {item_id!r} is answered more than once")
            continue
        try:
            out[item_id] = _answer(entry)
        except WireError as exc:
            out[item_id] = WireError(f"item {item_id!r}: {exc}")
    return out


def _answer(entry: Mapping[str, Any]) -> ItemAnswer:
    status = entry.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        # A final status: 1xx is never a complete answer (RFC 9110 §15.2).
        raise WireError(f"status must be an integer from 200 to 599, got {status!r}")
    raw_headers = entry.get("headers", {})
    if not isinstance(raw_headers, dict):
        raise WireError(f"headers must be an object, got {_json_type(raw_headers)}")
    headers: Headers = []
    for name, value in raw_headers.items():
        if not _TOKEN_RE.fullmatch(name):
            raise WireError(f"header name {name!r} is not an HTTP token")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str) or not _VALUE_RE.fullmatch(v):
                raise WireError(f"header {name!r} has an invalid value {v!r}")
            headers.append((name.lower().encode(), v.encode("latin-1")))
    if len(headers) > MAX_ITEM_HEADERS:
        raise WireError(f"more than {MAX_ITEM_HEADERS} header fields")
    text = entry.get("body")
    b64 = entry.get("body_b64")
    if text is not None and b64 is not None:
        raise WireError('both "body" and "body_b64" are present')
    if text is not None:
        if not isinstance(text, str):
            raise WireError(f"body must be a string, got {_json_type(text)}")
        body = text.encode()
    elif b64 is not None:
        if not isinstance(b64, str):
            raise WireError(f"body_b64 must be a string, got {_json_type(b64)}")
        try:
            body = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise WireError("body_b64 is not valid base64") from None
    else:
        body = b""
    return ItemAnswer(status, headers, body)


def _json_array(body: bytes, what: str) -> list[Any]:
    """``body`` parsed as a JSON array; :class:`WireError` naming ``what`` otherwise."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"{what} is not JSON ({exc.msg})") from None
    if not isinstance(doc, list):
        raise WireError(f"{what} must be a JSON array, got {_json_type(doc)}")
    return doc


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --------------------------------------------------------------------------- endpoint side


def decode_requests(body: bytes) -> list[BatchItem]:
    """Parse a batch call's body (for a Python batch endpoint); raises :class:`WireError`."""
    doc = _json_array(body, "batch request")
    items: list[BatchItem] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise WireError(f"item {i} must be an object, got {_json_type(entry)}")
        item_id, method, path = entry.get("id"), entry.get("method"), entry.get("path")
        headers = entry.get("headers", {})
        if not isinstance(item_id, str) or item_id in seen:
            raise WireError(f"item {i}: id must be a string unique in the batch")
        if method not in ("GET", "HEAD"):
            raise WireError(f"item {i}: method must be GET or HEAD, got {method!r}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise WireError(f"item {i}: path must be a string starting with '/'")
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise WireError(f"item {i}: headers must be an object of strings")
        seen.add(item_id)
        items.append(BatchItem(item_id, method, path, headers))
    return items


def answer_entry(
    item_id: str, status: int, headers: Iterable[tuple[str, str]], body: bytes
) -> dict[str, Any]:
    """One answer entry; ``body`` goes as ``"body"`` when it is UTF-8, else base64."""
    grouped: dict[str, str | list[str]] = {}
    for name, value in headers:
        key = name.lower()
        previous = grouped.get(key)
        if previous is None:
            grouped[key] = value
        elif isinstance(previous, list):
            previous.append(value)
        else:
            grouped[key] = [previous, value]
    entry: dict[str, Any] = {"id": item_id, "status": status, "headers": grouped}
    if body:
        try:
            entry["body"] = body.decode()
        except UnicodeDecodeError:
            entry["body_b64"] = base64.b64encode(body).decode("ascii")
    return entry


def encode_answers(entries: Sequence[Mapping[str, Any]]) -> bytes:
    """The body of a batch answer."""
    return orjson.dumps(list(entries))
