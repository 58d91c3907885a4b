"""Side-by-side load benchmark: fastedge vs nginx, HAProxy and a plain aiohttp proxy.

``python -m bench.load.run [--duration S] [--rounds N] [--connections C] [--only A,B]
[--results FILE]`` (``make bench-load`` runs it).

Method, and why:

* **One upstream for everyone**: nginx with ``return 200`` (small body) and a static
  64 KiB file, keep-alive on. nginx is the fastest origin we can get from Debian, so the
  upstream is never the bottleneck being measured.
* **Pinning** (``taskset``): every proxy runs on CPU 0 alone; wrk and the upstream share
  CPU 1. Without pinning the scheduler lets the proxy, the load generator and the origin
  fight for the same core, and a proxy that happens to share a core with wrk loses. With
  it, each proxy gets exactly one core, which is also the fair comparison for a
  single-process Python proxy (nginx, HAProxy run with 1 worker / 1 thread to match).
* **Alternating rounds**: each round runs every proxy in turn, and every other round the
  order is reversed. Slow drift on a shared machine (thermal, other jobs) then hits all
  proxies alike instead of always penalising the one that runs last; the medians over
  rounds and the per-round ratio to nginx absorb what is left.
* **Interleaving** (``--interleave``, what ``make bench-load`` uses): every proxy is
  started once and kept running (an idle one takes no CPU), and each round measures one
  scenario on every proxy in turn, so a proxy's run and nginx's are seconds apart rather
  than minutes; on a shared host whose speed drifts by tens of percent over minutes this
  is what keeps the same-round ratios steady.
* **Warm-up**: ~1 s of load before each measured run fills connection pools and caches so
  the measurement does not include connection setup.
* **Ratios, not absolute numbers**: req/s depends on the machine; "x times nginx,
  measured in the same round" travels between machines far better.
* **Variants and memory** (issue 9): fastedge configurations measured as proxies of
  their own (``bench/load/variants.py``; their ratios to a baseline get a second table)
  and, after the rounds, RSS per idle keep-alive connection (``bench/load/memory.py``).

Every process is started in its own session and killed as a process group in a
``finally`` (also on Ctrl-C and SIGTERM); configs, pid files and logs live in a temporary
directory that is removed at the end. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import importlib
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from bench.load import cache as cache_bench
from bench.load import variants

REPO_ROOT = Path(__file__).resolve().parents[2]

# CPU layout (see the module docstring for why we pin at all).
PROXY_CPU = "0"
LOAD_CPU = "1"

# The two scenarios: path on the upstream → short name used in the table.
SCENARIOS: dict[str, str] = {
    "small": "/small",
    "64KiB": "/64k",
    "cache-hit": "/cached",
    "post": "/small",
}
# Scenarios only the proxies that name them run (ProxySpec.scenarios, extra_scenarios): a
# cache hit means nothing for a proxy without a cache (bench/load/cache.py); POST is
# measured on nginx, HAProxy and plain fastedge only.
OPT_IN_SCENARIOS = frozenset({cache_bench.SCENARIO, "post"})
# The post scenario: wrk's request as an API client sends it, a small JSON body with its
# Content-Length (wrk adds that field), answered by the same ``return 200``.
POST_BODY = '{"id": 42, "items": [1, 2, 3], "note": "a small JSON body"}'
POST_SCRIPT = (
    'wrk.method = "POST"\n'
    f"wrk.body = '{POST_BODY}'\n"
    'wrk.headers["Content-Type"] = "application/json"\n'
)
SMALL_BODY = "hello from the upstream\n"
_SMALL_BODY_NGINX = SMALL_BODY.replace("\n", "\\n")  # as an nginx string literal
LARGE_BODY_SIZE = 64 * 1024

# Bounds so the run always ends by itself.
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
WARMUP_S = 1

RESULTS_START = "<!-- bench-load:start -->"
RESULTS_END = "<!-- bench-load:end -->"
RESULTS_HEADING = "## Load (make bench-load)"

# Debian package providing each external tool; installed by ensure_tools() when missing.
TOOL_PACKAGES: dict[str, str] = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "taskset": "util-linux",
}


class HarnessError(Exception):
    """The benchmark cannot run at all (missing tools, upstream does not start)."""


class ProxyFailed(Exception):
    """One proxy did not start, did not answer or broke under load; the run goes on
    without it and its table row says why."""


# --------------------------------------------------------------------------------------
# wrk output parsing
# --------------------------------------------------------------------------------------

# wrk prints times with format_time_us(): us/ms/s below a minute, then m/h (base 60).
_TIME_UNITS_US: dict[str, float] = {
    "us": 1.0,
    "ms": 1_000.0,
    "s": 1_000_000.0,
    "m": 60_000_000.0,
    "h": 3_600_000_000.0,
}
# ...and counts with format_metric(): SI suffixes, base 1000.
_METRIC_UNITS: dict[str, float] = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}

_NUMBER = r"([0-9]+(?:\.[0-9]+)?)"
_RE_REQUESTS = re.compile(rf"^\s*{_NUMBER}([kMGT]?) requests in ", re.MULTILINE)
_RE_RPS = re.compile(rf"^Requests/sec:\s+{_NUMBER}([kMGT]?)\s*$", re.MULTILINE)
_RE_PERCENTILE = re.compile(rf"^\s+(50|75|90|99)%\s+{_NUMBER}(us|ms|s|m|h)\s*$", re.MULTILINE)
_RE_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_RE_STATUS_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured. Latencies are in microseconds."""

    requests: int
    requests_per_sec: float
    p50_us: float
    p99_us: float
    socket_errors: int
    status_errors: int

    @property
    def errors(self) -> int:
        """Socket errors (connect/read/write/timeout) plus non-2xx/3xx responses."""
        return self.socket_errors + self.status_errors


