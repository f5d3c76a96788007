"""The daemon and its compiled keeper, both ways they start.

`serve --ready-fd N`: the daemon spawns the keeper, which detaches and outlives a SIGKILLed
daemon. `serve --supervise` (as sandboxes start it): the process hands over to the keeper,
which starts the daemon as its child with the same interpreter flags, restarts it when it
crashes, gives up on one that keeps crashing, and ends everything on SIGTERM. Neither loads
OpenSSL: the runner's TLS is gRPC's own, and its token check works without Python's.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_pki

from forgehand.runner import errors
from forgehand.runner.client import RetryPolicy, RunnerClient
from forgehand.runner.keeper_client import keeper_pid
from forgehand.runner.keeper_launch import DAEMON_MARK, KEEPER_COMM, keeper_binary
from forgehand.runner.model import Event, Exited, ExitReason, Output, RunSpec, Started

OPENSSL_FILES = ("libssl.so", "libcrypto.so", "/_ssl.", "/_hashlib.")
TOKEN = "a-test-token-of-more-than-16-chars"
WRONG_TOKEN = "not-the-token-but-just-as-long-xx"
COUNTER = (
    "import sys, time\n"
    "for i in range(150):\n"
    "    sys.stdout.write(f'line {i}\\n'); sys.stdout.flush(); time.sleep(0.01)\n"
    "sys.exit(7)\n"
)


class ForkingDaemon:
    """A real daemon started the way the bwrap backend starts it (``-I -B``)."""

    def __init__(self, base: Path, *mode: str) -> None:
        self.base = base
        self.mode = mode
        self.log = base / "runner.log"
        self.socket = base / "runner.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self, ready_fd: int, *extra: str) -> list[str]:
        return [
            sys.executable,
            *("-I", "-B", "-m", "forgehand.runner.cli", "serve"),
            *("--socket", str(self.socket), "--state-dir", str(self.base / "state")),
            *("--root", str(self.base), *self.mode, "--ready-fd", str(ready_fd), *extra),
        ]

    async def start(self) -> bytes:
        """Start it; what it wrote on its ready fd before closing it."""
        read_end, write_end = os.pipe()
        try:
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    self.argv(write_end),
                    pass_fds=(write_end,),
                    stdin=subprocess.DEVNULL,
                    stderr=log,
                )
        finally:
            os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            return await asyncio.to_thread(ready.read)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[ForkingDaemon]:
    running = ForkingDaemon(short_tmp)
    assert await running.start() == b"ready\n"
    yield running
    running.stop()


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def test_the_keeper_is_spawned_detached_and_named(daemon: ForkingDaemon) -> None:
    assert daemon.process is not None
    keeper = keeper_pid(daemon.base / "state")
    assert keeper not in (0, daemon.process.pid)
    assert comm(keeper) == KEEPER_COMM
    assert Path(f"/proc/{keeper}/exe").resolve() == keeper_binary().resolve()
    assert parent(keeper) != daemon.process.pid
    assert os.getsid(keeper) != os.getsid(daemon.process.pid)
    async with RunnerClient.unix(daemon.socket) as client:
        assert (await client.run(RunSpec(argv=("echo", "hi")))).stdout == b"hi\n"


async def test_kill_9_daemon_mid_run_loses_nothing(daemon: ForkingDaemon) -> None:
    spec = RunSpec(argv=("/usr/bin/python3", "-c", COUNTER))
    seen: list[Output] = []
    last_seq = 0
    async with RunnerClient.unix(daemon.socket) as client:
        run_id = await client.start(spec, run_id="survivor")
        async for event in client.attach(run_id):
            last_seq = event.seq
            if isinstance(event, Output):
                seen.append(event)
            if len(seen) >= 10:
                break
    keeper = keeper_pid(daemon.base / "state")
    daemon.kill()
    await asyncio.sleep(0.5)  # the run keeps writing while no daemon exists
    assert await daemon.start() == b"ready\n"  # its own fork finds the keeper busy
    assert keeper_pid(daemon.base / "state") == keeper
    async with RunnerClient.unix(daemon.socket) as client:
        rest = [e async for e in client.attach(run_id, after_seq=last_seq)]
    text = b"".join(e.data for e in [*seen, *rest] if isinstance(e, Output)).decode()
    assert text == "".join(f"line {i}\n" for i in range(150))
    assert isinstance(rest[-1], Exited)
    assert (rest[-1].reason, rest[-1].code) == (ExitReason.EXITED, 7)


async def test_a_killed_forked_keeper_is_replaced(daemon: ForkingDaemon) -> None:
    os.kill(keeper_pid(daemon.base / "state"), signal.SIGKILL)
    async with RunnerClient.unix(daemon.socket) as client:
        for _ in range(100):  # the daemon notices and spawns a new keeper
            result = await client.run(RunSpec(argv=("echo", "again")))
            if result.exit.reason is ExitReason.EXITED:
                break
            await asyncio.sleep(0.05)
    assert result.stdout == b"again\n"


async def test_invalid_settings_name_the_field(short_tmp: Path) -> None:
    read_end, write_end = os.pipe()
    daemon = ForkingDaemon(short_tmp)
    try:
        done = subprocess.run(
            daemon.argv(write_end, "--max-runs", "0"),
            pass_fds=(write_end,),
            capture_output=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        assert ready.read() == b""
    assert done.returncode == 2
    assert b"max_runs" in done.stderr
    assert keeper_pid(short_tmp / "state") == 0


# -- serve --supervise ----------------------------------------------------------------------


@pytest.fixture
async def supervised(short_tmp: Path) -> AsyncIterator[ForkingDaemon]:
    running = ForkingDaemon(short_tmp, "--supervise", "--max-restarts", "1")
    assert await running.start() == b"ready\n"
    yield running
    running.stop()


def supervisor_pid(daemon: ForkingDaemon) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def child_daemon(supervisor: int) -> int:
    """The daemon the supervisor started: its child running ``forgehand.runner.cli serve``;
    0 if none (yet)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            ours = parent(pid) == supervisor and DAEMON_MARK in (entry / "cmdline").read_bytes()
            if ours and not dead(pid):
                return pid
        except (OSError, IndexError):
            continue
    return 0


