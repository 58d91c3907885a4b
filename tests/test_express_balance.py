"""Load-aware and consistent-hash balancers on the express lane, against the general path.

The express lane (``ClientConnection._express``) takes every balancer but a consistent
hash keyed on a header, a cookie or a claim: ``least_conn`` and ``p2c_ewma`` pick with
``balancer.pick()`` (``Upstream.express_attempt`` when resilient), a consistent hash on
the client's address or the path with ``candidates(key)[0]`` (``express_attempt(key)``).
A load-aware balancer counts the request in flight from the moment the lane sends it
(``acquire``) until the lane ends the exchange (``_express_end``: ``release``, and for
``p2c_ewma`` a latency sample), or until the general path ends a promoted exchange,
exactly once (``express_promote`` hands it ``load_target``, also in mid-body). A pick
the lane does not use is taken back with ``Upstream.express_decline``:
``LeastConnections.unpick`` reverts its tie-breaking scores.

1. ``LeastConnections.unpick`` against a twin that never made the taken-back picks
   (Hypothesis), the no-op ``unpick`` of the other balancers, and
   ``express_attempt``/``express_decline`` on least_conn and consistent-hash upstreams;
2. real loopback sockets, every scenario twice (``server.express`` on and off, in front
   of the *same* origins, so the hash ring, built on the targets' URLs, is the same):
   the same responses from the same origins, the lane serving, every in-flight count
   back to 0 after every response, promotions included (a chunk after the head,
   interim responses, a dead pooled connection retried, a 504, an upstream that closes
   or stalls in mid-body), bodies the lane relays over several reads, and exactly one
   ``acquire`` per request head sent;
3. in-flight counts steering the next choice while a lane request is held (least_conn,
   and a consistent hash's bounded load);
4. ``p2c_ewma``: lane responses (and promoted ones) feed the latency EWMA;
5. a mixed sequence (pipelining and a client reset during a lane request, HEAD, a
   request the lane refuses) never releasing what was not acquired.

The origins are :class:`tests.test_express_proxy.ScriptedOrigin` with a name
(:class:`LabelledOrigin`), which adds mid-body scripts and a ``/stale`` whose retry
succeeds on any target; any other path answers with a body naming the origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fastedge.config import parse_config
from fastedge.gateway import Target, Upstream
from fastedge.server import ProxyServer
from fastedge.upstream.balancers import ConsistentHash, LeastConnections, PowerOfTwoEWMA
from tests import test_express_proxy
from tests.conftest import Client, Response
from tests.test_express_health import PROBE, SLOW_CHECKS
from tests.test_express_proxy import (
    OriginConn,
    ScriptedOrigin,
    eventually,
    lane_counts,
    request,
    started_origins,
)

# The no-ERROR-logged check of tests/test_express_proxy.py (autouse: pytest finds fixtures
# by their module-level names). A ValueError("release() without acquire()") raised in a
# protocol callback is only logged by the loop: this turns it into a failure.
no_errors_logged = test_express_proxy.no_errors_logged

GENERAL = (0, 0)  # the lane declined (a cold pool): the general path served the request
LANE = (1, 0)  # the lane served it
PROMOTED = (1, 1)  # the lane sent it, then handed the response to the general path

# --- 1. unit level: unpick ------------------------------------------------------------------


def lc_state(balancer: LeastConnections[str]) -> tuple[list[int], list[int]]:
    """Everything that decides a least_conn balancer's next picks: its tie-breaking
    scores and its in-flight counts."""
    return list(balancer._current), list(balancer._inflight)


# A step on twin least_conn balancers ``lane`` and ``ref`` (x: a target index, mod n):
# "pick" / "send": both pick (and for "send" both count the request in flight);
# "acquire" / "release": both count / end a request on target x (a release only when one
# is in flight); "decline": the lane alone picks and takes it back (x odd: twice);
# "stray": the lane alone unpicks with nothing to take back (after a decline, or before
# any pick), skipped right after a kept pick, whose take-back would be a real one.
LC_STEP = st.one_of(
    st.tuples(st.sampled_from(["pick", "send", "decline", "stray"]), st.integers(0, 1)),
    st.tuples(st.sampled_from(["acquire", "release", "release"]), st.integers(0, 4)),
)


@settings(max_examples=400, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    steps=st.lists(LC_STEP, max_size=120),
)
def test_least_conn_unpick_leaves_no_trace(
    weights: list[int], steps: list[tuple[str, int]]
) -> None:
    """The lane's declined picks (pick + unpick) leave a least_conn balancer exactly as
    its twin, which never made them: the same scores and counts after every step, the
    same picks throughout and afterwards. A second unpick, or one with nothing to take
    back, changes nothing."""
    n = len(weights)
    targets = [f"t{i}" for i in range(n)]
    lane, ref = LeastConnections(targets, weights), LeastConnections(targets, weights)
    lane.unpick()  # before any pick: nothing to take back
    assert lc_state(lane) == lc_state(ref)
    taken_back = True  # the lane's last pick, if any, was taken back
    for i, (kind, x) in enumerate(steps):
        if kind in ("pick", "send"):
            got = lane.pick()
            assert got == ref.pick(), (i, kind)
            if kind == "send":
                lane.acquire(got)
                ref.acquire(got)
            taken_back = False
        elif kind == "acquire":
            lane.acquire(targets[x % n])
            ref.acquire(targets[x % n])
        elif kind == "release":
            t = targets[x % n]
            if ref.inflight(t) > 0:
                lane.release(t)
                ref.release(t)
        elif kind == "decline":
            before = lc_state(lane)
            lane.pick()
            event("decline: a tie broken" if lc_state(lane) != before else "decline: no tie")
            lane.unpick()
            if x:
                lane.unpick()  # a second unpick: nothing left to take back
            taken_back = True
        elif kind == "stray" and taken_back:
            lane.unpick()
        assert lc_state(lane) == lc_state(ref), (i, kind, x)
    # No trace left: the next picks agree, tie breaks included.
    for _ in range(2 * sum(weights)):
        assert lane.pick() == ref.pick()
        assert lc_state(lane) == lc_state(ref)


def test_least_conn_unpick_examples() -> None:
    """Fixed walks: a declined pick does not move the weighted rotation; an unpick
    after a pick without a tie (one least-loaded target) changes nothing."""
    lc = LeastConnections(["a", "b", "c"], [2, 1, 1])
    # Idle, all tied: smooth weighted round robin, a b c a (then again).
    assert [lc.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    assert lc.pick() == "a"
    lc.unpick()  # "a" taken back: the rotation goes on from it
    assert [lc.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    lc.acquire("a")
    lc.acquire("b")
    before = lc_state(lc)
    assert lc.pick() == "c"  # the only least-loaded target: no score changes
    assert lc_state(lc) == before
    lc.unpick()
    assert lc_state(lc) == before
    lc.acquire("c")  # one in flight each: a (weight 2) is the least loaded, alone
    assert lc.pick() == "a"
    lc.release("a")
    lc.release("b")
    lc.release("c")
    # A tie between b and c after a's requests: picked and taken back, b again.
    lc.acquire("a")
    lc.acquire("a")
    assert lc.pick() == "b"
    lc.unpick()
    assert lc.pick() == "b"


def test_unpick_is_a_no_op_on_p2c_and_consistent_hash() -> None:
    """``PowerOfTwoEWMA.unpick`` and ``ConsistentHash.unpick`` change nothing (their
    picks change no state but the random generator's)."""
    p2c = PowerOfTwoEWMA(["a", "b", "c"], random.Random(7), clock=lambda: 100.0)
    p2c.observe("a", 0.2, now=99.0)
    p2c.acquire("b")
    before = (list(p2c._ewma), list(p2c._stamp), list(p2c._inflight))
    p2c.pick()
    p2c.unpick()
    p2c.unpick()
    assert (list(p2c._ewma), list(p2c._stamp), list(p2c._inflight)) == before
    ring = ConsistentHash(["a", "b", "c"])
    order = ring.candidates(b"/k")
    ring.unpick()
    assert ring.candidates(b"/k") == order


URLS = [f"http://127.0.0.1:{9300 + i}" for i in range(3)]


def twin_upstream(**main: Any) -> Upstream:
    """An upstream over unreachable targets (never dialled: only its choices are used)
    with ``main`` as extra keys; needs a running loop (its pools)."""
    main.setdefault("targets", URLS)
    return Upstream(parse_config({"upstreams": {"main": main}}).upstreams["main"])


def lc_tiers(up: Upstream) -> list[list[int]]:
    """The tie-breaking scores of a resilient least_conn upstream's tier balancers."""
    return [list(tier._current) for tier in up.balancer.balancers]


@pytest.mark.parametrize(
    "extra",
    [
        {"health_check": {}},
        {"breaker": {}},
        {"targets": [*URLS[:2], {"url": URLS[2], "weight": 3}]},
    ],
    ids=["health_checked", "breaker", "weighted-unresilient"],
)
async def test_least_conn_express_decline_takes_the_pick_back(extra: dict[str, Any]) -> None:
    """The lane's choice (``express_attempt`` on a resilient upstream, ``pick`` on a
    plain one) taken back by ``express_decline``: the upstream then chooses as its twin,
    which only ever made the general path's choices."""
    lane, ref = (
        twin_upstream(balance="least_conn", **extra),
        twin_upstream(balance="least_conn", **extra),
    )
    assert lane.express and lane.express_health is None and lane.load_aware
    try:
        for round_ in range(7):
            if lane.resilient:
                attempt = lane.express_attempt()
                assert attempt is not None
                lane.express_decline(*attempt)
                assert lc_tiers(lane) == lc_tiers(ref), round_
            else:
                lane.express_decline(lane.balancer.pick(), -1)
                assert lane.balancer._current == ref.balancer._current, round_
            got, want = lane.candidates(None), ref.candidates(None)
            assert [t.name for t in got] == [t.name for t in want]
            if round_ % 3 == 2:  # now and then one stays in flight: ties among fewer
                lane.balancer.acquire(got[0])
                ref.balancer.acquire(want[0])
    finally:
        await lane.aclose()
        await ref.aclose()


@pytest.mark.parametrize("hash_key", ["ip", "path"])
async def test_consistent_hash_express_attempt_is_the_first_candidate(hash_key: str) -> None:
    """A resilient (health-checked) consistent hash: ``express_attempt(key)`` chooses
    ``candidates(key)[0]``, for keys spread over every target; a decline changes
    nothing."""
    up = twin_upstream(balance="consistent_hash", hash_key=hash_key, health_check={})
    assert up.express and up.resilient and up.express_health is None
    try:
        chosen = set()
        for i in range(40):
            key = f"127.0.0.{i + 2}".encode() if hash_key == "ip" else f"/k/{i}".encode()
            attempt = up.express_attempt(key)
            assert attempt is not None
            assert attempt[0] is up.candidates(key)[0]
            up.express_decline(*attempt)
            assert up.express_attempt(key) == attempt
            chosen.add(attempt[0].name)
        assert chosen == set(URLS)  # 40 keys over 3 targets (a fixed ring: fixed ports)
    finally:
        await up.aclose()


# --- 2. real sockets: the lane against the general path -----------------------------------

SCRIPTS = frozenset({b"split", b"slow", b"chunked", b"chunkedsplit", b"interim", b"held", b"never"})
"""The first path segments :class:`ScriptedOrigin` has a script for."""

PIECE = 10
"""How many body bytes the mid-body scripts send with the head."""


class LabelledOrigin(ScriptedOrigin):
    """A :class:`ScriptedOrigin` named ``label``; its scripted paths behave as there.
    Its own, by the first path segment:

    * ``stale``: closes a reused connection unanswered the first time any origin
      sharing ``killed`` sees that path (a pooled connection the origin timed out), so
      the proxy's retry succeeds whichever target it goes to (ScriptedOrigin's would
      close every reused connection);
    * ``partial``: the head and ``PIECE`` body bytes, the rest in two writes 50 ms
      apart (the lane relays the body across reads); ``partialextra``: the head and
      ``PIECE`` bytes, then the rest with a stray response after it;
    * ``cut``: the head and ``PIECE`` bytes, then a close 50 ms later; ``stall``: the
      head and ``PIECE`` bytes, then nothing (the lane promotes in mid-body);
    * anything else: 200 with a body and an ``x-origin`` field naming the origin; the
      health checker's probe (``/healthz``) the same, with a close.
    """

    def __init__(self, label: str, killed: set[bytes]) -> None:
        super().__init__()
        self.label = label
        self.killed = killed

    @property
    def url(self) -> str:
        """The target URL naming this origin in a config."""
        return f"http://127.0.0.1:{self.port}"

    def close_later(self, delay: float, conn: OriginConn) -> None:
        """Close ``conn`` in ``delay`` seconds (cancelled by :meth:`close`)."""
        loop = asyncio.get_running_loop()
        self._handles.append(loop.call_later(delay, conn.transport.close))

    def answer(self, conn: OriginConn, head: bytes) -> None:
        target = head.split(b" ", 2)[1]
        kind = target.split(b"?", 1)[0].split(b"/")[1]
        if kind in SCRIPTS:
            super().answer(conn, head)
            return
        t = conn.transport
        if kind == b"stale" and len(conn.heads) > 1 and target not in self.killed:
            self.killed.add(target)
            t.close()
            return
        probe = head.startswith(PROBE)
        body = self.label.encode() + b" answered " + target + b" " + b"." * 40 + b"\n"
        fields = b"x-origin: %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n" % (
            self.label.encode(),
            len(body),
        )
        if probe:
            fields += b"connection: close\r\n"
        top = b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n"  # the response head
        if head.startswith(b"HEAD "):
            t.write(top)
            return
        first, rest = top + body[:PIECE], body[PIECE:]
        if kind == b"partial":
            t.write(first)
            self.later(0.05, conn, rest[:PIECE])
            self.later(0.1, conn, rest[PIECE:])
        elif kind == b"partialextra":
            t.write(first)
            self.later(0.05, conn, rest + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno")
        elif kind == b"cut":
            t.write(first)
            self.close_later(0.05, conn)
        elif kind == b"stall":
            t.write(first)
        else:
            t.write(top + body)
            if probe:
                t.close()

    def sent(self) -> list[bytes]:
        """The request heads the proxy sent (probes left out), in arrival order."""
        return [h for c in self.conns for h in c.heads if not h.startswith(PROBE)]

    def got(self, rid: str) -> int:
        """How many times a request with id ``rid`` arrived (a retry: more than once)."""
        marker = b"\r\nx-request-id: " + rid.encode() + b"\r\n"
        return sum(1 for h in self.sent() if marker in h.lower())

    def forget(self) -> None:
        """Drop what the last run sent (its connections are closed): the next run's
        request ids are the same."""
        for conn in self.conns:
            conn.heads.clear()
        self.killed.clear()


NewLabelled = Callable[[str], Awaitable[LabelledOrigin]]


@pytest.fixture
async def new_labelled() -> AsyncIterator[NewLabelled]:
    """``await new_labelled(label)``: a started :class:`LabelledOrigin`, closed (its
    held answers released first) at the end."""
    killed: set[bytes] = set()  # shared: each path is killed once across the origins
    async with started_origins(lambda label: LabelledOrigin(label, killed), release=True) as start:
        yield start


async def labelled(new: NewLabelled, count: int) -> list[LabelledOrigin]:
    """``count`` origins named a, b, c..."""
    return [await new("abcdefgh"[i]) for i in range(count)]


@dataclass
class Ledger:
    """Every ``acquire`` and ``release`` the load-aware balancers received, by target
    name, and every ValueError a release raised."""

    acquired: Counter[str] = field(default_factory=Counter)
    released: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything (a new run)."""
        self.acquired.clear()
        self.released.clear()
        self.errors.clear()

    def balanced(self) -> bool:
        """Every acquire released, and no release refused."""
        return not self.errors and self.acquired == self.released


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """A :class:`Ledger` fed by spies on the balancer classes (a priority-group
    balancer forwards to them), which call the originals."""
    book = Ledger()

    def spy(cls: type[Any]) -> None:
        acquire, release = cls.acquire, cls.release

        def spy_acquire(self: Any, target: Any) -> None:
            book.acquired[getattr(target, "name", str(target))] += 1
            acquire(self, target)

        def spy_release(self: Any, target: Any) -> None:
            book.released[getattr(target, "name", str(target))] += 1
            try:
                release(self, target)
            except ValueError as exc:
                book.errors.append(str(exc))
                raise

        monkeypatch.setattr(cls, "acquire", spy_acquire)
        monkeypatch.setattr(cls, "release", spy_release)

    for cls in (LeastConnections, PowerOfTwoEWMA, ConsistentHash):
        spy(cls)
    return book


RESPONSE_TIMEOUT = "400ms"
"""``/never`` answers 504 after this (``/slow``'s 100 ms stays well within it)."""

HOLDING = {"response_timeout": "5s"}
"""For the tests that hold requests while others run: no timeout while the test holds
(a loaded machine could otherwise turn a held request into a 504 and a retry)."""

RETRY = {"attempts": 2, "backoff_base": "0s", "backoff_max": "0s"}
"""One retry, at once (on a timeout too: ``on_timeout`` defaults to true)."""


def balance_document(
    origins: list[LabelledOrigin], *, express: bool, **upstream: Any
) -> dict[str, Any]:
    """A config sending everything to upstream ``main`` over ``origins`` (weight 1
    each), with ``upstream`` as extra keys (the balancer among them)."""
    return {
        "server": {
            "listen": "127.0.0.1:0",
            "http": "fast",
            "access_log": False,
            "express": express,
        },
        "admin": {"enabled": False},
        "upstreams": {
            "main": {
                "targets": [o.url for o in origins],
                "pool": {"response_timeout": RESPONSE_TIMEOUT},
                **upstream,
            }
        },
        "routes": [{"prefix": "/", "upstream": "main"}],
    }


@contextlib.asynccontextmanager
async def serving(doc: dict[str, Any]) -> AsyncIterator[ProxyServer]:
    """A started proxy for ``doc``, shut down (its upstream connections closed) on exit:
    the twin run that follows uses the same origins."""
    server = ProxyServer(parse_config(doc))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(drain_timeout=1)


def main_upstream(server: ProxyServer) -> Upstream:
    """The upstream every route of :func:`balance_document` goes to."""
    return server.gateway.upstreams["main"]


def inflight(up: Upstream) -> list[int]:
    """Each target's in-flight count as its balancer keeps it (``/upstreams`` agrees)."""
    counts = [up.balancer.inflight(t) for t in up.targets]
    assert [t["inflight"] for t in up.describe()["targets"]] == counts
    return counts


LOCAL = "127.0.0.1"


async def open_client(port: int, source: str = LOCAL) -> Client:
    """A client connection to the proxy from loopback address ``source`` (any
    127.0.0.0/8 address works on Linux): the consistent-hash key ``ip``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return Client(reader, writer)


@dataclass(frozen=True)
class Step:
    """One GET of ``path`` from address ``source``; ``target``: the index of the
    target it is meant for (a consistent hash), ``None``: the balancer decides."""

    path: str
    source: str = LOCAL
    target: int | None = None

    @property
    def kind(self) -> str:
        return self.path.split("?", 1)[0].split("/")[1]


@dataclass(frozen=True)
class Outcome:
    """One response as the client saw it, and which origins the request reached (one
    label per arrival, sorted: a retried request reaches one or two origins twice). A
    response cut off in mid-body: status 0, its raw bytes as ``body``."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    receivers: tuple[str, ...]


@dataclass
class BalanceRun:
    """What one proxy (express on or off) did with a sequence of steps."""

    outcomes: list[Outcome]
    lanes: list[tuple[int, int]]  # (served, promoted) deltas, per step
    sent: int  # request heads the origins received (probes aside)
    acquired: int
    released: int


async def run_steps(
    origins: list[LabelledOrigin], doc: dict[str, Any], steps: list[Step], ledger: Ledger
) -> BalanceRun:
    """Send ``steps`` one after the other (a keep-alive connection per source address,
    reopened after a ``Connection: close``); every in-flight count must be back to 0
    right after every response."""
    ledger.reset()
    for origin in origins:
        origin.forget()
    outcomes: list[Outcome] = []
    lanes: list[tuple[int, int]] = []
    async with serving(doc) as server:
        up = main_upstream(server)
        assert up.express and up.load_aware
        clients: dict[str, Client] = {}
        try:
            for i, step in enumerate(steps):
                rid = f"r-{i}"
                client = clients.get(step.source)
                if client is None:
                    client = clients[step.source] = await open_client(server.port, step.source)
                before = lane_counts(server)
                await client.send(request(step.path, rid))
                outcome: Outcome
                if step.kind in TRUNCATED:
                    # The response breaks off in mid-body: the client gets the head and
                    # the bytes so far, then the proxy closes the connection.
                    raw = await client.read_raw_until_close()
                    outcome = Outcome(0, (), raw, ())
                    await clients.pop(step.source).close()
                else:
                    resp: Response = await client.read_response()
                    outcome = Outcome(resp.status, tuple(resp.headers), resp.body, ())
                    if resp.header("connection") == b"close":
                        await clients.pop(step.source).close()
                after = lane_counts(server)
                # Released before the client could read the response (or its end): no
                # wait needed.
                assert inflight(up) == [0] * len(origins), (i, step, outcome.status)
                lanes.append((after[0] - before[0], after[1] - before[1]))
                receivers = tuple(sorted(o.label for o in origins for _ in range(o.got(rid))))
                outcomes.append(dataclasses.replace(outcome, receivers=receivers))
        finally:
            for client in clients.values():
                await client.close()
    assert ledger.balanced(), ledger
    return BalanceRun(
        outcomes,
        lanes,
        sum(len(o.sent()) for o in origins),
        sum(ledger.acquired.values()),
        sum(ledger.released.values()),
    )


async def twin_runs(
    origins: list[LabelledOrigin], steps: list[Step], ledger: Ledger, **upstream: Any
) -> tuple[BalanceRun, BalanceRun]:
    """The steps with express off (the reference), then on, in front of the same
    origins: the same responses from the same origins; one acquire per request sent."""
    general = await run_steps(
        origins, balance_document(origins, express=False, **upstream), steps, ledger
    )
    express = await run_steps(
        origins, balance_document(origins, express=True, **upstream), steps, ledger
    )
    for i, (got, want) in enumerate(zip(express.outcomes, general.outcomes, strict=True)):
        assert got == want, (i, steps[i])
    assert set(general.lanes) == {GENERAL}
    for run in (general, express):
        # Every request head sent (retries included) was counted in flight once, by the
        # lane or by the general path, and released once.
        assert run.acquired == run.released == run.sent > 0
    return express, general


def ring_owner(up: Upstream, key: bytes) -> int:
    """The index of ``key``'s owner on the upstream's hash ring (no load)."""
    ring = up.balancer.balancers[0] if up.resilient else up.balancer
    owner: Target = ring.get(key)
    return up.targets.index(owner)


async def keyed_steps(
    origins: list[LabelledOrigin], template: list[tuple[int, str]], **upstream: Any
) -> list[Step]:
    """``template`` ((target index, kind) pairs) as steps a consistent hash sends to
    those targets: for ``hash_key = "path"``, a path ``/kind/n`` the target owns (plain
    GETs carry a query, which the key leaves out); for ``"ip"``, a source address the
    target owns (two per target, in turn). The ring is read off an upstream built from
    the same config (the same target URLs)."""
    up = Upstream(
        parse_config(balance_document(origins, express=True, **upstream)).upstreams["main"]
    )
    try:
        by_path = upstream.get("hash_key", "ip") == "path"
        sources: dict[int, list[str]] = {i: [] for i in range(len(origins))}
        for n in range(2, 255):
            address = f"127.0.0.{n}"
            mine = sources[ring_owner(up, address.encode())]
            if len(mine) < 2:
                mine.append(address)
        assert all(len(s) == 2 for s in sources.values()), sources
        steps: list[Step] = []
        turn: Counter[int] = Counter()
        for i, (t, kind) in enumerate(template):
            if by_path:
                n = next(n for n in range(1000) if ring_owner(up, f"/{kind}/{n}".encode()) == t)
                query = f"?q={i}" if kind in ("p", "w") else ""
                steps.append(Step(f"/{kind}/{n}{query}", LOCAL, t))
            else:
                source = sources[t][turn[t] % 2]
                turn[t] += 1
                steps.append(Step(f"/{kind}/{i}", source, t))
        return steps
    finally:
        await up.aclose()


ROUND = [(t, "p") for t in range(3)]
"""A plain GET to each target: before a trigger, every pool is warm (a cold one
connects), so the lane sends the trigger. (Least_conn's idle tie break visits every
target in any three picks in a row.)"""

TEMPLATE: list[tuple[int, str]] = [
    *[(t, "w") for t in range(3)],  # cold pools: the lane declines, the general path warms
    *ROUND,
    (0, "chunkedsplit"),  # the head and a chunk, the rest 100 ms later: promoted
    (1, "split"),  # the head, the body 100 ms later: relayed by the lane
    (2, "stale"),  # the pooled connection closes unanswered: one retry
    *ROUND,
    (1, "slow"),  # whole, 100 ms late: the lane's
    (2, "chunked"),  # a whole chunked body: the lane's
    (0, "partial"),  # the body over three reads: relayed by the lane
    *ROUND,
    (0, "never"),  # 504 (with a retry policy: after a second attempt)
    *ROUND,
    (1, "interim"),  # 100 and 103, the response 100 ms later: promoted
    *ROUND,
    (2, "cut"),  # the upstream closes in mid-body: promoted there, the client cut off
    *ROUND,
    (1, "stale"),
    *ROUND,
    (0, "stall"),  # nothing after part of the body: promoted at the deadline, cut off
    *ROUND,
    (2, "partialextra"),  # stray bytes after the body: not relayed, connection dropped
    *ROUND,
    (2, "split"),
    *ROUND,
]
"""A scenario: (target index for a consistent hash, kind); a kind names a script of the
origins (``w``/``p``: a plain 200)."""

TRIGGERS = frozenset({"chunkedsplit", "stale", "never", "interim", "cut", "stall"})
"""Kinds the lane sends and then promotes (when it sends them at all)."""

TRUNCATED = frozenset({"cut", "stall"})
"""Kinds whose response breaks off in mid-body."""

CONFIGS: dict[str, dict[str, Any]] = {
    "least_conn": {"balance": "least_conn"},
    "least_conn-checked": {"balance": "least_conn", "health_check": SLOW_CHECKS},
    "least_conn-breaker-retry": {"balance": "least_conn", "breaker": {}, "retry": RETRY},
    "hash_ip": {"balance": "consistent_hash"},
    "hash_ip-checked": {"balance": "consistent_hash", "health_check": SLOW_CHECKS},
    "hash_path": {"balance": "consistent_hash", "hash_key": "path"},
    "hash_path-checked": {
        "balance": "consistent_hash",
        "hash_key": "path",
        "health_check": SLOW_CHECKS,
    },
    "hash_path-breaker-retry": {
        "balance": "consistent_hash",
        "hash_key": "path",
        "breaker": {},
        "retry": RETRY,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
async def test_parity_and_counts_with_the_general_path(
    new_labelled: NewLabelled, ledger: Ledger, name: str
) -> None:
    """:data:`TEMPLATE` over three targets, express off then on: the same responses
    from the same origins (:func:`twin_runs`), every count 0 after every response
    (:func:`run_steps`); the lane sent every trigger (promoted) and served the rest on
    warm pools; a consistent hash sends each key (the client's address, or the path
    without its query) to its owner."""
    upstream = CONFIGS[name]
    origins = await labelled(new_labelled, 3)
    keyed = upstream["balance"] == "consistent_hash"
    if keyed:
        steps = await keyed_steps(origins, TEMPLATE, **upstream)
    else:
        steps = [Step(f"/{kind}/{i}") for i, (_, kind) in enumerate(TEMPLATE)]
    express, _ = await twin_runs(origins, steps, ledger, **upstream)
    lanes = express.lanes
    kinds = [s.kind for s in steps]
    # Cold pools: the lane picks, finds no connection, takes the pick back.
    assert lanes[:3] == [GENERAL] * 3
    for i, kind in enumerate(kinds[3:], 3):
        if kind in TRIGGERS:  # on a warm pool: the lane sent it, the general path ended it
            assert lanes[i] == PROMOTED, (i, kind)
        elif kind != "p":  # whole, late, chunked, or a body over several reads: the lane's
            assert lanes[i] == LANE, (i, kind)
        else:  # the lane's, unless its target lost its connection (a 504, a retry...)
            assert lanes[i] in (LANE, GENERAL), (i, kind)
    plain = [lane for i, lane in enumerate(lanes) if i >= 3 and kinds[i] == "p"]
    assert plain.count(GENERAL) <= 8, lanes
    labels = [o.label for o in origins]
    outcomes = express.outcomes
    for i, (step, outcome) in enumerate(zip(steps, outcomes, strict=True)):
        if step.kind in TRUNCATED:
            # The head and the first piece of the body, then the connection closed.
            (label,) = outcome.receivers
            assert outcome.status == 0 and outcome.body.startswith(b"HTTP/1.1 200 OK\r\n")
            assert outcome.body.endswith(b"\r\n\r\n" + label.encode() + b" answered"), i
        elif step.kind not in ("stale", "never"):
            assert outcome.status == 200, i
            assert len(outcome.receivers) == 1, i
            if keyed:  # the key's owner (no load: sequential requests)
                assert outcome.receivers == (labels[step.target or 0],), (i, step)
            if step.kind.startswith("partial"):  # the whole body, nothing after it
                assert outcome.body.endswith(b"." * 40 + b"\n"), i
    never = kinds.index("never")
    assert outcomes[never].status == 504
    retried = "retry" in upstream
    assert len(outcomes[never].receivers) == (2 if retried else 1)
    for i in (i for i, k in enumerate(kinds) if k == "stale"):
        assert outcomes[i].status == 200 and len(outcomes[i].receivers) == 2
    if name == "least_conn":
        # Idle least_conn breaks its ties by smooth round robin; a plain upstream's
        # retry reconnects to the same target without a pick: a b c a b c ... throughout.
        for i, outcome in enumerate(outcomes):
            assert set(outcome.receivers) == {labels[i % 3]}, i
        # The general path connects for the cold pools, and for a target's next request
        # after its connection was lost (three requests later: the rotation).
        lost = {"never", "cut", "stall", "partialextra"}
        expected = [0, 1, 2] + [i + 3 for i, k in enumerate(kinds) if k in lost]
        assert [i for i, lane in enumerate(lanes) if lane == GENERAL] == expected


# --- 3. in-flight counts steer the next choice ------------------------------------------


async def send_held(client: Client, origins: list[LabelledOrigin], path: str, rid: str) -> str:
    """Send a ``/held`` GET, wait until an origin holds it (its answer waits for
    :meth:`ScriptedOrigin.release`) and return that origin's label."""
    await client.send(request(path, rid))
    await eventually(lambda: any(o.got(rid) for o in origins))
    (label,) = [o.label for o in origins if o.got(rid)]
    return label


async def least_conn_held_run(
    origins: list[LabelledOrigin], ledger: Ledger, *, express: bool, **upstream: Any
) -> tuple[list[str], list[tuple[int, int]], list[list[int]]]:
    """Two targets a, b. Warm both; hold a request on a (the next pick: a); three GETs
    on another connection go to b while a is busy; release a; two more GETs. The
    answering origins, the lane deltas and the in-flight counts after each."""
    for origin in origins:
        origin.forget()
    ledger.reset()
    answered: list[str] = []
    lanes: list[tuple[int, int]] = []
    counts: list[list[int]] = []
    doc = balance_document(origins, express=express, pool=HOLDING, **upstream)
    async with serving(doc) as server:
        up = main_upstream(server)
        holder = await open_client(server.port)
        client = await open_client(server.port)

        async def get(path: str) -> None:
            before = lane_counts(server)
            await client.send(request(path, path.strip("/")))
            resp = await client.read_response()
            after = lane_counts(server)
            assert resp.status == 200
            answered.append((resp.header("x-origin") or b"?").decode())
            lanes.append((after[0] - before[0], after[1] - before[1]))
            counts.append(inflight(up))

        try:
            await get("/w/0")
            await get("/w/1")
            before = lane_counts(server)
            assert await send_held(holder, origins, "/held/2", "held-2") == "a"
            after = lane_counts(server)
            lanes.append((after[0] - before[0], after[1] - before[1]))
            counts.append(inflight(up))  # a: 1, counted since the request left
            for i in range(3, 6):
                await get(f"/busy/{i}")
            origins[0].release()
            resp = await holder.read_response()
            assert (resp.status, resp.body) == (200, b"fixed body for /held/2\n")
            counts.append(inflight(up))
            await get("/after/6")
            await get("/after/7")
        finally:
            await holder.close()
            await client.close()
    assert ledger.balanced() and sum(ledger.acquired.values()) == 8
    return answered, lanes, counts


@pytest.mark.parametrize(
    "upstream",
    [{}, {"health_check": SLOW_CHECKS}, {"breaker": {}, "retry": RETRY}],
    ids=["plain", "checked", "breaker-retry"],
)
async def test_least_conn_counts_a_held_lane_request(
    new_labelled: NewLabelled, ledger: Ledger, upstream: dict[str, Any]
) -> None:
    origins = await labelled(new_labelled, 2)
    general = await least_conn_held_run(
        origins, ledger, express=False, balance="least_conn", **upstream
    )
    express = await least_conn_held_run(
        origins, ledger, express=True, balance="least_conn", **upstream
    )
    answered, lanes, counts = express
    # After the release, the tie break goes on: a, b, a (the held one), then b, a.
    assert answered == general[0] == ["a", "b", "b", "b", "b", "b", "a"]
    assert counts == general[2]
    assert counts == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [1, 0], [0, 0], [0, 0], [0, 0]]
    # The held request and everything after went out on the lane (b's connection, and
    # after the release a's again): the lane's acquire is what kept b chosen.
    assert lanes == [GENERAL, GENERAL, (1, 0), LANE, LANE, LANE, LANE, LANE]
    assert set(general[1]) == {GENERAL}


async def bounded_run(
    origins: list[LabelledOrigin], ledger: Ledger, *, express: bool, **upstream: Any
) -> tuple[list[str], list[tuple[int, int]]]:
    """A consistent hash on the path over a, b; ``/held/n`` is a's key. Two held
    requests for it open two connections to a; a plain GET warms b; two held requests
    for the key again (a: 2 in flight), then a third: a's load is over the bound
    (``ceil(1.25 * 3 / 2) = 2``), so b. Which origin held each of the last three, and
    their lane deltas."""
    for origin in origins:
        origin.forget()
    ledger.reset()
    doc = balance_document(origins, express=express, pool=HOLDING, **upstream)
    async with serving(doc) as server:
        up = main_upstream(server)
        key = next(f"/held/{n}" for n in range(1000) if ring_owner(up, f"/held/{n}".encode()) == 0)
        other = next(f"/p/{n}" for n in range(1000) if ring_owner(up, f"/p/{n}".encode()) == 1)
        clients = [await open_client(server.port) for _ in range(3)]
        held_by: list[str] = []
        lanes: list[tuple[int, int]] = []
        try:
            for client, rid in zip(clients, ("warm-1", "warm-2"), strict=False):
                assert await send_held(client, origins, key, rid) == "a"
            for origin in origins:
                origin.release()
            for client in clients[:2]:
                assert (await client.read_response()).status == 200
            assert inflight(up) == [0, 0]
            await clients[2].send(request(other, "warm-b"))
            assert (await clients[2].read_response()).header("x-origin") == b"b"
            for client, rid in zip(clients, ("h-1", "h-2", "h-3"), strict=True):
                before = lane_counts(server)
                held_by.append(await send_held(client, origins, key, rid))
                after = lane_counts(server)
                lanes.append((after[0] - before[0], after[1] - before[1]))
            assert inflight(up) == [2, 1]  # all three counted, whoever sent them
            for origin in origins:
                origin.release()
            for client in clients:
                assert (await client.read_response()).status == 200
            assert inflight(up) == [0, 0]
        finally:
            for client in clients:
                await client.close()
    assert ledger.balanced() and sum(ledger.acquired.values()) == 6
    return held_by, lanes


@pytest.mark.parametrize("upstream", [{}, {"health_check": SLOW_CHECKS}], ids=["plain", "checked"])
async def test_consistent_hash_bounded_load_sees_lane_requests(
    new_labelled: NewLabelled, ledger: Ledger, upstream: dict[str, Any]
) -> None:
    origins = await labelled(new_labelled, 2)
    kw = {"balance": "consistent_hash", "hash_key": "path", **upstream}
    general = await bounded_run(origins, ledger, express=False, **kw)
    express = await bounded_run(origins, ledger, express=True, **kw)
    assert express[0] == general[0] == ["a", "a", "b"]  # the third one spilled to b
    assert express[1] == [LANE, LANE, LANE]
    assert set(general[1]) == {GENERAL}


# --- 4. p2c_ewma: lane responses feed the EWMA ------------------------------------------


@dataclass
class P2cSeen:
    """One request on a p2c_ewma upstream: who answered, the lane delta, the latency
    samples the balancer got during it, and the answering target's cost right after."""

    origin: str
    lane: tuple[int, int]
    samples: list[tuple[str, float]]
    cost: float


P2C_PATHS = [
    "/w/0",
    "/w/1",
    "/w/2",
    "/chunkedsplit/3",
    "/p/4",
    "/split/5",
    "/p/6",
    "/slow/7",
    "/p/8",
]
SLOW = (3, 5, 7)  # the indexes of the requests that take 100 ms or more


async def p2c_run(
    origins: list[LabelledOrigin],
    ledger: Ledger,
    monkeypatch: pytest.MonkeyPatch,
    *,
    express: bool,
) -> list[P2cSeen]:
    """Two targets under p2c_ewma, b made expensive (a 10 s estimate: two choices out
    of two always compare both, so a takes every request): plain GETs (the first
    connects), then, each followed by a plain GET, three that take 100 ms: a chunk
    100 ms after the head (promoted), a body 100 ms after the head (relayed by the
    lane), a whole response 100 ms late (the lane's)."""
    for origin in origins:
        origin.forget()
    ledger.reset()
    samples: list[tuple[str, float]] = []
    observe = PowerOfTwoEWMA.observe

    def spy(self: Any, target: Any, latency_s: float, now: float | None = None) -> None:
        samples.append((target.name, latency_s))
        observe(self, target, latency_s, now)

    monkeypatch.setattr(PowerOfTwoEWMA, "observe", spy)
    doc = balance_document(origins, express=express, balance="p2c_ewma")
    seen: list[P2cSeen] = []
    async with serving(doc) as server:
        up = main_upstream(server)
        balancer = up.balancer
        assert isinstance(balancer, PowerOfTwoEWMA)
        balancer._ewma[1] = 10.0  # never sampled: no decay, b stays the dearer choice
        names = {t.name: o.label for o, t in zip(origins, up.targets, strict=True)}
        client = await open_client(server.port)
        try:
            for i, path in enumerate(P2C_PATHS):
                samples.clear()
                before = lane_counts(server)
                await client.send(request(path, f"r-{i}"))
                resp = await client.read_response()
                after = lane_counts(server)
                assert resp.status == 200
                assert inflight(up) == [0, 0]
                label = next(o.label for o in origins if o.got(f"r-{i}"))
                target = up.targets[[o.label for o in origins].index(label)]
                seen.append(
                    P2cSeen(
                        label,
                        (after[0] - before[0], after[1] - before[1]),
                        [(names[n], s) for n, s in samples],
                        balancer.cost(target),
                    )
                )
        finally:
            await client.close()
    assert ledger.balanced()
    return seen


async def test_p2c_ewma_learns_from_lane_responses(
    new_labelled: NewLabelled, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    origins = await labelled(new_labelled, 2)
    runs = {}
    for express in (False, True):
        runs[express] = seen = await p2c_run(origins, ledger, monkeypatch, express=express)
        n = len(P2C_PATHS)
        assert [s.origin for s in seen] == ["a"] * n
        # One latency sample per request, for the target that answered: the lane's
        # responses are measured as the general path's are, from the request's start
        # to the response's end (the origin's 100 ms timer, on the loop's millisecond
        # clock, may fire a few microseconds early by perf_counter).
        assert [[name for name, _ in s.samples] for s in seen] == [["a"]] * n
        for i in SLOW:
            assert seen[i].samples[0][1] >= 0.095, (i, seen[i])
        # The fast ones (a few ms): well under the 30 ms default estimate...
        assert seen[2].cost < 0.05, seen[2]
        # ...then a 100 ms peak, taken at once (Finagle's peak EWMA).
        assert seen[3].cost >= 0.09, seen[3]
    lanes = [s.lane for s in runs[True]]
    # The first connects; the chunk after the head is promoted (its exchange observed
    # from the lane's start, ``up_start``); everything else is the lane's own.
    assert lanes == [GENERAL, LANE, LANE, PROMOTED] + [LANE] * 5
    assert {s.lane for s in runs[False]} == {GENERAL}


# --- 5. no release without acquire, whatever happens ------------------------------------


@pytest.mark.parametrize(
    "upstream",
    [
        {"balance": "least_conn"},
        {"balance": "p2c_ewma"},
        {"balance": "consistent_hash"},
        {"balance": "consistent_hash", "hash_key": "path", "health_check": SLOW_CHECKS},
        {"balance": "least_conn", "breaker": {}, "retry": RETRY, "outlier": {}},
    ],
    ids=["least_conn", "p2c_ewma", "hash_ip", "hash_path-checked", "least_conn-resilient"],
)
async def test_a_mixed_sequence_releases_exactly_what_it_acquired(
    new_labelled: NewLabelled, ledger: Ledger, upstream: dict[str, Any]
) -> None:
    """Plain GETs, every promotion and mid-body script, a HEAD, a request the lane
    refuses (a Content-Length), a 504, a pipelined request during a lane request, a
    client that resets, and one that half-closes, with a lane request in flight: no
    release without an acquire (an ERROR log fails the test too), every count back to
    0, one acquire per request head sent."""
    origins = await labelled(new_labelled, 2)
    async with serving(balance_document(origins, express=True, **upstream)) as server:
        up = main_upstream(server)
        zero = [0, 0]
        on_lane: list[str] = []  # the in-flight cases the lane had sent
        client = await open_client(server.port)
        try:
            for i in range(4):
                await client.send(request(f"/w/{i}", f"w-{i}"))
                assert (await client.read_response()).status == 200
            paths = [
                "/chunked/a",
                "/chunkedsplit/b",
                "/split/c",
                "/stale/d",
                "/slow/e",
                "/interim/f",
                "/partial/g",
                "/partialextra/h",
            ]
            for i, path in enumerate(paths):
                await client.send(request(path, f"m-{i}"))
                assert (await client.read_response()).status == 200
                assert inflight(up) == zero
            for path in ("/cut/i", "/stall/j"):  # cut off in mid-body
                cut = await open_client(server.port)
                try:
                    await cut.send(request(path, path.replace("/", "-")))
                    assert (await cut.read_raw_until_close()).startswith(b"HTTP/1.1 200")
                finally:
                    await cut.close()
                assert inflight(up) == zero
            await client.send(request("/p/h", "head-1", method="HEAD"))
            assert (await client.read_response(method=b"HEAD")).status == 200
            # Content-Length (even 0): the lane refuses it, the general path serves it.
            await client.send(request("/p/b", "body-1", "Content-Length: 0\r\n"))
            assert (await client.read_response()).status == 200
            await client.send(request("/never/x", "never-1"))
            assert (await client.read_response()).status == 504
            assert inflight(up) == zero
            # A pipelined request while the lane's is in flight: the general path takes
            # over both; both answered, counts released once.
            client2 = await open_client(server.port)
            try:
                for i in range(2):  # warm connections to both targets again
                    await client2.send(request(f"/w2/{i}", f"w2-{i}"))
                    assert (await client2.read_response()).status == 200
                served = lane_counts(server)[0]
                await send_held(client2, origins, "/held/pipe", "pipe-1")
                promoted = lane_counts(server)[1]
                await client2.send(request("/p/pipe", "pipe-2"))
                if lane_counts(server)[0] > served:  # the lane sent /held/pipe: promoted
                    await eventually(lambda: lane_counts(server)[1] > promoted)
                    on_lane.append("pipelined")
                for o in origins:
                    o.release()
                assert (await client2.read_response()).status == 200
                assert (await client2.read_response()).status == 200
            finally:
                await client2.close()
            await eventually(lambda: inflight(up) == zero)
            # A client that resets (SO_LINGER 0: RST, not FIN) with its request in
            # flight: the exchange ends there, and its count (not retried elsewhere).
            sock = socket.create_connection(("127.0.0.1", server.port))
            try:
                served = lane_counts(server)[0]
                sock.sendall(request("/held/gone", "gone-1"))
                await eventually(lambda: any(o.got("gone-1") for o in origins))
                if lane_counts(server)[0] > served:
                    on_lane.append("reset")
                assert sum(inflight(up)) == 1
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()
            await eventually(lambda: inflight(up) == zero)
            for i in range(2):  # the reset cost a pooled connection: warm again
                await client.send(request(f"/w3/{i}", f"w3-{i}"))
                assert (await client.read_response()).status == 200
            # A client that half-closes is still owed its response: counted until then.
            half = await open_client(server.port)
            try:
                served, promoted = lane_counts(server)
                await send_held(half, origins, "/held/half", "half-1")
                half.writer.write_eof()
                if lane_counts(server)[0] > served:  # the EOF promotes the lane's request
                    on_lane.append("half-close")
                    await eventually(lambda: lane_counts(server)[1] > promoted)
                assert sum(inflight(up)) == 1
                for o in origins:
                    o.release()
                resp = await half.read_response()
                assert (resp.status, resp.body) == (200, b"fixed body for /held/half\n")
            finally:
                await half.close()
            assert inflight(up) == zero
            assert sum(o.got("gone-1") for o in origins) == 1  # ended, not retried
            for i in range(4):
                await client.send(request(f"/z/{i}", f"z-{i}"))
                assert (await client.read_response()).status == 200
        finally:
            await client.close()
        assert inflight(up) == zero
        assert int(server.express_lane.served) >= 8
        assert int(server.express_lane.promoted) >= 3
        if upstream["balance"] != "p2c_ewma" and "hash_key" not in upstream:
            # Deterministic here (least_conn's rotation, one client address): the lane
            # had sent both, so the general path took them over in flight.
            assert on_lane == ["pipelined", "reset", "half-close"]
    assert not ledger.errors
    assert ledger.acquired == ledger.released
    assert sum(ledger.acquired.values()) == sum(len(o.sent()) for o in origins)
