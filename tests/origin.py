"""A real upstream ("origin") server for integration and fault tests.

Run as its own process (``python -m tests.origin --port 0`` prints ``PORT <n>``) so the
proxy under test talks to a real socket peer in another process. Behaviour by path:

* ``/echo`` — JSON: method, target, headers (list of pairs), body length and sha256.
* ``/bytes/N`` — N bytes of body; ``?mode=length|chunked|close`` chooses the framing.
* ``/sink`` — reads and counts the body (streaming, never buffered); answers the count.
* ``/slow?ms=N`` — answers after N milliseconds.
* ``/stall`` — reads the request, never answers.
* ``/truncate`` — declares 1000 bytes, sends 10, closes.
* ``/close`` — closes without answering.
* ``/flaky`` — closes unanswered on a reused connection, answers on a fresh one.
* ``/status/N`` — answers status N (no body for 204/304).
* ``/upgrade`` — 101 Switching Protocols, then echoes raw bytes uppercased.
* ``/continue`` — sends 100 Continue first (if asked), then the echo.
* anything else — ``200 ok`` with the path in ``X-Origin-Path``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from typing import cast
from urllib.parse import parse_qs, urlsplit

import httptools

CHUNK = 64 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)
PORT = 0  # this process's listening port, sent as X-Origin-Port (which target answered)


class OriginProtocol(asyncio.Protocol):
    """One connection; one request at a time (clients do not pipeline to origins)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[str, str]] = []
        self.url = b""
        self.body_len = 0
        self.sha = hashlib.sha256()
        self.keep_alive = True
        self.upgraded = False
        self.write_ready = asyncio.Event()
        self.write_ready.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.served = 0  # requests answered on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            assert self.transport is not None
            self.transport.write(data.upper())
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0]
            self.upgraded = True
            if data[offset:]:
                assert self.transport is not None
                self.transport.write(data[offset:].upper())
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def pause_writing(self) -> None:
        self.write_ready.clear()

    def resume_writing(self) -> None:
        self.write_ready.set()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []
        self.url = b""
        self.body_len = 0
        self.sha = hashlib.sha256()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        path = urlsplit(self.url.decode("latin-1")).path
        if path == "/continue" and any(
            n.lower() == "expect" and v.lower() == "100-continue" for n, v in self.headers
        ):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if not self.url.startswith(b"/sink"):  # /sink only counts (1 GiB uploads)
            self.sha.update(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method().decode()
        task = asyncio.get_running_loop().create_task(self.respond(method))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # responses
    def send(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        assert self.transport is not None
        head = [f"HTTP/1.1 {status} X", f"x-origin-port: {PORT}"]
        for n, v in headers or []:
            head.append(f"{n}: {v}")
        if status not in (204, 304) and not (100 <= status < 200):
            head.append(f"content-length: {len(body)}")
        if not self.keep_alive:
            head.append("connection: close")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self.served += 1
        if not self.keep_alive:
            self.transport.close()

    async def respond(self, method: str) -> None:
        t = self.transport
        assert t is not None
        split = urlsplit(self.url.decode("latin-1"))
        path = split.path
        query = parse_qs(split.query)
        if path in ("/echo", "/continue", "/sink") or path.startswith("/echo/"):
            if path == "/sink":
                self.send(200, str(self.body_len).encode(), [("content-type", "text/plain")])
                return
            doc = {
                "method": method,
                "target": self.url.decode("latin-1"),
                "headers": self.headers,
                "body_length": self.body_len,
                "body_sha256": self.sha.hexdigest(),
            }
            self.send(200, json.dumps(doc).encode(), [("content-type", "application/json")])
            return
        if path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            mode = query.get("mode", ["length"])[0]
            head = "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
            if mode == "length":
                head += f"content-length: {n}\r\n"
            elif mode == "chunked":
                head += "transfer-encoding: chunked\r\n"
            else:
                head += "connection: close\r\n"
            t.write(head.encode() + b"\r\n")
            if method == "HEAD":
                if mode == "close":
                    t.close()
                return
            left = n
            while left > 0:
                piece = _BLOCK[: min(left, CHUNK)]
                left -= len(piece)
                t.write(b"%x\r\n%s\r\n" % (len(piece), piece) if mode == "chunked" else piece)
                await self.write_ready.wait()
                if t.is_closing():
                    return
            if mode == "chunked":
                t.write(b"0\r\n\r\n")
            if mode == "close":
                t.close()
            return
        if path == "/slow":
            await asyncio.sleep(int(query.get("ms", ["100"])[0]) / 1000)
            self.send(200, b"slow")
            return
        if path == "/stall":
            return
        if path == "/truncate":
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            t.close()
            return
        if path == "/close":
            t.close()
            return
        if path == "/flaky":
            # Like an upstream whose keep-alive timer fired just as a request arrived:
            # a reused connection is closed unanswered; a fresh one is served.
            if self.served:
                t.close()
                return
            self.served += 1
            self.send(200, b"fresh")
            return
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            self.send(status, b"" if status in (204, 304) else b"status")
            return
        if path == "/upgrade":
            t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
            )
            return
        self.send(200, b"ok", [("x-origin-path", path), ("content-type", "text/plain")])


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until killed; print the bound port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(OriginProtocol, "127.0.0.1", port)
    global PORT
    bound = PORT = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
