"""The typed model of a step file: a ``Spec`` (interface) and a ``Definition`` (body).

Every part keeps the ``Position`` it came from. Values that may hold ``${{ }}``
expressions (inputs passed to a step, env values, commands, scripts, outputs) are kept
as positioned YAML nodes so that later checks and evaluation can point at them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgehand.steps.errors import Position
from forgehand.steps.values import ValueType
from forgehand.steps.yamlpos import PMap, PScalar, PSeq

STEP_FILENAMES = ("func.yml", "step.yml")
"""Step file names, newest first: GitLab Functions use func.yml, older CI steps step.yml."""


@dataclass(frozen=True)
class ParamSpec:
    """One declared input or output."""

    name: str
    type: ValueType
    pos: Position
    default: Any = None
    has_default: bool = False
    sensitive: bool = False
    description: str | None = None

    @property
    def required(self) -> bool:
        """An input (or output) without a default must be given."""
        return not self.has_default


InputSpec = ParamSpec
OutputSpec = ParamSpec


@dataclass(frozen=True)
class Spec:
    """The interface of a step: its inputs and outputs."""

    inputs: Mapping[str, ParamSpec]
    outputs: Mapping[str, ParamSpec]
    pos: Position
    delegate_outputs: bool = False
    description: str | None = None

    def sensitive_inputs(self) -> list[str]:
        """Names of the inputs marked ``sensitive: true``."""
        return [name for name, spec in self.inputs.items() if spec.sensitive]


@dataclass(frozen=True)
class LocalRef:
    """A step file or directory relative to the referring file's directory."""

    path: str


@dataclass(frozen=True)
class BuiltinRef:
    """``builtin://NAME``: a step implemented natively by the runner."""

    name: str


@dataclass(frozen=True)
class GitRef:
    """``URL@REV`` (optionally ``URL/-/DIR@REV``) or ``{git: {url, rev, dir}}``."""

    url: str
    rev: str
    dir: str = ""


@dataclass(frozen=True)
class OciRef:
    """An OCI image reference; recognised only to be refused with a clear message."""

    text: str


StepRef = LocalRef | BuiltinRef | GitRef | OciRef


@dataclass(frozen=True)
class RunItem:
    """One item of a ``run:`` list: a referenced step or a shell script."""

    name: str
    pos: Position
    ref: StepRef | None = None
    ref_pos: Position | None = None
    script: PScalar | None = None
    inputs: PMap | None = None
    env: PMap | None = None


@dataclass(frozen=True)
class Exec:
    """``exec:``: an argv run without a shell, optionally in ``work_dir``."""

    command: PSeq
    pos: Position
    work_dir: PScalar | None = None


@dataclass(frozen=True)
class Definition:
    """The body of a step: ``exec`` or ``run``, plus ``env`` and ``outputs``."""

    pos: Position
    exec: Exec | None = None
    run: tuple[RunItem, ...] | None = None
    env: PMap | None = None
    outputs: PMap | None = None
    delegate: str | None = None
    delegate_pos: Position | None = None

    def item(self, name: str) -> RunItem | None:
        """The run item called ``name``."""
        return next((i for i in self.run or () if i.name == name), None)


@dataclass(frozen=True)
class StepFile:
    """A loaded step file."""

    path: str
    spec: Spec
    definition: Definition

    @property
    def directory(self) -> Path:
        """The directory the file lives in (``step_dir`` / ``func_dir``)."""
        return Path(self.path).parent
