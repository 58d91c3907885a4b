"""Listening sockets bound in the calling thread, so that the process stays single-threaded.

uvloop's ``create_server(host, port)`` resolves ``host`` on libuv's thread pool, even an
IP address literal, and the pool's four threads then live as long as the process. Once a
process has a second thread, glibc stops taking its single-threaded shortcuts: malloc
and free lock, and every ``read``/``write`` wrapper switches thread cancellation on and
off. The proxy makes two reads and two writes per request, so that costs it on every
request (``perf``: ~3% of the process's time in ``pthread_mutex_*`` and
``__pthread_disable_asynccancel``; see bench/RESULTS.md).

A host that is one numeric address needs no resolver: :func:`bind_numeric` binds it
here, with the options ``create_server`` would set, and the caller passes the socket as
``create_server(sock=...)``. Anything else (a name, or a host that means several
addresses) is left to ``create_server``, or, for fastedge's own transports (which have
no resolver of their own), bound by :func:`bind_all` after resolving it here once.
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["bind_all", "bind_numeric"]


def bind_numeric(
    host: str | None, port: int, *, backlog: int = 100, reuse_port: bool = False
) -> socket.socket | None:
    """A non-blocking listening socket on ``host:port`` when ``host`` is one IP address
    literal, else ``None`` (resolve it with ``create_server``).

    Options as ``create_server(reuse_address=True, reuse_port=...)`` sets them; a bind
    error is raised as the ``OSError`` ``create_server`` would raise.
    """
    try:
        infos = socket.getaddrinfo(
            host,
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST,
        )
    except (socket.gaierror, UnicodeError):
        return None  # a name (or none: every interface, two families): create_server's
    if len(infos) != 1:
        return None
    return _bind(infos[0], backlog=backlog, reuse_port=reuse_port)


def bind_all(
    host: str | None, port: int, *, backlog: int = 100, reuse_port: bool = False
) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` resolves to (a name, or
    ``None``/``""`` for every interface of both families), as ``create_server`` binds
    them; resolved here, in the calling thread, once at start-up.

    ``socket.gaierror`` when the name does not resolve; a bind error closes what was
    already bound and is raised as :func:`bind_numeric` raises it.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for info in infos:
            key = (info[0], info[4])
            if key in seen:  # a name listed twice in /etc/hosts, for one
                continue
            seen.add(key)
            socks.append(_bind(info, backlog=backlog, reuse_port=reuse_port))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _bind(info: tuple[Any, ...], *, backlog: int, reuse_port: bool) -> socket.socket:
    family, type_, proto, _, address = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            # The message asyncio's create_server gives for the same failure.
            reason = (exc.strerror or str(exc)).lower()
            raise OSError(
                exc.errno, f"error while attempting to bind on address {address!r}: {reason}"
            ) from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
