"""Provider-neutral forge types and the `Forge` protocol.

A `Forge` is bound to one project (a GitLab project, a GitHub repository or a bare
repository of the local forge). It reads issues and comments, comments and reacts,
checks a user's access, and opens or updates *draft* merge requests. It never
approves, merges or un-drafts: those operations are deliberately absent.

Pushing is done by the caller with git on the host side, using `clone_url()` and
`credentials()`; credentials must never reach a sandbox.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Protocol
from urllib.parse import urlsplit

from pydantic import SecretStr

from forgehand.forge.errors import IssueRefError

ACCEPTED_ISSUE_FORMS = (
    "https://HOST/GROUP[/SUBGROUP...]/PROJECT/-/issues/N  (GitLab)",
    "https://github.com/OWNER/REPO/issues/N  (GitHub, or a GitHub Enterprise host)",
    "local:PATH#N  (local forge; PATH is the bare repository)",
)


class ForgeKind(StrEnum):
    """Which adapter serves a project."""

    GITLAB = "gitlab"
    GITHUB = "github"
    LOCAL = "local"


class IssueState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class MergeRequestState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    MERGED = "merged"


class AccessLevel(IntEnum):
    """A user's access to a project, ordered so that `level >= AccessLevel.WRITE` works."""

    NONE = 0
    READ = 1
    WRITE = 2
    MAINTAIN = 3
    ADMIN = 4


class Reaction(StrEnum):
    """Reactions every forge supports; adapters map them to their own names."""

    THUMBS_UP = "thumbs_up"
    THUMBS_DOWN = "thumbs_down"
    EYES = "eyes"
    ROCKET = "rocket"
    HEART = "heart"
    HOORAY = "hooray"
    LAUGH = "laugh"
    CONFUSED = "confused"


@dataclass(frozen=True, slots=True)
class ProjectRef:
    """A project on a forge: `host` is `scheme://netloc` (empty for local), `path` its path."""

    kind: ForgeKind
    host: str
    path: str

    def __str__(self) -> str:
        return self.path if self.kind is ForgeKind.LOCAL else f"{self.host}/{self.path}"


@dataclass(frozen=True, slots=True)
class IssueRef:
    """A reference to one issue; `parse` and `str()` round-trip."""

    project: ProjectRef
    number: int

    @classmethod
    def parse(cls, text: str) -> IssueRef:
        """Parse a GitLab or GitHub issue URL or a `local:PATH#N` reference."""
        text = text.strip()
        ref = _parse_local(text) if text.startswith("local:") else _parse_url(text)
        if ref is None:
            raise IssueRefError(_bad_ref_message(text))
        return ref

    def __str__(self) -> str:
        project = self.project
        if project.kind is ForgeKind.LOCAL:
            return f"local:{project.path}#{self.number}"
        separator = "/-/issues/" if project.kind is ForgeKind.GITLAB else "/issues/"
        return f"{project.host}/{project.path}{separator}{self.number}"


def _bad_ref_message(text: str) -> str:
    forms = "\n  ".join(ACCEPTED_ISSUE_FORMS)
    return f"not an issue reference: {text!r}. Use one of:\n  {forms}"


def _issue_number(text: str) -> int | None:
    return int(text) if re.fullmatch(r"[1-9][0-9]{0,9}", text) else None


def _parse_local(text: str) -> IssueRef | None:
    path, _, number_text = text.removeprefix("local:").rpartition("#")
    number = _issue_number(number_text)
    if not path or number is None:
        return None
    return IssueRef(ProjectRef(ForgeKind.LOCAL, "", path), number)


def _parse_url(text: str) -> IssueRef | None:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"{parts.scheme}://{parts.netloc}"
    segments = [s for s in parts.path.split("/") if s]
    if "-" in segments:
        return _gitlab_ref(host, segments)
    return _github_ref(host, segments)


def _gitlab_ref(host: str, segments: list[str]) -> IssueRef | None:
    dash = segments.index("-")
    project, tail = segments[:dash], segments[dash + 1 :]
    number = _issue_number(tail[1]) if len(tail) == 2 and tail[0] == "issues" else None
    if len(project) < 2 or number is None:
        return None
    return IssueRef(ProjectRef(ForgeKind.GITLAB, host, "/".join(project)), number)


def _github_ref(host: str, segments: list[str]) -> IssueRef | None:
    if len(segments) != 4 or segments[2] != "issues":
        return None
    number = _issue_number(segments[3])
    if number is None:
        return None
    return IssueRef(ProjectRef(ForgeKind.GITHUB, host, "/".join(segments[:2])), number)


@dataclass(frozen=True, slots=True)
class Issue:
    number: int
    title: str
    body: str
    state: IssueState
    locked: bool
    author: str
    labels: tuple[str, ...]
    web_url: str


@dataclass(frozen=True, slots=True)
class Comment:
    id: int
    author: str
    body: str
    created: datetime


@dataclass(frozen=True, slots=True)
class MergeRequest:
    """A merge request (GitLab) or pull request (GitHub); `title` never carries "Draft:"."""

    number: int
    source_branch: str
    target_branch: str
    title: str
    description: str
    draft: bool
    state: MergeRequestState
    web_url: str


@dataclass(frozen=True, slots=True)
class NewMergeRequest:
    """What `create_draft_mr` opens; `target_branch=None` means the default branch."""

    source_branch: str
    title: str
    description: str
    target_branch: str | None = None
    issue: int | None = None


@dataclass(frozen=True, slots=True)
class GitCredentials:
    """HTTP credentials for `git push` on the host side; never hand these to a sandbox."""

    username: str
    password: SecretStr = field(repr=False)

    def http_extra_header(self) -> str:
        """A value for `git -c http.extraHeader=...` that authenticates one command."""
        pair = f"{self.username}:{self.password.get_secret_value()}".encode()
        return f"Authorization: Basic {base64.b64encode(pair).decode()}"

    def credential_helper_output(self) -> str:
        """What a git credential helper prints for `get`."""
        return f"username={self.username}\npassword={self.password.get_secret_value()}\n"


class Forge(Protocol):
    """One project on one forge. Adapters: GitLabForge, GitHubForge, LocalForge."""

    @property
    def project(self) -> ProjectRef: ...

    async def get_issue(self, number: int) -> Issue: ...

    async def list_comments(self, number: int) -> list[Comment]: ...

    async def add_comment(self, number: int, body: str) -> Comment: ...

    async def add_reaction(self, number: int, reaction: Reaction) -> None: ...

    async def user_access(self, username: str) -> AccessLevel: ...

    async def find_mr_for_branch(self, source_branch: str) -> MergeRequest | None: ...

    async def create_draft_mr(self, new: NewMergeRequest) -> MergeRequest: ...

    async def update_mr(
        self, mr: MergeRequest, *, title: str | None = None, description: str | None = None
    ) -> MergeRequest: ...

    async def clone_url(self) -> str: ...

    def credentials(self) -> GitCredentials | None: ...

    async def aclose(self) -> None: ...
