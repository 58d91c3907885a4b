"""Drive N request/response pairs through the data path with fake transports.

For deterministic instruction counts of fastedge's own per-request work (no kernel, no
event loop I/O), run it under callgrind twice and subtract:

    valgrind --tool=callgrind .venv/bin/python -m bench.proxy_loop 0
    valgrind --tool=callgrind .venv/bin/python -m bench.proxy_loop 20000
    # (total of the second - total of the first) / 20000 = instructions per request

``--chain`` puts issue 9's full policy chain on the route (JWT auth with cached
verification, a local per-user limit that never triggers, tracing at 1% sampling: the
``fastedge-chain`` variant of ``bench/load/variants.py``) and sends a bearer token.

`callgrind_annotate --inclusive=yes` on the second output shows where they go.
"""

from __future__ import annotations

import os
import sys
import tomllib
from typing import Any, cast

import uvloop

from bench.load.variants import JWT_SECRET, JWT_SECRET_ENV, bench_token, chain_config
from bench.test_bench_proxy import (
    REQUEST,
    RESPONSE,
    FakeTransport,
    fake_document,
    fake_server,
)


def chain_document() -> dict[str, Any]:
    """``fake_document`` with the ``fastedge-chain`` policies (secret set in the env)."""
    os.environ[JWT_SECRET_ENV] = JWT_SECRET
    chain = tomllib.loads(chain_config(0, 1))
    doc = fake_document()
    for section in ("auth", "rate_limits", "tracing"):
        doc[section] = chain[section]
    route = chain["routes"][0]
    doc["routes"][0].update(auth=route["auth"], rate_limit=route["rate_limit"])
    return doc


async def drive(count: int, *, chain: bool = False) -> None:
    """Build a gateway with one idle pooled upstream connection and relay ``count``."""
    request = REQUEST
    if chain:
        token = b"Authorization: Bearer %s\r\n\r\n" % bench_token().encode()
        request = REQUEST[:-2] + token
    _, client, upstream = fake_server(chain_document() if chain else fake_document())
    for _ in range(count):
        client.data_received(request)
        upstream.data_received(RESPONSE)
    assert client.requests == count, client.requests
    # Every request reached the upstream (a refused one, e.g. a 401, would not).
    written = cast(FakeTransport, upstream.transport).written
    assert written == count, written


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--chain"]
    count = int(args[0]) if args else 20000
    uvloop.run(drive(count, chain="--chain" in sys.argv[1:]))


if __name__ == "__main__":
    main()
