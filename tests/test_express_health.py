"""The express lane in front of a health-checked upstream.

An upstream whose only resilience feature is active health checks, in one priority tier,
takes the lane through :meth:`Upstream.express_pick`, which must be exactly
``candidates(None)[0]`` (advancing the round robin exactly as ``candidates`` does; a pick
the lane does not use is taken back by ``express_decline``), and a promoted request must
carry the attempt state ``_attempt_resilient`` records, so the general path finishes it
as it would have on its own. (Other resilient upstreams take the lane through
``express_attempt``: only their eligibility is checked here.)

1. ``express_pick`` against ``candidates`` on twin upstreams (Hypothesis);
2. which upstreams pick through the health verdicts, and runtime target changes;
3. real sockets: parity with the general path, the lane following the health verdicts,
   every target down, timeouts and dead pooled connections after a promotion;
4. the promoted exchange's attempt state, on the fake-transport harness of the benches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bench.test_bench_proxy import REQUEST, RESPONSE, FakeTransport, fake_document, fake_server
from fastedge.config import parse_config, parse_targets
from fastedge.gateway import Target, Upstream
from fastedge.server import ProxyServer
from tests import test_express_proxy
from tests.conftest import Client, Response
from tests.raw_client import RawClient
from tests.test_express_proxy import (
    PARITY,
    OriginConn,
    Run,
    ScriptedOrigin,
    document,
    lane_counts,
    pool_stats,
    request,
    run_sequence,
    started_origins,
    warm,
)
from tests.test_resilience_proxy import wait_until

MakeProxy = Callable[[dict[str, Any]], Awaitable[ProxyServer]]
NewOrigin = Callable[[], Awaitable[ScriptedOrigin]]

# The scripted origins and the no-ERROR-logged check of tests/test_express_proxy.py
# (pytest finds fixtures by their module-level names).
new_origin = test_express_proxy.new_origin
no_errors_logged = test_express_proxy.no_errors_logged

PROBE = b"GET /healthz "
"""How the health checker's probes start (the default ``health_check.path``)."""

SLOW_CHECKS: dict[str, Any] = {"interval": "60s"}
"""One probe at start, then none during the test: the origin's traffic is the proxy's."""

FAST_CHECKS: dict[str, Any] = {"interval": "50ms", "timeout": "1s", "rise": 1, "fall": 1}
"""Verdicts that follow the origin's health endpoint within a probe or two."""


# --- 1. express_pick is candidates(None)[0] -----------------------------------------------

URLS = [f"http://127.0.0.1:{9100 + i}" for i in range(5)]


def twin_upstreams(weights: list[int]) -> tuple[Upstream, Upstream]:
    """Two upstreams from one config: health checks only, one target per weight, all in
    one priority (the checks are never started: the test sets the verdicts)."""
    targets = [{"url": URLS[i], "weight": w} for i, w in enumerate(weights)]
    cfg = parse_config({"upstreams": {"main": {"targets": targets, "health_check": {}}}})
    a, b = Upstream(cfg.upstreams["main"]), Upstream(cfg.upstreams["main"])
    assert a.express and a.express_health is not None
    return a, b


def set_health(up: Upstream, index: int, healthy: bool) -> None:
    """The checker's verdict on ``up``'s target ``index`` (what a probe would record)."""
    assert up.checker is not None
    up.checker.state(up.targets[index]).healthy = healthy


def name_of(target: Target | None) -> str | None:
    return None if target is None else target.name


def rr_state(tier: Any) -> list[int]:
    """A smooth round robin's running scores (its whole state): equal scores on both
    twins mean both advanced exactly alike, not merely picked alike so far."""
    return list(tier._current)


# A step: ("pick", _, _), ("decline", _, _): the lane picks and leaves the request to the
# general path (no idle connection), or ("flip", target index (mod the count), healthy).
STEP = st.one_of(
    st.tuples(st.just("pick"), st.just(0), st.just(True)),
    st.tuples(st.just("decline"), st.just(0), st.just(True)),
    st.tuples(st.just("flip"), st.integers(0, 4), st.booleans()),
)


