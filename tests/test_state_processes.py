"""The state coordinator across real processes (issue #6): concurrent ``update`` calls from
several processes lose nothing, ``lock`` excludes across processes with increasing
fences, and a holder killed with SIGKILL keeps the lock until its ttl ends, then loses
it for good. Each process is ``python -m tests.state_worker`` against the session's
private redis-server; LocalCoordinator (per process by design) gets the same checks in
one process."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from fastedge.state import LocalCoordinator, LockNotAcquired, LockToken, RedisCoordinator
from tests.conftest import ROOT
from tests.state_worker import run_journal, run_updates, text

# Every worker run is bounded: the workers' own waits are shorter than this.
RUN_TIMEOUT = 60.0


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
def prefix() -> str:
    """Keys of one test (the Redis server lives for the whole session)."""
    return f"p{uuid.uuid4().hex[:12]}:"


class Worker:
    """One ``tests.state_worker`` process; its stdout is JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, mode: str, redis_url: str, prefix: str, *args: str) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.state_worker",
            mode,
            "--url",
            redis_url,
            "--prefix",
            prefix,
            *args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def line(self) -> dict[str, Any]:
        """The next JSON line the worker prints (bounded)."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), RUN_TIMEOUT)
        if not raw:
            stderr = await self.finish()
            raise AssertionError(f"worker ended without output: {stderr}")
        doc: dict[str, Any] = json.loads(raw)
        return doc

    async def finish(self) -> str:
        """Wait for the exit (bounded); assert it succeeded; return its stderr."""
        assert self.proc.stderr is not None
        stderr = await asyncio.wait_for(self.proc.stderr.read(), RUN_TIMEOUT)
        code = await asyncio.wait_for(self.proc.wait(), RUN_TIMEOUT)
        assert code == 0, f"worker exited {code}: {stderr.decode()}"
        return stderr.decode()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    """Started workers; whatever is still running at the end is killed."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            await worker.kill()


async def run_all(
    workers: list[Worker], mode: str, redis_url: str, prefix: str, n: int, *args: str
) -> list[dict[str, Any]]:
    """Start ``n`` workers behind one barrier; each one's JSON report."""
    for i in range(n):
        workers.append(
            await Worker.start(
                mode, redis_url, prefix, "--name", f"p{i}", "--parties", str(n), *args
            )
        )
    reports = [await w.line() for w in workers]
    for w in workers:
        await w.finish()
    return reports


# -- update: no lost update, real contention ---------------------------------------------


async def test_updates_from_two_processes_lose_nothing(
    redis_url: str, prefix: str, client: aioredis.Redis, workers: list[Worker]
) -> None:
    procs, tasks, rounds = 2, 50, 4
    total = procs * tasks * rounds
    reports = await run_all(
        workers, "update", redis_url, prefix, procs, "--tasks", str(tasks), "--rounds", str(rounds)
    )
    state = await RedisCoordinator(client, key_prefix=f"{prefix}state:").get("counter")
    assert state == {"total": total, "by": {f"p{i}": tasks * rounds for i in range(procs)}}
    # one successful compare-and-set per version: the totals the updates returned are
    # exactly 1..total, none twice, none missing
    assert sorted(t for r in reports for t in r["totals"]) == list(range(1, total + 1))
    for r in reports:
        assert r["updates"] == tasks * rounds
        assert r["retries"] == r["attempts"] - r["updates"] > 0
        # ... and the processes really raced each other: each lost some of its CAS
        # attempts to writes of the other process (not only to its own tasks). The
        # barrier starts both together; hundreds of such retries per run are typical.
        assert r["cross_process_retries"] > 0


async def test_local_coordinator_updates_in_process() -> None:
    """The same workload on LocalCoordinator, which is per process by design: within one
    event loop a read-merge-write never yields, so ``fn`` runs exactly once per update."""
    coord = LocalCoordinator()
    reports = await asyncio.gather(
        *(run_updates(coord, "counter", f"p{i}", 50, 4) for i in range(2))
    )
    assert await coord.get("counter") == {"total": 400, "by": {"p0": 200, "p1": 200}}
    assert sorted(t for r in reports for t in r.totals) == list(range(1, 401))
    assert all(r.attempts == r.updates == 200 and r.retries == 0 for r in reports)


# -- lock: exclusion and fences across processes ------------------------------------------


def journal_problems(events: list[list[Any]], journal: list[list[Any]], sections: int) -> list[str]:
    """What the enter/exit events and the journal show against mutual exclusion:
    ``sections`` critical sections must appear one after the other (an ``exit`` of the
    same holder right after each ``enter``), with strictly increasing fences, and the
    journal (a read-modify-write) must hold every section's entry in that order."""
    problems: list[str] = []
    if len(events) != 2 * sections:
        problems.append(f"{len(events)} events for {sections} sections")
    enters = events[0::2]
    for i, (enter, leave) in enumerate(zip(enters, events[1::2], strict=False)):
        if enter[0] != "enter" or leave != ["exit", *enter[1:]]:
            problems.append(f"overlap at section {i}: {enter} then {leave}")
            break
    fences = [e[2] for e in enters]
    if any(b <= a for a, b in itertools.pairwise(fences)):
        problems.append(f"fences not strictly increasing: {fences}")
    if journal != [e[1:] for e in enters]:
        problems.append(f"journal has {len(journal)} entries for {sections} sections (lost writes)")
    return problems


