"""run and exec (streamed output, exit codes, timeouts) and the git built-ins on real repos."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BuiltinCaller

from forgehand.steps import StepStatus

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="install git")

# --- run / exec -------------------------------------------------------------------------


async def test_run_streams_output_in_the_work_dir(builtin: BuiltinCaller, work: Path) -> None:
    out = await builtin.ok("run", command="pwd; echo oops >&2; printf 'no newline'")
    assert out == {"exit_code": 0, "timed_out": False}
    assert builtin.sink.data("stdout") == f"{work}\nno newline".encode()
    assert builtin.sink.data("stderr") == b"oops\n"


async def test_run_non_zero_exit_fails_with_the_code(builtin: BuiltinCaller) -> None:
    result = await builtin("run", command="echo before; exit 3")
    assert result.status is StepStatus.FAILED
    assert result.exit_code == 3
    assert result.outputs == {"exit_code": 3, "timed_out": False}
    assert result.error == "command_failed: exited with code 3"
    assert builtin.sink.data("stdout") == b"before\n"


async def test_run_timeout_kills_the_process_group(builtin: BuiltinCaller, work: Path) -> None:
    started = time.monotonic()
    result = await builtin("run", command="(sleep 30; touch late) & sleep 30", timeout_seconds=0.5)
    assert time.monotonic() - started < 10
    assert result.status is StepStatus.FAILED
    assert result.outputs == {"exit_code": 124, "timed_out": True}
    assert result.error is not None
    assert result.error.startswith("timeout: killed after 0.5 s")
    assert not (work / "late").exists()


async def test_run_returns_while_a_background_child_holds_the_pipe(
    builtin: BuiltinCaller,
) -> None:
    started = time.monotonic()
    out = await builtin.ok("run", command="sleep 5 & echo started")
    assert time.monotonic() - started < 4
    assert out["exit_code"] == 0
    assert builtin.sink.data("stdout") == b"started\n"


async def test_run_errors(builtin: BuiltinCaller) -> None:
    assert "command is empty" in await builtin.error("run", command="  ")
    assert "timeout_seconds must be a number > 0" in await builtin.error(
        "run", command="true", timeout_seconds=0
    )


async def test_exec_has_no_shell(builtin: BuiltinCaller) -> None:
    await builtin.ok("exec", argv=["echo", "$HOME", "*", "a b"])
    assert builtin.sink.data("stdout") == b"$HOME * a b\n"


async def test_exec_errors(builtin: BuiltinCaller) -> None:
    assert "non-empty array of strings" in await builtin.error("exec", argv=[])
    assert "non-empty array of strings" in await builtin.error("exec", argv=["echo", 1])
    error = await builtin.error("exec", argv=["definitely-not-a-program-xyz"])
    assert error.startswith("not_found: cannot start 'definitely-not-a-program-xyz'")
    result = await builtin("exec", argv=["sh", "-c", "kill -9 $$"])
    assert result.exit_code == 128 + 9


# --- git --------------------------------------------------------------------------------

AUTHOR = {"author_name": "Forge Bot", "author_email": "bot@example.com"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def repo(work: Path) -> Path:
    _git(work, "init", "-q", "-b", "main")
    (work / "a.txt").write_text("one\n")
    _git(work, "add", "-A")
    _git(work, "-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "init")
    return work


async def test_status_and_diff(builtin: BuiltinCaller, repo: Path) -> None:
    clean = await builtin.ok("git_status")
    assert clean == {"status": "", "clean": True, "branch": "main"}
    (repo / "a.txt").write_text("two\n")
    (repo / "new.txt").write_text("n\n")
    dirty = await builtin.ok("git_status")
    assert dirty["status"] == " M a.txt\n?? new.txt\n"
    assert dirty["clean"] is False
    diff = await builtin.ok("git_diff")
    assert "-one\n+two\n" in diff["diff"]
    assert diff["truncated"] is False
    assert (await builtin.ok("git_diff", staged=True))["diff"] == ""
    _git(repo, "add", "a.txt")
    assert "+two" in (await builtin.ok("git_diff", staged=True))["diff"]


async def test_commit_everything_with_trailers(builtin: BuiltinCaller, repo: Path) -> None:
    (repo / "a.txt").write_text("two\n")
    (repo / "b.txt").write_text("new\n")
    (repo / ".git/hooks/pre-commit").write_text("#!/bin/sh\nexit 1\n")
    (repo / ".git/hooks/pre-commit").chmod(0o755)
    out = await builtin.ok(
        "git_commit",
        message="Fix the thing\n\nLonger body.",
        trailers=["Co-authored-by: Ada <ada@example.com>", "Closes: #123"],
        **AUTHOR,
    )
    assert out["branch"] == "main"
    assert out["commit"] == _git(repo, "rev-parse", "HEAD").strip()
    message = _git(repo, "log", "-1", "--format=%B")
    assert message == (
        "Fix the thing\n\nLonger body.\n\nCo-authored-by: Ada <ada@example.com>\nCloses: #123\n\n"
    )
    assert _git(repo, "log", "-1", "--format=%an <%ae> / %cn <%ce>").strip() == (
        "Forge Bot <bot@example.com> / Forge Bot <bot@example.com>"
    )
    assert _git(repo, "status", "--porcelain") == ""


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"message": " "}, "message is empty"),
        ({"message": "m", "author_email": "nope"}, "is not an email address"),
        ({"message": "m", "author_name": "a<b"}, "author_name must be non-empty"),
        ({"message": "m", "trailers": ["no colon"]}, "must be one line"),
        ({"message": "m", "trailers": ["A: b\nC: d"]}, "must be one line"),
    ],
)
async def test_commit_input_errors(
    builtin: BuiltinCaller, repo: Path, inputs: dict[str, object], message: str
) -> None:
    (repo / "a.txt").write_text("changed\n")
    assert message in await builtin.error("git_commit", **{**AUTHOR, **inputs})


async def test_commit_nothing_to_commit(builtin: BuiltinCaller, repo: Path) -> None:
    error = await builtin.error("git_commit", message="m", **AUTHOR)
    assert error == "failed_precondition: nothing to commit: the work tree is clean"


async def test_git_outside_a_repository(builtin: BuiltinCaller) -> None:
    assert "not a git repository" in await builtin.error("git_status")


async def test_branch_create_and_switch(builtin: BuiltinCaller, repo: Path) -> None:
    assert await builtin.ok("git_branch", name="forgehand/issue-1") == {
        "branch": "forgehand/issue-1",
        "created": True,
    }
    assert await builtin.ok("git_branch", name="main") == {"branch": "main", "created": False}
    assert _git(repo, "branch", "--show-current").strip() == "main"
    assert "not a valid branch name" in await builtin.error("git_branch", name="bad..name")
    assert "not a valid branch name" in await builtin.error("git_branch", name="-f")


async def test_bundle_full_and_since_base(
    builtin: BuiltinCaller, repo: Path, tmp_path: Path
) -> None:
    base = _git(repo, "rev-parse", "HEAD").strip()
    await builtin.ok("git_branch", name="work")
    (repo / "a.txt").write_text("two\n")
    commit = (await builtin.ok("git_commit", message="change", **AUTHOR))["commit"]

    full = await builtin.ok("git_bundle", path="out/full.bundle")
    assert full == {"path": "out/full.bundle", "branch": "work", "commit": commit}
    since = await builtin.ok("git_bundle", path="out/since.bundle", base=base)
    assert since["commit"] == commit

    heads = _git(repo, "bundle", "list-heads", str(repo / "out/since.bundle"))
    assert heads.strip() == f"{commit} refs/heads/work"
    prereq = _git(repo, "bundle", "verify", str(repo / "out/since.bundle"))
    assert "requires" in prereq or base in prereq or prereq == ""
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo / "out/full.bundle"), str(clone), "-b", "work")
    assert (clone / "a.txt").read_text() == "two\n"


async def test_bundle_errors(builtin: BuiltinCaller, repo: Path) -> None:
    assert "permission_denied" in await builtin.error("git_bundle", path="../x.bundle")
    error = await builtin.error("git_bundle", path="x.bundle", base="no-such-rev")
    assert error == "not_found: base 'no-such-rev' is not a commit in this repository"
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert "git bundle failed" in await builtin.error("git_bundle", path="x.bundle", base=head)
    _git(repo, "checkout", "-q", "--detach")
    assert "HEAD is detached" in await builtin.error("git_bundle", path="x.bundle")
