"""The pure rules: test verdicts, policy, repository configuration, the run store."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgehand.agent.budget import Budgets
from forgehand.workflow.evidence import SuiteReport, parse_results
from forgehand.workflow.model import ClaimKind, Outcome, Phase
from forgehand.workflow.policy import matches_glob, protected_hits, secret_hits
from forgehand.workflow.repo_config import (
    RepoBudgets,
    RepoConfigError,
    detect,
    effective_budgets,
    parse_repo_config,
)
from forgehand.workflow.store import SqliteRunStore
from forgehand.workflow.verify import FileChange, judge

PYTEST_OUTPUT = """
PASSED tests/test_a.py::test_one
FAILED tests/test_a.py::test_two - assert 1 == 2
ERROR tests/test_b.py::test_setup
XFAIL tests/test_a.py::test_later - not yet
"""


def report(exit_code: int, **results: str) -> SuiteReport:
    return SuiteReport(command="pytest", exit_code=exit_code, results=results)  # type: ignore[arg-type]


def test_pytest_summary_lines_are_parsed() -> None:
    assert parse_results(PYTEST_OUTPUT) == {
        "tests/test_a.py::test_one": "passed",
        "tests/test_a.py::test_two": "failed",
        "tests/test_b.py::test_setup": "error",
        "tests/test_a.py::test_later": "xfailed",
    }


def test_a_fix_with_a_proving_test_is_verified() -> None:
    before = report(1, **{"test_t.py::a": "passed", "test_t.py::bug": "failed"})
    after = report(
        0, **{"test_t.py::a": "passed", "test_t.py::bug": "passed", "test_t.py::new": "passed"}
    )
    on_base = report(
        1, **{"test_t.py::a": "passed", "test_t.py::bug": "failed", "test_t.py::new": "failed"}
    )
    verdict = judge(before, after, on_base, [FileChange("M", "test_t.py")], "+    assert x\n")
    assert verdict.verdict == "verified"
    assert [t.test for t in verdict.new_tests if t.proves_fix] == ["test_t.py::new"]
    assert verdict.flags == []


def test_regressions_and_weakened_tests_are_caught() -> None:
    before = report(
        0, **{"test_t.py::a": "passed", "test_t.py::b": "passed", "test_t.py::c": "passed"}
    )
    after = report(1, **{"test_t.py::a": "failed", "test_t.py::b": "passed"})
    diff = "-    assert total == 3\n+    pytest.skip('flaky')\n"
    changes = [FileChange("M", "test_t.py"), FileChange("D", "tests/test_old.py")]
    verdict = judge(before, after, None, changes, diff)
    assert verdict.verdict == "failed"
    assert verdict.regressions == ["test_t.py::a"]
    flags = "\n".join(verdict.flags)
    assert "test file deleted: tests/test_old.py" in flags
    assert "test no longer runs: test_t.py::c" in flags
    assert "marked skipped" in flags
    assert "lost 1 assertion" in flags


def test_a_new_test_that_passes_on_the_old_code_is_flagged() -> None:
    before = report(0, **{"test_t.py::a": "passed"})
    after = report(0, **{"test_t.py::a": "passed", "test_t.py::new": "passed"})
    on_base = report(0, **{"test_t.py::a": "passed", "test_t.py::new": "passed"})
    verdict = judge(before, after, on_base, [FileChange("M", "test_t.py")], "")
    assert verdict.verdict == "verified"
    assert any("does not reproduce" in f for f in verdict.flags)


@pytest.mark.parametrize(
    ("path", "pattern", "hit"),
    [
        (".gitlab-ci.yml", ".gitlab-ci.yml", True),
        (".github/workflows/ci.yml", ".github/workflows/**", True),
        (".github/dependabot.yml", ".github/workflows/**", False),
        ("deploy/a/b.sh", "deploy/**", True),
        ("src/deploy.py", "deploy/**", False),
        ("src/x.pem", "**/*.pem", True),
        ("x.pem", "**/*.pem", True),
    ],
)
def test_protected_path_globs(path: str, pattern: str, hit: bool) -> None:
    assert matches_glob(path, pattern) is hit
    assert bool(protected_hits([FileChange("A", path)], [pattern])) is hit


def test_secret_scan_reads_added_lines_only() -> None:
    diff = (
        "+++ b/config.py\n"
        "-OLD = 'AKIAABCDEFGHIJKLMNOP'\n"
        "+KEY = 'glpat-abcdefghijklmnopqrstuv'\n"
        "+NOTE = 'the service token is s3cr3t-value-42'\n"
        "+PEM = '-----BEGIN RSA PRIVATE KEY-----'\n"
    )
    found = [v.detail for v in secret_hits(diff, ["s3cr3t-value-42"])]
    assert found == [
        "GitLab token in config.py",
        "a credential of this service in config.py",
        "private key in config.py",
    ]


def test_repo_config_is_strict() -> None:
    config = parse_repo_config("test: {command: make check}\nsetup: [make deps]\n")
    assert config.test is not None
    assert config.test.command == "make check"
    assert ".github/workflows/**" in config.all_protected
    with pytest.raises(RepoConfigError, match="tset"):
        parse_repo_config("tset: {command: x}\n")
    with pytest.raises(RepoConfigError, match="mapping"):
        parse_repo_config("- a\n")


def test_detection() -> None:
    python = detect(["src/app.py", "tests/test_app.py"], None)
    assert python.config.test is not None
    assert "pytest" in python.config.test.command
    node = detect(["index.js", "package.json"], '{"scripts": {"test": "jest"}}')
    assert node.config.test is not None
    assert node.config.test.command == "npm test"
    npm_default = '{"scripts": {"test": "echo \\"Error: no test specified\\" && exit 1"}}'
    assert detect(["package.json"], npm_default).source == "none"
    assert detect(["README.md"], None).config.test is None


def test_the_smaller_budget_wins() -> None:
    budgets = effective_budgets(
        RepoBudgets(max_steps=10, max_cost_usd=5.0), Budgets(max_steps=50, max_cost_usd=1.0)
    )
    assert budgets.max_steps == 10
    assert budgets.max_cost_usd == 1.0
    assert budgets.max_seconds is None


async def test_store_persists_phases_and_takes_over_dead_owners(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    first = SqliteRunStore(path, owner="host:1", alive=lambda owner: True)
    claim = await first.claim("local:/r#1", "alice")
    assert claim.kind is ClaimKind.NEW
    await first.complete_phase(claim.run.run_id, Phase.GUARD, {"branch": "b"})
    assert (await first.claim("local:/r#1", "bob")).kind is ClaimKind.COLLAPSED
    second = SqliteRunStore(path, owner="host:2", alive=lambda owner: False)
    taken = await second.claim("local:/r#1", "bob")
    assert taken.kind is ClaimKind.RESUMED
    assert taken.run.owner == "host:2"
    assert taken.run.next_phase() is Phase.PROVISION
    await second.finish(taken.run.run_id, Outcome.DONE, "ok")
    assert (await second.claim("local:/r#1", "bob")).kind is ClaimKind.NEW
    assert [r.outcome for r in await second.runs_for_issue("local:/r#1")] == [None, Outcome.DONE]
