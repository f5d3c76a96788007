"""The in-sandbox forwarder, run with the system Python and no third-party packages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import forgehand.sandbox.egress.forwarder as forwarder_module
from forgehand.sandbox.egress import EgressProxy

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")
SRC = Path(forwarder_module.__file__).parents[3]
pytestmark = pytest.mark.skipif(
    SYSTEM_PYTHON is None, reason="needs /usr/bin/python3: install the python3 package"
)


@contextlib.asynccontextmanager
async def _forwarder(socket_path: Path, *, as_module: bool) -> AsyncIterator[int]:
    how = ["-m", "forgehand.sandbox.egress.forwarder"] if as_module else [forwarder_module.__file__]
    env = (
        {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(SRC)}
        if as_module
        else {"PATH": "/usr/bin:/bin"}
    )
    process = await asyncio.create_subprocess_exec(
        str(SYSTEM_PYTHON),
        "-I" if not as_module else "-s",
        *how,
        "--socket",
        str(socket_path),
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        cwd="/",
        env=env,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield int(line.split()[2].rstrip(",").rsplit(":", 1)[1])
    finally:
        if process.returncode is None:
            process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0


async def _connect_through(
    port: int, echo_port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT allowed.test:{echo_port} HTTP/1.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


@pytest.mark.parametrize("as_module", [False, True], ids=["plain-file", "module"])
async def test_forwarder_bridges_tcp_to_the_proxy_socket(
    proxy: EgressProxy, echo_port: int, as_module: bool
) -> None:
    async with _forwarder(proxy.socket_path, as_module=as_module) as port:
        reader, writer = await _connect_through(port, echo_port)
        writer.write(b"through the forwarder")
        assert await asyncio.wait_for(reader.readexactly(21), 5) == b"through the forwarder"
        writer.close()
        await writer.wait_closed()
    assert proxy.decisions[-1].decision == "allowed"


async def test_forwarder_passes_denials_through(proxy: EgressProxy) -> None:
    async with _forwarder(proxy.socket_path, as_module=False) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"evil.example" in data


async def test_forwarder_closes_clients_when_the_proxy_is_gone(short_dir: Path) -> None:
    async with _forwarder(short_dir / "absent.sock", as_module=False) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()


def test_forwarder_imports_only_the_standard_library() -> None:
    source = Path(forwarder_module.__file__).read_text()
    imports = {
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= {"__future__", "argparse", "asyncio", "contextlib", "signal", "sys"}
    assert os.access(forwarder_module.__file__, os.R_OK)
