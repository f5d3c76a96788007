"""The direct attach channel: where it listens, how it fails, and that a client falls back
to gRPC without it. The run contract itself is proved on it by the ``unix`` transport of
every ``client`` test; the fuzz tests throw raw and mutated requests at it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import direct_server, errors
from forgehand.runner.client import GrpcTransport, RunnerClient, UnixConnector
from forgehand.runner.client.direct import direct_attach
from forgehand.runner.config import RunnerConfig, direct_socket_path
from forgehand.runner.direct import HELLO, HELLO_FEATURE
from forgehand.runner.model import Exited, Output, RunSpec
from forgehand.runner.server import RunnerServer

FRAME = struct.Struct("<I")


def sh(script: str) -> RunSpec:
    return RunSpec(argv=("sh", "-c", script))


async def exchange(path: Path, data: bytes, shut: bool = False) -> list[pb.SessionResponse]:
    """Raw bytes in, every frame after the hello out until the daemon closes the
    connection."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    if shut:
        writer.write_eof()
    received = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    frames, pos = [], 0
    while pos < len(received):
        (size,) = FRAME.unpack_from(received, pos)
        frames.append(pb.SessionResponse.FromString(received[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    assert frames[0] == pb.SessionResponse(tag=1), "every connection starts with a hello"
    return frames[1:]


def framed(message: bytes) -> bytes:
    return FRAME.pack(len(message)) + message


async def wait_for(check: object, seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not check():  # type: ignore[operator]
        assert loop.time() < end, "the condition did not come true"
        await asyncio.sleep(0.01)


@pytest.fixture
def direct(server: RunnerServer) -> Path:
    assert server.unix_socket is not None
    path = direct_socket_path(server.unix_socket)
    assert path is not None
    return path


async def test_listens_beside_the_grpc_socket_owner_only(
    server: RunnerServer, direct: Path
) -> None:
    assert direct.name == "runner.sock.direct"
    mode = os.stat(direct).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_socket_is_removed_when_the_daemon_stops(
    config: RunnerConfig, short_tmp: Path
) -> None:
    socket_path = short_tmp / "other.sock"
    async with RunnerServer(config, unix_socket=socket_path):
        assert (short_tmp / "other.sock.direct").exists()
    assert not (short_tmp / "other.sock.direct").exists()


async def test_client_attaches_over_the_direct_channel(server: RunnerServer, direct: Path) -> None:
    assert server._direct is not None
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        run_id = await client.start(sh("echo one; sleep 0.3; printf 'two\\0'"))
        events = client.attach(run_id)
        first = await anext(events)
        # The attach is one connection of the direct listener while the run goes on.
        assert len(server._direct._connections) == 1
        rest = [event async for event in events]
    outputs = b"".join(e.data for e in [first, *rest] if isinstance(e, Output))
    assert outputs == b"one\ntwo\0"
    assert isinstance(rest[-1], Exited)


async def test_falls_back_to_grpc_without_the_direct_socket(
    server: RunnerServer, direct: Path
) -> None:
    assert server._direct is not None
    direct.unlink()
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        result = await client.run(sh("echo over grpc"))
    assert result.stdout == b"over grpc\n"
    assert not server._direct._connections


async def test_unknown_run_is_not_found(direct: Path) -> None:
    frames = await exchange(direct, framed(pb.AttachRequest(run_id="nope").SerializeToString()))
    assert [f.done for f in frames] == [True]
    assert frames[0].error_code == errors.NotFound.code.value[0]
    assert "nope" in frames[0].error_message


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x00\x00", "closed inside the attach request"),
        (FRAME.pack(5) + b"ab", "closed inside the attach request"),
        (framed(b"\x0a\xff\xff\xff\xff\x0f"), "not an AttachRequest"),
        (FRAME.pack(64 * 1024 * 1024), "the limit is"),
    ],
    ids=["short-header", "short-body", "undecodable", "oversized"],
)
async def test_bad_requests_are_invalid_argument(
    server: RunnerServer, direct: Path, data: bytes, says: str
) -> None:
    frames = await exchange(direct, data, shut=True)
    assert len(frames) == 1
    assert frames[0].error_code == errors.InvalidArgument.code.value[0]
    assert says in frames[0].error_message
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        assert (await client.run(sh("echo still serving"))).stdout == b"still serving\n"


async def test_a_silent_connection_is_dropped(
    direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct_server, "REQUEST_SECONDS", 0.2)
    frames = await exchange(direct, b"")
    assert frames[0].error_code == errors.InvalidArgument.code.value[0]
    assert "no whole attach request within 0.2s" in frames[0].error_message


async def test_a_hangup_ends_a_quiet_attach_and_the_run_goes_on(
    server: RunnerServer, direct: Path
) -> None:
    listener = server._direct
    assert listener is not None
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        run_id = await client.start(sh("echo started; sleep 30"))
        request = pb.AttachRequest(run_id=run_id).SerializeToString()
        reader, writer = await asyncio.open_unix_connection(str(direct))
        writer.write(framed(request))
        assert await reader.readexactly(len(HELLO)) == HELLO
        await reader.readexactly(4)  # the first frame after it: the run is being followed
        await wait_for(lambda: len(listener._connections) == 1)
        writer.close()
        await wait_for(lambda: not listener._connections)  # no output needed to notice
        status = await client.status(run_id)
        assert status.running
        await client.cancel(run_id, grace_seconds=0.1)


async def test_a_cut_connection_resumes_exactly_once(server: RunnerServer, direct: Path) -> None:
    listener = server._direct
    assert listener is not None
    script = "i=0; while [ $i -lt 40 ]; do echo line$i; i=$((i+1)); sleep 0.01; done"
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        run_id = await client.start(sh(script))
        seen: list[bytes] = []
        cuts = 0
        async for event in client.attach(run_id):
            if isinstance(event, Output):
                seen.append(event.data)
                if cuts < 3 and len(seen) in (5, 15, 25):
                    cuts += 1
                    for task in list(listener._connections):
                        task.cancel()  # the daemon side drops the connection mid-stream
        assert cuts == 3
        assert client.reconnects >= 3
    lines = b"".join(seen).split()
    assert lines == [f"line{i}".encode() for i in range(40)]


async def test_deadline_is_enforced(server: RunnerServer, direct: Path) -> None:
    transport = GrpcTransport(UnixConnector(direct.with_name("runner.sock")))
    async with RunnerClient(transport) as client:
        run_id = await client.start(sh("sleep 30"))
        request = pb.AttachRequest(run_id=run_id)
        with pytest.raises(errors.DeadlineExceeded):
            async for _ in transport.attach(request, 0.3):
                pass
        await client.cancel(run_id, grace_seconds=0.1)


async def test_too_long_a_path_has_no_direct_channel() -> None:
    long = Path("/" + "d" * 95) / "runner.sock"
    assert direct_socket_path(long) is None
    assert direct_socket_path(Path("/run/x/runner.sock")) == Path("/run/x/runner.sock.direct")


async def test_connect_direct_is_none_when_nothing_listens(short_tmp: Path) -> None:
    connector = UnixConnector(short_tmp / "absent.sock")
    assert await connector.connect_direct() is None
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(short_tmp / "absent.sock.direct"))  # bound, never listening
    try:
        assert await connector.connect_direct() is None
    finally:
        stale.close()


async def test_the_next_attach_uses_the_connection_made_after_the_last(
    server: RunnerServer, direct: Path
) -> None:
    listener = server._direct
    assert listener is not None
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        transport = client.transport
        assert isinstance(transport, GrpcTransport)
        assert (await client.run(sh("echo one"))).stdout == b"one\n"
        await wait_for(lambda: transport._spare is not None)  # connected in the background
        assert transport._spare is not None
        spare = transport._spare[0]
        await wait_for(lambda: len(listener._connections) == 1)  # accepted, waiting
        assert (await client.run(sh("echo two"))).stdout == b"two\n"
        assert spare.fileno() == -1  # used, then closed
        assert client.reconnects == 0
    assert transport._spare is None


async def test_a_spare_the_daemon_may_have_dropped_is_not_used(
    server: RunnerServer, direct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgehand.runner.client import grpc_transport

    monkeypatch.setattr(direct_server, "REQUEST_SECONDS", 0.2)
    monkeypatch.setattr(grpc_transport, "REQUEST_SECONDS", 0.2)
    listener = server._direct
    assert listener is not None
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        assert (await client.run(sh("echo one"))).stdout == b"one\n"
        await wait_for(lambda: not listener._connections)  # the daemon dropped the spare
        assert (await client.run(sh("echo two"))).stdout == b"two\n"
        assert client.reconnects == 0


async def test_the_hello_comes_first_and_is_offered(server: RunnerServer, direct: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(direct))
    try:  # before any request: a live listener answers at once
        assert await asyncio.wait_for(reader.readexactly(len(HELLO)), 30) == HELLO
    finally:
        writer.close()
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        assert HELLO_FEATURE in (await client.capabilities()).features


@contextlib.asynccontextmanager
async def dead_until_dialled(path: Path) -> AsyncIterator[None]:
    """Swap a listener that accepts and never answers (what gVisor's gofer keeps of a dead
    daemon's socket) in for the socket at ``path``; put the real one back once a
    connection waits on it."""
    live = path.with_name(path.name + ".live")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.rename(live)
    dead.bind(str(path))
    dead.listen(8)

    async def revive() -> None:
        await wait_for(lambda: select.select([dead], [], [], 0)[0], seconds=60)
        live.rename(path)  # the dead one stays open: its connection is never refused

    reviving = asyncio.create_task(revive())
    try:
        yield
    finally:
        await reviving
        dead.close()


async def test_a_direct_listener_nobody_serves_is_redialled(
    server: RunnerServer, direct: Path
) -> None:
    """No hello, and the socket dialled is no longer at its path: the client takes the
    connection for a cut and redials."""
    async with RunnerClient.unix(direct.with_name("runner.sock")) as client:
        await client.capabilities()  # learns that the daemon says hello
        async with dead_until_dialled(direct):
            result = await client.run(sh("echo served"))
        assert result.stdout == b"served\n"
        assert client.reconnects >= 1


@pytest.mark.parametrize("still_there", [True, False], ids=["slow-daemon", "gone"])
async def test_a_late_hello_is_waited_for_while_the_socket_stays(
    short_tmp: Path, still_there: bool
) -> None:
    """A daemon whose hello comes after a few checks is only slow: the attach goes on. One
    whose socket is gone from its path by then is dead: the attach counts as cut."""
    path = short_tmp / "slow.direct"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    await loop.sock_connect(client, str(path))
    conn, _ = await loop.sock_accept(listener)
    checks: list[bool] = []

    def still_listening() -> bool:
        checks.append(still_there)
        return still_there

    async def answer_after_three_checks() -> None:
        await wait_for(lambda: len(checks) >= 3)
        await loop.sock_sendall(
            conn, HELLO + framed(pb.SessionResponse(tag=1, done=True).SerializeToString())
        )

    answering = asyncio.create_task(answer_after_three_checks())
    request = pb.AttachRequest(run_id="r")
    try:
        if still_there:
            assert [r async for r in direct_attach(client, request, None, still_listening)] == []
            assert len(checks) >= 3
        else:
            with pytest.raises(errors.Unavailable, match="no longer at its path"):
                async for _ in direct_attach(client, request, None, still_listening):
                    pass
            assert checks == [False]
    finally:
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)
        conn.close()
        listener.close()


async def test_a_grpc_listener_nobody_serves_is_redialled(server: RunnerServer) -> None:
    """gRPC gives a local socket 2 s, not its default 20, to answer the connection."""
    assert server.unix_socket is not None
    async with RunnerClient.unix(server.unix_socket, rpc_timeout=15) as client:
        async with dead_until_dialled(server.unix_socket):
            capabilities = await client.capabilities()
        assert HELLO_FEATURE in capabilities.features
        assert client.reconnects >= 1
