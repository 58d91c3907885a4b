"""Access log (one JSON object per line) and process logging setup.

The access log is on the hot path, so :meth:`AccessLog.log` only serialises (orjson, a few
hundred nanoseconds) and appends to an in-memory file buffer. The buffer reaches the file
when it fills (64 KiB), at most ``flush_interval`` seconds after the first unflushed line
(a timer on the running event loop), and on :meth:`AccessLog.close`. A local file write of
one buffer is a page-cache copy, not a disk wait, so it does not stall the loop noticeably.

Fields the proxy writes (all optional to this module): ``ts`` (RFC 3339 UTC, see
:func:`utc_timestamp`), ``request_id``, ``client``, ``method``, ``path``, ``route``,
``upstream``, ``target``, ``status``, ``bytes_in``, ``bytes_out``, ``duration_ms``,
``upstream_ms``, ``error``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import BinaryIO

import orjson

__all__ = ["AccessLog", "setup_logging", "utc_timestamp"]

# 64 KiB: big enough that a busy proxy writes a few times per second, small enough that a
# crash loses little (nginx's access_log buffer= is typically set to 32-64k).
_BUFFER_SIZE = 64 * 1024


def utc_timestamp(epoch: float | None = None) -> str:
    """``epoch`` (default: now) as RFC 3339 UTC with milliseconds, e.g.
    ``2026-11-27T11:23:16.123Z``."""
    if epoch is None:
        epoch = time.time()
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class AccessLog:
    """Buffered JSON-lines access log.

    ``target``: ``"-"`` for standard output, a path to append to, or ``None`` for off (then
    :attr:`enabled` is false and :meth:`log` does nothing — the proxy should test
    :attr:`enabled` before building a record).
    """

    def __init__(self, target: str | None, *, flush_interval: float = 1.0) -> None:
        self.target = target
        self.flush_interval = flush_interval
        self._file: BinaryIO | None = None
        self._owns_file = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._open()

    @property
    def enabled(self) -> bool:
        """Whether records are written anywhere."""
        return self._file is not None

    def _open(self) -> None:
        if self.target is None:
            self._file = None
        elif self.target == "-":
            # stdout's own buffer; we flush it but never close it.
            self._file = sys.stdout.buffer
            self._owns_file = False
        else:
            self._file = open(self.target, "ab", buffering=_BUFFER_SIZE)  # noqa: SIM115
            self._owns_file = True

    def log(self, record: dict[str, object]) -> None:
        """Write ``record`` as one JSON line.

        Values orjson cannot encode natively (exceptions, paths, ...) are written with
        ``str``. Outside an event loop each line is flushed immediately.
        """
        file = self._file
        if file is None:
            return
        file.write(orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE))
        if self._flush_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                file.flush()
                return
            self._flush_timer = loop.call_later(self.flush_interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        self.flush()

    def flush(self) -> None:
        """Push buffered lines to the file now."""
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError):
                # A full disk or closed stdout must not take the proxy down; say it once per
                # flush instead of raising into the event loop.
                logging.getLogger(__name__).exception("access log flush failed")

    def reopen(self) -> None:
        """Flush, close and reopen the target (after logrotate moved the file)."""
        self.flush()
        if self._owns_file and self._file is not None:
            self._file.close()
        self._open()

    def close(self) -> None:
        """Flush and close; later :meth:`log` calls are ignored."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.flush()
        if self._owns_file and self._file is not None:
            self._file.close()
        self._file = None


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_timestamp(record.created)


_HANDLER_MARK = "_fastedge_handler"


def setup_logging(level: str = "info") -> None:
    """Configure process logging: stderr, one concise line per event, UTC timestamps.

    ``level`` is a stdlib level name (case-insensitive: debug, info, warning, error,
    critical). Calling it again replaces fastedge's handler rather than adding another.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
