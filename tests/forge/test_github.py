"""GitHubForge through githubkit's async API against the fake GitHub over real HTTP."""

from __future__ import annotations

import time

import pytest
from forge_support import GH_TOKEN, GITHUB_REPO, Pusher, RecordingSleep
from pydantic import SecretStr

from forgehand.forge import (
    AccessLevel,
    ForgeNotFoundError,
    ForgePermissionError,
    ForgeRequestError,
    ForgeUnavailableError,
    IssueState,
    MergeRequestState,
    NewMergeRequest,
    Reaction,
)
from forgehand.forge.config import GitHubConfig, RetryConfig
from forgehand.forge.fakes import FakeGitHub
from forgehand.forge.github import GitHubForge, access_from_github


def _seed_issue(fake: FakeGitHub) -> int:
    number = fake.add_issue(
        GITHUB_REPO, "Widget spins forever", None, author="writer", labels=["bug"], locked=True
    )
    fake.add_comment(GITHUB_REPO, number, "same here", author="triager")
    fake.add_comment(GITHUB_REPO, number, "/forgehand fix", author="writer")
    return number


async def test_get_issue_maps_fields(fake_github: FakeGitHub, github_forge: GitHubForge) -> None:
    number = _seed_issue(fake_github)
    issue = await github_forge.get_issue(number)
    assert (issue.number, issue.title, issue.body) == (number, "Widget spins forever", "")
    assert issue.state is IssueState.OPEN
    assert issue.locked is True
    assert issue.author == "writer"
    assert issue.labels == ("bug",)
    assert issue.web_url == f"{fake_github.url}/{GITHUB_REPO}/issues/{number}"


async def test_list_comments(fake_github: FakeGitHub, github_forge: GitHubForge) -> None:
    number = _seed_issue(fake_github)
    comments = await github_forge.list_comments(number)
    assert [(c.author, c.body) for c in comments] == [
        ("triager", "same here"),
        ("writer", "/forgehand fix"),
    ]


async def test_list_comments_follows_link_header(
    fake_github: FakeGitHub, github_forge: GitHubForge
) -> None:
    number = fake_github.add_issue(GITHUB_REPO, "busy")
    for n in range(130):
        fake_github.add_comment(GITHUB_REPO, number, f"c{n}", author="stranger")
    comments = await github_forge.list_comments(number)
    assert [c.body for c in comments] == [f"c{n}" for n in range(130)]
    assert len(fake_github.api_requests("GET", f"/issues/{number}/comments")) == 2


async def test_add_comment_and_reaction(fake_github: FakeGitHub, github_forge: GitHubForge) -> None:
    number = _seed_issue(fake_github)
    comment = await github_forge.add_comment(number, "On it")
    assert (comment.author, comment.body) == ("forgehand-bot", "On it")
    await github_forge.add_reaction(number, Reaction.EYES)
    await github_forge.add_reaction(number, Reaction.EYES)
    await github_forge.add_reaction(number, Reaction.THUMBS_UP)
    reactions = fake_github.repos[GITHUB_REPO].reactions[number]
    assert [r["content"] for r in reactions] == ["eyes", "+1"]


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ("octo", AccessLevel.ADMIN),
        ("maint", AccessLevel.MAINTAIN),
        ("writer", AccessLevel.WRITE),
        ("triager", AccessLevel.READ),
        ("stranger", AccessLevel.NONE),
        ("ghost-user", AccessLevel.NONE),
    ],
)
async def test_user_access(github_forge: GitHubForge, login: str, expected: AccessLevel) -> None:
    assert await github_forge.user_access(login) is expected


def test_custom_roles_fall_back_to_permission() -> None:
    assert access_from_github("security-reviewer", "write") is AccessLevel.WRITE
    assert access_from_github("none", "none") is AccessLevel.NONE


async def test_push_then_create_draft_pr_then_update_without_duplicates(
    fake_github: FakeGitHub, github_forge: GitHubForge, push_branch: Pusher
) -> None:
    branch = "forgehand/issue-7"
    push_branch(await github_forge.clone_url(), branch, github_forge.credentials())
    assert await github_forge.find_mr_for_branch(branch) is None

    created = await github_forge.create_draft_mr(
        NewMergeRequest(source_branch=branch, title="Stop spinning", description="Fixes #7")
    )
    assert (created.draft, created.title, created.target_branch) == (True, "Stop spinning", "main")
    assert created.state is MergeRequestState.OPEN

    found = await github_forge.find_mr_for_branch(branch)
    assert found == created
    updated = await github_forge.update_mr(found, description="with evidence")
    assert (updated.number, updated.title, updated.description) == (
        created.number,
        "Stop spinning",
        "with evidence",
    )
    assert updated.draft is True
    assert len(fake_github.repos[GITHUB_REPO].pulls) == 1
    assert len(fake_github.api_requests("POST", "/pulls")) == 1


