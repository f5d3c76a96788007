"""GitHub adapter through githubkit's async API (GitHub.com and GitHub Enterprise Server).

githubkit's own retries are off (`auto_retry=False`) so that every adapter retries
the same way, in `call_with_retries`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import httpx
from githubkit import GitHub, TokenAuthStrategy
from githubkit.exception import GitHubException, RateLimitExceeded, RequestFailed
from githubkit.utils import UNSET
from pydantic import SecretStr
from pydantic import ValidationError as PydanticValidationError

from forgehand.forge._http_errors import (
    CallContext,
    HttpFailure,
    Sleep,
    call_with_retries,
    retry_after_seconds,
)
from forgehand.forge.base import (
    AccessLevel,
    Comment,
    GitCredentials,
    Issue,
    IssueState,
    MergeRequest,
    MergeRequestState,
    NewMergeRequest,
    ProjectRef,
    Reaction,
)
from forgehand.forge.config import GitHubConfig
from forgehand.forge.errors import ForgeConfigError

T = TypeVar("T")
ReactionContent = Literal["+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"]

_REACTIONS: dict[Reaction, ReactionContent] = {
    Reaction.THUMBS_UP: "+1",
    Reaction.THUMBS_DOWN: "-1",
    Reaction.EYES: "eyes",
    Reaction.ROCKET: "rocket",
    Reaction.HEART: "heart",
    Reaction.HOORAY: "hooray",
    Reaction.LAUGH: "laugh",
    Reaction.CONFUSED: "confused",
}
_ROLES = {
    "admin": AccessLevel.ADMIN,
    "maintain": AccessLevel.MAINTAIN,
    "write": AccessLevel.WRITE,
    "triage": AccessLevel.READ,
    "read": AccessLevel.READ,
}


def access_from_github(role_name: str, permission: str) -> AccessLevel:
    """Normalise `role_name` (custom roles fall back to the legacy `permission`)."""
    return _ROLES.get(role_name, _ROLES.get(permission, AccessLevel.NONE))


class GitHubForge:
    """One GitHub repository, addressed as `owner/repo`."""

    def __init__(
        self,
        config: GitHubConfig,
        project: ProjectRef,
        token: SecretStr,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        owner, _, repo = project.path.partition("/")
        if not owner or not repo or "/" in repo:
            raise ForgeConfigError(f"GitHub project must be OWNER/REPO, got {project.path!r}")
        self._config = config
        self._project = project
        self._owner, self._repo = owner, repo
        self._token = token
        self._sleep = sleep
        self._gh = GitHub(
            TokenAuthStrategy(token.get_secret_value()),
            base_url=config.url,
            timeout=config.timeout,
            auto_retry=False,
            http_cache=False,
        )
        self._info: tuple[str, str] | None = None

    @property
    def project(self) -> ProjectRef:
        return self._project

    async def get_issue(self, number: int) -> Issue:
        async def fetch() -> Issue:
            issue = (
                await self._gh.rest.issues.async_get(self._owner, self._repo, number)
            ).parsed_data
            return Issue(
                number=issue.number,
                title=issue.title,
                body=issue.body or "",
                state=IssueState.OPEN if issue.state == "open" else IssueState.CLOSED,
                locked=issue.locked,
                author=issue.user.login if issue.user else "",
                labels=tuple(
                    label if isinstance(label, str) else str(label.name or "")
                    for label in issue.labels
                ),
                web_url=issue.html_url,
            )

        return await self._call(self._issue_name(number), fetch)

    async def list_comments(self, number: int) -> list[Comment]:
        async def fetch() -> list[Comment]:
            pages: Any = self._gh.rest.paginate(
                self._gh.rest.issues.async_list_comments,
                owner=self._owner,
                repo=self._repo,
                issue_number=number,
                per_page=100,
            )
            return [
                Comment(
                    id=c.id,
                    author=c.user.login if c.user else "",
                    body=c.body or "",
                    created=c.created_at,
                )
                async for c in pages
            ]

        return await self._call(f"comments of {self._issue_name(number)}", fetch)

    async def add_comment(self, number: int, body: str) -> Comment:
        async def create() -> Comment:
            response = await self._gh.rest.issues.async_create_comment(
                self._owner, self._repo, number, body=body
            )
            c = response.parsed_data
            return Comment(
                id=c.id,
                author=c.user.login if c.user else "",
                body=c.body or "",
                created=c.created_at,
            )

        return await self._call(f"a comment on {self._issue_name(number)}", create)

    async def add_reaction(self, number: int, reaction: Reaction) -> None:
        content = _REACTIONS[reaction]

        async def react() -> None:
            await self._gh.rest.reactions.async_create_for_issue(
                self._owner, self._repo, number, content=content
            )

        await self._call(f"reaction {content} on {self._issue_name(number)}", react)

    async def user_access(self, username: str) -> AccessLevel:
        async def fetch() -> AccessLevel:
            try:
                response = await self._gh.rest.repos.async_get_collaborator_permission_level(
                    self._owner, self._repo, username
                )
            except RequestFailed as exc:
                if exc.response.status_code == 404:
                    return AccessLevel.NONE
                raise
            data = response.parsed_data
            return access_from_github(data.role_name, data.permission)

        return await self._call(f"access of {username!r} to {self._project.path}", fetch)

    async def find_mr_for_branch(self, source_branch: str) -> MergeRequest | None:
        async def fetch() -> MergeRequest | None:
            response = await self._gh.rest.pulls.async_list(
                self._owner, self._repo, state="open", head=f"{self._owner}:{source_branch}"
            )
            found: list[Any] = response.parsed_data  # type: ignore[assignment]
            pulls = [_to_merge_request(p) for p in found]
            return next((p for p in pulls if p.source_branch == source_branch), None)

        return await self._call(f"pull requests from {source_branch!r}", fetch)

    async def create_draft_mr(self, new: NewMergeRequest) -> MergeRequest:
        target = new.target_branch or await self._default_branch()

        async def create() -> MergeRequest:
            response = await self._gh.rest.pulls.async_create(
                self._owner,
                self._repo,
                title=new.title,
                head=new.source_branch,
                base=target,
                body=new.description,
                draft=True,
            )
            return _to_merge_request(response.parsed_data)

        return await self._call(f"a pull request from {new.source_branch!r}", create)

    async def update_mr(
        self, mr: MergeRequest, *, title: str | None = None, description: str | None = None
    ) -> MergeRequest:
        async def update() -> MergeRequest:
            response = await self._gh.rest.pulls.async_update(
                self._owner,
                self._repo,
                mr.number,
                title=UNSET if title is None else title,
                body=UNSET if description is None else description,
            )
            return _to_merge_request(response.parsed_data)

        return await self._call(f"pull request #{mr.number}", update)

    async def clone_url(self) -> str:
        return (await self._repository())[0]

    def credentials(self) -> GitCredentials:
        return GitCredentials(username="x-access-token", password=self._token)

    async def aclose(self) -> None:
        return None

    async def _default_branch(self) -> str:
        return (await self._repository())[1]

    async def _repository(self) -> tuple[str, str]:
        if self._info is None:

            async def fetch() -> tuple[str, str]:
                repo = (await self._gh.rest.repos.async_get(self._owner, self._repo)).parsed_data
                return repo.clone_url, repo.default_branch

            self._info = await self._call(f"repository {self._project.path}", fetch)
        return self._info

    def _issue_name(self, number: int) -> str:
        return f"issue #{number} of {self._project.path}"

    async def _call(self, resource: str, fn: Callable[[], Awaitable[T]]) -> T:
        ctx = CallContext("GitHub", self._config.url, self._config.token_env, resource)

        async def attempt() -> T:
            try:
                return await fn()
            except GitHubException as exc:
                raise _failure(exc) from None
            except (httpx.HTTPError, PydanticValidationError) as exc:
                raise HttpFailure(None, f"{type(exc).__name__}: {exc}") from None

        return await call_with_retries(attempt, ctx, self._config.retry, self._sleep)


def _failure(exc: GitHubException) -> HttpFailure:
    if not isinstance(exc, RequestFailed):
        return HttpFailure(None, f"{type(exc).__name__}: {exc!r}")
    response = exc.response.raw_response
    return HttpFailure(
        response.status_code,
        _error_message(response),
        retry_after=retry_after_seconds(response.headers),
        rate_limited=isinstance(exc, RateLimitExceeded),
    )


def _error_message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        return response.reason_phrase
    if not isinstance(body, dict):
        return str(body)
    details = [_detail(e) for e in body.get("errors") or () if isinstance(e, dict)]
    message = str(body.get("message", response.reason_phrase))
    return f"{message}: {'; '.join(details)}" if details else message


def _detail(error: dict[str, Any]) -> str:
    if "message" in error:
        return str(error["message"])
    return " ".join(str(error[k]) for k in ("resource", "field", "code") if k in error)


def _to_merge_request(pull: Any) -> MergeRequest:
    if pull.merged_at is not None:
        state = MergeRequestState.MERGED
    else:
        state = MergeRequestState.OPEN if pull.state == "open" else MergeRequestState.CLOSED
    return MergeRequest(
        number=pull.number,
        source_branch=pull.head.ref,
        target_branch=pull.base.ref,
        title=pull.title,
        description=pull.body or "",
        draft=bool(pull.draft),
        state=state,
        web_url=pull.html_url,
    )
