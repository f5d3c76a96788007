"""File built-ins: ``read_file``, ``write_file``, ``edit_file``.

File I/O runs in a worker thread. Text is UTF-8; a file with a NUL byte in its first
8 KiB is treated as binary and refused. Writes are atomic: a temporary file beside the
target is written, given the target's mode, and renamed over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from forgehand.steps.builtins.base import Builtin, BuiltinContext, builtin, require_file
from forgehand.steps.errors import BuiltinError

MAX_READ_BYTES = 256 * 1024
BINARY_PROBE = 8192
NEW_FILE_MODE = 0o644
CONTEXT_LINES = 2
MAX_SHOWN_MATCHES = 20


def _binary_offset(head: bytes) -> int:
    return head.find(b"\0")


def _refuse_binary(shown: str, offset: int) -> BuiltinError:
    return BuiltinError(
        "invalid_argument",
        f"{shown} looks like a binary file (NUL byte at offset {offset}); it cannot be "
        "shown as text — inspect it with run, e.g. `file` or `xxd | head`",
    )


# --- read_file --------------------------------------------------------------------------

READ_SPEC = """
spec:
  description: >-
    Read a text file. Lines are numbered like `cat -n` (line number, tab, text); the
    numbers are not part of the file. At most 256 KiB of text is returned per call; read
    further with start_line. Binary files are refused.
  inputs:
    path:
      type: string
      description: File to read, relative to the work dir.
    start_line:
      type: number
      default: 1
      description: First line to return (1-based).
    end_line:
      type: number
      default: 0
      description: Last line to return (inclusive); 0 means the end of the file.
  outputs:
    content:
      type: string
      description: The numbered lines, followed by a note when the text was truncated.
    total_lines:
      type: number
      description: Number of lines in the whole file.
    start_line:
      type: number
      description: First line returned.
    end_line:
      type: number
      description: Last line returned (0 when none).
    truncated:
      type: boolean
      description: True when the 256 KiB cap cut the requested range short.
"""


@dataclass
class _Page:
    start: int
    end: int
    cap: int
    lines: list[str]
    size: int = 0
    last: int = 0
    total: int = 0
    truncated: bool = False

    def add(self, number: int, raw: bytes) -> None:
        self.total = number
        if number < self.start or (self.end and number > self.end) or self.truncated:
            return
        line = f"{number:>6}\t{raw.decode('utf-8', errors='replace').rstrip(chr(10) + chr(13))}\n"
        if self.size + len(line) > self.cap:
            self.truncated = True
            if self.lines:
                return
            line = line[: self.cap] + "\n"
        self.lines.append(line)
        self.size += len(line)
        self.last = number

    def note(self) -> str:
        if not self.truncated:
            return ""
        return (
            f"[truncated at {self.cap // 1024} KiB: showed lines {self.start}-{self.last} of "
            f"{self.total}; call read_file with start_line={self.last + 1} to read on]\n"
        )


def _scan(handle: BinaryIO, page: _Page, shown: str) -> None:
    head = handle.read(BINARY_PROBE)
    if (offset := _binary_offset(head)) != -1:
        raise _refuse_binary(shown, offset)
    handle.seek(0)
    for number, raw in enumerate(handle, start=1):
        page.add(number, raw)


def read_page(path: Path, shown: str, start: int, end: int, cap: int = MAX_READ_BYTES) -> _Page:
    """Lines ``start``..``end`` of a text file, numbered, within ``cap`` characters."""
    require_file(path, shown)
    page = _Page(start, end, cap, [])
    with path.open("rb") as handle:
        _scan(handle, page, shown)
    if page.total and start > page.total:
        raise BuiltinError(
            "invalid_argument",
            f"start_line {start} is past the end of {shown} ({page.total} lines)",
        )
    return page


@builtin("read_file", READ_SPEC)
async def read_file(call: BuiltinContext) -> dict[str, Any]:
    """Read a text file as numbered lines."""
    path = await call.path("path")
    start = call.integer("start_line", 1)
    end = call.integer("end_line", 0)
    if end and end < start:
        raise BuiltinError("invalid_argument", f"end_line {end} is before start_line {start}")
    page = await asyncio.to_thread(read_page, path, call.confinement.display(path), start, end)
    return {
        "content": "".join(page.lines) + page.note(),
        "total_lines": page.total,
        "start_line": start if page.lines else 0,
        "end_line": page.last,
        "truncated": page.truncated,
    }


# --- write_file -------------------------------------------------------------------------

WRITE_SPEC = """
spec:
  description: >-
    Create or overwrite a file with the given content, atomically (readers never see half
    a file). Missing parent directories are created. An existing file keeps its mode.
  inputs:
    path:
      type: string
      description: File to write, relative to the work dir.
    content:
      type: string
      description: The complete new content of the file.
  outputs:
    path:
      type: string
      description: The file written, relative to the work dir.
    bytes_written:
      type: number
      description: Size of the new content in bytes (UTF-8).
