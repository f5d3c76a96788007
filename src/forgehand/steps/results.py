"""The execution tree: what each step of a run did, as a typed, JSON-serialisable tree.

A ``StepResult`` is one node: the path of step names from the root (``("build",
"compile")``), a status, the outputs and exports it produced, the exit code of an
``exec``/``script`` step and the results of a ``run:`` step's children, in order.
The step engine builds it; the service stores and shows it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from forgehand.steps.masking import Masker


class StepStatus(StrEnum):
    """Where a step is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def finished(self) -> bool:
        """Whether the step will not change any more."""
        return self not in {StepStatus.PENDING, StepStatus.RUNNING}


@dataclass(frozen=True)
class StepResult:
    """One node of the execution tree."""

    name_path: tuple[str, ...]
    status: StepStatus = StepStatus.PENDING
    outputs: Mapping[str, Any] = field(default_factory=dict)
    exports: Mapping[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    error: str | None = None
    children: tuple[StepResult, ...] = ()

    @property
    def name(self) -> str:
        """The last element of the name path (``""`` for the root)."""
        return self.name_path[-1] if self.name_path else ""

    def walk(self) -> Iterator[StepResult]:
        """This node and its descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, *name_path: str) -> StepResult | None:
        """The descendant (or self) with ``name_path``."""
        return next((node for node in self.walk() if node.name_path == name_path), None)

    def masked(self, masker: Masker) -> StepResult:
        """A copy with secrets masked in outputs, exports and errors, recursively."""
        return replace(
            self,
            outputs=masker.mask(dict(self.outputs)),
            exports=masker.mask(dict(self.exports)),
            error=masker.mask_text(self.error) if self.error else None,
            children=tuple(child.masked(masker) for child in self.children),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict."""
        return {
            "name_path": list(self.name_path),
            "status": self.status.value,
            "outputs": dict(self.outputs),
            "exports": dict(self.exports),
            "exit_code": self.exit_code,
            "error": self.error,
            "children": [child.to_dict() for child in self.children],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        """The inverse of ``to_dict``."""
        return cls(
            name_path=tuple(data["name_path"]),
            status=StepStatus(data["status"]),
            outputs=dict(data.get("outputs", {})),
            exports=dict(data.get("exports", {})),
            exit_code=data.get("exit_code"),
            error=data.get("error"),
            children=tuple(cls.from_dict(child) for child in data.get("children", [])),
        )

    def to_json(self) -> str:
        """Serialise the tree to JSON."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StepResult:
        """Parse a tree serialised by ``to_json``."""
        return cls.from_dict(json.loads(text))
