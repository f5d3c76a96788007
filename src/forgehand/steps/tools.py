"""Steps as agent tools: tool definitions generated from step specs, and discovery.

A tool definition is ``{"name", "description", "input_schema"}`` where ``input_schema``
is a JSON Schema (draft 2020-12) object of the step's inputs. Names satisfy both
Anthropic's and OpenAI's rule ``^[a-zA-Z0-9_-]{1,64}$``.

A repository adds tools by putting step files under ``.forgehand/steps/``: each
``func.yml`` / ``step.yml`` (tool named after its directory) and each other ``*.yml`` file
outside such a directory (tool named after the file). The caller reads that tree from the
default branch only (trust boundary) and passes its path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgehand.steps.errors import Diagnostic, Position, StepError
from forgehand.steps.loader import load_step_file
from forgehand.steps.model import STEP_FILENAMES, ParamSpec, Spec, StepFile
from forgehand.steps.values import ValueType

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_STEPS_DIR = Path(".forgehand") / "steps"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_JSON_TYPES: dict[ValueType, dict[str, Any]] = {
    ValueType.STRING: {"type": "string"},
    ValueType.NUMBER: {"type": "number"},
    ValueType.BOOLEAN: {"type": "boolean"},
    ValueType.STRUCT: {"type": "object"},
    ValueType.ARRAY: {"type": "array", "items": {}},
}


def tool_name(text: str) -> str:
    """``text`` made into a valid tool name (invalid characters become ``_``)."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "_", text).strip("_")[:64]
    return name or "step"


def tool_name_from_path(path: str | Path, root: str | Path | None = None) -> str:
    """A tool name for a step file: its directory for func.yml/step.yml, else its stem."""
    file = Path(path)
    if root is not None:
        file = file.relative_to(root)
    parts = (
        list(file.parent.parts) if file.name in STEP_FILENAMES else [*file.parent.parts, file.stem]
    )
    return tool_name("_".join(p for p in parts if p not in {"", "."}))


def _property(param: ParamSpec) -> dict[str, Any]:
    schema: dict[str, Any] = dict(_JSON_TYPES[param.type])
    if param.description:
        schema["description"] = param.description
    if param.has_default:
        schema["default"] = param.default
    if param.sensitive:
        schema["writeOnly"] = True
    return schema


def input_schema(spec: Spec) -> dict[str, Any]:
    """JSON Schema (2020-12) of a step's inputs."""
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "type": "object",
        "properties": {name: _property(param) for name, param in spec.inputs.items()},
        "required": [name for name, param in spec.inputs.items() if param.required],
        "additionalProperties": False,
    }


def tool_definition(spec: Spec, name: str, description: str | None = None) -> dict[str, Any]:
    """The tool an LLM sees for a step: ``{name, description, input_schema}``."""
    if not TOOL_NAME_RE.match(name):
        raise ValueError(f"invalid tool name {name!r}: use tool_name() to derive a valid one")
    text = description or spec.description or f"Run the {name} step."
    return {"name": name, "description": text, "input_schema": input_schema(spec)}


@dataclass(frozen=True)
class ToolStep:
    """A step offered to the agent as a tool."""

    name: str
    step: StepFile
    definition: dict[str, Any]


@dataclass(frozen=True)
class ToolDiscovery:
    """The tools found in a repository, and the problems with the files that were not."""

    tools: list[ToolStep] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)


def _step_files(steps_dir: Path) -> list[Path]:
    files = sorted(p for p in steps_dir.rglob("*") if p.suffix in {".yml", ".yaml"} and p.is_file())
    step_dirs = {p.parent for p in files if p.name in STEP_FILENAMES}
    chosen: list[Path] = []
    for file in files:
        if file.name in STEP_FILENAMES:
            if file.name == STEP_FILENAMES[0] or not (file.parent / STEP_FILENAMES[0]).is_file():
                chosen.append(file)
        elif not any(parent in step_dirs for parent in file.parents):
            chosen.append(file)
    return chosen


def discover_tool_steps(repo: str | Path) -> ToolDiscovery:
    """Every step file under ``<repo>/.forgehand/steps/`` as a tool (blocking file I/O)."""
    steps_dir = Path(repo) / TOOL_STEPS_DIR
    if not steps_dir.is_dir():
        return ToolDiscovery()
    result = ToolDiscovery()
    names: dict[str, Path] = {}
    for file in _step_files(steps_dir):
        name = tool_name_from_path(file, steps_dir)
        if name in names:
            message = f"tool name {name!r} is already used by {names[name]}; rename one"
            result.diagnostics.append(Diagnostic(Position(str(file), 1, 1), message))
            continue
        try:
            step = load_step_file(file)
        except StepError as error:
            result.diagnostics.append(error.diagnostic())
            continue
        names[name] = file
        result.tools.append(ToolStep(name, step, tool_definition(step.spec, name)))
    return result