"""


def _existing_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return NEW_FILE_MODE


def _make_parents(path: Path, shown: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BuiltinError(
            "failed_precondition",
            f"cannot create the parent directories of {shown}: a parent is a file",
        ) from None


def write_atomic(path: Path, data: bytes, shown: str) -> None:
    """Replace ``path`` with ``data`` via a temporary file and a rename."""
    if path.is_dir():
        raise BuiltinError("invalid_argument", f"{shown} is a directory; give a file path")
    _make_parents(path, shown)
    mode = _existing_mode(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@builtin("write_file", WRITE_SPEC)
async def write_file(call: BuiltinContext) -> dict[str, Any]:
    """Write a whole file."""
    path = await call.path("path")
    shown = call.confinement.display(path)
    data = call.text("content").encode()
    await asyncio.to_thread(_write_or_fail, path, data, shown)
    return {"path": shown, "bytes_written": len(data)}


def _write_or_fail(path: Path, data: bytes, shown: str) -> None:
    try:
        write_atomic(path, data, shown)
    except OSError as exc:
        raise BuiltinError("failed_precondition", f"cannot write {shown}: {exc.strerror}") from None


# --- edit_file --------------------------------------------------------------------------

EDIT_SPEC = """
spec:
  description: >-
    Replace one exact occurrence of old_text in a file with new_text. old_text must match
    the file exactly once, whitespace included, and must not contain read_file's line
    numbers. When it matches nowhere, the error shows the closest region; when it matches
    several times, the error lists where, so you can add surrounding lines to old_text.
  inputs:
    path:
      type: string
      description: File to edit, relative to the work dir.
    old_text:
      type: string
      description: The exact text to replace; it must occur exactly once.
    new_text:
      type: string
      description: The replacement text (may be empty to delete old_text).
  outputs:
    path:
      type: string
      description: The file edited, relative to the work dir.
    line:
      type: number
      description: Line number where the replaced text started.
"""


def _read_text(path: Path, shown: str) -> str:
    require_file(path, shown)
    data = path.read_bytes()
    if (offset := _binary_offset(data[:BINARY_PROBE])) != -1:
        raise _refuse_binary(shown, offset)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BuiltinError(
            "invalid_argument", f"{shown} is not UTF-8 text (byte {exc.start}); edit it with run"
        ) from None


def _occurrences(text: str, old: str) -> list[int]:
    found: list[int] = []
    index = text.find(old)
    while index != -1:
        found.append(index)
        index = text.find(old, index + 1)
    return found


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _best_window(lines: list[str], old: str, size: int) -> tuple[float, int]:
    best_ratio, best_index = 0.0, 0
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(old)
    for index in range(max(1, len(lines) - size + 1)):
        matcher.set_seq1("\n".join(lines[index : index + size]))
        if matcher.real_quick_ratio() <= best_ratio or matcher.quick_ratio() <= best_ratio:
            continue
        ratio = matcher.ratio()
        if ratio > best_ratio:
            best_ratio, best_index = ratio, index
    return best_ratio, best_index


def closest_region(text: str, old: str) -> str:
    """Where ``old`` almost occurs in ``text``: numbered lines with a similarity score."""
    lines = text.splitlines()
    if not lines:
        return "The file is empty."
    size = max(1, len(old.splitlines()))
    ratio, index = _best_window(lines, old.rstrip("\n"), size)
    first, last = max(0, index - CONTEXT_LINES), min(len(lines), index + size + CONTEXT_LINES)
    shown = "".join(f"{n + 1:>6}\t{lines[n]}\n" for n in range(first, last))
    return (
        f"The closest region is lines {index + 1}-{index + size} ({ratio:.0%} similar), "
        f"shown with {CONTEXT_LINES} lines of context:\n{shown}"
    )


def _no_match(shown: str, text: str, old: str) -> BuiltinError:
    return BuiltinError(
        "not_found",
        f"old_text was not found in {shown}. {closest_region(text, old)}"
        "Copy the exact text from read_file (without the line-number prefix), whitespace "
        "included, and try again.",
    )


def _ambiguous(shown: str, text: str, offsets: list[int]) -> BuiltinError:
    lines = [str(_line_of(text, offset)) for offset in offsets[:MAX_SHOWN_MATCHES]]
    more = f" and {len(offsets) - MAX_SHOWN_MATCHES} more" if len(offsets) > 20 else ""
    return BuiltinError(
        "failed_precondition",
        f"old_text matches {len(offsets)} times in {shown} (starting at lines "
        f"{', '.join(lines)}{more}); add surrounding lines to old_text so it matches once",
    )


def edit_text(path: Path, shown: str, old: str, new: str) -> int:
    """Replace the single occurrence of ``old``; the line it started on."""
    text = _read_text(path, shown)
    offsets = _occurrences(text, old)
    if not offsets:
        raise _no_match(shown, text, old)
    if len(offsets) > 1:
        raise _ambiguous(shown, text, offsets)
    at = offsets[0]
    write_atomic(path, (text[:at] + new + text[at + len(old) :]).encode(), shown)
    return _line_of(text, at)


@builtin("edit_file", EDIT_SPEC)
async def edit_file(call: BuiltinContext) -> dict[str, Any]:
    """Replace one exact occurrence of a text."""
    path = await call.path("path")
    shown = call.confinement.display(path)
    old = call.text("old_text")
    if not old:
        raise BuiltinError(
            "invalid_argument", "old_text is empty; use write_file to create or replace a file"
        )
    line = await asyncio.to_thread(edit_text, path, shown, old, call.text("new_text"))
    return {"path": shown, "line": line}


BUILTINS: tuple[Builtin, ...] = (read_file, write_file, edit_file)
