"""Drive N request/response pairs through the data path with fake transports.

For deterministic instruction counts of fastedge's own per-request work (no kernel, no
event loop I/O), run it under callgrind twice and subtract:

    valgrind --tool=callgrind .venv/bin/python -m bench.proxy_loop 0
    valgrind --tool=callgrind .venv/bin/python -m bench.proxy_loop 20000
    # (total of the second - total of the first) / 20000 = instructions per request

``--cache`` puts an edge cache on the route, fills it once and then answers hits only
(issue 9's cache-hit scenario). ``--chain`` puts issue 9's full policy chain on the
route (JWT auth with cached verification, a local per-user limit that never triggers,
tracing at 1% sampling: the ``fastedge-chain`` variant of ``bench/load/variants.py``)
and sends a bearer token. ``--sampled`` is the chain with every request sampled (the
general path's cost for the 1% the chain records). ``--health`` gives the upstream active
health checks (the ``fastedge-hc`` variant; the checks are not started, so the target
stays healthy). ``--resilient`` adds a circuit breaker, outlier detection and retries to
those (the ``fastedge-resilient`` variant). ``--post`` sends a POST with a small JSON body
(the load harness's ``post`` scenario; on the express lane since session 17).
``--routes`` configures 1,000 prefix routes in front of the one the requests match (the
``fastedge-1k-routes`` variant): issue 9's "1,000 routes within 5% of 1 route", counted
in instructions, which this host's noise cannot blur.

`callgrind_annotate --inclusive=yes` on the second output shows where they go.
"""

from __future__ import annotations

import os
import sys
import tomllib
from typing import Any, cast

import uvloop

from bench.load.variants import JWT_SECRET, JWT_SECRET_ENV, ROUTES, bench_token, chain_config
from bench.test_bench_proxy import (
    REQUEST,
    RESPONSE,
    FakeTransport,
    fake_document,
    fake_server,
)
from fastedge.server import tune_gc

# A response the edge cache stores, fresh for an hour (no Date: its age starts at 0).
CACHEABLE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
    b"Content-Type: text/plain\r\nCache-Control: max-age=3600\r\nContent-Length: 12\r\n"
    b"Connection: keep-alive\r\n\r\nhello world\n"
)


# The load harness's post scenario (bench/load/run.py POST_BODY) as wrk sends it.
POST_JSON = b'{"id": 42, "items": [1, 2, 3], "note": "a small JSON body"}'
POST_REQUEST = (
    b"POST /hello HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
    b"Content-Type: application/json\r\n\r\n%s" % (len(POST_JSON), POST_JSON)
)


def chain_document(sample_ratio: float | None = None) -> dict[str, Any]:
    """``fake_document`` with the ``fastedge-chain`` policies (secret set in the env);
    ``sample_ratio`` replaces the chain's 1% (``--sampled``: every request recorded)."""
    os.environ[JWT_SECRET_ENV] = JWT_SECRET
    chain = tomllib.loads(chain_config(0, 1))
    if sample_ratio is not None:
        chain["tracing"]["sample_ratio"] = sample_ratio
    doc = fake_document()
    for section in ("auth", "rate_limits", "tracing"):
        doc[section] = chain[section]
    route = chain["routes"][0]
    doc["routes"][0].update(auth=route["auth"], rate_limit=route["rate_limit"])
    return doc


def cache_document() -> dict[str, Any]:
    """``fake_document`` with an edge cache on the route (``--cache``)."""
    doc = fake_document()
    doc["caches"] = {"c": {"max_bytes": "1MiB"}}
    doc["routes"][0]["cache"] = "c"
    return doc


def routes_document(routes: int = ROUTES) -> dict[str, Any]:
    """``fake_document`` behind ``routes - 1`` other prefix routes (``--routes``), as
    ``bench.load.variants.routes_config`` lays them out."""
    doc = fake_document()
    upstream = doc["routes"][0]["upstream"]
    others = [{"prefix": f"/api/v{n}/items", "upstream": upstream} for n in range(routes - 1)]
    doc["routes"] = others + doc["routes"]
    return doc


def health_document(resilient: bool = False) -> dict[str, Any]:
    """``fake_document`` whose upstream has active health checks (``--health``) and, with
    ``resilient``, the default breaker, outlier detection and retries (``--resilient``)."""
    doc = fake_document()
    upstream = doc["upstreams"]["o"]
    upstream["health_check"] = {"path": "/small", "interval": "2s"}
    if resilient:
        upstream.update(breaker={}, outlier={}, retry={})
    return doc


async def drive(
    count: int,
    *,
    chain: bool = False,
    cache: bool = False,
    sampled: bool = False,
    health: bool = False,
    resilient: bool = False,
    post: bool = False,
    routes: bool = False,
) -> None:
    """Build a gateway with one idle pooled upstream connection and relay ``count``
    (``cache``: fill the cache once, then answer ``count`` hits from it)."""
    request = POST_REQUEST if post else REQUEST
    if chain:
        token = b"Authorization: Bearer %s\r\n\r\n" % bench_token().encode()
        request = REQUEST[:-2] + token
    if cache:
        _, client, upstream = fake_server(cache_document())
        client.data_received(request)
        upstream.data_received(CACHEABLE)
        for _ in range(count):
            client.data_received(request)
        assert client.requests == count + 1, client.requests
        written = cast(FakeTransport, client.transport).written
        assert written == count + 1, written
        return
    if chain:
        doc = chain_document(1.0 if sampled else None)
    else:
        doc = health_document(resilient) if health or resilient else fake_document()
        if routes:
            doc = routes_document()
    _, client, upstream = fake_server(doc)
    # The collector as a running server has it (fastedge.server.tune_gc, since session
    # 18 here): start-up objects frozen, so a bigger config (--routes) costs no more per
    # full collection.
    tune_gc()
    for _ in range(count):
        client.data_received(request)
        upstream.data_received(RESPONSE)
    assert client.requests == count, client.requests
    # Every request reached the upstream (a refused one, e.g. a 401, would not).
    written = cast(FakeTransport, upstream.transport).written
    assert written == count, written


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    count = int(args[0]) if args else 20000
    flags = sys.argv[1:]
    uvloop.run(
        drive(
            count,
            chain="--chain" in flags or "--sampled" in flags,
            cache="--cache" in flags,
            sampled="--sampled" in flags,
            health="--health" in flags,
            resilient="--resilient" in flags,
            post="--post" in flags,
            routes="--routes" in flags,
        )
    )


if __name__ == "__main__":
    main()
