"""What every built-in step shares: its definition, its call context and path confinement.

A built-in is a ``Builtin``: a name, a ``Spec`` loaded from YAML (so its tool schema is
generated like any other step's) and an async function from a ``BuiltinContext`` to its
outputs. Failures are ``BuiltinError``s whose ``code`` tells the agent what went wrong.

Paths given to file built-ins are relative to the work dir (the first root) unless
absolute, and are resolved with every symlink followed; the result must lie inside one
of the roots, otherwise the call fails with ``permission_denied`` before anything is read
or written.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgehand.steps.errors import BuiltinError
from forgehand.steps.loader import load_spec_text
from forgehand.steps.model import Spec
from forgehand.steps.process import OutputFn

MAX_PATH = 4096


class Confinement:
    """The directories file built-ins may touch; the first is the work dir."""

    def __init__(self, roots: Sequence[str | Path]) -> None:
        if not roots:
            raise ValueError("Confinement needs at least one root")
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)

    @property
    def work_dir(self) -> Path:
        """The first root, against which relative paths are resolved."""
        return self.roots[0]

    def contains(self, path: Path) -> bool:
        """Whether a resolved path lies inside a root."""
        return any(path == root or path.is_relative_to(root) for root in self.roots)

    def resolve(self, path: str) -> Path:
        """``path`` resolved with symlinks followed; it must stay inside a root."""
        if not path or len(path) > MAX_PATH or "\0" in path:
            raise BuiltinError("invalid_argument", "path must be 1 to 4096 characters, no NUL")
        candidate = Path(path) if os.path.isabs(path) else self.work_dir / path
        resolved = Path(os.path.realpath(candidate))
        if not self.contains(resolved):
            where = ", ".join(str(root) for root in self.roots)
            raise BuiltinError(
                "permission_denied",
                f"{path!r} is outside the work dir ({where}), directly or through a "
                "symlink; use a path inside the work dir",
            )
        return resolved

    def display(self, path: Path) -> str:
        """``path`` as the agent should write it: relative to the work dir when inside it."""
        if path == self.work_dir:
            return "."
        if path.is_relative_to(self.work_dir):
            return path.relative_to(self.work_dir).as_posix()
        return str(path)


@dataclass(frozen=True)
class BuiltinContext:
    """What a built-in runs with: bound inputs, confinement, environment and output."""

    inputs: Mapping[str, Any]
    confinement: Confinement
    env: Mapping[str, str]
    output: OutputFn

    @property
    def work_dir(self) -> Path:
        """The directory commands run in."""
        return self.confinement.work_dir

    def text(self, name: str) -> str:
        """A string input."""
        return str(self.inputs[name])

    async def path(self, name: str) -> Path:
        """A path input resolved and confined (in a worker thread: it touches the disk)."""
        return await asyncio.to_thread(self.confinement.resolve, self.text(name))

    def integer(self, name: str, minimum: int) -> int:
        """A number input that must be a whole number of at least ``minimum``."""
        value = self.inputs[name]
        if not isinstance(value, int | float) or value != int(value) or value < minimum:
            raise BuiltinError(
                "invalid_argument", f"{name} must be a whole number >= {minimum}, not {value!r}"
            )
        return int(value)


BuiltinFn = Callable[[BuiltinContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Builtin:
    """A step implemented natively, reachable as ``builtin://NAME``."""

    name: str
    spec: Spec
    run: BuiltinFn


def builtin(name: str, spec_yaml: str) -> Callable[[BuiltinFn], Builtin]:
    """Decorator: turn an async function into a ``Builtin`` with the spec in ``spec_yaml``."""

    def wrap(function: BuiltinFn) -> Builtin:
        return Builtin(name, load_spec_text(spec_yaml, f"builtin://{name}"), function)

    return wrap


def require_file(path: Path, shown: str) -> None:
    """Fail with ``not_found`` / ``invalid_argument`` unless ``path`` is a regular file."""
    if not path.exists():
        raise BuiltinError("not_found", f"{shown} does not exist; check the path with list_files")
    if path.is_dir():
        raise BuiltinError("invalid_argument", f"{shown} is a directory; use list_files on it")
    if not path.is_file():
        raise BuiltinError("invalid_argument", f"{shown} is not a regular file")
