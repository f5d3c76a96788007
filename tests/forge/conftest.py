"""Fixtures: fake GitLab/GitHub servers on 127.0.0.1:0 and a helper that pushes with git."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from forge_support import GH_TOKEN, GITHUB_REPO, GITLAB_PROJECT, TOKEN, Pusher, RecordingSleep, git
from pydantic import SecretStr

from forgehand.forge import GitHubConfig, GitLabConfig
from forgehand.forge.base import ForgeKind, GitCredentials, ProjectRef
from forgehand.forge.config import RetryConfig
from forgehand.forge.fakes import FakeGitHub, FakeGitLab
from forgehand.forge.github import GitHubForge
from forgehand.forge.gitlab import GitLabForge


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("git") is None:
        pytest.skip("git not found: install git (with git-http-backend) to run the forge tests")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_TERMINAL_PROMPT", "0")
    monkeypatch.delenv("GIT_ASKPASS", raising=False)
    monkeypatch.delenv("SSH_ASKPASS", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def retry() -> RetryConfig:
    return RetryConfig(attempts=3, base_delay=0.01, max_delay=30)


@pytest.fixture
def fake_gitlab(tmp_path: Path) -> Iterator[FakeGitLab]:
    with FakeGitLab(tmp_path / "gitlab-repos", TOKEN) as fake:
        fake.add_project(GITLAB_PROJECT)
        for username, level in [("dave", 50), ("carol", 40), ("alice", 30), ("bob", 20)]:
            fake.add_user(username)
            fake.add_member(GITLAB_PROJECT, username, level)
        fake.add_user("mallory")
        yield fake


@pytest.fixture
def gitlab_forge(fake_gitlab: FakeGitLab, retry: RetryConfig, sleep: RecordingSleep) -> GitLabForge:
    config = GitLabConfig(url=fake_gitlab.url, retry=retry)
    project = ProjectRef(ForgeKind.GITLAB, fake_gitlab.url, GITLAB_PROJECT)
    return GitLabForge(config, project, SecretStr(TOKEN), sleep=sleep)


@pytest.fixture
def fake_github(tmp_path: Path) -> Iterator[FakeGitHub]:
    with FakeGitHub(tmp_path / "github-repos", GH_TOKEN) as fake:
        fake.add_repo(GITHUB_REPO)
        for login, role in [("maint", "maintain"), ("writer", "write"), ("triager", "triage")]:
            fake.add_collaborator(GITHUB_REPO, login, role)
        fake.add_user("stranger")
        yield fake


@pytest.fixture
def github_forge(fake_github: FakeGitHub, retry: RetryConfig, sleep: RecordingSleep) -> GitHubForge:
    config = GitHubConfig(url=fake_github.api_url, retry=retry)
    project = ProjectRef(ForgeKind.GITHUB, fake_github.url, GITHUB_REPO)
    return GitHubForge(config, project, SecretStr(GH_TOKEN), sleep=sleep)


@pytest.fixture
def push_branch(tmp_path: Path) -> Pusher:
    """Commit a file in a fresh work tree and push it to `url` as `branch` (and main)."""

    def push(
        url: str, branch: str, credentials: GitCredentials | None = None, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        work = tmp_path / f"work-{branch.replace('/', '-')}"
        if not work.exists():
            git("init", "--quiet", "--initial-branch=main", str(work))
            git(
                "-c",
                "user.name=T",
                "-c",
                "user.email=t@example.com",
                "commit",
                "--quiet",
                "--allow-empty",
                "-m",
                "base",
                cwd=work,
            )
            git("checkout", "--quiet", "-b", branch, cwd=work)
            (work / "change.txt").write_text(f"change on {branch}\n")
            git("add", "change.txt", cwd=work)
            git(
                "-c",
                "user.name=T",
                "-c",
                "user.email=t@example.com",
                "commit",
                "--quiet",
                "-m",
                "change",
                cwd=work,
            )
        auth = ["-c", f"http.extraHeader={credentials.http_extra_header()}"] if credentials else []
        return git(*auth, "push", "--quiet", url, "main", branch, cwd=work, check=check)

    return push
