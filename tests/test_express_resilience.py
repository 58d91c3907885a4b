"""Breakers, outlier detection and retries on the express lane, against the general path.

Since session 16 (commit a6bfdf5) a resilient round-robin upstream takes the express lane:
``ClientConnection._express`` chooses with ``Upstream.express_attempt`` (the first of
``candidates(None)`` that ``admit`` lets through), counts the request for the retry
budget, reports the response's status, promotes a status the retry policy may retry, and
takes its choice back (``Upstream.express_decline``) when it does not send the request.

Every scenario here runs twice over real loopback sockets, ``server.express`` on and off,
and the two runs must agree on everything a client or an operator can see: each
response's status, body and answering origin, every target's breaker state and ejection
after each request, the counters in ``/metrics`` and the retry budget. The express run
must also show, request by request, that the lane took the request (``served``) or
handed it to the general path (``promoted``), so the agreement is not the general path
agreeing with itself.

The origins are in-test loopback servers (:class:`SwitchOrigin`) whose answer a test
switches between requests without closing their connections, so pooled connections stay
usable and the lane keeps getting them. Time is a :class:`FakeClock` that the breakers,
outlier detection and retry budget read (``fastedge.gateway`` and the registry's
``time.monotonic``, each breaker's clock): open periods and ejections end when the test
says, not when a loaded machine gets round to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import fastedge.gateway as gateway_module
import fastedge.upstream.registry as registry_module
import fastedge.upstream.resilient_tier as resilient_tier_module
from fastedge.config import parse_config
from fastedge.gateway import Target, Upstream
from fastedge.server import ProxyServer
from tests.test_express_proxy import lane_counts, started_origins
from tests.test_resilience_proxy import fetch, origin_port

MakeProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]

# --- an origin the test switches ---------------------------------------------------------


class SwitchOrigin:
    """A keep-alive HTTP/1.1 origin on 127.0.0.1 for bodiless requests, answering every
    request with ``status`` (a body naming itself and the status, ``x-origin-port``), or
    with ``Connection: close`` and a close when ``closing``, or not yet when ``hold``
    (until :meth:`release`). Counts the requests it received."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.status = 200
        self.closing = False
        self.hold = False
        self.requests = 0
        self.port = 0
        self.held: list[tuple[asyncio.Transport, bytes, bool]] = []
        self.transports: list[asyncio.Transport] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _SwitchProtocol(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        for transport in self.transports:
            transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, transport: asyncio.Transport) -> None:
        """Answer one request (or hold the answer) as currently switched."""
        self.requests += 1
        body = f"{self.label} answered {self.status}\n".encode()
        data = (
            b"HTTP/1.1 %d Switched\r\nx-origin-port: %d\r\ncontent-type: text/plain\r\n"
            b"content-length: %d\r\n%s\r\n%s"
            % (
                self.status,
                self.port,
                len(body),
                b"connection: close\r\n" if self.closing else b"",
                body,
            )
        )
        if self.hold:
            self.held.append((transport, data, self.closing))
            return
        transport.write(data)
        if self.closing:
            transport.close()

    def release(self) -> None:
        """Send the held answers."""
        for transport, data, closing in self.held:
            if not transport.is_closing():
                transport.write(data)
                if closing:
                    transport.close()
        self.held.clear()


