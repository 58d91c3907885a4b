"""Soak run on the demo config: auth, rate limits and account checks under load, for leaks.

    python -m bench.soak_demo --duration 600 [--connections 16] [--http auto|h11|fast]

Starts ``python -m bench.soak_demo --serve`` (the demo services and the gateway of
``fastedge demo`` in one process, on ephemeral ports, without admin or access log; the
``demo`` command's ports are fixed, hence this entry point) and drives mixed load with
its own asyncio HTTP/1.1 client:

* ``GET /api/products`` and ``/api/products/1`` (200), alone and as pipelined pairs;
* ``POST /api/auth/token`` for alice and bob (200 with a token), each worker keeping the
  last token per user and renewing it before the policy's ``max_age`` (5 min) runs out;
* ``GET /api/users`` and ``/api/users/alice`` with a token: 200, or 429 once the user's
  20 requests per 10 s are spent (the demo's ``per_user`` limit; 429 is *expected* and
  counted, not an error);
* ``GET /api/users`` without a token, or with a forged one: 401, expected;
* connections closed after 1-50 exchanges (keep-alive churn).

Every body is read to its framed end and parsed as JSON, so a truncated body is an
error. The gateway process's RSS and open descriptors are sampled once a second and
judged as in ``bench/soak.py`` (medians of five samples after warm-up, the first 20% of
the run, against the last five). Exit status 1 on any *unexpected* outcome (connection
error, truncated or unparsable body, 5xx, a status the request should not get) or on
>= 10% RSS or descriptor growth; 0 otherwise. Every process it started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.soak import (
    REQUEST_TIMEOUT,
    BadResponse,
    Sample,
    drive_load,
    read_response,
    stop,
)
from bench.soak import summarise as soak_summarise

ROOT = Path(__file__).resolve().parents[1]
USERS = ("alice", "bob")
TOKEN_REFRESH = 120.0  # seconds; well inside the policy's max_age (5 min) + leeway
# Operation mix (weights): reads dominate, as on a real gateway; the authorized share is
# high enough that the per-user limit is hit every window, so the 429 path soaks too.
MIX: dict[str, int] = {
    "products": 20,
    "product": 15,
    "pipelined": 10,
    "token": 5,
    "users": 25,
    "user": 10,
    "no_token": 10,
    "forged": 5,
}


# --- the served side -----------------------------------------------------------------


async def serve(http: str) -> int:
    """The demo gateway and services on ephemeral ports; prints ``PORT n``, runs until
    SIGTERM/SIGINT (as ``fastedge demo`` does, minus its fixed ports and banner)."""
    from fastedge.demo import start_demo
    from fastedge.server import tune_gc

    server, services, _ = await start_demo(
        gateway="127.0.0.1:0", admin=None, service_ports={}, http=http, access_log=False
    )
    server.install_signal_handlers()
    tune_gc()
    print(f"PORT {server.port}", flush=True)
    try:
        await server.wait_stopped()
    finally:
        await services.close()
    return 0


def start_gateway(http: str, log: Path) -> tuple[subprocess.Popen[str], int]:
    """``--serve`` as a subprocess (stderr to ``log``); returns it and its port."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak_demo", "--serve", "--http", http],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints PORT once it listens, or exits
    if not line.startswith("PORT "):
        stop(proc)
        raise RuntimeError(f"the demo gateway did not start: {line!r}")
    return proc, int(line.split()[1])


# --- the load ------------------------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)

    def fail(self, why: str) -> None:
        self.errors += 1
        self.error_kinds[why] += 1


@dataclass
class Tokens:
    """One worker's tokens: user -> (token, when it was issued, monotonic seconds)."""

    by_user: dict[str, tuple[str, float]] = field(default_factory=dict)


def request(method: str, path: str, token: str | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: soak.test"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def exchange(
    reader: asyncio.StreamReader, stats: Stats, kind: str, allowed: frozenset[int]
) -> tuple[int, object]:
    """Read one response; its status must be in ``allowed`` and its body whole JSON."""
    status, body = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
    stats.requests += 1
    stats.statuses[status] += 1
    if status not in allowed:
        raise BadResponse(f"{kind}: unexpected {status}")
    try:
        return status, json.loads(body)
    except ValueError:
        raise BadResponse(f"{kind}: {status} with a truncated or non-JSON body") from None


OK = frozenset({200})
LIMITED = frozenset({200, 429})
REFUSED = frozenset({401})
# A forged token: a well-formed HS256 JWT signed with a key the gateway does not have.
FORGED = (
    base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    + "."
    + base64.urlsafe_b64encode(b'{"sub":"alice","exp":4102444800}').rstrip(b"=").decode()
    + ".c2lnbmF0dXJlLW5vdC1tYWRlLXdpdGgtdGhlLWtleQ"
)


