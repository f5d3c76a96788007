"""Deadlines: every RPC fails with DEADLINE_EXCEEDED once its deadline has passed.

Every RPC is called with a deadline that is already over (a negative timeout: gRPC enforces
a deadline with a timer, and a tiny positive one, even 1 ms, loses the race against a fast
answer over a local socket), over gRPC and in-process. The RPCs that can block (Attach
tailing a live run, WriteStdin into a full pipe, WriteFile waiting for data) are also called
with a short deadline that runs out while the runner waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client import GrpcTransport, LocalTransport, RunnerClient, UnixConnector
from forgehand.runner.client.transport import RunnerTransport
from forgehand.runner.config import RunnerConfig
from forgehand.runner.core import RunnerCore
from forgehand.runner.model import Exited, RunSpec
from forgehand.runner.server import RunnerServer

EXPIRED = -1.0
SHORT = 0.3
SETTLE_SECONDS = 10.0
MISSING_RUN = "no-such-run"
STDIN_FLOOD = 4 * 1024 * 1024  # well past a pipe's buffer

Call = Callable[[RunnerTransport, float], Awaitable[object]]


async def drain(stream: AsyncIterator[object]) -> list[object]:
    return [item async for item in stream]


async def header_only(path: str) -> AsyncIterator[pb.WriteFileRequest]:
    yield pb.WriteFileRequest(header=pb.WriteFileHeader(path=path))


def _calls(run_id: str) -> dict[str, Call]:
    """One call per RPC of the Runner service."""
    start = pb.StartRequest(run_id="deadline-start", argv=pb.Argv(args=["true"]))
    size = pb.PtySize(rows=10, cols=10)
    return {
        "Capabilities": lambda t, d: t.capabilities(d),
        "Start": lambda t, d: t.start(start, d),
        "Attach": lambda t, d: drain(t.attach(pb.AttachRequest(run_id=run_id), d)),
        "Session": lambda t, d: drain(t.follow(pb.AttachRequest(run_id=run_id), d)),
        "WriteStdin": lambda t, d: t.write_stdin(pb.WriteStdinRequest(run_id=run_id, data=b"x"), d),
        "ResizePty": lambda t, d: t.resize_pty(pb.ResizePtyRequest(run_id=run_id, size=size), d),
        "Cancel": lambda t, d: t.cancel(pb.CancelRequest(run_id=run_id), d),
        "Status": lambda t, d: t.status(pb.StatusRequest(run_id=run_id), d),
        "List": lambda t, d: t.list(d),
        "Close": lambda t, d: t.close_run(pb.CloseRequest(run_id=run_id), d),
        "ReadFile": lambda t, d: drain(t.read_file(pb.ReadFileRequest(path="f.txt"), d)),
        "WriteFile": lambda t, d: t.write_file(header_only("w.txt"), d),
        "Stat": lambda t, d: t.stat(pb.StatRequest(path="f.txt"), d),
        "ListDir": lambda t, d: t.list_dir(pb.ListDirRequest(path="."), d),
    }


RPCS = sorted(_calls(MISSING_RUN))


def test_every_rpc_of_the_service_is_covered() -> None:
    service = pb.DESCRIPTOR.services_by_name["Runner"]
    assert sorted(m.name for m in service.methods) == RPCS


@pytest.fixture
async def transport(server: RunnerServer) -> AsyncIterator[GrpcTransport]:
    assert server.unix_socket is not None
    grpc_transport = GrpcTransport(UnixConnector(server.unix_socket))
    yield grpc_transport
    await grpc_transport.close()


@pytest.mark.parametrize("rpc", RPCS)
async def test_expired_deadline_over_grpc(transport: GrpcTransport, work: Path, rpc: str) -> None:
    (work / "f.txt").write_bytes(b"content")
    with pytest.raises(errors.DeadlineExceeded):
        await _calls(MISSING_RUN)[rpc](transport, EXPIRED)
    assert (await transport.capabilities(10.0)).protocol == "forgehand.runner.v1"


@pytest.mark.parametrize("rpc", RPCS)
async def test_expired_deadline_in_process(
    config: RunnerConfig, work: Path, rpc: str, request: pytest.FixtureRequest
) -> None:
    (work / "f.txt").write_bytes(b"content")
    async with RunnerCore(config) as core:
        transport = LocalTransport(core)
        with pytest.raises(errors.DeadlineExceeded):
            await _calls(MISSING_RUN)[rpc](transport, EXPIRED)
        assert core.list() == []
        assert not (work / "w.txt").exists()


# -- deadlines that run out while the runner waits -------------------------------------------


async def start_sleeper(client: RunnerClient) -> str:
    return await client.start(RunSpec(argv=("sleep", "30"), stdin=True))


async def stop(client: RunnerClient, run_id: str) -> None:
    await client.cancel(run_id, grace_seconds=0.1)
    events = [e async for e in client.attach(run_id)]
    assert isinstance(events[-1], Exited)


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.part"))


async def settled(check: Callable[[], bool]) -> bool:
    """Whether check() becomes true within SETTLE_SECONDS (server-side cleanup after the
    client's call has already ended gives no event to await)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + SETTLE_SECONDS
    while not check():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.01)
    return True


