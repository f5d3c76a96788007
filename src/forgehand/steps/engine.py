"""The step engine: executes a resolved step and reports to a ``StepSink``.

``StepEngine.run(ref, inputs)`` resolves a reference (``builtin://NAME``, a step file or
directory, a git ``URL@REV``) and executes it: inputs are bound and type-checked,
``${{ }}`` expressions evaluated, the environment layered as ``outputs.step_environment``
documents, ``exec:`` and ``script:`` processes run with their output streamed to the sink,
``${{ output_file }}`` / ``${{ export_file }}`` read back, outputs checked against the
spec (or delegated), and a failing ``run:`` item stops its sequence (the rest are
``skipped``). Every step emits ``step_started`` and ``step_finished`` events; sensitive
values are masked in output, events and the returned ``StepResult`` tree.

Run as ``python -m forgehand.steps.engine``, it is the process the runner starts for a
step; see ``main`` for its contract.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from forgehand.steps.builtins import BuiltinCatalog, BuiltinContext, Confinement, get_builtin
from forgehand.steps.errors import UNKNOWN_POSITION, BuiltinError, Position, StepError
from forgehand.steps.evaluation import (
    eval_env,
    exec_argv,
    exec_work_dir,
    item_inputs,
    item_script,
    sequence_outputs,
)
from forgehand.steps.event_wire import encode_step_event
from forgehand.steps.expressions import ExprContext
from forgehand.steps.masking import Masker, StreamMasker, sensitive_values
from forgehand.steps.model import RunItem, Spec, StepFile
from forgehand.steps.outputs import (
    bind_inputs,
    check_outputs,
    parse_export_file,
    parse_output_file,
    step_environment,
)
from forgehand.steps.process import Stream, run_streaming, shell_argv
from forgehand.steps.references import (
    CachedCheckouts,
    GitFetcher,
    ResolvedStep,
    Resolver,
    StepFetcher,
    request_reference,
)
from forgehand.steps.results import StepResult, StepStatus

Path_ = tuple[str, ...]


class StepSink(Protocol):
    """Where a running step's output and events go."""

    def output(self, stream: Literal["stdout", "stderr"], data: bytes) -> None:
        """Bytes a step's process wrote (secrets already masked)."""

    def event(self, event: dict[str, Any]) -> None:
        """``step_started`` / ``step_finished`` (and, from ``main``, ``result``)."""


