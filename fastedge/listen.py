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
addresses) is left to ``create_server``.
"""

from __future__ import annotations

import socket

__all__ = ["bind_numeric"]


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
    family, type_, proto, _, address = infos[0]
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
