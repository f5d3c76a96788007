"""A repository's own steps as agent tools (``.forgehand/steps/``, read from the default
branch by the caller), mapped to the step references the runner runs them by."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from forgehand.agent.model import ToolSpec
from forgehand.agent.runner_executor import RunnerToolExecutor
from forgehand.agent.tools import BUILTIN_NAMES, BUILTIN_TOOLS
from forgehand.runner.client import RunnerClient
from forgehand.steps.tools import discover_tool_steps


@dataclass
class StepTools:
    """Tool specs for the model, the step reference of each, and files that were skipped."""

    specs: list[ToolSpec] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def repository_step_tools(host_repo: Path, sandbox_repo: str) -> StepTools:
    """The steps under ``host_repo/.forgehand/steps`` as tools whose references point at the
    same files inside the sandbox (``sandbox_repo``). Built-in tool names cannot be taken
    over by a repository step. Blocking file I/O: call through ``asyncio.to_thread``."""
    found = discover_tool_steps(host_repo)
    tools = StepTools(problems=[str(d) for d in found.diagnostics])
    for tool in found.tools:
        if tool.name in BUILTIN_NAMES:
            tools.problems.append(f"{tool.name}: a built-in tool has this name; rename the step")
            continue
        relative = Path(tool.step.path).resolve().relative_to(host_repo.resolve())
        tools.refs[tool.name] = str(PurePosixPath(sandbox_repo) / relative.as_posix())
        tools.specs.append(ToolSpec.model_validate(tool.definition))
    return tools


async def repository_executor(
    client: RunnerClient, host_repo: Path, sandbox_repo: str, env: Mapping[str, str]
) -> tuple[RunnerToolExecutor, list[str]]:
    """An executor offering the built-in tools plus the repository's own steps, and the
    problems with step files that were skipped (to tell the person running forgehand)."""
    tools = await asyncio.to_thread(repository_step_tools, host_repo, sandbox_repo)
    executor = RunnerToolExecutor(
        client, sandbox_repo, [*BUILTIN_TOOLS, *tools.specs], env=env, step_refs=tools.refs
    )
    return executor, tools.problems
