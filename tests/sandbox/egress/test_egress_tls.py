"""A real TLS handshake through CONNECT, to a loopback TLS echo server with a test CA."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forgehand.sandbox.egress import EgressProxy

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command: install the openssl package"
)


async def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    process = await asyncio.create_subprocess_exec(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=allowed.test",
        "-addext",
        "subjectAltName=DNS:allowed.test",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await process.wait() == 0
    return cert, key


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def tls_echo(short_dir: Path) -> AsyncIterator[tuple[int, Path]]:
    """Port of a loopback TLS echo server for `allowed.test`, and its certificate."""
    cert, key = await _self_signed(short_dir)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=context)
    yield server.sockets[0].getsockname()[1], cert
    server.close()
    await server.wait_closed()


async def test_tls_handshake_through_connect(
    proxy: EgressProxy, tls_echo: tuple[int, Path]
) -> None:
    port, cert = tls_echo
    reader, writer = await asyncio.open_unix_connection(str(proxy.socket_path))
    try:
        writer.write(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        client_context = ssl.create_default_context(cafile=cert)
        await writer.start_tls(client_context, server_hostname="allowed.test")
        writer.write(b"secret over tls")
        assert await asyncio.wait_for(reader.readexactly(15), 5) == b"secret over tls"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
