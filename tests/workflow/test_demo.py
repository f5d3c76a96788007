"""`forgehand demo` end to end: a draft MR with verified evidence, in-process and as a CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from forgehand.demo import run_demo
from forgehand.forge.base import MergeRequestState
from forgehand.workflow.model import Outcome, Phase
from forgehand.workflow.progress import SilentProgress

from .conftest import Scenario, git


async def test_demo_in_process_opens_a_verified_draft_mr(short_tmp: Path) -> None:
    result = await run_demo(short_tmp / "demo", "none", SilentProgress())
    record = result.record
    assert record.outcome is Outcome.DONE, record.message
    (mr,) = await result_forge_mrs(result.repo, result.home.local_forge())
    assert mr.draft and mr.state is MergeRequestState.OPEN
    assert mr.source_branch == "forgehand/1-paginate-skips-the-first-page"
    assert "Closes #1" in mr.description
    assert "| before the change | fail (1 failed, 4 passed)" in mr.description
    assert "| after the change | pass (6 passed)" in mr.description
    assert "test_last_page_holds_the_remainder`: failed before → passed after" in mr.description
    branch = mr.source_branch
    assert "(page - 1) * per_page" in git(result.repo, "show", f"{branch}:pagekit/pagination.py")
    assert git(result.repo, "log", "-1", "--format=%an", branch) == "forgehand[bot]"
    assert "Co-authored-by: alice" in git(result.repo, "log", "-1", "--format=%B", branch)
    verification = record.outputs[Phase.VERIFY]["verification"]
    assert verification["verdict"] == "verified"
    assert verification["flags"] == []


async def result_forge_mrs(repo: Path, config: object) -> list[object]:
    from forgehand.forge.local import LocalForge, ProjectRef
    from forgehand.forge.base import ForgeKind

    forge = LocalForge(config, ProjectRef(ForgeKind.LOCAL, "", str(repo)))  # type: ignore[arg-type]
    return [m.as_merge_request() for m in await forge.list_merge_requests()]


async def test_rerun_updates_the_same_branch_and_mr(scenario: Scenario) -> None:
    async with scenario.workflow() as (workflow, _):
        first = await workflow.solve(scenario.ref)
    async with scenario.workflow() as (workflow, _):
        second = await workflow.solve(scenario.ref)
    assert first.outcome is second.outcome is Outcome.DONE
    assert first.run_id != second.run_id
    assert second.outputs[Phase.PUBLISH]["created"] is False
    (mr,) = await scenario.forge.list_merge_requests()
    assert second.run_id in mr.description
    comments = await scenario.forge.list_comments(1)
    assert [c.body.startswith("forgehand opened a draft") for c in comments] == [True, True]


def _cli_env(scratch: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    return env | {"TMPDIR": str(scratch), "HOME": str(scratch / "home"), "GIT_CONFIG_NOSYSTEM": "1"}


async def run_cli(scratch: Path, *argv: str) -> tuple[int, str, str]:
    """The CLI as a subprocess; output to files (a runner keeper may outlive it)."""
    out, err = scratch / "cli.out", scratch / "cli.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "forgehand.cli.main", *argv,
            env=_cli_env(scratch), stdout=stdout, stderr=stderr,
        )  # fmt: skip
        code = await asyncio.wait_for(process.wait(), 240)
    return code, out.read_text(), err.read_text()


@pytest.mark.slow
async def test_demo_cli_with_the_default_sandbox(short_tmp: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not found: install the bubblewrap package")
    directory = short_tmp / "demo"
    code, out, err = await run_cli(short_tmp, "demo", "--dir", str(directory))
    assert code == 0, err
    assert "sandbox: bwrap" in out
    assert "RECORDED" in err and "RECORDED" in out
    assert "model step 7: finish" in err
    assert "── verify" in err
    assert "draft MR: local:" in out
    home = directory / "home"
    code, listed, _ = await run_cli(short_tmp, "local", "mr", "list", "--json", "--home", str(home))
    assert code == 0
    (mr,) = [json.loads(line) for line in listed.splitlines()]
    assert mr["draft"] is True
    assert "verified" in mr["description"]
    code, runs, _ = await run_cli(short_tmp, "runs", "--home", str(home))
    assert code == 0 and "\tdone\t" in runs
    run_id = runs.split()[0]
    code, shown, _ = await run_cli(short_tmp, "show", run_id, "--home", str(home))
    assert code == 0 and "✓ report" in shown


async def test_solve_rejects_unknown_issue_references(short_tmp: Path) -> None:
    code, _, err = await run_cli(short_tmp, "solve", "not-an-issue", "--sandbox", "none")
    assert code == 2
    assert "local:PATH#N" in err and "/-/issues/N" in err


async def test_local_issue_create_prints_a_reference(short_tmp: Path) -> None:
    home = short_tmp / "home2"
    code, repo, err = await run_cli(short_tmp, "local", "repo", "init", str(short_tmp / "r.git"))
    assert code == 0, err
    code, out, err = await run_cli(
        short_tmp, "local", "issue", "create", "--repo", repo.strip(),
        "--title", "T", "--body", "B", "--home", str(home),
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"local:{repo.strip()}#1"