async def test_duplicate_pr_is_refused_with_githubs_reason(
    github_forge: GitHubForge, push_branch: Pusher
) -> None:
    push_branch(await github_forge.clone_url(), "dup", github_forge.credentials())
    new = NewMergeRequest(source_branch="dup", title="t", description="d")
    await github_forge.create_draft_mr(new)
    with pytest.raises(ForgeRequestError, match="A pull request already exists") as caught:
        await github_forge.create_draft_mr(new)
    assert caught.value.status == 422


async def test_wrong_token_names_the_variable(
    fake_github: FakeGitHub, github_forge: GitHubForge, retry: RetryConfig
) -> None:
    number = _seed_issue(fake_github)
    bad = GitHubForge(
        GitHubConfig(url=fake_github.api_url, retry=retry), github_forge.project, SecretStr("bad")
    )
    with pytest.raises(ForgePermissionError, match="GITHUB_TOKEN") as caught:
        await bad.get_issue(number)
    assert caught.value.status == 401


async def test_403_is_a_permission_error(
    fake_github: FakeGitHub, github_forge: GitHubForge
) -> None:
    number = _seed_issue(fake_github)
    fake_github.fail(403, method="POST")
    with pytest.raises(ForgePermissionError, match="lacks permission"):
        await github_forge.add_comment(number, "x")


async def test_404_names_the_resource(github_forge: GitHubForge) -> None:
    with pytest.raises(ForgeNotFoundError, match=r"issue #404 of octo/widgets"):
        await github_forge.get_issue(404)


async def test_429_honours_retry_after(
    fake_github: FakeGitHub, github_forge: GitHubForge, sleep: RecordingSleep
) -> None:
    number = _seed_issue(fake_github)
    fake_github.fail(429, retry_after=5)
    assert (await github_forge.get_issue(number)).number == number
    assert sleep.delays == [5.0]


async def test_primary_rate_limit_403_waits_for_reset(
    fake_github: FakeGitHub, github_forge: GitHubForge, sleep: RecordingSleep
) -> None:
    number = _seed_issue(fake_github)
    reset = int(time.time()) + 20
    fake_github.fail(
        403,
        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
    )
    assert (await github_forge.get_issue(number)).number == number
    assert len(sleep.delays) == 1
    assert 15 <= sleep.delays[0] <= 20


async def test_500_then_success(
    fake_github: FakeGitHub, github_forge: GitHubForge, sleep: RecordingSleep
) -> None:
    number = _seed_issue(fake_github)
    fake_github.fail(502)
    assert len(await github_forge.list_comments(number)) == 2
    assert sleep.delays == [0.01]


async def test_persistent_500_is_a_clear_error(
    fake_github: FakeGitHub, github_forge: GitHubForge
) -> None:
    number = _seed_issue(fake_github)
    fake_github.fail(500, times=100)
    with pytest.raises(ForgeUnavailableError, match=r"GitHub answered 500 .* after 3 attempt"):
        await github_forge.get_issue(number)


async def test_git_push_over_http_with_token(
    fake_github: FakeGitHub, github_forge: GitHubForge, push_branch: Pusher
) -> None:
    url = await github_forge.clone_url()
    assert url == f"{fake_github.url}/{GITHUB_REPO}.git"
    assert push_branch(url, "y", None, check=False).returncode != 0
    push_branch(url, "y", github_forge.credentials())
    assert (fake_github.repos[GITHUB_REPO].repo / "refs" / "heads" / "y").exists()
    assert GH_TOKEN not in repr(github_forge.credentials())


async def test_unreachable_forge_is_unavailable(
    github_forge: GitHubForge, retry: RetryConfig, sleep: RecordingSleep
) -> None:
    closed = GitHubForge(
        GitHubConfig(url="http://127.0.0.1:1/api/v3", retry=retry),
        github_forge.project,
        SecretStr(GH_TOKEN),
        sleep=sleep,
    )
    with pytest.raises(ForgeUnavailableError, match="could not be reached"):
        await closed.get_issue(1)
    assert len(sleep.delays) == 2
