"""The HTTP/1.1 client of batch routes: one ``POST`` per batch call, kept-alive per target.

Batch calls do not use the proxy's data-path pools: those hold compiled protocol objects
that relay a client's bytes, while a batch call is a whole request built here and a whole
answer read into memory. This client is small on purpose (the OTLP exporter's pattern):
asyncio streams, h11 for strict framing, ``Content-Length`` on every request.

Connections are reused (keep-alive) per target, at most ``max_idle`` idle ones each,
and dropped once idle longer than ``idle_timeout``. A reused connection the upstream
closed while idle fails before any answer arrives; the call is then made once more on a
fresh connection. That is safe because a batch holds only GET and HEAD items, which are
idempotent (RFC 9110 §9.2.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Final

import h11

if TYPE_CHECKING:
    from fastedge.gateway import Target

__all__ = ["BatchCallError", "BatchClient"]

Headers = list[tuple[bytes, bytes]]

_READ_SIZE: Final = 65536


class BatchCallError(Exception):
    """A batch call failed before a complete answer arrived.

    ``connect`` is true when nothing was sent (the next target may be tried);
    ``reason`` is a short label for metrics (``connect``, ``io``, ``protocol``,
    ``too_large``).
    """

    def __init__(self, reason: str, detail: str, *, connect: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.connect = connect


class _Conn:
    __slots__ = ("h11", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def usable(self, now: float, idle_timeout: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.idle_since < idle_timeout
        )

    def close(self) -> None:
        self.writer.close()


class BatchClient:
    """Keep-alive ``POST``s to upstream targets (see the module docstring).

    ``max_answer_bytes`` bounds the answer body read into memory; a larger answer fails
    the call (``too_large``) instead of growing without bound.
    """

    def __init__(
        self, *, max_answer_bytes: int, max_idle: int = 4, idle_timeout: float = 60.0
    ) -> None:
        self.max_answer_bytes = max_answer_bytes
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[Target, list[_Conn]] = {}
        self.connections_opened = 0
        """Connections opened so far (tests check that keep-alive reuse happens)."""

    async def post(
        self, target: Target, path: bytes, headers: Headers, body: bytes
    ) -> tuple[int, Headers, bytes]:
        """POST ``body`` to ``path`` on ``target``; return ``(status, headers, body)``.

        ``headers`` must not contain framing fields; ``Host`` and ``Content-Length`` are
        added here unless present (``Host`` defaults to the target's authority). Raises
        :class:`BatchCallError`. The caller bounds the duration (``asyncio.timeout``);
        a cancelled call closes its connection.
        """
        conn = self._take_idle(target)
        if conn is not None:
            try:
                return await self._exchange(target, conn, path, headers, body)
            except BatchCallError as exc:
                if exc.reason != "stale":
                    raise
            # The upstream closed the idle connection; nothing was answered: try afresh.
        conn = await self._open(target)
        try:
            return await self._exchange(target, conn, path, headers, body)
        except BatchCallError as exc:
            if exc.reason == "stale":
                raise BatchCallError("io", exc.detail) from None
            raise

    async def aclose(self) -> None:
        """Close every idle connection; later calls still work (they open new ones)."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await conn.writer.wait_closed()

    # -- internals ---------------------------------------------------------------------

    def _take_idle(self, target: Target) -> _Conn | None:
        conns = self._idle.get(target)
        now = time.monotonic()
        while conns:
            conn = conns.pop()  # most recently used first: the likeliest to be alive
            if conn.usable(now, self.idle_timeout):
                return conn
            conn.close()
        return None

    def _put_idle(self, target: Target, conn: _Conn) -> None:
        conns = self._idle.setdefault(target, [])
        if len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    async def _open(self, target: Target) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(
                target.host,
                target.port,
                ssl=target.ssl,
                server_hostname=target.server_hostname,
            )
        except OSError as exc:
            raise BatchCallError(
                "connect", f"cannot connect to {target.name}: {exc.strerror or exc}", connect=True
            ) from None
        self.connections_opened += 1
        return _Conn(reader, writer)

    async def _exchange(
        self, target: Target, conn: _Conn, path: bytes, headers: Headers, body: bytes
    ) -> tuple[int, Headers, bytes]:
        received = False  # any answer byte: from then on a failure is not "stale"
        eof = False
        ok = False
        try:
            names = {n for n, _ in headers}
            fields = list(headers)
            if b"host" not in names:
                fields.insert(0, (b"host", target.authority))
            fields.append((b"content-length", b"%d" % len(body)))
            p = conn.h11
            out = p.send(h11.Request(method=b"POST", target=path, headers=fields)) or b""
            out += p.send(h11.Data(data=body)) or b""
            out += p.send(h11.EndOfMessage()) or b""
            conn.writer.write(out)
            await conn.writer.drain()
            status = 0
            resp_headers: Headers = []
            chunks: list[bytes] = []
            size = 0
            while True:
                event = p.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.reader.read(_READ_SIZE)
                    if data:
                        received = True
                    elif not received:
                        # EOF before any answer byte: on a reused connection the upstream
                        # closed it while idle (the caller tries a fresh one).
                        raise BatchCallError(
                            "stale", f"{target.name} closed the connection before answering"
                        )
                    else:
                        eof = True
                    p.receive_data(data)  # b"": EOF, which ends a close-delimited body
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue  # 100/103: the final answer follows
                if isinstance(event, h11.Response):
                    status = event.status_code
                    resp_headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self.max_answer_bytes:
                        raise BatchCallError(
                            "too_large",
                            f"batch answer larger than {self.max_answer_bytes} bytes",
                        )
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise BatchCallError(
                        "io" if received else "stale",
                        f"{target.name} closed the connection before answering",
                    )
            ok = p.our_state is h11.DONE and p.their_state is h11.DONE
            if ok:
                p.start_next_cycle()
            return status, resp_headers, b"".join(chunks)
        except h11.RemoteProtocolError as exc:
            if eof:
                raise BatchCallError(
                    "io", f"{target.name} closed the connection in the middle of its answer"
                ) from None
            raise BatchCallError("protocol", f"invalid HTTP from {target.name}: {exc}") from None
        except (OSError, h11.LocalProtocolError) as exc:
            raise BatchCallError(
                "io" if received else "stale", f"connection to {target.name} failed: {exc}"
            ) from None
        finally:
            if ok:
                self._put_idle(target, conn)
            else:
                conn.close()
