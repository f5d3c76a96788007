"""Git step references are fetched on the trusted side and staged for the sandbox.

The git remote is a real ``git daemon`` on loopback (the git:// protocol); the sandboxed
runs use the real bubblewrap backend, and the agent's tool runs the real runner core.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GitServer

from forgehand.agent.step_tools import repository_executor
from forgehand.runner.client import LocalTransport, RunnerClient
from forgehand.runner.config import RunnerConfig
from forgehand.runner.core import RunnerCore
from forgehand.runner.model import RunSpec
from forgehand.steps import MemorySink, StepEngine, StepStatus
from forgehand.steps.errors import FetchError, StepReferenceError
from forgehand.steps.prefetch import prefetch, stage
from forgehand.steps.references import CachedCheckouts, cache_name, check_git_source

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="the bubblewrap backend needs root and the `bubblewrap` package",
)

GREET = """
spec:
  inputs:
    echo:
      type: string
---
exec:
  command: [echo, "inner says ${{ inputs.echo }}"]
"""


def _outer(inner_url: str) -> dict[str, str]:
    """A step repository whose root step uses a step of another git repository."""
    return {
        "func.yml": f"""
            spec:
              inputs:
                who:
                  type: string
            ---
            run:
              - name: inner
                step: {inner_url}/-/greet@v1
                inputs:
                  echo: ${{{{ inputs.who }}}}
              - name: helper
                step: ./helper
            """,
        "helper/step.yml": """
            spec:
            ---
            exec:
              command: [echo, "helper ran"]
            """,
    }


@pytest.fixture
def served(git_server: GitServer) -> tuple[GitServer, str, str]:
    """``inner`` (a greet step) and ``outer`` (uses inner's greet) on the git server."""
    inner = git_server.add("inner", {"greet/step.yml": GREET})
    outer = git_server.add("outer", _outer(inner))
    return git_server, inner, outer


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp that a sandbox's own user can reach."""
    path = Path(tempfile.mkdtemp(prefix="fh-pf-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- what reaches git ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://gitlab.example/group/steps",
        "http://127.0.0.1:8080/steps.git",
        "ssh://git@gitlab.example/group/steps.git",
        "git://127.0.0.1/steps",
        "git@gitlab.example:group/steps.git",
    ],
)
def test_remote_urls_are_accepted(url: str) -> None:
    check_git_source(url, "v1.2", local=False)


@pytest.mark.parametrize(
    ("url", "rev", "problem"),
    [
        ("file:///etc", "v1", "local paths and file:// are refused"),
        ("/srv/steps.git", "v1", "local paths and file:// are refused"),
        ("ext::sh -c touch% /tmp/pwned", "v1", "local paths and file:// are refused"),
        ("--upload-pack=touch /tmp/pwned", "v1", "is not a git URL"),
        ("https://gitlab.example/steps", "--output=/tmp/x", "is not a git revision"),
        ("https://gitlab.example/steps", "a..b", "is not a git revision"),
    ],
)
def test_dangerous_sources_are_refused(url: str, rev: str, problem: str) -> None:
    with pytest.raises(FetchError, match=problem):
        check_git_source(url, rev, local=False)


def test_local_sources_only_where_allowed() -> None:
    check_git_source("file:///srv/steps.git", "v1", local=True)
    check_git_source("/srv/steps.git", "v1", local=True)
    with pytest.raises(FetchError):
        check_git_source("ext::sh -c id", "v1", local=True)


# --- resolving on the trusted side ----------------------------------------------------


async def test_prefetch_collects_every_checkout_of_the_tree(
    served: tuple[GitServer, str, str], tmp_path: Path
) -> None:
    _, inner, outer = served
    checkouts = await prefetch(f"{outer}@v1", tmp_path, tmp_path / "cache")
    assert sorted(c.name for c in checkouts) == sorted(
        [cache_name(inner, "v1"), cache_name(outer, "v1")]
    )
    staged = tmp_path / "staged"
    stage(checkouts, staged)
    assert (staged / cache_name(outer, "v1") / "helper" / "step.yml").is_file()
    assert (staged / cache_name(inner, "v1") / "greet" / "step.yml").is_file()
    assert not any(path.name == ".git" for path in staged.rglob("*"))


async def test_a_git_step_may_not_reference_files_outside_its_checkout(
    git_server: GitServer, tmp_path: Path
) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "step.yml").write_text("spec:\n---\nexec:\n  command: [id]\n")
    escape = "../" * 10 + str(tmp_path / "secret").lstrip("/")
    url = git_server.add(
        "escape",
        {"func.yml": f"spec:\n---\nrun:\n  - name: out\n    step: ./{escape}\n"},
    )
    with pytest.raises(StepReferenceError, match="own repository only"):
        await prefetch(f"{url}@v1", tmp_path, tmp_path / "cache")


async def test_a_local_step_may_not_reference_files_outside_its_root(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "step.yml").write_text("spec:\n---\nexec:\n  command: [id]\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "step.yml").write_text(
        "spec:\n---\nrun:\n  - name: out\n    step: ../secret\n"
    )
    with pytest.raises(StepReferenceError, match="own repository only"):
        await prefetch(str(tmp_path / "mine"), tmp_path / "mine", tmp_path / "cache")


async def test_a_fetch_failure_names_the_reference(tmp_path: Path) -> None:
    closed = "git://127.0.0.1:9/nothing"  # the discard port: nothing listens
    with pytest.raises(FetchError, match=re.escape(f"cannot fetch {closed}@v1")):
        await prefetch(f"{closed}@v1", tmp_path, tmp_path / "cache")