class _SwitchProtocol(asyncio.Protocol):
    def __init__(self, origin: SwitchOrigin) -> None:
        self.origin = origin
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.origin.transports.append(self.transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        # The proxy forwards GETs only here: a head ends each request.
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            if not self.transport.is_closing():
                self.origin.answer(self.transport)


@pytest.fixture
async def new_switch() -> AsyncIterator[Callable[[str], Awaitable[SwitchOrigin]]]:
    """``await new_switch(label)``: a started :class:`SwitchOrigin`, closed at the end."""
    async with started_origins(SwitchOrigin, release=True) as start:
        yield start


NewSwitch = Callable[[str], Awaitable[SwitchOrigin]]

# --- a clock the test moves ----------------------------------------------------------------


class FakeClock:
    """``time.monotonic`` for the resilience state: it moves only in :meth:`advance`."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def attach(self, upstream: Upstream) -> None:
        """Make ``upstream``'s breakers read this clock (they were built with the real
        one: ``CircuitBreaker(clock=time.monotonic)`` binds it at construction)."""
        for target in upstream.targets:
            if target.breaker is not None:
                target.breaker._clock = self.monotonic


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A :class:`FakeClock` read by ``fastedge.gateway`` (candidates, breaker_state,
    report's outlier detection, the retry budget), the lane's ``ResilientTier`` and the
    registry's gauges."""
    fake = FakeClock()
    shim = SimpleNamespace(monotonic=fake.monotonic)
    monkeypatch.setattr(gateway_module, "time", shim)
    monkeypatch.setattr(resilient_tier_module, "time", shim)  # the lane's ResilientTier
    monkeypatch.setattr(registry_module, "time", shim)
    return fake


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A failure inside a protocol callback is only logged, never raised into the test:
    any ERROR record fails the test."""
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- running one scenario ------------------------------------------------------------------


def document(origins: list[SwitchOrigin], *, express: bool, **upstream: Any) -> dict[str, Any]:
    """A config sending everything to upstream ``main`` over ``origins`` (round robin,
    equal weights), with the resilience settings in ``upstream``."""
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "http": "fast",
            "access_log": False,
            "express": express,
        },
        "admin": {"enabled": False},
        "upstreams": {"main": {"targets": [o.url for o in origins], **upstream}},
        "routes": [{"prefix": "/", "upstream": "main"}],
    }


@dataclass(frozen=True)
class Seen:
    """One response, and the upstream's state right after it."""

    status: int
    origin: str | None  # the label of the origin that answered; None: the proxy did
    body: bytes  # the origin's body (the proxy's own answers carry a fresh request id)
    states: tuple[tuple[str, str, bool], ...]  # per target: (label, breaker, ejected)


COUNTERS = (
    "fastedge_upstream_retries_total",
    "fastedge_upstream_ejections_total",
    "fastedge_retry_budget_exhausted_total",
    "fastedge_breaker_state",
    "fastedge_upstream_target_ejected",
)


@dataclass
class Run:
    """One proxy (express on or off) in front of ``origins``, and what it did."""

    proxy: ProxyServer
    origins: list[SwitchOrigin]
    clock: FakeClock
    seen: list[Seen] = field(default_factory=list)
    lanes: list[tuple[int, int]] = field(default_factory=list)  # (served, promoted) deltas

    @property
    def upstream(self) -> Upstream:
        return self.proxy.gateway.upstreams["main"]

    def label(self, port: int) -> str | None:
        return next((o.label for o in self.origins if o.port == port), None)

    def states(self) -> tuple[tuple[str, str, bool], ...]:
        up = self.upstream
        return tuple(
            (o.label, up.breaker_state(t), up.is_ejected(t))
            for o, t in zip(self.origins, up.targets, strict=True)
        )

    async def send(self, count: int = 1) -> None:
        """``count`` GETs, one after the other, each on a new client connection."""
        for _ in range(count):
            before = lane_counts(self.proxy)
            resp = await fetch(self.proxy.port)
            after = lane_counts(self.proxy)
            self.lanes.append((after[0] - before[0], after[1] - before[1]))
            origin = self.label(origin_port(resp))
            body = resp.body if origin is not None else b""
            self.seen.append(Seen(resp.status, origin, body, self.states()))

    def trace(self) -> list[tuple[int, str | None]]:
        return [(s.status, s.origin) for s in self.seen]

    def metrics(self) -> list[str]:
        """The resilience lines of ``/metrics``, target URLs replaced by their labels."""
        text = self.proxy.metrics.render().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith(COUNTERS)]
        out = []
        for line in lines:
            for o in self.origins:
                line = line.replace(f'"{o.url}"', f'"{o.label}"')
            out.append(line)
        return out

    def metric(self, line_prefix: str) -> float:
        """The value of the one sample whose line starts with ``line_prefix`` (0 when
        the counter was never incremented)."""
        values = [
            float(ln.rpartition(" ")[2]) for ln in self.metrics() if ln.startswith(line_prefix)
        ]
        assert len(values) <= 1, values
        return values[0] if values else 0.0

    def budget(self) -> tuple[int, int]:
        """The retry budget's (requests, retries) in its window, as of the fake clock."""
        budget = self.upstream.budget
        assert budget is not None
        now = self.clock.now
        return budget._requests.sums(now)[0], budget._retries.sums(now)[0]