async def stalled_write(path: str, release: asyncio.Event) -> AsyncIterator[pb.WriteFileRequest]:
    yield pb.WriteFileRequest(header=pb.WriteFileHeader(path=path))
    yield pb.WriteFileRequest(data=b"some data, then nothing")
    await release.wait()


async def expect_waits_then_expires(transport: RunnerTransport, run_id: str, work: Path) -> None:
    """Attach, WriteStdin and WriteFile each block on the runner until SHORT runs out."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(errors.DeadlineExceeded):
        await drain(transport.attach(pb.AttachRequest(run_id=run_id), SHORT))
    assert loop.time() - began >= SHORT * 0.9
    began = loop.time()
    with pytest.raises(errors.DeadlineExceeded):
        await drain(transport.follow(pb.AttachRequest(run_id=run_id), SHORT))
    assert loop.time() - began >= SHORT * 0.9
    flood = pb.WriteStdinRequest(run_id=run_id, data=b"y" * STDIN_FLOOD)
    with pytest.raises(errors.DeadlineExceeded):
        await transport.write_stdin(flood, SHORT)
    release = asyncio.Event()
    with pytest.raises(errors.DeadlineExceeded):
        await transport.write_file(stalled_write("w.txt", release), SHORT)
    release.set()
    assert await settled(lambda: not temp_files(work)), temp_files(work)


async def test_waiting_calls_expire_over_grpc(server: RunnerServer, work: Path) -> None:
    assert server.unix_socket is not None
    async with RunnerClient.unix(server.unix_socket) as client:
        run_id = await start_sleeper(client)
        try:
            await expect_waits_then_expires(client.transport, run_id, work)
            assert (await client.status(run_id)).running
        finally:
            await stop(client, run_id)


async def test_waiting_calls_expire_in_process(config: RunnerConfig, work: Path) -> None:
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        run_id = await start_sleeper(client)
        try:
            await expect_waits_then_expires(client.transport, run_id, work)
            assert not (work / "w.txt").exists()
            assert (await client.status(run_id)).running
        finally:
            await stop(client, run_id)


async def test_deadline_does_not_end_the_run(server: RunnerServer) -> None:
    assert server.unix_socket is not None
    async with RunnerClient.unix(server.unix_socket) as client:
        run_id = await client.start(
            RunSpec(argv=("sh", "-c", "read line; echo got $line"), stdin=True)
        )
        with pytest.raises(errors.DeadlineExceeded):
            await drain(client.transport.attach(pb.AttachRequest(run_id=run_id), SHORT))
        with pytest.raises(errors.DeadlineExceeded):
            await drain(client.transport.follow(pb.AttachRequest(run_id=run_id), SHORT))
        await client.write_stdin(run_id, b"late\n")
        result = await client.collect(run_id)
        assert result.stdout == b"got late\n"
        assert result.ok
