"""Fixtures for the workflow: a local forge with the demo's example, scripted models, keepers
that never outlive a test, and helpers to run a workflow in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forgehand.agent.budget import Budgets
from forgehand.agent.replay import ReplayServer, Script
from forgehand.demo import create_example, demo_provider, session_script
from forgehand.forge.base import Forge, ForgeKind, IssueRef, ProjectRef
from forgehand.forge.local import LocalForge, create_issue, init_repo
from forgehand.workflow.app import Home
from forgehand.workflow.engine import AgentOptions, PhaseHook, Workflow, WorkflowOptions
from forgehand.workflow.mirror import MirrorCache
from forgehand.workflow.store import OwnerAlive, SqliteRunStore, owner_alive

REPLAY_KEY = "replay-demo-no-real-key"


def kill_keepers_under(base: Path) -> None:
    """SIGKILL runner keepers whose state dir lies under `base` (found by their cmdline)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "forgehand-keeper" in cmdline and str(base) in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), 9)


@pytest.fixture
def short_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A short temp dir that also becomes tempfile's default (runner sockets need short paths)."""
    path = Path(tempfile.mkdtemp(prefix="fhw-", dir="/tmp"))
    path.chmod(0o711)  # a sandbox's own uid must reach the work dirs below
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield path
    kill_keepers_under(path)
    shutil.rmtree(path, ignore_errors=True)


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return result.stdout.strip()


def turn(name: str, **arguments: Any) -> dict[str, Any]:
    """A scripted model turn calling one tool."""
    call = {"name": name, "arguments": arguments}
    return {"reply": {"tool_calls": [call], "usage": {"input_tokens": 100, "output_tokens": 20}}}


FIX = turn(
    "edit_file",
    path="pagekit/pagination.py",
    old_text="    start = page * per_page\n",
    new_text="    start = (page - 1) * per_page\n",
)
FINISH = turn("finish", summary="done")


@dataclass
class Scenario:
    """The demo's example in a local forge under `root`, and how to run workflows on it."""

    root: Path
    home: Home
    ref: IssueRef
    forge: LocalForge

    @property
    def bare(self) -> Path:
        return Path(self.ref.project.path)

    def store(self, alive: OwnerAlive = owner_alive) -> SqliteRunStore:
        return SqliteRunStore(self.home.runs_db, alive=alive)

    @contextlib.asynccontextmanager
    async def workflow(
        self,
        script: Script | None = None,
        *,
        forge: Forge | None = None,
        store: SqliteRunStore | None = None,
        after_phase: PhaseHook | None = None,
        sandbox: str = "none",
        budgets: Budgets | None = None,
        root: dict[str, str] | None = None,
        allowed_images: tuple[str, ...] = (),
    ) -> AsyncIterator[tuple[Workflow, ReplayServer]]:
        async with ReplayServer(script or session_script()) as server:
            agent = AgentOptions(
                provider=lambda: demo_provider(server),
                budgets=budgets or Budgets(),
                secrets=(REPLAY_KEY,),
            )
            workflow = Workflow(
                store or self.store(),
                MirrorCache(self.home.mirrors),
                forge or self.forge,
                agent,
                WorkflowOptions(
                    sandbox=sandbox,
                    home=self.home.root,
                    root=root,
                    allowed_images=allowed_images,
                ),
                after_phase=after_phase,
            )
            yield workflow, server
        assert server.mismatches == [], server.mismatches[0].message()


def scripted(*turns: dict[str, Any]) -> Script:
    return Script.model_validate({"turns": list(turns)})


async def repo_scenario(
    root: Path, files: dict[str, str], title: str = "Add a feature"
) -> Scenario:
    """A repository holding `files` in a local forge under `root`, with one issue."""
    home = Home(root / "home")
    bare = await init_repo(root / "app.git")
    seed = root / "seed"
    git(root, "init", "-q", "-b", "main", str(seed))
    for name, text in files.items():
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_text(text)
    git(seed, "add", "-A")
    git(seed, "-c", "user.name=A", "-c", "user.email=a@x.invalid", "commit", "-qm", "init")
    git(seed, "push", "-q", str(bare), "main")
    ref = await create_issue(home.local_forge(), bare, title, "x", author="alice")
    forge = LocalForge(home.local_forge(), ProjectRef(ForgeKind.LOCAL, "", str(bare)))
    return Scenario(root, home, ref, forge)


@pytest.fixture
async def scenario(short_tmp: Path) -> Scenario:
    root = short_tmp / "forge"
    root.mkdir()
    home = Home(root / "home")
    ref = await create_example(root, home)
    return Scenario(root, home, ref, LocalForge(home.local_forge(), ref.project))


def cli_env(scratch: Path, extra: dict[str, str]) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    home = {"TMPDIR": str(scratch), "HOME": str(scratch / "home"), "GIT_CONFIG_NOSYSTEM": "1"}
    return env | home | extra


async def run_cli(
    scratch: Path, *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """The CLI as a subprocess; output to files (a runner keeper may outlive it)."""
    out, err = scratch / "cli.out", scratch / "cli.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "forgehand.cli.main",
            *argv,
            env=cli_env(scratch, env or {}),
            stdout=stdout,
            stderr=stderr,
        )
        code = await asyncio.wait_for(process.wait(), 240)
    return code, out.read_text(), err.read_text()
