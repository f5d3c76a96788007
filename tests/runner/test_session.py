"""Session: many start-and-follow attaches multiplexed on one long-lived gRPC stream.

``RunnerClient.run`` and ``collect`` go over it when the runner lists the "session"
feature; these tests hold it to the contract of Attach: every event once, errors as status
codes (per attach, in band), the run unharmed when the stream or the caller goes away.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from test_reconnect import PATTERN, Relay, expected

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import core, errors
from forgehand.runner.client import GrpcTransport, RunnerClient, UnixConnector
from forgehand.runner.config import RunnerConfig
from forgehand.runner.model import Output, RunSpec
from forgehand.runner.server import RunnerServer


def grpc_client(socket: Path) -> RunnerClient:
    """A client that follows runs over gRPC sessions (not the direct channel)."""
    return RunnerClient(GrpcTransport(UnixConnector(socket), use_direct=False))


def start_request(run_id: str, *argv: str) -> pb.StartRequest:
    return pb.StartRequest(run_id=run_id, argv=pb.Argv(args=list(argv)))


async def follow(transport: GrpcTransport, request: pb.AttachRequest) -> list[pb.Event]:
    return [
        event async for response in transport.follow(request, 30.0) for event in response.events
    ]


async def test_runs_share_one_session(server: RunnerServer) -> None:
    assert server.unix_socket is not None
    async with grpc_client(server.unix_socket) as client:
        assert "session" in (await client.capabilities()).features
        specs = [
            RunSpec(argv=("sh", "-c", f"echo {i}; echo err{i} >&2; exit {i % 3}"))
            for i in range(12)
        ]
        results = await asyncio.gather(*(client.run(spec) for spec in specs))
        transport = client.transport
        assert isinstance(transport, GrpcTransport)
        session = transport._session
        await client.run(RunSpec(argv=("true",)))
        assert transport._session is session is not None
    for i, result in enumerate(results):
        assert (result.stdout, result.stderr) == (f"{i}\n".encode(), f"err{i}\n".encode())
        assert result.exit.code == i % 3


async def test_errors_end_one_attach_and_the_session_goes_on(server: RunnerServer) -> None:
    assert server.unix_socket is not None
    transport = GrpcTransport(UnixConnector(server.unix_socket))
    try:
        with pytest.raises(errors.NotFound):
            await follow(transport, pb.AttachRequest(run_id="no-such-run"))
        first = start_request("same-id", "true")
        await follow(transport, pb.AttachRequest(run_id="same-id", start=first))
        other = start_request("same-id", "false")
        with pytest.raises(errors.AlreadyExists):
            await follow(transport, pb.AttachRequest(run_id="same-id", start=other))
        with pytest.raises(errors.InvalidArgument):
            await follow(
                transport, pb.AttachRequest(run_id="bad id", start=start_request("bad id", "true"))
            )
        events = await follow(transport, pb.AttachRequest(run_id="same-id"))
        assert [e.WhichOneof("kind") for e in events] == ["started", "exited"]
    finally:
        await transport.close()


async def test_a_caller_that_stops_early_leaves_the_run_running(server: RunnerServer) -> None:
    assert server.unix_socket is not None
    async with grpc_client(server.unix_socket) as client:
        transport = client.transport
        assert isinstance(transport, GrpcTransport)
        request = pb.AttachRequest(run_id="sleeper", start=start_request("sleeper", "sleep", "30"))
        responses = transport.follow(request, None)
        async for response in responses:
            assert response.events[0].HasField("started")
            break
        await responses.aclose()
        assert (await client.status("sleeper")).running
        assert (await client.run(RunSpec(argv=("echo", "still here")))).stdout == b"still here\n"
        assert await client.cancel("sleeper", grace_seconds=0.1)
        result = await client.collect("sleeper")
        assert result.exit.reason.value == "cancelled"


async def test_malformed_session_request_is_invalid_argument(server: RunnerServer) -> None:
    assert server.unix_socket is not None
    async with grpc.aio.insecure_channel(f"unix:{server.unix_socket}") as channel:
        call = channel.stream_stream(
            "/forgehand.runner.v1.Runner/Session", lambda b: b, lambda b: b
        )(None)
        await call.write(pb.SessionRequest(tag=1).SerializeToString())  # neither attach nor cancel
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_run_survives_cut_sessions(config: RunnerConfig, short_tmp: Path) -> None:
    socket = short_tmp / "runner.sock"
    blocks = 4 * 1024 * 1024 // 16
    spec = RunSpec(argv=("/usr/bin/python3", "-c", PATTERN.format(blocks=blocks)))
    async with (
        RunnerServer(config, unix_socket=socket),
        Relay(socket, short_tmp / "relay.sock") as relay,
        grpc_client(relay.path) as client,
    ):
        run = asyncio.create_task(client.run(spec))
        cuts = 0
        while not run.done() and cuts < 5:
            await asyncio.sleep(0.01)
            cuts += relay.cut()
        result = await run
    assert cuts >= 1
    assert client.reconnects >= 1
    assert result.stdout == expected(blocks)
    assert result.ok


async def test_without_the_session_feature_run_uses_attach(
    config: RunnerConfig, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "FEATURES", tuple(f for f in core.FEATURES if f != "session"))
    socket = short_tmp / "runner.sock"
    async with RunnerServer(config, unix_socket=socket), grpc_client(socket) as client:
        result = await client.run(RunSpec(argv=("echo", "old runner")))
        transport = client.transport
        assert isinstance(transport, GrpcTransport)
        assert transport._session is None
    assert result.stdout == b"old runner\n"


async def test_session_events_match_attach(server: RunnerServer) -> None:
    """The same run, followed on a session and attached with Attach, gives the same events."""
    assert server.unix_socket is not None
    transport = GrpcTransport(UnixConnector(server.unix_socket))
    try:
        script = "for i in $(seq 200); do echo line $i; done; printf 'no newline\\0'"
        request = pb.AttachRequest(run_id="twice", start=start_request("twice", "sh", "-c", script))
        on_session = await follow(transport, request)
        attached = [
            e
            async for r in transport.attach(pb.AttachRequest(run_id="twice"), 30.0)
            for e in r.events
        ]
        assert on_session == attached
        output = b"".join(e.output.data for e in on_session if e.HasField("output"))
        assert output.endswith(b"line 200\nno newline\0")
    finally:
        await transport.close()


async def test_output_of_every_size_arrives_whole(server: RunnerServer, work: Path) -> None:
    assert server.unix_socket is not None
    payload = bytes(range(256)) * (3 * 1024 * 1024 // 256 + 7)
    (work / "blob").write_bytes(payload)
    async with grpc_client(server.unix_socket) as client:
        result = await client.run(RunSpec(argv=("cat", str(work / "blob"))))
        chunks = [e async for e in client.attach(result.run_id) if isinstance(e, Output)]
    assert result.stdout == payload
    assert b"".join(c.data for c in chunks) == payload