# --- the engine inside: only the staged checkouts -------------------------------------


async def test_the_engine_runs_staged_checkouts_without_fetching(
    served: tuple[GitServer, str, str], tmp_path: Path
) -> None:
    server, _, outer = served
    staged = tmp_path / "staged"
    stage(await prefetch(f"{outer}@v1", tmp_path, tmp_path / "cache"), staged)
    server.stop()
    work = tmp_path / "work"
    work.mkdir()
    sink = MemorySink()
    engine = StepEngine(work_dir=work, sink=sink, fetcher=CachedCheckouts(staged))
    result = await engine.run(f"{outer}@v1", {"who": "trusted"})
    assert result.status is StepStatus.SUCCEEDED, result.error
    assert sink.data("stdout") == b"inner says trusted\nhelper ran\n"


async def test_a_checkout_that_was_not_staged_is_a_clear_failure(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    engine = StepEngine(work_dir=work, sink=MemorySink(), fetcher=CachedCheckouts(tmp_path))
    result = await engine.run("git://127.0.0.1:9/nothing@v1", {})
    assert result.status is StepStatus.FAILED
    assert result.error is not None
    assert "not fetched by the trusted side" in result.error


async def test_a_runner_step_run_uses_the_cache_it_is_given(
    served: tuple[GitServer, str, str], short_dir: Path
) -> None:
    server, _, outer = served
    staged = short_dir / "work" / "staged"
    stage(await prefetch(f"{outer}@v1", short_dir, short_dir / "cache"), staged)
    server.stop()
    config = RunnerConfig(state_dir=short_dir / "state", roots=(short_dir / "work",))
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        spec = RunSpec(
            step=f"{outer}@v1",
            step_inputs={"who": "runner"},
            step_work_dir=str(short_dir / "work"),
            step_cache_dir=str(staged),
        )
        result = await client.run(spec)
    assert result.ok, result.stderr
    assert result.stdout == b"inner says runner\nhelper ran\n"


# --- forgehand steps run --sandbox ------------------------------------------------------


def _steps_run(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forgehand.cli.main", "steps", "run", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        timeout=180,
    )


@needs_bwrap
def test_cli_runs_a_git_step_in_a_sandbox(
    served: tuple[GitServer, str, str], short_dir: Path
) -> None:
    _, _, outer = served
    work = short_dir / "work"
    work.mkdir()
    (short_dir / "local").mkdir()
    (short_dir / "local" / "step.yml").write_text(
        f"spec:\n---\nrun:\n  - name: remote\n    step: {outer}@v1\n    inputs:\n      who: local\n"
    )
    cache = short_dir / "cache"
    remote = _steps_run(
        f"{outer}@v1", "-i", "who=sandbox", "--work-dir", str(work), "--sandbox", "bwrap",
        cache=cache,
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.startswith("inner says sandbox\nhelper ran\n")
    local = _steps_run(
        str(short_dir / "local"), "--work-dir", str(work), "--sandbox", "bwrap", cache=cache
    )
    assert local.returncode == 0, local.stderr
    assert local.stdout.startswith("inner says local\nhelper ran\n")
    assert (cache / "forgehand" / "steps" / cache_name(outer, "v1")).is_dir()


def test_cli_refuses_file_urls_for_a_sandbox(tmp_path: Path) -> None:
    done = _steps_run(
        f"file://{tmp_path}/steps@v1", "--work-dir", str(tmp_path), "--sandbox", "bwrap",
        cache=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "file:// are refused" in done.stderr


# --- repository steps as agent tools ------------------------------------------------------


async def test_a_repository_tool_uses_git_steps_fetched_by_the_trusted_side(
    served: tuple[GitServer, str, str], short_dir: Path
) -> None:
    server, inner, _ = served
    repo = short_dir / "work" / "repo"
    steps = repo / ".forgehand" / "steps"
    (steps / "greet").mkdir(parents=True)
    (steps / "greet" / "step.yml").write_text(
        "spec:\n  description: Greet someone.\n  inputs:\n    who:\n      type: string\n"
        f"---\nrun:\n  - name: greet\n    step: {inner}/-/greet@v1\n"
        "    inputs:\n      echo: ${{ inputs.who }}\n"
    )
    (steps / "gone.yml").write_text(
        f"spec:\n---\nrun:\n  - name: x\n    step: {inner}/-/greet@no-such-tag\n"
    )
    cache = (short_dir / "work" / ".cache", str(short_dir / "work" / ".cache"))
    config = RunnerConfig(state_dir=short_dir / "state", roots=(short_dir / "work",))
    async with RunnerCore(config) as core, RunnerClient(LocalTransport(core)) as client:
        executor, problems = await repository_executor(
            client, repo, str(repo), {"PATH": os.environ["PATH"]}, step_cache=cache
        )
        server.stop()  # from here on, nothing may fetch
        assert [p for p in problems if p.startswith("gone:")], problems
        assert "cannot fetch" in json.dumps(problems)
        assert "greet" in [tool.name for tool in executor.tools()]
        assert "gone" not in [tool.name for tool in executor.tools()]
        outcome = await executor.call("greet", {"who": "agent"}, yield_after=30)
    assert not outcome.is_error, outcome.text
    assert "inner says agent" in outcome.text