async def _compare(weights: list[int], steps: list[tuple[str, int, bool]]) -> None:
    """Apply ``steps`` to twin upstreams: ``express_pick`` on one, ``candidates(None)``
    on the other (a declined pick: nothing on the other); every pick and the round
    robin's state must agree."""
    lane, general = twin_upstreams(weights)
    n = len(weights)
    outage = False  # a pick found every target down
    for step, (kind, index, healthy) in enumerate(steps):
        if kind == "flip":
            set_health(lane, index % n, healthy)
            set_health(general, index % n, healthy)
            continue
        got = lane.express_pick()
        if got is None:
            outage = True
        elif outage:
            event("a pick after an outage")  # coverage, shown by --hypothesis-show-statistics
        if kind == "decline":
            # As ClientConnection._express does when the target has no idle connection
            # (nothing to decline when no target is healthy: the lane gave up before).
            if got is not None:
                lane.express_decline(got, 0)
        else:
            order: list[Target | None] = [*general.candidates(None), None]
            want = order[0]  # None: no candidate at all
            assert name_of(got) == name_of(want), (step, weights, steps[: step + 1])
        assert rr_state(lane.express_tier) == rr_state(general.balancer.balancers[0]), (
            step,
            weights,
            steps[: step + 1],
        )


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    steps=st.lists(STEP, min_size=20, max_size=400),
)
def test_express_pick_is_the_first_candidate(
    weights: list[int], steps: list[tuple[str, int, bool]]
) -> None:
    # Targets own connection pools, which need a running loop.
    asyncio.run(_compare(weights, steps))


async def test_express_pick_through_an_outage_and_back() -> None:
    """A fixed walk: the pick skips a down target (in list order after the round robin's
    choice), returns None while all are down without moving the round robin, and
    resumes the same rotation afterwards."""
    lane, general = twin_upstreams([2, 1, 1])
    a, b, c = (t.name for t in lane.targets)
    # Smooth round robin with weights 2,1,1: a b c a, a b c a, ...
    assert [name_of(lane.express_pick()) for _ in range(4)] == [a, b, c, a]
    set_health(lane, 1, False)
    # b's turn goes to the first healthy target in list order: a.
    assert [name_of(lane.express_pick()) for _ in range(4)] == [a, a, c, a]
    for i in range(3):
        set_health(lane, i, False)
    before = rr_state(lane.express_tier)
    assert [lane.express_pick() for _ in range(5)] == [None] * 5
    assert rr_state(lane.express_tier) == before  # all down: no advance
    set_health(lane, 1, True)
    assert [name_of(lane.express_pick()) for _ in range(4)] == [b, b, b, b]
    for i in range(3):
        set_health(lane, i, True)
    assert [name_of(lane.express_pick()) for _ in range(4)] == [a, b, c, a]
    # The twin, walked through candidates(None), agrees on the rotation (no flips).
    assert [name_of(general.candidates(None)[0]) for _ in range(4)] == [a, b, c, a]


# --- 2. eligibility -------------------------------------------------------------------------


def eligibility_config(**main: Any) -> Any:
    """A config whose upstream ``main`` has two targets and ``main`` as extra keys, and
    a ``backup`` upstream to fall back to."""
    main.setdefault("targets", URLS[:2])
    return parse_config({"upstreams": {"main": main, "backup": {"targets": [URLS[4]]}}})


def build(**main: Any) -> Upstream:
    return Upstream(eligibility_config(**main).upstreams["main"])


HC: dict[str, Any] = {"health_check": {}}
TWO_TIERS = [{"url": URLS[0], "priority": 0}, {"url": URLS[1], "priority": 1}]


