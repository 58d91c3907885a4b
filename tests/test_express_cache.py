"""Fresh cache hits on the express lane, end to end, against the general path.

A route whose only filter is the edge cache lets ``CacheFilter.express_answer`` answer a
plain GET/HEAD from storage on the proxy's express lane (``ClientConnection._express``,
``_express_answer``). That must be invisible: every scenario here runs twice over real
loopback sockets, with ``server.express`` on and off and otherwise the same config, and
the two runs must agree on every byte the client receives, every byte the origin
receives, the cache's per-result counters and store statistics, the request metrics and
the access log. ``server.express_lane.served``, read after each request, proves which
requests the lane answered (exactly the eligible fresh hits) and that a declined request
(a miss, stale, a request ``Cache-Control``, a conditional, another Vary variant,
pipelined or split heads) left no trace.

Time is frozen: the cache's clock is a manual one and the origin's ``Date`` fields are
fixed, so ``Age`` and ``Cache-Status: ...; ttl=`` are exact and the runs are compared
byte for byte without normalising anything. The origin runs in the test's loop and
answers from a per-path script; its bodies name how many requests the path has had, so
a response served from storage is told apart from a fresh one by content, never timing.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import h11
import orjson
import pytest

from fastedge.cache.edge import SERVICE, EdgeCache
from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import Response
from tests.raw_client import RawClient

TOKEN = "express-cache-admin-token"
HOST = "example.test"
T0 = 1_700_000_000.0
"""The frozen clock's start (POSIX seconds): every stored response is aged from it."""


def http_date(ts: float) -> bytes:
    return email.utils.formatdate(ts, usegmt=True).encode()


