"""The runner's domain types, as callers of ``RunnerClient`` see them.

These mirror the protocol's messages (``forgehand._proto.runner.v1``) without exposing
generated code to the rest of forgehand. Conversion lives here, next to the types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from forgehand._proto.runner.v1 import runner_pb2 as pb


class Stream(StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"
    PTY = "pty"


class ExitReason(StrEnum):
    """Why a run ended."""

    EXITED = "exited"
    SIGNALLED = "signalled"
    TIMEOUT = "timeout"
    OOM = "oom"
    LIMIT = "limit"
    CANCELLED = "cancelled"
    LOST = "lost"
    ERROR = "error"


_STREAMS = {
    pb.STREAM_STDOUT: Stream.STDOUT,
    pb.STREAM_STDERR: Stream.STDERR,
    pb.STREAM_PTY: Stream.PTY,
}
_REASONS = {
    pb.EXIT_REASON_EXITED: ExitReason.EXITED,
    pb.EXIT_REASON_SIGNALLED: ExitReason.SIGNALLED,
    pb.EXIT_REASON_TIMEOUT: ExitReason.TIMEOUT,
    pb.EXIT_REASON_OOM: ExitReason.OOM,
    pb.EXIT_REASON_LIMIT: ExitReason.LIMIT,
    pb.EXIT_REASON_CANCELLED: ExitReason.CANCELLED,
    pb.EXIT_REASON_LOST: ExitReason.LOST,
    pb.EXIT_REASON_ERROR: ExitReason.ERROR,
}


@dataclass(frozen=True)
class Started:
    seq: int
    time_ns: int
    pid: int


@dataclass(frozen=True)
class Output:
    seq: int
    time_ns: int
    stream: Stream
    data: bytes


@dataclass(frozen=True)
class Truncated:
    """Events first_seq..last_seq were dropped to bound the journal; ``bytes`` of output."""

    seq: int
    time_ns: int
    first_seq: int
    last_seq: int
    bytes: int


@dataclass(frozen=True)
class Exited:
    seq: int
    time_ns: int
    code: int
    signal: int
    reason: ExitReason
    message: str
    duration_seconds: float
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    max_rss_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.reason is ExitReason.EXITED and self.code == 0


class StepEventKind(StrEnum):
    STARTED = "started"
    FINISHED = "finished"
    RESULT = "result"


@dataclass(frozen=True)
class StepEvent:
    """A step of a step run started or finished (``path`` [] is the requested step), or the
    run's result tree arrived (``result``, the StepResult as a JSON-ready dict)."""

    seq: int
    time_ns: int
    kind: StepEventKind
    path: tuple[str, ...] = ()
    status: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    error: str = ""
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Handback:
    """Attach returned after its wait time with the run still going."""

    seq: int


Event = Started | Output | Truncated | Exited | StepEvent

_STEP_KINDS = {
    pb.StepEvent.KIND_STARTED: StepEventKind.STARTED,
    pb.StepEvent.KIND_FINISHED: StepEventKind.FINISHED,
    pb.StepEvent.KIND_RESULT: StepEventKind.RESULT,
}


def event_from_proto(event: pb.Event) -> Event:
    kind = event.WhichOneof("kind")
    if kind == "output":
        return Output(
            event.seq, event.time_unix_ns, _STREAMS[event.output.stream], event.output.data
        )
    if kind == "started":
        return Started(event.seq, event.time_unix_ns, event.started.pid)
    if kind == "truncated":
        t = event.truncated
        return Truncated(event.seq, event.time_unix_ns, t.first_seq, t.last_seq, t.bytes)
    if kind == "exited":
        return exited_from_proto(event.seq, event.time_unix_ns, event.exited)
    if kind == "step":
        return step_event_from_proto(event.seq, event.time_unix_ns, event.step)
    raise ValueError(f"event {event.seq} has no known kind")


def step_event_from_proto(seq: int, time_ns: int, step: pb.StepEvent) -> StepEvent:
    result = json.loads(step.result_json) if step.result_json else None
    return StepEvent(
        seq=seq,
        time_ns=time_ns,
        kind=_STEP_KINDS.get(step.kind, StepEventKind.FINISHED),
        path=tuple(step.path),
        status=step.status,
        outputs=json.loads(step.outputs_json) if step.outputs_json else {},
        exit_code=step.exit_code,
        error=step.error,
        result=result if isinstance(result, dict) else None,
    )


