"""The built-in steps, the agent's tool contract, reachable as ``builtin://NAME``.

One module per family: ``files`` (read_file, write_file, edit_file), ``tree``
(list_files, search), ``process`` (run, exec) and ``git`` (git_status, git_diff,
git_commit, git_branch, git_bundle). A family is imported only when one of its steps is
needed, which keeps the engine's start-up small. ``docs/tools.md`` documents every name,
input, output and error code; names and inputs are a stable contract.
"""

from __future__ import annotations

import importlib

from forgehand.steps.builtins.base import Builtin, BuiltinContext, Confinement
from forgehand.steps.model import Spec
from forgehand.steps.references import BuiltinRegistry

FAMILIES: dict[str, str] = {
    "read_file": "files",
    "write_file": "files",
    "edit_file": "files",
    "list_files": "tree",
    "search": "tree",
    "run": "process",
    "exec": "process",
    "git_status": "git",
    "git_diff": "git",
    "git_commit": "git",
    "git_branch": "git",
    "git_bundle": "git",
}
"""Built-in step name -> module under ``forgehand.steps.builtins`` that defines it."""


def get_builtin(name: str) -> Builtin | None:
    """The built-in step called ``name``, or None."""
    family = FAMILIES.get(name)
    if family is None:
        return None
    module = importlib.import_module(f"{__name__}.{family}")
    builtins: tuple[Builtin, ...] = module.BUILTINS
    return next((b for b in builtins if b.name == name), None)


def all_builtins() -> list[Builtin]:
    """Every built-in step, in name order."""
    return [b for name in sorted(FAMILIES) if (b := get_builtin(name)) is not None]


class BuiltinCatalog(BuiltinRegistry):
    """A ``BuiltinRegistry`` of the built-in steps that loads each family on first use."""

    def get(self, name: str) -> Spec | None:
        """The spec of ``builtin://name``."""
        found = get_builtin(name)
        return found.spec if found is not None else super().get(name)

    def names(self) -> list[str]:
        """Every built-in name, sorted."""
        return sorted({*FAMILIES, *super().names()})


__all__ = [
    "FAMILIES",
    "Builtin",
    "BuiltinCatalog",
    "BuiltinContext",
    "Confinement",
    "all_builtins",
    "get_builtin",
]