async def start_run(
    make_proxy: MakeProxy,
    new_switch: NewSwitch,
    clock: FakeClock,
    labels: list[str],
    *,
    express: bool,
    **upstream: Any,
) -> Run:
    """Origins named ``labels`` and a proxy over them, its breakers on ``clock``."""
    origins = [await new_switch(label) for label in labels]
    proxy = await make_proxy(document(origins, express=express, **upstream))
    assert proxy.express_lane.enabled is express
    up = proxy.gateway.upstreams["main"]
    assert up.resilient and up.express and up.express_health is None  # express_attempt
    clock.attach(up)
    return Run(proxy, origins, clock)


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``check()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def assert_same(express: Run, general: Run) -> None:
    """Everything observable agrees; the general run never touched the lane."""
    assert express.seen == general.seen
    assert express.metrics() == general.metrics()
    assert [o.requests for o in express.origins] == [o.requests for o in general.origins]
    assert set(general.lanes) == {(0, 0)}


GENERAL = (0, 0)  # the lane declined (cold pool): the general path served the request
LANE = (1, 0)  # the lane served it
PROMOTED = (1, 1)  # the lane sent it, then handed the response to the general path

# --- 1. circuit breaker ----------------------------------------------------------------------

BREAKER = {"min_requests": 2, "failure_ratio": 0.5, "open_for": "5s", "open_for_max": "60s"}


async def breaker_run(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock, *, express: bool
) -> Run:
    """``bad`` answers 500 until the second half-open probe; ``good`` always 200."""
    run = await start_run(
        make_proxy, new_switch, clock, ["bad", "good"], express=express, breaker=BREAKER
    )
    bad = run.origins[0]
    bad.status = 500
    await run.send(5)
    clock.advance(5.0)  # open_for: the next request for bad is its half-open probe
    await run.send(4)
    bad.status = 200
    clock.advance(10.0)  # the failed probe doubled the open time
    await run.send(4)
    return run


async def test_breaker_trips_on_lane_reports_and_closes_after_a_lane_probe(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock
) -> None:
    general = await breaker_run(make_proxy, new_switch, clock, express=False)
    express = await breaker_run(make_proxy, new_switch, clock, express=True)
    assert_same(express, general)
    bad, good = (500, "bad"), (200, "good")
    assert express.trace() == [
        bad,  # cold pools: the general path, 1 failure of 1 (min_requests 2)
        good,
        bad,  # on the lane: the 2nd failure, reported by the lane, trips the breaker
        good,
        good,  # bad's turn, but its breaker is open: good
        good,  # (5 s later) good's turn
        bad,  # bad's half-open probe, on the lane: fails, re-opens for 10 s
        good,
        good,
        good,  # (10 s later) good's turn
        (200, "bad"),  # the probe succeeds: closed
        good,
        (200, "bad"),
    ]
    assert [s.states[0][1] for s in express.seen] == [
        "closed",
        "closed",
        "open",
        "open",
        "open",
        "half_open",  # time is up: the next request for bad is its probe
        "open",
        "open",
        "open",
        "half_open",
        "closed",
        "closed",
        "closed",
    ]
    assert {s.states[1][1] for s in express.seen} == {"closed"}
    assert express.lanes == [GENERAL, GENERAL] + [LANE] * 11
    bad_target = express.upstream.targets[0]
    assert bad_target.breaker is not None and bad_target.breaker.trips == 2
    assert express.metric('fastedge_breaker_state{upstream="main",target="bad"}') == 0


# --- 2. outlier detection --------------------------------------------------------------------


async def outlier_run(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock, *, express: bool
) -> Run:
    """``bad`` fails twice, succeeds once (its count starts over), fails three times in
    a row (ejected for 30 s), then recovers and comes back after the ejection."""
    run = await start_run(
        make_proxy,
        new_switch,
        clock,
        ["bad", "good"],
        express=express,
        outlier={"consecutive_failures": 3, "base_ejection": "30s"},
    )
    bad = run.origins[0]
    await run.send(2)  # warm both pools
    bad.status = 500
    await run.send(4)
    bad.status = 200
    await run.send(2)
    bad.status = 500
    await run.send(8)
    bad.status = 200
    clock.advance(31.0)
    await run.send(2)
    return run