def exited_from_proto(seq: int, time_ns: int, e: pb.Exited) -> Exited:
    return Exited(
        seq=seq,
        time_ns=time_ns,
        code=e.code,
        signal=e.signal,
        reason=_REASONS.get(e.reason, ExitReason.ERROR),
        message=e.message,
        duration_seconds=e.duration_seconds,
        user_seconds=e.rusage.user_seconds,
        system_seconds=e.rusage.system_seconds,
        max_rss_bytes=e.rusage.max_rss_bytes,
    )


@dataclass(frozen=True)
class RunSpec:
    """What to run and how. Exactly one of argv and script is set."""

    argv: tuple[str, ...] = ()
    script: str = ""
    interpreter: str = ""
    step: str = ""
    """A step reference (builtin://NAME, a step file path, URL@REV); runs the step engine."""
    step_inputs: dict[str, Any] = field(default_factory=dict)
    step_work_dir: str = ""
    step_cache_dir: str = ""
    """Where the trusted side staged the git steps the step references (see
    ``forgehand.steps.prefetch``); empty: the runner fetches them itself."""
    cwd: str = ""
    env: dict[str, str] = field(default_factory=dict)
    stdin: bool = False
    pty: bool = False
    pty_rows: int = 0
    pty_cols: int = 0
    timeout_seconds: float = 0.0
    max_output_bytes: int = 0
    journal_max_bytes: int = 0
    cancel_grace_seconds: float = 0.0

    def to_proto(self, run_id: str) -> pb.StartRequest:
        request = pb.StartRequest(
            run_id=run_id,
            cwd=self.cwd,
            env=self.env,
            stdin=pb.STDIN_MODE_PIPE if self.stdin else pb.STDIN_MODE_NONE,
            pty=self.pty,
            pty_size=pb.PtySize(rows=self.pty_rows, cols=self.pty_cols),
            timeout_seconds=self.timeout_seconds,
            limits=pb.OutputLimits(
                max_output_bytes=self.max_output_bytes, journal_max_bytes=self.journal_max_bytes
            ),
            cancel_grace_seconds=self.cancel_grace_seconds,
        )
        if self.step:
            request.step.ref = self.step
            request.step.inputs_json = json.dumps(self.step_inputs)
            request.step.work_dir = self.step_work_dir
            request.step.cache_dir = self.step_cache_dir
        elif self.script:
            request.script.source = self.script
            request.script.interpreter = self.interpreter
        else:
            request.argv.args.extend(self.argv)
        return request


@dataclass
class RunResult:
    """Everything a finished run produced, collected by ``RunnerClient.run``."""

    run_id: str
    exit: Exited
    stdout: bytes = b""
    stderr: bytes = b""
    pty: bytes = b""
    truncated: list[Truncated] = field(default_factory=list)
    steps: list[StepEvent] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit.ok

    @property
    def step_result(self) -> dict[str, Any] | None:
        """A step run's result tree (StepResult as JSON), if the engine reported one."""
        for event in reversed(self.steps):
            if event.kind is StepEventKind.RESULT:
                return event.result
        return None


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    running: bool
    pid: int
    created_ns: int
    last_seq: int
    journal_bytes: int
    exit: Exited | None


def run_info_from_proto(status: pb.RunStatus) -> RunInfo:
    exited = None
    if status.state == pb.RUN_STATE_EXITED:
        exited = exited_from_proto(status.last_seq, 0, status.exited)
    return RunInfo(
        run_id=status.run_id,
        running=status.state == pb.RUN_STATE_RUNNING,
        pid=status.pid,
        created_ns=status.created_unix_ns,
        last_seq=status.last_seq,
        journal_bytes=status.journal_bytes,
        exit=exited,
    )


class FileType(StrEnum):
    REGULAR = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"


_FILE_TYPES = {
    pb.FILE_TYPE_REGULAR: FileType.REGULAR,
    pb.FILE_TYPE_DIRECTORY: FileType.DIRECTORY,
    pb.FILE_TYPE_SYMLINK: FileType.SYMLINK,
}


@dataclass(frozen=True)
class FileInfo:
    path: str
    type: FileType
    size: int
    mode: int
    mtime_ns: int
    symlink_target: str = ""


def file_info_from_proto(info: pb.FileInfo) -> FileInfo:
    return FileInfo(
        path=info.path,
        type=_FILE_TYPES.get(info.type, FileType.OTHER),
        size=info.size,
        mode=info.mode,
        mtime_ns=info.mtime_unix_ns,
        symlink_target=info.symlink_target,
    )
