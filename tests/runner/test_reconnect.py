"""Reconnects: cut the connection under a streaming attach; every byte arrives exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import proxy_argv

from forgehand.runner.client import RunnerClient
from forgehand.runner.config import RunnerConfig
from forgehand.runner.model import Exited, Output, RunSpec
from forgehand.runner.pump import pump
from forgehand.runner.server import RunnerServer

# Writes `size` bytes of a pattern whose every 16-byte block is unique, so a duplicated or
# dropped block cannot go unnoticed.
PATTERN = (
    "import sys\n"
    "out = sys.stdout.buffer\n"
    "for i in range({blocks}):\n"
    "    out.write(b'%015d\\n' % i)\n"
)
# The same output in 16 KiB writes a moment apart, so that it reaches the journal as many
# records even when the keeper lags (a fast writer's output is read in large chunks, and
# few events leave few chances to cut a connection between them).
PACED = (
    "import sys, time\n"
    "out = sys.stdout.buffer\n"
    "for i in range({blocks}):\n"
    "    out.write(b'%015d\\n' % i)\n"
    "    if i % 1024 == 1023:\n"
    "        out.flush(); time.sleep(0.002)\n"
)


def expected(blocks: int) -> bytes:
    return b"".join(b"%015d\n" % i for i in range(blocks))


class Relay:
    """A unix-socket relay in front of the runner whose connections can be cut at will."""

    def __init__(self, target: Path, path: Path) -> None:
        self.target, self.path = target, path
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.cut()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        self.writers += [writer, up_writer]
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    def cut(self) -> int:
        cut, self.writers = self.writers, []
        for writer in cut:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        return len(cut) // 2


@pytest.fixture
async def relayed(config: RunnerConfig, short_tmp: Path) -> AsyncIterator[tuple[Relay, Path]]:
    socket = short_tmp / "runner.sock"
    async with (
        RunnerServer(config, unix_socket=socket),
        Relay(socket, short_tmp / "relay.sock") as relay,
    ):
        yield relay, socket


async def test_forced_disconnects_lose_and_duplicate_nothing(
    relayed: tuple[Relay, Path],
) -> None:
    relay, _socket = relayed
    blocks = 4 * 1024 * 1024 // 16  # 4 MiB
    spec = RunSpec(argv=("/usr/bin/python3", "-c", PACED.format(blocks=blocks)))
    cuts, data, seqs = 0, bytearray(), []
    async with RunnerClient.unix(relay.path) as client:
        run_id = await client.start(spec)
        async for event in client.attach(run_id):
            seqs.append(event.seq)
            if isinstance(event, Output):
                data += event.data
                # Between the events of one batch no connection is open: a cut counts only
                # once the client has reconnected, whatever the batch sizes.
                if cuts < 20:
                    cuts += relay.cut()
            if isinstance(event, Exited):
                assert event.ok
        assert cuts >= 10
        assert client.reconnects >= cuts // 2
    assert hashlib.sha256(data).digest() == hashlib.sha256(expected(blocks)).digest()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_output_produced_while_disconnected_is_delivered(
    relayed: tuple[Relay, Path],
) -> None:
    relay, _socket = relayed
    script = "for i in $(seq 50); do echo $i; sleep 0.01; done"
    async with RunnerClient.unix(relay.path) as client:
        run_id = await client.start(RunSpec(argv=("sh", "-c", script)))
        relay.cut()
        await asyncio.sleep(0.3)
        result = await client.collect(run_id)
    assert result.stdout.decode().split() == [str(i) for i in range(1, 51)]


async def test_exec_channel_dies_and_the_client_reconnects(
    config: RunnerConfig, short_tmp: Path
) -> None:
    socket = short_tmp / "runner.sock"
    server = RunnerServer(config, unix_socket=socket)
    async with server, RunnerClient.exec(proxy_argv(socket)) as client:
        script = "for i in $(seq 40); do echo $i; sleep 0.02; done"
        run_id = await client.start(RunSpec(argv=("sh", "-c", script)))
        lines: list[bytes] = []
        async for event in client.attach(run_id):
            if isinstance(event, Output):
                lines.append(event.data)
                if len(lines) == 5:
                    _kill_proxies(socket)
        assert b"".join(lines).decode().split() == [str(i) for i in range(1, 41)]
        assert client.reconnects >= 1


def _kill_proxies(socket: Path) -> None:
    """Kill every `forgehand-runner proxy` process bridging to this socket."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if b"proxy" in cmdline and str(socket).encode() in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)