async def test_outlier_detection_ejects_on_lane_reports(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock
) -> None:
    general = await outlier_run(make_proxy, new_switch, clock, express=False)
    express = await outlier_run(make_proxy, new_switch, clock, express=True)
    assert_same(express, general)
    ok, good, bad = (200, "bad"), (200, "good"), (500, "bad")
    assert express.trace() == [
        ok,
        good,
        bad,  # 1
        good,
        bad,  # 2
        good,
        ok,  # a success, reported by the lane: the count starts over
        good,
        bad,  # 1
        good,
        bad,  # 2
        good,
        bad,  # 3: ejected
        good,
        good,  # bad's turn: ejected
        good,
        ok,  # (31 s later) back in rotation
        good,
    ]
    assert [s.states[0][2] for s in express.seen] == [False] * 12 + [True] * 4 + [False] * 2
    assert express.lanes == [GENERAL, GENERAL] + [LANE] * 16
    assert express.metric('fastedge_upstream_ejections_total{upstream="main",target="bad"}') == 1
    assert express.metric('fastedge_upstream_ejections_total{upstream="main",target="good"}') == 0


# --- 3. retries on a status --------------------------------------------------------------------

RETRY_503 = {
    "statuses": [503],
    "attempts": 2,
    "backoff_base": "0s",
    "backoff_max": "0s",
    # No floor: the budget is exactly "one retry per request", so both runs' budgets
    # only agree when the lane counted every request it served.
    "budget_ratio": 1.0,
    "budget_min_per_second": 0,
}


async def retry_run(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock, *, express: bool
) -> Run:
    """``bad`` answers 503 (retried on ``good``), 200 once (its pool warms), 503 again."""
    run = await start_run(
        make_proxy, new_switch, clock, ["bad", "good"], express=express, retry=RETRY_503
    )
    bad = run.origins[0]
    await run.send(2)  # warm both pools
    bad.status = 503
    await run.send(2)
    bad.status = 200
    await run.send(2)
    bad.status = 503
    await run.send(1)
    return run


async def test_a_retryable_status_on_the_lane_is_retried_on_the_other_target(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock
) -> None:
    general = await retry_run(make_proxy, new_switch, clock, express=False)
    express = await retry_run(make_proxy, new_switch, clock, express=True)
    assert_same(express, general)
    assert express.budget() == general.budget() == (7, 3)
    good = (200, "good")
    assert express.trace() == [(200, "bad"), good, good, good, (200, "bad"), good, good]
    assert express.lanes == [
        GENERAL,
        GENERAL,
        PROMOTED,  # bad's 503 on the lane: promoted, retried on good
        GENERAL,  # the retry closed bad's connection: cold, the general path
        GENERAL,  # still cold (bad answers 200 now, its pool warms)
        LANE,
        PROMOTED,
    ]
    assert [o.requests for o in express.origins] == [5, 5]  # bad: 3 x 503 + 2 x 200
    assert express.metric("fastedge_upstream_retries_total") == 3


async def unretried_run(
    make_proxy: MakeProxy,
    new_switch: NewSwitch,
    clock: FakeClock,
    labels: list[str],
    retry: dict[str, Any],
    *,
    express: bool,
) -> Run:
    """Warm every pool, then ``bad`` (the first origin) answers 503 from then on."""
    run = await start_run(make_proxy, new_switch, clock, labels, express=express, retry=retry)
    await run.send(len(labels))
    run.origins[0].status = 503
    await run.send(4)
    return run


