"""Loading step files: the GitLab documentation fixtures and every schema error's position."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from forgehand.steps import (
    BuiltinRef,
    GitRef,
    LocalRef,
    OciRef,
    SchemaError,
    StepError,
    StepSyntaxError,
    StepTypeError,
    ValueType,
    load_step_file,
    load_step_text,
)
from forgehand.steps.errors import ExpressionError
from forgehand.steps.yamlpos import to_plain

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"


def load(text: str) -> object:
    return load_step_text(textwrap.dedent(text).lstrip("\n"), "s.yml")


def test_exec_definition_fixture() -> None:
    step = load_step_file(FIXTURES / "exec_definition")
    name = step.spec.inputs["name"]
    assert (name.type, name.default, name.required) == (ValueType.STRING, "joe steppy", False)
    assert step.definition.exec is not None
    assert to_plain(step.definition.exec.command)[:2] == ["docker", "run"]


def test_function_fixture_prefers_func_yml() -> None:
    step = load_step_file(FIXTURES / "function_create")
    assert step.path.endswith("func.yml")
    assert step.spec.inputs["message"].required
    assert step.spec.outputs["result"].type is ValueType.STRING


def test_input_types_fixture() -> None:
    spec = load_step_file(FIXTURES / "function_inputs").spec
    assert spec.inputs["count"].default == 1
    assert spec.inputs["config"].default == {}
    assert [n for n, p in spec.inputs.items() if p.required] == ["message"]


def test_steps_definition_references() -> None:
    run = load_step_file(FIXTURES / "steps_definition").definition.run
    assert run is not None
    assert run[0].ref == GitRef("https://gitlab.com/gitlab-org/ci-cd/runner-tools/echo-step", "v1")
    assert run[1].ref == LocalRef("./my-local-steps/uname")


def test_delegate_and_legacy_spellings() -> None:
    delegate = load_step_file(FIXTURES / "delegate_outputs")
    assert delegate.spec.delegate_outputs
    assert delegate.definition.delegate == "exec_step"
    legacy = load_step_file(FIXTURES / "legacy_type")
    assert legacy.definition.run is not None
    assert legacy.spec.inputs["name"].type is ValueType.STRING


def test_sensitive_and_script_fixtures() -> None:
    spec = load_step_file(FIXTURES / "sensitive_outputs").spec
    assert spec.sensitive_inputs() == ["secret_override"]
    assert spec.outputs["secret"].sensitive
    run = load_step_file(FIXTURES / "script_item").definition.run
    assert run is not None
    assert run[0].script is not None
    assert run[0].env is not None


def test_empty_spec_is_fine() -> None:
    step = load_step_text("spec: {}\n---\nexec:\n  command: [/bin/true]\n", "s.yml")
    assert step.spec.inputs == {}


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("builtin://read_file", BuiltinRef("read_file")),
        ("../x/step.yml", LocalRef("../x/step.yml")),
        (
            "gitlab.com/a/b/-/steps/echo@v1.2",
            GitRef("https://gitlab.com/a/b", "v1.2", "steps/echo"),
        ),
        ("file:///srv/repo.git@main", GitRef("file:///srv/repo.git", "main")),
        ("registry.gitlab.com/group/echo:1.0.0", OciRef("registry.gitlab.com/group/echo:1.0.0")),
        ("oci://registry.example/echo", OciRef("oci://registry.example/echo")),
    ],
)
def test_reference_forms(text: str, ref: object) -> None:
    step = load(
        f"""
        spec:
        ---
        run:
          - name: a
            step: {text}
        """
    )
    assert step.definition.run[0].ref == ref  # type: ignore[attr-defined]


def test_structured_git_reference() -> None:
    step = load(
        """
        spec:
        ---
        run:
          - name: a
            step:
              git: {url: "file:///r.git", rev: v1, dir: steps/echo}
        """
    )
    assert step.definition.run[0].ref == GitRef("file:///r.git", "v1", "steps/echo")  # type: ignore[attr-defined]


ERROR_CASES = [
    # (id, file text, error class, "line:col", message fragment)
    ("yaml", "spec:\n  inputs: [\n", StepSyntaxError, "3:1", "invalid YAML"),
    ("one-document", "spec:\n", StepSyntaxError, "1:1", "two YAML documents"),
    (
        "dup-key",
        "spec:\n---\nexec: {command: [a]}\nexec: {command: [b]}\n",
        StepSyntaxError,
        "4:1",
        "duplicate key 'exec'",
    ),
    (
        "spec-key",
        "spec:\n  input: {}\n---\nexec: {command: [a]}\n",
        SchemaError,
        "2:3",
        "unknown key 'input' in spec",
    ),
    (
        "top-key",
        "spec:\nname: x\n---\nexec: {command: [a]}\n",
        SchemaError,
        "2:1",
        "unknown key 'name'",
    ),
    (
        "def-key",
        "spec:\n---\nexec: {command: [a]}\nscript: x\n",
        SchemaError,
        "4:1",
        "unknown key 'script' in the definition",
    ),
    (
        "input-type",
        "spec:\n  inputs:\n    a:\n      type: text\n---\nexec: {command: [a]}\n",
        SchemaError,
        "4:13",
        "unknown type 'text'",
    ),
    (
        "input-name",
        "spec:\n  inputs:\n    1a: {}\n---\nexec: {command: [a]}\n",
        SchemaError,
        "3:5",
        "invalid input name '1a'",
    ),
    (
        "input-key",
        "spec:\n  inputs:\n    a: {typ: string}\n---\nexec: {command: [a]}\n",
        SchemaError,
        "3:9",
        "unknown key 'typ'",
    ),
    (
        "default-type",
        "spec:\n  inputs:\n    n:\n      type: number\n      default: many\n"
        "---\nexec: {command: [a]}\n",
        StepTypeError,
        "5:16",
        "must be a number, not string",
    ),
    (
        "default-expr",
        "spec:\n  inputs:\n    n:\n      default: ${{ env.X }}\n---\nexec: {command: [a]}\n",
        SchemaError,
        "4:16",
        "cannot use",
    ),
    (
        "sensitive",
        "spec:\n  inputs:\n    n: {sensitive: yes please}\n---\nexec: {command: [a]}\n",
        SchemaError,
        "3:20",
        "true or false",
    ),
    (
        "exec-and-run",
        "spec:\n---\nexec: {command: [a]}\nrun: []\n",
        SchemaError,
        "3:1",
        "exactly one of exec: or run:",
    ),
    ("no-body", "spec:\n---\nenv: {A: b}\n", SchemaError, "3:1", "exactly one of exec: or run:"),
    (
        "command-shape",
        "spec:\n---\nexec:\n  command: echo hi\n",
        SchemaError,
        "4:12",
        "non-empty list",
    ),
    ("command-item", "spec:\n---\nexec:\n  command: [echo, 1]\n", SchemaError, "4:19", "quote it"),
    (
        "env-value",
        "spec:\n---\nenv:\n  A: 1\nexec: {command: [a]}\n",
        SchemaError,
        "4:6",
        "env value of A must be a string",
    ),
    ("item-name", "spec:\n---\nrun:\n  - script: echo\n", SchemaError, "4:5", "needs a name"),
    (
        "item-kind",
        "spec:\n---\nrun:\n  - name: a\n    script: echo\n    step: ./x\n",
        SchemaError,
        "4:5",
        "exactly one of step:, func:, script:",
    ),
    (
        "step-name",
        "spec:\n---\nrun:\n  - name: my-step\n    script: echo\n",
        SchemaError,
        "4:11",
        "invalid step name 'my-step'",
    ),
    (
        "dup-step",
        "spec:\n---\nrun:\n  - name: a\n    script: x\n  - name: a\n    script: y\n",
        SchemaError,
        "6:5",
        "duplicate step name 'a'",
    ),
    (
        "script-inputs",
        "spec:\n---\nrun:\n  - name: a\n    script: x\n    inputs: {}\n",
        SchemaError,
        "6:5",
        "takes no inputs",
    ),
    (
        "bad-ref",
        "spec:\n---\nrun:\n  - name: a\n    step: echo\n",
        SchemaError,
        "5:11",
        "cannot tell what step",
    ),
    (
        "expr-syntax",
        "spec:\n---\nexec:\n  command: [echo, 'hi ${{ inputs..x }}']\n",
        ExpressionError,
        "4:23",
        "expected a name after '.'",
    ),
    (
        "expr-root",
        "spec:\n---\nexec:\n  command:\n    - echo ${{ job.id }}\n",
        ExpressionError,
        "5:12",
        "unknown name 'job'",
    ),
    (
        "expr-open",
        'spec:\n---\nexec:\n  command: ["echo ${{ inputs.a"]\n',
        ExpressionError,
        "4:19",
        "unterminated",
    ),
    (
        "delegate-no-spec",
        "spec:\n---\nrun:\n  - name: a\n    script: x\ndelegate: a\n",
        SchemaError,
        "6:11",
        "needs outputs: delegate",
    ),
    (
        "delegate-missing",
        "spec:\n  outputs: delegate\n---\nrun:\n  - name: a\n    script: x\n",
        SchemaError,
        "4:1",
        "needs delegate: STEP",
    ),
    (
        "exec-outputs",
        "spec:\n---\nexec: {command: [a]}\noutputs: {}\n",
        SchemaError,
        "4:1",
        "only valid with run:",
    ),
    (
        "legacy-type",
        "spec:\n---\ntype: steps\nexec: {command: [a]}\n",
        SchemaError,
        "3:7",
        "type must be 'exec'",
    ),
]


@pytest.mark.parametrize(
    ("text", "error", "where", "fragment"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_errors_have_positions(
    text: str, error: type[StepError], where: str, fragment: str
) -> None:
    with pytest.raises(error) as info:
        load_step_text(text, "s.yml")
    rendered = str(info.value)
    assert rendered.startswith(f"s.yml:{where}: "), rendered
    assert fragment in rendered


def test_missing_directory_step_file(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError):
        load_step_file(FIXTURES)
