"""One process of the cross-process state-coordinator tests (tests/test_state_processes.py).

``python -m tests.state_worker MODE --url redis://... --prefix P [options]`` runs one
workload against a real Redis through :class:`fastedge.state.RedisCoordinator` and
prints its findings as JSON lines on stdout:

``update``
    wait at a Redis barrier for ``--parties`` processes, then ``--tasks`` concurrent
    tasks each run ``--rounds`` ``update(key, increment)`` calls on one shared state
    ``{"total": n, "by": {worker: n}}``; print an :class:`UpdateReport`.
``journal``
    wait at the barrier, then ``--tasks`` tasks each take ``lock(key)`` ``--rounds``
    times and, inside, append to a journal with a deliberately unsafe read-modify-write
    (see :func:`critical_section`); ``--no-lock`` runs the same without the lock (the
    control that shows what the lock prevents). Prints ``{"done": n}``.
``hold``
    take the lock for ``--ttl`` seconds, print ``{"owner", "fence"}`` and sleep (the
    test kills it with SIGKILL while it holds the lock).
``take-over``
    print ``{"ready": true}``, wait for the test's go, then try to take the lock the
    dead holder left behind: once without waiting, then waiting; print what it saw
    (the lock's remaining PTTL, refusals, the fence it got), hold the lock until the
    test says ``release``, release it and print whether that worked.

The workloads are plain functions over either coordinator, so the tests also run them in
one process on :class:`fastedge.state.LocalCoordinator`. Every wait here is bounded; a
worker that is not released in time exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
import uvloop

from fastedge.state import LocalCoordinator, LockNotAcquired, LockToken, RedisCoordinator

Coordinator = LocalCoordinator | RedisCoordinator

# Bounds of every blocking wait in a worker (seconds): far above what a loaded 2-core
# machine needs, far below the pytest timeout.
BARRIER_WAIT = 20.0
LOCK_WAIT = 30.0
# Redis calls through the coordinator: generous, because 50 tasks per process share
# two cores with the other processes of the test.
CALL_TIMEOUT = 5.0


def connect(url: str) -> aioredis.Redis:
    """A client whose socket timeout outlasts the blocking ``BLPOP`` waits below."""
    return aioredis.Redis.from_url(url, socket_timeout=BARRIER_WAIT + 10, socket_connect_timeout=5)


async def barrier(client: aioredis.Redis, key: str, parties: int) -> None:
    """Return once ``parties`` processes reached ``key``: the last one to arrive pushes
    one "go" per party, and everyone pops one. All workloads then start together, so
    their Redis calls really interleave."""
    if await client.incr(f"{key}:arrived") == parties:
        await client.rpush(f"{key}:go", *["go"] * parties)
    if await client.blpop([f"{key}:go"], timeout=BARRIER_WAIT) is None:
        raise SystemExit(f"barrier {key!r}: not all {parties} parties arrived")


@dataclass
class UpdateReport:
    """What one worker's ``update`` calls saw.

    ``attempts`` counts the calls of the update function (one per compare-and-set
    attempt: ``RedisCoordinator.update`` re-reads and re-runs it after a lost CAS), so
    ``retries = attempts - updates``. ``cross_process_retries`` counts the retries whose
    re-read showed that *another* worker's count had grown since the lost attempt's read:
    another process wrote inside this read-compute-write window. ``totals`` are the
    ``total`` values this worker's successful updates produced (each must be unique
    across all workers: one successful CAS per version).
    """

    name: str
    updates: int = 0
    attempts: int = 0
    retries: int = 0
    cross_process_retries: int = 0
    totals: list[int] = field(default_factory=list)


async def run_updates(
    coord: Coordinator, key: str, name: str, tasks: int, rounds: int
) -> UpdateReport:
    """``tasks`` concurrent tasks x ``rounds`` increments of ``key``'s shared state."""
    report = UpdateReport(name)

    async def one_update() -> None:
        others_seen: list[int] = []  # other workers' total count, per attempt

        def increment(old: Any) -> dict[str, Any]:
            state: dict[str, Any] = old if old is not None else {"total": 0, "by": {}}
            by: dict[str, int] = dict(state["by"])
            others_seen.append(sum(n for who, n in by.items() if who != name))
            by[name] = by.get(name, 0) + 1
            return {"total": state["total"] + 1, "by": by}

        new = await coord.update(key, increment)
        report.updates += 1
        report.attempts += len(others_seen)
        report.retries += len(others_seen) - 1
        report.cross_process_retries += sum(
            1 for before, after in itertools.pairwise(others_seen) if after > before
        )
        report.totals.append(new["total"])

    async def task() -> None:
        for _ in range(rounds):
            await one_update()

    await asyncio.gather(*(task() for _ in range(tasks)))
    return report


