"""GitLabForge through python-gitlab against the fake GitLab over real HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from forge_support import GITLAB_PROJECT, TOKEN, Pusher, RecordingSleep, git
from pydantic import SecretStr

from forgehand.forge import (
    AccessLevel,
    ForgeNotFoundError,
    ForgePermissionError,
    ForgeRateLimitError,
    ForgeRequestError,
    ForgeUnavailableError,
    IssueState,
    MergeRequestState,
    NewMergeRequest,
    Reaction,
)
from forgehand.forge.config import GitLabConfig, RetryConfig
from forgehand.forge.fakes import FakeGitLab
from forgehand.forge.gitlab import GitLabForge, access_from_gitlab


def _seed_issue(fake: FakeGitLab) -> int:
    iid = fake.add_issue(
        GITLAB_PROJECT,
        "Crash on empty input",
        "Steps: run with ``",
        author="alice",
        labels=["bug", "forgehand"],
        discussion_locked=True,
    )
    fake.add_note(GITLAB_PROJECT, iid, "first", author="bob")
    fake.add_note(GITLAB_PROJECT, iid, "changed the description", author="bob", system=True)
    fake.add_note(GITLAB_PROJECT, iid, "@forgehand-bot fix this", author="alice")
    return iid


async def test_get_issue_maps_fields(fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge) -> None:
    iid = _seed_issue(fake_gitlab)
    issue = await gitlab_forge.get_issue(iid)
    assert issue.title == "Crash on empty input"
    assert issue.body == "Steps: run with ``"
    assert issue.state is IssueState.OPEN
    assert issue.locked is True
    assert issue.author == "alice"
    assert issue.labels == ("bug", "forgehand")
    assert issue.web_url == f"{fake_gitlab.url}/{GITLAB_PROJECT}/-/issues/{iid}"


async def test_list_comments_skips_system_notes_in_order(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge
) -> None:
    iid = _seed_issue(fake_gitlab)
    comments = await gitlab_forge.list_comments(iid)
    assert [(c.author, c.body) for c in comments] == [
        ("bob", "first"),
        ("alice", "@forgehand-bot fix this"),
    ]


async def test_list_comments_follows_pagination(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge
) -> None:
    iid = fake_gitlab.add_issue(GITLAB_PROJECT, "many notes")
    for n in range(45):
        fake_gitlab.add_note(GITLAB_PROJECT, iid, f"note {n}", author="bob")
    comments = await gitlab_forge.list_comments(iid)
    assert [c.body for c in comments] == [f"note {n}" for n in range(45)]
    assert len(fake_gitlab.api_requests("GET", f"/issues/{iid}/notes")) == 3


async def test_add_comment(fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge) -> None:
    iid = _seed_issue(fake_gitlab)
    comment = await gitlab_forge.add_comment(iid, "Working on it")
    assert comment.author == "forgehand-bot"
    assert comment.body == "Working on it"
    assert fake_gitlab.projects[GITLAB_PROJECT].notes[iid][-1]["body"] == "Working on it"


async def test_add_reaction_is_idempotent(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge
) -> None:
    iid = _seed_issue(fake_gitlab)
    await gitlab_forge.add_reaction(iid, Reaction.EYES)
    await gitlab_forge.add_reaction(iid, Reaction.EYES)
    await gitlab_forge.add_reaction(iid, Reaction.HOORAY)
    awards = fake_gitlab.projects[GITLAB_PROJECT].awards[iid]
    assert [a["name"] for a in awards] == ["eyes", "tada"]


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("dave", AccessLevel.ADMIN),
        ("carol", AccessLevel.MAINTAIN),
        ("alice", AccessLevel.WRITE),
        ("bob", AccessLevel.READ),
        ("mallory", AccessLevel.NONE),
        ("nobody-at-all", AccessLevel.NONE),
    ],
)
async def test_user_access(gitlab_forge: GitLabForge, username: str, expected: AccessLevel) -> None:
    assert await gitlab_forge.user_access(username) is expected


def test_access_levels_normalise() -> None:
    levels = [0, 5, 10, 15, 20, 30, 40, 50]
    assert [access_from_gitlab(level).name for level in levels] == [
        "NONE",
        "NONE",
        "READ",
        "READ",
        "READ",
        "WRITE",
        "MAINTAIN",
        "ADMIN",
    ]


async def test_push_then_create_draft_mr_then_update_without_duplicates(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, push_branch: Pusher
) -> None:
    branch = "forgehand/issue-1"
    push_branch(await gitlab_forge.clone_url(), branch, gitlab_forge.credentials())
    assert await gitlab_forge.find_mr_for_branch(branch) is None

    created = await gitlab_forge.create_draft_mr(
        NewMergeRequest(source_branch=branch, title="Fix crash", description="Closes #1")
    )
    assert created.draft is True
    assert created.title == "Fix crash"
    assert created.target_branch == "main"
    assert created.state is MergeRequestState.OPEN
    assert fake_gitlab.projects[GITLAB_PROJECT].merge_requests[1]["title"] == "Draft: Fix crash"

    found = await gitlab_forge.find_mr_for_branch(branch)
    assert found == created
    updated = await gitlab_forge.update_mr(found, title="Fix crash (v2)", description="Evidence")
    assert (updated.number, updated.title, updated.description) == (
        created.number,
        "Fix crash (v2)",
        "Evidence",
    )
    assert updated.draft is True
    assert len(fake_gitlab.projects[GITLAB_PROJECT].merge_requests) == 1
    assert len(fake_gitlab.api_requests("POST", "/merge_requests")) == 1


async def test_second_create_for_same_branch_is_refused(
    gitlab_forge: GitLabForge, push_branch: Pusher
) -> None:
    push_branch(await gitlab_forge.clone_url(), "b", gitlab_forge.credentials())
    new = NewMergeRequest(source_branch="b", title="t", description="d")
    await gitlab_forge.create_draft_mr(new)
    with pytest.raises(ForgeRequestError, match="already exists"):
        await gitlab_forge.create_draft_mr(new)


async def test_mr_for_unpushed_branch_is_refused(gitlab_forge: GitLabForge) -> None:
    with pytest.raises(ForgeRequestError, match="does not exist"):
        await gitlab_forge.create_draft_mr(NewMergeRequest("nope", "t", "d", target_branch="main"))


async def test_wrong_token_is_a_permission_error_naming_the_variable(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, retry: RetryConfig
) -> None:
    iid = _seed_issue(fake_gitlab)
    bad = GitLabForge(
        GitLabConfig(url=fake_gitlab.url, retry=retry), gitlab_forge.project, SecretStr("wrong")
    )
    with pytest.raises(ForgePermissionError, match="GITLAB_TOKEN") as caught:
        await bad.get_issue(iid)
    assert caught.value.status == 401


async def test_403_is_a_permission_error(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge
) -> None:
    iid = _seed_issue(fake_gitlab)
    fake_gitlab.fail(403, method="POST")
    with pytest.raises(ForgePermissionError, match="GITLAB_TOKEN lacks permission") as caught:
        await gitlab_forge.add_comment(iid, "hi")
    assert caught.value.status == 403


async def test_404_names_the_resource(gitlab_forge: GitLabForge) -> None:
    with pytest.raises(ForgeNotFoundError, match=r"issue #99 of group/sub/project"):
        await gitlab_forge.get_issue(99)


async def test_unknown_project_is_not_found(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, retry: RetryConfig
) -> None:
    other = GitLabForge(
        GitLabConfig(url=fake_gitlab.url, retry=retry),
        type(gitlab_forge.project)(gitlab_forge.project.kind, fake_gitlab.url, "group/missing"),
        SecretStr(TOKEN),
    )
    with pytest.raises(ForgeNotFoundError, match="Project Not Found"):
        await other.clone_url()


async def test_429_honours_retry_after_then_succeeds(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, sleep: RecordingSleep
) -> None:
    iid = _seed_issue(fake_gitlab)
    fake_gitlab.fail(429, retry_after=7)
    issue = await gitlab_forge.get_issue(iid)
    assert issue.number == iid
    assert sleep.delays == [7.0]


async def test_500_then_success_backs_off(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, sleep: RecordingSleep
) -> None:
    iid = _seed_issue(fake_gitlab)
    fake_gitlab.fail(500, times=2)
    assert len(await gitlab_forge.list_comments(iid)) == 2
    assert sleep.delays == [0.01, 0.02]


async def test_persistent_500_is_a_clear_error(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge
) -> None:
    iid = _seed_issue(fake_gitlab)
    fake_gitlab.fail(500, times=100)
    with pytest.raises(ForgeUnavailableError, match=r"answered 500 .* after 3 attempt"):
        await gitlab_forge.get_issue(iid)
    assert len(fake_gitlab.api_requests("GET", f"/issues/{iid}")) == 3


async def test_retry_after_beyond_the_cap_fails_at_once(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, sleep: RecordingSleep
) -> None:
    iid = _seed_issue(fake_gitlab)
    fake_gitlab.fail(429, retry_after=3600)
    with pytest.raises(ForgeRateLimitError, match="rate-limited") as caught:
        await gitlab_forge.get_issue(iid)
    assert sleep.delays == []
    assert caught.value.retry_after == pytest.approx(3600, abs=2)


async def test_push_needs_the_token(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, push_branch: Pusher
) -> None:
    url = await gitlab_forge.clone_url()
    assert url == f"{fake_gitlab.url}/{GITLAB_PROJECT}.git"
    refused = push_branch(url, "x", None, check=False)
    assert refused.returncode != 0
    pushed = push_branch(url, "x", gitlab_forge.credentials())
    assert pushed.returncode == 0
    repo = fake_gitlab.projects[GITLAB_PROJECT].repo
    assert (repo / "refs" / "heads" / "x").exists()


def test_credentials_do_not_leak_in_repr(gitlab_forge: GitLabForge) -> None:
    creds = gitlab_forge.credentials()
    assert TOKEN not in repr(creds)
    assert TOKEN not in repr(GitLabConfig(token=SecretStr(TOKEN)))
    assert creds.http_extra_header().startswith("Authorization: Basic ")


async def test_unreachable_forge_is_unavailable(
    gitlab_forge: GitLabForge, retry: RetryConfig, sleep: RecordingSleep
) -> None:
    closed = GitLabForge(
        GitLabConfig(url="http://127.0.0.1:1", retry=retry),
        gitlab_forge.project,
        SecretStr(TOKEN),
        sleep=sleep,
    )
    with pytest.raises(ForgeUnavailableError, match="could not be reached"):
        await closed.get_issue(1)
    assert len(sleep.delays) == 2


async def test_large_push_uses_chunked_upload(
    fake_gitlab: FakeGitLab, gitlab_forge: GitLabForge, tmp_path: Path
) -> None:
    work = tmp_path / "big"
    git("init", "--quiet", "--initial-branch=main", str(work))
    (work / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    git("add", "blob.bin", cwd=work)
    git("-c", "user.name=T", "-c", "user.email=t@example.com", "commit", "-qm", "big", cwd=work)
    header = gitlab_forge.credentials().http_extra_header()
    url = await gitlab_forge.clone_url()
    git("-c", f"http.extraHeader={header}", "push", "--quiet", url, "main", cwd=work)
    repo = fake_gitlab.projects[GITLAB_PROJECT].repo
    assert (
        git("--git-dir", str(repo), "rev-parse", "main").stdout.strip()
        == git("rev-parse", "HEAD", cwd=work).stdout.strip()
    )
