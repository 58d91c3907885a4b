"""A real loopback OTLP/HTTP receiver (asyncio + h11) for the span export tests (served by
the ``receiver`` fixture of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson


@dataclass
class Receiver:
    """Decodes what arrives at ``POST /v1/traces`` and answers as scripted.

    ``script`` lists the answers (status, headers, body) in order, then 200 ``{}``; only
    200 bodies count as delivered (``requests``). With ``hold`` on, each answer waits
    for ``release`` (a slow collector); ``active`` / ``max_active`` count the POSTs
    overlapping, ``got_request`` is set once a POST has arrived in full.
    """

    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    content_types: list[bytes] = field(default_factory=list)
    # statuses to answer, in order; 200 once exhausted
    script: list[tuple[int, list[tuple[str, str]], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    attempts: int = 0
    close_after_response: bool = False  # like a collector with a short keep-alive timeout
    connections: int = 0
    hold: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    got_request: asyncio.Event = field(default_factory=asyncio.Event)
    active: int = 0
    max_active: int = 0

    def spans(self) -> list[dict[str, Any]]:
        """Every delivered span, in arrival order."""
        return [s for post in self._docs() for s in post]

    @property
    def posts(self) -> list[list[str]]:
        """The span names of each delivered POST."""
        return [[s["name"] for s in post] for post in self._docs()]

    def names(self) -> list[str]:
        """Every delivered span's name, in arrival order."""
        return [s["name"] for s in self.spans()]

    def _docs(self) -> list[list[dict[str, Any]]]:
        return [
            [s for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
            for doc in self.requests
        ]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self.connections += 1
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    assert event.method == b"POST" and event.target == b"/v1/traces"
                    self.content_types.extend(v for n, v in event.headers if n == b"content-type")
                    body = b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    self.attempts += 1
                    self.active += 1
                    self.max_active = max(self.max_active, self.active)
                    self.got_request.set()
                    try:
                        if self.hold:
                            await self.release.wait()
                    finally:
                        self.active -= 1
                    status, headers, resp = self.script.pop(0) if self.script else (200, [], b"{}")
                    if status == 200:
                        self.requests.append(orjson.loads(body))
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=status,
                                headers=[("content-length", str(len(resp))), *headers],
                            )
                        )
                        or b""
                    )
                    writer.write(conn.send(h11.Data(data=resp)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    self.arrived.set()
                    if self.close_after_response:
                        return
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    @property
    def url(self) -> str:
        """Where an exporter sends to."""
        return f"http://127.0.0.1:{self.port}/v1/traces"
