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

from bench.test_bench_proxy import REQUEST, RESPONSE, fake_document, fake_server


async def drive(count: int) -> None:
    """Build a gateway with one idle pooled upstream connection and relay ``count``."""
    _, client, upstream = fake_server(fake_document())
    for _ in range(count):
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)
    assert client.requests == count


def main() -> None:
    uvloop.run(drive(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))


if __name__ == "__main__":
    main()
