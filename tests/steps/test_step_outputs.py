"""The output/export file protocol, input binding and environment precedence."""

from __future__ import annotations

import pytest

from forgehand.steps import (
    OutputProtocolError,
    Position,
    StepTypeError,
    bind_inputs,
    load_step_text,
    parse_export_file,
    parse_output_file,
    step_environment,
)

SPEC = load_step_text(
    """spec:
  inputs:
    name: {}
    count: {type: number, default: 1}
    opts: {type: struct, default: {}}
  outputs:
    greeting: {}
    size: {type: number}
    tags: {type: array, default: []}
    ok: {type: boolean, default: false}
    meta: {type: struct, default: {}}
---
exec:
  command: [x]
""",
    "s.yml",
).spec

DELEGATING = load_step_text(
    "spec:\n  outputs: delegate\n---\nrun:\n  - name: a\n    script: x\ndelegate: a\n", "d.yml"
).spec


def test_outputs_are_typed_and_defaulted() -> None:
    text = (
        '{"name": "greeting", "value": "hi"}\n'
        "\n"
        '{"name": "size", "value": 3}\n'
        '{"name": "size", "value": 4.5}\n'
        '{"name": "meta", "value": {"a": [1]}}\n'
    )
    assert parse_output_file(text, SPEC) == {
        "greeting": "hi",
        "size": 4.5,
        "tags": [],
        "ok": False,
        "meta": {"a": [1]},
    }


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("greeting=hi\n", OutputProtocolError, "out:1:1: not a JSON line"),
        ('{"name": "greeting"}\n', OutputProtocolError, 'out:1:1: each line must be {"name"'),
        ('["greeting", 1]\n', OutputProtocolError, "each line must be"),
        ('{"name": 1, "value": 1}\n', OutputProtocolError, "name must be a string"),
        (
            '{"name":"greeting","value":"a"}\n{"name": "nope", "value": 1}\n',
            OutputProtocolError,
            "out:2:1: output 'nope' is not declared in spec",
        ),
        (
            '{"name": "size", "value": "3"}\n',
            StepTypeError,
            "output 'size' must be a number, not string",
        ),
        (
            '{"name": "ok", "value": 1}\n',
            StepTypeError,
            "output 'ok' must be a boolean, not number",
        ),
        (
            '{"name": "greeting", "value": "x"}\n',
            OutputProtocolError,
            "did not write required output 'size'",
        ),
    ],
)
def test_output_errors(text: str, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        parse_output_file(text, SPEC, "out")
    assert fragment in str(info.value)


def test_delegating_spec_accepts_any_outputs() -> None:
    assert parse_output_file('{"name": "x", "value": 1}\n', DELEGATING) == {"x": 1}


def test_exports_json_lines_and_dotenv() -> None:
    text = (
        '{"name": "NAME", "value": "Fred"}\n'
        "PATH=/usr/local/go/bin:/usr/bin\n"
        "export EMPTY=\n"
        '{"name": "NAME", "value": "Wilma"}\n'
    )
    assert parse_export_file(text) == {
        "NAME": "Wilma",
        "PATH": "/usr/local/go/bin:/usr/bin",
        "EMPTY": "",
    }


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("JUSTANAME\n", "exp:1:1: expected"),
        ('{"name": "A", "value": 1}\n', "export 'A' must be a string, not number"),
        ("1BAD=x\n", "invalid environment variable name '1BAD'"),
        ('{"name": "A-B", "value": "x"}\n', "invalid environment variable name"),
    ],
)
def test_export_errors(text: str, fragment: str) -> None:
    with pytest.raises(OutputProtocolError) as info:
        parse_export_file(text, "exp")
    assert fragment in str(info.value)


def test_environment_precedence() -> None:
    env = step_environment(
        process={
            "A": "process",
            "B": "process",
            "C": "process",
            "D": "process",
            "E": "process",
            "F": "process",
        },
        run={"B": "run", "C": "run", "D": "run", "E": "run", "F": "run"},
        exports={"C": "export", "D": "export", "E": "export", "F": "export"},
        parent_env={"D": "parent", "E": "parent", "F": "parent"},
        call_env={"E": "call", "F": "call"},
        own_env={"F": "own"},
    )
    assert env == {
        "A": "process",
        "B": "run",
        "C": "export",
        "D": "parent",
        "E": "call",
        "F": "own",
    }


def test_bind_inputs_applies_defaults_and_checks_types() -> None:
    pos = Position("s.yml", 3, 5)
    assert bind_inputs(SPEC, {"name": "x"}, pos) == {"name": "x", "count": 1, "opts": {}}
    with pytest.raises(StepTypeError, match="missing required input 'name'"):
        bind_inputs(SPEC, {}, pos)
    with pytest.raises(StepTypeError, match="input 'count' must be a number, not boolean"):
        bind_inputs(SPEC, {"name": "x", "count": True}, pos)
    with pytest.raises(StepTypeError, match=r"s\.yml:3:5: unknown input 'nme'"):
        bind_inputs(SPEC, {"nme": "x"}, pos)
