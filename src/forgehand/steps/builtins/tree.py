"""Tree built-ins: ``list_files`` and ``search``, both honouring ``.gitignore``.

Paths in results are relative to the work dir, so they can be passed straight back to
the file built-ins. Results are capped; a capped result says so and how to narrow it.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgehand.steps.builtins.base import Builtin, BuiltinContext, Confinement, builtin
from forgehand.steps.builtins.gitignore import Entry, translate, walk
from forgehand.steps.errors import BuiltinError

MAX_FILES = 1000
MAX_MATCHES = 500
MAX_MATCH_LINE = 300
BINARY_PROBE = 8192


def _walk_root(confinement: Confinement, start: Path) -> Path:
    return next(root for root in confinement.roots if start == root or start.is_relative_to(root))


def _files(confinement: Confinement, start: Path) -> Iterator[Entry]:
    """Non-ignored files at or below ``start``; a file ``start`` is itself."""
    root = _walk_root(confinement, start)
    if start.is_file():
        yield Entry(start, start.relative_to(root).as_posix())
    elif start.is_dir():
        yield from walk(root, start)
    else:
        shown = confinement.display(start)
        raise BuiltinError("not_found", f"{shown} does not exist; list its parent directory")


# --- list_files -------------------------------------------------------------------------

LIST_SPEC = """
spec:
  description: >-
    List files below a directory, skipping what .gitignore ignores (and .git). A pattern
    without "/" matches file names at any depth ("*.py"); one with "/" matches the path
    relative to the directory ("src/**/test_*.py"). At most 1000 files are listed.
  inputs:
    path:
      type: string
      default: "."
      description: Directory to list, relative to the work dir.
    pattern:
      type: string
      default: "*"
      description: Glob (*, ?, [...], **) the files must match.
  outputs:
    files:
      type: array
      description: Matching file paths relative to the work dir, sorted.
    count:
      type: number
      description: Number of paths in files.
    truncated:
      type: boolean
      description: True when more files matched than were listed.
    note:
      type: string
      description: How to narrow the listing when it was truncated; empty otherwise.
"""


def _matcher(pattern: str) -> tuple[re.Pattern[str], bool]:
    """The compiled glob, and whether it matches whole relative paths (has a '/')."""
    if not pattern:
        raise BuiltinError("invalid_argument", 'pattern is empty; use "*" to list everything')
    return re.compile(translate(pattern), re.DOTALL), "/" in pattern


def list_matching(confinement: Confinement, start: Path, pattern: str) -> list[str]:
    """Up to ``MAX_FILES + 1`` matching paths, relative to the work dir."""
    regex, whole = _matcher(pattern)
    found: list[str] = []
    for entry in _files(confinement, start):
        relative = entry.path.relative_to(start).as_posix() if entry.path != start else ""
        subject = relative if whole else entry.path.name
        if regex.fullmatch(subject):
            found.append(confinement.display(entry.path))
            if len(found) > MAX_FILES:
                break
    return found


@builtin("list_files", LIST_SPEC)
async def list_files(call: BuiltinContext) -> dict[str, Any]:
    """List non-ignored files."""
    start = await call.path("path")
    found = await asyncio.to_thread(list_matching, call.confinement, start, call.text("pattern"))
    truncated = len(found) > MAX_FILES
    note = (
        f"showing the first {MAX_FILES} files; give a deeper path or a narrower pattern"
        if truncated
        else ""
    )
    files = found[:MAX_FILES]
    return {"files": files, "count": len(files), "truncated": truncated, "note": note}


# --- search -----------------------------------------------------------------------------

SEARCH_SPEC = """
spec:
  description: >-
    Search file contents with a Python regular expression, line by line, skipping
    ignored and binary files. Results are "file:line: text", at most 500 of them.
  inputs:
    pattern:
      type: string
      description: Python regular expression (re module syntax) searched in each line.
    path:
      type: string
      default: "."
      description: File or directory to search, relative to the work dir.
  outputs:
    matches:
      type: string
      description: >-
        One "file:line: text" per matching line; a note at the end if capped.
    count:
      type: number
      description: Number of matching lines reported.
    truncated:
      type: boolean
      description: True when the search stopped at the cap.
"""


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BuiltinError(
            "invalid_argument", f"invalid regular expression {pattern!r}: {exc}"
        ) from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open("rb") as handle:
            if b"\0" in handle.read(BINARY_PROBE):
                return
            handle.seek(0)
            for number, raw in enumerate(handle, start=1):
                yield number, raw.decode("utf-8", errors="replace").rstrip("\r\n")
    except OSError:
        return


def _shorten(line: str) -> str:
    return line if len(line) <= MAX_MATCH_LINE else line[:MAX_MATCH_LINE] + "…"


def _searchable(confinement: Confinement, entry: Entry) -> Path | None:
    real = Path(os.path.realpath(entry.path))
    return real if confinement.contains(real) and real.is_file() else None


def search_tree(confinement: Confinement, start: Path, regex: re.Pattern[str]) -> list[str]:
    """Up to ``MAX_MATCHES + 1`` ``file:line: text`` results."""
    results: list[str] = []
    for entry in _files(confinement, start):
        real = _searchable(confinement, entry)
        if real is None:
            continue
        shown = confinement.display(entry.path)
        for number, line in _text_lines(real):
            if regex.search(line):
                results.append(f"{shown}:{number}: {_shorten(line)}")
                if len(results) > MAX_MATCHES:
                    return results
    return results


@builtin("search", SEARCH_SPEC)
async def search(call: BuiltinContext) -> dict[str, Any]:
    """Regex search over non-ignored text files."""
    regex = _compile(call.text("pattern"))
    start = await call.path("path")
    found = await asyncio.to_thread(search_tree, call.confinement, start, regex)
    truncated = len(found) > MAX_MATCHES
    shown = found[:MAX_MATCHES]
    text = "".join(f"{line}\n" for line in shown)
    if truncated:
        text += f"[stopped at {MAX_MATCHES} matches; narrow the pattern or the path]\n"
    return {"matches": text, "count": len(shown), "truncated": truncated}


BUILTINS: tuple[Builtin, ...] = (list_files, search)
