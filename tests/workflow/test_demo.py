"""`forgehand demo` end to end: a draft MR with verified evidence, in-process and as a CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from forgehand.agent.replay import ReplayServer
from forgehand.demo import run_demo, session_script
from forgehand.forge.base import MergeRequestState
from forgehand.workflow.model import Outcome, Phase
from forgehand.workflow.progress import SilentProgress

from .conftest import Scenario, cli_env, git, run_cli


async def test_demo_in_process_opens_a_verified_draft_mr(short_tmp: Path) -> None:
    result = await run_demo(short_tmp / "demo", "none", SilentProgress())
    record = result.record
    assert record.outcome is Outcome.DONE, record.message
    (mr,) = await result_forge_mrs(result.repo, result.home.local_forge())
    assert mr.draft
    assert mr.state is MergeRequestState.OPEN
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
    from forgehand.forge.base import ForgeKind
    from forgehand.forge.local import LocalForge, ProjectRef

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


@pytest.mark.slow
async def test_demo_cli_with_the_default_sandbox(short_tmp: Path) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not found: install the bubblewrap package")
    directory = short_tmp / "demo"
    code, out, err = await run_cli(short_tmp, "demo", "--dir", str(directory))
    assert code == 0, err
    assert "sandbox: bwrap" in out
    assert "RECORDED" in err
    assert "RECORDED" in out
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
    assert code == 0
    assert "\tdone\t" in runs
    run_id = runs.split()[0]
    code, shown, _ = await run_cli(short_tmp, "show", run_id, "--home", str(home))
    assert code == 0
    assert "✓ report" in shown


async def test_solve_rejects_unknown_issue_references(short_tmp: Path) -> None:
    code, _, err = await run_cli(short_tmp, "solve", "not-an-issue", "--sandbox", "none")
    assert code == 2
    assert "local:PATH#N" in err
    assert "/-/issues/N" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--image", "node:20", "--sandbox", "none"), "--rootfs and --image need a sandbox"),
        (("--allow-image", "node 20;"), "--allow-image: 'node 20;' is not a pattern"),
    ],
)
async def test_solve_refuses_roots_it_cannot_give(
    short_tmp: Path, options: tuple[str, ...], message: str
) -> None:
    code, _, err = await run_cli(short_tmp, "solve", "local:/nowhere.git#1", *options)
    assert code == 2
    assert message in err


async def test_local_issue_create_prints_a_reference(short_tmp: Path) -> None:
    home = short_tmp / "home2"
    code, repo, err = await run_cli(short_tmp, "local", "repo", "init", str(short_tmp / "r.git"))
    assert code == 0, err
    code, out, err = await run_cli(
        short_tmp,
        "local",
        "issue",
        "create",
        "--repo",
        repo.strip(),
        "--title",
        "T",
        "--body",
        "B",
        "--home",
        str(home),
    )
    assert code == 0, err
    assert out.strip() == f"local:{repo.strip()}#1"


API_KEY = "sk-ant-test-Zx9SECRETkey0123456789abcdef"


async def test_solve_cli_with_a_provider(scenario: Scenario, short_tmp: Path) -> None:
    async with ReplayServer(session_script()) as server:
        code, out, err = await run_cli(
            short_tmp,
            *("solve", str(scenario.ref), "--provider", "anthropic", "--model", "m"),
            *("--base-url", server.base_url, "--sandbox", "none"),
            *("--home", str(scenario.home.root)),
            env={"ANTHROPIC_API_KEY": API_KEY},
        )
    assert code == 0, err
    assert server.mismatches == []
    assert "model: anthropic m (live); sandbox: none" in err
    assert "draft MR: local:" in out
    trajectory = Path(out.split("trajectory: ")[1].split()[0])
    assert API_KEY not in trajectory.read_text()
    assert all(API_KEY not in r.text for r in server.requests)


async def test_solve_cli_without_a_key_says_what_to_set(
    scenario: Scenario, short_tmp: Path
) -> None:
    code, _, err = await run_cli(
        short_tmp,
        "solve",
        str(scenario.ref),
        "--sandbox",
        "none",
        "--home",
        str(scenario.home.root),
    )
    assert code == 2
    assert "set ANTHROPIC_API_KEY" in err


@pytest.mark.slow
async def test_bench_solve_reports_phases_and_seeding(short_tmp: Path) -> None:
    code, out, err = await run_cli(
        short_tmp,
        "bench",
        "solve",
        "--json",
        "--runs",
        "1",
        "--files",
        "40",
        "--commits",
        "3",
        "--seed-runs",
        "1",
        "--sandbox",
        "none",
    )
    assert code == 0, err
    result = json.loads(out)
    assert set(result["demo"]["phases_s_median"]) == {p.value for p in Phase}
    assert result["seeding"]["files"] == 40
    assert result["seeding"]["plain_git_clone_s_median"] > 0


@pytest.mark.slow
async def test_a_killed_solve_is_resumed_by_the_next_one(
    scenario: Scenario, short_tmp: Path
) -> None:
    slow = session_script().model_copy(deep=True)
    slow.turns[0].delay_s = 120.0  # the model "thinks" while the service dies
    argv = [
        *("solve", str(scenario.ref), "--provider", "anthropic", "--model", "m"),
        *("--sandbox", "none", "--home", str(scenario.home.root)),
    ]
    env = cli_env(short_tmp, {"ANTHROPIC_API_KEY": API_KEY})
    async with ReplayServer(slow) as server:
        with (short_tmp / "killed.err").open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "forgehand.cli.main",
                *argv,
                "--base-url",
                server.base_url,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
            await _wait_for_phase(scenario, Phase.AGENT)
            process.kill()
            await process.wait()
    (interrupted,) = await scenario.store().list_runs()
    assert interrupted.outcome is None
    assert interrupted.next_phase() is Phase.AGENT

    async with ReplayServer(session_script()) as server:
        code, out, err = await run_cli(
            short_tmp, *argv, "--base-url", server.base_url, env={"ANTHROPIC_API_KEY": API_KEY}
        )
    assert code == 0, err
    assert f"resuming interrupted run {interrupted.run_id}" in err
    assert "── guard" not in err  # guard, provision, setup, baseline were not repeated
    assert out.startswith(f"run {interrupted.run_id}: done")
    assert len(await scenario.forge.list_merge_requests()) == 1


async def _wait_for_phase(scenario: Scenario, phase: Phase) -> None:
    for _ in range(600):
        runs = await scenario.store().list_runs()
        if runs and runs[0].phase is phase:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the run never reached {phase}")
