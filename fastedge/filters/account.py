"""Account status for verified subjects: is this (validly signed) user disabled?

A signature proves who issued a token, not that the account is still in good standing; the
account check closes that gap (a disabled user's unexpired tokens stop working). Two
backends:

* ``redis_set``: ``SISMEMBER <set> <sub>`` on the shared ``[redis]`` client — a member is
  disabled. Shared by every fastedge instance, so a ban applies everywhere at once.
* ``url``: ``GET`` a status endpoint with ``{sub}`` replaced (percent-encoded). 2xx =
  active (or, with ``disabled_field``, active unless that JSON member is ``true``);
  5xx = the backend failed; any other status = disabled (e.g. 404 for an unknown user).

Answers are cached per subject for ``cache_ttl`` in an :class:`~fastedge.core.LRUCache`
(0 = ask every time), so the common path is a synchronous dictionary hit. Concurrent
misses for one subject share a single backend call. When the backend cannot answer,
``on_error`` decides: ``"deny"`` (the default: fail closed, 503) or ``"allow"``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote

import orjson

from fastedge.core import LRUCache
from fastedge.filters.jwks import FetchError, http_get

__all__ = ["ACTIVE", "DISABLED", "AccountCheckConfig", "AccountChecker", "AccountUnavailable"]

log = logging.getLogger("fastedge.auth")

ACTIVE: Final = False  # cached values: "is disabled"
DISABLED: Final = True
# Distinct subjects remembered; each entry is a few dozen bytes.
_CACHE_ENTRIES: Final = 100_000


class AccountUnavailable(Exception):
    """The account backend could not answer (unreachable, timeout, 5xx, bad body)."""


@dataclass(frozen=True, slots=True)
class AccountCheckConfig:
    """``account_check`` of an ``[auth.NAME]`` policy (exactly one of the backends)."""

    redis_set: str | None = None
    url: str | None = None
    disabled_field: str | None = None
    cache_ttl: float = 30.0
    timeout: float = 2.0
    on_error: Literal["deny", "allow"] = "deny"


class AccountChecker:
    """Answers "is ``sub`` disabled?" from the cache or, asynchronously, the backend."""

    def __init__(
        self,
        config: AccountCheckConfig,
        *,
        redis: Any = None,
        fetch: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.redis_set is not None and redis is None:
            raise ValueError("account_check.redis_set needs a [redis] client")
        self.config = config
        self._redis = redis
        self._fetch = fetch or http_get
        self._clock = clock
        self._cache = LRUCache(_CACHE_ENTRIES)
        self._pending: dict[str, asyncio.Future[bool]] = {}
        self.backend_calls = 0

    def cached(self, sub: str) -> bool | None:
        """The cached answer (``True`` = disabled), or ``None`` when the backend must be
        asked."""
        result: bool | None = self._cache.get(sub, now=self._clock())
        return result

    async def lookup(self, sub: str) -> bool:
        """Ask the backend (sharing a call already in flight for ``sub``); cache the answer.

        Raises :class:`AccountUnavailable` when it cannot answer.
        """
        pending = self._pending.get(sub)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled ourselves
                raise AccountUnavailable("the shared account lookup was cancelled") from None
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[sub] = future
        try:
            disabled = await self._ask(sub)
        except AccountUnavailable as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it; nobody else must log it
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            self._pending.pop(sub, None)
        future.set_result(disabled)
        if self.config.cache_ttl > 0:
            self._cache.set(sub, disabled, ttl=self.config.cache_ttl, now=self._clock())
        return disabled

    async def _ask(self, sub: str) -> bool:
        self.backend_calls += 1
        cfg = self.config
        if cfg.redis_set is not None:
            try:
                async with asyncio.timeout(cfg.timeout):
                    member = await self._redis.sismember(cfg.redis_set, sub)
            except TimeoutError:
                raise AccountUnavailable(f"redis: no answer within {cfg.timeout:g}s") from None
            except Exception as exc:  # redis.exceptions.* and OSError: all mean "no answer"
                raise AccountUnavailable(f"redis: {exc}") from None
            return bool(member)
        assert cfg.url is not None
        url = cfg.url.replace("{sub}", quote(sub, safe=""))
        try:
            response = await self._fetch(url, timeout=cfg.timeout)
        except FetchError as exc:
            raise AccountUnavailable(str(exc)) from None
        if response.status >= 500:
            raise AccountUnavailable(f"GET {url}: status {response.status}")
        if not 200 <= response.status < 300:
            return DISABLED
        if cfg.disabled_field is None:
            return ACTIVE
        try:
            doc = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise AccountUnavailable(f"GET {url}: body is not JSON") from None
        if not isinstance(doc, dict):
            raise AccountUnavailable(f"GET {url}: body is not a JSON object")
        # Only a JSON true disables: a missing member means the service has no such flag.
        return DISABLED if doc.get(cfg.disabled_field) is True else ACTIVE