def parse_duration_us(value: str, unit: str) -> float:
    """Convert a wrk time such as ``("1.30", "ms")`` to microseconds."""
    return float(value) * _TIME_UNITS_US[unit]


def parse_metric(value: str, suffix: str) -> float:
    """Convert a wrk count such as ``("97.62", "k")`` to a plain number."""
    return float(value) * _METRIC_UNITS[suffix]


def parse_wrk(output: str) -> WrkResult:
    """Parse the text wrk prints with ``--latency``.

    wrk only prints the "Socket errors" and "Non-2xx or 3xx responses" lines when the
    count is non-zero, so their absence means zero. Raises ``ValueError`` when the
    requests/s line or the latency distribution is missing (wrk crashed, or ran without
    ``--latency``).
    """
    rps = _RE_RPS.search(output)
    total = _RE_REQUESTS.search(output)
    percentiles = {
        m.group(1): parse_duration_us(m.group(2), m.group(3))
        for m in _RE_PERCENTILE.finditer(output)
    }
    if rps is None or total is None or "50" not in percentiles or "99" not in percentiles:
        raise ValueError(f"unrecognised wrk output:\n{output}")
    socket_errors = 0
    if (m := _RE_SOCKET_ERRORS.search(output)) is not None:
        socket_errors = sum(int(g) for g in m.groups())
    status_errors = 0
    if (m := _RE_STATUS_ERRORS.search(output)) is not None:
        status_errors = int(m.group(1))
    return WrkResult(
        requests=round(parse_metric(total.group(1), total.group(2))),
        requests_per_sec=parse_metric(rps.group(1), rps.group(2)),
        p50_us=percentiles["50"],
        p99_us=percentiles["99"],
        socket_errors=socket_errors,
        status_errors=status_errors,
    )


def format_latency(us: float) -> str:
    """Render microseconds the way a reader compares them: ``812us``, ``1.30ms``, ``2.1s``."""
    if us < 1_000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1_000:.2f}ms"
    return f"{us / 1_000_000:.2f}s"


