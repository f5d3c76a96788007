"""Durability with real daemon processes: kill -9 the daemon, the keeper, fill the disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import make_config
from journal_writer import JournalWriter

from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors
from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.core import RunnerCore
from forgehand.runner.journal import (
    HEADER,
    LENGTH_BITS,
    MAX_RECORD_BYTES,
    list_segments,
)
from forgehand.runner.keeper_client import keeper_pid
from forgehand.runner.model import Exited, ExitReason, Output, RunSpec, Started, Stream

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


def random_output(size: int, pause: float = 0.0, max_output_bytes: int = 0) -> RunSpec:
    """A run that writes ``size`` reproducible random bytes (NULs among them) to stdout,
    256 KiB at a time; ``expected(size)`` is what it writes."""
    script = (
        "import random, sys, time\n"
        f"data = random.Random(7).randbytes({size})\n"
        f"for i in range(0, {size}, 1 << 18):\n"
        "    sys.stdout.buffer.write(data[i : i + (1 << 18)]); sys.stdout.flush()\n"
        f"    time.sleep({pause})\n"
    )
    return RunSpec(argv=(sys.executable, "-c", script), max_output_bytes=max_output_bytes)


def expected(size: int) -> bytes:
    return random.Random(7).randbytes(size)


def spliced_records(journal: Path) -> int:
    """Output records whose checksum covers only the prefix: their data was spliced, never
    read by the keeper (one it read covers its first 63 payload bytes)."""
    count = 0
    for _first, path in list_segments(journal):
        data = path.read_bytes()
        offset = 0
        while offset + HEADER.size <= len(data):
            word = HEADER.unpack_from(data, offset)[0]
            length, covered = word & MAX_RECORD_BYTES, word >> LENGTH_BITS
            count += 0 < covered < min(63, length)
            offset += HEADER.size + length
    return count


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
    # Each output stays under the per-run bound, so no middle is dropped and a journal is
    # its output, record headers and the 4 KiB exit record however the output was chunked:
    # four fit under the cap, five do not. (Past the bound whole segments go, and what is
    # left depends on how the output was chunked: five such journals may fit under 1 MiB
    # with nothing to prune.)
    cap = 1024 * 1024
    config = make_config(
        short_tmp, journal_max_bytes_total=cap, journal_max_bytes_per_run=256 * 1024
    )
    async with RunnerCore(config) as core:
        client = RunnerClient(LocalTransport(core))
        sizes = []
        for i in range(6):
            await client.run(RunSpec(argv=("head", "-c", "250000", "/dev/zero")), run_id=f"big-{i}")
            sizes.append(sum(file_sizes(core.runs_dir / f"big-{i}" / "journal").values()))
        assert sum(sizes[:4]) < cap <= sum(sizes[:5])
        runs = await client.list_runs()
    # big-5's start found the cap reached: the oldest finished run went, and only it.
    assert [r.run_id for r in runs] == [f"big-{i}" for i in range(1, 6)]
    assert [r.journal_bytes for r in runs] == sizes[1:]


async def test_a_journal_keeps_near_its_per_run_cap_however_the_output_comes(
    short_tmp: Path,
) -> None:
    """The keeper cuts output records at a segment's size, so dropping whole segments
    keeps a journal within a segment of its cap (records of up to 1 MiB once let a 256 KiB
    journal reach 1 MiB)."""
    per_run = 256 * 1024
    config = make_config(short_tmp, journal_max_bytes_per_run=per_run)
    async with RunnerCore(config) as core:
        client = RunnerClient(LocalTransport(core))
        for run_id, spec in (
            ("fast", RunSpec(argv=("head", "-c", "8000000", "/dev/zero"))),
            ("paced", random_output(4 << 20, pause=0.01)),
        ):
            result = await client.run(spec, run_id=run_id)
            assert result.exit.reason is ExitReason.EXITED
            on_disk = sum(file_sizes(core.runs_dir / run_id / "journal").values())
            assert on_disk <= per_run + per_run // 4, f"{run_id}: {on_disk} bytes"


def file_sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in directory.iterdir()}


def append_record(writer: JournalWriter, size: int) -> None:
    """Append an Output record of ``size`` bytes, or one less where a varint shrinks."""
    event = pb.Event(seq=writer.next_seq, time_unix_ns=1)
    event.output.data = b"x" * (size - HEADER.size)
    while HEADER.size + event.ByteSize() > size:
        event.output.data = event.output.data[:-1]
    writer.append(event)


def test_a_journal_does_not_change_once_its_exit_is_written(tmp_path: Path) -> None:
    """The daemon sizes a finished run's journal once, as soon as a reader has seen the
    exit: an exit record that fills a segment must not open or drop one after it."""
    segment, limit = 64 * 1024, 256 * 1024
    writer = JournalWriter(tmp_path, max_bytes=limit, segment_bytes=segment)
    for _ in range(4):
        append_record(writer, segment)  # one segment each; the third is past the head
    final = pb.Event(seq=writer.next_seq + 1, time_unix_ns=1)
    final.exited.reason = pb.EXIT_REASON_EXITED
    exit_size = HEADER.size + final.ByteSize()
    append_record(writer, segment - exit_size // 2)  # the exit record will fill this one
    before = file_sizes(tmp_path)
    assert sum(before.values()) - before["exit.rec"] > limit  # bounding would drop one
    last = list_segments(tmp_path)[-1][1].name

    writer.write_exit(final)
    writer.close()

    assert file_sizes(tmp_path) == before | {last: before[last] + exit_size}


async def test_spliced_output_is_exact_across_the_output_limit(short_tmp: Path) -> None:
    size, limit = 4 << 20, (5 << 19) + 123  # the keeper splices at least twice, then cuts
    async with RunnerCore(make_config(short_tmp)) as core:
        client = RunnerClient(LocalTransport(core))
        run_id = await client.start(random_output(size, max_output_bytes=limit))
        events = [e async for e in client.attach(run_id)]
        journal = core.runs_dir / run_id / "journal"
        assert spliced_records(journal) >= 2
    outputs = [e for e in events if isinstance(e, Output)]
    assert b"".join(o.data for o in outputs) == expected(size)[:limit]
    assert {o.stream for o in outputs} == {Stream.STDOUT}
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    final = events[-1]
    assert isinstance(final, Exited)
    assert final.reason is ExitReason.LIMIT


async def test_empty_output_and_both_pipes_spliced(short_tmp: Path) -> None:
    async with RunnerCore(make_config(short_tmp)) as core:
        client = RunnerClient(LocalTransport(core))
        run_id = await client.start(RunSpec(argv=("true",)))
        events = [e async for e in client.attach(run_id)]
        assert [type(e) for e in events] == [Started, Exited]
        script = "printf 'o\\000u\\000t'; printf 'e\\000r\\000r' >&2"
        result = await client.run(RunSpec(argv=("sh", "-c", script)))
        assert result.stdout == b"o\0u\0t"
        assert result.stderr == b"e\0r\0r"
        assert spliced_records(core.runs_dir / result.run_id / "journal") == 2


async def test_spliced_output_survives_daemon_restarts_byte_exact(daemon: Daemon) -> None:
    size = 6 << 20
    seen: list[Output] = []
    last_seq = 0
    async with RunnerClient.unix(daemon.socket) as client:
        run_id = await client.start(random_output(size, pause=0.01), run_id="binary")
        async for event in client.attach(run_id):
            last_seq = event.seq
            if isinstance(event, Output):
                seen.append(event)
            if sum(len(o.data) for o in seen) >= 1 << 20:
                break
    daemon.kill()
    await daemon.start()
    async with RunnerClient.unix(daemon.socket) as client:
        rest = [e async for e in client.attach(run_id, after_seq=last_seq)]
    outputs = seen + [e for e in rest if isinstance(e, Output)]
    assert b"".join(o.data for o in outputs) == expected(size)
    seqs = [e.seq for e in outputs]
    assert seqs == sorted(set(seqs))
    assert isinstance(rest[-1], Exited)
    assert rest[-1].reason is ExitReason.EXITED
    # Ended before this daemon started: its journal is read with checksums verified.
    daemon.kill()
    await daemon.start()
    async with RunnerClient.unix(daemon.socket) as client:
        result = await client.collect(run_id)
    assert result.stdout == expected(size)
    assert spliced_records(daemon.base / "state" / "runs" / run_id / "journal") > 0


ENDLESS = (
    "import random, sys\n"
    "rng = random.Random(7)\n"
    "while True:\n"
    "    sys.stdout.buffer.write(rng.randbytes(1 << 18)); sys.stdout.flush()\n"
)


def endless_expected(size: int) -> bytes:
    """The first ``size`` bytes that ENDLESS writes."""
    rng = random.Random(7)
    return b"".join(rng.randbytes(1 << 18) for _ in range(size // (1 << 18) + 1))[:size]


async def test_keeper_killed_mid_stream_leaves_an_exact_prefix_then_lost(daemon: Daemon) -> None:
    events: list[Exited | Output] = []
    async with RunnerClient.unix(daemon.socket) as client:
        run_id = await client.start(RunSpec(argv=(sys.executable, "-c", ENDLESS)))
        async for event in client.attach(run_id):
            if isinstance(event, Output | Exited):
                events.append(event)
            if sum(len(e.data) for e in events if isinstance(e, Output)) >= 4 << 20:
                os.kill(keeper_of(daemon.base), signal.SIGKILL)
                break
        last_seq = events[-1].seq
        events += [e async for e in client.attach(run_id, after_seq=last_seq)]  # type: ignore[misc]
    outputs = [e for e in events if isinstance(e, Output)]
    assert {o.stream for o in outputs} == {Stream.STDOUT}
    data = b"".join(o.data for o in outputs)
    assert len(data) >= 4 << 20
    assert data == endless_expected(len(data))
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    final = events[-1]
    assert isinstance(final, Exited)
    assert final.reason is ExitReason.LOST
