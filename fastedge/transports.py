"""Which transports carry the proxy's plain-TCP connections.

Two choices, one contract (asyncio's transports):

* ``edge``: fastedge's own (``fastedge._core.edgeio``): every connection is a socket in
  one epoll set per event loop, drained by one loop callback; a read is one ``recv`` and
  one ``data_received`` call. Linux, compiled core only.
* ``loop``: the event loop's own (uvloop's ``create_server``/``create_connection``).

``server.io = "auto"`` (the default) picks ``edge`` when it is available and the listener
is plain TCP (a listen host that is a name is resolved once at start-up,
``fastedge.listen.bind_all``); TLS listeners and https upstreams always use the loop's
transports, as do upstream targets named by a host name (the loop resolves them).

Upstream connections follow ``server.io`` too (:func:`upstream_edge`, decided per
gateway): plain TCP to numeric addresses opens through the loop's epoll set.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import socket
import ssl as _ssl
import sys
from collections.abc import Callable
from typing import Any

from fastedge._core import NO_EXTENSIONS
from fastedge.config import IoMode

_edgeio: Any = None
if sys.platform.startswith("linux") and not NO_EXTENSIONS:
    try:
        _edgeio = importlib.import_module("fastedge._core.edgeio")
    except ImportError:  # a source checkout without build_ext: the loop's transports
        _edgeio = None

# One epoll set per event loop that serves edge connections, made on first use (keyed by
# id: uvloop's loops are not weak-referenceable); entries of closed loops are dropped on
# the next creation.
_edges: dict[int, Any] = {}


def edge_available() -> bool:
    """Whether fastedge's own transports can run here (Linux, compiled core)."""
    return _edgeio is not None


def use_edge(mode: IoMode, *, tls: bool) -> bool:
    """Whether a listener configured with ``mode`` gets fastedge's own transports.

    Raises ``RuntimeError`` for ``edge`` where they cannot run (the config asked for
    something this build cannot do: said at start, not silently ignored).
    """
    if mode == "loop" or tls:
        return False
    if mode == "edge" and not edge_available():
        raise RuntimeError(
            "server.io = 'edge' needs Linux and the compiled core (make build); "
            "use 'auto' or 'loop'"
        )
    return edge_available()


def edge_loop(loop: asyncio.AbstractEventLoop, *, create: bool = False) -> Any:
    """The epoll set serving ``loop`` (made when ``create``), or ``None``."""
    edge = _edges.get(id(loop))
    if edge is not None and edge.loop is loop:
        return edge
    if not create or _edgeio is None:
        return None
    for key, other in list(_edges.items()):
        if other.loop.is_closed():
            del _edges[key]
    edge = _edgeio.EdgeLoop(loop)
    _edges[id(loop)] = edge
    return edge


def serve_edge(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], Any],
    socks: socket.socket | list[socket.socket],
) -> Any:
    """Accept on the bound ``socks`` (listening, or made so) with fastedge's own
    transports.

    Returns a server with ``asyncio.Server``'s ``sockets``, ``close()`` and
    ``wait_closed()``; it owns the sockets from here on.
    """
    socks = [socks] if isinstance(socks, socket.socket) else list(socks)
    for sock in socks:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
            sock.listen()
    return _edgeio.EdgeServer(edge_loop(loop, create=True), factory, socks)


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def upstream_edge(mode: IoMode) -> bool:
    """Whether a gateway configured with ``server.io = mode`` opens its upstream
    connections (plain TCP to numeric addresses) with fastedge's own transports."""
    return mode != "loop" and edge_available()


async def create_connection(
    factory: Callable[[], Any],
    host: str,
    port: int,
    *,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    edge: bool = False,
) -> tuple[Any, Any]:
    """``loop.create_connection``, or with ``edge`` (see :func:`upstream_edge`) through
    the loop's epoll set. TLS and host names always go to the loop (it resolves names
    and speaks TLS)."""
    loop = asyncio.get_running_loop()
    if not edge or _edgeio is None or ssl is not None or not _numeric(host):
        return await loop.create_connection(
            factory, host, port, ssl=ssl, server_hostname=server_hostname
        )
    return await _edgeio.open_connection(  # type: ignore[no-any-return]
        edge_loop(loop, create=True), factory, host, port
    )