async def next_daemon(supervisor: int, old: int = 0) -> int:
    """Wait (bounded) for a daemon other than ``old`` to run under ``supervisor``."""
    for _ in range(1000):
        pid = child_daemon(supervisor)
        if pid not in (0, old):
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"no new daemon under {supervisor} (the old one was {old})")


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (PID 1 on these machines reaps no orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_dead(pid: int) -> bool:
    for _ in range(1000):
        if dead(pid):
            return True
        await asyncio.sleep(0.01)
    return False


async def start_sleeper(socket: Path) -> int:
    """Start a run that only waits; the pid of its process."""
    async with RunnerClient.unix(socket) as client:
        run_id = await client.start(RunSpec(argv=("sleep", "600")))
        async for event in client.attach(run_id):
            if isinstance(event, Started):
                return event.pid
    raise AssertionError("the run never started")


async def test_supervise_makes_this_process_the_keeper(supervised: ForkingDaemon) -> None:
    supervisor = supervisor_pid(supervised)
    assert keeper_pid(supervised.base / "state") == supervisor
    assert comm(supervisor) == KEEPER_COMM
    assert Path(f"/proc/{supervisor}/exe").resolve() == keeper_binary().resolve()
    daemon = await next_daemon(supervisor)
    argv = Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")
    # The interpreter's flags survive the handover: -I keeps a checkout in the work dir
    # from shadowing the daemon's modules.
    assert argv[1:5] == [b"-I", b"-B", b"-m", b"forgehand.runner.cli"]
    assert b"--supervise" not in argv
    async with RunnerClient.unix(supervised.socket) as client:
        assert (await client.run(RunSpec(argv=("echo", "hi")))).stdout == b"hi\n"


async def test_a_killed_daemon_is_restarted_and_attach_resumes(
    supervised: ForkingDaemon,
) -> None:
    supervisor = supervisor_pid(supervised)
    first = await next_daemon(supervisor)
    spec = RunSpec(argv=("/usr/bin/python3", "-c", COUNTER))
    outputs: list[Output] = []
    async with RunnerClient.unix(supervised.socket) as client:
        run_id = await client.start(spec, run_id="survivor")
        events = [event async for event in _killing_after(client.attach(run_id), first, 10)]
        assert client.reconnects >= 1
        outputs = [e for e in events if isinstance(e, Output)]
        seqs = [e.seq for e in events]
        assert seqs == sorted(set(seqs))  # every event exactly once, in order
        assert b"".join(e.data for e in outputs).decode() == "".join(
            f"line {i}\n" for i in range(150)
        )
        assert isinstance(events[-1], Exited)
        assert (events[-1].reason, events[-1].code) == (ExitReason.EXITED, 7)
        assert (await client.run(RunSpec(argv=("echo", "again")))).stdout == b"again\n"
    assert keeper_pid(supervised.base / "state") == supervisor
    assert await next_daemon(supervisor, first) != first
    assert "killed by SIGKILL: restarting it" in supervised.log.read_text()


async def _killing_after(
    events: AsyncIterator[Event], daemon: int, outputs: int
) -> AsyncIterator[Event]:
    """Pass the events on; SIGKILL ``daemon`` once ``outputs`` Output events went by."""
    seen = 0
    async for event in events:
        yield event
        seen += isinstance(event, Output)
        if seen == outputs:
            os.kill(daemon, signal.SIGKILL)


async def test_a_daemon_ended_by_a_real_time_signal_is_restarted(
    supervised: ForkingDaemon,
) -> None:
    """A run can signal the daemon (same uid); naming a real-time signal once ended the
    supervisor, and the sandbox with it."""
    supervisor = supervisor_pid(supervised)
    first = await next_daemon(supervisor)
    os.kill(first, signal.SIGRTMIN + 6)
    assert await next_daemon(supervisor, first) != first
    async with RunnerClient.unix(supervised.socket) as client:
        assert (await client.run(RunSpec(argv=("echo", "again")))).stdout == b"again\n"
    assert "killed by SIGRTMIN+6: restarting it" in supervised.log.read_text()


async def test_a_daemon_that_keeps_crashing_is_given_up_on(supervised: ForkingDaemon) -> None:
    supervisor = supervisor_pid(supervised)
    sleeper = await start_sleeper(supervised.socket)
    first = await next_daemon(supervisor)
    os.kill(first, signal.SIGKILL)
    second = await next_daemon(supervisor, first)  # --max-restarts 1: the one restart
    os.kill(second, signal.SIGKILL)
    assert supervised.process is not None
    assert await asyncio.to_thread(supervised.process.wait) == 1
    assert await wait_dead(sleeper)
    assert "after 1 restarts" in supervised.log.read_text()
    # The SIGKILLed daemon could not remove its sockets; the supervisor did.
    assert not supervised.socket.exists()
    assert not supervised.socket.with_name("runner.sock.direct").exists()


@pytest.mark.parametrize("target", ["supervisor", "daemon"])
async def test_sigterm_ends_everything(supervised: ForkingDaemon, target: str) -> None:
    supervisor = supervisor_pid(supervised)
    daemon = await next_daemon(supervisor)
    sleeper = await start_sleeper(supervised.socket)
    os.kill(supervisor if target == "supervisor" else daemon, signal.SIGTERM)
    assert supervised.process is not None
    assert await asyncio.to_thread(supervised.process.wait) == 0
    assert await wait_dead(sleeper)
    assert await wait_dead(daemon)


def openssl_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if any(f in line for f in OPENSSL_FILES)})


