"""A test client that also keeps each response's exact bytes (the express lane's parity
tests compare them byte for byte with the lane on and off)."""

from __future__ import annotations

import asyncio
from typing import cast

from tests.conftest import Client, Response


class _Recorder:
    """Wraps a stream reader and keeps every byte read."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.seen = bytearray()

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        self.seen += data
        return data


class RawClient(Client):
    """:class:`tests.conftest.Client` that also returns each response's exact bytes."""

    recorder: _Recorder

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        recorder = _Recorder(reader)
        client = cls(cast(asyncio.StreamReader, recorder), writer)
        client.recorder = recorder
        return client

    async def response(self, method: bytes) -> tuple[Response, bytes]:
        """Read one response: parsed, and the bytes it came in."""
        resp = await self.read_response(method=method)
        raw = bytes(self.recorder.seen)
        self.recorder.seen.clear()
        return resp, raw

    async def exchange(self, data: bytes, *, method: bytes = b"GET") -> tuple[Response, bytes]:
        """Send ``data`` (one request), return the response parsed and as bytes."""
        await self.send(data)
        return await self.response(method)

    async def exchange_on(
        self, port: int, data: bytes, *, method: bytes = b"GET"
    ) -> tuple[RawClient, Response, bytes]:
        """:meth:`exchange`, then, when the response said ``Connection: close``, check the
        proxy closed and open a new connection to ``port``: the client for the next
        request, the response parsed and as bytes."""
        resp, raw = await self.exchange(data, method=method)
        if resp.header("connection") != b"close":
            return self, resp, raw
        assert await self.is_closed()
        await self.close()
        return await RawClient.open(port), resp, raw