@pytest.mark.parametrize(
    ("labels", "retry", "exhausted"),
    [
        (["bad"], {"statuses": [503], "attempts": 1}, 0),
        (["bad", "good"], {"statuses": [503], "budget_ratio": 0, "budget_min_per_second": 0}, 2),
    ],
    ids=["one-attempt", "budget-spent"],
)
async def test_a_503_the_policy_does_not_retry_reaches_the_client_intact(
    make_proxy: MakeProxy,
    new_switch: NewSwitch,
    clock: FakeClock,
    labels: list[str],
    retry: dict[str, Any],
    exhausted: int,
) -> None:
    general = await unretried_run(make_proxy, new_switch, clock, labels, retry, express=False)
    express = await unretried_run(make_proxy, new_switch, clock, labels, retry, express=True)
    assert_same(express, general)
    answered = [s for s in express.seen[len(labels) :] if s.origin == "bad"]
    # Every 503 was the origin's own response, body and all, not a proxy error.
    assert answered and all(s.status == 503 for s in answered)
    assert {s.body for s in answered} == {b"bad answered 503\n"}
    if len(labels) == 1:
        assert express.lanes == [GENERAL] + [PROMOTED] * 4
    else:
        # bad's 503 (promoted, not retried: its connection is kept), good's 200.
        assert express.trace()[2:] == [(503, "bad"), (200, "good")] * 2
        assert express.lanes == [GENERAL, GENERAL, PROMOTED, LANE, PROMOTED, LANE]
    assert express.metric("fastedge_upstream_retries_total") == 0
    budget_line = 'fastedge_retry_budget_exhausted_total{upstream="main"}'
    assert express.metric(budget_line) == exhausted


# --- 4. the lane takes back a half-open admission it does not use --------------------------


async def half_open_cold_run(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock, *, express: bool
) -> Run:
    """One target whose failures close their connection: when its breaker goes half-open
    the pool is cold, so the lane admits the probe, finds no connection and declines."""
    run = await start_run(
        make_proxy,
        new_switch,
        clock,
        ["only"],
        express=express,
        breaker={"min_requests": 1, "open_for": "5s", "half_open_probes": 1},
    )
    only = run.origins[0]
    only.status, only.closing = 500, True
    await run.send(2)  # the failure trips the breaker; then the proxy's own 503
    assert run.upstream.targets[0].pool.stats()["idle"] == 0
    only.status, only.closing = 200, False
    clock.advance(5.0)
    await run.send(2)  # the probe (connects), then on the warm pool
    return run


async def test_a_declined_half_open_probe_leaves_the_slot_to_the_general_path(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock
) -> None:
    general = await half_open_cold_run(make_proxy, new_switch, clock, express=False)
    declines: list[tuple[str, int]] = []
    original = Upstream.express_decline

    def spy(self: Upstream, target: Target, generation: int) -> None:
        declines.append((target.name, generation))
        original(self, target, generation)

    with mock.patch.object(Upstream, "express_decline", spy):
        express = await half_open_cold_run(make_proxy, new_switch, clock, express=True)
    assert_same(express, general)
    assert [(s.status, s.origin, s.states[0][1]) for s in express.seen] == [
        (500, "only", "open"),
        (503, None, "open"),  # refused before any pick: nothing to decline
        (200, "only", "closed"),  # the general path's probe
        (200, "only", "closed"),
    ]
    target = express.upstream.targets[0]
    breaker = target.breaker
    assert breaker is not None
    # Two declines on a cold pool: the first request, and the half-open probe's, whose
    # admission was in the probe's generation (the half-open period's).
    assert [name for name, _ in declines] == [target.name, target.name]
    assert declines[1][1] == breaker.generation - 1  # the probe's success closed it since
    assert express.lanes == [GENERAL, GENERAL, GENERAL, LANE]
    assert breaker._probes_inflight == 0


# --- 4b. the lane finding nothing admitted -------------------------------------------------


