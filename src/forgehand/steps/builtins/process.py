"""Process built-ins: ``run`` (a shell command) and ``exec`` (an argv, no shell).

Both run in the work dir with the step's environment, stream stdout and stderr as they
arrive, and end the whole process group when ``timeout_seconds`` passes. A non-zero exit
fails the step; the exit code is an output either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from forgehand.steps.builtins.base import Builtin, BuiltinContext, builtin
from forgehand.steps.errors import BuiltinError, StepError
from forgehand.steps.process import ProcessResult, run_streaming, shell_argv

TIMEOUT_DOC = "Seconds before the command and its children are killed (exit code 124)."
OUTPUTS_YAML = """
  outputs:
    exit_code:
      type: number
      description: Exit code of the command; 128+N when killed by signal N, 124 on timeout.
    timed_out:
      type: boolean
      description: True when the command was killed because timeout_seconds passed.
"""

RUN_SPEC = f"""
spec:
  description: >-
    Run a shell command (bash, or sh where bash is missing) in the work dir. Output is
    streamed as it is produced. The step fails when the command exits non-zero.
  inputs:
    command:
      type: string
      description: The shell command line, e.g. "python -m pytest -x tests/".
    timeout_seconds:
      type: number
      default: 600
      description: {TIMEOUT_DOC}
{OUTPUTS_YAML}"""

EXEC_SPEC = f"""
spec:
  description: >-
    Run a program with arguments, without a shell (no quoting, globbing or pipes), in the
    work dir. Output is streamed. The step fails when the program exits non-zero.
  inputs:
    argv:
      type: array
      description: Program and arguments, e.g. ["python", "-m", "pytest", "-x"].
    timeout_seconds:
      type: number
      default: 600
      description: {TIMEOUT_DOC}
{OUTPUTS_YAML}"""


def _timeout(call: BuiltinContext) -> float:
    value = call.inputs["timeout_seconds"]
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise BuiltinError(
            "invalid_argument", f"timeout_seconds must be a number > 0, not {value!r}"
        )
    return float(value)


async def _run(call: BuiltinContext, argv: Sequence[str]) -> dict[str, Any]:
    timeout = _timeout(call)
    try:
        result: ProcessResult = await run_streaming(
            argv, cwd=str(call.work_dir), env=call.env, output=call.output, kill_after=timeout
        )
    except StepError as exc:
        raise BuiltinError("not_found", exc.message) from None
    outputs: dict[str, Any] = {"exit_code": result.exit_code, "timed_out": result.timed_out}
    if result.timed_out:
        raise BuiltinError(
            "timeout",
            f"killed after {timeout:g} s; raise timeout_seconds or run less at once",
            exit_code=result.exit_code,
            outputs=outputs,
        )
    if result.exit_code != 0:
        raise BuiltinError(
            "command_failed",
            f"exited with code {result.exit_code}",
            exit_code=result.exit_code,
            outputs=outputs,
        )
    return outputs


@builtin("run", RUN_SPEC)
async def run(call: BuiltinContext) -> dict[str, Any]:
    """A shell command."""
    command = call.text("command")
    if not command.strip():
        raise BuiltinError("invalid_argument", "command is empty")
    return await _run(call, await asyncio.to_thread(shell_argv, command, call.env))


@builtin("exec", EXEC_SPEC)
async def exec_(call: BuiltinContext) -> dict[str, Any]:
    """An argv without a shell."""
    argv = call.inputs["argv"]
    if not argv or not all(isinstance(arg, str) for arg in argv):
        raise BuiltinError("invalid_argument", "argv must be a non-empty array of strings")
    return await _run(call, argv)


BUILTINS: tuple[Builtin, ...] = (run, exec_)
