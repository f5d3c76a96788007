"""A repository's own steps as agent tools (``.forgehand/steps/``, read from the default
branch by the caller), mapped to the step references the runner runs them by.

The git steps they reference are fetched here, on the trusted side, and staged into a
directory of the sandbox that each step run names as its cache (the sandbox cannot fetch);
a tool whose step tree does not resolve or fetch is left out with the reason."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from forgehand.agent.model import ToolSpec
from forgehand.agent.runner_executor import OomCount, RunnerToolExecutor
from forgehand.agent.tools import BUILTIN_NAMES, BUILTIN_TOOLS
from forgehand.runner.client import RunnerClient
from forgehand.steps.errors import StepError
from forgehand.steps.prefetch import default_cache_dir, prefetch, stage
from forgehand.steps.tools import discover_tool_steps

STEP_CACHE = ".forgehand-step-cache"
"""The name of the directory, beside the repository, where git steps are staged."""


@dataclass
class StepTools:
    """Tool specs for the model, the step reference of each, and files that were skipped."""

    specs: list[ToolSpec] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    """Tool name -> its step file on the host."""

    def drop(self, name: str, problem: str) -> None:
        """Leave the tool ``name`` out, for ``problem``."""
        self.specs = [spec for spec in self.specs if spec.name != name]
        self.refs.pop(name, None)
        self.files.pop(name, None)
        self.problems.append(f"{name}: {problem}")


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
        file = Path(tool.step.path).resolve()
        relative = file.relative_to(host_repo.resolve())
        tools.refs[tool.name] = str(PurePosixPath(sandbox_repo) / relative.as_posix())
        tools.files[tool.name] = file
        tools.specs.append(ToolSpec.model_validate(tool.definition))
    return tools


async def prefetch_step_tools(
    tools: StepTools, host_repo: Path, into: Path, cache: Path | None = None
) -> None:
    """Fetch the git steps the tools reference (recursively) into the host's cache and
    stage them into ``into``; a tool whose tree does not resolve is dropped."""
    checkouts: set[Path] = set()
    for name, file in list(tools.files.items()):
        try:
            used = await prefetch(str(file), host_repo, cache or default_cache_dir())
        except StepError as exc:
            tools.drop(name, str(exc))
            continue
        checkouts.update(used)
    await asyncio.to_thread(stage, checkouts, into)


async def repository_executor(
    client: RunnerClient,
    host_repo: Path,
    sandbox_repo: str,
    env: Mapping[str, str],
    *,
    step_cache: tuple[Path, str],
    oom_kills: OomCount | None = None,
) -> tuple[RunnerToolExecutor, list[str]]:
    """An executor offering the built-in tools plus the repository's own steps, and the
    problems with step files that were skipped (to tell the person running forgehand).

    ``step_cache`` is one directory as the host and the sandbox see it, outside the
    repository: the git steps are staged there."""
    tools = await asyncio.to_thread(repository_step_tools, host_repo, sandbox_repo)
    host_cache, sandbox_cache = step_cache
    await prefetch_step_tools(tools, host_repo, host_cache)
    executor = RunnerToolExecutor(
        client,
        sandbox_repo,
        [*BUILTIN_TOOLS, *tools.specs],
        env=env,
        step_refs=tools.refs,
        step_cache_dir=sandbox_cache,
        oom_kills=oom_kills,
    )
    return executor, tools.problems
