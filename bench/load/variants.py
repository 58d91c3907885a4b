"""fastedge configurations measured against plain fastedge and nginx (issue 9).

``bench/load/run.py`` registers each as a proxy of its own, so it runs in the same
alternating rounds as nginx, HAProxy and plain fastedge, and its table row comes with
the usual same-round ratio to nginx. :data:`COMPARISONS` lists the ratios the issue's
goals are about (a variant against its baseline, same round, median over rounds).

* ``fastedge-w2``: ``fastedge reverse-proxy --workers 2`` (two processes, SO_REUSEPORT),
  against ``fastedge`` (one process). It may use both CPUs, which it shares with wrk and
  the origin on a 2-CPU machine: the ratio says what a second worker buys *there*.
* ``fastedge-1k-routes``: the same proxying with 1,000 configured routes; the requests
  match one of them (``/small``, ``/64k`` among 997 ``/api/v{n}/items`` prefixes and
  ``/``), against ``fastedge`` with its one route.
* ``fastedge-hc``: plain proxying to an upstream with active health checks (on the
  express lane: ``Upstream.express_pick``), against ``fastedge``.
* ``fastedge-resilient``: the same with every resilience feature an upstream can have
  on one tier: health checks, a circuit breaker, outlier detection and retries (the
  lane's ``Upstream.express_attempt``, ``record_request`` and ``report``), against
  ``fastedge``.
* ``fastedge-chain``: the full policy chain: JWT auth (HS256, verified once and then
  served from the verification cache), a local sliding-window rate limit per user whose
  limit is never reached, tracing with 1% sampling into the in-process span store,
  metrics (always on) and no access log; wrk sends the bearer token.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

# Secrets for a benchmark only: the token is minted here and verified by the proxy.
JWT_SECRET = "bench-load-secret-0123456789abcdefghij"
JWT_SECRET_ENV = "FASTEDGE_BENCH_JWT_SECRET"
ROUTES = 1000


def bench_token(now: float | None = None) -> str:
    """An HS256 token for the chain variant, valid for a day."""
    issued = int(time.time() if now is None else now)
    claims = {"sub": "bench-user", "iat": issued, "exp": issued + 86_400}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def _server(port: int, extra: str = "") -> str:
    return f"""[server]
listen = "127.0.0.1:{port}"
access_log = false
{extra}
[admin]
enabled = false
"""


def _upstream(upstream_port: int) -> str:
    # The pool as the one-liner has it (reverse-proxy's defaults): pooled keep-alive.
    return f"""
[upstreams.origin]
targets = ["http://127.0.0.1:{upstream_port}"]
"""


def routes_config(port: int, upstream_port: int, routes: int = ROUTES) -> str:
    """``routes`` prefix routes, two of which the benchmark's paths match exactly."""
    lines = [_server(port), _upstream(upstream_port)]
    for n in range(routes - 3):
        lines.append(f'[[routes]]\nprefix = "/api/v{n}/items"\nupstream = "origin"\n')
    for prefix in ("/small", "/64k", "/"):
        lines.append(f'[[routes]]\nprefix = "{prefix}"\nupstream = "origin"\n')
    return "\n".join(lines)


def chain_policies(memory_spans: int | None = None) -> str:
    """The chain's policies: auth policy ``bench`` (HS256, the verification cache on),
    rate limit ``per_user`` (a local sliding window per subject that is never reached)
    and tracing at 1% (``memory_spans`` for the in-process span store, else its default).
    Also the soak's (bench/soak.py)."""
    spans = "" if memory_spans is None else f"memory_spans = {memory_spans}\n"
    return f"""
[auth.bench]
algorithms = ["HS256"]
cache_size = 10000

  [[auth.bench.keys]]
  algorithm = "HS256"
  secret_env = "{JWT_SECRET_ENV}"

[rate_limits.per_user]
algorithm = "sliding_window"
limit = 1000000000
window = "1s"
key = "claim:sub"

[tracing]
sample_ratio = 0.01
{spans}"""


def chain_config(port: int, upstream_port: int) -> str:
    """Auth + rate limit + tracing on the one route."""
    return (
        _server(port)
        + _upstream(upstream_port)
        + chain_policies()
        + """
[[routes]]
prefix = "/"
upstream = "origin"
auth = "bench"
rate_limit = "per_user"
"""
    )


def health_config(port: int, upstream_port: int) -> str:
    """Plain proxying to an upstream with active health checks (every 2 s, on the origin's
    ``/small``): what a deployment with health checks gets (the express lane picks among
    the healthy targets; any other resilience feature takes the general path)."""
    return (
        _server(port)
        + _upstream(upstream_port)
        + """
[upstreams.origin.health_check]
path = "/small"
interval = "2s"

[[routes]]
prefix = "/"
upstream = "origin"
"""
    )


def resilient_config(port: int, upstream_port: int) -> str:
    """``health_config`` plus a circuit breaker, outlier detection and retries (the
    defaults: Hystrix's breaker, Envoy's ejection and retry-on-gateway-error)."""
    return health_config(port, upstream_port).replace(
        "\n[[routes]]",
        """
[upstreams.origin.breaker]
[upstreams.origin.outlier]
[upstreams.origin.retry]

[[routes]]""",
        1,
    )


