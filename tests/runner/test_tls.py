"""The TCP listener: TLS with a bearer token, on loopback only.

Certificates come from the ``openssl`` command line tool: a throwaway CA and a server
certificate for localhost / 127.0.0.1, made per test.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import make_pki

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client import GrpcTransport, RetryPolicy, RunnerClient
from forgehand.runner.client.connectors import Dial
from forgehand.runner.config import RunnerConfig
from forgehand.runner.model import RunSpec
from forgehand.runner.server import RunnerServer

TOKEN = "a-test-token-of-more-than-16-chars"
WRONG_TOKEN = "not-the-token-but-just-as-long-xx"
NO_RETRY = RetryPolicy(attempts=0)
CALL_SECONDS = 10.0


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    cert: Path
    key: Path


@pytest.fixture
def pki(short_tmp: Path) -> Pki:
    directory = short_tmp / "pki"
    directory.mkdir()
    return Pki(*make_pki(directory))


@pytest.fixture
async def tls_server(
    config: RunnerConfig, short_tmp: Path, pki: Pki
) -> AsyncIterator[RunnerServer]:
    server = RunnerServer(
        config,
        unix_socket=short_tmp / "runner.sock",
        tcp="127.0.0.1:0",
        tls_cert=pki.cert,
        tls_key=pki.key,
        token=TOKEN,
    )
    async with server:
        yield server


def address(server: RunnerServer) -> str:
    assert server.tcp_port > 0
    return f"127.0.0.1:{server.tcp_port}"


def tls_client(server: RunnerServer, pki: Pki, token: str) -> RunnerClient:
    ca = pki.ca_cert.read_bytes()
    return RunnerClient.tls(address(server), token, ca, retry=NO_RETRY, rpc_timeout=CALL_SECONDS)


class RawConnector:
    """Dials the address with exactly the given channel credentials (None = plaintext)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.target, self.credentials = target, credentials

    async def dial(self) -> Dial:
        return Dial(self.target, self.credentials)

    async def close(self) -> None:
        return None