@pytest.mark.parametrize(
    ("extra", "express", "checked"),
    [
        ({}, True, False),  # no health checks: the plain lane (balancer.pick)
        (HC, True, True),
        # Anything more than health checks in one tier: express_attempt (candidates and
        # admit), never express_pick.
        ({**HC, "outlier": {}}, True, False),
        ({**HC, "breaker": {}}, True, False),
        ({**HC, "retry": {}}, True, False),
        ({**HC, "fallback": "backup"}, True, False),
        ({**HC, "fallback_response": {"status": 200, "body": "[]"}}, True, False),
        ({**HC, "targets": TWO_TIERS}, True, False),
        ({"targets": TWO_TIERS}, True, False),  # tiers alone make it resilient
        # The upstream's own Host is written by the lane too (session 16).
        ({**HC, "host_header": "backend.internal"}, True, True),
        # Other balancers: on the lane through express_attempt (express_pick's failover
        # is round robin's list order), with a consistent-hash key the lane has at hand.
        ({**HC, "balance": "least_conn"}, True, False),
        ({**HC, "balance": "p2c_ewma"}, True, False),
        ({**HC, "balance": "consistent_hash"}, True, False),  # hash_key "ip"
        ({**HC, "balance": "consistent_hash", "hash_key": "path"}, True, False),
        # Not on the lane at all: a header, cookie or claim key needs the general path.
        ({**HC, "balance": "consistent_hash", "hash_key": "header:x-k"}, False, None),
        ({"balance": "consistent_hash", "hash_key": "cookie:sid"}, False, None),
    ],
    ids=[
        "plain",
        "health_check",
        "outlier",
        "breaker",
        "retry",
        "fallback",
        "fallback_response",
        "two_priorities",
        "two_priorities_no_checks",
        "host_header",
        "least_conn",
        "p2c_ewma",
        "consistent_hash_ip",
        "consistent_hash_path",
        "consistent_hash_header",
        "consistent_hash_cookie",
    ],
)
async def test_eligibility(extra: dict[str, Any], express: bool, checked: bool | None) -> None:
    """``express``: the lane may take the upstream; ``checked``: it picks through the
    health verdicts (``express_health``, ``express_pick``)."""
    up = build(**extra)
    assert up.express is express
    if checked is not None:
        assert (up.express_health is not None) is checked
        assert (up.express_tier is not None) is checked
    if checked:
        assert up.resilient
        assert up.checker is not None and up.express_health is up.checker.states
        assert up.express_tier is up.balancer.balancers[0]
        assert up.express_pick() in up.targets


async def test_set_targets_moves_the_pick_off_and_back_onto_the_health_verdicts() -> None:
    up = build(**HC)
    first_states = up.express_health
    assert up.express and first_states is not None
    a, b = up.targets
    set_health(up, 1, False)  # the verdict on b must survive the changes
    # Two priorities: failover between tiers, so the lane's general resilient attempt.
    up.set_targets(
        parse_targets([{"url": URLS[0], "priority": 0}, {"url": URLS[1], "priority": 1}])
    )
    assert up.express and up.resilient
    assert up.express_health is None and up.express_tier is None
    # One tier again (a third target added): express_pick, on the new checker's verdicts.
    up.set_targets(parse_targets(URLS[:3]))
    assert up.express
    assert up.checker is not None and up.express_health is up.checker.states
    assert up.express_health is not first_states
    assert up.express_tier is up.balancer.balancers[0]
    a2, b2, c = up.targets
    assert (a2, b2) == (a, b)  # the same targets, their verdicts kept
    assert not up.express_health[b].healthy and up.express_health[c].healthy
    picks = [up.express_pick() for _ in range(6)]
    assert b not in picks and set(picks) == {a, c}
    up.checker.state(b).healthy = True  # a verdict recorded by the new checker counts
    assert b in {up.express_pick() for _ in range(3)}
    await up.aclose()


# --- 3. integration: real sockets ---------------------------------------------------------


class CheckedOrigin(ScriptedOrigin):
    """A scripted origin whose health endpoint answers 503 while ``sick`` and whose
    ``/stale`` paths answer like any other when ``calm`` (only one of two targets then
    closes its pooled connections)."""

    def __init__(self, *, calm: bool = False) -> None:
        super().__init__()
        self.sick = False
        self.calm = calm

    def answer(self, conn: OriginConn, head: bytes) -> None:
        t = conn.transport
        target = head.split(b" ", 2)[1]
        if head.startswith(PROBE):
            status = b"503 Service Unavailable" if self.sick else b"200 OK"
            t.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            t.close()
        elif self.calm and target.startswith(b"/stale"):
            body = b"calm body for " + target + b"\n"
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            super().answer(conn, head)

    def requests(self) -> list[bytes]:
        """The request-targets the proxy sent (probes left out), in arrival order."""
        return [h.split(b" ", 2)[1] for c in self.conns for h in c.heads if not h.startswith(PROBE)]


