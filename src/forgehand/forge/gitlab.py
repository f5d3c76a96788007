"""GitLab adapter: python-gitlab's blocking calls, each run in a worker thread.

python-gitlab's own retry loop sleeps in the thread; it is switched off
(`obey_rate_limit=False` on every call, `retry_transient_errors=False`) so that
retries happen in `call_with_retries`, on the event loop, with capped waits.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar, cast

import gitlab
import requests
from gitlab.exceptions import GitlabError
from pydantic import SecretStr

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
from forgehand.forge.config import GitLabConfig

T = TypeVar("T")
Json = dict[str, Any]

NO_SDK_RETRY: Mapping[str, Any] = {"obey_rate_limit": False}
DRAFT_PREFIX = "Draft: "
_DRAFT_RE = re.compile(r"^\s*(\[draft\]|\(draft\)|draft:)\s*", re.IGNORECASE)
_AWARD_NAMES = {
    Reaction.THUMBS_UP: "thumbsup",
    Reaction.THUMBS_DOWN: "thumbsdown",
    Reaction.EYES: "eyes",
    Reaction.ROCKET: "rocket",
    Reaction.HEART: "heart",
    Reaction.HOORAY: "tada",
    Reaction.LAUGH: "laughing",
    Reaction.CONFUSED: "confused",
}
_MR_STATES = {
    "opened": MergeRequestState.OPEN,
    "merged": MergeRequestState.MERGED,
}


def access_from_gitlab(level: int) -> AccessLevel:
    """Normalise a GitLab access level (10 guest ... 50 owner)."""
    if level >= 50:
        return AccessLevel.ADMIN
    if level >= 40:
        return AccessLevel.MAINTAIN
    if level >= 30:
        return AccessLevel.WRITE
    return AccessLevel.READ if level >= 10 else AccessLevel.NONE


class GitLabForge:
    """One GitLab project, addressed by its full path (`group/sub/project`)."""

    def __init__(
        self,
        config: GitLabConfig,
        project: ProjectRef,
        token: SecretStr,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._config = config
        self._project = project
        self._token = token
        self._sleep = sleep
        self._last_response = threading.local()
        self._session = requests.Session()
        self._session.hooks["response"].append(self._remember_response)
        self._gl = gitlab.Gitlab(
            config.url,
            private_token=token.get_secret_value(),
            timeout=config.timeout,
            session=self._session,
            retry_transient_errors=False,
        )
        self._remote = self._gl.projects.get(project.path, lazy=True)
        self._info: Json | None = None

    @property
    def project(self) -> ProjectRef:
        return self._project

    async def get_issue(self, number: int) -> Issue:
        issue = await self._call(self._issue_name(number), lambda: self._issue(number, lazy=False))
        return _to_issue(issue.attributes)

    async def list_comments(self, number: int) -> list[Comment]:
        def fetch() -> list[Json]:
            notes = self._issue(number).notes.list(
                get_all=True, sort="asc", order_by="created_at", **NO_SDK_RETRY
            )
            return [note.attributes for note in notes]

        notes = await self._call(f"comments of {self._issue_name(number)}", fetch)
        return [_to_comment(note) for note in notes if not note.get("system")]

    async def add_comment(self, number: int, body: str) -> Comment:
        def create() -> Json:
            note = self._issue(number).notes.create({"body": body}, **NO_SDK_RETRY)
            return cast(Json, note.attributes)

        return _to_comment(await self._call(f"a comment on {self._issue_name(number)}", create))

    async def add_reaction(self, number: int, reaction: Reaction) -> None:
        name = _AWARD_NAMES[reaction]

        def award() -> None:
            try:
                self._issue(number).awardemojis.create({"name": name}, **NO_SDK_RETRY)
            except GitlabError as exc:
                if "already been taken" not in str(exc.error_message):
                    raise

        await self._call(f"reaction :{name}: on {self._issue_name(number)}", award)

    async def user_access(self, username: str) -> AccessLevel:
        level = await self._call(
            f"access of {username!r} to {self._project.path}", lambda: self._member_level(username)
        )
        return access_from_gitlab(level)

    async def find_mr_for_branch(self, source_branch: str) -> MergeRequest | None:
        def fetch() -> list[Json]:
            found = self._remote.mergerequests.list(
                source_branch=source_branch, state="opened", get_all=True, **NO_SDK_RETRY
            )
            return [mr.attributes for mr in found]

        found = await self._call(f"merge requests from {source_branch!r}", fetch)
        matches = [mr for mr in found if mr.get("source_branch") == source_branch]
        return _to_merge_request(matches[0]) if matches else None

    async def create_draft_mr(self, new: NewMergeRequest) -> MergeRequest:
        target = new.target_branch or await self._default_branch()
        payload = {
            "source_branch": new.source_branch,
            "target_branch": target,
            "title": DRAFT_PREFIX + new.title,
            "description": new.description,
        }

        def create() -> Json:
            return self._remote.mergerequests.create(payload, **NO_SDK_RETRY).attributes

        created = await self._call(f"a merge request from {new.source_branch!r}", create)
        return _to_merge_request(created)

    async def update_mr(
        self, mr: MergeRequest, *, title: str | None = None, description: str | None = None
    ) -> MergeRequest:
        payload: Json = {}
        if title is not None:
            payload["title"] = DRAFT_PREFIX + title if mr.draft else title
        if description is not None:
            payload["description"] = description

        def update() -> Json:
            return self._remote.mergerequests.update(mr.number, payload, **NO_SDK_RETRY)

        return _to_merge_request(await self._call(f"merge request !{mr.number}", update))

    async def clone_url(self) -> str:
        return str((await self._project_info())["http_url_to_repo"])

    def credentials(self) -> GitCredentials:
        return GitCredentials(username="oauth2", password=self._token)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._session.close)

    async def _default_branch(self) -> str:
        return str((await self._project_info()).get("default_branch") or "main")

    async def _project_info(self) -> Json:
        if self._info is None:

            def fetch() -> Json:
                return self._gl.projects.get(self._project.path, **NO_SDK_RETRY).attributes

            self._info = await self._call(f"project {self._project.path}", fetch)
        return self._info

    def _issue(self, number: int, *, lazy: bool = True) -> Any:
        return self._remote.issues.get(number, lazy=lazy, **({} if lazy else NO_SDK_RETRY))

    def _member_level(self, username: str) -> int:
        users = self._gl.users.list(username=username, get_all=True, **NO_SDK_RETRY)
        if not users:
            return 0
        try:
            member = self._remote.members_all.get(users[0].id, **NO_SDK_RETRY)
        except GitlabError as exc:
            if exc.response_code == 404:
                return 0
            raise
        return int(member.access_level)

    def _issue_name(self, number: int) -> str:
        return f"issue #{number} of {self._project.path}"

    async def _call(self, resource: str, fn: Callable[[], T]) -> T:
        ctx = CallContext("GitLab", self._config.url, self._config.token_env, resource)

        async def attempt() -> T:
            return await asyncio.to_thread(self._in_thread, fn)

        return await call_with_retries(attempt, ctx, self._config.retry, self._sleep)

    def _in_thread(self, fn: Callable[[], T]) -> T:
        self._last_response.value = None
        try:
            return fn()
        except GitlabError as exc:
            raise self._failure(exc) from None
        except requests.RequestException as exc:
            raise HttpFailure(None, type(exc).__name__) from None

    def _failure(self, exc: GitlabError) -> HttpFailure:
        response: requests.Response | None = self._last_response.value
        headers = response.headers if response is not None else {}
        return HttpFailure(
            exc.response_code,
            str(exc.error_message),
            retry_after=retry_after_seconds(headers),
        )

    def _remember_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._last_response.value = response


def _to_issue(data: Json) -> Issue:
    return Issue(
        number=int(data["iid"]),
        title=str(data["title"]),
        body=str(data.get("description") or ""),
        state=IssueState.OPEN if data.get("state") == "opened" else IssueState.CLOSED,
        locked=bool(data.get("discussion_locked")),
        author=str((data.get("author") or {}).get("username", "")),
        labels=tuple(_label_name(label) for label in data.get("labels") or ()),
        web_url=str(data.get("web_url", "")),
    )


def _label_name(label: str | Json) -> str:
    return label if isinstance(label, str) else str(label.get("name", ""))


def _to_comment(data: Json) -> Comment:
    return Comment(
        id=int(data["id"]),
        author=str((data.get("author") or {}).get("username", "")),
        body=str(data.get("body") or ""),
        created=datetime.fromisoformat(str(data["created_at"])),
    )


def _to_merge_request(data: Json) -> MergeRequest:
    title = str(data.get("title") or "")
    draft = bool(data.get("draft", data.get("work_in_progress", False)))
    return MergeRequest(
        number=int(data["iid"]),
        source_branch=str(data["source_branch"]),
        target_branch=str(data["target_branch"]),
        title=_DRAFT_RE.sub("", title, count=1) if draft else title,
        description=str(data.get("description") or ""),
        draft=draft,
        state=_MR_STATES.get(str(data.get("state")), MergeRequestState.CLOSED),
        web_url=str(data.get("web_url", "")),
    )