# --------------------------------------------------------------------------------------
# Tools, ports, processes
# --------------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """Locate ``name`` on PATH, or in /usr/sbin and /sbin (Debian puts nginx and haproxy
    there, and a non-root PATH often lacks them)."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in ("/usr/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools(allow_install: bool) -> dict[str, str]:
    """Return the path of every external tool, installing missing ones from Debian.

    Installing needs root and apt-get; without them (or with ``--no-install``) the error
    says exactly which packages to install.
    """
    missing = [tool for tool in TOOL_PACKAGES if find_tool(tool) is None]
    if missing:
        packages = sorted({TOOL_PACKAGES[tool] for tool in missing})
        command = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
        can_install = allow_install and os.geteuid() == 0 and shutil.which("apt-get")
        if not can_install:
            raise HarnessError(
                f"missing tools: {', '.join(missing)}. Install them with: "
                f"sudo apt-get install -y {' '.join(packages)}"
                + ("" if allow_install else "  (--no-install was given)")
            )
        print(f"bench-load: installing from Debian: {' '.join(packages)}", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(command, check=True, env=env)
        still_missing = [tool for tool in missing if find_tool(tool) is None]
        if still_missing:
            raise HarnessError(f"still missing after apt-get install: {', '.join(still_missing)}")
    return {tool: path for tool in TOOL_PACKAGES if (path := find_tool(tool)) is not None}


def free_port() -> int:
    """Ask the kernel for a free loopback port (bind to port 0).

    The port is released before the server binds it; on 127.0.0.1 of a benchmark box the
    window for another program to take it is negligible, and a lost race shows up as a
    clear "did not start" row rather than a wrong number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Processes:
    """Every child the harness started, so ``stop_all`` can always clean up."""

    pin: bool
    taskset: str | None
    running: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def pinned(self, cpu: str, argv: Sequence[str]) -> list[str]:
        """Prefix ``argv`` with ``taskset -c cpu`` when pinning is on.

        taskset execs the program, so the pid we get is the program's own; its threads
        and forked workers inherit the affinity.
        """
        if self.pin and self.taskset is not None:
            return [self.taskset, "-c", cpu, *argv]
        return list(argv)

    def start(self, argv: Sequence[str], log_path: Path, cpu: str) -> subprocess.Popen[bytes]:
        """Start ``argv`` pinned to ``cpu`` in a new session, output to ``log_path``."""
        log = log_path.open("wb")
        try:
            # start_new_session: the child gets its own process group, so stop() reaches
            # nginx/haproxy workers too, and a Ctrl-C in the terminal does not race our
            # orderly shutdown.
            proc = subprocess.Popen(
                self.pinned(cpu, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        except OSError:
            log.close()
            raise
        self.running.append((proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the process group, SIGKILL it if it has not exited in time."""
        for index, (candidate, candidate_log) in enumerate(self.running):
            if candidate is proc:
                log = candidate_log
                del self.running[index]
                break
        else:
            return
        try:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
            # Workers left behind by a master that died first.
            _signal_group(proc, signal.SIGKILL)
        finally:
            log.close()

    def stop_all(self) -> None:
        """Stop everything still running, newest first (proxies before the upstream)."""
        for proc, _log in reversed(list(self.running)):
            self.stop(proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``proc`` (gone already is fine)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, on one line, for an error message in a table cell."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
    return " / ".join(tail)


def wait_ready(
    proc: subprocess.Popen[bytes],
    port: int,
    log_path: Path,
    timeout: float = START_TIMEOUT_S,
    headers: Sequence[str] = (),
) -> None:
    """Wait until ``port`` answers ``GET /small`` (with ``headers``, ``"Name: value"``
    lines as wrk takes them) with 200 through the proxy.

    A plain TCP accept is not enough: it would also succeed for a proxy that listens but
    cannot reach the upstream. Raises ProxyFailed with the log tail on failure.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProxyFailed(f"exited with code {proc.returncode}: {_log_tail(log_path)}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            fields = dict(h.split(": ", 1) for h in headers)
            conn.request("GET", SCENARIOS["small"], headers=fields)
            response = conn.getresponse()
            body = response.read()
            if response.status == 200 and body == SMALL_BODY.encode():
                return
            last_error = f"GET {SCENARIOS['small']} answered {response.status} {body[:80]!r}"
        except OSError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        time.sleep(0.05)
    raise ProxyFailed(f"not ready after {timeout:.0f}s ({last_error}); log: {_log_tail(log_path)}")


# --------------------------------------------------------------------------------------
# Server configurations
# --------------------------------------------------------------------------------------


def _nginx_prelude(workdir: Path) -> str:
    """Settings shared by the upstream and the proxy nginx: 1 worker, all state in workdir.

    ``user root`` only when we are root: the worker would otherwise drop to ``nobody`` and
    could not read the 0700 temp dir. Debian's compiled-in temp paths under /var/lib/nginx
    are redirected so nothing outside the temp dir is touched.
    """
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    # wrk keeps its 64 connections for the whole run; nginx's default (1000 requests per
    # connection) would make it reconnect mid-measurement while the other proxies don't.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""


def upstream_nginx_conf(workdir: Path, port: int, www: Path) -> str:
    """The origin: a tiny ``return 200`` and a static 64 KiB file, keep-alive on."""
    return (
        _nginx_prelude(workdir)
        + f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {SCENARIOS["small"]} {{
            default_type text/plain;
            return 200 "{_SMALL_BODY_NGINX}";
        }}
        location = {SCENARIOS["64KiB"]} {{
            default_type application/octet-stream;
            root {www};
        }}
{cache_bench.upstream_location(_SMALL_BODY_NGINX)}    }}
}}
"""
    )


def proxy_nginx_conf(
    workdir: Path, port: int, upstream_port: int, *, http_extra: str = "", location_extra: str = ""
) -> str:
    """nginx as a reverse proxy with an upstream keep-alive pool, as its docs recommend;
    ``http_extra`` / ``location_extra`` are directives (whole indented lines) added to
    its ``http`` block and to its ``location /`` (bench/load/cache.py's proxy_cache)."""
    return (
        _nginx_prelude(workdir)
        + http_extra
        + f"""    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # 16 x 8k: a 64 KiB answer fits in memory. With the default 8 x 4k nginx would
            # spill it to a temp file on disk, which measures the disk, not the proxy.
            proxy_buffers 16 8k;
{location_extra}        }}
    }}
}}
"""
    )


def nginx_command(workdir: Path, conf: str, nginx: str) -> list[str]:
    """Write ``conf`` to ``workdir/nginx.conf``: the command that runs nginx on it."""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    # -e: the error log before the config is read (Debian's default is /var/log/nginx).
    return [nginx, "-p", f"{workdir}/", "-c", str(path), "-e", str(workdir / "error.log")]


def haproxy_conf(port: int, upstream_port: int) -> str:
    """HAProxy in HTTP mode, one thread, always reusing idle upstream connections."""
    return f"""global
    nbthread 1
    # Under the default 20000 open-file limit (HAProxy needs ~2 fds per connection).
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    # Share idle server connections between client connections, like the nginx pool.
    http-reuse always

frontend bench
    bind 127.0.0.1:{port}
    default_backend upstream

backend upstream
    server origin 127.0.0.1:{upstream_port}
"""


@dataclass(frozen=True)
class ProxySpec:
    """How to start one proxy: ``command(workdir, port, upstream_port)`` → argv.

    ``command`` may write config files into ``workdir`` (a fresh directory per start).
    ``cpus`` is its taskset CPU list, ``scenarios`` the scenarios it runs (``None``: all
    but the opt-in ones, plus ``extra_scenarios``), ``wrk_headers`` extra request fields
    wrk sends (``-H``).
    """

    name: str
    command: Callable[[Path, int, int, dict[str, str]], list[str]]
    cpus: str = PROXY_CPU
    scenarios: tuple[str, ...] | None = None
    wrk_headers: tuple[str, ...] = ()
    extra_scenarios: tuple[str, ...] = ()

    def runs(self, scenario: str) -> bool:
        """Whether this proxy is measured in ``scenario``."""
        if self.scenarios is None:
            return scenario not in OPT_IN_SCENARIOS or scenario in self.extra_scenarios
        return scenario in self.scenarios


def _nginx_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    return nginx_command(workdir, proxy_nginx_conf(workdir, port, upstream_port), tools["nginx"])


def _haproxy_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    conf = workdir / "haproxy.cfg"
    conf.write_text(haproxy_conf(port, upstream_port))
    # -db: stay in the foreground, no daemon, so the harness owns the process.
    return [tools["haproxy"], "-db", "-f", str(conf)]


def _aiohttp_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.load.aiohttp_proxy",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}",
    ]


