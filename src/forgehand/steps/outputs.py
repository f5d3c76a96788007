"""The output/export file protocol, input binding, and environment precedence.

Output file (``${{ output_file }}``): JSON Lines, one ``{"name": N, "value": V}`` object
per line, as GitLab's step runner reads it. Every name must be a declared output and
every value must match its declared type; a later line for the same name wins; outputs
not written take their default, and a declared output without default that was not
written is an error.

Export file (``${{ export_file }}``): JSON Lines ``{"name": VAR, "value": "text"}``;
dotenv ``VAR=value`` lines are accepted too. Exports become environment variables of
every later step of the run (they are never unset).

Environment precedence, highest first (GitLab CI steps documentation, "Environment
variables"):

1. ``env:`` of the step's own definition (``env`` in its step.yml/func.yml);
2. ``env:`` given to the step where a ``run:`` item calls it;
3. ``env:`` of the enclosing ``run:`` definition (applies to all its steps);
4. variables exported by earlier steps through ``${{ export_file }}``;
5. the environment the runner starts the run with (job/run variables);
6. the environment of the sandbox process itself.

``step_environment`` implements exactly this order; callers pass the layers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from forgehand.steps.errors import OutputProtocolError, Position, StepTypeError
from forgehand.steps.model import ParamSpec, Spec
from forgehand.steps.values import describe, matches

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _json_line(line: str, pos: Position) -> tuple[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise OutputProtocolError(f"not a JSON line ({exc.msg})", pos) from None
    if not isinstance(record, dict) or set(record) != {"name", "value"}:
        raise OutputProtocolError('each line must be {"name": ..., "value": ...}', pos)
    if not isinstance(record["name"], str):
        raise OutputProtocolError("name must be a string", pos)
    return record["name"], record["value"]


def _lines(text: str, filename: str) -> list[tuple[str, Position]]:
    return [
        (line, Position(filename, number, 1))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]


def _check_output(name: str, value: Any, declared: Mapping[str, ParamSpec], pos: Position) -> None:
    param = declared.get(name)
    if param is None:
        known = ", ".join(declared) or "none declared"
        raise OutputProtocolError(
            f"output {name!r} is not declared in spec (outputs: {known})", pos
        )
    if not matches(value, param.type):
        raise StepTypeError(
            f"output {name!r} must be a {param.type.value}, not {describe(value)}", pos
        )


def complete_outputs(
    values: Mapping[str, Any], declared: Mapping[str, ParamSpec], pos: Position
) -> dict[str, Any]:
    """Apply defaults; a required output that is missing is an error."""
    result = dict(values)
    for name, param in declared.items():
        if name in result:
            continue
        if param.required:
            raise OutputProtocolError(f"step did not write required output {name!r}", pos)
        result[name] = param.default
    return result


def check_outputs(values: Mapping[str, Any], spec: Spec, pos: Position) -> dict[str, Any]:
    """``values`` checked against ``spec.outputs`` (names and types), defaults applied."""
    if spec.delegate_outputs:
        return dict(values)
    for name, value in values.items():
        _check_output(name, value, spec.outputs, pos)
    return complete_outputs(values, spec.outputs, pos)


def parse_output_file(text: str, spec: Spec, filename: str = "<output_file>") -> dict[str, Any]:
    """The typed outputs a step wrote; validated against ``spec.outputs``."""
    values: dict[str, Any] = {}
    for line, pos in _lines(text, filename):
        name, value = _json_line(line, pos)
        if not spec.delegate_outputs:
            _check_output(name, value, spec.outputs, pos)
        values[name] = value
    if spec.delegate_outputs:
        return values
    return complete_outputs(values, spec.outputs, Position(filename, 1, 1))


def _export_line(line: str, pos: Position) -> tuple[str, str]:
    if line.lstrip().startswith("{"):
        name, value = _json_line(line, pos)
    else:
        name, sep, value = line.partition("=")
        if not sep:
            raise OutputProtocolError('expected {"name": ..., "value": ...} or NAME=value', pos)
        name = name.removeprefix("export ").strip()
    if not _ENV_NAME.match(name):
        raise OutputProtocolError(f"invalid environment variable name {name!r}", pos)
    if not isinstance(value, str):
        raise OutputProtocolError(f"export {name!r} must be a string, not {describe(value)}", pos)
    return name, value


def parse_export_file(text: str, filename: str = "<export_file>") -> dict[str, str]:
    """Environment variables a step exported; later lines win."""
    return dict(_export_line(line, pos) for line, pos in _lines(text, filename))


def step_environment(
    *,
    process: Mapping[str, str] | None = None,
    run: Mapping[str, str] | None = None,
    exports: Mapping[str, str] | None = None,
    parent_env: Mapping[str, str] | None = None,
    call_env: Mapping[str, str] | None = None,
    own_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one step, lowest precedence first (see module docstring)."""
    merged: dict[str, str] = {}
    for layer in (process, run, exports, parent_env, call_env, own_env):
        merged.update(layer or {})
    return merged


def bind_inputs(spec: Spec, given: Mapping[str, Any], pos: Position) -> dict[str, Any]:
    """The inputs a step runs with: ``given`` checked against ``spec``, defaults applied.

    Used at run time, after expressions in the caller's ``inputs:`` were evaluated.
    """
    bound: dict[str, Any] = {}
    for name, value in given.items():
        param = spec.inputs.get(name)
        if param is None:
            known = ", ".join(spec.inputs) or "none"
            raise StepTypeError(f"unknown input {name!r} (inputs: {known})", pos)
        if not matches(value, param.type):
            raise StepTypeError(
                f"input {name!r} must be a {param.type.value}, not {describe(value)}", pos
            )
        bound[name] = value
    for name, param in spec.inputs.items():
        if name not in bound:
            if param.required:
                raise StepTypeError(f"missing required input {name!r}", pos)
            bound[name] = param.default
    return bound
