"""Durability with real daemon processes: kill -9 the daemon, the keeper, fill the disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_config

from forgehand.runner import errors
from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.core import RunnerCore
from forgehand.runner.keeper import keeper_pid
from forgehand.runner.model import Exited, ExitReason, Output, RunSpec, Started

COUNTER = (
    "import sys, time\n"
    "for i in range({n}):\n"
    "    sys.stdout.write(f'line {{i}}\\n'); sys.stdout.flush(); time.sleep({pause})\n"
    "sys.exit(7)\n"
)


class Daemon:
    """A real `forgehand-runner serve` process."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "runner.sock"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        (self.base / "work").mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "forgehand.runner.cli",
                "serve",
                "--socket",
                str(self.socket),
                "--state-dir",
                str(self.base / "state"),
                "--root",
                str(self.base / "work"),
            ],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            with contextlib.suppress(errors.RunnerError):
                async with RunnerClient.unix(self.socket, rpc_timeout=1) as client:
                    await client.capabilities()
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("the daemon did not come up")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@pytest.fixture
async def daemon(short_tmp: Path) -> AsyncIterator[Daemon]:
    running = Daemon(short_tmp)
    await running.start()
    yield running
    running.stop()


def keeper_of(base: Path) -> int:
    return keeper_pid(base / "state")


async def test_kill_9_daemon_mid_run_loses_nothing(daemon: Daemon) -> None:
    spec = RunSpec(argv=("/usr/bin/python3", "-c", COUNTER.format(n=150, pause=0.01)))
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
    daemon.kill()
    await asyncio.sleep(0.5)  # the run keeps writing while no daemon exists
    await daemon.start()
    async with RunnerClient.unix(daemon.socket) as client:
        rest = [e async for e in client.attach(run_id, after_seq=last_seq)]
    outputs = seen + [e for e in rest if isinstance(e, Output)]
    text = b"".join(o.data for o in outputs).decode()
    assert text == "".join(f"line {i}\n" for i in range(150))
    final = rest[-1]
    assert isinstance(final, Exited)
    assert final.reason is ExitReason.EXITED
    assert final.code == 7
    seqs = [e.seq for e in seen] + [e.seq for e in rest]
    assert len(seqs) == len(set(seqs))


async def test_restart_rebuilds_the_registry(daemon: Daemon) -> None:
    async with RunnerClient.unix(daemon.socket) as client:
        done = await client.run(RunSpec(argv=("echo", "kept")), run_id="finished")
        await client.start(RunSpec(argv=("sleep", "30")), run_id="still-running")
    assert done.ok
    daemon.kill()
    await daemon.start()
    async with RunnerClient.unix(daemon.socket) as client:
        runs = {r.run_id: r for r in await client.list_runs()}
        assert not runs["finished"].running
        assert runs["still-running"].running
        assert (await client.collect("finished")).stdout == b"kept\n"
        assert await client.cancel("still-running", 0.1)
        result = await client.collect("still-running")
        assert result.exit.reason is ExitReason.CANCELLED


async def test_dead_keeper_marks_runs_lost_and_a_new_one_takes_over(daemon: Daemon) -> None:
    async with RunnerClient.unix(daemon.socket) as client:
        run_id = await client.start(RunSpec(argv=("sleep", "30")))
        async for event in client.attach(run_id, wait_seconds=5):
            if isinstance(event, Started):
                break
        os.kill(keeper_of(daemon.base), signal.SIGKILL)
        result = await client.collect(run_id)
        assert result.exit.reason is ExitReason.LOST
        assert "keeper" in result.exit.message
        for _ in range(100):  # the daemon starts a new keeper
            with contextlib.suppress(errors.Unavailable):
                again = await client.run(RunSpec(argv=("echo", "again")))
                break
            await asyncio.sleep(0.05)
        assert again.stdout == b"again\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_full_disk_fails_the_run_with_a_reason_and_the_daemon_stays_up(
    short_tmp: Path,
) -> None:
    small = short_tmp / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        async with RunnerCore(make_config(small)) as core:
            client = RunnerClient(LocalTransport(core))
            result = await client.run(RunSpec(argv=("head", "-c", "20000000", "/dev/zero")))
            assert result.exit.reason is ExitReason.ERROR
            assert "disk full" in result.exit.message
            await client.close_run(result.run_id)
            after = await client.run(RunSpec(argv=("echo", "still here")))
            assert after.stdout == b"still here\n"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


async def test_finished_runs_are_pruned_after_their_ttl(short_tmp: Path) -> None:
    async with RunnerCore(make_config(short_tmp, finished_run_ttl_seconds=0.01)) as core:
        client = RunnerClient(LocalTransport(core))
        result = await client.run(RunSpec(argv=("true",)), run_id="old")
        running = await client.start(RunSpec(argv=("sleep", "30")), run_id="young")
        await asyncio.sleep(0.05)
        assert await core.prune() == 1
        with pytest.raises(errors.NotFound):
            await client.status(result.run_id)
        assert not (core.runs_dir / "old").exists()
        assert (await client.status(running)).running
        await client.close_run(running, force=True)


async def test_total_journal_cap_prunes_oldest_finished_runs(short_tmp: Path) -> None:
    config = make_config(
        short_tmp, journal_max_bytes_total=1024 * 1024, journal_max_bytes_per_run=256 * 1024
    )
    async with RunnerCore(config) as core:
        client = RunnerClient(LocalTransport(core))
        for i in range(6):
            big = RunSpec(argv=("head", "-c", "300000", "/dev/zero"))
            await client.run(big, run_id=f"big-{i}")
        remaining = {r.run_id for r in await client.list_runs()}
        assert "big-5" in remaining
        assert "big-0" not in remaining
        assert sum(r.journal_bytes for r in await client.list_runs()) <= 1024 * 1024 + 300_000
