"""A repository's steps become agent tools and run through the runner's step engine."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from forgehand.agent.runner_executor import RunnerToolExecutor
from forgehand.agent.step_tools import repository_step_tools
from forgehand.agent.tools import BUILTIN_TOOLS
from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.config import RunnerConfig
from forgehand.runner.core import RunnerCore

COUNT_STEP = """\
spec:
  description: Count the lines of a file in the repository.
  inputs:
    path:
      type: string
      description: the file to count
  outputs:
    lines:
      type: number
---
exec:
  command:
    - bash
    - -c
    - >-
      echo "{\\"name\\":\\"lines\\",\\"value\\":$(wc -l < ${{ inputs.path }})}"
      >> ${{ output_file }}
"""


@pytest.fixture
async def repo_client() -> AsyncIterator[tuple[Path, RunnerClient]]:
    base = Path(tempfile.mkdtemp(prefix="fh-st-", dir="/tmp"))
    repo = base / "repo"
    (repo / ".forgehand" / "steps" / "count_lines").mkdir(parents=True)
    (repo / ".forgehand" / "steps" / "count_lines" / "step.yml").write_text(COUNT_STEP)
    (repo / ".forgehand" / "steps" / "broken.yml").write_text("spec: [not, a, spec\n")
    (repo / "data.txt").write_text("a\nb\nc\n")
    try:
        config = RunnerConfig(state_dir=base / "state", roots=(repo,))
        async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
            yield repo, client
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_repository_steps_are_tools_with_schemas(tmp_path: Path) -> None:
    (tmp_path / ".forgehand" / "steps" / "count_lines").mkdir(parents=True)
    (tmp_path / ".forgehand" / "steps" / "count_lines" / "step.yml").write_text(COUNT_STEP)
    tools = repository_step_tools(tmp_path, "/work/repo")
    assert [t.name for t in tools.specs] == ["count_lines"]
    assert tools.specs[0].input_schema["required"] == ["path"]
    assert tools.refs["count_lines"] == "/work/repo/.forgehand/steps/count_lines/step.yml"


async def test_a_repository_step_runs_as_a_tool(repo_client: tuple[Path, RunnerClient]) -> None:
    repo, client = repo_client
    tools = repository_step_tools(repo, str(repo))
    assert any("broken.yml" in problem for problem in tools.problems)
    executor = RunnerToolExecutor(
        client, str(repo), [*BUILTIN_TOOLS, *tools.specs], step_refs=tools.refs
    )
    outcome = await executor.call("count_lines", {"path": "data.txt"}, yield_after=30)
    assert not outcome.is_error, outcome.text
    assert '"lines": 3' in outcome.text
    missing = await executor.call("no_such_tool", {}, yield_after=30)
    assert missing.is_error
    assert "count_lines" in missing.text
