"""Memory per idle keep-alive connection (issue 9): fastedge and nginx.

For each proxy: start it on the proxy CPU (the same pinning as the load runs), send one
request, read the resident set of its whole process tree (nginx: master and worker),
then open ``connections`` client connections that each send one ``GET /small`` and then
stay open and idle, wait a second, and read the resident set again. ``(after - before) /
connections`` is what one idle kept-alive client connection costs the proxy in user
space (kernel socket buffers are not in RSS, for any proxy). Both proxies keep idle
connections 75 s, far longer than the measurement.

10,000 connections need ~10,000 descriptors in this process and as many in the proxy
(idle clients hold no upstream connection; the pool stays at its few dozen):
:func:`raise_nofile` lifts ``RLIMIT_NOFILE`` before anything starts, so the proxies
inherit it, and the connection count is lowered (and the report says so) when the limit
cannot be raised far enough. Everything is bounded: connecting and reading time out, the held
connections are closed before the proxy is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.load import run, variants

MEASURE_TIMEOUT_S = 120.0  # the whole fill of one proxy; 10k connections take a few s
SETTLE_S = 1.0  # after the fill, before the second RSS reading
FILL_CONCURRENCY = 200  # connections being opened at once (below every listen backlog)
FD_SLACK = 1000  # listeners, the upstream pool, logs, the interpreter's own files


@dataclass(frozen=True)
class MemoryResult:
    """One proxy's numbers (KiB of resident memory)."""

    proxy: str
    connections: int
    held: int  # still open when the second reading was taken
    before_kib: int
    after_kib: int

    @property
    def per_connection_kib(self) -> float:
        """Resident KiB per held connection."""
        return (self.after_kib - self.before_kib) / self.held if self.held else float("nan")


def raise_nofile(wanted: int) -> int:
    """Raise this process's ``RLIMIT_NOFILE`` towards ``wanted``; children inherit it.
    The hard limit is raised too when allowed (root), else the soft one stops at it.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass  # not privileged: up to the hard limit only
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def connections_within_limit(wanted: int) -> int:
    """How many connections the descriptor limits allow (the proxy needs the most)."""
    limit = raise_nofile(wanted + FD_SLACK)
    return max(1, min(wanted, limit - FD_SLACK))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in KiB (Linux ``/proc``)."""
    total = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        stack += _children(current)
    return total


async def _open_one(
    port: int, held: list[asyncio.StreamWriter], readers: list[asyncio.StreamReader]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {run.SCENARIOS['small']} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200") or body != run.SMALL_BODY.encode():
        writer.close()
        raise run.ProxyFailed(f"unexpected answer {head[:60]!r}")
    held.append(writer)
    readers.append(reader)


async def _hold(port: int, count: int, read_rss: Callable[[], int]) -> tuple[int, int]:
    """Open ``count`` kept-alive connections; return (connections still open, RSS)."""
    held: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    gate = asyncio.Semaphore(FILL_CONCURRENCY)

    async def one() -> None:
        async with gate:
            await _open_one(port, held, readers)

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), MEASURE_TIMEOUT_S)
        await asyncio.sleep(SETTLE_S)
        rss = read_rss()
        still_open = sum(1 for r in readers if not r.at_eof())
        return still_open, rss
    finally:
        for writer in held:
            writer.close()
        await asyncio.sleep(0)


def _fastedge_command(workdir: Path, port: int, upstream_port: int, connections: int) -> list[str]:
    return variants.run_file_command(
        workdir, variants.memory_config(port, upstream_port, connections)
    )


def _nginx_command(
    workdir: Path, port: int, upstream_port: int, connections: int, nginx: str
) -> list[str]:
    fds = connections + FD_SLACK
    default = "events { worker_connections 4096; }"
    text = run.proxy_nginx_conf(workdir, port, upstream_port)
    if default not in text:
        raise run.HarnessError("proxy_nginx_conf changed: update bench/load/memory.py")
    limits = f"worker_rlimit_nofile {fds};\nevents {{ worker_connections {fds}; }}"
    return run.nginx_command(workdir, text.replace(default, limits), nginx)


def measure(bench: run.Bench, proxy: str, connections: int) -> MemoryResult:
    """Start ``proxy`` ("fastedge" or "nginx"), measure, stop it."""
    workdir = bench.workdir / f"memory-{proxy}"
    workdir.mkdir()
    port = run.free_port()
    if proxy == "nginx":
        argv = _nginx_command(workdir, port, bench.upstream_port, connections, bench.tools["nginx"])
        log = workdir / "error.log"
    else:
        argv = _fastedge_command(workdir, port, bench.upstream_port, connections)
        log = workdir / "output.log"
    proc = bench.processes.start(argv, workdir / "output.log", run.PROXY_CPU)
    try:
        run.wait_ready(proc, port, log)
        time.sleep(SETTLE_S)
        before = tree_rss_kib(proc.pid)
        held, after = asyncio.run(_hold(port, connections, lambda: tree_rss_kib(proc.pid)))
        if proc.poll() is not None:
            raise run.ProxyFailed(f"exited with code {proc.returncode}")
        return MemoryResult(proxy, connections, held, before, after)
    finally:
        bench.processes.stop(proc)


def run_memory(bench: run.Bench, connections: int) -> tuple[list[MemoryResult], dict[str, str]]:
    """Measure every proxy of the run that this scenario covers (nginx, fastedge)."""
    results: list[MemoryResult] = []
    failures: dict[str, str] = {}
    for proxy in ("nginx", "fastedge"):
        if proxy not in bench.proxies:
            continue
        try:
            result = measure(bench, proxy, connections)
        except (
            run.ProxyFailed,
            run.HarnessError,
            OSError,
            asyncio.IncompleteReadError,
            TimeoutError,
        ) as exc:
            failures[proxy] = f"{type(exc).__name__}: {exc}"
            print(f"  memory    {proxy:<9} FAILED: {failures[proxy]}", flush=True)
            continue
        results.append(result)
        print(
            f"  memory    {proxy:<9} {result.held:>6} idle connections: "
            f"{result.before_kib:,} -> {result.after_kib:,} KiB RSS, "
            f"{result.per_connection_kib:.2f} KiB each",
            flush=True,
        )
    return results, failures


def markdown(results: list[MemoryResult], failures: dict[str, str]) -> str:
    """The memory table for the report."""
    lines = [
        "| proxy | idle keep-alive connections | RSS before | RSS while open | per connection |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.proxy} | {r.held:,} of {r.connections:,} | {r.before_kib:,} KiB "
            f"| {r.after_kib:,} KiB | {r.per_connection_kib:.2f} KiB |"
        )
    for proxy, reason in failures.items():
        cell = " ".join(reason.split()).replace("|", "\\|")[:200]
        lines.append(f"| {proxy} | error | - | - | {cell} |")
    return "\n".join(lines)
