"""`FakeToolExecutor`: a deterministic `ToolExecutor` over in-memory files, for unit tests.

Commands are scripted: `commands["pytest -q"] = FakeCommand("1 passed", polls=2)` makes
`run` hand back a handle, and the second `wait` on it returns the output and exit code.
Unknown commands exit 127. Every call is kept in `calls`, every input in `inputs`.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgehand.agent.model import ToolSpec
from forgehand.agent.tools import BUILTIN_TOOLS, ToolOutcome, apply_edit, numbered


@dataclass
class FakeCommand:
    """A scripted command: `output` and `exit_code` after `polls` waits (0: at once)."""

    output: str = ""
    exit_code: int = 0
    polls: int = 0


@dataclass
class FakeToolExecutor:
    """In-memory files and scripted commands behind the `ToolExecutor` protocol."""

    files: dict[str, str] = field(default_factory=dict)
    commands: Mapping[str, FakeCommand] = field(default_factory=dict)
    tool_defs: Sequence[ToolSpec] = BUILTIN_TOOLS
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    inputs: dict[str, list[str]] = field(default_factory=dict)
    _pending: dict[str, FakeCommand] = field(default_factory=dict)
    _handles: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def tools(self) -> list[ToolSpec]:
        return list(self.tool_defs)

    async def call(
        self, name: str, arguments: dict[str, Any], *, yield_after: float
    ) -> ToolOutcome:
        self.calls.append((name, dict(arguments)))
        handler = getattr(self, f"_{name}", None)
        if handler is None:
            return ToolOutcome(f"the fake executor has no tool {name!r}", is_error=True)
        outcome: ToolOutcome = handler(**arguments)
        return outcome

    async def wait(self, handle: str, yield_after: float) -> ToolOutcome:
        command = self._pending.get(handle)
        if command is None:
            return ToolOutcome(f"no running command {handle!r}", is_error=True)
        command.polls -= 1
        return self._progress(handle, command)

    async def send_input(self, handle: str, data: str, *, eof: bool = False) -> None:
        self.inputs.setdefault(handle, []).append(data)

    async def cancel(self, handle: str) -> ToolOutcome:
        if self._pending.pop(handle, None) is None:
            return ToolOutcome(f"no running command {handle!r}", is_error=True)
        return ToolOutcome("[cancelled]", exit_code=-1)

    def _progress(self, handle: str, command: FakeCommand) -> ToolOutcome:
        if command.polls > 0:
            return ToolOutcome(f"[still running; handle {handle!r}]", handle=handle)
        self._pending.pop(handle, None)
        text = f"{command.output}\n[exit code {command.exit_code}]"
        return ToolOutcome(text, exit_code=command.exit_code)

    def _run(self, command: str, timeout_seconds: float | None = None) -> ToolOutcome:
        scripted = self.commands.get(command)
        if scripted is None:
            return ToolOutcome(
                f"fake: {command}: command not found\n[exit code 127]", exit_code=127
            )
        copy = FakeCommand(scripted.output, scripted.exit_code, scripted.polls)
        handle = f"cmd-{next(self._handles)}"
        self._pending[handle] = copy
        return self._progress(handle, copy)

    def _read_file(
        self, path: str, start_line: int | None = None, end_line: int | None = None
    ) -> ToolOutcome:
        if path not in self.files:
            return ToolOutcome(f"read_file failed: no file {path!r}", is_error=True)
        return ToolOutcome(numbered(self.files[path], start_line, end_line))

    def _write_file(self, path: str, content: str) -> ToolOutcome:
        self.files[path] = content
        return ToolOutcome(f"wrote {len(content.encode())} bytes to {path}")

    def _edit_file(self, path: str, old_text: str, new_text: str) -> ToolOutcome:
        if path not in self.files:
            return ToolOutcome(f"edit_file failed: no file {path!r}", is_error=True)
        edited, message = apply_edit(path, self.files[path], old_text, new_text)
        if edited is None:
            return ToolOutcome(message, is_error=True)
        self.files[path] = edited
        return ToolOutcome(message)

    def _list_files(self, path: str = ".", pattern: str | None = None) -> ToolOutcome:
        prefix = "" if path in (".", "") else path.rstrip("/") + "/"
        names = [p for p in sorted(self.files) if p.startswith(prefix)]
        if pattern:
            names = [p for p in names if fnmatch.fnmatch(p, pattern)]
        return ToolOutcome("\n".join(f"{p} ({len(self.files[p])} bytes)" for p in names))

    def _search(self, pattern: str, path: str = ".") -> ToolOutcome:
        regex = re.compile(pattern)
        hits = [
            f"{name}:{number}:{line}"
            for name, text in sorted(self.files.items())
            for number, line in enumerate(text.splitlines(), 1)
            if regex.search(line)
        ]
        return ToolOutcome("\n".join(hits) or "[no matches]")
