"""The ceiling for a Python proxy: a bare uvloop + httptools byte relay.

Issue 2 sizes the speed goals against this: one upstream connection per client
connection, opened at accept; every byte is parsed by httptools (no callbacks but the
ones it must make) and copied to the other side. No routing, no pool, no header
rewriting, no request ids, no metrics, no timeouts: it is not a proxy anyone should run,
only the cost of uvloop's protocol callbacks and of parsing, measured in the same rounds
as nginx, HAProxy and fastedge (``uvloop-relay`` in ``bench/load/run.py``, the small
scenario only).

Run: ``python -m bench.load.uvloop_relay --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000``
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import httptools
import uvloop


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection of one client: parse the responses, copy them back."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _ClientSide(asyncio.Protocol):
    """One client connection: parse its requests, copy them to its upstream connection
    (buffered until that connection is open)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_address = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: _UpstreamSide | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.upstream_address
        try:
            _, side = await loop.create_connection(lambda: _UpstreamSide(self), host, port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = side
        if side.transport is not None:
            for data in self.pending:
                side.transport.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            self.pending.append(data)
        else:
            upstream.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    """Relay ``listen`` to ``upstream`` until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _ClientSide(upstream), listen[0], listen[1], backlog=1024
    )
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``--listen HOST:PORT --upstream HOST:PORT``."""
    parser = argparse.ArgumentParser(prog="python -m bench.load.uvloop_relay")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    args = parser.parse_args(argv)
    uvloop.run(serve(_address(args.listen), _address(args.upstream)))


if __name__ == "__main__":
    main()