async def critical_section(client: aioredis.Redis, prefix: str, who: str, fence: int) -> None:
    """Log ``enter``/``exit`` events (atomic ``RPUSH``) around an append to a JSON
    journal done as ``GET``, pause, ``SET``: two of these running at once interleave
    their events and lose one of the appends, which the test detects."""
    events, journal = f"{prefix}events", f"{prefix}journal"
    await client.rpush(events, json.dumps(["enter", who, fence]))
    raw = await client.get(journal)
    entries = json.loads(raw) if raw else []
    # Widen the read-modify-write window: without mutual exclusion every concurrent
    # holder reads the same journal before any of them writes it back.
    await asyncio.sleep(0.002)
    entries.append([who, fence])
    await client.set(journal, json.dumps(entries))
    await client.rpush(events, json.dumps(["exit", who, fence]))


async def run_journal(
    coord: Coordinator | None,
    client: aioredis.Redis,
    prefix: str,
    name: str,
    tasks: int,
    rounds: int,
) -> int:
    """``tasks`` tasks x ``rounds`` critical sections under ``coord.lock("journal")``
    (no lock when ``coord`` is None: fence 0); returns how many ran."""

    async def task(i: int) -> int:
        who = f"{name}/{i}"
        for _ in range(rounds):
            if coord is None:
                await critical_section(client, prefix, who, 0)
                continue
            async with coord.lock("journal", ttl=10, wait=LOCK_WAIT) as token:
                await critical_section(client, prefix, who, token.fence)
        return rounds

    return sum(await asyncio.gather(*(task(i) for i in range(tasks))))


class CountingCoordinator(RedisCoordinator):
    """A RedisCoordinator that counts its lock attempts and refusals, to show a waiter
    was kept waiting (``acquire`` polls ``try_acquire`` until it gets the lock)."""

    attempts = 0
    refusals = 0

    async def try_acquire(self, key: str, ttl: float) -> LockToken | None:
        token = await super().try_acquire(key, ttl)
        self.attempts += 1
        self.refusals += token is None
        return token


def emit(doc: dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


def text(value: bytes | str | None) -> str | None:
    """A Redis reply as text (the clients here return bytes)."""
    return value.decode() if isinstance(value, bytes) else value


async def take_over(coord: CountingCoordinator, client: aioredis.Redis, prefix: str) -> None:
    lock_key = coord.redis_key("lock", "held")
    emit({"ready": True})
    if await client.blpop([f"{prefix}go"], timeout=BARRIER_WAIT) is None:
        raise SystemExit("take-over: no go")
    # Read the remaining lease first: the lock cannot be ours before ``started`` plus
    # that PTTL (the test compares it with how long taking it over took).
    started = time.monotonic()
    pttl_ms = await client.pttl(lock_key)
    seen = await client.get(lock_key)
    try:
        await coord.acquire("held", ttl=10, wait=0)
        refused_at_once = False
    except LockNotAcquired:
        refused_at_once = True
    seen_after_refusal = await client.get(lock_key)
    before_wait = coord.refusals
    token = await coord.acquire("held", ttl=10, wait=LOCK_WAIT)
    waited = time.monotonic() - started
    value = await client.get(lock_key)
    emit(
        {
            "pttl_ms": pttl_ms,
            "seen": text(seen),
            "refused_at_once": refused_at_once,
            "seen_after_refusal": text(seen_after_refusal),
            "refusals_while_waiting": coord.refusals - before_wait,
            "waited": waited,
            "fence": token.fence,
            "owner": token.owner,
            "value": text(value),
        }
    )
    if await client.blpop([f"{prefix}release"], timeout=BARRIER_WAIT) is None:
        raise SystemExit("take-over: never told to release")
    emit({"released": await coord.release(token)})


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["update", "journal", "hold", "take-over"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True, help="key prefix of this test run")
    parser.add_argument("--name", default="w")
    parser.add_argument("--parties", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--no-lock", action="store_true")
    args = parser.parse_args(argv)

    client = connect(args.url)
    coord = CountingCoordinator(client, key_prefix=f"{args.prefix}state:", timeout=CALL_TIMEOUT)
    try:
        if args.mode == "update":
            await barrier(client, f"{args.prefix}barrier", args.parties)
            report = await run_updates(coord, "counter", args.name, args.tasks, args.rounds)
            emit(asdict(report))
        elif args.mode == "journal":
            await barrier(client, f"{args.prefix}barrier", args.parties)
            done = await run_journal(
                None if args.no_lock else coord,
                client,
                args.prefix,
                args.name,
                args.tasks,
                args.rounds,
            )
            emit({"done": done})
        elif args.mode == "hold":
            token = await coord.acquire("held", ttl=args.ttl, wait=0)
            emit({"owner": token.owner, "fence": token.fence})
            await asyncio.sleep(60)  # killed long before; bounded if not
            return 1
        else:
            await take_over(coord, client, args.prefix)
    finally:
        await client.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