@pytest.fixture
async def new_checked() -> AsyncIterator[Callable[..., Awaitable[CheckedOrigin]]]:
    """``await new_checked(calm=False)``: a started :class:`CheckedOrigin`, closed at
    the end."""
    async with started_origins(CheckedOrigin) as start:
        yield start


def checked_document(
    origins: list[CheckedOrigin], *, express: bool = True, **upstream: Any
) -> dict[str, Any]:
    """:func:`document` with a target per origin; ``upstream["weights"]``, when given,
    holds their weights (else 1 each)."""
    weights = upstream.pop("weights", [1] * len(origins))
    doc = document(origins[0].port, express=express, **upstream)
    doc["upstreams"]["origin"]["targets"] = [
        {"url": f"http://127.0.0.1:{o.port}", "weight": w}
        for o, w in zip(origins, weights, strict=True)
    ]
    return doc


def proxied(origin: ScriptedOrigin) -> tuple[list[tuple[int, bytes]], list[bytes]]:
    """The origin's request heads (with their connection's index) and bytes per
    connection, the health checker's connections left out (they race with the proxy's
    first connection, and they name the origin's port, which differs between runs)."""
    conns = [c for c in origin.conns if c.data and not c.data.startswith(PROBE)]
    heads = [(i, h) for i, c in enumerate(conns) for h in c.heads]
    return heads, [bytes(c.data) for c in conns]


async def both_checked(
    make_proxy: MakeProxy, new_origin: NewOrigin, requests: list[tuple[bytes, bytes]], **kw: Any
) -> tuple[Run, Run]:
    """:func:`tests.test_express_proxy.both` for a health-checked upstream: the same
    sequence with express off and on, the same bytes to the origin (probes aside) and to
    the client."""
    kw.setdefault("health_check", SLOW_CHECKS)
    general = await run_sequence(make_proxy, new_origin, requests, express=False, **kw)
    express = await run_sequence(make_proxy, new_origin, requests, express=True, **kw)
    for run in (general, express):
        up = run.server.gateway.upstreams["origin"]
        assert up.resilient and up.express_health is not None  # the case under test
    assert general.served == 0
    assert proxied(express.origin) == proxied(general.origin)
    for i, (got, want) in enumerate(zip(express.raw, general.raw, strict=True)):
        assert got == want, (i, requests[i][0])
    return express, general


@pytest.mark.parametrize(
    "server", [{}, {"keepalive_timeout": "0s"}], ids=["default", "keepalive_off"]
)
async def test_parity_with_the_general_path(
    make_proxy: MakeProxy, new_origin: NewOrigin, server: dict[str, Any]
) -> None:
    express, _ = await both_checked(make_proxy, new_origin, PARITY, server=server)
    assert (express.served, express.promoted) == (len(PARITY), 0)
    heads, _ = proxied(express.origin)
    assert {i for i, _ in heads} == {0}  # all on the connection the warm-up opened
    assert len(heads) == len(PARITY) + 1


