"""Static checks: every semantic error class, at its exact position, via check_files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from forgehand.steps import Diagnostic, check_files, check_files_async

FIXTURES = Path(__file__).parent / "fixtures" / "gitlab"
WriteStep = Callable[[str, str], Path]

HELLO = """
spec:
  inputs:
    who:
      type: string
      default: world
    times:
      type: number
      default: 1
    needed:
      type: boolean
  outputs:
    greeting:
      type: string
    length:
      type: number
---
exec:
  command: [echo, "${{ inputs.who }}"]
"""


def check(write_step: WriteStep, text: str) -> list[str]:
    write_step("hello/step.yml", HELLO)
    path = write_step("main/step.yml", text)
    return [str(d).replace(str(path), "main") for d in check_files([path])]


def test_gitlab_fixtures_are_clean() -> None:
    dirs = [p for p in sorted(FIXTURES.iterdir()) if p.name != "steps_definition"]
    assert check_files(dirs) == []


CASES = [
    (
        "unknown-input",
        """
        spec:
          inputs:
            name: {}
        ---
        exec:
          command: [echo, "${{ inputs.nam }}"]
        """,
        "main:6:20: unknown input 'nam' (inputs: name)",
    ),
    (
        "field-of-string-input",
        """
        spec:
          inputs:
            name: {}
        ---
        exec:
          command: [echo, "${{ inputs.name.first }}"]
        """,
        "main:6:20: input 'name' is a string; inputs.name.first does not exist",
    ),
    (
        "steps-in-exec",
        """
        spec:
        ---
        exec:
          command: [echo, "${{ steps.a.outputs.b }}"]
        """,
        "main:4:20: steps.* can only be used in run: items and outputs:",
    ),
    (
        "unknown-step",
        """
        spec:
        ---
        run:
          - name: first
            script: echo ${{ steps.zero.outputs.greeting }}
        """,
        "main:5:18: unknown step 'zero' (steps: first)",
    ),
    (
        "later-step",
        """
        spec:
        ---
        run:
          - name: first
            script: echo ${{ steps.second.outputs.greeting }}
          - name: second
            step: ../hello
            inputs: {needed: true}
        """,
        "main:5:18: step 'second' runs later; only outputs of earlier steps can be used",
    ),
    (
        "own-outputs",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs:
              needed: true
              who: ${{ steps.first.outputs.greeting }}
        """,
        "main:8:12: step 'first' cannot use its own outputs",
    ),
    (
        "unknown-output",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs: {needed: true}
          - name: second
            script: echo "${{ steps.first.outputs.greting }}"
        """,
        "main:8:19: step 'first' has no output 'greting' (outputs: greeting, length)",
    ),
    (
        "bad-steps-path",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs: {needed: true}
          - name: second
            script: echo ${{ steps.first.greeting }}
        """,
        "main:8:18: use steps.NAME.outputs.OUTPUT, not steps.first.greeting",
    ),
    (
        "literal-input-type",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs:
              needed: "yes"
        """,
        "main:7:15: input 'needed' must be a boolean, not string",
    ),
    (
        "expression-input-type",
        """
        spec:
          inputs:
            count: {type: number}
        ---
        run:
          - name: first
            step: ../hello
            inputs:
              needed: true
              who: ${{ inputs.count }}
        """,
        "main:10:12: input 'who' must be a string, but this is a number",
    ),
    (
        "interpolated-into-number",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs:
              needed: true
              times: "${{ env.N }}x"
        """,
        "main:8:14: input 'times' must be a number, but this is a string",
    ),
    (
        "output-to-input-type",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs: {needed: true}
          - name: second
            step: ../hello
            inputs:
              needed: true
              who: ${{ steps.first.outputs.length }}
        """,
        "main:11:12: input 'who' must be a string, but this is a number",
    ),
    (
        "unknown-passed-input",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
            inputs:
              needed: true
              whom: x
        """,
        "main:8:7: step 'first' has no input 'whom' (inputs: who, times, needed)",
    ),
    (
        "missing-required-input",
        """
        spec:
        ---
        run:
          - name: first
            step: ../hello
        """,
        "main:5:11: step 'first' needs input(s) needed",
    ),
    (
        "undeclared-output",
        """
        spec:
        ---
        run:
          - name: first
            script: "true"
        outputs:
          result: x
        """,
        "main:7:3: output 'result' is not declared in spec (outputs: none declared)",
    ),
    (
        "missing-output",
        """
        spec:
          outputs:
            result: {}
        ---
        run:
          - name: first
            script: "true"
        outputs: {}
        """,
        "main:8:10: outputs: must set declared output(s) result",
    ),
    (
        "output-type",
        """
        spec:
          outputs:
            result: {type: boolean}
        ---
        run:
          - name: first
            step: ../hello
            inputs: {needed: true}
        outputs:
          result: ${{ steps.first.outputs.greeting }}
        """,
        "main:10:11: output 'result' must be a boolean, but this is a string",
    ),
    (
        "delegate-unknown",
        """
        spec:
          outputs: delegate
        ---
        run:
          - name: first
            script: "true"
        delegate: frist
        """,
        "main:7:11: delegate names unknown step 'frist'",
    ),
    (
        "env-path",
        """
        spec:
        ---
        exec:
          command: [echo, "${{ env }}"]
        """,
        "main:4:20: use env.NAME to read one variable, not env",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_static_errors(write_step: WriteStep, text: str, expected: str) -> None:
    assert check(write_step, text) == [expected]


def test_outputs_of_delegating_step_are_known(write_step: WriteStep) -> None:
    write_step(
        "wrap/step.yml",
        """
        spec:
          outputs: delegate
        ---
        run:
          - name: inner
            step: ../hello
            inputs: {needed: true}
        delegate: inner
        """,
    )
    found = check(
        write_step,
        """
        spec:
        ---
        run:
          - name: w
            step: ../wrap
          - name: use
            script: echo ${{ steps.w.outputs.greeting }} ${{ steps.w.outputs.nope }}
        """,
    )
    assert found == ["main:7:50: step 'w' has no output 'nope' (outputs: greeting, length)"]


def test_several_problems_are_all_reported_in_order(write_step: WriteStep) -> None:
    found = check(
        write_step,
        """
        spec:
        ---
        run:
          - name: a
            script: echo ${{ inputs.x }}
          - name: b
            script: echo ${{ inputs.y }}
        """,
    )
    assert [line.split(": ")[0] for line in found] == ["main:5:18", "main:7:18"]


def test_errors_in_referenced_files_point_into_them(write_step: WriteStep) -> None:
    write_step("bad/step.yml", "spec:\n---\nexec:\n  command: [echo, '${{ inputs.q }}']\n")
    path = write_step("main/step.yml", "spec:\n---\nrun:\n  - name: a\n    step: ../bad\n")
    [diagnostic] = check_files([path])
    assert diagnostic.position.file.endswith("bad/step.yml")
    assert (diagnostic.position.line, diagnostic.position.col) == (4, 20)


def test_load_errors_become_diagnostics(tmp_path: Path) -> None:
    (tmp_path / "step.yml").write_text("spec:\n---\nexec: {}\n")
    found = check_files([tmp_path / "step.yml", tmp_path / "missing.yml"])
    assert all(isinstance(d, Diagnostic) for d in found)
    assert sorted(str(d) for d in found) == [
        f"{tmp_path}/missing.yml:1:1: cannot read step: "
        f"[Errno 2] No such file or directory: '{tmp_path}/missing.yml'",
        f"{tmp_path}/step.yml:3:7: exec.command must be a non-empty list of strings (argv)",
    ]


async def test_check_files_async(write_step: WriteStep) -> None:
    path = write_step("x/step.yml", "spec:\n---\nexec:\n  command: [echo]\n")
    assert await check_files_async([path]) == []
