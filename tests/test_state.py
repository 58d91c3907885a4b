"""The state coordinator: one suite over LocalCoordinator and RedisCoordinator (real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis

from fastedge.state import (
    LocalCoordinator,
    LockNotAcquired,
    LockToken,
    RedisCoordinator,
    StateUnavailable,
)
from tests.conftest import free_port

Coordinator = LocalCoordinator | RedisCoordinator


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Coordinators sharing one backend (for Redis: separate client connections), and a
    way to make a held lock expire without sleeping."""

    coords: list[Coordinator]
    expire: Callable[[str], Awaitable[None]]
    kind: str
    clients: list[Any] = field(default_factory=list)

    @property
    def coord(self) -> Coordinator:
        return self.coords[0]


def redis_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)


@pytest.fixture(params=["local", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "local":
        clock = FakeClock()
        local = LocalCoordinator(clock=clock)

        async def expire_local(key: str) -> None:
            clock.now += 3600  # past any lock ttl used here

        yield Harness([local, local], expire_local, "local")
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"t{uuid.uuid4().hex[:12]}:state:"
    clients = [redis_client(url), redis_client(url)]
    coords: list[Coordinator] = [
        RedisCoordinator(c, key_prefix=prefix, timeout=2.0) for c in clients
    ]

    async def expire_redis(key: str) -> None:
        # what a PX expiry does: the lock key is gone (the fence counter stays)
        await clients[0].delete(f"{prefix}lock:{key}")

    try:
        yield Harness(coords, expire_redis, "redis", clients)
    finally:
        for c in clients:
            await c.aclose()


async def test_get_put_delete(harness: Harness) -> None:
    c = harness.coord
    assert await c.get("s") is None
    await c.put("s", {"n": 1, "tags": ["a"]})
    assert await harness.coords[1].get("s") == {"n": 1, "tags": ["a"]}
    assert await c.delete("s")
    assert not await c.delete("s")
    assert await c.get("s") is None


async def test_update_sees_none_then_the_value(harness: Harness) -> None:
    seen: list[Any] = []

    def bump(old: Any) -> dict[str, int]:
        seen.append(old)
        return {"n": (old or {"n": 0})["n"] + 1}

    assert await harness.coord.update("u", bump) == {"n": 1}
    assert await harness.coord.update("u", bump) == {"n": 2}
    assert seen[0] is None and seen[-1] == {"n": 1}


async def test_concurrent_updates_lose_nothing(harness: Harness) -> None:
    # 60 tasks x 3 increments, alternating between the two clients (connections)
    async def worker(i: int) -> None:
        coord = harness.coords[i % 2]
        for _ in range(3):
            await coord.update("counter", lambda old: (old or 0) + 1)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(i) for i in range(60)))
    assert await harness.coord.get("counter") == 180


async def test_update_after_delete_and_recreate_is_not_aba(harness: Harness) -> None:
    c = harness.coord
    await c.put("a", 1)
    await c.delete("a")
    await c.put("a", 5)
    assert await c.update("a", lambda old: old * 2) == 10


async def test_lock_exclusion_under_contention(harness: Harness) -> None:
    inside = 0
    most = 0
    order: list[int] = []

    async def worker(i: int) -> None:
        nonlocal inside, most
        async with harness.coords[i % 2].lock("res", ttl=30, wait=30) as token:
            inside += 1
            most = max(most, inside)
            order.append(token.fence)
            for _ in range(3):
                await asyncio.sleep(0)
            inside -= 1

    await asyncio.gather(*(worker(i) for i in range(12)))
    assert most == 1 and len(order) == 12
    assert order == sorted(order) and len(set(order)) == 12  # fences strictly increase


async def test_held_lock_is_not_acquired_without_waiting(harness: Harness) -> None:
    async with harness.coord.lock("busy", ttl=30) as token:
        with pytest.raises(LockNotAcquired):
            await harness.coords[1].acquire("busy", ttl=30, wait=0)
        assert isinstance(token, LockToken) and token.key == "busy"
    again = await harness.coords[1].acquire("busy", ttl=30, wait=0)
    assert again.fence > token.fence
    assert await harness.coords[1].release(again)


async def test_expired_holder_cannot_release_the_new_holders_lock(harness: Harness) -> None:
    c1, c2 = harness.coords
    old = await c1.acquire("job", ttl=5, wait=0)
    await harness.expire("job")
    new = await c2.acquire("job", ttl=30, wait=0)  # taken over after expiry
    assert new.fence > old.fence
    assert not await c1.release(old)  # compare-and-delete: not ours any more
    with pytest.raises(LockNotAcquired):
        await c1.acquire("job", ttl=30, wait=0)  # still held by `new`
    assert await c2.release(new)
    assert not await c2.release(new)  # twice: nothing to free


async def test_fencing_tokens_strictly_increase_across_clients(harness: Harness) -> None:
    fences = []
    for i in range(6):
        coord = harness.coords[i % 2]
        token = await coord.acquire("f", ttl=30, wait=0)
        fences.append(token.fence)
        await coord.release(token)
    assert fences == sorted(set(fences)) and len(fences) == 6


async def test_lock_released_when_block_raises(harness: Harness) -> None:
    with pytest.raises(RuntimeError):
        async with harness.coord.lock("boom", ttl=30):
            raise RuntimeError("inside")
    token = await harness.coords[1].acquire("boom", ttl=30, wait=0)
    assert await harness.coords[1].release(token)


async def test_non_json_value_is_refused(harness: Harness) -> None:
    with pytest.raises(TypeError):
        await harness.coord.put("bad", object())
    with pytest.raises(ValueError):
        await harness.coord.acquire("x", ttl=0)


async def test_redis_extend_only_by_owner(redis_url: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:12]}:state:"
    clients = [redis_client(redis_url), redis_client(redis_url)]
    try:
        c1, c2 = (RedisCoordinator(c, key_prefix=prefix) for c in clients)
        token = await c1.acquire("ext", ttl=5, wait=0)
        assert await c1.extend(token, 60)
        assert 50_000 < await clients[0].pttl(f"{prefix}lock:ext") <= 60_000
        forged = LockToken("ext", token.fence, "someone-else")
        assert not await c2.extend(forged, 60)
        assert not await c2.release(forged)
        assert await c1.release(token)
    finally:
        for c in clients:
            await c.aclose()


async def test_redis_down_raises_state_unavailable() -> None:
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.25, socket_connect_timeout=0.25
    )
    coord = RedisCoordinator(client, timeout=0.25)
    try:
        with pytest.raises(StateUnavailable, match="redis"):
            await coord.get("k")
        with pytest.raises(StateUnavailable):
            await coord.update("k", lambda old: 1)
        with pytest.raises(StateUnavailable):
            await coord.acquire("k", ttl=1, wait=5)  # no waiting on a dead backend
        with pytest.raises(StateUnavailable):
            async with coord.lock("k"):
                pass  # pragma: no cover
    finally:
        await client.aclose()