def _uvloop_relay_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.load.uvloop_relay",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
    ]


def _fastedge_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    return variants.reverse_proxy_command(port, upstream_port)


PROXIES: dict[str, ProxySpec] = {
    spec.name: spec
    for spec in (
        ProxySpec("nginx", _nginx_command, extra_scenarios=("post",)),
        ProxySpec("haproxy", _haproxy_command, extra_scenarios=("post",)),
        ProxySpec("aiohttp", _aiohttp_command),
        # The ceiling for Python: uvloop + httptools copying bytes, nothing else
        # (bench/load/uvloop_relay.py); the small scenario is what it is a ceiling for.
        ProxySpec("uvloop-relay", _uvloop_relay_command, scenarios=("small",)),
        ProxySpec("fastedge", _fastedge_command, extra_scenarios=("post",)),
        # Issue 9's fastedge variants (bench/load/variants.py), compared with their
        # baselines in the report's second table.
        ProxySpec(
            "fastedge-w2",
            variants.workers_command,
            cpus=f"{PROXY_CPU},{LOAD_CPU}",
        ),
        ProxySpec("fastedge-1k-routes", variants.routes_command, scenarios=("small",)),
        ProxySpec("fastedge-hc", variants.health_command, scenarios=("small",)),
        ProxySpec("fastedge-loop-io", variants.loop_io_command, scenarios=("small",)),
        ProxySpec("fastedge-resilient", variants.resilient_command, scenarios=("small",)),
        # Cache hits against nginx proxy_cache hits (bench/load/cache.py).
        ProxySpec("nginx-cache", cache_bench.nginx_cache_command, scenarios=("cache-hit",)),
        ProxySpec("fastedge-cache", cache_bench.fastedge_cache_command, scenarios=("cache-hit",)),
        ProxySpec(
            "fastedge-chain",
            variants.chain_command,
            scenarios=("small",),
            wrk_headers=(f"Authorization: Bearer {variants.bench_token()}",),
        ),
    )
}


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


