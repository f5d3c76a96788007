"""Fixtures for runner tests: real daemons on real sockets, and one client per transport.

``client`` is parametrized over every way to reach a runner — a unix socket (attaches over
the direct channel, everything else gRPC), gRPC alone on a unix socket, gRPC through the
stdio proxy (the exec-channel path), and the in-process transport — so each test that
uses it proves the same contract on all of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from forgehand.runner.client import LocalTransport, RunnerClient, UnixConnector
from forgehand.runner.client.grpc_transport import GrpcTransport
from forgehand.runner.config import RunnerConfig
from forgehand.runner.core import RunnerCore
from forgehand.runner.keeper_client import stop_keeper
from forgehand.runner.server import RunnerServer

TRANSPORTS = ("unix", "unix-grpc", "proxy", "local")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fh-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    _kill_keepers(path)
    shutil.rmtree(path, ignore_errors=True)


def _kill_keepers(base: Path) -> None:
    """Stop keepers whose state dir is under base (they would idle out after a minute)."""
    for lock in base.rglob("keeper.lock"):
        stop_keeper(lock.parent)


def make_config(base: Path, **overrides: object) -> RunnerConfig:
    work = base / "work"
    work.mkdir(exist_ok=True)
    return RunnerConfig(state_dir=base / "state", roots=(work,), **overrides)  # type: ignore[arg-type]


@pytest.fixture
def config(short_tmp: Path) -> RunnerConfig:
    return make_config(short_tmp)


@pytest.fixture
async def server(config: RunnerConfig, short_tmp: Path) -> AsyncIterator[RunnerServer]:
    async with RunnerServer(config, unix_socket=short_tmp / "runner.sock") as running:
        yield running


def proxy_argv(socket: Path) -> list[str]:
    return [sys.executable, "-m", "forgehand.runner.cli", "proxy", "--socket", str(socket)]


@pytest.fixture(params=TRANSPORTS)
async def client(
    request: pytest.FixtureRequest, config: RunnerConfig, short_tmp: Path
) -> AsyncIterator[RunnerClient]:
    kind = request.param
    if kind == "local":
        async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as local:
            yield local
        return
    socket = short_tmp / "runner.sock"
    async with RunnerServer(config, unix_socket=socket):
        if kind == "proxy":
            remote = RunnerClient.exec(proxy_argv(socket))
        else:
            remote = RunnerClient(GrpcTransport(UnixConnector(socket), use_direct=kind == "unix"))
        async with remote:
            yield remote


@pytest.fixture
def work(config: RunnerConfig) -> Path:
    return config.roots[0]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line tool: install the `openssl` package")
    d = directory
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem", "-days", "1",
             "-subj", "/CN=forgehand test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _openssl("req", *ec, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr",
             "-subj", "/CN=localhost")  # fmt: skip
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
    )
    _openssl("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem",
             "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/server.pem",
             "-days", "1", "-extfile", f"{d}/ext.cnf")  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"