async def test_neither_process_loads_openssl(supervised: ForkingDaemon) -> None:
    async with RunnerClient.unix(supervised.socket) as client:
        assert (await client.run(RunSpec(argv=("true",)))).ok
    supervisor = supervisor_pid(supervised)
    assert openssl_mapped(supervisor) == []
    assert openssl_mapped(await next_daemon(supervisor)) == []


async def test_the_keeper_takes_little_memory(supervised: ForkingDaemon) -> None:
    """The point of a compiled keeper: a Python one, forked from the daemon, cost each
    sandbox about 5 MB."""
    async with RunnerClient.unix(supervised.socket) as client:
        assert (await client.run(RunSpec(argv=("true",)))).ok
    rollup = Path(f"/proc/{supervisor_pid(supervised)}/smaps_rollup").read_text()
    pss_kib = int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))  # type: ignore[union-attr]
    assert pss_kib < 1024, rollup


async def test_tls_and_its_token_work_without_python_openssl(short_tmp: Path) -> None:
    ca, cert, key = make_pki(short_tmp)
    token_file = short_tmp / "token"
    token_file.write_text(TOKEN)
    runner = ForkingDaemon(
        short_tmp,
        "--supervise",
        *("--tcp", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)),
        *("--token-file", str(token_file)),
    )
    assert await runner.start() == b"ready\n", runner.log.read_text()
    try:
        found = re.search(r"tcp port (\d+)", runner.log.read_text())
        assert found, runner.log.read_text()
        address, no_retry = f"127.0.0.1:{found.group(1)}", RetryPolicy(attempts=0)
        async with RunnerClient.tls(address, TOKEN, ca.read_bytes(), retry=no_retry) as client:
            result = await client.run(RunSpec(argv=("sh", "-c", "echo over tls")))
            assert result.stdout == b"over tls\n"
        async with RunnerClient.tls(address, WRONG_TOKEN, ca.read_bytes(), retry=no_retry) as bad:
            with pytest.raises(errors.Unauthenticated, match="bearer token"):
                await bad.capabilities()
        assert runner.process is not None
        assert openssl_mapped(await next_daemon(runner.process.pid)) == []
    finally:
        runner.stop()