@dataclass
class Bench:
    """One benchmark run: settings, the processes it owns and what it measured."""

    duration: int
    rounds: int
    connections: int
    proxies: list[str]
    tools: dict[str, str]
    processes: Processes
    workdir: Path
    upstream_port: int = 0
    # (proxy, scenario) → one WrkResult per round in which it ran.
    results: dict[tuple[str, str], list[WrkResult]] = field(default_factory=dict)
    # (proxy, scenario, round) → result, for ratios computed within the same round.
    by_round: dict[tuple[str, str, int], WrkResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    # --interleave: every proxy kept running, scenarios measured in turn (run_interleaved).
    interleave: bool = False

    def start_upstream(self) -> None:
        """Write the 64 KiB file and start the origin nginx on the load CPU."""
        www = self.workdir / "www"
        www.mkdir()
        # Incompressible-looking but deterministic bytes; nobody compresses here anyway.
        (www / SCENARIOS["64KiB"].lstrip("/")).write_bytes(
            bytes(range(256)) * (LARGE_BODY_SIZE // 256)
        )
        upstream_dir = self.workdir / "upstream"
        upstream_dir.mkdir()
        self.upstream_port = free_port()
        conf = upstream_dir / "nginx.conf"
        conf.write_text(upstream_nginx_conf(upstream_dir, self.upstream_port, www))
        log = upstream_dir / "stdout.log"
        argv = [
            self.tools["nginx"],
            "-p",
            f"{upstream_dir}/",
            "-c",
            str(conf),
            "-e",
            str(upstream_dir / "error.log"),
        ]
        # The origin shares CPU 1 with wrk: CPU 0 belongs to the proxy under test alone.
        proc = self.processes.start(argv, log, LOAD_CPU)
        try:
            wait_ready(proc, self.upstream_port, upstream_dir / "error.log")
        except ProxyFailed as exc:
            raise HarnessError(f"upstream nginx did not start: {exc}") from exc

    def run_wrk(
        self,
        port: int,
        path: str,
        duration: int,
        headers: Sequence[str] = (),
        script: Path | None = None,
    ) -> WrkResult:
        """Run wrk on the load CPU against ``path`` (``script``: a wrk Lua script, the
        post scenario's) and parse its output."""
        argv = self.processes.pinned(
            LOAD_CPU,
            [
                self.tools["wrk"],
                "-t1",
                f"-c{self.connections}",
                f"-d{duration}s",
                "--latency",
                *(arg for header in headers for arg in ("-H", header)),
                *(("-s", str(script)) if script is not None else ()),
                f"http://127.0.0.1:{port}{path}",
            ],
        )
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 30, check=False
        )
        if done.returncode != 0:
            raise ProxyFailed(
                f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}"
            )
        return parse_wrk(done.stdout)

    def start_proxy(self, name: str, label: str) -> tuple[subprocess.Popen[bytes], int] | None:
        """Start proxy ``name`` on its CPUs and wait until it answers: ``(process, port)``,
        or ``None`` with the reason in :attr:`failures` (and nothing left running)."""
        workdir = self.workdir / f"{name}-{label}"
        workdir.mkdir()
        port = free_port()
        log = workdir / "output.log"
        spec = PROXIES[name]
        try:
            argv = spec.command(workdir, port, self.upstream_port, self.tools)
            proc = self.processes.start(argv, log, spec.cpus)
        except OSError as exc:
            self.failures[name] = f"could not start: {exc}"
            return None
        try:
            # nginx writes start-up problems to error.log, everything else to stdout.
            error_log = workdir / "error.log"
            wait_ready(proc, port, error_log if name == "nginx" else log, headers=spec.wrk_headers)
        except ProxyFailed as exc:
            self.failures[name] = str(exc)
            print(f"  {name:<9} FAILED to start: {exc}", flush=True)
            self.processes.stop(proc)
            return None
        return proc, port

    def measure(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        port: int,
        scenario: str,
        round_index: int,
    ) -> None:
        """Warm up, then measure one scenario of a running proxy (raises ProxyFailed)."""
        spec = PROXIES[name]
        path = SCENARIOS[scenario]
        script = None
        if scenario == "post":
            script = self.workdir / "post.lua"
            if not script.exists():
                script.write_text(POST_SCRIPT)
        self.run_wrk(port, path, WARMUP_S, spec.wrk_headers, script)
        result = self.run_wrk(port, path, self.duration, spec.wrk_headers, script)
        if proc.poll() is not None:
            raise ProxyFailed(f"exited during the run with code {proc.returncode}")
        self.results.setdefault((name, scenario), []).append(result)
        self.by_round[(name, scenario, round_index)] = result
        print(
            f"  round {round_index + 1}/{self.rounds}  {name:<9} {scenario:<6} "
            f"{result.requests_per_sec:>10.0f} req/s"
            f"  p50 {format_latency(result.p50_us):>8}"
            f"  p99 {format_latency(result.p99_us):>8}"
            f"  errors {result.errors}",
            flush=True,
        )

    def measure_proxy(self, name: str, round_index: int) -> None:
        """Start one proxy on the proxy CPU, warm up and measure each scenario, stop it."""
        started = self.start_proxy(name, f"round{round_index}")
        if started is None:
            return
        proc, port = started
        try:
            for scenario in SCENARIOS:
                if PROXIES[name].runs(scenario):
                    self.measure(name, proc, port, scenario, round_index)
        except (ProxyFailed, ValueError, subprocess.TimeoutExpired) as exc:
            self.failures[name] = str(exc)
            print(f"  round {round_index + 1}/{self.rounds}  {name:<9} FAILED: {exc}", flush=True)
        finally:
            self.processes.stop(proc)

    def run(self) -> None:
        """All rounds; the proxy order flips every round (see module docstring)."""
        self.start_upstream()
        if self.interleave:
            self.run_interleaved()
            return
        for round_index in range(self.rounds):
            order = self.proxies if round_index % 2 == 0 else list(reversed(self.proxies))
            for name in order:
                # A proxy that failed once stays out: its row already says why, and a
                # broken one would only waste the start-up timeout every round.
                if name not in self.failures:
                    self.measure_proxy(name, round_index)

    def run_interleaved(self) -> None:
        """``--interleave``: every proxy started once and kept running (idle ones cost
        nothing); each round measures one scenario on every proxy in turn before the
        next scenario, the order flipping every round. A proxy's runs and nginx's are
        then seconds apart, not minutes, so host drift between them is smaller."""
        running: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for name in self.proxies:
                started = self.start_proxy(name, "interleaved")
                if started is not None:
                    running[name] = started
            for round_index in range(self.rounds):
                order = self.proxies if round_index % 2 == 0 else list(reversed(self.proxies))
                for scenario in SCENARIOS:
                    for name in order:
                        if name not in running or name in self.failures:
                            continue
                        if not PROXIES[name].runs(scenario):
                            continue
                        proc, port = running[name]
                        try:
                            self.measure(name, proc, port, scenario, round_index)
                        except (ProxyFailed, ValueError, subprocess.TimeoutExpired) as exc:
                            self.failures[name] = str(exc)
                            print(
                                f"  round {round_index + 1}/{self.rounds}  {name:<9} FAILED: {exc}",
                                flush=True,
                            )
        finally:
            for proc, _ in running.values():
                self.processes.stop(proc)