async def test_run_over_tls(tls_server: RunnerServer, pki: Pki, work: Path) -> None:
    async with tls_client(tls_server, pki, TOKEN) as client:
        assert (await client.capabilities()).protocol == "forgehand.runner.v1"
        result = await client.run(RunSpec(argv=("sh", "-c", "echo over tls")))
        assert result.ok
        assert result.stdout == b"over tls\n"
        await client.write_file("t.txt", b"tls bytes")
        assert await client.read_file("t.txt") == b"tls bytes"
        assert (work / "t.txt").read_bytes() == b"tls bytes"


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(port: int) -> set[str]:
    """Local addresses (kernel hex) of TCP sockets listening on port, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


async def test_server_listens_on_loopback_only(tls_server: RunnerServer) -> None:
    addresses = listening_addresses(tls_server.tcp_port)
    assert addresses
    assert addresses <= LOOPBACK, addresses


async def chunks() -> AsyncIterator[bytes]:
    yield b"never written"


async def expect_unauthenticated(client: RunnerClient, work: Path) -> None:
    with pytest.raises(errors.Unauthenticated, match="bearer token"):
        await client.capabilities()
    with pytest.raises(errors.Unauthenticated):
        await client.start(RunSpec(argv=("true",)), run_id="unauthenticated")
    with pytest.raises(errors.Unauthenticated):
        await client.list_runs()
    with pytest.raises(errors.Unauthenticated):
        await client.stat("t.txt")
    with pytest.raises(errors.Unauthenticated):
        async for _event in client.attach("some-run"):
            pass
    with pytest.raises(errors.Unauthenticated):
        await client.read_file("t.txt")
    with pytest.raises(errors.Unauthenticated):
        await client.write_file("w.txt", b"never written")
    with pytest.raises(errors.Unauthenticated):
        await client.write_file("w.txt", chunks())
    assert not (work / "w.txt").exists()
    assert not any(work.rglob("*.part"))


async def test_wrong_token_is_unauthenticated(
    tls_server: RunnerServer, pki: Pki, work: Path
) -> None:
    (work / "t.txt").write_bytes(b"secret")
    async with tls_client(tls_server, pki, WRONG_TOKEN) as client:
        await expect_unauthenticated(client, work)
    async with tls_client(tls_server, pki, TOKEN) as client:
        assert await client.list_runs() == []


async def test_missing_token_is_unauthenticated(
    tls_server: RunnerServer, pki: Pki, work: Path
) -> None:
    (work / "t.txt").write_bytes(b"secret")
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    transport = GrpcTransport(RawConnector(address(tls_server), credentials))
    async with RunnerClient(transport, retry=NO_RETRY, rpc_timeout=CALL_SECONDS) as client:
        await expect_unauthenticated(client, work)


async def test_token_with_a_prefix_of_the_real_one_is_unauthenticated(
    tls_server: RunnerServer, pki: Pki
) -> None:
    async with tls_client(tls_server, pki, TOKEN[:-1]) as client:
        with pytest.raises(errors.Unauthenticated):
            await client.capabilities()


async def test_plaintext_client_against_tls_port_is_unavailable(tls_server: RunnerServer) -> None:
    transport = GrpcTransport(RawConnector(address(tls_server), None))
    try:
        with pytest.raises(errors.Unavailable):
            await transport.capabilities(CALL_SECONDS)
    finally:
        await transport.close()


async def test_untrusted_server_certificate_is_unavailable(
    tls_server: RunnerServer, pki: Pki
) -> None:
    system_roots = grpc.ssl_channel_credentials()
    transport = GrpcTransport(RawConnector(address(tls_server), system_roots))
    try:
        with pytest.raises(errors.Unavailable):
            await transport.capabilities(CALL_SECONDS)
    finally:
        await transport.close()


async def test_unix_socket_is_private_and_needs_no_token(tls_server: RunnerServer) -> None:
    assert tls_server.unix_socket is not None
    mode = tls_server.unix_socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    current = os.umask(0)
    os.umask(current)
    assert current != 0o177, "binding the socket left the process umask changed"
    async with RunnerClient.unix(tls_server.unix_socket) as client:
        assert (await client.capabilities()).protocol == "forgehand.runner.v1"


@pytest.mark.parametrize(
    ("cert", "key", "token"),
    [(False, False, False), (True, True, False), (False, False, True), (True, False, True)],
)
async def test_tcp_without_tls_and_token_is_refused(
    config: RunnerConfig, pki: Pki, cert: bool, key: bool, token: bool
) -> None:
    with pytest.raises(errors.InvalidArgument, match="TLS and a bearer token"):
        RunnerServer(
            config,
            tcp="127.0.0.1:0",
            tls_cert=pki.cert if cert else None,
            tls_key=pki.key if key else None,
            token=TOKEN if token else None,
        )


@pytest.mark.parametrize("token", ["short", "has space in a long token", "nön-ascii-long-token"])
async def test_weak_or_unsendable_token_is_refused(
    config: RunnerConfig, pki: Pki, token: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match="token"):
        RunnerServer(config, tcp="127.0.0.1:0", tls_cert=pki.cert, tls_key=pki.key, token=token)


async def test_unknown_method_is_unimplemented_without_leaking(
    tls_server: RunnerServer, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(address(tls_server), credentials) as channel:
        method = channel.unary_unary("/forgehand.runner.v1.Runner/NoSuchMethod", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(method(b"", timeout=CALL_SECONDS), CALL_SECONDS)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_wrong_token_never_reaches_a_handler(tls_server: RunnerServer, pki: Pki) -> None:
    async with tls_client(tls_server, pki, WRONG_TOKEN) as client:
        request = pb.StartRequest(run_id="sneaky", argv=pb.Argv(args=["true"]))
        with pytest.raises(errors.Unauthenticated):
            await client.transport.start(request, CALL_SECONDS)
    async with tls_client(tls_server, pki, TOKEN) as client:
        with pytest.raises(errors.NotFound):
            await client.status("sneaky")
