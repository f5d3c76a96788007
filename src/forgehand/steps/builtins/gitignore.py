"""``.gitignore`` matching, and a tree walk that honours it.

Implemented as git documents it (gitignore(5)):

* blank lines and ``#`` comments are skipped; ``\\#`` and ``\\!`` escape; trailing spaces
  are dropped unless escaped with a backslash;
* ``!pattern`` re-includes what an earlier pattern excluded — but not inside a directory
  that is itself excluded, because that directory is never entered;
* ``pattern/`` matches directories only;
* a pattern with a ``/`` at the start or in the middle is anchored to the directory of
  its ``.gitignore``; without one it matches a name at any depth below it;
* ``*`` and ``?`` do not match ``/``; ``[...]`` is a class; ``**/x``, ``x/**`` and
  ``a/**/b`` span directories;
* deeper ``.gitignore`` files take precedence over shallower ones, later lines over
  earlier ones; ``.git/info/exclude`` applies at the root; ``.git`` is always skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _class(pattern: str, start: int) -> tuple[str, int] | None:
    """The regex for the ``[...]`` class at ``start`` and the index after it."""
    index = start + 1
    if index < len(pattern) and pattern[index] in "!^":
        index += 1
    if index < len(pattern) and pattern[index] == "]":
        index += 1
    end = pattern.find("]", index)
    if end == -1:
        return None
    body = pattern[start + 1 : end]
    negate = body[:1] in {"!", "^"}
    inner = "".join("\\" + c if c in "\\^[]" else c for c in body[1 if negate else 0 :])
    return f"[{'^' if negate else ''}{inner}]", end + 1


def _double_star(pattern: str, index: int) -> tuple[str, int] | None:
    """``**`` as a whole path component: the regex and the index after it."""
    if not pattern.startswith("**", index):
        return None
    at_start = index == 0 or pattern[index - 1] == "/"
    end = index + 2
    if not at_start or (end < len(pattern) and pattern[end] != "/"):
        return None
    if end == len(pattern):
        return ".*", end
    return "(?:.*/)?", end + 1


def translate(pattern: str) -> str:
    """A regex (for ``fullmatch``) equivalent to a git wildcard pattern."""
    out: list[str] = []
    index = 0
    while index < len(pattern):
        special = _double_star(pattern, index)
        if special is None and pattern[index] == "[":
            special = _class(pattern, index)
        if special is not None:
            out.append(special[0])
            index = special[1]
            continue
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            index += 1
            out.append(re.escape(pattern[index]))
        elif char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out)


@dataclass(frozen=True)
class Rule:
    """One pattern line of an ignore file, relative to ``base`` (``""`` or ``"dir/"``)."""

    regex: re.Pattern[str]
    base: str
    negate: bool
    dir_only: bool

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether this rule applies to ``path`` (relative to the walk root, POSIX)."""
        if self.dir_only and not is_dir:
            return False
        if not path.startswith(self.base):
            return False
        return self.regex.fullmatch(path[len(self.base) :]) is not None


def _strip_trailing_spaces(line: str) -> str:
    stripped = line.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(line):
        return stripped + " "
    return stripped


def parse_line(line: str, base: str) -> Rule | None:
    """The rule of one ignore-file line, or None for blanks and comments."""
    line = _strip_trailing_spaces(line.rstrip("\r\n"))
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.rstrip("/") if dir_only else line
    if not line:
        return None
    anchored = "/" in line
    regex = translate(line.lstrip("/"))
    if not anchored:
        regex = "(?:.*/)?" + regex
    return Rule(re.compile(regex, re.DOTALL), base, negate, dir_only)


def parse_ignore_file(text: str, base: str) -> list[Rule]:
    """Every rule of an ignore file whose directory is ``base`` (``""`` or ``"dir/"``)."""
    return [rule for line in text.splitlines() if (rule := parse_line(line, base))]


@dataclass(frozen=True)
class IgnoreRules:
    """The rules in force in one directory: shallower files first, later lines last."""

    rules: tuple[Rule, ...] = ()

    def ignored(self, path: str, is_dir: bool) -> bool:
        """Whether ``path`` (relative to the walk root, POSIX) is ignored."""
        for rule in reversed(self.rules):
            if rule.matches(path, is_dir):
                return not rule.negate
        return False

    def extended(self, directory: Path, base: str, name: str = ".gitignore") -> IgnoreRules:
        """These rules plus those of ``directory/name`` if it exists."""
        try:
            text = (directory / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return self
        return IgnoreRules(self.rules + tuple(parse_ignore_file(text, base)))


def _base(relative: str) -> str:
    return f"{relative}/" if relative else ""


def rules_for(root: Path, start: Path) -> IgnoreRules:
    """The rules in force in ``start``: root's ``.git/info/exclude`` and every
    ``.gitignore`` from ``root`` down to ``start``."""
    rules = IgnoreRules().extended(root / ".git" / "info", "", "exclude")
    rules = rules.extended(root, "")
    parts = start.relative_to(root).parts
    for depth in range(1, len(parts) + 1):
        relative = "/".join(parts[:depth])
        rules = rules.extended(root / relative, _base(relative))
    return rules


@dataclass(frozen=True)
class Entry:
    """A file found by ``walk``: its real path and its path relative to the walk root."""

    path: Path
    relative: str


def _children(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError:
        return []


def walk(root: Path, start: Path) -> Iterator[Entry]:
    """Files below ``start`` (a directory inside ``root``) that git would not ignore,
    sorted by path; directory symlinks are not followed."""
    yield from _walk(root, start, rules_for(root, start))


def _walk(root: Path, directory: Path, rules: IgnoreRules) -> Iterator[Entry]:
    for entry in _children(directory):
        if entry.name == ".git":
            continue
        relative = Path(entry.path).relative_to(root).as_posix()
        is_dir = entry.is_dir(follow_symlinks=False)
        if rules.ignored(relative, is_dir):
            continue
        if is_dir:
            child = Path(entry.path)
            yield from _walk(root, child, rules.extended(child, _base(relative)))
        elif not (entry.is_symlink() and entry.is_dir()):
            yield Entry(Path(entry.path), relative)
