"""Soak run: mixed load through a real ``fastedge run`` for a while, watching for leaks.

    python -m bench.soak --duration 600 [--connections 32] [--http auto|h11|fast]

Starts the test origin (``tests/origin.py``) and ``fastedge run`` with a temporary
config as subprocesses, drives mixed traffic with its own asyncio HTTP/1.1 client (small
and 64 KiB GETs, POSTs with bodies, pipelined pairs, HEADs, a stripped-prefix route,
a route with JWT auth and a per-user limit (with a bearer token, and without: 401),
tracing at 1% on everything, connections closed after a random number of requests), and
samples the proxy's RSS and open descriptors once a second from ``/proc``.

Growth is measured after warm-up (the first 20% of the run, while pools, allocator
arenas and caches fill): the median of the first five samples after warm-up against the
median of the last five, both under load (medians, so one sample taken during a burst of
connection churn does not decide). Exit status 1 when any request failed or either
figure grew by 10% or more; 0 otherwise. Bounded by ``--duration``; every process it
started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench.load.variants import JWT_SECRET, JWT_SECRET_ENV, bench_token, chain_policies

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 15.0  # per request; a stuck request is an error, not a hang
GROWTH_LIMIT = 10.0  # percent
WINDOW = 5  # samples per median window


# --- processes -------------------------------------------------------------------------


def start_origin() -> tuple[subprocess.Popen[str], int]:
    """``tests/origin.py`` as its own process; returns it and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.origin", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        stop(proc)
        raise RuntimeError(f"origin did not start: {line!r}")
    return proc, int(line.split()[1])


def free_port() -> int:
    """A port free right now (the proxy binds it a moment later; loopback, so no race
    with anything but this machine's other tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(directory: Path, port: int, origin_port: int, http: str) -> Path:
    path = directory / "soak.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
http = "{http}"
access_log = false

[admin]
enabled = false

[upstreams.origin]
targets = ["http://127.0.0.1:{origin_port}"]

[[routes]]
prefix = "/"
upstream = "origin"

[[routes]]
prefix = "/api"
upstream = "origin"
strip_prefix = true

# The same origin behind every resilience feature of one tier (health checks, a breaker,
# outlier detection, retries): the express lane's resilience contract.
[upstreams.guarded]
targets = ["http://127.0.0.1:{origin_port}"]

[upstreams.guarded.health_check]
path = "/bytes/1"
interval = "1s"

[upstreams.guarded.breaker]
[upstreams.guarded.outlier]
[upstreams.guarded.retry]

[[routes]]
prefix = "/guarded"
upstream = "guarded"
strip_prefix = true

# The full policy chain (issue 9): auth from its verification cache, a local per-user
# limit that is never reached, tracing at 1% (kept in memory: spans are objects too).
{chain_policies(memory_spans=200)}
[[routes]]
prefix = "/secure"
upstream = "origin"
strip_prefix = true
auth = "bench"
rate_limit = "per_user"
"""
    )
    return path


def start_proxy(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fastedge", "--log-level", "warning", "run", "-c", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, JWT_SECRET_ENV: JWT_SECRET},
        )


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastedge exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("fastedge did not start listening")


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM (graceful), then SIGKILL after ``grace`` seconds; release pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# --- sampling --------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int


def sample(pid: int, t: float) -> Sample:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Sample(t, rss, len(os.listdir(f"/proc/{pid}/fd")))


# --- the load ------------------------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)

    def fail(self, why: str) -> None:
        self.errors += 1
        self.error_kinds[why] += 1


class BadResponse(Exception):
    """The response was not what the request should get."""


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> tuple[int, bytes]:
    """One response: (status, body). Handles content-length and chunked framing."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if head or status in (204, 304) or status < 200:
        return status, b""
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, bytes(body)
            body += await reader.readexactly(size + 2)
            del body[-2:]
    if b"content-length" in fields:
        return status, await reader.readexactly(int(fields[b"content-length"]))
    return status, await reader.read()  # close-delimited


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: soak.test\r\n{extra}\r\n".encode()


TOKEN = bench_token()  # valid for a day: longer than any soak


async def one_operation(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rng: random.Random, stats: Stats
) -> None:
    """One randomly chosen exchange (or pipelined pair); raises BadResponse on a mismatch."""
    kind = rng.choices(
        ["small", "large", "post", "pipelined", "head", "prefix", "secure", "anonymous", "guarded"],
        weights=[30, 15, 20, 10, 10, 15, 20, 3, 15],
    )[0]
    stats.kinds[kind] += 1
    if kind == "small":
        writer.write(get("/bytes/100"))
        expect = [(200, 100)]
    elif kind == "large":
        writer.write(get("/bytes/65536"))
        expect = [(200, 65536)]
    elif kind == "prefix":
        writer.write(get("/api/bytes/10"))  # strip_prefix → /bytes/10
        expect = [(200, 10)]
    elif kind == "guarded":  # a resilient upstream (health checks, breaker, retries)
        writer.write(get("/guarded/bytes/100"))
        expect = [(200, 100)]
    elif kind == "secure":  # auth + limit + tracing: the express lane's policy chain
        writer.write(get("/secure/bytes/100", extra=f"Authorization: Bearer {TOKEN}\r\n"))
        expect = [(200, 100)]
    elif kind == "anonymous":  # refused by auth: the general path's 401
        writer.write(get("/secure/bytes/100"))
        status, _ = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
        stats.requests += 1
        if status != 401:
            raise BadResponse(f"anonymous: {status}")
        return
    elif kind == "head":
        writer.write(get("/bytes/1000", "HEAD"))
        status, body = await asyncio.wait_for(read_response(reader, head=True), REQUEST_TIMEOUT)
        stats.requests += 1
        if status != 200 or body:
            raise BadResponse(f"HEAD: {status}")
        return
    elif kind == "post":
        body = rng.randbytes(rng.choice([0, 10, 1000, 20_000]))
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: soak.test\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        status, answer = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
        stats.requests += 1
        if status != 200 or json.loads(answer)["body_length"] != len(body):
            raise BadResponse(f"POST: {status}")
        return
    else:  # two requests in one write: the proxy must answer both, in order
        writer.write(get("/bytes/10") + get("/bytes/20"))
        expect = [(200, 10), (200, 20)]
    for want_status, want_len in expect:
        status, body = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
        stats.requests += 1
        if status != want_status or len(body) != want_len:
            raise BadResponse(f"{kind}: {status} with {len(body)} bytes")


async def worker(port: int, deadline: float, seed: int, stats: Stats) -> None:
    """Connections one after another, each carrying 1-50 operations (keep-alive churn)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            stats.fail(f"connect: {exc.__class__.__name__}")
            await asyncio.sleep(0.1)
            continue
        try:
            for _ in range(rng.randint(1, 50)):
                if loop.time() >= deadline:
                    break
                await one_operation(reader, writer, rng, stats)
        except BadResponse as exc:
            stats.fail(str(exc))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            stats.fail(exc.__class__.__name__)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


