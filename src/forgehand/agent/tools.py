"""The seam between the agent loop and the sandbox: `ToolExecutor`, and the built-in tools.

The loop offers `ToolExecutor.tools()` to the model and sends each call to
`ToolExecutor.call`. A command still running after `yield_after` seconds comes back with
a `handle`; the loop can then `wait` on it, `send_input` to it or `cancel` it.

The text helpers here (numbered lines, exactly-once edits, closest region) are shared by
every executor, so the fake and the runner-backed one answer alike.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Protocol

from forgehand.agent.model import ToolSpec

_STRING = {"type": "string"}
_LINE = {"type": "number", "minimum": 0}


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _spec(name: str, description: str, props: dict[str, Any], required: list[str]) -> ToolSpec:
    return ToolSpec(name=name, description=description, input_schema=_schema(props, required))


RUN = _spec(
    "run",
    "Run a shell command (bash) in the repository's root directory and return its combined "
    "stdout and stderr and exit code. A command still running after a while returns a "
    "handle; then use wait, send_input or cancel with it.",
    {
        "command": {**_STRING, "description": "the shell command line"},
        "timeout_seconds": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "kill the command after this many seconds (default 600)",
        },
    },
    ["command"],
)
READ_FILE = _spec(
    "read_file",
    "Read a text file, with line numbers. Give start_line and end_line to read a range.",
    {
        "path": {**_STRING, "description": "relative to the repository root"},
        "start_line": {**_LINE, "description": "first line to show (1-based)"},
        "end_line": {**_LINE, "description": "last line to show (inclusive); 0: the end"},
    },
    ["path"],
)
WRITE_FILE = _spec(
    "write_file",
    "Create or overwrite a file with the given content (parent directories are created).",
    {"path": _STRING, "content": _STRING},
    ["path", "content"],
)
EDIT_FILE = _spec(
    "edit_file",
    "Replace old_text with new_text in a file. old_text must occur exactly once: include "
    "enough surrounding lines to make it unique. Do not include line numbers.",
    {"path": _STRING, "old_text": _STRING, "new_text": _STRING},
    ["path", "old_text", "new_text"],
)
LIST_FILES = _spec(
    "list_files",
    "List files under a directory (recursively, .git excluded), optionally filtered by a "
    "glob pattern such as '*.py' or 'tests/**/test_*.py'.",
    {
        "path": {**_STRING, "description": "directory; default the repository root"},
        "pattern": {**_STRING, "description": "glob matched against relative paths or names"},
    },
    [],
)
SEARCH = _spec(
    "search",
    "Search file contents with an extended regular expression (grep -E); returns "
    "path:line:text for each match.",
    {
        "pattern": {**_STRING, "description": "extended regular expression"},
        "path": {**_STRING, "description": "file or directory; default the repository root"},
    },
    ["pattern"],
)

BUILTIN_TOOLS: tuple[ToolSpec, ...] = (RUN, READ_FILE, WRITE_FILE, EDIT_FILE, LIST_FILES, SEARCH)
BUILTIN_NAMES = frozenset(t.name for t in BUILTIN_TOOLS)


@dataclass(frozen=True)
class ToolOutcome:
    """What one tool call produced.

    `text` goes to the model (the loop clips it). `handle` is set while a command goes on
    after the yield time; `exit_code` once it has ended.
    """

    text: str
    is_error: bool = False
    exit_code: int | None = None
    handle: str | None = None


class ToolExecutor(Protocol):
    """Runs the agent's tools somewhere (a sandbox through the runner, or a fake)."""

    def tools(self) -> list[ToolSpec]:
        """The tools to offer the model."""
        ...

    async def call(
        self, name: str, arguments: dict[str, Any], *, yield_after: float
    ) -> ToolOutcome:
        """Run one tool call; a command still running after `yield_after` s gets a handle."""
        ...

    async def wait(self, handle: str, yield_after: float) -> ToolOutcome:
        """Output since the last look, until the command ends or `yield_after` passes."""
        ...

    async def send_input(self, handle: str, data: str, *, eof: bool = False) -> None:
        """Write to the command's stdin (and close it when `eof`)."""
        ...

    async def cancel(self, handle: str) -> ToolOutcome:
        """Stop the command (TERM, grace, KILL) and return its last output."""
        ...


# -- text helpers shared by executors ------------------------------------------------------


def numbered(text: str, start_line: float | None = None, end_line: float | None = None) -> str:
    """`text` with `cat -n` style line numbers, limited to the given range (0: the end)."""
    lines = text.splitlines()
    first = max(1, int(start_line or 1))
    last = min(len(lines), int(end_line or len(lines)))
    if first > len(lines) and lines:
        return f"[the file has {len(lines)} lines; start_line {first} is past its end]"
    body = "\n".join(f"{n:>6}\t{lines[n - 1]}" for n in range(first, last + 1))
    if first > 1 or last < len(lines):
        return f"[lines {first}-{last} of {len(lines)}]\n{body}"
    return body


def is_binary(data: bytes) -> bool:
    """Whether `data` looks like a binary file (a NUL in its first 8 KiB)."""
    return b"\0" in data[:8192]


def apply_edit(path: str, text: str, old: str, new: str) -> tuple[str | None, str]:
    """(new text, message) when `old` occurs exactly once; (None, what went wrong) otherwise."""
    if not old:
        return None, "old_text is empty: give the exact text to replace"
    count = text.count(old)
    if count == 1:
        return text.replace(old, new, 1), f"edited {path}: replaced 1 occurrence"
    if count > 1:
        return None, _several(path, text, old, count)
    return None, _closest(path, text, old)


def _several(path: str, text: str, old: str, count: int) -> str:
    lines, start = [], 0
    for _ in range(count):
        index = text.index(old, start)
        lines.append(text.count("\n", 0, index) + 1)
        start = index + 1
    where = ", ".join(str(n) for n in lines)
    return (
        f"old_text occurs {count} times in {path} (starting at lines {where}); include more "
        "surrounding lines so it matches exactly once"
    )


def _closest(path: str, text: str, old: str) -> str:
    lines = text.splitlines()
    want = old.splitlines() or [old]
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(old)
    best, best_ratio = 0, 0.0
    for start in range(max(1, len(lines) - len(want) + 1)):
        matcher.set_seq1("\n".join(lines[start : start + len(want)]))
        if matcher.real_quick_ratio() <= best_ratio or matcher.quick_ratio() <= best_ratio:
            continue
        ratio = matcher.ratio()
        if ratio > best_ratio:
            best, best_ratio = start, ratio
    if not lines or best_ratio < 0.3:
        return f"old_text was not found in {path}; read the file and copy the text exactly"
    region = numbered(text, best + 1, best + len(want))
    return (
        f"old_text was not found in {path}. The closest region ({best_ratio:.0%} similar) is "
        f"below; copy its text exactly (without the line numbers) and try again:\n{region}"
    )
