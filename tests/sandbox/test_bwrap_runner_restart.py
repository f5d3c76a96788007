"""A runner daemon killed inside a real bubblewrap sandbox takes neither the sandbox nor
its runs along: the keeper (bwrap's command) restarts it, attached clients resume, and a
daemon that keeps crashing is given up on, which ends the sandbox."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bwrap_support import NEEDS_BWRAP, scratch_dir

from forgehand.runner.keeper_launch import KEEPER_COMM
from forgehand.runner.model import Event, Exited, ExitReason, Output
from forgehand.sandbox.bwrap_backend import BwrapBackend, BwrapBackendConfig, BwrapRunnerSandbox
from forgehand.sandbox.spec import SandboxSpec

pytestmark = NEEDS_BWRAP

LINES = 300
PRINTER = (
    "import sys, time\n"
    f"for i in range({LINES}):\n"
    "    sys.stdout.write(f'line {i}\\n'); sys.stdout.flush(); time.sleep(0.005)\n"
    "sys.exit(9)\n"
)


@pytest.fixture
def base() -> Iterator[Path]:
    yield from scratch_dir("fh-br-")


async def make_sandbox(base: Path, restarts: int) -> AsyncIterator[BwrapRunnerSandbox]:
    config = BwrapBackendConfig(state_dir=base / "state", runner_max_restarts=restarts)
    limits = {"memory_bytes": "128M", "pids": 64, "wall_time_seconds": 60}
    work = {"host_path": str(base / "work"), "size_bytes": "16M"}
    spec = SandboxSpec.model_validate({"work_dir": work, "limits": limits})
    async with BwrapBackend(config).create(spec) as sandbox:
        yield sandbox


@pytest.fixture
async def sandbox(base: Path) -> AsyncIterator[BwrapRunnerSandbox]:
    async for running in make_sandbox(base, restarts=5):
        yield running


@pytest.fixture
async def fragile(base: Path) -> AsyncIterator[BwrapRunnerSandbox]:
    """A sandbox whose daemon is restarted once at most."""
    async for running in make_sandbox(base, restarts=1):
        yield running


async def runner_pids(sandbox: BwrapRunnerSandbox) -> dict[str, set[int]]:
    """Host pids of the runner's processes by name: the keeper and the daemon(s)."""
    found: dict[str, set[int]] = {}
    for pid in await sandbox.member_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"forgehand.runner.cli" in cmdline and name != "bwrap" and state not in "ZX":
            found.setdefault(name, set()).add(pid)
    return found


async def the_daemon(sandbox: BwrapRunnerSandbox, not_this: int = 0) -> int:
    """Wait (bounded) for exactly one live daemon other than ``not_this``; its host pid."""
    for _ in range(1000):
        daemons = (await runner_pids(sandbox)).get("python", set())
        if len(daemons) == 1 and not_this not in daemons:
            return daemons.pop()
        await asyncio.sleep(0.01)
    raise AssertionError(f"no single new daemon in the sandbox (the old one was {not_this})")


async def _killing_after(
    events: AsyncIterator[Event], daemon: int, outputs: int
) -> AsyncIterator[Event]:
    """Pass the events on; SIGKILL ``daemon`` (from the host) after ``outputs`` Outputs."""
    seen = 0
    async for event in events:
        yield event
        seen += isinstance(event, Output)
        if seen == outputs:
            os.kill(daemon, signal.SIGKILL)


async def test_kill_9_of_the_daemon_loses_no_byte_and_no_run(
    sandbox: BwrapRunnerSandbox,
) -> None:
    keeper = (await runner_pids(sandbox))[KEEPER_COMM]
    daemon = await the_daemon(sandbox)
    client = sandbox.client
    run_id = await client.start(sandbox.run_spec(["python3", "-c", PRINTER]), "printer")
    events = [event async for event in _killing_after(client.attach(run_id), daemon, 20)]
    assert client.reconnects >= 1
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs))  # every event exactly once, in order
    text = b"".join(e.data for e in events if isinstance(e, Output)).decode()
    assert text == "".join(f"line {i}\n" for i in range(LINES))
    assert isinstance(events[-1], Exited)
    assert (events[-1].reason, events[-1].code) == (ExitReason.EXITED, 9)
    # The same keeper (so the same sandbox) goes on, with a new daemon, for new runs.
    assert (await runner_pids(sandbox))[KEEPER_COMM] == keeper
    assert await the_daemon(sandbox, not_this=daemon) != daemon
    assert (await sandbox.run(["echo", "still here"])).stdout == b"still here\n"
    log = (sandbox.directory / "runner.log").read_text()
    assert "the daemon was killed by SIGKILL: restarting it" in log


async def test_a_daemon_that_keeps_crashing_ends_the_sandbox(
    fragile: BwrapRunnerSandbox,
) -> None:
    first = await the_daemon(fragile)
    os.kill(first, signal.SIGKILL)
    second = await the_daemon(fragile, not_this=first)  # the one restart it gets
    assert (await fragile.run(["true"])).exit.reason is ExitReason.EXITED
    os.kill(second, signal.SIGKILL)
    assert fragile._runner is not None
    assert await fragile._runner.wait() == 1  # bwrap passes on the keeper's status
    assert "after 1 restarts" in (fragile.directory / "runner.log").read_text()
    for _ in range(1000):  # the pid namespace is torn down: everything in it ends
        if not await fragile.member_pids():
            break
        await asyncio.sleep(0.01)
    assert await fragile.member_pids() == set()