@dataclass(frozen=True)
class Summary:
    """One table row: medians over rounds, or why the proxy has no numbers."""

    proxy: str
    scenario: str
    requests_per_sec: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    errors: int | None = None
    ratio_to_nginx: float | None = None
    failure: str | None = None


def same_round_ratio(
    bench: Bench, proxy: str, baseline: str, scenario: str, metric: str = "req/s"
) -> float | None:
    """Median over rounds of ``proxy``'s req/s (or p99) divided by ``baseline``'s in the
    same round; ``None`` when they never ran in the same round."""
    ratios = []
    for (name, scen, round_index), result in bench.by_round.items():
        if name != proxy or scen != scenario:
            continue
        reference = bench.by_round.get((baseline, scenario, round_index))
        if reference is None:
            continue
        if metric == "p99":
            if reference.p99_us > 0:
                ratios.append(result.p99_us / reference.p99_us)
        elif reference.requests_per_sec > 0:
            ratios.append(result.requests_per_sec / reference.requests_per_sec)
    return statistics.median(ratios) if ratios else None


def summarise(bench: Bench) -> list[Summary]:
    """Median req/s, p50, p99 over rounds, total errors, median same-round ratio to nginx."""
    rows: list[Summary] = []
    for name in bench.proxies:
        for scenario in SCENARIOS:
            if not PROXIES[name].runs(scenario):
                continue
            runs = bench.results.get((name, scenario), [])
            if name in bench.failures or not runs:
                rows.append(Summary(name, scenario, failure=bench.failures.get(name, "no data")))
                continue
            rows.append(
                Summary(
                    proxy=name,
                    scenario=scenario,
                    requests_per_sec=statistics.median(r.requests_per_sec for r in runs),
                    p50_us=statistics.median(r.p50_us for r in runs),
                    p99_us=statistics.median(r.p99_us for r in runs),
                    errors=sum(r.errors for r in runs),
                    ratio_to_nginx=same_round_ratio(bench, name, "nginx", scenario),
                )
            )
    return rows


