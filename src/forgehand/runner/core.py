"""The runner daemon's core: the run registry and every run operation, without gRPC.

The gRPC servicer (``server.py``) and the in-process client (``client/local.py``) are both
thin layers over ``RunnerCore``, so they behave the same by construction.

Processes, pipes and journal writing belong to the keeper (``keeper.c``, see
``keeper_client``), a separate process that outlives the daemon. Per run the daemon keeps
a ``RunHandle``: the request, the journal directory and a wake-up event that attachers
wait on, set whenever the keeper says the run's journal grew. The daemon holds no other
state: on start it rebuilds the registry from the state dir, reconnects to the keeper
(starting one if none answers), and records runs that neither finished nor are known to
the keeper as LOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from forgehand import __version__
from forgehand._proto.runner.v1 import runner_pb2 as pb
from forgehand.runner import errors, keeper_start
from forgehand.runner.config import RunnerConfig
from forgehand.runner.journal import (
    JournalReader,
    Payload,
    journal_bytes,
    list_segments,
    parse_event,
    read_exit_record,
    write_lost_exit,
)
from forgehand.runner.keeper_client import KeeperClient
from forgehand.runner.keeper_launch import KeeperSettings

log = logging.getLogger(__name__)

PROTOCOL = "forgehand.runner.v1"
FEATURES = (
    "argv",
    "script",
    "step",
    "stdin",
    "pty",
    "timeout",
    "output-limit",
    "journal",
    "files",
    "session",
    "direct-hello",  # see forgehand.runner.direct
)
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_ARGS_BYTES = 1024 * 1024
PRUNE_INTERVAL = 60.0
FIRST_BATCH_BYTES = 64 * 1024
# How long the first batch waits for more when it holds only Started: a short command's
# Started, output and exit then leave in one message (the keeper announces a live run's
# Started after ANNOUNCE_DELAY, so the wait ends by then anyway).
STARTED_ALONE_WAIT = 0.003
CLOSE_WAIT_SECONDS = 10.0


@dataclass
class AttachBatch:
    """Serialized events (in seq order), or a handback when the wait time ran out."""

    events: list[Payload]
    handback: bool = False
    ended: bool = False
    final: bool = False  # the attach ends with this batch


class Wakeup:
    """Set once (when a run's journal grew or the run ended); any number may wait for it,
    each with its own timeout. Cheaper than ``wait_for(event.wait())``, which makes a
    task per wait, and attachers wait once per batch."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._set = False

    def set(self) -> None:
        self._set = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def wait(self, seconds: float | None = None) -> None:
        """Return once set, or after ``seconds`` (None: no limit)."""
        if self._set:
            return
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        # asyncio.wait does not cancel the shared future when one waiter is cancelled.
        await asyncio.wait((self._future,), timeout=seconds)


@dataclass
class RunHandle:
    run_id: str
    directory: Path
    request: pb.StartRequest
    created_ns: int
    exited: pb.Event | None = None
    pid: int = 0
    closed: bool = False
    final_bytes: int = 0  # journal size once the run has ended (it no longer changes)
    # Its journal is written by the live keeper (or was, to its end, in this daemon's
    # life): readers need not verify checksums (see JournalReader.read).
    trusted: bool = False
    _wakeup: Wakeup = field(default_factory=Wakeup)
    journal: Path = field(init=False)

    def __post_init__(self) -> None:
        self.journal = self.directory / "journal"

    @property
    def wakeup(self) -> Wakeup:
        return self._wakeup

    def notify(self) -> None:
        old, self._wakeup = self._wakeup, Wakeup()
        old.set()


class RunnerCore:
    """All run operations of one daemon. Use as ``async with RunnerCore(config) as core``."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.runs_dir = config.state_dir / "runs"
        self._runs: dict[str, RunHandle] = {}
        self._running: set[str] = set()  # ids of runs in _runs that have not ended
        self._unsized: dict[str, RunHandle] = {}  # ended runs, journals not measured yet
        self._start_lock = asyncio.Lock()
        self._roots = tuple(str(r) for r in config.file_roots())
        self._keeper = KeeperClient(
            KeeperSettings(
                state_dir=str(config.state_dir),
                journal_max_bytes=config.journal_max_bytes_per_run,
                memory_events=config.memory_events,
            ),
            self._on_notify,
            self._on_keeper_lost,
        )
        self._pruner: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._lock_fd = -1
        self._stopping = False
        self._finished_bytes = 0

    async def __aenter__(self) -> RunnerCore:
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_state_dir()
        try:
            await self._keeper.connect()
            await self._recover()
        except BaseException:
            await self._keeper.close()
            os.close(self._lock_fd)
            raise
        self._pruner = asyncio.create_task(self._prune_forever())
        return self

    def _lock_state_dir(self) -> None:
        path = self.config.state_dir / "daemon.lock"
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise errors.FailedPrecondition(
                f"another forgehand-runner daemon uses {self.config.state_dir}: stop it or "
                "choose another --state-dir"
            ) from None

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping = True
        for task in (self._pruner, self._reconnect):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for run in self._runs.values():
            run.closed = True
            run.notify()
        await self._keeper.close()
        os.close(self._lock_fd)

    # -- capabilities -------------------------------------------------------------------

    def capabilities(self) -> pb.CapabilitiesResponse:
        c = self.config
        return pb.CapabilitiesResponse(
            protocol=PROTOCOL,
            runner_version=__version__,
            features=list(FEATURES),
            limits=pb.Limits(
                max_runs=c.max_runs,
                max_message_bytes=c.max_message_bytes,
                journal_max_bytes_per_run=c.journal_max_bytes_per_run,
                journal_max_bytes_total=c.journal_max_bytes_total,
                max_stdin_chunk_bytes=c.max_stdin_chunk_bytes,
                finished_run_ttl_seconds=c.finished_run_ttl_seconds,
            ),
            file_roots=[str(r) for r in c.file_roots()],
        )

    # -- start --------------------------------------------------------------------------

    async def start(self, request: pb.StartRequest) -> tuple[str, bool]:
        """Start a run; returns (run_id, created). Idempotent by run id."""
        validate_start(request)
        async with self._start_lock:
            existing = self._runs.get(request.run_id)
            if existing is not None:
                if existing.request != request:
                    raise errors.AlreadyExists(
                        f"run {request.run_id!r} exists with a different request: "
                        "choose a new run id"
                    )
                return request.run_id, False
            self._check_capacity()
            run = await self._create(request)
        return run.run_id, True

    async def start_for_attach(self, request: pb.AttachRequest) -> None:
        """The start carried by an Attach (start-and-follow in one call). The attach is
        checked whole first: a request that cannot be followed starts nothing."""
        _check_wait(request.wait_seconds)
        if request.start.run_id != request.run_id:
            raise errors.InvalidArgument("attach: start.run_id must equal run_id")
        start = pb.StartRequest()
        start.CopyFrom(request.start)
        await self.start(start)

    def _check_capacity(self) -> None:
        running = len(self._running)
        if running >= self.config.max_runs:
            raise errors.ResourceExhausted(
                f"{running} runs are running, the limit is {self.config.max_runs}: "
                "wait for one to end or cancel one"
            )
        if self._journal_usage() >= self.config.journal_max_bytes_total:
            self._prune_for_space()
        if self._journal_usage() >= self.config.journal_max_bytes_total:
            raise errors.ResourceExhausted(
                "journal space is used up by running runs: close finished runs or raise "
                "journal_max_bytes_total"
            )

    def _journal_usage(self) -> int:
        """Finished runs' sizes are kept; only running runs' journals are measured."""
        self._size_finished()
        running = sum(journal_bytes(self._runs[r].journal) for r in self._running)
        return self._finished_bytes + running

    def _set_exited(self, run: RunHandle, exited: pb.Event | None) -> None:
        # A closed run is out of the registry and the accounting (close --force may stop
        # waiting for its exit): an exit an attacher reads later must not count its journal.
        if exited is not None and run.exited is None and not run.closed:
            self._running.discard(run.run_id)
            self._unsized[run.run_id] = run
            if len(self._unsized) == 1:
                # Sized after the exit has been sent on (a delay-0 timer runs after the
                # callbacks ready now): measuring a journal is not on a client's path.
                asyncio.get_running_loop().call_later(0, self._size_finished)
        run.exited = exited

    def _size_finished(self) -> None:
        for run in self._unsized.values():
            run.final_bytes = journal_bytes(run.journal)
            self._finished_bytes += run.final_bytes
        self._unsized.clear()

    def _drop(self, run: RunHandle) -> None:
        """Take a run out of the registry (its files are removed by the caller)."""
        run.closed = True
        run.notify()
        self._running.discard(run.run_id)
        self._size_finished()
        if self._runs.pop(run.run_id, None) is not None and run.exited is not None:
            self._finished_bytes -= run.final_bytes

    async def _create(self, request: pb.StartRequest) -> RunHandle:
        # The keeper makes the run's directory and stores request.pb in it before it
        # spawns anything, so a run the daemon did not live to register is still found.
        directory = self.runs_dir / request.run_id
        run = RunHandle(
            run_id=request.run_id,
            directory=directory,
            request=request,
            created_ns=time.time_ns(),
            trusted=True,
        )
        self._runs[run.run_id] = run
        self._running.add(run.run_id)
        try:
            start = keeper_start.digest(request, self.config.state_dir, self._roots)
            pid = await self._keeper.request("S", start.SerializeToString())
        except errors.RunnerError as exc:
            self._runs.pop(run.run_id, None)
            self._running.discard(run.run_id)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise errors.Unavailable(f"cannot start the run: {exc}") from exc
        run.pid = int(pid or 0)
        return run

    # -- keeper events ------------------------------------------------------------------

    def _on_notify(self, grown: list[str], ended: list[str]) -> None:
        for run_id in grown:
            run = self._runs.get(run_id)
            if run is not None:
                run.notify()
        loop = asyncio.get_running_loop()
        for run_id in ended:
            run = self._runs.get(run_id)
            if run is not None:
                run.notify()  # an attacher reads the exit from the journal, and records it
                loop.call_later(0, self._record_exit, run)

    def _record_exit(self, run: RunHandle) -> None:
        """Record an ended run's exit if no attacher has (the registry must show it)."""
        if run.exited is None and not run.closed:
            self._set_exited(run, read_exit_record(run.journal))
            run.notify()  # for those who wait for the registry (close --force)

    def _on_keeper_lost(self) -> None:
        if self._stopping:
            return
        self._reconnect = asyncio.create_task(self._recover_keeper())

    async def _recover_keeper(self) -> None:
        """The keeper died: runs it had are LOST; start a new keeper for new runs."""
        for run in self._runs.values():
            if run.exited is None:
                self._mark_lost(run, "the runner's keeper process died")
        try:
            await self._keeper.connect()
        except (OSError, errors.RunnerError):
            log.exception("cannot restart the runner's keeper; new runs will fail")

    def _mark_lost(self, run: RunHandle, why: str) -> None:
        run.trusted = False  # the lost exit goes after whatever the keeper left, torn or not
        exited = read_exit_record(run.journal)
        if exited is None:
            seq = _last_seq(run.journal) + 1
            message = f"the run was lost ({why}); its real exit status is unknown"
            log.warning("run %s: %s", run.run_id, message)
            exited = write_lost_exit(run.journal, seq, message)
        self._set_exited(run, exited)
        run.notify()

    async def _recover(self) -> None:
        """Rebuild the registry from the state dir after a (re)start."""
        live = set((await self._keeper.request("L")).decode().split("\n")) - {""}
        for directory in sorted(self.runs_dir.iterdir()):
            try:
                request = pb.StartRequest.FromString((directory / "request.pb").read_bytes())
            except (OSError, ValueError):
                log.warning("ignoring %s: no readable request.pb", directory)
                continue
            run = RunHandle(
                run_id=request.run_id,
                directory=directory,
                request=request,
                created_ns=directory.stat().st_mtime_ns,
            )
            self._set_exited(run, read_exit_record(run.journal))
            self._runs[run.run_id] = run
            if run.exited is None:
                self._running.add(run.run_id)
                run.trusted = run.run_id in live
            if run.exited is None and run.run_id not in live:
                self._mark_lost(run, "its keeper is gone")

    # -- attach -------------------------------------------------------------------------

    def _get(self, run_id: str) -> RunHandle:
        run = self._runs.get(run_id)
        if run is None or run.closed:
            raise errors.NotFound(f"no run {run_id!r}: it never existed or was closed")
        return run

    async def attach(
        self, run_id: str, after_seq: int, wait_seconds: float, max_batch_bytes: int = 0
    ) -> AsyncGenerator[AttachBatch, None]:
        """Replay and tail a run's events after ``after_seq``."""
        _check_wait(wait_seconds)
        run = self._get(run_id)
        budget = min(max_batch_bytes or self.config.attach_batch_bytes, self._batch_cap())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds if wait_seconds > 0 else None
        reader = JournalReader(run.journal, after_seq)
        try:
            async for batch in self._follow(run, reader, budget, deadline):
                yield batch
        finally:
            reader.close()

    def _batch_cap(self) -> int:
        return self.config.max_message_bytes // 2

    async def _follow(
        self, run: RunHandle, reader: JournalReader, budget: int, deadline: float | None
    ) -> AsyncIterator[AttachBatch]:
        loop = asyncio.get_running_loop()
        first = min(budget, FIRST_BATCH_BYTES)  # the first event reaches the client fast
        while True:
            wakeup = run.wakeup
            exited = run.exited
            # Journal files are local and page-cached; reads are bounded by the batch size.
            records = reader.read(first or budget, verify=not run.trusted)
            if first and exited is None and len(records) == 1 and records[0][0] == 1:
                records += await _more_after_started(run, reader, wakeup, first)
                exited = run.exited
            first = 0
            if records:
                exited = exited or self._exit_in(run, records[-1][1])
                done = exited is not None and reader.last_seq >= exited.seq
                yield AttachBatch([payload for _seq, payload in records], final=done)
                if done:
                    return
                continue
            if run.closed:
                raise errors.NotFound(f"run {run.run_id!r} was closed while attached")
            if exited is not None:
                if reader.last_seq < exited.seq:  # the journal lost it (disk full)
                    yield AttachBatch([exited.SerializeToString()], final=True)
                else:
                    yield AttachBatch([], ended=True, final=True)
                return
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                yield AttachBatch([], handback=True, final=True)
                return
            await wakeup.wait(timeout)

    def _exit_in(self, run: RunHandle, payload: Payload) -> pb.Event | None:
        """The run's exit, if this record is it. A client may learn of the exit from the
        journal before the keeper's notification arrives; the registry must not lag behind
        what a client has seen (a start right after would count the run as running)."""
        event = parse_event(payload)
        if not event.HasField("exited"):
            return None
        self._set_exited(run, event)
        return event

    # -- control ------------------------------------------------------------------------

    async def _control(self, run: RunHandle, kind: str, payload: bytes = b"") -> bytes:
        if run.exited is not None:
            raise errors.FailedPrecondition(f"run {run.run_id!r} has already ended")
        prefix = run.run_id.encode()
        return await self._keeper.request(kind, prefix + (b"\0" + payload if payload else b""))

    async def write_stdin(self, run_id: str, data: bytes, eof: bool) -> None:
        if len(data) > self.config.max_stdin_chunk_bytes:
            raise errors.InvalidArgument(
                f"stdin chunk of {len(data)} bytes is over the limit of "
                f"{self.config.max_stdin_chunk_bytes}: send smaller chunks"
            )
        run = self._get(run_id)
        if not data and eof and run.exited is not None:
            return  # closing the stdin of a finished run: nothing left to do
        await self._control(run, "I", (b"\x01" if eof else b"\x00") + data)

    async def resize_pty(self, run_id: str, rows: int, cols: int) -> None:
        if not (0 < rows <= 65535 and 0 < cols <= 65535):
            raise errors.InvalidArgument("rows and cols must be between 1 and 65535")
        await self._control(self._get(run_id), "R", struct.pack("<HH", rows, cols))

    async def cancel(self, run_id: str, grace_seconds: float) -> bool:
        if not math.isfinite(grace_seconds) or not 0 <= grace_seconds <= 3600:
            raise errors.InvalidArgument("grace_seconds must be between 0 and 3600")
        run = self._get(run_id)
        if run.exited is not None:
            return False
        grace = grace_seconds or 2.0
        try:
            answer = await self._control(run, "C", struct.pack("<d", grace))
        except errors.FailedPrecondition:
            return False
        return answer == b"1"

    # -- status, list, close ------------------------------------------------------------

    def status(self, run_id: str) -> pb.RunStatus:
        return self._status(self._get(run_id))

    def _status(self, run: RunHandle) -> pb.RunStatus:
        if not run.pid:
            run.pid = _started_pid(run.journal)
        status = pb.RunStatus(
            run_id=run.run_id,
            state=pb.RUN_STATE_EXITED if run.exited else pb.RUN_STATE_RUNNING,
            pid=run.pid,
            created_unix_ns=run.created_ns,
            request=run.request,
            journal_bytes=journal_bytes(run.journal),
        )
        if run.exited is not None:
            status.exited.CopyFrom(run.exited.exited)
            status.last_seq = run.exited.seq
        else:
            status.last_seq = _last_seq(run.journal)
        return status

    def list(self) -> list[pb.RunStatus]:
        runs = sorted(self._runs.values(), key=lambda r: r.created_ns)
        return [self._status(r) for r in runs if not r.closed]

    async def close(self, run_id: str, force: bool) -> None:
        run = self._get(run_id)
        if run.exited is None:
            if not force:
                raise errors.FailedPrecondition(
                    f"run {run_id!r} is still running: cancel it first, or close with force"
                )
            with contextlib.suppress(errors.FailedPrecondition):
                await self._control(run, "C", struct.pack("<d", 0.0))
            await self._wait_exited(run)
        await self._forget(run)

    async def _wait_exited(self, run: RunHandle) -> None:
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_SECONDS
        while run.exited is None and asyncio.get_running_loop().time() < deadline:
            await run.wakeup.wait(0.5)

    async def _forget(self, run: RunHandle) -> None:
        self._drop(run)
        await asyncio.to_thread(shutil.rmtree, run.directory, True)

    # -- pruning ------------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            await self.prune()

    async def prune(self) -> int:
        """Forget finished runs older than the TTL; returns how many were forgotten."""
        cutoff = time.time_ns() - int(self.config.finished_run_ttl_seconds * 1e9)
        stale = [r for r in self._runs.values() if r.exited and r.exited.time_unix_ns < cutoff]
        for run in stale:
            await self._forget(run)
        return len(stale)

    def _prune_for_space(self) -> None:
        finished = sorted(
            (r for r in self._runs.values() if r.exited is not None),
            key=lambda r: r.exited.time_unix_ns if r.exited else 0,
        )
        for run in finished:
            if self._journal_usage() < self.config.journal_max_bytes_total:
                return
            self._drop(run)
            shutil.rmtree(run.directory, ignore_errors=True)


async def _more_after_started(
    run: RunHandle, reader: JournalReader, wakeup: Wakeup, budget: int
) -> list[tuple[int, Payload]]:
    """What follows a run's Started within STARTED_ALONE_WAIT (often all of a short run)."""
    await wakeup.wait(STARTED_ALONE_WAIT)
    return reader.read(budget, verify=not run.trusted)


def _started_pid(journal: Path) -> int:
    reader = JournalReader(journal, 0)
    try:
        for _seq, payload in reader.read(4096):
            event = parse_event(payload)
            if event.HasField("started"):
                return event.started.pid
            break
    finally:
        reader.close()
    return 0


def _last_seq(journal: Path) -> int:
    """The highest seq in the journal (reads the newest segment only)."""
    segments = list_segments(journal)
    if not segments:
        return 0
    first, _path = segments[-1]
    reader = JournalReader(journal, first - 1)
    try:
        while reader.read(16 * 1024 * 1024):
            pass
    finally:
        reader.close()
    return reader.last_seq


def _check_wait(wait_seconds: float) -> None:
    if not math.isfinite(wait_seconds) or wait_seconds < 0:
        raise errors.InvalidArgument("wait_seconds must be a finite number >= 0")


def validate_start(request: pb.StartRequest) -> None:
    """Reject a malformed StartRequest with a message naming the field."""
    if not RUN_ID.match(request.run_id):
        raise errors.InvalidArgument(
            "run_id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}, got " + repr(request.run_id[:140])
        )
    _validate_work(request)
    _validate_env(request)
    if request.cwd and not os.path.isabs(request.cwd):
        raise errors.InvalidArgument(f"cwd must be an absolute path, got {request.cwd!r}")
    if request.cwd and not os.path.isdir(request.cwd):
        raise errors.InvalidArgument(f"cwd {request.cwd!r} is not a directory")
    for name in ("timeout_seconds", "cancel_grace_seconds"):
        value = getattr(request, name)
        if not math.isfinite(value) or value < 0:
            raise errors.InvalidArgument(f"{name} must be a finite number >= 0")
    if request.stdin not in (pb.STDIN_MODE_UNSPECIFIED, pb.STDIN_MODE_NONE, pb.STDIN_MODE_PIPE):
        raise errors.InvalidArgument(f"stdin mode {request.stdin} is not known")
    size = request.pty_size
    if size.rows > 65535 or size.cols > 65535:
        raise errors.InvalidArgument("pty_size rows and cols must be at most 65535")


def _validate_work(request: pb.StartRequest) -> None:
    work = request.WhichOneof("work")
    if work is None:
        raise errors.InvalidArgument("say what to run: set argv, script or step")
    if work == "step":
        _validate_step(request.step)
        return
    if work == "argv":
        args = list(request.argv.args)
        if not args or not args[0]:
            raise errors.InvalidArgument("argv must name a program in its first element")
        strings = args
    else:
        if not request.script.source:
            raise errors.InvalidArgument("script.source is empty")
        strings = [request.script.source, request.script.interpreter]
    if any("\0" in s for s in strings):
        raise errors.InvalidArgument("argv and script may not contain NUL characters")
    if sum(len(s) for s in strings) > MAX_ARGS_BYTES:
        raise errors.InvalidArgument(f"argv or script is over {MAX_ARGS_BYTES} bytes")


def _validate_step(step: pb.StepCall) -> None:
    if not step.ref or "\0" in step.ref or len(step.ref) > 4096:
        raise errors.InvalidArgument("step.ref must name a step (builtin://NAME, a path, URL@REV)")
    for name, value in (("work_dir", step.work_dir), ("cache_dir", step.cache_dir)):
        if value and (not os.path.isabs(value) or "\0" in value):
            raise errors.InvalidArgument(f"step.{name} must be absolute, got {value!r}")
    try:
        inputs = json.loads(step.inputs_json or "{}")
    except ValueError:
        inputs = None
    if not isinstance(inputs, dict):
        raise errors.InvalidArgument("step.inputs_json must be a JSON object")
    if len(step.inputs_json) > MAX_ARGS_BYTES:
        raise errors.InvalidArgument(f"step.inputs_json is over {MAX_ARGS_BYTES} bytes")


def _validate_env(request: pb.StartRequest) -> None:
    for key, value in request.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise errors.InvalidArgument(
                f"environment variable {key[:64]!r}: names must be non-empty without '=' or "
                "NUL, values without NUL"
            )
