"""The reverse proxy a Python developer would write with aiohttp.

This is the baseline fastedge has to beat to be worth a compiled core: an ``aiohttp.web``
server that forwards every request through one shared ``ClientSession`` (so upstream
connections are pooled and kept alive, as any sensible hand-written proxy would do) and
streams the response body back chunk by chunk instead of buffering it.

It deliberately stays idiomatic rather than tuned: no custom protocol classes, no
``reuse_port`` tricks. The only choices made for fairness are the ones a careful user
would make too: uvloop as the event loop (fastedge uses it, so the comparison is about
the proxy code, not the loop), no access log (nor do the other proxies in the run), and
no response decompression (a proxy passes bytes through).

Run: ``python -m bench.load.aiohttp_proxy --listen 127.0.0.1:8080 --upstream http://127.0.0.1:9000``
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward. aiohttp frames
# each side itself (Content-Length or chunked), so Transfer-Encoding is re-decided per hop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM_KEY = web.AppKey("upstream", str)


def _forwardable(headers: MultiMapping[str]) -> CIMultiDict[str]:
    """Copy ``headers`` without the hop-by-hop fields, keeping repeated fields."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Forward ``request`` to the upstream and stream the answer back."""
    session = request.app[SESSION_KEY]
    # raw_path keeps the client's exact bytes (percent-encoding, query) — a proxy must
    # not re-normalise the target.
    target = URL(request.app[UPSTREAM_KEY] + request.raw_path, encoded=True)
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method,
            target,
            headers=_forwardable(request.headers),
            data=body,
            allow_redirects=False,
        )
    except (TimeoutError, aiohttp.ClientError):
        return web.Response(status=502, text="bad gateway\n")
    async with upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        # Copying Content-Length through makes aiohttp send the body with that length
        # instead of switching to chunked encoding.
        response.headers.update(_forwardable(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session_context(app: web.Application) -> AsyncIterator[None]:
    """Own the shared ClientSession for the lifetime of the app."""
    # limit=0: no cap on pooled upstream connections — nginx and HAProxy in the same run
    # are not capped either, and a cap of 100 (aiohttp's default) is above the 64 client
    # connections anyway.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:
        app[SESSION_KEY] = session
        yield


def make_app(upstream: str) -> web.Application:
    """Build the proxy application forwarding everything to ``upstream`` (``http://h:p``)."""
    app = web.Application()
    app[UPSTREAM_KEY] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_context)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``--listen``/``--upstream`` and serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve on")
    parser.add_argument("--upstream", required=True, help="upstream origin, http://host:port")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop to run on"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if args.loop == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    print(f"aiohttp proxy on http://{host}:{port} -> {args.upstream}", flush=True)
    web.run_app(
        make_app(args.upstream),
        host=host,
        port=int(port),
        access_log=None,
        print=None,
        loop=loop,
        shutdown_timeout=1.0,
    )


if __name__ == "__main__":
    main()