# --- a scripted origin --------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How the origin answers GET/HEAD for one path (unsafe methods get ``200 done``).

    Every answer carries ``X-Origin-Count: <n>`` (the path's request count, any method),
    also a 304, so a revalidation changes the stored fields. ``body`` ``None``: the path
    and ``n`` (plus ``echo``'s request field value, for Vary).
    """

    status: bytes = b"200 OK"
    fields: tuple[bytes, ...] = (b"Cache-Control: max-age=60",)
    body: bytes | None = None
    etag: bytes | None = None
    echo: bytes | None = None


class Origin:
    """An HTTP/1.1 origin on 127.0.0.1 answering each path by its :class:`Spec`; keeps
    every request (head and body) in arrival order and a count per path."""

    def __init__(self, specs: dict[str, Spec]) -> None:
        self.specs = specs
        self.requests: list[bytes] = []
        self.counts: dict[bytes, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.Transport] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _OriginProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for t in self._transports:
            t.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def count(self, path: str) -> int:
        return self.counts.get(path.encode(), 0)

    def answer(self, method: bytes, target: bytes, fields: dict[bytes, bytes]) -> bytes:
        path = target.split(b"?", 1)[0]
        n = self.counts[path] = self.counts.get(path, 0) + 1
        if method not in (b"GET", b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nX-Origin-Count: %d\r\nContent-Length: 4\r\n\r\ndone" % n
        spec = self.specs.get(path.decode(), Spec())
        lines = list(spec.fields)
        if spec.etag is not None:
            lines.append(b"ETag: " + spec.etag)
        lines.append(b"X-Origin-Count: %d" % n)
        status = spec.status
        if spec.etag is not None and fields.get(b"if-none-match") == spec.etag:
            status = b"304 Not Modified"
        body = spec.body
        if body is None:
            body = path + b" n=%d" % n
            if spec.echo is not None:
                body += b" " + spec.echo + b"=" + fields.get(spec.echo, b"-")
            body += b"\n"
        if status[:3] in (b"204", b"304"):
            body = b""
        else:
            lines.append(b"Content-Length: %d" % len(body))
        head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in lines) + b"\r\n"
        return head if method == b"HEAD" else head + body


class _OriginProtocol(asyncio.Protocol):
    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.origin._transports.append(self.transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[: end + 4]
            lines = head[:-4].split(b"\r\n")
            fields: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip()
            length = int(fields.get(b"content-length", b"0"))
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            request = self.buf[: end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.origin.requests.append(request)
            method, target, _ = lines[0].split(b" ")
            self.transport.write(self.origin.answer(method, target, fields))


# --- scenarios ------------------------------------------------------------------------------


def request(
    path: str, rid: str, extra: str = "", method: str = "GET", host: str = HOST, body: bytes = b""
) -> bytes:
    """A request with a fixed X-Request-Id (so both runs answer with the same id)."""
    length = f"Content-Length: {len(body)}\r\n" if method in ("POST", "PUT", "DELETE") else ""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: {rid}\r\n{length}{extra}\r\n"
    return head.encode() + body


@dataclass
class Req:
    """Send ``data`` on the current connection and read its response(s); ``lane``: the
    express lane answers it when on. ``split``: sent in two writes 30 ms apart; ``count``
    responses are read (pipelined requests)."""

    data: bytes
    method: bytes = b"GET"
    lane: bool = False
    split: bool = False
    count: int = 1


@dataclass
class Advance:
    """Move the cache's clock."""

    seconds: float


@dataclass
class Purge:
    """``DELETE /cache?url=http://example.test<path>`` on the admin API."""

    path: str


@dataclass
class Until:
    """Wait (up to 2 s) until the origin has had ``n`` requests in all and no background
    refresh is running."""

    n: int


@dataclass
class Reload:
    """Reload the proxy; ``limited``: the ``/`` route gets a rate limit next to its cache."""

    limited: bool


Step = Req | Advance | Purge | Until | Reload


def GET(path: str, rid: str, extra: str = "", *, lane: bool = False, **kw: Any) -> Req:
    return Req(request(path, rid, extra, **kw), lane=lane)


def HEAD(path: str, rid: str, extra: str = "", *, lane: bool = False) -> Req:
    return Req(request(path, rid, extra, method="HEAD"), b"HEAD", lane=lane)


class FrozenClock:
    """The cache's clock: stands still unless advanced."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    """What one proxy (express on or off) did with a scenario."""

    raw: list[bytes] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    lane: list[int] = field(default_factory=list)  # served by the lane, per Req
    origin: list[bytes] = field(default_factory=list)
    results: dict[str, int] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    admin_stats: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    access: list[dict[str, Any]] = field(default_factory=list)
    served: int = 0


def document(
    origin: int, express: bool, access_log: Path, server: dict[str, Any], *, limited: bool = False
) -> dict[str, Any]:
    """Everything under ``/`` through cache ``edge`` alone (``limited``: and a rate
    limit); ``/limited`` through the cache and a (generous) rate limit."""
    root: dict[str, Any] = {"prefix": "/", "upstream": "origin", "cache": "edge"}
    if limited:
        root["rate_limit"] = "lim"
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "http": "fast",
            "access_log": str(access_log),
            "express": express,
            **server,
        },
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {"origin": {"targets": [f"http://127.0.0.1:{origin}"]}},
        "caches": {"edge": {"max_bytes": "4MiB"}},
        "rate_limits": {"lim": {"algorithm": "token_bucket", "rate": 1000.0, "burst": 1000}},
        "routes": [
            root,
            {"prefix": "/limited", "upstream": "origin", "cache": "edge", "rate_limit": "lim"},
        ],
    }


def selected_metrics(text: bytes) -> list[str]:
    """The request and cache samples of a scrape, without duration sums and buckets
    (wall-clock timings) and without the express lane's own counters."""
    keep = []
    for line in text.decode().splitlines():
        if line.startswith("#") or line.startswith("fastedge_express_"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(("fastedge_requests_total", "fastedge_cache_")) or (
            name.endswith("_count") and "duration" in name
        ):
            keep.append(line)
    return keep


async def admin_call(server: ProxyServer, method: str, target: str) -> tuple[int, Any]:
    assert server._admin is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server._admin.port)
    try:
        writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


async def start_proxy(
    origin: Origin, express: bool, access_log: Path, server: dict[str, Any] | None = None
) -> tuple[ProxyServer, FrozenClock]:
    """A started proxy in front of ``origin``, its cache on a frozen clock."""
    doc = document(origin.port, express, access_log, server or {})
    proxy = ProxyServer(parse_config(doc), admin_token=TOKEN)
    await proxy.start()
    assert proxy.express_lane.enabled is express
    clock = FrozenClock()
    edge: EdgeCache = proxy.runtime.services[SERVICE].caches["edge"]
    edge.clock = clock
    return proxy, clock


async def play(
    steps: list[Step],
    specs: dict[str, Spec],
    *,
    express: bool,
    tmp: Path,
    server: dict[str, Any] | None = None,
) -> Run:
    """Run ``steps`` against a fresh origin and proxy; one client connection, reopened
    whenever a response closes it."""
    origin = Origin(specs)
    await origin.start()
    log_path = tmp / f"access-{'on' if express else 'off'}.log"
    proxy, clock = await start_proxy(origin, express, log_path, server)
    edge: EdgeCache = proxy.runtime.services[SERVICE].caches["edge"]
    run = Run()
    client: RawClient | None = None
    try:
        client = await RawClient.open(proxy.port)
        for step in steps:
            if isinstance(step, Advance):
                clock.now += step.seconds
                continue
            if isinstance(step, Purge):
                status, data = await admin_call(
                    proxy, "DELETE", f"/cache?url=http://{HOST}{step.path}"
                )
                assert status == 200 and data["purged"] >= 1, data
                continue
            if isinstance(step, Reload):
                doc = document(origin.port, express, log_path, server or {}, limited=step.limited)
                assert proxy.reload(parse_config(doc))
                continue
            if isinstance(step, Until):
                # Not asserted here: the comparison of the runs says what went wrong.
                for _ in range(200):
                    if len(origin.requests) >= step.n and not edge.refreshing:
                        break  # and the refresh stored what it got
                    await asyncio.sleep(0.01)
                continue
            before = proxy.express_lane.served
            if step.split:
                cut = len(step.data) // 2
                await client.send(step.data[:cut])
                await asyncio.sleep(0.03)
                await client.send(step.data[cut:])
            else:
                await client.send(step.data)
            for _ in range(step.count):
                resp, raw = await client.response(step.method)
                run.responses.append(resp)
                run.raw.append(raw)
            run.lane.append(proxy.express_lane.served - before)
            if client.conn.our_state is h11.MUST_CLOSE or client.conn.their_state is h11.MUST_CLOSE:
                assert await client.is_closed()
                await client.close()
                client = await RawClient.open(proxy.port)
        await client.close()
        client = None
        run.origin = list(origin.requests)
        run.results = dict(edge.results)
        run.store = edge.store.stats()
        status, stats = await admin_call(proxy, "GET", "/cache")
        assert status == 200
        run.admin_stats = stats["caches"]["edge"]
        run.metrics = selected_metrics(proxy.metrics.render())
        run.served = proxy.express_lane.served
    finally:
        if client is not None:
            await client.close()
        await proxy.shutdown(drain_timeout=1)
        await origin.close()
    for line in log_path.read_bytes().splitlines():
        record = orjson.loads(line)
        del record["ts"], record["duration_ms"]  # wall-clock values
        # The origin's port differs between the runs; upstream_ms is a timing or None.
        if record["target"] is not None:
            record["target"] = "origin"
        record["upstream_ms"] = record["upstream_ms"] is not None
        run.access.append(record)
    return run


async def parity(
    steps: list[Step], specs: dict[str, Spec], tmp: Path, **server: Any
) -> tuple[Run, Run]:
    """Play ``steps`` express on then off; assert the two runs are indistinguishable
    and that the lane answered exactly the steps marked ``lane``."""
    on = await play(steps, specs, express=True, tmp=tmp, server=server)
    off = await play(steps, specs, express=False, tmp=tmp, server=server)
    for i, (a, b) in enumerate(zip(on.raw, off.raw, strict=True)):
        assert a == b, f"response {i} differs:\nexpress on:  {a!r}\nexpress off: {b!r}"
    assert on.origin == off.origin
    assert on.results == off.results
    assert on.store == off.store
    assert on.admin_stats == off.admin_stats
    assert on.metrics == off.metrics
    assert on.access == off.access
    reqs = [s for s in steps if isinstance(s, Req)]
    assert off.lane == [0] * len(reqs) and off.served == 0
    assert on.lane == [int(s.lane) for s in reqs]
    assert on.served == sum(s.lane for s in reqs)
    return on, off


def header(resp: Response, name: str) -> str | None:
    value = resp.header(name)
    return None if value is None else value.decode()


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A failure inside a protocol callback is only logged, never raised: any ERROR
    record fails the test."""
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- 1 + 2: hits are the same bytes, and the lane really answers them ----------------------


HDRS_FIELDS = (
    b"Server: scripted",
    b"Content-Type: text/plain; charset=utf-8",
    b"Cache-Control: public, max-age=60",
    b"Via: 1.0 origin-cache",
    b"X-Request-Id: from-origin",
    b"Connection: keep-alive",
    b"Keep-Alive: timeout=5",
    b"X-Spaced: \t padded value \t",
    b"X-Empty:",
    b"Last-Modified: " + http_date(T0 - 3600),
    b"Vary: Accept-Encoding",
)

HIT_SPECS = {
    "/plain": Spec(),
    "/dated": Spec(fields=(b"Cache-Control: max-age=60", b"Date: " + http_date(T0 - 7))),
    "/aged": Spec(fields=(b"Cache-Control: max-age=60", b"Date: " + http_date(T0 - 7), b"Age: 30")),
    "/hdrs": Spec(fields=HDRS_FIELDS, etag=b'"h1"'),
    "/nocontent": Spec(status=b"204 No Content"),
    "/missing": Spec(status=b"404 Not Found"),
    "/moved": Spec(
        status=b"301 Moved Permanently",
        fields=(b"Cache-Control: max-age=60", b"Location: /plain"),
    ),
    "/big": Spec(body=bytes(range(256)) * 800),  # 200 kB: stored in several pieces
    "/empty": Spec(body=b""),
    "/reason": Spec(status=b"200 Fine Thanks"),  # stored without the origin's phrase
    "/nonauth": Spec(status=b"203 Non-Authoritative Information"),
    "/gone410": Spec(status=b"410 Gone"),
}


async def test_hits_are_byte_identical_and_answered_on_the_lane(tmp_path: Path) -> None:
    steps: list[Step] = []
    for path in HIT_SPECS:
        steps += [
            GET(path, f"{path}-miss"),  # stored
            GET(path, f"{path}-hit", lane=True),
            HEAD(path, f"{path}-head", lane=True),
        ]
    steps += [
        # Time passes: whole seconds of Age and ttl, a fraction rounds as on_request does.
        Advance(2.5),
        GET("/plain", "t-1", lane=True),
        GET("/dated", "t-2", lane=True),
        GET("/aged", "t-3", lane=True),
        Advance(0.6),
        GET("/plain", "t-4", lane=True),
        HEAD("/aged", "t-5", lane=True),
        # Host is compared as the key normalises it; other fields pass untouched.
        GET("/plain", "h-1", "Accept: */*\r\nUser-Agent: t\r\n", lane=True, host="EXAMPLE.test"),
        GET("/plain", "h-2", lane=True, host="example.test:80"),
        GET("/hdrs", "h-3", "Accept-Encoding: identity\r\n"),  # another variant: a miss
        GET("/hdrs", "h-4", "Accept-Encoding: identity\r\n", lane=True),
        # The client closes: the answer says so and the connection ends.
        GET("/plain", "c-1", "Connection: close\r\n", lane=True),
        HEAD("/big", "c-2", "Connection: close\r\n", lane=True),
        GET("/big", "c-3", lane=True),
        # A query string is another resource.
        GET("/plain?x=1", "q-1"),
        GET("/plain?x=1", "q-2", lane=True),
    ]
    on, _ = await parity(steps, HIT_SPECS, tmp_path)

    by_rid = {header(r, "x-request-id"): r for r in on.responses}
    # The origin saw one GET per stored resource (and variant), nothing for the hits.
    assert on_counts(on) == {p.encode(): 1 for p in HIT_SPECS} | {b"/plain": 2, b"/hdrs": 2}
    # Exact ages and ttls on the frozen clock (RFC 9111 §4.2.3, §5.1; RFC 9211).
    ages = {
        rid: (header(by_rid[rid], "age"), header(by_rid[rid], "cache-status"))
        for rid in ("/plain-hit", "/dated-hit", "/aged-hit", "t-1", "t-2", "t-3", "t-4", "t-5")
    }
    assert ages == {
        "/plain-hit": ("0", "fastedge; hit; ttl=60"),
        "/dated-hit": ("7", "fastedge; hit; ttl=53"),  # apparent age from Date
        "/aged-hit": ("30", "fastedge; hit; ttl=30"),  # the origin's Age wins
        "t-1": ("2", "fastedge; hit; ttl=57"),
        "t-2": ("9", "fastedge; hit; ttl=50"),
        "t-3": ("32", "fastedge; hit; ttl=27"),
        "t-4": ("3", "fastedge; hit; ttl=56"),
        "t-5": ("33", "fastedge; hit; ttl=26"),
    }
    assert by_rid["/plain-hit"].body == b"/plain n=1\n" == by_rid["h-2"].body
    assert by_rid["/big-hit"].body == bytes(range(256)) * 800 == by_rid["c-3"].body
    assert by_rid["c-2"].body == b""  # HEAD /big
    assert header(by_rid["c-2"], "content-length") == str(256 * 800)
    assert header(by_rid["c-1"], "connection") == "close"
    nocontent = by_rid["/nocontent-hit"]
    assert nocontent.status == 204 and header(nocontent, "content-length") is None
    assert by_rid["/missing-hit"].status == 404 and by_rid["/moved-hit"].status == 301
    assert by_rid["/gone410-hit"].status == 410
    assert by_rid["/reason-hit"].status == 200 and by_rid["/nonauth-hit"].status == 203
    # The origin's own X-Request-Id never reaches the client; ours does.
    hdrs = by_rid["/hdrs-hit"]
    assert hdrs.header_all("x-request-id") == [b"/hdrs-hit"]
    assert header(hdrs, "x-spaced") == "padded value" and header(hdrs, "etag") == '"h1"'
    hits = 2 * len(HIT_SPECS) + 12
    assert on.served == hits  # every hit of this scenario was the lane's
    misses = len(HIT_SPECS) + 2
    assert on.results == {"hit": hits, "stale": 0, "revalidated": 0, "miss": misses, "bypass": 0}
    assert on.admin_stats["requests"] == on.results
    assert len(on.responses) == hits + misses


def on_counts(run: Run) -> dict[bytes, int]:
    """Requests per path the origin received."""
    out: dict[bytes, int] = {}
    for req in run.origin:
        path = req.split(b" ", 2)[1].split(b"?", 1)[0]
        out[path] = out.get(path, 0) + 1
    return out


@pytest.mark.parametrize(
    "server",
    [
        {"max_requests_per_connection": 3},
        {"max_requests_per_connection": 1},
        {"keepalive_timeout": "0s"},
    ],
    ids=["max3", "max1", "no-keepalive"],
)
async def test_connection_limits_close_as_the_general_path_does(
    tmp_path: Path, server: dict[str, Any]
) -> None:
    steps: list[Step] = [
        GET("/plain", "c-1"),
        GET("/plain", "c-2", lane=True),
        HEAD("/plain", "c-3", lane=True),
        GET("/plain", "c-4", lane=True),
        GET("/plain", "c-5", lane=True),
        GET("/other", "c-6"),
        GET("/other", "c-7", lane=True),
        GET("/plain", "c-8", lane=True),
    ]
    on, _ = await parity(steps, {"/plain": Spec(), "/other": Spec()}, tmp_path, **server)
    closing = [header(r, "connection") == "close" for r in on.responses]
    if "max_requests_per_connection" in server:
        limit = server["max_requests_per_connection"]
        assert closing == [(i + 1) % limit == 0 for i in range(len(steps))]
    else:
        assert all(closing)
    assert on_counts(on) == {b"/plain": 1, b"/other": 1}


@pytest.mark.parametrize(
    ("keepalive", "header_timeout"),
    [(0.3, 10.0), (0.6, 0.2)],
    ids=["short-keepalive", "short-head"],
)
async def test_idle_connection_after_a_lane_hit_times_out(
    tmp_path: Path, keepalive: float, header_timeout: float
) -> None:
    """The keep-alive deadline runs from the lane's answer, as after the general path's,
    whether the timer armed before the request is due earlier or later than it."""
    server = {"keepalive_timeout": f"{keepalive}s", "header_timeout": f"{header_timeout}s"}
    for express in (True, False):
        origin = Origin({"/plain": Spec()})
        await origin.start()
        proxy, _ = await start_proxy(origin, express, tmp_path / "a.log", server)
        try:
            client = await RawClient.open(proxy.port)
            await client.send(request("/plain", "k-1"))
            assert (await client.response(b"GET"))[0].status == 200
            await client.close()
            client = await RawClient.open(proxy.port)  # the lane's answer comes first
            await client.send(request("/plain", "k-2"))
            assert (await client.response(b"GET"))[0].status == 200
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert proxy.express_lane.served == (1 if express else 0)
            assert await client.is_closed(timeout=5)
            idle = loop.time() - start
            assert keepalive - 0.1 < idle < keepalive + 1.0, (express, idle)
            await client.close()
        finally:
            await proxy.shutdown(drain_timeout=1)
            await origin.close()


async def test_lane_hit_without_a_request_id_gets_a_fresh_one(tmp_path: Path) -> None:
    origin = Origin({"/plain": Spec()})
    await origin.start()
    log_path = tmp_path / "ids.log"
    proxy, _ = await start_proxy(origin, True, log_path)
    ids: list[bytes] = []
    try:
        client = await RawClient.open(proxy.port)
        for rid in ("", "not valid", ""):
            extra = f"X-Request-Id: {rid}\r\n" if rid else ""
            await client.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode())
            resp, _ = await client.response(b"GET")
            value = resp.header("x-request-id")
            assert value is not None and value != b"not valid"
            ids.append(value)
        await client.close()
        assert proxy.express_lane.served == 2
    finally:
        await proxy.shutdown(drain_timeout=1)
        await origin.close()
    assert len(set(ids)) == 3 and all(re.fullmatch(rb"[0-9a-f]{22}", i) for i in ids)
    logged = [orjson.loads(line)["request_id"].encode() for line in log_path.read_bytes().split()]
    assert logged == ids


async def test_half_closed_client_gets_its_hit_then_the_close(tmp_path: Path) -> None:
    raws = []
    for express in (True, False):
        origin = Origin({"/plain": Spec()})
        await origin.start()
        proxy, _ = await start_proxy(origin, express, tmp_path / "h.log")
        try:
            for rid in ("h-1", "h-2"):
                client = await RawClient.open(proxy.port)
                await client.send(request("/plain", rid))
                client.writer.write_eof()
                raws.append(await client.read_raw_until_close(timeout=5))
                await client.close()
            assert proxy.express_lane.served == (1 if express else 0)
        finally:
            await proxy.shutdown(drain_timeout=1)
            await origin.close()
    assert raws[:2] == raws[2:]
    assert b"cache-status: fastedge; hit; ttl=60\r\n" in raws[1]


# --- 3: declines leave no trace -------------------------------------------------------------


DECLINE_SPECS = {
    "/cond": Spec(
        fields=(b"Cache-Control: max-age=60", b"Last-Modified: " + http_date(T0 - 3600)),
        etag=b'"v1"',
    ),
    "/vary": Spec(fields=(b"Cache-Control: max-age=60", b"Vary: Accept"), echo=b"accept"),
    "/short": Spec(fields=(b"Cache-Control: max-age=1",), etag=b'"s1"'),
    "/gone": Spec(fields=(b"Cache-Control: max-age=1",)),
    "/swr": Spec(fields=(b"Cache-Control: max-age=1, stale-while-revalidate=30",)),
    "/swre": Spec(fields=(b"Cache-Control: max-age=1, stale-while-revalidate=30",), etag=b'"e1"'),
    "/revalidate": Spec(fields=(b"Cache-Control: no-cache, max-age=60",), etag=b'"r1"'),
}


async def test_declined_requests_take_the_general_path_without_a_trace(tmp_path: Path) -> None:
    steps: list[Step] = [
        GET("/cond", "d-01"),  # stored
        GET("/cond", "d-02", lane=True),
        # Request Cache-Control: revalidated with the origin (its 304 refreshes the entry).
        GET("/cond", "d-03", "Cache-Control: no-cache\r\n"),
        Advance(1),
        GET("/cond", "d-04", "Cache-Control: max-age=0\r\n"),
        GET("/cond", "d-05", "Cache-Control: max-stale=10\r\n"),  # served, but not here
        GET("/cond", "d-06", "cache-control: MIN-FRESH=1\r\n"),
        # Conditionals: the stored response answers them on the general path.
        GET("/cond", "d-07", 'If-None-Match: "v1"\r\n'),
        HEAD("/cond", "d-08", 'If-None-Match: W/"v1", "x"\r\n'),
        GET("/cond", "d-09", 'If-None-Match: "v0"\r\n'),
        GET("/cond", "d-10", "If-Modified-Since: " + http_date(T0).decode() + "\r\n"),
        GET("/cond", "d-11", "If-Modified-Since: " + http_date(T0 - 7200).decode() + "\r\n"),
        GET("/cond", "d-12", lane=True),  # the refreshed entry, with its new fields
        GET("/cond", "d-12a", "CACHE-CONTROL: no-transform\r\n"),  # any name case
        GET("/cond", "d-12b", "IF-MODIFIED-SINCE: " + http_date(T0).decode() + "\r\n"),
        GET("/cond", "d-12c", "Cache-Control:\r\n"),  # empty: still not the lane's
        # Fields the cache does not look at: the lane answers, as on_request would.
        GET("/cond", "d-12d", "Pragma: no-cache\r\n", lane=True),
        GET("/cond", "d-12e", 'Range: bytes=0-1\r\nIf-Range: "v1"\r\n', lane=True),
        GET("/cond", "d-12f", 'If-Match: "v1"\r\nIf-Unmodified-Since: x\r\n', lane=True),
        GET("/cond", "d-12g", "Authorization: Bearer x\r\nCookie: a=1\r\n", lane=True),
        # Pipelined, or a head in two pieces: never the lane, same answers.
        Req(request("/cond", "d-13") + request("/cond", "d-14"), count=2),
        Req(request("/cond", "d-15"), split=True),
        # Vary: Accept selects among variants; a request for another one declines.
        GET("/vary", "v-1", "Accept: text/html\r\n"),
        GET("/vary", "v-2", "Accept: application/json\r\n"),
        GET("/vary", "v-3", "Accept: text/html\r\n", lane=True),
        GET("/vary", "v-4", "Accept: application/json\r\n", lane=True),
        GET("/vary", "v-5"),  # no Accept: only matches a response stored without one
        GET("/vary", "v-6", lane=True),
        GET("/vary", "v-7", "Accept: text/plain\r\n"),
        HEAD("/vary", "v-8", "Accept: text/plain\r\n", lane=True),
        GET("/vary", "v-9", "Accept:  TEXT/HTML \r\n", lane=True),  # normalised as stored
        GET("/vary", "v-10", "Accept: text/html\r\nAccept: text/plain\r\n"),
        GET("/vary", "v-11", "Accept: text/html\r\nAccept: text/plain\r\n", lane=True),
        # Stale: revalidated (ETag) or fetched again (no validator) on the general path.
        GET("/short", "s-1"),
        GET("/gone", "g-1"),
        GET("/swr", "w-1"),
        GET("/swre", "e-1"),
        GET("/revalidate", "r-1"),
        GET("/revalidate", "r-2"),  # response no-cache: always revalidated
        HEAD("/revalidate", "r-3"),
        Advance(0.5),
        GET("/short", "s-2", lane=True),
        Advance(1.0),
        GET("/short", "s-3"),  # stale: 304 from the origin
        GET("/short", "s-4", lane=True),
        HEAD("/gone", "g-2"),  # stale HEAD: forwarded as it came
        GET("/gone", "g-3"),
        GET("/gone", "g-4", lane=True),
        GET("/swr", "w-2"),  # stale-while-revalidate: stale now, refreshed behind
        Until(19),
        GET("/swr", "w-3", lane=True),
        GET("/swre", "e-2"),  # the same, refreshed by a 304: new fields, age 0
        Until(20),
        GET("/swre", "e-3", lane=True),
        # Long gone from the store (expired out of the LRU): a plain miss.
        Advance(3600),
        GET("/gone", "g-5"),
        GET("/gone", "g-6", lane=True),
    ]
    on, off = await parity(steps, DECLINE_SPECS, tmp_path)

    by_rid = {header(r, "x-request-id"): r for r in on.responses}

    def status(rid: str) -> tuple[int, str | None]:
        r = by_rid[rid]
        return r.status, header(r, "cache-status")

    assert status("d-03") == (200, "fastedge; fwd=request; fwd-status=304; ttl=60")
    assert status("d-07")[0] == 304 and status("d-08")[0] == 304
    assert status("d-09")[0] == 200 and by_rid["d-09"].body == b"/cond n=1\n"
    assert status("d-10")[0] == 304 and status("d-11")[0] == 200
    assert header(by_rid["d-12"], "x-origin-count") == "3"  # from the last 304
    assert by_rid["v-3"].body == b"/vary n=1 accept=text/html\n"
    assert by_rid["v-4"].body == b"/vary n=2 accept=application/json\n"
    assert by_rid["v-6"].body == b"/vary n=3 accept=-\n"
    assert status("s-3") == (200, "fastedge; fwd=stale; fwd-status=304; ttl=1")
    assert header(by_rid["s-4"], "x-origin-count") == "2"
    assert header(by_rid["w-2"], "cache-status") is not None
    assert "stale-while-revalidate" in str(header(by_rid["w-2"], "cache-status"))
    assert by_rid["w-3"].body == b"/swr n=2\n"
    assert by_rid["e-3"].body == b"/swre n=1\n"
    assert (header(by_rid["e-3"], "x-origin-count"), header(by_rid["e-3"], "age")) == ("2", "0")
    assert by_rid["g-6"].body == b"/gone n=4\n"
    assert by_rid["v-9"].body == by_rid["v-3"].body
    assert by_rid["v-11"].body == b"/vary n=5 accept=text/plain\n"
    assert on.results == off.results
    # Each request counted once: a lane hit is never also counted by on_request.
    assert sum(on.results.values()) == len(on.responses)


# --- 4: invalidation ------------------------------------------------------------------------


async def test_unsafe_methods_and_purges_invalidate_what_the_lane_serves(tmp_path: Path) -> None:
    steps: list[Step] = [
        GET("/inv", "i-01"),
        GET("/inv", "i-02", lane=True),
        HEAD("/inv", "i-03", lane=True),
        Req(request("/inv", "i-04", method="POST", body=b"x=1"), b"POST"),
        GET("/inv", "i-05"),  # not from storage: the POST invalidated it
        GET("/inv", "i-06", lane=True),
        Req(request("/inv", "i-07", method="DELETE"), b"DELETE"),
        HEAD("/inv", "i-08"),
        GET("/inv", "i-09"),
        GET("/inv", "i-10", lane=True),
        Purge("/inv"),
        GET("/inv", "i-11"),
        GET("/inv", "i-12", lane=True),
        # A HEAD after a purge is forwarded; nothing is stored from it.
        Purge("/inv"),
        HEAD("/inv", "i-13"),
        HEAD("/inv", "i-14"),
        GET("/inv", "i-15"),
        HEAD("/inv", "i-16", lane=True),
    ]
    on, _ = await parity(steps, {"/inv": Spec()}, tmp_path)
    bodies = {header(r, "x-request-id"): r.body for r in on.responses}
    assert bodies["i-02"] == b"/inv n=1\n"
    assert bodies["i-05"] == b"/inv n=3\n" == bodies["i-06"]
    assert bodies["i-09"] == b"/inv n=6\n" == bodies["i-10"]
    assert bodies["i-11"] == b"/inv n=7\n" == bodies["i-12"]
    assert bodies["i-15"] == b"/inv n=10\n"
    assert on.admin_stats["purged"] == 4  # two purges, two invalidations


# --- 5: another filter on the route keeps the lane out -------------------------------------


async def test_cache_with_another_filter_is_served_on_the_general_path(tmp_path: Path) -> None:
    steps: list[Step] = [
        GET("/limited/a", "l-1"),
        GET("/limited/a", "l-2"),
        HEAD("/limited/a", "l-3"),
        GET("/limited/a", "l-4", "Connection: close\r\n"),
        GET("/limited/a", "l-5"),
        GET("/a", "l-6"),  # the cache-only route next to it does take the lane
        GET("/a", "l-7", lane=True),
        # A reload that adds a filter to that route takes it off the lane (the stored
        # response survives the reload), and one that removes it puts it back.
        Reload(limited=True),
        GET("/a", "l-8"),
        HEAD("/a", "l-9"),
        Reload(limited=False),
        GET("/a", "l-10", lane=True),
    ]
    on, _ = await parity(steps, {"/limited/a": Spec(), "/a": Spec()}, tmp_path)
    hits = [header(r, "cache-status") for r in on.responses if r is not on.responses[0]]
    assert hits[:4] == ["fastedge; hit; ttl=60"] * 4
    assert hits[5:] == ["fastedge; hit; ttl=60"] * 4
    assert on_counts(on) == {b"/limited/a": 1, b"/a": 1}
    assert on.served == 2
