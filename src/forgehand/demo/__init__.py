"""`forgehand demo`: the whole issue → draft MR workflow on a bundled example, offline.

The example (`example_repo.yaml`) is a small Python package with an off-by-one bug and a
failing test; `demo` puts it in a local forge (a bare repository plus SQLite) with an issue
about the bug, then runs the real workflow — sandbox, harness test runs, extraction,
policy, push, draft MR, issue comment. Only the model is not live: its side is a
recorded session (`session.yaml`) served by the replay server over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from forgehand.agent.config import AnthropicConfig, Prices
from forgehand.agent.model import ModelProvider
from forgehand.agent.providers import build_provider
from forgehand.agent.replay import ReplayServer, Script
from forgehand.forge.base import ForgeKind, IssueRef, ProjectRef
from forgehand.forge.local import LocalForge, init_repo
from forgehand.workflow.app import Home, build_workflow
from forgehand.workflow.engine import AgentOptions
from forgehand.workflow.model import RunRecord
from forgehand.workflow.progress import Progress

REPLAY_KEY = "replay-demo-no-real-key"
RECORDED_MODEL = "recorded-demo-session"
# What the recording's token counts would cost at list prices of a mid-size model.
DEMO_PRICES = Prices(input_per_mtok=3.0, output_per_mtok=15.0)


@dataclass(frozen=True)
class DemoResult:
    record: RunRecord
    issue: IssueRef
    home: Home
    repo: Path


def _data(name: str) -> str:
    return resources.files("forgehand.demo").joinpath(name).read_text(encoding="utf-8")


def example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(_data("example_repo.yaml"))
    return data


def session_script() -> Script:
    return Script.model_validate(yaml.safe_load(_data("session.yaml")))


def _git_env(author: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return env | {
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": author["name"],
        "GIT_AUTHOR_EMAIL": author["email"],
        "GIT_COMMITTER_NAME": author["name"],
        "GIT_COMMITTER_EMAIL": author["email"],
    }


def _write_and_push(spec: dict[str, Any], work: Path, bare: Path) -> None:
    """Blocking: write the example's files, commit them, push to the bare repository."""
    env = _git_env(spec["author"])
    branch = spec["default_branch"]
    subprocess.run(["git", "init", "-q", "-b", branch, str(work)], check=True, env=env)
    for name, text in spec["files"].items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for args in (
        ["add", "-A"],
        ["commit", "-q", "-m", "pagekit: pages of a sequence"],
        ["push", "-q", str(bare), branch],
    ):
        subprocess.run(["git", "-C", str(work), *args], check=True, env=env, capture_output=True)


async def create_example(directory: Path, home: Home) -> IssueRef:
    """The example repository in the local forge and its issue (reused when present)."""
    spec = example()
    bare = await asyncio.to_thread(lambda: (directory / f"{spec['name']}.git").absolute())
    forge = LocalForge(home.local_forge(), ProjectRef(ForgeKind.LOCAL, "", str(bare)))
    if await asyncio.to_thread((bare / "HEAD").is_file):
        return IssueRef(forge.project, 1)
    await init_repo(bare, spec["default_branch"])
    await asyncio.to_thread(_write_and_push, spec, directory / "seed", bare)
    issue = spec["issue"]
    return await forge.create_issue(
        issue["title"], issue["body"], author=spec["author"]["username"]
    )


def demo_provider(server: ReplayServer) -> ModelProvider:
    config = AnthropicConfig(
        model=RECORDED_MODEL,
        base_url=server.base_url,
        api_key=SecretStr(REPLAY_KEY),
        prices=DEMO_PRICES,
        timeout_s=30.0,
    )
    return build_provider(config, environ={})


async def run_demo(directory: Path, sandbox: str, progress: Progress) -> DemoResult:
    """Create (or reuse) the example under `directory` and run the workflow on its issue."""
    home = Home(directory / "home")
    ref = await create_example(directory, home)
    progress.note(f"example repository {ref.project.path}, issue {ref}")
    forge = LocalForge(home.local_forge(), ref.project)
    async with ReplayServer(session_script()) as server:
        progress.note(
            f"model: a RECORDED session replayed from {server.base_url} (no live model, "
            "no API key); everything else runs for real"
        )
        agent = AgentOptions(provider=lambda: demo_provider(server), secrets=(REPLAY_KEY,))
        workflow = build_workflow(forge, home, sandbox, agent, progress)
        record = await workflow.solve(ref)
    return DemoResult(record, ref, home, Path(ref.project.path))