def comparisons_table(bench: Bench) -> str:
    """Issue 9's ratios (:data:`bench.load.variants.COMPARISONS`) that this run measured."""
    lines = ["| comparison | scenario | ratio | goal |", "|---|---|---:|---|"]
    for c in (*variants.COMPARISONS, *cache_bench.COMPARISONS):
        ratio = same_round_ratio(bench, c.proxy, c.baseline, c.scenario, c.metric)
        if ratio is not None:
            what = f"{c.label} (`{c.proxy}` / `{c.baseline}`, {c.metric})"
            lines.append(f"| {what} | {c.scenario} | {ratio:.2f}x | {c.goal or '-'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown_table(rows: Sequence[Summary]) -> str:
    """The results as a Markdown table (also what the console shows)."""
    lines = [
        "| proxy | scenario | req/s | p50 | p99 | errors | vs nginx |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.failure is not None:
            reason = " ".join(row.failure.split()).replace("|", "\\|")[:300]
            lines.append(f"| {row.proxy} | {row.scenario} | error | - | - | {reason} | - |")
            continue
        assert row.requests_per_sec is not None and row.p50_us is not None
        assert row.p99_us is not None and row.errors is not None
        ratio = "-" if row.ratio_to_nginx is None else f"{row.ratio_to_nginx:.2f}x"
        lines.append(
            f"| {row.proxy} | {row.scenario} | {row.requests_per_sec:,.0f} "
            f"| {format_latency(row.p50_us)} | {format_latency(row.p99_us)} "
            f"| {row.errors} | {ratio} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


_RE_VERSION = re.compile(r"\d+\.\d+[\w.+~-]*")


def _tool_version(argv: Sequence[str]) -> str:
    """The version number a ``-v`` command prints (stdout or stderr), e.g. ``1.22.1``."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    found = _RE_VERSION.search(done.stdout + "\n" + done.stderr)
    return found.group(0) if found else "unknown"


def _package_version(name: str) -> str:
    """Installed distribution version; for an uninstalled source checkout, ``__version__``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(name)
    except ImportError:
        return "not installed"
    return f"{getattr(module, '__version__', 'unknown')} (source tree)"


def machine_info() -> dict[str, str]:
    """nproc, CPU model and kernel, for the report."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "kernel": f"{platform.system()} {platform.release()}",
    }


def versions(tools: dict[str, str]) -> dict[str, str]:
    """Versions of everything measured or measuring."""
    return {
        "nginx": _tool_version([tools["nginx"], "-v"]),
        "haproxy": _tool_version([tools["haproxy"], "-v"]),
        "wrk": _tool_version([tools["wrk"], "-v"]),
        "python": platform.python_version(),
        "uvloop": _package_version("uvloop"),
        "httptools": _package_version("httptools"),
        "aiohttp": _package_version("aiohttp"),
        "fastedge": _package_version("fastedge"),
    }


def report(
    bench: Bench,
    rows: Sequence[Summary],
    command: str,
    note: str | None,
    extra: Sequence[str] = (),
) -> str:
    """The Markdown section written between the bench-load markers (``extra``: further
    Markdown blocks appended, e.g. the memory table)."""
    machine = machine_info()
    pinning = (
        f"proxy on CPU {PROXY_CPU}, wrk and upstream on CPU {LOAD_CPU} (taskset)"
        if bench.processes.pin
        else "not pinned (fewer than 2 CPUs or no taskset)"
    )
    lines = [
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['kernel']}  ",
        f"Load: `wrk -t1 -c{bench.connections} -d{bench.duration}s --latency`, "
        f"{WARMUP_S} s warm-up, {bench.rounds} alternating round(s); {pinning}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions(bench.tools).items()),
        "",
    ]
    if note:
        lines += [f"> {note}", ""]
    lines += [
        markdown_table(rows),
        "",
        "req/s, p50 and p99 are medians over rounds; errors are socket errors plus non-2xx/3xx "
        "responses summed over rounds; *vs nginx* is the proxy's req/s divided by nginx's in "
        "the same round, median over rounds. Small = `return 200` with a "
        f"{len(SMALL_BODY)}-byte body; 64KiB = a static {LARGE_BODY_SIZE}-byte file. All proxies "
        "run one process/worker/thread with access logs off (`fastedge-w2`: two worker "
        "processes, allowed on both CPUs); the upstream is nginx. fastedge variants: see "
        "`bench/load/variants.py`.",
    ]
    comparisons = comparisons_table(bench)
    if comparisons:
        lines += [
            "",
            "Issue 9 ratios (same round, median over rounds):",
            "",
            comparisons,
        ]
    for block in extra:
        lines += ["", block]
    return "\n".join(lines)


def write_results(path: Path, section: str) -> None:
    """Replace the text between the bench-load markers in ``path`` (create what is missing)."""
    block = f"{RESULTS_START}\n{section}\n{RESULTS_END}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(RESULTS_END) :]
    else:
        text = text.rstrip("\n") + f"\n\n{RESULTS_HEADING}\n\n{block}\n"
    path.write_text(text if text.endswith("\n") else text + "\n")


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _proxy_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROXIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown proxy {', '.join(unknown) or '(none)'}; choose from {', '.join(PROXIES)}"
        )
    return names


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.load.run",
        description="Load fastedge, nginx, HAProxy and an aiohttp proxy side by side with wrk.",
    )
    parser.add_argument(
        "--duration", type=_positive_int, default=10, help="seconds per measured run (10)"
    )
    parser.add_argument("--rounds", type=_positive_int, default=3, help="alternating rounds (3)")
    parser.add_argument(
        "--connections", type=_positive_int, default=64, help="wrk connections (64)"
    )
    parser.add_argument(
        "--only",
        type=_proxy_list,
        default=list(PROXIES),
        help=f"comma-separated subset of {','.join(PROXIES)}",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="Markdown file whose bench-load section to replace",
    )
    parser.add_argument(
        "--note", default=None, help="a remark for the report (e.g. 'shared machine')"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get; fail if a tool is missing"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="start every proxy once and alternate them run by run (less host drift)",
    )
    parser.add_argument(
        "--memory-connections",
        type=int,
        default=10_000,
        help="idle keep-alive connections for the memory scenario (10000; 0 = skip it)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks clean up on both."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every proxy was measured, 1 when one failed, 2 on setup errors."""
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "bench.load.run", *(sys.argv[1:] if argv is None else argv)]
    )
    try:
        tools = ensure_tools(allow_install=not args.no_install)
    except (HarnessError, subprocess.CalledProcessError) as exc:
        print(f"bench-load: {exc}", file=sys.stderr)
        return 2
    cpus = os.sched_getaffinity(0)
    pin = "taskset" in tools and {int(PROXY_CPU), int(LOAD_CPU)} <= cpus
    if not pin:
        print("bench-load: not pinning (needs CPUs 0 and 1 and taskset); numbers will be noisier")
    processes = Processes(pin=pin, taskset=tools.get("taskset"))
    from bench.load import memory  # imports this module: not at the top

    # Raised before anything starts, so the proxies inherit the descriptor limit.
    memory_connections = (
        memory.connections_within_limit(args.memory_connections)
        if args.memory_connections > 0
        else 0
    )
    memory_blocks: list[str] = []
    print(
        f"bench-load: {', '.join(args.only)}; {args.rounds} round(s) x {len(SCENARIOS)} scenarios "
        f"x {args.duration} s, wrk -c{args.connections}",
        flush=True,
    )
    with (
        _terminate_as_interrupt(),
        tempfile.TemporaryDirectory(prefix="fastedge-bench-load-") as tmp,
    ):
        bench = Bench(
            duration=args.duration,
            rounds=args.rounds,
            connections=args.connections,
            proxies=args.only,
            tools=tools,
            processes=processes,
            workdir=Path(tmp),
            interleave=args.interleave,
        )
        try:
            bench.run()
            if memory_connections:
                print(
                    f"bench-load: memory, {memory_connections:,} idle keep-alive connections"
                    + (
                        f" (RLIMIT_NOFILE allows no more than that; {args.memory_connections:,} "
                        "asked)"
                        if memory_connections < args.memory_connections
                        else ""
                    ),
                    flush=True,
                )
                results, failures = memory.run_memory(bench, memory_connections)
                bench.failures.update({f"memory {k}": v for k, v in failures.items()})
                memory_blocks.append(
                    "Memory: resident set of the proxy's processes before and after opening "
                    "idle keep-alive connections (each sent one `GET /small`); "
                    "`bench/load/memory.py`.\n\n" + memory.markdown(results, failures)
                )
                print()
                print(memory.markdown(results, failures))
        except HarnessError as exc:
            print(f"bench-load: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("bench-load: interrupted; stopping everything", file=sys.stderr)
            return 130
        finally:
            processes.stop_all()
    rows = summarise(bench)
    print()
    print(markdown_table(rows))
    comparisons = comparisons_table(bench)
    if comparisons:
        print()
        print(comparisons)
    if args.results is not None:
        write_results(args.results, report(bench, rows, command, args.note, memory_blocks))
        print(f"\nbench-load: wrote the load section of {args.results}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
