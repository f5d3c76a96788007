"""The step engine on the GitLab-style fixtures and on targeted step files."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import WriteStep

from forgehand.steps import MASK, MemorySink, StepEngine, StepResult, StepStatus, StreamMasker

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"


async def _run(
    ref: str | Path,
    work: Path,
    inputs: dict[str, Any] | None = None,
    sink: MemorySink | None = None,
    **options: Any,
) -> tuple[StepResult, MemorySink]:
    sink = sink or MemorySink()
    engine = StepEngine(work_dir=work, sink=sink, **options)
    return await engine.run(str(ref), inputs or {}), sink


def _finished(sink: MemorySink) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(e["path"]): e for e in sink.events if e["type"] == "step_finished"}


# --- the GitLab fixtures ----------------------------------------------------------------


async def test_tutorial_outputs_combines_nested_outputs(work: Path) -> None:
    result, sink = await _run(FIXTURES / "tutorial_outputs", work)
    assert result.status is StepStatus.SUCCEEDED
    assert result.outputs == {"all_greetings": "hello world and hello gitlab steps"}
    assert [c.outputs for c in result.children] == [
        {"greeting": "hello world"},
        {"greeting": "hello gitlab steps"},
    ]
    assert [(e["type"], e["path"]) for e in sink.events] == [
        ("step_started", []),
        ("step_started", ["hello_world"]),
        ("step_finished", ["hello_world"]),
        ("step_started", ["hello_steps"]),
        ("step_finished", ["hello_steps"]),
        ("step_finished", []),
    ]
    assert _finished(sink)[("hello_world",)] == {
        "type": "step_finished",
        "path": ["hello_world"],
        "status": "succeeded",
        "outputs": {"greeting": "hello world"},
        "exit_code": 0,
        "error": None,
    }


async def test_export_env_reaches_later_steps(work: Path) -> None:
    result, sink = await _run(FIXTURES / "export_env", work)
    assert result.status is StepStatus.SUCCEEDED
    assert sink.data("stdout") == b"hello Fred from Fred\n"
    assert result.exports == {"NAME": "Fred"}
    assert result.children[0].exports == {"NAME": "Fred"}


async def test_delegate_outputs(work: Path) -> None:
    result, _ = await _run(FIXTURES / "delegate_outputs", work, {"who": "delegation"})
    assert result.outputs == {"greeting": "hello delegation"}


async def test_script_item_with_env_and_step_dir(work: Path) -> None:
    result, sink = await _run(FIXTURES / "script_item", work)
    assert result.status is StepStatus.SUCCEEDED
    assert sink.data("stdout") == f"hi from {FIXTURES / 'script_item'}\n".encode()
    assert result.find("greet") is not None


async def test_legacy_type_steps(work: Path) -> None:
    result, _ = await _run(FIXTURES / "legacy_type", work, {"name": "legacy"})
    assert result.status is StepStatus.SUCCEEDED
    assert result.children[0].outputs == {"greeting": "hello legacy"}


async def test_function_inputs_interpolate(work: Path) -> None:
    inputs = {"message": "m", "config": {"k": [1, True]}}
    result, sink = await _run(FIXTURES / "function_inputs", work, inputs)
    assert result.status is StepStatus.SUCCEEDED
    assert sink.data("stdout") == b'm x 1 with {"k":[1,true]}\n'


async def test_function_create_runs_from_func_dir_and_checks_outputs(work: Path) -> None:
    result, sink = await _run(FIXTURES / "function_create", work, {"message": "hi"})
    assert sink.data("stdout") == b"got: hi\n"
    assert result.status is StepStatus.FAILED
    assert result.error == "output_file:1:1: step did not write required output 'result'"


async def test_exec_definition_missing_program_fails_clearly(work: Path) -> None:
    no_docker = {"PATH": str(work)}
    result, _ = await _run(FIXTURES / "exec_definition", work, process_env=no_docker)
    assert result.status is StepStatus.FAILED
    assert result.error is not None
    assert result.error.startswith("cannot start 'docker': docker not found")


async def test_sensitive_values_are_masked_in_output_events_and_result(work: Path) -> None:
    inputs = {"secret_override": "pa55word"}
    result, sink = await _run(FIXTURES / "sensitive_outputs", work, inputs)
    assert result.status is StepStatus.SUCCEEDED
    assert sink.data("stdout") == f"the secret is {MASK}; HOME is {work}\n".encode()
    assert result.outputs == {"secret": MASK}
    assert _finished(sink)[()]["outputs"] == {"secret": MASK}
    assert "pa55word" not in repr(sink.events)


async def test_sensitive_output_is_masked_in_later_output(
    work: Path, write_step: WriteStep
) -> None:
    shutil.copytree(FIXTURES / "sensitive_outputs", work / "factory")
    step = write_step(
        "seq.yml",
        """
        spec:
        ---
        run:
          - name: make
            step: ./work/factory
          - name: leak
            script: echo "leaked ${{ steps.make.outputs.secret }}"
        """,
    )
    result, sink = await _run(step, work)
    assert result.status is StepStatus.SUCCEEDED
    assert sink.data("stdout").endswith(f"leaked {MASK}\n".encode())
    assert b"generated-s3cret" in sink.data("stdout")  # printed before it was known
    assert result.find("make") is not None
    assert result.find("make").outputs == {"secret": MASK}  # type: ignore[union-attr]


def test_stream_masker_handles_secrets_split_across_chunks() -> None:
    masker = StreamMasker(["secret", "sec"])
    pieces = [masker.feed(chunk) for chunk in (b"a se", b"cr", b"et b sec", b"! x")]
    assert b"".join(pieces) + masker.flush() == f"a {MASK} b {MASK}! x".encode()
    plain = StreamMasker([])
    assert plain.feed(b"as is") == b"as is"


# --- environment precedence -------------------------------------------------------------

ENV_NAMES = ["P", "R", "X", "D", "C", "O"]


async def test_env_precedence(work: Path, write_step: WriteStep) -> None:
    write_step(
        "leaf.yml",
        """
        spec:
        ---
        env:
          O: own
        exec:
          command: [sh, -c, 'echo "$P $R $X $D $C $O"']
        """,
    )
    outer = write_step(
        "outer.yml",
        """
        spec:
        ---
        env:
          D: parent
          C: parent
          O: parent
        run:
          - name: export
            script: 'for v in X D C O; do echo "$v=exported" >> "${{ export_file }}"; done'
          - name: leaf
            step: ./leaf.yml
            env:
              C: call
              O: call
        """,
    )
    process = dict.fromkeys(ENV_NAMES, "process") | {"PATH": "/usr/bin:/bin"}
    run_env = dict.fromkeys(["R", "X", "D", "C", "O"], "run")
    result, sink = await _run(outer, work, process_env=process, env=run_env)
    assert result.status is StepStatus.SUCCEEDED, result.error
    assert sink.data("stdout") == b"process run exported parent call own\n"


# --- failure propagation and checks -----------------------------------------------------


async def test_failing_item_stops_the_sequence(work: Path, write_step: WriteStep) -> None:
    step = write_step(
        "seq.yml",
        """
        spec:
        ---
        run:
          - name: first
            script: echo one
          - name: broken
            script: echo two; exit 7
          - name: never
            script: echo three
        """,
    )
    result, sink = await _run(step, work)
    assert result.status is StepStatus.FAILED
    assert result.exit_code == 7
    assert result.error == "step 'broken' failed: script exited with code 7"
    assert [(c.name, c.status) for c in result.children] == [
        ("first", StepStatus.SUCCEEDED),
        ("broken", StepStatus.FAILED),
        ("never", StepStatus.SKIPPED),
    ]
    assert sink.data("stdout") == b"one\ntwo\n"
    assert ("never",) not in _finished(sink)
    assert _finished(sink)[("broken",)]["exit_code"] == 7


async def test_nested_failure_reaches_the_root(work: Path, write_step: WriteStep) -> None:
    write_step("inner.yml", "spec:\n---\nrun:\n  - name: x\n    script: exit 2\n")
    outer = write_step("outer.yml", "spec:\n---\nrun:\n  - name: in\n    step: ./inner.yml\n")
    result, _ = await _run(outer, work)
    assert result.error == "step 'in' failed: step 'x' failed: script exited with code 2"
    assert result.find("in", "x") is not None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"name":"n","value":"text"}', "output 'n' must be a number, not string"),
        ('{"name":"other","value":1}', "output 'other' is not declared in spec"),
        ("not json", "not a JSON line"),
    ],
)
async def test_outputs_are_validated_against_the_spec(
    work: Path, write_step: WriteStep, line: str, message: str
) -> None:
    step = write_step(
        "out.yml",
        """
        spec:
          inputs:
            line:
              type: string
          outputs:
            n:
              type: number
        ---
        exec:
          command:
            - sh
            - -c
            - printf '%s\\n' "$1" >> "$2"
            - sh
            - ${{ inputs.line }}
            - ${{ output_file }}
        """,
    )
    result, _ = await _run(step, work, {"line": line})
    assert result.status is StepStatus.FAILED
    assert result.error is not None
    assert message in result.error


async def test_inputs_are_type_checked(work: Path) -> None:
    result, _ = await _run(FIXTURES / "function_inputs", work, {"message": "m", "count": "3"})
    assert result.error == "input 'count' must be a number, not string"


async def test_run_item_input_errors_name_the_position(work: Path, write_step: WriteStep) -> None:
    step = write_step(
        "bad.yml",
        """
        spec:
        ---
        run:
          - name: read
            step: builtin://read_file
            inputs:
              path: 3
        """,
    )
    result, _ = await _run(step, work)
    child = result.find("read")
    assert child is not None
    assert child.error == f"{step}:5:11: input 'path' must be a string, not number"


async def test_unresolvable_reference_fails_the_root(work: Path) -> None:
    result, sink = await _run("builtin://nope", work)
    assert result.status is StepStatus.FAILED
    assert result.error is not None
    assert "unknown builtin step 'nope'" in result.error
    assert [e["type"] for e in sink.events] == ["step_started", "step_finished"]


async def test_builtins_compose_in_a_sequence(work: Path, write_step: WriteStep) -> None:
    step = write_step(
        "compose.yml",
        """
        spec:
          inputs:
            text:
              type: string
          outputs:
            read:
              type: string
        ---
        run:
          - name: write
            step: builtin://write_file
            inputs:
              path: notes/a.txt
              content: ${{ inputs.text }}
          - name: read
            step: builtin://read_file
            inputs:
              path: ${{ steps.write.outputs.path }}
        outputs:
          read: ${{ steps.read.outputs.content }}
        """,
    )
    result, _ = await _run(step, work, {"text": "hello\n"})
    assert result.status is StepStatus.SUCCEEDED, result.error
    assert result.outputs == {"read": "     1\thello\n"}


async def test_cancellation_kills_the_process_and_reports(work: Path) -> None:
    sink = MemorySink()
    engine = StepEngine(work_dir=work, sink=sink)
    task = asyncio.create_task(engine.run("builtin://run", {"command": "sleep 30"}))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert sink.events[-1]["status"] == "cancelled"


# --- git references ---------------------------------------------------------------------


@pytest.fixture
def step_repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("install git")
    repo = tmp_path / "steps-repo"
    (repo / "echo").mkdir(parents=True)
    (repo / "echo" / "step.yml").write_text(
        "spec:\n  inputs:\n    echo:\n      type: string\n---\nexec:\n"
        '  command: [echo, "remote ${{ inputs.echo }}"]\n'
    )
    git = ["git", "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "step"], check=True)
    subprocess.run([*git, "tag", "v1"], check=True)
    return repo


async def test_git_reference_is_fetched_and_run(
    work: Path, tmp_path: Path, step_repo: Path, write_step: WriteStep
) -> None:
    step = write_step(
        "uses-remote.yml",
        f"""
        spec:
        ---
        run:
          - name: short
            step: file://{step_repo}/-/echo@v1
            inputs:
              echo: short
          - name: long
            step:
              git:
                url: file://{step_repo}
                rev: v1
                dir: echo
            inputs:
              echo: long
        """,
    )
    result, sink = await _run(step, work, cache_dir=tmp_path / "cache")
    assert result.status is StepStatus.SUCCEEDED, result.error
    assert sink.data("stdout") == b"remote short\nremote long\n"


async def test_git_reference_as_the_root(work: Path, tmp_path: Path, step_repo: Path) -> None:
    ref = f"file://{step_repo}/-/echo@v1"
    result, sink = await _run(ref, work, {"echo": "root"}, cache_dir=tmp_path / "cache")
    assert result.status is StepStatus.SUCCEEDED, result.error
    assert sink.data("stdout") == b"remote root\n"
