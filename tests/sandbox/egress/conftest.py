"""Fixtures for the egress proxy tests: loopback servers, a proxy, and a raw client.

All traffic stays on loopback. Names such as `allowed.test` resolve through a
StaticResolver, never through real DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from forgehand.sandbox.egress import EgressConfig, EgressProxy, StaticResolver

RESOLVER_TABLE = {
    "allowed.test": ["127.0.0.1"],
    "api.wild.test": ["127.0.0.1"],
    "private.test": ["10.0.0.5"],
    "metadata.test": ["169.254.169.254"],
    "cgnat.test": ["100.64.1.1"],
    "mapped.test": ["::ffff:10.0.0.5"],
    "mixed.test": ["127.0.0.1", "10.0.0.5"],
}
ALLOW = ["allowed.test", "*.wild.test", *[n for n in RESOLVER_TABLE if n != "allowed.test"]]


@dataclass
class Servers:
    """Loopback servers a test started; closes every connection at teardown."""

    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fh-egress-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def _read_http_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        return await reader.readuntil(b"0\r\n\r\n")
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def _http_handler(servers: Servers) -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await _read_http_body(reader, head)
            servers.requests.append((head, body))
            payload = b"hello from upstream: " + head.split(b" ")[0]
            writer.write(
                b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=60\r\nConnection: keep-alive\r\n"
                b"X-Upstream: yes\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            await writer.drain()
            await reader.read()  # keep-alive: only the client decides to close

    return handle


async def _serve(servers: Servers, handler: Callable[..., Awaitable[None]]) -> asyncio.Server:
    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        servers.writers.add(writer)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    return await asyncio.start_server(tracked, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def _running(
    handler: Callable[[Servers], Callable[..., Awaitable[None]]],
) -> AsyncIterator[tuple[int, Servers]]:
    servers = Servers()
    server = await _serve(servers, handler(servers))
    try:
        yield server.sockets[0].getsockname()[1], servers
    finally:
        server.close()
        for writer in servers.writers:
            writer.close()
        await server.wait_closed()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """Port of a loopback TCP echo server."""
    async with _running(lambda _: _echo) as (port, _):
        yield port


@pytest.fixture
async def http_upstream() -> AsyncIterator[tuple[int, Servers]]:
    """Port of a loopback HTTP/1.1 server that keeps connections alive, and its requests."""
    async with _running(_http_handler) as running:
        yield running


@pytest.fixture
def make_proxy(short_dir: Path) -> Callable[..., EgressProxy]:
    """Build a proxy on a fresh socket with the test allowlist and the loopback option."""

    def build(**overrides: Any) -> EgressProxy:
        settings: dict[str, Any] = {
            "socket_path": short_dir / "proxy.sock",
            "decision_log_path": short_dir / "log" / "decisions.jsonl",
            "allow": ALLOW,
            "allow_loopback_for_tests": True,
            "idle_timeout_seconds": 5,
            "header_timeout_seconds": 5,
            "shutdown_grace_seconds": 1,
        }
        return EgressProxy(
            EgressConfig(**(settings | overrides)), resolver=StaticResolver(RESOLVER_TABLE)
        )

    return build


@pytest.fixture
async def proxy(make_proxy: Callable[..., EgressProxy]) -> AsyncIterator[EgressProxy]:
    """A running proxy with the default test settings."""
    async with make_proxy() as running:
        yield running


@dataclass
class Client:
    """A raw client connection to the proxy's unix socket."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def status(self) -> int:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        return int(head.split(b" ")[1])

    async def response(self) -> tuple[int, bytes]:
        """Status and everything up to the close (the proxy always closes)."""
        data = await asyncio.wait_for(self.reader.read(), 5)
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[EgressProxy], Awaitable[Client]]]:
    """Open raw clients to a proxy; all are closed at teardown."""
    clients: list[Client] = []

    async def open_client(proxy: EgressProxy) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(proxy.socket_path))
        clients.append(Client(reader, writer))
        return clients[-1]

    yield open_client
    for client in clients:
        await client.close()
