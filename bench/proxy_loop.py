"""Drive N request/response pairs through the data path with fake transports.

For deterministic instruction counts of fastedge's own per-request work (no kernel, no
event loop I/O), run it under callgrind twice and subtract:

    valgrind --tool=callgrind .venv/bin/python -m bench.proxy_loop 0
    valgrind --tool=callgrind .venv/bin/python -m bench.proxy_loop 20000
    # (total of the second - total of the first) / 20000 = instructions per request

`callgrind_annotate --inclusive=yes` on the second output shows where they go.
"""

from __future__ import annotations

import sys

import uvloop

from bench.test_bench_proxy import REQUEST, RESPONSE, FakeTransport
from fastedge.config import parse_config
from fastedge.proxy import ClientConnection, UpstreamConnection
from fastedge.server import ProxyServer


async def drive(count: int) -> None:
    """Build a gateway with one idle pooled upstream connection and relay ``count``."""
    config = parse_config(
        {
            "server": {
                "listen": "127.0.0.1:0",
                "http": "fast",
                "access_log": False,
                "max_requests_per_connection": 0,
            },
            "admin": {"enabled": False},
            "upstreams": {"o": {"targets": ["http://127.0.0.1:1"]}},
            "routes": [{"prefix": "/", "upstream": "o"}],
        }
    )
    server = ProxyServer(config)
    target = server.gateway.upstreams["o"].targets[0]
    upstream = UpstreamConnection(target)
    upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    target.pool.state.idle.append(upstream)
    client = ClientConnection(server, b"http")
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    for _ in range(count):
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    assert client.requests == count


def main() -> None:
    uvloop.run(drive(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))


if __name__ == "__main__":
    main()
