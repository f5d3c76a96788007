"""Run-time evaluation helpers the step engine calls, on the GitLab fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgehand.steps import (
    ExprContext,
    ExpressionEvaluationError,
    StepTypeError,
    bind_inputs,
    complete_outputs,
    eval_env,
    exec_argv,
    exec_work_dir,
    item_inputs,
    item_script,
    load_step_file,
    load_step_text,
    sensitive_values,
    sequence_outputs,
)

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"


def test_function_exec_argv() -> None:
    step = load_step_file(FIXTURES / "function_create")
    assert step.definition.exec is not None
    context = ExprContext(inputs={"message": "hi"}, step_dir="/fn")
    assert exec_argv(step.definition.exec, context) == ["/fn/my-script.sh", "hi"]


def test_inputs_fixture_interpolates_struct_and_number() -> None:
    step = load_step_file(FIXTURES / "function_inputs")
    inputs = bind_inputs(step.spec, {"message": "m", "config": {"a": 1}}, step.spec.pos)
    assert step.definition.exec is not None
    argv = exec_argv(step.definition.exec, ExprContext(inputs=inputs))
    assert argv == ["echo", 'm x 1 with {"a":1}']


def test_sensitive_fixture_env_work_dir_and_masking() -> None:
    step = load_step_file(FIXTURES / "sensitive_outputs")
    context = ExprContext(
        inputs={"secret_override": "pa55word"},
        step_dir="/s",
        work_dir="/w",
        output_file="/o",
    )
    assert eval_env(step.definition.env, context) == {"HOME": "/w"}
    assert step.definition.exec is not None
    assert exec_work_dir(step.definition.exec, context) == "/s"
    assert exec_argv(step.definition.exec, context)[1:] == [
        "--output_file=/o",
        "--secret_override=pa55word",
    ]
    secrets = sensitive_values(step.spec, context.inputs, {"secret": "t0p"})
    assert secrets == ["pa55word", "t0p"]


def test_sequence_items_and_outputs() -> None:
    step = load_step_file(FIXTURES / "tutorial_outputs")
    run = step.definition.run
    assert run is not None
    context = ExprContext(
        steps={
            "hello_world": {"greeting": "hello world"},
            "hello_steps": {"greeting": "hello gitlab steps"},
        }
    )
    assert item_inputs(run[0], context) == {}
    assert item_inputs(run[1], context) == {"who": "gitlab steps"}
    outputs = sequence_outputs(step.definition.outputs, context)
    assert complete_outputs(outputs, step.spec.outputs, step.spec.pos) == {
        "all_greetings": "hello world and hello gitlab steps"
    }


def test_script_item_and_whole_expression_inputs() -> None:
    script = load_step_file(FIXTURES / "script_item").definition.run
    assert script is not None
    assert item_script(script[0], ExprContext(step_dir="/d")) == 'echo "hi from /d"'
    delegate = load_step_file(FIXTURES / "delegate_outputs").definition.run
    assert delegate is not None
    assert item_inputs(delegate[0], ExprContext(inputs={"who": "x"})) == {"who": "x"}


def test_runtime_errors() -> None:
    step = load_step_text(
        "spec:\n  inputs:\n    s: {type: struct}\n---\nexec:\n  command: ['${{ inputs.s }}']\n",
        "s.yml",
    )
    assert step.definition.exec is not None
    with pytest.raises(StepTypeError, match="must evaluate to text") as info:
        exec_argv(step.definition.exec, ExprContext(inputs={"s": {"a": 1}}))
    assert str(info.value.position) == "s.yml:6:13"
    with pytest.raises(ExpressionEvaluationError):
        exec_argv(step.definition.exec, ExprContext())
