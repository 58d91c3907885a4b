"""An origin server the cache tests control, run as its own process.

``python -m tests.cache_origin --port 0`` prints ``PORT <n>`` and serves HTTP/1.1
(h11, keep-alive) on 127.0.0.1. Every request to a normal path is counted per
request-target (path and query) and answered as its query parameters say:

==================  ==================================================================
``cc=V``            ``Cache-Control: V``
``etag=V``          ``ETag: V`` (give the quotes: ``etag="v1"``); ``If-None-Match``
                    matching it (weak comparison) is answered 304
``lm=N``            ``Last-Modified`` N seconds ago; ``If-Modified-Since`` at or after
                    it is answered 304
``expires=N``       ``Expires`` N seconds from now (with ``Date``; negative = past)
``date=1``          a ``Date`` field (off by default: tests move the cache's clock,
                    and a real ``Date`` would make stored answers look old)
``vary=V``          ``Vary: V``
``status=N``        the status (default 200)
``size=N``          an N-byte body (default: ``target=<target> n=<count>`` text)
``chunked=1``       chunked framing instead of Content-Length
``delay_ms=N``      answer after N ms
``location=U``      ``Location: U``; ``content_location=U`` likewise
``set_cookie=V``    ``Set-Cookie: V``
``field=N:V``       any other field (repeatable)
==================  ==================================================================

Control endpoints (never counted):

* ``/__set?target=T&k=v...`` — parameters that override (or add to) ``T``'s own from
  now on; ``mode=fail`` closes the connection without answering, ``mode=hang`` never
  answers, ``mode=ok`` back to normal. ``/__set?target=T`` alone clears overrides.
* ``/__count?target=T`` — JSON ``{"count": n, "requests": [{"method", "headers"}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

COUNTS: dict[str, int] = {}
REQUESTS: dict[str, list[dict[str, Any]]] = {}
OVERRIDES: dict[str, dict[str, list[str]]] = {}


def _http_date(ts: float) -> bytes:
    return email.utils.formatdate(ts, usegmt=True).encode()


def _weak(tag: bytes) -> bytes:
    return tag.strip().removeprefix(b"W/")


def _response(
    method: bytes, target: str, params: dict[str, list[str]], headers: list[tuple[bytes, bytes]]
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """(status, headers, body, chunked) for a counted request."""

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    now = time.time()
    out: list[tuple[bytes, bytes]] = []
    status = int(one("status") or 200)
    if (cc := one("cc")) is not None:
        out.append((b"cache-control", cc.encode()))
    etag = one("etag")
    if etag is not None:
        out.append((b"etag", etag.encode()))
    last_modified: float | None = None
    if (lm := one("lm")) is not None:
        last_modified = float(int(now) - int(lm))
        out.append((b"last-modified", _http_date(last_modified)))
    if (expires := one("expires")) is not None:
        out.append((b"expires", _http_date(now + float(expires))))
        out.append((b"date", _http_date(now)))
    elif one("date") == "1":
        out.append((b"date", _http_date(now)))
    if (vary := one("vary")) is not None:
        out.append((b"vary", vary.encode()))
    for name in ("location", "content_location", "set_cookie"):
        if (value := one(name)) is not None:
            out.append((name.replace("_", "-").encode(), value.encode()))
    for spec in params.get("field", []):
        name, _, value = spec.partition(":")
        out.append((name.strip().lower().encode(), value.strip().encode()))
    out.append((b"x-origin-count", str(COUNTS[target]).encode()))
    # Conditional requests (RFC 9110 §13.1.2 / §13.1.3) on a 200.
    request = dict(headers)
    inm = request.get(b"if-none-match")
    ims = request.get(b"if-modified-since")
    if status == 200 and etag is not None and inm is not None:
        tags = [t for t in inm.split(b",") if t.strip()]
        if any(t.strip() == b"*" or _weak(t) == _weak(etag.encode()) for t in tags):
            return 304, out, b"", False
    elif status == 200 and last_modified is not None and ims is not None:
        since = email.utils.parsedate_to_datetime(ims.decode()).timestamp()
        if last_modified <= since:
            return 304, out, b"", False
    size = one("size")
    if size is not None:
        block = bytes(range(256))
        n = int(size)
        body = (block * (n // 256 + 1))[:n]
    else:
        body = f"target={target} n={COUNTS[target]}\n".encode()
    if method == b"HEAD":
        out.append((b"content-length", str(len(body)).encode()))
        return status, out, b"", False
    chunked = one("chunked") == "1"
    if not chunked and status not in (204, 304):
        out.append((b"content-length", str(len(body)).encode()))
    return status, out, body, chunked


def _control(path: str, query: dict[str, list[str]]) -> tuple[int, bytes]:
    target = query.get("target", [""])[0]
    if path == "/__set":
        rest = {k: v for k, v in query.items() if k != "target"}
        if rest:
            OVERRIDES[target] = rest
        else:
            OVERRIDES.pop(target, None)
        return 200, b'{"ok": true}'
    if path == "/__count":
        data = {"count": COUNTS.get(target, 0), "requests": REQUESTS.get(target, [])}
        return 200, json.dumps(data).encode()
    return 404, b'{"error": "unknown control endpoint"}'


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next(conn, reader)
            if not isinstance(event, h11.Request):
                return  # closed (or a body/state we never expect)
            while not isinstance(await _next(conn, reader), h11.EndOfMessage):
                pass  # a request body is read and dropped
            target = event.target.decode()
            parts = urlsplit(target)
            query = parse_qs(parts.query, keep_blank_values=True)
            if parts.path.startswith("/__"):
                status, body = _control(parts.path, query)
                out = [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                ]
                writer.write(conn.send(h11.Response(status_code=status, headers=out)))
                writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                conn.start_next_cycle()
                continue
            COUNTS[target] = COUNTS.get(target, 0) + 1
            headers = [(bytes(n), bytes(v)) for n, v in event.headers]
            REQUESTS.setdefault(target, []).append(
                {
                    "method": event.method.decode(),
                    "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                }
            )
            params = {**query, **OVERRIDES.get(target, {})}
            mode = params.get("mode", ["ok"])[-1]
            if mode == "fail":
                return  # close without an answer
            if mode == "hang":
                await reader.read()  # until the peer gives up
                return
            delay = params.get("delay_ms")
            if delay:
                await asyncio.sleep(int(delay[-1]) / 1000)
            status, out, body, chunked = _response(event.method, target, params, headers)
            if chunked:
                out.append((b"transfer-encoding", b"chunked"))
            writer.write(conn.send(h11.Response(status_code=status, headers=out)))
            step = 16 * 1024
            for i in range(0, len(body), step):
                writer.write(conn.send(h11.Data(data=body[i : i + step])))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (ConnectionError, h11.ProtocolError):
        return
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.port))
    except KeyboardInterrupt:
        sys.exit(0)