@pytest.mark.parametrize(
    ("target", "served", "promoted", "connections"),
    [
        ("/split", 2, 0, [0, 0, 0]),  # the body relayed as it comes, on the lane
        ("/chunkedsplit", 2, 1, [0, 0, 0]),
        ("/eof", 1, 1, [0, 0, 1]),  # the body ends at close: /next connects
        # The pooled connection closes unanswered: one retry, on a fresh connection (the
        # only target), with the same bytes; /next then takes the lane on it.
        ("/stale", 2, 1, [0, 0, 1, 1]),
        ("/drop", 1, 1, [0, 0, 1, 2]),  # the retry is dropped too: 502
    ],
)
async def test_promotions_match_the_general_path(
    make_proxy: MakeProxy,
    new_origin: NewOrigin,
    target: str,
    served: int,
    promoted: int,
    connections: list[int],
) -> None:
    reqs = [(request(target, "t-1"), b"GET"), (request("/next", "t-2"), b"GET")]
    express, _ = await both_checked(make_proxy, new_origin, reqs)
    first, after = express.responses
    assert first.status == (502 if target == "/drop" else 200)
    assert (after.status, after.body) == (200, b"fixed body for /next\n")
    assert (express.served, express.promoted) == (served, promoted)
    heads, _ = proxied(express.origin)
    assert [i for i, _ in heads] == connections
    if target == "/stale":
        assert heads[1][1] == heads[2][1]  # the retry carried the lane's bytes


async def warm_each(client: Client, count: int) -> None:
    """``count`` requests the lane refuses (``Content-Length: 0``) but the general path
    serves: each picks once, so with ``count`` targets of weight 1 every target's pool
    gets an idle connection, whatever the lane does with picks it declines."""
    for i in range(count):
        await client.send(request(f"/warm/{i}", f"warm-{i}", "Content-Length: 0\r\n"))
        assert (await client.read_response()).status == 200


async def burst(client: Client, tag: str, count: int) -> None:
    """``count`` lane-eligible GETs of ``/tag/i``, each answered 200."""
    for i in range(count):
        await client.send(request(f"/{tag}/{i}", f"{tag}-{i}"))
        resp = await client.read_response()
        assert resp.status == 200, (tag, i, resp.status)


def hits(origin: CheckedOrigin, tag: str) -> int:
    return sum(1 for t in origin.requests() if t.startswith(f"/{tag}/".encode()))


async def test_the_lane_follows_the_health_verdicts(
    make_proxy: MakeProxy, new_checked: Callable[..., Awaitable[CheckedOrigin]]
) -> None:
    a, b = await new_checked(), await new_checked()
    proxy = await make_proxy(checked_document([a, b], health_check=FAST_CHECKS))
    up = proxy.gateway.upstreams["origin"]
    assert up.express and up.express_health is not None
    tb = up.targets[1]
    client = await Client.open(proxy.port)
    try:
        await warm_each(client, 2)
        assert [s["idle"] for s in pool_stats(proxy)] == [1, 1]
        assert lane_counts(proxy) == (0, 0)
        await burst(client, "both", 6)
        assert (hits(a, "both"), hits(b, "both")) == (3, 3)
        assert lane_counts(proxy) == (6, 0)
        b.sick = True
        await wait_until(lambda: not up.is_healthy(tb))
        await burst(client, "down", 6)
        assert (hits(a, "down"), hits(b, "down")) == (6, 0)
        assert lane_counts(proxy) == (12, 0)
        b.sick = False
        await wait_until(lambda: up.is_healthy(tb))
        # b kept its pooled connection while it was out of rotation: the lane uses it.
        await burst(client, "back", 6)
        assert (hits(a, "back"), hits(b, "back")) == (3, 3)
        assert lane_counts(proxy) == (18, 0)
    finally:
        await client.close()


async def test_a_recovered_cold_target_gets_its_turns(
    make_proxy: MakeProxy, new_checked: Callable[..., Awaitable[CheckedOrigin]]
) -> None:
    """b is down from the start, so it has no pooled connection when it recovers: the
    lane picks it, finds no idle connection and takes the pick back (express_decline),
    so the general path picks b too and connects; from then on the lane alternates."""
    a, b = await new_checked(), await new_checked()
    b.sick = True
    proxy = await make_proxy(checked_document([a, b], health_check=FAST_CHECKS))
    up = proxy.gateway.upstreams["origin"]
    tb = up.targets[1]
    await wait_until(lambda: not up.is_healthy(tb))
    client = await Client.open(proxy.port)
    try:
        await burst(client, "down", 4)
        assert (hits(a, "down"), hits(b, "down")) == (4, 0)
        assert lane_counts(proxy) == (3, 0)  # the first one connected to a
        b.sick = False
        await wait_until(lambda: up.is_healthy(tb))
        await burst(client, "back", 8)
        assert (hits(a, "back"), hits(b, "back")) == (4, 4)
        # One request connected to b (the general path); the other seven on the lane.
        assert lane_counts(proxy) == (10, 0)
        assert [s["idle"] for s in pool_stats(proxy)] == [1, 1]
    finally:
        await client.close()


