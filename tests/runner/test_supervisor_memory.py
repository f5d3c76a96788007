"""What a supervised runner shares between its keeper and its daemon, and what it keeps out.

Every page the keeper or the daemon writes after the fork exists twice, so the keeper
imports everything the daemon runs before it forks: a module the daemon imports later is
the daemon's alone, and so is every page the import machinery writes on the way. The
keeper then unmaps the clean library pages the imports touched (the daemon maps what it
uses). And
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
from forgehand.runner.tuning import FileMapping, clean_file_mappings

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


def clean_resident_bytes(pid: int, name: str) -> int:
    """Resident bytes of ``pid``'s read-only, never-written mappings of files named like
    ``name``."""
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    return sum(m.resident for m in clean_file_mappings(smaps) if name in m.path)


async def test_the_keeper_unmaps_the_libraries_only_the_daemon_runs(
    runner: SupervisedRunner,
) -> None:
    """The imports touched gRPC's library in the process that became the keeper; once the
    daemon is forked the keeper unmaps those pages, and a run does not bring them back."""
    await runner.start()
    async with RunnerClient.unix(runner.socket) as client:
        for _ in range(3):
            assert (await client.run(RunSpec(argv=("true",)))).ok
    in_daemon = clean_resident_bytes(runner.daemon(), "cygrpc")
    in_keeper = clean_resident_bytes(runner.keeper, "cygrpc")
    assert in_daemon > 1024 * 1024  # the daemon serves with it
    assert in_keeper < in_daemon / 4, (in_keeper, in_daemon)


SMAPS = """\
00400000-00500000 r-xp 00000000 08:01 11 /usr/bin/python3.11
Rss:                 512 kB
Anonymous:             0 kB
00600000-00700000 r--p 00100000 08:01 11 /usr/bin/python3.11
Rss:                  64 kB
Anonymous:            64 kB
00700000-00800000 rw-p 00200000 08:01 11 /usr/bin/python3.11
Rss:                  64 kB
Anonymous:            64 kB
00900000-00a00000 r--p 00000000 08:01 12 /tmp/gone (deleted)
Rss:                   8 kB
Anonymous:             0 kB
00a00000-00b00000 r--s 00000000 08:01 13 /dev/shm/shared
Rss:                   8 kB
Anonymous:             0 kB
00b00000-00c00000 r--p 00000000 08:01 14 /usr/lib/with space.so
Rss:                   4 kB
Anonymous:             0 kB
00c00000-00d00000 r--p 00000000 08:01 15 /usr/lib/untouched.so
Rss:                   0 kB
Anonymous:             0 kB
00d00000-00e00000 r--p 00000000 08:01 16 /usr/lib/relocated-then-swapped.so
Rss:                   4 kB
Anonymous:             0 kB
Swap:                  8 kB
VmFlags: rd mr mw me
00e00000-00f00000 r--p 00000000 08:01 17 /usr/lib/no-anonymous-line.so
Rss:                   4 kB
7f0000000000-7f0000001000 r--p 00000000 00:00 0 [vvar]
Rss:                   4 kB
Anonymous:             0 kB
"""


def test_only_clean_private_file_mappings_are_unmapped() -> None:
    """Relocated data made read-only again (private copies, in memory or swapped out),
    writable, deleted, shared and special mappings, and any whose private copies smaps
    does not show, are left alone."""
    assert clean_file_mappings(SMAPS) == [
        FileMapping(0x400000, 0x500000, 512 * 1024, "/usr/bin/python3.11"),
        FileMapping(0xB00000, 0xC00000, 4 * 1024, "/usr/lib/with space.so"),
        FileMapping(0xC00000, 0xD00000, 0, "/usr/lib/untouched.so"),
    ]
