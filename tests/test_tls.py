"""TLS both ways: fastedge terminates client TLS and verifies https upstreams."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from fastedge.config import parse_config
from fastedge.server import ProxyServer
from tests.conftest import get


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {k: str(v) for k, v in paths.items()}


async def tls_origin(certs: dict[str, str]) -> tuple[asyncio.Server, int]:
    """A minimal HTTPS upstream answering every request with its SNI-free JSON."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs["cert"], certs["key"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = json.dumps({"line": head.split(b"\r\n", 1)[0].decode()}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def https_get(port: int, ca_file: str, path: str = "/") -> bytes:
    ctx = ssl.create_default_context(cafile=ca_file)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(get(path, extra="Connection: close\r\n"))
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return data


def cfg(origin: str, engine: str, **extra: Any) -> Any:
    server = {"listen": "127.0.0.1:0", "http": engine, "access_log": False}
    server.update(extra.pop("server", {}))
    up = {"targets": [origin], **extra}
    return parse_config(
        {
            "server": server,
            "admin": {"enabled": False},
            "upstreams": {"o": up},
            "routes": [{"prefix": "/", "upstream": "o"}],
        }
    )


@pytest.fixture
async def origin_tls(certs: dict[str, str]) -> AsyncIterator[int]:
    server, port = await tls_origin(certs)
    yield port
    server.close()
    await server.wait_closed()


async def test_client_tls_is_terminated(
    certs: dict[str, str], origin_port: int, engine_name: str
) -> None:
    config = cfg(
        f"http://127.0.0.1:{origin_port}",
        engine_name,
        server={"tls": {"cert": certs["cert"], "key": certs["key"]}},
    )
    server = ProxyServer(config)
    await server.start()
    try:
        data = await https_get(server.port, certs["ca"], "/echo")
        assert data.startswith(b"HTTP/1.1 200")
        doc = json.loads(data.partition(b"\r\n\r\n")[2])
        assert ["x-forwarded-proto", "https"] in [[n.lower(), v] for n, v in doc["headers"]]
    finally:
        await server.shutdown(drain_timeout=1)


async def test_https_upstream_verified_with_ca(
    certs: dict[str, str], origin_tls: int, engine_name: str
) -> None:
    server = ProxyServer(cfg(f"https://localhost:{origin_tls}", engine_name, tls_ca=certs["ca"]))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/secure", extra="Connection: close\r\n"))
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert b"GET /secure HTTP/1.1" in data
    finally:
        await server.shutdown(drain_timeout=1)


async def test_https_upstream_with_unknown_ca_is_502(origin_tls: int, engine_name: str) -> None:
    server = ProxyServer(cfg(f"https://localhost:{origin_tls}", engine_name))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get("/secure", extra="Connection: close\r\n"))
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        assert data.startswith(b"HTTP/1.1 502"), data[:200]
        assert b"TLS" in data or b"certificate" in data
    finally:
        await server.shutdown(drain_timeout=1)
