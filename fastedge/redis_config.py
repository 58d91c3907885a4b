"""The ``[redis]`` section: where the state shared between fastedge instances lives.

Present = features that must agree across instances (``backend = "redis"`` rate limits,
later cache fill locks, traffic splits) use this server. Absent = everything stays
in-process, and a rate limit that asks for ``backend = "redis"`` is a config error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from fastedge.config import (
    _build,
    _Context,
    _duration_at_least,
    _field,
    _Key,
    _read_table,
    _Schema,
    _show,
    _string,
)

__all__ = ["DEFAULT_TIMEOUT", "RedisConfig", "convert_redis_section"]

#: Socket and command timeout. A healthy Redis answers an EVALSHA in 0.1-0.5 ms on a LAN,
#: so 250 ms is ~500x a normal round trip: only a sick or unreachable server reaches it,
#: and it caps what a Redis outage adds to a request at a quarter second, well below
#: client timeouts. It still fits a first TCP + TLS (``rediss://``) connect across a
#: region. (Envoy's global rate-limit filter defaults to 20 ms, but it talks to a local
#: sidecar over an already-open gRPC channel, not to the store itself.)
DEFAULT_TIMEOUT: Final = 0.25

_SCHEMES: Final = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """``[redis]``: the shared Redis server.

    ``url`` is passed to ``redis.asyncio.Redis.from_url`` unchanged (a password in it is
    hidden by :func:`fastedge.config.redacted`); ``timeout`` bounds every call (seconds);
    ``key_prefix`` starts every key fastedge writes, so several deployments (or tests)
    can share one Redis database.
    """

    url: str
    timeout: float = DEFAULT_TIMEOUT
    key_prefix: str = "fastedge:"


def _redis_url(value: object) -> str:
    text = _string(value)
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"invalid URL {_show(text)}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        listed = ", ".join(f"'{s}://'" for s in _SCHEMES)
        raise ValueError(f"URL scheme must be {listed}, got {_show(parts.scheme)} in {_show(text)}")
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"a unix:// URL needs a socket path, got {_show(text)}")
        return text
    if not parts.hostname:
        raise ValueError(f"URL needs a host, got {_show(text)}")
    if port == 0:
        raise ValueError(f"port must be between 1 and 65535 in {_show(text)}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the path must be a database number ('/0'), got {_show(parts.path)}")
    return text


def _key_prefix(value: object) -> str:
    text = _string(value)
    if len(text) > 64:
        raise ValueError(f"must be at most 64 characters, got {len(text)}")
    return text


_REDIS_SCHEMA: Final[_Schema] = {
    "url": _Key(_field(_redis_url), required=True),
    "timeout": _Key(_field(_duration_at_least(0.0, inclusive=False))),
    "key_prefix": _Key(_field(_key_prefix)),
}


def convert_redis_section(ctx: _Context, path: str, value: object) -> Any:
    """Converter for ``[redis]`` (registered in ``fastedge.config.EXTENSION_SECTIONS``).

    Returns a :class:`RedisConfig`, or ``_INVALID`` after recording every problem in
    ``ctx`` with its key path (``redis.url: URL scheme must be ...``).
    """
    return _build(_read_table(ctx, path, value, _REDIS_SCHEMA), RedisConfig)
