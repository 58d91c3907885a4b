"""Header rewriting (hop-by-hop removal, forwarding fields) and path rewriting."""

from __future__ import annotations

from fastedge.http.headers import (
    new_request_id,
    rewrite_request_headers,
    rewrite_response_headers,
)
from fastedge.router import Route


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n for n, _ in headers]


def test_request_rewrite_strips_hop_by_hop_and_nominated() -> None:
    out, rid, host = rewrite_request_headers(
        [
            (b"host", b"h.test"),
            (b"connection", b"close, x-hop"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"content-length", b"5"),
            (b"te", b"trailers"),
            (b"upgrade", b"websocket"),
            (b"x-keep", b"2"),
        ],
        client_ip=b"10.0.0.1",
        proto=b"https",
        via=b"1.1 edge",
    )
    assert host == b"h.test"
    assert len(rid) >= 16
    got = dict(out)
    for gone in (
        b"connection",
        b"x-hop",
        b"transfer-encoding",
        b"content-length",
        b"te",
        b"upgrade",
    ):
        assert gone not in got
    assert got[b"x-keep"] == b"2"
    assert got[b"x-forwarded-for"] == b"10.0.0.1"
    assert got[b"x-forwarded-proto"] == b"https"
    assert got[b"x-forwarded-host"] == b"h.test"
    assert got[b"via"] == b"1.1 edge"
    assert got[b"x-request-id"] == rid


def test_request_rewrite_keeps_upgrade_when_asked() -> None:
    out, _, _ = rewrite_request_headers(
        [(b"host", b"a"), (b"connection", b"Upgrade"), (b"upgrade", b"websocket")],
        client_ip=b"1",
        proto=b"http",
        via=b"1.1 e",
        keep_upgrade=True,
    )
    assert (b"connection", b"upgrade") in out and (b"upgrade", b"websocket") in out


def test_invalid_client_request_id_is_replaced() -> None:
    out, rid, _ = rewrite_request_headers(
        [(b"x-request-id", b"bad id with spaces")], client_ip=b"1", proto=b"http", via=b"v"
    )
    assert rid != b"bad id with spaces" and b" " not in rid
    assert names(out).count(b"x-request-id") == 1


def test_request_ids_are_unique() -> None:
    assert len({new_request_id() for _ in range(10000)}) == 10000


def test_response_rewrite() -> None:
    out = rewrite_response_headers(
        [
            (b"content-length", b"10"),
            (b"connection", b"keep-alive, x-internal"),
            (b"x-internal", b"secret"),
            (b"keep-alive", b"timeout=5"),
            (b"via", b"1.0 origin"),
            (b"server", b"origin"),
        ],
        via=b"1.1 fastedge",
        request_id=b"rid",
        keep_length=True,
    )
    got = dict(out)
    assert got[b"content-length"] == b"10"
    assert b"x-internal" not in got and b"keep-alive" not in got and b"connection" not in got
    assert got[b"via"] == b"1.0 origin, 1.1 fastedge"
    assert got[b"x-request-id"] == b"rid"
    assert got[b"server"] == b"origin"


def test_response_rewrite_drops_length_when_reframed() -> None:
    out = rewrite_response_headers(
        [(b"content-length", b"10"), (b"x-request-id", b"up")],
        via=b"v",
        request_id=b"rid",
        keep_length=False,
    )
    assert dict(out) == {b"x-request-id": b"up", b"via": b"v"}


def test_route_forward_target() -> None:
    plain = Route(name="r", prefix="/api/users", upstream=None)
    strip = Route(name="r", prefix="/api/users", upstream=None, strip_prefix=True)
    rewrite = Route(name="r", prefix="/api/users/", upstream=None, rewrite="/v2/people")
    root = Route(name="r", prefix="/", upstream=None, strip_prefix=True)
    assert plain.forward_target(b"/api/users/42", b"?a=1") == b"/api/users/42?a=1"
    assert strip.forward_target(b"/api/users/42", b"?a=1") == b"/42?a=1"
    assert strip.forward_target(b"/api/users", b"") == b"/"
    assert strip.forward_target(b"/api/users/", b"") == b"/"
    assert rewrite.forward_target(b"/api/users/42", b"") == b"/v2/people/42"
    assert rewrite.forward_target(b"/api/users", b"?q") == b"/v2/people?q"
    assert root.forward_target(b"/x/y", b"") == b"/x/y"
