"""Child processes of steps: started with asyncio, output streamed or captured, killed cleanly.

Every process gets its own session (process group), so a timeout or a cancellation ends
the whole group: SIGTERM, a grace period, then SIGKILL. Output is read in chunks and
passed on as it arrives. When the process exits but a background child still holds its
stdout/stderr open, output is drained while it keeps coming (at most
``DRAIN_LIMIT_SECONDS``, stopping after ``DRAIN_SECONDS`` of silence) and the pipes are
then closed, so ``server &`` does not hang the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from forgehand.steps.errors import StepError

Stream = Literal["stdout", "stderr"]
OutputFn = Callable[[Stream, bytes], None]

CHUNK = 64 * 1024
GRACE_SECONDS = 2.0
DRAIN_SECONDS = 0.5
DRAIN_LIMIT_SECONDS = 5.0
TIMEOUT_EXIT_CODE = 124


@dataclass(frozen=True)
class ProcessResult:
    """How a process ended: its exit code (128 + signal when killed) and whether it timed out."""

    exit_code: int
    timed_out: bool = False


@dataclass(frozen=True)
class CapturedResult:
    """A finished process with its whole output."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


def shell_argv(script: str, env: Mapping[str, str]) -> list[str]:
    """``bash -c script``, or ``sh -c script`` where bash is not installed."""
    path = env.get("PATH", os.defpath)
    shell = shutil.which("bash", path=path) or shutil.which("sh", path=path) or "/bin/sh"
    return [shell, "-c", script]


async def _start(
    argv: Sequence[str], cwd: str, env: Mapping[str, str], stdout: int, stderr: int
) -> asyncio.subprocess.Process:
    if not argv:
        raise StepError("cannot run an empty command")
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        missing = argv[0] if exc.filename in {None, argv[0]} else exc.filename
        raise StepError(
            f"cannot start {argv[0]!r}: {missing} not found; check the command and PATH "
            f"and that the directory {cwd!r} exists"
        ) from None
    except PermissionError:
        raise StepError(
            f"cannot start {argv[0]!r}: permission denied (is it executable?)"
        ) from None
    except OSError as exc:
        raise StepError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None


def _signal_group(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


async def terminate(process: asyncio.subprocess.Process, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    _signal_group(process, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        _signal_group(process, signal.SIGKILL)
        await process.wait()


def _exit_code(returncode: int | None) -> int:
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


class _Pumps:
    """Copies a process's stdout and stderr to ``output`` through pipes this side owns.

    asyncio's own pipes would make ``Process.wait()`` wait for them to close; with ours,
    the exit is seen at once, and a pipe a background child keeps open is closed here
    after a drain instead.
    """

    def __init__(self, output: OutputFn) -> None:
        self.copied = 0
        self._output = output
        self._pipes: dict[Stream, tuple[int, int]] = {"stdout": os.pipe(), "stderr": os.pipe()}
        self._transports: list[asyncio.BaseTransport] = []
        self.tasks: list[asyncio.Task[None]] = []

    def child_fd(self, stream: Stream) -> int:
        """The write end the child gets for ``stream``."""
        return self._pipes[stream][1]

    async def start(self) -> None:
        """Close our copies of the write ends and start copying from the read ends."""
        loop = asyncio.get_running_loop()
        for stream, (read_fd, write_fd) in self._pipes.items():
            os.close(write_fd)
            reader = asyncio.StreamReader(limit=CHUNK)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_read_pipe(
                functools.partial(_same, protocol), os.fdopen(read_fd, "rb", 0)
            )
            self._transports.append(transport)
            self.tasks.append(asyncio.create_task(self._pump(reader, stream)))

    def abandon(self) -> None:
        """The child never started: close every end."""
        for read_fd, write_fd in self._pipes.values():
            os.close(read_fd)
            os.close(write_fd)

    async def _pump(self, reader: asyncio.StreamReader, stream: Stream) -> None:
        while chunk := await reader.read(CHUNK):
            self.copied += len(chunk)
            self._output(stream, chunk)

    async def drain(self) -> None:
        """Wait for EOF while output keeps coming (up to ``DRAIN_LIMIT_SECONDS``); once it
        stalls, stop and close."""
        pending: set[asyncio.Task[None]] = set(self.tasks)
        deadline = asyncio.get_running_loop().time() + DRAIN_LIMIT_SECONDS
        while pending:
            before = self.copied
            _, pending = await asyncio.wait(pending, timeout=DRAIN_SECONDS)
            stalled = self.copied == before
            if pending and (stalled or asyncio.get_running_loop().time() > deadline):
                for task in pending:
                    task.cancel()
                break
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for transport in self._transports:
            transport.close()


async def _wait(process: asyncio.subprocess.Process, kill_after: float | None) -> bool:
    """Wait for the process; True when it had to be killed for the timeout."""
    try:
        await asyncio.wait_for(process.wait(), kill_after)
    except TimeoutError:
        await terminate(process)
        return True
    return False


async def run_streaming(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    output: OutputFn,
    kill_after: float | None = None,
) -> ProcessResult:
    """Run ``argv``, passing its output to ``output`` as it arrives."""
    pumps = _Pumps(output)
    try:
        process = await _start(argv, cwd, env, pumps.child_fd("stdout"), pumps.child_fd("stderr"))
    except BaseException:
        pumps.abandon()
        raise
    await pumps.start()
    try:
        timed_out = await _wait(process, kill_after)
    except asyncio.CancelledError:
        await asyncio.shield(terminate(process))
        await pumps.drain()
        raise
    await pumps.drain()
    code = TIMEOUT_EXIT_CODE if timed_out else _exit_code(process.returncode)
    return ProcessResult(code, timed_out)


async def run_captured(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    kill_after: float | None = None,
) -> CapturedResult:
    """Run ``argv`` and collect its output."""
    chunks: dict[Stream, list[bytes]] = {"stdout": [], "stderr": []}
    result = await run_streaming(
        argv, cwd=cwd, env=env, output=lambda s, d: chunks[s].append(d), kill_after=kill_after
    )
    return CapturedResult(
        result.exit_code,
        b"".join(chunks["stdout"]),
        b"".join(chunks["stderr"]),
        result.timed_out,
    )