@dataclass
class MemorySink:
    """A sink that keeps everything, for tests and for callers that want it all at the end."""

    chunks: list[tuple[Stream, bytes]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def output(self, stream: Stream, data: bytes) -> None:
        """Keep a chunk of output."""
        self.chunks.append((stream, data))

    def event(self, event: dict[str, Any]) -> None:
        """Keep an event."""
        self.events.append(event)

    def data(self, stream: Stream) -> bytes:
        """Everything written to ``stream``."""
        return b"".join(data for name, data in self.chunks if name == stream)


class _Secrets:
    """Every sensitive value seen so far in the run."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.masker = Masker()

    def add(self, values: Iterable[str]) -> None:
        new = {v for v in values if v} - self.values
        if new:
            self.values |= new
            self.masker = Masker(self.values)


class _MaskedOutput:
    """An ``OutputFn`` that masks secrets per stream before passing bytes to the sink."""

    def __init__(self, sink: StepSink, secrets: Iterable[str]) -> None:
        self._sink = sink
        values = list(secrets)
        self._maskers: dict[Stream, StreamMasker] = {
            "stdout": StreamMasker(values),
            "stderr": StreamMasker(values),
        }

    def __call__(self, stream: Stream, data: bytes) -> None:
        if masked := self._maskers[stream].feed(data):
            self._sink.output(stream, masked)

    def flush(self) -> None:
        for stream, masker in self._maskers.items():
            if rest := masker.flush():
                self._sink.output(stream, rest)


class _StepFiles:
    """The temporary ``output_file`` and ``export_file`` of one process step."""

    def __init__(self) -> None:
        self.directory = ""

    @property
    def output_file(self) -> str:
        return os.path.join(self.directory, "output.jsonl")

    @property
    def export_file(self) -> str:
        return os.path.join(self.directory, "export.jsonl")

    async def __aenter__(self) -> _StepFiles:
        self.directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="forgehand-step-")
        await asyncio.to_thread(self._touch)
        return self

    def _touch(self) -> None:
        for name in (self.output_file, self.export_file):
            Path(name).touch(mode=0o600)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(shutil.rmtree, self.directory, True)

    async def read(self, name: str) -> str:
        data = await asyncio.to_thread(Path(name).read_bytes)
        return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class _Call:
    """One invocation of a step: where it is in the tree and what the caller passes."""

    path: Path_
    step: ResolvedStep
    inputs: Mapping[str, Any]
    inherited: Mapping[str, str] = field(default_factory=dict)
    call_env: Mapping[str, str] = field(default_factory=dict)
    pos: Position = UNKNOWN_POSITION


def _message(error: StepError) -> str:
    known = error.position.line > 0 and not error.position.file.startswith("builtin://")
    return str(error) if known else error.message


def _failed(path: Path_, error: StepError) -> StepResult:
    if isinstance(error, BuiltinError):
        return StepResult(
            path,
            StepStatus.FAILED,
            dict(error.outputs),
            exit_code=error.exit_code,
            error=_message(error),
        )
    return StepResult(path, StepStatus.FAILED, error=_message(error))


def _exit_code(outputs: Mapping[str, Any]) -> int | None:
    code = outputs.get("exit_code")
    return int(code) if isinstance(code, int | float) and not isinstance(code, bool) else None


class StepEngine:
    """Executes steps for one run: shares exports and known secrets across its steps."""

    def __init__(
        self,
        *,
        work_dir: str | Path,
        sink: StepSink,
        cache_dir: str | Path | None = None,
        roots: Sequence[str | Path] = (),
        env: Mapping[str, str] | None = None,
        process_env: Mapping[str, str] | None = None,
        fetcher: StepFetcher | None = None,
    ) -> None:
        self.confinement = Confinement([work_dir, *roots])
        self.work_dir = str(self.confinement.work_dir)
        self.sink = sink
        self.run_env = dict(env or {})
        self.process_env = dict(os.environ if process_env is None else process_env)
        if fetcher is None and cache_dir is not None:
            fetcher = GitFetcher(Path(cache_dir), local=True)
        self.resolver = Resolver(fetcher=fetcher, builtins=BuiltinCatalog())
        self.exports: dict[str, str] = {}
        self._secrets = _Secrets()

    # --- entry points -----------------------------------------------------------------

    async def resolve(self, ref: str) -> ResolvedStep:
        """Resolve a reference; a relative path is taken relative to the work dir."""
        pos = Position("<request>", 1, 1)
        parsed = request_reference(ref, pos)
        return await self.resolver.resolve_reference(parsed, Path(self.work_dir), pos)

    async def run(self, ref: str, inputs: Mapping[str, Any] | None = None) -> StepResult:
        """Resolve ``ref`` and execute it; a reference that cannot be resolved fails."""
        try:
            resolved = await self.resolve(ref)
        except StepError as error:
            return await self._step((), self._raise(error))
        return await self.execute(resolved, inputs or {})

    async def execute(self, step: ResolvedStep, inputs: Mapping[str, Any]) -> StepResult:
        """Execute a resolved step with ``inputs``; the masked result tree."""
        call = _Call((), step, inputs)
        result = await self._step((), lambda: self._dispatch(call))
        return result.masked(self._secrets.masker)

    # --- events -----------------------------------------------------------------------

    @staticmethod
    def _raise(error: StepError) -> Callable[[], Awaitable[StepResult]]:
        async def fail() -> StepResult:
            raise error

        return fail

    async def _step(self, path: Path_, work: Callable[[], Awaitable[StepResult]]) -> StepResult:
        self.sink.event({"type": "step_started", "path": list(path)})
        try:
            result = await work()
        except StepError as error:
            result = _failed(path, error)
        except asyncio.CancelledError:
            self._finished(StepResult(path, StepStatus.CANCELLED, error="cancelled"))
            raise
        self._finished(result)
        return result

    def _finished(self, result: StepResult) -> None:
        shown = result.masked(self._secrets.masker)
        self.sink.event(
            {
                "type": "step_finished",
                "path": list(shown.name_path),
                "status": shown.status.value,
                "outputs": dict(shown.outputs),
                "exit_code": shown.exit_code,
                "error": shown.error,
            }
        )

    # --- dispatch ---------------------------------------------------------------------

    async def _dispatch(self, call: _Call) -> StepResult:
        spec = call.step.spec
        inputs = bind_inputs(spec, call.inputs, call.pos)
        self._secrets.add(sensitive_values(spec, inputs))
        file = call.step.file
        if file is None:
            return await self._builtin(call, inputs)
        if file.definition.exec is not None:
            return await self._exec(call, inputs, file)
        return await self._sequence(call, inputs, file)

    def _environment(
        self, inherited: Mapping[str, str], call_env: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        return step_environment(
            process=self.process_env,
            run=self.run_env,
            exports=self.exports,
            parent_env=inherited,
            call_env=call_env,
        )

    def _context(self, call: _Call, inputs: Mapping[str, Any], file: StepFile) -> ExprContext:
        return ExprContext(
            inputs=inputs,
            env=self._environment(call.inherited, call.call_env),
            step_dir=str(file.directory),
            work_dir=self.work_dir,
        )

    def _record(self, spec: Spec, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Remember the values of sensitive outputs, to mask them from now on."""
        self._secrets.add(sensitive_values(spec, inputs, outputs))

    # --- built-ins --------------------------------------------------------------------

    async def _builtin(self, call: _Call, inputs: Mapping[str, Any]) -> StepResult:
        name = call.step.key.removeprefix("builtin://")
        builtin = get_builtin(name)
        if builtin is None:
            raise StepError(f"builtin step {name!r} has no implementation in this engine")
        output = _MaskedOutput(self.sink, self._secrets.values)
        env = self._environment(call.inherited, call.call_env)
        context = BuiltinContext(inputs, self.confinement, env, output)
        try:
            outputs = await builtin.run(context)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise BuiltinError("failed_precondition", f"{exc.strerror or exc}{where}") from None
        finally:
            output.flush()
        outputs = check_outputs(outputs, call.step.spec, call.step.spec.pos)
        self._record(call.step.spec, inputs, outputs)
        return StepResult(call.path, StepStatus.SUCCEEDED, outputs, exit_code=_exit_code(outputs))

    # --- processes --------------------------------------------------------------------

    async def _process(self, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> int:
        output = _MaskedOutput(self.sink, self._secrets.values)
        try:
            result = await run_streaming(argv, cwd=cwd, env=env, output=output)
        finally:
            output.flush()
        return result.exit_code

    def _cwd(self, work_dir: str | None) -> str:
        if not work_dir:
            return self.work_dir
        return os.path.join(self.work_dir, work_dir)

    async def _exec(self, call: _Call, inputs: Mapping[str, Any], file: StepFile) -> StepResult:
        exec_ = file.definition.exec
        assert exec_ is not None
        async with _StepFiles() as files:
            context = replace(
                self._context(call, inputs, file),
                output_file=files.output_file,
                export_file=files.export_file,
            )
            context = replace(
                context, env={**context.env, **eval_env(file.definition.env, context)}
            )
            argv = exec_argv(exec_, context)
            code = await self._process(argv, self._cwd(exec_work_dir(exec_, context)), context.env)
            if code != 0:
                return self._exit_failure(call.path, argv[0], code)
            outputs = parse_output_file(
                await files.read(files.output_file), file.spec, "output_file"
            )
            exports = parse_export_file(await files.read(files.export_file), "export_file")
        self._record(file.spec, inputs, outputs)
        self.exports.update(exports)
        return StepResult(call.path, StepStatus.SUCCEEDED, outputs, exports, exit_code=0)

    @staticmethod
    def _exit_failure(path: Path_, program: str, code: int) -> StepResult:
        return StepResult(
            path, StepStatus.FAILED, exit_code=code, error=f"{program} exited with code {code}"
        )

    async def _script(
        self, path: Path_, item: RunItem, context: ExprContext, inherited: Mapping[str, str]
    ) -> StepResult:
        call_env = eval_env(item.env, context)
        async with _StepFiles() as files:
            env = self._environment(inherited, call_env)
            script = item_script(item, replace(context, env=env, export_file=files.export_file))
            assert script is not None
            argv = await asyncio.to_thread(shell_argv, script, env)
            code = await self._process(argv, self.work_dir, env)
            if code != 0:
                return self._exit_failure(path, "script", code)
            exports = parse_export_file(await files.read(files.export_file), "export_file")
        self.exports.update(exports)
        return StepResult(path, StepStatus.SUCCEEDED, exports=exports, exit_code=0)

    # --- sequences --------------------------------------------------------------------

    async def _sequence(self, call: _Call, inputs: Mapping[str, Any], file: StepFile) -> StepResult:
        definition = file.definition
        own_env = eval_env(definition.env, self._context(call, inputs, file))
        inherited = {**call.inherited, **call.call_env, **own_env}
        outputs: dict[str, Mapping[str, Any]] = {}
        children: list[StepResult] = []
        items = definition.run or ()
        for index, item in enumerate(items):
            child = await self._item(call, item, file, inputs, inherited, outputs)
            children.append(child)
            if child.status is not StepStatus.SUCCEEDED:
                return self._stopped(call.path, children, items[index + 1 :])
            outputs[item.name] = child.outputs
        values = self._sequence_outputs(call, inputs, file, inherited, outputs)
        self._record(file.spec, inputs, values)
        exports = {k: v for child in children for k, v in child.exports.items()}
        return StepResult(
            call.path, StepStatus.SUCCEEDED, values, exports, children=tuple(children)
        )

    @staticmethod
    def _stopped(path: Path_, children: list[StepResult], rest: Sequence[RunItem]) -> StepResult:
        failed = children[-1]
        skipped = [StepResult((*path, item.name), StepStatus.SKIPPED) for item in rest]
        return StepResult(
            path,
            StepStatus.FAILED,
            exit_code=failed.exit_code,
            error=f"step {failed.name!r} failed: {failed.error}",
            children=(*children, *skipped),
        )

    def _sequence_outputs(
        self,
        call: _Call,
        inputs: Mapping[str, Any],
        file: StepFile,
        inherited: Mapping[str, str],
        steps: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        definition = file.definition
        if definition.delegate is not None:
            return dict(steps.get(definition.delegate, {}))
        context = replace(
            self._context(call, inputs, file), env=self._environment(inherited), steps=steps
        )
        values = sequence_outputs(definition.outputs, context)
        return check_outputs(
            values, file.spec, definition.outputs.pos if definition.outputs else definition.pos
        )

    async def _item(
        self,
        parent: _Call,
        item: RunItem,
        file: StepFile,
        inputs: Mapping[str, Any],
        inherited: Mapping[str, str],
        steps: Mapping[str, Mapping[str, Any]],
    ) -> StepResult:
        path = (*parent.path, item.name)

        async def work() -> StepResult:
            context = ExprContext(
                inputs=inputs,
                env=self._environment(inherited),
                steps=dict(steps),
                step_dir=str(file.directory),
                work_dir=self.work_dir,
            )
            if item.script is not None:
                return await self._script(path, item, context, inherited)
            target = parent.step.children.get(item.name)
            if target is None:
                raise StepError(f"step {item.name!r} was not resolved", item.pos)
            call = _Call(
                path,
                target,
                item_inputs(item, context),
                inherited,
                eval_env(item.env, context),
                item.ref_pos or item.pos,
            )
            return await self._dispatch(call)

        return await self._step(path, work)


# --- python -m forgehand.steps.engine ---------------------------------------------------

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2
EVENTS_FD = 3
_REQUEST_KEYS = {"ref", "inputs", "env", "work_dir", "cache_dir", "prefetched", "roots"}


class BadRequest(Exception):
    """The request on stdin is not valid; the message says what to fix."""


@dataclass(frozen=True)
class StepRequest:
    """What the runner asks the engine process to run (one JSON object on stdin)."""

    ref: str
    work_dir: str
    inputs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    prefetched: bool = False
    """``cache_dir`` holds every git step the run needs, fetched by the trusted side: look
    checkouts up there, never fetch."""
    roots: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: bytes) -> StepRequest:
        """Parse and validate a request."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"stdin is not one JSON object: {exc}") from None
        if not isinstance(raw, dict):
            raise BadRequest("the request must be a JSON object")
        unknown = set(raw) - _REQUEST_KEYS
        if unknown:
            raise BadRequest(f"unknown keys {sorted(unknown)} (allowed: {sorted(_REQUEST_KEYS)})")
        return cls(
            ref=_required_text(raw, "ref"),
            work_dir=_absolute_dir(raw.get("work_dir"), "work_dir"),
            inputs=_object(raw, "inputs"),
            env=_string_map(raw),
            cache_dir=_optional_absolute(raw.get("cache_dir"), "cache_dir"),
            prefetched=_flag(raw, "prefetched"),
            roots=tuple(_absolute_dir(r, "each root") for r in _list(raw, "roots")),
        )


def _required_text(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key} must be a non-empty string")
    return value


def _object(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be a JSON object")
    return value


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise BadRequest(f"{key} must be a JSON array")
    return value


def _flag(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def _string_map(raw: Mapping[str, Any]) -> dict[str, str]:
    env = _object(raw, "env")
    if not all(isinstance(v, str) for v in env.values()):
        raise BadRequest("env values must be strings")
    return env


def _optional_absolute(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value):
        raise BadRequest(f"{what} must be an absolute path")
    return value


def _absolute_dir(value: Any, what: str) -> str:
    path = _optional_absolute(value, what)
    if path is None or not os.path.isdir(path):
        raise BadRequest(f"{what} must be the absolute path of an existing directory")
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FdSink:
    """Output to fds 1 and 2 byte for byte; events as StepEvent frames to ``events_fd`` if
    set (``event_wire``)."""

    def __init__(self, events_fd: int | None) -> None:
        self.events_fd = events_fd
        self._broken: set[int] = set()

    def _write(self, fd: int, data: bytes) -> None:
        if fd in self._broken:
            return
        try:
            _write_all(fd, data)
        except OSError:
            self._broken.add(fd)

    def output(self, stream: Stream, data: bytes) -> None:
        """Pass process output through."""
        self._write(1 if stream == "stdout" else 2, data)

    def event(self, event: dict[str, Any]) -> None:
        """One frame per event."""
        frame = encode_step_event(event) if self.events_fd is not None else None
        if self.events_fd is not None and frame is not None:
            self._write(self.events_fd, frame)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def _serve(request: StepRequest, sink: StepSink) -> StepResult:
    cache_dir = request.cache_dir or os.path.join(tempfile.gettempdir(), "forgehand-steps")
    engine = StepEngine(
        work_dir=request.work_dir,
        sink=sink,
        cache_dir=cache_dir,
        roots=request.roots,
        env=request.env,
        fetcher=CachedCheckouts(Path(cache_dir)) if request.prefetched else None,
    )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await engine.run(request.ref, request.inputs)
    except asyncio.CancelledError:
        task.uncancel()
        return StepResult((), StepStatus.CANCELLED, error="cancelled by a signal")


def main() -> int:
    """Run one step request from stdin.

    In: one JSON object on stdin, ``{"ref", "inputs", "env", "work_dir", "cache_dir",
    "prefetched", "roots"}`` (only ``ref`` and ``work_dir`` required; ``prefetched`` true
    means ``cache_dir`` already holds every git step and nothing is fetched). Out: the
    step's process output on fds 1 and 2, byte for byte (secrets masked); events as
    StepEvent frames on fd 3 when it is open (``event_wire``), the last one the result
    (``{"type": "result", "result": <StepResult as JSON object>}`` as a StepEvent).
    Exit code 0 when the step succeeded, 1 when it failed or was cancelled, 2 for a bad
    request (with the reason on stderr).
    """
    try:
        request = StepRequest.from_json(sys.stdin.buffer.read())
    except BadRequest as exc:
        print(f"forgehand step engine: bad request: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    sink = FdSink(EVENTS_FD if _fd_open(EVENTS_FD) else None)
    result = asyncio.run(_serve(request, sink))
    sink.event({"type": "result", "result": result.to_dict()})
    return EXIT_SUCCEEDED if result.status is StepStatus.SUCCEEDED else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
