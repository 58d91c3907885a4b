"""Byte tunnel for upgraded connections (WebSocket and friends) after a ``101``.

Once the upstream agreed to switch protocols, HTTP is over on both connections: each
side's bytes are written to the other unchanged, with flow control both ways (a full
write buffer pauses reading on the other side), and a close on either side closes both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class _TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: relays what it reads to ``peer``."""

    __slots__ = ("eof", "on_close", "peer", "registry", "transport")

    def __init__(self, transport: asyncio.Transport, registry: set[Any] | None) -> None:
        self.transport = transport
        self.peer: _TunnelEnd | None = None
        self.registry = registry
        self.on_close: Callable[[], None] | None = None  # e.g. release a per-IP slot
        self.eof = False  # this side has sent us EOF

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport.is_closing():
            return False
        if peer.eof:
            # Both directions are finished: nothing more can flow, close both sockets.
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()  # the half-close travels through the tunnel
            return True
        peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.registry is not None:
            self.registry.discard(self)
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()
        peer = self.peer
        if peer is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()

    def shutdown(self) -> None:
        """Graceful server stop: tunnels have no request boundary, so close them."""
        self.transport.close()


def start_tunnel(
    client: asyncio.Transport,
    upstream: asyncio.Transport,
    client_rest: bytes,
    upstream_rest: bytes,
    server: Any,
    on_client_close: Callable[[], None] | None = None,
) -> None:
    """Relay raw bytes between ``client`` and ``upstream`` from now on.

    ``client_rest``/``upstream_rest`` are bytes each side sent right after the upgrade
    heads (already read by the HTTP codecs); they are delivered first.
    """
    registry: set[Any] | None = getattr(server, "connections", None)
    a = _TunnelEnd(client, registry)
    a.on_close = on_client_close
    b = _TunnelEnd(upstream, None)
    a.peer, b.peer = b, a
    client.set_protocol(a)
    upstream.set_protocol(b)
    if registry is not None:
        registry.add(a)
    if client_rest:
        upstream.write(client_rest)
    if upstream_rest:
        client.write(upstream_rest)
    # Reading may have been paused by HTTP-level flow control; the tunnel starts fresh.
    client.resume_reading()
    upstream.resume_reading()