async def read_journal(client: aioredis.Redis, prefix: str) -> tuple[list[Any], list[Any]]:
    events = [json.loads(e) for e in await client.lrange(f"{prefix}events", 0, -1)]
    raw = await client.get(f"{prefix}journal")
    return events, json.loads(raw) if raw else []


async def test_lock_excludes_across_three_processes(
    redis_url: str, prefix: str, client: aioredis.Redis, workers: list[Worker]
) -> None:
    procs, tasks, rounds = 3, 4, 5
    reports = await run_all(
        workers, "journal", redis_url, prefix, procs, "--tasks", str(tasks), "--rounds", str(rounds)
    )
    assert [r["done"] for r in reports] == [tasks * rounds] * procs
    events, journal = await read_journal(client, prefix)
    assert journal_problems(events, journal, procs * tasks * rounds) == []
    # every process held the lock; the fences are the key's acquisition count
    assert {who.split("/")[0] for _, who, _ in events} == {"p0", "p1", "p2"}
    assert [e[2] for e in events[0::2]] == list(range(1, procs * tasks * rounds + 1))


async def test_without_the_lock_the_journal_check_fails(
    redis_url: str, prefix: str, client: aioredis.Redis, workers: list[Worker]
) -> None:
    """Control: the same critical sections without the lock interleave and lose journal
    entries, so the check above is able to see a broken lock."""
    await run_all(workers, "journal", redis_url, prefix, 2, "--tasks", "3", "--no-lock")
    events, journal = await read_journal(client, prefix)
    problems = journal_problems(events, journal, 6)
    assert any(p.startswith("overlap") for p in problems)
    assert any("lost writes" in p for p in problems) and len(journal) < 6


async def test_local_coordinator_lock_excludes_in_process(
    redis_url: str, prefix: str, client: aioredis.Redis
) -> None:
    """The same journal check with LocalCoordinator's lock, over tasks of one process."""
    coord = LocalCoordinator()
    done = await asyncio.gather(
        *(run_journal(coord, client, prefix, f"p{i}", 4, 5) for i in range(3))
    )
    assert done == [20, 20, 20]
    events, journal = await read_journal(client, prefix)
    assert journal_problems(events, journal, 60) == []


# -- a holder killed while holding the lock ----------------------------------------------


async def test_killed_holder_keeps_the_lock_until_its_ttl_ends(
    redis_url: str, prefix: str, client: aioredis.Redis, workers: list[Worker]
) -> None:
    coord = RedisCoordinator(client, key_prefix=f"{prefix}state:", timeout=5.0)
    lock_key = coord.redis_key("lock", "held")
    # the waiter is up and connected first, so it tries as soon as the holder is dead
    waiter = await Worker.start("take-over", redis_url, prefix)
    workers.append(waiter)
    assert await waiter.line() == {"ready": True}
    holder = await Worker.start("hold", redis_url, prefix, "--ttl", "2")
    workers.append(holder)
    held = await holder.line()
    dead = LockToken("held", held["fence"], held["owner"])
    dead_value = f"{dead.owner}:{dead.fence}"
    assert text(await client.get(lock_key)) == dead_value

    await holder.kill()
    assert holder.proc.returncode == -signal.SIGKILL
    # the holder is gone, its lease is not: still its value, time left on it
    assert text(await client.get(lock_key)) == dead_value
    assert await client.pttl(lock_key) > 0

    await client.rpush(f"{prefix}go", "go")
    seen = await waiter.line()
    # refused while the dead holder's lease ran (its value was still there after the
    # refusal, so the refusal happened before the expiry), and kept waiting
    assert seen["pttl_ms"] > 0 and seen["seen"] == dead_value
    assert seen["refused_at_once"] and seen["seen_after_refusal"] == dead_value
    assert seen["refusals_while_waiting"] > 0
    # ... and got the lock only once the lease had run out: not before the PTTL it read
    # (1 ms for Redis's millisecond rounding, a little more for clock granularity)
    assert seen["waited"] * 1000 >= seen["pttl_ms"] - 5
    # a fresh acquisition: the next fence, the new holder's value
    assert seen["fence"] == dead.fence + 1
    new_value = f"{seen['owner']}:{seen['fence']}"
    assert seen["value"] == new_value

    # the dead holder's token can neither free nor extend the new holder's lock
    assert not await coord.release(dead)
    assert not await coord.extend(dead, 60)
    assert text(await client.get(lock_key)) == new_value
    with pytest.raises(LockNotAcquired):
        await coord.acquire("held", ttl=10, wait=0)

    await client.rpush(f"{prefix}release", "go")
    assert await waiter.line() == {"released": True}
    await waiter.finish()
    assert await client.exists(lock_key) == 0
    assert text(await client.get(coord.redis_key("fence", "held"))) == str(dead.fence + 1)