async def all_down_run(
    make_proxy: MakeProxy, origin: CheckedOrigin, *, express: bool
) -> tuple[Response, bytes, ProxyServer]:
    """Warm the pool, take the lane once, fail the only target's health, send one GET
    (its response, parsed and raw), then let the target recover and send another."""
    proxy = await make_proxy(checked_document([origin], express=express, health_check=FAST_CHECKS))
    up = proxy.gateway.upstreams["origin"]
    target = up.targets[0]
    await warm(proxy)
    client = await RawClient.open(proxy.port)
    try:
        assert (await client.exchange(request("/up", "up-1")))[0].status == 200
        assert lane_counts(proxy) == ((1, 0) if express else (0, 0))
        origin.sick = True
        await wait_until(lambda: not up.is_healthy(target))
        resp, raw = await client.exchange(request("/down", "down-1"))
        # Refused before the pick: nothing sent, the pooled connection left idle.
        assert lane_counts(proxy) == ((1, 0) if express else (0, 0))
        assert pool_stats(proxy)[0] == {"idle": 1, "active": 0, "waiting": 0}
        origin.sick = False
        await wait_until(lambda: up.is_healthy(target))
        assert (await client.exchange(request("/again", "again-1")))[0].status == 200
        assert lane_counts(proxy) == ((2, 0) if express else (0, 0))
    finally:
        await client.close()
    assert b"/down" not in b"".join(origin.requests())
    return resp, raw, proxy


async def test_every_target_down_gets_the_general_path_answer(
    make_proxy: MakeProxy, new_checked: Callable[..., Awaitable[CheckedOrigin]]
) -> None:
    _, general_raw, _ = await all_down_run(make_proxy, await new_checked(), express=False)
    express, express_raw, _ = await all_down_run(make_proxy, await new_checked(), express=True)
    assert express_raw == general_raw
    assert express.status == 503
    assert express.header("retry-after") == b"1"  # one 50 ms pass, rounded up
    assert orjson.loads(express.body) == {
        "error": "no available target in upstream 'origin'",
        "status": 503,
        "request_id": "down-1",
    }


async def test_response_timeout_answers_504(make_proxy: MakeProxy, new_origin: NewOrigin) -> None:
    """No retry policy: a timed-out attempt is not retried (the resilient path's
    decision, reached through the promoted exchange), 504 as on the general path."""
    reqs = [(request("/never", "t-504"), b"GET"), (request("/next", "t-2"), b"GET")]
    express, _ = await both_checked(
        make_proxy, new_origin, reqs, pool={"response_timeout": "300ms"}
    )
    resp = express.responses[0]
    assert resp.status == 504
    assert orjson.loads(resp.body) == {
        "error": "upstream timed out",
        "status": 504,
        "request_id": "t-504",
    }
    assert express.responses[1].status == 200
    assert (express.served, express.promoted) == (1, 1)
    heads, _ = proxied(express.origin)
    assert [i for i, _ in heads] == [0, 0, 1]  # /never was not sent again
    up = express.server.gateway.upstreams["origin"]
    assert up.is_healthy(up.targets[0])  # a timeout is no health verdict