async def nothing_admitted_run(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock, *, express: bool
) -> Run:
    """Two targets, both half-open with their one probe in flight (held by the origins):
    a third request finds nothing the breakers admit (503); then both probes succeed and
    round robin goes on."""
    run = await start_run(
        make_proxy,
        new_switch,
        clock,
        ["a", "b"],
        express=express,
        breaker={"min_requests": 1, "open_for": "5s", "half_open_probes": 1},
    )
    a, b = run.origins
    await run.send(2)  # warm both pools
    a.status = b.status = 500
    await run.send(2)  # both trip
    a.status = b.status = 200
    a.hold = b.hold = True
    clock.advance(5.0)
    # The two probes, one after the other (a, then b), held by the origins.
    probes = []
    for _ in range(2):
        probes.append(asyncio.ensure_future(fetch(run.proxy.port)))
        await until(lambda: len(a.held) + len(b.held) == len(probes))
    assert (len(a.held), len(b.held)) == (1, 1)
    await run.send()  # every breaker refuses: the proxy's 503
    a.hold = b.hold = False
    a.release()
    b.release()
    answers = await asyncio.gather(*probes)
    assert [(r.status, run.label(origin_port(r))) for r in answers] == [(200, "a"), (200, "b")]
    await run.send(3)
    return run


async def test_nothing_admitted_leaves_round_robin_as_the_general_path_does(
    make_proxy: MakeProxy, new_switch: NewSwitch, clock: FakeClock
) -> None:
    general = await nothing_admitted_run(make_proxy, new_switch, clock, express=False)
    express = await nothing_admitted_run(make_proxy, new_switch, clock, express=True)
    # What does not depend on the bug: the refused request is the proxy's 503 in both.
    assert express.seen[4].status == general.seen[4].status == 503
    assert express.trace()[-3:] == general.trace()[-3:]  # fails: a, b, a against b, a, b
    assert_same(express, general)


# --- unit level: express_attempt / express_decline against the reference -----------------


def twin_upstream(
    weights: list[int],
    priorities: list[int],
    *,
    min_requests: int = 1,
    probes: int = 1,
    consecutive: int = 2,
) -> Upstream:
    """A breaker + outlier detection upstream over unreachable targets (never dialled:
    only its choices are used); needs a running loop (its pools)."""
    targets = [
        {"url": f"http://127.0.0.1:{i + 1}", "weight": w, "priority": p}
        for i, (w, p) in enumerate(zip(weights, priorities, strict=True))
    ]
    cfg = parse_config(
        {
            "upstreams": {
                "u": {
                    "targets": targets,
                    "breaker": {
                        "min_requests": min_requests,
                        "failure_ratio": 0.5,
                        "open_for": "5s",
                        "open_for_max": "20s",
                        "half_open_probes": probes,
                    },
                    "outlier": {
                        "consecutive_failures": consecutive,
                        "base_ejection": "10s",
                        "max_ejection": "40s",
                    },
                }
            },
            "routes": [{"prefix": "/", "upstream": "u"}],
        }
    )
    up = Upstream(cfg.upstreams["u"])
    assert up.resilient and up.verdicts and up.express_health is None
    return up


def reference_attempt(up: Upstream) -> tuple[Target, int] | None:
    """The general path's first attempt (``Exchange._attempt_resilient``'s choice)."""
    for candidate in up.candidates(None):
        generation = up.admit(candidate)
        if generation is not None:
            return candidate, generation
    return None


def snapshot(up: Upstream, now: float) -> list[Any]:
    """What decides the next choices: each breaker's state as ``candidates`` and
    ``admit`` read it (not its generation: an open breaker whose time is up moves to
    half-open lazily, on whichever upstream asks first), each ejection, and every round
    robin's scores."""
    out: list[Any] = []
    od = up.outlier
    assert od is not None
    for t in up.targets:
        b = t.breaker
        assert b is not None
        out.append(
            (
                t.name,
                up.breaker_state(t),
                b._probes_inflight,
                b._probe_successes,
                b.trips,
                b._open_for_now,
                b._counts.sums(now),
                od.is_ejected(t.name, now),
                od._consecutive.get(t.name),
                od._ejections.get(t.name),
            )
        )
    out.append([list(tier._current) for tier in up.balancer.balancers])
    return out


def names(choice: tuple[Target, int] | None) -> str | None:
    return None if choice is None else choice[0].name


def on_clock(clock: FakeClock, *ups: Upstream) -> None:
    """Make the breakers of ``ups`` read ``clock``."""
    for up in ups:
        clock.attach(up)


