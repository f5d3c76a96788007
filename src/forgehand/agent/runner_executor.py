"""`RunnerToolExecutor`: the agent's tools as runs and file RPCs of a forgehand runner.

`run` is a shell run in the work dir, streamed until the yield time, then handed back
with the run still going (`wait`, `send_input`, `cancel` continue it). The file tools use
the runner's file RPCs; `search` is a `grep -E` run. Runner refusals (missing file, path
outside the roots) are answered to the model as tool errors; a runner that is gone raises
`ExecutorFault`, which ends the agent's run.

Tools that are not built in here (repository steps, `builtin://` steps of the runner's
step engine) go through `_run_step`, the one place the step engine will plug in.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import json
import posixpath
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from forgehand.agent.exceptions import ExecutorFault
from forgehand.agent.model import ToolSpec
from forgehand.agent.tools import (
    BUILTIN_NAMES,
    BUILTIN_TOOLS,
    ToolOutcome,
    apply_edit,
    is_binary,
    numbered,
)
from forgehand.runner import errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.model import (
    Exited,
    ExitReason,
    FileType,
    Handback,
    Output,
    RunSpec,
    StepEvent,
    StepEventKind,
    Truncated,
)

MIB = 1024 * 1024
MAX_READ_BYTES = 4 * MIB
MAX_LISTED = 1000
MAX_MATCHES = 300
_MODEL_ERRORS = (
    errors.NotFound,
    errors.PermissionDenied,
    errors.InvalidArgument,
    errors.FailedPrecondition,
    errors.AlreadyExists,
    errors.ResourceExhausted,
)
Handler = Callable[[dict[str, Any], float], Awaitable[ToolOutcome]]
OomCount = Callable[[], Awaitable[int]]
"""How often the OOM killer struck in the sandbox so far (``CountsOomKills.oom_kills``)."""
OOM_NOTE = (
    "\n[the out-of-memory killer struck in the sandbox while this ran: it most likely "
    "ended for lack of memory]"
)


@dataclass
class _Pending:
    run_id: str
    last_seq: int
    result: dict[str, Any] | None = None  # a step run's StepResult, once it arrived
    oom_before: int | None = None  # the sandbox's OOM kills before it started


@dataclass(frozen=True)
class RunSettings:
    """How `run` commands are started in the sandbox."""

    shell: str = "bash"
    default_timeout_s: float = 600.0
    max_output_bytes: int = 8 * MIB
    cancel_grace_s: float = 2.0


class RunnerToolExecutor:
    """`ToolExecutor` over a `RunnerClient`; paths are relative to `work_dir` in the sandbox."""

    def __init__(
        self,
        client: RunnerClient,
        work_dir: str,
        tool_defs: Sequence[ToolSpec | Mapping[str, Any]] = BUILTIN_TOOLS,
        *,
        env: Mapping[str, str] | None = None,
        settings: RunSettings | None = None,
        step_refs: Mapping[str, str] | None = None,
        step_cache_dir: str = "",
        oom_kills: OomCount | None = None,
    ) -> None:
        """``oom_kills``: for sandboxes whose runner cannot tell a run the OOM killer
        ended (gVisor), so that its outcome says so."""
        self.client = client
        self.oom_kills = oom_kills
        self.step_refs = dict(step_refs or {})  # tool name -> step reference
        self.step_cache_dir = step_cache_dir  # git steps the trusted side staged, if any
        self.work_dir = posixpath.normpath(work_dir)
        self._tools = [
            t if isinstance(t, ToolSpec) else ToolSpec.model_validate(t) for t in tool_defs
        ]
        self.env = dict(env or {})
        self.settings = settings or RunSettings()
        self._pending: dict[str, _Pending] = {}
        self._handles = itertools.count(1)
        self._builtins: dict[str, Handler] = {
            "run": self._run,
            "read_file": self._read_file,
            "write_file": self._write_file,
            "edit_file": self._edit_file,
            "list_files": self._list_files,
            "search": self._search,
        }

    def tools(self) -> list[ToolSpec]:
        return list(self._tools)

    async def call(
        self, name: str, arguments: dict[str, Any], *, yield_after: float
    ) -> ToolOutcome:
        handler = self._builtins.get(name) if name in BUILTIN_NAMES else None
        if handler is None:
            return await self._guard(name, self._run_step(name, arguments, yield_after))
        return await self._guard(name, handler(arguments, yield_after))

    async def wait(self, handle: str, yield_after: float) -> ToolOutcome:
        pending = self._pending.get(handle)
        if pending is None:
            return _unknown_handle(handle, self._pending)
        return await self._guard("wait", self._follow(pending, handle, yield_after))

    async def send_input(self, handle: str, data: str, *, eof: bool = False) -> None:
        pending = self._pending.get(handle)
        if pending is None:
            raise KeyError(handle)
        try:
            await self.client.write_stdin(pending.run_id, data.encode(), eof=eof)
        except errors.FailedPrecondition:
            pass  # it ended meanwhile; the next wait shows how
        except errors.RunnerError as exc:
            raise ExecutorFault(f"the runner failed writing stdin: {exc}") from None

    async def cancel(self, handle: str) -> ToolOutcome:
        pending = self._pending.get(handle)
        if pending is None:
            return _unknown_handle(handle, self._pending)
        with contextlib.suppress(errors.NotFound):
            await self.client.cancel(pending.run_id, self.settings.cancel_grace_s)
        return await self._guard("cancel", self._follow(pending, handle, 0.0))

    # -- STEP ENGINE SEAM ---------------------------------------------------------------

    async def _run_step(
        self, name: str, arguments: dict[str, Any], yield_after: float
    ) -> ToolOutcome:
        """Run a tool that is a step (`builtin://NAME` or a repository step) through the
        runner's step engine, with `arguments` as its inputs; follow it like `_run`."""
        ref = self.step_refs.get(name)
        if ref is None and any(tool.name == name for tool in self._tools):
            return ToolOutcome(
                f"the tool {name!r} is offered but no step runs it (a forgehand setup "
                "error, not yours): use the other tools",
                is_error=True,
            )
        if ref is None:
            known = ", ".join(sorted(set(BUILTIN_NAMES) | set(self.step_refs)))
            return ToolOutcome(f"there is no tool {name!r}; the tools are: {known}", is_error=True)
        spec = RunSpec(
            step=ref,
            step_inputs=arguments,
            step_work_dir=self.work_dir,
            step_cache_dir=self.step_cache_dir,
            cwd=self.work_dir,
            env=self.env,
            timeout_seconds=self.settings.default_timeout_s,
            max_output_bytes=self.settings.max_output_bytes,
            cancel_grace_seconds=self.settings.cancel_grace_s,
        )
        return await self._start_and_follow(spec, yield_after)

    # -- commands -----------------------------------------------------------------------

    async def _run(self, arguments: dict[str, Any], yield_after: float) -> ToolOutcome:
        timeout = float(arguments.get("timeout_seconds") or self.settings.default_timeout_s)
        spec = RunSpec(
            script=str(arguments["command"]),
            interpreter=self.settings.shell,
            cwd=self.work_dir,
            env=self.env,
            stdin=True,
            timeout_seconds=timeout,
            max_output_bytes=self.settings.max_output_bytes,
            cancel_grace_seconds=self.settings.cancel_grace_s,
        )
        return await self._start_and_follow(spec, yield_after)

    async def _start_and_follow(self, spec: RunSpec, yield_after: float) -> ToolOutcome:
        oom_before = None if self.oom_kills is None else await self.oom_kills()
        run_id = await self.client.start(spec)
        try:
            return await self._follow(_Pending(run_id, 0, oom_before=oom_before), None, yield_after)
        except asyncio.CancelledError:  # nobody will hold a handle to it: stop it
            with contextlib.suppress(errors.RunnerError):
                await self.client.cancel(run_id, self.settings.cancel_grace_s)
            raise

    async def _follow(
        self, pending: _Pending, handle: str | None, yield_after: float
    ) -> ToolOutcome:
        """Output after `pending.last_seq` until the run ends or `yield_after` passes (0: end)."""
        parts: list[str] = []
        async for event in self.client.attach(pending.run_id, pending.last_seq, yield_after):
            if isinstance(event, Output):
                parts.append(event.data.decode("utf-8", "replace"))
            elif isinstance(event, Truncated):
                parts.append(f"\n[{event.bytes} bytes of output were dropped here]\n")
            elif isinstance(event, StepEvent) and event.kind is StepEventKind.RESULT:
                pending.result = event.result
            elif isinstance(event, Exited):
                return await self._ended(pending, handle, "".join(parts), event)
            if not isinstance(event, Handback):
                pending.last_seq = event.seq
        return self._still_running(pending, handle, "".join(parts), yield_after)

    async def _ended(
        self, pending: _Pending, handle: str | None, output: str, exited: Exited
    ) -> ToolOutcome:
        if handle is not None:
            self._pending.pop(handle, None)
        with contextlib.suppress(errors.RunnerError):
            await self.client.close_run(pending.run_id)
        code = exited.code if exited.reason is ExitReason.EXITED else -1
        oom = OOM_NOTE if await self._oom_struck(pending, exited) else ""
        if pending.result is not None:  # a step: its outputs or error are the answer
            outcome = _step_outcome(output, pending.result, code)
            return replace(outcome, text=outcome.text + oom)
        return ToolOutcome(f"{output}{_exit_note(exited)}{oom}", exit_code=code)

    async def _oom_struck(self, pending: _Pending, exited: Exited) -> bool:
        """Whether a run that failed without saying why did so as the OOM killer struck."""
        if self.oom_kills is None or pending.oom_before is None or exited.ok:
            return False
        if exited.reason not in (ExitReason.EXITED, ExitReason.SIGNALLED):
            return False
        return await self.oom_kills() > pending.oom_before

    def _still_running(
        self, pending: _Pending, handle: str | None, output: str, waited: float
    ) -> ToolOutcome:
        if handle is None:
            handle = f"cmd-{next(self._handles)}"
            self._pending[handle] = pending
        note = (
            f"\n[still running after {waited:g}s; handle {handle!r}: call wait to keep "
            "watching, send_input to type into it, or cancel to stop it]"
        )
        return ToolOutcome(f"{output}{note}", handle=handle)

    # -- files --------------------------------------------------------------------------

    async def _read_file(self, arguments: dict[str, Any], yield_after: float) -> ToolOutcome:
        path = str(arguments["path"])
        text = await self._read_text(path)
        if isinstance(text, ToolOutcome):
            return text
        if not text:
            return ToolOutcome(f"[{path} is empty]")
        return ToolOutcome(numbered(text, arguments.get("start_line"), arguments.get("end_line")))

    async def _read_text(self, path: str) -> str | ToolOutcome:
        full = self._path(path)
        info = await self.client.stat(full)
        if info.type is FileType.DIRECTORY:
            return ToolOutcome(f"{path} is a directory; use list_files", is_error=True)
        if info.size > MAX_READ_BYTES:
            return ToolOutcome(
                f"{path} is {info.size} bytes, too large to read whole; use search, or run "
                "`sed -n 'A,Bp'` on it",
                is_error=True,
            )
        data = await self.client.read_file(full)
        if is_binary(data):
            return ToolOutcome(f"{path} is a binary file of {len(data)} bytes", is_error=True)
        return data.decode("utf-8", "replace")

    async def _write_file(self, arguments: dict[str, Any], yield_after: float) -> ToolOutcome:
        path, content = str(arguments["path"]), str(arguments["content"])
        await self._write(path, content)
        return ToolOutcome(f"wrote {len(content.encode())} bytes to {path}")

    async def _write(self, path: str, content: str) -> None:
        full = self._path(path)
        mode = 0o644
        with contextlib.suppress(errors.NotFound):
            mode = (await self.client.stat(full)).mode or mode
        await self.client.write_file(full, content.encode(), mode=mode, create_parents=True)

    async def _edit_file(self, arguments: dict[str, Any], yield_after: float) -> ToolOutcome:
        path = str(arguments["path"])
        text = await self._read_text(path)
        if isinstance(text, ToolOutcome):
            return text
        edited, message = apply_edit(path, text, arguments["old_text"], arguments["new_text"])
        if edited is None:
            return ToolOutcome(message, is_error=True)
        await self._write(path, edited)
        return ToolOutcome(message)

    async def _list_files(self, arguments: dict[str, Any], yield_after: float) -> ToolOutcome:
        top = str(arguments.get("path") or ".")
        pattern = arguments.get("pattern")
        found, complete = await self._walk(self._path(top))
        if pattern:
            found = [(p, s) for p, s in found if _matches(p, str(pattern))]
        lines = [f"{p} ({s} bytes)" for p, s in found]
        if not complete:
            lines.append(f"[stopped after {MAX_LISTED} entries; list a subdirectory]")
        return ToolOutcome("\n".join(lines) or "[no files]")

    async def _walk(self, top: str) -> tuple[list[tuple[str, int]], bool]:
        found: list[tuple[str, int]] = []
        queue, seen = [top], 0
        while queue:
            directory = queue.pop(0)
            entries, _ = await self.client.list_dir(directory)
            for entry in entries:
                seen += 1
                if seen > MAX_LISTED:
                    return found, False
                name = posixpath.basename(entry.path)
                full = posixpath.join(directory, name)
                if entry.type is FileType.DIRECTORY and name != ".git":
                    queue.append(full)
                elif entry.type is not FileType.DIRECTORY:
                    found.append((posixpath.relpath(full, self.work_dir), entry.size))
        return found, True

    async def _search(self, arguments: dict[str, Any], yield_after: float) -> ToolOutcome:
        where = self._path(str(arguments.get("path") or "."))
        argv = ("grep", "-rInE", "--exclude-dir=.git", "-e", str(arguments["pattern"]), "--", where)
        spec = RunSpec(argv=argv, cwd=self.work_dir, env=self.env, timeout_seconds=120.0)
        result = await self.client.run(spec)
        with contextlib.suppress(errors.RunnerError):
            await self.client.close_run(result.run_id)
        if result.exit.code == 1 and result.exit.reason is ExitReason.EXITED:
            return ToolOutcome("[no matches]")
        if not result.ok:
            return ToolOutcome(
                f"search failed: {result.stderr.decode(errors='replace')}", is_error=True
            )
        prefix = self.work_dir.rstrip("/") + "/"
        lines = result.stdout.decode("utf-8", "replace").replace(prefix, "").splitlines()
        if len(lines) > MAX_MATCHES:
            extra = len(lines) - MAX_MATCHES
            lines = [*lines[:MAX_MATCHES], f"[{extra} more matches; narrow the pattern or path]"]
        return ToolOutcome("\n".join(lines))

    # -- plumbing -----------------------------------------------------------------------

    def _path(self, path: str) -> str:
        return posixpath.normpath(posixpath.join(self.work_dir, path))

    async def _guard(self, name: str, work: Awaitable[ToolOutcome]) -> ToolOutcome:
        try:
            return await work
        except _MODEL_ERRORS as exc:
            return ToolOutcome(f"{name} failed: {exc}", is_error=True)
        except errors.RunnerError as exc:
            raise ExecutorFault(f"the runner failed during {name}: {exc}") from None


def _exit_note(exited: Exited) -> str:
    reason = exited.reason
    if reason is ExitReason.EXITED:
        return f"\n[exit code {exited.code}]"
    if reason is ExitReason.TIMEOUT:
        return f"\n[killed: timed out after {exited.duration_seconds:.0f}s]"
    if reason is ExitReason.CANCELLED:
        return "\n[cancelled]"
    detail = f": {exited.message}" if exited.message else ""
    return f"\n[ended: {reason.value}{detail}]"


def _unknown_handle(handle: str, pending: Mapping[str, object]) -> ToolOutcome:
    known = ", ".join(pending) or "none"
    return ToolOutcome(f"no running command {handle!r} (running: {known})", is_error=True)


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(posixpath.basename(path), pattern)


def _step_outcome(output: str, result: dict[str, Any], code: int) -> ToolOutcome:
    status = result.get("status")
    lines = [output.rstrip()] if output.strip() else []
    if result.get("outputs"):
        lines.append("outputs: " + json.dumps(result["outputs"], indent=1, ensure_ascii=False))
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    lines.append(f"[step {status}]")
    return ToolOutcome("\n".join(lines), is_error=status != "succeeded", exit_code=code)
