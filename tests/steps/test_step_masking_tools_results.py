"""Masking of sensitive values, tool definitions and discovery, and the result tree."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from forgehand.steps import (
    MASK,
    Masker,
    StepResult,
    StepStatus,
    discover_tool_steps,
    input_schema,
    load_step_text,
    mask_sensitive,
    sensitive_values,
    tool_definition,
    tool_name,
    tool_name_from_path,
)

WriteStep = Callable[[str, str], Path]

SPEC = load_step_text(
    """spec:
  description: Deploy the app to an environment.
  inputs:
    environment:
      type: string
      description: Where to deploy.
    token:
      type: string
      sensitive: true
    replicas:
      type: number
      default: 2
    creds:
      type: struct
      sensitive: true
      default: {}
    flags:
      type: array
      default: []
    dry_run:
      type: boolean
      default: false
---
exec:
  command: [deploy]
""",
    "deploy.yml",
).spec


# --- masking --------------------------------------------------------------------------


def test_masks_sensitive_inputs_in_text_and_structures() -> None:
    inputs = {
        "environment": "prod",
        "token": "s3cr3t-t0ken",
        "creds": {"user": "bob", "pw": "hunter22"},
    }
    log = {
        "line": "using s3cr3t-t0ken for prod",
        "nested": [{"pw": "hunter22!"}, ("bob", 3)],
        "s3cr3t-t0ken": "as a key",
    }
    masked = mask_sensitive(log, SPEC, inputs)
    assert masked == {
        "line": f"using {MASK} for prod",
        "nested": [{"pw": f"{MASK}!"}, (MASK, 3)],
        MASK: "as a key",
    }


def test_longest_secret_first_and_no_secrets() -> None:
    masker = Masker(["abc", "abcdef", ""])
    assert masker.mask_text("abcdef abc") == f"{MASK} {MASK}"
    assert Masker().mask_text("nothing") == "nothing"


def test_regex_characters_in_secrets() -> None:
    assert Masker(["a.b*c"]).mask_text("xa.b*cx aXbbc") == f"x{MASK}x aXbbc"


def test_sensitive_values_skip_booleans_and_missing() -> None:
    assert sensitive_values(SPEC, {"token": None, "creds": {"k": True}}) == ['{"k":true}']


# --- tools ----------------------------------------------------------------------------


def test_tool_definition_schema() -> None:
    tool = tool_definition(SPEC, "deploy")
    assert tool["name"] == "deploy"
    assert tool["description"] == "Deploy the app to an environment."
    schema = tool["input_schema"]
    assert schema == {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "environment": {"type": "string", "description": "Where to deploy."},
            "token": {"type": "string", "writeOnly": True},
            "replicas": {"type": "number", "default": 2},
            "creds": {"type": "object", "default": {}, "writeOnly": True},
            "flags": {"type": "array", "items": {}, "default": []},
            "dry_run": {"type": "boolean", "default": False},
        },
        "required": ["environment", "token"],
        "additionalProperties": False,
    }
    json.dumps(tool)


def test_empty_spec_schema() -> None:
    spec = load_step_text("spec:\n---\nexec:\n  command: [x]\n", "x").spec
    assert input_schema(spec)["properties"] == {}
    assert tool_definition(spec, "x")["description"] == "Run the x step."


VALID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@pytest.mark.parametrize(
    ("path", "root", "name"),
    [
        (".forgehand/steps/run_tests/step.yml", ".forgehand/steps", "run_tests"),
        (".forgehand/steps/db/migrate/func.yml", ".forgehand/steps", "db_migrate"),
        (".forgehand/steps/lint.yml", ".forgehand/steps", "lint"),
        ("steps/hello world!/step.yml", None, "steps_hello_world"),
        ("func.yml", None, "step"),
        ("x/" + "a" * 100 + ".yml", None, "x_" + "a" * 62),
    ],
)
def test_tool_names_from_paths(path: str, root: str | None, name: str) -> None:
    derived = tool_name_from_path(path, root)
    assert derived == name
    assert VALID.match(derived)


def test_tool_name_rejects_invalid() -> None:
    assert tool_name("héllo wörld") == "h_llo_w_rld"
    with pytest.raises(ValueError, match="invalid tool name"):
        tool_definition(SPEC, "has space")


def test_discover_tool_steps(write_step: WriteStep, tmp_path: Path) -> None:
    base = ".forgehand/steps/"
    write_step(
        base + "run_tests/func.yml",
        "spec:\n  inputs:\n    k: {}\n---\nexec:\n  command: [pytest]\n",
    )
    write_step(base + "run_tests/step.yml", "spec:\n---\nexec:\n  command: [old]\n")
    write_step(base + "run_tests/helper.yml", "not: a step\n")
    write_step(base + "lint.yml", "spec:\n---\nexec:\n  command: [ruff]\n")
    write_step(base + "broken/step.yml", "spec:\n---\nexec: {}\n")
    write_step(base + "lint/step.yml", "spec:\n---\nexec:\n  command: [dup]\n")
    found = discover_tool_steps(tmp_path)
    assert sorted(t.name for t in found.tools) == ["lint", "run_tests"]
    run_tests = next(t for t in found.tools if t.name == "run_tests")
    assert run_tests.definition["input_schema"]["required"] == ["k"]
    messages = sorted(str(d) for d in found.diagnostics)
    assert len(messages) == 2
    assert any("broken/step.yml:3:7: exec.command must be a non-empty list" in m for m in messages)
    assert any("tool name 'lint' is already used" in m for m in messages)


def test_discover_without_steps_dir(tmp_path: Path) -> None:
    assert discover_tool_steps(tmp_path).tools == []


# --- results --------------------------------------------------------------------------


def test_result_tree_round_trips_and_masks() -> None:
    tree = StepResult(
        name_path=(),
        status=StepStatus.FAILED,
        children=(
            StepResult(
                ("build",), StepStatus.SUCCEEDED, outputs={"artifact": "a.tar"}, exit_code=0
            ),
            StepResult(
                ("deploy",),
                StepStatus.FAILED,
                exports={"TOKEN": "s3cr3t"},
                exit_code=2,
                error="auth failed with s3cr3t",
                children=(StepResult(("deploy", "push"), StepStatus.SKIPPED),),
            ),
        ),
    )
    assert StepResult.from_json(tree.to_json()) == tree
    assert tree.find("deploy", "push") is not None
    assert tree.find("deploy", "push").name == "push"  # type: ignore[union-attr]
    assert [n.name for n in tree.walk()] == ["", "build", "deploy", "push"]
    masked = tree.masked(Masker(["s3cr3t"]))
    deploy = masked.find("deploy")
    assert deploy is not None
    assert deploy.exports == {"TOKEN": MASK}
    assert deploy.error == f"auth failed with {MASK}"
    assert StepStatus.SKIPPED.finished
    assert not StepStatus.RUNNING.finished