async def issue(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stats: Stats,
    tokens: Tokens,
    user: str,
) -> str:
    writer.write(request("POST", "/api/auth/token", body=json.dumps({"sub": user}).encode()))
    _, data = await exchange(reader, stats, "token", OK)
    token = data.get("token") if isinstance(data, dict) else None
    if not isinstance(token, str):
        raise BadResponse("token: no token in the answer")
    tokens.by_user[user] = (token, time.monotonic())
    return token


async def one_operation(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    rng: random.Random,
    stats: Stats,
    tokens: Tokens,
) -> None:
    """One randomly chosen exchange (or pipelined pair); raises BadResponse on a mismatch."""
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    stats.kinds[kind] += 1
    user = rng.choice(USERS)
    if kind == "products":
        writer.write(request("GET", "/api/products"))
        await exchange(reader, stats, kind, OK)
    elif kind == "product":
        writer.write(request("GET", "/api/products/1"))
        await exchange(reader, stats, kind, OK)
    elif kind == "pipelined":  # two requests in one write: both answered, in order
        writer.write(request("GET", "/api/products/1") + request("GET", "/api/products"))
        _, first = await exchange(reader, stats, kind, OK)
        _, second = await exchange(reader, stats, kind, OK)
        if not isinstance(first, dict) or not isinstance(second, list):
            raise BadResponse("pipelined: answers out of order")
    elif kind == "token":
        await issue(reader, writer, stats, tokens, user)
    elif kind in ("users", "user"):
        held = tokens.by_user.get(user)
        if held is None or time.monotonic() - held[1] > TOKEN_REFRESH:
            token = await issue(reader, writer, stats, tokens, user)
        else:
            token = held[0]
        path = "/api/users" if kind == "users" else f"/api/users/{user}"
        writer.write(request("GET", path, token))
        status, data = await exchange(reader, stats, kind, LIMITED)
        if (
            status == 200
            and kind == "user"
            and (not isinstance(data, dict) or data.get("name") != user)
        ):
            raise BadResponse(f"user: wrong user in {data!r}")
    elif kind == "no_token":
        writer.write(request("GET", "/api/users"))
        await exchange(reader, stats, kind, REFUSED)
    else:  # forged
        writer.write(request("GET", "/api/users", FORGED))
        await exchange(reader, stats, kind, REFUSED)


async def worker(port: int, deadline: float, seed: int, stats: Stats) -> None:
    """Connections one after another, each carrying 1-50 operations (keep-alive churn)."""
    rng = random.Random(seed)
    tokens = Tokens()
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
                await one_operation(reader, writer, rng, stats, tokens)
        except BadResponse as exc:
            stats.fail(str(exc))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            stats.fail(exc.__class__.__name__)  # connection errors and truncated heads
        except TimeoutError:
            stats.fail("timeout")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def drive(
    port: int, pid: int, duration: float, connections: int
) -> tuple[Stats, list[Sample]]:
    stats = Stats()

    async def run(deadline: float, seed: int, stats: Stats) -> None:
        await worker(port, deadline, seed, stats)

    # An exchange here may be a token request then the authorized one: two timeouts.
    samples = await drive_load(pid, duration, connections, stats, run, 2 * REQUEST_TIMEOUT + 5)
    return stats, samples


# --- verdict -------------------------------------------------------------------------


def summarise(stats: Stats, samples: list[Sample], duration: float) -> int:
    """The shared soak verdict, with this run's status counts (429/401 are expected)."""
    statuses = f"statuses      {dict(sorted(stats.statuses.items()))}  (429 and 401 are expected)"
    return soak_summarise(stats, samples, duration, [statuses])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients")
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "fast"])
    parser.add_argument("--serve", action="store_true", help="run the demo gateway (internal)")
    args = parser.parse_args(argv)
    if args.serve:
        import logging

        from fastedge.server import run

        logging.basicConfig(level=logging.WARNING)  # to stderr: the runner's log file
        return int(run(serve(args.http)))
    gateway: subprocess.Popen[str] | None = None
    status = 1
    with tempfile.TemporaryDirectory(prefix="fastedge-soak-demo-") as tmp:
        log = Path(tmp) / "gateway.log"
        try:
            gateway, port = start_gateway(args.http, log)
            stats, samples = asyncio.run(drive(port, gateway.pid, args.duration, args.connections))
            status = summarise(stats, samples, args.duration)
            if gateway.poll() is not None:
                print(f"the demo gateway exited during the run ({gateway.returncode})")
                status = 1
        finally:
            if gateway is not None:
                stop(gateway)
            if log.exists() and log.stat().st_size:
                print("--- gateway output ---")
                print(log.read_text(errors="replace")[-4000:])
    return status


if __name__ == "__main__":
    sys.exit(main())