async def test_express_decline_frees_the_half_open_slot_and_the_pick() -> None:
    """``express_attempt`` then ``express_decline``, on a closed target and on a
    half-open probe: the twin that never saw them is in the same state, and the general
    path's attempt that follows gets the probe slot."""
    clock = FakeClock()
    with mock.patch.object(gateway_module, "time", SimpleNamespace(monotonic=clock.monotonic)):
        lane, twin = twin_upstream([1, 1], [0, 0]), twin_upstream([1, 1], [0, 0])
        on_clock(clock, lane, twin)
        for up in (lane, twin):  # the first target fails once: its breaker opens
            first = up.targets[0]
            assert reference_attempt(up) == (first, 0)
            up.report(first, 0, False, status=500)
            assert up.breaker_state(first) == "open"
        clock.advance(5.0)  # open_for is over: the first target's next request is a probe
        # A closed target: taken back, the round robin as if never asked.
        attempt = lane.express_attempt()
        assert attempt is not None and attempt[0] is lane.targets[1]
        lane.express_decline(*attempt)
        assert snapshot(lane, clock.now) == snapshot(twin, clock.now)
        assert names(reference_attempt(lane)) == names(reference_attempt(twin))
        # The half-open probe: admitted on the lane (its one slot taken), taken back.
        probe = lane.express_attempt()
        breaker = lane.targets[0].breaker
        assert breaker is not None
        assert probe is not None and probe[0] is lane.targets[0]
        assert (breaker.state, breaker._probes_inflight) == ("half_open", 1)
        lane.express_decline(*probe)
        assert breaker._probes_inflight == 0
        assert snapshot(lane, clock.now) == snapshot(twin, clock.now)
        # The general path's attempt gets the slot, in the same half-open generation.
        again, reference = reference_attempt(lane), reference_attempt(twin)
        assert again == (lane.targets[0], probe[1])
        assert reference is not None and reference[0] is twin.targets[0]
        assert reference[1] == probe[1]
        lane.report(again[0], again[1], True, status=200)
        assert lane.breaker_state(lane.targets[0]) == "closed"


def decline_kind(up: Upstream, target: Target, now: float) -> str:
    """What a declined choice was (for ``--hypothesis-show-statistics``)."""
    od = up.outlier
    assert od is not None and target.breaker is not None
    if all(od.is_ejected(t.name, now) for t in up.targets):
        return "decline: every target ejected (ejections ignored)"
    if target.breaker.state == "half_open":
        return "decline: a half-open probe"
    if target.priority > min(t.priority for t in up.targets):
        return "decline: a lower priority tier"
    return "decline: a closed breaker"


Step = tuple[str, int, int]  # (kind, a number, another): see the property test


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[int], int, int, int, list[Step]]:
    n = draw(st.integers(2, 4))
    weights = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    priorities = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    min_requests = draw(st.integers(1, 3))
    probes = draw(st.integers(1, 2))
    consecutive = draw(st.integers(1, 3))
    step = st.one_of(
        # an attempt on both (the lane's on one, the general path's on the other), kept
        # in flight, or answered at once: "fail" reports a 502, the commonest way here
        # to trip breakers and eject targets
        st.tuples(st.sampled_from(["keep", "fail", "fail"]), st.just(0), st.just(0)),
        st.tuples(st.just("decline"), st.just(0), st.just(0)),
        # resolve the pending attempt number x % len: y 0 success, 1 failure, 2 abandon
        st.tuples(st.just("resolve"), st.integers(0, 7), st.sampled_from([0, 1, 1, 2])),
        st.tuples(st.just("tick"), st.sampled_from([1, 3, 6, 11, 25]), st.just(0)),
    )
    steps = draw(st.lists(step, min_size=10, max_size=60))
    return weights, priorities, min_requests, probes, consecutive, steps


