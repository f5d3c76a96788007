"""What a supervised runner shares between its keeper and its daemon, and what it keeps out.

Every page the keeper or the daemon writes after the fork exists twice, so the keeper
imports everything the daemon runs before it forks: a module the daemon imports later is
the daemon's alone, and so is every page the import machinery writes on the way. And
``serve`` loads no OpenSSL (Python's ``ssl`` and ``_hashlib``): the runner's TLS is
gRPC's own, and its token check works the same without it.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_pki

from forgehand.runner import errors
from forgehand.runner.client import RetryPolicy, RunnerClient
from forgehand.runner.keeper import KEEPER_COMM
from forgehand.runner.model import RunSpec

# `forgehand-runner serve ARGS…` in a process that appends "PID MODULE" to LOG for each
# module first imported by a process it forked (the daemon).
RECORDER = """
import os, sys
log = sys.argv[1]
forked = []
os.register_at_fork(after_in_child=lambda: forked.append(os.getpid()))
def audit(event, args):
    if event == "import" and forked and forked[0] == os.getpid():
        with open(log, "a") as out:
            out.write(f"{os.getpid()} {args[0]}\\n")
sys.addaudithook(audit)
from forgehand.runner.cli import main
sys.exit(main(sys.argv[2:]))
"""
OPENSSL_FILES = ("libssl.so", "libcrypto.so", "/_ssl.", "/_hashlib.")
TOKEN = "a-test-token-of-more-than-16-chars"
WRONG_TOKEN = "not-the-token-but-just-as-long-xx"


class SupervisedRunner:
    """`serve --supervise` as the bwrap backend starts it (``-I -B``), through RECORDER."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "runner.sock"
        self.imports = base / "imports.log"
        self.log = base / "runner.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, *extra: str) -> None:
        read_end, write_end = os.pipe()
        argv = [
            *(sys.executable, "-I", "-B", "-c", RECORDER, str(self.imports), "serve"),
            *("--socket", str(self.socket), "--state-dir", str(self.base / "state")),
            *("--root", str(self.base), "--supervise", "--ready-fd", str(write_end), *extra),
        ]
        try:
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    argv, pass_fds=(write_end,), stdin=subprocess.DEVNULL, stderr=log
                )
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            line = await asyncio.to_thread(ready.read)
        assert line == b"ready\n", self.log.read_text()

    @property
    def keeper(self) -> int:
        assert self.process is not None
        return self.process.pid

    def daemon(self) -> int:
        """The keeper's child that shares its cmdline but not its name (runs have exited)."""
        cmdline = Path(f"/proc/{self.keeper}/cmdline").read_bytes()
        children = Path(f"/proc/{self.keeper}/task/{self.keeper}/children").read_text()
        for pid in map(int, children.split()):
            proc = Path(f"/proc/{pid}")
            if (proc / "cmdline").read_bytes() == cmdline:
                assert (proc / "comm").read_text().strip() != KEEPER_COMM
                return pid
        raise AssertionError(f"no daemon under the keeper {self.keeper}: {self.log.read_text()}")

    def imported_by(self, pid: int) -> list[str]:
        if not self.imports.exists():
            return []
        lines = (line.split() for line in self.imports.read_text().splitlines())
        return [module for who, module in lines if int(who) == pid]

    def tcp_port(self) -> int:
        found = re.search(r"tcp port (\d+)", self.log.read_text())
        assert found, self.log.read_text()
        return int(found.group(1))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@pytest.fixture
def runner(short_tmp: Path) -> Iterator[SupervisedRunner]:
    supervised = SupervisedRunner(short_tmp)
    yield supervised
    supervised.stop()


def openssl_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if any(f in line for f in OPENSSL_FILES)})


async def test_the_daemon_imports_nothing_after_the_fork(runner: SupervisedRunner) -> None:
    await runner.start()
    async with RunnerClient.unix(runner.socket) as client:
        assert (await client.run(RunSpec(argv=("true",)))).ok
    daemon = runner.daemon()
    late = runner.imported_by(daemon)
    assert not late, (
        f"the daemon imported {late} after the fork, each a copy the keeper does not "
        "share: import them before it, in forgehand.runner.cli._import_server"
    )


async def test_neither_process_loads_openssl(runner: SupervisedRunner) -> None:
    await runner.start()
    async with RunnerClient.unix(runner.socket) as client:
        assert (await client.run(RunSpec(argv=("true",)))).ok
    assert openssl_mapped(runner.keeper) == []
    assert openssl_mapped(runner.daemon()) == []


async def test_tls_and_its_token_work_without_python_openssl(
    runner: SupervisedRunner, short_tmp: Path
) -> None:
    ca, cert, key = make_pki(short_tmp)
    token_file = short_tmp / "token"
    token_file.write_text(TOKEN)
    await runner.start(
        *("--tcp", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)),
        *("--token-file", str(token_file)),
    )
    address, no_retry = f"127.0.0.1:{runner.tcp_port()}", RetryPolicy(attempts=0)
    async with RunnerClient.tls(address, TOKEN, ca.read_bytes(), retry=no_retry) as client:
        result = await client.run(RunSpec(argv=("sh", "-c", "echo over tls")))
        assert result.stdout == b"over tls\n"
    async with RunnerClient.tls(address, WRONG_TOKEN, ca.read_bytes(), retry=no_retry) as bad:
        with pytest.raises(errors.Unauthenticated, match="bearer token"):
            await bad.capabilities()
    assert openssl_mapped(runner.daemon()) == []
