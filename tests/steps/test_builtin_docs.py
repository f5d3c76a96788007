"""docs/tools.md documents every built-in: each input and output, and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forgehand.steps.builtins import FAMILIES, get_builtin
from forgehand.steps.tools import TOOL_NAME_RE, tool_definition

DOCS = Path(__file__).parents[2] / "docs" / "tools.md"


def _section(name: str) -> str:
    text = DOCS.read_text()
    match = re.search(rf"^### `{name}`\n(.*?)(?=^### |^## |\Z)", text, re.S | re.M)
    assert match, f"docs/tools.md has no section for {name}"
    return match.group(1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_builtin_is_documented(name: str) -> None:
    builtin = get_builtin(name)
    assert builtin is not None
    section = _section(name)
    rows = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", section, re.M))
    documented = set(rows)
    assert documented == set(builtin.spec.inputs) | set(builtin.spec.outputs)
    for param in [*builtin.spec.inputs.values(), *builtin.spec.outputs.values()]:
        assert rows[param.name] == param.type.value
        assert param.description, f"{name}.{param.name} needs a description"
    assert "Errors:" in section


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_tool_definitions_are_valid(name: str) -> None:
    builtin = get_builtin(name)
    assert builtin is not None
    tool = tool_definition(builtin.spec, name)
    assert TOOL_NAME_RE.match(tool["name"])
    assert builtin.spec.description
    assert tool["input_schema"]["additionalProperties"] is False