async def _twins(
    weights: list[int],
    priorities: list[int],
    min_requests: int,
    probes: int,
    consecutive: int,
    steps: list[Step],
) -> None:
    clock = FakeClock()
    with mock.patch.object(gateway_module, "time", SimpleNamespace(monotonic=clock.monotonic)):
        kw = {"min_requests": min_requests, "probes": probes, "consecutive": consecutive}
        lane = twin_upstream(weights, priorities, **kw)
        ref = twin_upstream(weights, priorities, **kw)
        on_clock(clock, lane, ref)
        index = {t.name: i for i, t in enumerate(lane.targets)}
        pending: list[tuple[int, int, int]] = []  # (target, lane's generation, ref's)
        for kind, x, y in steps:
            if kind in ("keep", "fail"):
                got, want = lane.express_attempt(), reference_attempt(ref)
                assert names(got) == names(want)
                event("attempt: nothing admitted" if got is None else "attempt: a target")
                if got is None or want is None:
                    # A lane attempt admitting nothing is followed, in the proxy, by the
                    # general path's own attempt, which must find what the reference
                    # found: the lane took its round-robin pick back.
                    assert got is None and want is None
                    assert reference_attempt(lane) is None
                elif kind == "keep":
                    assert got[1] == want[1]  # the same breaker generation
                    pending.append((index[got[0].name], got[1], want[1]))
                else:
                    assert got[1] == want[1]
                    lane.report(got[0], got[1], False, status=502)
                    ref.report(want[0], want[1], False, status=502)
            elif kind == "decline":
                got = lane.express_attempt()
                # Nothing admitted (None): nothing was taken, and the pick is taken back.
                if got is not None:
                    event(decline_kind(lane, got[0], clock.now))
                    lane.express_decline(*got)
            elif kind == "resolve" and pending:
                i, gen_lane, gen_ref = pending.pop(x % len(pending))
                for up, gen in ((lane, gen_lane), (ref, gen_ref)):
                    target = up.targets[i]
                    if y == 2:
                        up.abandon(target, gen)
                    else:
                        up.report(target, gen, y == 0, status=200 if y == 0 else 502)
            elif kind == "tick":
                clock.advance(float(x))
            assert snapshot(lane, clock.now) == snapshot(ref, clock.now), (kind, x, y)
        # No trace left: the next choices agree however the two got here.
        for _ in range(2 * sum(weights)):
            got, want = lane.express_attempt(), reference_attempt(ref)
            assert names(got) == names(want)
            if got is None or want is None:
                break  # as above
            lane.report(got[0], got[1], True, status=200)
            ref.report(want[0], want[1], True, status=200)


@settings(max_examples=200, deadline=None)
@given(scenario=scenarios())
def test_a_declined_attempt_leaves_no_trace(
    scenario: tuple[list[int], list[int], int, int, int, list[Step]],
) -> None:
    """Twin upstreams (breakers, outlier detection, 2-4 targets in 1-2 priority tiers)
    see the same outcomes; one also makes lane attempts it takes back. The lane's kept
    attempts choose what the general path's first attempt chooses, and after every step
    the twins are in the same state: a declined attempt leaves no trace."""
    weights, priorities, min_requests, probes, consecutive, steps = scenario
    note(f"weights={weights} priorities={priorities} steps={steps}")
    asyncio.run(_twins(weights, priorities, min_requests, probes, consecutive, steps))


async def test_nothing_admitted_takes_no_extra_pick_unit() -> None:
    """At unit level: the lane's ``express_attempt`` finds every available target's
    half-open slot taken (``None``), then the general path attempts too; its twin only
    made the general path's attempt. The next choices agree (the lane took its
    round-robin pick back)."""
    clock = FakeClock()
    with mock.patch.object(gateway_module, "time", SimpleNamespace(monotonic=clock.monotonic)):
        lane, ref = twin_upstream([1, 1], [0, 0]), twin_upstream([1, 1], [0, 0])
        on_clock(clock, lane, ref)
        for up in (lane, ref):
            for _ in range(2):  # both targets fail once: both breakers open
                choice = reference_attempt(up)
                assert choice is not None
                up.report(choice[0], choice[1], False, status=500)
        clock.advance(5.0)
        probes = {}
        for up in (lane, ref):  # both half-open probes in flight
            probes[id(up)] = [reference_attempt(up), reference_attempt(up)]
            assert None not in probes[id(up)]
        assert lane.express_attempt() is None  # nothing admitted: no decline either
        assert reference_attempt(lane) is None and reference_attempt(ref) is None
        for up in (lane, ref):
            for choice in probes[id(up)]:
                assert choice is not None
                up.report(choice[0], choice[1], True, status=200)
        assert [names(reference_attempt(lane)) for _ in range(4)] == [
            names(reference_attempt(ref)) for _ in range(4)
        ]