def loop_io_config(port: int, upstream_port: int) -> str:
    """Plain proxying on the event loop's transports (``server.io = "loop"``)."""
    return "\n".join(
        [
            _server(port, 'io = "loop"'),
            _upstream(upstream_port),
            '[[routes]]\nprefix = "/"\nupstream = "origin"\n',
        ]
    )


def memory_config(port: int, upstream_port: int, connections: int) -> str:
    """Plain proxying with room for ``connections`` idle clients (``max_connections``
    defaults to 10,000, which the probe connection would exceed)."""
    extra = f"max_connections = {connections + 1000}\n"
    return (
        _server(port, extra)
        + _upstream(upstream_port)
        + '\n[[routes]]\nprefix = "/"\nupstream = "origin"\n'
    )


def run_file_command(workdir: Path, text: str, *extra: str) -> list[str]:
    """Write ``text`` to ``workdir/fastedge.toml``: the ``fastedge run -c`` command on it."""
    conf = workdir / "fastedge.toml"
    conf.write_text(text)
    return [sys.executable, "-m", "fastedge", "run", "-c", str(conf), *extra]


def reverse_proxy_command(port: int, upstream_port: int, *extra: str) -> list[str]:
    """The one-liner ``fastedge reverse-proxy`` from ``127.0.0.1:port`` to the origin,
    with ``extra`` options."""
    return [
        sys.executable,
        "-m",
        "fastedge",
        "reverse-proxy",
        "--from",
        f"127.0.0.1:{port}",
        "--to",
        f"http://127.0.0.1:{upstream_port}",
        *extra,
    ]


def workers_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """``fastedge-w2``: the one-liner with ``--workers 2``."""
    return reverse_proxy_command(port, upstream_port, "--workers", "2")


def routes_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """``fastedge-1k-routes``."""
    return run_file_command(workdir, routes_config(port, upstream_port))


def health_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """``fastedge-hc``."""
    return run_file_command(workdir, health_config(port, upstream_port))


def resilient_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """``fastedge-resilient``."""
    return run_file_command(workdir, resilient_config(port, upstream_port))


def loop_io_command(
    workdir: Path, port: int, upstream_port: int, tools: dict[str, str]
) -> list[str]:
    """``fastedge-loop-io``: plain proxying on uvloop's transports."""
    return run_file_command(workdir, loop_io_config(port, upstream_port))


def chain_command(workdir: Path, port: int, upstream_port: int, tools: dict[str, str]) -> list[str]:
    """``fastedge-chain``; the JWT secret reaches the proxy through ``env``."""
    return [
        "env",
        f"{JWT_SECRET_ENV}={JWT_SECRET}",
        *run_file_command(workdir, chain_config(port, upstream_port)),
    ]


@dataclass(frozen=True)
class Comparison:
    """One ratio of the issue's goals: ``proxy`` over ``baseline`` in ``scenario``."""

    label: str
    proxy: str
    baseline: str
    scenario: str
    metric: str = "req/s"  # or "p99" (the proxy's p99 over the baseline's)
    goal: str = ""


COMPARISONS: tuple[Comparison, ...] = (
    Comparison("plain proxy vs nginx", "fastedge", "nginx", "small", goal=">= 1.0x"),
    Comparison("plain proxy vs HAProxy", "fastedge", "haproxy", "small", goal=">= 1.0x"),
    Comparison("plain proxy p99 vs nginx p99", "fastedge", "nginx", "small", "p99", "<= 1.5x"),
    Comparison("64 KiB vs nginx", "fastedge", "nginx", "64KiB"),
    # A small JSON POST: on the express lane since session 17 (the general path before).
    Comparison("POST with a small JSON body vs nginx", "fastedge", "nginx", "post"),
    # How much of the Python ceiling (uvloop + httptools copying bytes) fastedge reaches.
    Comparison("plain proxy vs a bare uvloop relay", "fastedge", "uvloop-relay", "small"),
    # What fastedge's own transports (fastedge._core.edgeio) buy over uvloop's.
    Comparison("own transports vs the event loop's", "fastedge", "fastedge-loop-io", "small"),
    Comparison(
        "full policy chain vs nginx plain", "fastedge-chain", "nginx", "small", goal=">= 0.7x"
    ),
    Comparison(
        "1,000 routes vs 1 route", "fastedge-1k-routes", "fastedge", "small", goal="0.95x-1.05x"
    ),
    # What active health checks cost: the lane's pick among healthy targets.
    Comparison("health-checked upstream vs plain", "fastedge-hc", "fastedge", "small"),
    Comparison(
        "breaker, outlier detection, retries vs plain", "fastedge-resilient", "fastedge", "small"
    ),
    Comparison("--workers 2 vs --workers 1", "fastedge-w2", "fastedge", "small"),
    Comparison("--workers 2 vs --workers 1, 64 KiB", "fastedge-w2", "fastedge", "64KiB"),
)
