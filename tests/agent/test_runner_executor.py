"""`RunnerToolExecutor` against a real in-process runner over a real work dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgehand.agent.runner_executor import OOM_NOTE, RunnerToolExecutor
from forgehand.agent.tools import BUILTIN_TOOLS, apply_edit, numbered
from forgehand.runner.client import RunnerClient

from .conftest import run_env

YIELD = 5.0


@pytest.fixture
def tools(runner: tuple[RunnerClient, Path]) -> RunnerToolExecutor:
    client, work = runner
    (work / "pkg").mkdir()
    (work / "pkg" / "mod.py").write_text("x = 1\ny = 2\nx = 1\n")
    (work / "README.md").write_text("# demo\n")
    return RunnerToolExecutor(client, str(work), env=run_env())


async def test_offers_the_builtin_tools(tools: RunnerToolExecutor) -> None:
    assert [t.name for t in tools.tools()] == [t.name for t in BUILTIN_TOOLS]


async def test_read_file_numbers_lines_and_ranges(tools: RunnerToolExecutor) -> None:
    whole = await tools.call("read_file", {"path": "pkg/mod.py"}, yield_after=YIELD)
    assert whole.text == "     1\tx = 1\n     2\ty = 2\n     3\tx = 1"
    part = await tools.call(
        "read_file", {"path": "pkg/mod.py", "start_line": 2, "end_line": 2}, yield_after=YIELD
    )
    assert part.text == "[lines 2-2 of 3]\n     2\ty = 2"


async def test_missing_file_and_escape_are_tool_errors(tools: RunnerToolExecutor) -> None:
    missing = await tools.call("read_file", {"path": "nope.py"}, yield_after=YIELD)
    assert missing.is_error
    assert "nope.py" in missing.text
    outside = await tools.call("read_file", {"path": "../../etc/passwd"}, yield_after=YIELD)
    assert outside.is_error
    assert "outside" in outside.text


async def test_write_then_edit(
    tools: RunnerToolExecutor, runner: tuple[RunnerClient, Path]
) -> None:
    _, work = runner
    wrote = await tools.call(
        "write_file", {"path": "new/dir/a.txt", "content": "hello\nworld\n"}, yield_after=YIELD
    )
    assert not wrote.is_error
    edit = {"path": "new/dir/a.txt", "old_text": "world", "new_text": "there"}
    edited = await tools.call("edit_file", edit, yield_after=YIELD)
    assert edited.text == "edited new/dir/a.txt: replaced 1 occurrence"
    assert (work / "new/dir/a.txt").read_text() == "hello\nthere\n"


async def test_edit_must_match_exactly_once(tools: RunnerToolExecutor) -> None:
    several = await tools.call(
        "edit_file",
        {"path": "pkg/mod.py", "old_text": "x = 1", "new_text": "x = 3"},
        yield_after=YIELD,
    )
    assert several.is_error
    assert "occurs 2 times" in several.text
    assert "lines 1, 3" in several.text
    missing = await tools.call(
        "edit_file",
        {"path": "pkg/mod.py", "old_text": "y = 3", "new_text": "y = 4"},
        yield_after=YIELD,
    )
    assert missing.is_error
    assert "closest region" in missing.text
    assert "     2\ty = 2" in missing.text


def test_edit_helpers() -> None:
    assert apply_edit("f", "abc", "", "x")[0] is None
    assert apply_edit("f", "a\nb\n", "b", "c") == ("a\nc\n", "edited f: replaced 1 occurrence")
    edited, message = apply_edit("f", "alpha\n", "zzzzzzzz\nqqqq", "x")
    assert edited is None
    assert "not found" in message
    assert numbered("a\nb\n", 5) == "[the file has 2 lines; start_line 5 is past its end]"


async def test_list_files_and_search(tools: RunnerToolExecutor) -> None:
    listed = await tools.call("list_files", {}, yield_after=YIELD)
    assert listed.text.splitlines() == ["README.md (7 bytes)", "pkg/mod.py (18 bytes)"]
    only_py = await tools.call("list_files", {"pattern": "*.py"}, yield_after=YIELD)
    assert only_py.text == "pkg/mod.py (18 bytes)"
    found = await tools.call("search", {"pattern": "y = [0-9]"}, yield_after=YIELD)
    assert found.text == "pkg/mod.py:2:y = 2"
    none = await tools.call("search", {"pattern": "zebra"}, yield_after=YIELD)
    assert none.text == "[no matches]"


async def test_run_reports_output_and_exit_code(tools: RunnerToolExecutor) -> None:
    outcome = await tools.call(
        "run", {"command": "echo out; echo err >&2; exit 3"}, yield_after=YIELD
    )
    assert "out" in outcome.text
    assert "err" in outcome.text
    assert outcome.text.endswith("[exit code 3]")
    assert outcome.exit_code == 3
    assert outcome.handle is None


async def test_run_env_is_only_what_was_given(tools: RunnerToolExecutor) -> None:
    outcome = await tools.call("run", {"command": "env"}, yield_after=YIELD)
    names = {line.split("=", 1)[0] for line in outcome.text.splitlines() if "=" in line}
    assert names <= {"PATH", "LANG", "PWD", "SHLVL", "_", "OLDPWD"}


async def test_long_command_hands_back_then_wait_sees_the_end(tools: RunnerToolExecutor) -> None:
    first = await tools.call("run", {"command": "echo start; sleep 1; echo done"}, yield_after=0.3)
    assert first.handle == "cmd-1"
    assert "start" in first.text
    assert "still running" in first.text
    rest = await tools.wait("cmd-1", 10.0)
    assert rest.handle is None
    assert "done" in rest.text
    assert "start" not in rest.text  # each output once
    assert rest.exit_code == 0


async def test_send_input_and_cancel(tools: RunnerToolExecutor) -> None:
    asked = await tools.call("run", {"command": "read name; echo hello $name"}, yield_after=0.2)
    assert asked.handle is not None
    await tools.send_input(asked.handle, "forge\n")
    answered = await tools.wait(asked.handle, 10.0)
    assert "hello forge" in answered.text
    sleeper = await tools.call("run", {"command": "sleep 30"}, yield_after=0.2)
    assert sleeper.handle is not None
    stopped = await tools.cancel(sleeper.handle)
    assert "[cancelled]" in stopped.text
    again = await tools.wait(sleeper.handle, 1.0)
    assert again.is_error


@pytest.mark.parametrize(
    ("command", "noted"),
    [
        ("bump; exit 1", True),  # gVisor: the killer took a stub process, the run exits 1
        ("bump; kill -KILL $$", True),
        ("bump; exit 0", False),  # it did not fail
        ("exit 1", False),  # it failed, but the killer did not strike meanwhile
    ],
)
async def test_a_failed_run_says_when_the_oom_killer_struck_meanwhile(
    runner: tuple[RunnerClient, Path], command: str, noted: bool
) -> None:
    """Where the runner cannot see the sandbox's OOM kills (gVisor), the host counts
    them; here the count is a file the command bumps."""
    client, work = runner
    count = work / "oom-kills"
    count.write_text("2")

    async def oom_kills() -> int:
        return int(count.read_text())

    tools = RunnerToolExecutor(client, str(work), env=run_env(), oom_kills=oom_kills)
    bump = f"bump() {{ echo 3 > {count}; }}"
    outcome = await tools.call("run", {"command": f"{bump}; {command}"}, yield_after=YIELD)
    assert outcome.text.endswith(OOM_NOTE) is noted, outcome.text


async def test_run_timeout(tools: RunnerToolExecutor) -> None:
    outcome = await tools.call(
        "run", {"command": "sleep 5", "timeout_seconds": 0.3}, yield_after=YIELD
    )
    assert "timed out" in outcome.text


async def test_a_step_tool_without_a_step_is_a_clear_error(
    runner: tuple[RunnerClient, Path],
) -> None:
    client, work = runner
    step_tool = {"name": "lint", "description": "Lint.", "input_schema": {"type": "object"}}
    executor = RunnerToolExecutor(client, str(work), [*BUILTIN_TOOLS, step_tool])
    assert executor.tools()[-1].name == "lint"
    outcome = await executor.call("lint", {}, yield_after=YIELD)
    assert outcome.is_error
    assert "no step runs it" in outcome.text
