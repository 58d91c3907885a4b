"""The ``fastedge`` command as users run it: real processes, real signals, real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastedge import __version__
from tests.conftest import ROOT, Client, free_port, get, rss_kib, running_demo, wait_port

EXAMPLE = ROOT / "examples" / "fastedge.toml"


def fastedge(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastedge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        **kw,  # type: ignore[call-overload]
    )


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def start(procs: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [sys.executable, "-m", "fastedge", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    procs.append(p)
    return p


def finish(p: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = p.communicate(timeout=30)
    return p.returncode, err.decode()


def test_version() -> None:
    out = fastedge("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"fastedge {__version__}"


def test_check_accepts_the_example() -> None:
    out = fastedge("check", "-c", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_check_reports_every_error_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nlisten = "nope"\nworkers = "two"\n'
        '[upstreams.users]\ntargets = ["http://127.0.0.1:9001"]\n'
        '[[routes]]\nprefix = "/a"\nupstream = "users"\n'
        '[[routes]]\nprefix = "/b"\nupstream = "userz"\n'
    )
    out = fastedge("check", "-c", str(bad))
    assert out.returncode == 2
    assert "server.listen" in out.stderr
    assert "server.workers" in out.stderr
    assert "routes[1].upstream" in out.stderr and "userz" in out.stderr


def test_check_missing_file_is_exit_2(tmp_path: Path) -> None:
    out = fastedge("check", "-c", str(tmp_path / "absent.toml"))
    assert out.returncode == 2
    assert "absent.toml" in out.stderr


async def test_reverse_proxy_one_liner(
    origin_port: int, spawn: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    p = start(
        spawn,
        "reverse-proxy",
        "--from",
        f"127.0.0.1:{port}",
        "--to",
        f"http://127.0.0.1:{origin_port}",
    )
    await wait_port(port, p)
    client = await Client.open(port)
    for _ in range(3):
        await client.send(get("/echo"))
        resp = await client.read_response()
        assert resp.status == 200
    await client.close()
    p.send_signal(signal.SIGTERM)
    code, err = finish(p)
    assert code == 0, err


async def test_run_reloads_on_sighup_and_drains_on_sigterm(
    origin_port: int, tmp_path: Path, spawn: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    cfg = tmp_path / "fastedge.toml"

    def write(prefix: str) -> None:
        cfg.write_text(
            f'[server]\nlisten = "127.0.0.1:{port}"\naccess_log = false\n'
            "[admin]\nenabled = false\n"
            f'[upstreams.o]\ntargets = ["http://127.0.0.1:{origin_port}"]\n'
            f'[[routes]]\nprefix = "{prefix}"\nupstream = "o"\nstrip_prefix = true\n'
        )

    write("/one")
    p = start(spawn, "run", "-c", str(cfg))
    await wait_port(port, p)
    client = await Client.open(port)
    await client.send(get("/one/x"))
    assert (await client.read_response()).header("x-origin-path") == b"/x"
    write("/two")
    p.send_signal(signal.SIGHUP)
    for _ in range(100):  # the reload happens asynchronously in the server process
        await client.send(get("/two/y"))
        resp = await client.read_response()
        if resp.status == 200:
            break
        await asyncio.sleep(0.05)
    assert resp.header("x-origin-path") == b"/y"
    # an in-flight request survives SIGTERM
    await client.send(get("/two/slow?ms=300"))
    await asyncio.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    resp = await client.read_response()
    assert resp.status == 200 and resp.body == b"slow"
    await client.close()
    code, err = finish(p)
    assert code == 0, err


async def _token(client: Client, sub: str) -> str:
    body = json.dumps({"sub": sub}).encode()
    await client.send(
        b"POST /api/auth/token HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    resp = await client.read_response()
    assert resp.status == 200, resp
    token: str = json.loads(resp.body)["token"]
    assert token.count(".") == 2
    return token


async def test_demo_end_to_end() -> None:
    async with running_demo("t0ken") as server:
        client = await Client.open(server.port)
        await client.send(get("/api/products"))
        products = await client.read_response()
        assert products.status == 200 and products.header("x-version") == b"blue"
        # /api/users: zero trust
        await client.send(get("/api/users"))
        missing = await client.read_response()
        assert missing.status == 401 and missing.header("www-authenticate") is not None
        alice = await _token(client, "alice")
        bearer = f"Authorization: Bearer {alice}\r\n"
        await client.send(get("/api/users/alice", extra=bearer))
        me = await client.read_response()
        assert me.status == 200 and b"alice" in me.body
        mallory = await _token(client, "mallory")
        await client.send(get("/api/users", extra=f"Authorization: Bearer {mallory}\r\n"))
        disabled = await client.read_response()
        assert disabled.status == 403 and b"account disabled" in disabled.body
        # 20 requests per 10 s per user: alice used one above
        statuses = []
        for _ in range(21):
            await client.send(get("/api/users", extra=bearer))
            resp = await client.read_response()
            statuses.append(resp.status)
        assert statuses == [200] * 19 + [429, 429]
        assert resp.header("retry-after") is not None and resp.header("ratelimit") is not None
        await client.send(get("/nowhere"))
        assert (await client.read_response()).status == 404
        await client.close()
        admin = await Client.open(server.admin_port or 0)
        await admin.send(get("/metrics", extra="Authorization: Bearer t0ken\r\n"))
        metrics = await admin.read_response()
        assert metrics.status == 200
        assert b'fastedge_requests_total{route="/api/users"' in metrics.body
        await admin.send(get("/traces?limit=3", extra="Authorization: Bearer t0ken\r\n"))
        traces = json.loads((await admin.read_response()).body)["spans"]
        assert len(traces) == 3
        assert {"GET /api/users", "GET"} <= {t["name"] for t in traces}  # 404: no route
        await admin.close()


async def _upload(port: int, total: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % total)
    block = b"u" * (1 << 20)
    sent = 0
    while sent < total:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    data += await asyncio.wait_for(reader.read(100), 10)
    writer.close()
    await writer.wait_closed()
    return data


async def _download(port: int, total: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(get(f"/bytes/{total}"))
    await reader.readuntil(b"\r\n\r\n")
    got = 0
    while got < total:
        chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
        if not chunk:
            break
        got += len(chunk)
    writer.close()
    await writer.wait_closed()
    return got


@pytest.mark.slow
@pytest.mark.parametrize("http", ["fast", "h11"])
async def test_1gib_up_and_down_keep_rss_flat(
    origin_port: int, spawn: list[subprocess.Popen[bytes]], http: str
) -> None:
    """No whole-body buffering: 1 GiB each way through the proxy grows RSS < 64 MiB."""
    total = 1 << 30
    port = free_port()
    p = start(
        spawn,
        "reverse-proxy",
        "--from",
        f"127.0.0.1:{port}",
        "--to",
        f"http://127.0.0.1:{origin_port}",
        "--http",
        http,
    )
    await wait_port(port, p)
    client = await Client.open(port)  # warm up: first request loads every module
    await client.send(get("/warm"))
    await client.read_response()
    await client.close()
    before = rss_kib(p.pid)
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(p.pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        answer = await _upload(port, total)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
        assert answer.endswith(str(total).encode())
        assert await _download(port, total) == total
    finally:
        sampler.cancel()
    growth_mib = (peak - before) / 1024
    assert growth_mib < 64, f"RSS grew {growth_mib:.1f} MiB"
    p.send_signal(signal.SIGTERM)
    assert finish(p)[0] == 0
