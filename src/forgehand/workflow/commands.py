"""The work behind ``forgehand solve``, ``runs``, ``show`` and ``demo`` (imported on use)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from forgehand.agent.budget import Budgets
from forgehand.agent.config import resolve_api_key
from forgehand.agent.errors import ModelConfigError
from forgehand.agent.providers import build_provider
from forgehand.agent.workspaces import WorkspaceError
from forgehand.forge import (
    ForgeConfig,
    ForgeError,
    ForgeKind,
    GitHubConfig,
    GitLabConfig,
    IssueRef,
    open_forge,
)
from forgehand.workflow.app import Home, SandboxChoiceError, build_workflow, choose_sandbox
from forgehand.workflow.engine import AgentOptions
from forgehand.workflow.model import Outcome, Phase, RunRecord
from forgehand.workflow.progress import ConsoleProgress
from forgehand.workflow.store import StoreError

EXIT_DONE, EXIT_ENDED, EXIT_UNUSABLE = 0, 1, 2
_UNUSABLE = (ForgeError, ModelConfigError, SandboxChoiceError, StoreError, WorkspaceError)


def _home(args: argparse.Namespace) -> Home:
    return Home(args.home) if getattr(args, "home", None) else Home.default()


def _fail(command: str, message: str) -> int:
    print(f"forgehand {command}: {message}", file=sys.stderr)
    return EXIT_UNUSABLE


# -- solve --------------------------------------------------------------------------------


def solve_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(solve(args))
    except _UNUSABLE as exc:
        return _fail("solve", str(exc))


def forge_config(ref: IssueRef, url: str | None, home: Home) -> ForgeConfig:
    """The forge serving the issue: its API URL derived from the issue's host."""
    kind = ref.project.kind
    if kind is ForgeKind.LOCAL:
        return home.local_forge()
    if kind is ForgeKind.GITLAB:
        return GitLabConfig(url=url or ref.project.host)
    host = ref.project.host
    default = "https://api.github.com" if host == "https://github.com" else f"{host}/api/v3"
    return GitHubConfig(url=url or default)


_IMAGE_PATTERN = re.compile(r"^[A-Za-z0-9*?\[\]!][A-Za-z0-9._/:@*?\[\]!-]*$")


def image_pattern(pattern: str) -> str:
    """``pattern`` if it is a shell pattern over image names (``node:*``); ValueError if not."""
    if not _IMAGE_PATTERN.match(pattern):
        raise ValueError(
            f"{pattern!r} is not a pattern over image names such as 'node:*' or "
            "'localhost/ci-*:1' (image name characters plus * ? [ ] !)"
        )
    return pattern


async def solve(args: argparse.Namespace) -> int:
    from forgehand.cli.agent_run import provider_config
    from forgehand.cli.solve import chosen_root

    ref = IssueRef.parse(args.issue)
    home = _home(args)
    root = chosen_root(args)
    try:
        allowed_images = tuple(image_pattern(p) for p in args.allow_image)
    except ValueError as exc:
        raise WorkspaceError(f"--allow-image: {exc}") from None
    sandbox = choose_sandbox(args.sandbox)
    config = provider_config(args)
    key = resolve_api_key(config, os.environ)
    budgets = Budgets(
        max_steps=args.max_steps,
        max_tokens=args.max_tokens,
        max_cost_usd=args.max_cost,
        max_seconds=args.max_seconds,
    )
    agent = AgentOptions(
        provider=lambda: build_provider(config),
        budgets=budgets,
        secrets=(key.get_secret_value(),) if key else (),
    )
    progress = ConsoleProgress()
    progress.note(f"model: {config.type} {config.model} (live); sandbox: {sandbox}")
    forge = open_forge(forge_config(ref, args.forge_url, home), ref.project)
    try:
        workflow = build_workflow(
            forge, home, sandbox, agent, progress, root=root, allowed_images=allowed_images
        )
        record = await workflow.solve(ref, args.requester)
    finally:
        await forge.aclose()
    print_summary(record)
    return EXIT_DONE if record.outcome is Outcome.DONE else EXIT_ENDED


def print_summary(record: RunRecord) -> None:
    """What a person wants to know at the end of a run, on stdout."""
    print(f"run {record.run_id}: {record.outcome.value if record.outcome else record.status}")
    print(f"  issue: {record.issue}")
    if record.outcome not in (None, Outcome.DONE):
        print(f"  reason: {record.message}")
    publish = record.outputs.get(Phase.PUBLISH)
    if publish:
        print(f"  draft MR: {publish['mr_url']} (branch {publish['branch']})")
    verify = record.outputs.get(Phase.VERIFY)
    if verify:
        verification = verify["verification"]
        print(f"  evidence: {verification['verdict']} — {verification['summary']}")
    agent = record.outputs.get(Phase.AGENT)
    if agent:
        print(f"  cost: {agent['cost']}")
        print(f"  trajectory: {agent['trajectory']}")


# -- runs, show ---------------------------------------------------------------------------


def _row(record: RunRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "issue": record.issue,
        "status": record.status.value,
        "phase": record.phase.value if record.phase else None,
        "outcome": record.outcome.value if record.outcome else None,
        "message": record.message,
        "created": record.created,
        "updated": record.updated,
    }


def runs_command(args: argparse.Namespace) -> int:
    try:
        records = asyncio.run(_home(args).store().list_runs(args.limit))
    except StoreError as exc:
        return _fail("runs", str(exc))
    for record in records:
        row = _row(record)
        if args.json:
            print(json.dumps(row))
        else:
            state = row["outcome"] or f"{row['status']} ({row['phase']})"
            print(f"{row['run_id']}\t{row['created']}\t{state}\t{row['issue']}")
    return EXIT_DONE


def show_command(args: argparse.Namespace) -> int:
    try:
        record = asyncio.run(_home(args).store().get(args.run))
    except StoreError as exc:
        return _fail("show", str(exc))
    if args.json:
        outputs = {phase.value: out for phase, out in record.outputs.items()}
        print(json.dumps(_row(record) | {"phases": outputs}, indent=2, default=str))
        return EXIT_DONE
    print_summary(record)
    for phase in Phase:
        out = record.outputs.get(phase)
        mark = "✓" if out is not None else "·"
        detail = out.get("detail", "") if out else ""
        print(f"  {mark} {phase.value:<9} {detail}")
    return EXIT_DONE


# -- demo ---------------------------------------------------------------------------------


def demo_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(demo(args))
    except _UNUSABLE as exc:
        return _fail("demo", str(exc))


async def demo(args: argparse.Namespace) -> int:
    from forgehand.demo import run_demo

    sandbox = choose_sandbox(args.sandbox)
    directory = args.dir or Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="fh-demo-"))
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    progress = ConsoleProgress()
    progress.note(f"forgehand demo in {directory} (sandbox: {sandbox})")
    result = await run_demo(directory.absolute(), sandbox, progress)
    print_summary(result.record)
    home = result.home.root
    print(f"  sandbox: {sandbox}{' (no isolation)' if sandbox == 'none' else ''}")
    print("  the model's side was a RECORDED session (replay server); all else ran for real")
    print(f"  look: forgehand local mr list --home {home}")
    print(f"        forgehand show {result.record.run_id} --home {home}")
    print(f"        git -C {result.repo} log --stat {_branch(result.record)}")
    return EXIT_DONE if result.record.outcome is Outcome.DONE else EXIT_ENDED


def _branch(record: RunRecord) -> str:
    return str(record.outputs.get(Phase.GUARD, {}).get("branch", "--all"))
