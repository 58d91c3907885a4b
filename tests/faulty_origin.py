"""A deliberately broken upstream for resilience tests, run as its own process.

``python -m tests.faulty_origin --status 503`` answers every request with that status;
``--hang`` reads requests and never answers. Either way ``GET /__count`` answers 200
with the number of other requests received so far (so a test can count the attempts
that reached this target), and every answer carries ``x-origin-port``. Prints
``PORT <n>`` once listening, like ``tests/origin.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from typing import cast


class FaultyProtocol(asyncio.Protocol):
    """Reads request heads (bodies are ignored: tests send small ones) and answers."""

    count = 0  # requests received, process-wide
    status = 503
    hang = False
    port = 0

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.answer(head.split(b"\r\n", 1)[0])

    def answer(self, request_line: bytes) -> None:
        assert self.transport is not None
        parts = request_line.split(b" ")
        if len(parts) > 1 and parts[1] == b"/__count":
            body = str(FaultyProtocol.count).encode()
            status = 200
        else:
            FaultyProtocol.count += 1
            if FaultyProtocol.hang:
                return
            body = b"faulty"
            status = FaultyProtocol.status
        self.transport.write(
            b"HTTP/1.1 %d X\r\nx-origin-port: %d\r\ncontent-length: %d\r\n\r\n%s"
            % (status, FaultyProtocol.port, len(body), body)
        )


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FaultyProtocol, "127.0.0.1", port)
    FaultyProtocol.port = server.sockets[0].getsockname()[1]
    print(f"PORT {FaultyProtocol.port}", flush=True)
    async with server:
        await server.serve_forever()


def start_faulty(*args: str) -> tuple[subprocess.Popen[str], int]:
    """Start this module as a process with ``args``; return it and its port."""
    from tests.conftest import start_server_process  # not in the origin process itself

    return start_server_process("tests.faulty_origin", *args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--status", type=int, default=503)
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    FaultyProtocol.status = args.status
    FaultyProtocol.hang = args.hang
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
