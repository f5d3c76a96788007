"""The local forge end to end: bare repo on disk, SQLite records, plain git push."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from forge_support import Pusher

from forgehand.forge import (
    AccessLevel,
    ForgeNotFoundError,
    ForgeRequestError,
    IssueRef,
    LocalConfig,
    MergeRequestState,
    NewMergeRequest,
    Reaction,
    local,
    open_forge,
)
from forgehand.forge.local import LocalForge


@pytest.fixture
def config(tmp_path: Path) -> LocalConfig:
    return LocalConfig(database=tmp_path / "state" / "forge.sqlite3")


@pytest.fixture
async def repo(tmp_path: Path) -> Path:
    return await local.init_repo(tmp_path / "repos" / "app.git")


async def test_end_to_end(config: LocalConfig, repo: Path, push_branch: Pusher) -> None:
    ref = await local.create_issue(config, repo, "Add a --verbose flag", "please", author="ann")
    assert str(ref) == f"local:{repo}#1"
    assert IssueRef.parse(str(ref)) == ref

    forge = open_forge(config, ref.project)
    issue = await forge.get_issue(ref.number)
    assert (issue.title, issue.body, issue.author, issue.locked) == (
        "Add a --verbose flag",
        "please",
        "ann",
        False,
    )
    await local.comment(config, ref, "@forgehand go", author="ann")
    await forge.add_comment(ref.number, "On it")
    await forge.add_reaction(ref.number, Reaction.EYES)
    await forge.add_reaction(ref.number, Reaction.EYES)

    assert await forge.clone_url() == str(repo)
    assert forge.credentials() is None
    push_branch(await forge.clone_url(), "forgehand/issue-1")

    new = NewMergeRequest("forgehand/issue-1", "Add --verbose", "tests pass", issue=ref.number)
    created = await forge.create_draft_mr(new)
    assert (created.number, created.draft, created.target_branch) == (1, True, "main")
    found = await forge.find_mr_for_branch("forgehand/issue-1")
    assert found == created
    assert found is not None
    updated = await forge.update_mr(found, description="tests pass (2nd run)")
    assert updated.title == "Add --verbose"
    assert updated.draft is True

    listed = await local.list_merge_requests(config, repo)
    assert [
        (m.number, m.issue, m.source_branch, m.description, m.draft, m.state) for m in listed
    ] == [(1, 1, "forgehand/issue-1", "tests pass (2nd run)", True, MergeRequestState.OPEN)]
    shown, comments = await local.get_issue(config, ref)
    assert shown == issue
    assert [(c.author, c.body) for c in comments] == [
        ("ann", "@forgehand go"),
        ("forgehand", "On it"),
    ]
    assert isinstance(forge, LocalForge)
    assert await forge.reactions(ref.number) == ["eyes"]


async def test_duplicate_mr_and_unpushed_branch_are_refused(
    config: LocalConfig, repo: Path, push_branch: Pusher
) -> None:
    forge = LocalForge(config, (await local.create_issue(config, repo, "t")).project)
    with pytest.raises(ForgeRequestError, match="push it first"):
        await forge.create_draft_mr(NewMergeRequest("missing", "t", "d"))
    push_branch(str(repo), "b")
    await forge.create_draft_mr(NewMergeRequest("b", "t", "d"))
    with pytest.raises(ForgeRequestError, match="already exists"):
        await forge.create_draft_mr(NewMergeRequest("b", "t", "d"))


async def test_issue_numbers_are_per_repository(config: LocalConfig, tmp_path: Path) -> None:
    a = await local.init_repo(tmp_path / "a.git")
    b = await local.init_repo(tmp_path / "b.git")
    refs = [await local.create_issue(config, path, "x") for path in (a, a, b)]
    assert [r.number for r in refs] == [1, 2, 1]


async def test_missing_issue_and_missing_repo(
    config: LocalConfig, repo: Path, tmp_path: Path
) -> None:
    forge = LocalForge(config, (await local.create_issue(config, repo, "t")).project)
    with pytest.raises(ForgeNotFoundError, match="#9 does not exist"):
        await forge.get_issue(9)
    with pytest.raises(ForgeNotFoundError, match="git init --bare"):
        await local.create_issue(config, tmp_path / "nope.git", "t")


async def test_access_defaults_and_grants(config: LocalConfig, repo: Path) -> None:
    ref = await local.create_issue(config, repo, "t")
    forge = LocalForge(config, ref.project)
    assert await forge.user_access("anyone") is AccessLevel.ADMIN
    await forge.set_access("guest", AccessLevel.READ)
    assert await forge.user_access("guest") is AccessLevel.READ
    strict = LocalForge(config.model_copy(update={"default_access": "none"}), ref.project)
    assert await strict.user_access("anyone") is AccessLevel.NONE


async def test_schema_version_is_recorded(config: LocalConfig, repo: Path) -> None:
    await local.create_issue(config, repo, "t")
    with closing(sqlite3.connect(config.database)) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
