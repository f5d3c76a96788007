"""``forgehand agent run``: let the agent work on a task in a copy of a local checkout.

The checkout at ``--repo`` is cloned into a temporary work dir (its work tree is never
touched), a runner is started over the copy (``--sandbox none``: in this process; any
other name: that sandbox backend), and the agent runs with progress on stderr. Changes
come back as the branch ``forgehand/agent-<id>`` in ``--repo``. Exit status: 0 when the
agent finished, 1 when it stopped for another reason (budget, model or sandbox failure;
its partial work is kept on the branch), 2 when the run could not start.

The provider key comes from ANTHROPIC_API_KEY / OPENAI_API_KEY or ``--config``, never from
the repository; it is masked in the trajectory and never given to the sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import posixpath
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from forgehand.agent.budget import Budgets
from forgehand.agent.config import (
    AnthropicConfig,
    OpenAIConfig,
    load_provider_config,
    parse_provider_config,
    resolve_api_key,
)
from forgehand.agent.errors import ModelConfigError
from forgehand.agent.loop import Agent, AgentResult, AgentSettings
from forgehand.agent.prompt import Task, build_prompt
from forgehand.agent.providers import build_provider
from forgehand.agent.step_tools import STEP_CACHE, repository_executor
from forgehand.agent.trajectory import Trajectory
from forgehand.agent.workspace import (
    GitError,
    clone_copy,
    git_dir,
    head_commit,
    repo_root,
    snapshot,
)
from forgehand.agent.workspaces import (
    Workspace,
    WorkspaceError,
    check_env,
    give_to_owner_of,
    open_workspace,
    scratch_dir,
)
from forgehand.cli.solve import chosen_root
from forgehand.runner.errors import RunnerError
from forgehand.steps.masking import Masker

DEFAULT_MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4.1"}
SANDBOXES = ("none", "bwrap", "gvisor", "podman")
EXIT_FINISHED, EXIT_STOPPED, EXIT_UNUSABLE = 0, 1, 2


class AgentCliError(WorkspaceError):
    """The run could not start; the message says what to fix."""


def run_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run_agent(args))
    except (WorkspaceError, GitError, ModelConfigError, RunnerError) as exc:
        print(f"forgehand agent: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


async def run_agent(args: argparse.Namespace) -> int:
    """The whole command; returns the exit status."""
    repo = await repo_root(args.repo)
    config = provider_config(args)
    key = resolve_api_key(config, os.environ)
    secrets = [key.get_secret_value() if key else "", *_env_secrets(args.secret_env)]
    run_id = uuid.uuid4().hex[:8]
    branch = f"forgehand/agent-{run_id}"
    trajectory = args.trajectory or (await git_dir(repo)) / "forgehand" / f"agent-{run_id}.jsonl"
    base = await head_commit(repo)
    root = chosen_root(args)
    _say(f"agent {run_id}: {config.type} {config.model}, sandbox {args.sandbox}")
    async with (
        scratch_dir() as scratch,
        open_workspace(args.sandbox, scratch, root=root) as space,
    ):
        space = await _checkout(repo, space)
        result = await _run_loop(args, config, space, secrets, trajectory)
        message = _commit_message(args.task, result)
        commit = await snapshot(repo, space.host_dir, scratch, base, branch, message)
    _report(result, commit, branch, repo, trajectory)
    return EXIT_FINISHED if result.finished else EXIT_STOPPED


async def _run_loop(
    args: argparse.Namespace,
    config: AnthropicConfig | OpenAIConfig,
    space: Workspace,
    secrets: Sequence[str],
    trajectory: Path,
) -> AgentResult:
    check_env(space.env, secrets)
    # `_checkout` put the repository in `repo/` of the work dir: its parent is free.
    step_cache = (
        space.host_dir.parent / STEP_CACHE,
        posixpath.join(posixpath.dirname(space.sandbox_dir), STEP_CACHE),
    )
    executor, problems = await repository_executor(
        space.client,
        space.host_dir,
        space.sandbox_dir,
        space.env,
        step_cache=step_cache,
        oom_kills=space.oom_kills,
    )
    for problem in problems:
        print(f"forgehand agent: skipped a repository step: {problem}", file=sys.stderr)
    system, task = await build_prompt(
        Task.from_text(args.task), space.host_dir, executor.tools(), lambda _author: False
    )
    provider = build_provider(config)
    budgets = Budgets(
        max_steps=args.max_steps,
        max_tokens=args.max_tokens,
        max_cost_usd=args.max_cost,
        max_seconds=args.max_seconds,
    )
    masker = Masker(secrets)
    agent = Agent(
        provider,
        executor,
        budgets=budgets,
        settings=AgentSettings(yield_after_s=args.yield_after),
        trajectory=Trajectory(trajectory, masker, observer=_progress),
        secrets=secrets,
    )
    try:
        return await agent.run(system, task)
    finally:
        await provider.aclose()


def provider_config(args: argparse.Namespace) -> AnthropicConfig | OpenAIConfig:
    """The provider configuration from --config and the flags (flags win)."""
    if args.config is None:
        kind = args.provider or "anthropic"
        data = {"type": kind, "model": args.model or DEFAULT_MODELS[kind]}
        return parse_provider_config(data | ({"base_url": args.base_url} if args.base_url else {}))
    config = load_provider_config(args.config)
    if args.provider and args.provider != config.type:
        raise AgentCliError(
            f"--provider {args.provider} contradicts type {config.type!r} in {args.config}: "
            "drop one of them"
        )
    update = {"model": args.model, "base_url": args.base_url}
    return config.model_copy(update={k: v for k, v in update.items() if v})


async def _checkout(repo: Path, space: Workspace) -> Workspace:
    """Clone `repo` into `repo/` of the work dir (a sandbox may keep its own files there)."""
    await clone_copy(repo, space.host_dir / "repo")
    await asyncio.to_thread(give_to_owner_of, space.host_dir, space.host_dir / "repo")
    return dataclasses.replace(
        space,
        host_dir=space.host_dir / "repo",
        sandbox_dir=posixpath.join(space.sandbox_dir, "repo"),
    )


def _env_secrets(names: Sequence[str]) -> list[str]:
    return [os.environ[name] for name in names if os.environ.get(name)]


def _commit_message(task: str, result: AgentResult) -> str:
    title = Task.from_text(task).title[:60] or "task"
    state = "finished" if result.finished else f"stopped ({result.reason.value}): partial work"
    body = result.summary or result.message
    return f"forgehand agent: {title}\n\n{body}\n\nRun {state}."


def _report(
    result: AgentResult, commit: str | None, branch: str, repo: Path, trajectory: Path
) -> None:
    cost = f"${result.usage.cost_usd:.4f}"
    _say(f"{result.reason.value} after {result.steps} steps, {result.elapsed_s:.1f}s, {cost}")
    if not result.finished:
        _say(f"stopped: {result.message}")
    if commit is None:
        _say("no changes to keep")
    else:
        _say(f"changes on branch {branch} in {repo} ({commit[:12]})")
    _say(f"trajectory: {trajectory} (forgehand trajectory show {trajectory})")


def _progress(event: dict[str, Any]) -> None:
    kind = event.get("type")
    if kind == "model_call":
        calls = ", ".join(c["name"] for c in event.get("tool_calls", [])) or "no tool call"
        _say(
            f"step {event['step']}: {calls} · {event['total_tokens']} tokens · "
            f"${event['total_cost_usd']:.4f}"
        )
    elif kind == "tool_call":
        code = event["exit_code"]
        status = "error" if event["is_error"] else ("ok" if code is None else f"exit {code}")
        if event.get("handle"):
            status = f"running as {event['handle']}"
        _say(f"  {event['name']} {_brief(event['arguments'])} → {status}")
    elif kind == "context_trimmed":
        _say(f"  (trimmed {event['outputs']} old outputs to fit the context)")


def _brief(value: Any, limit: int = 80) -> str:
    text = str(value).replace("\n", "⏎")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _say(line: str) -> None:
    print(f"[forgehand] {line}", file=sys.stderr, flush=True)