async def dead_connection_run(
    make_proxy: MakeProxy,
    new_checked: Callable[..., Awaitable[CheckedOrigin]],
    *,
    express: bool,
) -> tuple[list[bytes], list[bytes], Response, ProxyServer]:
    """Targets a (weight 2: the smooth round robin goes a b a a b a ...) and b, both
    pools warm; a closes a reused connection unanswered. The request for ``/stale``
    goes to a; what each origin received, and the response."""
    a, b = await new_checked(), await new_checked(calm=True)
    proxy = await make_proxy(
        checked_document([a, b], express=express, health_check=SLOW_CHECKS, weights=[2, 1])
    )
    client = await Client.open(proxy.port)
    try:
        await warm_each(client, 2)  # a, then b
        assert [s["idle"] for s in pool_stats(proxy)] == [1, 1]
        await client.send(request("/stale/1", "s-1"))  # the third pick: a
        resp = await client.read_response()
        await client.send(request("/next", "n-1"))
        assert (await client.read_response()).status == 200
    finally:
        await client.close()
    return a.requests(), b.requests(), resp, proxy


async def test_a_dead_pooled_connection_fails_over_to_the_other_target(
    make_proxy: MakeProxy, new_checked: Callable[..., Awaitable[CheckedOrigin]]
) -> None:
    """The retry after a dead pooled connection skips the target already tried (the
    promoted exchange's ``tried``), although the round robin's next pick is that same
    target again: b answers, as on the general path."""
    runs: dict[bool, tuple[list[bytes], list[bytes], Response, ProxyServer]] = {}
    for express in (False, True):
        runs[express] = await dead_connection_run(make_proxy, new_checked, express=express)
    general_a, general_b, general_resp, _ = runs[False]
    a_got, b_got, resp, proxy = runs[True]
    assert (resp.status, resp.body) == (200, b"calm body for /stale/1\n")
    assert (resp.status, resp.body) == (general_resp.status, general_resp.body)
    assert resp.header("x-request-id") == b"s-1"
    assert a_got == [b"/warm/0", b"/stale/1"]  # sent on a's pooled connection...
    # ...retried on b. Picks a b a a b: warm-ups, /stale/1, its retry's candidates()
    # (a first, skipped as tried), /next.
    assert b_got == [b"/warm/1", b"/stale/1", b"/next"]
    assert (a_got, b_got) == (general_a, general_b)
    assert lane_counts(proxy) == (2, 1)  # /stale/1 (promoted when a closed) and /next
    up = proxy.gateway.upstreams["origin"]
    assert all(up.is_healthy(t) for t in up.targets)  # a dead connection is no verdict


# --- 4. the promoted exchange's attempt state ---------------------------------------------


@pytest.mark.parametrize("checks", [True, False], ids=["health_checked", "plain"])
async def test_a_promoted_exchange_carries_the_resilient_attempt(checks: bool) -> None:
    doc = fake_document()
    if checks:
        doc["upstreams"]["o"]["health_check"] = {"interval": "60s"}  # never started here
    server, client, upstream = fake_server(doc)
    up = server.gateway.upstreams["o"]
    assert up.express and (up.express_health is not None) is checks
    target = up.targets[0]
    client.data_received(REQUEST)
    assert lane_counts(server) == (1, 0)  # on the lane, sent on the pooled connection
    assert client.xtarget is target
    ex = client.express_promote()
    assert lane_counts(server) == (1, 1)
    assert ex.target is target and ex.up is upstream and ex.reused
    if checks:
        assert (ex.attempt, ex.gen) == (1, 0)
        assert ex.gen_target is target
        assert ex.tried == [target]
    else:
        assert (ex.attempt, ex.gen, ex.gen_target, ex.tried) == (0, 0, None, None)
    # The general path finishes it: the response relayed, the attempt reported once
    # (gen_target cleared), the connection back in the pool.
    written = client.transport
    assert isinstance(written, FakeTransport)
    before = written.written
    upstream.data_received(RESPONSE)
    assert written.written > before
    assert client.exchange is None and ex.finished
    assert ex.gen_target is None
    assert target.pool.stats()["idle"] == 1


def test_the_probe_prefix_matches_the_default_path() -> None:
    """The probe filter above (``PROBE``) relies on the default health-check path."""
    cfg = parse_config({"upstreams": {"o": {"targets": [URLS[0]], "health_check": {}}}})
    hc = cfg.upstreams["o"].health_check
    assert hc is not None
    assert b"GET " + hc.path.encode() + b" " == PROBE
