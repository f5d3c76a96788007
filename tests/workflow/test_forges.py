"""The workflow against the fake GitLab and GitHub: the issue read through the real SDK
adapters, the mirror fetched and the branch pushed over git smart HTTP with the token, a
draft MR created, and no token anywhere in the sandbox."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from forgehand.demo import example
from forgehand.forge.base import Forge, ForgeKind, GitCredentials, IssueRef, ProjectRef
from forgehand.forge.config import GitHubConfig, GitLabConfig
from forgehand.forge.fakes import FakeGitHub, FakeGitLab
from forgehand.forge.github import GitHubForge
from forgehand.forge.gitlab import GitLabForge
from forgehand.steps.masking import MASK
from forgehand.workflow.app import Home
from forgehand.workflow.model import Outcome

from .conftest import FINISH, FIX, Scenario, scripted, turn

GL_TOKEN = "glpat-workflowtesttoken0123"
GH_TOKEN = "ghp_workflowtesttoken0123456789abcdef01"
PEEK = turn(
    "run",
    command="env; cat .git/config; grep -rl workflowtest . ~ 2>/dev/null | sed 's/^/FOU''ND:/'",
)


def push_example(url: str, credentials: GitCredentials, work: Path) -> None:
    spec = example()
    env_args = ["-c", "user.name=Alice", "-c", "user.email=alice@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    for name, text in spec["files"].items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(work), *env_args, "commit", "-qm", "init"], check=True)
    header = f"http.extraHeader={credentials.http_extra_header()}"
    subprocess.run(["git", "-C", str(work), "-c", header, "push", "-q", url, "main"], check=True)


async def solve_on(forge: Forge, ref: IssueRef, short_tmp: Path) -> tuple[Any, str]:
    home = Home(short_tmp / "home")
    scenario = Scenario(short_tmp, home, ref, forge)  # type: ignore[arg-type]
    async with scenario.workflow(scripted(PEEK, FIX, FINISH), forge=forge) as (workflow, server):
        record = await workflow.solve(ref)
    peeked = server.requests[1].text
    for config in (home.mirrors).glob("*.git/config"):
        assert "workflowtest" not in config.read_text()  # the mirror keeps no token
    return record, peeked


def assert_no_token(peeked: str, token: str) -> None:
    assert "PATH=" in peeked  # the tool really ran
    assert token not in peeked
    assert MASK not in peeked  # nothing was masked: there was nothing to mask
    assert "FOUND:" not in peeked  # no file in the work dir or home holds it


async def test_gitlab_end_to_end(short_tmp: Path) -> None:
    with FakeGitLab(short_tmp / "gitlab", GL_TOKEN) as fake:
        fake.add_project("group/pagekit")
        fake.add_user("alice")
        fake.add_member("group/pagekit", "alice", 30)
        issue = example()["issue"]
        iid = fake.add_issue("group/pagekit", issue["title"], issue["body"], author="alice")
        project = ProjectRef(ForgeKind.GITLAB, fake.url, "group/pagekit")
        forge = GitLabForge(GitLabConfig(url=fake.url), project, SecretStr(GL_TOKEN))
        push_example(f"{fake.url}/group/pagekit.git", forge.credentials(), short_tmp / "seed")
        record, peeked = await solve_on(forge, IssueRef(project, iid), short_tmp)
        await forge.aclose()
        assert record.outcome is Outcome.DONE, record.message
        mr = await GitLabForge(
            GitLabConfig(url=fake.url), project, SecretStr(GL_TOKEN)
        ).find_mr_for_branch("forgehand/1-paginate-skips-the-first-page")
        assert mr is not None
        assert mr.draft
        assert "Closes #1" in mr.description
        notes = fake.projects["group/pagekit"].notes[iid]
        assert any("draft merge request" in n["body"] for n in notes)
    assert_no_token(peeked, GL_TOKEN)


async def test_github_end_to_end(short_tmp: Path) -> None:
    with FakeGitHub(short_tmp / "github", GH_TOKEN) as fake:
        fake.add_repo("octo/pagekit")
        fake.add_collaborator("octo/pagekit", "alice", "write")
        issue = example()["issue"]
        number = fake.add_issue("octo/pagekit", issue["title"], issue["body"], author="alice")
        project = ProjectRef(ForgeKind.GITHUB, fake.url, "octo/pagekit")
        forge = GitHubForge(GitHubConfig(url=fake.api_url), project, SecretStr(GH_TOKEN))
        push_example(f"{fake.url}/octo/pagekit.git", forge.credentials(), short_tmp / "seed")
        record, peeked = await solve_on(forge, IssueRef(project, number), short_tmp)
        assert record.outcome is Outcome.DONE, record.message
        pr = await forge.find_mr_for_branch("forgehand/1-paginate-skips-the-first-page")
        assert pr is not None
        assert pr.draft
        assert "verified" in pr.description
        comments = fake.repos["octo/pagekit"].comments[number]
        assert any("draft merge request" in c["body"] for c in comments)
    assert_no_token(peeked, GH_TOKEN)
