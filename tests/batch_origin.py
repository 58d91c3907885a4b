"""A real upstream with a batch endpoint, for the batch-route tests.

Run as its own process (``python -m tests.batch_origin --port 0`` prints ``PORT <n>``).
It implements the batch wire format of docs/batching.md on its own (h11 and the stdlib
``json``, nothing from fastedge), so the tests check the proxy against the documented
format rather than against itself.

``POST /batch/<mode>/<tag>`` is a batch call; ``<tag>`` only separates the counters of
different tests. Modes:

* ``ok`` — answers every item (rules below); ``stale`` — the same on a new connection,
  but a second call on a kept-alive connection is closed unanswered (as when an upstream's
  idle timeout closes a connection just as the client reuses it);
* ``hold`` — like ``ok``, but only after ``POST /release?path=<the batch path>``;
* ``fail`` — 500 with a JSON error; ``malformed`` — 200 with a body that is not JSON;
  ``notarray`` — 200 with a JSON object; ``stall`` — never answers; ``close`` — closes
  the connection without answering.

Item rules, by the item's path: ``/missing...`` is left out of the answer;
``/bad-item...`` gets an entry with an invalid status; ``/inject...`` an entry whose
header value contains CR LF; ``/status/N`` status N; ``/binary`` the bytes 0..255 as
``body_b64``; ``/cookies`` two ``set-cookie`` values; anything else 200 with a JSON echo
``{"call", "size", "id", "method", "path", "headers"}`` and ``x-batch-call: <n>``.
Answers list the items in reverse order (the format does not promise any order).

``GET /stats`` → ``{"calls": {path: n}, "sizes": {path: [n, ...]}, "held": {path: n},
"connections": n}``. Any other request → 200 ``{"unbatched": true, "method", "path",
"body_length"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from collections import defaultdict
from urllib.parse import parse_qs, urlsplit

import h11

CALLS: dict[str, int] = defaultdict(int)
SIZES: dict[str, list[int]] = defaultdict(list)
HELD: dict[str, int] = defaultdict(int)
RELEASE: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
CONNECTIONS = 0


class _Close(Exception):
    """Close the connection without answering."""


def answer_item(item: dict[str, object], call: int, size: int) -> dict[str, object] | None:
    path = str(item["path"])
    base = {"id": item["id"]}
    if path.startswith("/missing"):
        return None
    if path.startswith("/bad-item"):
        return {**base, "status": "two hundred", "headers": {}}
    if path.startswith("/inject"):
        return {**base, "status": 200, "headers": {"x-evil": "a\r\nset-cookie: pwned=1"}}
    if path.startswith("/status/"):
        status = int(path.split("/")[2])
        return {**base, "status": status, "headers": {"x-item": path}, "body": f"status {status}"}
    if path == "/binary":
        return {
            **base,
            "status": 200,
            "headers": {"content-type": "application/octet-stream"},
            "body_b64": base64.b64encode(bytes(range(256))).decode(),
        }
    if path == "/cookies":
        return {**base, "status": 200, "headers": {"set-cookie": ["a=1", "b=2"]}, "body": "ok"}
    echo = {
        "call": call,
        "size": size,
        "id": item["id"],
        "method": item["method"],
        "path": path,
        "headers": item["headers"],
    }
    return {
        **base,
        "status": 200,
        "headers": {
            "content-type": "application/json",
            "x-batch-call": str(call),
            "content-length": "999",  # wrong on purpose: the proxy must frame the body itself
        },
        "body": json.dumps(echo),
    }


async def batch(path: str, body: bytes) -> tuple[int, bytes]:
    mode = path.split("/")[2]
    items = json.loads(body)
    assert isinstance(items, list)
    CALLS[path] += 1
    SIZES[path].append(len(items))
    call = CALLS[path]
    if mode == "hold":
        HELD[path] += len(items)
        await RELEASE[path].wait()
        HELD[path] -= len(items)
    elif mode == "fail":
        return 500, json.dumps({"error": "batch backend down", "status": 500}).encode()
    elif mode == "malformed":
        return 200, b"this is not json"
    elif mode == "notarray":
        return 200, b'{"id": "0", "status": 200}'
    elif mode == "stall":
        await asyncio.Event().wait()
    elif mode == "close":
        raise _Close
    answers = [a for a in (answer_item(i, call, len(items)) for i in items) if a is not None]
    answers.reverse()
    return 200, json.dumps(answers).encode()


async def respond(method: str, target: str, body: bytes) -> tuple[int, bytes]:
    split = urlsplit(target)
    path = split.path
    if method == "POST" and path.startswith("/batch/"):
        return await batch(path, body)
    if method == "POST" and path == "/release":
        RELEASE[parse_qs(split.query)["path"][0]].set()
        return 200, b"{}"
    if path == "/stats":
        doc = {"calls": CALLS, "sizes": SIZES, "held": HELD, "connections": CONNECTIONS}
        return 200, json.dumps(doc).encode()
    doc2 = {"unbatched": True, "method": method, "path": target, "body_length": len(body)}
    return 200, json.dumps(doc2).encode()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    global CONNECTIONS
    CONNECTIONS += 1
    conn = h11.Connection(h11.SERVER)
    method, target, body = "", "", b""
    served = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                method, target, body = event.method.decode(), event.target.decode(), b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if target.startswith("/batch/stale/") and served:
                    # A kept-alive connection that the upstream closed while idle, seen
                    # by the client only when its next request gets no answer.
                    break
                served += 1
                status, payload = await respond(method, target, body)
                headers = [
                    ("content-type", "application/json"),
                    ("content-length", str(len(payload))),
                ]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=payload)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    break
            elif isinstance(event, h11.ConnectionClosed):
                break
    except (_Close, ConnectionError, h11.ProtocolError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
