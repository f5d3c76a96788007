"""Step runs through the runner: Start carries a step reference, events carry the tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forgehand.runner import errors
from forgehand.runner.client import RunnerClient
from forgehand.runner.model import ExitReason, RunSpec, StepEventKind

FIXTURES = Path(__file__).parents[1] / "steps" / "fixtures" / "gitlab"


async def test_builtin_step_runs_natively_in_the_engine(client: RunnerClient, work: Path) -> None:
    (work / "notes.txt").write_text("first\nsecond\n")
    result = await client.run(
        RunSpec(step="builtin://read_file", step_inputs={"path": "notes.txt"})
    )
    assert result.ok
    assert result.step_result is not None
    assert result.step_result["status"] == "succeeded"
    assert "second" in result.step_result["outputs"]["content"]
    kinds = [e.kind for e in result.steps]
    assert kinds[0] is StepEventKind.STARTED
    assert kinds[-1] is StepEventKind.RESULT


async def test_gitlab_tutorial_step_runs_unchanged(client: RunnerClient, work: Path) -> None:
    shutil.copytree(FIXTURES / "tutorial_outputs", work / "tutorial")
    result = await client.run(RunSpec(step=str(work / "tutorial")))
    assert result.ok, result.stderr
    assert result.step_result is not None
    greetings = result.step_result["outputs"]["all_greetings"]
    assert "gitlab steps" in greetings
    finished = [e for e in result.steps if e.kind is StepEventKind.FINISHED]
    assert [e.path for e in finished] == [("hello_world",), ("hello_steps",), ()]


async def test_failing_step_fails_the_run(client: RunnerClient) -> None:
    result = await client.run(
        RunSpec(step="builtin://run", step_inputs={"command": "echo broken >&2; exit 4"})
    )
    assert result.exit.reason is ExitReason.EXITED
    assert result.exit.code == 1
    assert b"broken" in result.stderr
    assert result.step_result is not None
    assert result.step_result["status"] == "failed"


async def test_builtin_file_steps_stay_inside_the_work_dir(client: RunnerClient) -> None:
    result = await client.run(
        RunSpec(step="builtin://read_file", step_inputs={"path": "/etc/passwd"})
    )
    assert not result.ok
    assert result.step_result is not None
    assert "permission_denied" in (result.step_result["error"] or "")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (RunSpec(step="\0bad"), "step.ref"),
        (RunSpec(step="builtin://read_file", step_work_dir="relative"), "absolute"),
    ],
)
async def test_malformed_step_requests(client: RunnerClient, spec: RunSpec, match: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=match):
        await client.start(spec)


async def test_step_inputs_must_be_a_json_object(client: RunnerClient) -> None:
    request = RunSpec(step="builtin://read_file").to_proto("bad-inputs")
    request.step.inputs_json = "[1, 2]"
    with pytest.raises(errors.InvalidArgument, match="JSON object"):
        await client.transport.start(request, 10)