S = TypeVar("S")


async def drive_load(
    pid: int,
    duration: float,
    connections: int,
    stats: S,
    worker: Callable[[float, int, S], Coroutine[Any, Any, None]],
    grace: float,
) -> list[Sample]:
    """Run ``connections`` workers until ``duration`` ends, sampling ``pid`` each second.

    ``worker(deadline, seed, stats)`` loops until the deadline; ``grace`` bounds how long
    the last requests may take after it (then they are cancelled).
    """
    samples: list[Sample] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + duration
    tasks = [asyncio.create_task(worker(deadline, seed, stats)) for seed in range(connections)]
    try:
        while loop.time() < deadline:
            samples.append(sample(pid, loop.time() - start))
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
        # Workers stop at the deadline after their current request (bounded by its timeout).
        await asyncio.wait_for(asyncio.gather(*tasks), grace)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return samples


async def drive(
    port: int, pid: int, duration: float, connections: int
) -> tuple[Stats, list[Sample]]:
    stats = Stats()

    async def run(deadline: float, seed: int, stats: Stats) -> None:
        await worker(port, deadline, seed, stats)

    samples = await drive_load(pid, duration, connections, stats, run, REQUEST_TIMEOUT + 5)
    return stats, samples


# --- verdict -------------------------------------------------------------------------


def growth(before: float, after: float) -> float:
    return 0.0 if before <= 0 else (after - before) / before * 100.0


class Counts(Protocol):
    """What a soak run's summary needs from its statistics."""

    requests: int
    errors: int
    kinds: Counter[str]
    error_kinds: Counter[str]


def summarise(
    stats: Counts, samples: list[Sample], duration: float, details: Sequence[str] = ()
) -> int:
    """Print the run's summary and return the exit status: 1 on any error or on RSS/FD
    growth of ``GROWTH_LIMIT`` % or more after warm-up (the first 20% of the run).
    ``details`` are extra lines printed after the request count."""
    warm = [s for s in samples if s.t >= duration * 0.2]
    if len(warm) < 2 * WINDOW:
        # Too short a run to compare two windows; compare single samples.
        first, last = warm[:1] or samples[:1], warm[-1:] or samples[-1:]
    else:
        first, last = warm[:WINDOW], warm[-WINDOW:]
    rss0 = statistics.median(s.rss_kib for s in first)
    rss1 = statistics.median(s.rss_kib for s in last)
    fd0 = statistics.median(s.fds for s in first)
    fd1 = statistics.median(s.fds for s in last)
    rss_growth, fd_growth = growth(rss0, rss1), growth(fd0, fd1)
    rate = stats.requests / duration if duration else 0.0
    print(f"duration      {duration:.0f} s, {len(samples)} samples")
    print(f"requests      {stats.requests} ({rate:.0f}/s)")
    print(f"mix           {dict(sorted(stats.kinds.items()))}")
    for line in details:
        print(line)
    print(f"errors        {stats.errors}  {dict(stats.error_kinds) if stats.errors else ''}")
    print(f"rss (KiB)     warm-up end {rss0:.0f}  end {rss1:.0f}  growth {rss_growth:+.1f}%")
    print(f"open fds      warm-up end {fd0:.0f}  end {fd1:.0f}  growth {fd_growth:+.1f}%")
    ok = stats.errors == 0 and rss_growth < GROWTH_LIMIT and fd_growth < GROWTH_LIMIT
    print("result        " + ("ok" if ok else "FAIL"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients")
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "fast"])
    args = parser.parse_args(argv)
    origin, origin_port = start_origin()
    proxy: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="fastedge-soak-") as tmp:
        log = Path(tmp) / "fastedge.log"
        try:
            port = free_port()
            proxy = start_proxy(write_config(Path(tmp), port, origin_port, args.http), log)
            wait_listening(port, proxy)
            stats, samples = asyncio.run(drive(port, proxy.pid, args.duration, args.connections))
            status = summarise(stats, samples, args.duration)
            if proxy.poll() is not None:
                print(f"fastedge exited during the run ({proxy.returncode})")
                status = 1
        finally:
            if proxy is not None:
                stop(proxy)
            stop(origin)
            if log.exists() and log.stat().st_size:
                print("--- fastedge output ---")
                print(log.read_text(errors="replace")[-4000:])
    return status


if __name__ == "__main__":
    sys.exit(main())
